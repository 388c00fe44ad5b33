//! Properties of the loss library on random statistics: the identities of docs/losses.md,
//! closed-form gradients against finite differences (margins of ±500, alpha → 0, ragged K),
//! finiteness, and clear errors for bad hyperparameters.

mod common;

use common::rng;
use contralign::loss::{group_loss, GroupInput, GroupOutput, LossKind, LossSpec};
use rand::Rng;

struct Stats {
    s: Vec<f64>,
    a: Vec<f64>,
    e: Vec<Option<f64>>,
    s_ref: Vec<f64>,
    r: Vec<f64>,
}

impl Stats {
    fn input(&self) -> GroupInput<'_> {
        GroupInput {
            s: &self.s,
            a: &self.a,
            e: &self.e,
            s_ref: Some(&self.s_ref),
            rewards: &self.r,
        }
    }
}

/// A random group of `k` responses whose implicit-reward margins reach `scale`.
fn random_stats(rng: &mut impl Rng, k: usize, scale: f64) -> Stats {
    let s: Vec<f64> = (0..k)
        .map(|_| -rng.gen_range(1.0..scale.max(2.0)))
        .collect();
    let n: Vec<f64> = (0..k).map(|_| rng.gen_range(1..40) as f64).collect();
    Stats {
        a: s.iter().zip(&n).map(|(s, n)| s / n).collect(),
        e: (0..k)
            .map(|_| rng.gen_bool(0.7).then(|| -rng.gen_range(0.01..8.0)))
            .collect(),
        s_ref: s.iter().map(|x| x + rng.gen_range(-scale..scale)).collect(),
        r: (0..k).map(|_| rng.gen_range(0..5) as f64 * 2.0).collect(),
        s,
    }
}

fn random_spec(rng: &mut impl Rng, kind: LossKind) -> LossSpec {
    LossSpec {
        beta: [0.01, 0.1, 1.0, 2.0][rng.gen_range(0..4)],
        alpha: [0.0, 1e-6, 0.01, 0.5, 2.0][rng.gen_range(0..5)],
        gamma: rng.gen_range(0.1..3.0),
        p: rng.gen_range(1..=2),
        lambda: rng.gen_range(0.0..0.5),
        label_smoothing: rng.gen_range(0.0..0.4),
        one_vs_all: rng.gen_bool(0.5),
        normalize: rng.gen_bool(0.5),
        sft_weight: if rng.gen_bool(0.3) {
            rng.gen_range(0.0..1.0)
        } else {
            0.0
        },
        ..LossSpec::new(kind)
    }
}

fn finite(out: &GroupOutput) -> bool {
    out.loss.is_finite()
        && out
            .d_s
            .iter()
            .chain(&out.d_a)
            .chain(&out.d_e)
            .all(|x| x.is_finite())
}

#[test]
fn dpo_is_infonca_and_nca_pair_is_nca_at_k2_alpha0() {
    let mut rng = rng("dpo_is_infonca_and_nca_pair_is_nca_at_k2_alpha0");
    for _ in 0..200 {
        let mut st = random_stats(&mut rng, 2, 500.0);
        st.r = vec![1.0, 0.0];
        let beta = rng.gen_range(0.01..2.0);
        let spec = |kind| LossSpec {
            beta,
            alpha: 0.0,
            ..LossSpec::new(kind)
        };
        for (pair, general) in [
            (LossKind::Dpo, LossKind::Infonca),
            (LossKind::NcaPair, LossKind::Nca),
        ] {
            let a = group_loss(&spec(pair), &st.input()).unwrap();
            let b = group_loss(&spec(general), &st.input()).unwrap();
            assert!(
                (a.loss - b.loss).abs() <= 1e-12 * b.loss.abs().max(1.0),
                "{pair:?}: {a:?} vs {b:?}"
            );
            for (x, y) in a.d_s.iter().zip(&b.d_s) {
                assert!(
                    (x - y).abs() <= 1e-12 * y.abs().max(1e-300),
                    "{pair:?}: {a:?} vs {b:?}"
                );
            }
        }
    }
}

