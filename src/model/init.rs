//! Random initialization as transformers' `_init_weights` does it for Mistral and Mixtral:
//! every projection, embedding and router weight drawn from N(0, initializer_range²), every
//! RMSNorm weight 1.

use super::params::param_specs;
use crate::checkpoint::{named_tensors, write_model_dir};
use crate::config::ModelConfig;
use anyhow::{bail, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rayon::prelude::*;
use safetensors::Dtype;
use std::path::Path;

/// transformers' default `initializer_range` for Mistral and Mixtral.
const DEFAULT_INITIALIZER_RANGE: f64 = 0.02;

/// Elements of a tensor that [`random_params_parallel`] draws from one stream, as one task.
const CHUNK: usize = 1 << 20;

/// N(0, initializer_range²) of `cfg`.
fn weight_distribution(cfg: &ModelConfig) -> Result<Normal<f32>> {
    let std = cfg.raw["initializer_range"]
        .as_f64()
        .unwrap_or(DEFAULT_INITIALIZER_RANGE);
    if !(std.is_finite() && std > 0.0) {
        bail!("config.json: initializer_range must be a positive number, found {std}");
    }
    Ok(Normal::new(0.0f32, std as f32).expect("a positive, finite std"))
}

/// The parameters of `cfg` in `param_specs` order, drawn from `rng` tensor by tensor.
pub fn random_params(cfg: &ModelConfig, rng: &mut impl Rng) -> Result<Vec<Vec<f32>>> {
    let normal = weight_distribution(cfg)?;
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

/// The parameters of `cfg` from the distributions of [`random_params`], drawn on every core:
/// each chunk of [`CHUNK`] elements of a tensor from its own ChaCha8 stream (numbered by the
/// tensor and the chunk), so the values depend on `seed` alone, not on the threads. For `bench
/// step`, where Mistral-7B's 7.24e9 draws one after another would take minutes.
pub fn random_params_parallel(cfg: &ModelConfig, seed: u64) -> Result<Vec<Vec<f32>>> {
    let normal = weight_distribution(cfg)?;
    Ok(param_specs(cfg)
        .iter()
        .enumerate()
        .map(|(tensor, (name, shape))| {
            let n = shape.iter().product();
            if name.ends_with("norm.weight") {
                return vec![1.0; n];
            }
            let mut values = vec![0.0; n];
            values
                .par_chunks_mut(CHUNK)
                .enumerate()
                .for_each(|(chunk, out)| {
                    let mut rng = ChaCha8Rng::seed_from_u64(seed);
                    rng.set_stream(((tensor as u64) << 32) | chunk as u64);
                    out.iter_mut().for_each(|x| *x = normal.sample(&mut rng));
                });
            values
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The parallel draws depend on the seed alone: one thread or four give the same values,
    /// another seed others; the weights have the config's std, the norms are 1.
    #[test]
    fn parallel_draws_depend_on_the_seed_not_the_threads() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tools/scoreboard/tiny-mistral.json"
        );
        let mut cfg = ModelConfig::load_dir_or_file(Path::new(path)).unwrap();
        // Embedding and head of 40000 x 64: 3 chunks each, drawn by different threads.
        cfg.vocab_size = 40_000;
        let on = |threads: usize, seed: u64| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| random_params_parallel(&cfg, seed).unwrap())
        };
        let one = on(1, 7);
        assert_eq!(one, on(4, 7));
        assert_ne!(one, on(4, 8));
        for ((name, _), values) in param_specs(&cfg).iter().zip(&one) {
            if name.ends_with("norm.weight") {
                assert!(values.iter().all(|&x| x == 1.0), "{name}");
                continue;
            }
            let n = values.len() as f64;
            let std = (values.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / n).sqrt();
            // 0.02 within 5 standard errors of the estimate (0.02 / sqrt(2n)).
            assert!(
                (std - 0.02).abs() < 5.0 * 0.02 / (2.0 * n).sqrt(),
                "{name}: {std}"
            );
        }
    }
}
