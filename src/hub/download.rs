//! Downloads from the Hub through its resolve URLs (`HF_ENDPOINT/ID/resolve/REV/FILE`, with
//! `HF_TOKEN`), by the `hf-hub` crate, into the cache layout `huggingface_hub` uses: blobs,
//! snapshot symlinks and `refs/`.

use super::cache::repo_dir;
use super::env::HubEnv;
use super::repo::{RepoId, RepoKind};
use anyhow::{bail, Context, Result};
use hf_hub::api::sync::{ApiBuilder, ApiRepo};
use hf_hub::{Cache, Repo, RepoType};
use std::path::PathBuf;

/// A connection to one repository of the Hub, at the id's revision.
pub struct Remote {
    repo: ApiRepo,
    id: RepoId,
    env: HubEnv,
}

/// A repository's files at a revision and the commit it resolves to, as the Hub lists them.
pub struct Listing {
    pub commit: String,
    pub files: Vec<String>,
}

/// The error of an id that is neither in the cache nor downloadable: what was looked for,
/// where, and the command that fetches it.
pub fn not_available(id: &RepoId, env: &HubEnv, why: &str) -> anyhow::Error {
    anyhow::anyhow!(
        "{} {id} is not in the Hugging Face cache (looked in {}) and {why}; fetch it with `{}` \
         (where the Hub is reachable, with HF_HUB_OFFLINE unset)",
        id.kind.what(),
        repo_dir(env, id).display(),
        id.download_command(&[])
    )
}

impl Remote {
    /// Refuses when `HF_HUB_OFFLINE` forbids asking the Hub.
    pub fn connect(env: &HubEnv, id: &RepoId) -> Result<Remote> {
        if env.offline {
            return Err(not_available(id, env, "HF_HUB_OFFLINE is set"));
        }
        let api = ApiBuilder::from_cache(Cache::new(env.cache.clone()))
            .with_endpoint(env.endpoint.clone())
            .with_token(env.token.clone())
            .with_progress(true)
            .build()
            .context("cannot set up the Hub client")?;
        let kind = match id.kind {
            RepoKind::Model => RepoType::Model,
            RepoKind::Dataset => RepoType::Dataset,
        };
        let repo = api.repo(Repo::with_revision(
            id.id.clone(),
            kind,
            id.revision.clone(),
        ));
        Ok(Remote {
            repo,
            id: id.clone(),
            env: env.clone(),
        })
    }

    /// The repository's files and commit (`ENDPOINT/api/models/ID/revision/REV`).
    pub fn list(&self) -> Result<Listing> {
        let info = self.repo.info().map_err(|e| {
            not_available(
                &self.id,
                &self.env,
                &format!("cannot be listed at {}: {e}", self.env.endpoint),
            )
        })?;
        if info.sha.is_empty() {
            bail!("{}: the Hub's listing names no commit", self.id);
        }
        Ok(Listing {
            commit: info.sha,
            files: info.siblings.into_iter().map(|s| s.rfilename).collect(),
        })
    }

    /// Downloads one file into the cache (a progress bar on a terminal, a line elsewhere) and
    /// returns its path in the snapshot.
    pub fn fetch(&self, file: &str) -> Result<PathBuf> {
        eprintln!("downloading {} {file}", self.id);
        self.repo.download(file).map_err(|e| {
            not_available(
                &self.id,
                &self.env,
                &format!(
                    "{file} cannot be downloaded from {}: {e}",
                    self.env.endpoint
                ),
            )
        })
    }
}
