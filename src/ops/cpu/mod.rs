//! The reference backend: plain Rust on f32 storage with f64 accumulation, parallel with
//! rayon where that is free. Every other backend is tested against it.

mod attention;
mod elementwise;
pub mod linalg;
mod rounded;
pub mod scoring;

use super::moe::{route, LoadBalance, Routing};
use super::{
    row_grads, span_table, AttentionLayout, AttentionShape, MoeAux, Ops, ResponseSpan, RowScale,
};

/// Attention over a KV cache, which the ops trait does not model (generation only runs here).
pub use attention::attention_over;
pub use rounded::{RoundedCpuOps, Stored};

#[derive(Clone, Copy, Debug, Default)]
pub struct CpuOps;

/// A routing with its expert order (`Routing::expert_order`) kept for the row moves.
#[derive(Clone, Debug)]
pub struct CpuRouting {
    pub routing: Routing,
    /// The slot of each row in expert order.
    pub order: Vec<usize>,
}

impl CpuRouting {
    /// The token of each row in expert order.
    fn tokens(&self) -> Vec<u32> {
        let k = self.routing.k;
        self.order.iter().map(|&slot| (slot / k) as u32).collect()
    }

    /// The routing weight of each row in expert order, as f32 (what scales the rows).
    fn weights(&self) -> Vec<f32> {
        let w = &self.routing.weights;
        self.order.iter().map(|&slot| w[slot] as f32).collect()
    }
}

/// [`Ops::moe_expert_matmul`] as the CPU runs it, on any ops whose routing it can count:
/// one projection per expert on its contiguous rows (`rows[e]` of them), one after another.
pub fn expert_matmul<O: Ops>(
    ops: &O,
    rows: &[usize],
    x: &O::Buf,
    w: &[&O::Buf],
    (k_in, n): (usize, usize),
) -> O::Buf {
    let mut outputs = Vec::with_capacity(w.len());
    let mut start = 0;
    for (&w, &m) in w.iter().zip(rows) {
        if m > 0 {
            outputs.push(ops.matmul(&ops.rows(x, start, m, k_in), w, m, k_in, n));
        }
        start += m;
    }
    ops.concat(&outputs)
}

/// [`Ops::moe_expert_matmul_backward`] as the CPU runs it (see [`expert_matmul`]).
pub fn expert_matmul_backward<O: Ops>(
    ops: &O,
    rows: &[usize],
    (x, w, dy): (&O::Buf, &[&O::Buf], &O::Buf),
    (k_in, n): (usize, usize),
    dw: &mut [&mut O::Buf],
) -> O::Buf {
    let mut dxs = Vec::with_capacity(w.len());
    let mut start = 0;
    for ((&w, dw), &m) in w.iter().zip(dw.iter_mut()).zip(rows) {
        if m > 0 {
            let (x, dy) = (ops.rows(x, start, m, k_in), ops.rows(dy, start, m, n));
            dxs.push(ops.matmul_backward(&x, w, &dy, m, k_in, n, dw));
        }
        start += m;
    }
    ops.concat(&dxs)
}

impl Ops for CpuOps {
    type Buf = Vec<f32>;
    type Routing = CpuRouting;
    type Balance = LoadBalance;
    type Table = Vec<f64>;

    fn upload(&self, data: &[f32]) -> Vec<f32> {
        data.to_vec()
    }

    fn download(&self, buf: &Vec<f32>) -> Vec<f32> {
        buf.clone()
    }

    fn zeros(&self, len: usize) -> Vec<f32> {
        vec![0.0; len]
    }

    fn add_assign(&self, acc: &mut Vec<f32>, x: &Vec<f32>) {
        for (a, b) in acc.iter_mut().zip(x) {
            *a += b;
        }
    }

    fn embedding(&self, table: &Vec<f32>, ids: &[u32], d: usize) -> Vec<f32> {
        elementwise::gather_rows(table, ids, None, d)
    }

    fn embedding_backward(&self, dtable: &mut Vec<f32>, dout: &Vec<f32>, ids: &[u32], d: usize) {
        elementwise::scatter_add_rows(dtable, dout, ids, None, d)
    }

    fn rmsnorm(&self, x: &Vec<f32>, w: &Vec<f32>, d: usize, eps: f64) -> Vec<f32> {
        elementwise::rmsnorm(x, w, d, eps)
    }

