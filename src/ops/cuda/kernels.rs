//! Typed launches of the kernels of `cuda/*.cu` on a [`Device`]: each wrapper checks the
//! buffers' lengths, picks the launch shape and passes the arguments in the kernel's order.
//! The kernels' contracts are in their source files.

use super::device::{AsView, Buffer, Device, Float, View};
use super::emu::{KernelArgs, LaunchConfig};
use super::fresh::GradWrite;
use super::pool::Pool;
use crate::ops::optimizer::{AdamWConfig, FlatStep, StepFactors};
use anyhow::{ensure, Context, Result};
use half::bf16;

/// The kernels on one device, with the launch shape they use: `block` threads per block and
/// at most `max_grid` blocks (the kernels loop over whatever a grid does not cover).
pub struct Kernels<'a> {
    pub device: &'a Device,
    pub block: u32,
    pub max_grid: u32,
    /// Where launches that need temporary device memory (partial sums) take it from, so
    /// that a repeated launch allocates nothing.
    pub scratch: Pool,
    /// The emulator's scheduling seed for every launch (None: [`super::emu::default_seed`]),
    /// for tests that a result does not depend on block order or thread interleaving.
    pub emu_seed: Option<u64>,
}

/// Blocks of the partial sums of the gradient norm: enough to fill a GPU, few enough for one
/// block to add up.
const NORM_PARTS: u32 = 1024;

/// The device state of the gradient norm over a fixed set of gradient buffers
/// ([`Kernels::grad_norm_workspace`]).
pub struct GradNormWorkspace {
    /// The gradients' element type, as the kernels' names spell it.
    dtype: &'static str,
    pointers: Buffer<u64>,
    lens: Buffer<i64>,
    /// The 16-byte packs of the longest buffer: one thread each in the clipping's launch.
    longest_packs: usize,
    partials: Buffer<f32>,
    /// The count of blocks done, which the last block resets to zero (cuda/grad_norm.cu).
    done: Buffer<u32>,
    /// Set by [`Kernels::flag_nonfinite`] to drop the step; the norm's launch reads it into
    /// its coef (NaN: the AdamW kernels skip the step) and resets it.
    drop: Buffer<u32>,
    norm_and_coef: Buffer<f32>,
}

/// The per-step factors of `adamw_f32` / `adamw_bf16` (`struct AdamWStep` in cuda/adamw.cu,
/// field for field), the CPU's AdamW's.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    pub factors: StepFactors,
    /// The run's seed of the stochastic roundings (docs/numerics.md §4): with the step and the
    /// element's flat index it makes every element's hash its own, whose 16-bit fields the
    /// stores draw.
    pub seed: u64,
    /// The step (1 for the first update).
    pub step: u64,
}

impl AdamWStep {
    pub fn new(config: &AdamWConfig, step: u64, lr: f64, seed: u64) -> Self {
        AdamWStep {
            factors: FlatStep::new(config, step, lr, seed).factors(),
            seed,
            step,
        }
    }
}

pub(super) fn same_len<A: bytemuck::Pod, B: bytemuck::Pod>(
    what: &str,
    a: View<A>,
    b: View<B>,
) -> Result<()> {
    ensure!(
        a.len() == b.len(),
        "{what}: buffers of {} and {} elements",
        a.len(),
        b.len()
    );
    Ok(())
}

/// The elements of one 16-byte access of `E`: the chunk a thread of the element-wise and row
/// kernels takes (load_chunk and RowChunks in cuda/contralign.cuh).
pub fn chunk<E>() -> usize {
    16 / size_of::<E>()
}

pub(super) fn rows_of(what: &str, len: usize, d: usize) -> Result<usize> {
    ensure!(
        d > 0 && len.is_multiple_of(d),
        "{what}: {len} elements are not rows of {d}"
    );
    Ok(len / d)
}

impl<'a> Kernels<'a> {
    /// The shape every caller but the tests wants: 256 threads, up to 4096 blocks.
    pub fn new(device: &'a Device) -> Self {
        Kernels::with_scratch(device, Pool::default())
    }

    /// As [`Kernels::new`], with temporary memory from `scratch`.
    pub fn with_scratch(device: &'a Device, scratch: Pool) -> Self {
        Kernels {
            device,
            block: 256,
            max_grid: 4096,
            scratch,
            emu_seed: None,
        }
    }

