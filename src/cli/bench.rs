//! `contralign bench ...`: timings of the device kernels at given shapes, printed as JSON.

use anyhow::{bail, Result};
use clap::{Args, Subcommand, ValueEnum};
use contralign::ops::cuda::attention_bench::{time_attention, BenchMask};
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::AttentionShape;
use half::bf16;

#[derive(Args, Debug)]
pub struct BenchArgs {
    #[command(subcommand)]
    what: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    Attention(AttentionBenchArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Dtype {
    Bf16,
    F32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum MaskKind {
    /// One causal sequence.
    Causal,
    /// Groups of one prompt and its responses (--prompt, --responses, --response-len).
    Packed,
}

/// Time attention forward and backward (cuda/attention.cu) on random inputs made in memory,
/// for every combination of --tokens and --mask, and print JSON: per case the time and the
/// achieved TFLOP/s (4·hd FLOPs per visible (query, key) pair and head forward, 10·hd
/// backward). The defaults are Mistral-7B's shapes.
#[derive(Args, Debug)]
pub struct AttentionBenchArgs {
    /// Where the kernels run (emu: the emulator, for checking the command, not for timing).
    #[arg(long, value_enum, default_value = "cuda")]
    device: DeviceKind,
    /// Storage of Q, K, V and the outputs (bf16: tensor cores; f32: what the model uses today).
    #[arg(long, value_enum, default_value = "bf16")]
    dtype: Dtype,
    /// Stream lengths; a packed case holds as many whole groups as fit (at least one).
    #[arg(long, value_delimiter = ',', default_value = "2048,8192")]
    tokens: Vec<usize>,
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "causal,packed"
    )]
    mask: Vec<MaskKind>,
    #[arg(long, default_value_t = 32)]
    heads: usize,
    #[arg(long, default_value_t = 8)]
    kv_heads: usize,
    #[arg(long, default_value_t = 128)]
    head_dim: usize,
    /// Prompt tokens of a packed group.
    #[arg(long, default_value_t = 512)]
    prompt: usize,
    /// Responses per packed group.
    #[arg(long, default_value_t = 8)]
    responses: usize,
    /// Tokens per response.
    #[arg(long, default_value_t = 256)]
    response_len: usize,
    /// Timed runs per case (the median is reported), after one warm-up.
    #[arg(long, default_value_t = 10)]
    reps: usize,
}

pub fn run(args: BenchArgs) -> Result<()> {
    match args.what {
        BenchCommand::Attention(a) => attention(a),
    }
}

fn attention(a: AttentionBenchArgs) -> Result<()> {
    if a.tokens.contains(&0) {
        bail!("--tokens: every stream needs at least one token");
    }
    let device = Device::open(a.device)?;
    let shape = AttentionShape {
        heads: a.heads,
        kv_heads: a.kv_heads,
        head_dim: a.head_dim,
    };
    let mut cases = Vec::new();
    for &tokens in &a.tokens {
        for &kind in &a.mask {
            let mask = match kind {
                MaskKind::Causal => BenchMask::Causal,
                MaskKind::Packed => BenchMask::Packed {
                    prompt: a.prompt,
                    responses: a.responses,
                    response_len: a.response_len,
                },
            };
            cases.push(match a.dtype {
                Dtype::Bf16 => time_attention::<bf16>(&device, mask, tokens, shape, a.reps)?,
                Dtype::F32 => time_attention::<f32>(&device, mask, tokens, shape, a.reps)?,
            });
        }
    }
    let report = serde_json::json!({
        "bench": "attention",
        "device": device.describe(),
        "cases": cases,
    });
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}
