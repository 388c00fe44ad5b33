//! The Mistral/Mixtral model: parameters on a backend, the forward pass over a packed batch,
//! scoring into per-response statistics, and the backward from those statistics to every
//! parameter, with optional per-layer activation checkpointing.

pub mod init;
pub mod layer;
pub mod params;

use crate::checkpoint;
use crate::config::ModelConfig;
use crate::data::packing::Batch;
use crate::memory_plan::RecomputePolicy;
use crate::ops::storage::Dtype as StorageDtype;
use crate::ops::{AttentionLayout, BatchLists, ExtraList, MoeAux, Ops};
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

pub use crate::ops::ResponseStats;

/// How much of the forward pass to keep for a backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Keep {
    /// Nothing: scoring only.
    Nothing,
    /// Each layer's input and what the recompute policy keeps of its activations.
    ForBackward(RecomputePolicy),
}

struct Forward<O: Ops> {
    /// The final hidden states before the last norm.
    hidden: O::Buf,
    layer_inputs: Vec<O::Buf>,
    layer_acts: Vec<LayerActs<O>>,
    /// The load-balancing sums (Mixtral).
    balance: Option<O::Balance>,
}

/// The loss of a batch as a function of its statistics table: its gradient table
/// `(dL/dS, dL/dA, dL/dE)` per response on the same backend, and its report: the loss and
/// what the caller logs, as the backend leaves them (read on the host, or still on a device:
/// `step::LossOps`).
pub struct StatsLoss<T, R> {
    pub grads: T,
    pub report: R,
}

pub struct StepOptions {
    /// What the backward recomputes of each layer's forward.
    pub recompute: RecomputePolicy,
    /// Weight of the load-balancing loss (Mixtral); 0 leaves it out.
    pub aux_coef: f64,
}

/// What a forward and backward pass reports besides the gradients: the loss function's
/// report and, for Mixtral, the load-balancing sums, whose loss the caller reads
/// (`Ops::moe_balance_loss`) when it logs it. The objective is the report's loss plus
/// `aux_coef ·` that loss.
pub struct PassOutput<R, Bal> {
    pub report: R,
    pub balance: Option<Bal>,
}

impl<B> Model<B> {
    /// The checkpoint in `dir` on `ops`, whose storage type must hold its weights.
    pub fn load<O: Ops<Buf = B>>(ops: &O, dir: &Path) -> Result<Self> {
        Self::load_for(ops, dir, ops.storage())
    }

