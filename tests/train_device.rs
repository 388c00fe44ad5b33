//! Training on the device engine (`train --device emu`: weights, gradients and moments as
//! flat buffers on the emulated device, AdamW with the clipping folded in) against the CPU
//! trainer, its allocations after the first step, and exact resume on the device.

mod common;

use common::{contralign_ok, fixture, fx, metrics_without_timing, random_groups, rng};
use contralign::config::ModelConfig;
use contralign::data::Group;
use contralign::engine::DeviceEngine;
use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::{Category, PrecisionOptions, RecomputePolicy, ReferenceSource};
use contralign::model::Model;
use contralign::ops::cpu::CpuOps;
use contralign::ops::cuda::device::{counters, Device};
use contralign::step;
use contralign::train::held_out::HeldOut;
use contralign::train::optimizer::{AdamW, AdamWConfig};
use contralign::train::plan::{Cursor, Length, Planner, Position, StepBudget};
use contralign::train::refcache::RefLookup;
use contralign::train::run_dir::{RunDir, SaveOptions};
use contralign::train::schedule::ScheduleKind;
use contralign::train::session;
use contralign::train::trainer::{Reference, StepRecord, TrainOptions, Trainer, Warmup};
use std::sync::atomic::AtomicBool;
use tempfile::TempDir;

fn options(steps: u64, micro_tokens: usize) -> TrainOptions {
    TrainOptions {
        spec: LossSpec::new(LossKind::Nca),
        aux_coef: 0.02,
        recompute: RecomputePolicy::Full,
        budget: StepBudget::Groups(3),
        micro_tokens,
        seed: 11,
        length: Length::Steps(steps),
        adamw: AdamWConfig {
            weight_decay: 0.05,
            ..AdamWConfig::default()
        },
        schedule: ScheduleKind::Linear,
        lr: 2e-3,
        warmup: Warmup::Steps(1),
        max_grad_norm: 0.05,
        max_bad_steps: 3,
        precision: PrecisionOptions::all_f32(),
    }
}

fn trainer(model: &str, groups: &[Group], opts: TrainOptions) -> Trainer {
    let load = |name: &str| Model::load(&CpuOps, &fixture(name)).unwrap();
    let reference = Reference::Model(Box::new(load(&format!("{model}-ref"))));
    Trainer::new(opts, load(model), reference, groups.to_vec()).unwrap()
}

/// The f32 device path runs fp32 kernels with fp32 reductions where the CPU sums in f64
/// (statistics within ~1e-6 relative, tests/device_ops.rs), and its norm, hence the clipping
/// factor, in fp32: losses and norms agree to 1e-5 relative over three steps, and each
/// tensor's moments and update to the gradients' bound, 1e-4 (tests/common/device_step.rs).
/// AdamW's `m/(√v + ε)` gives every element a step of about `lr` whatever its gradient, so a
/// gradient far below the tensor's norm, whose own relative error the norm-wise bound does
/// not limit, moves its weight as far as a large one: the update's error is measured in the
/// gradient's units, each element weighted by `√v̂ + ε` (the CPU's moments), which undoes
/// that division.
const REL: f64 = 1e-5;
const UPDATE_REL: f64 = 1e-4;

/// `‖(a − b) ⊙ s‖ / ‖(b − start) ⊙ s‖` with `s = √v̂ + ε`: the error of the update `a − start`
/// against `b − start`, in the gradient's units.
fn update_err(a: &[f32], b: &[f32], start: &[f32], exp_avg_sq: &[f32], opt: &AdamW) -> f64 {
    let bias2 = 1.0 - opt.config.betas.1.powi(opt.step as i32);
    let (mut diff, mut norm) = (0.0f64, 0.0f64);
    for (((a, b), w0), v) in a.iter().zip(b).zip(start).zip(exp_avg_sq) {
        let s = (*v as f64 / bias2).sqrt() + opt.config.eps;
        diff += ((*a as f64 - *b as f64) * s).powi(2);
        norm += ((*b as f64 - *w0 as f64) * s).powi(2);
    }
    (diff / norm.max(f64::MIN_POSITIVE)).sqrt()
}

