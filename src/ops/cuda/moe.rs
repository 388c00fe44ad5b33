//! Mixture-of-experts dispatch on a device (`cuda/moe.cu`, whose header has the kernels'
//! contracts): the routing and its (token, slot) rows in expert order, the row moves between
//! token order and expert order, the router's backward and the load-balancing sums, each a
//! typed launch that checks its buffers first.
//!
//! The experts' projections run as grouped GEMMs (`cuda/moe_gemm.cu`) that read each expert's
//! rows from the offsets on the device: the host launches them sized to the rows of the whole
//! layer and never learns the per-expert counts. [`MoeKernels::expert_rows`] downloads them
//! for the selftest only.

use super::device::{AsView, Device, Float, View};
use super::emu::{KernelArgs, LaunchConfig};
use super::fresh::GradWrite;
use super::kernels::rows_of;
use super::pool::{Leased, Pool};
use crate::ops::moe::LoadBalance;
use anyhow::{ensure, Context, Result};

/// The most experts per token (`MOE_MAX_K` in cuda/moe.cu).
pub const MAX_K: usize = 4;
/// The most experts (`moe_count` keeps one counter per expert in shared memory).
pub const MAX_EXPERTS: usize = 1024;
/// Refuses a mixture of experts that the device kernels cannot route: `experts` experts, each
/// token to its top `k`.
pub fn check_routing(experts: usize, k: usize) -> Result<()> {
    ensure!(
        (1..=MAX_EXPERTS).contains(&experts),
        "{experts} experts: the device engine routes among 1 to {MAX_EXPERTS}"
    );
    ensure!(
        (1..=MAX_K.min(experts)).contains(&k),
        "{k} experts per token of {experts}: the device engine routes each token to 1 to {}",
        MAX_K.min(experts)
    );
    Ok(())
}

/// Slots per block of the counting sort (`moe_count`, `moe_permute_index`).
const SLOTS_PER_BLOCK: usize = 256;
/// Threads of the one-block prefix sum (`moe_offsets`'s `run_start[1024]`).
const SCAN_THREADS: u32 = 1024;
/// Threads per block of the other kernels.
const THREADS: u32 = 256;
/// The most blocks a grid-stride kernel launches.
const MAX_GRID: usize = 65535;
/// Output rows and columns of a block of the grouped GEMMs (`kTile` in cuda/moe_gemm.cu).
const GEMM_TILE: usize = 64;
/// Threads of a block of the grouped GEMMs.
const GEMM_THREADS: u32 = 128;

/// One tensor per expert, each of `len` elements, expert `e`'s at `e · stride` elements
/// after expert 0's: how the grouped GEMMs find the experts' weights and gradients (the flat
/// parameter store lays the experts out at one stride).
#[derive(Clone, Copy, Debug)]
pub struct ExpertStack<E> {
    first: View<E>,
    stride: usize,
    experts: usize,
}

impl<E: bytemuck::Pod> ExpertStack<E> {
    /// The stack of `views`, which must have one length and lie at one stride, apart.
    pub fn new(what: &str, views: &[View<E>]) -> Result<Self> {
        let first = *views
            .first()
            .with_context(|| format!("{what}: no experts"))?;
        let len = first.len();
        let bytes = |v: &View<E>| v.device_ptr().wrapping_sub(first.device_ptr());
        let step = views.get(1).map_or((len * size_of::<E>()) as u64, bytes);
        ensure!(
            step.is_multiple_of(size_of::<E>() as u64) && step >= (len * size_of::<E>()) as u64,
            "{what}: expert 1 lies {step} bytes after expert 0, which holds {len} elements"
        );
        for (e, v) in views.iter().enumerate() {
            ensure!(
                v.len() == len && step.checked_mul(e as u64) == Some(bytes(v)),
                "{what}: expert {e} ({} elements, {} bytes after expert 0) is not at the \
                 stride of {step} bytes with {len} elements",
                v.len(),
                bytes(v)
            );
        }
        Ok(ExpertStack {
            first,
            stride: step as usize / size_of::<E>(),
            experts: views.len(),
        })
    }

    fn check(&self, what: &str, experts: usize, len: usize) -> Result<()> {
        ensure!(
            self.experts == experts && self.first.len() == len,
            "{what}: {} experts of {} elements, expected {experts} of {len}",
            self.experts,
            self.first.len()
        );
        Ok(())
    }
}

