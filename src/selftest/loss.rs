//! The loss kernels (cuda/loss.cu) against the CPU loss library on random batches of awkward
//! groups: K from 2 to 9, one-token responses, responses without EOS, groups whose rewards
//! are all equal, margins of hundreds.
//!
//! Bounds. Both sides run the same f64 operations in the same order; they can differ only
//! where a transcendental is evaluated (exp, log1p: within 1 ulp in glibc and in CUDA's
//! libdevice, so two results are at most 2 ulp apart) and where nvcc contracts `a·b + c` into
//! an fma (one rounding less). Such a difference in a log-sum-exp, 2 ulp per term plus the
//! roundings of K additions and of `max + log1p(rest)` (ulps of |lse| ≤ M + ln K), becomes an
//! absolute difference of the next exponential's argument and so a relative one of its value,
//! where M is the largest magnitude of an exponential's argument that the batch can produce
//! (`argument_magnitude`). Counting those steps (at most 2K + 6 ln K + 6M + 10 roundings, then
//! K + 2 for the sums of the gradient's terms) gives the bound `8 (K + 4 + M) u`, u = 2^-53,
//! relative to the magnitude of the terms each output adds or subtracts ([`group_scales`]):
//! a gradient of 1e-200 that is a difference of two terms of 1e-200 is checked against 1e-200,
//! one that is what is left of two terms of 0.5 against 0.5. The metrics are sums in the CPU's
//! order of values computed without a transcendental (identical on both sides) except eos_prob,
//! a mean of exp(E): (N + 4) u relative to the value.

use super::{compare, Row};
use crate::engine::loss::host_batch_loss;
use crate::loss::metrics::batch_metrics;
use crate::loss::numeric::{log_sum_exp, sigmoid, soft_labels};
use crate::loss::{batch_loss, best, refa_terms, BatchInput, GroupInput, LossKind, LossSpec};
use crate::model::ResponseStats;
use crate::ops::cuda::device::Device;
use anyhow::Result;
use rand::rngs::StdRng;
use rand::Rng;

/// The unit roundoff of f64.
const U64: f64 = f64::EPSILON / 2.0;

/// A batch's statistics on the host, as the loss library reads them.
#[derive(Clone, Debug)]
pub struct LossBatch {
    pub s: Vec<f64>,
    pub a: Vec<f64>,
    pub e: Vec<Option<f64>>,
    pub s_ref: Vec<f64>,
    pub rewards: Vec<f64>,
    pub tokens: Vec<usize>,
    pub offsets: Vec<usize>,
    pub sources: Vec<String>,
}

impl LossBatch {
    pub fn input(&self) -> BatchInput<'_> {
        BatchInput {
            s: &self.s,
            a: &self.a,
            e: &self.e,
            s_ref: Some(&self.s_ref),
            rewards: &self.rewards,
            offsets: &self.offsets,
            sources: &self.sources,
        }
    }

    /// `groups` random groups of 2 to `max_k` responses (exactly 2 when `pairs`), 1 to 40
    /// tokens (a third of one token), EOS for 70% of them, rewards with ties (a fifth of the
    /// groups all equal) and implicit rewards `beta (S - S_ref)` up to ±`margin`.
    pub fn random(
        rng: &mut StdRng,
        groups: usize,
        max_k: usize,
        pairs: bool,
        beta: f64,
        margin: f64,
    ) -> Self {
        let mut b = LossBatch {
            s: Vec::new(),
            a: Vec::new(),
            e: Vec::new(),
            s_ref: Vec::new(),
            rewards: Vec::new(),
            tokens: Vec::new(),
            offsets: vec![0],
            sources: Vec::new(),
        };
        let spread = margin / beta;
        for g in 0..groups {
            let k = if pairs { 2 } else { rng.gen_range(2..=max_k) };
            let equal = rng.gen_bool(0.2);
            for _ in 0..k {
                let n = if rng.gen_bool(0.3) {
                    1
                } else {
                    rng.gen_range(2..=40)
                };
                let s = -rng.gen_range(0.01..spread.max(2.0));
                b.s.push(s);
                b.a.push(s / n as f64);
                b.tokens.push(n);
                b.e.push(rng.gen_bool(0.7).then(|| -rng.gen_range(0.01..8.0)));
                b.s_ref.push(s + rng.gen_range(-spread..spread));
                b.rewards.push(if equal {
                    5.0
                } else {
                    rng.gen_range(0..5) as f64 * 2.0
                });
            }
            b.offsets.push(b.s.len());
            b.sources.push(format!("random group {g}"));
        }
        b
    }

    fn group(&self, g: usize) -> GroupInput<'_> {
        let r = self.offsets[g]..self.offsets[g + 1];
        GroupInput {
            s: &self.s[r.clone()],
            a: &self.a[r.clone()],
            e: &self.e[r.clone()],
            s_ref: Some(&self.s_ref[r.clone()]),
            rewards: &self.rewards[r],
        }
    }
}

