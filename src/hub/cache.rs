//! The cache layout of `huggingface_hub`: `REPO_FOLDER/refs/REVISION` holds the commit of a
//! branch or tag, `REPO_FOLDER/snapshots/COMMIT/` the files of that commit (symlinks into
//! `REPO_FOLDER/blobs/`).

use super::env::HubEnv;
use super::repo::RepoId;
use std::path::{Path, PathBuf};

/// The repository's folder in the cache, whether or not it exists.
pub fn repo_dir(env: &HubEnv, id: &RepoId) -> PathBuf {
    env.cache.join(id.folder())
}

fn is_commit(revision: &str) -> bool {
    revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit())
}

/// The snapshot folder of the id's revision, if the cache holds it: a commit hash names
/// its snapshot, a branch or tag its `refs/` file.
pub fn snapshot_dir(env: &HubEnv, id: &RepoId) -> Option<PathBuf> {
    let repo = repo_dir(env, id);
    let commit = if is_commit(&id.revision) {
        id.revision.clone()
    } else {
        std::fs::read_to_string(repo.join("refs").join(&id.revision))
            .ok()?
            .trim()
            .to_string()
    };
    let dir = commit_dir(env, id, &commit);
    dir.is_dir().then_some(dir)
}

/// The snapshot folder of one commit, whether or not it exists.
pub fn commit_dir(env: &HubEnv, id: &RepoId, commit: &str) -> PathBuf {
    repo_dir(env, id).join("snapshots").join(commit)
}

/// The error of a cached snapshot that lacks files (relative paths): which, where, and the
/// command that fetches them.
pub fn incomplete_snapshot(id: &RepoId, dir: &Path, missing: &[String]) -> anyhow::Error {
    let files: Vec<&str> = missing.iter().map(String::as_str).collect();
    anyhow::anyhow!(
        "{} {id}: the cached snapshot {} lacks {} (a deleted blob or an interrupted download); \
         fetch it with `{}`",
        id.kind.what(),
        dir.display(),
        missing.join(", "),
        id.download_command(&files)
    )
}
