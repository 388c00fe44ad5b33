//! Timing of the attention kernels at given shapes on random inputs made on the device's side
//! of the link (`contralign bench attention`, benches/attention.rs).
//!
//! Work is counted over the (query, key) pairs the mask lets through, per query head:
//! 4 · hd FLOPs each for the forward (two products), 10 · hd for the backward (five), the
//! convention of FlashAttention's papers, so a kernel that computes masked pairs gains nothing.
//! `BenchProblem::dump` returns a case's inputs and outputs for the scoreboard's PyTorch side
//! (docs/cuda.md, "The scoreboard").

use super::attention::{tile_rows, AttentionKernels, DeviceLayout};
use super::device::{Buffer, Device, Float};
use super::pool::Pool;
use super::roofline::{Gpu, Math, Modeled};
use super::scoring_bench::{median_seconds, to_f32};
use crate::ops::{AttentionLayout, AttentionShape};
use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// The mask of a benchmark case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BenchMask {
    /// One causal sequence of the given length.
    Causal,
    /// Groups of one prompt and `responses` responses of `response_len`, as many as fit in
    /// the token count (at least one).
    Packed {
        prompt: usize,
        responses: usize,
        response_len: usize,
    },
}

impl BenchMask {
    pub fn layout(&self, tokens: usize) -> AttentionLayout {
        match *self {
            BenchMask::Causal => AttentionLayout::causal(tokens, None),
            BenchMask::Packed {
                prompt,
                responses,
                response_len,
            } => {
                let per_group = prompt + responses * response_len;
                let groups = (tokens / per_group.max(1)).max(1);
                AttentionLayout::packed(
                    &vec![(prompt, vec![response_len; responses]); groups],
                    None,
                )
            }
        }
    }
}

/// One case's timings (the median of `reps` synchronized runs after a warm-up).
#[derive(Clone, Debug, Serialize)]
pub struct AttentionTiming {
    pub dtype: &'static str,
    pub mask: BenchMask,
    pub tokens: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// (query, key) pairs the mask lets through, per head.
    pub visible_pairs: u64,
    /// Tiles the kernels visit, of `tiles²`.
    pub tiles_visited: usize,
    pub tiles: usize,
    pub forward_ms: f64,
    pub forward_tflops: f64,
    pub backward_ms: f64,
    pub backward_tflops: f64,
    /// The roofline model's forward and backward beside the measured times: [`ideal`]'s bytes
    /// and FLOPs on the published figures of the GPU.
    pub forward_model: Modeled,
    pub backward_model: Modeled,
}

fn random<E: Float>(device: &Device, rng: &mut ChaCha8Rng, n: usize) -> Result<Buffer<E>> {
    let host: Vec<E> = (0..n)
        .map(|_| E::from_f32(rng.gen_range(-2.0..2.0)))
        .collect();
    device.upload(&host)
}

/// One named f32 tensor of a dumped case.
pub struct DumpedTensor {
    pub name: &'static str,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// One case's inputs and outputs on the device, for timing the kernels on them.
pub struct BenchProblem<E> {
    pub mask: BenchMask,
    pub shape: AttentionShape,
    pub layout: DeviceLayout,
    /// (query, key) pairs the mask lets through, per head.
    pub visible_pairs: u64,
    q: Buffer<E>,
    k: Buffer<E>,
    v: Buffer<E>,
    dout: Buffer<E>,
    out: Buffer<E>,
    lse: Buffer<f32>,
    dq: Buffer<E>,
    dk: Buffer<E>,
    dv: Buffer<E>,
}

impl<E: Float> BenchProblem<E> {
    pub fn new(
        device: &Device,
        mask: BenchMask,
        tokens: usize,
        shape: AttentionShape,
    ) -> Result<Self> {
        let host_layout = mask.layout(tokens);
        let t = host_layout.len();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (q_len, kv_len) = (
            t * shape.heads * shape.head_dim,
            t * shape.kv_heads * shape.head_dim,
        );
        Ok(BenchProblem {
            mask,
            shape,
            layout: DeviceLayout::new(device, &Pool::default(), &host_layout, tile_rows::<E>())?,
            visible_pairs: (0..t).map(|i| host_layout.keys(i).count() as u64).sum(),
            q: random(device, &mut rng, q_len)?,
            k: random(device, &mut rng, kv_len)?,
            v: random(device, &mut rng, kv_len)?,
            dout: random(device, &mut rng, q_len)?,
            out: device.alloc(q_len)?,
            lse: device.alloc(t * shape.heads)?,
            dq: device.alloc(q_len)?,
            dk: device.alloc(kv_len)?,
            dv: device.alloc(kv_len)?,
        })
    }

