//! Per-group contrastive losses (docs/losses.md) and their closed-form gradients with respect to
//! the group's statistics. Each loss is a pure function of one group, in f64, so that a
//! device kernel can mirror it line for line.

pub mod metrics;
pub mod numeric;

use anyhow::{bail, Result};
use numeric::{log_sigmoid, log_sum_exp, max_and_log_sum_exp, sigmoid, soft_labels};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    Infonca,
    Nca,
    Dpo,
    NcaPair,
    Simpo,
    Refa,
    InfoncaFree,
    Sft,
}

impl LossKind {
    pub const NAMES: &'static [&'static str] = &[
        "infonca",
        "nca",
        "dpo",
        "nca_pair",
        "simpo",
        "refa",
        "infonca_free",
        "sft",
    ];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "infonca" => LossKind::Infonca,
            "nca" => LossKind::Nca,
            "dpo" => LossKind::Dpo,
            "nca_pair" => LossKind::NcaPair,
            "simpo" => LossKind::Simpo,
            "refa" => LossKind::Refa,
            "infonca_free" => LossKind::InfoncaFree,
            "sft" => LossKind::Sft,
            other => bail!("unknown loss {other:?}; expected one of {:?}", Self::NAMES),
        })
    }

    pub fn name(self) -> &'static str {
        Self::NAMES[self as usize]
    }

    /// Whether the loss reads `S^ref` (and so needs a reference model).
    pub fn needs_reference(self) -> bool {
        matches!(
            self,
            LossKind::Infonca | LossKind::Nca | LossKind::Dpo | LossKind::NcaPair
        )
    }

    /// Whether the loss is defined on pairs only (K = 2, response 0 chosen).
    pub fn is_pairwise(self) -> bool {
        matches!(self, LossKind::Dpo | LossKind::NcaPair | LossKind::Simpo)
    }

    /// The papers' defaults (docs/losses.md): `(beta, alpha, gamma, lambda)`.
    /// NCA/InfoNCA: beta 0.01, alpha 0.01 (NCA repo, UltraFeedback); DPO and NCA-pair:
    /// beta 0.1 (DPO paper, TRL); SimPO: beta 2.0, gamma 1.6 (Mistral-7B-Base); REFA:
    /// beta 3.0, alpha 0.01, gamma 2.0, lambda 5e-5 (v4, Mistral-7B base; one-vs-all beta 2.0).
    pub fn defaults(self, one_vs_all: bool) -> (f64, f64, f64, f64) {
        match self {
            LossKind::Infonca | LossKind::Nca => (0.01, 0.01, 1.0, 0.0),
            LossKind::Dpo | LossKind::NcaPair | LossKind::Sft => (0.1, 0.01, 1.0, 0.0),
            LossKind::Simpo => (2.0, 0.01, 1.6, 0.0),
            LossKind::Refa if one_vs_all => (2.0, 0.01, 2.0, 5e-5),
            LossKind::Refa => (3.0, 0.01, 2.0, 5e-5),
            LossKind::InfoncaFree => (3.0, 0.01, 1.0, 5e-5),
        }
    }
}

/// A loss with its hyperparameters (names and meanings of docs/losses.md).
#[derive(Clone, Debug)]
pub struct LossSpec {
    pub kind: LossKind,
    pub beta: f64,
    pub alpha: f64,
    /// SimPO margin; REFA negative over-weighting.
    pub gamma: f64,
    /// REFA deviation exponent, 1 or 2.
    pub p: u32,
    /// Weight of the EOS regularizer (REFA, REFA-InfoNCA).
    pub lambda: f64,
    pub label_smoothing: f64,
    pub one_vs_all: bool,
    /// REFA scores with `A` (true) or `S` (false).
    pub normalize: bool,
    /// Weight of the `sft` anchor added to the loss (docs/losses.md §4).
    pub sft_weight: f64,
}

impl LossSpec {
    /// The spec of `kind` with the papers' defaults.
    pub fn new(kind: LossKind) -> Self {
        let (beta, alpha, gamma, lambda) = kind.defaults(false);
        LossSpec {
            kind,
            beta,
            alpha,
            gamma,
            p: 2,
            lambda,
            label_smoothing: 0.0,
            one_vs_all: false,
            normalize: true,
            sft_weight: 0.0,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            bail!("--beta must be a positive number, found {}", self.beta);
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            bail!("--alpha must be >= 0, found {}", self.alpha);
        }
        if matches!(self.kind, LossKind::Refa) && !(self.gamma.is_finite() && self.gamma > 0.0) {
            bail!("--gamma must be > 0 for refa, found {}", self.gamma);
        }
        if matches!(self.kind, LossKind::Simpo) && !self.gamma.is_finite() {
            bail!("--gamma must be a finite number, found {}", self.gamma);
        }
        if !matches!(self.p, 1 | 2) {
            bail!("--p must be 1 or 2, found {}", self.p);
        }
        if !(self.lambda.is_finite() && self.lambda >= 0.0) {
            bail!("--lambda must be >= 0, found {}", self.lambda);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!(
                "--label-smoothing must be in [0, 0.5), found {}",
                self.label_smoothing
            );
        }
        if !(self.sft_weight.is_finite() && self.sft_weight >= 0.0) {
            bail!("--sft-weight must be >= 0, found {}", self.sft_weight);
        }
        Ok(())
    }
}