#[test]
fn three_steps_on_the_emulated_device_equal_the_cpu_trainer() {
    let mut rng = rng("three_steps_on_the_emulated_device_equal_the_cpu_trainer");
    for model in ["tiny-mistral", "tiny-mixtral"] {
        let groups = random_groups(&mut rng, 7, 256, 9, 4, 10);
        // Micro-batches of about one group: every step accumulates.
        let opts = options(3, 40);
        let mut cpu = trainer(model, &groups, opts.clone());
        let mut emu = trainer(model, &groups, opts);
        emu.use_device(Device::Emu).unwrap();
        let (want, got) = (
            common::train_to_end(&mut cpu),
            common::train_to_end(&mut emu),
        );
        common::assert_steps_close(model, &got, &want, 0.05, REL);
        for (g, w) in got.iter().zip(&want) {
            // The device's metrics come from the loss kernels, combined over micro-batches.
            let beta = LossSpec::new(LossKind::Nca).beta;
            common::assert_metrics_close(model, &g.metrics, &w.metrics, REL, beta);
        }
        // Before a checkpoint brings them back, `policy` holds the initial weights: a
        // held-out evaluation between checkpoints reads the device's current ones.
        let start = Model::load(&CpuOps, &fixture(model)).unwrap();
        let tensors = |m: &Model<Vec<f32>>| -> Vec<Vec<f32>> {
            m.params.iter().into_iter().cloned().collect()
        };
        let current = tensors(&emu.device_policy().unwrap().unwrap());
        assert_eq!(tensors(&emu.policy), tensors(&start));
        assert_ne!(current, tensors(&start));
        let ref_model = Model::load(&CpuOps, &fixture(&format!("{model}-ref"))).unwrap();
        let spec = LossSpec::new(LossKind::Nca);
        let ref_stats =
            step::reference_stats(&CpuOps, &start, Some(&ref_model), &groups, &spec).unwrap();
        // The held-out reference statistics: the resident reference's, scored on the device.
        let on_device = emu.held_out_reference_stats(&groups).unwrap().unwrap();
        let on_cpu = cpu.held_out_reference_stats(&groups).unwrap().unwrap();
        assert_eq!(on_cpu, *ref_stats.as_ref().unwrap());
        for (d, c) in on_device.iter().zip(&on_cpu) {
            let rel = (d.logp_sum - c.logp_sum).abs() / c.logp_sum.abs();
            assert!(
                rel <= REL,
                "{model}: reference S {} on emu, {} on the CPU",
                d.logp_sum,
                c.logp_sum
            );
        }
        let held_out = HeldOut::new(groups.clone(), ref_stats, 1);
        let before = counters();
        let eval_emu = held_out.row(&emu, got.last().unwrap()).unwrap();
        // Evaluated where the weights are: statistics come back, not the policy.
        let downloaded = counters().downloaded_bytes - before.downloaded_bytes;
        let weight_bytes = 4 * current.iter().map(Vec::len).sum::<usize>() as u64;
        assert!(
            downloaded * 20 < weight_bytes,
            "{model}: a held-out evaluation downloaded {downloaded} bytes, weights are {weight_bytes}"
        );
        let eval_cpu = held_out.row(&cpu, want.last().unwrap()).unwrap();
        let loss = |row: &serde_json::Value| row["eval_loss"].as_f64().unwrap();
        let rel = (loss(&eval_emu) - loss(&eval_cpu)).abs() / loss(&eval_cpu).abs();
        // The f32 device path against the CPU, from weights whose updates agree to UPDATE_REL.
        assert!(
            rel <= UPDATE_REL,
            "{model}: held-out loss {} on emu, {} on the CPU",
            loss(&eval_emu),
            loss(&eval_cpu)
        );
        emu.sync_to_host().unwrap();
        assert_eq!(tensors(&emu.policy), current);
        assert_eq!(emu.optimizer.step, cpu.optimizer.step);
        let names = contralign::model::params::param_specs(&start.cfg);
        let tensors = emu.policy.params.iter();
        let moments = emu.optimizer.exp_avg.iter().zip(&cpu.optimizer.exp_avg);
        for ((((g, w), w0), v), (name, _)) in tensors
            .iter()
            .zip(cpu.policy.params.iter())
            .zip(start.params.iter())
            .zip(&cpu.optimizer.exp_avg_sq)
            .zip(&names)
        {
            let err = update_err(g, w, w0, v, &cpu.optimizer);
            assert!(
                err <= UPDATE_REL,
                "{model}: update of {name}: relative error {err:.2e}"
            );
        }
        for (g, w) in moments {
            let want: Vec<f64> = w.iter().map(|&x| x as f64).collect();
            assert!(common::rel_err(g, &want) <= UPDATE_REL);
        }
    }
}

