//! Training end to end: the loss goes down for every loss family, accumulation does not
//! change a step, checkpoints are Hugging Face model directories that score like the model
//! in memory, resume is exact, and bad runs stop cleanly.

mod common;

use common::{contralign, contralign_ok, fixture, fx, metrics_without_timing, random_groups, rng};
use contralign::checkpoint::read_tensors;
use contralign::data::pairs::{to_pairs, PairStrategy};
use contralign::data::Group;
use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::{PrecisionOptions, RecomputePolicy};
use contralign::model::{Model, ResponseStats};
use contralign::ops::cpu::CpuOps;
use contralign::step;
use contralign::train::optimizer::AdamWConfig;
use contralign::train::plan::{Length, StepBudget};
use contralign::train::run_dir::{RunDir, SaveOptions};
use contralign::train::schedule::ScheduleKind;
use contralign::train::trainer::{Reference, TrainOptions, Trainer, Warmup};
use std::path::{Path, PathBuf};
use tempfile::TempDir;

fn load(name: &str) -> Model<Vec<f32>> {
    Model::load(&CpuOps, &fixture(name)).unwrap()
}

fn options(spec: LossSpec, steps: u64) -> TrainOptions {
    TrainOptions {
        spec,
        aux_coef: 0.0,
        recompute: RecomputePolicy::Full,
        budget: StepBudget::Groups(1000),
        micro_tokens: 100_000,
        seed: 7,
        length: Length::Steps(steps),
        adamw: AdamWConfig {
            weight_decay: 0.0,
            ..AdamWConfig::default()
        },
        schedule: ScheduleKind::Constant,
        lr: 3e-3,
        warmup: Warmup::Steps(0),
        max_grad_norm: 0.0,
        max_bad_steps: 3,
        precision: PrecisionOptions::all_f32(),
    }
}

fn reference_for(spec: &LossSpec, model: &str) -> Reference {
    if spec.kind.needs_reference() {
        Reference::Model(Box::new(load(&format!("{model}-ref"))))
    } else {
        Reference::None
    }
}

/// The objective over `groups` (no gradients), with the reference model of `model`.
fn objective(
    policy: &Model<Vec<f32>>,
    model: &str,
    groups: &[Group],
    spec: &LossSpec,
    aux_coef: f64,
) -> f64 {
    let reference = load(&format!("{model}-ref"));
    let refs = step::reference_stats(&CpuOps, policy, Some(&reference), groups, spec).unwrap();
    step::evaluate(&CpuOps, policy, refs.as_deref(), groups, spec, aux_coef)
        .unwrap()
        .loss
}

#[test]
fn training_lowers_the_loss_of_every_loss_family() {
    let mut rng = rng("training_lowers_the_loss_of_every_loss_family");
    let groups = random_groups(&mut rng, 9, 256, 7, 4, 9);
    let pairs = to_pairs(&groups, PairStrategy::BestVsEach, 0);
    let cases: Vec<(&str, LossKind, &[Group], f64)> = vec![
        ("tiny-mistral", LossKind::Infonca, &groups, 0.0),
        ("tiny-mistral", LossKind::Nca, &groups, 0.0),
        ("tiny-mistral", LossKind::Dpo, &pairs, 0.0),
        ("tiny-mistral", LossKind::NcaPair, &pairs, 0.0),
        ("tiny-mistral", LossKind::Simpo, &pairs, 0.0),
        ("tiny-mistral", LossKind::Refa, &groups, 0.0),
        ("tiny-mistral", LossKind::InfoncaFree, &groups, 0.0),
        ("tiny-mistral", LossKind::Sft, &groups, 0.0),
        ("tiny-mixtral", LossKind::Nca, &groups, 0.02),
    ];
    for (model, kind, data, aux_coef) in cases {
        let spec = LossSpec::new(kind);
        let policy = load(model);
        let before = objective(&policy, model, data, &spec, aux_coef);
        let opts = TrainOptions {
            aux_coef,
            ..options(spec.clone(), 6)
        };
        let mut trainer =
            Trainer::new(opts, policy, reference_for(&spec, model), data.to_vec()).unwrap();
        let records = common::train_to_end(&mut trainer);
        let after = objective(&trainer.policy, model, data, &spec, aux_coef);
        eprintln!("{model} {}: {before:.6} -> {after:.6}", kind.name());
        assert!(
            after < before,
            "{model} {}: the loss went from {before} to {after}",
            kind.name()
        );
        // Full-batch steps: the first record's loss is the objective before training.
        let rel = (records[0].loss - before).abs() / before.abs().max(1e-12);
        assert!(
            rel < 1e-9,
            "{model} {}: step 1 logged {} for {before}",
            kind.name(),
            records[0].loss
        );
    }
}