/// One group's statistics (docs/losses.md §1). `e[i]` is `None` for a truncated response.
pub struct GroupInput<'a> {
    pub s: &'a [f64],
    pub a: &'a [f64],
    pub e: &'a [Option<f64>],
    pub s_ref: Option<&'a [f64]>,
    pub rewards: &'a [f64],
}

/// One group's loss and its gradient with respect to `S`, `A` and `E`.
#[derive(Clone, Debug, PartialEq)]
pub struct GroupOutput {
    pub loss: f64,
    pub d_s: Vec<f64>,
    pub d_a: Vec<f64>,
    pub d_e: Vec<f64>,
}

impl GroupOutput {
    fn zeros(loss: f64, k: usize) -> Self {
        GroupOutput {
            loss,
            d_s: vec![0.0; k],
            d_a: vec![0.0; k],
            d_e: vec![0.0; k],
        }
    }

    fn add(&mut self, other: &GroupOutput, weight: f64) {
        self.loss += weight * other.loss;
        for (dst, src) in [
            (&mut self.d_s, &other.d_s),
            (&mut self.d_a, &other.d_a),
            (&mut self.d_e, &other.d_e),
        ] {
            dst.iter_mut().zip(src).for_each(|(d, s)| *d += weight * s);
        }
    }
}

/// The first index of the maximum reward.
pub fn best(rewards: &[f64]) -> usize {
    let mut b = 0;
    for (i, &r) in rewards.iter().enumerate() {
        if r > rewards[b] {
            b = i;
        }
    }
    b
}

fn reference<'a>(spec: &LossSpec, s_ref: Option<&'a [f64]>) -> Result<&'a [f64]> {
    match s_ref {
        Some(s_ref) => Ok(s_ref),
        None => bail!(
            "loss {} needs reference log-probs (S^ref) and none were given",
            spec.kind.name()
        ),
    }
}

fn implicit_rewards(spec: &LossSpec, g: &GroupInput) -> Result<Vec<f64>> {
    let s_ref = reference(spec, g.s_ref)?;
    Ok(g.s
        .iter()
        .zip(s_ref)
        .map(|(s, r)| spec.beta * (s - r))
        .collect())
}

fn require_pair(spec: &LossSpec, k: usize) -> Result<()> {
    if k != 2 {
        bail!(
            "{} is pairwise and needs exactly 2 responses per group, found {k}; turn reward \
             groups into pairs with --pairs best_vs_random|best_vs_each|all_pairs",
            spec.kind.name()
        );
    }
    Ok(())
}

/// The errors [`batch_loss`] reports for a group of `k` responses, before computing
/// anything: too few responses, a pairwise loss on more than a pair, no reference statistics
/// for a loss that needs them.
pub fn check_group(spec: &LossSpec, k: usize, has_reference: bool) -> Result<()> {
    if k < 2 {
        bail!("the loss needs a group of at least 2 responses, found {k}");
    }
    if spec.kind.is_pairwise() {
        require_pair(spec, k)?;
    }
    if spec.kind.needs_reference() {
        reference(spec, has_reference.then_some(&[][..]))?;
    }
    Ok(())
}

/// `-Σ q_i log softmax(x)_i` and its gradient `softmax(x) - q` with respect to `x`, the
/// latter as `softmax_i Σ_{j≠i} q_j - q_i Σ_{j≠i} softmax_j` so that it keeps its tiny values
/// at margins of hundreds (where `softmax_i - q_i` would cancel to 0).
fn soft_cross_entropy(x: &[f64], q: &[f64]) -> (f64, Vec<f64>) {
    let (max, shifted) = max_and_log_sum_exp(x);
    let lse = max + shifted;
    // `lse - x_i` as `(max - x_i) + shifted`: exact for the dominant term.
    let loss = x
        .iter()
        .zip(q)
        .filter(|(_, &qi)| qi > 0.0)
        .map(|(xi, qi)| qi * ((max - xi) + shifted))
        .sum::<f64>();
    let softmax: Vec<f64> = x.iter().map(|xi| (xi - lse).exp()).collect();
    let grad = (0..x.len())
        .map(|i| {
            let others = |v: &[f64]| -> f64 {
                v.iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i)
                    .map(|(_, x)| x)
                    .sum()
            };
            softmax[i] * others(q) - q[i] * others(&softmax)
        })
        .collect();
    (loss, grad)
}

