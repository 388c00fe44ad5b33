//! The operations a training step needs, each with its backward, behind one trait that every
//! backend implements. The model (`crate::model`) is written once against it.
//!
//! Conventions: tensors are row-major; a "row" is one token. Weights are `[out, in]` as in
//! the checkpoints, so a projection is `y = x · Wᵀ`. Backward functions return the input
//! gradient and *accumulate* weight gradients into the buffers they are given.

pub mod cpu;
pub mod cuda;
pub mod moe;
pub mod optimizer;
pub mod storage;

/// Which keys each token of a packed stream may attend to (docs/architecture.md §7).
///
/// Token `t` sees keys in `[context_start[t], context_end[t])` (its group's prompt, empty for
/// prompt tokens) and in `[own_start[t], t]` (its own segment up to itself), restricted to
/// `positions[t] - window < positions[key]` when a sliding window is set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttentionLayout {
    pub positions: Vec<u32>,
    pub context_start: Vec<u32>,
    pub context_end: Vec<u32>,
    pub own_start: Vec<u32>,
    pub window: Option<usize>,
}

impl AttentionLayout {
    /// One plain causal sequence of `len` tokens at positions `0..len`.
    pub fn causal(len: usize, window: Option<usize>) -> Self {
        AttentionLayout {
            positions: (0..len as u32).collect(),
            context_start: vec![0; len],
            context_end: vec![0; len],
            own_start: vec![0; len],
            window,
        }
    }

    pub fn len(&self) -> usize {
        self.positions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.positions.is_empty()
    }

    /// Appends a segment of `len` tokens at positions `first_pos..` that sees its own tokens
    /// up to itself and, before them, the keys `context.0..context.1` (a group's prompt).
    fn push_segment(&mut self, len: usize, first_pos: u32, context: (u32, u32)) {
        let own_start = self.len() as u32;
        for i in 0..len as u32 {
            self.positions.push(first_pos + i);
            self.context_start.push(context.0);
            self.context_end.push(context.1);
            self.own_start.push(own_start);
        }
    }

    /// Appends a packed group: its prompt of `prompt` tokens once, causal, then responses of
    /// these lengths, each seeing the prompt and itself, at positions after the prompt's.
    pub fn push_group(&mut self, prompt: usize, responses: impl IntoIterator<Item = usize>) {
        let prompt_start = self.len() as u32;
        self.push_segment(prompt, 0, (prompt_start, prompt_start));
        let prompt_end = self.len() as u32;
        for response in responses {
            self.push_segment(response, prompt as u32, (prompt_start, prompt_end));
        }
    }

    /// The layout of packed groups of these `(prompt, [response, ...])` lengths.
    pub fn packed(groups: &[(usize, Vec<usize>)], window: Option<usize>) -> Self {
        let mut layout = AttentionLayout {
            window,
            ..Default::default()
        };
        for (prompt, responses) in groups {
            layout.push_group(*prompt, responses.iter().copied());
        }
        layout
    }

    /// The keys token `t` attends to, in increasing order.
    pub fn keys(&self, t: usize) -> impl Iterator<Item = usize> + '_ {
        let ctx = self.context_start[t] as usize..self.context_end[t] as usize;
        let own = self.own_start[t] as usize..t + 1;
        let pos = self.positions[t] as usize;
        let window = self.window;
        let positions = &self.positions;
        ctx.chain(own).filter(move |&k| match window {
            Some(w) => positions[k] as usize + w > pos,
            None => true,
        })
    }
}

/// Shapes of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionShape {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// Per-row scaling for row gathers and scatters (MoE dispatch and combine).
pub type RowScale<'a> = Option<&'a [f32]>;

/// The load-balancing term of a MoE layer's router backward: `coef · d aux / d p`, with the
/// sums of the whole pass (`balance`) and the batch's row weights (docs/model.md §4).
pub struct MoeAux<'a, B> {
    pub balance: &'a B,
    pub coef: f64,
    pub row_weights: &'a [f64],
}

