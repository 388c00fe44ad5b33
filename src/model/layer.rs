//! One decoder layer, forward and backward, written against the ops trait:
//! `h = x + o_proj(attn(rope(q a), rope(k a), v a))` with `a = rmsnorm(x)`, then
//! `y = h + ffn(rmsnorm(h))` with a SwiGLU MLP or a top-k mixture of them.

use super::params::{Expert, FeedForward, LayerParams};
use crate::config::ModelConfig;
use crate::ops::{AttentionLayout, AttentionShape, MoeAux, Ops};

/// What the backward of one SwiGLU MLP needs (its input is held by the caller); `act` is
/// `None` when the backward recomputes it from `gate` and `up` (selective recompute).
pub struct MlpActs<B> {
    gate: B,
    up: B,
    act: Option<B>,
}

/// What the backward of a MoE feed-forward reads (docs/architecture.md §6): the routing,
/// the input rows in expert order (`None` under selective recompute: the backward permutes
/// the layer's input again, the same bits), the experts' MLP activations over those rows and
/// their outputs in expert order.
pub struct MoeActs<O: Ops + ?Sized> {
    routing: O::Routing,
    input: Option<O::Buf>,
    mlp: MlpActs<O::Buf>,
    output: O::Buf,
}

impl<O: Ops + ?Sized> MoeActs<O> {
    pub fn routing(&self) -> &O::Routing {
        &self.routing
    }
}

pub enum FfnActs<O: Ops + ?Sized> {
    Dense(MlpActs<O::Buf>),
    Moe(MoeActs<O>),
}

/// Everything the backward of a layer reads, from its input `x` on. Under selective
/// recompute the norms' outputs and SwiGLU's are dropped (`None`) and recomputed by the
/// backward from what is kept, the same ops on the same inputs: the same bits.
pub struct LayerActs<O: Ops + ?Sized> {
    normed: Option<O::Buf>,
    q: O::Buf,
    k: O::Buf,
    v: O::Buf,
    attn: O::Buf,
    lse: O::Buf,
    mid: O::Buf,
    ffn_in: Option<O::Buf>,
    ffn: FfnActs<O>,
}

impl<O: Ops + ?Sized> LayerActs<O> {
    /// What selective recompute keeps: the GEMM, attention and routing outputs, without the
    /// norms', SwiGLU's and the MoE dispatch's (docs/architecture.md §12).
    pub fn selective(mut self) -> Self {
        self.normed = None;
        self.ffn_in = None;
        match &mut self.ffn {
            FfnActs::Dense(mlp) => mlp.act = None,
            FfnActs::Moe(m) => {
                m.input = None;
                m.mlp.act = None;
            }
        }
        self
    }

    /// This layer's routing, for the load-balancing loss (`None` for a dense layer).
    pub fn routing(&self) -> Option<&O::Routing> {
        match &self.ffn {
            FfnActs::Moe(m) => Some(&m.routing),
            FfnActs::Dense(_) => None,
        }
    }
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

/// Whose rows an MLP runs on: `Dense(m)`, `m` rows through one weight each; `Experts`, the
/// rows in a routing's expert order, each expert's through its own.
enum Rows<'a, O: Ops> {
    Dense(usize),
    Experts(&'a O::Routing),
}

impl<O: Ops> Rows<'_, O> {
    /// `x [rows, k] · wᵀ` ([`Ops::matmul`] or [`Ops::moe_expert_matmul`]).
    fn project(&self, ops: &O, x: &O::Buf, w: &[&O::Buf], (k, n): (usize, usize)) -> O::Buf {
        match self {
            Rows::Dense(m) => ops.matmul(x, w[0], *m, k, n),
            Rows::Experts(r) => ops.moe_expert_matmul(x, w, r, k, n),
        }
    }

    /// The backward of [`Rows::project`]: returns `dx`, accumulates `dw`.
    fn project_backward(
        &self,
        ops: &O,
        (x, w, dy): (&O::Buf, &[&O::Buf], &O::Buf),
        (k, n): (usize, usize),
        dw: &mut [&mut O::Buf],
    ) -> O::Buf {
        match self {
            Rows::Dense(m) => ops.matmul_backward(x, w[0], dy, *m, k, n, dw[0]),
            Rows::Experts(r) => ops.moe_expert_matmul_backward(x, w, dy, r, k, n, dw),
        }
    }

