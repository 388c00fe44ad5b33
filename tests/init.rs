//! `contralign init`: random Mistral and Mixtral checkpoints from flags or a config.json,
//! initialized as transformers does, that load, score and train — with the real Mistral
//! tokenizer on TRL's own rows, whose text and token-id forms score the same.

mod common;

use common::{contralign, contralign_fails, contralign_ok, fixture, fx, metrics_without_timing};
use contralign::config::ModelConfig;
use contralign::model::params::param_specs;
use contralign::model::Model;
use contralign::ops::cpu::CpuOps;
use std::path::Path;
use tempfile::TempDir;

/// A Mistral with the real Mistral tokenizer (its 32000 ids) and a small body.
fn tiny_with_mistral_tokenizer(out: &Path, extra: &[&str]) {
    let mut args = vec![
        "init",
        "--out",
        out.to_str().unwrap(),
        "--tokenizer",
        fixture("mistral-tokenizer").to_str().unwrap(),
        "--hidden-size",
        "32",
        "--intermediate-size",
        "48",
        "--layers",
        "2",
        "--heads",
        "4",
        "--kv-heads",
        "2",
        "--max-position-embeddings",
        "256",
    ]
    .into_iter()
    .map(String::from)
    .collect::<Vec<_>>();
    args.extend(extra.iter().map(|s| s.to_string()));
    contralign_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// TRL's golden rows (`trl_golden.jsonl`) in `dir` as text data and as the token ids TRL
/// made of them: (text.jsonl, ids.jsonl, rows).
fn trl_golden_files(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf, usize) {
    let golden = std::fs::read_to_string(fixture("mistral-tokenizer/trl_golden.jsonl")).unwrap();
    let (mut text, mut ids) = (String::new(), String::new());
    for line in golden.lines() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        text += &format!("{}\n", row["row"]);
        let pre = serde_json::json!({"prompt_ids": row["prompt_ids"],
            "chosen_ids": row["chosen_ids"], "rejected_ids": row["rejected_ids"]});
        ids += &format!("{pre}\n");
    }
    let (text_file, ids_file) = (dir.join("text.jsonl"), dir.join("ids.jsonl"));
    std::fs::write(&text_file, text).unwrap();
    std::fs::write(&ids_file, ids).unwrap();
    (text_file, ids_file, golden.lines().count())
}

/// `train` of `model` on `text` for two SimPO steps into `run`.
fn train_on_text<'a>(model: &'a Path, text: &'a Path, run: &'a Path) -> [&'a str; 15] {
    [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--data",
        text.to_str().unwrap(),
        "--loss",
        "simpo",
        "--steps",
        "2",
        "--groups-per-step",
        "3",
        "--lr",
        "1e-3",
        "--out",
        run.to_str().unwrap(),
    ]
}

fn std_and_mean(x: &[f32]) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = x.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
    (var.sqrt(), mean)
}

