//! Every kernel of `cuda/*.cu`, run through the device layer on fresh random inputs of awkward
//! sizes and compared with the CPU reference (`contralign selftest`, and the kernel tests).
//!
//! Each comparison is a [`Row`]: the largest error, the largest error relative to the
//! magnitude it is measured against, and the bound that relative error must stay within. The
//! bounds come from the precision of the computation (fp32 roundings, reduction lengths, one
//! bf16 rounding of the output), never from what a run happened to give:
//!
//! - `u = 2^-24`, the unit roundoff of fp32. A sum of `k` terms in a fixed order errs by at
//!   most `k u` relative to the sum of the terms' magnitudes. A kernel's reduction is each
//!   thread's terms in turn, then a tree over the block's threads (`ceil(log2 block)` levels).
//! - bf16 outputs add one rounding to 8 significant bits: at most `2^-8` relative to the
//!   value, so `2^-8 + (1 + 2^-8) b` for an fp32 bound `b`.
//! - A GEMM accumulates `k` products in some order cuBLAS chooses: `k u` relative to
//!   `Σ|a||b|`, doubled for bf16 inputs, whose tensor-core accumulation may truncate instead
//!   of rounding (Fasi et al., "Numerical behavior of NVIDIA tensor cores", 2021), plus the
//!   two roundings of `alpha · acc + beta · c`.
//! - Ops that only move or convert values (embedding, casts) and AdamW on f32 (the CPU's
//!   arithmetic operation for operation) must match bit for bit: bound 0.

pub mod adamw_stores;
pub mod loss;
pub mod moe;
pub mod moe_gemm;

use crate::ops::cpu::CpuOps;
use crate::ops::cuda::attention::{tile_rows, AttentionKernels, DeviceLayout};
use crate::ops::cuda::device::{AsView, Buffer, Device, Float, View};
use crate::ops::cuda::embedding::IdRows;
use crate::ops::cuda::emu::{KernelArgs, LaunchConfig};
use crate::ops::cuda::fresh::GradWrite;
use crate::ops::cuda::gemm::{element, Gemm, Op};
use crate::ops::cuda::kernels::{chunk, AdamWStep, Kernels};
use crate::ops::cuda::lists::Uploads;
use crate::ops::cuda::pool::Pool;
use crate::ops::optimizer::{global_norm, AdamW, AdamWConfig};
use crate::ops::{AttentionLayout, AttentionShape, Ops};
use anyhow::Result;
use half::bf16;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub mod scoring;

/// The unit roundoff of fp32.
const U: f64 = f32::EPSILON as f64 / 2.0;
/// One rounding to bf16, relative to the value.
const BF16_ROUNDING: f64 = 1.0 / 256.0;

/// One comparison of a kernel's output with the reference.
#[derive(Clone, Debug)]
pub struct Row {
    pub op: String,
    pub shape: String,
    /// max |got - want|.
    pub max_abs: f64,
    /// max |got - want| / scale, where scale is the magnitude the error is measured against
    /// (at least |want|).
    pub max_rel: f64,
    /// The largest allowed `max_rel`.
    pub bound: f64,
    pub pass: bool,
}

/// Compares `got` with `want` elementwise: |got - want| <= bound * scale (NaN matches NaN).
fn compare<T: Copy + Into<f64>>(
    op: String,
    shape: String,
    got: &[T],
    want: &[T],
    scale: &[T],
    bound: f64,
) -> Row {
    assert_eq!(got.len(), want.len());
    let (mut max_abs, mut max_rel, mut pass) = (0f64, 0f64, true);
    for ((&g, &w), &s) in got.iter().zip(want).zip(scale) {
        let (g, w, s): (f64, f64, f64) = (g.into(), w.into(), s.into());
        if g.is_nan() && w.is_nan() {
            continue;
        }
        // Equal infinities are no error.
        let err = if g == w { 0.0 } else { (g - w).abs() };
        let s = s.max(w.abs());
        let rel = if err == 0.0 { 0.0 } else { err / s };
        // NaN errors fail: the comparisons below are false for them.
        pass &= err <= bound * s || err == 0.0;
        max_abs = if err.is_nan() {
            f64::NAN
        } else {
            max_abs.max(err)
        };
        max_rel = if rel.is_nan() {
            f64::NAN
        } else {
            max_rel.max(rel)
        };
    }
    Row {
        op,
        shape,
        max_abs,
        max_rel,
        bound,
        pass,
    }
}

/// The magnitudes of the values themselves.
fn magnitudes(x: &[f32]) -> Vec<f32> {
    x.iter().map(|v| v.abs()).collect()
}

/// The bound of an output stored as `E`, from the bound of its fp32 computation.
fn stored<E: Float>(fp32_bound: f64) -> f64 {
    if E::DTYPE == "bf16" {
        BF16_ROUNDING + (1.0 + BF16_ROUNDING) * fp32_bound
    } else {
        fp32_bound
    }
}

/// Levels of a tree reduction over `n` values.
fn tree_levels(n: usize) -> f64 {
    (n.max(1) as f64).log2().ceil()
}

fn random(rng: &mut StdRng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.gen_range(-scale..scale)).collect()
}

/// `x` rounded to `E` and back: what the reference sees of an input stored as `E`.
fn rounded<E: Float>(x: &[f32]) -> Vec<f32> {
    x.iter().map(|&v| E::from_f32(v).to_f32()).collect()
}

fn upload<E: Float>(device: &Device, x: &[f32]) -> Result<Buffer<E>> {
    device.upload(&x.iter().map(|&v| E::from_f32(v)).collect::<Vec<E>>())
}

fn download<E: Float>(device: &Device, buffer: &impl AsView<E>) -> Result<Vec<f32>> {
    Ok(device
        .download(buffer)?
        .into_iter()
        .map(E::to_f32)
        .collect())
}

fn name<E: Float>(op: &str) -> String {
    format!("{op} {}", E::DTYPE)
}

/// SwiGLU forward and backward on `n` elements; the backward that also writes the forward's
/// output gives the forward's bits and its own.
pub fn swiglu<E: Float>(k: &Kernels, rng: &mut StdRng, n: usize) -> Result<Vec<Row>> {
    let dev = k.device;
    let gate = rounded::<E>(&random(rng, n, 8.0));
    let up = rounded::<E>(&random(rng, n, 3.0));
    let dy = rounded::<E>(&random(rng, n, 2.0));
    let (g, u, d) = (
        upload::<E>(dev, &gate)?,
        upload::<E>(dev, &up)?,
        upload::<E>(dev, &dy)?,
    );
    let mut out = dev.alloc::<E>(n)?;
    k.swiglu_forward(&g, &u, &mut out)?;
    let (mut dg, mut du) = (dev.alloc::<E>(n)?, dev.alloc::<E>(n)?);
    k.swiglu_backward((&g, &u, &d), &mut dg, &mut du, None)?;
    let (mut dg_fused, mut du_fused) = (dev.alloc::<E>(n)?, dev.alloc::<E>(n)?);
    let out_again = dev.alloc::<E>(n)?;
    k.swiglu_backward(
        (&g, &u, &d),
        &mut dg_fused,
        &mut du_fused,
        Some(out_again.view()),
    )?;
    let same_bits = |what: &str, got: &Buffer<E>, want: &Buffer<E>| -> Result<Row> {
        let want = download(dev, want)?;
        Ok(compare(
            name::<E>(what),
            format!("{n}"),
            &download(dev, got)?,
            &want,
            &magnitudes(&want),
            0.0,
        ))
    };
    let fused = [
        same_bits("swiglu_backward+out out", &out_again, &out)?,
        same_bits("swiglu_backward+out dgate", &dg_fused, &dg)?,
        same_bits("swiglu_backward+out dup", &du_fused, &du)?,
    ];
    let shape = format!("{n}");
    // s = 1 / (1 + expf(-g)) carries about 2 u (expf's 2 ulp are damped by the 1 +), which
    // g (1 - s) in dgate multiplies by up to |g| = 8: 16 u, plus a handful of roundings. dgate's
    // terms may cancel, so its error is relative to their magnitudes.
    let bound = stored::<E>(32.0 * U);
    let want = CpuOps.swiglu(&gate, &up);
    let (want_dg, want_du) = CpuOps.swiglu_backward(&gate, &up, &dy);
    let scale_dg: Vec<f32> = (0..n)
        .map(|i| {
            let (g, u, d) = (gate[i] as f64, up[i] as f64, dy[i] as f64);
            let s = 1.0 / (1.0 + (-g).exp());
            ((d * u * s).abs() * (1.0 + g.abs() * (1.0 - s))) as f32
        })
        .collect();
    Ok([
        compare(
            name::<E>("swiglu_forward"),
            shape.clone(),
            &download(dev, &out)?,
            &want,
            &magnitudes(&want),
            bound,
        ),
        compare(
            name::<E>("swiglu_backward dgate"),
            shape.clone(),
            &download(dev, &dg)?,
            &want_dg,
            &scale_dg,
            bound,
        ),
        compare(
            name::<E>("swiglu_backward dup"),
            shape,
            &download(dev, &du)?,
            &want_du,
            &magnitudes(&want_du),
            bound,
        ),
    ]
    .into_iter()
    .chain(fused)
    .collect())
}