#[test]
fn accumulation_over_micro_batches_does_not_change_a_step() {
    let mut rng = rng("accumulation_over_micro_batches_does_not_change_a_step");
    let groups = random_groups(&mut rng, 7, 256, 9, 5, 11);
    for model in ["tiny-mistral", "tiny-mixtral"] {
        let spec = LossSpec::new(LossKind::Nca);
        // With eps = 1 and lr = 1 the first AdamW update is g / (|g| + 1): the weights after
        // one step show the accumulated gradient itself, not just its sign.
        let make = |micro_tokens: usize| {
            let opts = TrainOptions {
                micro_tokens,
                budget: StepBudget::Groups(5),
                lr: 1.0,
                adamw: AdamWConfig {
                    eps: 1.0,
                    weight_decay: 0.0,
                    ..AdamWConfig::default()
                },
                ..options(spec.clone(), 1)
            };
            let mut t = Trainer::new(
                opts,
                load(model),
                reference_for(&spec, model),
                groups.clone(),
            )
            .unwrap();
            let record = t.step_to_end().unwrap();
            (t, record)
        };
        // One group per forward/backward against the whole step at once.
        let ((split, x), (whole, y)) = (make(1), make(100_000));
        assert_eq!((x.groups, y.groups), (5, 5));
        let close = |what: &str, p: f64, q: f64, tol: f64| {
            let rel = (p - q).abs() / q.abs().max(1e-12);
            assert!(rel < tol, "{model}: {what} {p} vs {q}");
        };
        close("loss", x.loss, y.loss, 1e-12);
        close("grad_norm", x.grad_norm, y.grad_norm, 1e-6);
        for ((k, p), (_, q)) in x.metrics.iter().zip(&y.metrics) {
            close(k, *p, *q, 1e-12);
        }
        let start = load(model);
        let params = split.policy.params.iter();
        let others = whole.policy.params.iter();
        for ((a, b), w0) in params.iter().zip(&others).zip(start.params.iter()) {
            let (mut diff, mut norm) = (0f64, 0f64);
            for ((&p, &q), &w) in a.iter().zip(b.iter()).zip(w0.iter()) {
                // Beyond the one-ulp rounding of storing w + update in f32.
                let beyond_rounding =
                    (p as f64 - q as f64).abs() - f32::EPSILON as f64 * w.abs() as f64;
                diff += beyond_rounding.max(0.0).powi(2);
                norm += (q as f64 - w as f64).powi(2);
            }
            assert!(
                diff.sqrt() <= 1e-5 * norm.sqrt() + 1e-12,
                "{model}: updates differ by {} of {}",
                diff.sqrt(),
                norm.sqrt()
            );
        }
    }
}

/// The statistics `contralign score` prints for a model directory.
fn cli_scores(model: &Path, data: &str) -> Vec<(f64, Option<f64>)> {
    let out = contralign_ok(&["score", "--model", &model.to_string_lossy(), "--data", data]);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["logp_sum"].as_f64().unwrap(), v["eos_logp"].as_f64())
        })
        .collect()
}

fn assert_scores_match(what: &str, got: &[(f64, Option<f64>)], want: &[ResponseStats]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        let rel = (g.0 - w.logp_sum).abs() / w.logp_sum.abs();
        assert!(rel < 1e-12, "{what}: logp_sum {} vs {}", g.0, w.logp_sum);
        assert_eq!(g.1.is_some(), w.eos_logp.is_some(), "{what}");
    }
}

