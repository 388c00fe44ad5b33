//! Bad input is a clear error naming the file, line, field or tensor — never a panic.

mod common;

use common::fixture;
use contralign::checkpoint::{load_weights, save_f32, Tensor};
use contralign::config::ModelConfig;
use contralign::data::pretokenized::read_file;
use contralign::loss::{LossKind, LossSpec};
use contralign::memory_plan::RecomputePolicy;
use contralign::model::params::param_specs;
use contralign::model::{Model, StepOptions};
use contralign::ops::cpu::CpuOps;
use contralign::ops::storage::Dtype as StorageDtype;
use contralign::step;
use std::path::Path;
use tempfile::TempDir;

fn err_text<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn assert_mentions(text: &str, parts: &[&str]) {
    for p in parts {
        assert!(text.contains(p), "error {text:?} does not mention {p:?}");
    }
}

fn data_file(dir: &TempDir, lines: &[&str]) -> std::path::PathBuf {
    let path = dir.path().join("data.jsonl");
    std::fs::write(&path, lines.join("\n")).unwrap();
    path
}

const GOOD: &str =
    r#"{"prompt_ids": [1, 5], "response_ids": [[7, 2], [9, 9, 2]], "rewards": [1, 0]}"#;

#[test]
fn malformed_json_names_file_and_line() {
    let dir = TempDir::new().unwrap();
    let path = data_file(
        &dir,
        &[GOOD, "", r#"{"prompt_ids": [1, 5], "response_ids": "#],
    );
    let text = err_text(read_file(&path));
    assert_mentions(&text, &[&format!("{}:3", path.display()), "malformed JSON"]);
    // A line that is not UTF-8 (a binary file) is named too.
    let mut bytes = format!("{GOOD}\n").into_bytes();
    bytes.extend_from_slice(b"\xff\xfe{}\n");
    std::fs::write(&path, bytes).unwrap();
    let text = err_text(read_file(&path));
    assert_mentions(&text, &[&format!("{}:2", path.display()), "not UTF-8 text"]);
}

#[test]
fn bad_fields_are_named() {
    let dir = TempDir::new().unwrap();
    let cases: [(&str, &[&str]); 6] = [
        (
            r#"{"prompt_ids": [1], "response_ids": [[3, 2], []], "rewards": [1, 0]}"#,
            &["response 1", "empty"],
        ),
        (
            r#"{"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [4]}"#,
            &["chosen_ids", "empty"],
        ),
        (
            r#"{"prompt_ids": [1], "response_ids": [[3, 2]], "rewards": [1, 0]}"#,
            &["1 responses but 2 rewards"],
        ),
        (
            r#"{"prompt_ids": [1, -4], "chosen_ids": [3], "rejected_ids": [4]}"#,
            &["prompt_ids", "element 1", "-4"],
        ),
        (
            r#"{"prompt": "hi", "completion": "x"}"#,
            &["unknown record", "completion"],
        ),
        (
            r#"{"prompt_ids": [1], "response_ids": [[3, 2], [4]], "rewards": [1, "a"]}"#,
            &["rewards", "element 1"],
        ),
    ];
    for (line, parts) in cases {
        let path = data_file(&dir, &[GOOD, line]);
        let text = err_text(read_file(&path));
        assert_mentions(&text, &[&format!("{}:2", path.display())]);
        assert_mentions(&text, parts);
    }
}

#[test]
fn token_outside_vocabulary_is_an_error() {
    let dir = TempDir::new().unwrap();
    let path = data_file(
        &dir,
        &[
            GOOD,
            r#"{"prompt_ids": [1, 5], "chosen_ids": [7, 256], "rejected_ids": [3]}"#,
        ],
    );
    let model = Model::load(&CpuOps, &fixture("tiny-mistral")).unwrap();
    let text = err_text(step::pack(&model, &read_file(&path).unwrap()));
    assert_mentions(
        &text,
        &[
            &format!("{}:2", path.display()),
            "response 0",
            "id 256",
            "vocabulary (size 256)",
        ],
    );
}

#[test]
fn skip_invalid_skips_ids_outside_the_vocabulary_and_groups_of_one() {
    let dir = TempDir::new().unwrap();
    let path = data_file(
        &dir,
        &[
            GOOD,
            r#"{"prompt_ids": [1, 999], "response_ids": [[7, 2], [9, 2]], "rewards": [1, 0]}"#,
            r#"{"prompt_ids": [1, 5], "response_ids": [[7, 2]], "rewards": [3]}"#,
            "not json",
        ],
    );
    let (model, data) = (fixture("tiny-mistral"), path.to_string_lossy().into_owned());
    let model = model.to_string_lossy().into_owned();
    let eval = ["eval", "--model", &model, "--data", &data, "--loss", "sft"];
    // The first invalid record in the file fails the load, whatever its fault.
    common::contralign_fails(
        &eval,
        "data.jsonl:2: prompt, token 1: id 999 is outside the vocabulary",
    );
    let skipping = [&eval[..], &["--skip-invalid"]].concat();
    let out = common::contralign_ok(&skipping);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        // The first in file order: the ids outside the vocabulary, before the bad line.
        stderr.contains(&format!(
            "skipped 2 invalid of 4 records (the first: {data}:2: prompt, token 1: id 999"
        )) && stderr.contains(&format!(
            "skipped 1 groups of one response (the first: {data}:3)"
        )),
        "{stderr}"
    );
    // Scoring reads the group of one.
    let score = [
        "score",
        "--model",
        &model,
        "--data",
        &data,
        "--skip-invalid",
    ];
    let scored = String::from_utf8(common::contralign_ok(&score).stdout).unwrap();
    assert_eq!(scored.lines().count(), 3, "{scored}");
}

