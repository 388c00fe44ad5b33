//! Grouped-query attention over a packed token stream, in f64 arithmetic on f32 storage.

use super::linalg::dot;
use super::scoring::Rounding;
use crate::ops::{AttentionLayout, AttentionShape};
use rayon::prelude::*;

/// How a device's bf16 attention kernel stores its probabilities before the products with
/// V, K and Q (`cuda/attention.cu`; docs/numerics.md §2), for the CPU's bf16-rounding mode:
/// the forward rounds `exp2(s − m)` with `m` the running maximum over the key tiles of
/// `tile` tokens visited so far (the online softmax), the backward rounds `P` and `P (dP −
/// delta)`. `None`: the reference, nothing rounded.
#[derive(Clone, Copy)]
pub struct ProbabilityRounding<'a> {
    pub tile: usize,
    pub round: Rounding<'a>,
}

fn head(x: &[f32], t: usize, h: usize, heads: usize, hd: usize) -> &[f32] {
    let base = (t * heads + h) * hd;
    &x[base..base + hd]
}

/// Softmax attention of one query head over keys `0..n` (`key(i)` and `value(i)` their
/// heads), scale `scale`: writes the output head and returns the log-sum-exp. The packed and
/// the cached attention share it, so that both compute the same sums in the same order.
#[allow(clippy::too_many_arguments)]
fn attend_head<'a>(
    qh: &[f32],
    n: usize,
    key: impl Fn(usize) -> &'a [f32],
    value: impl Fn(usize) -> &'a [f32],
    scale: f64,
    out: &mut [f32],
    tiles: Option<(&dyn Fn(usize) -> usize, ProbabilityRounding)>,
) -> f32 {
    let scores: Vec<f64> = (0..n).map(|i| scale * dot(qh, key(i))).collect();
    if let Some((tile_of, rounding)) = tiles {
        return attend_head_online(&scores, tile_of, rounding, value, out);
    }
    let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let mut acc = vec![0f64; out.len()];
    let mut sum = 0f64;
    for (i, &sc) in scores.iter().enumerate() {
        let p = (sc - max).exp();
        sum += p;
        for (a, &x) in acc.iter_mut().zip(value(i)) {
            *a += p * x as f64;
        }
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = (a / sum) as f32;
    }
    (max + sum.ln()) as f32
}

/// [`attend_head`] as the device's online softmax with stored probabilities: keys `0..n` in
/// increasing order, grouped by key tile (`tile_of`), in base 2 as the kernel works.
fn attend_head_online<'a>(
    scores: &[f64],
    tile_of: &dyn Fn(usize) -> usize,
    rounding: ProbabilityRounding,
    value: impl Fn(usize) -> &'a [f32],
    out: &mut [f32],
) -> f32 {
    let n = scores.len();
    let s2: Vec<f64> = scores
        .iter()
        .map(|s| s * std::f64::consts::LOG2_E)
        .collect();
    let (mut m, mut l) = (f64::NEG_INFINITY, 0f64);
    let mut acc = vec![0f64; out.len()];
    let mut start = 0;
    while start < n {
        let tile = tile_of(start);
        let end = (start..n).find(|&j| tile_of(j) != tile).unwrap_or(n);
        let m_new = s2[start..end].iter().cloned().fold(m, f64::max);
        let a = (m - m_new).exp2();
        l *= a;
        for x in acc.iter_mut() {
            *x *= a;
        }
        for (j, &sj) in s2[start..end].iter().enumerate() {
            let p = (rounding.round)((sj - m_new).exp2());
            l += p;
            for (x, &vj) in acc.iter_mut().zip(value(start + j)) {
                *x += p * vj as f64;
            }
        }
        m = m_new;
        start = end;
    }
    for (o, x) in out.iter_mut().zip(&acc) {
        *o = if l > 0.0 { (x / l) as f32 } else { 0.0 };
    }
    if l > 0.0 {
        ((m + l.log2()) * std::f64::consts::LN_2) as f32
    } else {
        f32::NEG_INFINITY
    }
}

pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layout: &AttentionLayout,
    s: AttentionShape,
    rounding: Option<ProbabilityRounding>,
) -> (Vec<f32>, Vec<f32>) {
    let (hq, hkv, hd) = (s.heads, s.kv_heads, s.head_dim);
    let group = hq / hkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let t_len = layout.len();
    let mut out = vec![0f32; t_len * hq * hd];
    let mut lse = vec![0f32; t_len * hq];
    out.par_chunks_mut(hq * hd)
        .zip(lse.par_chunks_mut(hq))
        .enumerate()
        .for_each(|(t, (out_t, lse_t))| {
            let keys: Vec<usize> = layout.keys(t).collect();
            let tile_of = |i: usize| keys[i] / rounding.map_or(1, |r| r.tile);
            for h in 0..hq {
                let kvh = h / group;
                lse_t[h] = attend_head(
                    head(q, t, h, hq, hd),
                    keys.len(),
                    |i| head(k, keys[i], kvh, hkv, hd),
                    |i| head(v, keys[i], kvh, hkv, hd),
                    scale,
                    &mut out_t[h * hd..(h + 1) * hd],
                    rounding.map(|r| (&tile_of as &dyn Fn(usize) -> usize, r)),
                );
            }
        });
    (out, lse)
}