#[test]
fn init_from_flags_writes_a_transformers_initialized_mistral() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("model");
    tiny_with_mistral_tokenizer(&out, &["--seed", "3"]);
    let cfg = ModelConfig::load(&out).unwrap();
    assert_eq!(
        (
            cfg.vocab_size,
            cfg.hidden_size,
            cfg.num_layers,
            cfg.num_heads,
            cfg.num_kv_heads
        ),
        (32000, 32, 2, 4, 2)
    );
    assert_eq!(
        (cfg.head_dim, cfg.sliding_window, cfg.moe.is_none()),
        (8, Some(4096), true)
    );
    assert_eq!(cfg.raw["architectures"][0], "MistralForCausalLM");
    assert_eq!(cfg.raw["torch_dtype"], "float32");
    for file in ["tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(file).is_file(), "{file}");
    }
    // Weights N(0, 0.02²), norms 1: over the embedding's 1M draws the std is 0.02 to 1%.
    let (weights, _) =
        contralign::checkpoint::load_weights(&out, &cfg, contralign::ops::storage::Dtype::F32)
            .unwrap();
    let (std, mean) = std_and_mean(&weights["model.embed_tokens.weight"]);
    assert!(
        (std - 0.02).abs() < 2e-4 && mean.abs() < 1e-4,
        "std {std}, mean {mean}"
    );
    assert!(weights["model.norm.weight"].iter().all(|&w| w == 1.0));
    assert_eq!(weights.len(), param_specs(&cfg).len());

    // The same seed gives the same bytes, another seed other weights.
    let again = tmp.path().join("again");
    tiny_with_mistral_tokenizer(&again, &["--seed", "3"]);
    let other = tmp.path().join("other");
    tiny_with_mistral_tokenizer(&other, &["--seed", "4"]);
    let bytes = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(bytes(&out) == bytes(&again));
    assert!(bytes(&out) != bytes(&other));
    // An existing directory is never overwritten.
    contralign_fails(
        &["init", "--out", out.to_str().unwrap(), "--layers", "1"],
        "already exists",
    );
}

#[test]
fn init_from_a_config_file_with_flags_over_it() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("mixtral");
    contralign_ok(&[
        "init",
        "--out",
        out.to_str().unwrap(),
        "--config",
        &fx("tiny-mixtral/config.json"),
        "--layers",
        "1",
        "--experts",
        "3",
        "--dtype",
        "bfloat16",
        "--max-shard-size",
        "20kB",
    ]);
    let want = ModelConfig::load(&fixture("tiny-mixtral")).unwrap();
    let cfg = ModelConfig::load(&out).unwrap();
    let moe = cfg.moe.as_ref().unwrap();
    assert_eq!((cfg.num_layers, moe.num_experts), (1, 3));
    assert_eq!(
        (cfg.hidden_size, cfg.vocab_size, moe.experts_per_token),
        (
            want.hidden_size,
            want.vocab_size,
            want.moe.as_ref().unwrap().experts_per_token
        )
    );
    assert!(out.join("model.safetensors.index.json").is_file());
    let model = Model::load(&CpuOps, &out).unwrap();
    assert_eq!(model.dtype, safetensors::Dtype::BF16);

    // Experts on a Mistral, and shapes no model can have, are refused.
    let bad = tmp.path().join("bad");
    let bad = bad.to_str().unwrap();
    contralign_fails(
        &["init", "--out", bad, "--experts", "4"],
        "--experts is for Mixtral",
    );
    contralign_fails(
        &[
            "init",
            "--out",
            bad,
            "--hidden-size",
            "30",
            "--heads",
            "4",
            "--kv-heads",
            "2",
        ],
        "head_dim",
    );
    assert!(!Path::new(bad).exists());
}

/// TRL's rows (plain, conversational, implicit prompt) as text and as TRL's token ids score
/// the same under an init model with the real Mistral tokenizer, which also trains on them.
#[test]
fn init_models_score_trl_text_as_trl_ids_and_train_on_text() {
    let tmp = TempDir::new().unwrap();
    let model = tmp.path().join("model");
    tiny_with_mistral_tokenizer(&model, &[]);
    let (text_file, ids_file, rows) = trl_golden_files(tmp.path());
    let score = |data: &Path| -> Vec<serde_json::Value> {
        let out = contralign_ok(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ]);
        common::score_statistics(&String::from_utf8(out.stdout).unwrap())
    };
    let (from_text, from_ids) = (score(&text_file), score(&ids_file));
    assert_eq!(from_text.len(), 2 * rows);
    assert_eq!(from_text, from_ids);

    let run = tmp.path().join("run");
    let out = contralign(&train_on_text(&model, &text_file, &run));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // The row whose prompt ends in a space is reported, once.
    assert_eq!(stderr.matches("common prefix").count(), 1, "{stderr}");
    let metrics = metrics_without_timing(&run);
    assert_eq!(metrics.len(), 2);
    assert!(metrics
        .iter()
        .all(|m| m["loss"].as_f64().unwrap().is_finite()));
    assert!(run.join("final/tokenizer.json").is_file());
}