/// A batch's host lists, which a backend may make resident ahead of the pass that reads
/// them ([`Ops::stage`]).
pub struct BatchLists<'a> {
    pub tokens: &'a [u32],
    pub layout: &'a AttentionLayout,
    pub prediction_rows: &'a [u32],
    pub targets: &'a [u32],
    pub responses: &'a [ResponseSpan],
    /// The load-balancing loss's row weights (a MoE model's), or none.
    pub row_weights: &'a [f64],
    /// Lists the caller hands to the backend later in the pass (the loss's inputs).
    pub extra: &'a [ExtraList<'a>],
}

/// A list of [`BatchLists::extra`].
pub enum ExtraList<'a> {
    I32(&'a [i32]),
    F64(&'a [f64]),
}

pub trait Ops {
    /// A tensor on this backend (f32 values as seen from the host).
    type Buf;
    /// One MoE layer's routing on this backend: the router's probabilities, each token's
    /// top-k experts and renormalized weights, and the `T·k` (token, slot) rows grouped by
    /// expert (expert order; token order within an expert).
    type Routing;
    /// The load-balancing loss's running sums over a pass's layers and weighted rows.
    type Balance;
    /// Three f64 per response on this backend: the statistics `(S, A, E)` of
    /// [`Ops::response_scores`] (E is NaN without an EOS), or their gradients.
    type Table;

    /// The first failure of the backend since the last call (a device can fail; the CPU
    /// cannot). Operations after a failure return zeros, so results are only valid once this
    /// says so.
    fn check(&self) -> anyhow::Result<()> {
        Ok(())
    }

    /// What this backend stores uploads and op outputs in.
    fn storage(&self) -> storage::Dtype {
        storage::Dtype::F32
    }

    /// Refuses a mixture of experts of `experts` experts, top-`k`, that this backend cannot
    /// route (the CPU routes any).
    fn check_moe(&self, _experts: usize, _k: usize) -> anyhow::Result<()> {
        Ok(())
    }

    /// Makes a batch's host lists resident ahead of its pass, where the backend keeps them
    /// apart from the host (a device: in one copy); the ops given them later find them there.
    /// The CPU has nothing to do.
    fn stage(&self, _lists: &BatchLists) {}

    fn upload(&self, data: &[f32]) -> Self::Buf;
    fn download(&self, buf: &Self::Buf) -> Vec<f32>;
    fn zeros(&self, len: usize) -> Self::Buf;

    /// `acc += x`.
    fn add_assign(&self, acc: &mut Self::Buf, x: &Self::Buf);

    /// Rows `ids` of `table [V, d]`.
    fn embedding(&self, table: &Self::Buf, ids: &[u32], d: usize) -> Self::Buf;
    /// `dtable[ids[t]] += dout[t]`.
    fn embedding_backward(&self, dtable: &mut Self::Buf, dout: &Self::Buf, ids: &[u32], d: usize);

    /// `y = w * x / sqrt(mean(x²) + eps)` per row of width `d`.
    fn rmsnorm(&self, x: &Self::Buf, w: &Self::Buf, d: usize, eps: f64) -> Self::Buf;
    /// `x += residual` (stored as `x` is), then [`Ops::rmsnorm`] of that sum: a pre-norm
    /// block's residual add and the norm after it, which a device fuses into one pass.
    fn rmsnorm_residual(
        &self,
        x: &mut Self::Buf,
        residual: &Self::Buf,
        w: &Self::Buf,
        d: usize,
        eps: f64,
    ) -> Self::Buf {
        self.add_assign(x, residual);
        self.rmsnorm(x, w, d, eps)
    }
    /// Returns `dx`, plus `dx_in` when given (the gradient that reaches `x` by the residual
    /// stream, added before the one rounding to storage); accumulates `dw`.
    #[allow(clippy::too_many_arguments)]
    fn rmsnorm_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        dx_in: Option<&Self::Buf>,
        d: usize,
        eps: f64,
        dw: &mut Self::Buf,
    ) -> Self::Buf;

    /// `y [m, n] = x [m, k] · w [n, k]ᵀ`.
    fn matmul(&self, x: &Self::Buf, w: &Self::Buf, m: usize, k: usize, n: usize) -> Self::Buf;
    /// Returns `dx = dy · w`; accumulates `dw += dyᵀ · x`.
    #[allow(clippy::too_many_arguments)]
    fn matmul_backward(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        m: usize,
        k: usize,
        n: usize,
        dw: &mut Self::Buf,
    ) -> Self::Buf;
    /// [`Ops::matmul_backward`] with `dx` summed into `acc`: `acc += dy · w` (`shape` is
    /// `(m, k, n)`), rounded once to `acc`'s type. For a projection whose input also feeds
    /// others (q, k and v; gate and up; the router), whose input gradients a device sums in
    /// the GEMM (`beta = 1`) instead of in a pass of its own over a temporary.
    fn matmul_backward_into(
        &self,
        x: &Self::Buf,
        w: &Self::Buf,
        dy: &Self::Buf,
        shape: (usize, usize, usize),
        dw: &mut Self::Buf,
        acc: &mut Self::Buf,
    );

    /// Rotates every head of `x [T, heads * head_dim]` in place by its token's position
    /// (half-split RoPE); `inverse` rotates back, which is the backward.
    fn rope(
        &self,
        x: &mut Self::Buf,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    );

    /// Returns `(out [T, heads * hd], lse [T, heads])`, scale `1/sqrt(hd)`.
    fn attention(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Self::Buf, Self::Buf);
    /// Returns `(dq, dk, dv)`.
    #[allow(clippy::too_many_arguments)]
    fn attention_backward(
        &self,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        out: &Self::Buf,
        lse: &Self::Buf,
        dout: &Self::Buf,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Self::Buf, Self::Buf, Self::Buf);

    /// `silu(gate) * up`.
    fn swiglu(&self, gate: &Self::Buf, up: &Self::Buf) -> Self::Buf;
    /// Returns `(dgate, dup)`.
    fn swiglu_backward(
        &self,
        gate: &Self::Buf,
        up: &Self::Buf,
        dy: &Self::Buf,
    ) -> (Self::Buf, Self::Buf);
    /// The backward of the down projection `y [m, d] = swiglu(gate, up) · w [d, i]ᵀ` and of
    /// the SwiGLU before it, when the SwiGLU's output was not kept: returns `(dgate, dup)`,
    /// accumulates `dw += dyᵀ · swiglu(gate, up)`. The same numbers as recomputing the
    /// output, [`Ops::matmul_backward`] and [`Ops::swiglu_backward`]; a device takes `dy · w`
    /// first and then writes the output again in the SwiGLU's backward pass, which reads gate
    /// and up anyway.
    fn swiglu_down_backward(
        &self,
        (gate, up): (&Self::Buf, &Self::Buf),
        (w, dy): (&Self::Buf, &Self::Buf),
        (m, i, d): (usize, usize, usize),
        dw: &mut Self::Buf,
    ) -> (Self::Buf, Self::Buf) {
        let act = self.swiglu(gate, up);
        let dact = self.matmul_backward(&act, w, dy, m, i, d, dw);
        self.swiglu_backward(gate, up, &dact)
    }

    /// `out[i] = scale[i] * x[rows[i]]`.
    fn gather_rows(&self, x: &Self::Buf, rows: &[u32], scale: RowScale, d: usize) -> Self::Buf;
    /// `dst[rows[i]] += scale[i] * src[i]`.
    fn scatter_add_rows(
        &self,
        dst: &mut Self::Buf,
        src: &Self::Buf,
        rows: &[u32],
        scale: RowScale,
        d: usize,
    );
    /// Rows `start..start + len` of `x [_, d]`, a tensor of their own.
    fn rows(&self, x: &Self::Buf, start: usize, len: usize, d: usize) -> Self::Buf;
    /// `parts` one after another.
    fn concat(&self, parts: &[Self::Buf]) -> Self::Buf;

    /// Routes `T` tokens by their router logits `[T, experts]`: softmax, the top `k` by
    /// decreasing probability (ties: the lower index), weights renormalized over them.
    fn moe_route(&self, logits: &Self::Buf, experts: usize, k: usize) -> Self::Routing;
    /// The experts' projection of the `T·k` rows in expert order: `y [T k, n]`, each
    /// expert's rows of `x [T k, k_in]` times its own `w[e] [n, k_in]`ᵀ. How many rows each
    /// expert has stays with the backend (a device reads it there).
    fn moe_expert_matmul(
        &self,
        x: &Self::Buf,
        w: &[&Self::Buf],
        routing: &Self::Routing,
        k_in: usize,
        n: usize,
    ) -> Self::Buf;
    /// Returns `dx = dy · w[e]` on each expert's rows; accumulates `dw[e] += dy_eᵀ · x_e`
    /// (an expert without rows keeps its gradient).
    #[allow(clippy::too_many_arguments)]
    fn moe_expert_matmul_backward(
        &self,
        x: &Self::Buf,
        w: &[&Self::Buf],
        dy: &Self::Buf,
        routing: &Self::Routing,
        k_in: usize,
        n: usize,
        dw: &mut [&mut Self::Buf],
    ) -> Self::Buf;
    /// [`Ops::swiglu_down_backward`] on each expert's rows (expert order), through its own
    /// down projection `w[e] [d, i]`.
    fn moe_swiglu_down_backward(
        &self,
        (gate, up): (&Self::Buf, &Self::Buf),
        (w, dy): (&[&Self::Buf], &Self::Buf),
        routing: &Self::Routing,
        (i, d): (usize, usize),
        dw: &mut [&mut Self::Buf],
    ) -> (Self::Buf, Self::Buf) {
        let act = self.swiglu(gate, up);
        let dact = self.moe_expert_matmul_backward(&act, w, dy, routing, i, d, dw);
        self.swiglu_backward(gate, up, &dact)
    }
    /// `x [T, d]`'s rows in expert order, `[T k, d]`; with `weighted`, each scaled by its
    /// slot's routing weight (the combine's backward).
    fn moe_permute(
        &self,
        x: &Self::Buf,
        routing: &Self::Routing,
        weighted: bool,
        d: usize,
    ) -> Self::Buf;
    /// The inverse: `out[t] = Σ_j s_tj · y[row of slot (t, j)]` over `t`'s slots in expert
    /// order, `s` the routing weight when `weighted` (the combine), else 1 (the dispatch's
    /// backward).
    fn moe_unpermute(
        &self,
        y: &Self::Buf,
        routing: &Self::Routing,
        weighted: bool,
        d: usize,
    ) -> Self::Buf;
    /// `dL/dz [T, E]` into the router logits from the experts' outputs `y` (expert order) and
    /// the combine's `dout [T, d]` (`dL/dweight` of a slot is `dout[t] · y[row]`), through the
    /// renormalized top-k softmax, plus the load-balancing term.
    fn moe_route_backward(
        &self,
        routing: &Self::Routing,
        y: &Self::Buf,
        dout: &Self::Buf,
        d: usize,
        aux: Option<MoeAux<Self::Balance>>,
    ) -> Self::Buf;
    /// Empty load-balancing sums over `experts`.
    fn moe_balance(&self, experts: usize) -> Self::Balance;
    /// Adds one layer's routing, each row weighted (a prompt row counts K times).
    fn moe_balance_add(
        &self,
        balance: &mut Self::Balance,
        routing: &Self::Routing,
        row_weights: &[f64],
    );
    /// `aux = E · Σ_e f_e P_e` (a logged scalar).
    fn moe_balance_loss(&self, balance: &Self::Balance) -> f64;

    /// Fused LM head + log-softmax, summarized per response: for each row `i` of `h [P, d]`
    /// the log-probability of `targets[i]` under `softmax(h[i] · headᵀ)`, reduced over each
    /// span into a [`Self::Table`] of `(S, A, E)`; and each row's log-sum-exp, for the
    /// backward. Never holds more than one chunk of logits, and the per-row values stay on
    /// the backend.
    fn response_scores(
        &self,
        h: &Self::Buf,
        head: &Self::Buf,
        targets: &[u32],
        spans: &[ResponseSpan],
        d: usize,
        vocab: usize,
    ) -> (Self::Table, Self::Buf);
    /// From `grads`, the table of `(dL/dS, dL/dA, dL/dE)` per span, times `scale`: returns
    /// `dh` and accumulates `dhead`.
    #[allow(clippy::too_many_arguments)]
    fn response_scores_backward(
        &self,
        h: &Self::Buf,
        head: &Self::Buf,
        targets: &[u32],
        lse: &Self::Buf,
        spans: &[ResponseSpan],
        grads: &Self::Table,
        scale: f64,
        d: usize,
        vocab: usize,
        dhead: &mut Self::Buf,
    ) -> Self::Buf;
    /// A table's values on the host, three per response.
    fn table_to_host(&self, table: &Self::Table) -> Vec<f64>;
}

