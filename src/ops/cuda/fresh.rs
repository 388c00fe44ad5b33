//! Gradients a step has not written yet (docs/cuda.md, "Fresh gradients"). Zeroing every
//! gradient at a step's start is a memset of the whole flat store (2 bytes a parameter with
//! bf16 gradients: 14.5 GB for Mistral-7B), most of which the step's first weight-gradient
//! GEMMs would overwrite anyway. Instead the engine marks its gradients fresh: the first op
//! that writes a fresh gradient either overwrites all of it (a GEMM with `β = 0`, the
//! experts' grouped GEMMs, RMSNorm's `dw` reduction, the LM head's first chunk) or, if it
//! scatters into it (the embedding's backward), zeroes it first; what a micro-batch leaves
//! fresh is zeroed at its end, so that every gradient holds its sum whenever anything else
//! reads it.

use super::device::Device;
use super::pool::TensorView;
use anyhow::Result;
use std::cell::RefCell;
use std::collections::BTreeMap;

/// How an op writes a gradient (or any accumulator).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWrite {
    /// Adds into it: `g += …`.
    Accumulate,
    /// Overwrites it, `g = …`, without reading its old bytes: a fresh gradient. An op that
    /// sums several parts into it (experts, chunks, partial rows) writes zeros where no part
    /// falls.
    Overwrite,
}

impl GradWrite {
    /// A GEMM's `β` for this write: 1 adds into `C`, 0 overwrites it without reading it.
    pub fn beta(self) -> f32 {
        match self {
            GradWrite::Accumulate => 1.0,
            GradWrite::Overwrite => 0.0,
        }
    }

    /// The write a GEMM with `beta` makes.
    pub fn of_beta(beta: f32) -> Self {
        if beta == 0.0 {
            GradWrite::Overwrite
        } else {
            GradWrite::Accumulate
        }
    }

    /// The kernels' `accumulate` argument: 1 to add, 0 to overwrite.
    pub fn accumulate_flag(self) -> i32 {
        i32::from(self == GradWrite::Accumulate)
    }
}

/// The fresh gradients, by the device address of their first byte.
#[derive(Debug, Default)]
pub struct FreshGrads {
    spans: RefCell<BTreeMap<u64, TensorView>>,
}

/// A view's device bytes `[start, end)`.
fn bytes(t: &TensorView) -> (u64, u64) {
    let start = t.device_ptr();
    (start, start + t.bytes() as u64)
}

impl FreshGrads {
    /// Marks `grads` fresh, forgetting any earlier marks: the start of a step.
    pub fn mark(&self, grads: impl IntoIterator<Item = TensorView>) {
        *self.spans.borrow_mut() = grads
            .into_iter()
            .filter(|g| !g.is_empty())
            .map(|g| (g.device_ptr(), g))
            .collect();
    }

    /// Forgets every mark: the gradients were written whole by other means.
    pub fn clear(&self) {
        self.spans.borrow_mut().clear();
    }

    /// The fresh gradients that share a byte with `t`, unmarked.
    fn take_overlapping(&self, t: &TensorView) -> Vec<TensorView> {
        let (start, end) = bytes(t);
        let mut spans = self.spans.borrow_mut();
        // A span that begins before `t` can reach into it; later ones begin inside it or after.
        let before = spans.range(..start).next_back().map(|(&at, _)| at);
        let keys: Vec<u64> = before
            .into_iter()
            .chain(spans.range(start..end).map(|(&at, _)| at))
            .filter(|at| {
                let (s, e) = bytes(&spans[at]);
                s < end && start < e
            })
            .collect();
        keys.iter().filter_map(|at| spans.remove(at)).collect()
    }

    /// Whether an op may overwrite `ts` rather than add into them: each is exactly a fresh
    /// gradient, and they are then fresh no more. Otherwise the fresh gradients any of them
    /// shares a byte with are zeroed first, and the answer is no.
    pub fn overwrites(&self, device: &Device, ts: &[TensorView]) -> Result<bool> {
        let exact = |t: &TensorView| {
            self.spans
                .borrow()
                .get(&t.device_ptr())
                .is_some_and(|g| bytes(g) == bytes(t))
        };
        if !ts.is_empty() && ts.iter().all(exact) {
            let mut spans = self.spans.borrow_mut();
            for t in ts {
                spans.remove(&t.device_ptr());
            }
            return Ok(true);
        }
        ts.iter().try_for_each(|t| self.settle(device, t))?;
        Ok(false)
    }

    /// Zeroes what of `t` is fresh, for an op that adds into it.
    pub fn settle(&self, device: &Device, t: &TensorView) -> Result<()> {
        self.take_overlapping(t)
            .iter()
            .try_for_each(|g| zero(device, g))
    }

    /// Zeroes every gradient still fresh: the end of a micro-batch.
    pub fn settle_all(&self, device: &Device) -> Result<()> {
        let spans = std::mem::take(&mut *self.spans.borrow_mut());
        spans.values().try_for_each(|g| zero(device, g))
    }
}

fn zero(device: &Device, t: &TensorView) -> Result<()> {
    match *t {
        TensorView::F32(mut v) => device.zero(&mut v),
        TensorView::Bf16(mut v) => device.zero(&mut v),
    }
}
