//! The device-resident training engine (docs/architecture.md §12): the policy's weights, its
//! gradients and AdamW's moments in one arena on a device, each a flat buffer
//! ([`ParamLayout`], [`store`]); every op's output leased from a pool made once
//! ([`crate::ops::cuda::pool`]); a step that starts its gradients at zero without a pass over
//! them (fresh gradients, docs/cuda.md), accumulates its micro-batches into them, takes the
//! global norm and runs AdamW with the clipping folded in, one launch each, without any
//! device allocation after the first step.
//!
//! Each store is f32 or bf16 as the plan's precision says (docs/numerics.md §7): bf16 weights
//! with or without an fp32 master copy, gradients and moments f32 or bf16; `--precision f32`
//! stores everything f32, the path checked against the CPU exactly. A step downloads its
//! logged scalars and nothing else, and the host reads them a step late ([`ledger`],
//! docs/architecture.md §12).

pub mod bench;
pub mod ledger;
pub mod loss;
pub mod moe_bench;
pub mod step_model;
pub mod store;

use crate::config::ModelConfig;
use crate::data::Group;
use crate::loss::LossSpec;
use crate::memory_plan::layout::ParamLayout;
use crate::memory_plan::{
    MemoryPlan, PlanOptions, PrecisionOptions, RecomputePolicy, ReferenceSource,
};
use crate::model::params::{param_specs, Params};
use crate::model::{Model, ResponseStats, StepOptions};
use crate::ops::cuda::device::{Arena, Device, View, ALIGNMENT};
use crate::ops::cuda::fresh::FreshGrads;
use crate::ops::cuda::kernels::{AdamWStep, GradNormWorkspace, Kernels};
use crate::ops::cuda::ops::DeviceOps;
use crate::ops::cuda::pool::{Pool, Tensor, TensorView};
use crate::ops::optimizer::AdamWConfig;
use crate::ops::storage::Dtype;
use crate::ops::Ops;
use crate::step::{self, LossOps, RefStats};
use anyhow::{bail, ensure, Context, Result};
use ledger::{Ledger, StepScalars};
use std::cell::Cell;
use std::rc::Rc;

/// AdamW's first and second moments, per tensor in checkpoint order.
pub type Moments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// One of AdamW's two moments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// `exp_avg`, the first.
    ExpAvg,
    /// `exp_avg_sq`, the second.
    ExpAvgSq,
}

/// The flat buffers of the arena, each in the type the plan gives it.
struct Flat {
    weights: TensorView,
    /// The fp32 master copy of bf16 weights (`--master f32`).
    master: Option<View<f32>>,
    grads: TensorView,
    exp_avg: TensorView,
    exp_avg_sq: TensorView,
}

/// One AdamW update of the engine's weights.
#[derive(Clone, Copy, Debug)]
pub struct Update<'a> {
    pub config: &'a AdamWConfig,
    /// The optimizer step (1 for the first update).
    pub step: u64,
    pub lr: f64,
    /// The stochastic roundings' seed (the run's).
    pub seed: u64,
}

pub struct DeviceEngine {
    /// The policy, its tensors views of `flat.weights`.
    model: Model<Tensor>,
    /// Views of `flat.grads`, in the same layout.
    grads: Params<Tensor>,
    /// Which of `grads` this step has not written yet ([`DeviceEngine::zero_grads`]).
    fresh: Rc<FreshGrads>,
    /// A micro-batch of this step failed part way: `grads` hold part of its sum, and no
    /// update may be made from them until the next [`DeviceEngine::zero_grads`].
    partial: Cell<bool>,
    /// A reference model resident on the device (the plan's `reference.weights`), scored
    /// there each micro-batch; `None` when its statistics come from a cache.
    reference: Option<Model<Tensor>>,
    layout: ParamLayout,
    flat: Flat,
    norm: GradNormWorkspace,
    /// The logged scalars of the step being queued and of the one before it.
    ledger: Ledger,
    pool: Pool,
    /// The plan's rows of one logits chunk, which the scoring holds at most.
    logits_chunk_rows: usize,
    /// What the weights and the step's activations are stored in.
    storage: Dtype,
    /// Owns the memory every view above points into; declared after them so that it is
    /// dropped last.
    arena: Arena,
    device: Device,
}

