//! The run directory of `train`: a failed run leaves none behind, `final/` is the model
//! alone (sharing the last checkpoint's files), one process writes a run at a time (a lock
//! a killed process leaves does not block a resume, nor does the lack of a checkpoint), a new
//! run never replaces another's files, `--save-total-limit`, and a full disk in words.

mod common;

use common::{contralign, contralign_fails, contralign_ok, fx, metrics_without_timing};
use contralign::checkpoint::{save_f32, Tensor};
use contralign::train::run_dir::RunDir;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, Instant};
use tempfile::TempDir;

fn args(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "train",
        "--model",
        &fx("tiny-mistral"),
        "--data",
        &fx("tiny-mistral.reward.jsonl"),
        "--loss",
        "refa",
        "--groups-per-step",
        "2",
        "--lr",
        "1e-3",
        "--out",
        &out.to_string_lossy(),
    ]
    .map(String::from)
    .to_vec();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

#[test]
fn a_train_that_fails_on_its_inputs_leaves_no_out_directory() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("run");
    let missing = tmp.path().join("missing");
    let text = tmp.path().join("text.jsonl");
    std::fs::write(&text, r#"{"prompt": "Hi", "chosen": "a", "rejected": "b"}"#).unwrap();
    let cases: [(&str, &str, &str); 3] = [
        ("--data", &missing.to_string_lossy(), "cannot read"),
        ("--model", &missing.to_string_lossy(), "no such directory"),
        // Text data, and the model directory has no tokenizer.
        ("--data", &text.to_string_lossy(), "no tokenizer"),
    ];
    for (flag, value, message) in cases {
        let mut a = args(&out, &[]);
        let at = a.iter().position(|x| x == flag).unwrap();
        a[at + 1] = value.to_string();
        contralign_fails(&strs(&a), message);
        assert!(!out.exists(), "{flag} {value}: left {}", out.display());
    }
    // A directory that existed before is left as it was, empty.
    std::fs::create_dir(&out).unwrap();
    let mut a = args(&out, &[]);
    let at = a.iter().position(|x| x == "--data").unwrap();
    a[at + 1] = missing.to_string_lossy().into_owned();
    contralign_fails(&strs(&a), "cannot read");
    assert!(out.is_dir());
}

#[test]
fn final_is_the_model_alone_sharing_the_last_checkpoints_files() {
    let tmp = TempDir::new().unwrap();
    let model = tmp.path().join("model");
    common::tiny_mistral_with_tokenizer(&model);
    let out = tmp.path().join("run");
    let mut a = args(&out, &["--steps", "3", "--save-every", "0"]);
    a[2] = model.to_string_lossy().into_owned();
    contralign_ok(&strs(&a));
    let model_files = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ];
    assert_eq!(
        names(&out.join("final")),
        BTreeSet::from(model_files.map(String::from))
    );
    // The last step's checkpoint has the model and what a resume needs.
    let checkpoint = out.join("checkpoint-3");
    let resume_files = [
        "contralign_state.json",
        "optimizer.safetensors",
        "trainer_state.json",
    ];
    let want: BTreeSet<String> = model_files
        .iter()
        .chain(&resume_files)
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names(&checkpoint), want);
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        let inode = |dir: &Path| {
            std::fs::metadata(dir.join("model.safetensors"))
                .unwrap()
                .ino()
        };
        assert_eq!(
            inode(&out.join("final")),
            inode(&checkpoint),
            "not a hard link"
        );
    }
    // trainer_state.json holds only fields of transformers' TrainerState.
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(checkpoint.join("trainer_state.json")).unwrap(),
    )
    .unwrap();
    let hf_fields = [
        "epoch",
        "global_step",
        "max_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "train_batch_size",
        "num_train_epochs",
        "num_input_tokens_seen",
        "total_flos",
        "log_history",
        "best_metric",
        "best_global_step",
        "best_model_checkpoint",
        "is_local_process_zero",
        "is_world_process_zero",
        "is_hyper_param_search",
        "trial_name",
        "trial_params",
        "stateful_callbacks",
    ];
    for key in state.as_object().unwrap().keys() {
        assert!(hf_fields.contains(&key.as_str()), "{key}");
    }
    assert_eq!(state["global_step"], 3);
    // No generation_config.json in the source: one from config.json's token ids.
    let generation: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("final/generation_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        generation,
        serde_json::json!({"_from_model_config": true, "bos_token_id": 1, "eos_token_id": 2})
    );
    assert_eq!(state["max_steps"], 3);
    let history = state["log_history"].as_array().unwrap();
    assert_eq!(
        history
            .iter()
            .map(|h| h["step"].as_u64().unwrap())
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
}

