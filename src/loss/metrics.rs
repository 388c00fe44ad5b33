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