/// One layer's routing on the device.
pub struct DeviceRouting {
    pub experts: usize,
    pub k: usize,
    pub tokens: usize,
    /// `softmax(z)` per token, `[T, E]`, f64.
    pub probs: Leased<f64>,
    /// The chosen experts, `[T, k]`, by decreasing probability.
    pub chosen: Leased<u32>,
    /// Their renormalized weights, `[T, k]`.
    pub weights: Leased<f32>,
    /// Each slot's row in expert order, `[T k]`.
    pub slot_row: Leased<u32>,
    /// Each row's token and weight, `[T k]`.
    pub row_token: Leased<u32>,
    pub row_weight: Leased<f32>,
    /// Each expert's first row, and the number of rows: `[E + 1]`.
    pub expert_offsets: Leased<u32>,
}

impl DeviceRouting {
    pub fn slots(&self) -> usize {
        self.tokens * self.k
    }
}

/// The load-balancing sums on the device: `[C_0..C_E-1, P_0..P_E-1, W]` (cuda/moe.cu).
pub struct DeviceBalance {
    pub experts: usize,
    pub sums: Leased<f64>,
}

/// The MoE kernels on one device, their outputs and scratch from `pool`.
pub struct MoeKernels<'a> {
    pub device: &'a Device,
    pub pool: Pool,
}

fn grid(blocks: usize) -> u32 {
    blocks.clamp(1, MAX_GRID) as u32
}

fn ensure_len(what: &str, len: usize, want: usize) -> Result<()> {
    ensure!(len == want, "{what}: {len} elements, expected {want}");
    Ok(())
}

impl<'a> MoeKernels<'a> {
    pub fn new(device: &'a Device, pool: Pool) -> Self {
        MoeKernels { device, pool }
    }

    fn launch(&self, name: &str, config: LaunchConfig, args: &KernelArgs) -> Result<()> {
        // SAFETY: every caller passes device pointers of live buffers of `self.device` whose
        // lengths it has checked against what the kernel touches.
        unsafe { self.device.launch(name, config, args) }
    }

    fn take<T: bytemuck::Pod>(&self, len: usize) -> Result<Leased<T>> {
        self.pool.lease(self.device, len)
    }

    /// Softmax, top-k and renormalization of `logits [T, experts]`, then the counting sort
    /// of the slots into expert order.
    pub fn route(
        &self,
        logits: &impl AsView<f32>,
        experts: usize,
        k: usize,
    ) -> Result<DeviceRouting> {
        let logits = logits.view();
        check_routing(experts, k).context("moe route")?;
        let tokens = rows_of("moe route logits", logits.len(), experts)?;
        let slots = tokens * k;
        ensure!(
            slots <= u32::MAX as usize,
            "moe route: {slots} slots exceed the 32-bit row indices"
        );
        let r = DeviceRouting {
            experts,
            k,
            tokens,
            probs: self.take(tokens * experts)?,
            chosen: self.take(slots)?,
            weights: self.take(slots)?,
            slot_row: self.take(slots)?,
            row_token: self.take(slots)?,
            row_weight: self.take(slots)?,
            expert_offsets: self.take(experts + 1)?,
        };
        let mut args = KernelArgs::new();
        args.buffer(&logits)
            .buffer(&r.probs)
            .buffer(&r.chosen)
            .buffer(&r.weights)
            .arg(tokens as i64)
            .arg(experts as i32)
            .arg(k as i32);
        self.launch(
            "moe_route_f32",
            LaunchConfig::new(grid(tokens.div_ceil(THREADS as usize)), THREADS, 0),
            &args,
        )?;
        self.sort(&r)?;
        Ok(r)
    }