/// Embedding forward and backward: `tokens` ids drawn from a vocabulary small enough that
/// they repeat. Both must match the CPU bit for bit (the backward adds in the same order).
pub fn embedding<E: Float>(
    k: &Kernels,
    rng: &mut StdRng,
    tokens: usize,
    vocab: usize,
    d: usize,
) -> Result<Vec<Row>> {
    let dev = k.device;
    let table = rounded::<E>(&random(rng, vocab * d, 1.0));
    let ids: Vec<u32> = (0..tokens)
        .map(|_| rng.gen_range(0..vocab as u32))
        .collect();
    let dout = rounded::<E>(&random(rng, tokens * d, 1.0));
    let dtable0 = random(rng, vocab * d, 1.0);
    let ids_buf = dev.upload(&ids)?;
    let mut out = dev.alloc::<E>(tokens * d)?;
    k.embedding_forward(&upload::<E>(dev, &table)?, &ids_buf, &mut out, d)?;
    let pool = Pool::default();
    let rows = IdRows::new(&ids).on_device(&Uploads {
        device: dev,
        pool: &pool,
    })?;
    let dout_buf = upload::<E>(dev, &dout)?;
    let mut dtable = dev.upload(&dtable0)?;
    k.embedding_backward(&dout_buf, &rows, &mut dtable, d)?;
    // Into a bf16 table: the f32 sum in token order, rounded once.
    let dtable0_bf16 = rounded::<bf16>(&dtable0);
    let mut dtable_bf16 = upload::<bf16>(dev, &dtable0_bf16)?;
    k.embedding_backward(&dout_buf, &rows, &mut dtable_bf16, d)?;
    let want = CpuOps.embedding(&table, &ids, d);
    let mut want_dtable = dtable0;
    CpuOps.embedding_backward(&mut want_dtable, &dout, &ids, d);
    let mut want_bf16 = dtable0_bf16;
    CpuOps.embedding_backward(&mut want_bf16, &dout, &ids, d);
    let want_bf16 = rounded::<bf16>(&want_bf16);
    let shape = format!("{tokens} ids of {vocab}x{d}");
    Ok(vec![
        compare(
            name::<E>("embedding_forward"),
            shape.clone(),
            &download(dev, &out)?,
            &want,
            &magnitudes(&want),
            0.0,
        ),
        compare(
            name::<E>("embedding_backward"),
            shape.clone(),
            &dev.download(&dtable)?,
            &want_dtable,
            &magnitudes(&want_dtable),
            0.0,
        ),
        compare(
            format!("{} into bf16", name::<E>("embedding_backward")),
            shape,
            &download(dev, &dtable_bf16)?,
            &want_bf16,
            &magnitudes(&want_bf16),
            0.0,
        ),
    ])
}

/// 1 / rms of each row of `h`, in f64.
fn inv_rms(h: &[f32], d: usize, eps: f64) -> Vec<f64> {
    h.chunks(d)
        .map(|row| {
            let ms = row.iter().map(|&v| v as f64 * v as f64).sum::<f64>() / d as f64;
            1.0 / (ms + eps).sqrt()
        })
        .collect()
}

/// The most terms one thread of an RMSNorm block sums over a row of `d`: its chunks of one
/// 16-byte access each (cuda/rmsnorm.cu), `block` threads apart; the backward's chunks of 4
/// elements make no more.
pub fn rmsnorm_thread_terms<E>(d: usize, block: usize) -> usize {
    let chunk = chunk::<E>();
    d.div_ceil(chunk).div_ceil(block) * chunk
}

