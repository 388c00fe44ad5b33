//! The cache layout of `huggingface_hub`: `REPO_FOLDER/refs/REVISION` holds the commit of a
//! branch or tag, `REPO_FOLDER/snapshots/COMMIT/` the files of that commit (symlinks into
//! `REPO_FOLDER/blobs/`).

use super::env::HubEnv;
use super::repo::RepoId;
use std::path::PathBuf;

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
    let dir = repo.join("snapshots").join(commit);
    dir.is_dir().then_some(dir)
}
