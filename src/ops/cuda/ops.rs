//! The model's ops trait ([`Ops`]) on a [`Device`]: what `--device emu|cuda` runs. Tensors
//! live on the device as f32; embedding, RMSNorm, RoPE, SwiGLU, attention (forward and
//! backward), accumulation, every projection (GEMM) and the fused LM-head scoring
//! (`super::scoring`) run there, their outputs leased from the ops' pool. The MoE layer's
//! routing, row permutations, router backward and load-balancing sums run there too
//! (`super::moe`; its per-expert row counts come to the host, a stated temporary exception).
//! An unscaled `gather_rows` / `scatter_add_rows` (the prediction rows) is an embedding
//! lookup / backward; a scaled gather runs the MoE gather kernel; a scaled scatter-add (which
//! the model no longer uses) copies its operands to the host and runs the CPU reference.
//!
//! The trait's operations cannot fail, but a device can. The first error is kept, every
//! operation after it does no work and returns zeros of the right shape, and the caller asks
//! [`DeviceOps::check`] after each pass, as CUDA's own sticky errors work.

use super::attention::{tile_rows, AttentionKernels, DeviceLayout};
use super::device::AsView;
use super::device::Device;
use super::gemm::Gemm;
use super::kernels::Kernels;
use super::moe::{DeviceBalance, DeviceRouting, MoeKernels};
use super::pool::{Leased, Pool, Tensor};
use super::scoring::{FusedScoring, Spans};
use crate::ops::cpu::CpuOps;
use crate::ops::{AttentionLayout, AttentionShape, MoeAux, Ops, ResponseSpan, RowScale};
use anyhow::{Context, Result};
use std::cell::RefCell;
use std::rc::Rc;

/// How many index lists [`DeviceOps`] keeps on the device: a batch's token ids, positions,
/// prediction rows and targets.
const KEPT_INDEX_LISTS: usize = 4;

/// Response spans, the rows they cover, and their copy on the device.
type KeptSpans = (Vec<ResponseSpan>, usize, Rc<Spans>);

/// An index list and its copy on the device.
type IndexList = (Vec<u32>, Rc<Leased<u32>>);

pub struct DeviceOps<'a> {
    device: &'a Device,
    kernels: Kernels<'a>,
    /// Where every output comes from: no op allocates device memory once the pool holds a
    /// step's worth.
    pool: Pool,
    error: RefCell<Option<anyhow::Error>>,
    /// The index lists uploaded last, with their device copies: the model passes the same
    /// positions to RoPE in every layer, forward, backward and recomputation.
    index_lists: RefCell<Vec<IndexList>>,
    /// The attention layout uploaded last, with its device copy: every layer's attention,
    /// forward and backward, takes the batch's layout.
    attention_layout: RefCell<Option<(AttentionLayout, Rc<DeviceLayout>)>>,
    /// The response spans uploaded last, with the rows they cover and their device copy.
    spans: RefCell<Option<KeptSpans>>,
    /// Rows of one logits chunk of the scoring; `None`: as many as its default budget holds.
    scoring_chunk_rows: Option<usize>,
}

/// [`Ops::Table`] on a device: three f64 per response in the pool; nothing when the device
/// failed before it was made.
pub struct DeviceTable {
    values: Option<Leased<f64>>,
    responses: usize,
}

impl DeviceTable {
    pub fn new(values: Leased<f64>) -> Self {
        let responses = values.len() / 3;
        DeviceTable {
            values: Some(values),
            responses,
        }
    }

    fn failed(responses: usize) -> Self {
        DeviceTable {
            values: None,
            responses,
        }
    }

    /// The values, three per response.
    pub fn values(&self) -> Result<&Leased<f64>> {
        self.values
            .as_ref()
            .context("a statistics table that a failed device operation never made")
    }
}

impl<'a> DeviceOps<'a> {
    /// Ops whose workspace grows as the first passes need it.
    pub fn new(device: &'a Device) -> Self {
        DeviceOps::with_pool(device, Pool::default())
    }