#[test]
fn steps_after_the_first_allocate_nothing_on_the_device() {
    let mut rng = rng("steps_after_the_first_allocate_nothing_on_the_device");
    // Groups of one shape, so that every step packs the same sizes.
    let one = random_groups(&mut rng, 1, 256, 8, 3, 6).remove(0);
    // Micro-batches of exactly one group, so that the plan (made for `micro_tokens`) is as
    // tight as the steps' needs; and of the whole step, with room to spare.
    let tight = one.prompt.len() + one.responses.iter().map(Vec::len).sum::<usize>();
    let groups = vec![one; 9];
    let (f32, bf16) = (PrecisionOptions::all_f32(), PrecisionOptions::default());
    for (model, recompute, precision, micro_tokens) in [
        ("tiny-mistral", RecomputePolicy::Full, f32, 10_000),
        ("tiny-mistral", RecomputePolicy::Selective, f32, 10_000),
        ("tiny-mistral", RecomputePolicy::Selective, bf16, tight),
        ("tiny-mistral", RecomputePolicy::None, bf16, tight),
        ("tiny-mixtral", RecomputePolicy::Selective, f32, 10_000),
        ("tiny-mixtral", RecomputePolicy::Selective, bf16, tight),
    ] {
        let opts = TrainOptions {
            recompute,
            precision,
            ..options(4, micro_tokens)
        };
        let mut emu = trainer(model, &groups, opts);
        let plan = emu.device_plan().unwrap();
        let before = counters();
        emu.use_device(Device::Emu).unwrap();
        let after_setup = counters();
        // The engine allocates its plan as one arena (every region but cuBLAS's workspace,
        // which the GPU's handle holds), and besides it only the gradient norm's few
        // bytes of pointers and partial sums.
        let planned = plan.total() - plan.category_bytes(Category::CublasWorkspace);
        let arena = emu.device_bytes().unwrap() as u64;
        let made = after_setup.allocated_bytes - before.allocated_bytes;
        assert!(
            arena >= planned && arena - planned < 4096 && made >= arena && made - arena < 4096,
            "{model}: planned {planned} bytes, arena {arena}, allocated {made}"
        );
        emu.step_to_end().unwrap();
        let after_first = counters();
        assert_eq!(
            after_first.allocations,
            after_setup.allocations,
            "{model} {} {recompute:?}: the first step allocated {} bytes beyond the plan",
            precision.describe(),
            after_first.allocated_bytes - after_setup.allocated_bytes
        );
        let records = common::train_steps(&mut emu, 3);
        let now = counters();
        assert_eq!(
            now.allocations,
            after_first.allocations,
            "{model} {}: steps 2 to 4 allocated {} bytes",
            precision.describe(),
            now.allocated_bytes - after_first.allocated_bytes
        );
        assert!(records.iter().all(|r| r.loss.is_finite()));
    }
}

