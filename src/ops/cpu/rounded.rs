//! The CPU reference's bf16-rounding mode (docs/numerics.md §1): [`CpuOps`]'s arithmetic,
//! with every value rounded to the storage type exactly where the device ops
//! (`ops::cuda::ops::DeviceOps`) store it, so that a bf16 device pass can be compared with
//! the CPU like for like. The rule is the device's, tensor for tensor: uploads and fresh op
//! outputs are stored in the storage type except the fp32 statistics (log-sum-exps) and
//! `zeros` (f32 accumulators); an op that accumulates into a tensor keeps its type; an input
//! stored otherwise is rounded to the storage type first; the scoring's logits chunk and its
//! gradient are stored in the storage type, and so are the bf16 attention kernel's
//! probabilities (with its online softmax's running maximum over key tiles).

use super::attention::{self, ProbabilityRounding};
use super::scoring::{self, Rounding};
use super::{expert_matmul, expert_matmul_backward, CpuOps, CpuRouting};
use crate::ops::moe::LoadBalance;
use crate::ops::storage::Dtype;
use crate::ops::{
    row_grads, span_table, AttentionLayout, AttentionShape, MoeAux, Ops, ResponseSpan, RowScale,
};
use std::borrow::Cow;

/// A CPU tensor with the type it stands for: its values are representable in `dtype`.
#[derive(Clone, Debug, PartialEq)]
pub struct Stored {
    pub values: Vec<f32>,
    pub dtype: Dtype,
}

/// [`CpuOps`] rounding to `storage` where the device stores it.
#[derive(Clone, Copy, Debug)]
pub struct RoundedCpuOps {
    pub storage: Dtype,
}

impl RoundedCpuOps {
    pub fn new(storage: Dtype) -> Self {
        RoundedCpuOps { storage }
    }

    /// A fresh output, stored in the storage type.
    fn output(&self, mut values: Vec<f32>) -> Stored {
        self.storage.round_all(&mut values);
        Stored {
            values,
            dtype: self.storage,
        }
    }

    /// A statistic or accumulator: f32.
    fn f32(values: Vec<f32>) -> Stored {
        Stored {
            values,
            dtype: Dtype::F32,
        }
    }

    /// `t` as an input of an op running at the storage type (a `Vec`, which [`CpuOps`]'s
    /// methods take).
    #[allow(clippy::owned_cow)]
    fn input<'t>(&self, t: &'t Stored) -> Cow<'t, Vec<f32>> {
        if t.dtype == self.storage {
            Cow::Borrowed(&t.values)
        } else {
            let mut values = t.values.clone();
            self.storage.round_all(&mut values);
            Cow::Owned(values)
        }
    }

    /// A value the device keeps in the storage type inside a fused kernel (the scoring's
    /// logits chunk and its gradient, attention's probabilities).
    fn stored_rounding(&self) -> impl Fn(f64) -> f64 + Sync {
        let storage = self.storage;
        move |z| match storage {
            Dtype::F32 => z,
            Dtype::Bf16 => storage.round(z as f32) as f64,
        }
    }
}

/// The bf16 attention kernel's tiles, and its rounding of the probabilities; none for f32.
fn probability_rounding(storage: Dtype, round: Rounding) -> Option<ProbabilityRounding> {
    (storage == Dtype::Bf16).then_some(ProbabilityRounding {
        tile: crate::ops::cuda::attention::tile_rows::<half::bf16>(),
        round,
    })
}

/// `t` after an in-place update: rounded back to its own type.
fn keep_type(t: &mut Stored) {
    t.dtype.round_all(&mut t.values);
}

impl Ops for RoundedCpuOps {
    type Buf = Stored;
    type Routing = CpuRouting;
    type Balance = LoadBalance;
    type Table = Vec<f64>;

    fn storage(&self) -> Dtype {
        self.storage
    }

    fn upload(&self, data: &[f32]) -> Stored {
        self.output(data.to_vec())
    }

    fn download(&self, buf: &Stored) -> Vec<f32> {
        buf.values.clone()
    }

    fn zeros(&self, len: usize) -> Stored {
        Self::f32(vec![0.0; len])
    }

    fn add_assign(&self, acc: &mut Stored, x: &Stored) {
        CpuOps.add_assign(&mut acc.values, &x.values);
        keep_type(acc);
    }

    fn embedding(&self, table: &Stored, ids: &[u32], d: usize) -> Stored {
        self.output(CpuOps.embedding(&self.input(table), ids, d))
    }

