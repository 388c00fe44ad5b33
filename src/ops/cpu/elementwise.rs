//! Row-wise and element-wise ops: RMSNorm, RoPE, SwiGLU, row gathers and scatters.

use crate::ops::RowScale;
use rayon::prelude::*;

pub fn rmsnorm(x: &[f32], w: &[f32], d: usize, eps: f64) -> Vec<f32> {
    let mut y = vec![0f32; x.len()];
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(yr, xr)| {
            let rstd = inv_rms(xr, eps);
            for ((o, &v), &g) in yr.iter_mut().zip(xr).zip(w) {
                *o = (g as f64 * (v as f64 * rstd)) as f32;
            }
        });
    y
}

fn inv_rms(row: &[f32], eps: f64) -> f64 {
    let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / row.len() as f64;
    1.0 / (ms + eps).sqrt()
}

/// `dx_j = r (w_j dy_j - x_j r² mean_i(w_i dy_i x_i))`, `dw_j += dy_j x_j r`.
pub fn rmsnorm_backward(
    x: &[f32],
    w: &[f32],
    dy: &[f32],
    d: usize,
    eps: f64,
    dw: &mut [f32],
) -> Vec<f32> {
    let rows = x.len() / d;
    let mut dx = vec![0f32; x.len()];
    let partial_dw: Vec<Vec<f64>> = dx
        .par_chunks_mut(d)
        .enumerate()
        .fold(
            || vec![0f64; d],
            |mut acc, (t, dxr)| {
                let xr = &x[t * d..(t + 1) * d];
                let gr = &dy[t * d..(t + 1) * d];
                let r = inv_rms(xr, eps);
                let mut proj = 0f64;
                for j in 0..d {
                    proj += w[j] as f64 * gr[j] as f64 * xr[j] as f64;
                    acc[j] += gr[j] as f64 * xr[j] as f64 * r;
                }
                let c = r * r * proj / d as f64;
                for j in 0..d {
                    dxr[j] = (r * (w[j] as f64 * gr[j] as f64 - xr[j] as f64 * c)) as f32;
                }
                acc
            },
        )
        .collect();
    assert!(rows == 0 || !partial_dw.is_empty());
    for j in 0..d {
        let total: f64 = partial_dw.iter().map(|p| p[j]).sum();
        dw[j] = (dw[j] as f64 + total) as f32;
    }
    dx
}

/// Half-split RoPE in place; `inverse` applies the opposite rotation.
pub fn rope(x: &mut [f32], positions: &[u32], heads: usize, hd: usize, theta: f64, inverse: bool) {
    let half = hd / 2;
    let inv_freq: Vec<f64> = (0..half)
        .map(|j| 1.0 / theta.powf((2 * j) as f64 / hd as f64))
        .collect();
    let sign = if inverse { -1.0 } else { 1.0 };
    x.par_chunks_mut(heads * hd)
        .zip(positions.par_iter())
        .for_each(|(row, &pos)| {
            for head in row.chunks_mut(hd) {
                for j in 0..half {
                    let angle = pos as f64 * inv_freq[j];
                    let (sin, cos) = (sign * angle.sin(), angle.cos());
                    let (a, b) = (head[j] as f64, head[j + half] as f64);
                    head[j] = (a * cos - b * sin) as f32;
                    head[j + half] = (b * cos + a * sin) as f32;
                }
            }
        });
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

pub fn swiglu(gate: &[f32], up: &[f32]) -> Vec<f32> {
    gate.par_iter()
        .zip(up.par_iter())
        .map(|(&g, &u)| {
            let g = g as f64;
            (g * sigmoid(g) * u as f64) as f32
        })
        .collect()
}

pub fn swiglu_backward(gate: &[f32], up: &[f32], dy: &[f32]) -> (Vec<f32>, Vec<f32>) {
    gate.par_iter()
        .zip(up.par_iter())
        .zip(dy.par_iter())
        .map(|((&g, &u), &dy)| {
            let (g, u, dy) = (g as f64, u as f64, dy as f64);
            let s = sigmoid(g);
            let dgate = dy * u * s * (1.0 + g * (1.0 - s));
            let dup = dy * g * s;
            (dgate as f32, dup as f32)
        })
        .unzip()
}

pub fn gather_rows(x: &[f32], rows: &[u32], scale: RowScale, d: usize) -> Vec<f32> {
    let mut out = vec![0f32; rows.len() * d];
    out.par_chunks_mut(d).enumerate().for_each(|(i, o)| {
        let r = rows[i] as usize;
        let s = scale.map_or(1.0, |s| s[i]);
        for (dst, &v) in o.iter_mut().zip(&x[r * d..(r + 1) * d]) {
            *dst = s * v;
        }
    });
    out
}

/// Sequential on purpose: rows may repeat, and the order of additions stays fixed.
pub fn scatter_add_rows(dst: &mut [f32], src: &[f32], rows: &[u32], scale: RowScale, d: usize) {
    for (i, &r) in rows.iter().enumerate() {
        let s = scale.map_or(1.0, |s| s[i]);
        let r = r as usize;
        for (o, &v) in dst[r * d..(r + 1) * d]
            .iter_mut()
            .zip(&src[i * d..(i + 1) * d])
        {
            *o += s * v;
        }
    }
}
