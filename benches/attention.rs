//! Speed of the attention kernels (cuda/attention.cu) on a GPU at Mistral-7B shapes: 32 query
//! heads, 8 KV heads, head dim 128, bf16; 2K and 8K tokens, one causal sequence and packed
//! groups of one 512-token prompt with 8 responses of 256. Criterion's "elements" are the
//! FLOPs over the (query, key) pairs the mask lets through (src/ops/cuda/attention_bench.rs),
//! so its throughput is the achieved FLOP/s. Every iteration ends with a synchronize.
//!
//! Without a GPU, or in a build without `--features cuda`, it prints why it skipped and exits
//! successfully. `contralign bench attention` gives the same cases as JSON.

use anyhow::Result;
use contralign::ops::cuda::attention::AttentionKernels;
use contralign::ops::cuda::attention_bench::{BenchMask, BenchProblem};
use contralign::ops::cuda::device::{Device, DeviceKind};
use contralign::ops::AttentionShape;
use criterion::{Criterion, Throughput};
use half::bf16;
use std::process::ExitCode;
use std::time::Duration;

const SHAPE: AttentionShape = AttentionShape {
    heads: 32,
    kv_heads: 8,
    head_dim: 128,
};

fn run(device: &Device, criterion: &mut Criterion) -> Result<()> {
    let kernels = AttentionKernels::new(device);
    let packed = BenchMask::Packed {
        prompt: 512,
        responses: 8,
        response_len: 256,
    };
    for tokens in [2048, 8192] {
        for (mask, name) in [(BenchMask::Causal, "causal"), (packed, "packed 512+8x256")] {
            let mut p = BenchProblem::<bf16>::new(device, mask, tokens, SHAPE)?;
            let (forward_flops, backward_flops) = p.flops();
            let shape = format!("{} tokens {name}", p.layout.tokens());
            let step = |p: &mut BenchProblem<bf16>, backward: bool| -> Result<()> {
                if backward {
                    p.backward(&kernels)?;
                } else {
                    p.forward(&kernels)?;
                }
                device.synchronize()
            };
            // Once outside criterion, so that an error is reported instead of a panic, and the
            // backward has the forward's output.
            step(&mut p, false)?;
            step(&mut p, true)?;
            let mut g = criterion.benchmark_group("attention bf16");
            for (backward, flops) in [(false, forward_flops), (true, backward_flops)] {
                g.throughput(Throughput::Elements(flops as u64));
                let what = if backward { "backward" } else { "forward" };
                g.bench_function(format!("{what} {shape}"), |b| {
                    b.iter(|| step(&mut p, backward).unwrap_or_else(|e| panic!("{e:#}")))
                });
            }
            g.finish();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let device = match Device::open(DeviceKind::Cuda) {
        Ok(device) => device,
        Err(e) => {
            println!("attention bench: skipped: {e:#}");
            return ExitCode::SUCCESS;
        }
    };
    println!("attention bench: {}", device.describe());
    let mut criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .without_plots()
        .configure_from_args();
    let result = run(&device, &mut criterion);
    criterion.final_summary();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("attention bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