    /// The slots' rows in expert order: counts per (expert, block), their prefix sums, each
    /// slot's rank in its block.
    fn sort(&self, r: &DeviceRouting) -> Result<()> {
        let slots = r.slots();
        let blocks = slots.div_ceil(SLOTS_PER_BLOCK).max(1);
        ensure!(
            blocks <= i32::MAX as usize,
            "moe route: {slots} slots need {blocks} blocks"
        );
        let block_counts: Leased<u32> = self.take(r.experts * blocks)?;
        let block_starts: Leased<u32> = self.take(r.experts * blocks)?;
        let sort_config = |shared: usize| {
            LaunchConfig::new(blocks as u32, SLOTS_PER_BLOCK as u32, (shared * 4) as u32)
        };
        let mut args = KernelArgs::new();
        args.buffer(&r.chosen)
            .buffer(&block_counts)
            .arg(slots as i64)
            .arg(r.experts as i32);
        self.launch("moe_count", sort_config(r.experts), &args)?;
        let mut args = KernelArgs::new();
        args.buffer(&block_counts)
            .buffer(&block_starts)
            .buffer(&r.expert_offsets)
            .arg(r.experts as i32)
            .arg(blocks as i32);
        self.launch("moe_offsets", LaunchConfig::new(1, SCAN_THREADS, 0), &args)?;
        let mut args = KernelArgs::new();
        args.buffer(&r.chosen)
            .buffer(&r.weights)
            .buffer(&block_starts)
            .buffer(&r.slot_row)
            .buffer(&r.row_token)
            .buffer(&r.row_weight)
            .arg(slots as i64)
            .arg(r.k as i32);
        self.launch("moe_permute_index", sort_config(SLOTS_PER_BLOCK), &args)
    }

    /// The rows each expert receives, downloaded: the temporary exception of the module
    /// header.
    pub fn expert_rows(&self, r: &DeviceRouting) -> Result<Vec<usize>> {
        let offsets = self.device.download(&r.expert_offsets)?;
        Ok(offsets.windows(2).map(|w| (w[1] - w[0]) as usize).collect())
    }

    /// `y [R, n]`: each expert's rows of `x [R, k]` (expert order) times its `w_e [n, k]`ᵀ.
    pub fn expert_forward<E: Float>(
        &self,
        x: View<E>,
        w: ExpertStack<E>,
        r: &DeviceRouting,
        (k, n): (usize, usize),
        y: View<E>,
    ) -> Result<()> {
        self.rows_gemm("moe_gemm_forward", (x, w, y), r, (k, n))
    }

    /// `dx [R, k]`: each expert's rows of `dy [R, n]` times its `w_e [n, k]`.
    pub fn expert_input_grad<E: Float>(
        &self,
        dy: View<E>,
        w: ExpertStack<E>,
        r: &DeviceRouting,
        (k, n): (usize, usize),
        dx: View<E>,
    ) -> Result<()> {
        self.rows_gemm("moe_gemm_input", (dy, w, dx), r, (n, k))
    }

    /// `c [R, cols] = a [R, inner] · op(w_e)` per expert: one block per 64 rows of an expert
    /// (at most `R / 64 + E` of them) and 64 columns.
    fn rows_gemm<E: Float>(
        &self,
        kernel: &str,
        (a, w, c): (View<E>, ExpertStack<E>, View<E>),
        r: &DeviceRouting,
        (inner, cols): (usize, usize),
    ) -> Result<()> {
        w.check(&format!("{kernel} weights"), r.experts, inner * cols)?;
        ensure_len(&format!("{kernel} input"), a.len(), r.slots() * inner)?;
        ensure_len(&format!("{kernel} output"), c.len(), r.slots() * cols)?;
        let row_tiles = r.slots().div_ceil(GEMM_TILE) + r.experts;
        let col_tiles = cols.div_ceil(GEMM_TILE);
        ensure!(
            r.slots() <= i32::MAX as usize
                && inner <= i32::MAX as usize
                && row_tiles <= i32::MAX as usize
                && col_tiles <= MAX_GRID,
            "{kernel}: {} rows of {inner} by {cols} exceed the kernel's grid",
            r.slots()
        );
        if r.slots() == 0 || cols == 0 {
            return Ok(());
        }
        let mut args = KernelArgs::new();
        args.buffer(&a)
            .buffer(&w.first)
            .arg(w.stride as i64)
            .buffer(&c)
            .buffer(&r.expert_offsets)
            .arg(r.experts as i32)
            .arg(inner as i32)
            .arg(cols as i32);
        let config = LaunchConfig::new((row_tiles as u32, col_tiles as u32), GEMM_THREADS, 0);
        self.launch(&format!("{kernel}_{}", E::DTYPE), config, &args)
    }