/// Groups longer than `--micro-tokens` run as passes of their own, training and held-out: the
/// plan is made for the longest (`Trainer::pass_tokens`), the engine allocates it, and
/// neither the steps nor a held-out evaluation allocate beyond it.
#[test]
fn groups_longer_than_a_micro_batch_are_planned_for() {
    let mut rng = rng("groups_longer_than_a_micro_batch_are_planned_for");
    let groups = random_groups(&mut rng, 6, 256, 8, 3, 6);
    let held_out = random_groups(&mut rng, 2, 256, 30, 4, 20);
    let train_longest = groups.iter().map(Group::packed_len).max().unwrap();
    let held_longest = held_out.iter().map(Group::packed_len).max().unwrap();
    assert!(
        held_longest > train_longest,
        "{held_longest} vs {train_longest}"
    );
    let micro_tokens = train_longest / 2;
    for model in ["tiny-mistral", "tiny-mixtral"] {
        let opts = TrainOptions {
            recompute: RecomputePolicy::Selective,
            precision: PrecisionOptions::default(),
            ..options(3, micro_tokens)
        };
        let mut emu = trainer(model, &groups, opts);
        assert_eq!(emu.pass_tokens(), train_longest);
        emu.plan_passes_of(&held_out).unwrap();
        assert_eq!(emu.pass_tokens(), held_longest);
        let plan = emu.device_plan().unwrap();
        let before = counters();
        emu.use_device(Device::Emu).unwrap();
        let after_setup = counters();
        let planned = plan.total() - plan.category_bytes(Category::CublasWorkspace);
        let made = after_setup.allocated_bytes - before.allocated_bytes;
        assert!(
            made >= planned && made - planned < 8192,
            "{model}: planned {planned} bytes, allocated {made}"
        );
        let records = common::train_to_end(&mut emu);
        assert!(records.iter().all(|r| r.loss.is_finite()), "{model}");
        let ref_stats = emu.held_out_reference_stats(&held_out).unwrap();
        let eval = emu.evaluate(&held_out, ref_stats.as_deref()).unwrap();
        assert!(eval.loss.is_finite(), "{model}");
        assert_eq!(
            counters().allocations,
            after_setup.allocations,
            "{model}: passes longer than --micro-tokens {micro_tokens} allocated past the plan"
        );
        assert!(
            emu.plan_passes_of(&held_out).is_err(),
            "planned after the fact"
        );
    }
}

/// A step copies to the device one list upload per micro-batch (the batch's host data with
/// the loss's inputs, staged together) and to the host only what it logs: per micro-batch
/// the loss kernels' summary (the loss and the metrics: 1 + 6 + K + 2 f64 for groups of K
/// responses) and, for Mixtral, the load-balancing sums (2E + 1 f64); per step the gradient
/// norm and the clip factor (two f32). The host reads them a step late: a step's call
/// returns the record of the step before it.
#[test]
fn a_step_uploads_its_batches_once_and_downloads_only_the_scalars_it_logs() {
    let mut rng = rng("a_step_uploads_its_batches_once_and_downloads_only_the_scalars_it_logs");
    let one = random_groups(&mut rng, 1, 256, 8, 3, 6).remove(0);
    let k = one.responses.len();
    let group_tokens = one.prompt.len() + one.responses.iter().map(Vec::len).sum::<usize>();
    let groups = vec![one; 9];
    // One micro-batch per step, then one per group (the step's 3 groups).
    let (f32, bf16) = (PrecisionOptions::all_f32(), PrecisionOptions::default());
    for (model, aux_sums) in [("tiny-mistral", 0), ("tiny-mixtral", 2 * 4 + 1)] {
        for (micro_tokens, micro_batches, precision) in [
            (10_000, 1, f32),
            (group_tokens, 3, f32),
            (group_tokens, 3, bf16),
        ] {
            let opts = TrainOptions {
                precision,
                ..options(4, micro_tokens)
            };
            let mut emu = trainer(model, &groups, opts);
            emu.use_device(Device::Emu).unwrap();
            assert!(
                emu.train_step().unwrap().is_none(),
                "step 1 read in its own call"
            );
            let before = counters();
            let late = emu.train_step().unwrap().map(|r| r.step);
            let after = counters();
            assert_eq!(late, Some(1), "step 2 returns the record of step 1");
            assert_eq!(emu.flush().unwrap().map(|r| r.step), Some(2));
            let logged_bytes = 8 * (1 + 6 + k + 2 + aux_sums) as u64;
            let what = format!(
                "{model}, a step of {micro_batches} micro-batches, {}",
                precision.describe()
            );
            assert_eq!(
                after.uploads - before.uploads,
                micro_batches,
                "uploads of {what}"
            );
            assert_eq!(
                (
                    after.downloads - before.downloads,
                    after.downloaded_bytes - before.downloaded_bytes
                ),
                (
                    micro_batches * (1 + (aux_sums > 0) as u64) + 1,
                    micro_batches * logged_bytes + 8
                ),
                "downloads of {what}"
            );
        }
    }
}

