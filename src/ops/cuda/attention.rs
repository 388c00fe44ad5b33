//! Flash attention on a device (`cuda/attention.cu`, whose header has the kernels' contract):
//! the packed layout's device copy with the tiles each block visits, and typed launches of
//! the forward and the backward.
//!
//! Tile skipping is decided here, on the host, once per batch: [`TileLists`] names for every
//! query tile the key tiles holding at least one key that one of its rows sees (and the
//! transpose, for the key/value gradient), so that a tile the layout masks out entirely is
//! never loaded. A row sees at most two ranges of keys, its group's prompt and its own
//! segment up to itself; with a sliding window each range keeps the suffix whose positions
//! lie inside the window, which is exact where the positions increase along the range (the
//! packed layouts of `data::packing`) and the whole range otherwise (never too few tiles).

use super::device::{AsView, Device, Float};
use super::emu::{KernelArgs, LaunchConfig};
use super::lists::{ListSource, StagedLists, Uploads};
use super::pool::{Leased, Pool};
use crate::ops::{AttentionLayout, AttentionShape};
use anyhow::{ensure, Result};
use std::rc::Rc;

/// The largest head dimension the kernels take: up to [`FAST_HEAD_DIM`] in the tuned
/// kernels, above it in their `_d256` instances (twice the accumulators, shared memory past
/// 48 KiB opted in), which are correct but not tuned.
pub const MAX_HEAD_DIM: usize = 256;
/// The largest head dimension of the tuned kernels (every Mistral and Mixtral has 128).
pub const FAST_HEAD_DIM: usize = 128;
/// Threads per block of the tile kernels (4 warps).
const THREADS: u32 = 128;
/// Dynamic shared memory a block may use without opting in.
const SHARED_LIMIT: usize = 48 * 1024;

/// Rows of a query or key tile for storage `E`: 32 in bf16, 16 in f32 (whose tiles take twice
/// the shared memory).
pub fn tile_rows<E: Float>() -> usize {
    if E::DTYPE == "bf16" {
        32
    } else {
        16
    }
}

/// Which key tiles each query tile visits, ascending, and the transpose, as CSR lists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TileLists {
    pub tile: usize,
    pub q_offsets: Vec<i32>,
    pub q_tiles: Vec<i32>,
    pub k_offsets: Vec<i32>,
    pub k_tiles: Vec<i32>,
}

impl TileLists {
    pub fn new(layout: &AttentionLayout, tile: usize) -> TileLists {
        let tokens = layout.len();
        let tiles = tokens.div_ceil(tile);
        let ranges = SeenRanges::new(layout);
        let mut q_offsets = vec![0i32];
        let mut q_tiles = Vec::new();
        let mut by_key: Vec<Vec<i32>> = vec![Vec::new(); tiles];
        // How many of the tile's rows see each key tile: +1 where a range starts, -1 past it.
        let mut marks = vec![0i32; tiles + 1];
        for qt in 0..tiles {
            marks.iter_mut().for_each(|m| *m = 0);
            for t in qt * tile..tokens.min((qt + 1) * tile) {
                for (start, end) in ranges.of(t) {
                    marks[start / tile] += 1;
                    marks[(end - 1) / tile + 1] -= 1;
                }
            }
            let mut seen = 0;
            for (kt, mark) in marks[..tiles].iter().enumerate() {
                seen += mark;
                if seen > 0 {
                    q_tiles.push(kt as i32);
                    by_key[kt].push(qt as i32);
                }
            }
            q_offsets.push(q_tiles.len() as i32);
        }
        let mut k_offsets = vec![0i32];
        let mut k_tiles = Vec::new();
        for list in by_key {
            k_tiles.extend(list);
            k_offsets.push(k_tiles.len() as i32);
        }
        TileLists {
            tile,
            q_offsets,
            q_tiles,
            k_offsets,
            k_tiles,
        }
    }

    /// The key tiles query tile `qt` visits.
    pub fn key_tiles(&self, qt: usize) -> &[i32] {
        &self.q_tiles[self.q_offsets[qt] as usize..self.q_offsets[qt + 1] as usize]
    }

    /// (query tile, key tile) pairs visited, of `tiles²`.
    pub fn visited(&self) -> usize {
        self.q_tiles.len()
    }

    /// The four lists, in the order above.
    fn all(&self) -> [&Vec<i32>; 4] {
        [
            &self.q_offsets,
            &self.q_tiles,
            &self.k_offsets,
            &self.k_tiles,
        ]
    }
}

