//! `contralign init`: a randomly initialized Mistral or Mixtral written as a Hugging Face
//! model directory, from a config.json or from transformers' defaults changed by flags.

use crate::cli::size_arg::parse_size;
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use contralign::checkpoint::{dtype_name, parse_dtype};
use contralign::config::ModelConfig;
use contralign::model::init::write_random_model;
use contralign::model::params::param_specs;
use contralign::tokenizer::TextTokenizer;
use rand::SeedableRng;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Arch {
    Mistral,
    Mixtral,
}

/// Write a randomly initialized Mistral or Mixtral as a Hugging Face checkpoint.
///
/// The configuration is --config's config.json (any Mistral or Mixtral config, such as a
/// hub model's) or, without it, transformers' defaults for --arch (MistralConfig(),
/// MixtralConfig(): the 7B and 8x7B shapes); the shape flags change it. Weights are drawn
/// as transformers initializes them (N(0, initializer_range²), RMSNorm weights 1) from a
/// generator seeded by --seed. --tokenizer copies a tokenizer folder in and sets the
/// vocabulary size (unless given) and the BOS/EOS ids from it.
#[derive(Args, Clone, Debug)]
pub struct InitArgs {
    /// The new model directory (must not exist).
    #[arg(long, value_name = "DIR")]
    out: PathBuf,
    /// A config.json to start from.
    #[arg(long, value_name = "FILE", conflicts_with = "arch")]
    config: Option<PathBuf>,
    /// Without --config: transformers' default configuration of this architecture.
    #[arg(long, value_enum, default_value = "mistral")]
    arch: Arch,
    /// A tokenizer folder (tokenizer.json, tokenizer_config.json, ...) to copy in.
    #[arg(long, value_name = "DIR")]
    tokenizer: Option<PathBuf>,
    /// vocab_size.
    #[arg(long, value_name = "N")]
    vocab_size: Option<u64>,
    /// hidden_size (d).
    #[arg(long, value_name = "N")]
    hidden_size: Option<u64>,
    /// intermediate_size (each expert's, for Mixtral).
    #[arg(long, value_name = "N")]
    intermediate_size: Option<u64>,
    /// num_hidden_layers.
    #[arg(long, value_name = "N")]
    layers: Option<u64>,
    /// num_attention_heads.
    #[arg(long, value_name = "N")]
    heads: Option<u64>,
    /// num_key_value_heads.
    #[arg(long, value_name = "N")]
    kv_heads: Option<u64>,
    /// head_dim (default: hidden_size / heads).
    #[arg(long, value_name = "N")]
    head_dim: Option<u64>,
    /// num_local_experts (Mixtral).
    #[arg(long, value_name = "N")]
    experts: Option<u64>,
    /// num_experts_per_tok (Mixtral).
    #[arg(long, value_name = "N")]
    experts_per_token: Option<u64>,
    /// max_position_embeddings.
    #[arg(long, value_name = "N")]
    max_position_embeddings: Option<u64>,
    /// sliding_window (0: none).
    #[arg(long, value_name = "N")]
    sliding_window: Option<u64>,
    /// dtype of the weights: float32, bfloat16 or float16.
    #[arg(long, value_name = "DTYPE", default_value = "float32")]
    dtype: String,
    /// Largest safetensors shard (5GB, 500MB); bigger models are sharded with an index.
    #[arg(long, value_name = "SIZE", default_value = "5GB")]
    max_shard_size: String,
    /// Seed of the weights' generator.
    #[arg(long, value_name = "N", default_value_t = 0)]
    seed: u64,
}

/// transformers' `MistralConfig()` and `MixtralConfig()` defaults.
fn default_config(arch: Arch) -> Value {
    let mut config = json!({
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "initializer_range": 0.02,
        "use_cache": true,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": false,
        "attention_dropout": 0.0,
    });
    let specific = match arch {
        Arch::Mistral => json!({
            "architectures": ["MistralForCausalLM"],
            "model_type": "mistral",
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
        }),
        Arch::Mixtral => json!({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "rms_norm_eps": 1e-5,
            "rope_theta": 1e6,
            "sliding_window": null,
            "num_experts_per_tok": 2,
            "num_local_experts": 8,
            "output_router_logits": false,
            "router_aux_loss_coef": 0.001,
            "router_jitter_noise": 0.0,
        }),
    };
    let obj = config.as_object_mut().expect("an object");
    obj.extend(specific.as_object().expect("an object").clone());
    config
}

