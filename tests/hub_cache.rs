//! Models and data sets by Hugging Face id from a cache built in a temporary folder in
//! `huggingface_hub`'s layout (blobs, snapshot symlinks, refs/main): `score`, `eval` and a
//! 2-step `train` by ids give the numbers they give by paths; a single-file and a sharded
//! model, a sharded Parquet data set with a card; and with `HF_HUB_OFFLINE=1` a missing id,
//! a snapshot missing a file, a split or config that does not exist are errors that say what
//! was looked for and where, with no connection made.

mod common;
#[path = "common/hf_cache.rs"]
mod hf_cache;
#[path = "common/parquet_file.rs"]
mod parquet_file;

use common::{fixture, fx, metrics_without_timing};
use hf_cache::{add_repo, dir_files};
use std::net::TcpListener;
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tempfile::TempDir;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";
const DATA_COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// A card whose configs name a train and a test split by glob.
const CARD: &str = "---
license: mit
configs:
- config_name: default
  data_files:
  - split: train
    path: data/train-*
  - split: test
    path: data/test-*
---
# A tiny data set
";

/// A cache holding the four tiny models (the Mixtral ones sharded) and a data set of
/// tiny-mistral's reward groups as two train shards and one test shard.
fn cache() -> TempDir {
    let tmp = TempDir::new().unwrap();
    let hub = tmp.path().join("hub");
    for name in [
        "tiny-mistral",
        "tiny-mistral-ref",
        "tiny-mixtral",
        "tiny-mixtral-ref",
    ] {
        add_repo(
            &hub,
            &format!("models--test-org--{name}"),
            COMMIT,
            &dir_files(&fixture(name)),
        );
    }
    let groups =
        contralign::data::pretokenized::read_file(&fixture("tiny-mistral.reward.jsonl")).unwrap();
    let rows: Vec<_> = groups
        .iter()
        .map(|g| (g.prompt.clone(), g.responses.clone(), g.rewards.clone()))
        .collect();
    let shard = |rows: &[parquet_file::TokenRow]| {
        let path = tmp.path().join("shard.parquet");
        parquet_file::write_pretokenized(&path, rows, 1);
        std::fs::read(path).unwrap()
    };
    add_repo(
        &hub,
        "datasets--test-org--tiny-reward",
        DATA_COMMIT,
        &[
            ("README.md".to_string(), CARD.as_bytes().to_vec()),
            (
                "data/train-00000-of-00002.parquet".to_string(),
                shard(&rows[..2]),
            ),
            (
                "data/train-00001-of-00002.parquet".to_string(),
                shard(&rows[2..]),
            ),
            (
                "data/test-00000-of-00001.parquet".to_string(),
                shard(&rows[1..2]),
            ),
        ],
    );
    tmp
}

/// A listener standing in for the Hub: counts the connections made to it.
struct Watch {
    endpoint: String,
    connections: Arc<AtomicUsize>,
}

impl Watch {
    fn new() -> Watch {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let count = connections.clone();
        // Ends with the test process; it answers nothing.
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        Watch {
            endpoint,
            connections,
        }
    }
}

fn run(cache: &Path, watch: &Watch, cwd: Option<&Path>, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_contralign"));
    cmd.args(args)
        .env("HF_HUB_CACHE", cache.join("hub"))
        .env("HF_HOME", cache.join("home"))
        .env("HF_HUB_OFFLINE", "1")
        .env("HF_ENDPOINT", &watch.endpoint)
        .env_remove("HF_TOKEN");
    if let Some(dir) = cwd {
        cmd.current_dir(dir);
    }
    cmd.output().unwrap()
}

