//! Evaluation while training (`train --eval-data --eval-every`, TRL's eval_dataset and
//! eval_steps): a 4-step run evaluating every 2 steps writes eval rows at steps 2 and 4 whose
//! values equal `eval` run on the checkpoints of those steps; a resume keeps every row once;
//! `plot` draws the eval series.

mod common;
#[path = "common/parquet_file.rs"]
mod parquet_file;

use common::{contralign_fails, contralign_ok, fx, random_groups};
use std::path::Path;
use tempfile::TempDir;

fn rows(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn eval_rows(rows: &[serde_json::Value]) -> Vec<&serde_json::Value> {
    rows.iter()
        .filter(|r| r.get("eval_loss").is_some())
        .collect()
}

/// `contralign eval` of a checkpoint on the held-out data, as the row an eval step writes.
fn eval_of(
    checkpoint: &Path,
    held_out: &Path,
    model: &str,
    extra: &[&str],
) -> serde_json::Map<String, serde_json::Value> {
    let ref_model = fx(&format!("{model}-ref"));
    let mut args = vec![
        "eval",
        "--model",
        checkpoint.to_str().unwrap(),
        "--ref-model",
        &ref_model,
        "--data",
        held_out.to_str().unwrap(),
        "--loss",
        "nca",
    ];
    args.extend(extra);
    let out = contralign_ok(&args);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["metrics"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (format!("eval_{k}"), v.clone()))
        .collect()
}

#[test]
fn eval_rows_equal_eval_on_the_checkpoints_and_survive_a_resume() {
    let mut rng = common::rng("eval_rows_equal_eval_on_the_checkpoints_and_survive_a_resume");
    let tmp = TempDir::new().unwrap();
    // Fresh held-out groups, as a Parquet test split beside the training data.
    let held: Vec<_> = random_groups(&mut rng, 5, 256, 6, 4, 7)
        .into_iter()
        .map(|g| (g.prompt, g.responses, g.rewards))
        .collect();
    let held_dir = tmp.path().join("held");
    std::fs::create_dir(&held_dir).unwrap();
    let held_out = held_dir.join("test-00000-of-00001.parquet");
    parquet_file::write_pretokenized(&held_out, &held, 2);

    for model in ["tiny-mistral", "tiny-mixtral"] {
        let run = tmp.path().join(model);
        let args = [
            "train",
            "--model",
            &fx(model),
            "--ref-model",
            &fx(&format!("{model}-ref")),
            "--data",
            &fx(&format!("{model}.reward.jsonl")),
            "--eval-data",
            held_dir.to_str().unwrap(),
            "--eval-every",
            "2",
            "--loss",
            "nca",
            "--steps",
            "4",
            "--groups-per-step",
            "2",
            "--lr",
            "1e-2",
            "--save-every",
            "2",
            "--out",
            run.to_str().unwrap(),
        ];
        contralign_ok(&args);
        let all = rows(&run);
        assert_eq!(all.len(), 6, "{model}: {all:?}");
        let evals = eval_rows(&all);
        assert_eq!(
            evals
                .iter()
                .map(|r| r["step"].as_u64().unwrap())
                .collect::<Vec<_>>(),
            [2, 4]
        );
        for (row, dir) in evals.iter().zip(["checkpoint-2", "final"]) {
            let want = eval_of(&run.join(dir), &held_out, model, &[]);
            let mut got = row.as_object().unwrap().clone();
            got.remove("step");
            got.remove("epoch");
            assert_eq!(got, want, "{model} {dir}");
        }
        // Training changed the policy between the two evaluations.
        assert_ne!(evals[0]["eval_loss"], evals[1]["eval_loss"]);

        // A run that lost final/ resumes from checkpoint-2 and logs steps 3, 4 and the
        // eval of step 4 once more, each row once.
        std::fs::remove_dir_all(run.join("final")).unwrap();
        contralign_ok(&["train", "--resume", run.to_str().unwrap()]);
        let resumed = rows(&run);
        let strip = |rows: &[serde_json::Value]| -> Vec<serde_json::Value> {
            rows.iter()
                .map(|r| {
                    let mut r = r.clone();
                    r.as_object_mut().unwrap().remove("tokens_per_s");
                    r
                })
                .collect()
        };
        assert_eq!(strip(&resumed), strip(&all), "{model}");

        let out = contralign_ok(&["plot", run.to_str().unwrap()]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("loss.png"));
    }

    // The held-out reference statistics need the reference model, not a training cache.
    let cache = tmp.path().join("ref.json");
    contralign_ok(&[
        "precompute-ref",
        "--model",
        &fx("tiny-mistral"),
        "--data",
        &fx("tiny-mistral.reward.jsonl"),
        "--out",
        cache.to_str().unwrap(),
    ]);
    contralign_fails(
        &[
            "train",
            "--model",
            &fx("tiny-mistral"),
            "--ref-logps",
            cache.to_str().unwrap(),
            "--data",
            &fx("tiny-mistral.reward.jsonl"),
            "--eval-data",
            held_out.to_str().unwrap(),
            "--loss",
            "nca",
            "--out",
            tmp.path().join("cached").to_str().unwrap(),
        ],
        "--eval-data with --ref-logps",
    );
}

/// The CPU's bf16-rounding mode evaluates held-out data as it trains, with the weights and
/// the reference rounded where the device stores bf16: the row equals `eval --precision bf16`
/// of the final model (its f32 master weights), not the f32 evaluation.
#[test]
fn eval_rows_in_the_cpus_bf16_mode_equal_eval_at_bf16() {
    let mut rng = common::rng("eval_rows_in_the_cpus_bf16_mode_equal_eval_at_bf16");
    let tmp = TempDir::new().unwrap();
    let held: Vec<_> = random_groups(&mut rng, 3, 256, 5, 3, 6)
        .into_iter()
        .map(|g| (g.prompt, g.responses, g.rewards))
        .collect();
    let held_out = tmp.path().join("held.parquet");
    parquet_file::write_pretokenized(&held_out, &held, 2);
    let run = tmp.path().join("run");
    contralign_ok(&[
        "train",
        "--model",
        &fx("tiny-mistral"),
        "--ref-model",
        &fx("tiny-mistral-ref"),
        "--data",
        &fx("tiny-mistral.reward.jsonl"),
        "--eval-data",
        held_out.to_str().unwrap(),
        "--loss",
        "nca",
        "--steps",
        "2",
        "--groups-per-step",
        "2",
        "--lr",
        "1e-2",
        "--precision",
        "bf16",
        "--master",
        "f32",
        "--out",
        run.to_str().unwrap(),
    ]);
    let all = rows(&run);
    let evals = eval_rows(&all);
    assert_eq!(evals.len(), 1, "{all:?}");
    let mut got = evals[0].as_object().unwrap().clone();
    got.remove("step");
    got.remove("epoch");
    let final_dir = run.join("final");
    let bf16 = eval_of(
        &final_dir,
        &held_out,
        "tiny-mistral",
        &["--precision", "bf16"],
    );
    assert_eq!(got, bf16);
    let f32 = eval_of(&final_dir, &held_out, "tiny-mistral", &[]);
    let loss = |m: &serde_json::Map<String, serde_json::Value>| m["eval_loss"].as_f64().unwrap();
    assert!(
        (loss(&f32) - loss(&bf16)).abs() > 1e-6 * loss(&f32).abs(),
        "the f32 and bf16 evaluations should differ: {} and {}",
        loss(&f32),
        loss(&bf16)
    );
}

/// On a device a step's scalars are read while the next step runs; a step that is evaluated
/// is read before the next one is queued, so that its eval row sees the weights it left:
/// every row differs from the next (a row evaluated a step late would repeat the next one's
/// weights), and the rows of steps 2 and 4 equal `eval` of checkpoint-2 and final/ (the
/// device's f32 path against the CPU, to 1e-5).
#[test]
fn eval_rows_on_a_device_see_the_weights_of_their_step() {
    let mut rng = common::rng("eval_rows_on_a_device_see_the_weights_of_their_step");
    let tmp = TempDir::new().unwrap();
    let held: Vec<_> = random_groups(&mut rng, 3, 256, 6, 3, 5)
        .into_iter()
        .map(|g| (g.prompt, g.responses, g.rewards))
        .collect();
    let held_out = tmp.path().join("held.parquet");
    parquet_file::write_pretokenized(&held_out, &held, 2);
    let model = "tiny-mistral";
    let run = tmp.path().join("run");
    contralign_ok(&[
        "train",
        "--model",
        &fx(model),
        "--ref-model",
        &fx(&format!("{model}-ref")),
        "--data",
        &fx(&format!("{model}.reward.jsonl")),
        "--eval-data",
        held_out.to_str().unwrap(),
        "--eval-every",
        "1",
        "--loss",
        "nca",
        "--steps",
        "4",
        "--groups-per-step",
        "2",
        "--lr",
        "1e-2",
        "--save-every",
        "2",
        "--device",
        "emu",
        "--precision",
        "f32",
        "--out",
        run.to_str().unwrap(),
    ]);
    let all = rows(&run);
    let evals = eval_rows(&all);
    let steps: Vec<u64> = evals.iter().map(|r| r["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    let loss = |row: &serde_json::Value| row["eval_loss"].as_f64().unwrap();
    for pair in evals.windows(2) {
        assert_ne!(loss(pair[0]), loss(pair[1]), "{pair:?}");
    }
    for (row, dir) in [(evals[1], "checkpoint-2"), (evals[3], "final")] {
        let want = eval_of(&run.join(dir), &held_out, model, &[]);
        let want = want["eval_loss"].as_f64().unwrap();
        common::assert_close(&format!("eval_loss of {dir}"), loss(row), want, 1e-5);
    }
}

#[test]
fn held_out_ids_outside_the_vocabulary_fail_before_the_first_step() {
    let tmp = TempDir::new().unwrap();
    let held = tmp.path().join("held.jsonl");
    std::fs::write(
        &held,
        r#"{"prompt_ids": [1, 999], "response_ids": [[7, 2], [9, 2]], "rewards": [1, 0]}"#,
    )
    .unwrap();
    let run = tmp.path().join("run");
    contralign_fails(
        &[
            "train",
            "--model",
            &fx("tiny-mistral"),
            "--data",
            &fx("tiny-mistral.reward.jsonl"),
            "--loss",
            "sft",
            "--eval-data",
            &held.to_string_lossy(),
            "--eval-every",
            "2",
            "--steps",
            "4",
            "--out",
            &run.to_string_lossy(),
        ],
        &format!("{}:1: prompt, token 1: id 999", held.display()),
    );
    assert!(
        !run.exists(),
        "a run refused before its first step leaves no --out"
    );
}
