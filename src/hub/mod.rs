//! Models and data sets by Hugging Face id (`org/name`, `org/name@revision`), found in the
//! local Hugging Face cache as `huggingface_hub` lays it out ([`cache`]) and downloaded into
//! it when missing ([`download`]), so that contralign reads what `from_pretrained` and
//! `load_dataset` already fetched, offline.

pub mod cache;
pub mod checkpoint_files;
pub mod data_files;
pub mod download;
pub mod env;
pub mod repo;

use crate::data::records::FileKind;
use anyhow::{Context, Result};
use std::path::{Path, PathBuf};

pub use repo::{RepoId, RepoKind};

/// A `--model` argument as a model directory: an existing path as it is (a directory wins
/// over an id of the same spelling), else a Hub id resolved in the cache, downloaded when
/// missing and allowed.
pub fn model_dir(arg: &str) -> Result<PathBuf> {
    let path = Path::new(arg);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match RepoId::parse(arg, RepoKind::Model) {
        Some(id) => checkpoint_files::snapshot(&id, &env::HubEnv::from_env())
            .with_context(|| format!("no directory {arg}, so it was read as a Hub id")),
        None => Ok(path.to_path_buf()),
    }
}

/// A `--data` argument's files: a file as it is, a folder laid out as a data set (its card's
/// configs, else `datasets`' naming, else all its data files), else a data set id's split
/// from the cache, downloaded when missing and allowed.
pub fn data_files(arg: &Path, config: Option<&str>, split: &str) -> Result<Vec<PathBuf>> {
    if arg.is_dir() {
        return data_files::folder_split(&arg.display().to_string(), arg, config, split);
    }
    match dataset_id(arg) {
        Some(id) => data_files::dataset_files(&id, &env::HubEnv::from_env(), config, split),
        None => Ok(vec![arg.to_path_buf()]),
    }
}

/// Whether a `--data` argument is one file (read whole, as one split of no config) rather
/// than a folder or a data set id.
pub fn is_single_file(arg: &Path) -> bool {
    !arg.is_dir() && dataset_id(arg).is_none()
}

/// A `--data` argument that is not a path as a data set id: `data/train.jsonl` is a missing
/// file, not the repository `data` of `train.jsonl`.
fn dataset_id(arg: &Path) -> Option<RepoId> {
    if arg.exists() || FileKind::holds_data(arg) {
        return None;
    }
    RepoId::parse(arg.to_str()?, RepoKind::Dataset)
}