/// RMSNorm with the residual add, forward (y, h, rstd) and backward (dh with a residual
/// gradient, dw accumulated, 1/rms taken again from h), on `rows` rows of `d`.
pub fn rmsnorm<E: Float>(k: &Kernels, rng: &mut StdRng, rows: usize, d: usize) -> Result<Vec<Row>> {
    let dev = k.device;
    let eps = 1e-5f32;
    let n = rows * d;
    let x = rounded::<E>(&random(rng, n, 2.0));
    let res = rounded::<E>(&random(rng, n, 2.0));
    let w = rounded::<E>(&random(rng, d, 1.5));
    let dy = rounded::<E>(&random(rng, n, 1.0));
    let dh_in = rounded::<E>(&random(rng, n, 0.5));
    let dw0 = random(rng, d, 1.0);

    let (x_b, res_b, w_b) = (
        upload::<E>(dev, &x)?,
        upload::<E>(dev, &res)?,
        upload::<E>(dev, &w)?,
    );
    let (h_b, mut y_b, mut rstd_b) = (dev.alloc::<E>(n)?, dev.alloc::<E>(n)?, dev.alloc(rows)?);
    k.rmsnorm_forward(
        &x_b,
        Some(res_b.view()),
        &w_b,
        Some(h_b.view()),
        &mut y_b,
        &mut rstd_b,
        eps,
    )?;
    // dw added into (dw0), then written over a fresh gradient (NaNs, not to be read).
    let (mut dh_b, mut dw_b) = (dev.alloc::<E>(n)?, dev.upload(&dw0)?);
    let mut dw_fresh_b = dev.upload(&vec![f32::NAN; d])?;
    let (dy_b, dh_in_b) = (upload::<E>(dev, &dy)?, upload::<E>(dev, &dh_in)?);
    for dw in [
        (&mut dw_b, GradWrite::Accumulate),
        (&mut dw_fresh_b, GradWrite::Overwrite),
    ] {
        let dh_in = Some(dh_in_b.view());
        k.rmsnorm_backward(&h_b, &w_b, &dy_b, dh_in, &mut dh_b, dw, eps)?;
    }
    // The same into bf16 gradients (`--grads bf16`): summed in fp32, rounded once.
    let dw0_bf16 = rounded::<bf16>(&dw0);
    let mut dw_bf16_b = upload::<bf16>(dev, &dw0_bf16)?;
    let mut dw_fresh_bf16_b = upload::<bf16>(dev, &vec![f32::NAN; d])?;
    for dw in [
        (&mut dw_bf16_b, GradWrite::Accumulate),
        (&mut dw_fresh_bf16_b, GradWrite::Overwrite),
    ] {
        let dh_in = Some(dh_in_b.view());
        k.rmsnorm_backward(&h_b, &w_b, &dy_b, dh_in, &mut dh_b, dw, eps)?;
    }

    // h = x + residual in fp32, stored as E: exact.
    let h: Vec<f32> = rounded::<E>(&x.iter().zip(&res).map(|(a, b)| a + b).collect::<Vec<_>>());
    let r = inv_rms(&h, d, eps as f64);
    let want_y = CpuOps.rmsnorm(&h, &w, d, eps as f64);
    let mut want_dw = dw0.clone();
    let mut want_dh = CpuOps.rmsnorm_backward(&h, &w, &dy, None, d, eps as f64, &mut want_dw);
    let mut want_dw_fresh = vec![0.0; d];
    CpuOps.rmsnorm_backward(&h, &w, &dy, None, d, eps as f64, &mut want_dw_fresh);
    let mut want_dw_bf16 = dw0_bf16.clone();
    CpuOps.rmsnorm_backward(&h, &w, &dy, None, d, eps as f64, &mut want_dw_bf16);
    for (g, a) in want_dh.iter_mut().zip(&dh_in) {
        *g = (*g as f64 + *a as f64) as f32;
    }

    // The sum of squares: each thread's terms (rmsnorm_thread_terms), then the block's
    // tree; then / d + eps (2 roundings) and rsqrtf (2 ulp on a GPU): 1/rms within
    // (k/2 + 6) u, and y two roundings more.
    let block = k.block as usize;
    let k_sum = rmsnorm_thread_terms::<E>(d, block) as f64 + tree_levels(block);
    let rstd_bound = (k_sum / 2.0 + 6.0) * U;
    // dh = r (w dy - h r² P / d) + dh_in: the projection P sums like the squares, with three
    // roundings per term; r enters cubed; a few roundings around.
    let dh_bound = stored::<E>(rstd_bound * 3.0 + (k_sum + 10.0) * U);
    let scale_dh: Vec<f32> = (0..n)
        .map(|i| {
            let (t, j) = (i / d, i % d);
            let row = t * d..(t + 1) * d;
            let proj: f64 = row
                .map(|m| (w[m - t * d] as f64 * dy[m] as f64 * h[m] as f64).abs())
                .sum();
            let rt = r[t];
            (rt * ((w[j] as f64 * dy[i] as f64).abs()
                + (h[i] as f64).abs() * rt * rt * proj / d as f64)
                + (dh_in[i] as f64).abs()) as f32
        })
        .collect();
    // dw_j: each block sums its rows in turn (ceil(rows / grid) terms, 3 roundings each with
    // rstd's error), then the blocks' partials in order, then into dw.
    let grid = k.rmsnorm_dw_parts(rows);
    let dw_bound = (rows.div_ceil(grid) + grid + 4) as f64 * U + rstd_bound;
    let terms_dw: Vec<f64> = (0..d)
        .map(|j| {
            (0..rows)
                .map(|t| (dy[t * d + j] as f64 * h[t * d + j] as f64 * r[t]).abs())
                .sum()
        })
        .collect();
    let scale_dw: Vec<f32> = (0..d)
        .map(|j| (terms_dw[j] + dw0[j].abs() as f64) as f32)
        .collect();
    let scale_dw_fresh: Vec<f32> = terms_dw.iter().map(|&t| t as f32).collect();
    let rstd_want: Vec<f32> = r.iter().map(|&v| v as f32).collect();
    let shape = format!("{rows}x{d}");
    let mut checks = vec![
        compare(
            name::<E>("rmsnorm_forward h"),
            shape.clone(),
            &download(dev, &h_b)?,
            &h,
            &magnitudes(&h),
            0.0,
        ),
        compare(
            name::<E>("rmsnorm_forward rstd"),
            shape.clone(),
            &dev.download(&rstd_b)?,
            &rstd_want,
            &magnitudes(&rstd_want),
            rstd_bound,
        ),
        compare(
            name::<E>("rmsnorm_forward y"),
            shape.clone(),
            &download(dev, &y_b)?,
            &want_y,
            &magnitudes(&want_y),
            stored::<E>(rstd_bound + 2.0 * U),
        ),
        compare(
            name::<E>("rmsnorm_backward dh"),
            shape.clone(),
            &download(dev, &dh_b)?,
            &want_dh,
            &scale_dh,
            dh_bound,
        ),
    ];
    // dw added into its start and written over a fresh gradient, into f32 and bf16 stores.
    let dw_rows = [
        ("dw", download(dev, &dw_b)?, &want_dw, &scale_dw, dw_bound),
        (
            "dw fresh",
            download(dev, &dw_fresh_b)?,
            &want_dw_fresh,
            &scale_dw_fresh,
            dw_bound,
        ),
        (
            "dw:bf16",
            download(dev, &dw_bf16_b)?,
            &want_dw_bf16,
            &scale_dw,
            stored::<bf16>(dw_bound),
        ),
        (
            "dw:bf16 fresh",
            download(dev, &dw_fresh_bf16_b)?,
            &want_dw_fresh,
            &scale_dw_fresh,
            stored::<bf16>(dw_bound),
        ),
    ];
    for (what, got, want, scale, bound) in dw_rows {
        let op = name::<E>(&format!("rmsnorm_backward {what}"));
        checks.push(compare(op, shape.clone(), &got, want, scale, bound));
    }
    Ok(checks)
}

/// RoPE forward and backward (the inverse rotation) at random positions up to 10^5.
pub fn rope<E: Float>(
    k: &Kernels,
    rng: &mut StdRng,
    tokens: usize,
    heads: usize,
    head_dim: usize,
) -> Result<Vec<Row>> {
    let dev = k.device;
    let theta = 1e6;
    let x = rounded::<E>(&random(rng, tokens * heads * head_dim, 2.0));
    let positions: Vec<u32> = (0..tokens).map(|_| rng.gen_range(0..100_000)).collect();
    let pos_b = dev.upload(&positions)?;
    // The magnitude of each element's pair (a, b), which its rotation's error is relative to.
    let half = head_dim / 2;
    let pair_scale = |v: &[f32]| -> Vec<f32> {
        (0..v.len())
            .map(|i| {
                let j = i % head_dim;
                let base = i - j;
                if j < half {
                    v[i].abs() + v[base + j + half].abs()
                } else if j < 2 * half {
                    v[i].abs() + v[base + j - half].abs()
                } else {
                    v[i].abs()
                }
            })
            .collect()
    };
    // cos and sin rounded to fp32 (u each), two products and a sum: 4 u of |a| + |b|.
    let bound = stored::<E>(4.0 * U);
    let shape = format!("{tokens}x{heads}x{head_dim}");
    let mut rows = Vec::new();
    for inverse in [false, true] {
        let mut buf = upload::<E>(dev, &x)?;
        k.rope(&mut buf, &pos_b, heads, head_dim, theta, inverse)?;
        let mut want = x.clone();
        CpuOps.rope(&mut want, &positions, heads, head_dim, theta, inverse);
        let op = if inverse {
            "rope_backward"
        } else {
            "rope_forward"
        };
        rows.push(compare(
            name::<E>(op),
            shape.clone(),
            &download(dev, &buf)?,
            &want,
            &pair_scale(&x),
            bound,
        ));
    }
    Ok(rows)
}