/// Waits until `run`'s metrics.jsonl has at least `lines` lines and `dir` exists.
fn wait_for(run: &Path, lines: usize, dir: &str) {
    let started = Instant::now();
    let metrics = run.join("metrics.jsonl");
    while std::fs::read_to_string(&metrics).map_or(0, |t| t.lines().count()) < lines
        || !run.join(dir).is_dir()
    {
        assert!(started.elapsed().as_secs() < 120, "no progress in 120 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_second_writer_is_refused_and_a_killed_writer_does_not_block_a_resume() {
    let tmp = TempDir::new().unwrap();
    let run = tmp.path().join("run");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_contralign"))
        .args(args(&run, &["--steps", "1000000", "--save-every", "2"]))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&run, 3, "checkpoint-2");
    let holder = format!("process {}", child.id());
    let run_s = run.to_string_lossy().into_owned();
    for second in [
        vec!["train", "--resume", &run_s, "--steps", "4"],
        strs(&args(&run, &["--steps", "4"])),
    ] {
        let stderr = contralign_fails(&second, "is being written by");
        assert!(stderr.contains(&holder), "{stderr}");
    }
    child.kill().unwrap();
    child.wait().unwrap();

    // The resume after SIGKILL redoes the steps after the newest checkpoint: one metrics
    // line per step, whatever the killed process had written (a half-written line too).
    let done = metrics_without_timing_lenient(&run);
    let target = done + 3;
    contralign_ok(&["train", "--resume", &run_s, "--steps", &target.to_string()]);
    let steps: Vec<u64> = metrics_without_timing(&run)
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, (1..=target as u64).collect::<Vec<_>>());
}

/// Complete lines of a metrics.jsonl that a killed process may have left half-written.
fn metrics_without_timing_lenient(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count()
}

fn checkpoints(run: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = names(run)
        .iter()
        .filter_map(|n| n.strip_prefix("checkpoint-")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

#[test]
fn save_total_limit_keeps_the_newest_and_the_one_resumed_from() {
    let tmp = TempDir::new().unwrap();
    let run = tmp.path().join("run");
    let limited = ["--save-every", "1", "--save-total-limit"];
    contralign_ok(&strs(&args(
        &run,
        &[&limited[..], &["2", "--steps", "6"]].concat(),
    )));
    assert_eq!(checkpoints(&run), [5, 6]);
    // Resumed from checkpoint-6 with a limit of 1: each new checkpoint replaces the one
    // before it, but checkpoint-6 stays.
    let run_s = run.to_string_lossy().into_owned();
    contralign_ok(&[
        "train",
        "--resume",
        &run_s,
        "--steps",
        "8",
        "--save-total-limit",
        "1",
    ]);
    assert_eq!(checkpoints(&run), [6, 8]);
    assert_eq!(metrics_without_timing(&run).len(), 8);
    let out = contralign(&strs(&args(
        &tmp.path().join("zero"),
        &["--save-total-limit", "0"],
    )));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("--save-total-limit"),
        "{stderr}"
    );
}

#[test]
fn a_full_disk_is_reported_in_words_with_the_path() {
    if !Path::new("/dev/full").exists() {
        eprintln!("skipped: no /dev/full on this system");
        return;
    }
    let tmp = TempDir::new().unwrap();
    // The atomic write goes through its temporary name: here a link to /dev/full, which
    // takes no byte.
    let path = tmp.path().join("weights.safetensors");
    std::os::unix::fs::symlink("/dev/full", contralign::fsutil::temp_path(&path)).unwrap();
    let data = vec![0.5f32; 1000];
    let tensors = [Tensor {
        name: "w".into(),
        shape: vec![1000],
        data: &data,
    }];
    let text = format!("{:#}", save_f32(&path, &tensors).unwrap_err());
    assert!(
        text.contains(&contralign::fsutil::temp_path(&path).display().to_string())
            && text.contains("No space left on device")
            && !text.contains("IoError"),
        "{text}"
    );
    let run = RunDir::create(&tmp.path().join("run")).unwrap();
    std::os::unix::fs::symlink("/dev/full", run.metrics_path()).unwrap();
    let text = format!(
        "{:#}",
        run.append_metrics(&serde_json::json!({"step": 1}))
            .unwrap_err()
    );
    assert!(
        text.contains("metrics.jsonl") && text.contains("No space left on device"),
        "{text}"
    );
}

#[test]
fn a_new_run_refuses_a_directory_holding_names_it_would_replace() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("hf");
    for dir in ["checkpoint-2", "final"] {
        std::fs::create_dir_all(out.join(dir)).unwrap();
        std::fs::write(out.join(dir).join("pytorch_model.bin"), b"theirs").unwrap();
    }
    contralign_fails(
        &strs(&args(&out, &["--steps", "2"])),
        "holds checkpoint-2, final, which a new run would replace",
    );
    for dir in ["checkpoint-2", "final"] {
        let kept = std::fs::read(out.join(dir).join("pytorch_model.bin")).unwrap();
        assert_eq!(kept, b"theirs", "{dir}");
    }
    assert!(!out.join("metrics.jsonl").exists());
    assert!(
        !out.join("train.lock").exists(),
        "a refused run leaves no lock file"
    );
}

