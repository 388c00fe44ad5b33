//! Reward-to-pairs strategies and the batch metrics, on hand-checked groups.

use contralign::data::pairs::{chosen_first, to_pairs, PairStrategy};
use contralign::data::Group;
use contralign::loss::metrics::{batch_metrics, metric_counts, MetricTotals};
use contralign::loss::{BatchInput, LossKind, LossSpec};
use contralign::model::ResponseStats;

fn group(rewards: &[f64]) -> Group {
    Group {
        prompt: vec![1],
        responses: (0..rewards.len() as u32).map(|i| vec![10 + i, 2]).collect(),
        rewards: rewards.to_vec(),
        source: "test:1".into(),
    }
}

/// Each pair as (chosen response's first token − 10, rejected's).
fn indices(pairs: &[Group]) -> Vec<(u32, u32)> {
    pairs
        .iter()
        .map(|p| {
            assert_eq!(p.rewards, vec![1.0, 0.0]);
            (p.responses[0][0] - 10, p.responses[1][0] - 10)
        })
        .collect()
}

#[test]
fn a_pairwise_loss_reads_a_group_of_two_better_first() {
    let better_first = group(&[0.9, 0.2]);
    assert_eq!(
        chosen_first(better_first.clone(), "dpo").unwrap(),
        better_first
    );
    let better_second = chosen_first(group(&[0.2, 0.9]), "dpo").unwrap();
    assert_eq!(indices(&[better_second]), vec![(1, 0)]);
    let tied = chosen_first(group(&[0.5, 0.5]), "dpo")
        .unwrap_err()
        .to_string();
    assert!(
        tied.starts_with("test:1: dpo needs a chosen and a rejected response, but the two rewards are equal (0.5)"),
        "{tied}"
    );
}

#[test]
fn pair_strategies() {
    let groups = vec![group(&[3.0, 5.0, 5.0, 1.0]), group(&[2.0, 2.0])];
    assert_eq!(
        indices(&to_pairs(&groups, PairStrategy::BestVsEach, 0)),
        vec![(1, 0), (1, 3)]
    );
    assert_eq!(
        indices(&to_pairs(&groups, PairStrategy::AllPairs, 0)),
        vec![(1, 0), (2, 0), (0, 3), (1, 3), (2, 3)]
    );
    let mut seen = std::collections::BTreeSet::new();
    for seed in 0..64 {
        let pairs = indices(&to_pairs(&groups, PairStrategy::BestVsRandom, seed));
        assert_eq!(pairs.len(), 1, "the all-tied group gives no pair");
        assert_eq!(pairs[0].0, 1);
        assert_eq!(
            pairs,
            indices(&to_pairs(&groups, PairStrategy::BestVsRandom, seed)),
            "seeded"
        );
        seen.insert(pairs[0].1);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        vec![0, 3],
        "only worse responses, both drawn"
    );
}

/// The hand-computed batch: two groups (3 and 2 responses), reference-based.
fn hand_batch() -> HandBatch {
    let s = [-2.0, -4.0, -9.0, -3.0, -1.0];
    let s_ref = [-3.0, -3.0, -3.0, -2.0, -2.0];
    let n = [2.0, 4.0, 3.0, 1.0, 2.0];
    let a: Vec<f64> = s.iter().zip(&n).map(|(s, n)| s / n).collect();
    let e = [
        Some((0.5f64).ln()),
        None,
        Some((0.25f64).ln()),
        Some((0.75f64).ln()),
        None,
    ];
    let rewards = [5.0, 7.0, 1.0, 0.0, 4.0];
    let offsets = [0, 3, 5];
    let sources = ["a:1".to_string(), "a:2".to_string()];
    let stats: Vec<ResponseStats> = (0..5)
        .map(|i| ResponseStats {
            logp_sum: s[i],
            tokens: n[i] as usize,
            logp_mean: a[i],
            eos_logp: e[i],
        })
        .collect();
    HandBatch {
        s: s.to_vec(),
        s_ref: s_ref.to_vec(),
        a,
        e: e.to_vec(),
        rewards: rewards.to_vec(),
        offsets: offsets.to_vec(),
        sources: sources.to_vec(),
        stats,
    }
}

struct HandBatch {
    s: Vec<f64>,
    s_ref: Vec<f64>,
    a: Vec<f64>,
    e: Vec<Option<f64>>,
    rewards: Vec<f64>,
    offsets: Vec<usize>,
    sources: Vec<String>,
    stats: Vec<ResponseStats>,
}

impl HandBatch {
    fn input(&self) -> BatchInput<'_> {
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

