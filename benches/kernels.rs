//! Speed of the CUDA kernels and the cuBLAS GEMMs on a GPU, at Mistral-7B sizes (8192 tokens,
//! width 4096, 32 heads of 128, FFN 14336, vocabulary 32000), forward and backward, in bf16 and
//! f32 where a kernel has both, and the fused LM-head scoring against its GEMMs and an unfused
//! baseline.
//!
//! The kernels are memory-bound, so each is reported as the bytes it must move (every input
//! read once, every output written once) per second, next to the device-to-device copy
//! bandwidth measured first as the ceiling; GEMMs are reported in FLOP/s (criterion's
//! "elements" are FLOPs there). Every iteration ends with a synchronize, so the times are the
//! GPU's, not the launch queue's.
//!
//! Criterion measures each case; a summary table (median of synchronized repetitions timed
//! here) is printed at the end, each time beside the roofline model's estimate for it
//! (`src/ops/cuda/profile.rs`): the case's bytes times the counted/ideal ratio that the
//! emulator's probe measures for the kernel at small shapes, over the copy bandwidth measured
//! here; a GEMM's FLOPs over the GPU's published bf16 peak. The ratio of the two says how far
//! the model can be trusted. Without `--bench` (criterion's test mode) each case runs once
//! and the table only shows that everything ran. Without a GPU, or in a build without
//! `--features cuda`, it prints why it skipped and exits successfully.

use anyhow::{Context, Result};
use contralign::ops::cuda::device::{Buffer, Device, DeviceKind, Float};
use contralign::ops::cuda::embedding::IdRows;
use contralign::ops::cuda::fresh::GradWrite;
use contralign::ops::cuda::gemm::Gemm;
use contralign::ops::cuda::kernels::{AdamWStep, Kernels};
use contralign::ops::cuda::lists::Uploads;
use contralign::ops::cuda::pool::Pool;
use contralign::ops::cuda::profile::{self, Shapes};
use contralign::ops::cuda::roofline::Gpu;
use contralign::ops::cuda::scoring_bench::{ScoringBench, ScoringShape, Unfused};
use contralign::train::optimizer::AdamWConfig;
use criterion::{Criterion, Throughput};
use half::bf16;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use std::process::ExitCode;
use std::time::{Duration, Instant};

const TOKENS: usize = 8192;
const D: usize = 4096;
const FFN: usize = 14336;
const VOCAB: usize = 32000;
const HEADS: usize = 32;
const HEAD_DIM: usize = 128;
const KV_DIM: usize = 1024;
/// Elements of the optimizer and cast benchmarks: a little more than one layer's attention
/// weights (42M), and far past every cache.
const PARAMS: usize = 50 << 20;
const COPY_BYTES: usize = 1 << 30;

/// The work of one case, for criterion's throughput and the summary.
#[derive(Clone, Copy)]
enum Work {
    Bytes(u64),
    Flops(u64),
}

struct Line {
    kernel: String,
    shape: String,
    seconds: f64,
    work: Work,
}

struct Bench<'a> {
    device: &'a Device,
    criterion: Criterion,
    /// `--bench` was given: measure; otherwise run each case once.
    measure: bool,
    lines: Vec<Line>,
    /// The emulator's counted/ideal bytes of each kernel, by the summary's kernel name.
    counted_over_ideal: std::collections::HashMap<String, f64>,
}

