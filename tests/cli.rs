//! The `contralign` binary end to end: `score` and `grads` against the goldens, errors and
//! `--help`.

mod common;

use common::{
    assert_close, contralign_fails, contralign_ok, fx, golden_json, golden_loss_name, rel_err,
    Golden,
};
use tempfile::TempDir;

fn read_f32_tensors(path: &std::path::Path) -> std::collections::HashMap<String, Vec<f32>> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.dtype(), safetensors::Dtype::F32);
            (
                k,
                v.data()
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                    .collect(),
            )
        })
        .collect()
}

#[test]
fn score_prints_golden_statistics_in_file_order_on_the_cpu_and_the_emulated_device() {
    for (name, device) in [
        ("tiny-mistral", "cpu"),
        ("tiny-mixtral", "cpu"),
        ("tiny-mistral", "emu"),
        ("tiny-mixtral", "emu"),
    ] {
        let golden = Golden::load(&format!("{name}.golden.safetensors"));
        let out = contralign_ok(&[
            "score",
            "--model",
            &fx(name),
            "--data",
            &fx(&format!("{name}.reward.jsonl")),
            "--device",
            device,
        ]);
        let want = golden.get("reward.stats.policy");
        let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() * 4, want.len());
        let (mut group, mut response) = (0, 0);
        for (i, line) in lines.iter().enumerate() {
            if i > 0 && line["group"].as_u64().unwrap() != group {
                group += 1;
                response = 0;
            }
            assert_eq!(line["group"], group);
            let data = fx(&format!("{name}.reward.jsonl"));
            assert_eq!(line["source"], format!("{data}:{}", group + 1));
            assert_eq!(line["response"], response);
            let w = &want[i * 4..i * 4 + 4];
            assert_close("logp_sum", line["logp_sum"].as_f64().unwrap(), w[0], 1e-5);
            assert_eq!(line["tokens"].as_f64().unwrap(), w[1]);
            assert_close("logp_mean", line["logp_mean"].as_f64().unwrap(), w[2], 1e-5);
            match line["eos_logp"].as_f64() {
                Some(e) => assert_close("eos_logp", e, w[3], 1e-5),
                None => assert!(line["eos_logp"].is_null() && w[3].is_nan()),
            }
            response += 1;
        }
    }
}