    /// The down projection's backward through the SwiGLU whose output was not kept
    /// ([`Ops::swiglu_down_backward`]): returns `(dgate, dup)`, accumulates `dw`.
    fn swiglu_down_backward(
        &self,
        ops: &O,
        gate_up: (&O::Buf, &O::Buf),
        (w, dy): (&[&O::Buf], &O::Buf),
        (i, d): (usize, usize),
        dw: &mut [&mut O::Buf],
    ) -> (O::Buf, O::Buf) {
        match self {
            Rows::Dense(m) => ops.swiglu_down_backward(gate_up, (w[0], dy), (*m, i, d), dw[0]),
            Rows::Experts(r) => ops.moe_swiglu_down_backward(gate_up, (w, dy), r, (i, d), dw),
        }
    }

    /// [`Rows::project_backward`] with `dx` summed into `acc` (in the GEMM where the rows
    /// are dense: [`Ops::matmul_backward_into`]).
    fn project_backward_into(
        &self,
        ops: &O,
        (x, w, dy): (&O::Buf, &[&O::Buf], &O::Buf),
        (k, n): (usize, usize),
        dw: &mut [&mut O::Buf],
        acc: &mut O::Buf,
    ) {
        match self {
            Rows::Dense(m) => ops.matmul_backward_into(x, w[0], dy, (*m, k, n), dw[0], acc),
            Rows::Experts(r) => {
                let dx = ops.moe_expert_matmul_backward(x, w, dy, r, k, n, dw);
                ops.add_assign(acc, &dx);
            }
        }
    }
}

/// The SwiGLU MLPs `w` (one, or one per expert) on `rows` of `x`.
fn mlp_forward<O: Ops>(
    ops: &O,
    w: &[Expert<O::Buf>],
    x: &O::Buf,
    rows: Rows<O>,
    (d, i): (usize, usize),
) -> (O::Buf, MlpActs<O::Buf>) {
    let pick = |f: fn(&Expert<O::Buf>) -> &O::Buf| w.iter().map(f).collect::<Vec<_>>();
    let gate = rows.project(ops, x, &pick(|e| &e.gate), (d, i));
    let up = rows.project(ops, x, &pick(|e| &e.up), (d, i));
    let act = ops.swiglu(&gate, &up);
    let out = rows.project(ops, &act, &pick(|e| &e.down), (i, d));
    let act = Some(act);
    (out, MlpActs { gate, up, act })
}

#[allow(clippy::too_many_arguments)]
fn mlp_backward<O: Ops>(
    ops: &O,
    w: &[Expert<O::Buf>],
    g: &mut [Expert<O::Buf>],
    x: &O::Buf,
    acts: &MlpActs<O::Buf>,
    dout: &O::Buf,
    rows: Rows<O>,
    (d, i): (usize, usize),
) -> O::Buf {
    let pick = |f: fn(&Expert<O::Buf>) -> &O::Buf| w.iter().map(f).collect::<Vec<_>>();
    let mut down: Vec<_> = g.iter_mut().map(|e| &mut e.down).collect();
    let w_down = pick(|e| &e.down);
    let (dgate, dup) = match &acts.act {
        Some(act) => {
            let dact = rows.project_backward(ops, (act, &w_down, dout), (i, d), &mut down);
            ops.swiglu_backward(&acts.gate, &acts.up, &dact)
        }
        None => {
            let gate_up = (&acts.gate, &acts.up);
            rows.swiglu_down_backward(ops, gate_up, (&w_down, dout), (i, d), &mut down)
        }
    };
    let mut gate: Vec<_> = g.iter_mut().map(|e| &mut e.gate).collect();
    let mut dx = rows.project_backward(ops, (x, &pick(|e| &e.gate), &dgate), (d, i), &mut gate);
    let mut up: Vec<_> = g.iter_mut().map(|e| &mut e.up).collect();
    rows.project_backward_into(ops, (x, &pick(|e| &e.up), &dup), (d, i), &mut up, &mut dx);
    dx
}

/// The shape of a MoE feed-forward: width, expert MLP width, experts, experts per token.
#[derive(Clone, Copy, Debug)]
pub struct MoeShape {
    pub d: usize,
    pub ffn: usize,
    pub experts: usize,
    pub k: usize,
}

fn moe_shape(cfg: &ModelConfig) -> MoeShape {
    let moe = cfg.moe.as_ref().expect("a MoE layer has a MoE config");
    MoeShape {
        d: cfg.hidden_size,
        ffn: cfg.intermediate_size,
        experts: moe.num_experts,
        k: moe.experts_per_token,
    }
}

