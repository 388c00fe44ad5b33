//! The loss kernels (cuda/loss.cu) on the emulator against the CPU loss library and the
//! float64 autograd goldens: every case of `losses.golden.safetensors`, and every loss and
//! variant on fresh random batches of awkward groups (K from 2 to 9, one-token responses,
//! responses without EOS, equal rewards, margins of hundreds). The bounds are derived in
//! `src/selftest/loss.rs`.

mod common;

use common::{golden_loss_cases, Golden};
use contralign::engine::loss::host_batch_loss;
use contralign::loss::{batch_loss, LossKind, LossSpec};
use contralign::ops::cuda::device::Device;
use contralign::selftest::loss::{compare_loss, variants, LossBatch};
use contralign::selftest::{self, Row};

fn assert_pass(rows: &[Row], what: &str) {
    assert!(
        rows.iter().all(|r| r.pass),
        "{what}:\n{}",
        selftest::table(rows)
    );
}

/// The golden cases as batches, with their specs, and the golden tensors.
fn golden_cases() -> (Vec<(String, LossSpec, LossBatch)>, Golden) {
    let (cases, golden) = golden_loss_cases();
    let batches = cases
        .into_iter()
        .map(|(case, spec)| {
            let get = |k: &str| golden.get(&format!("{case}.{k}")).to_vec();
            let (s, n) = (get("S"), get("n"));
            let offsets: Vec<usize> = get("offsets").iter().map(|&x| x as usize).collect();
            let batch = LossBatch {
                a: s.iter().zip(&n).map(|(s, n)| s / n).collect(),
                e: get("E")
                    .iter()
                    .map(|&x| (!x.is_nan()).then_some(x))
                    .collect(),
                s_ref: get("Sref"),
                rewards: get("r"),
                tokens: n.iter().map(|&n| n as usize).collect(),
                sources: (0..offsets.len() - 1)
                    .map(|g| format!("{case} group {g}"))
                    .collect(),
                offsets,
                s,
            };
            (case, spec, batch)
        })
        .collect();
    (batches, golden)
}

#[test]
fn every_golden_case_agrees_on_the_emulator() {
    let device = Device::Emu;
    let (cases, golden) = golden_cases();
    for (case, spec, batch) in cases {
        assert_pass(&compare_loss(&device, &spec, &batch, &case).unwrap(), &case);
        // And the goldens themselves, to the CPU library's 1e-9 (tests/losses_golden.rs).
        let (got, _) = host_batch_loss(&device, &spec, &batch.input(), &batch.tokens).unwrap();
        let close = |a: f64, b: f64, scale: f64| (a - b).abs() <= 1e-9 * b.abs().max(scale) + 1e-15;
        let want = golden.scalar(&format!("{case}.loss"));
        assert!(
            close(got.loss, want, 0.0),
            "{case}: loss {} vs {want}",
            got.loss
        );
        for (g, (&got, &want)) in got
            .per_group
            .iter()
            .zip(golden.get(&format!("{case}.per_group")))
            .enumerate()
        {
            assert!(
                close(got, want, 0.0),
                "{case}: group {g} loss {got} vs {want}"
            );
        }
        let want_ds = golden.get(&format!("{case}.dS"));
        let ds_scale = want_ds.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (i, &want) in want_ds.iter().enumerate() {
            // The golden dS is the total derivative through A = S / n.
            let total = got.d_s[i] + got.d_a[i] / batch.tokens[i] as f64;
            assert!(
                close(total, want, ds_scale),
                "{case}: dS[{i}] {total} vs {want}"
            );
        }
        let want_de = golden.get(&format!("{case}.dE"));
        let de_scale = want_de.iter().fold(0f64, |m, x| m.max(x.abs()));
        for (i, &want) in want_de.iter().enumerate() {
            assert!(
                close(got.d_e[i], want, de_scale),
                "{case}: dE[{i}] {} vs {want}",
                got.d_e[i]
            );
        }
    }
}

/// Every variant on random batches of 1, 37 and 131 groups (one partial block of the
/// per-group kernel, and two), at margins of 1, 30 and 300.
#[test]
fn every_loss_and_variant_agrees_on_random_groups() {
    let device = Device::Emu;
    let mut rng = common::rng("every_loss_and_variant_agrees_on_random_groups");
    for (label, spec) in variants() {
        for groups in [1, 37, 131] {
            for margin in [1.0, 30.0, 300.0] {
                let batch = LossBatch::random(
                    &mut rng,
                    groups,
                    9,
                    spec.kind.is_pairwise(),
                    spec.beta,
                    margin,
                );
                let rows = compare_loss(&device, &spec, &batch, &label).unwrap();
                assert_pass(&rows, &format!("{label}, {groups} groups, margin {margin}"));
            }
        }
    }
}