impl InitArgs {
    /// The configuration: the base with the flags given written over it.
    fn config(&self, tokenizer: Option<&TextTokenizer>) -> Result<Value> {
        let mut config = match &self.config {
            Some(path) => contralign::fsutil::read_json_object(path).context("--config")?,
            None => default_config(self.arch),
        };
        let obj = config.as_object_mut().expect("checked to be an object");
        let is_mixtral = obj.contains_key("num_local_experts");
        let vocab = self.vocab_size.or(tokenizer.map(|t| t.vocab_size() as u64));
        let flags = [
            ("vocab_size", vocab),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.layers),
            ("num_attention_heads", self.heads),
            ("num_key_value_heads", self.kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (key, value) in flags {
            if let Some(v) = value {
                obj.insert(key.into(), v.into());
            }
        }
        for (flag, key, value) in [
            ("--experts", "num_local_experts", self.experts),
            (
                "--experts-per-token",
                "num_experts_per_tok",
                self.experts_per_token,
            ),
        ] {
            if let Some(v) = value {
                if !is_mixtral {
                    bail!("{flag} is for Mixtral: give --arch mixtral or a Mixtral --config");
                }
                obj.insert(key.into(), v.into());
            }
        }
        if let Some(w) = self.sliding_window {
            obj.insert(
                "sliding_window".into(),
                if w == 0 { Value::Null } else { w.into() },
            );
        }
        if let Some(t) = tokenizer {
            if let Some(bos) = t.bos_id() {
                obj.insert("bos_token_id".into(), bos.into());
            }
            if let Some(eos) = t.eos_id() {
                obj.insert("eos_token_id".into(), eos.into());
            }
        }
        Ok(config)
    }
}

pub fn run(args: InitArgs) -> Result<()> {
    // The entry itself: a trailing slash only says it is to be a directory (and would make
    // a dangling link or a file look absent).
    let entry = args.out.to_string_lossy();
    let entry = Path::new(entry.trim_end_matches('/'));
    // A dangling link is there too: a directory cannot be moved over it.
    if entry.symlink_metadata().is_ok() {
        bail!(
            "--out {}: already exists; init writes a new model directory",
            args.out.display()
        );
    }
    contralign::fsutil::check_writable_file(entry, "--out")?;
    let dtype = parse_dtype(&args.dtype).context("--dtype")?;
    let max_shard_bytes = parse_size("--max-shard-size", &args.max_shard_size)? as usize;
    let tokenizer = args
        .tokenizer
        .as_ref()
        .map(|dir| TextTokenizer::load(dir))
        .transpose()?;
    let cfg = ModelConfig::from_json(args.config(tokenizer.as_ref())?)
        .context("the model's configuration")?;
    if let Some(t) = &tokenizer {
        if t.vocab_size() > cfg.vocab_size {
            bail!(
                "the tokenizer has {} tokens but vocab_size is {}: its ids would be outside \
                 the embedding",
                t.vocab_size(),
                cfg.vocab_size
            );
        }
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(args.seed);
    write_random_model(
        &args.out,
        &cfg,
        dtype,
        max_shard_bytes,
        args.tokenizer.as_deref(),
        &mut rng,
    )?;
    let params: usize = param_specs(&cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    eprintln!(
        "wrote {}: {}, {params} parameters ({} layers, d = {}, vocabulary {}), {}",
        args.out.display(),
        cfg.raw["architectures"][0].as_str().unwrap_or("?"),
        cfg.num_layers,
        cfg.hidden_size,
        cfg.vocab_size,
        dtype_name(dtype)
    );
    Ok(())
}
