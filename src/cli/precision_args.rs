//! The precision flags of a training step, shared by `plan`, `train` and `bench step`.

use anyhow::Result;
use clap::Args;
use contralign::memory_plan::{MasterWeights, PrecisionOptions, StorageDtype};
use serde::Serialize;

/// Precision and memory. The defaults (bf16 weights, gradients and moments, no master
/// copy: about 8 bytes per parameter, 58 GB for Mistral-7B's 7.24 B parameters) are what
/// fits a 7B model on one 80 GB device; fp32 master weights and moments (16 bytes per
/// parameter: 116 GB for 7B) are for models that fit with them.
#[derive(Args, Clone, Debug, Serialize)]
#[serde(rename_all = "kebab-case")]
#[command(next_help_heading = "Precision and memory")]
pub struct PrecisionArgs {
    /// Storage of weights and activations. bf16 (the default; `train --device cpu`: f32):
    /// fp32 accumulation and fp32 statistics (norms, softmax, losses); on the CPU, the
    /// reference's bf16-rounding mode, which rounds exactly where a device stores bf16. f32:
    /// every stored tensor f32 and no master copy (the device path checked against the CPU
    /// reference exactly).
    #[arg(long, value_enum, value_name = "DTYPE")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub precision: Option<StorageDtype>,
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
}

impl PrecisionArgs {
    /// The options, `--precision` defaulting to `default`.
    pub fn options(&self, default: StorageDtype) -> Result<PrecisionOptions> {
        PrecisionOptions::resolve(
            self.precision.unwrap_or(default),
            self.master,
            self.moments,
            self.grads,
        )
    }
}
