//! The MoE layer's row moves and the experts' projections on a device, at the ops' storage
//! type: the permutations and the router's slot dots (cuda/moe.cu), and
//! [`Ops::moe_expert_matmul`] and its backward as the grouped GEMMs of cuda/moe_gemm.cu,
//! which read each expert's rows on the device.
//!
//! The kernels find the experts' tensors at one stride ([`ExpertStack`]), which is how the
//! engine's flat store lays them out: there they run in place. Tensors uploaded one by one
//! (`score`, `eval`, the benchmarks) are first copied into one contiguous stack, and
//! gradients the kernels cannot accumulate into in place go through an f32 copy, rounded back
//! once, as [`DeviceOps::accumulate_f32`] does for the other ops.
//!
//! [`Ops::moe_expert_matmul`]: crate::ops::Ops::moe_expert_matmul

use super::DeviceOps;
use crate::ops::cuda::device::View;
use crate::ops::cuda::fresh::GradWrite;
use crate::ops::cuda::moe::{DeviceRouting, ExpertStack};
use crate::ops::cuda::pool::{Leased, Stored, Tensor, TensorView};
use crate::ops::storage::Dtype;
use anyhow::{ensure, Result};
use half::bf16;

/// Expert tensors as the kernels take them, each expert's view, and the contiguous copy
/// they were made into when they did not lie at one stride as `E`.
struct Stack<E> {
    stack: ExpertStack<E>,
    views: Vec<View<E>>,
    copy: Option<Tensor>,
}

/// `tensors` where they lie, when every one is stored as `E` and they lie at one stride.
fn in_place<E: Stored>(what: &str, tensors: &[&Tensor]) -> Option<(ExpertStack<E>, Vec<View<E>>)> {
    let views: Vec<View<E>> = tensors
        .iter()
        .map(|t| E::unwrap(t.storage()))
        .collect::<Option<_>>()?;
    let stack = ExpertStack::new(what, &views).ok()?;
    Some((stack, views))
}

