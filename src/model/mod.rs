//! The Mistral/Mixtral model: parameters on a backend, the forward pass over a packed batch,
//! scoring into per-response statistics, and the backward from those statistics to every
//! parameter, with optional per-layer activation checkpointing.

pub mod init;
pub mod layer;
pub mod params;

use crate::checkpoint;
use crate::config::ModelConfig;
use crate::data::packing::{Batch, ResponseSpan};
use crate::ops::{AttentionLayout, MoeAux, Ops};
use anyhow::{Context, Result};
use layer::LayerActs;
use params::Params;
use safetensors::Dtype;
use std::path::Path;

pub struct Model<B> {
    pub cfg: ModelConfig,
    pub params: Params<B>,
    /// The dtype the checkpoint stored its weights in.
    pub dtype: Dtype,
}

/// A response's statistics (docs/losses.md §1).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ResponseStats {
    pub logp_sum: f64,
    pub tokens: usize,
    pub logp_mean: f64,
    /// `log π(EOS | …)` at the response's end; `None` when it does not end with EOS.
    pub eos_logp: Option<f64>,
}

/// How much of the forward pass to keep for a backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: scoring only.
    Nothing,
    /// Each layer's input; the backward recomputes the rest layer by layer.
    LayerInputs,
    /// Every activation.
    Everything,
}

struct Forward<O: Ops> {
    /// The final hidden states before the last norm.
    hidden: O::Buf,
    layer_inputs: Vec<O::Buf>,
    layer_acts: Vec<LayerActs<O>>,
    /// The load-balancing sums (Mixtral).
    balance: Option<O::Balance>,
}

/// The loss of a batch as a function of its statistics: returns the loss and
/// `dL/dS, dL/dA, dL/dE` per response.
pub struct StatsGrad {
    pub loss: f64,
    pub d_s: Vec<f64>,
    pub d_a: Vec<f64>,
    pub d_e: Vec<f64>,
}

pub struct StepOptions {
    pub checkpointing: bool,
    /// Weight of the load-balancing loss (Mixtral); 0 leaves it out.
    pub aux_coef: f64,
}

/// What a forward and backward pass reports besides the gradients.
pub struct PassOutput {
    /// The objective: the statistics loss plus `aux_coef · aux`.
    pub loss: f64,
    pub aux_loss: Option<f64>,
    pub stats: Vec<ResponseStats>,
}

pub struct StepOutput<B> {
    /// The objective: the statistics loss plus `aux_coef · aux`.
    pub loss: f64,
    pub aux_loss: Option<f64>,
    pub stats: Vec<ResponseStats>,
    pub grads: Params<B>,
}

