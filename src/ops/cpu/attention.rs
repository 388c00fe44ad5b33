//! Grouped-query attention over a packed token stream, in f64 arithmetic on f32 storage.

use super::linalg::dot;
use crate::ops::{AttentionLayout, AttentionShape};
use rayon::prelude::*;

fn head(x: &[f32], t: usize, h: usize, heads: usize, hd: usize) -> &[f32] {
    let base = (t * heads + h) * hd;
    &x[base..base + hd]
}

pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    layout: &AttentionLayout,
    s: AttentionShape,
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
            let mut scores = vec![0f64; keys.len()];
            for h in 0..hq {
                let kvh = h / group;
                let qh = head(q, t, h, hq, hd);
                for (sc, &key) in scores.iter_mut().zip(&keys) {
                    *sc = scale * dot(qh, head(k, key, kvh, hkv, hd));
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut acc = vec![0f64; hd];
                let mut sum = 0f64;
                for (&sc, &key) in scores.iter().zip(&keys) {
                    let p = (sc - max).exp();
                    sum += p;
                    for (a, &x) in acc.iter_mut().zip(head(v, key, kvh, hkv, hd)) {
                        *a += p * x as f64;
                    }
                }
                for (o, a) in out_t[h * hd..(h + 1) * hd].iter_mut().zip(&acc) {
                    *o = (a / sum) as f32;
                }
                lse_t[h] = (max + sum.ln()) as f32;
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
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
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
                    let p = (scale * dot(qh, kh) - l).exp();
                    let ds = p * (dot(doh, vh) - delta) * scale;
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
