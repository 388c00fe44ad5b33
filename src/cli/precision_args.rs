//! The precision and recompute flags of a training step, shared by `plan` and `train`.

use anyhow::Result;
use clap::Args;
use contralign::memory_plan::{MasterWeights, PrecisionOptions, RecomputePolicy, StorageDtype};
use serde::Serialize;

/// Precision and memory. The defaults (bf16 weights, gradients and moments, no master
/// copy: about 8 bytes per parameter, 58 GB for Mistral-7B's 7.24 B parameters) are what
/// fits a 7B model on one 80 GB device; fp32 master weights and moments (16 bytes per
/// parameter: 116 GB for 7B) are for models that fit with them.
#[derive(Args, Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
#[command(next_help_heading = "Precision and memory")]
pub struct PrecisionArgs {
    /// Storage of weights and activations. bf16: fp32 accumulation and fp32 statistics
    /// (norms, softmax, losses). f32: every stored tensor f32 and no master copy (the device
    /// path checked against the CPU reference exactly).
    #[arg(long, value_enum, value_name = "DTYPE", default_value = "bf16")]
    pub precision: StorageDtype,
    /// fp32 master weights for bf16 weights. Default none: AdamW updates the bf16 weights
    /// with stochastic rounding, as llm.c does (f32 costs 4 more bytes per parameter, 29 GB
    /// for 7B).
    #[arg(long, value_enum, value_name = "none|f32")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub master: Option<MasterWeights>,
    /// AdamW moments m and v. Default bf16 (stochastically rounded): f32 costs 4 more
    /// bytes per parameter (29 GB for 7B), which does not fit 7B on 80 GB.
    #[arg(long, value_enum, value_name = "DTYPE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moments: Option<StorageDtype>,
    /// Parameter gradients. Default bf16 (f32: 2 more bytes per parameter, 14.5 GB for 7B).
    #[arg(long, value_enum, value_name = "DTYPE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grads: Option<StorageDtype>,
    /// What the backward recomputes of each layer. Default: selective where it fits in
    /// memory (about 6N FLOPs per token), else full (8N).
    #[arg(long, value_enum, value_name = "POLICY")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recompute: Option<RecomputePolicy>,
}

impl PrecisionArgs {
    pub fn options(&self) -> Result<PrecisionOptions> {
        PrecisionOptions::resolve(self.precision, self.master, self.moments, self.grads)
    }
}
