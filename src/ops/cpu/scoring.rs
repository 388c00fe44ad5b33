//! Fused LM head + log-softmax over chunks of rows: logits exist one chunk at a time.

use super::linalg::{dot, matmul_nn, matmul_tn_acc};
use rayon::prelude::*;

/// Rows per chunk: bounds the logits held at once to `CHUNK × V`.
const CHUNK: usize = 256;

/// How the logits and their gradients are stored between the two GEMMs: kept as computed
/// (the reference), or rounded as a device stores its logits chunk (the bf16-rounding mode,
/// docs/numerics.md §1).
pub type Rounding<'a> = &'a (dyn Fn(f64) -> f64 + Sync);

fn row_logits(h: &[f32], head: &[f32], d: usize, vocab: usize, round: Rounding) -> Vec<f64> {
    (0..vocab)
        .map(|v| round(dot(h, &head[v * d..(v + 1) * d])))
        .collect()
}

fn log_sum_exp(z: &[f64]) -> f64 {
    let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    max + z.iter().map(|&x| (x - max).exp()).sum::<f64>().ln()
}

/// Each row's target log-prob and log-sum-exp, the logits as computed (the reference).
pub fn token_logprobs(
    h: &[f32],
    head: &[f32],
    targets: &[u32],
    d: usize,
    vocab: usize,
) -> (Vec<f64>, Vec<f32>) {
    token_logprobs_with(h, head, targets, d, vocab, &|z| z)
}

/// [`token_logprobs`] with the logits stored through `round`.
pub fn token_logprobs_with(
    h: &[f32],
    head: &[f32],
    targets: &[u32],
    d: usize,
    vocab: usize,
    round: Rounding,
) -> (Vec<f64>, Vec<f32>) {
    let pairs: Vec<(f64, f32)> = targets
        .par_iter()
        .enumerate()
        .map(|(i, &y)| {
            let z = row_logits(&h[i * d..(i + 1) * d], head, d, vocab, round);
            let lse = log_sum_exp(&z);
            (z[y as usize] - lse, lse as f32)
        })
        .collect();
    pairs.into_iter().unzip()
}

/// `dh` from `dlogp` per row; accumulates `dhead` (the reference).
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_backward(
    h: &[f32],
    head: &[f32],
    targets: &[u32],
    lse: &[f32],
    dlogp: &[f64],
    d: usize,
    vocab: usize,
    dhead: &mut [f32],
) -> Vec<f32> {
    token_logprobs_backward_with(h, head, targets, lse, dlogp, d, vocab, dhead, &|z| z)
}

/// [`token_logprobs_backward`] with the logits and their gradient stored through `round`.
#[allow(clippy::too_many_arguments)]
pub fn token_logprobs_backward_with(
    h: &[f32],
    head: &[f32],
    targets: &[u32],
    lse: &[f32],
    dlogp: &[f64],
    d: usize,
    vocab: usize,
    dhead: &mut [f32],
    round: Rounding,
) -> Vec<f32> {
    let rows = targets.len();
    let mut dh = vec![0f32; rows * d];
    for start in (0..rows).step_by(CHUNK) {
        let end = (start + CHUNK).min(rows);
        let hc = &h[start * d..end * d];
        let mut dz = vec![0f32; (end - start) * vocab];
        dz.par_chunks_mut(vocab).enumerate().for_each(|(i, dzr)| {
            let r = start + i;
            let z = row_logits(&hc[i * d..(i + 1) * d], head, d, vocab, round);
            let g = dlogp[r];
            let l = lse[r] as f64;
            for (v, o) in dzr.iter_mut().enumerate() {
                let onehot = if v == targets[r] as usize { 1.0 } else { 0.0 };
                *o = round(g * (onehot - (z[v] - l).exp())) as f32;
            }
        });
        let n = end - start;
        dh[start * d..end * d].copy_from_slice(&matmul_nn(&dz, head, n, d, vocab));
        matmul_tn_acc(&dz, hc, n, d, vocab, dhead);
    }
    dh
}
