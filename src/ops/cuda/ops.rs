//! The model's ops trait ([`Ops`]) on a [`Device`]: what `--device emu|cuda` runs. Embedding,
//! RMSNorm, RoPE, SwiGLU, attention (forward and backward), accumulation, every projection
//! (GEMM) and the fused LM-head scoring (`super::scoring`) run there, their outputs leased
//! from the ops' pool. The MoE layer's routing, row permutations, router backward and
//! load-balancing sums run there too (`super::moe`: the row moves and slot dots at the storage
//! type, the routing f32), and the experts' projections as grouped GEMMs that read the
//! per-expert row counts on the device (`expert`; WMMA for bf16). An unscaled `gather_rows` /
//! `scatter_add_rows` (the prediction rows) is an embedding lookup / backward; a scaled
//! gather runs the MoE gather kernel; a scaled scatter-add (which the model no longer uses)
//! copies its operands to the host and runs the CPU reference.
//!
//! Storage (docs/numerics.md §2): the ops run at one storage type, f32 or bf16. Uploads and
//! every op's fresh output are stored in it, except the fp32 statistics (RMSNorm's 1/rms,
//! attention's and the scoring's log-sum-exp, the log-probs), `zeros`, which makes the f32
//! accumulators (weight gradients, the scoring's scatter), and the router's logit gradient,
//! which is f32. An op accumulating into a tensor keeps that tensor's type; an
//! input of the other type is cast to the ops' type first ([`Operand`]).
//!
//! The trait's operations cannot fail, but a device can. The first error is kept, every
//! operation after it does no work and returns zeros of the right shape, and the caller asks
//! [`DeviceOps::check`] after each pass, as CUDA's own sticky errors work.

use super::attention::{tile_rows, AttentionKernels, DeviceLayout, HostLayout};
use super::device::{AsView, Device, View};
use super::embedding::IdRows;
use super::fresh::{FreshGrads, GradWrite};
use super::gemm::Gemm;
use super::kernels::Kernels;
use super::lists::{KeptLists, ListSource, StagedLists};
use super::moe::{DeviceBalance, DeviceRouting, MoeKernels};
use super::pool::{Leased, Pool, Stored, Tensor, TensorView};
use super::scoring::{FusedScoring, Spans};
mod expert;

use crate::ops::cpu::CpuOps;
use crate::ops::storage::Dtype;
use crate::ops::{
    AttentionLayout, AttentionShape, BatchLists, ExtraList, MoeAux, Ops, ResponseSpan, RowScale,
};
use anyhow::{Context, Result};
use half::bf16;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

/// Response spans, the rows they cover, and their copy on the device.
type KeptSpans = (Vec<ResponseSpan>, usize, Rc<Spans>);

/// An attention layout, the tile rows its lists were made for, and its copy on the device.
type KeptLayout = (AttentionLayout, usize, Rc<DeviceLayout>);

/// Runs `$self.$method::<E>($args)` with `E` the ops' storage type.
macro_rules! at_storage {
    ($self:ident . $method:ident ( $($arg:expr),* $(,)? )) => {
        match $self.storage {
            Dtype::F32 => $self.$method::<f32>($($arg),*),
            Dtype::Bf16 => $self.$method::<bf16>($($arg),*),
        }
    };
}

/// An op's input as the type the op runs at: the tensor's own elements, or a cast copy that
/// lives as long as the operand.
struct Operand<E> {
    view: View<E>,
    _copy: Option<Tensor>,
}

impl<E: bytemuck::Pod> AsView<E> for Operand<E> {
    fn view(&self) -> View<E> {
        self.view
    }
}

pub struct DeviceOps<'a> {
    device: &'a Device,
    kernels: Kernels<'a>,
    /// Where every output comes from: no op allocates device memory once the pool holds a
    /// step's worth.
    pool: Pool,
    /// What uploads and op outputs are stored in.
    storage: Dtype,
    error: RefCell<Option<anyhow::Error>>,
    /// How many expert tensors were copied into a stack for the grouped GEMMs because they
    /// did not lie at one stride (`expert`): none in the engine, whose flat store lays
    /// them out so.
    expert_copies: Cell<u64>,
    /// The batch's host lists on the device, staged together or uploaded as asked for
    /// (`super::lists`).
    kept: KeptLists,
    /// The attention layout uploaded last: every layer's attention, forward and backward,
    /// takes the batch's layout.
    attention_layout: RefCell<Option<KeptLayout>>,
    /// The response spans uploaded last, with the rows they cover and their device copy.
    spans: RefCell<Option<KeptSpans>>,
    /// Rows of one logits chunk of the scoring; `None`: as many as its default budget holds.
    scoring_chunk_rows: Option<usize>,
    /// The engine's gradients not written yet this step (`super::fresh`): an op that covers
    /// one whole overwrites it ([`DeviceOps::grad_write`]), one that scatters into it zeroes
    /// it first. `None`: every accumulator holds its sum.
    fresh: Option<Rc<FreshGrads>>,
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

impl ListSource for DeviceOps<'_> {
    fn list<T: bytemuck::Pod + 'static>(&self, values: &[T]) -> Result<Rc<Leased<T>>> {
        self.kept.get(self.device, &self.pool, values)
    }
}