impl DeviceOps<'_> {
    /// `tensors` as `E`: themselves when they are stored as `E` at one stride, else a
    /// contiguous copy cast to `E`.
    fn expert_stack<E: Stored>(&self, what: &str, tensors: &[&Tensor]) -> Result<Stack<E>> {
        if let Some((stack, views)) = in_place::<E>(what, tensors) {
            return Ok(Stack {
                stack,
                views,
                copy: None,
            });
        }
        let stack = self.contiguous_stack::<E>(what, tensors)?;
        for (t, &view) in tensors.iter().zip(&stack.views) {
            self.convert(t.storage(), E::wrap(view))?;
        }
        self.expert_copies
            .set(self.expert_copies.get() + tensors.len() as u64);
        Ok(stack)
    }

    /// Space for `tensors` (of one length) as `E`, one after the other, its values not set.
    fn contiguous_stack<E: Stored>(&self, what: &str, tensors: &[&Tensor]) -> Result<Stack<E>> {
        let (len, experts) = (tensors.first().map_or(0, |t| t.len()), tensors.len());
        for (e, t) in tensors.iter().enumerate() {
            ensure!(
                t.len() == len,
                "{what}: expert {e} has {} elements, expert 0 {len}",
                t.len()
            );
        }
        let copy = self.alloc::<E>(len * experts)?;
        let whole = copy.view_as::<E>(what)?;
        let views = (0..experts)
            .map(|e| whole.slice(e * len, len))
            .collect::<Result<Vec<_>>>()?;
        Ok(Stack {
            stack: ExpertStack::new(what, &views)?,
            views,
            copy: Some(copy),
        })
    }

    /// `x [T, d]`'s rows in expert order, stored as `E`.
    pub(super) fn permute_at<E: Stored>(
        &self,
        x: &Tensor,
        r: &DeviceRouting,
        weighted: bool,
        d: usize,
    ) -> Result<Tensor> {
        let x = self.input::<E>(x)?;
        let out = self.alloc::<E>(r.slots() * d)?;
        let mut view = out.view_as::<E>("moe_permute out")?;
        self.moe().permute(&x, r, weighted, &mut view, d)?;
        Ok(out)
    }

    /// Each token's rows of `y` (expert order) summed, stored as `E`.
    pub(super) fn unpermute_at<E: Stored>(
        &self,
        y: &Tensor,
        r: &DeviceRouting,
        weighted: bool,
        d: usize,
    ) -> Result<Tensor> {
        let y = self.input::<E>(y)?;
        let out = self.alloc::<E>(r.tokens * d)?;
        let mut view = out.view_as::<E>("moe_unpermute out")?;
        self.moe().unpermute(&y, r, weighted, &mut view, d)?;
        Ok(out)
    }

    /// `dL/dweight` per slot from the combine's `dout` and the experts' outputs `y`, read as
    /// `E`.
    pub(super) fn slot_dots_at<E: Stored>(
        &self,
        dout: &Tensor,
        y: &Tensor,
        r: &DeviceRouting,
        d: usize,
    ) -> Result<Leased<f64>> {
        let (dout, y) = (self.input::<E>(dout)?, self.input::<E>(y)?);
        self.moe().slot_dots(&dout, &y, r, d)
    }

    pub(super) fn expert_matmul_at<E: Stored>(
        &self,
        (x, w): (&Tensor, &[&Tensor]),
        r: &DeviceRouting,
        (k, n): (usize, usize),
    ) -> Result<Tensor> {
        let x = self.input::<E>(x)?;
        let w = self.expert_stack::<E>("moe expert weights", w)?;
        let y = self.alloc::<E>(r.slots() * n)?;
        let out = y.view_as::<E>("moe expert output")?;
        self.moe().expert_forward(x.view, w.stack, r, (k, n), out)?;
        Ok(y)
    }

    pub(super) fn expert_matmul_backward_at<E: Stored>(
        &self,
        (x, w, dy): (&Tensor, &[&Tensor], &Tensor),
        r: &DeviceRouting,
        (k, n): (usize, usize),
        dw: &mut [&mut Tensor],
    ) -> Result<Tensor> {
        let (xv, dyv) = (self.input::<E>(x)?, self.input::<E>(dy)?);
        self.expert_weight_grads::<E>((dyv.view, xv.view), r, (k, n), dw)?;
        self.expert_input_grad_at::<E>((w, dy), r, (k, n))
    }

    /// `dx = dy · w[e]` on each expert's rows.
    fn expert_input_grad_at<E: Stored>(
        &self,
        (w, dy): (&[&Tensor], &Tensor),
        r: &DeviceRouting,
        (k, n): (usize, usize),
    ) -> Result<Tensor> {
        let dy = self.input::<E>(dy)?;
        let w = self.expert_stack::<E>("moe expert weights", w)?;
        let dx = self.alloc::<E>(r.slots() * k)?;
        let out = dx.view_as::<E>("moe expert input gradient")?;
        self.moe()
            .expert_input_grad(dy.view, w.stack, r, (k, n), out)?;
        Ok(dx)
    }

    /// [`Ops::moe_swiglu_down_backward`]: each expert's `dact = dy · w[e]` first, then
    /// `(dgate, dup)` and the SwiGLU's output in one pass, then the weight gradients from it.
    ///
    /// [`Ops::moe_swiglu_down_backward`]: crate::ops::Ops::moe_swiglu_down_backward
    pub(super) fn moe_swiglu_down_backward_at<E: Stored>(
        &self,
        (gate, up): (&Tensor, &Tensor),
        (w, dy): (&[&Tensor], &Tensor),
        r: &DeviceRouting,
        (i, d): (usize, usize),
        dw: &mut [&mut Tensor],
    ) -> Result<(Tensor, Tensor)> {
        let dact = self.expert_input_grad_at::<E>((w, dy), r, (i, d))?;
        let (act, dgate, dup) = self.swiglu_backward_output_at::<E>(gate, up, &dact)?;
        let (act, dy) = (self.input::<E>(&act)?, self.input::<E>(dy)?);
        self.expert_weight_grads::<E>((dy.view, act.view), r, (i, d), dw)?;
        Ok((dgate, dup))
    }

    /// `dw[e] += dy_eᵀ · x_e`, overwriting them (`=`) when they are all fresh gradients: in
    /// place when the gradients lie at one stride as f32, or as bf16 with bf16 inputs (the
    /// kernels' accumulating types); else through f32 space, a copy of them unless they are
    /// overwritten, rounded back once.
    fn expert_weight_grads<E: Stored>(
        &self,
        (dy, x): (View<E>, View<E>),
        r: &DeviceRouting,
        (k, n): (usize, usize),
        dw: &mut [&mut Tensor],
    ) -> Result<()> {
        let what = "moe expert weight gradients";
        let moe = self.moe();
        let tensors: Vec<&Tensor> = dw.iter().map(|t| &**t).collect();
        let write = self.grad_write(&tensors)?;
        if let Some((stack, _)) = in_place::<f32>(what, &tensors) {
            return moe.expert_weight_grad((dy, x), r, (k, n), stack, write);
        }
        if E::STORED == Dtype::Bf16 {
            if let Some((stack, _)) = in_place::<bf16>(what, &tensors) {
                return moe.expert_weight_grad((dy, x), r, (k, n), stack, write);
            }
        }
        let sums = match write {
            GradWrite::Accumulate => self.expert_stack::<f32>(what, &tensors)?,
            GradWrite::Overwrite => self.contiguous_stack::<f32>(what, &tensors)?,
        };
        moe.expert_weight_grad((dy, x), r, (k, n), sums.stack, write)?;
        if sums.copy.is_some() {
            for (t, &sum) in dw.iter().zip(&sums.views) {
                self.convert(TensorView::F32(sum), t.storage())?;
            }
        }
        Ok(())
    }
}