/// The magnitudes one group's outputs are measured against: for each output, the sum of the
/// magnitudes of the terms its formula adds or subtracts (unscaled by the batch mean).
pub struct Scales {
    pub loss: f64,
    pub d_s: Vec<f64>,
    pub d_a: Vec<f64>,
    pub d_e: Vec<f64>,
}

/// `|softmax_i Σ_{j≠i} q_j| + |q_i Σ_{j≠i} softmax_j|`: the two terms of softmax(x) - q.
fn cross_entropy_terms(x: &[f64], q: &[f64]) -> Vec<f64> {
    let lse = log_sum_exp(x);
    let softmax: Vec<f64> = x.iter().map(|v| (v - lse).exp()).collect();
    let others = |v: &[f64], i: usize| -> f64 {
        v.iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, x)| x)
            .sum()
    };
    (0..x.len())
        .map(|i| softmax[i] * others(q, i) + q[i] * others(&softmax, i))
        .collect()
}

/// `λ exp(E_i)` where E is present: the EOS regularizer's terms.
fn eos_terms(lambda: f64, e: &[Option<f64>]) -> Vec<f64> {
    e.iter()
        .map(|e| e.map_or(0.0, |e| lambda * e.exp()))
        .collect()
}

pub fn group_scales(spec: &LossSpec, g: &GroupInput, loss: f64) -> Scales {
    let k = g.s.len();
    let beta = spec.beta;
    let rho: Vec<f64> = match g.s_ref {
        Some(s_ref) => g.s.iter().zip(s_ref).map(|(s, r)| beta * (s - r)).collect(),
        None => vec![0.0; k],
    };
    let times_beta = |v: Vec<f64>| -> Vec<f64> { v.into_iter().map(|x| beta * x).collect() };
    let mut out = Scales {
        loss: loss.abs(),
        d_s: vec![0.0; k],
        d_a: vec![0.0; k],
        d_e: vec![0.0; k],
    };
    let nca_terms = |q: &[f64]| -> Vec<f64> {
        (0..k)
            .map(|i| beta * (q[i] * sigmoid(-rho[i]) + sigmoid(rho[i]) / k as f64))
            .collect()
    };
    match spec.kind {
        LossKind::Infonca => {
            out.d_s = times_beta(cross_entropy_terms(
                &rho,
                &soft_labels(g.rewards, spec.alpha),
            ))
        }
        LossKind::Nca => out.d_s = nca_terms(&soft_labels(g.rewards, spec.alpha)),
        LossKind::NcaPair => out.d_s = nca_terms(&[1.0, 0.0]),
        LossKind::Dpo => {
            let (eps, z) = (spec.label_smoothing, rho[0] - rho[1]);
            let d = beta * ((1.0 - eps) * sigmoid(-z) + eps * sigmoid(z));
            out.d_s = vec![d, d];
        }
        LossKind::Simpo => {
            let z = beta * (g.a[0] - g.a[1]) - spec.gamma;
            let d = beta * sigmoid(-z);
            out.d_a = vec![d, d];
        }
        LossKind::InfoncaFree => {
            let x: Vec<f64> = g.a.iter().map(|a| beta * a).collect();
            out.d_a = times_beta(cross_entropy_terms(&x, &soft_labels(g.rewards, spec.alpha)));
            out.d_e = eos_terms(spec.lambda, g.e);
            out.loss += out.d_e.iter().sum::<f64>();
        }
        LossKind::Refa => {
            if let Some(t) = refa_terms(spec, g) {
                out.loss = t.lse_all.abs() + t.lse_pos.abs();
                let d: Vec<f64> = (0..k)
                    .map(|i| {
                        let own = if t.positive[i] {
                            (t.score[i] - t.lse_pos).exp()
                        } else {
                            0.0
                        };
                        beta * ((t.shifted[i] - t.lse_all).exp() + own)
                    })
                    .collect();
                if spec.normalize {
                    out.d_a = d;
                } else {
                    out.d_s = d;
                }
            }
            out.d_e = eos_terms(spec.lambda, g.e);
            out.loss += out.d_e.iter().sum::<f64>();
        }
        LossKind::Sft => out.d_a[best(g.rewards)] = 1.0,
    }
    if spec.sft_weight > 0.0 && spec.kind != LossKind::Sft {
        let b = best(g.rewards);
        out.loss += spec.sft_weight * g.a[b].abs();
        out.d_a[b] += spec.sft_weight;
    }
    out
}