    /// `dw_e [n, k] += dy_eᵀ · x_e` (or `=`, as `write` says) over each expert's rows of
    /// `dy [R, n]` and `x [R, k]`.
    pub fn expert_weight_grad<E: Float, G: Float>(
        &self,
        (dy, x): (View<E>, View<E>),
        r: &DeviceRouting,
        (k, n): (usize, usize),
        dw: ExpertStack<G>,
        write: GradWrite,
    ) -> Result<()> {
        dw.check("moe expert weight gradients", r.experts, n * k)?;
        ensure_len("moe expert weight-gradient dy", dy.len(), r.slots() * n)?;
        ensure_len("moe expert weight-gradient input", x.len(), r.slots() * k)?;
        let (col_tiles, row_tiles) = (k.div_ceil(GEMM_TILE), n.div_ceil(GEMM_TILE));
        ensure!(
            r.slots() <= i32::MAX as usize
                && n <= i32::MAX as usize
                && col_tiles <= i32::MAX as usize
                && row_tiles <= MAX_GRID,
            "moe expert weight gradient: {} rows of {n} by {k} exceed the kernel's grid",
            r.slots()
        );
        if n == 0 || k == 0 || (r.slots() == 0 && write == GradWrite::Accumulate) {
            return Ok(());
        }
        let mut args = KernelArgs::new();
        args.buffer(&dy)
            .buffer(&x)
            .buffer(&dw.first)
            .arg(dw.stride as i64)
            .buffer(&r.expert_offsets)
            .arg(n as i32)
            .arg(k as i32)
            .arg(write.accumulate_flag());
        let grid = (col_tiles as u32, row_tiles as u32, r.experts as u32);
        self.launch(
            &format!("moe_gemm_weight_{}_{}", E::DTYPE, G::DTYPE),
            LaunchConfig::new(grid, GEMM_THREADS, 0),
            &args,
        )
    }

    /// `out[i] = scale[i] · x[src_row[i]]` (1 without `scale`) for rows of `d`.
    pub fn gather<E: Float>(
        &self,
        x: &impl AsView<E>,
        src_row: View<u32>,
        scale: Option<View<f32>>,
        out: &mut impl AsView<E>,
        d: usize,
    ) -> Result<()> {
        let (x, out) = (x.view(), out.view());
        let src_rows = rows_of("moe gather source", x.len(), d)?;
        let rows = src_row.len();
        ensure_len("moe gather output", out.len(), rows * d)?;
        if let Some(scale) = scale {
            ensure_len("moe gather scales", scale.len(), rows)?;
        }
        ensure!(
            src_rows <= u32::MAX as usize && d <= i32::MAX as usize,
            "moe gather: {src_rows} rows of {d} exceed the kernel's indices"
        );
        let mut args = KernelArgs::new();
        args.buffer(&x)
            .buffer(&src_row)
            .optional_buffer(scale)
            .buffer(&out)
            .arg(rows as i64)
            .arg(d as i32)
            .arg(src_rows as u32);
        self.launch(
            &format!("moe_gather_{}", E::DTYPE),
            LaunchConfig::new(grid(rows), THREADS, 0),
            &args,
        )
    }

    /// `x [T, d]`'s rows in expert order, scaled by their weights when `weighted`.
    pub fn permute<E: Float>(
        &self,
        x: &impl AsView<E>,
        r: &DeviceRouting,
        weighted: bool,
        out: &mut impl AsView<E>,
        d: usize,
    ) -> Result<()> {
        ensure_len("moe permute input", x.view().len(), r.tokens * d)?;
        let scale = weighted.then(|| r.row_weight.view());
        self.gather(x, r.row_token.view(), scale, out, d)
    }

    /// `out [T, d]`: each token's rows of `y` (expert order), weighted when `weighted`,
    /// summed in expert order.
    pub fn unpermute<E: Float>(
        &self,
        y: &impl AsView<E>,
        r: &DeviceRouting,
        weighted: bool,
        out: &mut impl AsView<E>,
        d: usize,
    ) -> Result<()> {
        let (y, out) = (y.view(), out.view());
        ensure_len("moe unpermute rows", y.len(), r.slots() * d)?;
        ensure_len("moe unpermute output", out.len(), r.tokens * d)?;
        let mut args = KernelArgs::new();
        args.buffer(&y)
            .buffer(&r.slot_row)
            .buffer(&r.chosen)
            .optional_buffer(weighted.then(|| r.weights.view()))
            .buffer(&out)
            .arg(r.tokens as i64)
            .arg(r.k as i32)
            .arg(d as i32);
        self.launch(
            &format!("moe_unpermute_{}", E::DTYPE),
            LaunchConfig::new(grid(r.tokens), THREADS, 0),
            &args,
        )
    }