impl Bench<'_> {
    /// Times `launch` (followed by a synchronize) here and under criterion, as `name shape` in
    /// criterion's `group`.
    fn case(
        &mut self,
        group: &str,
        name: &str,
        shape: &str,
        work: Work,
        mut launch: impl FnMut() -> Result<()>,
    ) -> Result<()> {
        let device = self.device;
        let mut run = || -> Result<()> {
            launch()?;
            device.synchronize()
        };
        let what = format!("{group} {name} {shape}");
        let seconds = self.time(&mut run).with_context(|| what.clone())?;
        // A note in parentheses after a group's name is for criterion's output.
        let family = group.split(" (").next().unwrap_or(group);
        // As measured: a run stopped before the summary still leaves its figures.
        println!(
            "kernels bench: {family} {name} {shape}: {:.2} µs",
            seconds * 1e6
        );
        self.lines.push(Line {
            kernel: format!("{family} {name}"),
            shape: shape.to_string(),
            seconds,
            work,
        });
        let mut g = self.criterion.benchmark_group(group);
        g.throughput(match work {
            Work::Bytes(b) => Throughput::Bytes(b),
            Work::Flops(f) => Throughput::Elements(f),
        });
        g.bench_function(format!("{name} {shape}"), |b| {
            // It has just run without an error above; a failure now is the GPU breaking.
            b.iter(|| run().unwrap_or_else(|e| panic!("{what}: {e:#}")))
        });
        g.finish();
        Ok(())
    }

    /// The median of synchronized repetitions after a few warm-ups, about a quarter second in
    /// all: the median, because the first runs after an allocation or a clock change are
    /// outliers that a mean would keep.
    fn time(&self, run: &mut impl FnMut() -> Result<()>) -> Result<f64> {
        let once = |run: &mut dyn FnMut() -> Result<()>| -> Result<f64> {
            let start = Instant::now();
            run()?;
            Ok(start.elapsed().as_secs_f64())
        };
        if !self.measure {
            return once(run);
        }
        let mut warm = 0.0;
        for _ in 0..3 {
            warm = once(run)?;
        }
        let reps = ((0.25 / warm.max(1e-9)) as usize).clamp(5, 200);
        let mut times = (0..reps).map(|_| once(run)).collect::<Result<Vec<f64>>>()?;
        times.sort_by(f64::total_cmp);
        Ok(times[reps / 2])
    }

    fn summary(&self) -> String {
        let copy = self
            .lines
            .first()
            .and_then(|l| match l.work {
                Work::Bytes(b) => Some(b as f64 / l.seconds),
                Work::Flops(_) => None,
            })
            .unwrap_or(f64::NAN);
        let mut out = String::from("## kernels bench summary\n\n");
        out.push_str(&format!(
            "{}; device-to-device copy {:.0} GB/s (bytes read + written). GB/s counts the bytes \
             a kernel must move (each input read once, each output written once) over {}.\n\n",
            self.device.describe(),
            copy / 1e9,
            if self.measure {
                "the median of synchronized repetitions"
            } else {
                "a single run (test mode: not a measurement)"
            }
        ));
        // The roofline model on the copy bandwidth measured here and the published bf16 peak
        // of the GPU.
        let published = Gpu::published_for(&self.device.describe());
        let gpu = Gpu::measured("measured copy", copy, published.bf16_flops);
        out.push_str(&format!(
            "model: the roofline estimate on {}, bytes (times the emulator's counted/ideal \
             ratio) over the copy bandwidth, FLOPs over {}'s published bf16 peak.\n\n",
            gpu.describe(),
            published.name
        ));
        out.push_str(
            "| kernel | shape | time (µs) | GB/s | of copy | TFLOP/s | model (µs) | time / model |\n",
        );
        out.push_str("|:--|:--|--:|--:|--:|--:|--:|--:|\n");
        for l in &self.lines {
            let model = match l.work {
                Work::Bytes(b) => self
                    .counted_over_ideal
                    .get(&l.kernel)
                    .map(|ratio| gpu.seconds(b as f64 * ratio, 0.0)),
                Work::Flops(f) => Some(gpu.seconds(0.0, f as f64)),
            };
            let (model, versus) = match model {
                Some(m) => (format!("{:.1}", m * 1e6), format!("{:.2}", l.seconds / m)),
                _ => ("-".into(), "-".into()),
            };
            let (rate, fraction, tflops) = match l.work {
                Work::Bytes(b) => {
                    let rate = b as f64 / l.seconds;
                    (
                        three_digits(rate / 1e9),
                        format!("{}%", three_digits(100.0 * rate / copy)),
                        String::new(),
                    )
                }
                Work::Flops(f) => (
                    String::new(),
                    String::new(),
                    three_digits(f as f64 / l.seconds / 1e12),
                ),
            };
            out.push_str(&format!(
                "| {} | {} | {:.1} | {rate} | {fraction} | {tflops} | {model} | {versus} |\n",
                l.kernel,
                l.shape,
                l.seconds * 1e6
            ));
        }
        out
    }
}

/// `x` to about three significant digits, without an exponent.
fn three_digits(x: f64) -> String {
    match x.abs() {
        a if a >= 100.0 => format!("{x:.0}"),
        a if a >= 10.0 => format!("{x:.1}"),
        _ => format!("{x:.2}"),
    }
}

