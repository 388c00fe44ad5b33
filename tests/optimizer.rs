//! AdamW, the schedules and global-norm clipping against PyTorch and transformers over six
//! steps (`tests/fixtures/optimizer.golden.json`, made by `tools/make_optimizer_golden.py`).

mod common;

use common::fixture;
use contralign::train::optimizer::{clip_global_norm, AdamW, AdamWConfig};
use contralign::train::schedule::{Schedule, ScheduleKind};
use serde_json::Value;

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

#[test]
fn adamw_schedules_and_clipping_match_pytorch() {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("optimizer.golden.json")).unwrap())
            .unwrap();
    let num = |k: &str| golden[k].as_f64().unwrap();
    let steps = golden["steps"].as_u64().unwrap();
    let config = AdamWConfig {
        betas: (
            golden["betas"][0].as_f64().unwrap(),
            golden["betas"][1].as_f64().unwrap(),
        ),
        eps: num("eps"),
        weight_decay: num("weight_decay"),
    };
    for (name, run) in golden["runs"].as_object().unwrap() {
        let schedule = Schedule {
            kind: ScheduleKind::parse(name).unwrap(),
            lr: num("lr"),
            warmup_steps: golden["warmup_steps"].as_u64().unwrap(),
            total_steps: steps,
        };
        let mut params: Vec<Vec<f32>> = golden["init"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        let mut adam = AdamW::new(
            config.clone(),
            &params.iter().map(Vec::len).collect::<Vec<_>>(),
        );
        for step in 0..steps as usize {
            let lr = schedule.lr_at(step as u64);
            let want_lr = run["lr"][step].as_f64().unwrap();
            assert!(
                (lr - want_lr).abs() <= 1e-12,
                "{name} step {step}: lr {lr} vs {want_lr}"
            );
            let mut grads: Vec<Vec<f32>> = golden["grads"][step]
                .as_array()
                .unwrap()
                .iter()
                .map(floats)
                .collect();
            let norm = clip_global_norm(
                &mut grads.iter_mut().collect::<Vec<_>>(),
                num("max_grad_norm"),
            );
            let want_norm = run["grad_norm"][step].as_f64().unwrap();
            assert!(
                (norm - want_norm).abs() <= 1e-6 * want_norm,
                "{name} step {step}: norm {norm} vs {want_norm}"
            );
            adam.update(
                &mut params.iter_mut().collect::<Vec<_>>(),
                &grads.iter().collect::<Vec<_>>(),
                lr,
            );
            for (t, want) in run["params"][step].as_array().unwrap().iter().enumerate() {
                for (j, (got, want)) in params[t].iter().zip(floats(want)).enumerate() {
                    assert!(
                        (got - want).abs() <= 1e-6 * want.abs().max(1e-3),
                        "{name} step {step} param {t}[{j}]: {got} vs {want}"
                    );
                }
            }
        }
    }
}

#[test]
fn warmup_ratio_and_bad_optimizer_settings() {
    let s = Schedule::with_warmup_ratio(ScheduleKind::Cosine, 1.0, 0.1, 25).unwrap();
    assert_eq!(s.warmup_steps, 3, "ceil(0.1 · 25), as transformers rounds");
    assert!(Schedule::with_warmup_ratio(ScheduleKind::Linear, 1.0, 1.5, 10).is_err());
    let bad = AdamWConfig {
        betas: (0.9, 1.0),
        ..AdamWConfig::default()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("--betas"));
    let bad = AdamWConfig {
        eps: 0.0,
        ..AdamWConfig::default()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("--eps"));
    // Clipping disabled leaves the gradients alone but still reports the norm.
    let mut g = [vec![3.0f32, 4.0]];
    assert_eq!(
        clip_global_norm(&mut g.iter_mut().collect::<Vec<_>>(), 0.0),
        5.0
    );
    assert_eq!(g[0], vec![3.0, 4.0]);
}

/// The stochastic roundings' draws (docs/numerics.md §4): the three stores' 16-bit fields of
/// one element's hash are each uniform and independent of one another, over a run of
/// consecutive flat indices (the case that matters: neighbouring elements of one tensor).
/// Each checked fraction is a mean of Bernoulli trials, allowed 6 standard deviations.
#[test]
fn the_stores_draws_from_one_hash_are_uniform_and_independent() {
    use contralign::ops::storage::{rounding_bits, Store};
    let stores = [Store::Weights, Store::ExpAvg, Store::ExpAvgSq];
    let (seed, step, n) = (0x5eed_u64, 7u64, 200_000u64);
    let draws: Vec<[u32; 3]> = (0..n)
        .map(|i| {
            let bits = rounding_bits(seed, step, 1_000_003 + i);
            stores.map(|s| s.draw(bits))
        })
        .collect();
    let within = |what: &str, hits: usize, p: f64| {
        let sigma = (p * (1.0 - p) / n as f64).sqrt();
        let got = hits as f64 / n as f64;
        assert!(
            (got - p).abs() <= 6.0 * sigma,
            "{what}: fraction {got:.5}, want {p} ± {:.5}",
            6.0 * sigma
        );
    };
    for (a, store) in stores.iter().enumerate() {
        // Below each of a few thresholds: the draw's distribution, top bits and low bits.
        for threshold in [1u32, 0x1000, 0x5555, 0x8000, 0xc000, 0xfff0] {
            let hits = draws.iter().filter(|d| d[a] < threshold).count();
            within(
                &format!("{store:?} < {threshold:#x}"),
                hits,
                threshold as f64 / 65536.0,
            );
        }
        let odd = draws.iter().filter(|d| d[a] & 1 == 1).count();
        within(&format!("{store:?} odd"), odd, 0.5);
        for b in a + 1..3 {
            // Two stores' roundings of one element both going up at p = 1/2 and at p = 1/8.
            for (threshold, p) in [(0x8000u32, 0.25), (0x2000, 1.0 / 64.0)] {
                let both = draws
                    .iter()
                    .filter(|d| d[a] < threshold && d[b] < threshold)
                    .count();
                within(&format!("{store:?} and {:?} joint", stores[b]), both, p);
            }
        }
    }
    // A different step or seed draws other bits for the same element.
    let bits = rounding_bits(seed, step, 42);
    assert_ne!(bits, rounding_bits(seed, step + 1, 42));
    assert_ne!(bits, rounding_bits(seed + 1, step, 42));
}
