//! Dense products with f64 accumulation, parallel over output rows.

use rayon::prelude::*;

const LANES: usize = 8;

/// `a · b` accumulated in f64; eight independent lanes so that it vectorizes.
pub fn dot(a: &[f32], b: &[f32]) -> f64 {
    let mut acc = [0f64; LANES];
    let chunks = a.len() / LANES * LANES;
    for (ca, cb) in a[..chunks]
        .chunks_exact(LANES)
        .zip(b[..chunks].chunks_exact(LANES))
    {
        for l in 0..LANES {
            acc[l] += ca[l] as f64 * cb[l] as f64;
        }
    }
    let mut sum: f64 = acc.iter().sum();
    for (x, y) in a[chunks..].iter().zip(&b[chunks..]) {
        sum += *x as f64 * *y as f64;
    }
    sum
}

/// `acc += s * x`.
pub fn axpy(acc: &mut [f64], s: f64, x: &[f32]) {
    for (a, v) in acc.iter_mut().zip(x) {
        *a += s * *v as f64;
    }
}

/// `y [m, n] = x [m, k] · w [n, k]ᵀ`.
pub fn matmul_nt(x: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k);
    assert_eq!(w.len(), n * k);
    let mut y = vec![0f32; m * n];
    y.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
        let xi = &x[i * k..(i + 1) * k];
        for (j, out) in row.iter_mut().enumerate() {
            *out = dot(xi, &w[j * k..(j + 1) * k]) as f32;
        }
    });
    y
}

/// `dx [m, k] = dy [m, n] · w [n, k]`.
pub fn matmul_nn(dy: &[f32], w: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    let mut dx = vec![0f32; m * k];
    matmul_nn_acc(dy, w, m, k, n, &mut dx);
    dx
}

/// `dx [m, k] += dy [m, n] · w [n, k]`, the sum made in f64 and rounded once.
pub fn matmul_nn_acc(dy: &[f32], w: &[f32], m: usize, k: usize, n: usize, dx: &mut [f32]) {
    assert_eq!(dx.len(), m * k);
    dx.par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(i, row)| {
            let mut acc = vec![0f64; k];
            for (j, &g) in dy[i * n..(i + 1) * n].iter().enumerate() {
                if g != 0.0 {
                    axpy(&mut acc, g as f64, &w[j * k..(j + 1) * k]);
                }
            }
            for (o, a) in row.iter_mut().zip(&acc) {
                *o = (*o as f64 + *a) as f32;
            }
        });
}

/// `dw [n, k] += dy [m, n]ᵀ · x [m, k]`.
pub fn matmul_tn_acc(dy: &[f32], x: &[f32], m: usize, k: usize, n: usize, dw: &mut [f32]) {
    dw.par_chunks_mut(k.max(1))
        .enumerate()
        .for_each(|(j, row)| {
            let mut acc = vec![0f64; k];
            for i in 0..m {
                let g = dy[i * n + j];
                if g != 0.0 {
                    axpy(&mut acc, g as f64, &x[i * k..(i + 1) * k]);
                }
            }
            for (o, a) in row.iter_mut().zip(&acc) {
                *o = (*o as f64 + *a) as f32;
            }
        });
}