/// Both casts on `n` random values plus the edge cases of rounding to bf16: ties, values that
/// round up into the next binade or to infinity, subnormals, infinities, NaN. Exact.
pub fn casts(k: &Kernels, rng: &mut StdRng, n: usize) -> Result<Vec<Row>> {
    let dev = k.device;
    let mut x: Vec<f32> = (0..n).map(|_| f32::from_bits(rng.gen::<u32>())).collect();
    x.extend([
        0.0,
        -0.0,
        1.0 + f32::EPSILON * 32768.0,       // a tie, rounds down to even
        1.0 + f32::EPSILON * 3.0 * 32768.0, // a tie, rounds up to even
        1.9999999,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::from_bits(1),
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::NAN,
    ]);
    let mut out = dev.alloc::<bf16>(x.len())?;
    k.cast_to_bf16(&dev.upload(&x)?, &mut out)?;
    let got: Vec<f32> = dev.download(&out)?.into_iter().map(bf16::to_f32).collect();
    let want: Vec<f32> = x.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    let every: Vec<bf16> = (0..=u16::MAX).map(bf16::from_bits).collect();
    let mut back = dev.alloc::<f32>(every.len())?;
    k.cast_to_f32(&dev.upload(&every)?, &mut back)?;
    let want_back: Vec<f32> = every.iter().map(|v| v.to_f32()).collect();
    Ok(vec![
        compare(
            "cast f32->bf16".into(),
            format!("{}", x.len()),
            &got,
            &want,
            &magnitudes(&want),
            0.0,
        ),
        compare(
            "cast bf16->f32".into(),
            "every bf16".into(),
            &dev.download(&back)?,
            &want_back,
            &magnitudes(&want_back),
            0.0,
        ),
    ])
}

/// The global norm of buffers of the given lengths stored as `E`, then clipping to a third of
/// it.
pub fn grad_norm<E: Float>(k: &Kernels, rng: &mut StdRng, lens: &[usize]) -> Result<Vec<Row>> {
    let dev = k.device;
    let grads: Vec<Vec<f32>> = lens
        .iter()
        .map(|&n| {
            let scale = 10f32.powi(rng.gen_range(-3..3));
            rounded::<E>(&random(rng, n, scale))
        })
        .collect();
    // Every other buffer one element in, not 16-byte aligned: the kernels take it element by
    // element, the others in 16-byte packs.
    let bufs: Vec<Buffer<E>> = grads
        .iter()
        .enumerate()
        .map(|(i, g)| upload::<E>(dev, &[&vec![0.0; i % 2][..], g].concat()))
        .collect::<Result<_>>()?;
    let views: Vec<View<E>> = bufs
        .iter()
        .zip(lens)
        .enumerate()
        .map(|(i, (b, &n))| b.view().slice(i % 2, n))
        .collect::<Result<_>>()?;
    let want_norm = global_norm(&grads.iter().collect::<Vec<_>>());
    let max_norm = (want_norm / 3.0) as f32;
    let ws = k.grad_norm_workspace(&views)?;
    let got = dev.download(&k.grad_norm(&ws, max_norm)?)?;
    k.clip(&ws)?;

    // Each thread's squares over every buffer (at most ceil(len / P / threads) packs of P and
    // one element past them each), the block's tree; then one block adds the partials
    // (ceil(parts / block) each, a tree); sqrt halves it. A bf16 gradient is exact in fp32, so
    // its norm has the fp32 bound.
    let block = k.block as usize;
    let longest = lens.iter().copied().max().unwrap_or(0);
    let pack = chunk::<E>();
    let parts = longest
        .div_ceil(pack)
        .div_ceil(block)
        .clamp(1, 1024.min(k.max_grid as usize));
    let per_thread: usize = lens
        .iter()
        .map(|&n| n.div_ceil(pack).div_ceil(parts * block) * pack + 1)
        .sum();
    let k_sum = (per_thread + parts.div_ceil(block) + 1) as f64 + 2.0 * tree_levels(block);
    let norm_bound = k_sum / 2.0 * U + 2.0 * U;
    // coef = max_norm / (norm + 1e-6): the norm's error and two roundings; one more for the
    // product, and the product's rounding to its store.
    let coef_want = max_norm as f64 / (want_norm + 1e-6);
    let clip_bound = stored::<E>(norm_bound + 4.0 * U);
    let mut clipped_got = Vec::new();
    let mut clipped_want = Vec::new();
    for (view, g) in views.iter().zip(&grads) {
        clipped_got.extend(download(dev, view)?);
        clipped_want.extend(g.iter().map(|&v| (v as f64 * coef_want) as f32));
    }
    let shape = format!(
        "{} buffers, {} values",
        lens.len(),
        lens.iter().sum::<usize>()
    );
    Ok(vec![
        compare(
            name::<E>("grad_norm"),
            shape.clone(),
            &got[..1],
            &[want_norm as f32],
            &[want_norm as f32],
            norm_bound,
        ),
        compare(
            name::<E>("grad_clip"),
            shape,
            &clipped_got,
            &clipped_want,
            &magnitudes(&clipped_want),
            clip_bound,
        ),
    ])
}

/// Random AdamW state at step `step - 1` of `n` elements, and the CPU's update of it.
#[derive(Clone)]
struct AdamWCase {
    config: AdamWConfig,
    lr: f64,
    step: u64,
    param: Vec<f32>,
    grad: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
}

impl AdamWCase {
    fn random(rng: &mut StdRng, n: usize, param_of: impl Fn(f32) -> f32) -> AdamWCase {
        let grad = random(rng, n, 1e-2);
        AdamWCase {
            config: AdamWConfig {
                betas: (0.9, 0.95),
                eps: 1e-8,
                weight_decay: 0.1,
            },
            lr: 1e-3,
            step: rng.gen_range(1..20),
            param: random(rng, n, 1.0).into_iter().map(param_of).collect(),
            m: random(rng, n, 1e-2),
            v: grad
                .iter()
                .map(|g| g * g * rng.gen_range(0.0..4.0))
                .collect(),
            grad,
        }
    }

    /// The CPU's (param, m, v) after the step.
    fn reference(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let mut opt = AdamW::new(self.config.clone(), &[self.param.len()]);
        opt.step = self.step - 1;
        opt.exp_avg[0] = self.m.clone();
        opt.exp_avg_sq[0] = self.v.clone();
        let mut param = self.param.clone();
        opt.update(&mut [&mut param], &[&self.grad], self.lr);
        (param, opt.exp_avg.remove(0), opt.exp_avg_sq.remove(0))
    }

    fn step(&self, seed: u64) -> AdamWStep {
        AdamWStep::new(&self.config, self.step, self.lr, seed)
    }
}

