//! One decoder layer, forward and backward, written against the ops trait:
//! `h = x + o_proj(attn(rope(q a), rope(k a), v a))` with `a = rmsnorm(x)`, then
//! `y = h + ffn(rmsnorm(h))` with a SwiGLU MLP or a top-k mixture of them.

use super::moe::{route, Dispatch, LoadBalance, Routing};
use super::params::{Expert, FeedForward, LayerParams};
use crate::config::ModelConfig;
use crate::ops::{AttentionLayout, AttentionShape, Ops};

/// What the backward of one SwiGLU MLP needs (its input is held by the caller); `act` is
/// `None` when the backward recomputes it from `gate` and `up` (selective recompute).
pub struct MlpActs<B> {
    gate: B,
    up: B,
    act: Option<B>,
}

pub struct ExpertActs<B> {
    dispatch: Dispatch,
    input: B,
    mlp: MlpActs<B>,
    output: B,
}

pub enum FfnActs<B> {
    Dense(MlpActs<B>),
    Moe {
        routing: Routing,
        experts: Vec<ExpertActs<B>>,
    },
}

/// Everything the backward of a layer reads, from its input `x` on. Under selective
/// recompute the norms' outputs and SwiGLU's are dropped (`None`) and recomputed by the
/// backward from what is kept, the same ops on the same inputs: the same bits.
pub struct LayerActs<B> {
    normed: Option<B>,
    q: B,
    k: B,
    v: B,
    attn: B,
    lse: B,
    mid: B,
    ffn_in: Option<B>,
    ffn: FfnActs<B>,
}

impl<B> LayerActs<B> {
    /// What selective recompute keeps: the GEMM, attention and routing outputs, without the
    /// norms' and SwiGLU's (docs/architecture.md §12; the MoE experts' gathered inputs are
    /// kept too until the MoE dispatch runs on the device).
    pub fn selective(mut self) -> Self {
        self.normed = None;
        self.ffn_in = None;
        match &mut self.ffn {
            FfnActs::Dense(mlp) => mlp.act = None,
            FfnActs::Moe { experts, .. } => experts.iter_mut().for_each(|e| e.mlp.act = None),
        }
        self
    }

    /// This layer's routing, for the load-balancing loss (`None` for a dense layer).
    pub fn routing(&self) -> Option<&Routing> {
        match &self.ffn {
            FfnActs::Moe { routing, .. } => Some(routing),
            FfnActs::Dense(_) => None,
        }
    }
}

/// The load-balancing gradient a layer's backward adds to its router probabilities.
pub struct AuxGrad<'a> {
    pub balance: &'a LoadBalance,
    pub coef: f64,
    pub row_weights: &'a [f64],
}

/// A kept activation, or the one `recompute` makes, held in `slot` for as long as it is used.
fn kept_or<'a, B>(
    kept: &'a Option<B>,
    slot: &'a mut Option<B>,
    recompute: impl FnOnce() -> B,
) -> &'a B {
    match kept {
        Some(value) => value,
        None => slot.insert(recompute()),
    }
}

pub fn attn_shape(cfg: &ModelConfig) -> AttentionShape {
    AttentionShape {
        heads: cfg.num_heads,
        kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
    }
}

fn mlp_forward<O: Ops>(
    ops: &O,
    w: &Expert<O::Buf>,
    x: &O::Buf,
    rows: usize,
    cfg: &ModelConfig,
) -> (O::Buf, MlpActs<O::Buf>) {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let gate = ops.matmul(x, &w.gate, rows, d, i);
    let up = ops.matmul(x, &w.up, rows, d, i);
    let act = ops.swiglu(&gate, &up);
    let out = ops.matmul(&act, &w.down, rows, i, d);
    let act = Some(act);
    (out, MlpActs { gate, up, act })
}

#[allow(clippy::too_many_arguments)]
fn mlp_backward<O: Ops>(
    ops: &O,
    w: &Expert<O::Buf>,
    g: &mut Expert<O::Buf>,
    x: &O::Buf,
    acts: &MlpActs<O::Buf>,
    dout: &O::Buf,
    rows: usize,
    cfg: &ModelConfig,
) -> O::Buf {
    let (d, i) = (cfg.hidden_size, cfg.intermediate_size);
    let mut recomputed = None;
    let act = kept_or(&acts.act, &mut recomputed, || {
        ops.swiglu(&acts.gate, &acts.up)
    });
    let dact = ops.matmul_backward(act, &w.down, dout, rows, i, d, &mut g.down);
    let (dgate, dup) = ops.swiglu_backward(&acts.gate, &acts.up, &dact);
    let mut dx = ops.matmul_backward(x, &w.gate, &dgate, rows, d, i, &mut g.gate);
    let dx_up = ops.matmul_backward(x, &w.up, &dup, rows, d, i, &mut g.up);
    ops.add_assign(&mut dx, &dx_up);
    dx
}

