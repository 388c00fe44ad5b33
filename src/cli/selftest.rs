use anyhow::Result;
use clap::{Args, ValueEnum};
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::cuda::selftest;
use std::process::ExitCode;

#[derive(Clone, Copy, Debug, ValueEnum)]
enum DeviceArg {
    /// The CUDA emulator on the host (always available).
    Emu,
    /// The first GPU (needs a build with --features cuda and a CUDA driver).
    Cuda,
}

/// Run every CUDA kernel (SwiGLU, embedding, RMSNorm with the residual add, RoPE, casts, the
/// gradient norm and clipping, AdamW) through the device layer on fresh random inputs of
/// awkward sizes, compare each with the CPU reference, and print a table: op, shape, largest
/// absolute error, largest error relative to the magnitude it is measured against, the bound
/// that relative error must stay within (from the precision of the computation), and pass or
/// FAIL. Exits non-zero when any comparison fails.
#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// Where the kernels run.
    #[arg(long, value_enum, default_value = "emu")]
    device: DeviceArg,

    /// Seed of the random inputs [default: drawn afresh, and printed].
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: SelftestArgs) -> Result<ExitCode> {
    let kind = match args.device {
        DeviceArg::Emu => DeviceKind::Emu,
        DeviceArg::Cuda => DeviceKind::Cuda,
    };
    let device = Device::open(kind)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    println!("device: {} ({kind}), seed {seed}", device.describe());
    let rows = selftest::run(&device, seed)?;
    print!("{}", selftest::table(&rows));
    let failed = rows.iter().filter(|r| !r.pass).count();
    if failed == 0 {
        println!("all {} checks pass", rows.len());
        Ok(ExitCode::SUCCESS)
    } else {
        println!("{failed} of {} checks FAIL", rows.len());
        Ok(ExitCode::FAILURE)
    }
}
