//! The fused scoring's benchmark, shared by `contralign bench scoring` and the `kernels`
//! criterion bench: random inputs made on the device, the fused op, the same GEMMs alone (the
//! floor no fusion removes), the logits passes alone (for their bandwidth), and an unfused
//! baseline written the ordinary way — fp32 logits of the whole batch, a log-softmax into a
//! second `[rows, vocab]` fp32 tensor, a gather, the per-response reduction. `dump` returns a
//! batch's inputs and the fused forward's sums for the scoreboard's PyTorch side
//! (docs/cuda.md, "The scoreboard").

use super::device::{AsView, Buffer, Device, Float};
use super::emu::KernelArgs;
use super::fresh::GradWrite;
use super::gemm::Gemm;
use super::kernels::Kernels;
use super::pool::Pool;
use super::roofline::{Gpu, Math, Modeled};
use super::scoring::{chunk_rows_for, FusedScoring, Spans, DEFAULT_CHUNK_BYTES};
use crate::ops::ResponseSpan;
use anyhow::{ensure, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::time::Instant;

/// Tokens per response of the benchmark's batch (the last one takes what is left).
pub const RESPONSE_LEN: usize = 256;

/// The shape of a scoring benchmark.
#[derive(Clone, Copy, Debug)]
pub struct ScoringShape {
    pub rows: usize,
    pub vocab: usize,
    pub dim: usize,
    /// Rows per chunk; `None`: as many as [`DEFAULT_CHUNK_BYTES`] of logits hold.
    pub chunk_rows: Option<usize>,
}

/// A batch's scoring inputs and outputs on a device.
pub struct ScoringBench<'a, E> {
    kernels: Kernels<'a>,
    pub shape: ScoringShape,
    pub chunk_rows: usize,
    h: Buffer<E>,
    head: Buffer<E>,
    targets: Buffer<u32>,
    host_targets: Vec<u32>,
    host_spans: Vec<ResponseSpan>,
    spans: Spans,
    grads: Buffer<f64>,
    lse: Buffer<f32>,
    logp: Buffer<f32>,
    coef: Buffer<f32>,
    stats: Buffer<f64>,
    dh: Buffer<E>,
    dhead: Buffer<f32>,
}

fn random<E: Float>(
    device: &Device,
    n: usize,
    scale: f32,
    rng: &mut ChaCha8Rng,
) -> Result<Buffer<E>> {
    let host: Vec<E> = (0..n)
        .map(|_| E::from_f32(rng.gen_range(-scale..scale)))
        .collect();
    device.upload(&host)
}

fn fused<'k>(kernels: &'k Kernels<'k>, chunk_rows: usize) -> FusedScoring<'k> {
    FusedScoring {
        kernels,
        chunk_rows,
    }
}

impl<'a, E: Float> ScoringBench<'a, E> {
    pub fn new(device: &'a Device, shape: ScoringShape, seed: u64) -> Result<Self> {
        let ScoringShape {
            rows, vocab, dim, ..
        } = shape;
        let rng = &mut ChaCha8Rng::seed_from_u64(seed);
        let spans: Vec<ResponseSpan> = (0..rows)
            .step_by(RESPONSE_LEN)
            .map(|first| ResponseSpan {
                group: first / (4 * RESPONSE_LEN),
                first,
                len: RESPONSE_LEN.min(rows - first),
                ends_with_eos: true,
            })
            .collect();
        let targets: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
        let grads: Vec<f64> = (0..3 * spans.len())
            .map(|_| rng.gen_range(-1.0..1.0))
            .collect();
        Ok(ScoringBench {
            kernels: Kernels::new(device),
            shape,
            chunk_rows: shape
                .chunk_rows
                .unwrap_or_else(|| chunk_rows_for::<E>(vocab, DEFAULT_CHUNK_BYTES))
                .clamp(1, rows.max(1)),
            // Logits of a few units, as a trained model's.
            h: random(device, rows * dim, 1.0, rng)?,
            head: random(device, vocab * dim, 4.0 / (dim as f32).sqrt(), rng)?,
            targets: device.upload(&targets)?,
            spans: Spans::upload(device, &Pool::default(), &spans, rows)?,
            grads: device.upload(&grads)?,
            lse: device.alloc(rows)?,
            logp: device.alloc(rows)?,
            coef: device.alloc(rows)?,
            stats: device.alloc(3 * spans.len())?,
            host_targets: targets,
            host_spans: spans,
            dh: device.alloc(rows * dim)?,
            dhead: device.alloc(vocab * dim)?,
        })
    }

