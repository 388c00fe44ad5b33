//! Timing of the attention kernels at given shapes on random inputs made on the device's side
//! of the link (`contralign bench attention`, benches/attention.rs).
//!
//! Work is counted over the (query, key) pairs the mask lets through, per query head:
//! 4 · hd FLOPs each for the forward (two products), 10 · hd for the backward (five), the
//! convention of FlashAttention's papers, so a kernel that computes masked pairs gains nothing.

use super::attention::{tile_rows, AttentionKernels, DeviceLayout};
use super::device::{Buffer, Device, Float};
use super::selftest::packed_layout;
use crate::ops::{AttentionLayout, AttentionShape};
use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

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
                packed_layout(&vec![(prompt, vec![response_len; responses]); groups], None)
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
}

fn random<E: Float>(device: &Device, rng: &mut ChaCha8Rng, n: usize) -> Result<Buffer<E>> {
    let host: Vec<E> = (0..n)
        .map(|_| E::from_f32(rng.gen_range(-2.0..2.0)))
        .collect();
    device.upload(&host)
}

/// The median time of `reps` runs of `run`, each followed by a synchronize, after one
/// warm-up.
fn median_seconds(
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

/// Times the forward and the backward of one case with storage `E`.
pub fn time_attention<E: Float>(
    device: &Device,
    mask: BenchMask,
    tokens: usize,
    shape: AttentionShape,
    reps: usize,
) -> Result<AttentionTiming> {
    let host_layout = mask.layout(tokens);
    let t = host_layout.len();
    let layout = DeviceLayout::new(device, &host_layout, tile_rows::<E>())?;
    let visible_pairs: u64 = (0..t).map(|i| host_layout.keys(i).count() as u64).sum();
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    let (q_len, kv_len) = (
        t * shape.heads * shape.head_dim,
        t * shape.kv_heads * shape.head_dim,
    );
    let q = random::<E>(device, &mut rng, q_len)?;
    let k = random::<E>(device, &mut rng, kv_len)?;
    let v = random::<E>(device, &mut rng, kv_len)?;
    let dout = random::<E>(device, &mut rng, q_len)?;
    let mut out = device.alloc::<E>(q_len)?;
    let mut lse = device.alloc::<f32>(t * shape.heads)?;
    let (mut dq, mut dk, mut dv) = (
        device.alloc::<E>(q_len)?,
        device.alloc::<E>(kv_len)?,
        device.alloc::<E>(kv_len)?,
    );
    let kernels = AttentionKernels::new(device);
    let forward = median_seconds(device, reps, || {
        kernels.forward(&q, &k, &v, &layout, shape, &mut out, &mut lse)
    })?;
    let backward = median_seconds(device, reps, || {
        kernels.backward(
            &q, &k, &v, &out, &lse, &dout, &layout, shape, &mut dq, &mut dk, &mut dv,
        )
    })?;
    let per_pair = (visible_pairs * shape.heads as u64 * shape.head_dim as u64) as f64;
    Ok(AttentionTiming {
        dtype: E::DTYPE,
        mask,
        tokens: t,
        heads: shape.heads,
        kv_heads: shape.kv_heads,
        head_dim: shape.head_dim,
        visible_pairs,
        tiles_visited: layout.lists().visited(),
        tiles: t.div_ceil(tile_rows::<E>()).pow(2),
        forward_ms: forward * 1e3,
        forward_tflops: 4.0 * per_pair / forward / 1e12,
        backward_ms: backward * 1e3,
        backward_tflops: 10.0 * per_pair / backward / 1e12,
    })
}