impl<B> Model<B> {
    pub fn load<O: Ops<Buf = B>>(ops: &O, dir: &Path) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        let (mut weights, dtype) = checkpoint::load_weights(dir, &cfg)?;
        let params = Params::build(&cfg, |name, _| {
            let w = weights
                .remove(name)
                .expect("load_weights checked every name");
            Ok(ops.upload(&w))
        })?;
        ops.check()
            .with_context(|| format!("loading {} onto the device", dir.display()))?;
        Ok(Model { cfg, params, dtype })
    }

    /// Zero-filled buffers shaped like the parameters.
    pub fn zeros_like<O: Ops<Buf = B>>(&self, ops: &O) -> Params<B> {
        Params::build(&self.cfg, |_, shape| Ok(ops.zeros(shape.iter().product())))
            .expect("building zero buffers cannot fail")
    }

    fn forward<O: Ops<Buf = B>>(
        &self,
        ops: &O,
        tokens: &[u32],
        layout: &AttentionLayout,
        row_weights: &[f64],
        keep: Keep,
    ) -> Forward<O> {
        let mut h = ops.embedding(&self.params.embed, tokens, self.cfg.hidden_size);
        let mut out = Forward {
            hidden: ops.zeros(0),
            layer_inputs: Vec::new(),
            layer_acts: Vec::new(),
            balance: self
                .cfg
                .moe
                .as_ref()
                .map(|m| ops.moe_balance(m.num_experts)),
        };
        for p in &self.params.layers {
            let (next, acts) = layer::forward(ops, &self.cfg, p, &h, layout);
            if let (Some(balance), Some(routing)) = (&mut out.balance, acts.routing()) {
                ops.moe_balance_add(balance, routing, row_weights);
            }
            if keep != Keep::Nothing {
                out.layer_inputs.push(h);
            }
            if keep == Keep::Everything {
                out.layer_acts.push(acts);
            }
            h = next;
        }
        out.hidden = h;
        out
    }

    /// Logits `[T, V]` of one plain sequence (every position).
    pub fn logits<O: Ops<Buf = B>>(&self, ops: &O, ids: &[u32]) -> Vec<f32> {
        let layout = AttentionLayout::causal(ids.len(), self.cfg.sliding_window);
        let weights = vec![1.0; ids.len()];
        let fwd = self.forward(ops, ids, &layout, &weights, Keep::Nothing);
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let normed = ops.rmsnorm(
            &fwd.hidden,
            &self.params.final_norm,
            d,
            self.cfg.rms_norm_eps,
        );
        ops.download(&ops.matmul(&normed, self.params.head(), ids.len(), d, v))
    }

    fn token_logprobs<O: Ops<Buf = B>>(
        &self,
        ops: &O,
        batch: &Batch,
        hidden: &B,
    ) -> (B, Vec<f64>, B) {
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let normed = ops.rmsnorm(hidden, &self.params.final_norm, d, self.cfg.rms_norm_eps);
        let rows = ops.gather_rows(&normed, &batch.prediction_rows, None, d);
        let (logp, lse) = ops.token_logprobs(&rows, self.params.head(), &batch.targets, d, v);
        (rows, logp, lse)
    }

    /// `S, n, A, E` of every response of the batch.
    pub fn score<O: Ops<Buf = B>>(&self, ops: &O, batch: &Batch) -> Vec<ResponseStats> {
        self.score_with_aux(ops, batch).0
    }

    /// The statistics and, for Mixtral, the load-balancing loss of the batch.
    pub fn score_with_aux<O: Ops<Buf = B>>(
        &self,
        ops: &O,
        batch: &Batch,
    ) -> (Vec<ResponseStats>, Option<f64>) {
        let fwd = self.forward(
            ops,
            &batch.tokens,
            &batch.layout,
            &batch.row_weights,
            Keep::Nothing,
        );
        let (_, logp, _) = self.token_logprobs(ops, batch, &fwd.hidden);
        let aux = fwd.balance.as_ref().map(|b| ops.moe_balance_loss(b));
        (response_stats(batch, &logp), aux)
    }

    /// The objective `loss_fn(stats) + aux_coef · aux` and its gradient for every parameter.
    pub fn loss_and_grads<O: Ops<Buf = B>>(
        &self,
        ops: &O,
        batch: &Batch,
        loss_fn: impl FnOnce(&[ResponseStats]) -> Result<StatsGrad>,
        opts: &StepOptions,
    ) -> Result<StepOutput<B>> {
        let mut grads = self.zeros_like(ops);
        let out = self.accumulate_grads(ops, batch, loss_fn, opts, 1.0, &mut grads)?;
        Ok(StepOutput {
            loss: out.loss,
            aux_loss: out.aux_loss,
            stats: out.stats,
            grads,
        })
    }

    /// As [`Model::loss_and_grads`], adding `scale ·` the gradient into `grads`: a step
    /// accumulates its micro-batches this way, each scaled by its share of the step's groups,
    /// into gradients that live for the whole run.
    pub fn accumulate_grads<O: Ops<Buf = B>>(
        &self,
        ops: &O,
        batch: &Batch,
        loss_fn: impl FnOnce(&[ResponseStats]) -> Result<StatsGrad>,
        opts: &StepOptions,
        scale: f64,
        grads: &mut Params<B>,
    ) -> Result<PassOutput> {
        let cfg = &self.cfg;
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let keep = if opts.checkpointing {
            Keep::LayerInputs
        } else {
            Keep::Everything
        };
        let mut fwd = self.forward(ops, &batch.tokens, &batch.layout, &batch.row_weights, keep);
        let (rows, logp, lse) = self.token_logprobs(ops, batch, &fwd.hidden);
        let stats = response_stats(batch, &logp);
        let sg = loss_fn(&stats)?;
        let aux_loss = fwd.balance.as_ref().map(|b| ops.moe_balance_loss(b));
        let loss = sg.loss + opts.aux_coef * aux_loss.unwrap_or(0.0);

        let dlogp: Vec<f64> = token_grads(&batch.responses, batch.targets.len(), &sg)
            .into_iter()
            .map(|g| g * scale)
            .collect();
        let drows = {
            let dhead = grads.lm_head.as_mut().unwrap_or(&mut grads.embed);
            ops.token_logprobs_backward(
                &rows,
                self.params.head(),
                &batch.targets,
                &lse,
                &dlogp,
                d,
                v,
                dhead,
            )
        };
        drop(rows);
        let mut dnormed = ops.zeros(batch.len() * d);
        ops.scatter_add_rows(&mut dnormed, &drows, &batch.prediction_rows, None, d);
        let mut dh = ops.rmsnorm_backward(
            &fwd.hidden,
            &self.params.final_norm,
            &dnormed,
            d,
            cfg.rms_norm_eps,
            &mut grads.final_norm,
        );
        let aux = |coef: f64| match &fwd.balance {
            Some(balance) if coef != 0.0 => Some(MoeAux {
                balance,
                coef: coef * scale,
                row_weights: &batch.row_weights,
            }),
            _ => None,
        };
        for l in (0..cfg.num_layers).rev() {
            let x = fwd.layer_inputs.pop().expect("one input kept per layer");
            let p = &self.params.layers[l];
            let acts = match fwd.layer_acts.pop() {
                Some(acts) => acts,
                None => layer::forward(ops, cfg, p, &x, &batch.layout).1,
            };
            dh = layer::backward(
                ops,
                cfg,
                p,
                &mut grads.layers[l],
                &x,
                &acts,
                &dh,
                &batch.layout,
                aux(opts.aux_coef),
            );
        }
        ops.embedding_backward(&mut grads.embed, &dh, &batch.tokens, d);
        Ok(PassOutput {
            loss,
            aux_loss,
            stats,
        })
    }
}