    pub fn device(&self) -> &'a Device {
        self.kernels.device
    }

    fn fused(&self) -> FusedScoring<'_> {
        fused(&self.kernels, self.chunk_rows)
    }

    /// A buffer for one chunk of logits, for the GEMMs-alone and pass-alone cases.
    pub fn chunk(&self) -> Result<Buffer<E>> {
        self.device().alloc(self.chunk_rows * self.shape.vocab)
    }

    fn chunks(&self) -> Vec<(usize, usize)> {
        let (rows, step) = (self.shape.rows, self.chunk_rows);
        (0..rows)
            .step_by(step)
            .map(|s| (s, step.min(rows - s)))
            .collect()
    }

    /// Per-row lse and logp, then each response's S, A, E.
    pub fn fused_forward(&mut self) -> Result<()> {
        fused(&self.kernels, self.chunk_rows).forward(
            &self.h,
            &self.head,
            &self.targets,
            self.shape.dim,
            &mut self.lse,
            &mut self.logp,
        )?;
        self.kernels
            .response_stats(&self.logp, &self.spans, &mut self.stats)
    }

    /// The forward, the per-row coefficients from per-response gradients, and the backward.
    pub fn fused_forward_backward(&mut self) -> Result<()> {
        self.fused_forward()?;
        self.kernels
            .row_coef(&self.spans, &self.grads, 1.0, &mut self.coef)?;
        fused(&self.kernels, self.chunk_rows).backward(
            &self.h,
            &self.head,
            &self.targets,
            &self.lse,
            &self.coef,
            self.shape.dim,
            &mut self.dh,
            (&mut self.dhead, GradWrite::Accumulate),
        )
    }

    /// The forward's GEMMs alone: every chunk's logits.
    pub fn gemms_forward(&self, z: &mut Buffer<E>) -> Result<()> {
        let (d, v) = (self.shape.dim, self.shape.vocab);
        for (start, n) in self.chunks() {
            self.device().gemm_at(
                &Gemm::projection(n, d, v),
                (&self.h, start * d),
                (&self.head, 0),
                (z, 0),
            )?;
        }
        Ok(())
    }

    /// The forward and backward's GEMMs alone: logits twice (the backward recomputes them),
    /// `dh` and `dW`.
    pub fn gemms_forward_backward(&mut self, z: &mut Buffer<E>) -> Result<()> {
        self.gemms_forward(z)?;
        let (d, v) = (self.shape.dim, self.shape.vocab);
        let device = self.kernels.device;
        for (start, n) in self.chunks() {
            let h = &self.h;
            device.gemm_at(
                &Gemm::projection(n, d, v),
                (h, start * d),
                (&self.head, 0),
                (z, 0),
            )?;
            device.gemm_at(
                &Gemm::projection_input_grad(n, d, v),
                (z, 0),
                (&self.head, 0),
                (&mut self.dh, start * d),
            )?;
            device.gemm_at(
                &Gemm::projection_weight_grad(n, d, v),
                (z, 0),
                (h, start * d),
                (&mut self.dhead, 0),
            )?;
        }
        Ok(())
    }

    /// The forward's pass over the logits alone, on chunk `z` once per chunk of the batch.
    pub fn rows_pass(&mut self, z: &Buffer<E>) -> Result<()> {
        for (start, n) in self.chunks() {
            self.kernels.scoring_rows(
                z,
                n,
                self.shape.vocab,
                &self.targets,
                start,
                &mut self.lse,
                &mut self.logp,
            )?;
        }
        Ok(())
    }

    /// The backward's pass alone (read and overwrite), on chunk `z` once per chunk.
    pub fn backward_pass(&self, z: &mut Buffer<E>) -> Result<()> {
        for (start, n) in self.chunks() {
            self.kernels.scoring_backward(
                z,
                n,
                self.shape.vocab,
                &self.targets,
                &self.lse,
                &self.coef,
                start,
            )?;
        }
        Ok(())
    }

    /// Bytes the forward's pass reads, and the backward's pass reads and writes.
    pub fn pass_bytes(&self) -> (u64, u64) {
        let logits = (self.shape.rows * self.shape.vocab * size_of::<E>()) as u64;
        (logits, 2 * logits)
    }

    /// FLOPs of the forward's GEMMs, and of the forward and backward's.
    pub fn gemm_flops(&self) -> (u64, u64) {
        let one = 2 * (self.shape.rows * self.shape.vocab * self.shape.dim) as u64;
        (one, 4 * one)
    }

    /// Device memory the fused forward and backward allocate beyond inputs and outputs.
    pub fn fused_extra_bytes(&self) -> usize {
        self.fused()
            .extra_bytes::<E>(self.shape.rows, self.shape.vocab)
    }
}