/// `init` checkpoints (Mistral and Mixtral, with the real tokenizer) load in transformers and
/// score TRL's rows as contralign does (`tools/check_hf_checkpoint.py`, float64), and so does
/// the `final/` model of a run trained from one on text data.
#[test]
#[ignore = "needs Python with torch and transformers: CONTRALIGN_PYTHON=/path/to/python cargo test --release --test init -- --ignored"]
fn init_models_load_in_transformers() {
    let python = std::env::var("CONTRALIGN_PYTHON").unwrap_or_else(|_| "python3".into());
    let tmp = TempDir::new().unwrap();
    let (text_file, ids_file, _) = trl_golden_files(tmp.path());
    let check = |model: &Path| {
        let out = contralign_ok(&[
            "score",
            "--model",
            model.to_str().unwrap(),
            "--data",
            ids_file.to_str().unwrap(),
        ]);
        let scores = tmp.path().join("scores.jsonl");
        std::fs::write(&scores, &out.stdout).unwrap();
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/check_hf_checkpoint.py");
        let run = std::process::Command::new(&python)
            .arg(&script)
            .args([model, &ids_file, &scores])
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&run.stdout).into_owned()
            + &String::from_utf8_lossy(&run.stderr);
        assert!(run.status.success(), "{}: {log}", model.display());
        assert!(log.contains("OK"), "{log}");
    };
    for arch in ["mistral", "mixtral"] {
        let model = tmp.path().join(arch);
        let mut extra = vec!["--arch", arch];
        if arch == "mixtral" {
            extra.extend(["--experts", "4", "--experts-per-token", "2"]);
        }
        tiny_with_mistral_tokenizer(&model, &extra);
        check(&model);
        let run = tmp.path().join(format!("{arch}-run"));
        contralign_ok(&train_on_text(&model, &text_file, &run));
        check(&run.join("final"));
    }
}

/// Outputs whose path cannot take them are refused before any work, naming --out: a dangling
/// link for a new model directory, a path ending in `/` for a file. A directory that cannot be
/// moved into place leaves nothing of itself behind.
#[test]
fn outputs_that_cannot_be_placed_are_refused_and_leave_nothing() {
    let dir = TempDir::new().unwrap();
    let link = dir.path().join("dangling");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
    let config = fixture("tiny-mistral").join("config.json");
    contralign_fails(
        &[
            "init",
            "--out",
            &link.to_string_lossy(),
            "--config",
            &config.to_string_lossy(),
        ],
        &format!("--out {}: already exists", link.display()),
    );
    let slashed = format!("{}/", link.display());
    contralign_fails(
        &[
            "init",
            "--out",
            &slashed,
            "--config",
            &config.to_string_lossy(),
        ],
        &format!("--out {slashed}: already exists"),
    );
    let slash = format!("{}/", dir.path().join("new").display());
    let (model, data) = (fx("tiny-mistral"), fx("tiny-mistral.pairs.jsonl"));
    for command in [&["grads", "--loss", "simpo"][..], &["precompute-ref"][..]] {
        let args = [
            command,
            &["--model", &model, "--data", &data, "--out", &slash],
        ]
        .concat();
        contralign_fails(
            &args,
            &format!("--out {slash}: is a directory; give a file path"),
        );
    }
    // A new directory ending in `/` is fine for init.
    contralign_ok(&[
        "init",
        "--out",
        &slash,
        "--config",
        &config.to_string_lossy(),
    ]);
    let failed = contralign::fsutil::write_dir_atomically(&link, |tmp| {
        std::fs::write(tmp.join("weights"), b"1234")?;
        Ok(())
    });
    assert!(failed.is_err());
    let mut left: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["dangling", "new"]);
}
