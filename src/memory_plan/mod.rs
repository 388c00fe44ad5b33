//! The memory plan of a training step on one device: every buffer the step needs, as named
//! regions of one arena allocated once before any weight is loaded (docs/architecture.md §12,
//! docs/numerics.md §5). `contralign plan` prints it; `train` refuses a
//! plan that does not fit.
//!
//! Regions, in arena order (`T` micro-batch tokens, `P` parameters, `V` vocabulary, `d`
//! hidden size, `C` logits-chunk rows, `a` bytes of a weight or activation):
//!
//! - weights: the flat parameter store ([`layout`]), `P · a`;
//! - master weights: `P · 4` with `--master f32` (bf16 only), else nothing;
//! - gradients: `P ·` 2 or 4 (`--grads`);
//! - moments: `moments.m` and `moments.v`, `P ·` 2 or 4 each (`--moments`);
//! - reference weights: `P · a` for a resident reference model, else nothing;
//! - kept activations and the recompute workspace: [`activations`], and with bf16 gradients
//!   and more than one logits chunk (`C < T`) `grads.accumulator` `[V, d]` f32 (the f32 copy
//!   that the LM head's chunks add into);
//! - logits chunk: `logits.chunk` `[C, V]` f32 (the chunk's logits, then `dL/dlogits` in
//!   place), `logits.rows`, `logits.d_rows` `[C, d]` (the chunk's head inputs and their
//!   gradient), and per target token `scoring.token_logp`, `scoring.token_lse`,
//!   `scoring.d_token_logp` `[T]` f32;
//! - batch data: `tokens`, `positions`, `context_start`, `context_end`, `own_start`,
//!   `prediction_rows`, `targets` `[T]` u32, `row_weights` `[T]` f32, `responses` `[T, 4]`
//!   u32 (first, len, group, ends with EOS), `group_offsets` `[T + 1]` u32,
//!   `response_stats` `[T, 4]` f32 (S, n, A, E), `response_grads` `[T, 3]` f32 and, with a
//!   reference, `reference_stats` `[T, 4]` f32;
//! - cuBLAS workspace: [`CUBLAS_WORKSPACE_BYTES`].
//!
//! Each region is rounded up to [`REGION_ALIGN`] bytes. Approximations, all upper bounds:
//! a micro-batch has at most `T` targets and `T` responses (each response has a token, the
//! first token of each group predicts nothing); the backward keeps the gradients of the
//! MLP and of the attention in separate buffers. Not in the plan: the CUDA context and the
//! loaded modules (a few hundred MB outside the arena), so leave that much of `--memory`
//! free.

mod activations;
mod advice;
pub mod layout;
pub mod precision;

use crate::config::ModelConfig;
use anyhow::{bail, Context, Result};
use layout::ParamLayout;
pub use precision::{MasterWeights, PrecisionOptions, StorageDtype};
use serde::Serialize;

/// Every region starts and ends on this many bytes, as a cudaMalloc'd buffer would.
pub const REGION_ALIGN: u64 = 256;

pub use crate::ops::cuda::gemm::CUBLAS_WORKSPACE_BYTES;

/// The default logits chunk is the most rows (a multiple of 128) whose fp32 logits fit in
/// this.
pub const LOGITS_CHUNK_MAX_BYTES: u64 = 1 << 30;

/// What the backward recomputes of each layer's forward (see [`activations`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum RecomputePolicy {
    /// Keep every activation: 6N FLOPs per token, the most memory.
    None,
    /// Keep each layer's input and recompute the layer in the backward (per-layer
    /// checkpointing): 8N FLOPs per token, the least memory.
    Full,
    /// Keep the GEMM and attention outputs, recompute the norms and SwiGLU: about 6N FLOPs
    /// per token.
    Selective,
}

impl RecomputePolicy {
    pub fn name(self) -> &'static str {
        match self {
            RecomputePolicy::None => "none",
            RecomputePolicy::Full => "full",
            RecomputePolicy::Selective => "selective",
        }
    }
}

/// Where the reference model's statistics come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ReferenceSource {
    /// A reference-free loss (simpo, refa, infonca_free, sft).
    None,
    /// Precomputed by `precompute-ref` (`train --ref-logps`): only the statistics.
    Cached,
    /// A reference model on the device (`train --ref-model`), in the weights' dtype.
    Resident,
}