#[test]
fn grads_writes_golden_gradients_on_the_cpu_and_the_emulated_device() {
    let dir = TempDir::new().unwrap();
    let cases: [(&str, &str, &[&str]); 4] = [
        (
            "tiny-mistral",
            "refa",
            &[
                "--loss", "refa", "--beta", "2", "--alpha", "0.5", "--gamma", "1.5", "--p", "2",
                "--lambda", "0.1", "--data", "reward",
            ],
        ),
        (
            "tiny-mistral",
            "dpo",
            &["--loss", "dpo", "--beta", "0.1", "--data", "pairs"],
        ),
        (
            "tiny-mixtral",
            "sft",
            &["--loss", "sft", "--data", "reward"],
        ),
        (
            "tiny-mixtral",
            "nca+aux",
            &[
                "--loss",
                "nca",
                "--beta",
                "0.1",
                "--alpha",
                "0.5",
                "--aux-coef",
                "0.02",
                "--no-checkpointing",
                "--data",
                "reward",
            ],
        ),
    ];
    let on_devices = ["cpu", "emu"]
        .into_iter()
        .flat_map(|device| cases.iter().map(move |case| (device, case)));
    for (device, &(name, key, flags)) in on_devices {
        let golden = Golden::load(&format!("{name}.golden.safetensors"));
        let out_path = dir.path().join(format!("{name}-{key}.safetensors"));
        let mut args: Vec<String> = vec![
            "grads".into(),
            "--model".into(),
            fx(name),
            "--ref-model".into(),
            fx(&format!("{name}-ref")),
            "--out".into(),
            out_path.to_string_lossy().into_owned(),
            "--device".into(),
            device.into(),
        ];
        for (i, f) in flags.iter().enumerate() {
            let prev = if i > 0 { flags[i - 1] } else { "" };
            args.push(if prev == "--data" {
                fx(&format!("{name}.{f}.jsonl"))
            } else {
                f.to_string()
            });
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        contralign_ok(&args);
        let tensors = read_f32_tensors(&out_path);
        assert_close(
            &format!("{name} {key} on {device}: loss"),
            tensors["loss"][0] as f64,
            golden.scalar(&format!("loss.{key}")),
            1e-5,
        );
        let prefix = format!("grad.{key}.");
        let mut compared = 0;
        for (gkey, (_, want)) in &golden.0 {
            if let Some(param) = gkey.strip_prefix(&prefix) {
                let err = rel_err(&tensors[param], want);
                assert!(
                    err < 1e-4,
                    "{name} {gkey} on {device}: relative error {err:.3e}"
                );
                compared += 1;
            }
        }
        assert_eq!(
            compared + 1,
            tensors.len(),
            "{name} {key}: every tensor compared"
        );
    }
}

#[test]
fn cli_errors_are_messages_not_panics() {
    let dir = TempDir::new().unwrap();
    let out_file = dir
        .path()
        .join("g.safetensors")
        .to_string_lossy()
        .into_owned();
    let missing_dir = dir
        .path()
        .join("nope/g.safetensors")
        .to_string_lossy()
        .into_owned();
    let reward = fx("tiny-mistral.reward.jsonl");
    let model = fx("tiny-mistral");
    let run = dir.path().join("run").to_string_lossy().into_owned();
    let cases: [(Vec<&str>, &str); 7] = [
        // Optimizer flags are checked before the data is read (and tokenized).
        (
            vec![
                "train",
                "--model",
                &model,
                "--data",
                "/no/such/data.jsonl",
                "--loss",
                "sft",
                "--out",
                &run,
                "--lr",
                "-1",
            ],
            "--lr must be >= 0, found -1",
        ),
        (
            vec![
                "train", "--model", &model, "--data", &reward, "--loss", "sft", "--out", &run,
                "--memory", "abc",
            ],
            "--memory \"abc\": unknown unit \"ABC\"",
        ),
        (
            vec![
                "grads", "--model", &model, "--data", &reward, "--loss", "nca", "--out", &out_file,
            ],
            "give --ref-model DIR",
        ),
        (
            vec![
                "grads",
                "--model",
                &model,
                "--data",
                &reward,
                "--loss",
                "sft",
                "--out",
                &missing_dir,
            ],
            "does not exist",
        ),
        (
            vec![
                "grads", "--model", &model, "--data", &reward, "--loss", "sft", "--beta", "-1",
                "--out", &out_file,
            ],
            "--beta must be a positive",
        ),
        (
            vec!["score", "--model", &model, "--data", "/no/such/file.jsonl"],
            "cannot read /no/such/file.jsonl",
        ),
        (
            vec!["score", "--model", "/no/such/model", "--data", &reward],
            "--model /no/such/model: no such directory",
        ),
    ];
    for (args, message) in cases {
        contralign_fails(&args, message);
    }
    assert!(
        !std::path::Path::new(&out_file).exists(),
        "no output is left behind after an error"
    );
}

/// Runs the binary with stdout a pipe whose reader is already closed.
fn closed_reader(args: &[&str]) -> std::process::Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    std::process::Command::new(env!("CARGO_BIN_EXE_contralign"))
        .args(args)
        .stdout(writer)
        .output()
        .unwrap()
}