impl DeviceEngine {
    /// The plan the engine allocates: the stores in `precision`, the reference's statistics
    /// cached, or its weights resident beside the policy's.
    pub fn plan(
        cfg: &ModelConfig,
        micro_tokens: usize,
        recompute: RecomputePolicy,
        reference: ReferenceSource,
        precision: PrecisionOptions,
    ) -> Result<MemoryPlan> {
        MemoryPlan::new(
            cfg,
            &PlanOptions {
                micro_tokens,
                precision,
                recompute,
                reference,
                logits_chunk_rows: None,
            },
        )
    }

    /// The engine on `device` for `policy` (weights uploaded once, moments zero), allocated
    /// as `plan` ([`DeviceEngine::plan`]) says: the parameter stores as its regions of the
    /// same names, the step's activations and workspace as a pool of the size of theirs.
    ///
    /// `reference`, when given, goes into the plan's `reference.weights` region (a plan made
    /// with [`ReferenceSource::Resident`]); it must have the policy's configuration.
    pub fn new(
        device: Device,
        policy: &Model<Vec<f32>>,
        reference: Option<&Model<Vec<f32>>>,
        plan: &MemoryPlan,
    ) -> Result<Self> {
        let layout = ParamLayout::new(&policy.cfg);
        let precision = plan.options.precision;
        let storage = Dtype::from(precision.precision);
        let master = precision.master_bytes() > 0;
        let stores = [
            ("weights", storage),
            ("grads", precision.grads.into()),
            ("moments.m", precision.moments.into()),
            ("moments.v", precision.moments.into()),
        ];
        let reference_region = ("reference.weights", storage);
        if let Some(r) = reference {
            ensure!(
                param_specs(&r.cfg) == param_specs(&policy.cfg),
                "a reference model resident on the device needs the policy's tensor shapes"
            );
        }
        let resident: Vec<(&str, Dtype)> = stores
            .into_iter()
            .chain(master.then_some(("master", Dtype::F32)))
            .chain(reference.map(|_| reference_region))
            .collect();
        let mut arena_bytes = 0;
        for &(name, dtype) in &resident {
            let region = plan
                .region(name)
                .with_context(|| format!("the memory plan has no region {name}"))?;
            let bytes = layout.elements * dtype_bytes(dtype);
            ensure!(
                region.bytes == bytes as u64,
                "the plan's {name} holds {} bytes, the {} store needs {bytes}",
                region.bytes,
                dtype.name()
            );
            arena_bytes += bytes.next_multiple_of(ALIGNMENT);
        }
        let workspace_bytes = (plan.workspace_bytes() as usize).next_multiple_of(ALIGNMENT);
        // One allocation: the parameter stores, then the step's workspace.
        let mut arena = Arena::new(&device, arena_bytes + workspace_bytes)?;
        let elements = layout.elements;
        let mut carve =
            |(name, dtype): (&str, Dtype)| store::carve(&mut arena, name, elements, dtype);
        let (weights, grads) = (carve(stores[0])?, carve(stores[1])?);
        let (exp_avg, exp_avg_sq) = (carve(stores[2])?, carve(stores[3])?);
        let master = match master {
            true => Some(arena.carve::<f32>("master", elements)?),
            false => None,
        };
        let flat = Flat {
            weights,
            master,
            grads,
            exp_avg,
            exp_avg_sq,
        };
        let host_weights = policy.params.iter();
        store::upload(&device, &layout, flat.weights, &host_weights)
            .context("uploading the policy's weights")?;
        if let Some(master) = flat.master {
            store::upload(&device, &layout, TensorView::F32(master), &host_weights)
                .context("uploading the policy's fp32 master weights")?;
        }
        let model = Model {
            cfg: policy.cfg.clone(),
            params: store::params(&layout, &policy.cfg, flat.weights)?,
            dtype: policy.dtype,
        };
        let grads = store::params(&layout, &policy.cfg, flat.grads)?;
        let reference = match reference {
            Some(r) => {
                let weights = store::carve(&mut arena, reference_region.0, elements, storage)?;
                store::upload(&device, &layout, weights, &r.params.iter())
                    .context("uploading the reference model's weights")?;
                Some(Model {
                    cfg: r.cfg.clone(),
                    params: store::params(&layout, &r.cfg, weights)?,
                    dtype: r.dtype,
                })
            }
            None => None,
        };
        let kernels = Kernels::new(&device);
        let norm = match flat.grads {
            TensorView::F32(g) => kernels.grad_norm_workspace(&[g])?,
            TensorView::Bf16(g) => kernels.grad_norm_workspace(&[g])?,
        };
        let pool = Pool::in_region(arena.carve::<u8>("workspace", workspace_bytes)?)?;
        Ok(DeviceEngine {
            model,
            grads,
            fresh: Rc::default(),
            partial: Cell::new(false),
            reference,
            logits_chunk_rows: plan.logits_chunk_rows,
            storage,
            layout,
            flat,
            norm,
            ledger: Ledger::default(),
            pool,
            arena,
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of device memory the engine holds: its arena (the parameter stores and the
    /// step's workspace) and what the workspace pool had to add beyond it.
    pub fn device_bytes(&self) -> usize {
        self.arena.capacity() + self.pool.allocated()
    }

    /// The most bytes of the workspace leased at once so far (the step's activations,
    /// recomputations, logits chunk and batch data), against the plan's categories for them.
    pub fn workspace_peak(&self) -> usize {
        self.pool.peak()
    }

    /// Starts a step's gradients at zero without writing them (`ops::cuda::fresh`): they
    /// are marked fresh, the first op that writes each overwrites or zeroes it, and each
    /// micro-batch's end zeroes what it left fresh. The padding between the store's spans
    /// is zero from the arena's one zero-fill and never written.
    pub fn zero_grads(&self) -> Result<()> {
        self.fresh
            .mark(self.grads.iter().into_iter().map(|g| g.storage()));
        self.partial.set(false);
        Ok(())
    }

    /// The device ops on the engine's workspace.
    fn ops(&self) -> DeviceOps<'_> {
        ops_on(
            &self.device,
            &self.pool,
            self.storage,
            self.logits_chunk_rows,
        )
    }

    /// The policy's evaluation of `groups` (no gradient), in passes of at most `max_tokens`
    /// packed tokens, on the device: held-out evaluation while training reads the weights
    /// where they are, and downloads only statistics.
    pub fn evaluate_in_passes(
        &self,
        ref_stats: Option<&[ResponseStats]>,
        groups: &[Group],
        spec: &LossSpec,
        aux_coef: f64,
        max_tokens: usize,
    ) -> Result<step::Evaluation> {
        let ops = self.ops();
        let model = &self.model;
        step::evaluate_in_passes(
            &ops,
            model,
            ref_stats,
            groups,
            spec,
            aux_coef,
            max_tokens,
            |_| {},
        )
    }

    /// The resident reference's statistics of `groups` (`None` when the loss needs none), in
    /// passes of at most `max_tokens` packed tokens.
    pub fn reference_stats_in_passes(
        &self,
        groups: &[Group],
        spec: &LossSpec,
        max_tokens: usize,
    ) -> Result<Option<Vec<ResponseStats>>> {
        let reference = self.reference.as_ref();
        step::reference_stats_in_passes(
            &self.ops(),
            &self.model,
            reference,
            groups,
            spec,
            max_tokens,
        )
    }

    /// Whether a reference model is resident on the device.
    pub fn has_reference(&self) -> bool {
        self.reference.is_some()
    }

    /// One micro-batch's forward and backward, its gradient scaled by `share` (its part of
    /// the step's groups) and added to the step's, its logged scalars queued for the host
    /// ([`DeviceEngine::read_finished_step`]). The reference's statistics are `ref_stats`,
    /// or the resident reference's scores of `groups`, which stay on the device.
    pub fn accumulate(
        &mut self,
        ref_stats: Option<&[ResponseStats]>,
        groups: &[Group],
        spec: &LossSpec,
        opts: &StepOptions,
        share: f64,
    ) -> Result<()> {
        // Partial until this micro-batch has been added whole: an error below leaves it so.
        let partial_before = self.partial.replace(true);
        // Not `self.ops()`: the gradients are borrowed mutably below.
        let ops = ops_on(
            &self.device,
            &self.pool,
            self.storage,
            self.logits_chunk_rows,
        )
        .with_fresh_grads(self.fresh.clone());
        let resident = self
            .reference
            .as_ref()
            .filter(|_| spec.kind.needs_reference());
        let table = match resident {
            Some(r) => {
                // The policy's lists with the loss's, before the reference's pass reads them.
                let batch = step::pack(&self.model, groups)?;
                ops.stage_batch(&self.model, &batch, groups, RefStats::None)?;
                let table = r.score_table(&ops, &step::pack(r, groups)?);
                ops.check().context("scoring the reference model")?;
                Some(table)
            }
            None => None,
        };
        let reference = match &table {
            Some(table) => RefStats::Table(table),
            None => RefStats::from_host(ref_stats),
        };
        let out = step::accumulate_grads(
            &ops,
            &self.model,
            reference,
            groups,
            spec,
            opts,
            share,
            &mut self.grads,
        )?;
        self.fresh.settle_all(&self.device)?;
        self.ledger.push(&self.device, &self.norm, share, out)?;
        self.partial.set(partial_before);
        Ok(())
    }

    /// Ends the step: the gradients' global norm, and `update`, that AdamW step with the
    /// clipping to `max_grad_norm` (0: none) folded in, which the device skips when a loss of
    /// the step or the norm was not finite. Nothing is read back here: the norm is queued
    /// with the step's other logged scalars. Refused after a failed
    /// [`DeviceEngine::accumulate`]: its gradients are partial (the trainer drops such a step
    /// and starts the next with [`DeviceEngine::zero_grads`]).
    pub fn finish_step(&mut self, update: Update, max_grad_norm: f64) -> Result<()> {
        ensure!(
            !self.partial.get(),
            "no update from this step: one of its micro-batches failed, so its gradients are \
             partial (start the next step with zero_grads)"
        );
        // A step without a micro-batch leaves its gradients fresh: they are zero.
        self.fresh.settle_all(&self.device)?;
        let kernels = Kernels::new(&self.device);
        let norm_and_coef = kernels.grad_norm(&self.norm, max_grad_norm as f32)?;
        let step = AdamWStep::new(update.config, update.step, update.lr, update.seed);
        adamw(&kernels, &self.flat, Some(norm_and_coef), &step)?;
        self.ledger.finish(&self.device, norm_and_coef)
    }

    /// The logged scalars of the last finished step not read yet, if any: while the next
    /// step runs on the device, they are there already; right after their own step, this
    /// waits for it.
    pub fn read_finished_step(&mut self, aux_coef: f64) -> Result<Option<StepScalars>> {
        self.ledger.read_finished(&self.device, aux_coef)
    }

    /// The weights' store: the fp32 master copy when there is one.
    fn weights_store(&self) -> TensorView {
        match self.flat.master {
            Some(master) => TensorView::F32(master),
            None => self.flat.weights,
        }
    }

    /// The weights, in checkpoint order: the fp32 master copy when there is one.
    pub fn weights(&self) -> Result<Vec<Vec<f32>>> {
        store::download(&self.device, &self.layout, self.weights_store())
    }

    /// Weight tensor `index` (in checkpoint order), downloaded alone: the fp32 master copy's
    /// when there is one.
    pub fn weight(&self, index: usize) -> Result<Vec<f32>> {
        store::download_one(&self.device, &self.layout, self.weights_store(), index)
    }

    /// AdamW's first and second moments, in checkpoint order.
    pub fn moments(&self) -> Result<Moments> {
        Ok((
            store::download(&self.device, &self.layout, self.flat.exp_avg)?,
            store::download(&self.device, &self.layout, self.flat.exp_avg_sq)?,
        ))
    }

    /// Tensor `index` (in checkpoint order) of one AdamW moment, downloaded alone: a
    /// checkpoint streams the moments from the device without a host copy of them.
    pub fn moment(&self, which: Moment, index: usize) -> Result<Vec<f32>> {
        store::download_one(&self.device, &self.layout, self.moment_store(which), index)
    }

    fn moment_store(&self, which: Moment) -> TensorView {
        match which {
            Moment::ExpAvg => self.flat.exp_avg,
            Moment::ExpAvgSq => self.flat.exp_avg_sq,
        }
    }

    /// Replaces the gradients, rounded to their store's type: a step's update from given
    /// gradients (tests/train_bf16.rs compares it with the CPU's bit for bit).
    pub fn set_grads(&mut self, grads: &[Vec<f32>]) -> Result<()> {
        let host: Vec<&Vec<f32>> = grads.iter().collect();
        self.fresh.clear();
        // Partial until the whole upload has gone through.
        self.partial.set(true);
        store::upload(&self.device, &self.layout, self.flat.grads, &host)?;
        self.partial.set(false);
        Ok(())
    }

    /// Replaces tensor `index` (in checkpoint order) of one moment, rounded to its store's
    /// type: a resume, one tensor at a time.
    pub fn set_moment(&mut self, which: Moment, index: usize, values: &[f32]) -> Result<()> {
        let flat = self.moment_store(which);
        store::upload_one(&self.device, &self.layout, flat, index, values)
    }

    /// Replaces the moments (a resume), rounded to their store's type.
    pub fn set_moments(&mut self, exp_avg: &[Vec<f32>], exp_avg_sq: &[Vec<f32>]) -> Result<()> {
        let m_host: Vec<&Vec<f32>> = exp_avg.iter().collect();
        let v_host: Vec<&Vec<f32>> = exp_avg_sq.iter().collect();
        store::upload(&self.device, &self.layout, self.flat.exp_avg, &m_host)?;
        store::upload(&self.device, &self.layout, self.flat.exp_avg_sq, &v_host)
    }
}

/// Device ops on `pool`, storing `storage`, scoring logits in chunks of `chunk_rows` rows.
fn ops_on<'a>(device: &'a Device, pool: &Pool, storage: Dtype, chunk_rows: usize) -> DeviceOps<'a> {
    DeviceOps::with_pool(device, pool.clone(), storage).with_scoring_chunk_rows(chunk_rows)
}

fn dtype_bytes(dtype: Dtype) -> usize {
    match dtype {
        Dtype::F32 => 4,
        Dtype::Bf16 => 2,
    }
}

/// The AdamW launch for the stores' types.
fn adamw(k: &Kernels, flat: &Flat, clip: Option<View<f32>>, step: &AdamWStep) -> Result<()> {
    use TensorView::{Bf16, F32};
    let (g, m, v) = (flat.grads, flat.exp_avg, flat.exp_avg_sq);
    match flat.weights {
        F32(mut w) => match (g, m, v) {
            (F32(g), F32(mut m), F32(mut v)) => k.adamw_f32(&mut w, &g, &mut m, &mut v, clip, step),
            _ => bail!("f32 weights take f32 gradients and moments"),
        },
        Bf16(mut w) => {
            let master = flat.master;
            match (g, m, v) {
                (F32(g), F32(mut m), F32(mut v)) => {
                    k.adamw_bf16(&mut w, master, &g, &mut m, &mut v, clip, step)
                }
                (F32(g), Bf16(mut m), Bf16(mut v)) => {
                    k.adamw_bf16(&mut w, master, &g, &mut m, &mut v, clip, step)
                }
                (Bf16(g), F32(mut m), F32(mut v)) => {
                    k.adamw_bf16(&mut w, master, &g, &mut m, &mut v, clip, step)
                }
                (Bf16(g), Bf16(mut m), Bf16(mut v)) => {
                    k.adamw_bf16(&mut w, master, &g, &mut m, &mut v, clip, step)
                }
                _ => bail!("the two moments take one type"),
            }
        }
    }
}