fn ok(cache: &Path, watch: &Watch, args: &[&str]) -> String {
    let out = run(cache, watch, None, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Fails with a message holding every one of `parts`, no panic; returns stderr.
fn fails(cache: &Path, watch: &Watch, args: &[&str], parts: &[&str]) -> String {
    let out = run(cache, watch, None, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "{args:?} succeeded");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for part in parts {
        assert!(stderr.contains(part), "{args:?}: {stderr:?} lacks {part:?}");
    }
    stderr
}

#[test]
fn score_eval_and_train_by_ids_equal_by_paths() {
    let tmp = cache();
    let watch = Watch::new();
    let c = tmp.path();
    let data_jsonl = fx("tiny-mistral.reward.jsonl");
    for name in ["tiny-mistral", "tiny-mixtral"] {
        let id = format!("test-org/{name}");
        let ref_id = format!("test-org/{name}-ref@{COMMIT}");
        let by_id = ok(
            c,
            &watch,
            &["score", "--model", &id, "--data", "test-org/tiny-reward"],
        );
        let by_path = ok(
            c,
            &watch,
            &["score", "--model", &fx(name), "--data", &data_jsonl],
        );
        assert_eq!(
            common::score_statistics(&by_id),
            common::score_statistics(&by_path),
            "{name}"
        );
        let responses: usize =
            contralign::data::pretokenized::read_file(&fixture("tiny-mistral.reward.jsonl"))
                .unwrap()
                .iter()
                .map(|g| g.responses.len())
                .sum();
        assert_eq!(by_id.lines().count(), responses, "{name}");

        let eval = |model: &str, reference: &str, data: &str| {
            ok(
                c,
                &watch,
                &[
                    "eval",
                    "--model",
                    model,
                    "--ref-model",
                    reference,
                    "--data",
                    data,
                    "--loss",
                    "nca",
                ],
            )
        };
        let by_id = eval(&id, &ref_id, "test-org/tiny-reward@main");
        let by_path = eval(&fx(name), &fx(&format!("{name}-ref")), &data_jsonl);
        assert_eq!(by_id, by_path, "{name}");
    }

    let train = |out: &Path, model: &str, reference: &str, data: &str| {
        ok(
            c,
            &watch,
            &[
                "train",
                "--model",
                model,
                "--ref-model",
                reference,
                "--data",
                data,
                "--loss",
                "nca",
                "--steps",
                "2",
                "--groups-per-step",
                "2",
                "--lr",
                "1e-3",
                "--out",
                out.to_str().unwrap(),
            ],
        );
    };
    let runs = TempDir::new().unwrap();
    let (a, b) = (runs.path().join("by-id"), runs.path().join("by-path"));
    train(
        &a,
        "test-org/tiny-mistral",
        "test-org/tiny-mistral-ref",
        "test-org/tiny-reward",
    );
    train(
        &b,
        &fx("tiny-mistral"),
        &fx("tiny-mistral-ref"),
        &data_jsonl,
    );
    let (ma, mb) = (metrics_without_timing(&a), metrics_without_timing(&b));
    assert_eq!(ma.len(), 2);
    assert_eq!(ma, mb);
    // The saved configuration names the snapshot it read, so a resume needs no lookup, and
    // keeps the data set id.
    let saved = std::fs::read_to_string(a.join("train.toml")).unwrap();
    assert!(
        saved.contains(&format!(
            "models--test-org--tiny-mistral/snapshots/{COMMIT}"
        )) && saved.contains("data = \"test-org/tiny-reward\""),
        "{saved}"
    );
    assert_eq!(watch.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn splits_configs_and_directories_resolve_as_datasets_and_transformers_do() {
    let tmp = cache();
    let watch = Watch::new();
    let c = tmp.path();
    let score = |args: &[&str]| ok(c, &watch, &[&["score"], args].concat());
    let model = ["--model", "test-org/tiny-mistral"];
    let test = score(
        &[
            &model[..],
            &["--data", "test-org/tiny-reward", "--split", "test"],
        ]
        .concat(),
    );
    let all = score(&[&model[..], &["--data", "test-org/tiny-reward"]].concat());
    // The test shard holds group 1 of the train split.
    let group1: Vec<serde_json::Value> = common::score_statistics(&all)
        .into_iter()
        .filter(|v| v["group"] == 1)
        .map(|mut v| {
            v["group"] = 0.into();
            v
        })
        .collect();
    assert_eq!(common::score_statistics(&test), group1);

    fails(
        c,
        &watch,
        &[
            &["score"],
            &model[..],
            &["--data", "test-org/tiny-reward", "--split", "validation"],
        ]
        .concat(),
        &["data set test-org/tiny-reward: no split `validation`; its splits: train, test"],
    );
    fails(
        c,
        &watch,
        &[
            &["score"],
            &model[..],
            &["--data", "test-org/tiny-reward", "--data-config", "en"],
        ]
        .concat(),
        &["no config `en`; its configs: default"],
    );

    // A directory of the same spelling as an id wins over the cache: here the reference
    // model's files under ./test-org/tiny-mistral.
    let cwd = TempDir::new().unwrap();
    let shadow = cwd.path().join("test-org/tiny-mistral");
    std::fs::create_dir_all(&shadow).unwrap();
    for (name, bytes) in dir_files(&fixture("tiny-mistral-ref")) {
        std::fs::write(shadow.join(name), bytes).unwrap();
    }
    let data = fx("tiny-mistral.reward.jsonl");
    let out = run(
        c,
        &watch,
        Some(cwd.path()),
        &["score", "--model", "test-org/tiny-mistral", "--data", &data],
    );
    assert!(out.status.success());
    let reference = ok(
        c,
        &watch,
        &["score", "--model", &fx("tiny-mistral-ref"), "--data", &data],
    );
    let policy = ok(
        c,
        &watch,
        &["score", "--model", &fx("tiny-mistral"), "--data", &data],
    );
    assert_eq!(String::from_utf8(out.stdout).unwrap(), reference);
    assert_ne!(reference, policy);
    assert_eq!(watch.connections.load(Ordering::SeqCst), 0);
}

#[test]
fn offline_misses_name_the_id_the_cache_and_the_command() {
    let tmp = cache();
    let watch = Watch::new();
    let c = tmp.path();
    let hub = c.join("hub");
    let data = fx("tiny-mistral.reward.jsonl");
    // The policy by id, the data as given.
    let score_fails = |data: &str, parts: &[&str]| {
        fails(
            c,
            &watch,
            &["score", "--model", "test-org/tiny-mistral", "--data", data],
            parts,
        )
    };
    fails(
        c,
        &watch,
        &["score", "--model", "test-org/absent", "--data", &data],
        &[
            "no directory test-org/absent, so it was read as a Hub id",
            "model test-org/absent is not in the Hugging Face cache",
            &hub.join("models--test-org--absent").display().to_string(),
            "`hf download test-org/absent`",
            "HF_HUB_OFFLINE is set",
        ],
    );
    fails(
        c,
        &watch,
        &[
            "score",
            "--model",
            "test-org/tiny-mistral@v2",
            "--data",
            &data,
        ],
        &[
            "model test-org/tiny-mistral@v2 is not in",
            "`hf download test-org/tiny-mistral --revision v2`",
        ],
    );
    score_fails(
        "test-org/absent-data",
        &[
            "data set test-org/absent-data is not in the Hugging Face cache",
            "datasets--test-org--absent-data",
            "`hf download test-org/absent-data --repo-type dataset`",
        ],
    );

    // A relative path to a data file that is missing is a missing file, not an id.
    score_fails(
        "data/missing.parquet",
        &["cannot read data/missing.parquet"],
    );

    // A snapshot with config.json and the weights but no tokenizer.json (tiny-mistral has
    // none), for text or a --prompt: the snapshot and the command that fetches the tokenizer.
    let snapshot = hub
        .join("models--test-org--tiny-mistral/snapshots")
        .join(COMMIT);
    let fetch_tokenizer = format!(
        "`hf download test-org/tiny-mistral tokenizer.json tokenizer_config.json \
         --revision {COMMIT}`"
    );
    score_fails(
        &fx("parquet/pairs_plain.jsonl"),
        &[
            &format!(
                "the model directory {} has no tokenizer.json",
                snapshot.display()
            ),
            &fetch_tokenizer,
        ],
    );
    fails(
        c,
        &watch,
        &[
            "generate",
            "--model",
            "test-org/tiny-mistral",
            "--prompt",
            "Hi",
        ],
        &[
            &format!("{} has no tokenizer.json", snapshot.display()),
            &fetch_tokenizer,
        ],
    );

    // A blob deleted under a snapshot: a shard of the sharded Mixtral, a data shard.
    let mixtral = hub.join(format!("models--test-org--tiny-mixtral/snapshots/{COMMIT}"));
    let shard = mixtral.join("model-00002-of-00004.safetensors");
    std::fs::remove_file(std::fs::canonicalize(&shard).unwrap()).unwrap();
    fails(
        c,
        &watch,
        &["score", "--model", "test-org/tiny-mixtral", "--data", &data],
        &[
            "model test-org/tiny-mixtral: the cached snapshot",
            "lacks model-00002-of-00004.safetensors",
            "`hf download test-org/tiny-mixtral model-00002-of-00004.safetensors`",
        ],
    );
    let snapshot = hub.join(format!(
        "datasets--test-org--tiny-reward/snapshots/{DATA_COMMIT}"
    ));
    let shard = snapshot.join("data/train-00001-of-00002.parquet");
    std::fs::remove_file(std::fs::canonicalize(&shard).unwrap()).unwrap();
    score_fails(
        "test-org/tiny-reward",
        &[
            "lacks data/train-00001-of-00002.parquet",
            "--repo-type dataset",
        ],
    );
    assert_eq!(watch.connections.load(Ordering::SeqCst), 0);
}

/// A data set folder of `files` (relative path, contents) in a temporary folder.
fn folder(files: &[(&str, &str)]) -> TempDir {
    let tmp = TempDir::new().unwrap();
    for (path, text) in files {
        let path = tmp.path().join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    tmp
}

/// The files of a folder's split (relative paths), or the error's text.
fn split_of(dir: &TempDir, config: Option<&str>, split: &str) -> Result<Vec<String>, String> {
    contralign::hub::data_files(dir.path(), config, split)
        .map(|files| {
            files
                .iter()
                .map(|f| {
                    let rel = f.strip_prefix(dir.path()).unwrap();
                    rel.to_str().unwrap().to_string()
                })
                .collect()
        })
        .map_err(|e| format!("{e:#}"))
}

#[test]
fn sharded_split_names_come_first_then_folders_then_file_names() {
    // HuggingFaceH4/ultrafeedback_binarized's layout without its card.
    let shards = folder(&[
        ("data/train_prefs-00000-of-00001.parquet", ""),
        ("data/train_sft-00000-of-00002.parquet", ""),
        ("data/train_sft-00001-of-00002.parquet", ""),
        ("data/test_prefs-00000-of-00001.parquet", ""),
        ("dataset_infos.json", "{}"),
    ]);
    assert_eq!(
        split_of(&shards, None, "train_prefs").unwrap(),
        ["data/train_prefs-00000-of-00001.parquet"]
    );
    assert_eq!(
        split_of(&shards, None, "train_sft").unwrap(),
        [
            "data/train_sft-00000-of-00002.parquet",
            "data/train_sft-00001-of-00002.parquet"
        ]
    );
    let err = split_of(&shards, None, "train").unwrap_err();
    assert!(
        err.ends_with("no split `train`; its splits: test_prefs, train_prefs, train_sft"),
        "{err}"
    );

    // A split keyword as a folder wins over one in file names: `my_test.jsonl` is part of
    // no split, as `datasets` resolves the folder patterns first.
    let named = folder(&[
        ("train/part-0.jsonl", ""),
        ("other/my_test.jsonl", ""),
        ("config.json", "{}"),
    ]);
    assert_eq!(
        split_of(&named, None, "train").unwrap(),
        ["train/part-0.jsonl"]
    );
    let err = split_of(&named, None, "test").unwrap_err();
    assert!(err.ends_with("no split `test`; its splits: train"), "{err}");

    // Without a folder keyword, a keyword followed by a separator in the file name; the
    // names `datasets` ignores (config.json, dataset_info.json) are no data.
    let files = folder(&[
        ("my_test.jsonl", ""),
        ("train.jsonl", ""),
        ("pretrain.jsonl", ""),
        ("dataset_info.json", "{}"),
    ]);
    assert_eq!(split_of(&files, None, "train").unwrap(), ["train.jsonl"]);
    assert_eq!(split_of(&files, None, "test").unwrap(), ["my_test.jsonl"]);
    let unnamed = folder(&[("a.jsonl", ""), ("dataset_dict.json", "{}")]);
    assert_eq!(split_of(&unnamed, None, "train").unwrap(), ["a.jsonl"]);
}

/// A card with a config per language under `data_dir`: `en` by datasets' naming there,
/// `de` by its data_files there, and `xx` whose data_files this cannot read.
const DATA_DIR_CARD: &str = "---
configs:
- config_name: en
  data_dir: en
  default: true
- config_name: de
  data_dir: de/
  data_files:
    train: de_train*.jsonl
- config_name: xx
  data_files: 3
---
";

#[test]
fn card_configs_with_data_dir_resolve_under_it() {
    let dir = folder(&[
        ("README.md", DATA_DIR_CARD),
        ("en/train.jsonl", ""),
        ("en/test.jsonl", ""),
        ("de/de_train-0.jsonl", ""),
        ("de/de_test.jsonl", ""),
        ("train.jsonl", ""),
    ]);
    assert_eq!(split_of(&dir, None, "train").unwrap(), ["en/train.jsonl"]);
    assert_eq!(
        split_of(&dir, Some("en"), "test").unwrap(),
        ["en/test.jsonl"]
    );
    assert_eq!(
        split_of(&dir, Some("de"), "train").unwrap(),
        ["de/de_train-0.jsonl"]
    );
    let err = split_of(&dir, Some("de"), "test").unwrap_err();
    assert!(err.ends_with("no split `test`; its splits: train"), "{err}");
    let err = split_of(&dir, Some("xx"), "train").unwrap_err();
    let card = dir.path().join("README.md");
    assert!(
        err.contains(&format!(
            "{}: configs[2] (xx): data_files: expected a path pattern",
            card.display()
        )),
        "{err}"
    );
}

#[test]
fn a_split_or_config_of_a_single_file_is_refused() {
    let tmp = cache();
    let watch = Watch::new();
    let c = tmp.path();
    let data = fx("tiny-mistral.reward.jsonl");
    let score = ["score", "--model", "test-org/tiny-mistral", "--data", &data];
    fails(
        c,
        &watch,
        &[&score[..], &["--split", "test"]].concat(),
        &[&format!(
            "--split test: --data {data} is a single file, read whole as the split `train`"
        )],
    );
    fails(
        c,
        &watch,
        &[&score[..], &["--data-config", "en"]].concat(),
        &[&format!(
            "--data-config en: --data {data} is a single file, which has no configs"
        )],
    );
    let out = tmp.path().join("run");
    let train = [
        "train",
        "--model",
        "test-org/tiny-mistral",
        "--data",
        &data,
        "--loss",
        "nca",
        "--split",
        "test",
        "--out",
        out.to_str().unwrap(),
    ];
    fails(
        c,
        &watch,
        &train,
        &[&format!(
            "--split test: --data {data} is a single file, read whole as the split `train`"
        )],
    );
    assert!(!out.exists(), "a refused run leaves no directory");
    // The default split, and `train` named, read the file.
    let default = ok(c, &watch, &score);
    assert_eq!(
        ok(c, &watch, &[&score[..], &["--split", "train"]].concat()),
        default
    );
}