#[test]
fn a_run_whose_plan_does_not_fit_stops_before_loading_weights() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("run");
    let err = common::contralign_fails(
        &[
            "train",
            "--model",
            &fx("tiny-mistral"),
            "--data",
            &fx("tiny-mistral.reward.jsonl"),
            "--loss",
            "sft",
            "--device",
            "emu",
            "--memory",
            "40MB",
            "--out",
            &out.to_string_lossy(),
        ],
        "does not fit",
    );
    assert!(
        err.contains("Each of these fits: --micro-tokens 1024."),
        "{err}"
    );
    assert!(!out.exists(), "a refused run left {}", out.display());
}

#[test]
fn resume_on_the_emulated_device_is_exact() {
    let tmp = TempDir::new().unwrap();
    let train = |name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let mut args: Vec<String> = [
            "train",
            "--loss",
            "nca",
            "--device",
            "emu",
            "--groups-per-step",
            "2",
            "--lr",
            "1e-3",
            "--max-grad-norm",
            "0.5",
            "--steps",
            "4",
            "--save-every",
            "2",
        ]
        .map(String::from)
        .to_vec();
        for (flag, value) in [
            ("--model", fx("tiny-mixtral")),
            ("--ref-model", fx("tiny-mixtral-ref")),
            ("--data", fx("tiny-mixtral.reward.jsonl")),
            ("--out", out.to_string_lossy().into_owned()),
        ] {
            args.extend([flag.to_string(), value]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let run = contralign_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        // Without a recompute flag and without a memory limit, a device run recomputes
        // selectively.
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(
            stderr.contains("recompute: selective"),
            !extra.contains(&"cpu"),
            "{stderr}"
        );
        out
    };
    let straight = train("straight", &[]);
    let resumed = train("resumed", &[]);
    // A run that died after checkpoint-2: resumed, it redoes steps 3 and 4 identically.
    std::fs::remove_dir_all(resumed.join("final")).unwrap();
    std::fs::remove_dir_all(resumed.join("checkpoint-4")).ok();
    contralign_ok(&["train", "--resume", &resumed.to_string_lossy()]);
    assert_eq!(
        metrics_without_timing(&resumed),
        metrics_without_timing(&straight)
    );
    let weights = |dir: &std::path::Path| std::fs::read(dir.join("final/model.safetensors"));
    assert!(weights(&resumed).unwrap() == weights(&straight).unwrap());
    // The device run (bf16 stores, the device's default) trains as the CPU's bf16-rounding
    // mode does, within tests/train_bf16.rs's bound on the loss. That bound assumes the two
    // route every token alike, which a top-2 near-tie could break (tests/train_bf16.rs); this
    // fixed data has none.
    let cpu = train("cpu", &["--device", "cpu", "--precision", "bf16"]);
    let (d, c) = (
        metrics_without_timing(&straight),
        metrics_without_timing(&cpu),
    );
    for (g, w) in d.iter().zip(&c) {
        let (g, w) = (g["loss"].as_f64().unwrap(), w["loss"].as_f64().unwrap());
        common::assert_close("loss", g, w, 8.0 / 256.0);
    }
}

/// One `sft` step of the tiny Mistral on the emulated device under `--micro-tokens` and
/// `--memory`, with `extra` flags, writing into `out`.
fn tiny_device_run(
    micro_tokens: &str,
    memory: &str,
    out: &std::path::Path,
    extra: &[&str],
) -> std::process::Output {
    let (model, data) = (fx("tiny-mistral"), fx("tiny-mistral.reward.jsonl"));
    let args = [
        "train",
        "--device",
        "emu",
        "--loss",
        "sft",
        "--model",
        &model,
        "--data",
        &data,
        "--steps",
        "1",
        "--micro-tokens",
        micro_tokens,
        "--memory",
        memory,
        "--out",
        out.to_str().unwrap(),
    ];
    common::contralign(&[&args[..], extra].concat())
}

/// The bytes of the tiny Mistral's device plan (default precision, no reference).
fn tiny_plan_bytes(tokens: usize, recompute: RecomputePolicy) -> u64 {
    let cfg = ModelConfig::load(&fixture("tiny-mistral")).unwrap();
    let (precision, reference) = (PrecisionOptions::default(), ReferenceSource::None);
    let plan = DeviceEngine::plan(&cfg, tokens, recompute, reference, precision).unwrap();
    plan.total()
}

/// Bytes as `--memory` takes them, exactly.
fn memory_flag(bytes: u64) -> String {
    format!("{:.9}", bytes as f64 / 1e9)
}

/// A group longer than `--micro-tokens` runs as a pass of its own: a device run says so and
/// plans for it (one whose groups fit says nothing); where only full recompute fits that pass,
/// a run that chose selective itself takes full; under a `--recompute` it was given, it refuses
/// before reading a weight, though the plan for `--micro-tokens` would fit.
#[test]
fn a_group_longer_than_a_micro_batch_is_planned_for_on_a_device() {
    let tmp = TempDir::new().unwrap();
    let run = |micro_tokens: &str, memory: &str, recompute: &[&str]| {
        let out = tmp
            .path()
            .join(format!("{micro_tokens}-{memory}-{}", recompute.len()));
        (tiny_device_run(micro_tokens, memory, &out, recompute), out)
    };
    let said = "more than --micro-tokens 8: planned for passes of";
    let mut stderr = String::new();
    for (micro_tokens, longer) in [("8192", false), ("8", true)] {
        let (out, _) = run(micro_tokens, "80GB", &[]);
        stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "{stderr}");
        assert_eq!(stderr.contains(said), longer, "{stderr}");
    }
    let longest: usize = stderr
        .split("--data has a group of ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no group length in {stderr}"));
    let plan = tiny_plan_bytes;
    let (small, long) = (
        plan(8, RecomputePolicy::Selective),
        plan(longest, RecomputePolicy::Selective),
    );
    let long_full = plan(longest, RecomputePolicy::Full);
    // Room for the long pass under full recompute only.
    let room = small.max(long_full);
    assert!(room < long, "{small}, {long_full}, {long} bytes");
    let (out, _) = run("8", &memory_flag(room), &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("recompute: full (a pass of"), "{stderr}");
    // Under a given --recompute selective, no fallback: refused before any weight is read.
    let (out, dir) = run("8", &memory_flag(room), &["--recompute", "selective"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("--data's group of") && stderr.contains("does not fit"),
        "{stderr}"
    );
    assert!(!dir.exists(), "a refused run left {}", dir.display());
}