#[test]
fn loss_on_a_single_response_group_is_an_error() {
    let dir = TempDir::new().unwrap();
    let path = data_file(
        &dir,
        &[
            GOOD,
            r#"{"prompt_ids": [1, 5], "response_ids": [[7, 2]], "rewards": [3]}"#,
        ],
    );
    let model = Model::load(&CpuOps, &fixture("tiny-mistral")).unwrap();
    let spec = LossSpec {
        beta: 0.1,
        alpha: 0.0,
        ..LossSpec::new(LossKind::Sft)
    };
    let opts = StepOptions {
        recompute: RecomputePolicy::Full,
        aux_coef: 0.0,
    };
    let groups = read_file(&path).unwrap();
    let text = err_text(step::loss_and_grads(
        &CpuOps, &model, None, &groups, &spec, &opts,
    ));
    assert_mentions(
        &text,
        &[
            &format!("{}:2", path.display()),
            "at least 2 responses, found 1",
        ],
    );
    // Scoring a single response is fine.
    assert_eq!(
        model
            .score(&CpuOps, &step::pack(&model, &groups).unwrap())
            .len(),
        3
    );
}

#[test]
fn reference_loss_without_reference_is_an_error() {
    let model = Model::load(&CpuOps, &fixture("tiny-mistral")).unwrap();
    let groups = read_file(&fixture("tiny-mistral.reward.jsonl")).unwrap();
    let spec = LossSpec {
        beta: 0.1,
        alpha: 0.5,
        ..LossSpec::new(LossKind::Nca)
    };
    let opts = StepOptions {
        recompute: RecomputePolicy::Full,
        aux_coef: 0.0,
    };
    let text = err_text(step::loss_and_grads(
        &CpuOps, &model, None, &groups, &spec, &opts,
    ));
    assert_mentions(&text, &["reference model", "--ref-model", "--ref-logps"]);
}

/// Copies a fixture model to a temporary directory as one f32 file, with `edit` applied to
/// its tensors and `patch` to its config.
fn broken_model(
    edit: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
    patch: impl FnOnce(&mut serde_json::Value),
) -> TempDir {
    let src = fixture("tiny-mixtral");
    let cfg = ModelConfig::load(&src).unwrap();
    let (mut weights, _) = load_weights(&src, &cfg, StorageDtype::F32).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = param_specs(&cfg)
        .into_iter()
        .map(|(name, shape)| {
            let data = weights.remove(&name).unwrap();
            (name, shape, data)
        })
        .collect();
    edit(&mut tensors);
    let dir = TempDir::new().unwrap();
    let views: Vec<Tensor> = tensors
        .iter()
        .map(|(name, shape, data)| Tensor {
            name: name.clone(),
            shape: shape.clone(),
            data,
        })
        .collect();
    save_f32(&dir.path().join("model.safetensors"), &views).unwrap();
    let mut raw = cfg.raw.clone();
    patch(&mut raw);
    std::fs::write(dir.path().join("config.json"), raw.to_string()).unwrap();
    dir
}

fn load_err(dir: &Path) -> String {
    err_text(Model::load(&CpuOps, dir))
}

