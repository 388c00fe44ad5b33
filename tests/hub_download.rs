//! Downloads by id from a loopback server that answers as the Hub does (`HF_ENDPOINT`):
//! the listing API, resolve URLs with ranges, `X-Repo-Commit` and `ETag`, a token required.
//! The files a checkpoint needs (every shard of a sharded one) and the split a data set id
//! names land in the cache layout (blobs, relative snapshot symlinks, refs/main), give the
//! numbers the same files give by path, and a second run makes no request.

mod common;
#[path = "common/hf_cache.rs"]
mod hf_cache;

use common::{fixture, fx};
use hf_cache::dir_files;
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::Output;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tempfile::TempDir;

const COMMIT: &str = "fedcba9876543210fedcba9876543210fedcba98";
const TOKEN: &str = "hf_loopback_secret";

/// A repository the server holds: its kind's URL prefix (`` or `datasets/`), id, files.
struct Repo {
    prefix: &'static str,
    id: &'static str,
    files: Vec<(String, Vec<u8>)>,
}

/// The Hub on 127.0.0.1: serves until dropped, or for two minutes at most.
struct Hub {
    endpoint: String,
    requests: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Drop for Hub {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn respond(stream: &mut TcpStream, status: &str, headers: &[(String, String)], body: &[u8]) {
    let mut head = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body);
}

fn serve(mut stream: TcpStream, repos: &[Repo]) {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
    let mut headers = HashMap::new();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).is_err() || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    if headers.get("authorization") != Some(&format!("Bearer {TOKEN}")) {
        return respond(&mut stream, "401 Unauthorized", &[], b"{\"error\":\"401\"}");
    }
    for repo in repos {
        let api = format!("/api/{}s/{}/revision/main", kind(repo), repo.id);
        if path == api {
            let siblings: Vec<_> = repo
                .files
                .iter()
                .map(|(f, _)| serde_json::json!({ "rfilename": f }))
                .collect();
            let body = serde_json::json!({"id": repo.id, "sha": COMMIT, "siblings": siblings});
            return respond(&mut stream, "200 OK", &[], body.to_string().as_bytes());
        }
        let resolve = format!("/{}{}/resolve/main/", repo.prefix, repo.id);
        if let Some(file) = path.strip_prefix(&resolve) {
            if let Some((_, bytes)) = repo.files.iter().find(|(f, _)| f == file) {
                let total = bytes.len();
                let (start, end) = headers
                    .get("range")
                    .and_then(|r| r.strip_prefix("bytes="))
                    .and_then(|r| r.split_once('-'))
                    .map(|(s, e)| {
                        let s: usize = s.parse().unwrap_or(0);
                        let e: usize = e.parse().unwrap_or(total - 1);
                        (s, e.min(total - 1))
                    })
                    .unwrap_or((0, total - 1));
                let etag = blake3::hash(bytes).to_hex().to_string();
                let h = vec![
                    ("X-Repo-Commit".to_string(), COMMIT.to_string()),
                    ("ETag".to_string(), format!("\"{etag}\"")),
                    (
                        "Content-Range".to_string(),
                        format!("bytes {start}-{end}/{total}"),
                    ),
                ];
                return respond(&mut stream, "206 Partial Content", &h, &bytes[start..=end]);
            }
        }
    }
    respond(
        &mut stream,
        "404 Not Found",
        &[],
        b"{\"error\":\"not found\"}",
    );
}

fn kind(repo: &Repo) -> &'static str {
    if repo.prefix.is_empty() {
        "model"
    } else {
        "dataset"
    }
}

