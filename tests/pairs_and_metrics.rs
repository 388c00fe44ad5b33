//! Reward-to-pairs strategies and the batch metrics, on hand-checked groups.

use contralign::data::pairs::{to_pairs, PairStrategy};
use contralign::data::Group;
use contralign::loss::metrics::batch_metrics;
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

#[test]
fn metrics_of_a_hand_computed_batch() {
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
    let input = BatchInput {
        s: &s,
        a: &a,
        e: &e,
        s_ref: Some(&s_ref),
        rewards: &rewards,
        offsets: &offsets,
        sources: &sources,
    };
    let spec = LossSpec {
        beta: 0.5,
        ..LossSpec::new(LossKind::Nca)
    };
    let m: std::collections::HashMap<String, f64> =
        batch_metrics(&spec, &input, &stats).into_iter().collect();
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
        batch_metrics(&spec, &input, &stats).into_iter().collect();
    assert!((m["rewards/chosen"] - (-2.0 - 1.0) / 2.0).abs() < 1e-12);
    assert!((m["logps/chosen"] - (-1.0 - 0.5) / 2.0).abs() < 1e-12);
    assert!((m["logps/rejected"] - (-3.0 - 3.0) / 2.0).abs() < 1e-12);
}