/// The key ranges each row sees, trimmed to the window.
struct SeenRanges<'a> {
    layout: &'a AttentionLayout,
    /// `descents[i]`: how many `k <= i` have `positions[k] < positions[k - 1]`.
    descents: Vec<u32>,
}

impl<'a> SeenRanges<'a> {
    fn new(layout: &'a AttentionLayout) -> Self {
        let p = &layout.positions;
        let mut descents = Vec::with_capacity(p.len());
        let mut count = 0;
        for i in 0..p.len() {
            count += u32::from(i > 0 && p[i] < p[i - 1]);
            descents.push(count);
        }
        SeenRanges { layout, descents }
    }

    /// Row `t`'s nonempty key ranges `[start, end)`.
    fn of(&self, t: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        let l = self.layout;
        let context = (l.context_start[t] as usize, l.context_end[t] as usize);
        let own = (l.own_start[t] as usize, t + 1);
        [context, own]
            .into_iter()
            .map(move |(start, end)| (self.trimmed(t, start, end), end))
            .filter(|(start, end)| start < end)
    }

    /// The first key of `[start, end)` inside row `t`'s window, where the positions increase
    /// along the range; `start` otherwise.
    fn trimmed(&self, t: usize, start: usize, end: usize) -> usize {
        let l = self.layout;
        let Some(window) = l.window else {
            return start;
        };
        if end <= start + 1 || self.descents[end - 1] != self.descents[start] {
            return start;
        }
        let pos = l.positions[t] as u64;
        // Inside the window: pos - positions[k] < window.
        start + l.positions[start..end].partition_point(|&p| (p as u64) + (window as u64) <= pos)
    }
}

/// `struct AttentionLayoutArgs` of cuda/attention.cu, field for field.
#[repr(C)]
#[derive(Clone, Copy)]
struct LayoutArgs {
    positions: u64,
    context_start: u64,
    context_end: u64,
    own_start: u64,
    q_offsets: u64,
    q_tiles: u64,
    k_offsets: u64,
    k_tiles: u64,
    tokens: i32,
    window: i32,
}

/// `struct AttentionDims` of cuda/attention.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct Dims {
    heads: i32,
    kv_heads: i32,
    head_dim: i32,
    scale_log2: f32,
}

/// A batch's layout on the device, with its tile lists for one tile size: uploaded once per
/// micro-batch and used by every layer's attention, forward and backward.
pub struct DeviceLayout {
    tokens: usize,
    window: i32,
    lists: TileLists,
    positions: Rc<Leased<i32>>,
    context_start: Rc<Leased<i32>>,
    context_end: Rc<Leased<i32>>,
    own_start: Rc<Leased<i32>>,
    q_offsets: Rc<Leased<i32>>,
    q_tiles: Rc<Leased<i32>>,
    k_offsets: Rc<Leased<i32>>,
    k_tiles: Rc<Leased<i32>>,
}

/// `x` as i32 values for the kernels; `what` names the field in an error.
fn to_i32(what: &str, x: &[u32]) -> Result<Vec<i32>> {
    x.iter()
        .enumerate()
        .map(|(t, &v)| {
            i32::try_from(v).map_err(|_| {
                anyhow::anyhow!("attention layout: {what}[{t}] = {v} exceeds 2^31 - 1")
            })
        })
        .collect()
}

/// Checks that every range of `layout` lies inside the stream and before its row.
fn check_layout(layout: &AttentionLayout) -> Result<()> {
    let n = layout.len();
    for (what, len) in [
        ("context_start", layout.context_start.len()),
        ("context_end", layout.context_end.len()),
        ("own_start", layout.own_start.len()),
    ] {
        ensure!(
            len == n,
            "attention layout: {what} has {len} entries for {n} positions"
        );
    }
    for t in 0..n {
        let (cs, ce, own) = (
            layout.context_start[t] as usize,
            layout.context_end[t] as usize,
            layout.own_start[t] as usize,
        );
        ensure!(
            cs <= ce && ce <= n,
            "attention layout: token {t} has the context range [{cs}, {ce}), expected one \
             inside [0, {n})"
        );
        ensure!(
            own <= t,
            "attention layout: token {t} has own_start {own}, expected at most {t}"
        );
    }
    Ok(())
}

/// A layout as the kernels read it, on the host: checked, its per-token ranges as i32, and
/// its tile lists for tiles of some number of rows.
pub struct HostLayout {
    window: i32,
    /// `positions`, `context_start`, `context_end` and `own_start`.
    ranges: [Vec<i32>; 4],
    lists: TileLists,
}