/// AdamW on f32, and on bf16 through an fp32 master copy: bit for bit the CPU's.
pub fn adamw_exact(k: &Kernels, rng: &mut StdRng, n: usize) -> Result<Vec<Row>> {
    let dev = k.device;
    let case = AdamWCase::random(rng, n, |p| p);
    let (want_p, want_m, want_v) = case.reference();
    let shape = format!("{n}");
    let mut rows = Vec::new();
    let mut exact = |op: &str, got: &[f32], want: &[f32]| {
        rows.push(compare(
            op.into(),
            shape.clone(),
            got,
            want,
            &magnitudes(want),
            0.0,
        ));
    };

    let (mut p, mut m, mut v) = (
        dev.upload(&case.param)?,
        dev.upload(&case.m)?,
        dev.upload(&case.v)?,
    );
    k.adamw_f32(
        &mut p,
        &dev.upload(&case.grad)?,
        &mut m,
        &mut v,
        None,
        &case.step(0),
    )?;
    exact("adamw f32 param", &dev.download(&p)?, &want_p);
    exact(
        "adamw f32 moments",
        &[dev.download(&m)?, dev.download(&v)?].concat(),
        &[want_m.clone(), want_v.clone()].concat(),
    );

    let mut param = dev.alloc::<bf16>(n)?;
    let (master, mut m, mut v) = (
        dev.upload(&case.param)?,
        dev.upload(&case.m)?,
        dev.upload(&case.v)?,
    );
    k.adamw_bf16(
        &mut param,
        Some(master.view()),
        &dev.upload(&case.grad)?,
        &mut m,
        &mut v,
        None,
        &case.step(0),
    )?;
    exact("adamw bf16+master master", &dev.download(&master)?, &want_p);
    exact(
        "adamw bf16+master param",
        &download::<bf16>(dev, &param)?,
        &rounded::<bf16>(&want_p),
    );
    exact(
        "adamw bf16+master moments",
        &[dev.download(&m)?, dev.download(&v)?].concat(),
        &[want_m.clone(), want_v.clone()].concat(),
    );

    // One element in, no store is 16-byte aligned: the kernel moves every element alone.
    let shifted = |x: &[f32]| dev.upload(&[&[0.0][..], x].concat());
    let (p, g, m, v) = (
        shifted(&case.param)?,
        shifted(&case.grad)?,
        shifted(&case.m)?,
        shifted(&case.v)?,
    );
    let one_in = |b: &Buffer<f32>| b.view().slice(1, n);
    k.adamw_f32(
        &mut one_in(&p)?,
        &one_in(&g)?,
        &mut one_in(&m)?,
        &mut one_in(&v)?,
        None,
        &case.step(0),
    )?;
    exact(
        "adamw f32 unaligned param",
        &dev.download(&one_in(&p)?)?,
        &want_p,
    );
    exact(
        "adamw f32 unaligned moments",
        &[dev.download(&one_in(&m)?)?, dev.download(&one_in(&v)?)?].concat(),
        &[want_m, want_v].concat(),
    );
    Ok(rows)
}

/// AdamW with the clipping folded in (`clip` = the device's `[norm, coef]`) against the CPU's
/// clip-then-update, and a non-finite norm, which must leave every value untouched.
pub fn adamw_clipped(k: &Kernels, rng: &mut StdRng, n: usize) -> Result<Vec<Row>> {
    let dev = k.device;
    let case = AdamWCase::random(rng, n, |p| p);
    let want_norm = global_norm(&[&case.grad]);
    let max_norm = want_norm / 2.0;
    let grad = dev.upload(&case.grad)?;
    let ws = k.grad_norm_workspace(&[grad.view()])?;
    let norm_and_coef = k.grad_norm(&ws, max_norm as f32)?;
    let (mut p, mut m, mut v) = (
        dev.upload(&case.param)?,
        dev.upload(&case.m)?,
        dev.upload(&case.v)?,
    );
    k.adamw_f32(
        &mut p,
        &grad,
        &mut m,
        &mut v,
        Some(norm_and_coef),
        &case.step(0),
    )?;
    // grad_norm's rows check the coefficient against the exact clip; here the update is checked
    // against the CPU's AdamW on the gradient clipped by the device's own coefficient, so that
    // the norm's few-U error is not amplified through moments that nearly cancel.
    let device_coef = dev.download(&norm_and_coef)?[1] as f64;
    let clipped: Vec<f32> = case
        .grad
        .iter()
        .map(|&g| (g as f64 * device_coef) as f32)
        .collect();
    let (want_p, want_m, want_v) = AdamWCase {
        grad: clipped,
        ..case.clone()
    }
    .reference();
    let bound = 16.0 * U;
    let shape = format!("{n}");
    let mut rows = vec![
        compare(
            "adamw f32 clipped param".into(),
            shape.clone(),
            &dev.download(&p)?,
            &want_p,
            &magnitudes(&want_p),
            bound,
        ),
        compare(
            "adamw f32 clipped moments".into(),
            shape.clone(),
            &[dev.download(&m)?, dev.download(&v)?].concat(),
            &[want_m, want_v].concat(),
            &magnitudes(&[case.m.clone(), case.v.clone()].concat()),
            bound,
        ),
    ];
    let not_finite = dev.upload(&[f32::NAN, 1.0])?;
    let (mut p, mut m, mut v) = (
        dev.upload(&case.param)?,
        dev.upload(&case.m)?,
        dev.upload(&case.v)?,
    );
    k.adamw_f32(
        &mut p,
        &grad,
        &mut m,
        &mut v,
        Some(not_finite.view()),
        &case.step(0),
    )?;
    let before = [case.param.clone(), case.m.clone(), case.v.clone()].concat();
    rows.push(compare(
        "adamw f32 non-finite norm skips".into(),
        shape,
        &[dev.download(&p)?, dev.download(&m)?, dev.download(&v)?].concat(),
        &before,
        &magnitudes(&before),
        0.0,
    ));
    Ok(rows)
}

/// The two bf16 neighbours of an f32 value (the same one twice when it is a bf16 value).
fn bf16_neighbours(x: f32) -> (f32, f32) {
    let bits = x.to_bits();
    let below = f32::from_bits(bits & 0xffff_0000);
    if bits & 0xffff == 0 {
        (below, below)
    } else {
        (below, f32::from_bits((bits & 0xffff_0000) + 0x1_0000))
    }
}

/// AdamW on bf16 with stochastic rounding. Every result must be one of the two bf16 neighbours
/// of the exact (CPU, f32) update (row "neighbours": the error relative to their gap, at most
/// 1). And the rounding must be unbiased: `draws` elements with the same state (so the same
/// update, rounded with independent random bits) must average to the exact update within 6
/// standard deviations of the mean of `draws` such roundings (row "mean", in standard
/// deviations; a correct kernel fails it with probability 2e-9 per case).
pub fn adamw_stochastic(
    k: &Kernels,
    rng: &mut StdRng,
    cases: usize,
    draws: usize,
) -> Result<Vec<Row>> {
    let dev = k.device;
    let (mut worst_gap, mut worst_sigma) = (0f64, 0f64);
    let (mut picks_ok, mut mean_ok) = (true, true);
    let seed = rng.gen();
    for _ in 0..cases {
        // Parameters that are bf16 values, and one state repeated `draws` times.
        let one = AdamWCase::random(rng, 1, |p| bf16::from_f32(p).to_f32());
        let case = AdamWCase {
            param: vec![one.param[0]; draws],
            grad: vec![one.grad[0]; draws],
            m: vec![one.m[0]; draws],
            v: vec![one.v[0]; draws],
            ..one
        };
        let target = case.reference().0[0];
        let (below, above) = bf16_neighbours(target);
        let mut param = upload::<bf16>(dev, &case.param)?;
        let (mut m, mut v) = (dev.upload(&case.m)?, dev.upload(&case.v)?);
        k.adamw_bf16(
            &mut param,
            None,
            &dev.upload(&case.grad)?,
            &mut m,
            &mut v,
            None,
            &case.step(seed),
        )?;
        let got = download::<bf16>(dev, &param)?;
        let gap = (above - below) as f64;
        for &g in &got {
            let ok = g == below || g == above;
            picks_ok &= ok;
            let err = (g as f64 - target as f64).abs();
            worst_gap = worst_gap.max(if gap == 0.0 {
                if ok {
                    0.0
                } else {
                    f64::INFINITY
                }
            } else {
                err / gap
            });
        }
        if gap > 0.0 {
            let p = (target as f64 - below as f64) / gap;
            let sigma = gap * (p * (1.0 - p) / draws as f64).sqrt();
            let mean = got.iter().map(|&g| g as f64).sum::<f64>() / draws as f64;
            let dev_sigmas = if sigma == 0.0 {
                0.0
            } else {
                (mean - target as f64).abs() / sigma
            };
            worst_sigma = worst_sigma.max(dev_sigmas);
            mean_ok &= dev_sigmas <= 6.0;
        }
    }
    let shape = format!("{cases} cases x {draws}");
    Ok(vec![
        Row {
            op: "adamw bf16 stochastic neighbours".into(),
            shape: shape.clone(),
            max_abs: f64::NAN,
            max_rel: worst_gap,
            bound: 1.0,
            pass: picks_ok,
        },
        Row {
            op: "adamw bf16 stochastic mean (sigmas)".into(),
            shape,
            max_abs: f64::NAN,
            max_rel: worst_sigma,
            bound: 6.0,
            pass: mean_ok,
        },
    ])
}