pub fn forward<O: Ops>(
    ops: &O,
    cfg: &ModelConfig,
    p: &LayerParams<O::Buf>,
    x: &O::Buf,
    layout: &AttentionLayout,
) -> (O::Buf, LayerActs<O::Buf>) {
    forward_with(ops, cfg, p, x, &layout.positions, |q, k, v| {
        ops.attention(q, k, v, layout, attn_shape(cfg))
    })
}

/// The layer over rows `x` at `positions`, its attention supplied by
/// `attend(q, k, v) -> (out, lse)` from the rows' rotated queries and keys and their values:
/// a KV-cached decoder attends over earlier tokens' keys as well.
pub fn forward_with<O: Ops>(
    ops: &O,
    cfg: &ModelConfig,
    p: &LayerParams<O::Buf>,
    x: &O::Buf,
    positions: &[u32],
    attend: impl FnOnce(&O::Buf, &O::Buf, &O::Buf) -> (O::Buf, O::Buf),
) -> (O::Buf, LayerActs<O::Buf>) {
    let t = positions.len();
    let (d, hd) = (cfg.hidden_size, cfg.head_dim);
    let (qw, kvw) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let eps = cfg.rms_norm_eps;

    let normed = ops.rmsnorm(x, &p.input_norm, d, eps);
    let mut q = ops.matmul(&normed, &p.q, t, d, qw);
    let mut k = ops.matmul(&normed, &p.k, t, d, kvw);
    let v = ops.matmul(&normed, &p.v, t, d, kvw);
    ops.rope(&mut q, positions, cfg.num_heads, hd, cfg.rope_theta, false);
    ops.rope(
        &mut k,
        positions,
        cfg.num_kv_heads,
        hd,
        cfg.rope_theta,
        false,
    );
    let (attn, lse) = attend(&q, &k, &v);
    let mut mid = ops.matmul(&attn, &p.o, t, qw, d);
    ops.add_assign(&mut mid, x);

    let ffn_in = ops.rmsnorm(&mid, &p.post_norm, d, eps);
    let (ffn_out, ffn) = match &p.ffn {
        FeedForward::Dense(w) => {
            let (out, acts) = mlp_forward(ops, w, &ffn_in, t, cfg);
            (out, FfnActs::Dense(acts))
        }
        FeedForward::Moe { router, experts } => {
            let e_count = experts.len();
            let moe = cfg.moe.as_ref().expect("a MoE layer has a MoE config");
            let logits = ops.download(&ops.matmul(&ffn_in, router, t, d, e_count));
            let routing = route(&logits, e_count, moe.experts_per_token);
            let mut out = ops.zeros(t * d);
            let mut acts = Vec::with_capacity(e_count);
            for (w, dispatch) in experts.iter().zip(routing.dispatch()) {
                let n = dispatch.rows.len();
                let input = ops.gather_rows(&ffn_in, &dispatch.rows, None, d);
                let (output, mlp) = mlp_forward(ops, w, &input, n, cfg);
                ops.scatter_add_rows(
                    &mut out,
                    &output,
                    &dispatch.rows,
                    Some(&dispatch.weights),
                    d,
                );
                acts.push(ExpertActs {
                    dispatch,
                    input,
                    mlp,
                    output,
                });
            }
            (
                out,
                FfnActs::Moe {
                    routing,
                    experts: acts,
                },
            )
        }
    };
    let mut y = ffn_out;
    ops.add_assign(&mut y, &mid);
    let acts = LayerActs {
        normed: Some(normed),
        q,
        k,
        v,
        attn,
        lse,
        mid,
        ffn_in: Some(ffn_in),
        ffn,
    };
    (y, acts)
}