impl ReferenceSource {
    pub fn name(self) -> &'static str {
        match self {
            ReferenceSource::None => "none",
            ReferenceSource::Cached => "cached",
            ReferenceSource::Resident => "resident",
        }
    }
}

/// What a region holds, for the plan's totals.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Category {
    Weights,
    MasterWeights,
    Gradients,
    Moments,
    ReferenceWeights,
    KeptActivations,
    RecomputeWorkspace,
    LogitsChunk,
    CublasWorkspace,
    BatchData,
}

impl Category {
    pub const ALL: [Category; 10] = [
        Category::Weights,
        Category::MasterWeights,
        Category::Gradients,
        Category::Moments,
        Category::ReferenceWeights,
        Category::KeptActivations,
        Category::RecomputeWorkspace,
        Category::LogitsChunk,
        Category::CublasWorkspace,
        Category::BatchData,
    ];

    /// What a step leases from the engine's workspace, as opposed to the stores it keeps
    /// (and cuBLAS's own workspace, which its handle holds).
    pub const WORKSPACE: [Category; 4] = [
        Category::KeptActivations,
        Category::RecomputeWorkspace,
        Category::LogitsChunk,
        Category::BatchData,
    ];

    /// The name in `plan --json` (as serialized).
    pub fn key(self) -> &'static str {
        match self {
            Category::Weights => "weights",
            Category::MasterWeights => "master_weights",
            Category::Gradients => "gradients",
            Category::Moments => "moments",
            Category::ReferenceWeights => "reference_weights",
            Category::KeptActivations => "kept_activations",
            Category::RecomputeWorkspace => "recompute_workspace",
            Category::LogitsChunk => "logits_chunk",
            Category::CublasWorkspace => "cublas_workspace",
            Category::BatchData => "batch_data",
        }
    }

    /// The name printed in the plan's table.
    pub fn label(self) -> &'static str {
        match self {
            Category::Weights => "weights",
            Category::MasterWeights => "master weights",
            Category::Gradients => "gradients",
            Category::Moments => "moments (m, v)",
            Category::ReferenceWeights => "reference weights",
            Category::KeptActivations => "kept activations",
            Category::RecomputeWorkspace => "recompute workspace",
            Category::LogitsChunk => "logits chunk",
            Category::CublasWorkspace => "cuBLAS workspace",
            Category::BatchData => "batch data",
        }
    }
}

/// One buffer of the arena.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Region {
    /// What it holds (`weights`, `kept.layer.3.q`, `backward.d_mid`, `logits.chunk`).
    pub name: String,
    pub category: Category,
    /// Its first byte in the arena, a multiple of [`REGION_ALIGN`].
    pub offset: u64,
    /// Its size, a multiple of [`REGION_ALIGN`].
    pub bytes: u64,
}

/// What a plan is made for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PlanOptions {
    /// Most packed tokens in one forward/backward (`--micro-tokens`).
    pub micro_tokens: usize,
    pub precision: PrecisionOptions,
    pub recompute: RecomputePolicy,
    pub reference: ReferenceSource,
    /// Rows of one logits chunk; `None`: [`default_logits_chunk_rows`].
    pub logits_chunk_rows: Option<usize>,
}

impl PlanOptions {
    /// The default precision and a cached reference at `micro_tokens`, recomputing
    /// selectively.
    pub fn new(micro_tokens: usize) -> Self {
        PlanOptions {
            micro_tokens,
            precision: PrecisionOptions::default(),
            recompute: RecomputePolicy::Selective,
            reference: ReferenceSource::Cached,
            logits_chunk_rows: None,
        }
    }
}

/// The regions of one arena, laid out one after the other.
#[derive(Default)]
struct Regions {
    list: Vec<Region>,
    end: u64,
}

