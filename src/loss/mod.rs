//! Per-group contrastive losses (losses.md) and their closed-form gradients with respect to
//! the group's statistics. Each loss is a pure function of one group, in f64, so that a
//! device kernel can mirror it line for line.

mod numeric;

use anyhow::{bail, Result};
use numeric::{log_sigmoid, sigmoid, soft_labels};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    Sft,
    Nca,
    Dpo,
}

impl LossKind {
    pub const NAMES: &'static [&'static str] = &["sft", "nca", "dpo"];

    pub fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "sft" => LossKind::Sft,
            "nca" => LossKind::Nca,
            "dpo" => LossKind::Dpo,
            other => bail!("unknown loss {other:?}; expected one of {:?}", Self::NAMES),
        })
    }

    /// The default `beta`: the NCA paper's 0.01 for NCA (UltraFeedback), DPO's and TRL's 0.1.
    pub fn default_beta(self) -> f64 {
        match self {
            LossKind::Nca => 0.01,
            LossKind::Dpo | LossKind::Sft => 0.1,
        }
    }

    /// Whether the loss reads `S^ref` (and so needs a reference model).
    pub fn needs_reference(self) -> bool {
        matches!(self, LossKind::Nca | LossKind::Dpo)
    }
}

/// A loss with its hyperparameters (names and meanings of losses.md).
#[derive(Clone, Debug)]
pub struct LossSpec {
    pub kind: LossKind,
    pub beta: f64,
    pub alpha: f64,
    pub label_smoothing: f64,
}

impl LossSpec {
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            bail!("--beta must be a positive number, found {}", self.beta);
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            bail!("--alpha must be >= 0, found {}", self.alpha);
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            bail!(
                "--label-smoothing must be in [0, 0.5), found {}",
                self.label_smoothing
            );
        }
        Ok(())
    }
}

/// One group's statistics (losses.md §1). `e[i]` is `None` for a truncated response.
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
}

/// The first index of the maximum reward.
fn best(rewards: &[f64]) -> usize {
    let mut b = 0;
    for (i, &r) in rewards.iter().enumerate() {
        if r > rewards[b] {
            b = i;
        }
    }
    b
}

fn implicit_rewards(spec: &LossSpec, g: &GroupInput) -> Result<Vec<f64>> {
    let Some(s_ref) = g.s_ref else {
        bail!("loss needs reference log-probs (S^ref) and none were given");
    };
    Ok(g.s
        .iter()
        .zip(s_ref)
        .map(|(s, r)| spec.beta * (s - r))
        .collect())
}

pub fn group_loss(spec: &LossSpec, g: &GroupInput) -> Result<GroupOutput> {
    let k = g.s.len();
    match spec.kind {
        LossKind::Sft => {
            let b = best(g.rewards);
            let mut out = GroupOutput::zeros(-g.a[b], k);
            out.d_a[b] = -1.0;
            Ok(out)
        }
        LossKind::Nca => {
            let rho = implicit_rewards(spec, g)?;
            let q = soft_labels(g.rewards, spec.alpha);
            let kf = k as f64;
            let mut out = GroupOutput::zeros(0.0, k);
            for i in 0..k {
                out.loss -= q[i] * log_sigmoid(rho[i]) + log_sigmoid(-rho[i]) / kf;
                let d_rho = -q[i] * sigmoid(-rho[i]) + sigmoid(rho[i]) / kf;
                out.d_s[i] = spec.beta * d_rho;
            }
            Ok(out)
        }
        LossKind::Dpo => {
            if k != 2 {
                bail!("dpo is pairwise and needs exactly 2 responses per group, found {k}");
            }
            let rho = implicit_rewards(spec, g)?;
            let eps = spec.label_smoothing;
            let z = rho[0] - rho[1];
            let mut out =
                GroupOutput::zeros(-(1.0 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z), k);
            let dz = -(1.0 - eps) * sigmoid(-z) + eps * sigmoid(z);
            out.d_s[0] = spec.beta * dz;
            out.d_s[1] = -spec.beta * dz;
            Ok(out)
        }
    }
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
        if r.len() < 2 {
            bail!(
                "{}: the loss needs a group of at least 2 responses, found {}",
                b.sources[g],
                r.len()
            );
        }
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