/// `R_eos = λ Σ exp(E_i)` over the responses that end with EOS, with `dR/dE_i`.
fn eos_regularizer(lambda: f64, e: &[Option<f64>], out: &mut GroupOutput) {
    for (i, ei) in e.iter().enumerate() {
        if let Some(ei) = ei {
            let p = ei.exp();
            out.loss += lambda * p;
            out.d_e[i] += lambda * p;
        }
    }
}

/// REFA's preference term of one group (docs/losses.md §3): which responses are positive, their
/// scores `beta (x_i + alpha D_i)`, the scores with the negatives' shifted by `ln(gamma)`, and
/// the log-sum-exps over the positives' scores and over all shifted scores.
pub struct RefaTerms {
    pub positive: Vec<bool>,
    pub score: Vec<f64>,
    pub shifted: Vec<f64>,
    pub lse_pos: f64,
    pub lse_all: f64,
}

/// [`RefaTerms`] of a group; `None` when it has no positive: with every reward equal,
/// REFA-dynamic has none and only R_eos remains (one-vs-all always has its one positive).
pub fn refa_terms(spec: &LossSpec, g: &GroupInput) -> Option<RefaTerms> {
    let k = g.s.len();
    let r = g.rewards;
    let mean = r.iter().sum::<f64>() / k as f64;
    let b = best(r);
    let positive: Vec<bool> = (0..k)
        .map(|i| if spec.one_vs_all { i == b } else { r[i] > mean })
        .collect();
    if !positive.contains(&true) {
        return None;
    }
    let x = if spec.normalize { g.a } else { g.s };
    let score: Vec<f64> = (0..k)
        .map(|i| spec.beta * (x[i] + spec.alpha * (r[i] - mean).powi(spec.p as i32)))
        .collect();
    // Negatives enter the denominator with weight gamma: shift their scores by ln(gamma).
    let shifted: Vec<f64> = (0..k)
        .map(|i| {
            if positive[i] {
                score[i]
            } else {
                score[i] + spec.gamma.ln()
            }
        })
        .collect();
    let pos: Vec<f64> = (0..k).filter(|&i| positive[i]).map(|i| score[i]).collect();
    Some(RefaTerms {
        lse_pos: log_sum_exp(&pos),
        lse_all: log_sum_exp(&shifted),
        positive,
        score,
        shifted,
    })
}

/// REFA (docs/losses.md §3): the preference term and the EOS regularizer.
fn refa(spec: &LossSpec, g: &GroupInput) -> GroupOutput {
    let k = g.s.len();
    let mut out = GroupOutput::zeros(0.0, k);
    if let Some(t) = refa_terms(spec, g) {
        out.loss = t.lse_all - t.lse_pos;
        for i in 0..k {
            let mut d = (t.shifted[i] - t.lse_all).exp();
            if t.positive[i] {
                d -= (t.score[i] - t.lse_pos).exp();
            }
            let dx = spec.beta * d;
            if spec.normalize {
                out.d_a[i] = dx;
            } else {
                out.d_s[i] = dx;
            }
        }
    }
    eos_regularizer(spec.lambda, g.e, &mut out);
    out
}