fn header_dtypes(path: &Path) -> Vec<safetensors::Dtype> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors().iter().map(|(_, v)| v.dtype()).collect()
}

#[test]
fn checkpoints_are_hf_directories_that_score_like_the_model_in_memory() {
    let data = fx("tiny-mixtral.reward.jsonl");
    let groups = contralign::data::pretokenized::read_file(Path::new(&data)).unwrap();
    let spec = LossSpec::new(LossKind::Nca);
    let mut trainer = Trainer::new(
        options(spec.clone(), 2),
        load("tiny-mixtral"),
        reference_for(&spec, "tiny-mixtral"),
        groups.clone(),
    )
    .unwrap();
    common::train_to_end(&mut trainer);
    let batch = step::pack(&trainer.policy, &groups).unwrap();
    let in_memory = trainer.policy.score(&CpuOps, &batch);

    let tmp = TempDir::new().unwrap();
    let run = |name: &str| RunDir::create(&tmp.path().join(name)).unwrap();
    let save = |dtype, max_shard_bytes| SaveOptions {
        dtype,
        max_shard_bytes,
        source: fixture("tiny-mixtral"),
        total_limit: None,
        keep: None,
    };
    // As loaded (f32), one file: scores exactly like the model in memory.
    let f32_dir = run("f32")
        .save_checkpoint(&mut trainer, &save(None, 1 << 30))
        .unwrap();
    assert_scores_match("f32", &cli_scores(&f32_dir, &data), &in_memory);
    assert!(header_dtypes(&f32_dir.join("model.safetensors"))
        .iter()
        .all(|d| *d == safetensors::Dtype::F32));
    assert!(f32_dir.join("config.json").is_file());

    // bf16 in shards of at most 100 kB: the index lists every tensor of the model once,
    // each in the shard that holds it, and the total size is the bytes of the weights.
    let bf16 = Some(safetensors::Dtype::BF16);
    let dir = run("bf16")
        .save_checkpoint(&mut trainer, &save(bf16, 100_000))
        .unwrap();
    let index: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("model.safetensors.index.json")).unwrap(),
    )
    .unwrap();
    let map = index["weight_map"].as_object().unwrap();
    let names: Vec<String> = contralign::model::params::param_specs(&trainer.policy.cfg)
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(map.len(), names.len());
    let mut total = 0;
    let shards: std::collections::BTreeSet<&str> =
        map.values().map(|v| v.as_str().unwrap()).collect();
    assert!(
        shards.len() > 1,
        "expected several shards, found {shards:?}"
    );
    for (i, shard) in shards.iter().enumerate() {
        assert_eq!(
            *shard,
            format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len())
        );
        let tensors = read_tensors(&dir.join(shard)).unwrap();
        assert!(header_dtypes(&dir.join(shard))
            .iter()
            .all(|d| *d == safetensors::Dtype::BF16));
        for (name, (_, data)) in &tensors {
            assert_eq!(map[name].as_str().unwrap(), *shard, "{name}");
            total += 2 * data.len();
        }
    }
    for n in &names {
        assert!(map.contains_key(n), "{n} missing from the index");
    }
    assert_eq!(
        index["metadata"]["total_size"].as_u64().unwrap() as usize,
        total
    );
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    // transformers 5 writes `dtype`, 4 `torch_dtype`: the key the fixture had is updated.
    assert_eq!(config["dtype"], "bfloat16");
    // The bf16 checkpoint scores like the in-memory model with its weights rounded to bf16.
    let mut rounded = load("tiny-mixtral");
    for (p, q) in rounded
        .params
        .iter_mut()
        .into_iter()
        .zip(trainer.policy.params.iter())
    {
        *p = q
            .iter()
            .map(|&x| half::bf16::from_f32(x).to_f32())
            .collect();
    }
    let want = rounded.score(&CpuOps, &batch);
    assert_scores_match("bf16", &cli_scores(&dir, &data), &want);
    assert_ne!(
        want[0].logp_sum, in_memory[0].logp_sum,
        "bf16 rounding had no effect"
    );
}