/// `n` values uniform in `(-scale, scale)`, generated in parallel chunks: the largest tensors
/// here have over 100M elements.
fn random<E: Float>(device: &Device, n: usize, scale: f32, seed: u64) -> Result<Buffer<E>> {
    let mut host = vec![E::from_f32(0.0); n];
    host.par_chunks_mut(1 << 20)
        .enumerate()
        .for_each(|(i, chunk)| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            rng.set_stream(i as u64);
            for v in chunk {
                *v = E::from_f32(rng.gen_range(-scale..scale));
            }
        });
    device.upload(&host)
}

fn size<E>() -> u64 {
    size_of::<E>() as u64
}

fn copy(b: &mut Bench) -> Result<()> {
    let device = b.device;
    let src = device.alloc::<u8>(COPY_BYTES)?;
    let mut dst = device.alloc::<u8>(COPY_BYTES)?;
    b.case(
        "copy",
        "device to device",
        &format!("{} MiB", COPY_BYTES >> 20),
        Work::Bytes(2 * COPY_BYTES as u64),
        || device.copy_buffer(&src, &mut dst),
    )
}

fn swiglu<E: Float>(b: &mut Bench) -> Result<()> {
    let device = b.device;
    let k = Kernels::new(device);
    let n = TOKENS * FFN;
    let shape = format!("{TOKENS}x{FFN}");
    let gate = random::<E>(device, n, 4.0, 1)?;
    let up = random::<E>(device, n, 2.0, 2)?;
    let dout = random::<E>(device, n, 1.0, 3)?;
    let mut out = device.alloc::<E>(n)?;
    let mut dgate = device.alloc::<E>(n)?;
    let mut dup = device.alloc::<E>(n)?;
    let bytes = n as u64 * size::<E>();
    b.case(
        "swiglu",
        &format!("forward {}", E::DTYPE),
        &shape,
        Work::Bytes(3 * bytes),
        || k.swiglu_forward(&gate, &up, &mut out),
    )?;
    b.case(
        "swiglu",
        &format!("backward {}", E::DTYPE),
        &shape,
        Work::Bytes(5 * bytes),
        || k.swiglu_backward((&gate, &up, &dout), &mut dgate, &mut dup, None),
    )?;
    b.case(
        "swiglu",
        &format!("backward + output {}", E::DTYPE),
        &shape,
        Work::Bytes(6 * bytes),
        || k.swiglu_backward((&gate, &up, &dout), &mut dgate, &mut dup, Some(out.view())),
    )
}

fn embedding<E: Float>(b: &mut Bench) -> Result<()> {
    let device = b.device;
    let k = Kernels::new(device);
    let shape = format!("{VOCAB}x{D} table, {TOKENS} ids");
    let table = random::<E>(device, VOCAB * D, 1.0, 4)?;
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let ids: Vec<u32> = (0..TOKENS)
        .map(|_| rng.gen_range(0..VOCAB as u32))
        .collect();
    let id_rows = IdRows::new(&ids);
    let distinct = id_rows.unique.len() as u64;
    let pool = Pool::default();
    let by_id = id_rows.on_device(&Uploads {
        device,
        pool: &pool,
    })?;
    let ids = device.upload(&ids)?;
    let dout = random::<E>(device, TOKENS * D, 1.0, 6)?;
    let mut out = device.alloc::<E>(TOKENS * D)?;
    let mut dtable = device.alloc::<f32>(VOCAB * D)?;
    let rows = (TOKENS * D) as u64;
    let ids_bytes = TOKENS as u64 * 4;
    // The profile's ideal bytes: the ids read, each distinct id's table row read once, each
    // token's output row written.
    b.case(
        "embedding",
        &format!("forward {}", E::DTYPE),
        &shape,
        Work::Bytes(ids_bytes + (rows + distinct * D as u64) * size::<E>()),
        || k.embedding_forward(&table, &ids, &mut out, D),
    )?;
    // The ids and each token's gradient row read, each distinct id's f32 table row read and
    // written once (the kernel reads the ids grouped by value instead: the profile's ratio).
    b.case(
        "embedding",
        &format!("backward {} -> f32", E::DTYPE),
        &shape,
        Work::Bytes(ids_bytes + rows * size::<E>() + distinct * D as u64 * 8),
        || k.embedding_backward(&dout, &by_id, &mut dtable, D),
    )
}