impl Regions {
    /// A region of `bytes` (rounded up to the alignment); nothing when `bytes` is 0.
    fn push(&mut self, name: String, category: Category, bytes: u64) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let Some(bytes) = bytes
            .checked_next_multiple_of(REGION_ALIGN)
            .filter(|b| self.end.checked_add(*b).is_some())
        else {
            bail!("region {name}: {bytes} bytes overflow a 64-bit size");
        };
        self.list.push(Region {
            name,
            category,
            offset: self.end,
            bytes,
        });
        self.end += bytes;
        Ok(())
    }

    /// A region for a tensor of shape `dims` with `elem_bytes` bytes per element.
    fn tensor(
        &mut self,
        name: String,
        category: Category,
        dims: &[usize],
        elem_bytes: u64,
    ) -> Result<()> {
        let bytes = dims
            .iter()
            .try_fold(elem_bytes, |acc, &n| acc.checked_mul(n as u64));
        match bytes {
            Some(bytes) => self.push(name, category, bytes),
            None => bail!("region {name}: shape {dims:?} overflows a 64-bit size"),
        }
    }
}

/// The most rows, a multiple of 128 (at least 128), whose fp32 logits over `vocab` fit in
/// [`LOGITS_CHUNK_MAX_BYTES`], and no more than the micro-batch's tokens.
pub fn default_logits_chunk_rows(vocab: usize, micro_tokens: usize) -> usize {
    let fit = (LOGITS_CHUNK_MAX_BYTES / (vocab as u64 * 4)) as usize / 128 * 128;
    fit.max(128).min(micro_tokens)
}

/// A training step's memory plan.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    pub cfg: ModelConfig,
    pub options: PlanOptions,
    /// Where each parameter lives in the weights, master, gradients and moments regions
    /// (element offsets, the same in each).
    pub layout: ParamLayout,
    /// The logits chunk's rows, resolved.
    pub logits_chunk_rows: usize,
    pub regions: Vec<Region>,
}

impl MemoryPlan {
    pub fn new(cfg: &ModelConfig, options: &PlanOptions) -> Result<Self> {
        // A plan is for the device engine: a model it cannot run has none.
        if let Some(moe) = &cfg.moe {
            crate::ops::cuda::moe::check_routing(moe.num_experts, moe.experts_per_token)
                .context("config.json's num_local_experts and num_experts_per_tok")?;
        }
        let t = options.micro_tokens;
        if t == 0 {
            bail!("--micro-tokens must be at least 1");
        }
        let chunk = match options.logits_chunk_rows {
            Some(0) => bail!("--logits-chunk-rows must be at least 1"),
            // A chunk is never longer than a pass.
            Some(rows) => rows.min(t),
            None => default_logits_chunk_rows(cfg.vocab_size, t),
        };
        let p = &options.precision;
        let layout = ParamLayout::new(cfg);
        let n = layout.elements;
        let a = p.weight_bytes();
        let mut r = Regions::default();

        r.tensor("weights".into(), Category::Weights, &[n], a)?;
        r.tensor(
            "master".into(),
            Category::MasterWeights,
            &[n],
            p.master_bytes(),
        )?;
        r.tensor("grads".into(), Category::Gradients, &[n], p.grads.bytes())?;
        for name in ["moments.m", "moments.v"] {
            r.tensor(name.into(), Category::Moments, &[n], p.moments.bytes())?;
        }
        if options.reference == ReferenceSource::Resident {
            r.tensor(
                "reference.weights".into(),
                Category::ReferenceWeights,
                &[n],
                a,
            )?;
        }

        activations::add(&mut r, cfg, t, a, options.recompute)?;
        if p.grads == StorageDtype::Bf16 && chunk < t {
            // Into a bf16 gradient, the LM head's logits chunks add in an f32 copy of it,
            // rounded back once (docs/numerics.md §7); when its rows are one chunk, its one
            // GEMM writes the bf16 gradient itself, as every other op does.
            r.tensor(
                "grads.accumulator".into(),
                Category::RecomputeWorkspace,
                &[cfg.vocab_size, cfg.hidden_size],
                4,
            )?;
        }

        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let logits = Category::LogitsChunk;
        r.tensor("logits.chunk".into(), logits, &[chunk, v], 4)?;
        r.tensor("logits.rows".into(), logits, &[chunk, d], a)?;
        r.tensor("logits.d_rows".into(), logits, &[chunk, d], a)?;
        for name in ["token_logp", "token_lse", "d_token_logp"] {
            r.tensor(format!("scoring.{name}"), logits, &[t], 4)?;
        }

        let batch = Category::BatchData;
        for name in [
            "tokens",
            "positions",
            "context_start",
            "context_end",
            "own_start",
            "prediction_rows",
            "targets",
            "row_weights",
        ] {
            r.tensor(format!("batch.{name}"), batch, &[t], 4)?;
        }
        r.tensor("batch.responses".into(), batch, &[t, 4], 4)?;
        r.tensor("batch.group_offsets".into(), batch, &[t + 1], 4)?;
        r.tensor("batch.response_stats".into(), batch, &[t, 4], 4)?;
        r.tensor("batch.response_grads".into(), batch, &[t, 3], 4)?;
        if options.reference != ReferenceSource::None {
            r.tensor("batch.reference_stats".into(), batch, &[t, 4], 4)?;
        }

        r.push(
            "cublas.workspace".into(),
            Category::CublasWorkspace,
            CUBLAS_WORKSPACE_BYTES,
        )?;

        Ok(MemoryPlan {
            cfg: cfg.clone(),
            options: *options,
            layout,
            logits_chunk_rows: chunk,
            regions: r.list,
        })
    }