fn base_args(model: &str, loss: &str, out: &Path) -> Vec<String> {
    let mut args = vec![
        "train".to_string(),
        "--model".into(),
        fx(model),
        "--data".into(),
        fx(&format!("{model}.reward.jsonl")),
        "--loss".into(),
        loss.into(),
        "--out".into(),
        out.to_string_lossy().into_owned(),
        "--groups-per-step".into(),
        "2".into(),
        "--lr".into(),
        "1e-3".into(),
    ];
    if loss == "nca" || loss == "infonca" {
        args.extend(["--ref-model".to_string(), fx(&format!("{model}-ref"))]);
    }
    args
}

fn run_cli(args: &[String]) -> std::process::Output {
    contralign_ok(&args.iter().map(String::as_str).collect::<Vec<_>>())
}

fn weights(dir: &Path) -> Vec<u8> {
    let master = dir.join("master.safetensors");
    std::fs::read(if master.exists() {
        master
    } else {
        dir.join("model.safetensors")
    })
    .unwrap()
}

#[test]
fn resume_is_exact() {
    let tmp = TempDir::new().unwrap();
    let train = |model: &str, loss: &str, name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args = base_args(model, loss, &out);
        args.extend(extra.iter().map(|s| s.to_string()));
        run_cli(&args);
        out
    };
    // Mixtral saved in bf16 (the resume reads the f32 master weights), linear decay.
    let mixtral = [
        "--steps",
        "8",
        "--save-every",
        "4",
        "--save-dtype",
        "bfloat16",
    ];
    let straight = train("tiny-mixtral", "nca", "straight", &mixtral);
    // A run that died after checkpoint-4: resumed, it must redo steps 5..8 identically.
    let resumed = train("tiny-mixtral", "nca", "resumed", &mixtral);
    for dir in ["final", "checkpoint-8"] {
        std::fs::remove_dir_all(resumed.join(dir)).unwrap();
    }
    assert_eq!(metrics_without_timing(&resumed).len(), 8);
    run_cli(&["train", "--resume", &resumed.to_string_lossy()].map(String::from));
    assert_eq!(
        metrics_without_timing(&resumed),
        metrics_without_timing(&straight)
    );
    assert!(weights(&resumed.join("final")) == weights(&straight.join("final")));
    let last = |run: &Path| weights(&run.join("checkpoint-8"));
    assert!(last(&resumed) == last(&straight));

    // A finished run of N/2 steps that saved only at its end, then --resume with --steps N
    // (a constant schedule, so that the first half does not depend on N): the same as N
    // straight. The resume reads checkpoint-3, never final/.
    let flags = [
        "--schedule",
        "constant",
        "--max-grad-norm",
        "0.5",
        "--save-every",
        "0",
        "--steps",
    ];
    let whole = train(
        "tiny-mistral",
        "refa",
        "whole",
        &[&flags[..], &["6"]].concat(),
    );
    let halves = train(
        "tiny-mistral",
        "refa",
        "halves",
        &[&flags[..], &["3"]].concat(),
    );
    std::fs::remove_dir_all(halves.join("final")).unwrap();
    run_cli(
        &[
            "train",
            "--resume",
            &halves.to_string_lossy(),
            "--steps",
            "6",
        ]
        .map(String::from),
    );
    assert_eq!(
        metrics_without_timing(&halves),
        metrics_without_timing(&whole)
    );
    assert!(weights(&halves.join("final")) == weights(&whole.join("final")));
}

