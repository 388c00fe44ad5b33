//! The fused scoring (cuda/scoring.cu through [`FusedScoring`]) against the CPU reference
//! (`ops::cpu::scoring`, `ops::span_table`, `ops::row_grads`), forward and backward.
//!
//! Bounds, with `u = 2^-24` and `M_t = max_v Σ_j |h_tj W_vj|` the magnitude row `t`'s
//! logits are computed from:
//!
//! - logits: the GEMM's `ε_g = (a d + 2) u` relative to `M_t` (`a = 2` for bf16 inputs), and
//!   for bf16 logits one rounding more (`stored`): `ε_z`.
//! - the row's sum `s = Σ exp(z − m)` (positive terms): each thread's `k = ceil(V / block) + 2`
//!   terms (an expf of 2 ulp and an addition each, one rescale per 16-byte vector), the
//!   block's tree (`L` levels, two expf, a product and a sum each), and the rounding of every
//!   exponent's argument, whose effect on `s` is at most `u · E_p|z − m| <= u ln V`: `ε_s =
//!   (4k + 5L + ln V + 4) u` relative, an absolute error of `log s`; the rescales' exponents
//!   add at most `4 u M_t` (they telescope to `m − m_first`).
//! - `lse = m + log s` and `logp = (z_y − m) − log s`: `|Δ| <= 2 ε_z M_t + ε_s + 4 u (M_t +
//!   |lse| + |logp|)`, so each row's bound is `2 ε_z + ε_s + 4u` relative to `scale_t = M_t +
//!   |lse_t| + |logp_t| + 1`.
//! - `S` and `A` sum their rows' errors (the fp64 sum adds nothing measurable): the same bound
//!   relative to the sum of the rows' scales; `E` is its last row's. The comparison in fp32
//!   adds `2u`.
//! - backward: `dz = g (δ − p)` with `p = exp(z − lse)` off by `p (ε scale_t + u (M_t + |lse|)
//!   + 3u)` and g rounded to fp32, so `|Δdz_tv| <= ε_dz D_tv` for `D_tv = |g_t| (p_tv (scale_t
//!   + M_t + 1) + |δ − p_tv|)` and `ε_dz` the row bound plus one bf16 rounding for bf16 (and
//!   `4u`). Then `dh = dz · W` adds the GEMM's `ε_g` over V terms relative to `Σ_v D_tv |W_vj|`
//!   (and one rounding of a bf16 `dh`); `dW += dzᵀ h` over the rows, plus one rounding per
//!   chunk, relative to `|dW0| + Σ_t D_tv |h_tj|`.
//! - the per-row coefficients are the CPU's fp64 arithmetic rounded once: bit for bit.

use super::{compare, download, random, rounded, stored, tree_levels, upload, Row, U};
use crate::ops::cpu::scoring as cpu_scoring;
use crate::ops::cuda::device::Float;
use crate::ops::cuda::fresh::GradWrite;
use crate::ops::cuda::kernels::Kernels;
use crate::ops::cuda::scoring::{FusedScoring, Spans};
use crate::ops::{row_grads, span_table, ResponseSpan, ResponseStats};
use anyhow::Result;
use half::bf16;
use rand::rngs::StdRng;
use rand::Rng;

/// The shape of one scoring check: response spans over the prediction rows (in order, tiling
/// them), the vocabulary, the width and the rows per chunk.
#[derive(Clone, Debug)]
pub struct ScoringCase {
    pub spans: Vec<ResponseSpan>,
    pub vocab: usize,
    pub d: usize,
    pub chunk_rows: usize,
}

impl ScoringCase {
    /// `groups` groups of 2 to `max_k` responses of 1 to `max_len` tokens, seven in ten
    /// ending with EOS.
    pub fn random(
        rng: &mut StdRng,
        groups: usize,
        max_k: usize,
        max_len: usize,
        (vocab, d, chunk_rows): (usize, usize, usize),
    ) -> Self {
        let mut spans = Vec::new();
        let mut first = 0;
        for group in 0..groups {
            for _ in 0..rng.gen_range(2..=max_k) {
                let len = rng.gen_range(1..=max_len);
                spans.push(ResponseSpan {
                    group,
                    first,
                    len,
                    ends_with_eos: rng.gen_bool(0.7),
                });
                first += len;
            }
        }
        ScoringCase {
            spans,
            vocab,
            d,
            chunk_rows,
        }
    }