/// `acc += x` on `n` elements stored as `E`: one f32 addition each, as the CPU does it, rounded
/// once into the store (bound 0).
pub fn add_assign<E: Float>(k: &Kernels, rng: &mut StdRng, n: usize) -> Result<Vec<Row>> {
    let acc = rounded::<E>(&random(rng, n, 4.0));
    let x = rounded::<E>(&random(rng, n, 4.0));
    let mut sum = acc.clone();
    CpuOps.add_assign(&mut sum, &x);
    // The fp32 sum, rounded to nearest once into the store: exact.
    let want = rounded::<E>(&sum);
    let mut acc_buffer = upload::<E>(k.device, &acc)?;
    k.add_assign(&mut acc_buffer, &upload::<E>(k.device, &x)?)?;
    let got = download(k.device, &acc_buffer)?;
    Ok(vec![compare(
        name::<E>("add_assign"),
        n.to_string(),
        &got,
        &want,
        &magnitudes(&want),
        0.0,
    )])
}

/// `a * b + c` as written and as `fmaf(a, b, c)` (cuda/emu_probe_checks.cu), on values where
/// the two differ (`c` close to `-a b`): the device must round as the CPU does, the product
/// before the sum (the PTX is built with -fmad=false, the emulator with -ffp-contract=off),
/// and `fmaf` once. Exact.
pub fn fp_contraction(device: &Device, rng: &mut StdRng, n: usize) -> Result<Vec<Row>> {
    let a: Vec<f32> = (0..n).map(|_| rng.gen_range(1.0..2.0)).collect();
    let b: Vec<f32> = (0..n).map(|_| rng.gen_range(1.0..2.0)).collect();
    let c: Vec<f32> = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| -(x * y) * (1.0 + rng.gen_range(-1e-6..1e-6)))
        .collect();
    let (ab, bb, cb) = (device.upload(&a)?, device.upload(&b)?, device.upload(&c)?);
    let (plain, fused) = (device.alloc::<f32>(n)?, device.alloc::<f32>(n)?);
    let mut args = KernelArgs::new();
    args.buffer(&ab)
        .buffer(&bb)
        .buffer(&cb)
        .buffer(&plain)
        .buffer(&fused)
        .arg(n as i64);
    let config = LaunchConfig::new(n.div_ceil(256) as u32, 256, 0);
    // SAFETY: five live buffers of n elements, as the kernel takes them.
    unsafe { device.launch("fp_contraction_probe", config, &args)? };
    let want_plain: Vec<f32> = (0..n).map(|i| a[i] * b[i] + c[i]).collect();
    let want_fused: Vec<f32> = (0..n).map(|i| a[i].mul_add(b[i], c[i])).collect();
    let shape = n.to_string();
    Ok(vec![
        compare(
            "fp a*b+c uncontracted".into(),
            shape.clone(),
            &device.download(&plain)?,
            &want_plain,
            &magnitudes(&want_plain),
            0.0,
        ),
        compare(
            "fp fmaf".into(),
            shape,
            &device.download(&fused)?,
            &want_fused,
            &magnitudes(&want_fused),
            0.0,
        ),
    ])
}

/// One GEMM `g` with inputs `E` and output `C` against an f64 evaluation of its definition.
pub fn gemm<E: Float, C: Float>(device: &Device, rng: &mut StdRng, g: Gemm) -> Result<Row> {
    let a = rounded::<E>(&random(rng, g.m * g.k, 2.0));
    let b = rounded::<E>(&random(rng, g.k * g.n, 2.0));
    let c = rounded::<C>(&random(rng, g.m * g.n, 4.0));
    let (lda, ldb, _) = g.leading_dims();
    let (mut want, mut scale) = (Vec::new(), Vec::new());
    for i in 0..g.m {
        for j in 0..g.n {
            let (mut sum, mut magnitude) = (0f64, 0f64);
            for p in 0..g.k {
                let product =
                    element(&a, g.op_a, lda, i, p) as f64 * element(&b, g.op_b, ldb, p, j) as f64;
                sum += product;
                magnitude += product.abs();
            }
            let prior = c[i * g.n + j] as f64;
            let beta_c = if g.beta == 0.0 {
                0.0
            } else {
                g.beta as f64 * prior
            };
            want.push((g.alpha as f64 * sum + beta_c) as f32);
            scale.push((g.alpha.abs() as f64 * magnitude + beta_c.abs()) as f32);
        }
    }
    let (ab, bb) = (upload::<E>(device, &a)?, upload::<E>(device, &b)?);
    let mut cb = upload::<C>(device, &c)?;
    device.gemm(&g, &ab, &bb, &mut cb)?;
    let got = download::<C>(device, &cb)?;
    let accumulation = if E::DTYPE == "bf16" { 2.0 } else { 1.0 };
    let bound = stored::<C>((accumulation * g.k as f64 + 2.0) * U);
    Ok(compare(
        format!(
            "gemm {:?}{:?} {}->{} a={} b={}",
            g.op_a,
            g.op_b,
            E::DTYPE,
            C::DTYPE,
            g.alpha,
            g.beta
        ),
        format!("{}x{}x{}", g.m, g.n, g.k),
        &got,
        &want,
        &scale,
        bound,
    ))
}

/// The GEMMs of a projection's forward and backward, and general ones, at awkward sizes.
pub fn gemms(device: &Device, rng: &mut StdRng) -> Result<Vec<Row>> {
    let general = |op_a, op_b, m, n, k, alpha, beta| Gemm {
        op_a,
        op_b,
        m,
        n,
        k,
        alpha,
        beta,
    };
    Ok(vec![
        gemm::<bf16, bf16>(device, rng, Gemm::projection(37, 129, 67))?,
        gemm::<bf16, bf16>(device, rng, Gemm::projection_input_grad(37, 129, 67))?,
        gemm::<bf16, f32>(device, rng, Gemm::projection_weight_grad(37, 129, 67))?,
        gemm::<f32, f32>(device, rng, Gemm::projection(1, 1000, 33))?,
        gemm::<f32, f32>(device, rng, Gemm::projection_input_grad(45, 7, 301))?,
        gemm::<f32, f32>(device, rng, Gemm::projection_weight_grad(301, 19, 5))?,
        gemm::<bf16, f32>(device, rng, general(Op::T, Op::T, 23, 41, 77, 0.5, -1.5))?,
        gemm::<bf16, bf16>(device, rng, general(Op::N, Op::N, 64, 1, 1, -2.0, 0.25))?,
        // The weight gradient of a micro-batch without tokens: zeroes c, or leaves it.
        gemm::<bf16, f32>(device, rng, general(Op::T, Op::N, 5, 19, 0, 1.0, 0.0))?,
        gemm::<bf16, bf16>(device, rng, general(Op::T, Op::N, 7, 3, 0, 1.0, 1.0))?,
    ])
}