/// Reduces per-token log-probs into per-response statistics, in f64.
pub fn response_stats(batch: &Batch, logp: &[f64]) -> Vec<ResponseStats> {
    span_stats(&batch.responses, logp)
}

/// The statistics of each span of `logp`.
pub fn span_stats(responses: &[ResponseSpan], logp: &[f64]) -> Vec<ResponseStats> {
    responses
        .iter()
        .map(|r| {
            let lp = &logp[r.first..r.first + r.len];
            let sum: f64 = lp.iter().sum();
            ResponseStats {
                logp_sum: sum,
                tokens: r.len,
                logp_mean: sum / r.len as f64,
                eos_logp: r.ends_with_eos.then(|| lp[r.len - 1]),
            }
        })
        .collect()
}

/// `dL/dlogp_t = dL/dS_i + dL/dA_i / n_i + [t is the final EOS] dL/dE_i` (docs/losses.md §1) for
/// each of `rows` prediction rows; rows of no response get 0.
pub fn token_grads(responses: &[ResponseSpan], rows: usize, g: &StatsGrad) -> Vec<f64> {
    let mut out = vec![0f64; rows];
    for (i, r) in responses.iter().enumerate() {
        let per_token = g.d_s[i] + g.d_a[i] / r.len as f64;
        out[r.first..r.first + r.len]
            .iter_mut()
            .for_each(|x| *x = per_token);
        if r.ends_with_eos {
            out[r.first + r.len - 1] += g.d_e[i];
        }
    }
    out
}
