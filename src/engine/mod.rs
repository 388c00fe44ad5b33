//! The device-resident training engine (docs/architecture.md §12): the policy's weights, its
//! gradients and AdamW's moments in one arena on a device, each a flat buffer
//! ([`ParamLayout`], [`store`]); every op's output leased from a pool made once
//! ([`crate::ops::cuda::pool`]); a step that zeroes the gradients, accumulates its
//! micro-batches into them, takes the global norm and runs AdamW with the clipping folded in,
//! one launch each, without any device allocation after the first step.
//!
//! Today it stores everything in f32 (`--precision f32`, the path that is checked against the
//! CPU exactly); a step downloads its logged scalars, and each MoE layer its per-expert row
//! counts (a temporary exception, docs/architecture.md §12).

pub mod bench;
pub mod loss;
pub mod moe_bench;
pub mod store;

use crate::config::ModelConfig;
use crate::data::Group;
use crate::loss::metrics::MetricTotals;
use crate::loss::LossSpec;
use crate::memory_plan::layout::ParamLayout;
use crate::memory_plan::{
    Category, MemoryPlan, PlanOptions, PrecisionOptions, RecomputePolicy, ReferenceSource,
};
use crate::model::params::{param_specs, Params};
use crate::model::{Model, PassOutput, ResponseStats, StepOptions};
use crate::ops::cuda::device::{Arena, Device, View};
use crate::ops::cuda::kernels::{AdamWStep, GradNormWorkspace, Kernels};
use crate::ops::cuda::ops::DeviceOps;
use crate::ops::cuda::pool::{Pool, Tensor};
use crate::ops::optimizer::AdamWConfig;
use crate::ops::storage::Dtype;
use crate::ops::Ops;
use crate::step::{self, RefStats};
use anyhow::{ensure, Context, Result};

/// AdamW's first and second moments, per tensor in checkpoint order.
pub type Moments = (Vec<Vec<f32>>, Vec<Vec<f32>>);

/// The flat buffers of the arena.
struct Flat {
    weights: View<f32>,
    grads: View<f32>,
    exp_avg: View<f32>,
    exp_avg_sq: View<f32>,
}

pub struct DeviceEngine {
    /// The policy, its tensors views of `flat.weights`.
    model: Model<Tensor>,
    /// Views of `flat.grads`, in the same layout.
    grads: Params<Tensor>,
    /// A reference model resident on the device (the plan's `reference.weights`), scored
    /// there each micro-batch; `None` when its statistics come from a cache.
    reference: Option<Model<Tensor>>,
    layout: ParamLayout,
    flat: Flat,
    norm: GradNormWorkspace,
    pool: Pool,
    /// The plan's rows of one logits chunk, which the scoring holds at most.
    logits_chunk_rows: usize,
    /// Owns the memory every view above points into; declared after them so that it is
    /// dropped last.
    arena: Arena,
    device: Device,
}