/// The edge cases on every group at once: every response one token long (A = S), none ending
/// with EOS (E absent; eos_prob NaN), every group's rewards equal (REFA-dynamic has no
/// positive: only R_eos remains).
#[test]
fn one_token_responses_without_eos_and_equal_rewards() {
    let device = Device::Emu;
    let mut rng = common::rng("one_token_responses_without_eos_and_equal_rewards");
    type Edit = fn(&mut LossBatch);
    let edits: [(&str, Edit); 3] = [
        ("one token", |b| {
            b.tokens.iter_mut().for_each(|n| *n = 1);
            b.a = b.s.clone();
        }),
        ("no EOS", |b| b.e.iter_mut().for_each(|e| *e = None)),
        ("equal rewards", |b| {
            b.rewards.iter_mut().for_each(|r| *r = 3.0)
        }),
    ];
    for (label, spec) in variants() {
        for (what, edit) in edits {
            let mut batch =
                LossBatch::random(&mut rng, 23, 9, spec.kind.is_pairwise(), spec.beta, 30.0);
            edit(&mut batch);
            let rows = compare_loss(&device, &spec, &batch, &label).unwrap();
            assert_pass(&rows, &format!("{label}, {what}"));
        }
    }
}

/// A group the loss cannot take is the CPU's error, naming the group, before any launch.
#[test]
fn bad_groups_are_the_cpu_errors() {
    let device = Device::Emu;
    let mut rng = common::rng("bad_groups_are_the_cpu_errors");
    let mut batch = LossBatch::random(&mut rng, 4, 4, false, 0.1, 1.0);
    // Group 2 of one response, or the pairwise losses on K > 2.
    let one = {
        let mut b = batch.clone();
        let cut = b.offsets[2] + 1;
        for v in [&mut b.s, &mut b.a, &mut b.s_ref, &mut b.rewards] {
            v.truncate(cut);
        }
        b.e.truncate(cut);
        b.tokens.truncate(cut);
        b.offsets.truncate(3);
        b.offsets.push(cut);
        b.sources.truncate(3);
        b
    };
    batch.offsets = vec![0, 2, batch.offsets[4]];
    batch.sources.truncate(2);
    let cases = [
        (LossSpec::new(LossKind::Nca), &one, "at least 2 responses"),
        (
            LossSpec::new(LossKind::Dpo),
            &batch,
            "needs exactly 2 responses",
        ),
    ];
    for (spec, b, message) in cases {
        let text = |r: anyhow::Result<()>| format!("{:#}", r.unwrap_err());
        let cpu = text(batch_loss(&spec, &b.input()).map(|_| ()));
        let dev = text(host_batch_loss(&device, &spec, &b.input(), &b.tokens).map(|_| ()));
        assert_eq!(dev, cpu);
        assert!(dev.contains(message) && dev.contains("group"), "{dev}");
    }
    let mut input = batch.input();
    input.s_ref = None;
    let spec = LossSpec::new(LossKind::Infonca);
    let cpu = format!("{:#}", batch_loss(&spec, &input).unwrap_err());
    let dev = format!(
        "{:#}",
        host_batch_loss(&device, &spec, &input, &batch.tokens).unwrap_err()
    );
    assert_eq!(dev, cpu);
    assert!(dev.contains("needs reference log-probs"), "{dev}");
}

/// S_ref read from a reference model's `(S, A, E)` table gives what the column gives, bit for
/// bit: the kernel reads every third value and nothing else of it.
#[test]
fn reference_from_a_stats_table_equals_the_column() {
    use contralign::engine::loss::{device_batch_loss, GroupLayout, LossInputs, Reference};
    use contralign::ops::cuda::pool::Pool;
    let device = Device::Emu;
    let mut rng = common::rng("reference_from_a_stats_table_equals_the_column");
    let b = LossBatch::random(&mut rng, 13, 9, false, 0.1, 30.0);
    let n = b.s.len();
    let stats: Vec<f64> = (0..n)
        .flat_map(|i| [b.s[i], b.a[i], b.e[i].unwrap_or(f64::NAN)])
        .collect();
    let spans: Vec<i32> = (0..n)
        .flat_map(|i| [0, b.tokens[i] as i32, b.e[i].is_some() as i32])
        .collect();
    // A and E of the reference are NaN: reading them would show.
    let ref_table: Vec<f64> = b
        .s_ref
        .iter()
        .flat_map(|&s| [s, f64::NAN, f64::NAN])
        .collect();
    let pool = Pool::default();
    let layout = GroupLayout::new(&device, &pool, &b.offsets, &b.sources).unwrap();
    let (stats, spans) = (
        device.upload(&stats).unwrap(),
        device.upload(&spans).unwrap(),
    );
    let rewards = device.upload(&b.rewards).unwrap();
    let (column, table) = (
        device.upload(&b.s_ref).unwrap(),
        device.upload(&ref_table).unwrap(),
    );
    let run = |s_ref| {
        let inputs = LossInputs {
            stats: stats.view(),
            spans: spans.view(),
            s_ref: Some(s_ref),
            rewards: rewards.view(),
        };
        let spec = LossSpec::new(LossKind::Nca);
        let out = device_batch_loss(&device, &pool, &spec, &layout, &inputs).unwrap();
        (
            device.download(&out.grads).unwrap(),
            device.download(&out.summary).unwrap(),
        )
    };
    let (want, got) = (
        run(Reference::Column(column.view())),
        run(Reference::Stats(table.view())),
    );
    assert!(want.0.iter().chain(&want.1).all(|x| x.is_finite()));
    assert_eq!(got, want);
}