    /// Responses `range` (whole groups) as a batch of their own.
    fn part(&self, range: std::ops::Range<usize>) -> HandBatch {
        let first = range.start;
        HandBatch {
            s: self.s[range.clone()].to_vec(),
            s_ref: self.s_ref[range.clone()].to_vec(),
            a: self.a[range.clone()].to_vec(),
            e: self.e[range.clone()].to_vec(),
            rewards: self.rewards[range.clone()].to_vec(),
            offsets: self
                .offsets
                .iter()
                .filter(|&&o| range.contains(&o) || o == range.end)
                .map(|o| o - first)
                .collect(),
            sources: vec!["part".into(); 1],
            stats: self.stats[range].to_vec(),
        }
    }
}

#[test]
fn metrics_of_a_hand_computed_batch() {
    let batch = hand_batch();
    let (input, stats) = (batch.input(), &batch.stats);

    let spec = LossSpec {
        beta: 0.5,
        ..LossSpec::new(LossKind::Nca)
    };
    let m: std::collections::HashMap<String, f64> =
        batch_metrics(&spec, &input, stats).into_iter().collect();
    // rho = 0.5 (S - S_ref) = [0.5, -0.5, -3, -0.5, 0.5]; group 0 best 1, worst 2; group 1
    // best 1 (reward 4), worst 0.
    let want = [
        ("rewards/chosen", (-0.5 + 0.5) / 2.0),
        ("rewards/rejected", (-3.0 - 0.5) / 2.0),
        ("rewards/margins", (2.5 + 1.0) / 2.0),
        ("rewards/accuracies", 1.0),
        ("logps/chosen", (-4.0 - 1.0) / 2.0),
        ("logps/rejected", (-9.0 - 3.0) / 2.0),
        ("rewards/rank_1", 0.0),
        ("rewards/rank_2", (0.5 - 0.5) / 2.0),
        ("rewards/rank_3", -3.0),
        ("eos_prob", 0.5),
        ("response_len", 12.0 / 5.0),
    ];
    for (key, value) in want {
        assert!(
            (m[key] - value).abs() < 1e-12,
            "{key}: {} vs {value}",
            m[key]
        );
    }
    // Reference-free losses report beta·A, and as CPOTrainer under SimPO the length-averaged
    // log-probs A as logps/*: chosen A = -4/4, -1/2; rejected A = -9/3, -3/1.
    let spec = LossSpec {
        beta: 2.0,
        ..LossSpec::new(LossKind::Simpo)
    };
    let m: std::collections::HashMap<String, f64> =
        batch_metrics(&spec, &input, stats).into_iter().collect();
    assert!((m["rewards/chosen"] - (-2.0 - 1.0) / 2.0).abs() < 1e-12);
    assert!((m["logps/chosen"] - (-1.0 - 0.5) / 2.0).abs() < 1e-12);
    assert!((m["logps/rejected"] - (-3.0 - 3.0) / 2.0).abs() < 1e-12);
}

/// A step's metrics from its micro-batches' (each mean weighted by how many values it
/// averaged) equal the metrics of all its groups at once, whatever the split: here the
/// groups of 3 and 2 responses apart, which have different rank and EOS counts.
#[test]
fn micro_batch_metrics_combine_into_the_whole_batch() {
    let whole = hand_batch();
    let spec = LossSpec {
        beta: 0.5,
        ..LossSpec::new(LossKind::Nca)
    };
    let totals_of = |b: &HandBatch| {
        let has_eos: Vec<bool> = b.e.iter().map(Option::is_some).collect();
        MetricTotals::new(
            batch_metrics(&spec, &b.input(), &b.stats),
            &metric_counts(&b.offsets, &has_eos),
        )
    };
    let want = batch_metrics(&spec, &whole.input(), &whole.stats);
    for split in [[3..5, 0..3], [0..3, 3..5]] {
        let mut totals = MetricTotals::default();
        for part in split {
            let part = whole.part(part);
            assert_eq!(part.offsets.len(), 2, "one group per part");
            totals.merge(totals_of(&part));
        }
        let got = totals.means();
        assert_eq!(
            got.iter().map(|(n, _)| n).collect::<Vec<_>>(),
            want.iter().map(|(n, _)| n).collect::<Vec<_>>()
        );
        for ((name, g), (_, w)) in got.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-12 * w.abs().max(1.0),
                "{name}: {g} vs {w}"
            );
        }
    }
    // One batch alone gives its own means back.
    let alone = totals_of(&whole).means();
    for ((name, g), (_, w)) in alone.iter().zip(&want) {
        assert!(
            (g - w).abs() <= 1e-12 * w.abs().max(1.0),
            "{name}: {g} vs {w}"
        );
    }
}