    pub fn forward(&mut self, kernels: &AttentionKernels) -> Result<()> {
        kernels.forward(
            &self.q,
            &self.k,
            &self.v,
            &self.layout,
            self.shape,
            &mut self.out,
            &mut self.lse,
        )
    }

    pub fn backward(&mut self, kernels: &AttentionKernels) -> Result<()> {
        kernels.backward(
            &self.q,
            &self.k,
            &self.v,
            &self.out,
            &self.lse,
            &self.dout,
            &self.layout,
            self.shape,
            &mut self.dq,
            &mut self.dk,
            &mut self.dv,
        )
    }

    /// Runs the forward and the backward and returns, as f32 `[T, heads or kv_heads, hd]`,
    /// q, k, v, the output gradient `dout`, the output and dq, dk, dv: the gradients of the
    /// loss `Σ out · dout` (for the scoreboard's PyTorch side, `bench attention --dump`).
    pub fn dump(&mut self, device: &Device) -> Result<Vec<DumpedTensor>> {
        let kernels = AttentionKernels::new(device);
        self.forward(&kernels)?;
        self.backward(&kernels)?;
        let t = self.layout.tokens();
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
        } = self.shape;
        [
            ("q", heads, &self.q),
            ("k", kv_heads, &self.k),
            ("v", kv_heads, &self.v),
            ("dout", heads, &self.dout),
            ("out", heads, &self.out),
            ("dq", heads, &self.dq),
            ("dk", kv_heads, &self.dk),
            ("dv", kv_heads, &self.dv),
        ]
        .into_iter()
        .map(|(name, h, b)| {
            Ok(DumpedTensor {
                name,
                shape: vec![t, h, head_dim],
                data: to_f32(device, b)?,
            })
        })
        .collect()
    }

    /// FLOPs of the forward and of the backward over the visible pairs.
    pub fn flops(&self) -> (f64, f64) {
        let [(_, forward), (_, backward)] =
            ideal::<E>(self.layout.tokens(), self.visible_pairs, self.shape);
        (forward as f64, backward as f64)
    }
}

/// Attention's (ideal bytes, FLOPs) over `tokens` with `pairs` visible (query, key) pairs per
/// head, forward then backward: the forward reads q, k, v and writes the output and the
/// log-sum-exp once; the backward reads q, k, v, the output, its gradient and the log-sum-exp
/// and writes dq, dk, dv once. The FLOPs are the module's convention.
pub fn ideal<E>(tokens: usize, pairs: u64, shape: AttentionShape) -> [(u64, u64); 2] {
    let (t, e) = (tokens as u64, size_of::<E>() as u64);
    let (h, kv, hd) = (
        shape.heads as u64,
        shape.kv_heads as u64,
        shape.head_dim as u64,
    );
    [
        (
            (2 * h + 2 * kv) * t * hd * e + 4 * t * h,
            4 * pairs * h * hd,
        ),
        (
            (4 * h + 4 * kv) * t * hd * e + 4 * t * h,
            10 * pairs * h * hd,
        ),
    ]
}

/// Times the forward and the backward of one case with storage `E`.
pub fn time_attention<E: Float>(
    device: &Device,
    mask: BenchMask,
    tokens: usize,
    shape: AttentionShape,
    reps: usize,
) -> Result<AttentionTiming> {
    let mut p = BenchProblem::<E>::new(device, mask, tokens, shape)?;
    let kernels = AttentionKernels::new(device);
    let forward = median_seconds(device, reps, || p.forward(&kernels))?;
    // The backward reads the output and lse the forward has just written.
    let backward = median_seconds(device, reps, || p.backward(&kernels))?;
    let (forward_flops, backward_flops) = p.flops();
    let t = p.layout.tokens();
    let gpu = Gpu::published_for(&device.describe());
    let [forward_ideal, backward_ideal] = ideal::<E>(t, p.visible_pairs, shape);
    let math = Math::of(E::DTYPE);
    let model = |(bytes, flops): (u64, u64)| Modeled::new(&gpu, bytes as f64, flops as f64, math);
    Ok(AttentionTiming {
        dtype: E::DTYPE,
        mask,
        tokens: t,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        visible_pairs: p.visible_pairs,
        tiles_visited: p.layout.lists().visited(),
        tiles: t.div_ceil(tile_rows::<E>()).pow(2),
        forward_ms: forward * 1e3,
        forward_tflops: forward_flops / forward / 1e12,
        backward_ms: backward * 1e3,
        backward_tflops: backward_flops / backward / 1e12,
        forward_model: model(forward_ideal),
        backward_model: model(backward_ideal),
    })
}