    /// Ops that take their outputs from `pool`.
    pub fn with_pool(device: &'a Device, pool: Pool) -> Self {
        DeviceOps {
            device,
            kernels: Kernels::with_scratch(device, pool.clone()),
            pool,
            error: RefCell::new(None),
            index_lists: RefCell::new(Vec::new()),
            attention_layout: RefCell::new(None),
            spans: RefCell::new(None),
            scoring_chunk_rows: None,
        }
    }

    /// Ops whose LM-head scoring holds at most `rows` rows of logits at once (the memory
    /// plan's logits chunk) instead of [`super::scoring::DEFAULT_CHUNK_BYTES`].
    pub fn with_scoring_chunk_rows(mut self, rows: usize) -> Self {
        self.scoring_chunk_rows = Some(rows.max(1));
        self
    }

    fn scoring(&self, vocab: usize) -> FusedScoring<'_> {
        match self.scoring_chunk_rows {
            Some(chunk_rows) => FusedScoring {
                kernels: &self.kernels,
                chunk_rows,
            },
            None => FusedScoring::new::<f32>(&self.kernels, vocab),
        }
    }

    /// Runs `op` unless an error is pending; on failure keeps the error. Either way without a
    /// result, returns `on_error()`.
    fn attempt<T>(
        &self,
        what: &str,
        on_error: impl FnOnce() -> T,
        op: impl FnOnce() -> Result<T>,
    ) -> T {
        if self.error.borrow().is_some() {
            return on_error();
        }
        match op() {
            Ok(value) => value,
            Err(e) => {
                *self.error.borrow_mut() = Some(e.context(what.to_string()));
                on_error()
            }
        }
    }

    pub fn device(&self) -> &'a Device {
        self.device
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    fn placeholder(len: usize) -> Tensor {
        Tensor::owned(Device::host_zeros(len))
    }

    fn host(&self, buf: &Tensor) -> Result<Vec<f32>> {
        self.device.download(buf)
    }

    /// `data` in a tensor of the pool.
    fn put(&self, data: &[f32]) -> Result<Tensor> {
        let mut t = self.alloc(data.len())?;
        self.device.copy_to(&mut t, data)?;
        Ok(t)
    }

    /// `values` on the device, uploaded unless they are one of the lists kept from before.
    fn indices(&self, values: &[u32]) -> Result<Rc<Leased<u32>>> {
        let mut kept = self.index_lists.borrow_mut();
        if let Some((_, buffer)) = kept.iter().find(|(list, _)| list == values) {
            return Ok(buffer.clone());
        }
        let buffer = Rc::new(self.pool.upload(self.device, values)?);
        if kept.len() == KEPT_INDEX_LISTS {
            kept.remove(0);
        }
        kept.push((values.to_vec(), buffer.clone()));
        Ok(buffer)
    }

    /// `layout` on the device (with f32 tile lists), uploaded unless it is the one from before.
    fn attention_layout(&self, layout: &AttentionLayout) -> Result<Rc<DeviceLayout>> {
        let mut kept = self.attention_layout.borrow_mut();
        if let Some((host, device)) = kept.as_ref() {
            if host == layout {
                return Ok(device.clone());
            }
        }
        let device = Rc::new(DeviceLayout::new(
            self.device,
            &self.pool,
            layout,
            tile_rows::<f32>(),
        )?);
        *kept = Some((layout.clone(), device.clone()));
        Ok(device)
    }

    fn moe(&self) -> MoeKernels<'_> {
        MoeKernels::new(self.device, self.pool.clone())
    }

    /// The batch's row weights on the device (an upload, as the batch's other index lists).
    fn row_weights(&self, weights: &[f64]) -> Result<Leased<f64>> {
        self.pool.upload(self.device, weights)
    }

    /// `spans` over `rows` prediction rows on the device, uploaded unless they are the ones
    /// from before (the forward's, in the backward).
    pub fn spans(&self, spans: &[ResponseSpan], rows: usize) -> Result<Rc<Spans>> {
        let mut kept = self.spans.borrow_mut();
        if let Some((host, host_rows, device)) = kept.as_ref() {
            if host.as_slice() == spans && *host_rows == rows {
                return Ok(device.clone());
            }
        }
        let device = Rc::new(Spans::upload(self.device, &self.pool, spans, rows)?);
        *kept = Some((spans.to_vec(), rows, device.clone()));
        Ok(device)
    }

    /// A tensor of `len` elements whose contents are undefined until an op writes them.
    fn alloc(&self, len: usize) -> Result<Tensor> {
        let (view, lease) = self.pool.take(self.device, len)?;
        Ok(Tensor::leased(view, lease))
    }

    /// RMSNorm's output and each row's 1/rms.
    fn rmsnorm_with_rstd(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<(Tensor, Tensor)> {
        let mut y = self.alloc(x.len())?;
        let mut rstd = self.alloc(x.len() / w.len().max(1))?;
        self.kernels
            .rmsnorm_forward(x, None, w, None, &mut y, &mut rstd, eps as f32)?;
        Ok((y, rstd))
    }
}

