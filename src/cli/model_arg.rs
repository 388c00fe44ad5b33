//! The value of every model flag: a Hugging Face model directory, or a Hub id (`org/name`,
//! `org/name@revision`) resolved in the local cache and downloaded when missing
//! ([`contralign::hub::model_dir`]). An existing directory wins over an id.

use std::path::PathBuf;

pub fn parse(text: &str) -> Result<PathBuf, String> {
    contralign::hub::model_dir(text).map_err(|e| format!("{e:#}"))
}