/// Results that cannot be written (stdout on a full disk) are an error naming stdout, never
/// the panic of `println!`; a reader that goes away early (`| head`) ends the run quietly.
#[test]
fn results_that_cannot_be_written_are_an_error_not_a_panic() {
    let model = fx("tiny-mistral");
    let data = fx("tiny-mistral.pairs.jsonl");
    let commands: [&[&str]; 5] = [
        &["score", "--model", &model, "--data", &data],
        &[
            "eval", "--model", &model, "--loss", "simpo", "--data", &data,
        ],
        &["plan", "--model", &model],
        &[
            "generate",
            "--model",
            &model,
            "--data",
            &data,
            "--max-new-tokens",
            "2",
        ],
        &["selftest", "--device", "emu", "--seed", "1"],
    ];
    let run = |args: &[&str], stdout: std::process::Stdio| {
        std::process::Command::new(env!("CARGO_BIN_EXE_contralign"))
            .args(args)
            .stdout(stdout)
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    for args in commands {
        let full = std::fs::File::create("/dev/full").unwrap();
        let out = run(args, full.into()).wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("error: writing the results to stdout: No space left on device")
                && !stderr.contains("panicked"),
            "{args:?}: {stderr}"
        );
        // A reader closed before the command starts: its first write finds none. The table
        // is lost on purpose, and the exit status stays the verdict: success here, but a
        // selftest that fails or a plan that does not fit fails whoever reads it.
        if args[0] == "selftest" {
            continue;
        }
        let out = closed_reader(args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
        assert!(!stderr.contains("error"), "{args:?}: {stderr}");
    }
    let too_small = ["plan", "--model", &model, "--memory", "1MB"];
    let out = closed_reader(&too_small);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn an_out_that_would_replace_an_input_or_is_no_file_fails_before_any_work() {
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("data.jsonl");
    std::fs::copy(fx("tiny-mistral.reward.jsonl"), &data).unwrap();
    let before = std::fs::read(&data).unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(fx("tiny-mistral")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), model.join(entry.file_name())).unwrap();
    }
    let weights = model.join("model.safetensors");
    let weights_before = std::fs::read(&weights).unwrap();
    let a_file = dir.path().join("a-file");
    std::fs::write(&a_file, b"").unwrap();
    let (data_s, model_s, weights_s) = (
        data.to_string_lossy().into_owned(),
        model.to_string_lossy().into_owned(),
        weights.to_string_lossy().into_owned(),
    );
    let under_a_file = a_file.join("g.safetensors").to_string_lossy().into_owned();
    let a_dir = dir.path().to_string_lossy().into_owned();
    let grads = |out: &str| {
        [
            "grads", "--model", &model_s, "--data", &data_s, "--loss", "sft", "--out", out,
        ]
        .map(String::from)
        .to_vec()
    };
    let precompute = |out: &str| {
        [
            "precompute-ref",
            "--model",
            &model_s,
            "--data",
            &data_s,
            "--out",
            out,
        ]
        .map(String::from)
        .to_vec()
    };
    let cases = [
        (grads(&data_s), "is the --data input itself"),
        (grads(&weights_s), "would replace a file of --model"),
        (precompute(&data_s), "is the --data input itself"),
        (grads(&a_dir), "is a directory; give a file path"),
        (precompute(&a_dir), "is a directory; give a file path"),
        (grads(&under_a_file), "a-file is not a directory"),
    ];
    for (args, message) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        contralign_fails(&args, message);
    }
    assert_eq!(std::fs::read(&data).unwrap(), before);
    assert_eq!(std::fs::read(&weights).unwrap(), weights_before);
}