/// Where selective recompute does not fit the micro-batch, a device run takes full recompute
/// and names the largest `--micro-tokens` (a multiple of 128) at which selective would fit.
#[test]
fn a_run_that_falls_back_to_full_recompute_names_the_micro_batch_where_selective_fits() {
    let tmp = TempDir::new().unwrap();
    let plan = tiny_plan_bytes;
    // Room for 4096 tokens with full recompute: selective fits up to the last multiple of
    // 128 before it does not.
    let room = plan(4096, RecomputePolicy::Full);
    let fits = |t: usize| plan(t, RecomputePolicy::Selective) <= room;
    let largest = (1..32)
        .map(|i| i * 128)
        .take_while(|&t| fits(t))
        .last()
        .unwrap();
    assert!(largest < 4096 && !fits(largest + 128));
    let run = tiny_device_run("4096", &memory_flag(room), &tmp.path().join("run"), &[]);
    assert!(run.status.success());
    let stderr = String::from_utf8_lossy(&run.stderr);
    let said = format!(
        "recompute: full (selective does not fit; at --micro-tokens {largest} it does: about 6N"
    );
    assert!(stderr.contains(&said), "{stderr}");
}

/// A trainer of `groups` whose reference statistics come from a cache of `cached` (the
/// reference model's, computed here), on `device` or the CPU.
fn cached_trainer(
    model: &str,
    groups: &[Group],
    cached: &[Group],
    opts: &TrainOptions,
    device: Option<Device>,
) -> Trainer {
    let load = |name: &str| Model::load(&CpuOps, &fixture(name)).unwrap();
    let stats = step::reference_stats(
        &CpuOps,
        &load(model),
        Some(&load(&format!("{model}-ref"))),
        cached,
        &opts.spec,
    )
    .unwrap()
    .expect("NCA reads a reference");
    let lookup = RefLookup::from_stats(cached, &stats);
    let mut t = Trainer::new(
        opts.clone(),
        load(model),
        Reference::Cache(lookup),
        groups.to_vec(),
    )
    .unwrap();
    if let Some(device) = device {
        t.use_device(device).unwrap();
    }
    t
}