/// The per-group loss without the `sft` anchor.
fn base_loss(spec: &LossSpec, g: &GroupInput) -> Result<GroupOutput> {
    let k = g.s.len();
    Ok(match spec.kind {
        LossKind::Sft => {
            let b = best(g.rewards);
            let mut out = GroupOutput::zeros(-g.a[b], k);
            out.d_a[b] = -1.0;
            out
        }
        LossKind::Infonca => {
            let rho = implicit_rewards(spec, g)?;
            let (loss, d_rho) = soft_cross_entropy(&rho, &soft_labels(g.rewards, spec.alpha));
            let mut out = GroupOutput::zeros(loss, k);
            out.d_s = d_rho.iter().map(|d| spec.beta * d).collect();
            out
        }
        LossKind::Nca => {
            let rho = implicit_rewards(spec, g)?;
            nca(spec.beta, &rho, &soft_labels(g.rewards, spec.alpha))
        }
        LossKind::NcaPair => {
            require_pair(spec, k)?;
            nca(spec.beta, &implicit_rewards(spec, g)?, &[1.0, 0.0])
        }
        LossKind::Dpo => {
            require_pair(spec, k)?;
            let rho = implicit_rewards(spec, g)?;
            let eps = spec.label_smoothing;
            let z = rho[0] - rho[1];
            let mut out =
                GroupOutput::zeros(-(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z), k);
            let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
            out.d_s[0] = spec.beta * dz;
            out.d_s[1] = -spec.beta * dz;
            out
        }
        LossKind::Simpo => {
            require_pair(spec, k)?;
            let z = spec.beta * (g.a[0] - g.a[1]) - spec.gamma;
            let mut out = GroupOutput::zeros(-log_sigmoid(z), k);
            let dz = -sigmoid(-z);
            out.d_a[0] = spec.beta * dz;
            out.d_a[1] = -spec.beta * dz;
            out
        }
        LossKind::Refa => refa(spec, g),
        LossKind::InfoncaFree => {
            let x: Vec<f64> = g.a.iter().map(|a| spec.beta * a).collect();
            let (loss, dx) = soft_cross_entropy(&x, &soft_labels(g.rewards, spec.alpha));
            let mut out = GroupOutput::zeros(loss, k);
            out.d_a = dx.iter().map(|d| spec.beta * d).collect();
            eos_regularizer(spec.lambda, g.e, &mut out);
            out
        }
    })
}

/// NCA with soft labels `q`: `-Σ q_i log σ(ρ_i) - (1/K) Σ log σ(-ρ_i)`.
fn nca(beta: f64, rho: &[f64], q: &[f64]) -> GroupOutput {
    let k = rho.len();
    let kf = k as f64;
    let mut out = GroupOutput::zeros(0.0, k);
    for i in 0..k {
        out.loss -= q[i] * log_sigmoid(rho[i]) + log_sigmoid(-rho[i]) / kf;
        let d_rho = -q[i] * sigmoid(-rho[i]) + sigmoid(rho[i]) / kf;
        out.d_s[i] = beta * d_rho;
    }
    out
}

/// One group's loss (with the `sft` anchor when `sft_weight > 0`) and its gradient.
pub fn group_loss(spec: &LossSpec, g: &GroupInput) -> Result<GroupOutput> {
    let mut out = base_loss(spec, g)?;
    if spec.sft_weight > 0.0 && spec.kind != LossKind::Sft {
        let anchor = base_loss(
            &LossSpec {
                kind: LossKind::Sft,
                ..spec.clone()
            },
            g,
        )?;
        out.add(&anchor, spec.sft_weight);
    }
    Ok(out)
}

/// The loss of a batch: the mean over its groups, with gradients per response.
#[derive(Clone, Debug)]
pub struct BatchOutput {
    pub loss: f64,
    pub per_group: Vec<f64>,
    pub d_s: Vec<f64>,
    pub d_a: Vec<f64>,
    pub d_e: Vec<f64>,
}

/// Statistics of all responses of a batch, grouped by `offsets`.
pub struct BatchInput<'a> {
    pub s: &'a [f64],
    pub a: &'a [f64],
    pub e: &'a [Option<f64>],
    pub s_ref: Option<&'a [f64]>,
    pub rewards: &'a [f64],
    pub offsets: &'a [usize],
    /// `file:line` of each group, for errors.
    pub sources: &'a [String],
}

pub fn batch_loss(spec: &LossSpec, b: &BatchInput) -> Result<BatchOutput> {
    let groups = b.offsets.len() - 1;
    let n = b.s.len();
    let mut out = BatchOutput {
        loss: 0.0,
        per_group: Vec::with_capacity(groups),
        d_s: vec![0.0; n],
        d_a: vec![0.0; n],
        d_e: vec![0.0; n],
    };
    for g in 0..groups {
        let r = b.offsets[g]..b.offsets[g + 1];
        check_group(spec, r.len(), b.s_ref.is_some())
            .map_err(|e| e.context(b.sources[g].clone()))?;
        let input = GroupInput {
            s: &b.s[r.clone()],
            a: &b.a[r.clone()],
            e: &b.e[r.clone()],
            s_ref: b.s_ref.map(|x| &x[r.clone()]),
            rewards: &b.rewards[r.clone()],
        };
        let go = group_loss(spec, &input).map_err(|e| e.context(b.sources[g].clone()))?;
        let scale = 1.0 / groups as f64;
        out.loss += go.loss * scale;
        out.per_group.push(go.loss);
        for (j, i) in r.enumerate() {
            out.d_s[i] = go.d_s[j] * scale;
            out.d_a[i] = go.d_a[j] * scale;
            out.d_e[i] = go.d_e[j] * scale;
        }
    }
    Ok(out)
}