impl<'a> DeviceOps<'a> {
    /// f32 ops whose workspace grows as the first passes need it.
    pub fn new(device: &'a Device) -> Self {
        DeviceOps::with_pool(device, Pool::default(), Dtype::F32)
    }

    /// Ops storing in `storage` whose workspace grows as the first passes need it.
    pub fn with_storage(device: &'a Device, storage: Dtype) -> Self {
        DeviceOps::with_pool(device, Pool::default(), storage)
    }

    /// Ops storing in `storage` that take their outputs from `pool`.
    pub fn with_pool(device: &'a Device, pool: Pool, storage: Dtype) -> Self {
        DeviceOps {
            device,
            kernels: Kernels::with_scratch(device, pool.clone()),
            pool,
            storage,
            error: RefCell::new(None),
            expert_copies: Cell::new(0),
            kept: KeptLists::default(),
            attention_layout: RefCell::new(None),
            spans: RefCell::new(None),
            scoring_chunk_rows: None,
            fresh: None,
        }
    }

    /// Ops that take `fresh` for the gradients not written yet this step.
    pub fn with_fresh_grads(mut self, fresh: Rc<FreshGrads>) -> Self {
        self.fresh = Some(fresh);
        self
    }

    /// Zeroes what of `acc` is a fresh gradient, before an op adds into it.
    pub(super) fn settle(&self, acc: &Tensor) -> Result<()> {
        match &self.fresh {
            Some(fresh) => fresh.settle(self.device, &acc.storage()),
            None => Ok(()),
        }
    }

    /// How an op writes `grads`: it overwrites them when each is exactly a fresh gradient
    /// (fresh no more); otherwise it adds into them, what of them was fresh zeroed first.
    pub(super) fn grad_write(&self, grads: &[&Tensor]) -> Result<GradWrite> {
        let overwrites = match &self.fresh {
            Some(fresh) => {
                let views: Vec<TensorView> = grads.iter().map(|t| t.storage()).collect();
                fresh.overwrites(self.device, &views)?
            }
            None => false,
        };
        Ok(if overwrites {
            GradWrite::Overwrite
        } else {
            GradWrite::Accumulate
        })
    }

    /// `Gemm::projection_weight_grad`, which adds `dyᵀ · x` into `dw`, or overwrites `dw`
    /// (`β = 0`) where it is a fresh gradient.
    fn weight_grad_gemm(&self, dw: &Tensor, (m, k, n): (usize, usize, usize)) -> Result<Gemm> {
        Ok(Gemm {
            beta: self.grad_write(&[dw])?.beta(),
            ..Gemm::projection_weight_grad(m, k, n)
        })
    }

    /// Ops whose LM-head scoring holds at most `rows` rows of logits at once (the memory
    /// plan's logits chunk) instead of [`super::scoring::DEFAULT_CHUNK_BYTES`].
    pub fn with_scoring_chunk_rows(mut self, rows: usize) -> Self {
        self.scoring_chunk_rows = Some(rows.max(1));
        self
    }