    /// The plan of `options` under `recompute` instead of its own policy.
    fn with_recompute(
        cfg: &ModelConfig,
        options: &PlanOptions,
        recompute: RecomputePolicy,
    ) -> Result<Self> {
        MemoryPlan::new(
            cfg,
            &PlanOptions {
                recompute,
                ..*options
            },
        )
    }

    /// The plan with selective recompute where it fits in `memory` bytes, else with full
    /// recompute (`options.recompute` is not read).
    pub fn with_default_recompute(
        cfg: &ModelConfig,
        options: &PlanOptions,
        memory: u64,
    ) -> Result<Self> {
        let selective = Self::with_recompute(cfg, options, RecomputePolicy::Selective)?;
        if selective.total() <= memory {
            return Ok(selective);
        }
        Self::with_recompute(cfg, options, RecomputePolicy::Full)
    }

    /// Where selective recompute does not fit this plan's micro-batch: the largest
    /// `--micro-tokens` (a multiple of 128) at which it fits in `memory` bytes, said as
    /// `plan` and `train` print it (`at --micro-tokens N it does: …`); `None` at none. That
    /// micro-batch avoids full recompute's 8N FLOPs a token, and gradient accumulation gives
    /// the same steps.
    pub fn selective_hint(&self, memory: u64) -> Result<Option<String>> {
        let rebuilt;
        let selective = if self.options.recompute == RecomputePolicy::Selective {
            self
        } else {
            rebuilt = Self::with_recompute(&self.cfg, &self.options, RecomputePolicy::Selective)?;
            &rebuilt
        };
        Ok(advice::fitting_micro_tokens(selective, memory).map(|t| {
            format!("at --micro-tokens {t} it does: about 6N FLOPs a token against full's 8N")
        }))
    }

    /// The arena's size: every region's bytes.
    pub fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.bytes).sum()
    }

    /// The model's parameter count.
    pub fn parameters(&self) -> usize {
        self.layout.parameters
    }

    pub fn category_bytes(&self, category: Category) -> u64 {
        self.regions
            .iter()
            .filter(|r| r.category == category)
            .map(|r| r.bytes)
            .sum()
    }

    /// The bytes of the [`Category::WORKSPACE`] categories: the engine's workspace pool.
    pub fn workspace_bytes(&self) -> u64 {
        Category::WORKSPACE
            .iter()
            .map(|&c| self.category_bytes(c))
            .sum()
    }

    /// Every category with its bytes, in [`Category::ALL`] order (empty ones included).
    pub fn categories(&self) -> Vec<(Category, u64)> {
        Category::ALL
            .iter()
            .map(|&c| (c, self.category_bytes(c)))
            .collect()
    }

    pub fn region(&self, name: &str) -> Option<&Region> {
        self.regions.iter().find(|r| r.name == name)
    }

    /// Ok when the arena fits in `memory` bytes; otherwise an error with the shortfall, the
    /// largest category and the flags that would make it fit, with the totals they give.
    pub fn fits(&self, memory: u64) -> Result<()> {
        if self.total() <= memory {
            return Ok(());
        }
        bail!("{}", advice::not_fitting(self, memory))
    }
}

/// `14.48 GB`: decimal units, as `--memory` reads them.
pub fn human_bytes(bytes: u64) -> String {
    let b = bytes as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.1} MB", b / 1e6)
    } else if b >= 1e3 {
        format!("{:.1} kB", b / 1e3)
    } else {
        format!("{bytes} B")
    }
}