/// The largest magnitude of an exponential's argument the batch can produce under `spec`:
/// differences of two responses' implicit rewards or scores, REFA's deviations, gamma.
pub fn argument_magnitude(spec: &LossSpec, b: &LossBatch) -> f64 {
    let max_abs = |v: &mut dyn Iterator<Item = f64>| v.fold(0f64, |m, x| m.max(x.abs()));
    let margin = max_abs(&mut b.s.iter().zip(&b.s_ref).map(|(s, r)| s - r));
    let mean_logp = max_abs(&mut b.a.iter().copied());
    let logp = if spec.kind == LossKind::Refa && !spec.normalize {
        max_abs(&mut b.s.iter().copied())
    } else {
        0.0
    };
    let spread = b.rewards.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
        - b.rewards.iter().cloned().fold(f64::INFINITY, f64::min);
    spec.beta * (2.0 * (margin + mean_logp + logp) + spec.alpha * spread.powi(spec.p as i32))
        + spec.gamma.abs()
        + spec.gamma.ln().abs()
}

/// The device against the CPU on `batch`: rows for the loss (batch and per group), the
/// gradients (dS, dA, dE) and the metrics, named `loss <label> ...`.
pub fn compare_loss(
    device: &Device,
    spec: &LossSpec,
    batch: &LossBatch,
    label: &str,
) -> Result<Vec<Row>> {
    let input = batch.input();
    let want = batch_loss(spec, &input)?;
    let stats: Vec<ResponseStats> = (0..batch.s.len())
        .map(|i| ResponseStats {
            logp_sum: batch.s[i],
            tokens: batch.tokens[i],
            logp_mean: batch.a[i],
            eos_logp: batch.e[i],
        })
        .collect();
    let want_metrics = batch_metrics(spec, &input, &stats);
    let (got, got_metrics) = host_batch_loss(device, spec, &input, &batch.tokens)?;

    let groups = batch.offsets.len() - 1;
    let scale = 1.0 / groups as f64;
    let (mut loss_scale, mut group_loss_scale) = (0.0, Vec::new());
    let mut grad_scale = Vec::new();
    for g in 0..groups {
        let sc = group_scales(spec, &batch.group(g), want.per_group[g]);
        loss_scale += sc.loss * scale;
        group_loss_scale.push(sc.loss);
        grad_scale.extend(sc.d_s.iter().map(|x| x * scale));
        grad_scale.extend(sc.d_a.iter().map(|x| x * scale));
        grad_scale.extend(sc.d_e.iter().map(|x| x * scale));
    }
    // The gradients of each group side by side, as grad_scale holds them.
    let by_group = |out: &crate::loss::BatchOutput| -> Vec<f64> {
        (0..groups)
            .flat_map(|g| {
                let r = batch.offsets[g]..batch.offsets[g + 1];
                [&out.d_s[r.clone()], &out.d_a[r.clone()], &out.d_e[r]].concat()
            })
            .collect()
    };
    let max_k = batch
        .offsets
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or(0);
    // The batch loss adds the groups' losses: 2 roundings per group more.
    let bound =
        (8.0 * (max_k as f64 + 4.0 + argument_magnitude(spec, batch)) + 2.0 * groups as f64) * U64;
    let names_match = got_metrics.len() == want_metrics.len()
        && got_metrics
            .iter()
            .zip(&want_metrics)
            .all(|(g, w)| g.0 == w.0);
    let metric_values = |m: &[(String, f64)]| -> Vec<f64> { m.iter().map(|x| x.1).collect() };
    let want_values = metric_values(&want_metrics);
    let metric_scale: Vec<f64> = want_values.iter().map(|v| v.abs()).collect();
    let shape = format!("{groups} groups, {} responses", batch.s.len());
    let mut metrics_row = compare(
        format!("loss {label} metrics"),
        shape.clone(),
        &metric_values(&got_metrics),
        &want_values,
        &metric_scale,
        (batch.s.len() as f64 + 4.0) * U64,
    );
    metrics_row.pass &= names_match;
    Ok(vec![
        compare(
            format!("loss {label} loss"),
            shape.clone(),
            &[[got.loss].as_slice(), &got.per_group].concat(),
            &[[want.loss].as_slice(), &want.per_group].concat(),
            &[[loss_scale].as_slice(), &group_loss_scale].concat(),
            bound,
        ),
        compare(
            format!("loss {label} dS,dA,dE"),
            shape,
            &by_group(&got),
            &by_group(&want),
            &grad_scale,
            bound,
        ),
        metrics_row,
    ])
}