/// The routing of a MoE op; absent only after a failure, which is already pending.
fn routed(routing: &Option<DeviceRouting>) -> Result<&DeviceRouting> {
    routing
        .as_ref()
        .context("no MoE routing: an earlier operation failed")
}

fn balanced(balance: &Option<DeviceBalance>) -> Result<&DeviceBalance> {
    balance
        .as_ref()
        .context("no load-balancing sums: an earlier operation failed")
}

impl Ops for DeviceOps<'_> {
    type Buf = Tensor;
    /// `None` after a failure (the error is pending).
    type Routing = Option<DeviceRouting>;
    type Balance = Option<DeviceBalance>;
    type Table = DeviceTable;

    /// The first error since the last call, if any operation failed; clears it.
    fn check(&self) -> Result<()> {
        match self.error.borrow_mut().take() {
            Some(e) => Err(e.context(format!("on {}", self.device.describe()))),
            None => Ok(()),
        }
    }

    fn upload(&self, data: &[f32]) -> Tensor {
        self.attempt(
            "upload",
            || Self::placeholder(data.len()),
            || self.put(data),
        )
    }

    fn download(&self, buf: &Tensor) -> Vec<f32> {
        self.attempt("download", || vec![0.0; buf.len()], || self.host(buf))
    }

    fn zeros(&self, len: usize) -> Tensor {
        self.attempt(
            "zeros",
            || Self::placeholder(len),
            || {
                let mut t = self.alloc(len)?;
                self.device.zero(&mut t)?;
                Ok(t)
            },
        )
    }

    fn add_assign(&self, acc: &mut Tensor, x: &Tensor) {
        self.attempt("add_assign", || (), || self.kernels.add_assign(acc, x))
    }

    fn embedding(&self, table: &Tensor, ids: &[u32], d: usize) -> Tensor {
        self.attempt(
            "embedding",
            || Self::placeholder(ids.len() * d),
            || {
                let ids = self.indices(ids)?;
                let mut out = self.alloc(ids.len() * d)?;
                self.kernels.embedding_forward(table, &*ids, &mut out, d)?;
                Ok(out)
            },
        )
    }

    fn embedding_backward(&self, dtable: &mut Tensor, dout: &Tensor, ids: &[u32], d: usize) {
        self.attempt(
            "embedding_backward",
            || (),
            || {
                let ids = self.indices(ids)?;
                self.kernels.embedding_backward(dout, &*ids, dtable, d)
            },
        )
    }

    fn rmsnorm(&self, x: &Tensor, w: &Tensor, _d: usize, eps: f64) -> Tensor {
        self.attempt(
            "rmsnorm",
            || Self::placeholder(x.len()),
            || Ok(self.rmsnorm_with_rstd(x, w, eps)?.0),
        )
    }

    fn rmsnorm_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        _d: usize,
        eps: f64,
        dw: &mut Tensor,
    ) -> Tensor {
        self.attempt(
            "rmsnorm_backward",
            || Self::placeholder(x.len()),
            || {
                // The trait keeps no statistics between the passes: recompute 1/rms.
                let (_, rstd) = self.rmsnorm_with_rstd(x, w, eps)?;
                let mut dx = self.alloc(x.len())?;
                self.kernels
                    .rmsnorm_backward(x, w, &rstd, dy, None, &mut dx, dw)?;
                Ok(dx)
            },
        )
    }

    fn matmul(&self, x: &Tensor, w: &Tensor, m: usize, k: usize, n: usize) -> Tensor {
        self.attempt(
            "matmul",
            || Self::placeholder(m * n),
            || {
                let mut y = self.alloc(m * n)?;
                self.device.gemm(&Gemm::projection(m, k, n), x, w, &mut y)?;
                Ok(y)
            },
        )
    }

    fn matmul_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        m: usize,
        k: usize,
        n: usize,
        dw: &mut Tensor,
    ) -> Tensor {
        self.attempt(
            "matmul_backward",
            || Self::placeholder(m * k),
            || {
                self.device
                    .gemm(&Gemm::projection_weight_grad(m, k, n), dy, x, dw)?;
                let mut dx = self.alloc(m * k)?;
                self.device
                    .gemm(&Gemm::projection_input_grad(m, k, n), dy, w, &mut dx)?;
                Ok(dx)
            },
        )
    }

    fn rope(
        &self,
        x: &mut Tensor,
        positions: &[u32],
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) {
        self.attempt(
            "rope",
            || (),
            || {
                let positions = self.indices(positions)?;
                self.kernels
                    .rope(x, &*positions, heads, head_dim, theta, inverse)
            },
        )
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Tensor, Tensor) {
        let tokens = layout.len();
        self.attempt(
            "attention",
            || {
                (
                    Self::placeholder(q.len()),
                    Self::placeholder(tokens * shape.heads),
                )
            },
            || {
                let layout = self.attention_layout(layout)?;
                let mut out = self.alloc(q.len())?;
                let mut lse = self.alloc(tokens * shape.heads)?;
                AttentionKernels::with_scratch(self.device, self.pool.clone())
                    .forward(q, k, v, &layout, shape, &mut out, &mut lse)?;
                Ok((out, lse))
            },
        )
    }

    fn attention_backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        out: &Tensor,
        lse: &Tensor,
        dout: &Tensor,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Tensor, Tensor, Tensor) {
        self.attempt(
            "attention_backward",
            || {
                (
                    Self::placeholder(q.len()),
                    Self::placeholder(k.len()),
                    Self::placeholder(v.len()),
                )
            },
            || {
                let layout = self.attention_layout(layout)?;
                let mut dq = self.alloc(q.len())?;
                let mut dk = self.alloc(k.len())?;
                let mut dv = self.alloc(v.len())?;
                AttentionKernels::with_scratch(self.device, self.pool.clone()).backward(
                    q, k, v, out, lse, dout, &layout, shape, &mut dq, &mut dk, &mut dv,
                )?;
                Ok((dq, dk, dv))
            },
        )
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        self.attempt(
            "swiglu",
            || Self::placeholder(gate.len()),
            || {
                let mut out = self.alloc(gate.len())?;
                self.kernels.swiglu_forward(gate, up, &mut out)?;
                Ok(out)
            },
        )
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> (Tensor, Tensor) {
        self.attempt(
            "swiglu_backward",
            || (Self::placeholder(gate.len()), Self::placeholder(up.len())),
            || {
                let mut dgate = self.alloc(gate.len())?;
                let mut dup = self.alloc(up.len())?;
                self.kernels
                    .swiglu_backward(gate, up, dy, &mut dgate, &mut dup)?;
                Ok((dgate, dup))
            },
        )
    }

    fn gather_rows(&self, x: &Tensor, rows: &[u32], scale: RowScale, d: usize) -> Tensor {
        if scale.is_none() {
            // An unscaled gather is an embedding lookup in `x` (the prediction rows).
            return self.embedding(x, rows, d);
        }
        self.attempt(
            "gather_rows",
            || Self::placeholder(rows.len() * d),
            || {
                let rows_on_device = self.pool.upload(self.device, rows)?;
                let scale = match scale {
                    Some(s) => Some(self.pool.upload(self.device, s)?),
                    None => None,
                };
                let mut out = self.alloc(rows.len() * d)?;
                self.moe().gather(
                    x,
                    rows_on_device.view(),
                    scale.as_ref().map(AsView::view),
                    &mut out,
                    d,
                )?;
                Ok(out)
            },
        )
    }

    fn scatter_add_rows(
        &self,
        dst: &mut Tensor,
        src: &Tensor,
        rows: &[u32],
        scale: RowScale,
        d: usize,
    ) {
        if scale.is_none() {
            // An unscaled scatter-add is an embedding's backward into `dst`.
            return self.embedding_backward(dst, src, rows, d);
        }
        self.attempt(
            "scatter_add_rows (on the host)",
            || (),
            || {
                let mut host_dst = self.host(dst)?;
                CpuOps.scatter_add_rows(&mut host_dst, &self.host(src)?, rows, scale, d);
                self.device.copy_to(dst, &host_dst)
            },
        )
    }

    fn rows(&self, x: &Tensor, start: usize, len: usize, d: usize) -> Tensor {
        self.attempt(
            "rows",
            || Self::placeholder(len * d),
            || {
                let mut out = self.alloc(len * d)?;
                self.device
                    .copy_buffer(&x.view().slice(start * d, len * d)?, &mut out)?;
                Ok(out)
            },
        )
    }

    fn concat(&self, parts: &[Tensor]) -> Tensor {
        let total = parts.iter().map(Tensor::len).sum();
        self.attempt(
            "concat",
            || Self::placeholder(total),
            || {
                let out = self.alloc(total)?;
                let mut at = 0;
                for part in parts {
                    self.device
                        .copy_buffer(part, &mut out.view().slice(at, part.len())?)?;
                    at += part.len();
                }
                Ok(out)
            },
        )
    }

    fn moe_route(&self, logits: &Tensor, experts: usize, k: usize) -> Option<DeviceRouting> {
        self.attempt(
            "moe_route",
            || None,
            || Ok(Some(self.moe().route(logits, experts, k)?)),
        )
    }

    fn moe_expert_rows(&self, routing: &Option<DeviceRouting>) -> Vec<usize> {
        self.attempt("moe_expert_rows", Vec::new, || {
            self.moe().expert_rows(routed(routing)?)
        })
    }

    fn moe_permute(
        &self,
        x: &Tensor,
        routing: &Option<DeviceRouting>,
        weighted: bool,
        d: usize,
    ) -> Tensor {
        let rows = routing.as_ref().map_or(0, DeviceRouting::slots);
        self.attempt(
            "moe_permute",
            || Self::placeholder(rows * d),
            || {
                let mut out = self.alloc(rows * d)?;
                self.moe()
                    .permute(x, routed(routing)?, weighted, &mut out, d)?;
                Ok(out)
            },
        )
    }

    fn moe_unpermute(
        &self,
        y: &Tensor,
        routing: &Option<DeviceRouting>,
        weighted: bool,
        d: usize,
    ) -> Tensor {
        let tokens = routing.as_ref().map_or(0, |r| r.tokens);
        self.attempt(
            "moe_unpermute",
            || Self::placeholder(tokens * d),
            || {
                let mut out = self.alloc(tokens * d)?;
                self.moe()
                    .unpermute(y, routed(routing)?, weighted, &mut out, d)?;
                Ok(out)
            },
        )
    }

    fn moe_route_backward(
        &self,
        routing: &Option<DeviceRouting>,
        y: &Tensor,
        dout: &Tensor,
        d: usize,
        aux: Option<MoeAux<Option<DeviceBalance>>>,
    ) -> Tensor {
        let logits = routing.as_ref().map_or(0, |r| r.tokens * r.experts);
        self.attempt(
            "moe_route_backward",
            || Self::placeholder(logits),
            || {
                let r = routed(routing)?;
                let moe = self.moe();
                let d_weights = moe.slot_dots(dout, y, r, d)?;
                let row_weights = match &aux {
                    Some(a) => Some(self.row_weights(a.row_weights)?),
                    None => None,
                };
                let balance = match &aux {
                    Some(a) => Some(balanced(a.balance)?),
                    None => None,
                };
                let aux = match (&aux, balance, &row_weights) {
                    (Some(a), Some(b), Some(w)) => Some((b, a.coef, w)),
                    _ => None,
                };
                let mut dz = self.alloc(logits)?;
                moe.route_backward(r, &d_weights, aux, &mut dz)?;
                Ok(dz)
            },
        )
    }

    fn moe_balance(&self, experts: usize) -> Option<DeviceBalance> {
        self.attempt(
            "moe_balance",
            || None,
            || Ok(Some(self.moe().balance(experts)?)),
        )
    }

    fn moe_balance_add(
        &self,
        balance: &mut Option<DeviceBalance>,
        routing: &Option<DeviceRouting>,
        row_weights: &[f64],
    ) {
        self.attempt(
            "moe_balance_add",
            || (),
            || {
                let balance = balance
                    .as_mut()
                    .context("no load-balancing sums: an earlier operation failed")?;
                let row_weights = self.row_weights(row_weights)?;
                self.moe()
                    .balance_add(balance, routed(routing)?, &row_weights)
            },
        )
    }

    fn moe_balance_loss(&self, balance: &Option<DeviceBalance>) -> f64 {
        self.attempt(
            "moe_balance_loss",
            || 0.0,
            || Ok(self.moe().balance_sums(balanced(balance)?)?.loss()),
        )
    }

    fn response_scores(
        &self,
        h: &Tensor,
        head: &Tensor,
        targets: &[u32],
        spans: &[ResponseSpan],
        d: usize,
        vocab: usize,
    ) -> (DeviceTable, Tensor) {
        let rows = targets.len();
        self.attempt(
            "response_scores",
            || (DeviceTable::failed(spans.len()), Self::placeholder(rows)),
            || {
                let device_targets = self.indices(targets)?;
                let (mut lse, mut logp) = (self.alloc(rows)?, self.alloc(rows)?);
                self.scoring(vocab)
                    .forward(h, head, &*device_targets, d, &mut lse, &mut logp)?;
                let mut table = self.pool.lease::<f64>(self.device, 3 * spans.len())?;
                self.kernels
                    .response_stats(&logp, &*self.spans(spans, rows)?, &mut table)?;
                Ok((DeviceTable::new(table), lse))
            },
        )
    }

    fn response_scores_backward(
        &self,
        h: &Tensor,
        head: &Tensor,
        targets: &[u32],
        lse: &Tensor,
        spans: &[ResponseSpan],
        grads: &DeviceTable,
        scale: f64,
        d: usize,
        vocab: usize,
        dhead: &mut Tensor,
    ) -> Tensor {
        let rows = targets.len();
        self.attempt(
            "response_scores_backward",
            || Self::placeholder(h.len()),
            || {
                let device_targets = self.indices(targets)?;
                let mut coef = self.alloc(rows)?;
                self.kernels.row_coef(
                    &*self.spans(spans, rows)?,
                    grads.values()?,
                    scale,
                    &mut coef,
                )?;
                let mut dh = self.alloc(h.len())?;
                self.scoring(vocab).backward(
                    h,
                    head,
                    &*device_targets,
                    lse,
                    &coef,
                    d,
                    &mut dh,
                    dhead,
                )?;
                Ok(dh)
            },
        )
    }

    fn table_to_host(&self, table: &DeviceTable) -> Vec<f64> {
        self.attempt(
            "table_to_host",
            || vec![0.0; 3 * table.responses],
            || self.device.download(table.values()?),
        )
    }
}