    /// The fused scoring of logits stored as `E`.
    fn scoring<E>(&self, vocab: usize) -> FusedScoring<'_> {
        match self.scoring_chunk_rows {
            Some(chunk_rows) => FusedScoring {
                kernels: &self.kernels,
                chunk_rows,
            },
            None => FusedScoring::new::<E>(&self.kernels, vocab),
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

    /// Expert tensors copied into a stack so far (see [`Ops::moe_expert_matmul`]).
    pub fn expert_copies(&self) -> u64 {
        self.expert_copies.get()
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

    /// The elements as f32 on the host (bf16 widens exactly).
    fn host(&self, buf: &Tensor) -> Result<Vec<f32>> {
        buf.storage().download(self.device)
    }

    /// Overwrites `dst` with `data`, rounded to `dst`'s type.
    fn write(&self, dst: &mut Tensor, data: &[f32]) -> Result<()> {
        dst.storage().upload(self.device, data)
    }

    /// `data` in a tensor of the pool stored as `E`.
    fn put<E: Stored>(&self, data: &[f32]) -> Result<Tensor> {
        let mut t = self.alloc::<E>(data.len())?;
        self.write(&mut t, data)?;
        Ok(t)
    }

    /// `values` on the device, uploaded unless they are one of the lists kept from before.
    fn indices(&self, values: &[u32]) -> Result<Rc<Leased<u32>>> {
        self.list(values)
    }

    /// Stages `lists` ([`Ops::stage`]): every list the pass's ops will ask for, the attention
    /// layout's with the tile lists of the ops' storage type.
    fn stage_lists<E: Stored>(&self, b: &BatchLists) -> Result<()> {
        let mut staged = StagedLists::default();
        for list in [b.tokens, &b.layout.positions, b.prediction_rows, b.targets] {
            staged.push(list);
        }
        // The backward's scatters into the embedding and the prediction rows.
        for ids in [b.tokens, b.prediction_rows] {
            IdRows::new(ids).stage(&mut staged);
        }
        HostLayout::new(b.layout, tile_rows::<E>())?.stage(&mut staged);
        staged.push(&Spans::host_table(b.responses, b.targets.len())?);
        if !b.row_weights.is_empty() {
            staged.push(b.row_weights);
        }
        for extra in b.extra {
            match extra {
                ExtraList::I32(x) => staged.push(x),
                ExtraList::F64(x) => staged.push(x),
            }
        }
        self.kept.stage(self.device, &self.pool, staged)
    }

    /// `layout` on the device with tile lists for `E`'s tiles, uploaded unless it is the one
    /// from before.
    fn attention_layout<E: Stored>(&self, layout: &AttentionLayout) -> Result<Rc<DeviceLayout>> {
        let tile = tile_rows::<E>();
        let mut kept = self.attention_layout.borrow_mut();
        if let Some((host, kept_tile, device)) = kept.as_ref() {
            if host == layout && *kept_tile == tile {
                return Ok(device.clone());
            }
        }
        let device = Rc::new(DeviceLayout::from_host(
            HostLayout::new(layout, tile)?,
            self,
        )?);
        *kept = Some((layout.clone(), tile, device.clone()));
        Ok(device)
    }

    fn moe(&self) -> MoeKernels<'_> {
        MoeKernels::new(self.device, self.pool.clone())
    }

    /// The batch's row weights on the device (a list, as the batch's index lists).
    fn row_weights(&self, weights: &[f64]) -> Result<Rc<Leased<f64>>> {
        self.list(weights)
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
        let device = Rc::new(Spans::new(spans, rows, self)?);
        *kept = Some((spans.to_vec(), rows, device.clone()));
        Ok(device)
    }

    /// A tensor of `len` elements of `E` whose contents are undefined until an op writes them.
    fn alloc<E: Stored>(&self, len: usize) -> Result<Tensor> {
        let (view, lease) = self.pool.take::<E>(self.device, len)?;
        Ok(Tensor::leased(view, lease))
    }

    /// Copies `src` into `dst`, cast to `dst`'s type (rounded to nearest into bf16).
    fn convert(&self, src: TensorView, dst: TensorView) -> Result<()> {
        match (src, dst) {
            (TensorView::F32(x), TensorView::Bf16(mut out)) => {
                self.kernels.cast_to_bf16(&x, &mut out)
            }
            (TensorView::Bf16(x), TensorView::F32(mut out)) => {
                self.kernels.cast_to_f32(&x, &mut out)
            }
            (TensorView::F32(x), TensorView::F32(mut out)) => self.device.copy_buffer(&x, &mut out),
            (TensorView::Bf16(x), TensorView::Bf16(mut out)) => {
                self.device.copy_buffer(&x, &mut out)
            }
        }
    }

    /// `t` in a fresh tensor of type `E`.
    fn copy_as<E: Stored>(&self, t: &Tensor) -> Result<Tensor> {
        let copy = self.alloc::<E>(t.len())?;
        self.convert(t.storage(), copy.storage())?;
        Ok(copy)
    }

    /// `t` as an input of an op that runs at `E`: cast when it is stored otherwise.
    fn input<E: Stored>(&self, t: &Tensor) -> Result<Operand<E>> {
        if let Some(view) = E::unwrap(t.storage()) {
            return Ok(Operand { view, _copy: None });
        }
        let copy = self.copy_as::<E>(t)?;
        Ok(Operand {
            view: copy.view_as::<E>("cast operand")?,
            _copy: Some(copy),
        })
    }

    /// Runs `accumulate` on `acc`'s elements as f32: in place when `acc` is f32; when it is
    /// bf16 (a bf16 gradient store), on an f32 copy rounded back to nearest once at the end,
    /// as the CPU's bf16-rounding mode rounds after each accumulating op. An op that
    /// overwrites `acc` (`write`) gets f32 space whose old values it does not read, not a copy.
    fn accumulate_f32(
        &self,
        acc: &mut Tensor,
        write: GradWrite,
        accumulate: impl FnOnce(&mut View<f32>) -> Result<()>,
    ) -> Result<()> {
        match acc.storage() {
            TensorView::F32(mut a) => accumulate(&mut a),
            TensorView::Bf16(mut a) => {
                let sum = match write {
                    GradWrite::Accumulate => self.copy_as::<f32>(acc)?,
                    GradWrite::Overwrite => self.alloc::<f32>(acc.len())?,
                };
                let mut sum = sum.view_as::<f32>("f32 accumulator")?;
                accumulate(&mut sum)?;
                self.kernels.cast_to_bf16(&sum, &mut a)
            }
        }
    }

    /// Elements `start..start + len` of `x` (stored as `E`) in a tensor of their own.
    fn rows_at<E: Stored>(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let out = self.alloc::<E>(len)?;
        let source = x.view_as::<E>("rows")?.slice(start, len)?;
        self.device
            .copy_buffer(&source, &mut out.view_as::<E>("rows out")?)?;
        Ok(out)
    }

    /// `parts` one after the other as `E`.
    fn concat_at<E: Stored>(&self, parts: &[Tensor], total: usize) -> Result<Tensor> {
        let out = self.alloc::<E>(total)?;
        let whole = out.view_as::<E>("concat out")?;
        let mut at = 0;
        for part in parts {
            let part = self.input::<E>(part)?;
            self.device
                .copy_buffer(&part, &mut whole.slice(at, part.view.len())?)?;
            at += part.view.len();
        }
        Ok(out)
    }

    /// RMSNorm's output.
    fn rmsnorm_at<E: Stored>(&self, x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
        let x = self.input::<E>(x)?;
        self.normalize(x.view, None, w, eps)
    }

    fn rmsnorm_residual_at<E: Stored>(
        &self,
        x: &mut Tensor,
        residual: &Tensor,
        w: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        // The sum is written over x, which must be stored as the step stores activations.
        let h = x.view_as::<E>("rmsnorm_residual x")?;
        let residual = self.input::<E>(residual)?;
        self.normalize(h, Some(residual.view), w, eps)
    }

    /// The RMSNorm of `x`, or of `x + residual` written over `x`.
    fn normalize<E: Stored>(
        &self,
        x: View<E>,
        residual: Option<View<E>>,
        w: &Tensor,
        eps: f64,
    ) -> Result<Tensor> {
        let w = self.input::<E>(w)?;
        let y = self.alloc::<E>(x.len())?;
        // The kernel writes each row's 1/rms, which a forward does not keep.
        let rstd = self.alloc::<f32>(x.len() / w.view.len().max(1))?;
        self.kernels.rmsnorm_forward(
            &x,
            residual,
            &w,
            residual.map(|_| x),
            &mut y.view_as::<E>("rmsnorm y")?,
            &mut rstd.view_as::<f32>("rmsnorm rstd")?,
            eps as f32,
        )?;
        Ok(y)
    }

    fn rmsnorm_backward_at<E: Stored>(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        dx_in: Option<&Tensor>,
        eps: f64,
        dw: &mut Tensor,
    ) -> Result<Tensor> {
        let (xv, wv, dyv) = (
            self.input::<E>(x)?,
            self.input::<E>(w)?,
            self.input::<E>(dy)?,
        );
        let dx_in = dx_in.map(|a| self.input::<E>(a)).transpose()?;
        let dx = self.alloc::<E>(x.len())?;
        let dx_in_view = dx_in.as_ref().map(|a| a.view);
        let mut dxv = dx.view_as::<E>("rmsnorm dx")?;
        let write = self.grad_write(&[dw])?;
        let kernels = &self.kernels;
        // The reduction writes `dw` at its stored type, bf16 included.
        macro_rules! backward_into {
            ($dw:expr) => {
                kernels.rmsnorm_backward(&xv, &wv, &dyv, dx_in_view, &mut dxv, $dw, eps as f32)
            };
        }
        match dw.storage() {
            TensorView::F32(mut dw) => backward_into!((&mut dw, write)),
            TensorView::Bf16(mut dw) => backward_into!((&mut dw, write)),
        }?;
        Ok(dx)
    }

    fn embedding_at<E: Stored>(&self, table: &Tensor, ids: &[u32], d: usize) -> Result<Tensor> {
        let ids = self.indices(ids)?;
        let table = self.input::<E>(table)?;
        let out = self.alloc::<E>(ids.len() * d)?;
        self.kernels.embedding_forward(
            &table,
            &*ids,
            &mut out.view_as::<E>("embedding output")?,
            d,
        )?;
        Ok(out)
    }

    fn embedding_backward_at<E: Stored>(
        &self,
        dtable: &mut Tensor,
        dout: &Tensor,
        ids: &[u32],
        d: usize,
    ) -> Result<()> {
        let rows = IdRows::new(ids).on_device(self)?;
        let dout = self.input::<E>(dout)?;
        self.settle(dtable)?;
        match dtable.storage() {
            TensorView::F32(mut t) => self.kernels.embedding_backward(&dout, &rows, &mut t, d),
            TensorView::Bf16(mut t) => self.kernels.embedding_backward(&dout, &rows, &mut t, d),
        }
    }

    fn matmul_at<E: Stored>(
        &self,
        x: &Tensor,
        w: &Tensor,
        (m, k, n): (usize, usize, usize),
    ) -> Result<Tensor> {
        let (x, w) = (self.input::<E>(x)?, self.input::<E>(w)?);
        let y = self.alloc::<E>(m * n)?;
        self.device.gemm(
            &Gemm::projection(m, k, n),
            &x,
            &w,
            &mut y.view_as::<E>("matmul output")?,
        )?;
        Ok(y)
    }

    fn matmul_backward_at<E: Stored>(
        &self,
        inputs: (&Tensor, &Tensor, &Tensor),
        (m, k, n): (usize, usize, usize),
        dw: &mut Tensor,
    ) -> Result<Tensor> {
        let mut dx = self.alloc::<E>(m * k)?;
        self.projection_backward_at::<E>(inputs, (m, k, n), dw, (&mut dx, 0.0))?;
        Ok(dx)
    }

    /// A projection's backward: `dw += dyᵀ · x` (or `=` into a fresh gradient), and
    /// `dx = dy · w + β·dx`: `β` 0 into a fresh output, 1 to sum into an accumulator.
    fn projection_backward_at<E: Stored>(
        &self,
        (x, w, dy): (&Tensor, &Tensor, &Tensor),
        shape: (usize, usize, usize),
        dw: &mut Tensor,
        dx: (&mut Tensor, f32),
    ) -> Result<()> {
        self.projection_weight_grad_at::<E>((x, dy), shape, dw)?;
        self.projection_input_grad_at::<E>((w, dy), shape, dx)
    }

    /// `dw += dyᵀ · x` (or `=` into a fresh gradient) for `y [m, n] = x [m, k] · w [n, k]ᵀ`.
    fn projection_weight_grad_at<E: Stored>(
        &self,
        (x, dy): (&Tensor, &Tensor),
        shape: (usize, usize, usize),
        dw: &mut Tensor,
    ) -> Result<()> {
        let (x, dy) = (self.input::<E>(x)?, self.input::<E>(dy)?);
        self.gemm_accumulate(&self.weight_grad_gemm(dw, shape)?, &dy, &x, dw)
    }

    /// `dx = dy · w + β·dx` for `y [m, n] = x [m, k] · w [n, k]ᵀ`.
    fn projection_input_grad_at<E: Stored>(
        &self,
        (w, dy): (&Tensor, &Tensor),
        (m, k, n): (usize, usize, usize),
        (dx, beta): (&mut Tensor, f32),
    ) -> Result<()> {
        let (w, dy) = (self.input::<E>(w)?, self.input::<E>(dy)?);
        let input_grad = Gemm {
            beta,
            ..Gemm::projection_input_grad(m, k, n)
        };
        self.gemm_accumulate(&input_grad, &dy, &w, dx)
    }

    /// [`Ops::swiglu_down_backward`]: `dact = dy · w` first, then `(dgate, dup)` and the
    /// SwiGLU's output in one pass over gate and up, then `dw` from that output.
    fn swiglu_down_backward_at<E: Stored>(
        &self,
        (gate, up): (&Tensor, &Tensor),
        (w, dy): (&Tensor, &Tensor),
        (m, i, d): (usize, usize, usize),
        dw: &mut Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let mut dact = self.alloc::<E>(m * i)?;
        self.projection_input_grad_at::<E>((w, dy), (m, i, d), (&mut dact, 0.0))?;
        let (act, dgate, dup) = self.swiglu_backward_output_at::<E>(gate, up, &dact)?;
        self.projection_weight_grad_at::<E>((&act, dy), (m, i, d), dw)?;
        Ok((dgate, dup))
    }

    /// `acc = a·b + β·acc` (`gemm.beta`: 1, or 0 to overwrite) in `acc`'s type: bf16 inputs
    /// sum into a bf16 `acc` in the GEMM itself (fp32 compute, one rounding of the sum), which
    /// needs no f32 copy; any other pairing through f32 ([`DeviceOps::accumulate_f32`]: a copy
    /// of `acc`, or with `β = 0` f32 space that is not read).
    fn gemm_accumulate<E: Stored>(
        &self,
        gemm: &Gemm,
        a: &impl AsView<E>,
        b: &impl AsView<E>,
        acc: &mut Tensor,
    ) -> Result<()> {
        match acc.storage() {
            TensorView::Bf16(mut acc) if E::STORED == Dtype::Bf16 => {
                self.device.gemm(gemm, a, b, &mut acc)
            }
            _ => {
                let write = GradWrite::of_beta(gemm.beta);
                self.accumulate_f32(acc, write, |acc| self.device.gemm(gemm, a, b, acc))
            }
        }
    }

    fn attention_at<E: Stored>(
        &self,
        (q, k, v): (&Tensor, &Tensor, &Tensor),
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> Result<(Tensor, Tensor)> {
        let device_layout = self.attention_layout::<E>(layout)?;
        let (q, k, v) = (
            self.input::<E>(q)?,
            self.input::<E>(k)?,
            self.input::<E>(v)?,
        );
        let out = self.alloc::<E>(q.view.len())?;
        let lse = self.alloc::<f32>(layout.len() * shape.heads)?;
        AttentionKernels::with_scratch(self.device, self.pool.clone()).forward(
            &q,
            &k,
            &v,
            &device_layout,
            shape,
            &mut out.view_as::<E>("attention output")?,
            &mut lse.view_as::<f32>("attention lse")?,
        )?;
        Ok((out, lse))
    }

    fn attention_backward_at<E: Stored>(
        &self,
        (q, k, v, out, lse, dout): (&Tensor, &Tensor, &Tensor, &Tensor, &Tensor, &Tensor),
        layout: &AttentionLayout,
        shape: AttentionShape,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let device_layout = self.attention_layout::<E>(layout)?;
        let (q, k, v) = (
            self.input::<E>(q)?,
            self.input::<E>(k)?,
            self.input::<E>(v)?,
        );
        let (out, dout) = (self.input::<E>(out)?, self.input::<E>(dout)?);
        let lse = self.input::<f32>(lse)?;
        let dq = self.alloc::<E>(q.view.len())?;
        let dk = self.alloc::<E>(k.view.len())?;
        let dv = self.alloc::<E>(v.view.len())?;
        AttentionKernels::with_scratch(self.device, self.pool.clone()).backward(
            &q,
            &k,
            &v,
            &out,
            &lse,
            &dout,
            &device_layout,
            shape,
            &mut dq.view_as::<E>("attention dq")?,
            &mut dk.view_as::<E>("attention dk")?,
            &mut dv.view_as::<E>("attention dv")?,
        )?;
        Ok((dq, dk, dv))
    }

    fn swiglu_at<E: Stored>(&self, gate: &Tensor, up: &Tensor) -> Result<Tensor> {
        let (gate, up) = (self.input::<E>(gate)?, self.input::<E>(up)?);
        let out = self.alloc::<E>(gate.view.len())?;
        self.kernels
            .swiglu_forward(&gate, &up, &mut out.view_as::<E>("swiglu output")?)?;
        Ok(out)
    }

    fn swiglu_backward_at<E: Stored>(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        self.swiglu_grads::<E>((gate, up, dy), None)
    }

    /// The SwiGLU's output `silu(gate) · up` made again in its backward's pass, with
    /// `(dgate, dup)`: `(output, dgate, dup)`.
    fn swiglu_backward_output_at<E: Stored>(
        &self,
        gate: &Tensor,
        up: &Tensor,
        dy: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let out = self.alloc::<E>(gate.len())?;
        let view = out.view_as::<E>("swiglu output")?;
        let (dgate, dup) = self.swiglu_grads::<E>((gate, up, dy), Some(view))?;
        Ok((out, dgate, dup))
    }

    /// `(dgate, dup)`, and the forward's output into `out` where given.
    fn swiglu_grads<E: Stored>(
        &self,
        (gate, up, dy): (&Tensor, &Tensor, &Tensor),
        out: Option<View<E>>,
    ) -> Result<(Tensor, Tensor)> {
        let (gate, up, dy) = (
            self.input::<E>(gate)?,
            self.input::<E>(up)?,
            self.input::<E>(dy)?,
        );
        let dgate = self.alloc::<E>(gate.view.len())?;
        let dup = self.alloc::<E>(up.view.len())?;
        self.kernels.swiglu_backward(
            (&gate, &up, &dy),
            &mut dgate.view_as::<E>("swiglu dgate")?,
            &mut dup.view_as::<E>("swiglu dup")?,
            out,
        )?;
        Ok((dgate, dup))
    }

    fn response_scores_at<E: Stored>(
        &self,
        (h, head): (&Tensor, &Tensor),
        targets: &[u32],
        spans: &[ResponseSpan],
        (d, vocab): (usize, usize),
    ) -> Result<(DeviceTable, Tensor)> {
        let rows = targets.len();
        let device_targets = self.indices(targets)?;
        let (h, head) = (self.input::<E>(h)?, self.input::<E>(head)?);
        let (lse, logp_rows) = (self.alloc::<f32>(rows)?, self.alloc::<f32>(rows)?);
        let mut logp = logp_rows.view_as::<f32>("scoring logp")?;
        self.scoring::<E>(vocab).forward(
            &h,
            &head,
            &*device_targets,
            d,
            &mut lse.view_as::<f32>("scoring lse")?,
            &mut logp,
        )?;
        let mut table = self.pool.lease::<f64>(self.device, 3 * spans.len())?;
        self.kernels
            .response_stats(&logp, &*self.spans(spans, rows)?, &mut table)?;
        Ok((DeviceTable::new(table), lse))
    }

    fn response_scores_backward_at<E: Stored>(
        &self,
        (h, head, lse): (&Tensor, &Tensor, &Tensor),
        targets: &[u32],
        (spans, grads, scale): (&[ResponseSpan], &DeviceTable, f64),
        (d, vocab): (usize, usize),
        dhead: &mut Tensor,
    ) -> Result<Tensor> {
        let rows = targets.len();
        let device_targets = self.indices(targets)?;
        let (hv, head, lse) = (
            self.input::<E>(h)?,
            self.input::<E>(head)?,
            self.input::<f32>(lse)?,
        );
        let coef_rows = self.alloc::<f32>(rows)?;
        let mut coef = coef_rows.view_as::<f32>("scoring coefficients")?;
        self.kernels.row_coef(
            &*self.spans(spans, rows)?,
            grads.values()?,
            scale,
            &mut coef,
        )?;
        let dh = self.alloc::<E>(h.len())?;
        let mut dhv = dh.view_as::<E>("scoring dh")?;
        let write = self.grad_write(&[dhead])?;
        let scoring = self.scoring::<E>(vocab);
        let (targets, d) = (&*device_targets, d);
        match dhead.storage() {
            // One chunk's GEMM writes a bf16 gradient with one rounding, as the f32 copy
            // would after it, without the copy ([V, d] f32) and its cast.
            TensorView::Bf16(mut dhead)
                if E::STORED == Dtype::Bf16 && scoring.single_chunk(rows) =>
            {
                let dhead = (&mut dhead, write);
                scoring.backward(&hv, &head, targets, &lse, &coef, d, &mut dhv, dhead)
            }
            _ => self.accumulate_f32(dhead, write, |dhead| {
                let dhead = (dhead, write);
                scoring.backward(&hv, &head, targets, &lse, &coef, d, &mut dhv, dhead)
            }),
        }?;
        Ok(dh)
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

    fn storage(&self) -> Dtype {
        self.storage
    }

    fn check_moe(&self, experts: usize, k: usize) -> Result<()> {
        super::moe::check_routing(experts, k)
    }

    /// The first error since the last call, if any operation failed; clears it.
    fn check(&self) -> Result<()> {
        match self.error.borrow_mut().take() {
            Some(e) => Err(e.context(format!("on {}", self.device.describe()))),
            None => Ok(()),
        }
    }

    fn stage(&self, lists: &BatchLists) {
        self.attempt(
            "staging a batch",
            || (),
            || at_storage!(self.stage_lists(lists)),
        )
    }

    /// Stored in the ops' type (bf16 rounds to nearest even).
    fn upload(&self, data: &[f32]) -> Tensor {
        self.attempt(
            "upload",
            || Self::placeholder(data.len()),
            || at_storage!(self.put(data)),
        )
    }

    fn download(&self, buf: &Tensor) -> Vec<f32> {
        self.attempt("download", || vec![0.0; buf.len()], || self.host(buf))
    }

    /// Always f32: zeros start accumulators (gradients, scatters).
    fn zeros(&self, len: usize) -> Tensor {
        self.attempt(
            "zeros",
            || Self::placeholder(len),
            || {
                let t = self.alloc::<f32>(len)?;
                self.device.zero(&mut t.view_as::<f32>("zeros")?)?;
                Ok(t)
            },
        )
    }

    /// In fp32, stored back in `acc`'s type: one pass when both are bf16.
    fn add_assign(&self, acc: &mut Tensor, x: &Tensor) {
        self.attempt(
            "add_assign",
            || (),
            || {
                self.settle(acc)?;
                match (acc.storage(), x.storage()) {
                    (TensorView::Bf16(mut a), TensorView::Bf16(x)) => {
                        self.kernels.add_assign(&mut a, &x)
                    }
                    _ => {
                        let x = self.input::<f32>(x)?;
                        let add = |a: &mut View<f32>| self.kernels.add_assign(a, &x);
                        self.accumulate_f32(acc, GradWrite::Accumulate, add)
                    }
                }
            },
        )
    }

    fn embedding(&self, table: &Tensor, ids: &[u32], d: usize) -> Tensor {
        self.attempt(
            "embedding",
            || Self::placeholder(ids.len() * d),
            || at_storage!(self.embedding_at(table, ids, d)),
        )
    }

    fn embedding_backward(&self, dtable: &mut Tensor, dout: &Tensor, ids: &[u32], d: usize) {
        self.attempt(
            "embedding_backward",
            || (),
            || at_storage!(self.embedding_backward_at(dtable, dout, ids, d)),
        )
    }

    fn rmsnorm(&self, x: &Tensor, w: &Tensor, _d: usize, eps: f64) -> Tensor {
        self.attempt(
            "rmsnorm",
            || Self::placeholder(x.len()),
            || at_storage!(self.rmsnorm_at(x, w, eps)),
        )
    }

    fn rmsnorm_residual(
        &self,
        x: &mut Tensor,
        residual: &Tensor,
        w: &Tensor,
        _d: usize,
        eps: f64,
    ) -> Tensor {
        let len = x.len();
        self.attempt(
            "rmsnorm_residual",
            || Self::placeholder(len),
            || at_storage!(self.rmsnorm_residual_at(x, residual, w, eps)),
        )
    }

    fn rmsnorm_backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        dx_in: Option<&Tensor>,
        _d: usize,
        eps: f64,
        dw: &mut Tensor,
    ) -> Tensor {
        self.attempt(
            "rmsnorm_backward",
            || Self::placeholder(x.len()),
            || at_storage!(self.rmsnorm_backward_at(x, w, dy, dx_in, eps, dw)),
        )
    }

    fn matmul(&self, x: &Tensor, w: &Tensor, m: usize, k: usize, n: usize) -> Tensor {
        self.attempt(
            "matmul",
            || Self::placeholder(m * n),
            || at_storage!(self.matmul_at(x, w, (m, k, n))),
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
            || at_storage!(self.matmul_backward_at((x, w, dy), (m, k, n), dw)),
        )
    }

    fn matmul_backward_into(
        &self,
        x: &Tensor,
        w: &Tensor,
        dy: &Tensor,
        shape: (usize, usize, usize),
        dw: &mut Tensor,
        acc: &mut Tensor,
    ) {
        self.attempt(
            "matmul_backward_into",
            || (),
            || at_storage!(self.projection_backward_at((x, w, dy), shape, dw, (acc, 1.0))),
        )
    }

    /// In `x`'s own type.
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
                match x.storage() {
                    TensorView::F32(mut v) => {
                        self.kernels
                            .rope(&mut v, &*positions, heads, head_dim, theta, inverse)
                    }
                    TensorView::Bf16(mut v) => {
                        self.kernels
                            .rope(&mut v, &*positions, heads, head_dim, theta, inverse)
                    }
                }
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
            || at_storage!(self.attention_at((q, k, v), layout, shape)),
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
            || at_storage!(self.attention_backward_at((q, k, v, out, lse, dout), layout, shape)),
        )
    }

