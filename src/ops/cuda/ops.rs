//! The model's ops trait ([`Ops`]) on a [`Device`]: what `--device emu|cuda` runs. Tensors
//! live on the device as f32; embedding, RMSNorm, RoPE, SwiGLU, accumulation, every
//! projection (GEMM) and the fused LM-head scoring (`super::scoring`) run there. Attention and
//! the MoE row gathers and scatters have no kernels yet: they copy their operands to the host,
//! run the CPU reference and copy the results back (correct, and slow on a GPU).
//!
//! The trait's operations cannot fail, but a device can. The first error is kept, every
//! operation after it does no work and returns zeros of the right shape, and the caller asks
//! [`DeviceOps::check`] after each pass, as CUDA's own sticky errors work.

use super::device::{Buffer, Device};
use super::gemm::Gemm;
use super::kernels::Kernels;
use super::scoring::FusedScoring;
use crate::ops::cpu::CpuOps;
use crate::ops::{AttentionLayout, AttentionShape, Ops, RowScale};
use anyhow::Result;
use std::cell::RefCell;
use std::rc::Rc;

/// How many index lists [`DeviceOps`] keeps on the device: a batch's token ids, positions and
/// targets.
const KEPT_INDEX_LISTS: usize = 3;

/// An index list and its copy on the device.
type IndexList = (Vec<u32>, Rc<Buffer<u32>>);

pub struct DeviceOps<'a> {
    device: &'a Device,
    kernels: Kernels<'a>,
    error: RefCell<Option<anyhow::Error>>,
    /// The index lists uploaded last, with their device copies: the model passes the same
    /// positions to RoPE in every layer, forward, backward and recomputation.
    index_lists: RefCell<Vec<IndexList>>,
}

impl<'a> DeviceOps<'a> {
    pub fn new(device: &'a Device) -> Self {
        DeviceOps {
            device,
            kernels: Kernels::new(device),
            error: RefCell::new(None),
            index_lists: RefCell::new(Vec::new()),
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

    fn placeholder(len: usize) -> Buffer<f32> {
        Device::host_zeros(len)
    }

    fn host(&self, buf: &Buffer<f32>) -> Result<Vec<f32>> {
        self.device.download(buf)
    }

    /// `values` on the device, uploaded unless they are one of the lists kept from before.
    fn indices(&self, values: &[u32]) -> Result<Rc<Buffer<u32>>> {
        let mut kept = self.index_lists.borrow_mut();
        if let Some((_, buffer)) = kept.iter().find(|(list, _)| list == values) {
            return Ok(buffer.clone());
        }
        let buffer = Rc::new(self.device.upload(values)?);
        if kept.len() == KEPT_INDEX_LISTS {
            kept.remove(0);
        }
        kept.push((values.to_vec(), buffer.clone()));
        Ok(buffer)
    }

    fn alloc(&self, len: usize) -> Result<Buffer<f32>> {
        self.device.alloc(len)
    }

    /// RMSNorm's output and each row's 1/rms.
    fn rmsnorm_with_rstd(
        &self,
        x: &Buffer<f32>,
        w: &Buffer<f32>,
        eps: f64,
    ) -> Result<(Buffer<f32>, Buffer<f32>)> {
        let mut y = self.alloc(x.len())?;
        let mut rstd = self.alloc(x.len() / w.len().max(1))?;
        self.kernels
            .rmsnorm_forward(x, None, w, None, &mut y, &mut rstd, eps as f32)?;
        Ok((y, rstd))
    }
}

impl Ops for DeviceOps<'_> {
    type Buf = Buffer<f32>;

    /// The first error since the last call, if any operation failed; clears it.
    fn check(&self) -> Result<()> {
        match self.error.borrow_mut().take() {
            Some(e) => Err(e.context(format!("on {}", self.device.describe()))),
            None => Ok(()),
        }
    }

    fn upload(&self, data: &[f32]) -> Buffer<f32> {
        self.attempt(
            "upload",
            || Self::placeholder(data.len()),
            || self.device.upload(data),
        )
    }

    fn download(&self, buf: &Buffer<f32>) -> Vec<f32> {
        self.attempt("download", || vec![0.0; buf.len()], || self.host(buf))
    }

    fn zeros(&self, len: usize) -> Buffer<f32> {
        self.attempt("zeros", || Self::placeholder(len), || self.alloc(len))
    }

    fn add_assign(&self, acc: &mut Buffer<f32>, x: &Buffer<f32>) {
        self.attempt("add_assign", || (), || self.kernels.add_assign(acc, x))
    }

    fn embedding(&self, table: &Buffer<f32>, ids: &[u32], d: usize) -> Buffer<f32> {
        self.attempt(
            "embedding",
            || Self::placeholder(ids.len() * d),
            || {
                let ids = self.indices(ids)?;
                let mut out = self.alloc(ids.len() * d)?;
                self.kernels.embedding_forward(table, &ids, &mut out, d)?;
                Ok(out)
            },
        )
    }

    fn embedding_backward(
        &self,
        dtable: &mut Buffer<f32>,
        dout: &Buffer<f32>,
        ids: &[u32],
        d: usize,
    ) {
        self.attempt(
            "embedding_backward",
            || (),
            || {
                let ids = self.indices(ids)?;
                self.kernels.embedding_backward(dout, &ids, dtable, d)
            },
        )
    }

    fn rmsnorm(&self, x: &Buffer<f32>, w: &Buffer<f32>, _d: usize, eps: f64) -> Buffer<f32> {
        self.attempt(
            "rmsnorm",
            || Self::placeholder(x.len()),
            || Ok(self.rmsnorm_with_rstd(x, w, eps)?.0),
        )
    }

    fn rmsnorm_backward(
        &self,
        x: &Buffer<f32>,
        w: &Buffer<f32>,
        dy: &Buffer<f32>,
        _d: usize,
        eps: f64,
        dw: &mut Buffer<f32>,
    ) -> Buffer<f32> {
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

    fn matmul(
        &self,
        x: &Buffer<f32>,
        w: &Buffer<f32>,
        m: usize,
        k: usize,
        n: usize,
    ) -> Buffer<f32> {
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
        x: &Buffer<f32>,
        w: &Buffer<f32>,
        dy: &Buffer<f32>,
        m: usize,
        k: usize,
        n: usize,
        dw: &mut Buffer<f32>,
    ) -> Buffer<f32> {
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
        x: &mut Buffer<f32>,
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
                    .rope(x, &positions, heads, head_dim, theta, inverse)
            },
        )
    }

