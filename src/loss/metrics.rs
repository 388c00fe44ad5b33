//! Per-batch metrics (docs/losses.md §7), named as TRL names them where TRL has a name, with
//! TRL's meaning. Rewards are implicit: `beta·(S − S_ref)` for reference-based losses (as
//! DPOTrainer), `beta·A` for reference-free ones (as CPOTrainer's SimPO); `logps/*` are the
//! statistic the rewards use — S, or under a reference-free loss the length-averaged A, as
//! CPOTrainer logs them for SimPO. For K > 2 "chosen" is the best-rated response and
//! "rejected" the worst; `rewards/rank_j` is the mean reward of the j-th best-rated response.

use super::{best, BatchInput, LossSpec};
use crate::model::ResponseStats;

/// The first index of the minimum reward.
fn worst(rewards: &[f64]) -> usize {
    let mut w = 0;
    for (i, &r) in rewards.iter().enumerate() {
        if r < rewards[w] {
            w = i;
        }
    }
    w
}

fn mean(values: &[f64]) -> f64 {
    if values.is_empty() {
        f64::NAN
    } else {
        values.iter().sum::<f64>() / values.len() as f64
    }
}

pub fn batch_metrics(
    spec: &LossSpec,
    b: &BatchInput,
    stats: &[ResponseStats],
) -> Vec<(String, f64)> {
    let (implicit, logps): (Vec<f64>, &[f64]) = match b.s_ref {
        Some(s_ref) if spec.kind.needs_reference() => (
            b.s.iter()
                .zip(s_ref)
                .map(|(s, r)| spec.beta * (s - r))
                .collect(),
            b.s,
        ),
        _ => (b.a.iter().map(|a| spec.beta * a).collect(), b.a),
    };
    let groups = b.offsets.len() - 1;
    let (mut chosen, mut rejected, mut correct) = (Vec::new(), Vec::new(), Vec::new());
    let (mut logp_chosen, mut logp_rejected) = (Vec::new(), Vec::new());
    let mut by_rank: Vec<Vec<f64>> = Vec::new();
    for g in 0..groups {
        let range = b.offsets[g]..b.offsets[g + 1];
        let r = &b.rewards[range.clone()];
        let rho = &implicit[range.clone()];
        let s = &logps[range];
        let (c, w) = (best(r), worst(r));
        chosen.push(rho[c]);
        rejected.push(rho[w]);
        correct.push(if rho[c] > rho[w] { 1.0 } else { 0.0 });
        logp_chosen.push(s[c]);
        logp_rejected.push(s[w]);
        let mut order: Vec<usize> = (0..r.len()).collect();
        order.sort_by(|&i, &j| r[j].total_cmp(&r[i]));
        for (rank, &i) in order.iter().enumerate() {
            if by_rank.len() <= rank {
                by_rank.push(Vec::new());
            }
            by_rank[rank].push(rho[i]);
        }
    }
    let margins: Vec<f64> = chosen.iter().zip(&rejected).map(|(c, r)| c - r).collect();
    let eos: Vec<f64> = b.e.iter().flatten().map(|e| e.exp()).collect();
    let lengths: Vec<f64> = stats.iter().map(|s| s.tokens as f64).collect();
    let mut values = vec![
        mean(&chosen),
        mean(&rejected),
        mean(&margins),
        mean(&correct),
        mean(&logp_chosen),
        mean(&logp_rejected),
    ];
    values.extend(by_rank.iter().map(|v| mean(v)));
    values.push(mean(&eos));
    values.push(mean(&lengths));
    metric_names(by_rank.len())
        .into_iter()
        .zip(values)
        .collect()
}

/// The names of [`batch_metrics`], in its order, for a batch whose largest group has `ranks`
/// responses.
pub fn metric_names(ranks: usize) -> Vec<String> {
    let mut names: Vec<String> = [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "logps/rejected",
    ]
    .map(String::from)
    .to_vec();
    names.extend((1..=ranks).map(|rank| format!("rewards/rank_{rank}")));
    names.push("eos_prob".to_string());
    names.push("response_len".to_string());
    names
}

/// How many values each mean of [`batch_metrics`] averages, in its order, for a batch whose
/// groups are `offsets` (group `g` is responses `offsets[g]..offsets[g + 1]`) and whose
/// responses end with EOS where `has_eos` says.
pub fn metric_counts(offsets: &[usize], has_eos: &[bool]) -> Vec<f64> {
    let sizes: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
    let ranks = sizes.iter().copied().max().unwrap_or(0);
    let mut counts = vec![sizes.len() as f64; 6];
    counts.extend((1..=ranks).map(|rank| sizes.iter().filter(|&&k| k >= rank).count() as f64));
    counts.push(has_eos.iter().filter(|&&e| e).count() as f64);
    counts.push(has_eos.len() as f64);
    counts
}

/// Metrics of several batches combined: each batch's mean weighted by how many values it
/// averaged, which gives a step's micro-batches the metrics of all the step's groups at once.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MetricTotals {
    /// The largest group seen: how many `rewards/rank_j` there are.
    ranks: usize,
    /// Name, the sum of the values behind the means, and their count.
    totals: Vec<(String, f64, f64)>,
}

impl MetricTotals {
    /// One batch's metrics: `means` as [`batch_metrics`] names them (the names of
    /// [`metric_names`]), `counts` as [`metric_counts`] gives them.
    pub fn new(means: Vec<(String, f64)>, counts: &[f64]) -> Self {
        let ranks = means
            .iter()
            .filter(|(name, _)| name.starts_with("rewards/rank_"))
            .count();
        let totals = means
            .into_iter()
            .zip(counts)
            .filter(|(_, &count)| count > 0.0)
            .map(|((name, mean), &count)| (name, mean * count, count))
            .collect();
        MetricTotals { ranks, totals }
    }

    pub fn merge(&mut self, other: MetricTotals) {
        self.ranks = self.ranks.max(other.ranks);
        for (name, sum, count) in other.totals {
            match self.totals.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, s, c)) => {
                    *s += sum;
                    *c += count;
                }
                None => self.totals.push((name, sum, count)),
            }
        }
    }

    /// The means, in [`metric_names`]' order; NaN where no batch had a value.
    pub fn means(&self) -> Vec<(String, f64)> {
        metric_names(self.ranks)
            .into_iter()
            .map(|name| {
                let mean = self
                    .totals
                    .iter()
                    .find(|(n, _, _)| *n == name)
                    .map_or(f64::NAN, |(_, sum, count)| sum / count);
                (name, mean)
            })
            .collect()
    }
}
