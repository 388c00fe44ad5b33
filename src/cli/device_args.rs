use anyhow::Result;
use clap::{Args, ValueEnum};
use contralign::memory_plan::StorageDtype;
use contralign::ops::cpu::{CpuOps, RoundedCpuOps};
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::cuda::ops::DeviceOps;
use contralign::ops::storage::Dtype;
use contralign::ops::Ops;
use contralign::step::LossOps;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// The CPU reference: f32 storage, f64 sums.
    Cpu,
    /// The CUDA backend's kernels and GEMMs in the host emulator: slow, for checking.
    Emu,
    /// A GPU; needs a binary built with `--features cuda`.
    Cuda,
}

#[derive(Args, Debug)]
pub struct DeviceArgs {
    /// Where the model runs. On emu and cuda, embedding, RMSNorm, RoPE, SwiGLU, attention,
    /// the projections, the LM-head scoring and the MoE dispatch (routing, row moves, the
    /// experts' grouped GEMMs) run as device kernels and GEMMs.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Backend,
    /// Storage of weights and activations (docs/numerics.md §2). f32 (the default, what
    /// these commands have always computed): every tensor f32. bf16: weights and every op's
    /// output stored bf16 (rounded to nearest even), with fp32 accumulation, fp32 statistics
    /// (norms, softmax, log-sum-exp, log-probs) and f32 gradients; on cpu, the reference's
    /// bf16-rounding mode, which rounds exactly where a device stores bf16.
    #[arg(long, value_enum, value_name = "DTYPE", default_value = "f32")]
    pub precision: StorageDtype,
}

/// A command's work, written once for every backend.
pub trait OnOps {
    type Output;
    fn run<O: LossOps>(self, ops: &O) -> Result<Self::Output>;
}

impl Backend {
    /// The device it opens; `None` for the CPU.
    pub fn device_kind(self) -> Option<DeviceKind> {
        match self {
            Backend::Cpu => None,
            Backend::Emu => Some(DeviceKind::Emu),
            Backend::Cuda => Some(DeviceKind::Cuda),
        }
    }
}

impl DeviceArgs {
    /// Runs `work` on the chosen backend; on a device, only once the device reports no error.
    pub fn run<W: OnOps>(&self, work: W) -> Result<W::Output> {
        let storage = Dtype::from(self.precision);
        let Some(kind) = self.device.device_kind() else {
            return match storage {
                Dtype::F32 => work.run(&CpuOps),
                Dtype::Bf16 => work.run(&RoundedCpuOps::new(storage)),
            };
        };
        let device = Device::open(kind)?;
        eprintln!("device: {} ({} storage)", device.describe(), storage.name());
        let ops = DeviceOps::with_storage(&device, storage);
        let output = work.run(&ops)?;
        ops.check()?;
        Ok(output)
    }
}