    fn embedding_backward(&self, dtable: &mut Stored, dout: &Stored, ids: &[u32], d: usize) {
        CpuOps.embedding_backward(&mut dtable.values, &self.input(dout), ids, d);
        keep_type(dtable);
    }

    fn rmsnorm(&self, x: &Stored, w: &Stored, d: usize, eps: f64) -> Stored {
        self.output(CpuOps.rmsnorm(&self.input(x), &self.input(w), d, eps))
    }

    fn rmsnorm_backward(
        &self,
        x: &Stored,
        w: &Stored,
        dy: &Stored,
        dx_in: Option<&Stored>,
        d: usize,
        eps: f64,
        dw: &mut Stored,
    ) -> Stored {
        let dx_in = dx_in.map(|a| self.input(a));
        let dx = CpuOps.rmsnorm_backward(
            &self.input(x),
            &self.input(w),
            &self.input(dy),
            dx_in.as_deref(),
            d,
            eps,
            &mut dw.values,
        );
        keep_type(dw);
        self.output(dx)
    }

    fn matmul(&self, x: &Stored, w: &Stored, m: usize, k: usize, n: usize) -> Stored {
        self.output(CpuOps.matmul(&self.input(x), &self.input(w), m, k, n))
    }

    fn matmul_backward(
        &self,
        x: &Stored,
        w: &Stored,
        dy: &Stored,
        m: usize,
        k: usize,
        n: usize,
        dw: &mut Stored,
    ) -> Stored {
        let dx = CpuOps.matmul_backward(
            &self.input(x),
            &self.input(w),
            &self.input(dy),
            m,
            k,
            n,
            &mut dw.values,
        );
        keep_type(dw);
        self.output(dx)
    }

    fn matmul_backward_into(
        &self,
        x: &Stored,
        w: &Stored,
        dy: &Stored,
        shape: (usize, usize, usize),
        dw: &mut Stored,
        acc: &mut Stored,
    ) {
        CpuOps.matmul_backward_into(
            &self.input(x),
            &self.input(w),
            &self.input(dy),
            shape,
            &mut dw.values,
            &mut acc.values,
        );
        keep_type(dw);
        keep_type(acc);
    }

    fn rope(
        &self,
        x: &mut Stored,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) {
        CpuOps.rope(&mut x.values, positions, heads, head_dim, theta, inverse);
        keep_type(x);
    }

    fn attention(
        &self,
        q: &Stored,
        k: &Stored,
        v: &Stored,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Stored, Stored) {
        let round = self.stored_rounding();
        let (out, lse) = attention::attention(
            &self.input(q),
            &self.input(k),
            &self.input(v),
            layout,
            shape,
            probability_rounding(self.storage, &round),
        );
        (self.output(out), Self::f32(lse))
    }

    fn attention_backward(
        &self,
        q: &Stored,
        k: &Stored,
        v: &Stored,
        out: &Stored,
        lse: &Stored,
        dout: &Stored,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Stored, Stored, Stored) {
        let round = self.stored_rounding();
        let (dq, dk, dv) = attention::attention_backward(
            &self.input(q),
            &self.input(k),
            &self.input(v),
            &self.input(out),
            &lse.values,
            &self.input(dout),
            layout,
            shape,
            probability_rounding(self.storage, &round),
        );
        (self.output(dq), self.output(dk), self.output(dv))
    }

    fn swiglu(&self, gate: &Stored, up: &Stored) -> Stored {
        self.output(CpuOps.swiglu(&self.input(gate), &self.input(up)))
    }

    fn swiglu_backward(&self, gate: &Stored, up: &Stored, dy: &Stored) -> (Stored, Stored) {
        let (dgate, dup) =
            CpuOps.swiglu_backward(&self.input(gate), &self.input(up), &self.input(dy));
        (self.output(dgate), self.output(dup))
    }

    fn gather_rows(&self, x: &Stored, rows: &[u32], scale: RowScale, d: usize) -> Stored {
        // Unscaled, the device runs the embedding lookup at the storage type; scaled, the f32
        // MoE gather kernel.
        match scale {
            None => self.output(CpuOps.gather_rows(&self.input(x), rows, scale, d)),
            Some(_) => Self::f32(CpuOps.gather_rows(&x.values, rows, scale, d)),
        }
    }

    fn scatter_add_rows(
        &self,
        dst: &mut Stored,
        src: &Stored,
        rows: &[u32],
        scale: RowScale,
        d: usize,
    ) {
        // Unscaled, the device runs the embedding's backward, which reads `src` at the
        // storage type; scaled, the host adds the values as they are.
        let src = match scale {
            None => self.input(src),
            Some(_) => Cow::Borrowed(&src.values),
        };
        CpuOps.scatter_add_rows(&mut dst.values, &src, rows, scale, d);
        keep_type(dst);
    }