    fn swiglu(&self, gate: &Tensor, up: &Tensor) -> Tensor {
        self.attempt(
            "swiglu",
            || Self::placeholder(gate.len()),
            || at_storage!(self.swiglu_at(gate, up)),
        )
    }

    fn swiglu_backward(&self, gate: &Tensor, up: &Tensor, dy: &Tensor) -> (Tensor, Tensor) {
        self.attempt(
            "swiglu_backward",
            || (Self::placeholder(gate.len()), Self::placeholder(up.len())),
            || at_storage!(self.swiglu_backward_at(gate, up, dy)),
        )
    }

    fn swiglu_down_backward(
        &self,
        gate_up: (&Tensor, &Tensor),
        down: (&Tensor, &Tensor),
        shape: (usize, usize, usize),
        dw: &mut Tensor,
    ) -> (Tensor, Tensor) {
        let len = shape.0 * shape.1;
        self.attempt(
            "swiglu_down_backward",
            || (Self::placeholder(len), Self::placeholder(len)),
            || at_storage!(self.swiglu_down_backward_at(gate_up, down, shape, dw)),
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
                let x = self.input::<f32>(x)?;
                let rows_on_device = self.indices(rows)?;
                let scale = match scale {
                    Some(s) => Some(self.list(s)?),
                    None => None,
                };
                let out = self.alloc::<f32>(rows.len() * d)?;
                self.moe().gather(
                    &x,
                    rows_on_device.view(),
                    scale.as_ref().map(AsView::view),
                    &mut out.view_as::<f32>("gather_rows out")?,
                    d,
                )?;
                Ok(out)
            },
        )
    }

    /// Stored back in `dst`'s type.
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
                self.settle(dst)?;
                let mut host_dst = self.host(dst)?;
                CpuOps.scatter_add_rows(&mut host_dst, &self.host(src)?, rows, scale, d);
                self.write(dst, &host_dst)
            },
        )
    }

    /// In `x`'s own type.
    fn rows(&self, x: &Tensor, start: usize, len: usize, d: usize) -> Tensor {
        self.attempt(
            "rows",
            || Self::placeholder(len * d),
            || match x.dtype() {
                Dtype::F32 => self.rows_at::<f32>(x, start * d, len * d),
                Dtype::Bf16 => self.rows_at::<bf16>(x, start * d, len * d),
            },
        )
    }

    /// In the first part's type, the others cast to it.
    fn concat(&self, parts: &[Tensor]) -> Tensor {
        let total = parts.iter().map(Tensor::len).sum();
        self.attempt(
            "concat",
            || Self::placeholder(total),
            || match parts.first().map_or(self.storage, Tensor::dtype) {
                Dtype::F32 => self.concat_at::<f32>(parts, total),
                Dtype::Bf16 => self.concat_at::<bf16>(parts, total),
            },
        )
    }

    fn moe_route(&self, logits: &Tensor, experts: usize, k: usize) -> Option<DeviceRouting> {
        self.attempt(
            "moe_route",
            || None,
            || {
                let logits = self.input::<f32>(logits)?;
                Ok(Some(self.moe().route(&logits, experts, k)?))
            },
        )
    }

    fn moe_expert_matmul(
        &self,
        x: &Tensor,
        w: &[&Tensor],
        routing: &Option<DeviceRouting>,
        k_in: usize,
        n: usize,
    ) -> Tensor {
        let rows = routing.as_ref().map_or(0, DeviceRouting::slots);
        self.attempt(
            "moe_expert_matmul",
            || Self::placeholder(rows * n),
            || at_storage!(self.expert_matmul_at((x, w), routed(routing)?, (k_in, n))),
        )
    }

    fn moe_expert_matmul_backward(
        &self,
        x: &Tensor,
        w: &[&Tensor],
        dy: &Tensor,
        routing: &Option<DeviceRouting>,
        k_in: usize,
        n: usize,
        dw: &mut [&mut Tensor],
    ) -> Tensor {
        let rows = routing.as_ref().map_or(0, DeviceRouting::slots);
        self.attempt(
            "moe_expert_matmul_backward",
            || Self::placeholder(rows * k_in),
            || {
                let r = routed(routing)?;
                at_storage!(self.expert_matmul_backward_at((x, w, dy), r, (k_in, n), dw))
            },
        )
    }

    fn moe_swiglu_down_backward(
        &self,
        gate_up: (&Tensor, &Tensor),
        down: (&[&Tensor], &Tensor),
        routing: &Option<DeviceRouting>,
        (i, d): (usize, usize),
        dw: &mut [&mut Tensor],
    ) -> (Tensor, Tensor) {
        let len = routing.as_ref().map_or(0, DeviceRouting::slots) * i;
        self.attempt(
            "moe_swiglu_down_backward",
            || (Self::placeholder(len), Self::placeholder(len)),
            || {
                let r = routed(routing)?;
                at_storage!(self.moe_swiglu_down_backward_at(gate_up, down, r, (i, d), dw))
            },
        )
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
            || at_storage!(self.permute_at(x, routed(routing)?, weighted, d)),
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
            || at_storage!(self.unpermute_at(y, routed(routing)?, weighted, d)),
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
                let d_weights = at_storage!(self.slot_dots_at(dout, y, r, d))?;
                let row_weights = match &aux {
                    Some(a) => Some(self.row_weights(a.row_weights)?),
                    None => None,
                };
                let balance = match &aux {
                    Some(a) => Some(balanced(a.balance)?),
                    None => None,
                };
                let aux = match (&aux, balance, &row_weights) {
                    (Some(a), Some(b), Some(w)) => Some((b, a.coef, &**w)),
                    _ => None,
                };
                let dz = self.alloc::<f32>(logits)?;
                let mut view = dz.view_as::<f32>("moe_route_backward dz")?;
                moe.route_backward(r, &d_weights, aux, &mut view)?;
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
            || at_storage!(self.response_scores_at((h, head), targets, spans, (d, vocab))),
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
        self.attempt(
            "response_scores_backward",
            || Self::placeholder(h.len()),
            || {
                at_storage!(self.response_scores_backward_at(
                    (h, head, lse),
                    targets,
                    (spans, grads, scale),
                    (d, vocab),
                    dhead
                ))
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