    pub fn rows(&self) -> usize {
        self.spans
            .iter()
            .map(|s| s.first + s.len)
            .max()
            .unwrap_or(0)
    }

    fn describe(&self) -> String {
        format!(
            "{} rows x {} x d {}, {} responses, chunks of {}",
            self.rows(),
            self.vocab,
            self.d,
            self.spans.len(),
            self.chunk_rows
        )
    }
}

/// What the reference knows of each row beyond its log-prob: the logits in f64, their
/// magnitude `M_t`, and the error scale of the row.
struct RowMagnitudes {
    z: Vec<f64>,
    m: Vec<f64>,
    scale: Vec<f64>,
}

fn magnitudes_of(
    h: &[f32],
    w: &[f32],
    case: &ScoringCase,
    lse: &[f32],
    logp: &[f64],
) -> RowMagnitudes {
    let (rows, vocab, d) = (case.rows(), case.vocab, case.d);
    let mut z = vec![0f64; rows * vocab];
    let mut m = vec![0f64; rows];
    for t in 0..rows {
        let ht = &h[t * d..(t + 1) * d];
        for v in 0..vocab {
            let wv = &w[v * d..(v + 1) * d];
            let (mut sum, mut mag) = (0f64, 0f64);
            for (a, b) in ht.iter().zip(wv) {
                let p = *a as f64 * *b as f64;
                sum += p;
                mag += p.abs();
            }
            z[t * vocab + v] = sum;
            m[t] = m[t].max(mag);
        }
    }
    let scale = (0..rows)
        .map(|t| m[t] + (lse[t] as f64).abs() + logp[t].abs() + 1.0)
        .collect();
    RowMagnitudes { z, m, scale }
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Forward (per-row lse and logp, per-response S, A, E), the per-row coefficients and the
/// backward (dh, dW accumulated) of one case, on inputs stored as `E`.
pub fn scoring<E: Float>(k: &Kernels, rng: &mut StdRng, case: &ScoringCase) -> Result<Vec<Row>> {
    let dev = k.device;
    let (rows, vocab, d) = (case.rows(), case.vocab, case.d);
    let h = rounded::<E>(&random(rng, rows * d, 2.0));
    let w = rounded::<E>(&random(rng, vocab * d, 1.0));
    let eos = rng.gen_range(0..vocab as u32);
    let mut targets: Vec<u32> = (0..rows).map(|_| rng.gen_range(0..vocab as u32)).collect();
    for s in case.spans.iter().filter(|s| s.ends_with_eos) {
        targets[s.first + s.len - 1] = eos;
    }
    let grads: Vec<[f64; 3]> = case
        .spans
        .iter()
        .map(|_| [0; 3].map(|_| rng.gen_range(-1.0..1.0)))
        .collect();
    let dhead0 = random(rng, vocab * d, 1.0);

    // The device.
    let scoring = FusedScoring {
        kernels: k,
        chunk_rows: case.chunk_rows,
    };
    let (h_b, w_b) = (upload::<E>(dev, &h)?, upload::<E>(dev, &w)?);
    let targets_b = dev.upload(&targets)?;
    let (mut lse_b, mut logp_b) = (dev.alloc::<f32>(rows)?, dev.alloc::<f32>(rows)?);
    scoring.forward(&h_b, &w_b, &targets_b, d, &mut lse_b, &mut logp_b)?;
    let spans_b = Spans::upload(dev, &k.scratch, &case.spans, rows)?;
    let mut stats_b = dev.alloc::<f64>(3 * case.spans.len())?;
    k.response_stats(&logp_b, &spans_b, &mut stats_b)?;
    let grads_b = dev.upload(&grads.concat())?;
    let mut coef_b = dev.alloc::<f32>(rows)?;
    // A micro-batch's share of its step scales the coefficients.
    let share = rng.gen_range(0.1..1.0);
    k.row_coef(&spans_b, &grads_b, share, &mut coef_b)?;
    // dhead added into (dhead0), then written over a fresh gradient (NaNs, not to be read).
    let mut dh_b = dev.alloc::<E>(rows * d)?;
    let mut dhead_b = dev.upload(&dhead0)?;
    let mut dhead_fresh_b = dev.upload(&vec![f32::NAN; vocab * d])?;
    for dhead in [
        (&mut dhead_b, GradWrite::Accumulate),
        (&mut dhead_fresh_b, GradWrite::Overwrite),
    ] {
        scoring.backward(&h_b, &w_b, &targets_b, &lse_b, &coef_b, d, &mut dh_b, dhead)?;
    }
    // With bf16 inputs, into a bf16 gradient in one chunk (one GEMM, one rounding).
    let one_chunk = FusedScoring {
        kernels: k,
        chunk_rows: rows.max(1),
    };
    let dhead0_bf16 = rounded::<bf16>(&dhead0);
    let mut dhead_bf16 = Vec::new();
    if E::DTYPE == "bf16" {
        let mut dh_b = dev.alloc::<E>(rows * d)?;
        for (start, write) in [
            (&dhead0_bf16, GradWrite::Accumulate),
            (&vec![f32::NAN; vocab * d], GradWrite::Overwrite),
        ] {
            let mut dhead_b = upload::<bf16>(dev, start)?;
            let dhead = (&mut dhead_b, write);
            one_chunk.backward(&h_b, &w_b, &targets_b, &lse_b, &coef_b, d, &mut dh_b, dhead)?;
            dhead_bf16.push(download(dev, &dhead_b)?);
        }
    }

    // The reference.
    let (want_logp, want_lse) = cpu_scoring::token_logprobs(&h, &w, &targets, d, vocab);
    let want_stats = ResponseStats::from_table(&case.spans, &span_table(&case.spans, &want_logp));
    let dlogp = row_grads(&case.spans, rows, &grads.concat(), share);
    let backward = |dhead: &mut Vec<f32>| {
        cpu_scoring::token_logprobs_backward(&h, &w, &targets, &want_lse, &dlogp, d, vocab, dhead)
    };
    let mut want_dhead = dhead0.clone();
    let want_dh = backward(&mut want_dhead);
    let mut want_dhead_fresh = vec![0.0; vocab * d];
    backward(&mut want_dhead_fresh);
    let mut want_dhead_bf16 = dhead0_bf16.clone();
    backward(&mut want_dhead_bf16);

    // The bounds.
    let mags = magnitudes_of(&h, &w, case, &want_lse, &want_logp);
    let block = k.block as usize;
    let accumulation = if E::DTYPE == "bf16" { 2.0 } else { 1.0 };
    let gemm_bound = |terms: usize| (accumulation * terms as f64 + 2.0) * U;
    let logit_bound = stored::<E>(gemm_bound(d));
    let per_thread = vocab.div_ceil(block) as f64 + 2.0;
    let sum_bound =
        (4.0 * per_thread + 5.0 * (tree_levels(block) + 1.0) + (vocab as f64).ln() + 4.0) * U;
    let row_bound = 2.0 * logit_bound + sum_bound + 4.0 * U;
    let dz_bound = stored::<E>(row_bound) + 4.0 * U;
    let chunks = rows.div_ceil(case.chunk_rows.max(1));
    let dh_bound = stored::<E>(dz_bound + gemm_bound(vocab));
    let dhead_bound = dz_bound + gemm_bound(rows + chunks);

    let scale: Vec<f32> = to_f32(&mags.scale);
    let span_scale = |s: &ResponseSpan| mags.scale[s.first..s.first + s.len].iter().sum::<f64>();
    let got_stats = dev.download(&stats_b)?;
    let stat = |i: usize| -> Vec<f32> {
        got_stats
            .iter()
            .skip(i)
            .step_by(3)
            .map(|&v| v as f32)
            .collect()
    };
    let want_s: Vec<f32> = want_stats.iter().map(|s| s.logp_sum as f32).collect();
    let want_a: Vec<f32> = want_stats.iter().map(|s| s.logp_mean as f32).collect();
    let want_e: Vec<f32> = want_stats
        .iter()
        .map(|s| s.eos_logp.map_or(f32::NAN, |e| e as f32))
        .collect();
    let scale_s: Vec<f32> = case.spans.iter().map(|s| span_scale(s) as f32).collect();
    let scale_a: Vec<f32> = case
        .spans
        .iter()
        .map(|s| (span_scale(s) / s.len as f64) as f32)
        .collect();
    let scale_e: Vec<f32> = case
        .spans
        .iter()
        .map(|s| mags.scale[s.first + s.len - 1] as f32)
        .collect();

    // D_tv, and the scales of dh and dW from it.
    let dz_scale: Vec<f64> = (0..rows * vocab)
        .map(|i| {
            let (t, v) = (i / vocab, i % vocab);
            let p = (mags.z[i] - want_lse[t] as f64).exp();
            let onehot = if v == targets[t] as usize { 1.0 } else { 0.0 };
            dlogp[t].abs() * (p * (mags.scale[t] + mags.m[t] + 1.0) + (onehot - p).abs())
        })
        .collect();
    let scale_dh: Vec<f32> = (0..rows * d)
        .map(|i| {
            let (t, j) = (i / d, i % d);
            (0..vocab)
                .map(|v| dz_scale[t * vocab + v] * (w[v * d + j] as f64).abs())
                .sum::<f64>() as f32
        })
        .collect();
    let terms_dhead: Vec<f64> = (0..vocab * d)
        .map(|i| {
            let (v, j) = (i / d, i % d);
            (0..rows)
                .map(|t| dz_scale[t * vocab + v] * (h[t * d + j] as f64).abs())
                .sum()
        })
        .collect();
    let scale_dhead: Vec<f32> = (0..vocab * d)
        .map(|i| (terms_dhead[i] + dhead0[i].abs() as f64) as f32)
        .collect();
    let scale_dhead_fresh: Vec<f32> = terms_dhead.iter().map(|&t| t as f32).collect();

    let shape = case.describe();
    let name = |op: &str| format!("{op} {}", E::DTYPE);
    let mut rows_out = vec![
        compare(
            name("scoring_rows logp"),
            shape.clone(),
            &dev.download(&logp_b)?,
            &to_f32(&want_logp),
            &scale,
            row_bound,
        ),
        compare(
            name("scoring_rows lse"),
            shape.clone(),
            &dev.download(&lse_b)?,
            &want_lse,
            &scale,
            row_bound,
        ),
        compare(
            name("response_stats S"),
            shape.clone(),
            &stat(0),
            &want_s,
            &scale_s,
            row_bound + 2.0 * U,
        ),
        compare(
            name("response_stats A"),
            shape.clone(),
            &stat(1),
            &want_a,
            &scale_a,
            row_bound + 2.0 * U,
        ),
        compare(
            name("response_stats E"),
            shape.clone(),
            &stat(2),
            &want_e,
            &scale_e,
            row_bound + 2.0 * U,
        ),
        compare(
            name("scoring_row_coef"),
            shape.clone(),
            &dev.download(&coef_b)?,
            &to_f32(&dlogp),
            &to_f32(&dlogp.iter().map(|g| g.abs()).collect::<Vec<_>>()),
            0.0,
        ),
        compare(
            name("scoring_backward dh"),
            shape.clone(),
            &download(dev, &dh_b)?,
            &want_dh,
            &scale_dh,
            dh_bound,
        ),
        compare(
            name("scoring_backward dhead"),
            shape.clone(),
            &dev.download(&dhead_b)?,
            &want_dhead,
            &scale_dhead,
            dhead_bound,
        ),
        compare(
            name("scoring_backward dhead fresh"),
            shape.clone(),
            &dev.download(&dhead_fresh_b)?,
            &want_dhead_fresh,
            &scale_dhead_fresh,
            dhead_bound,
        ),
    ];
    let one_chunk_bound = stored::<bf16>(dz_bound + gemm_bound(rows + 1));
    let one_chunk_rows = [
        (
            "scoring_backward dhead:bf16 one chunk",
            &want_dhead_bf16,
            &scale_dhead,
        ),
        (
            "scoring_backward dhead:bf16 one chunk fresh",
            &want_dhead_fresh,
            &scale_dhead_fresh,
        ),
    ];
    for ((op, want, scale), got) in one_chunk_rows.into_iter().zip(&dhead_bf16) {
        rows_out.push(compare(
            name(op),
            format!("{rows} rows x {vocab} x d {d}, one chunk"),
            got,
            want,
            scale,
            one_chunk_bound,
        ));
    }
    Ok(rows_out)
}