/// `session::run` of `trainer` into a fresh run directory, which must fail: the error and
/// the records metrics.jsonl holds.
fn run_to_failure(
    trainer: &mut Trainer,
    model: &str,
    on_step: impl FnMut(&StepRecord, &Trainer) -> anyhow::Result<()>,
) -> (String, Vec<serde_json::Value>) {
    let tmp = TempDir::new().unwrap();
    let run = RunDir::create(tmp.path()).unwrap();
    let save = SaveOptions {
        dtype: None,
        max_shard_bytes: usize::MAX,
        source: fixture(model),
        total_limit: None,
        keep: None,
    };
    let err = session::run(
        trainer,
        &run,
        &save,
        0,
        &AtomicBool::new(false),
        |_| false,
        on_step,
    )
    .err()
    .expect("the run fails");
    let logged = std::fs::read_to_string(run.metrics_path())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (format!("{err:#}"), logged)
}

/// A failure on a device comes with a step in flight whose record is not read yet: that
/// record is read and logged before the error, not lost with it. The second step's groups
/// include one the reference cache lacks, so it fails before its first launch while the
/// first is in flight; and a failure of what sees a logged step (`on_step`: a held-out
/// evaluation, the progress display) comes with the next step queued.
#[test]
fn a_failure_on_a_device_logs_the_step_in_flight_before_it() {
    let mut rng = rng("a_failure_on_a_device_logs_the_step_in_flight_before_it");
    let model = "tiny-mistral";
    let groups = random_groups(&mut rng, 9, 256, 9, 4, 10);
    let opts = options(3, 40);
    let planner = Planner::new(
        groups.iter().map(Group::packed_len).collect(),
        opts.seed,
        opts.budget,
    )
    .unwrap();
    let mut cursor = Cursor::new(&planner, Position::default());
    let (first, _) = cursor.next_step(&planner);
    let (second, _) = cursor.next_step(&planner);
    let missing = *second.iter().find(|g| !first.contains(g)).unwrap();
    let cached: Vec<Group> = (0..groups.len())
        .filter(|&g| g != missing)
        .map(|g| groups[g].clone())
        .collect();
    let mut cpu = cached_trainer(model, &groups, &groups, &opts, None);
    let want = [cpu.step_to_end().unwrap(), cpu.step_to_end().unwrap()];
    let close = |logged: &serde_json::Value, want: &StepRecord| {
        let loss = logged["loss"].as_f64().unwrap();
        assert!(
            (loss - want.loss).abs() <= REL * want.loss.abs(),
            "step {}'s loss {loss} on emu, {} on the CPU",
            want.step,
            want.loss
        );
    };

    let mut emu = cached_trainer(model, &groups, &cached, &opts, Some(Device::Emu));
    let (err, logged) = run_to_failure(&mut emu, model, |_, _| Ok(()));
    assert!(err.contains("not in the reference cache"), "{err}");
    assert!(
        err.contains("step 1, which ran before this failure, is logged in"),
        "{err}"
    );
    assert_eq!(logged.len(), 1, "{logged:?}");
    assert_eq!(logged[0]["step"], 1);
    close(&logged[0], &want[0]);

    let mut emu = cached_trainer(model, &groups, &groups, &opts, Some(Device::Emu));
    let (err, logged) = run_to_failure(&mut emu, model, |record, _| {
        anyhow::ensure!(record.step != 1, "the evaluation after step 1 failed");
        Ok(())
    });
    assert!(err.contains("the evaluation after step 1 failed"), "{err}");
    assert!(
        err.contains("step 2, which ran before this failure, is logged in"),
        "{err}"
    );
    let steps: Vec<_> = logged.iter().map(|l| l["step"].as_u64()).collect();
    assert_eq!(steps, [Some(1), Some(2)]);
    close(&logged[0], &want[0]);
    close(&logged[1], &want[1]);
}