#[test]
fn ctrl_c_saves_a_checkpoint_and_the_run_resumes_from_it() {
    let tmp = TempDir::new().unwrap();
    let run = tmp.path().join("run");
    let mut args = base_args("tiny-mistral", "refa", &run);
    args.extend(["--steps", "1000000", "--save-every", "0"].map(String::from));
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_contralign"))
        .args(&args)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = run.join("metrics.jsonl");
    let started = std::time::Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < 3 {
        assert!(started.elapsed().as_secs() < 60, "no progress in 60 s");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let kill = std::process::Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let steps = metrics_without_timing(&run).len();
    let checkpoint = run.join(format!("checkpoint-{steps}"));
    assert!(checkpoint.join("model.safetensors").is_file(), "{stderr}");
    assert!(stderr.contains("--resume"), "{stderr}");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    // transformers' layout: the step and every step's metrics so far.
    assert_eq!(state["global_step"].as_u64().unwrap() as usize, steps);
    assert_eq!(state["log_history"].as_array().unwrap().len(), steps);
    let target = (steps + 2).to_string();
    run_cli(
        &[
            "train",
            "--resume",
            &run.to_string_lossy(),
            "--steps",
            &target,
        ]
        .map(String::from),
    );
    let metrics = metrics_without_timing(&run);
    let numbers: Vec<u64> = metrics
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(numbers, (1..=steps as u64 + 2).collect::<Vec<_>>());
}

/// A copy of tiny-mistral whose final norm scales by bf16's largest value (finite weights
/// that bf16 holds, which the loader accepts in either precision): the normalized hidden states overflow to ±inf, their logits to NaN, and
/// so every loss.
fn nan_model(dir: &Path) -> PathBuf {
    let src = fixture("tiny-mistral");
    let out = dir.join("nan-model");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::copy(src.join("config.json"), out.join("config.json")).unwrap();
    let tensors = read_tensors(&src.join("model.safetensors")).unwrap();
    let mut owned: Vec<(String, Vec<usize>, Vec<f32>)> =
        tensors.into_iter().map(|(n, (s, d))| (n, s, d)).collect();
    owned.sort_by(|a, b| a.0.cmp(&b.0));
    for t in owned.iter_mut().filter(|t| t.0 == "model.norm.weight") {
        t.2.fill(half::bf16::MAX.to_f32());
    }
    let views: Vec<contralign::checkpoint::Tensor> = owned
        .iter()
        .map(|(name, shape, data)| contralign::checkpoint::Tensor {
            name: name.clone(),
            shape: shape.clone(),
            data,
        })
        .collect();
    contralign::checkpoint::save_f32(&out.join("model.safetensors"), &views).unwrap();
    out
}

/// On the CPU and on a device, where the step is dropped on the device and its scalars read
/// a step late: the run stops at the step that reaches the limit, not after it.
#[test]
fn non_finite_steps_are_skipped_logged_and_stop_the_run_with_a_checkpoint() {
    let tmp = TempDir::new().unwrap();
    let model = nan_model(tmp.path());
    for device in ["cpu", "emu"] {
        let run = tmp.path().join(format!("run-{device}"));
        let args = [
            "train",
            "--model",
            &model.to_string_lossy(),
            "--data",
            &fx("tiny-mistral.reward.jsonl"),
            "--loss",
            "simpo",
            "--pairs",
            "best_vs_each",
            "--out",
            &run.to_string_lossy(),
            "--steps",
            "50",
            "--groups-per-step",
            "1",
            "--max-bad-steps",
            "3",
            "--device",
            device,
        ];
        let out = contralign(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{device}: {stderr}");
        assert!(
            stderr.contains("non-finite") && stderr.contains("checkpoint-3"),
            "{device}: {stderr}"
        );
        let metrics = metrics_without_timing(&run);
        assert_eq!(metrics.len(), 3, "{device}");
        for m in &metrics {
            assert_eq!(m["skipped"], "non-finite loss", "{device}: {m}");
            assert!(m["loss"].is_null());
        }
        assert!(run
            .join("checkpoint-3")
            .join("trainer_state.json")
            .is_file());
    }
}

#[test]
fn bad_requests_fail_before_any_work() {
    let tmp = TempDir::new().unwrap();
    let file = tmp.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let cases: Vec<(Vec<String>, &[&str])> = vec![
        (
            base_args("tiny-mistral", "refa", &file.join("run")),
            &["--out", "a-file"],
        ),
        (
            {
                let mut a = base_args("tiny-mistral", "nca", &tmp.path().join("r"));
                a.retain(|x| !x.contains("tiny-mistral-ref"));
                a.retain(|x| x != "--ref-model");
                a
            },
            &["--ref-model DIR", "--ref-logps FILE"],
        ),
        (
            {
                let mut a = base_args("tiny-mistral", "refa", &tmp.path().join("r"));
                a.extend(["--betas".into(), "0.9".into()]);
                a
            },
            &["--betas", "0.9"],
        ),
        (
            {
                let mut a = base_args("tiny-mistral", "refa", &tmp.path().join("r"));
                a.extend(["--max-shard-size".into(), "5XB".into()]);
                a
            },
            &["--max-shard-size", "XB"],
        ),
    ];
    for (args, needles) in cases {
        let out = contralign(&args.iter().map(String::as_str).collect::<Vec<_>>());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        for n in needles {
            assert!(stderr.contains(n), "{args:?}: expected {n:?} in {stderr}");
        }
        assert!(!stderr.contains("panicked"), "{stderr}");
    }
    // A directory that holds a run is not overwritten.
    let run = tmp.path().join("done");
    let mut args = base_args("tiny-mistral", "refa", &run);
    args.extend(["--steps".into(), "1".into()]);
    run_cli(&args);
    let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
    let out = contralign(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--resume"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
}

#[test]
fn precomputed_reference_matches_the_reference_model_and_refuses_a_mismatch() {
    let tmp = TempDir::new().unwrap();
    let cache = tmp.path().join("ref.json");
    let cache_s = cache.to_string_lossy().into_owned();
    contralign_ok(&[
        "precompute-ref",
        "--model",
        &fx("tiny-mixtral-ref"),
        "--data",
        &fx("tiny-mixtral.reward.jsonl"),
        "--out",
        &cache_s,
        "--micro-tokens",
        "30",
    ]);
    let live = tmp.path().join("live");
    let mut args = base_args("tiny-mixtral", "nca", &live);
    args.extend(["--steps".into(), "3".into()]);
    run_cli(&args);
    let cached = tmp.path().join("cached");
    let mut args = base_args("tiny-mixtral", "nca", &cached);
    args.extend([
        "--steps".into(),
        "3".into(),
        "--ref-logps".into(),
        cache_s.clone(),
    ]);
    run_cli(&args);
    // The same statistics, packed differently: equal up to summation order.
    let (cached, live) = (
        metrics_without_timing(&cached),
        metrics_without_timing(&live),
    );
    assert_eq!(cached.len(), live.len());
    for (c, l) in cached.iter().zip(&live) {
        for (key, value) in l.as_object().unwrap() {
            match (value.as_f64(), c[key].as_f64()) {
                (Some(a), Some(b)) => {
                    let rel = (a - b).abs() / a.abs().max(1e-12);
                    assert!(rel < 1e-9, "step {}: {key} {b} vs {a}", l["step"]);
                }
                _ => assert_eq!(&c[key], value, "{key}"),
            }
        }
    }

    // Other data: the pairs file.
    let out = contralign(&[
        "train",
        "--model",
        &fx("tiny-mixtral"),
        "--data",
        &fx("tiny-mixtral.pairs.jsonl"),
        "--loss",
        "dpo",
        "--ref-logps",
        &cache_s,
        "--ref-model",
        &fx("tiny-mixtral-ref"),
        "--out",
        &tmp.path().join("x").to_string_lossy(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("other data"),
        "{stderr}"
    );
    // Another model: the policy instead of the reference it was made with.
    let out = contralign(&[
        "train",
        "--model",
        &fx("tiny-mixtral"),
        "--data",
        &fx("tiny-mixtral.reward.jsonl"),
        "--loss",
        "nca",
        "--ref-logps",
        &cache_s,
        "--out",
        &tmp.path().join("y").to_string_lossy(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains(&format!(
                "the reference, which without --ref-model is the policy {},",
                fx("tiny-mixtral")
            ))
            && stderr.contains("or give --ref-model with the model the cache was made with"),
        "{stderr}"
    );
    // A --ref-model beside the cache is checked against the policy as a live one is.
    let other_vocab = tmp.path().join("other-vocab");
    contralign_ok(&[
        "init",
        "--out",
        &other_vocab.to_string_lossy(),
        "--config",
        &fx("tiny-mixtral-ref/config.json"),
        "--vocab-size",
        "300",
    ]);
    let mut args = base_args("tiny-mixtral", "nca", &tmp.path().join("z"));
    args.extend(["--ref-logps".into(), cache_s.clone()]);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    let ref_at = args.iter().position(|a| *a == "--ref-model").unwrap() + 1;
    let other = other_vocab.to_string_lossy();
    args[ref_at] = &other;
    common::contralign_fails(
        &args,
        "the reference model's vocab_size (300) differs from the policy's",
    );
    // A reference-free loss reads neither flag, and says so.
    let mut args = base_args("tiny-mixtral", "simpo", &tmp.path().join("free"));
    args.extend([
        "--steps".into(),
        "1".into(),
        "--pairs".into(),
        "best_vs_each".into(),
        "--ref-logps".into(),
        cache_s.clone(),
        "--ref-model".into(),
        fx("tiny-mixtral-ref"),
    ]);
    let out = run_cli(&args);
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("note: --loss simpo is reference-free: --ref-model, --ref-logps ignored"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Edited caches: a short hash, a token count or a log-probability that cannot be.
    let original: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cache).unwrap()).unwrap();
    type Edit = fn(&mut serde_json::Value);
    let edits: [(Edit, &str); 6] = [
        (|c| c["model_hash"] = "00".into(), "(content hash 00…)"),
        (
            |c| c["groups"][0][0] = serde_json::json!([-57.5, 10, -6.5, 7]),
            "groups[0][0]: expected [logp_sum, tokens, eos_logp or null], found [-57.5,10,-6.5,7]",
        ),
        (
            |c| c["groups"][1][1][1] = (-10).into(),
            "groups[1][1]: expected [logp_sum, tokens, eos_logp or null], found",
        ),
        (|c| c["extra"] = 1.into(), "unknown field `extra`"),
        (|c| c["groups"][1][0][1] = 99.into(), "group 1 ("),
        (
            |c| c["groups"][0][1][0] = 5.0.into(),
            "must be finite log-probabilities (<= 0)",
        ),
    ];
    for (i, (edit, message)) in edits.into_iter().enumerate() {
        let mut edited = original.clone();
        edit(&mut edited);
        std::fs::write(&cache, edited.to_string()).unwrap();
        let mut args = base_args("tiny-mixtral", "nca", &tmp.path().join(format!("edit{i}")));
        args.extend([
            "--steps".into(),
            "1".into(),
            "--ref-logps".into(),
            cache_s.clone(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::contralign_fails(&args, message);
    }
}

#[test]
fn a_toml_config_sets_flags_and_the_command_line_overrides_it() {
    let tmp = TempDir::new().unwrap();
    let config = tmp.path().join("run.toml");
    std::fs::write(
        &config,
        format!(
            "model = {:?}\ndata = {:?}\nloss = \"simpo\"\nsteps = 5\nlr = 0.25\n\
             schedule = \"constant\"\ngroups_per_step = 1\nno-checkpointing = true\n",
            fx("tiny-mistral"),
            fx("tiny-mistral.pairs.jsonl")
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    contralign_ok(&[
        "train",
        "--config",
        &config.to_string_lossy(),
        "--steps",
        "2",
        "--out",
        &run.to_string_lossy(),
    ]);
    let metrics = metrics_without_timing(&run);
    assert_eq!(metrics.len(), 2, "--steps 2 overrides steps = 5");
    assert!(metrics.iter().all(|m| m["lr"] == 0.25 && m["groups"] == 1));
    let saved = std::fs::read_to_string(run.join("train.toml")).unwrap();
    assert!(
        saved.contains("steps = 2") && saved.contains("no-checkpointing = true"),
        "{saved}"
    );

    for (text, message) in [
        ("learning_rate = 1e-5\n", "unknown key `learning_rate`"),
        (
            "lr = \"fast\"\n",
            "key `lr`: invalid value 'fast' for '--lr <F>'",
        ),
        (
            "steps = 1.5\n",
            "key `steps`: invalid value '1.5' for '--steps <N>'",
        ),
        (
            "model = 5\n",
            "key `model`: expected a string (DIR|ID), found 5",
        ),
        (
            "eval-data = [\"a\", \"b\"]\n",
            "key `eval-data`: expected a string (FILE|DIR|ID), found [\"a\", \"b\"]",
        ),
        (
            "micro_tokens = 100\nmicro-tokens = 200\n",
            "keys `micro-tokens` and `micro_tokens` both set --micro-tokens",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        let out = contralign(&["train", "--config", &config.to_string_lossy()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{text}: {stderr}");
        assert!(
            stderr.contains(&format!("{}: {message}", config.display())),
            "{text}: {stderr}"
        );
    }

    // A required flag that no file and no flag sets is named with the files that could.
    std::fs::write(&config, "loss = \"simpo\"\n").unwrap();
    let saved_path = run.join("train.toml");
    let without_data: String = saved
        .lines()
        .filter(|l| !l.starts_with("data ="))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&saved_path, without_data).unwrap();
    let (config, saved_path) = (config.display(), saved_path.display());
    for (args, sources) in [
        (
            vec![
                "--config",
                &config.to_string(),
                "--model",
                &fx("tiny-mistral"),
            ],
            config.to_string(),
        ),
        (
            vec!["--resume", &run.to_string_lossy()],
            saved_path.to_string(),
        ),
        (
            vec![
                "--resume",
                &run.to_string_lossy(),
                "--config",
                &config.to_string(),
            ],
            format!("{saved_path} nor {config}"),
        ),
    ] {
        common::contralign_fails(
            &[&["train"], &args[..]].concat(),
            &format!(
                "--data is required and neither {sources} nor the command line sets it: add \
                 `data = ...` there or give --data"
            ),
        );
    }
    // --help needs none of them.
    let help = contralign_ok(&["train", "--config", &config.to_string(), "--help"]);
    assert!(String::from_utf8_lossy(&help.stdout).contains("--ref-logps"));
}

#[test]
fn text_data_trains_through_the_tokenizer_and_checkpoints_carry_it() {
    let tmp = TempDir::new().unwrap();
    let model = tmp.path().join("model");
    common::tiny_mistral_with_tokenizer(&model);
    let data = tmp.path().join("data.jsonl");
    std::fs::write(
        &data,
        concat!(
            r#"{"prompt": [{"role": "user", "content": "the heat"}], "chosen": [{"role": "assistant", "content": "the the"}], "rejected": [{"role": "assistant", "content": "eh"}]}"#,
            "\n",
            r#"{"prompt": "hello there", "responses": ["the end", "then", "het"], "rewards": [3, 1, 2]}"#,
            "\n",
            r#"{"instruction": "tea", "completions": [{"response": "hot", "overall_score": "7"}, {"response": "eh", "overall_score": 2}]}"#,
            "\n",
        ),
    )
    .unwrap();
    let run = tmp.path().join("run");
    contralign_ok(&[
        "train",
        "--model",
        &model.to_string_lossy(),
        "--data",
        &data.to_string_lossy(),
        "--loss",
        "nca",
        "--ref-model",
        &model.to_string_lossy(),
        "--steps",
        "2",
        "--groups-per-step",
        "3",
        "--out",
        &run.to_string_lossy(),
    ]);
    let metrics = metrics_without_timing(&run);
    assert_eq!(metrics.len(), 2);
    assert_eq!(metrics[0]["groups"], 3);
    for file in [
        "tokenizer.json",
        "tokenizer_config.json",
        "config.json",
        "model.safetensors",
    ] {
        assert!(run.join("final").join(file).is_file(), "{file}");
    }
}