    pub(super) fn launch(&self, name: &str, blocks: usize, args: &KernelArgs) -> Result<()> {
        let grid = blocks.clamp(1, self.max_grid as usize) as u32;
        // SAFETY: every wrapper passes device pointers of live buffers of `self.device` whose
        // lengths it has checked against what the kernel touches.
        unsafe {
            let config = LaunchConfig::new(grid, self.block, 0);
            self.device.launch_seeded(name, config, args, self.emu_seed)
        }
    }

    fn element_blocks(&self, n: usize) -> usize {
        n.div_ceil(self.block as usize)
    }

    /// `out = silu(gate) * up`.
    pub fn swiglu_forward<E: Float>(
        &self,
        gate: &impl AsView<E>,
        up: &impl AsView<E>,
        out: &mut impl AsView<E>,
    ) -> Result<()> {
        let (gate, up, out) = (gate.view(), up.view(), out.view());
        same_len("swiglu", gate, up)?;
        same_len("swiglu", gate, out)?;
        let mut args = KernelArgs::new();
        args.buffer(&gate)
            .buffer(&up)
            .buffer(&out)
            .arg(gate.len() as i64);
        let name = format!("swiglu_forward_{}", E::DTYPE);
        self.launch(&name, self.element_blocks(gate.len()), &args)
    }

    /// `(dgate, dup)` from `dout`, and `out = silu(gate) * up` again where `out` is given (a
    /// backward that did not keep the forward's output), in the same pass.
    pub fn swiglu_backward<E: Float>(
        &self,
        (gate, up, dout): (&impl AsView<E>, &impl AsView<E>, &impl AsView<E>),
        dgate: &mut impl AsView<E>,
        dup: &mut impl AsView<E>,
        out: Option<View<E>>,
    ) -> Result<()> {
        let (gate, up, dout, dgate, dup) = (
            gate.view(),
            up.view(),
            dout.view(),
            dgate.view(),
            dup.view(),
        );
        for b in [up, dout, dgate, dup].into_iter().chain(out) {
            same_len("swiglu_backward", gate, b)?;
        }
        let mut args = KernelArgs::new();
        args.buffer(&gate)
            .buffer(&up)
            .buffer(&dout)
            .buffer(&dgate)
            .buffer(&dup)
            .optional_buffer(out)
            .arg(gate.len() as i64);
        let name = format!("swiglu_backward_{}", E::DTYPE);
        self.launch(&name, self.element_blocks(gate.len()), &args)
    }

    /// `acc += x`.
    pub fn add_assign<E: Float>(&self, acc: &mut impl AsView<E>, x: &impl AsView<E>) -> Result<()> {
        let (acc, x) = (acc.view(), x.view());
        same_len("add_assign", acc, x)?;
        let mut args = KernelArgs::new();
        args.buffer(&acc).buffer(&x).arg(acc.len() as i64);
        let kernel = format!("add_assign_{}", E::DTYPE);
        self.launch(&kernel, self.element_blocks(acc.len()), &args)
    }

    /// `out[t] = table[ids[t]]`, rows of `d`; an id `>= vocab` fails the launch.
    pub fn embedding_forward<E: Float>(
        &self,
        table: &impl AsView<E>,
        ids: &impl AsView<u32>,
        out: &mut impl AsView<E>,
        d: usize,
    ) -> Result<()> {
        let (table, ids, out) = (table.view(), ids.view(), out.view());
        let vocab = rows_of("embedding table", table.len(), d)?;
        ensure!(
            out.len() == ids.len() * d,
            "embedding: {} ids need {} outputs, got {}",
            ids.len(),
            ids.len() * d,
            out.len()
        );
        let mut args = KernelArgs::new();
        args.buffer(&table)
            .buffer(&ids)
            .buffer(&out)
            .arg(ids.len() as i64)
            .arg(d as i32)
            .arg(vocab as u32);
        let name = format!("embedding_forward_{}", E::DTYPE);
        self.launch(
            &name,
            self.element_blocks(out.len().div_ceil(chunk::<E>())),
            &args,
        )
    }