/// Returns `dL/dx` from `dL/dy`; accumulates every parameter gradient into `g`.
#[allow(clippy::too_many_arguments)]
pub fn backward<O: Ops>(
    ops: &O,
    cfg: &ModelConfig,
    p: &LayerParams<O::Buf>,
    g: &mut LayerParams<O::Buf>,
    x: &O::Buf,
    acts: &LayerActs<O::Buf>,
    dy: &O::Buf,
    layout: &AttentionLayout,
    aux: Option<&AuxGrad>,
) -> O::Buf {
    let t = layout.len();
    let (d, hd) = (cfg.hidden_size, cfg.head_dim);
    let (qw, kvw) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
    let eps = cfg.rms_norm_eps;
    let mut ffn_in_recomputed = None;
    let ffn_in = kept_or(&acts.ffn_in, &mut ffn_in_recomputed, || {
        ops.rmsnorm(&acts.mid, &p.post_norm, d, eps)
    });

    let dffn_in = match (&p.ffn, &mut g.ffn, &acts.ffn) {
        (FeedForward::Dense(w), FeedForward::Dense(gw), FfnActs::Dense(a)) => {
            mlp_backward(ops, w, gw, ffn_in, a, dy, t, cfg)
        }
        (
            FeedForward::Moe { router, experts },
            FeedForward::Moe {
                router: grouter,
                experts: gexperts,
            },
            FfnActs::Moe {
                routing,
                experts: eacts,
            },
        ) => {
            let mut dffn_in = ops.zeros(t * d);
            let mut d_weights = vec![0f64; routing.chosen.len()];
            for ((w, gw), a) in experts.iter().zip(gexperts.iter_mut()).zip(eacts) {
                let rows = &a.dispatch.rows;
                let dy_rows = ops.gather_rows(dy, rows, None, d);
                for (&slot, dw) in a
                    .dispatch
                    .slots
                    .iter()
                    .zip(ops.row_dots(&dy_rows, &a.output, d))
                {
                    d_weights[slot] = dw;
                }
                let dout = ops.gather_rows(dy, rows, Some(&a.dispatch.weights), d);
                let dx = mlp_backward(ops, w, gw, &a.input, &a.mlp, &dout, rows.len(), cfg);
                ops.scatter_add_rows(&mut dffn_in, &dx, rows, None, d);
            }
            let direct = aux.map(|a| a.balance.prob_grad(a.coef, a.row_weights));
            let dz = ops.upload(&routing.backward(&d_weights, direct.as_deref()));
            let dx_router = ops.matmul_backward(ffn_in, router, &dz, t, d, experts.len(), grouter);
            ops.add_assign(&mut dffn_in, &dx_router);
            dffn_in
        }
        _ => unreachable!("parameters, gradients and activations share one layer structure"),
    };
    let mut dmid =
        ops.rmsnorm_backward(&acts.mid, &p.post_norm, &dffn_in, d, eps, &mut g.post_norm);
    ops.add_assign(&mut dmid, dy);

    let dattn = ops.matmul_backward(&acts.attn, &p.o, &dmid, t, qw, d, &mut g.o);
    let (mut dq, mut dk, dv) = ops.attention_backward(
        &acts.q,
        &acts.k,
        &acts.v,
        &acts.attn,
        &acts.lse,
        &dattn,
        layout,
        attn_shape(cfg),
    );
    ops.rope(
        &mut dq,
        &layout.positions,
        cfg.num_heads,
        hd,
        cfg.rope_theta,
        true,
    );
    ops.rope(
        &mut dk,
        &layout.positions,
        cfg.num_kv_heads,
        hd,
        cfg.rope_theta,
        true,
    );
    drop(ffn_in_recomputed);
    let mut normed_recomputed = None;
    let normed = kept_or(&acts.normed, &mut normed_recomputed, || {
        ops.rmsnorm(x, &p.input_norm, d, eps)
    });
    let mut dnormed = ops.matmul_backward(normed, &p.q, &dq, t, d, qw, &mut g.q);
    let dk_in = ops.matmul_backward(normed, &p.k, &dk, t, d, kvw, &mut g.k);
    let dv_in = ops.matmul_backward(normed, &p.v, &dv, t, d, kvw, &mut g.v);
    ops.add_assign(&mut dnormed, &dk_in);
    ops.add_assign(&mut dnormed, &dv_in);
    let mut dx = ops.rmsnorm_backward(x, &p.input_norm, &dnormed, d, eps, &mut g.input_norm);
    ops.add_assign(&mut dx, &dmid);
    dx
}