#[test]
fn counts_outside_their_range_are_refused_by_the_flag_parser() {
    let model = fx("tiny-mistral");
    let data = fx("tiny-mistral.reward.jsonl");
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("run").to_string_lossy().into_owned();
    let train = [
        "train", "--model", &model, "--data", &data, "--loss", "sft", "--out", &out,
    ];
    let too_big = (i64::MAX as u64 + 1).to_string();
    for (flag, value) in [
        ("--max-bad-steps", "0"),
        ("--micro-tokens", "0"),
        ("--seed", too_big.as_str()),
        ("--steps", too_big.as_str()),
        ("--warmup-steps", too_big.as_str()),
        // Counts train.toml saves are TOML integers (i64).
        ("--micro-tokens", too_big.as_str()),
        ("--groups-per-step", too_big.as_str()),
        ("--tokens-per-step", too_big.as_str()),
        ("--max-len", too_big.as_str()),
        ("--max-prompt-len", too_big.as_str()),
    ] {
        let mut args = train.to_vec();
        args.extend([flag, value]);
        let result = common::contralign(&args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(2), "{flag} {value}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag} <N>'")),
            "{flag} {value}: {stderr}"
        );
    }
    assert!(!std::path::Path::new(&out).exists());
    let score = [
        "score",
        "--model",
        &model,
        "--data",
        &data,
        "--micro-tokens",
        "0",
    ];
    assert_eq!(common::contralign(&score).status.code(), Some(2));

    // Counts that would overflow a sum or a list's capacity further on.
    let max = u64::MAX.to_string();
    let prompts = fx("tiny-mistral.pairs.jsonl");
    let generate = ["generate", "--model", &model, "--data", &prompts];
    let bench_moe = [
        "bench", "moe", "--device", "emu", "--tokens", "8", "--dim", "16",
    ];
    let bench_step = ["bench", "step", "--device", "emu", "--config", &model];
    let cases: [(&[&str], &str, &str); 7] = [
        (&generate, "--max-new-tokens", "0"),
        (&generate, "--max-new-tokens", &max),
        (&["bench", "scoring", "--device", "emu"], "--reps", &max),
        (&["bench", "attention", "--device", "emu"], "--reps", &max),
        (&bench_moe, "--reps", &max),
        (&bench_moe, "--top-k", "5"),
        (&bench_step, "--steps", &max),
    ];
    for (command, flag, value) in cases {
        let args = [command, &[flag, value]].concat();
        let result = common::contralign(&args);
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("invalid value '{value}' for '{flag} <")),
            "{args:?}: {stderr}"
        );
    }
    // --layers goes through the size check of a config.json's own keys.
    for command in ["step", "step-model"] {
        let args = ["bench", command, "--config", &model, "--layers", &max];
        common::contralign_fails(&args, "--layers 18446744073709551615: the sizes");
    }
}

#[test]
fn help_explains_every_flag() {
    let commands = [
        "train",
        "score",
        "eval",
        "grads",
        "precompute-ref",
        "plot",
        "generate",
        "selftest",
        "plan",
        "init",
        "demo",
        "bench scoring",
        "bench attention",
        "bench moe",
        "bench step",
        "bench step-model",
    ];
    for cmd in commands {
        let mut args: Vec<&str> = cmd.split(' ').collect();
        args.push("--help");
        let out = contralign_ok(&args);
        let text = String::from_utf8(out.stdout).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let mut flags = 0;
        for (i, line) in lines.iter().enumerate() {
            let spec = line.trim_start();
            if !(spec.starts_with("--") || spec.starts_with("-h, --")) {
                continue;
            }
            flags += 1;
            // clap's long help puts the description on the next line.
            let described = lines
                .get(i + 1)
                .is_some_and(|next| !next.trim().is_empty() && !next.trim_start().starts_with('-'));
            assert!(described, "`{cmd} --help`: {spec} has no description");
        }
        assert!(flags >= 1, "`{cmd} --help` lists {flags} flags:\n{text}");
    }
    let out = contralign_ok(&["--help"]);
    let text = String::from_utf8(out.stdout).unwrap();
    for cmd in commands.map(|c| c.split(' ').next().unwrap()) {
        assert!(text.contains(cmd), "`--help` does not list {cmd}");
    }
    let train = String::from_utf8(contralign_ok(&["train", "--help"]).stdout).unwrap();
    for word in [
        "metrics.jsonl",
        "checkpoint-STEP",
        "--resume",
        "--config",
        "Ctrl-C",
        "[default: 1e-6]",
    ] {
        assert!(
            train.contains(word),
            "`train --help` does not mention {word}"
        );
    }
}

/// The flags of a golden json's hyperparameter entry.
fn loss_flags(loss: &str, hp: &serde_json::Value) -> Vec<String> {
    let mut flags = vec!["--loss".to_string(), loss.to_string()];
    for (key, value) in hp.as_object().unwrap() {
        match (key.as_str(), value) {
            ("one_vs_all", serde_json::Value::Bool(true)) => flags.push("--one-vs-all".into()),
            ("normalize", serde_json::Value::Bool(false)) => flags.push("--no-normalize".into()),
            ("lam", v) => flags.extend(["--lambda".to_string(), v.to_string()]),
            (k, v) => flags.extend([format!("--{}", k.replace('_', "-")), v.to_string()]),
        }
    }
    flags
}

