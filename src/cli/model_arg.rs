//! The value of every model flag: a Hugging Face model directory, or a Hub id (`org/name`,
//! `org/name@revision`) resolved in the local cache and downloaded when missing
//! ([`contralign::hub::model_dir`]). An existing directory wins over an id.

use anyhow::{bail, Context, Result};
use contralign::config::ModelConfig;
use std::path::{Path, PathBuf};

pub fn parse(text: &str) -> Result<PathBuf, String> {
    contralign::hub::model_dir(text).map_err(|e| format!("{e:#}"))
}

/// The config of `flag`'s value, read where it lies: a model directory's config.json, or a
/// config.json itself (`plan`, `bench`: commands that load no weights and look no Hub id up).
pub fn local_config(flag: &str, path: &Path) -> Result<ModelConfig> {
    if path.symlink_metadata().is_err() {
        bail!(
            "{flag} {}: no such file or directory (a model directory or a config.json; Hub ids \
             are not looked up here)",
            path.display()
        );
    }
    ModelConfig::load_dir_or_file(path).with_context(|| format!("{flag} {}", path.display()))
}