/// Every check once, at awkward sizes, with the launch shape of [`Kernels::new`].
pub fn run(device: &Device, seed: u64) -> Result<Vec<Row>> {
    let k = Kernels::new(device);
    let rng = &mut StdRng::seed_from_u64(seed);
    let mut rows = Vec::new();
    rows.extend(swiglu::<f32>(&k, rng, 4099)?);
    rows.extend(swiglu::<bf16>(&k, rng, 4099)?);
    // Each row kernel at a width of element-wise accesses and at one of 16-byte chunks.
    for d in [257, 264] {
        rows.extend(embedding::<f32>(&k, rng, 67, 13, d)?);
        rows.extend(embedding::<bf16>(&k, rng, 67, 13, d)?);
    }
    for d in [1001, 1000] {
        rows.extend(rmsnorm::<f32>(&k, rng, 37, d)?);
        rows.extend(rmsnorm::<bf16>(&k, rng, 37, d)?);
    }
    for head_dim in [66, 128] {
        rows.extend(rope::<f32>(&k, rng, 29, 5, head_dim)?);
        rows.extend(rope::<bf16>(&k, rng, 29, 5, head_dim)?);
    }
    rows.extend(casts(&k, rng, 3001)?);
    rows.extend(grad_norm::<f32>(&k, rng, &[1, 4099, 31, 70001])?);
    rows.extend(grad_norm::<bf16>(&k, rng, &[1, 4099, 31, 70001])?);
    rows.extend(adamw_exact(&k, rng, 5003)?);
    rows.extend(adamw_clipped(&k, rng, 5003)?);
    rows.extend(adamw_stochastic(&k, rng, 8, 4099)?);
    rows.extend(adamw_stores::rows(&k, rng, 3001)?);
    rows.extend(add_assign::<f32>(&k, rng, 4099)?);
    rows.extend(add_assign::<bf16>(&k, rng, 4099)?);
    rows.extend(fp_contraction(device, rng, 4099)?);
    rows.extend(gemms(device, rng)?);
    rows.extend(loss::rows(device, rng, 37)?);
    rows.extend(attention_rows(device, rng)?);
    rows.extend(moe::rows(device, rng)?);
    rows.extend(moe_gemm::rows(device, rng)?);
    // Chunks of 13 rows cut through responses; a vocabulary of no multiple of 8 leaves every
    // row but the first unaligned for 16-byte loads.
    let case = scoring::ScoringCase::random(rng, 4, 9, 11, (1001, 67, 13));
    rows.extend(scoring::scoring::<f32>(&k, rng, &case)?);
    rows.extend(scoring::scoring::<bf16>(&k, rng, &case)?);
    device.synchronize()?;
    Ok(rows)
}