/// A micro-batch that fails part way leaves the step's gradients partial: the engine refuses
/// to update from them until the next step starts, then trains on.
#[test]
fn no_update_is_made_from_the_gradients_of_a_failed_micro_batch() {
    use contralign::engine::Update;
    use contralign::model::StepOptions;
    let mut rng = rng("no_update_is_made_from_the_gradients_of_a_failed_micro_batch");
    let model = "tiny-mistral";
    let policy = Model::load(&CpuOps, &fixture(model)).unwrap();
    let vocab = policy.cfg.vocab_size as u32;
    let groups = random_groups(&mut rng, 2, vocab, 9, 3, 8);
    // A response token past the vocabulary: the embedding's kernel traps on it.
    let mut bad = groups.clone();
    bad[1].responses[0][0] = vocab + 3;
    let (precision, reference) = (PrecisionOptions::default(), ReferenceSource::None);
    let plan = DeviceEngine::plan(
        &policy.cfg,
        128,
        RecomputePolicy::Full,
        reference,
        precision,
    )
    .unwrap();
    let mut engine = DeviceEngine::new(Device::Emu, &policy, None, &plan).unwrap();
    let spec = LossSpec::new(LossKind::Sft);
    let opts = StepOptions {
        recompute: RecomputePolicy::Full,
        aux_coef: 0.0,
    };
    let config = AdamWConfig::default();
    let update = |step| Update {
        config: &config,
        step,
        lr: 1e-3,
        seed: 7,
    };
    let before = engine.weights().unwrap();
    engine.zero_grads().unwrap();
    engine
        .accumulate(None, &groups[..1], &spec, &opts, 0.5)
        .unwrap();
    assert!(engine.accumulate(None, &bad, &spec, &opts, 0.5).is_err());
    let err = engine.finish_step(update(1), 1.0).unwrap_err();
    assert!(format!("{err:#}").contains("partial"), "{err:#}");
    assert_eq!(engine.weights().unwrap(), before, "no update was made");
    engine.zero_grads().unwrap();
    engine.accumulate(None, &groups, &spec, &opts, 1.0).unwrap();
    engine.finish_step(update(1), 1.0).unwrap();
    assert_ne!(engine.weights().unwrap(), before, "the next step trains");
}
