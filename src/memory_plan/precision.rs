//! What each stored tensor of a training step is held in (docs/numerics.md §2).

use anyhow::{bail, Result};
use serde::Serialize;

/// The storage type of a tensor kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StorageDtype {
    /// bfloat16: 2 bytes.
    Bf16,
    /// float32: 4 bytes.
    F32,
}

impl StorageDtype {
    pub fn bytes(self) -> u64 {
        match self {
            StorageDtype::Bf16 => 2,
            StorageDtype::F32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            StorageDtype::Bf16 => "bf16",
            StorageDtype::F32 => "f32",
        }
    }
}

impl From<StorageDtype> for crate::ops::storage::Dtype {
    fn from(dtype: StorageDtype) -> Self {
        match dtype {
            StorageDtype::Bf16 => crate::ops::storage::Dtype::Bf16,
            StorageDtype::F32 => crate::ops::storage::Dtype::F32,
        }
    }
}

/// Whether bf16 weights have an fp32 master copy that AdamW updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MasterWeights {
    /// No copy: AdamW updates the bf16 weights with stochastic rounding (as llm.c does).
    None,
    /// An fp32 copy of every weight (4 more bytes per parameter); the bf16 weights are its
    /// round-to-nearest.
    F32,
}

impl MasterWeights {
    pub fn name(self) -> &'static str {
        match self {
            MasterWeights::None => "none",
            MasterWeights::F32 => "f32",
        }
    }
}

/// The precision of a training step's stored tensors. Accumulation (GEMMs, reductions) and
/// statistics (norms, softmax, log-sum-exp, losses) are fp32 whatever these say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PrecisionOptions {
    /// Weights and activations (and activation gradients).
    pub precision: StorageDtype,
    pub master: MasterWeights,
    /// AdamW's first and second moments.
    pub moments: StorageDtype,
    /// Parameter gradients (accumulated over micro-batches).
    pub grads: StorageDtype,
}

impl Default for PrecisionOptions {
    /// What makes Mistral-7B train on one 80 GB device: about 8 bytes per parameter (bf16
    /// weights, gradients and both moments, no master copy) = 58 GB for 7.24 B parameters.
    fn default() -> Self {
        PrecisionOptions {
            precision: StorageDtype::Bf16,
            master: MasterWeights::None,
            moments: StorageDtype::Bf16,
            grads: StorageDtype::Bf16,
        }
    }
}

impl PrecisionOptions {
    /// Every stored tensor f32 and no master copy: the device path that must agree with the
    /// CPU reference exactly.
    pub fn all_f32() -> Self {
        PrecisionOptions {
            precision: StorageDtype::F32,
            master: MasterWeights::None,
            moments: StorageDtype::F32,
            grads: StorageDtype::F32,
        }
    }

    /// The options from `--precision` and, where given, `--master`, `--moments` and
    /// `--grads`; under `f32` everything is f32, and asking for a bf16 tensor or a master
    /// copy is refused rather than ignored.
    pub fn resolve(
        precision: StorageDtype,
        master: Option<MasterWeights>,
        moments: Option<StorageDtype>,
        grads: Option<StorageDtype>,
    ) -> Result<Self> {
        match precision {
            StorageDtype::F32 => {
                if master == Some(MasterWeights::F32) {
                    bail!(
                        "--master f32 with --precision f32: the weights are f32 already; \
                         leave out --master"
                    );
                }
                for (flag, dtype) in [("--moments", moments), ("--grads", grads)] {
                    if dtype == Some(StorageDtype::Bf16) {
                        bail!(
                            "{flag} bf16 with --precision f32: f32 stores every tensor in \
                             f32; use --precision bf16 for bf16 {}",
                            &flag[2..]
                        );
                    }
                }
                Ok(Self::all_f32())
            }
            StorageDtype::Bf16 => {
                let d = Self::default();
                Ok(PrecisionOptions {
                    precision,
                    master: master.unwrap_or(d.master),
                    moments: moments.unwrap_or(d.moments),
                    grads: grads.unwrap_or(d.grads),
                })
            }
        }
    }

    /// `bf16 (master none, moments bf16, grads bf16)`.
    pub fn describe(&self) -> String {
        format!(
            "{} (master {}, moments {}, grads {})",
            self.precision.name(),
            self.master.name(),
            self.moments.name(),
            self.grads.name()
        )
    }

    /// Bytes of one weight (and of one activation element).
    pub fn weight_bytes(&self) -> u64 {
        self.precision.bytes()
    }

    /// Bytes of the master copy per parameter (0 without one).
    pub fn master_bytes(&self) -> u64 {
        match (self.precision, self.master) {
            (StorageDtype::Bf16, MasterWeights::F32) => 4,
            _ => 0,
        }
    }
}