/// The unfused baseline's buffers: fp32 logits and log-probs of the whole batch.
pub struct Unfused {
    logits: Buffer<f32>,
    logprobs: Buffer<f32>,
}

impl Unfused {
    pub fn new(device: &Device, shape: &ScoringShape) -> Result<Self> {
        let n = shape.rows * shape.vocab;
        Ok(Unfused {
            logits: device.alloc(n)?,
            logprobs: device.alloc(n)?,
        })
    }

    pub fn extra_bytes(&self) -> usize {
        4 * (self.logits.len() + self.logprobs.len())
    }

    /// GEMM to fp32 logits, log-softmax, gather, reduce; per-row logp into `bench`'s buffer.
    pub fn forward<E: Float>(&mut self, bench: &mut ScoringBench<E>) -> Result<()> {
        let ScoringShape {
            rows, vocab, dim, ..
        } = bench.shape;
        let k = &bench.kernels;
        k.device.gemm(
            &Gemm::projection(rows, dim, vocab),
            &bench.h,
            &bench.head,
            &mut self.logits,
        )?;
        self.log_softmax_gather(k, (rows, vocab), &bench.targets, &mut bench.logp)?;
        k.response_stats(&bench.logp, &bench.spans, &mut bench.stats)
    }

    /// The baseline's two kernels on the logits in place (`rows` of `vocab`): log-softmax into
    /// fp32 log-probs, then each row's target's log-prob gathered into `logp`. Apart from the
    /// GEMM, so that the profile counts them alone.
    pub fn log_softmax_gather(
        &mut self,
        k: &Kernels,
        (rows, vocab): (usize, usize),
        targets: &impl AsView<u32>,
        logp: &mut impl AsView<f32>,
    ) -> Result<()> {
        let (targets, logp) = (targets.view(), logp.view());
        ensure!(
            rows * vocab <= self.logits.len() && targets.len() == rows && logp.len() == rows,
            "unfused scoring: {rows} rows of {vocab} need as many targets and log-probs \
             and logits for them"
        );
        let mut args = KernelArgs::new();
        args.buffer(&self.logits)
            .buffer(&self.logprobs)
            .arg(rows as i32)
            .arg(vocab as i32);
        k.launch("scoring_unfused_log_softmax", rows, &args)?;
        let mut args = KernelArgs::new();
        args.buffer(&self.logprobs)
            .arg(rows as i32)
            .arg(vocab as i32)
            .buffer(&targets)
            .buffer(&logp);
        k.launch(
            "scoring_unfused_gather",
            rows.div_ceil(k.block as usize),
            &args,
        )
    }
}

/// A device buffer's values as f32, for dumps.
pub fn to_f32<E: Float>(device: &Device, buffer: &Buffer<E>) -> Result<Vec<f32>> {
    Ok(device
        .download(buffer)?
        .into_iter()
        .map(E::to_f32)
        .collect())
}

/// A batch's inputs and contralign's per-response sums, for the scoreboard's PyTorch side
/// (`contralign bench scoring --dump`): h `[rows, dim]` and the head `[vocab, dim]` as f32,
/// the targets, the response spans `(first, len)` and each response's S.
pub struct ScoringDump {
    pub h: Vec<f32>,
    pub head: Vec<f32>,
    pub targets: Vec<u32>,
    pub spans: Vec<[usize; 2]>,
    pub s: Vec<f64>,
}

/// Runs the fused forward and returns what it read and the sums it made.
pub fn dump<E: Float>(bench: &mut ScoringBench<E>) -> Result<ScoringDump> {
    bench.fused_forward()?;
    let device = bench.device();
    let stats = device.download(&bench.stats)?;
    Ok(ScoringDump {
        h: to_f32(device, &bench.h)?,
        head: to_f32(device, &bench.head)?,
        targets: bench.host_targets.clone(),
        spans: bench.host_spans.iter().map(|r| [r.first, r.len]).collect(),
        s: stats.chunks(3).map(|r| r[0]).collect(),
    })
}

/// The per-row log-probs of the last pass, for checks.
pub fn logp<E: Float>(bench: &ScoringBench<E>) -> Result<Vec<f32>> {
    bench.device().download(&bench.logp)
}