#[test]
fn eval_on_the_emulated_device_matches_the_cpu() {
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let run = |device: &str| -> serde_json::Value {
            let (model, reference) = (fx(name), fx(&format!("{name}-ref")));
            let data = fx(&format!("{name}.reward.jsonl"));
            let out = contralign_ok(&[
                "eval",
                "--model",
                &model,
                "--ref-model",
                &reference,
                "--data",
                &data,
                "--loss",
                "nca",
                "--device",
                device,
            ]);
            serde_json::from_slice(&out.stdout).unwrap()
        };
        let (cpu, emu) = (run("cpu"), run("emu"));
        assert_close(
            &format!("{name} eval nca loss on emu"),
            emu["loss"].as_f64().unwrap(),
            cpu["loss"].as_f64().unwrap(),
            1e-5,
        );
        let metrics = cpu["metrics"].as_object().unwrap();
        assert!(metrics.values().any(|v| v.is_f64()), "{cpu}");
        for (key, want) in metrics {
            let (got, want) = (emu["metrics"][key].as_f64(), want.as_f64());
            if let (Some(got), Some(want)) = (got, want) {
                let tolerance = 1e-5 * want.abs().max(1.0);
                assert!(
                    (got - want).abs() <= tolerance,
                    "{name} {key}: {got} vs {want}"
                );
            }
        }
    }
}

#[test]
fn eval_reproduces_every_golden_model_loss() {
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let golden = Golden::load(&format!("{name}.golden.safetensors"));
        let json = golden_json(name);
        let pairwise = json["pairwise_losses"].as_array().unwrap();
        for (golden_name, hp) in json["hyperparameters"].as_object().unwrap() {
            let loss = golden_loss_name(golden_name);
            let data = if pairwise.contains(&golden_name.as_str().into()) {
                "pairs"
            } else {
                "reward"
            };
            let mut args = vec![
                "eval".to_string(),
                "--model".into(),
                fx(name),
                "--ref-model".into(),
                fx(&format!("{name}-ref")),
                "--data".into(),
                fx(&format!("{name}.{data}.jsonl")),
            ];
            args.extend(loss_flags(loss, hp));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = contralign_ok(&args);
            let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            let want = golden.scalar(&format!("loss.{golden_name}"));
            assert_close(
                &format!("{name} eval {golden_name}"),
                result["loss"].as_f64().unwrap(),
                want,
                1e-5,
            );
            let metrics = result["metrics"].as_object().unwrap();
            for key in [
                "rewards/chosen",
                "rewards/margins",
                "rewards/accuracies",
                "logps/chosen",
                "rewards/rank_1",
                "eos_prob",
                "response_len",
            ] {
                assert!(
                    metrics[key].as_f64().is_some_and(f64::is_finite),
                    "{name} {golden_name}: {key}"
                );
            }
        }
    }
}

#[test]
fn hyperparameters_a_loss_does_not_read_are_reported_as_ignored() {
    let (model, data) = (fx("tiny-mistral"), fx("tiny-mistral.reward.jsonl"));
    let eval = |flags: &[&str]| {
        let mut args = vec!["eval", "--model", &model, "--data", &data];
        args.extend_from_slice(flags);
        String::from_utf8_lossy(&contralign_ok(&args).stderr).into_owned()
    };
    let nca = eval(&[
        "--loss",
        "nca",
        "--ref-model",
        &model,
        "--gamma",
        "2",
        "--label-smoothing",
        "0.1",
        "--p",
        "1",
    ]);
    assert!(
        nca.contains("note: --gamma, --p, --label-smoothing do not apply to --loss nca; ignored"),
        "{nca}"
    );
    let refa = eval(&[
        "--loss",
        "refa",
        "--gamma",
        "2",
        "--alpha",
        "0.5",
        "--no-normalize",
        "--p",
        "1",
    ]);
    assert!(!refa.contains("note:"), "{refa}");
    let free = eval(&[
        "--loss",
        "simpo",
        "--pairs",
        "best_vs_each",
        "--ref-model",
        &model,
    ]);
    assert!(
        free.contains("note: --loss simpo is reference-free: --ref-model ignored"),
        "{free}"
    );
    let aux = eval(&["--loss", "sft", "--aux-coef", "1"]);
    assert!(
        aux.contains("note: --aux-coef weighs Mixtral's load-balancing loss; a Mistral has none"),
        "{aux}"
    );
}