/// The rows as an aligned text table.
pub fn table(rows: &[Row]) -> String {
    let fmt = |x: f64| {
        if x.is_nan() {
            "-".to_string()
        } else {
            format!("{x:.2e}")
        }
    };
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.op.clone(),
                r.shape.clone(),
                fmt(r.max_abs),
                fmt(r.max_rel),
                fmt(r.bound),
                if r.pass { "pass" } else { "FAIL" }.to_string(),
            ]
        })
        .collect();
    let header = [
        "op",
        "shape",
        "max abs err",
        "max rel err",
        "bound",
        "result",
    ];
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |row: &[String]| {
        let mut s = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i < 2 {
                s.push_str(&format!("{c:<w$}  "));
            } else {
                s.push_str(&format!("{c:>w$}  "));
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(&header.map(String::from));
    for row in &cells {
        out.push_str(&line(row));
    }
    out
}

/// One attention check: a layout and the shape of its heads.
pub struct AttentionCase {
    pub name: &'static str,
    pub layout: AttentionLayout,
    pub shape: AttentionShape,
}

/// Every mask kind (causal, sliding window, packed groups, window × packed groups), head dims
/// 24, 64, 80, 96 and 128 (the tuned kernels), 200 and 256 (their `_d256` instances),
/// grouped-query ratios 1, 2, 3, 4 and 8, and a stream of 1000 tokens in many small groups.
pub fn attention_cases(rng: &mut StdRng) -> Vec<AttentionCase> {
    let shape = |heads, kv_heads, head_dim| AttentionShape {
        heads,
        kv_heads,
        head_dim,
    };
    let mut stream = Vec::new();
    let mut tokens = 0;
    while tokens < 1000 {
        let prompt = rng.gen_range(1..40);
        let responses: Vec<usize> = (0..rng.gen_range(1..5))
            .map(|_| rng.gen_range(1..30))
            .collect();
        tokens += prompt + responses.iter().sum::<usize>();
        stream.push((prompt, responses));
    }
    vec![
        AttentionCase {
            name: "causal",
            layout: AttentionLayout::causal(77, None),
            shape: shape(4, 4, 64),
        },
        AttentionCase {
            name: "window 13",
            layout: AttentionLayout::causal(93, Some(13)),
            shape: shape(8, 2, 24),
        },
        AttentionCase {
            name: "packed",
            layout: AttentionLayout::packed(
                &[(21, vec![9, 30, 1]), (3, vec![40, 17]), (33, vec![5])],
                None,
            ),
            shape: shape(8, 1, 80),
        },
        AttentionCase {
            name: "window 11 x packed",
            layout: AttentionLayout::packed(&[(40, vec![25, 19]), (9, vec![31, 2, 6])], Some(11)),
            shape: shape(4, 1, 128),
        },
        AttentionCase {
            name: "window 40, GQA 3",
            layout: AttentionLayout::causal(70, Some(40)),
            shape: shape(6, 2, 96),
        },
        AttentionCase {
            name: "head dim 200, window 20 x packed",
            layout: AttentionLayout::packed(&[(17, vec![12, 25]), (6, vec![9])], Some(20)),
            shape: shape(4, 2, 200),
        },
        AttentionCase {
            name: "head dim 256",
            layout: AttentionLayout::causal(45, None),
            shape: shape(2, 1, 256),
        },
        AttentionCase {
            name: "1000-token stream",
            layout: AttentionLayout::packed(&stream, None),
            shape: shape(2, 1, 64),
        },
    ]
}

/// The reference's view of one attention problem and the magnitudes its errors are
/// measured against: |v| for the output, |lse| or 1 for lse, and for each gradient the sum of
/// the absolute values of its terms.
struct AttentionReference {
    /// The output before it is stored as `E`, and as stored (what the backward reads).
    out_exact: Vec<f32>,
    out: Vec<f32>,
    lse: Vec<f32>,
    grads: [Vec<f32>; 3],
    out_scale: Vec<f32>,
    grad_scales: [Vec<f32>; 3],
    /// The largest score error of an fp32 dot product over the padded head, relative to
    /// nothing (scores are logits): (dp + 4) u max Σ|q k| scale.
    score_error: f64,
    /// The most keys a row sees.
    max_keys: usize,
    max_lse: f64,
}

/// The inputs of one attention check, as stored.
struct AttentionInputs {
    q: Vec<f32>,
    k: Vec<f32>,
    v: Vec<f32>,
    dout: Vec<f32>,
}

fn attention_reference(
    x: &AttentionInputs,
    layout: &AttentionLayout,
    s: AttentionShape,
    stored_out: impl Fn(&[f32]) -> Vec<f32>,
) -> AttentionReference {
    let (q, k, v, dout) = (&x.q, &x.k, &x.v, &x.dout);
    let (hq, hkv, hd) = (s.heads, s.kv_heads, s.head_dim);
    let group = hq / hkv;
    let scale = 1.0 / (hd as f64).sqrt();
    let (out, lse) = CpuOps.attention(q, k, v, layout, s);
    // The backward takes the output as stored.
    let out_exact = out;
    let out = stored_out(&out_exact);
    let (dq, dk, dv) = CpuOps.attention_backward(q, k, v, &out, &lse, dout, layout, s);
    let (q, k, v, dout) = (&q[..], &k[..], &v[..], &dout[..]);
    let at = |x: &[f32], t: usize, h: usize, heads: usize, c: usize| x[(t * heads + h) * hd + c];
    let mut out_scale = vec![0f32; out.len()];
    let mut mags = [
        vec![0f64; dq.len()],
        vec![0f64; dk.len()],
        vec![0f64; dv.len()],
    ];
    let (mut max_score, mut max_keys) = (0f64, 0usize);
    for t in 0..layout.len() {
        let keys: Vec<usize> = layout.keys(t).collect();
        max_keys = max_keys.max(keys.len());
        for h in 0..hq {
            let g = h / group;
            let l = lse[t * hq + h] as f64;
            let delta_mag: f64 = (0..hd)
                .map(|c| (at(dout, t, h, hq, c) as f64 * at(&out, t, h, hq, c) as f64).abs())
                .sum();
            for &key in &keys {
                let (mut dot, mut dot_mag, mut dp_mag) = (0f64, 0f64, 0f64);
                for c in 0..hd {
                    let qk = at(q, t, h, hq, c) as f64 * at(k, key, g, hkv, c) as f64;
                    dot += qk;
                    dot_mag += qk.abs();
                    dp_mag += (at(dout, t, h, hq, c) as f64 * at(v, key, g, hkv, c) as f64).abs();
                }
                max_score = max_score.max(scale * dot_mag);
                let p = (scale * dot - l).exp();
                let ds_mag = p * (dp_mag + delta_mag) * scale;
                for c in 0..hd {
                    let i = (t * hq + h) * hd + c;
                    let j = (key * hkv + g) * hd + c;
                    out_scale[i] = out_scale[i].max(at(v, key, g, hkv, c).abs());
                    mags[0][i] += ds_mag * at(k, key, g, hkv, c).abs() as f64;
                    mags[1][j] += ds_mag * at(q, t, h, hq, c).abs() as f64;
                    mags[2][j] += p * at(dout, t, h, hq, c).abs() as f64;
                }
            }
        }
    }
    let padded = hd.div_ceil(16) * 16;
    let f32s = |x: &[f64]| x.iter().map(|&m| m as f32).collect::<Vec<f32>>();
    AttentionReference {
        max_lse: lse.iter().fold(0f64, |m, &x| m.max((x as f64).abs())),
        out_exact,
        out,
        lse,
        grads: [dq, dk, dv],
        out_scale,
        grad_scales: [f32s(&mags[0]), f32s(&mags[1]), f32s(&mags[2])],
        score_error: (padded as f64 + 4.0) * U * max_score,
        max_keys,
    }
}

/// Attention forward and backward of `case` with storage `E` against the CPU reference (on
/// the inputs rounded to `E`). The bounds: a score errs by at most `e` (the fp32 dot over the
/// padded head), which moves a probability by `2e` relative (its own error and the row
/// maximum's); bf16 rounds each probability (and each score gradient) once more. The output
/// is a weighted mean of value rows, so it errs relative to their largest magnitude; the
/// gradients relative to the sums of their terms' magnitudes; sums of `n` terms add `n u`.
pub fn attention<E: Float>(
    device: &Device,
    rng: &mut StdRng,
    case: &AttentionCase,
) -> Result<Vec<Row>> {
    let s = case.shape;
    let t = case.layout.len();
    let x = AttentionInputs {
        q: rounded::<E>(&random(rng, t * s.heads * s.head_dim, 2.0)),
        k: rounded::<E>(&random(rng, t * s.kv_heads * s.head_dim, 2.0)),
        v: rounded::<E>(&random(rng, t * s.kv_heads * s.head_dim, 2.0)),
        dout: rounded::<E>(&random(rng, t * s.heads * s.head_dim, 2.0)),
    };
    let want = attention_reference(&x, &case.layout, s, rounded::<E>);
    let (q, k, v) = (&x.q, &x.k, &x.v);

    let kernels = AttentionKernels::new(device);
    let layout = DeviceLayout::new(device, &Pool::default(), &case.layout, tile_rows::<E>())?;
    let (qb, kb, vb) = (
        upload::<E>(device, q)?,
        upload::<E>(device, k)?,
        upload::<E>(device, v)?,
    );
    let mut out = device.alloc::<E>(q.len())?;
    let mut lse = device.alloc::<f32>(t * s.heads)?;
    kernels.forward(&qb, &kb, &vb, &layout, s, &mut out, &mut lse)?;
    let (stored_out, lse_ref) = (upload::<E>(device, &want.out)?, device.upload(&want.lse)?);
    let mut grads = [
        device.alloc::<E>(q.len())?,
        device.alloc::<E>(k.len())?,
        device.alloc::<E>(v.len())?,
    ];
    let [dq, dk, dv] = &mut grads;
    kernels.backward(
        &qb,
        &kb,
        &vb,
        &stored_out,
        &lse_ref,
        &upload::<E>(device, &x.dout)?,
        &layout,
        s,
        dq,
        dk,
        dv,
    )?;

    let bf16 = E::DTYPE == "bf16";
    let e = want.score_error;
    let n = want.max_keys as f64;
    let p_rounding = if bf16 { BF16_ROUNDING } else { 0.0 };
    let p_error = 2.0 * e + 2.0 * want.max_lse * U + 8.0 * U + p_rounding;
    let tiles = n / tile_rows::<E>() as f64;
    let out_bound = stored::<E>(2.0 * p_error + (n + tiles + 4.0) * U);
    let lse_bound = p_error + (n + tiles + 8.0) * U;
    let dp = s.head_dim.div_ceil(16) as f64 * 16.0;
    let grad_bound = stored::<E>(
        p_error + p_rounding + (2.0 * dp + n * (s.heads / s.kv_heads) as f64 + 8.0) * U,
    );
    let shape = format!(
        "{} tokens, {}/{} heads of {}",
        t, s.heads, s.kv_heads, s.head_dim
    );
    let mut rows = vec![
        compare(
            name::<E>(&format!("attention {} out", case.name)),
            shape.clone(),
            &download(device, &out)?,
            &want.out_exact,
            &want.out_scale,
            out_bound,
        ),
        compare(
            name::<E>(&format!("attention {} lse", case.name)),
            shape.clone(),
            &device.download(&lse)?,
            &want.lse,
            &vec![1.0; want.lse.len()],
            lse_bound,
        ),
    ];
    for ((what, got), (w, scale)) in ["dq", "dk", "dv"]
        .iter()
        .zip(&grads)
        .zip(want.grads.iter().zip(&want.grad_scales))
    {
        rows.push(compare(
            name::<E>(&format!("attention_backward {} {what}", case.name)),
            shape.clone(),
            &download(device, got)?,
            w,
            scale,
            grad_bound,
        ));
    }
    Ok(rows)
}

/// [`attention`] for every case of [`attention_cases`], in f32 and bf16.
pub fn attention_rows(device: &Device, rng: &mut StdRng) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for case in attention_cases(rng) {
        rows.extend(attention::<f32>(device, rng, &case)?);
        rows.extend(attention::<bf16>(device, rng, &case)?);
    }
    Ok(rows)
}