/// Every loss and variant of the library, each named by its label, with the CPU's defaults
/// where a variant does not say otherwise.
pub fn variants() -> Vec<(String, LossSpec)> {
    let spec = |kind| LossSpec::new(kind);
    let mut out = Vec::new();
    for alpha in [0.0, 1e-6, 0.01, 0.5] {
        for kind in [LossKind::Infonca, LossKind::Nca, LossKind::InfoncaFree] {
            out.push((
                format!("{} alpha={alpha}", kind.name()),
                LossSpec {
                    alpha,
                    ..spec(kind)
                },
            ));
        }
    }
    for label_smoothing in [0.0, 0.2] {
        out.push((
            format!("dpo eps={label_smoothing}"),
            LossSpec {
                label_smoothing,
                ..spec(LossKind::Dpo)
            },
        ));
    }
    out.push(("nca_pair".into(), spec(LossKind::NcaPair)));
    out.push(("simpo".into(), spec(LossKind::Simpo)));
    for one_vs_all in [false, true] {
        for p in [1, 2] {
            for normalize in [true, false] {
                out.push((
                    format!("refa one_vs_all={one_vs_all} p={p} normalize={normalize}"),
                    LossSpec {
                        one_vs_all,
                        p,
                        normalize,
                        lambda: 0.05,
                        beta: if one_vs_all { 2.0 } else { 3.0 },
                        ..spec(LossKind::Refa)
                    },
                ));
            }
        }
    }
    out.push(("sft".into(), spec(LossKind::Sft)));
    for kind in [LossKind::Nca, LossKind::Dpo, LossKind::Refa] {
        out.push((
            format!("{} + 0.3 sft", kind.name()),
            LossSpec {
                sft_weight: 0.3,
                ..spec(kind)
            },
        ));
    }
    out
}

/// The selftest's rows: every variant on a random batch of `groups` groups (K up to 9,
/// margins up to 300), the rows of each loss family merged.
pub fn rows(device: &Device, rng: &mut StdRng, groups: usize) -> Result<Vec<Row>> {
    let mut families: Vec<(&'static str, usize, Vec<Row>)> = Vec::new();
    for (label, spec) in variants() {
        let margin = [1.0, 30.0, 300.0][rng.gen_range(0..3)];
        let batch = LossBatch::random(rng, groups, 9, spec.kind.is_pairwise(), spec.beta, margin);
        let family = if spec.sft_weight > 0.0 {
            "sft anchor"
        } else {
            spec.kind.name()
        };
        let rows = compare_loss(device, &spec, &batch, &label)?;
        match families.iter_mut().find(|(f, _, _)| *f == family) {
            Some((_, count, merged)) => {
                *count += 1;
                for (m, r) in merged.iter_mut().zip(rows) {
                    m.max_abs = m.max_abs.max(r.max_abs);
                    m.max_rel = m.max_rel.max(r.max_rel);
                    m.bound = m.bound.max(r.bound);
                    m.pass &= r.pass;
                }
            }
            None => families.push((family, 1, rows)),
        }
    }
    Ok(families
        .into_iter()
        .flat_map(|(family, count, rows)| {
            rows.into_iter().map(move |mut r| {
                let what = r.op.rsplit(' ').next().unwrap_or("").to_string();
                r.op = format!("loss {family} {what}");
                r.shape = format!("{count} variants x {groups} groups");
                r
            })
        })
        .collect())
}