fn rmsnorm<E: Float>(b: &mut Bench) -> Result<()> {
    let device = b.device;
    let k = Kernels::new(device);
    let n = TOKENS * D;
    let shape = format!("{TOKENS}x{D} with residual");
    let x = random::<E>(device, n, 2.0, 7)?;
    let residual = random::<E>(device, n, 2.0, 8)?;
    let w = random::<E>(device, D, 1.0, 9)?;
    let dy = random::<E>(device, n, 1.0, 10)?;
    let dh_in = random::<E>(device, n, 1.0, 11)?;
    let h = device.alloc::<E>(n)?;
    let mut y = device.alloc::<E>(n)?;
    let mut rstd = device.alloc::<f32>(TOKENS)?;
    let mut dh = device.alloc::<E>(n)?;
    let mut dw = device.alloc::<f32>(D)?;
    let (tensor, w_bytes, rstd_bytes) = (
        n as u64 * size::<E>(),
        D as u64 * size::<E>(),
        TOKENS as u64 * 4,
    );
    // Reads x and the residual, writes h and y.
    b.case(
        "rmsnorm",
        &format!("forward {}", E::DTYPE),
        &shape,
        Work::Bytes(4 * tensor + w_bytes + rstd_bytes),
        || {
            k.rmsnorm_forward(
                &x,
                Some(residual.view()),
                &w,
                Some(h.view()),
                &mut y,
                &mut rstd,
                1e-5,
            )
        },
    )?;
    // Reads h, dy and the incoming residual gradient, writes dh; dw is read and written.
    b.case(
        "rmsnorm",
        &format!("backward {}", E::DTYPE),
        &shape,
        Work::Bytes(4 * tensor + w_bytes + 8 * D as u64),
        || {
            let dw = (&mut dw, GradWrite::Accumulate);
            k.rmsnorm_backward(&h, &w, &dy, Some(dh_in.view()), &mut dh, dw, 1e-5)
        },
    )
}

fn rope<E: Float>(b: &mut Bench) -> Result<()> {
    let device = b.device;
    let k = Kernels::new(device);
    let shape = format!("{TOKENS}x{HEADS}x{HEAD_DIM}");
    let mut x = random::<E>(device, TOKENS * HEADS * HEAD_DIM, 2.0, 12)?;
    // Packed sequences of 4096 tokens.
    let positions: Vec<u32> = (0..TOKENS as u32).map(|t| t % 4096).collect();
    let positions = device.upload(&positions)?;
    let bytes =
        Work::Bytes(2 * (TOKENS * HEADS * HEAD_DIM) as u64 * size::<E>() + 4 * TOKENS as u64);
    for (name, inverse) in [("forward", false), ("backward", true)] {
        b.case(
            "rope",
            &format!("{name} {}", E::DTYPE),
            &shape,
            bytes,
            || k.rope(&mut x, &positions, HEADS, HEAD_DIM, 1e6, inverse),
        )?;
    }
    Ok(())
}

fn casts(b: &mut Bench) -> Result<()> {
    let device = b.device;
    let k = Kernels::new(device);
    let shape = format!("{PARAMS}");
    let x = random::<f32>(device, PARAMS, 3.0, 13)?;
    let mut half = device.alloc::<bf16>(PARAMS)?;
    let mut back = device.alloc::<f32>(PARAMS)?;
    let bytes = Work::Bytes(6 * PARAMS as u64);
    b.case("cast", "f32 to bf16", &shape, bytes, || {
        k.cast_to_bf16(&x, &mut half)
    })?;
    b.case("cast", "bf16 to f32", &shape, bytes, || {
        k.cast_to_f32(&half, &mut back)
    })
}

