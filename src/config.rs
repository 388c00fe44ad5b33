//! `config.json` of a Hugging Face Mistral or Mixtral checkpoint, in both spellings found in
//! the wild (see `docs/model.md`).

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use std::path::Path;

/// The mixture-of-experts part of a Mixtral config.
#[derive(Clone, Debug, PartialEq)]
pub struct MoeConfig {
    pub num_experts: usize,
    pub experts_per_token: usize,
    pub router_aux_loss_coef: f64,
    pub output_router_logits: bool,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// `None` for Mistral.
    pub moe: Option<MoeConfig>,
    /// The `config.json` as read, so that a saved checkpoint keeps every key.
    pub raw: Value,
}

fn field<'a>(obj: &'a Value, key: &str) -> Option<&'a Value> {
    obj.get(key).filter(|v| !v.is_null())
}

fn req_usize(obj: &Value, key: &str) -> Result<usize> {
    let v = field(obj, key).with_context(|| format!("missing required key `{key}`"))?;
    v.as_u64()
        .filter(|&n| n > 0)
        .map(|n| n as usize)
        .with_context(|| format!("key `{key}`: expected a positive integer, found {v}"))
}

fn opt_f64(obj: &Value, key: &str) -> Result<Option<f64>> {
    match field(obj, key) {
        None => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .with_context(|| format!("key `{key}`: expected a number, found {v}")),
    }
}

/// The most parameters a config may describe: 2^48, about 280 trillion (the largest open
/// checkpoints hold well under one trillion).
const MAX_PARAMETERS: u128 = 1 << 48;
/// The most tensors: 2^20 (Mixtral-8x7B has 995).
const MAX_TENSORS: u128 = 1 << 20;

fn positive_finite(key: &str, value: f64) -> Result<()> {
    if value.is_finite() && value > 0.0 {
        return Ok(());
    }
    bail!("key `{key}`: expected a positive number, found {value}")
}

fn opt_bool(obj: &Value, key: &str, default: bool) -> Result<bool> {
    match field(obj, key) {
        None => Ok(default),
        Some(v) => v
            .as_bool()
            .with_context(|| format!("key `{key}`: expected true or false, found {v}")),
    }
}

/// `eos_token_id` is an integer in Mistral configs and a list in some others.
fn token_ids(obj: &Value, key: &str) -> Result<Vec<u32>> {
    let parse = |v: &Value| {
        v.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .with_context(|| format!("key `{key}`: expected a token id, found {v}"))
    };
    match field(obj, key) {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items.iter().map(parse).collect(),
        Some(v) => Ok(vec![parse(v)?]),
    }
}

fn model_family(obj: &Value) -> Result<bool> {
    let model_type = field(obj, "model_type").and_then(Value::as_str);
    let arch = field(obj, "architectures")
        .and_then(Value::as_array)
        .and_then(|a| a.first())
        .and_then(Value::as_str);
    match (model_type, arch) {
        (Some("mistral"), _) | (None, Some("MistralForCausalLM")) => Ok(false),
        (Some("mixtral"), _) | (None, Some("MixtralForCausalLM")) => Ok(true),
        _ => bail!(
            "unsupported architecture: model_type {}, architectures {}; contralign supports \
             model_type \"mistral\" (MistralForCausalLM) and \"mixtral\" (MixtralForCausalLM)",
            model_type.map_or("absent".to_string(), |s| format!("{s:?}")),
            field(obj, "architectures").map_or("absent".to_string(), |v| v.to_string()),
        ),
    }
}