/// The median of `reps` synchronized runs of `run` after one warm-up, in seconds.
pub fn median_seconds(
    device: &Device,
    reps: usize,
    mut run: impl FnMut() -> Result<()>,
) -> Result<f64> {
    run()?;
    device.synchronize()?;
    let mut times = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        run()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// Every figure of the benchmark as one JSON object (`contralign bench scoring`).
pub fn report<E: Float>(
    device: &Device,
    shape: ScoringShape,
    reps: usize,
) -> Result<serde_json::Value> {
    let mut bench = ScoringBench::<E>::new(device, shape, 0)?;
    let mut z = bench.chunk()?;
    let fused_forward = median_seconds(device, reps, || bench.fused_forward())?;
    let fused_both = median_seconds(device, reps, || bench.fused_forward_backward())?;
    let gemms_forward = median_seconds(device, reps, || bench.gemms_forward(&mut z))?;
    let gemms_both = median_seconds(device, reps, || bench.gemms_forward_backward(&mut z))?;
    bench.gemms_forward(&mut z)?;
    let rows_pass = median_seconds(device, reps, || bench.rows_pass(&z))?;
    let backward_pass = median_seconds(device, reps, || bench.backward_pass(&mut z))?;
    let fused_extra = bench.fused_extra_bytes();
    let mut unfused = Unfused::new(device, &shape)?;
    let unfused_extra = unfused.extra_bytes();
    let unfused_forward = median_seconds(device, reps, || unfused.forward(&mut bench))?;
    // The copy bandwidth over a buffer as large as the unfused logits (bytes read + written).
    let copy_src = unfused.logits;
    let mut copy_dst = unfused.logprobs;
    let copy = median_seconds(device, reps, || {
        device.copy_buffer(&copy_src, &mut copy_dst)
    })?;
    let copy_rate = 8.0 * copy_src.len() as f64 / copy;
    let (fwd_bytes, bwd_bytes) = bench.pass_bytes();
    let (fwd_flops, both_flops) = bench.gemm_flops();
    let gb = |bytes: u64, s: f64| bytes as f64 / s / 1e9;
    // The roofline model beside the measured times, on the GPU's published figures: the fused
    // scoring reads h and the head once and writes each row's lse and log-prob (its targets
    // read); with the backward, dh written and the f32 dhead read and written once as well.
    // The logits passes read (and the backward writes) the logits once.
    let gpu = Gpu::published_for(&device.describe());
    let (r, v, d, e) = (
        shape.rows as f64,
        shape.vocab as f64,
        shape.dim as f64,
        size_of::<E>() as f64,
    );
    let forward_bytes = e * (r + v) * d + 12.0 * r;
    let math = Math::of(E::DTYPE);
    let model = serde_json::json!({
        "fused_forward": Modeled::new(&gpu, forward_bytes, fwd_flops as f64, math),
        "fused_forward_backward": Modeled::new(
            &gpu,
            forward_bytes + e * r * d + 8.0 * v * d,
            both_flops as f64,
            math,
        ),
        "rows_pass": Modeled::new(&gpu, fwd_bytes as f64, 0.0, math),
        "backward_pass": Modeled::new(&gpu, bwd_bytes as f64, 0.0, math),
    });
    Ok(serde_json::json!({
        "device": device.describe(),
        "emulator_time": matches!(device, Device::Emu),
        "rows": shape.rows,
        "vocab": shape.vocab,
        "dim": shape.dim,
        "dtype": E::DTYPE,
        "chunk_rows": bench.chunk_rows,
        "reps": reps,
        "fused_forward_s": fused_forward,
        "fused_forward_backward_s": fused_both,
        "gemms_forward_s": gemms_forward,
        "gemms_forward_backward_s": gemms_both,
        "unfused_forward_s": unfused_forward,
        "fused_forward_over_gemms": fused_forward / gemms_forward,
        "fused_forward_backward_over_gemms": fused_both / gemms_both,
        "unfused_over_fused_forward": unfused_forward / fused_forward,
        "gemms_forward_tflop_s": fwd_flops as f64 / gemms_forward / 1e12,
        "gemms_forward_backward_tflop_s": both_flops as f64 / gemms_both / 1e12,
        "fused_extra_bytes": fused_extra,
        "unfused_extra_bytes": unfused_extra,
        "copy_gb_s": copy_rate / 1e9,
        "rows_pass_s": rows_pass,
        "rows_pass_gb_s": gb(fwd_bytes, rows_pass),
        "rows_pass_of_copy": fwd_bytes as f64 / rows_pass / copy_rate,
        "backward_pass_s": backward_pass,
        "backward_pass_gb_s": gb(bwd_bytes, backward_pass),
        "backward_pass_of_copy": bwd_bytes as f64 / backward_pass / copy_rate,
        "model": model,
    }))
}