    fn rmsnorm_backward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        dx_in: Option<&Vec<f32>>,
        d: usize,
        eps: f64,
        dw: &mut Vec<f32>,
    ) -> Vec<f32> {
        let mut dx = elementwise::rmsnorm_backward(x, w, dy, d, eps, dw);
        if let Some(dx_in) = dx_in {
            self.add_assign(&mut dx, dx_in);
        }
        dx
    }

    fn matmul(&self, x: &Vec<f32>, w: &Vec<f32>, m: usize, k: usize, n: usize) -> Vec<f32> {
        linalg::matmul_nt(x, w, m, k, n)
    }

    fn matmul_backward(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        m: usize,
        k: usize,
        n: usize,
        dw: &mut Vec<f32>,
    ) -> Vec<f32> {
        let mut dx = vec![0f32; m * k];
        self.matmul_backward_into(x, w, dy, (m, k, n), dw, &mut dx);
        dx
    }

    fn matmul_backward_into(
        &self,
        x: &Vec<f32>,
        w: &Vec<f32>,
        dy: &Vec<f32>,
        (m, k, n): (usize, usize, usize),
        dw: &mut Vec<f32>,
        acc: &mut Vec<f32>,
    ) {
        linalg::matmul_tn_acc(dy, x, m, k, n, dw);
        linalg::matmul_nn_acc(dy, w, m, k, n, acc);
    }

    fn rope(
        &self,
        x: &mut Vec<f32>,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) {
        elementwise::rope(x, positions, heads, head_dim, theta, inverse)
    }

    fn attention(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Vec<f32>, Vec<f32>) {
        attention::attention(q, k, v, layout, shape, None)
    }

    fn attention_backward(
        &self,
        q: &Vec<f32>,
        k: &Vec<f32>,
        v: &Vec<f32>,
        out: &Vec<f32>,
        lse: &Vec<f32>,
        dout: &Vec<f32>,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        attention::attention_backward(q, k, v, out, lse, dout, layout, shape, None)
    }

    fn swiglu(&self, gate: &Vec<f32>, up: &Vec<f32>) -> Vec<f32> {
        elementwise::swiglu(gate, up)
    }

    fn swiglu_backward(
        &self,
        gate: &Vec<f32>,
        up: &Vec<f32>,
        dy: &Vec<f32>,
    ) -> (Vec<f32>, Vec<f32>) {
        elementwise::swiglu_backward(gate, up, dy)
    }

    fn gather_rows(&self, x: &Vec<f32>, rows: &[u32], scale: RowScale, d: usize) -> Vec<f32> {
        elementwise::gather_rows(x, rows, scale, d)
    }

    fn scatter_add_rows(
        &self,
        dst: &mut Vec<f32>,
        src: &Vec<f32>,
        rows: &[u32],
        scale: RowScale,
        d: usize,
    ) {
        elementwise::scatter_add_rows(dst, src, rows, scale, d)
    }

    fn rows(&self, x: &Vec<f32>, start: usize, len: usize, d: usize) -> Vec<f32> {
        x[start * d..(start + len) * d].to_vec()
    }

    fn concat(&self, parts: &[Vec<f32>]) -> Vec<f32> {
        parts.concat()
    }

    fn moe_route(&self, logits: &Vec<f32>, experts: usize, k: usize) -> CpuRouting {
        let routing = route(logits, experts, k);
        let order = routing.expert_order();
        CpuRouting { routing, order }
    }

    fn moe_expert_matmul(
        &self,
        x: &Vec<f32>,
        w: &[&Vec<f32>],
        routing: &CpuRouting,
        k_in: usize,
        n: usize,
    ) -> Vec<f32> {
        expert_matmul(self, &routing.routing.expert_rows(), x, w, (k_in, n))
    }

    fn moe_expert_matmul_backward(
        &self,
        x: &Vec<f32>,
        w: &[&Vec<f32>],
        dy: &Vec<f32>,
        routing: &CpuRouting,
        k_in: usize,
        n: usize,
        dw: &mut [&mut Vec<f32>],
    ) -> Vec<f32> {
        let rows = routing.routing.expert_rows();
        expert_matmul_backward(self, &rows, (x, w, dy), (k_in, n), dw)
    }

    fn moe_permute(&self, x: &Vec<f32>, r: &CpuRouting, weighted: bool, d: usize) -> Vec<f32> {
        let weights = weighted.then(|| r.weights());
        elementwise::gather_rows(x, &r.tokens(), weights.as_deref(), d)
    }

    fn moe_unpermute(&self, y: &Vec<f32>, r: &CpuRouting, weighted: bool, d: usize) -> Vec<f32> {
        let weights = weighted.then(|| r.weights());
        let mut out = vec![0f32; r.routing.tokens() * d];
        // Row by row in expert order: each token's contributions add up in expert order.
        elementwise::scatter_add_rows(&mut out, y, &r.tokens(), weights.as_deref(), d);
        out
    }

    fn moe_route_backward(
        &self,
        r: &CpuRouting,
        y: &Vec<f32>,
        dout: &Vec<f32>,
        d: usize,
        aux: Option<MoeAux<LoadBalance>>,
    ) -> Vec<f32> {
        let k = r.routing.k;
        let mut d_weights = vec![0f64; r.order.len()];
        for (row, &slot) in r.order.iter().enumerate() {
            let t = slot / k;
            d_weights[slot] = linalg::dot(&dout[t * d..(t + 1) * d], &y[row * d..(row + 1) * d]);
        }
        let direct = aux.map(|a| a.balance.prob_grad(a.coef, a.row_weights));
        r.routing.backward(&d_weights, direct.as_deref())
    }

    fn moe_balance(&self, experts: usize) -> LoadBalance {
        LoadBalance::new(experts)
    }

    fn moe_balance_add(&self, balance: &mut LoadBalance, r: &CpuRouting, row_weights: &[f64]) {
        balance.add_layer(&r.routing, row_weights)
    }

    fn moe_balance_loss(&self, balance: &LoadBalance) -> f64 {
        balance.loss()
    }

    fn response_scores(
        &self,
        h: &Vec<f32>,
        head: &Vec<f32>,
        targets: &[u32],
        spans: &[ResponseSpan],
        d: usize,
        vocab: usize,
    ) -> (Vec<f64>, Vec<f32>) {
        let (logp, lse) = scoring::token_logprobs(h, head, targets, d, vocab);
        (span_table(spans, &logp), lse)
    }

    fn response_scores_backward(
        &self,
        h: &Vec<f32>,
        head: &Vec<f32>,
        targets: &[u32],
        lse: &Vec<f32>,
        spans: &[ResponseSpan],
        grads: &Vec<f64>,
        scale: f64,
        d: usize,
        vocab: usize,
        dhead: &mut Vec<f32>,
    ) -> Vec<f32> {
        let dlogp = row_grads(spans, targets.len(), grads, scale);
        scoring::token_logprobs_backward(h, head, targets, lse, &dlogp, d, vocab, dhead)
    }

    fn table_to_host(&self, table: &Vec<f64>) -> Vec<f64> {
        table.clone()
    }
}