#[test]
fn missing_extra_and_misshapen_tensors_are_named() {
    let name = "model.layers.1.block_sparse_moe.experts.2.w3.weight";
    let missing = broken_model(|t| t.retain(|(n, _, _)| n != name), |_| {});
    assert_mentions(&load_err(missing.path()), &[name, "missing", "[96, 64]"]);

    let extra = broken_model(
        |t| {
            t.push((
                "model.layers.0.mlp.up_proj.weight".into(),
                vec![2, 2],
                vec![0.0; 4],
            ))
        },
        |_| {},
    );
    assert_mentions(
        &load_err(extra.path()),
        &[
            "unexpected tensor model.layers.0.mlp.up_proj.weight",
            "[2, 2]",
        ],
    );

    let misshapen = broken_model(
        |t| {
            let e = t.iter_mut().find(|(n, _, _)| n == name).unwrap();
            e.1 = vec![64, 96];
        },
        |_| {},
    );
    assert_mentions(
        &load_err(misshapen.path()),
        &[name, "shape [64, 96]", "implies [96, 64]"],
    );

    // A config that disagrees with the weights is the same error, seen from the other side.
    let wrong_cfg = broken_model(|_| {}, |c| c["intermediate_size"] = 80.into());
    assert_mentions(&load_err(wrong_cfg.path()), &["config.json implies", "80"]);
}

