//! A model checkpoint in the cache: the snapshot of an id, checked to hold every file a
//! checkpoint needs (config.json, the weights, every shard of a sharded index), with what is
//! missing downloaded when the Hub may be asked.

use super::cache::{commit_dir, incomplete_snapshot, snapshot_dir};
use super::download::{not_available, Remote};
use super::env::HubEnv;
use super::repo::{RepoId, RepoKind};
use crate::checkpoint::{weight_files, COMPANION_FILES};
use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

const INDEX: &str = "model.safetensors.index.json";
const SINGLE: &str = "model.safetensors";

/// The files a checkpoint folder lacks: config.json, the weights, or a shard its index
/// names; a dangling symlink (a blob deleted) counts as missing.
fn missing_files(dir: &Path) -> Vec<String> {
    let mut missing = Vec::new();
    if !dir.join("config.json").is_file() {
        missing.push("config.json".to_string());
    }
    if dir.join(INDEX).is_file() {
        match weight_files(dir) {
            Ok(shards) => missing.extend(
                shards
                    .iter()
                    .filter(|s| !s.is_file())
                    .filter_map(|s| s.file_name()?.to_str().map(str::to_string)),
            ),
            Err(_) => missing.push(INDEX.to_string()),
        }
    } else if !dir.join(SINGLE).is_file() {
        missing.push(SINGLE.to_string());
    }
    missing
}

/// How to get the tokenizer a model directory lacks: for a snapshot of the cache
/// (`models--ORG--NAME/snapshots/COMMIT`) the `hf download` command of its files, else
/// where to put them. Downloads fetch them with the weights; a snapshot downloaded by other
/// means may lack them, and a tokenizer is needed only for text.
pub fn how_to_get_tokenizer(dir: &Path) -> String {
    let files = ["tokenizer.json", "tokenizer_config.json"];
    match snapshot_id(dir) {
        Some(id) => format!(
            "fetch it with `{}` (where the Hub is reachable)",
            id.download_command(&files)
        ),
        None => format!("copy the model's {} into it", files.join(" and ")),
    }
}

/// The model id and commit of a snapshot folder of the cache, from its path.
fn snapshot_id(dir: &Path) -> Option<RepoId> {
    let commit = dir.file_name()?.to_str()?;
    let snapshots = dir.parent()?;
    let folder = snapshots.parent()?.file_name()?.to_str()?;
    if snapshots.file_name()? != "snapshots" {
        return None;
    }
    let (org, name) = folder.strip_prefix("models--")?.split_once("--")?;
    RepoId::parse(&format!("{org}/{name}@{commit}"), RepoKind::Model)
}

/// The snapshot folder of a model id, complete: from the cache, else downloaded.
pub fn snapshot(id: &RepoId, env: &HubEnv) -> Result<PathBuf> {
    let cached = snapshot_dir(env, id);
    if let Some(dir) = &cached {
        let missing = missing_files(dir);
        if missing.is_empty() {
            return Ok(dir.clone());
        }
        if env.offline {
            return Err(incomplete_snapshot(id, dir, &missing));
        }
    }
    download(id, env)
}

/// Downloads what the snapshot lacks of a checkpoint: config.json, the weights (the index
/// and every shard it names, or model.safetensors) and the tokenizer and generation files
/// the repository has.
fn download(id: &RepoId, env: &HubEnv) -> Result<PathBuf> {
    let remote = Remote::connect(env, id)?;
    let listing = remote.list()?;
    let has = |f: &str| listing.files.iter().any(|x| x == f);
    if !has("config.json") {
        bail!("model {id}: the repository has no config.json; it is not a transformers checkpoint");
    }
    let weights = if has(INDEX) {
        INDEX
    } else if has(SINGLE) {
        SINGLE
    } else {
        bail!(
            "model {id}: the repository has neither {SINGLE} nor {INDEX}; contralign reads \
             safetensors weights"
        );
    };
    let dir = commit_dir(env, id, &listing.commit);
    let wanted = ["config.json", weights]
        .into_iter()
        .chain(COMPANION_FILES.iter().copied().filter(|f| has(f)));
    for file in wanted {
        if !dir.join(file).is_file() {
            remote.fetch(file)?;
        }
    }
    for shard in missing_files(&dir) {
        if !has(&shard) {
            bail!("model {id}: {INDEX} names {shard}, which the repository does not have");
        }
        remote.fetch(&shard)?;
    }
    if !missing_files(&dir).is_empty() {
        return Err(not_available(id, env, "its download is incomplete"));
    }
    Ok(dir)
}
