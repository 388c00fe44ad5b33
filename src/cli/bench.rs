//! `contralign bench`: speed measurements that print JSON, one sub-command per workload.

use anyhow::{ensure, Result};
use clap::{Args, Subcommand, ValueEnum};
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::cuda::scoring_bench::{self, ScoringShape};
use half::bf16;

/// Measure a workload on a device and print the figures as one JSON object.
#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: Workload,
}

#[derive(Subcommand, Debug)]
enum Workload {
    Scoring(ScoringArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Dtype {
    Bf16,
    F32,
}

/// Time the fused LM-head scoring on random inputs and print the figures as JSON.
///
/// The fused scoring (logits by chunks, log-sum-exp and target log-probs, per-response S, A,
/// E, and the backward into dh and dW) on random inputs: the time of the fused forward
/// and forward+backward, of the same GEMMs alone (the floor), of an unfused baseline (fp32
/// logits of the whole batch, log-softmax, gather, reduce), the extra memory of each, and the
/// bandwidth of the logits passes against the measured copy bandwidth. On `--device emu` the
/// times are the emulator's (`"emulator_time": true`): they check that it runs, they measure
/// nothing about a GPU.
#[derive(Args, Debug)]
struct ScoringArgs {
    /// Prediction rows (tokens scored).
    #[arg(long, default_value_t = 8192)]
    rows: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 4096)]
    dim: usize,
    /// Storage of h, the LM head and the logits.
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: Dtype,
    /// Rows per chunk of logits [default: as many as 256 MiB hold].
    #[arg(long)]
    chunk_rows: Option<usize>,
    /// Timed repetitions of each case (the median is printed), after one warm-up.
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Where it runs.
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceKind,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        Workload::Scoring(a) => {
            ensure!(
                a.rows > 0 && a.vocab > 0 && a.dim > 0,
                "--rows, --vocab and --dim must be positive"
            );
            ensure!(a.chunk_rows != Some(0), "--chunk-rows must be positive");
            let device = Device::open(a.device)?;
            let shape = ScoringShape {
                rows: a.rows,
                vocab: a.vocab,
                dim: a.dim,
                chunk_rows: a.chunk_rows,
            };
            let report = match a.dtype {
                Dtype::Bf16 => scoring_bench::report::<bf16>(&device, shape, a.reps)?,
                Dtype::F32 => scoring_bench::report::<f32>(&device, shape, a.reps)?,
            };
            println!("{report}");
            Ok(())
        }
    }
}
