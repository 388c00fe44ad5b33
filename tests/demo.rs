//! The demo: alignment improves the held-out judge score over SFT on a shortened run with a
//! fixed seed, `--json` reports the table's numbers, and the demo's NCA phase is the same run
//! as `train --config examples/demo.toml`; it never replaces a directory it did not write.

mod common;

use common::{contralign_fails, contralign_ok, metrics_without_timing};
use tempfile::TempDir;

#[test]
fn nca_improves_over_sft_and_train_with_the_demo_config_reproduces_it() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("demo");
    let run = contralign_ok(&["demo", "--quick", "--json", "--out", &out.to_string_lossy()]);
    let report: serde_json::Value = serde_json::from_slice(&run.stdout).unwrap();
    let get = |phase: &str, key: &str| report[phase][key].as_f64();
    let (sft, nca) = (
        get("sft", "accuracy").unwrap(),
        get("nca", "accuracy").unwrap(),
    );
    eprintln!("{report}");
    assert!(nca > sft, "NCA judge score {nca} is not above SFT's {sft}");
    assert!(get("sft", "reward_accuracy").is_none());
    for phase in ["sft", "nca", "dpo"] {
        let accuracy = get(phase, "accuracy").unwrap();
        assert!((0.0..=1.0).contains(&accuracy), "{phase}: {accuracy}");
        assert!(get(phase, "tokens_per_s").unwrap() > 0.0);
        let dir = out.join(phase);
        for file in [
            "metrics.jsonl",
            "loss.png",
            "rewards.png",
            "logps.png",
            "final/config.json",
        ] {
            assert!(dir.join(file).is_file(), "{phase}: no {file}");
        }
    }
    for phase in ["nca", "dpo"] {
        assert!(get(phase, "chosen_logp_change").is_some());
        assert!(get(phase, "reward_accuracy").unwrap() > 0.5, "{phase}");
    }

    // examples/demo.toml, pointed at this demo's directory and shortened like --quick.
    let config = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo.toml"),
    )
    .unwrap()
    .replace("runs/demo", &out.to_string_lossy())
    .replace("steps = 120", "steps = 40");
    let config_path = tmp.path().join("demo.toml");
    std::fs::write(&config_path, config).unwrap();
    contralign_ok(&["train", "--config", &config_path.to_string_lossy()]);
    let train_run = tmp.path().join("demo-nca");
    assert_eq!(
        metrics_without_timing(&train_run),
        metrics_without_timing(&out.join("nca"))
    );
}

#[test]
fn the_demo_refuses_a_directory_it_did_not_write() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("project");
    std::fs::create_dir_all(out.join("sft")).unwrap();
    std::fs::write(out.join("sft").join("mine.txt"), b"theirs").unwrap();
    contralign_fails(
        &["demo", "--quick", "--out", &out.to_string_lossy()],
        "holds files the demo did not write",
    );
    assert_eq!(
        std::fs::read(out.join("sft").join("mine.txt")).unwrap(),
        b"theirs"
    );
    assert!(!out.join("tokenizer").exists());
}