    /// `h = x + residual` (stored in `h_out` when given), `y = w * h / rms(h)`, `rstd` per
    /// row.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_forward<E: Float>(
        &self,
        x: &impl AsView<E>,
        residual: Option<View<E>>,
        w: &impl AsView<E>,
        h_out: Option<View<E>>,
        y: &mut impl AsView<E>,
        rstd: &mut impl AsView<f32>,
        eps: f32,
    ) -> Result<()> {
        let (x, w, y, rstd) = (x.view(), w.view(), y.view(), rstd.view());
        same_len("rmsnorm y", x, y)?;
        let d = w.len();
        let rows = rows_of("rmsnorm", x.len(), d)?;
        if let Some(r) = residual {
            same_len("rmsnorm residual", x, r)?;
        }
        if let Some(h) = h_out {
            same_len("rmsnorm h", x, h)?;
        }
        ensure!(rstd.len() == rows, "rmsnorm: rstd needs {rows} elements");
        let mut args = KernelArgs::new();
        args.buffer(&x)
            .optional_buffer(residual)
            .buffer(&w)
            .optional_buffer(h_out)
            .buffer(&y)
            .buffer(&rstd)
            .arg(rows as i32)
            .arg(d as i32)
            .arg(eps);
        let name = format!("rmsnorm_forward_{}", E::DTYPE);
        self.launch(&name, rows, &args)
    }

    /// `dh = d(loss)/dh (+ dh_in)`; `dw +=` the weight's gradient (summed in fp32, stored
    /// as `G` with one rounding; `=` as `write` says). The rows' 1/rms is taken again from `h` (with `eps`) inside the kernel.
    #[allow(clippy::too_many_arguments)]
    pub fn rmsnorm_backward<E: Float, G: Float>(
        &self,
        h: &impl AsView<E>,
        w: &impl AsView<E>,
        dy: &impl AsView<E>,
        dh_in: Option<View<E>>,
        dh: &mut impl AsView<E>,
        (dw, write): (&mut impl AsView<G>, GradWrite),
        eps: f32,
    ) -> Result<()> {
        let (h, w, dy, dh, dw) = (h.view(), w.view(), dy.view(), dh.view(), dw.view());
        let d = w.len();
        let rows = rows_of("rmsnorm_backward", h.len(), d)?;
        same_len("rmsnorm_backward dy", h, dy)?;
        same_len("rmsnorm_backward dh", h, dh)?;
        if let Some(g) = dh_in {
            same_len("rmsnorm_backward dh_in", h, g)?;
        }
        same_len("rmsnorm_backward dw", w, dw)?;
        let parts = self.rmsnorm_dw_parts(rows);
        let (partial, _lease) = self.scratch.take::<f32>(self.device, parts * d)?;
        let mut args = KernelArgs::new();
        args.buffer(&h)
            .buffer(&w)
            .buffer(&dy)
            .optional_buffer(dh_in)
            .buffer(&dh)
            .buffer(&partial)
            .arg(rows as i32)
            .arg(d as i32)
            .arg(eps);
        self.launch(&format!("rmsnorm_backward_{}", E::DTYPE), parts, &args)?;
        let mut args = KernelArgs::new();
        args.buffer(&partial)
            .arg(parts as i32)
            .arg(d as i32)
            .buffer(&dw)
            .arg(write.accumulate_flag());
        // A thread per chunk of 4 elements (cuda/rmsnorm.cu).
        self.launch(
            &format!("rmsnorm_dw_reduce_{}", G::DTYPE),
            self.element_blocks(d.div_ceil(4)),
            &args,
        )
    }

    /// The blocks of the RMSNorm backward: each sums 8 rows or more of dw into its partial
    /// row, so that the partials (written, then read by rmsnorm_dw_reduce_*) add at most an
    /// eighth of the bytes the rows themselves move.
    pub fn rmsnorm_dw_parts(&self, rows: usize) -> usize {
        rows.div_ceil(8).clamp(1, self.max_grid as usize)
    }

    /// Rotates `x [T, heads * head_dim]` in place by each token's position (rotate-half);
    /// `inverse` rotates back (the backward).
    pub fn rope<E: Float>(
        &self,
        x: &mut impl AsView<E>,
        positions: &impl AsView<u32>,
        heads: usize,
        head_dim: usize,
        theta: f64,
        inverse: bool,
    ) -> Result<()> {
        let (x, positions) = (x.view(), positions.view());
        let tokens = positions.len();
        ensure!(
            x.len() == tokens * heads * head_dim,
            "rope: {tokens} tokens of {heads} heads of {head_dim} need {} elements, got {}",
            tokens * heads * head_dim,
            x.len()
        );
        // The token's cosines and sines (cuda/rope.cu).
        let shared = 2 * (head_dim / 2) * size_of::<f32>();
        let mut args = KernelArgs::new();
        args.buffer(&x)
            .buffer(&positions)
            .arg(tokens as i32)
            .arg(heads as i32)
            .arg(head_dim as i32)
            .arg(theta)
            .arg(inverse as i32);
        let grid = tokens.clamp(1, self.max_grid as usize) as u32;
        // A thread per (head, chunk) of a token, in whole warps, up to the usual block: the
        // 8 KV heads of 128 in bf16 make 64, whom 256 threads would leave three quarters idle.
        // Where a half head is not whole chunks, these threads take the token's (head, j)
        // pairs one at a time instead, about P each.
        let items = heads * (head_dim / 2).div_ceil(chunk::<E>());
        let threads = (items.next_multiple_of(32) as u32).clamp(32, self.block.max(32));
        // SAFETY: `x` holds `tokens` rows of `heads * head_dim` (checked above) and `positions`
        // one per token; the shared memory holds the `head_dim / 2` cosines and sines.
        unsafe {
            let config = LaunchConfig::new(grid, threads, shared as u32);
            self.device
                .launch_seeded(&format!("rope_{}", E::DTYPE), config, &args, self.emu_seed)
        }
    }

    /// f32 to bf16, rounding to nearest even.
    pub fn cast_to_bf16(&self, x: &impl AsView<f32>, out: &mut impl AsView<bf16>) -> Result<()> {
        let (x, out) = (x.view(), out.view());
        same_len("cast_to_bf16", x, out)?;
        let mut args = KernelArgs::new();
        args.buffer(&x).buffer(&out).arg(x.len() as i64);
        self.launch("cast_f32_to_bf16", self.element_blocks(x.len()), &args)
    }

    pub fn cast_to_f32(&self, x: &impl AsView<bf16>, out: &mut impl AsView<f32>) -> Result<()> {
        let (x, out) = (x.view(), out.view());
        same_len("cast_to_f32", x, out)?;
        let mut args = KernelArgs::new();
        args.buffer(&x).buffer(&out).arg(x.len() as i64);
        self.launch("cast_bf16_to_f32", self.element_blocks(x.len()), &args)
    }

    /// What [`Kernels::grad_norm`] and [`Kernels::clip`] need for `grads`, made once: the
    /// buffers' addresses and lengths on the device, the partial sums and the result, so
    /// that a step's norm allocates and uploads nothing.
    pub fn grad_norm_workspace<E: Float>(&self, grads: &[View<E>]) -> Result<GradNormWorkspace> {
        // The kernels reach the gradients through a table of addresses, past the launch's
        // check of its buffers' memory: check them here.
        let on_host = matches!(self.device, Device::Emu);
        ensure!(
            grads.iter().all(|g| g.is_on_host() == on_host),
            "grad_norm: a gradient buffer is not in the memory of the device it runs on"
        );
        let pointers: Vec<u64> = grads.iter().map(|b| b.device_ptr()).collect();
        let lens: Vec<i64> = grads.iter().map(|b| b.len() as i64).collect();
        let longest = grads.iter().map(|g| g.len()).max().unwrap_or(0);
        // A thread per 16-byte pack of the longest buffer, up to NORM_PARTS blocks.
        let longest_packs = longest.div_ceil(chunk::<E>());
        let parts = self
            .element_blocks(longest_packs)
            .clamp(1, NORM_PARTS.min(self.max_grid) as usize);
        Ok(GradNormWorkspace {
            dtype: E::DTYPE,
            pointers: self.device.upload(&pointers)?,
            lens: self.device.upload(&lens)?,
            longest_packs,
            partials: self.device.alloc(parts)?,
            done: self.device.upload(&[0u32])?,
            drop: self.device.upload(&[0u32])?,
            norm_and_coef: self.device.alloc(2)?,
        })
    }

    /// The global L2 norm of the workspace's gradients and clip_grad_norm_'s factor for
    /// `max_norm` (0: none), as `[norm, coef]` on the device for [`Kernels::clip`] or the
    /// AdamW kernels; coef is NaN, and the AdamW kernels skip the step, when
    /// [`Kernels::flag_nonfinite`] found a value that was not finite since the last norm.
    pub fn grad_norm(&self, ws: &GradNormWorkspace, max_norm: f32) -> Result<View<f32>> {
        let mut args = KernelArgs::new();
        args.buffer(&ws.pointers)
            .buffer(&ws.lens)
            .arg(ws.pointers.len() as i32)
            .buffer(&ws.partials)
            .buffer(&ws.done)
            .buffer(&ws.drop)
            .arg(max_norm)
            .buffer(&ws.norm_and_coef);
        let kernel = format!("grad_norm_{}", ws.dtype);
        self.launch(&kernel, ws.partials.len(), &args)?;
        Ok(ws.norm_and_coef.view())
    }

    /// Marks the step that `ws`'s next norm finishes as dropped when a value of `values` is
    /// not finite: a micro-batch's loss, read by the device instead of the host.
    pub fn flag_nonfinite(&self, values: &impl AsView<f64>, ws: &GradNormWorkspace) -> Result<()> {
        let values = values.view();
        let mut args = KernelArgs::new();
        args.buffer(&values)
            .arg(i32::try_from(values.len()).context("flag_nonfinite: too many values")?)
            .buffer(&ws.drop);
        self.launch("flag_nonfinite_f64", 1, &args)
    }

    /// Multiplies every gradient of the workspace by the factor [`Kernels::grad_norm`] left
    /// there, when it is below 1.
    pub fn clip(&self, ws: &GradNormWorkspace) -> Result<()> {
        let mut args = KernelArgs::new();
        args.buffer(&ws.pointers)
            .buffer(&ws.lens)
            .arg(ws.pointers.len() as i32)
            .buffer(&ws.norm_and_coef);
        let kernel = format!("grad_clip_scale_{}", ws.dtype);
        self.launch(&kernel, self.element_blocks(ws.longest_packs), &args)
    }

    /// One AdamW step of an f32 tensor: exactly the CPU's `AdamW::update`. With `clip` (the
    /// `[norm, coef]` of [`Kernels::grad_norm`]) the gradient is clipped first, and a
    /// non-finite norm skips the step on the device.
    pub fn adamw_f32(
        &self,
        param: &mut impl AsView<f32>,
        grad: &impl AsView<f32>,
        m: &mut impl AsView<f32>,
        v: &mut impl AsView<f32>,
        clip: Option<View<f32>>,
        step: &AdamWStep,
    ) -> Result<()> {
        let (param, grad, m, v) = (param.view(), grad.view(), m.view(), v.view());
        for b in [grad, m, v] {
            same_len("adamw", param, b)?;
        }
        let mut args = KernelArgs::new();
        args.buffer(&param)
            .buffer(&grad)
            .buffer(&m)
            .buffer(&v)
            .arg(param.len() as i64)
            .optional_buffer(clip)
            .arg(*step);
        self.launch("adamw_f32", self.adamw_blocks(param.len()), &args)
    }

    /// One AdamW step of a bf16 tensor: through its fp32 `master` copy when given (the bf16
    /// copy rounded to nearest from it), otherwise with stochastic rounding; gradients `G`
    /// and moments `M` each f32 or bf16 (bf16 moments rounded stochastically); `clip` as for
    /// [`Kernels::adamw_f32`]. The random bits hash (`step.seed`, `step.step`, store, index):
    /// give every flat store, or every tensor launched alone, its own seed.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_bf16<G: Float, M: Float>(
        &self,
        param: &mut impl AsView<bf16>,
        master: Option<View<f32>>,
        grad: &impl AsView<G>,
        m: &mut impl AsView<M>,
        v: &mut impl AsView<M>,
        clip: Option<View<f32>>,
        step: &AdamWStep,
    ) -> Result<()> {
        let (param, grad, m, v) = (param.view(), grad.view(), m.view(), v.view());
        same_len("adamw grad", param, grad)?;
        for b in [m, v] {
            same_len("adamw moment", param, b)?;
        }
        if let Some(b) = master {
            same_len("adamw master", param, b)?;
        }
        let mut args = KernelArgs::new();
        args.buffer(&param)
            .optional_buffer(master)
            .buffer(&grad)
            .buffer(&m)
            .buffer(&v)
            .arg(param.len() as i64)
            .optional_buffer(clip)
            .arg(*step);
        let kernel = format!("adamw_bf16_g{}_m{}", G::DTYPE, M::DTYPE);
        self.launch(&kernel, self.adamw_blocks(param.len()), &args)
    }

    /// AdamW's threads move eight elements at a time (cuda/adamw.cu).
    fn adamw_blocks(&self, n: usize) -> usize {
        self.element_blocks(n.div_ceil(8))
    }
}
