use anyhow::Result;
use clap::{Args, ValueEnum};
use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::cuda::ops::DeviceOps;
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
    /// the projections and the LM-head scoring run as device kernels and GEMMs; MoE dispatch
    /// still runs on the host until its kernels exist.
    #[arg(long, value_enum, default_value = "cpu")]
    pub device: Backend,
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
        let Some(kind) = self.device.device_kind() else {
            return work.run(&CpuOps);
        };
        let device = Device::open(kind)?;
        eprintln!("device: {}", device.describe());
        let ops = DeviceOps::new(&device);
        let output = work.run(&ops)?;
        ops.check()?;
        Ok(output)
    }
}
