use super::roofline_args::RooflineArgs;
use crate::cli::stdout;
use anyhow::Result;
use clap::Args;
use contralign::engine::loss;
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::cuda::emu::{self, Probe};
use contralign::ops::cuda::profile::{self, Shapes};
use contralign::selftest;
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

    /// With --device emu: run the checks under racecheck (a race fails the launch).
    #[arg(long, conflicts_with = "profile")]
    racecheck: bool,

    /// With --device emu: instead of the checks, count every kernel's memory traffic at
    /// Mistral-7B's widths and print the table: ideal and counted bytes, coalescing, access
    /// widths and the roofline model's A100/H100 times at Mistral-7B's shapes (the H100's with
    /// measured figures: --bandwidth, --tflops).
    #[arg(long)]
    profile: bool,

    /// Tokens of the profile (its batch; the widths are Mistral-7B's).
    #[arg(long, default_value_t = 64, requires = "profile", value_parser = crate::cli::passes::at_least_one())]
    profile_tokens: usize,

    #[command(flatten)]
    roofline: RooflineArgs,
}

pub fn run(args: SelftestArgs) -> Result<ExitCode> {
    let kind = args.device;
    if (args.profile || args.racecheck) && kind != DeviceKind::Emu {
        anyhow::bail!("--profile and --racecheck are modes of the emulator: use --device emu");
    }
    if args.roofline.given() && !args.profile {
        anyhow::bail!("--bandwidth and --tflops price the model of --profile");
    }
    // Before the profile's minute of counting: a bad figure fails at once.
    let gpus = args.roofline.gpus()?;
    let device = Device::open(kind)?;
    let seed = args.seed.unwrap_or_else(rand::random);
    // The exit status is the checks' verdict, whether or not anyone reads the table.
    stdout::unless_unread(stdout::line(format!(
        "device: {} ({kind}), seed {seed}",
        device.describe()
    )))?;
    if args.profile {
        let shapes = Shapes::small(args.profile_tokens, 1 << 20);
        let rows = profile::profile(&device, &shapes, seed, vec![loss::profile_case()])?;
        stdout::text(profile::table(&rows, &shapes, &gpus))?;
        return Ok(ExitCode::SUCCESS);
    }
    let probe = Probe {
        count: false,
        racecheck: args.racecheck,
    };
    let (rows, _) = emu::probed(probe, || selftest::run(&device, seed));
    let rows = rows?;
    let failed = rows.iter().filter(|r| !r.pass).count();
    let verdict = if failed == 0 {
        format!("all {} checks pass", rows.len())
    } else {
        format!("{failed} of {} checks FAIL", rows.len())
    };
    stdout::unless_unread(stdout::text(format!(
        "{}{verdict}\n",
        selftest::table(&rows)
    )))?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