#[test]
fn unsupported_configs_are_named() {
    let llama = broken_model(
        |_| {},
        |c| {
            c["model_type"] = "llama".into();
            c["architectures"] = serde_json::json!(["LlamaForCausalLM"]);
        },
    );
    assert_mentions(
        &load_err(llama.path()),
        &[
            "config.json",
            "unsupported architecture",
            "\"llama\"",
            "LlamaForCausalLM",
        ],
    );

    let yarn = broken_model(
        |_| {},
        |c| {
            c["rope_parameters"] =
                serde_json::json!({"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0});
        },
    );
    assert_mentions(&load_err(yarn.path()), &["unsupported rope type \"yarn\""]);

    let jitter = broken_model(|_| {}, |c| c["router_jitter_noise"] = 0.1.into());
    assert_mentions(
        &load_err(jitter.path()),
        &["router_jitter_noise", "not supported"],
    );

    let heads = broken_model(|_| {}, |c| c["num_key_value_heads"] = 3.into());
    assert_mentions(
        &load_err(heads.path()),
        &["num_attention_heads (4)", "num_key_value_heads (3)"],
    );

    let missing_key = broken_model(
        |_| {},
        |c| {
            c.as_object_mut().unwrap().remove("num_local_experts");
        },
    );
    assert_mentions(
        &load_err(missing_key.path()),
        &["missing required key `num_local_experts`"],
    );

    let no_dir = TempDir::new().unwrap();
    assert_mentions(&load_err(no_dir.path()), &["config.json"]);
}

#[test]
fn impossible_config_values_are_named() {
    for key in ["eos_token_id", "bos_token_id"] {
        let bad = broken_model(|_| {}, |c| c[key] = 999.into());
        assert_mentions(
            &load_err(bad.path()),
            &[
                "config.json",
                &format!("key `{key}`: token id 999 is outside the vocabulary (vocab_size 256)"),
            ],
        );
    }
    let dir_weights = broken_model(|_| {}, |_| {});
    let weights = dir_weights.path().join("model.safetensors");
    std::fs::remove_file(&weights).unwrap();
    std::fs::create_dir(&weights).unwrap();
    assert_mentions(
        &load_err(dir_weights.path()),
        &["model.safetensors: is a directory, not a safetensors file"],
    );
    // The fixture keeps its rope_theta in rope_parameters, transformers 5's spelling.
    for (key, value) in [("rms_norm_eps", -1.0), ("rope_theta", 0.0)] {
        let bad = broken_model(
            |_| {},
            |c| match key {
                "rope_theta" => c["rope_parameters"][key] = value.into(),
                _ => c[key] = value.into(),
            },
        );
        assert_mentions(
            &load_err(bad.path()),
            &[
                "config.json",
                &format!("key `{key}`: expected a positive number, found {value}"),
            ],
        );
    }
    // Sizes whose products overflow, or that no machine holds; each is refused before
    // anything is sized from it.
    let huge = u64::MAX - 1;
    for (key, value) in [
        ("head_dim", huge),
        ("intermediate_size", huge),
        ("vocab_size", huge),
        ("num_hidden_layers", u32::MAX as u64),
        ("num_local_experts", huge),
        ("hidden_size", 1 << 40),
    ] {
        let bad = broken_model(|_| {}, |c| c[key] = value.into());
        assert_mentions(
            &load_err(bad.path()),
            &[
                "config.json",
                &format!("{key} {value}"),
                "which no machine holds",
            ],
        );
    }
}

#[test]
fn a_missing_model_directory_is_named_whatever_the_data() {
    let dir = TempDir::new().unwrap();
    let missing = dir.path().join("no-model");
    let text = data_file(
        &dir,
        &[r#"{"prompt": "Hi", "chosen": "a", "rejected": "b"}"#],
    );
    let ids = dir.path().join("ids.jsonl");
    std::fs::write(&ids, GOOD).unwrap();
    let message = format!("--model {}: no such directory", missing.display());
    for data in [&text, &ids] {
        for command in ["score", "generate"] {
            common::contralign_fails(
                &[
                    command,
                    "--model",
                    &missing.to_string_lossy(),
                    "--data",
                    &data.to_string_lossy(),
                ],
                &message,
            );
        }
    }
}

/// A safetensors file of `header` and 8 bytes of data.
fn one_tensor_file(header: &str) -> Vec<u8> {
    let len = (header.len() as u64).to_le_bytes();
    [&len[..], header.as_bytes(), &[0u8; 8]].concat()
}

#[test]
fn a_non_finite_weight_is_named() {
    let nan = broken_model(
        |tensors| {
            let (_, _, data) = tensors
                .iter_mut()
                .find(|(name, _, _)| name == "lm_head.weight")
                .unwrap();
            data[5] = f32::NAN;
        },
        |_| {},
    );
    assert_mentions(
        &load_err(nan.path()),
        &["tensor lm_head.weight holds NaN at element 5", "finite"],
    );
}

/// f32's largest values have no bf16: a run that stores its weights in bf16 refuses them at
/// load, naming the tensor, instead of training on infinities; f32 storage takes them.
#[test]
fn a_weight_beyond_bf16_is_refused_where_bf16_stores_it() {
    // The smallest f32 that rounds to bf16's infinity, and f32::MAX; bf16::MAX itself is fine.
    let beyond = f32::from_bits(0x7f7f_8000);
    for (value, element) in [(beyond, 3), (-f32::MAX, 11)] {
        let model = broken_model(
            |tensors| {
                let (_, _, data) = tensors
                    .iter_mut()
                    .find(|(name, _, _)| name == "model.norm.weight")
                    .unwrap();
                data[element] = value;
            },
            |_| {},
        );
        let dir = TempDir::new().unwrap();
        let data = dir.path().join("ids.jsonl");
        std::fs::write(&data, GOOD).unwrap();
        let (model, data) = (model.path().to_string_lossy(), data.to_string_lossy());
        let message = format!("tensor model.norm.weight holds {value:e} at element {element}");
        for args in [
            vec!["score", "--precision", "bf16"],
            vec!["score", "--device", "emu", "--precision", "bf16"],
            vec!["eval", "--loss", "simpo", "--precision", "bf16"],
        ] {
            let text = common::contralign_fails(
                &[&args[..], &["--model", &model, "--data", &data]].concat(),
                &message,
            );
            assert_mentions(&text, &["beyond bf16's largest value", "--precision f32"]);
        }
        let run = dir.path().join("run");
        let good = fixture("tiny-mixtral");
        let good = good.to_string_lossy();
        // The policy, then the reference, beyond bf16: both are stored in bf16.
        for (policy, reference) in [(&model, &good), (&good, &model)] {
            common::contralign_fails(
                &[
                    "train",
                    "--model",
                    policy,
                    "--ref-model",
                    reference,
                    "--data",
                    &data,
                    "--loss",
                    "nca",
                    "--precision",
                    "bf16",
                    "--steps",
                    "1",
                    "--out",
                    &run.to_string_lossy(),
                ],
                &message,
            );
        }
        assert!(!run.exists(), "a refused run leaves no directory");
        common::contralign_ok(&["score", "--model", &model, "--data", &data]);
    }
    let at_max = broken_model(|tensors| tensors[0].2[0] = half::bf16::MAX.to_f32(), |_| {});
    let cfg = ModelConfig::load(at_max.path()).unwrap();
    load_weights(at_max.path(), &cfg, StorageDtype::Bf16).unwrap();
}

#[test]
fn truncated_or_corrupt_safetensors_are_described_in_words() {
    let good = std::fs::read(fixture("tiny-mistral/model.safetensors")).unwrap();
    let header = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let data = good.len() - 8 - header;
    let with_header_len = |n: u64| {
        let mut b = good.clone();
        b[..8].copy_from_slice(&n.to_le_bytes());
        b
    };
    let cases: Vec<(Vec<u8>, Vec<String>)> = vec![
        (
            good[..good.len() - 100].to_vec(),
            vec![
                format!("take {data} bytes of data, but {} bytes follow", data - 100),
                "truncated".into(),
            ],
        ),
        (
            good[..5].to_vec(),
            vec!["the file has 5 bytes".into(), "8-byte header length".into()],
        ),
        (
            with_header_len(good.len() as u64),
            vec![
                format!("says {} bytes of header", good.len()),
                format!("only {} bytes follow", good.len() - 8),
            ],
        ),
        (
            [&8u64.to_le_bytes()[..], b"{\"a\": 1,"].concat(),
            vec!["not valid JSON".into()],
        ),
        (
            one_tensor_file(r#"{"w":{"dtype":"BOGUS","shape":[2],"data_offsets":[0,8]}}"#),
            vec!["tensor w: unknown dtype \"BOGUS\"".into()],
        ),
        (
            one_tensor_file(r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#),
            vec!["tensor w: shape [3] of F32 needs 12 bytes, data_offsets give 8".into()],
        ),
    ];
    for (bytes, parts) in cases {
        let dir = TempDir::new().unwrap();
        std::fs::copy(
            fixture("tiny-mistral/config.json"),
            dir.path().join("config.json"),
        )
        .unwrap();
        let file = dir.path().join("model.safetensors");
        std::fs::write(&file, &bytes).unwrap();
        let text = err_text(Model::load(&CpuOps, dir.path()));
        let file = file.display().to_string();
        let mut want: Vec<&str> = parts.iter().map(String::as_str).collect();
        want.push(&file);
        assert_mentions(&text, &want);
        for variant in [
            "MetadataIncompleteBuffer",
            "HeaderTooSmall",
            "InvalidHeader",
        ] {
            assert!(!text.contains(variant), "{text}");
        }
    }
}

/// A tokenizer.json that is a folder or a dangling link (a Hub cache missing its blob) is named
/// as such, not taken for a model without a tokenizer.
#[test]
fn a_tokenizer_json_that_is_not_a_file_is_named() {
    let dir = TempDir::new().unwrap();
    let model = dir.path().join("model");
    common::tiny_mistral_with_tokenizer(&model);
    let tokenizer = model.join("tokenizer.json");
    let data = data_file(
        &dir,
        &[r#"{"prompt": "the heat", "chosen": "the", "rejected": "eh"}"#],
    );
    let (model, data) = (model.to_string_lossy(), data.to_string_lossy());
    let score = ["score", "--model", &model, "--data", &data];
    common::contralign_ok(&score);
    std::fs::remove_file(&tokenizer).unwrap();
    std::fs::create_dir(&tokenizer).unwrap();
    common::contralign_fails(&score, &format!("{}: not a file", tokenizer.display()));
    std::fs::remove_dir(&tokenizer).unwrap();
    let blob = dir.path().join("blobs/missing");
    std::os::unix::fs::symlink(&blob, &tokenizer).unwrap();
    let dangling = format!(
        "{}: a link to {}, which does not exist",
        tokenizer.display(),
        blob.display()
    );
    common::contralign_fails(&score, &dangling);
    common::contralign_fails(
        &["generate", "--model", &model, "--prompt", "the"],
        &dangling,
    );
}

/// A mixture of experts that the device kernels cannot route (more than 4 experts per token)
/// is refused by name where a device would run it — loading onto it, and planning for it —
/// while the CPU runs it.
#[test]
fn experts_per_token_beyond_the_device_kernels_are_refused_before_any_work() {
    let dir = TempDir::new().unwrap();
    let model = dir.path().join("mx6");
    let model = model.to_string_lossy();
    common::contralign_ok(&[
        "init",
        "--out",
        &model,
        "--arch",
        "mixtral",
        "--hidden-size",
        "32",
        "--layers",
        "1",
        "--heads",
        "2",
        "--kv-heads",
        "1",
        "--intermediate-size",
        "16",
        "--vocab-size",
        "256",
        "--experts",
        "16",
        "--experts-per-token",
        "6",
    ]);
    let data = common::fx("tiny-mistral.reward.jsonl");
    let message = "6 experts per token of 16: the device engine routes each token to 1 to 4";
    let score = ["score", "--model", &model, "--data", &data];
    let text = common::contralign_fails(&[&score[..], &["--device", "emu"]].concat(), message);
    assert_mentions(&text, &["mx6/config.json"]);
    let text = common::contralign_fails(&["plan", "--model", &model], message);
    assert_mentions(&text, &["num_experts_per_tok"]);
    common::contralign_ok(&score);
}

/// config.json's max_position_embeddings, when given, is a positive integer like the other
/// sizes.
#[test]
fn a_zero_max_position_embeddings_is_named() {
    let zero = broken_model(|_| {}, |raw| raw["max_position_embeddings"] = 0.into());
    assert_mentions(
        &load_err(zero.path()),
        &["key `max_position_embeddings`: expected a positive integer, found 0"],
    );
}