/// Attention of query rows `q [R, heads * hd]` over keys and values held elsewhere (a KV
/// cache): row `r` attends to every row of `kv[r] = (keys, values)`, each
/// `[n_r, kv_heads * hd]`. Returns `(out [R, heads * hd], lse [R, heads])`, as [`attention`].
pub fn attention_over(
    q: &[f32],
    kv: &[(&[f32], &[f32])],
    s: AttentionShape,
) -> (Vec<f32>, Vec<f32>) {
    let (hq, hkv, hd) = (s.heads, s.kv_heads, s.head_dim);
    let group = hq / hkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let mut out = vec![0f32; kv.len() * hq * hd];
    let mut lse = vec![0f32; kv.len() * hq];
    out.par_chunks_mut(hq * hd)
        .zip(lse.par_chunks_mut(hq))
        .zip(kv)
        .enumerate()
        .for_each(|(r, ((out_r, lse_r), &(k, v)))| {
            let n = k.len() / (hkv * hd);
            for h in 0..hq {
                let kvh = h / group;
                lse_r[h] = attend_head(
                    head(q, r, h, hq, hd),
                    n,
                    |i| head(k, i, kvh, hkv, hd),
                    |i| head(v, i, kvh, hkv, hd),
                    scale,
                    &mut out_r[h * hd..(h + 1) * hd],
                    None,
                );
            }
        });
    (out, lse)
}

#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: &[f32],
    lse: &[f32],
    dout: &[f32],
    layout: &AttentionLayout,
    s: AttentionShape,
    rounding: Option<ProbabilityRounding>,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let round = |x: f64| rounding.map_or(x, |r| (r.round)(x));
    let (hq, hkv, hd) = (s.heads, s.kv_heads, s.head_dim);
    let group = hq / hkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let t_len = layout.len();
    // One pass per query head, each with its own key/value gradient, summed per KV head.
    let per_head: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> = (0..hq)
        .into_par_iter()
        .map(|h| {
            let kvh = h / group;
            let mut dq = vec![0f64; t_len * hd];
            let mut dk = vec![0f64; t_len * hd];
            let mut dv = vec![0f64; t_len * hd];
            for t in 0..t_len {
                let qh = head(q, t, h, hq, hd);
                let doh = head(dout, t, h, hq, hd);
                let delta = dot(doh, head(out, t, h, hq, hd));
                let l = lse[t * hq + h] as f64;
                for key in layout.keys(t) {
                    let kh = head(k, key, kvh, hkv, hd);
                    let vh = head(v, key, kvh, hkv, hd);
                    let p = round((scale * dot(qh, kh) - l).exp());
                    let ds = round(p * (dot(doh, vh) - delta)) * scale;
                    for j in 0..hd {
                        dq[t * hd + j] += ds * kh[j] as f64;
                        dk[key * hd + j] += ds * qh[j] as f64;
                        dv[key * hd + j] += p * doh[j] as f64;
                    }
                }
            }
            (dq, dk, dv)
        })
        .collect();
    let mut dq = vec![0f32; t_len * hq * hd];
    let mut dk = vec![0f32; t_len * hkv * hd];
    let mut dv = vec![0f32; t_len * hkv * hd];
    let mut dk_acc = vec![0f64; t_len * hkv * hd];
    let mut dv_acc = vec![0f64; t_len * hkv * hd];
    for (h, (dqh, dkh, dvh)) in per_head.iter().enumerate() {
        let kvh = h / group;
        for t in 0..t_len {
            for j in 0..hd {
                dq[(t * hq + h) * hd + j] = dqh[t * hd + j] as f32;
                dk_acc[(t * hkv + kvh) * hd + j] += dkh[t * hd + j];
                dv_acc[(t * hkv + kvh) * hd + j] += dvh[t * hd + j];
            }
        }
    }
    for (o, a) in dk.iter_mut().zip(&dk_acc) {
        *o = *a as f32;
    }
    for (o, a) in dv.iter_mut().zip(&dv_acc) {
        *o = *a as f32;
    }
    (dq, dk, dv)
}