/// Where one response's log-probs live among a batch's predictions.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResponseSpan {
    pub group: usize,
    /// Range into the batch's prediction rows and targets, one per response token.
    pub first: usize,
    pub len: usize,
    pub ends_with_eos: bool,
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

impl ResponseStats {
    /// The statistics of `spans` from their `(S, A, E)` table ([`Ops::response_scores`]).
    pub fn from_table(spans: &[ResponseSpan], table: &[f64]) -> Vec<ResponseStats> {
        spans
            .iter()
            .zip(table.chunks_exact(3))
            .map(|(span, row)| ResponseStats {
                logp_sum: row[0],
                tokens: span.len,
                logp_mean: row[1],
                eos_logp: span.ends_with_eos.then_some(row[2]),
            })
            .collect()
    }
}

/// The `(S, A, E)` table of `spans` from per-row log-probs, in f64 (E is NaN without an EOS).
pub fn span_table(spans: &[ResponseSpan], logp: &[f64]) -> Vec<f64> {
    let mut table = Vec::with_capacity(3 * spans.len());
    for r in spans {
        let lp = &logp[r.first..r.first + r.len];
        let sum: f64 = lp.iter().sum();
        let eos = if r.ends_with_eos {
            lp[r.len - 1]
        } else {
            f64::NAN
        };
        table.extend([sum, sum / r.len as f64, eos]);
    }
    table
}

/// `scale · dL/dlogp_t = scale · (dL/dS_i + dL/dA_i / n_i + [t is the final EOS] dL/dE_i)`
/// (docs/losses.md §1) for each of `rows` prediction rows, from the `(dL/dS, dL/dA, dL/dE)`
/// table `grads`; rows of no response get 0.
pub fn row_grads(spans: &[ResponseSpan], rows: usize, grads: &[f64], scale: f64) -> Vec<f64> {
    let mut out = vec![0f64; rows];
    for (r, g) in spans.iter().zip(grads.chunks_exact(3)) {
        let per_token = g[0] + g[1] / r.len as f64;
        out[r.first..r.first + r.len]
            .iter_mut()
            .for_each(|x| *x = per_token);
        if r.ends_with_eos {
            out[r.first + r.len - 1] += g[2];
        }
    }
    out.iter_mut().for_each(|x| *x *= scale);
    out
}