impl Hub {
    fn start(repos: Vec<Repo>) -> Hub {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopped) = (requests.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stopped.load(Ordering::SeqCst) && Instant::now() < deadline {
                match listener.accept() {
                    Ok((stream, _)) => {
                        stream.set_nonblocking(false).unwrap();
                        count.fetch_add(1, Ordering::SeqCst);
                        serve(stream, &repos);
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Hub {
            endpoint,
            requests,
            stop,
        }
    }
}

fn run(cache: &Path, hub: &Hub, token: &str, args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_contralign"))
        .args(args)
        .env("HF_HUB_CACHE", cache.join("hub"))
        .env("HF_HOME", cache.join("home"))
        .env("HF_ENDPOINT", &hub.endpoint)
        .env("HF_TOKEN", token)
        .env_remove("HF_HUB_OFFLINE")
        .output()
        .unwrap()
}

fn ok(cache: &Path, hub: &Hub, args: &[&str]) -> String {
    let out = run(cache, hub, TOKEN, args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A snapshot file is a relative symlink into the repository's blobs.
fn assert_cached(repo: &Path, file: &str) {
    let link = repo.join("snapshots").join(COMMIT).join(file);
    let target = std::fs::read_link(&link)
        .unwrap_or_else(|e| panic!("{} is not a symlink: {e}", link.display()));
    assert!(target.is_relative(), "{}", target.display());
    let blob = std::fs::canonicalize(&link).unwrap();
    assert_eq!(
        blob.parent().unwrap(),
        std::fs::canonicalize(repo.join("blobs")).unwrap()
    );
}

#[test]
fn downloads_land_in_the_cache_layout_and_are_not_repeated() {
    let mut data_files = vec![(
        "README.md".to_string(),
        b"---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: \
          data/train-*\n  - split: test\n    path: data/test-*\n---\n"
            .to_vec(),
    )];
    let reward = std::fs::read(fixture("tiny-mistral.reward.jsonl")).unwrap();
    data_files.push((
        "data/train-00000-of-00001.jsonl".to_string(),
        reward.clone(),
    ));
    data_files.push(("data/test-00000-of-00001.jsonl".to_string(), reward));
    let mut mixtral = dir_files(&fixture("tiny-mixtral"));
    mixtral.push(("pytorch_model.bin".to_string(), b"not fetched".to_vec()));
    let hub = Hub::start(vec![
        Repo {
            prefix: "",
            id: "test-org/tiny-mixtral",
            files: mixtral,
        },
        Repo {
            prefix: "",
            id: "test-org/tiny-mistral",
            files: dir_files(&fixture("tiny-mistral")),
        },
        Repo {
            prefix: "datasets/",
            id: "test-org/tiny-reward",
            files: data_files,
        },
    ]);
    let tmp = TempDir::new().unwrap();
    let c = tmp.path();
    let args = [
        "eval",
        "--model",
        "test-org/tiny-mixtral",
        "--ref-model",
        "test-org/tiny-mistral",
        "--data",
        "test-org/tiny-reward",
        "--loss",
        "sft",
    ];
    let first = ok(c, &hub, &args);
    let after_first = hub.requests.load(Ordering::SeqCst);
    assert!(after_first > 0);
    let by_path = ok(
        c,
        &hub,
        &[
            "eval",
            "--model",
            &fx("tiny-mixtral"),
            "--data",
            &fx("tiny-mistral.reward.jsonl"),
            "--loss",
            "sft",
        ],
    );
    assert_eq!(first, by_path);
    let models = c.join("hub/models--test-org--tiny-mixtral");
    assert_eq!(
        std::fs::read_to_string(models.join("refs/main")).unwrap(),
        COMMIT
    );
    for (file, _) in dir_files(&fixture("tiny-mixtral")) {
        assert_cached(&models, &file);
    }
    assert!(!models
        .join("snapshots")
        .join(COMMIT)
        .join("pytorch_model.bin")
        .exists());
    // The reference of a reference-free loss is resolved (the flag names a model) but
    // only what a checkpoint needs is fetched.
    assert_cached(&c.join("hub/models--test-org--tiny-mistral"), "config.json");
    let data = c.join("hub/datasets--test-org--tiny-reward");
    assert_cached(&data, "README.md");
    assert_cached(&data, "data/train-00000-of-00001.jsonl");
    assert!(!data
        .join("snapshots")
        .join(COMMIT)
        .join("data/test-00000-of-00001.jsonl")
        .exists());

    let second = ok(c, &hub, &args);
    assert_eq!(second, first);
    assert_eq!(hub.requests.load(Ordering::SeqCst), after_first);

    // An unknown id, and a wrong token, are errors naming the id, the cache and the command.
    let data = fx("tiny-mistral.reward.jsonl");
    for (id, token, status) in [
        ("test-org/absent", TOKEN, "404"),
        ("test-org/gated", "hf_wrong", "401"),
    ] {
        let out = run(c, &hub, token, &["score", "--model", id, "--data", &data]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        for part in [
            format!("model {id} is not in the Hugging Face cache"),
            c.join("hub")
                .join(format!("models--{}", id.replace('/', "--")))
                .display()
                .to_string(),
            format!("`hf download {id}`"),
            status.to_string(),
        ] {
            assert!(stderr.contains(&part), "{stderr:?} lacks {part:?}");
        }
    }
}