impl HostLayout {
    /// Checks `layout` and derives its tile lists for tiles of `tile` rows.
    pub fn new(layout: &AttentionLayout, tile: usize) -> Result<Self> {
        check_layout(layout)?;
        let window = match layout.window {
            None => 0,
            Some(0) => anyhow::bail!("attention layout: a sliding window of 0 hides every key"),
            // A window past every position is none.
            Some(w) => i32::try_from(w).unwrap_or(0),
        };
        Ok(HostLayout {
            window,
            ranges: [
                to_i32("positions", &layout.positions)?,
                to_i32("context_start", &layout.context_start)?,
                to_i32("context_end", &layout.context_end)?,
                to_i32("own_start", &layout.own_start)?,
            ],
            lists: TileLists::new(layout, tile),
        })
    }

    /// Every list the kernels read, for a batch's staging.
    pub fn stage(&self, staged: &mut StagedLists) {
        for list in self.ranges.iter().chain(self.lists.all()) {
            staged.push(list);
        }
    }
}

impl DeviceLayout {
    /// Checks `layout`, derives its tile lists for tiles of `tile` rows and uploads both into
    /// regions of `pool`.
    pub fn new(
        device: &Device,
        pool: &Pool,
        layout: &AttentionLayout,
        tile: usize,
    ) -> Result<Self> {
        DeviceLayout::from_host(HostLayout::new(layout, tile)?, &Uploads { device, pool })
    }

    /// `host`'s lists on the device, from `source`.
    pub fn from_host(host: HostLayout, source: &impl ListSource) -> Result<Self> {
        let [positions, context_start, context_end, own_start] = &host.ranges;
        let lists = host.lists;
        Ok(DeviceLayout {
            tokens: positions.len(),
            window: host.window,
            positions: source.list(positions)?,
            context_start: source.list(context_start)?,
            context_end: source.list(context_end)?,
            own_start: source.list(own_start)?,
            q_offsets: source.list(&lists.q_offsets)?,
            q_tiles: source.list(&lists.q_tiles)?,
            k_offsets: source.list(&lists.k_offsets)?,
            k_tiles: source.list(&lists.k_tiles)?,
            lists,
        })
    }

    pub fn tokens(&self) -> usize {
        self.tokens
    }

    pub fn lists(&self) -> &TileLists {
        &self.lists
    }

    /// Whether each buffer that [`DeviceLayout::args`] points to is in host memory.
    fn homes(&self) -> [bool; 8] {
        [
            &self.positions,
            &self.context_start,
            &self.context_end,
            &self.own_start,
            &self.q_offsets,
            &self.q_tiles,
            &self.k_offsets,
            &self.k_tiles,
        ]
        .map(|list| list.view().is_on_host())
    }

    fn args(&self) -> LayoutArgs {
        LayoutArgs {
            positions: self.positions.device_ptr(),
            context_start: self.context_start.device_ptr(),
            context_end: self.context_end.device_ptr(),
            own_start: self.own_start.device_ptr(),
            q_offsets: self.q_offsets.device_ptr(),
            q_tiles: self.q_tiles.device_ptr(),
            k_offsets: self.k_offsets.device_ptr(),
            k_tiles: self.k_tiles.device_ptr(),
            tokens: self.tokens as i32,
            window: self.window,
        }
    }
}

fn align128(n: usize) -> usize {
    n.div_ceil(128) * 128
}

/// Bytes of one shared Q/K/V tile, and of the fp32 score tile (cuda/attention.cu lays them out
/// the same way).
fn tile_bytes<E: Float>(head_dim: usize) -> (usize, usize) {
    let rows = tile_rows::<E>();
    let size = size_of::<E>();
    let ld = head_dim.div_ceil(16) * 16 + 16 / size;
    (align128(size * rows * ld), align128(4 * rows * (rows + 4)))
}

/// Dynamic shared memory of `attention_forward_*`: Q, K, V, scores, the warps' 16 x 16
/// scratch, and per-row values.
fn forward_shared_bytes<E: Float>(head_dim: usize) -> usize {
    let (tile, scores) = tile_bytes::<E>(head_dim);
    3 * tile + scores + align128(4 * 256 * 4) + 12 * tile_rows::<E>()
}

/// Dynamic shared memory of `attention_backward_{dkdv,dq}_*`: Q, dO, K, V, scores and their
/// gradients, and per-row values.
fn backward_shared_bytes<E: Float>(head_dim: usize) -> usize {
    let (tile, scores) = tile_bytes::<E>(head_dim);
    4 * tile + 2 * scores + 12 * tile_rows::<E>()
}