    /// The checkpoint in `dir` on `ops`, for a run that stores its weights in `storage`
    /// (a trainer that keeps the host's f32 copy and moves it to a bf16 store later).
    pub fn load_for<O: Ops<Buf = B>>(ops: &O, dir: &Path, storage: StorageDtype) -> Result<Self> {
        let cfg = ModelConfig::load(dir)?;
        if let Some(moe) = &cfg.moe {
            ops.check_moe(moe.num_experts, moe.experts_per_token)
                .with_context(|| format!("{}", dir.join("config.json").display()))?;
        }
        let (mut weights, dtype) = checkpoint::load_weights(dir, &cfg, storage)?;
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

    /// Stages `batch`'s host lists on the backend ([`Ops::stage`]), with `extra` for the
    /// loss.
    pub fn stage<O: Ops<Buf = B> + ?Sized>(&self, ops: &O, batch: &Batch, extra: &[ExtraList]) {
        let moe = self.cfg.moe.is_some();
        ops.stage(&BatchLists {
            tokens: &batch.tokens,
            layout: &batch.layout,
            prediction_rows: &batch.prediction_rows,
            targets: &batch.targets,
            responses: &batch.responses,
            row_weights: if moe { &batch.row_weights } else { &[] },
            extra,
        });
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
            if let Keep::ForBackward(policy) = keep {
                out.layer_inputs.push(h);
                match policy {
                    RecomputePolicy::None => out.layer_acts.push(acts),
                    RecomputePolicy::Selective => out.layer_acts.push(acts.selective()),
                    RecomputePolicy::Full => {}
                }
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

    /// The final norm of `hidden` at the batch's prediction rows.
    fn prediction_rows<O: Ops<Buf = B>>(&self, ops: &O, batch: &Batch, hidden: &B) -> B {
        let d = self.cfg.hidden_size;
        let normed = ops.rmsnorm(hidden, &self.params.final_norm, d, self.cfg.rms_norm_eps);
        ops.gather_rows(&normed, &batch.prediction_rows, None, d)
    }

    /// The `(S, A, E)` table of the batch's responses, with what its backward needs.
    fn response_scores<O: Ops<Buf = B>>(
        &self,
        ops: &O,
        batch: &Batch,
        hidden: &B,
    ) -> (B, O::Table, B) {
        let (d, v) = (self.cfg.hidden_size, self.cfg.vocab_size);
        let rows = self.prediction_rows(ops, batch, hidden);
        let (table, lse) = ops.response_scores(
            &rows,
            self.params.head(),
            &batch.targets,
            &batch.responses,
            d,
            v,
        );
        (rows, table, lse)
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
        let (table, aux) = self.scored(ops, batch, true);
        let stats = ResponseStats::from_table(&batch.responses, &ops.table_to_host(&table));
        (stats, aux)
    }

    /// The `(S, A, E)` table of the batch's responses, left on the backend (a reference model
    /// scored where the policy trains).
    pub fn score_table<O: Ops<Buf = B>>(&self, ops: &O, batch: &Batch) -> O::Table {
        self.scored(ops, batch, false).0
    }

    /// The table and, `with_aux`, the load-balancing loss (a download on a device).
    fn scored<O: Ops<Buf = B>>(
        &self,
        ops: &O,
        batch: &Batch,
        with_aux: bool,
    ) -> (O::Table, Option<f64>) {
        self.stage(ops, batch, &[]);
        let fwd = self.forward(
            ops,
            &batch.tokens,
            &batch.layout,
            &batch.row_weights,
            Keep::Nothing,
        );
        let (_, table, _) = self.response_scores(ops, batch, &fwd.hidden);
        let aux = fwd.balance.as_ref().filter(|_| with_aux);
        (table, aux.map(|b| ops.moe_balance_loss(b)))
    }

    /// The objective `loss_fn(stats) + aux_coef · aux`: what the pass reports, and the
    /// gradient for every parameter.
    #[allow(clippy::type_complexity)]
    pub fn loss_and_grads<O: Ops<Buf = B>, R>(
        &self,
        ops: &O,
        batch: &Batch,
        loss_fn: impl FnOnce(&O::Table) -> Result<StatsLoss<O::Table, R>>,
        opts: &StepOptions,
    ) -> Result<(PassOutput<R, O::Balance>, Params<B>)> {
        let mut grads = self.zeros_like(ops);
        let out = self.accumulate_grads(ops, batch, loss_fn, opts, 1.0, &mut grads)?;
        Ok((out, grads))
    }

    /// As [`Model::loss_and_grads`], adding `scale ·` the gradient into `grads`: a step
    /// accumulates its micro-batches this way, each scaled by its share of the step's groups,
    /// into gradients that live for the whole run.
    pub fn accumulate_grads<O: Ops<Buf = B>, R>(
        &self,
        ops: &O,
        batch: &Batch,
        loss_fn: impl FnOnce(&O::Table) -> Result<StatsLoss<O::Table, R>>,
        opts: &StepOptions,
        scale: f64,
        grads: &mut Params<B>,
    ) -> Result<PassOutput<R, O::Balance>> {
        let cfg = &self.cfg;
        let (d, v) = (cfg.hidden_size, cfg.vocab_size);
        let keep = Keep::ForBackward(opts.recompute);
        self.stage(ops, batch, &[]);
        let mut fwd = self.forward(ops, &batch.tokens, &batch.layout, &batch.row_weights, keep);
        let (rows, table, lse) = self.response_scores(ops, batch, &fwd.hidden);
        let sl = loss_fn(&table)?;
        drop(table);

        let drows = {
            let dhead = grads.lm_head.as_mut().unwrap_or(&mut grads.embed);
            ops.response_scores_backward(
                &rows,
                self.params.head(),
                &batch.targets,
                &lse,
                &batch.responses,
                &sl.grads,
                scale,
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
            None,
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
            report: sl.report,
            balance: fwd.balance,
        })
    }
}
