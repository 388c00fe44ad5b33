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