/// Central differences of the group loss in each of S, A and E.
#[test]
fn closed_form_gradients_agree_with_finite_differences() {
    let mut rng = rng("closed_form_gradients_agree_with_finite_differences");
    let kinds = LossKind::NAMES.iter().map(|n| LossKind::parse(n).unwrap());
    for kind in kinds {
        for trial in 0..150 {
            let k = if kind.is_pairwise() {
                2
            } else {
                rng.gen_range(2..=7)
            };
            let scale = [1.0, 30.0, 500.0][trial % 3];
            let st = random_stats(&mut rng, k, scale);
            let spec = random_spec(&mut rng, kind);
            spec.validate().unwrap();
            let out = group_loss(&spec, &st.input()).unwrap();
            assert!(finite(&out), "{kind:?} {spec:?}: {out:?}");
            // Finite differences are meaningful away from saturation: check the smaller scales.
            if scale > 30.0 {
                continue;
            }
            let eval = |s: &[f64], a: &[f64], e: &[Option<f64>]| {
                let input = GroupInput {
                    s,
                    a,
                    e,
                    s_ref: Some(&st.s_ref),
                    rewards: &st.r,
                };
                group_loss(&spec, &input).unwrap().loss
            };
            let h = 1e-6;
            for i in 0..k {
                let mut plus = st.s.clone();
                let mut minus = st.s.clone();
                plus[i] += h;
                minus[i] -= h;
                let num = (eval(&plus, &st.a, &st.e) - eval(&minus, &st.a, &st.e)) / (2.0 * h);
                assert!(
                    (num - out.d_s[i]).abs() <= 1e-5 * (1.0 + num.abs()),
                    "{kind:?} dS[{i}]: {num} vs {} ({spec:?})",
                    out.d_s[i]
                );
                let mut plus = st.a.clone();
                let mut minus = st.a.clone();
                plus[i] += h;
                minus[i] -= h;
                let num = (eval(&st.s, &plus, &st.e) - eval(&st.s, &minus, &st.e)) / (2.0 * h);
                assert!(
                    (num - out.d_a[i]).abs() <= 1e-5 * (1.0 + num.abs()),
                    "{kind:?} dA[{i}]: {num} vs {} ({spec:?})",
                    out.d_a[i]
                );
                if let Some(e) = st.e[i] {
                    let mut plus = st.e.clone();
                    let mut minus = st.e.clone();
                    plus[i] = Some(e + h);
                    minus[i] = Some(e - h);
                    let num = (eval(&st.s, &st.a, &plus) - eval(&st.s, &st.a, &minus)) / (2.0 * h);
                    assert!(
                        (num - out.d_e[i]).abs() <= 1e-5 * (1.0 + num.abs()),
                        "{kind:?} dE[{i}]: {num} vs {}",
                        out.d_e[i]
                    );
                } else {
                    assert_eq!(out.d_e[i], 0.0, "{kind:?}: gradient to an absent E");
                }
            }
        }
    }
}

#[test]
fn bad_hyperparameters_are_errors() {
    let cases: [(LossSpec, &str); 6] = [
        (
            LossSpec {
                beta: -0.1,
                ..LossSpec::new(LossKind::Nca)
            },
            "--beta must be a positive",
        ),
        (
            LossSpec {
                gamma: 0.0,
                ..LossSpec::new(LossKind::Refa)
            },
            "--gamma must be > 0",
        ),
        (
            LossSpec {
                p: 3,
                ..LossSpec::new(LossKind::Refa)
            },
            "--p must be 1 or 2",
        ),
        (
            LossSpec {
                alpha: -1.0,
                ..LossSpec::new(LossKind::Infonca)
            },
            "--alpha must be >= 0",
        ),
        (
            LossSpec {
                label_smoothing: 0.5,
                ..LossSpec::new(LossKind::Dpo)
            },
            "--label-smoothing",
        ),
        (
            LossSpec {
                lambda: -1.0,
                ..LossSpec::new(LossKind::InfoncaFree)
            },
            "--lambda must be >= 0",
        ),
    ];
    for (spec, message) in cases {
        let err = spec.validate().expect_err(message).to_string();
        assert!(err.contains(message), "{err:?} lacks {message:?}");
    }
    let mut rng = rng("bad_hyperparameters_are_errors");
    let st = random_stats(&mut rng, 3, 5.0);
    for kind in [LossKind::Dpo, LossKind::NcaPair, LossKind::Simpo] {
        let err = group_loss(&LossSpec::new(kind), &st.input())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("needs exactly 2 responses") && err.contains("--pairs"),
            "{err}"
        );
    }
}
