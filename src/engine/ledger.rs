//! A training step's logged scalars on their way to the host (docs/architecture.md §12):
//! each micro-batch's loss report and load-balancing sums, and the step's gradient norm,
//! copied as the device computes them and read one step later, while the device runs the
//! next step, so that the host never waits for a step's end before it queues the next.
//!
//! The decisions that need those scalars are taken on the device instead: a micro-batch whose
//! loss or load-balancing sums are not finite marks the step dropped
//! ([`Kernels::flag_nonfinite`]), and the AdamW launch skips it; the host learns it from the
//! norm's `coef` a step later, before it queues the AdamW launch whose step count depends on
//! it.

use super::loss::{DeviceReport, ReportShape};
use crate::model::PassOutput;
use crate::ops::cuda::device::{AsView, Device, View};
use crate::ops::cuda::kernels::{GradNormWorkspace, Kernels};
use crate::ops::cuda::moe::DeviceBalance;
use crate::ops::cuda::readback::{Readback, Slot};
use crate::ops::moe::LoadBalance;
use crate::step::Logged;
use anyhow::{ensure, Context, Result};

/// What a step logged, read.
pub struct StepScalars {
    pub logged: Logged,
    pub grad_norm: f64,
    /// Whether the device dropped the update: a loss, or the gradient's norm, not finite.
    pub dropped: bool,
}

/// One micro-batch's copies.
struct Pass {
    share: f64,
    summary: Slot<f64>,
    report: ReportShape,
    /// The load-balancing sums and the experts they count (Mixtral).
    balance: Option<(Slot<f64>, usize)>,
}

/// One step's copies.
#[derive(Default)]
struct Half {
    readback: Readback,
    passes: Vec<Pass>,
    /// `[norm, coef]`, once the step is finished.
    norm: Option<Slot<f32>>,
}

/// The copies of the step being queued and of the finished step before it, each in its own
/// half, so that the copies of one never overwrite the other's before it is read.
#[derive(Default)]
pub struct Ledger {
    halves: [Half; 2],
    /// The half of the step being queued.
    current: usize,
}

impl Ledger {
    /// Queues the copies of a micro-batch's report and load-balancing sums, weighted by
    /// `share` (its part of the step's groups), and has the device drop the step when its
    /// loss or sums are not finite.
    pub fn push(
        &mut self,
        device: &Device,
        norm: &GradNormWorkspace,
        share: f64,
        out: PassOutput<DeviceReport, Option<DeviceBalance>>,
    ) -> Result<()> {
        let kernels = Kernels::new(device);
        let half = &mut self.halves[self.current];
        ensure!(
            half.norm.is_none(),
            "a micro-batch queued into a finished step"
        );
        let loss = out.report.summary.view().slice(0, 1)?;
        kernels.flag_nonfinite(&loss, norm)?;
        let summary = device.queue_download(&out.report.summary, &mut half.readback)?;
        let balance = match out.balance {
            Some(balance) => {
                let balance =
                    balance.context("no load-balancing sums: an earlier operation failed")?;
                kernels.flag_nonfinite(&balance.sums, norm)?;
                let slot = device.queue_download(&balance.sums, &mut half.readback)?;
                Some((slot, balance.experts))
            }
            None => None,
        };
        half.passes.push(Pass {
            share,
            summary,
            report: out.report.shape,
            balance,
        });
        Ok(())
    }

    /// Ends the step being queued with its `[norm, coef]`: it waits for its read from here
    /// on, and the next step queues into the other half, which must have been read.
    pub fn finish(&mut self, device: &Device, norm_and_coef: View<f32>) -> Result<()> {
        let half = &mut self.halves[self.current];
        half.norm = Some(device.queue_download(&norm_and_coef, &mut half.readback)?);
        self.current ^= 1;
        let next = &self.halves[self.current];
        ensure!(
            next.norm.is_none() && next.passes.is_empty(),
            "a step finished before the step before it was read"
        );
        Ok(())
    }

    /// The scalars of the finished step, if one waits for its read (waiting for its copies,
    /// which are done unless the device is still running that step); `aux_coef` weighs the
    /// load-balancing loss in the objective.
    pub fn read_finished(&mut self, device: &Device, aux_coef: f64) -> Result<Option<StepScalars>> {
        let half = &mut self.halves[self.current ^ 1];
        let Some(norm_slot) = half.norm else {
            return Ok(None);
        };
        device.wait_readback(&mut half.readback)?;
        let mut logged = Logged::default();
        for pass in &half.passes {
            let report = pass.report.read(&half.readback.read(pass.summary)?)?;
            let aux_loss = match pass.balance {
                Some((slot, experts)) => {
                    Some(LoadBalance::from_flat_sums(experts, &half.readback.read(slot)?)?.loss())
                }
                None => None,
            };
            logged.add(pass.share, Logged::new(report, aux_loss, aux_coef));
        }
        let norm_and_coef = half.readback.read(norm_slot)?;
        let (norm, coef) = (norm_and_coef[0], norm_and_coef[1]);
        half.passes.clear();
        half.norm = None;
        half.readback.clear()?;
        Ok(Some(StepScalars {
            logged,
            grad_norm: norm as f64,
            dropped: !(norm.is_finite() && coef.is_finite()),
        }))
    }
}