/// The gradient norm and clipping over one layer's attention gradients (q, k, v, o and two
/// norm weights), as the optimizer step runs them: many buffers in one launch.
fn grad_norm(b: &mut Bench) -> Result<()> {
    let device = b.device;
    let k = Kernels::new(device);
    let lens = [D * D, KV_DIM * D, KV_DIM * D, D * D, D, D];
    let total: usize = lens.iter().sum();
    let shape = format!("6 tensors, {total}");
    let grads = lens
        .iter()
        .enumerate()
        .map(|(i, &n)| random::<f32>(device, n, 1e-3, 20 + i as u64))
        .collect::<Result<Vec<_>>>()?;
    let bytes = Work::Bytes(4 * total as u64);
    let ws = k.grad_norm_workspace(&grads.iter().map(Buffer::view).collect::<Vec<_>>())?;
    b.case("grad_norm", "norm f32", &shape, bytes, || {
        k.grad_norm(&ws, 1.0).map(drop)
    })?;
    let norm = device.download(&k.grad_norm(&ws, 0.0)?)?[0];
    // A factor just below 1, so that every run scales (a factor of 1 returns at once) and the
    // gradients stay far from the subnormals over thousands of runs.
    k.grad_norm(&ws, 0.999 * norm)?;
    b.case(
        "grad_norm",
        "clip f32",
        &shape,
        Work::Bytes(8 * total as u64),
        || k.clip(&ws),
    )
}

fn adamw(b: &mut Bench) -> Result<()> {
    let device = b.device;
    let k = Kernels::new(device);
    let n = PARAMS;
    let shape = format!("{n}");
    let step = AdamWStep::new(&AdamWConfig::default(), 10, 1e-5, 42);
    let grad = random::<f32>(device, n, 1e-3, 30)?;
    let mut m = random::<f32>(device, n, 1e-4, 31)?;
    let mut v = device.alloc::<f32>(n)?;
    let mut master = random::<f32>(device, n, 0.05, 32)?;
    let mut param = device.alloc::<bf16>(n)?;
    k.cast_to_bf16(&master, &mut param)?;
    let n = n as u64;
    // param, grad, m, v read; param, m, v written.
    b.case("adamw", "f32", &shape, Work::Bytes(28 * n), || {
        k.adamw_f32(&mut master, &grad, &mut m, &mut v, None, &step)
    })?;
    // master, grad, m, v read; master, the bf16 copy, m, v written.
    b.case(
        "adamw",
        "bf16 with f32 master",
        &shape,
        Work::Bytes(30 * n),
        || {
            k.adamw_bf16(
                &mut param,
                Some(master.view()),
                &grad,
                &mut m,
                &mut v,
                None,
                &step,
            )
        },
    )?;
    // param, grad, m, v read; param, m, v written.
    b.case(
        "adamw",
        "bf16 stochastic rounding",
        &shape,
        Work::Bytes(24 * n),
        || k.adamw_bf16(&mut param, None, &grad, &mut m, &mut v, None, &step),
    )
}

/// A projection `[TOKENS, D] -> [TOKENS, out]` and its two gradients: bf16 operands, fp32
/// accumulation, bf16 outputs except the weight gradient (f32, accumulated).
fn gemms(b: &mut Bench) -> Result<()> {
    let device = b.device;
    for (out_dim, seed) in [(D, 40), (FFN, 50)] {
        let (m, k, n) = (TOKENS, D, out_dim);
        let shape = format!("{m}x{k}x{n} (m x k x n)");
        let flops = Work::Flops(2 * (m * k * n) as u64);
        let x = random::<bf16>(device, m * k, 1.0, seed)?;
        let w = random::<bf16>(device, n * k, 0.05, seed + 1)?;
        let dy = random::<bf16>(device, m * n, 1.0, seed + 2)?;
        let mut y = device.alloc::<bf16>(m * n)?;
        let mut dx = device.alloc::<bf16>(m * k)?;
        let mut dw = device.alloc::<f32>(n * k)?;
        let group = "gemm (elements = FLOPs)";
        b.case(group, "bf16 forward", &shape, flops, || {
            device.gemm(&Gemm::projection(m, k, n), &x, &w, &mut y)
        })?;
        b.case(group, "bf16 input grad", &shape, flops, || {
            device.gemm(&Gemm::projection_input_grad(m, k, n), &dy, &w, &mut dx)
        })?;
        b.case(group, "bf16 weight grad to f32", &shape, flops, || {
            device.gemm(&Gemm::projection_weight_grad(m, k, n), &dy, &x, &mut dw)
        })?;
    }
    Ok(())
}