/// The attention kernels on one device. On the emulator a seed may be fixed for every launch
/// (the backward's determinism tests); otherwise launches take the device's default.
pub struct AttentionKernels<'a> {
    device: &'a Device,
    emu_seed: Option<u64>,
    /// Where the backward's row sums live while it runs.
    scratch: Pool,
}

impl<'a> AttentionKernels<'a> {
    pub fn new(device: &'a Device) -> Self {
        AttentionKernels::with_scratch(device, Pool::default())
    }

    /// As [`AttentionKernels::new`], with temporary memory from `scratch`.
    pub fn with_scratch(device: &'a Device, scratch: Pool) -> Self {
        AttentionKernels {
            device,
            emu_seed: None,
            scratch,
        }
    }

    /// Launches on the emulator with this scheduling seed (block order and thread shuffles).
    pub fn with_emu_seed(mut self, seed: u64) -> Self {
        self.emu_seed = Some(seed);
        self
    }

    fn launch(&self, name: &str, config: LaunchConfig, args: &KernelArgs) -> Result<()> {
        // SAFETY: the wrappers pass device pointers of live buffers of `self.device` whose
        // lengths they have checked against the shapes the kernels are given.
        unsafe { self.device.launch_seeded(name, config, args, self.emu_seed) }
    }

    /// The kernels' dimensions after checking the shape against the buffers and the layout.
    fn dims<E: Float>(
        &self,
        what: &str,
        layout: &DeviceLayout,
        shape: AttentionShape,
        q_like: &[usize],
        kv_like: &[usize],
    ) -> Result<Dims> {
        let AttentionShape {
            heads,
            kv_heads,
            head_dim,
        } = shape;
        ensure!(
            kv_heads > 0 && heads.is_multiple_of(kv_heads),
            "{what}: {heads} query heads are not groups of {kv_heads} KV heads"
        );
        ensure!(
            (1..=MAX_HEAD_DIM).contains(&head_dim),
            "{what}: head dimension {head_dim}; the kernels take 1 to {MAX_HEAD_DIM}"
        );
        ensure!(
            layout.lists.tile == tile_rows::<E>(),
            "{what}: the layout's tiles have {} rows, {} kernels use {}",
            layout.lists.tile,
            E::DTYPE,
            tile_rows::<E>()
        );
        let t = layout.tokens;
        for &len in q_like {
            ensure!(
                len == t * heads * head_dim,
                "{what}: {t} tokens of {heads} heads of {head_dim} need {} elements, got {len}",
                t * heads * head_dim
            );
        }
        for &len in kv_like {
            ensure!(
                len == t * kv_heads * head_dim,
                "{what}: {t} tokens of {kv_heads} KV heads of {head_dim} need {} elements, got \
                 {len}",
                t * kv_heads * head_dim
            );
        }
        Ok(Dims {
            heads: heads as i32,
            kv_heads: kv_heads as i32,
            head_dim: head_dim as i32,
            scale_log2: (std::f64::consts::LOG2_E / (head_dim as f64).sqrt()) as f32,
        })
    }

    /// The kernel `{stem}_{dtype}` for `head_dim`, or its `_d256` instance above
    /// [`FAST_HEAD_DIM`], allowed `shared` bytes of dynamic shared memory: past the 48 KiB a
    /// block gets without opting in, the kernel opts in (the d256 instances only; the device
    /// refuses more than the GPU allows).
    fn kernel<E: Float>(&self, stem: &str, head_dim: usize, shared: usize) -> Result<String> {
        let wide = head_dim > FAST_HEAD_DIM;
        let name = format!("{stem}_{}{}", E::DTYPE, if wide { "_d256" } else { "" });
        if shared > SHARED_LIMIT {
            ensure!(
                wide,
                "{name}: {shared} bytes of shared memory at head dim {head_dim}, more than the \
                 {SHARED_LIMIT} the tuned kernels use"
            );
            self.device.set_max_dynamic_shared(&name, shared as u32)?;
        }
        Ok(name)
    }