    /// `dL/dweight` per slot: `dout[t] · y[row]`, f64.
    pub fn slot_dots<E: Float>(
        &self,
        dout: &impl AsView<E>,
        y: &impl AsView<E>,
        r: &DeviceRouting,
        d: usize,
    ) -> Result<Leased<f64>> {
        let (dout, y) = (dout.view(), y.view());
        ensure_len("moe router backward dout", dout.len(), r.tokens * d)?;
        ensure_len("moe router backward expert outputs", y.len(), r.slots() * d)?;
        let d_weights = self.take(r.slots())?;
        let mut args = KernelArgs::new();
        args.buffer(&dout)
            .buffer(&y)
            .buffer(&r.slot_row)
            .buffer(&d_weights)
            .arg(r.slots() as i64)
            .arg(r.k as i32)
            .arg(d as i32);
        self.launch(
            &format!("moe_slot_dots_{}", E::DTYPE),
            LaunchConfig::new(grid(r.slots()), THREADS, 0),
            &args,
        )?;
        Ok(d_weights)
    }

    /// `dz [T, E]` from `dL/dweight` per slot and, with `aux = (balance, coef, row
    /// weights)`, the load-balancing term.
    pub fn route_backward(
        &self,
        r: &DeviceRouting,
        d_weights: &Leased<f64>,
        aux: Option<(&DeviceBalance, f64, &Leased<f64>)>,
        dz: &mut impl AsView<f32>,
    ) -> Result<()> {
        let dz = dz.view();
        ensure_len("moe router backward dz", dz.len(), r.tokens * r.experts)?;
        ensure_len("moe router backward dL/dweight", d_weights.len(), r.slots())?;
        if let Some((balance, _, row_weights)) = aux {
            ensure_len("moe balance experts", balance.experts, r.experts)?;
            ensure_len(
                "moe router backward row weights",
                row_weights.len(),
                r.tokens,
            )?;
        }
        let mut args = KernelArgs::new();
        args.buffer(&r.probs)
            .buffer(&r.chosen)
            .buffer(d_weights)
            .optional_buffer(aux.map(|(b, _, _)| b.sums.view()))
            .optional_buffer(aux.map(|(_, _, w)| w.view()))
            .arg(aux.map_or(0.0, |(_, coef, _)| coef))
            .buffer(&dz)
            .arg(r.tokens as i64)
            .arg(r.experts as i32)
            .arg(r.k as i32);
        self.launch(
            "moe_route_backward_f32",
            LaunchConfig::new(grid(r.tokens.div_ceil(THREADS as usize)), THREADS, 0),
            &args,
        )
    }

    /// Zero load-balancing sums over `experts`.
    pub fn balance(&self, experts: usize) -> Result<DeviceBalance> {
        let mut sums = self.take::<f64>(2 * experts + 1)?;
        self.device.zero(&mut sums)?;
        Ok(DeviceBalance { experts, sums })
    }

    /// Adds one layer's routing, its rows weighted by `row_weights [T]`.
    pub fn balance_add(
        &self,
        balance: &mut DeviceBalance,
        r: &DeviceRouting,
        row_weights: &Leased<f64>,
    ) -> Result<()> {
        ensure_len("moe balance experts", balance.experts, r.experts)?;
        ensure_len("moe balance row weights", row_weights.len(), r.tokens)?;
        let blocks = r.tokens.div_ceil(THREADS as usize).max(1);
        ensure!(
            blocks <= MAX_GRID,
            "moe balance: {} tokens need {blocks} blocks, at most {MAX_GRID}",
            r.tokens
        );
        let quantities = 2 * r.experts + 1;
        let partials: Leased<f64> = self.take(blocks * quantities)?;
        let mut args = KernelArgs::new();
        args.buffer(&r.probs)
            .buffer(&r.chosen)
            .buffer(row_weights)
            .buffer(&partials)
            .arg(r.tokens as i64)
            .arg(r.experts as i32)
            .arg(r.k as i32);
        self.launch(
            "moe_balance_partial",
            LaunchConfig::new(blocks as u32, THREADS, 0),
            &args,
        )?;
        let mut args = KernelArgs::new();
        args.buffer(&partials)
            .buffer(&balance.sums)
            .arg(blocks as i32)
            .arg(quantities as i32);
        self.launch(
            "moe_balance_finish",
            LaunchConfig::new(1, THREADS, 0),
            &args,
        )
    }

    /// The sums on the host, where the loss (a logged scalar) is computed.
    pub fn balance_sums(&self, balance: &DeviceBalance) -> Result<LoadBalance> {
        LoadBalance::from_flat_sums(balance.experts, &self.device.download(&balance.sums)?)
    }
}