/// The MoE feed-forward of `t` rows `x [t, d]`: the router, the rows permuted into expert order,
/// each expert's SwiGLU MLP on its contiguous rows, the weighted un-permute.
pub fn moe_forward<O: Ops>(
    ops: &O,
    s: MoeShape,
    router: &O::Buf,
    experts: &[Expert<O::Buf>],
    x: &O::Buf,
    t: usize,
) -> (O::Buf, MoeActs<O>) {
    let logits = ops.matmul(x, router, t, s.d, s.experts);
    let routing = ops.moe_route(&logits, s.experts, s.k);
    let input = ops.moe_permute(x, &routing, false, s.d);
    let (output, mlp) = mlp_forward(ops, experts, &input, Rows::Experts(&routing), (s.d, s.ffn));
    let out = ops.moe_unpermute(&output, &routing, true, s.d);
    let acts = MoeActs {
        routing,
        input: Some(input),
        mlp,
        output,
    };
    (out, acts)
}

/// Returns `dL/dx` of [`moe_forward`] from `dL/dout`; accumulates the router's and the
/// experts' gradients into `grads`.
#[allow(clippy::too_many_arguments)]
pub fn moe_backward<O: Ops>(
    ops: &O,
    s: MoeShape,
    (router, experts): (&O::Buf, &[Expert<O::Buf>]),
    (grouter, gexperts): (&mut O::Buf, &mut [Expert<O::Buf>]),
    (x, t): (&O::Buf, usize),
    a: &MoeActs<O>,
    dy: &O::Buf,
    aux: Option<MoeAux<O::Balance>>,
) -> O::Buf {
    let d = s.d;
    let mut input_recomputed = None;
    let input = kept_or(&a.input, &mut input_recomputed, || {
        ops.moe_permute(x, &a.routing, false, d)
    });
    let dout = ops.moe_permute(dy, &a.routing, true, d);
    let rows = Rows::Experts(&a.routing);
    let dinput = mlp_backward(
        ops,
        experts,
        gexperts,
        input,
        &a.mlp,
        &dout,
        rows,
        (d, s.ffn),
    );
    let mut dx = ops.moe_unpermute(&dinput, &a.routing, false, d);
    let dz = ops.moe_route_backward(&a.routing, &a.output, dy, d, aux);
    ops.matmul_backward_into(x, router, &dz, (t, d, s.experts), grouter, &mut dx);
    dx
}

pub fn forward<O: Ops>(
    ops: &O,
    cfg: &ModelConfig,
    p: &LayerParams<O::Buf>,
    x: &O::Buf,
    layout: &AttentionLayout,
) -> (O::Buf, LayerActs<O>) {
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
) -> (O::Buf, LayerActs<O>) {
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
    let ffn_in = ops.rmsnorm_residual(&mut mid, x, &p.post_norm, d, eps);
    let (ffn_out, ffn) = match &p.ffn {
        FeedForward::Dense(w) => {
            let dense = std::slice::from_ref(w);
            let (out, acts) = mlp_forward(
                ops,
                dense,
                &ffn_in,
                Rows::Dense(t),
                (d, cfg.intermediate_size),
            );
            (out, FfnActs::Dense(acts))
        }
        FeedForward::Moe { router, experts } => {
            let (out, acts) = moe_forward(ops, moe_shape(cfg), router, experts, &ffn_in, t);
            (out, FfnActs::Moe(acts))
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
    acts: &LayerActs<O>,
    dy: &O::Buf,
    layout: &AttentionLayout,
    aux: Option<MoeAux<O::Balance>>,
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
            let (w, gw) = (std::slice::from_ref(w), std::slice::from_mut(gw));
            mlp_backward(
                ops,
                w,
                gw,
                ffn_in,
                a,
                dy,
                Rows::Dense(t),
                (d, cfg.intermediate_size),
            )
        }
        (
            FeedForward::Moe { router, experts },
            FeedForward::Moe {
                router: grouter,
                experts: gexperts,
            },
            FfnActs::Moe(a),
        ) => {
            let grads = (grouter, gexperts.as_mut_slice());
            let shape = moe_shape(cfg);
            moe_backward(
                ops,
                shape,
                (router, experts),
                grads,
                (ffn_in, t),
                a,
                dy,
                aux,
            )
        }
        _ => unreachable!("parameters, gradients and activations share one layer structure"),
    };
    let dmid = ops.rmsnorm_backward(
        &acts.mid,
        &p.post_norm,
        &dffn_in,
        Some(dy),
        d,
        eps,
        &mut g.post_norm,
    );

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
    ops.matmul_backward_into(normed, &p.k, &dk, (t, d, kvw), &mut g.k, &mut dnormed);
    ops.matmul_backward_into(normed, &p.v, &dv, (t, d, kvw), &mut g.v, &mut dnormed);
    ops.rmsnorm_backward(
        x,
        &p.input_norm,
        &dnormed,
        Some(&dmid),
        d,
        eps,
        &mut g.input_norm,
    )
}