    /// Overwrites `out [T, heads, hd]` and `lse [T, heads]` (natural log).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<E: Float>(
        &self,
        q: &impl AsView<E>,
        k: &impl AsView<E>,
        v: &impl AsView<E>,
        layout: &DeviceLayout,
        shape: AttentionShape,
        out: &mut impl AsView<E>,
        lse: &mut impl AsView<f32>,
    ) -> Result<()> {
        let (q, k, v, out, lse) = (q.view(), k.view(), v.view(), out.view(), lse.view());
        let dims = self.dims::<E>(
            "attention",
            layout,
            shape,
            &[q.len(), out.len()],
            &[k.len(), v.len()],
        )?;
        ensure!(
            lse.len() == layout.tokens * shape.heads,
            "attention: lse needs {} elements, got {}",
            layout.tokens * shape.heads,
            lse.len()
        );
        if layout.tokens == 0 {
            return Ok(());
        }
        let tiles = layout.tokens.div_ceil(tile_rows::<E>()) as u32;
        let shared = forward_shared_bytes::<E>(shape.head_dim);
        let kernel = self.kernel::<E>("attention_forward", shape.head_dim, shared)?;
        let mut args = KernelArgs::new();
        args.buffer(&q)
            .buffer(&k)
            .buffer(&v)
            .buffer(&out)
            .buffer(&lse)
            .arg_holding(layout.args(), &layout.homes())
            .arg(dims);
        self.launch(
            &kernel,
            LaunchConfig::new((tiles, shape.heads as u32), THREADS, shared as u32),
            &args,
        )
    }

    /// Overwrites `dq`, `dk`, `dv` from the forward's `out` and `lse` and the output's
    /// gradient `dout`.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<E: Float>(
        &self,
        q: &impl AsView<E>,
        k: &impl AsView<E>,
        v: &impl AsView<E>,
        out: &impl AsView<E>,
        lse: &impl AsView<f32>,
        dout: &impl AsView<E>,
        layout: &DeviceLayout,
        shape: AttentionShape,
        dq: &mut impl AsView<E>,
        dk: &mut impl AsView<E>,
        dv: &mut impl AsView<E>,
    ) -> Result<()> {
        let (q, k, v, out, lse, dout, dq, dk, dv) = (
            q.view(),
            k.view(),
            v.view(),
            out.view(),
            lse.view(),
            dout.view(),
            dq.view(),
            dk.view(),
            dv.view(),
        );
        let dims = self.dims::<E>(
            "attention_backward",
            layout,
            shape,
            &[q.len(), out.len(), dout.len(), dq.len()],
            &[k.len(), v.len(), dk.len(), dv.len()],
        )?;
        let rows = layout.tokens * shape.heads;
        ensure!(
            lse.len() == rows,
            "attention_backward: lse needs {rows} elements, got {}",
            lse.len()
        );
        if layout.tokens == 0 {
            return Ok(());
        }
        let (delta, _lease) = self.scratch.take::<f32>(self.device, rows)?;
        let mut args = KernelArgs::new();
        args.buffer(&out)
            .buffer(&dout)
            .buffer(&delta)
            .arg(rows as i64)
            .arg(shape.head_dim as i32);
        let warps_per_block = (THREADS / 32) as usize;
        let blocks = rows.div_ceil(warps_per_block).clamp(1, 4096) as u32;
        self.launch(
            &format!("attention_backward_delta_{}", E::DTYPE),
            LaunchConfig::new(blocks, THREADS, 0),
            &args,
        )?;

        let tiles = layout.tokens.div_ceil(tile_rows::<E>()) as u32;
        let shared = backward_shared_bytes::<E>(shape.head_dim);
        let dkdv_kernel = self.kernel::<E>("attention_backward_dkdv", shape.head_dim, shared)?;
        let dq_kernel = self.kernel::<E>("attention_backward_dq", shape.head_dim, shared)?;
        let mut args = KernelArgs::new();
        args.buffer(&q)
            .buffer(&k)
            .buffer(&v)
            .buffer(&lse)
            .buffer(&delta)
            .buffer(&dout)
            .buffer(&dk)
            .buffer(&dv)
            .arg_holding(layout.args(), &layout.homes())
            .arg(dims);
        self.launch(
            &dkdv_kernel,
            LaunchConfig::new((tiles, shape.kv_heads as u32), THREADS, shared as u32),
            &args,
        )?;
        let mut args = KernelArgs::new();
        args.buffer(&q)
            .buffer(&k)
            .buffer(&v)
            .buffer(&lse)
            .buffer(&delta)
            .buffer(&dout)
            .buffer(&dq)
            .arg_holding(layout.args(), &layout.homes())
            .arg(dims);
        self.launch(
            &dq_kernel,
            LaunchConfig::new((tiles, shape.heads as u32), THREADS, shared as u32),
            &args,
        )
    }
}