/// The fused LM-head scoring at T = 8192 prediction rows, V = 32000, d = 4096 in bf16 (chunks
/// of 256 MiB of logits): the fused forward and forward+backward against the same GEMMs alone
/// (all in FLOP/s of those GEMMs, so that the ratio of rates is the ratio of times), the
/// unfused baseline (fp32 logits of the whole batch, log-softmax, gather, reduce), and the
/// logits passes alone in GB/s.
fn scoring(b: &mut Bench) -> Result<()> {
    let shape = ScoringShape {
        rows: TOKENS,
        vocab: VOCAB,
        dim: D,
        chunk_rows: None,
    };
    let mut s = ScoringBench::<bf16>::new(b.device, shape, 60)?;
    let mut unfused = Unfused::new(b.device, &shape)?;
    let mut z = s.chunk()?;
    let desc = format!("{TOKENS}x{VOCAB}x{D} chunks of {}", s.chunk_rows);
    let (fwd, both) = s.gemm_flops();
    let (fwd_bytes, bwd_bytes) = s.pass_bytes();
    let group = "scoring (elements = FLOPs of its GEMMs)";
    b.case(group, "fused forward", &desc, Work::Flops(fwd), || {
        s.fused_forward()
    })?;
    b.case(
        group,
        "fused forward+backward",
        &desc,
        Work::Flops(both),
        || s.fused_forward_backward(),
    )?;
    b.case(
        group,
        "GEMMs alone forward",
        &desc,
        Work::Flops(fwd),
        || s.gemms_forward(&mut z),
    )?;
    b.case(
        group,
        "GEMMs alone forward+backward",
        &desc,
        Work::Flops(both),
        || s.gemms_forward_backward(&mut z),
    )?;
    let all = format!("{TOKENS}x{VOCAB}x{D} unchunked");
    b.case(group, "unfused forward", &all, Work::Flops(fwd), || {
        unfused.forward(&mut s)
    })?;
    s.gemms_forward(&mut z)?;
    b.case(
        "scoring",
        "logits pass forward",
        &desc,
        Work::Bytes(fwd_bytes),
        || s.rows_pass(&z),
    )?;
    b.case(
        "scoring",
        "logits pass backward",
        &desc,
        Work::Bytes(bwd_bytes),
        || s.backward_pass(&mut z),
    )
}

fn run(b: &mut Bench) -> Result<()> {
    // The copy first: the summary measures every kernel against it.
    copy(b)?;
    swiglu::<bf16>(b)?;
    swiglu::<f32>(b)?;
    embedding::<bf16>(b)?;
    embedding::<f32>(b)?;
    rmsnorm::<bf16>(b)?;
    rmsnorm::<f32>(b)?;
    rope::<bf16>(b)?;
    rope::<f32>(b)?;
    casts(b)?;
    grad_norm(b)?;
    adamw(b)?;
    gemms(b)?;
    scoring(b)
}

/// Set where a GPU must be found (tools/gpu-suite.sh on the GPU machine).
const REQUIRE_GPU: &str = "CONTRALIGN_REQUIRE_GPU";

fn main() -> ExitCode {
    let device = match Device::open(DeviceKind::Cuda) {
        Ok(device) => device,
        // Where a GPU must be there (the GPU suite sets it), no GPU is a failure, not a skip.
        Err(e) if std::env::var_os(REQUIRE_GPU).is_some() => {
            println!("kernels bench: no GPU, and {REQUIRE_GPU} is set: {e:#}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            println!("kernels bench: skipped: {e:#}");
            return ExitCode::SUCCESS;
        }
    };
    println!("kernels bench: {}", device.describe());
    let criterion = Criterion::default()
        .sample_size(10)
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .without_plots()
        .configure_from_args();
    // The model's counted/ideal ratios: the emulator's probe at small shapes (a few seconds).
    let counted_over_ideal =
        match profile::profile(&Device::Emu, &Shapes::small(16, 1 << 16), 1, Vec::new()) {
            Ok(rows) => rows
                .iter()
                .filter(|r| r.counted)
                .map(|r| (r.op.clone(), r.bytes_over_ideal()))
                .collect(),
            Err(e) => {
                println!("kernels bench: the emulator's profile failed, no model column: {e:#}");
                Default::default()
            }
        };
    let mut b = Bench {
        device: &device,
        counted_over_ideal,
        criterion,
        // Criterion's own rule: it measures with `--bench` unless `--test` is given too.
        measure: std::env::args().any(|a| a == "--bench")
            && !std::env::args().any(|a| a == "--test"),
        lines: Vec::new(),
    };
    let result = run(&mut b);
    b.criterion.final_summary();
    // What ran before a failure (cuBLAS missing, say) is still worth the table.
    print!("\n{}", b.summary());
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            println!("kernels bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