    fn rows(&self, x: &Stored, start: usize, len: usize, d: usize) -> Stored {
        Stored {
            values: CpuOps.rows(&x.values, start, len, d),
            dtype: x.dtype,
        }
    }

    /// At the first part's type, the others rounded to it (as the device casts them).
    fn concat(&self, parts: &[Stored]) -> Stored {
        let dtype = parts.first().map_or(self.storage, |p| p.dtype);
        let mut values: Vec<f32> = parts
            .iter()
            .flat_map(|p| p.values.iter().copied())
            .collect();
        dtype.round_all(&mut values);
        Stored { values, dtype }
    }

    // The routing reads the logits as stored; the row moves, the experts' GEMMs and the slot
    // dots run at the storage type, the router's logit gradient is f32 (docs/numerics.md §2).
    fn moe_route(&self, logits: &Stored, experts: usize, k: usize) -> CpuRouting {
        CpuOps.moe_route(&logits.values, experts, k)
    }

    fn moe_expert_matmul(
        &self,
        x: &Stored,
        w: &[&Stored],
        routing: &CpuRouting,
        k_in: usize,
        n: usize,
    ) -> Stored {
        expert_matmul(self, &routing.routing.expert_rows(), x, w, (k_in, n))
    }

    fn moe_expert_matmul_backward(
        &self,
        x: &Stored,
        w: &[&Stored],
        dy: &Stored,
        routing: &CpuRouting,
        k_in: usize,
        n: usize,
        dw: &mut [&mut Stored],
    ) -> Stored {
        let rows = routing.routing.expert_rows();
        expert_matmul_backward(self, &rows, (x, w, dy), (k_in, n), dw)
    }

    fn moe_permute(&self, x: &Stored, routing: &CpuRouting, weighted: bool, d: usize) -> Stored {
        self.output(CpuOps.moe_permute(&self.input(x), routing, weighted, d))
    }

    fn moe_unpermute(&self, y: &Stored, routing: &CpuRouting, weighted: bool, d: usize) -> Stored {
        self.output(CpuOps.moe_unpermute(&self.input(y), routing, weighted, d))
    }

    fn moe_route_backward(
        &self,
        routing: &CpuRouting,
        y: &Stored,
        dout: &Stored,
        d: usize,
        aux: Option<MoeAux<LoadBalance>>,
    ) -> Stored {
        let (y, dout) = (self.input(y), self.input(dout));
        Self::f32(CpuOps.moe_route_backward(routing, &y, &dout, d, aux))
    }

    fn moe_balance(&self, experts: usize) -> LoadBalance {
        CpuOps.moe_balance(experts)
    }

    fn moe_balance_add(&self, balance: &mut LoadBalance, routing: &CpuRouting, weights: &[f64]) {
        CpuOps.moe_balance_add(balance, routing, weights)
    }

    fn moe_balance_loss(&self, balance: &LoadBalance) -> f64 {
        CpuOps.moe_balance_loss(balance)
    }

    fn response_scores(
        &self,
        h: &Stored,
        head: &Stored,
        targets: &[u32],
        spans: &[ResponseSpan],
        d: usize,
        vocab: usize,
    ) -> (Vec<f64>, Stored) {
        let round = self.stored_rounding();
        let (logp, lse) = scoring::token_logprobs_with(
            &self.input(h),
            &self.input(head),
            targets,
            d,
            vocab,
            &round,
        );
        (span_table(spans, &logp), Self::f32(lse))
    }

    fn response_scores_backward(
        &self,
        h: &Stored,
        head: &Stored,
        targets: &[u32],
        lse: &Stored,
        spans: &[ResponseSpan],
        grads: &Vec<f64>,
        scale: f64,
        d: usize,
        vocab: usize,
        dhead: &mut Stored,
    ) -> Stored {
        let round = self.stored_rounding();
        let dlogp = row_grads(spans, targets.len(), grads, scale);
        let dh = scoring::token_logprobs_backward_with(
            &self.input(h),
            &self.input(head),
            targets,
            &lse.values,
            &dlogp,
            d,
            vocab,
            &mut dhead.values,
            &round,
        );
        keep_type(dhead);
        self.output(dh)
    }

    fn table_to_host(&self, table: &Vec<f64>) -> Vec<f64> {
        table.clone()
    }
}