#[test]
fn eval_refuses_bad_requests_before_loading_models() {
    let reward = fx("tiny-mistral.reward.jsonl");
    let cases: [(&[&str], &str); 4] = [
        (
            &["--loss", "dpo", "--ref-model", "/no/such/ref"],
            "dpo is pairwise but the group has 4 responses; give --pairs",
        ),
        (&["--loss", "refa", "--gamma", "0"], "--gamma must be > 0"),
        (&["--loss", "refa", "--p", "3"], "--p must be 1 or 2"),
        (&["--loss", "infonca"], "give --ref-model DIR"),
    ];
    let model = fx("tiny-mistral");
    for (flags, message) in cases {
        // The pairwise check needs the groups, read through the model directory (which
        // must exist); the missing reference is still not loaded.
        let model = if flags.contains(&"dpo") {
            model.as_str()
        } else {
            "/no/such/model"
        };
        let mut args = vec!["eval", "--model", model, "--data", &reward];
        args.extend_from_slice(flags);
        contralign_fails(&args, message);
    }
}

#[test]
fn pairwise_losses_run_on_reward_groups_through_a_pairs_strategy() {
    for strategy in ["best_vs_random", "best_vs_each", "all_pairs"] {
        let out = contralign_ok(&[
            "eval",
            "--model",
            &fx("tiny-mistral"),
            "--data",
            &fx("tiny-mistral.reward.jsonl"),
            "--loss",
            "simpo",
            "--pairs",
            strategy,
        ]);
        let result: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert!(result["loss"].as_f64().unwrap() > 0.0);
        assert_eq!(
            result["metrics"]["rewards/accuracies"]
                .as_f64()
                .map(|a| (0.0..=1.0).contains(&a)),
            Some(true)
        );
    }
}

#[test]
fn selftest_on_the_emulator_passes_and_lists_every_op() {
    let out = contralign_ok(&["selftest", "--device", "emu"]);
    let text = String::from_utf8(out.stdout).unwrap();
    for op in [
        "swiglu_forward f32",
        "swiglu_backward dgate bf16",
        "embedding_forward bf16",
        "embedding_backward f32",
        "rmsnorm_forward y bf16",
        "rmsnorm_backward dh f32",
        "rmsnorm_backward dw bf16",
        "rope_forward f32",
        "rope_backward bf16",
        "cast f32->bf16",
        "cast bf16->f32",
        "grad_norm",
        "grad_clip",
        "adamw f32 param",
        "adamw bf16+master param",
        "adamw f32 unaligned param",
        "adamw bf16 stochastic neighbours",
        "adamw bf16 stochastic mean",
        "add_assign f32",
        "add_assign bf16",
        "grad_norm bf16",
        "grad_clip bf16",
        "gemm NT bf16->bf16",
        "gemm TN bf16->f32",
        "attention causal out f32",
        "attention window 11 x packed lse bf16",
        "attention_backward 1000-token stream dk f32",
        "attention_backward packed dv bf16",
    ] {
        assert!(text.contains(op), "selftest does not list {op}:\n{text}");
    }
    assert!(!text.contains("FAIL"), "{text}");
    assert!(text.contains("checks pass"), "{text}");
}