#[test]
fn a_run_killed_before_its_first_checkpoint_resumes_from_step_0() {
    let tmp = TempDir::new().unwrap();
    let run = tmp.path().join("run");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_contralign"))
        .args(args(
            &run,
            &["--steps", "1000000", "--save-every", "1000000"],
        ))
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(&run, 2, ".");
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(checkpoints(&run).is_empty());

    let run_s = run.to_string_lossy().into_owned();
    let out = contralign_ok(&["train", "--resume", &run_s, "--steps", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no checkpoint yet; starting again from step 0"),
        "{stderr}"
    );
    let steps: Vec<u64> = metrics_without_timing(&run)
        .iter()
        .map(|m| m["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, vec![1, 2, 3]);
    assert_eq!(checkpoints(&run), vec![3]);
}

#[test]
fn a_resume_keeps_the_flags_it_was_given_and_refuses_another_model() {
    let tmp = TempDir::new().unwrap();
    let run = tmp.path().join("run");
    contralign_ok(&strs(&args(&run, &["--steps", "2"])));
    let run_s = run.to_string_lossy().into_owned();
    contralign_fails(
        &[
            "train",
            "--resume",
            &run_s,
            "--steps",
            "3",
            "--model",
            &fx("tiny-mixtral"),
        ],
        "differs from the run's",
    );
    contralign_ok(&["train", "--resume", &run_s, "--steps", "3", "--lr", "2e-3"]);
    let saved = std::fs::read_to_string(run.join("train.toml")).unwrap();
    assert!(
        saved.contains("steps = 3") && saved.contains("lr = 0.002"),
        "{saved}"
    );
    // The next resume continues with them: one more step at the new rate.
    contralign_ok(&["train", "--resume", &run_s, "--steps", "4"]);
    let lrs: Vec<f64> = metrics_without_timing(&run)
        .iter()
        .map(|m| m["lr"].as_f64().unwrap())
        .collect();
    assert_eq!(lrs.len(), 4);
    let saved = std::fs::read_to_string(run.join("train.toml")).unwrap();
    assert!(saved.contains("lr = 0.002"), "{saved}");
}

#[test]
fn a_resume_replaces_an_exclusive_saved_flag_and_keeps_the_runs_budget_and_data() {
    let tmp = TempDir::new().unwrap();
    let run = tmp.path().join("run");
    // 3 groups, 2 a step: one epoch is 2 steps.
    contralign_ok(&strs(&args(&run, &["--epochs", "1"])));
    let run_s = run.to_string_lossy().into_owned();
    // --steps replaces the saved epochs (clap refuses the two together), and is saved.
    let out = contralign_ok(&["train", "--resume", &run_s, "--steps", "3"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--steps replaces epochs of"), "{stderr}");
    let saved = std::fs::read_to_string(run.join("train.toml")).unwrap();
    // The run's template date is saved: a resume on another day tokenizes alike.
    assert!(
        saved.contains("steps = 3")
            && !saved.contains("epochs")
            && saved.contains("template-date = \""),
        "{saved}"
    );
    assert_eq!(metrics_without_timing(&run).len(), 3);

    // Another cut of the epochs into steps would skip or repeat groups.
    contralign_fails(
        &[
            "train",
            "--resume",
            &run_s,
            "--steps",
            "4",
            "--groups-per-step",
            "3",
        ],
        "--groups-per-step 3 differs from the run's --groups-per-step 2",
    );
    contralign_fails(
        &[
            "train",
            "--resume",
            &run_s,
            "--steps",
            "4",
            "--tokens-per-step",
            "64",
        ],
        "--tokens-per-step 64 differs from the run's --groups-per-step 2",
    );

    // The same token ids with one reward changed are other data to learn from.
    let data = std::fs::read_to_string(fx("tiny-mistral.reward.jsonl")).unwrap();
    let changed = data.replacen("\"rewards\": [2.5,", "\"rewards\": [3.5,", 1);
    assert_ne!(changed, data);
    let changed_path = tmp.path().join("changed.jsonl");
    std::fs::write(&changed_path, changed).unwrap();
    contralign_fails(
        &[
            "train",
            "--resume",
            &run_s,
            "--steps",
            "4",
            "--data",
            &changed_path.to_string_lossy(),
        ],
        "differs from the data the run was started with",
    );
    assert_eq!(metrics_without_timing(&run).len(), 3);

    // A state saved before the rewards' hash and the budget were recorded resumes, its
    // data checked by the token ids alone.
    let state_path = run.join("checkpoint-3/contralign_state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let fields = state.as_object_mut().unwrap();
    assert!(fields.remove("training_hash").is_some() && fields.remove("budget").is_some());
    std::fs::write(&state_path, state.to_string()).unwrap();
    contralign_ok(&["train", "--resume", &run_s, "--steps", "4"]);
    assert_eq!(metrics_without_timing(&run).len(), 4);
}

#[test]
fn epochs_too_many_to_plan_are_refused_at_once() {
    let tmp = TempDir::new().unwrap();
    for budget in [["--groups-per-step", "2"], ["--tokens-per-step", "64"]] {
        let run = tmp.path().join(budget[0].trim_start_matches('-'));
        let mut args = args(&run, &["--epochs", "9223372036854775807"]);
        // args() gives --groups-per-step 2; the budget under test replaces it.
        let at = args.iter().position(|a| a == "--groups-per-step").unwrap();
        args.splice(at..at + 2, budget.map(String::from));
        contralign_fails(
            &strs(&args),
            "--epochs 9223372036854775807: 9223372036854775807 epochs of 3 groups are too many",
        );
        assert!(!run.exists(), "a refused run leaves no directory");
    }
}

#[test]
fn a_finished_run_killed_before_final_is_finished_by_a_resume_which_removes_leftovers() {
    let tmp = TempDir::new().unwrap();
    let run = tmp.path().join("run");
    contralign_ok(&strs(&args(&run, &["--steps", "2"])));
    let final_names = names(&run.join("final"));
    // Killed after checkpoint-2 and before final/, with the temporary copies of writes
    // another process (another pid) had under way.
    std::fs::remove_dir_all(run.join("final")).unwrap();
    let leftovers = [
        ".final.old-4242",
        ".checkpoint-3.tmp-4242",
        ".metrics.jsonl.tmp-77",
    ];
    std::fs::create_dir(run.join(leftovers[0])).unwrap();
    std::fs::create_dir(run.join(leftovers[1])).unwrap();
    std::fs::write(run.join(leftovers[1]).join("model.safetensors"), b"part").unwrap();
    std::fs::write(run.join(leftovers[2]), b"{}").unwrap();
    // Names that are not the run's own stay.
    let foreign = [".notes.tmp-1", ".final.tmp-x"];
    for name in foreign {
        std::fs::write(run.join(name), b"mine").unwrap();
    }

    let run_s = run.to_string_lossy().into_owned();
    let out = contralign_ok(&["train", "--resume", &run_s]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("is complete (2 of 2 steps;"), "{stderr}");
    assert_eq!(names(&run.join("final")), final_names);
    assert_eq!(
        std::fs::read(run.join("final/model.safetensors")).unwrap(),
        std::fs::read(run.join("checkpoint-2/model.safetensors")).unwrap()
    );
    let entries = names(&run);
    for name in leftovers {
        assert!(!entries.contains(name), "{name} is left: {entries:?}");
    }
    for name in foreign {
        assert!(entries.contains(name), "{name} was removed: {entries:?}");
    }
    assert_eq!(metrics_without_timing(&run).len(), 2);
}
