//! The parameters of a Mistral/Mixtral model under their checkpoint names (docs/model.md), held
//! in any buffer type: weights on a backend, their gradients, optimizer moments.

use crate::config::ModelConfig;
use anyhow::Result;

pub struct Expert<B> {
    /// `w1`, the gate projection `[I, d]`.
    pub gate: B,
    /// `w3`, the up projection `[I, d]`.
    pub up: B,
    /// `w2`, the down projection `[d, I]`.
    pub down: B,
}

pub enum FeedForward<B> {
    Dense(Expert<B>),
    Moe { router: B, experts: Vec<Expert<B>> },
}

pub struct LayerParams<B> {
    pub input_norm: B,
    pub q: B,
    pub k: B,
    pub v: B,
    pub o: B,
    pub post_norm: B,
    pub ffn: FeedForward<B>,
}

pub struct Params<B> {
    pub embed: B,
    pub layers: Vec<LayerParams<B>>,
    pub final_norm: B,
    /// `None` when `tie_word_embeddings`: the LM head is `embed`.
    pub lm_head: Option<B>,
}

/// Every tensor a checkpoint of `cfg` holds, in a fixed order, with its `[rows, cols]` shape.
pub fn param_specs(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (d, hd, i) = (cfg.hidden_size, cfg.head_dim, cfg.intermediate_size);
    let mut specs = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, d],
    )];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        specs.push((format!("{p}.input_layernorm.weight"), vec![d]));
        specs.push((
            format!("{p}.self_attn.q_proj.weight"),
            vec![cfg.num_heads * hd, d],
        ));
        specs.push((
            format!("{p}.self_attn.k_proj.weight"),
            vec![cfg.num_kv_heads * hd, d],
        ));
        specs.push((
            format!("{p}.self_attn.v_proj.weight"),
            vec![cfg.num_kv_heads * hd, d],
        ));
        specs.push((
            format!("{p}.self_attn.o_proj.weight"),
            vec![d, cfg.num_heads * hd],
        ));
        specs.push((format!("{p}.post_attention_layernorm.weight"), vec![d]));
        match &cfg.moe {
            None => {
                specs.push((format!("{p}.mlp.gate_proj.weight"), vec![i, d]));
                specs.push((format!("{p}.mlp.up_proj.weight"), vec![i, d]));
                specs.push((format!("{p}.mlp.down_proj.weight"), vec![d, i]));
            }
            Some(moe) => {
                let m = format!("{p}.block_sparse_moe");
                specs.push((format!("{m}.gate.weight"), vec![moe.num_experts, d]));
                for e in 0..moe.num_experts {
                    specs.push((format!("{m}.experts.{e}.w1.weight"), vec![i, d]));
                    specs.push((format!("{m}.experts.{e}.w3.weight"), vec![i, d]));
                    specs.push((format!("{m}.experts.{e}.w2.weight"), vec![d, i]));
                }
            }
        }
    }
    specs.push(("model.norm.weight".to_string(), vec![d]));
    if !cfg.tie_word_embeddings {
        specs.push(("lm_head.weight".to_string(), vec![cfg.vocab_size, d]));
    }
    specs
}

impl<B> Params<B> {
    /// Builds every tensor of `cfg` with `make(name, shape)`, in `param_specs` order.
    pub fn build(
        cfg: &ModelConfig,
        mut make: impl FnMut(&str, &[usize]) -> Result<B>,
    ) -> Result<Self> {
        let specs = param_specs(cfg);
        let mut it = specs.iter();
        let mut next = || {
            let (name, shape) = it.next().expect("param_specs covers every tensor");
            make(name, shape)
        };
        let embed = next()?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for _ in 0..cfg.num_layers {
            let input_norm = next()?;
            let (q, k, v, o) = (next()?, next()?, next()?, next()?);
            let post_norm = next()?;
            let ffn = match &cfg.moe {
                None => {
                    let (gate, up, down) = (next()?, next()?, next()?);
                    FeedForward::Dense(Expert { gate, up, down })
                }
                Some(moe) => {
                    let router = next()?;
                    let mut experts = Vec::with_capacity(moe.num_experts);
                    for _ in 0..moe.num_experts {
                        let (gate, up, down) = (next()?, next()?, next()?);
                        experts.push(Expert { gate, up, down });
                    }
                    FeedForward::Moe { router, experts }
                }
            };
            layers.push(LayerParams {
                input_norm,
                q,
                k,
                v,
                o,
                post_norm,
                ffn,
            });
        }
        let final_norm = next()?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(next()?)
        };
        Ok(Params {
            embed,
            layers,
            final_norm,
            lm_head,
        })
    }

    /// Every tensor in `param_specs` order.
    pub fn iter(&self) -> Vec<&B> {
        let mut out = vec![&self.embed];
        for layer in &self.layers {
            out.extend([&layer.input_norm, &layer.q, &layer.k, &layer.v, &layer.o]);
            out.push(&layer.post_norm);
            match &layer.ffn {
                FeedForward::Dense(x) => out.extend([&x.gate, &x.up, &x.down]),
                FeedForward::Moe { router, experts } => {
                    out.push(router);
                    for x in experts {
                        out.extend([&x.gate, &x.up, &x.down]);
                    }
                }
            }
        }
        out.push(&self.final_norm);
        out.extend(self.lm_head.as_ref());
        out
    }

    /// Every tensor in `param_specs` order, mutably.
    pub fn iter_mut(&mut self) -> Vec<&mut B> {
        let mut out = vec![&mut self.embed];
        for layer in &mut self.layers {
            out.push(&mut layer.input_norm);
            out.extend([&mut layer.q, &mut layer.k, &mut layer.v, &mut layer.o]);
            out.push(&mut layer.post_norm);
            match &mut layer.ffn {
                FeedForward::Dense(x) => out.extend([&mut x.gate, &mut x.up, &mut x.down]),
                FeedForward::Moe { router, experts } => {
                    out.push(router);
                    for x in experts {
                        out.extend([&mut x.gate, &mut x.up, &mut x.down]);
                    }
                }
            }
        }
        out.push(&mut self.final_norm);
        out.extend(self.lm_head.as_mut());
        out
    }

    /// The tensor used as the LM head (`lm_head`, or `embed` when tied).
    pub fn head(&self) -> &B {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }
}