#[test]
fn cuda_without_a_gpu_is_a_clear_error() {
    // On a machine with a GPU and a CUDA build there is nothing to check here.
    if cfg!(feature = "cuda") && std::path::Path::new("/dev/nvidia0").exists() {
        eprintln!("skipped: a GPU is present");
        return;
    }
    let expected = if cfg!(feature = "cuda") {
        "CUDA driver"
    } else {
        "built without CUDA support"
    };
    contralign_fails(&["selftest", "--device", "cuda"], expected);
    let (model, data) = (fx("tiny-mistral"), fx("tiny-mistral.reward.jsonl"));
    contralign_fails(
        &[
            "score", "--model", &model, "--data", &data, "--device", "cuda",
        ],
        expected,
    );
}

/// `score` through the CLI at bf16: the emulator and the CPU's bf16-rounding mode agree within
/// the like-for-like bound of docs/numerics.md §6 (`6 √36 · 1.24e-4 = 4.5e-3` relative), and
/// `--precision` says its default and refuses a name it does not know.
#[test]
fn score_takes_the_precision_flag_on_every_backend() {
    let model = fx("tiny-mistral");
    let data = fx("tiny-mistral.reward.jsonl");
    let logp_sums = |device: &str, precision: &str| -> Vec<f64> {
        let out = contralign_ok(&[
            "score",
            "--model",
            &model,
            "--data",
            &data,
            "--device",
            device,
            "--precision",
            precision,
        ]);
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["logp_sum"]
                    .as_f64()
                    .unwrap()
            })
            .collect()
    };
    let emu = logp_sums("emu", "bf16");
    let cpu = logp_sums("cpu", "bf16");
    let f32 = logp_sums("cpu", "f32");
    assert_eq!(emu.len(), cpu.len());
    for (i, ((e, c), f)) in emu.iter().zip(&cpu).zip(&f32).enumerate() {
        let err = (e - c).abs() / c.abs();
        assert!(
            err <= 4.5e-3,
            "response {i}: emu {e} vs cpu {c} at bf16: {err:.2e}"
        );
        // bf16 is not f32: every logp_sum moves.
        assert_ne!(c, f, "response {i}: bf16 equals f32");
    }

    for cmd in ["score", "eval", "grads", "precompute-ref"] {
        let help = String::from_utf8(contralign_ok(&[cmd, "--help"]).stdout).unwrap();
        assert!(
            help.contains("--precision"),
            "`{cmd} --help` lacks --precision"
        );
        assert!(
            help.contains("f32 (the default"),
            "`{cmd} --help` states no default"
        );
    }
    let out = common::contralign(&[
        "score",
        "--model",
        &model,
        "--data",
        &data,
        "--precision",
        "f16",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("invalid value 'f16' for '--precision"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

/// `--racecheck` runs the checks and `--profile` replaces them: together one would be dropped.
#[test]
fn selftest_refuses_racecheck_with_profile() {
    let args = ["selftest", "--device", "emu", "--racecheck", "--profile"];
    let result = common::contralign(&args);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'--racecheck' cannot be used with '--profile'"),
        "{stderr}"
    );
}

/// Gradients or a loss beyond f32 are not written as a file of infinities: the first is
/// named, and nothing is left at --out.
#[test]
fn grads_that_are_not_finite_are_not_written() {
    let dir = TempDir::new().unwrap();
    let out = dir.path().join("g.safetensors");
    let (model, out_text) = (fx("tiny-mistral"), out.to_string_lossy());
    let pairs = fx("tiny-mistral.pairs.jsonl");
    let rewards = fx("tiny-mistral.reward.jsonl");
    let cases: [(&[&str], &str); 2] = [
        (
            &["--data", &pairs, "--loss", "simpo", "--beta", "1e40"],
            "e39 (inf in f32): not finite, so nothing was written",
        ),
        (
            &["--data", &rewards, "--loss", "refa", "--beta", "1e308"],
            "the loss is NaN (NaN in f32): not finite",
        ),
    ];
    for (flags, message) in cases {
        let args = [&["grads", "--model", &model, "--out", &out_text], flags].concat();
        common::contralign_fails(&args, message);
        assert!(!out.exists());
    }
}
