use anyhow::Result;
use clap::Args;
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::cuda::selftest;
use std::process::ExitCode;

/// Run every CUDA kernel (SwiGLU, embedding, RMSNorm with the residual add, RoPE, casts, the
/// gradient norm and clipping, AdamW, accumulation, attention forward and backward, the fused
/// scoring, the losses) and the device GEMMs through the device layer on fresh random inputs of
/// awkward sizes, compare each with the CPU reference, and print a table: op, shape, largest
/// absolute error, largest error relative to the magnitude it is measured against, the bound
/// that relative error must stay within (from the precision of the computation), and pass or
/// FAIL. Exits non-zero when any comparison fails.
#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// Where the kernels run.
    #[arg(long, value_enum, default_value = "emu")]
    device: DeviceKind,

    /// Seed of the random inputs [default: drawn afresh, and printed].
    #[arg(long)]
    seed: Option<u64>,
}

pub fn run(args: SelftestArgs) -> Result<ExitCode> {
    let kind = args.device;
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