    fn attention(
        &self,
        q: &Buffer<f32>,
        k: &Buffer<f32>,
        v: &Buffer<f32>,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Buffer<f32>, Buffer<f32>) {
        let tokens = layout.len();
        self.attempt(
            "attention (on the host)",
            || {
                (
                    Self::placeholder(q.len()),
                    Self::placeholder(tokens * shape.heads),
                )
            },
            || {
                let (out, lse) = CpuOps.attention(
                    &self.host(q)?,
                    &self.host(k)?,
                    &self.host(v)?,
                    layout,
                    shape,
                );
                Ok((self.device.upload(&out)?, self.device.upload(&lse)?))
            },
        )
    }

    fn attention_backward(
        &self,
        q: &Buffer<f32>,
        k: &Buffer<f32>,
        v: &Buffer<f32>,
        out: &Buffer<f32>,
        lse: &Buffer<f32>,
        dout: &Buffer<f32>,
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> (Buffer<f32>, Buffer<f32>, Buffer<f32>) {
        self.attempt(
            "attention_backward (on the host)",
            || {
                (
                    Self::placeholder(q.len()),
                    Self::placeholder(k.len()),
                    Self::placeholder(v.len()),
                )
            },
            || {
                let (dq, dk, dv) = CpuOps.attention_backward(
                    &self.host(q)?,
                    &self.host(k)?,
                    &self.host(v)?,
                    &self.host(out)?,
                    &self.host(lse)?,
                    &self.host(dout)?,
                    layout,
                    shape,
                );
                Ok((
                    self.device.upload(&dq)?,
                    self.device.upload(&dk)?,
                    self.device.upload(&dv)?,
                ))
            },
        )
    }

    fn swiglu(&self, gate: &Buffer<f32>, up: &Buffer<f32>) -> Buffer<f32> {
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

    fn swiglu_backward(
        &self,
        gate: &Buffer<f32>,
        up: &Buffer<f32>,
        dy: &Buffer<f32>,
    ) -> (Buffer<f32>, Buffer<f32>) {
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

    fn gather_rows(&self, x: &Buffer<f32>, rows: &[u32], scale: RowScale, d: usize) -> Buffer<f32> {
        self.attempt(
            "gather_rows (on the host)",
            || Self::placeholder(rows.len() * d),
            || {
                let out = CpuOps.gather_rows(&self.host(x)?, rows, scale, d);
                self.device.upload(&out)
            },
        )
    }

    fn scatter_add_rows(
        &self,
        dst: &mut Buffer<f32>,
        src: &Buffer<f32>,
        rows: &[u32],
        scale: RowScale,
        d: usize,
    ) {
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

    fn row_dots(&self, a: &Buffer<f32>, b: &Buffer<f32>, d: usize) -> Vec<f64> {
        self.attempt(
            "row_dots (on the host)",
            || vec![0.0; a.len() / d.max(1)],
            || Ok(CpuOps.row_dots(&self.host(a)?, &self.host(b)?, d)),
        )
    }

    fn token_logprobs(
        &self,
        h: &Buffer<f32>,
        head: &Buffer<f32>,
        targets: &[u32],
        d: usize,
        vocab: usize,
    ) -> (Vec<f64>, Buffer<f32>) {
        let rows = targets.len();
        self.attempt(
            "token_logprobs",
            || (vec![0.0; rows], Self::placeholder(rows)),
            || {
                let targets = self.indices(targets)?;
                let (mut lse, mut logp) = (self.alloc(rows)?, self.alloc(rows)?);
                FusedScoring::new::<f32>(&self.kernels, vocab)
                    .forward(h, head, &targets, d, &mut lse, &mut logp)?;
                // The trait hands the per-row log-probs to the host's loss: `rows` values.
                let logp = self.host(&logp)?.into_iter().map(f64::from).collect();
                Ok((logp, lse))
            },
        )
    }

    fn token_logprobs_backward(
        &self,
        h: &Buffer<f32>,
        head: &Buffer<f32>,
        targets: &[u32],
        lse: &Buffer<f32>,
        dlogp: &[f64],
        d: usize,
        vocab: usize,
        dhead: &mut Buffer<f32>,
    ) -> Buffer<f32> {
        self.attempt(
            "token_logprobs_backward",
            || Self::placeholder(h.len()),
            || {
                let targets = self.indices(targets)?;
                // dL/dlogp comes from the host's loss; the loss kernels will make it on the
                // device (`Kernels::row_coef`).
                let coef: Vec<f32> = dlogp.iter().map(|&g| g as f32).collect();
                let coef = self.device.upload(&coef)?;
                let mut dh = self.alloc(h.len())?;
                FusedScoring::new::<f32>(&self.kernels, vocab)
                    .backward(h, head, &targets, lse, &coef, d, &mut dh, dhead)?;
                Ok(dh)
            },
        )
    }
}