fn rope_theta(obj: &Value) -> Result<f64> {
    if let Some(params) = field(obj, "rope_parameters").or_else(|| field(obj, "rope_scaling")) {
        let rope_type = field(params, "rope_type")
            .or_else(|| field(params, "type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if rope_type != "default" {
            bail!(
                "unsupported rope type {rope_type:?}: contralign implements only the default \
                 (unscaled) RoPE of Mistral and Mixtral"
            );
        }
        if let Some(theta) = opt_f64(params, "rope_theta")? {
            return Ok(theta);
        }
    }
    Ok(opt_f64(obj, "rope_theta")?.unwrap_or(10000.0))
}

impl ModelConfig {
    pub fn from_json(raw: Value) -> Result<Self> {
        if !raw.is_object() {
            bail!("expected a JSON object");
        }
        let is_mixtral = model_family(&raw)?;
        let hidden_size = req_usize(&raw, "hidden_size")?;
        let num_heads = req_usize(&raw, "num_attention_heads")?;
        let num_kv_heads = match field(&raw, "num_key_value_heads") {
            None => num_heads,
            Some(_) => req_usize(&raw, "num_key_value_heads")?,
        };
        if num_heads % num_kv_heads != 0 {
            bail!(
                "num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads \
                 ({num_kv_heads})"
            );
        }
        let head_dim = match field(&raw, "head_dim") {
            Some(_) => req_usize(&raw, "head_dim")?,
            None => {
                if hidden_size % num_heads != 0 {
                    bail!(
                        "hidden_size ({hidden_size}) is not divisible by num_attention_heads \
                         ({num_heads}) and no head_dim is given"
                    );
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            bail!("head_dim must be even for RoPE, found {head_dim}");
        }
        let sliding_window = match field(&raw, "sliding_window") {
            None => None,
            Some(_) => Some(req_usize(&raw, "sliding_window")?),
        };
        if let Some(act) = field(&raw, "hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                bail!("unsupported hidden_act {act:?}: Mistral and Mixtral use \"silu\"");
            }
        }
        let moe = if is_mixtral {
            let num_experts = req_usize(&raw, "num_local_experts")?;
            let experts_per_token = req_usize(&raw, "num_experts_per_tok")?;
            if experts_per_token > num_experts {
                bail!(
                    "num_experts_per_tok ({experts_per_token}) exceeds num_local_experts \
                     ({num_experts})"
                );
            }
            let jitter = opt_f64(&raw, "router_jitter_noise")?.unwrap_or(0.0);
            if jitter != 0.0 {
                bail!(
                    "router_jitter_noise = {jitter} is not supported: contralign trains without \
                     router noise (set it to 0)"
                );
            }
            Some(MoeConfig {
                num_experts,
                experts_per_token,
                router_aux_loss_coef: opt_f64(&raw, "router_aux_loss_coef")?.unwrap_or(0.001),
                output_router_logits: opt_bool(&raw, "output_router_logits", false)?,
            })
        } else {
            None
        };
        let cfg = ModelConfig {
            vocab_size: req_usize(&raw, "vocab_size")?,
            hidden_size,
            intermediate_size: req_usize(&raw, "intermediate_size")?,
            num_layers: req_usize(&raw, "num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: opt_f64(&raw, "rms_norm_eps")?.unwrap_or(1e-6),
            rope_theta: rope_theta(&raw)?,
            sliding_window,
            tie_word_embeddings: opt_bool(&raw, "tie_word_embeddings", false)?,
            bos_token_id: token_ids(&raw, "bos_token_id")?.first().copied(),
            eos_token_ids: token_ids(&raw, "eos_token_id")?,
            moe,
            raw,
        };
        let special = cfg.bos_token_id.iter().map(|&id| ("bos_token_id", id));
        for (key, id) in special.chain(cfg.eos_token_ids.iter().map(|&id| ("eos_token_id", id))) {
            if id as usize >= cfg.vocab_size {
                bail!(
                    "key `{key}`: token id {id} is outside the vocabulary (vocab_size {})",
                    cfg.vocab_size
                );
            }
        }
        if field(&cfg.raw, "max_position_embeddings").is_some() {
            req_usize(&cfg.raw, "max_position_embeddings")?;
        }
        positive_finite("rms_norm_eps", cfg.rms_norm_eps)?;
        positive_finite("rope_theta", cfg.rope_theta)?;
        cfg.check_size()?;
        Ok(cfg)
    }

    /// This config with `layers` layers (a bench's `--layers`), its sizes checked as a
    /// config.json's are.
    pub fn with_layers(mut self, layers: usize) -> Result<Self> {
        ensure!(layers >= 1, "--layers must be at least 1");
        self.num_layers = layers;
        self.raw["num_hidden_layers"] = layers.into();
        self.check_size()
            .with_context(|| format!("--layers {layers}"))?;
        Ok(self)
    }

    /// Refuses sizes no machine holds before anything is sized from them: every count below
    /// is exact (u128, checked), so that no later product of these keys can overflow.
    fn check_size(&self) -> Result<()> {
        let n = |x: usize| Some(x as u128);
        let mul = |a: Option<u128>, b: Option<u128>| a?.checked_mul(b?);
        let add = |a: Option<u128>, b: Option<u128>| a?.checked_add(b?);
        let d = n(self.hidden_size);
        let experts = n(self.moe.as_ref().map_or(1, |m| m.num_experts));
        let q_width = mul(n(self.num_heads), n(self.head_dim));
        let kv_width = mul(n(self.num_kv_heads), n(self.head_dim));
        let attention = mul(d, add(mul(q_width, n(2)), mul(kv_width, n(2))));
        let mlp = mul(experts, mul(n(3), mul(d, n(self.intermediate_size))));
        let router = if self.moe.is_some() { d } else { n(0) };
        let layer = add(add(attention, mlp), add(router, mul(d, n(2))));
        let table = mul(n(self.vocab_size), d);
        let head = if self.tie_word_embeddings {
            n(0)
        } else {
            table
        };
        let total = add(mul(n(self.num_layers), layer), add(add(table, head), d));
        let tensors = mul(n(self.num_layers), add(n(7), mul(experts, n(3))));
        match (total, tensors) {
            (Some(p), Some(t)) if p <= MAX_PARAMETERS && t <= MAX_TENSORS => Ok(()),
            _ => bail!(
                "the sizes (num_hidden_layers {}, hidden_size {}, intermediate_size {}, \
                 num_attention_heads {} of head_dim {}, num_key_value_heads {}, vocab_size {}{}) \
                 make more than 2^48 parameters or 2^20 tensors, which no machine holds",
                self.num_layers,
                self.hidden_size,
                self.intermediate_size,
                self.num_heads,
                self.head_dim,
                self.num_kv_heads,
                self.vocab_size,
                self.moe.as_ref().map_or(String::new(), |m| format!(
                    ", num_local_experts {}",
                    m.num_experts
                )),
            ),
        }
    }

    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_file(&dir.join("config.json"))
    }

    /// A model directory's `config.json`, or a config file itself when `path` is no
    /// directory.
    pub fn load_dir_or_file(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::load(path)
        } else {
            Self::load_file(path)
        }
    }

    pub fn load_file(path: &Path) -> Result<Self> {
        let raw = crate::fsutil::read_json_object(path)?;
        Self::from_json(raw).with_context(|| format!("{}", path.display()))
    }

    pub fn is_eos(&self, token: u32) -> bool {
        self.eos_token_ids.contains(&token)
    }

    /// The aux-loss weight transformers would use: the config's coefficient when
    /// `output_router_logits` is set, 0 otherwise (and for Mistral).
    pub fn default_aux_coef(&self) -> f64 {
        match &self.moe {
            Some(m) if m.output_router_logits => m.router_aux_loss_coef,
            _ => 0.0,
        }
    }
}
