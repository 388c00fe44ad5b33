//! Random initialization as transformers' `_init_weights` does it for Mistral and Mixtral:
//! every projection, embedding and router weight drawn from N(0, initializer_range²), every
//! RMSNorm weight 1.

use super::params::param_specs;
use crate::checkpoint::{named_tensors, write_model_dir};
use crate::config::ModelConfig;
use anyhow::{bail, Result};
use rand::Rng;
use rand_distr::{Distribution, Normal};
use safetensors::Dtype;
use std::path::Path;

/// transformers' default `initializer_range` for Mistral and Mixtral.
const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// The parameters of `cfg` in `param_specs` order, drawn from `rng` tensor by tensor.
pub fn random_params(cfg: &ModelConfig, rng: &mut impl Rng) -> Result<Vec<Vec<f32>>> {
    let std = cfg.raw["initializer_range"]
        .as_f64()
        .unwrap_or(DEFAULT_INITIALIZER_RANGE);
    if !(std.is_finite() && std > 0.0) {
        bail!("config.json: initializer_range must be a positive number, found {std}");
    }
    let normal = Normal::new(0.0f32, std as f32).expect("a positive, finite std");
    Ok(param_specs(cfg)
        .iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            if name.ends_with("norm.weight") {
                vec![1.0; n]
            } else {
                (0..n).map(|_| normal.sample(rng)).collect()
            }
        })
        .collect())
}

/// Writes a randomly initialized model of `cfg` into `dir` (atomically) as a Hugging Face
/// model directory in `dtype`, with the tokenizer and generation files of `files_from`.
pub fn write_random_model(
    dir: &Path,
    cfg: &ModelConfig,
    dtype: Dtype,
    max_shard_bytes: usize,
    files_from: Option<&Path>,
    rng: &mut impl Rng,
) -> Result<()> {
    let data = random_params(cfg, rng)?;
    let specs = param_specs(cfg);
    let tensors = named_tensors(&specs, "", &data);
    crate::fsutil::write_dir_atomically(dir, |tmp| {
        write_model_dir(tmp, &cfg.raw, &tensors, dtype, max_shard_bytes, files_from)
    })
}