impl DeviceEngine {
    /// The plan the engine allocates: everything f32 (the only precision it has yet), the
    /// reference's statistics cached, or its weights resident beside the policy's.
    pub fn plan(
        cfg: &ModelConfig,
        micro_tokens: usize,
        recompute: RecomputePolicy,
        reference: ReferenceSource,
    ) -> Result<MemoryPlan> {
        MemoryPlan::new(
            cfg,
            &PlanOptions {
                micro_tokens,
                precision: PrecisionOptions::all_f32(),
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
        let store = |name: &str| -> Result<u64> {
            let region = plan
                .region(name)
                .with_context(|| format!("the memory plan has no region {name}"))?;
            ensure!(
                region.bytes == (layout.elements * size_of::<f32>()) as u64,
                "the plan's {name} holds {} bytes, the f32 store needs {}",
                region.bytes,
                layout.elements * size_of::<f32>()
            );
            Ok(region.bytes)
        };
        let names = ["weights", "grads", "moments.m", "moments.v"];
        let reference_region = "reference.weights";
        if let Some(r) = reference {
            ensure!(
                param_specs(&r.cfg) == param_specs(&policy.cfg),
                "a reference model resident on the device needs the policy's tensor shapes"
            );
        }
        let resident = names.iter().chain(reference.map(|_| &reference_region));
        let arena_bytes = resident.map(|n| store(n)).sum::<Result<u64>>()?;
        let mut arena = Arena::new(&device, arena_bytes as usize)?;
        let elements = layout.elements;
        let flat = Flat {
            weights: arena.carve(names[0], elements)?,
            grads: arena.carve(names[1], elements)?,
            exp_avg: arena.carve(names[2], elements)?,
            exp_avg_sq: arena.carve(names[3], elements)?,
        };
        let workspace_bytes: u64 = [
            Category::KeptActivations,
            Category::RecomputeWorkspace,
            Category::LogitsChunk,
            Category::BatchData,
        ]
        .iter()
        .map(|&c| plan.category_bytes(c))
        .sum();
        let mut weights = flat.weights;
        device
            .copy_to(
                &mut weights,
                &store::flatten(&layout, &policy.params.iter()),
            )
            .context("uploading the policy's weights")?;
        let model = Model {
            cfg: policy.cfg.clone(),
            params: store::params(&layout, &policy.cfg, flat.weights)?,
            dtype: policy.dtype,
        };
        let grads = store::params(&layout, &policy.cfg, flat.grads)?;
        let reference = match reference {
            Some(r) => {
                let mut weights = arena.carve(reference_region, elements)?;
                device
                    .copy_to(&mut weights, &store::flatten(&layout, &r.params.iter()))
                    .context("uploading the reference model's weights")?;
                Some(Model {
                    cfg: r.cfg.clone(),
                    params: store::params(&layout, &r.cfg, weights)?,
                    dtype: r.dtype,
                })
            }
            None => None,
        };
        let norm = Kernels::new(&device).grad_norm_workspace(&[flat.grads])?;
        let pool = Pool::new(&device, workspace_bytes as usize)?;
        Ok(DeviceEngine {
            model,
            grads,
            reference,
            logits_chunk_rows: plan.logits_chunk_rows,
            layout,
            flat,
            norm,
            pool,
            arena,
            device,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Bytes of device memory the engine holds: the arena and the workspace pool.
    pub fn device_bytes(&self) -> usize {
        self.arena.capacity() + self.pool.capacity()
    }

    /// Sets every gradient to zero: the start of a step.
    pub fn zero_grads(&self) -> Result<()> {
        let mut grads = self.flat.grads;
        self.device.zero(&mut grads)
    }

    /// Whether a reference model is resident on the device.
    pub fn has_reference(&self) -> bool {
        self.reference.is_some()
    }

    /// One micro-batch's forward and backward, its gradient scaled by `share` (its part of
    /// the step's groups) and added to the step's. The reference's statistics are
    /// `ref_stats`, or the resident reference's scores of `groups`, which stay on the
    /// device.
    pub fn accumulate(
        &mut self,
        ref_stats: Option<&[ResponseStats]>,
        groups: &[Group],
        spec: &LossSpec,
        opts: &StepOptions,
        share: f64,
    ) -> Result<PassOutput<MetricTotals>> {
        let ops = DeviceOps::with_pool(&self.device, self.pool.clone(), Dtype::F32)
            .with_scoring_chunk_rows(self.logits_chunk_rows);
        let resident = self
            .reference
            .as_ref()
            .filter(|_| spec.kind.needs_reference());
        let table = match resident {
            Some(r) => {
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
        step::accumulate_grads(
            &ops,
            &self.model,
            reference,
            groups,
            spec,
            opts,
            share,
            &mut self.grads,
        )
    }

    /// The gradients' global norm, and unless `update` is `None`, AdamW step
    /// `update.step` with the clipping to `max_grad_norm` (0: none) folded in; a non-finite
    /// norm skips the update on the device. Returns the norm (the step's one download).
    pub fn finish_step(
        &mut self,
        update: Option<(&AdamWConfig, u64, f64)>,
        max_grad_norm: f64,
    ) -> Result<f64> {
        let kernels = Kernels::new(&self.device);
        let norm_and_coef = kernels.grad_norm(&self.norm, max_grad_norm as f32)?;
        if let Some((config, step, lr)) = update {
            let (mut weights, mut m, mut v) =
                (self.flat.weights, self.flat.exp_avg, self.flat.exp_avg_sq);
            kernels.adamw_f32(
                &mut weights,
                &self.flat.grads,
                &mut m,
                &mut v,
                Some(norm_and_coef),
                &AdamWStep::new(config, step, lr, 0),
            )?;
        }
        let norm = self.device.download(&norm_and_coef.slice(0, 1)?)?[0];
        Ok(norm as f64)
    }

    /// The weights, in checkpoint order.
    pub fn weights(&self) -> Result<Vec<Vec<f32>>> {
        Ok(store::split(
            &self.layout,
            &self.device.download(&self.flat.weights)?,
        ))
    }

    /// AdamW's first and second moments, in checkpoint order.
    pub fn moments(&self) -> Result<Moments> {
        let layout = &self.layout;
        Ok((
            store::split(layout, &self.device.download(&self.flat.exp_avg)?),
            store::split(layout, &self.device.download(&self.flat.exp_avg_sq)?),
        ))
    }

    /// Replaces the moments (a resume).
    pub fn set_moments(&mut self, exp_avg: &[Vec<f32>], exp_avg_sq: &[Vec<f32>]) -> Result<()> {
        let (mut m, mut v) = (self.flat.exp_avg, self.flat.exp_avg_sq);
        let m_host: Vec<&Vec<f32>> = exp_avg.iter().collect();
        let v_host: Vec<&Vec<f32>> = exp_avg_sq.iter().collect();
        self.device
            .copy_to(&mut m, &store::flatten(&self.layout, &m_host))?;
        self.device
            .copy_to(&mut v, &store::flatten(&self.layout, &v_host))
    }
}
