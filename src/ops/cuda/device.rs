//! The device layer of the CUDA backend: typed buffers, copies between host and device, and
//! kernel launches by name, on one of two devices (docs/cuda.md, "Kernels that run
//! everywhere"):
//!
//! - [`Device::Emu`]: buffers in host memory (256-byte aligned, as cudaMalloc's), launches in
//!   the emulator ([`super::emu`]), synchronous. Always available.
//! - `Device::Gpu` (`--features cuda`): a GPU through the CUDA driver API, loaded at run time
//!   (cudarc's dynamic loading), running the PTX that build.rs embeds.
//!
//! Both run the same kernels with the same arguments: a buffer is passed to a kernel as its
//! device address ([`Buffer::device_ptr`]), which is a host address on the emulator.

use super::emu::{self, KernelArgs, LaunchConfig};
use super::gemm::{self, Gemm};
use anyhow::{anyhow, ensure, Context, Result};
use std::marker::PhantomData;

#[cfg(feature = "cuda")]
use super::gpu;

/// Which device to open (also a command-line value: `emu`, `cuda`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceKind {
    /// The CUDA emulator on the host (always available).
    Emu,
    /// The first GPU (needs a build with --features cuda and a CUDA driver).
    Cuda,
}

impl std::fmt::Display for DeviceKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DeviceKind::Emu => "emu",
            DeviceKind::Cuda => "cuda",
        })
    }
}

/// Element types of kernels templated over their storage: the suffix of the kernel names
/// (`swiglu_forward_f32`, `swiglu_forward_bf16`).
pub trait Float: bytemuck::Pod + Send + Sync {
    const DTYPE: &'static str;
    fn from_f32(x: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Float for f32 {
    const DTYPE: &'static str = "f32";
    fn from_f32(x: f32) -> Self {
        x
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl Float for half::bf16 {
    const DTYPE: &'static str = "bf16";
    fn from_f32(x: f32) -> Self {
        half::bf16::from_f32(x)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// The environment switch that makes a GPU wait for every launch, so that a failing kernel is
/// named (launches are asynchronous: otherwise a fault shows at a later copy).
pub const SYNC_LAUNCHES: &str = "CONTRALIGN_SYNC_LAUNCHES";

#[cfg(feature = "cuda")]
fn sync_every_launch() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var(SYNC_LAUNCHES).is_ok_and(|v| v == "1"))
}

/// cudaMalloc's alignment, which vectorized and WMMA loads rely on.
#[derive(Clone, Copy)]
#[repr(C, align(256))]
struct Chunk([u8; 256]);

// SAFETY: a byte array with nothing around it (size 256, alignment 256, no padding).
unsafe impl bytemuck::Zeroable for Chunk {}
// SAFETY: as above; every bit pattern is a valid byte array.
unsafe impl bytemuck::Pod for Chunk {}

enum Memory {
    Host(Vec<Chunk>),
    #[cfg(feature = "cuda")]
    Gpu(gpu::Allocation),
}

/// `len` elements of `T` on a device.
pub struct Buffer<T> {
    len: usize,
    memory: Memory,
    /// On the emulator: the memory probe watches the buffer while it lives.
    _watched: Option<emu::Registration>,
    _element: PhantomData<T>,
}

impl<T: bytemuck::Pod> Buffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The whole buffer as a [`View`].
    pub fn view(&self) -> View<T> {
        View {
            ptr: self.device_ptr(),
            len: self.len,
            on_host: matches!(self.memory, Memory::Host(_)),
            _element: PhantomData,
        }
    }

    /// The address of the first element on its device, as a kernel's pointer parameter
    /// takes it.
    pub fn device_ptr(&self) -> u64 {
        match &self.memory {
            Memory::Host(chunks) => chunks.as_ptr() as u64,
            #[cfg(feature = "cuda")]
            Memory::Gpu(allocation) => allocation.ptr(),
        }
    }
}

/// A typed, non-owning handle on `len` elements of `T` in a device allocation (a
/// [`Buffer`], or a region of an [`Arena`]): what kernels, GEMMs and copies read and write.
/// It holds no lifetime, as a CUDA pointer does not: whoever carves views keeps their
/// allocation alive while they are used (the engine owns its arena for its whole life).
pub struct View<T> {
    ptr: u64,
    len: usize,
    /// Host memory (the emulator's) rather than a GPU's.
    on_host: bool,
    _element: PhantomData<T>,
}

impl<T> Clone for View<T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for View<T> {}

impl<T> std::fmt::Debug for View<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "View({:#x}, {} elements)", self.ptr, self.len)
    }
}

impl<T: bytemuck::Pod> View<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn device_ptr(&self) -> u64 {
        self.ptr
    }

    /// Elements `offset..offset + len` of this view.
    pub fn slice(&self, offset: usize, len: usize) -> Result<View<T>> {
        ensure!(
            offset.checked_add(len).is_some_and(|end| end <= self.len),
            "a slice of {len} elements at {offset} of a view of {}",
            self.len
        );
        Ok(View {
            ptr: self.ptr + (offset * size_of::<T>()) as u64,
            len,
            on_host: self.on_host,
            _element: PhantomData,
        })
    }

    /// Whether the elements are in host memory (the emulator's, or a host placeholder).
    pub fn is_on_host(&self) -> bool {
        self.on_host
    }

    /// The elements, where they are in host memory.
    pub(super) fn host(&self) -> Option<&[T]> {
        // SAFETY: a host view points at `len` live, aligned elements of an allocation that its
        // carver keeps alive (the type's contract).
        self.on_host
            .then(|| unsafe { std::slice::from_raw_parts(self.ptr as *const T, self.len) })
    }

    /// As [`View::host`], to write; views alias as device pointers do, so the callers keep
    /// the written view apart from the ones read in the same call.
    #[allow(clippy::mut_from_ref)]
    fn host_mut(&self) -> Option<&mut [T]> {
        // SAFETY: as for `host`; the device layer never holds two of these at once.
        self.on_host
            .then(|| unsafe { std::slice::from_raw_parts_mut(self.ptr as *mut T, self.len) })
    }
}

/// What the kernels, GEMMs and copies take: a [`Buffer`] or a [`View`] of one.
pub trait AsView<T> {
    fn view(&self) -> View<T>;
}

impl<T: bytemuck::Pod> AsView<T> for View<T> {
    fn view(&self) -> View<T> {
        *self
    }
}

impl<T: bytemuck::Pod, A: AsView<T>> AsView<T> for std::rc::Rc<A> {
    fn view(&self) -> View<T> {
        (**self).view()
    }
}

impl<T: bytemuck::Pod> AsView<T> for Buffer<T> {
    fn view(&self) -> View<T> {
        Buffer::view(self)
    }
}

/// What the device layer did on the calling thread: allocations and transfers between host
/// and device, so that tests can show that a step allocates nothing and downloads only what
/// it logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub allocations: u64,
    pub allocated_bytes: u64,
    pub uploads: u64,
    pub uploaded_bytes: u64,
    pub downloads: u64,
    pub downloaded_bytes: u64,
}

thread_local! {
    static COUNTERS: std::cell::Cell<Counters> = const {
        std::cell::Cell::new(Counters {
            allocations: 0,
            allocated_bytes: 0,
            uploads: 0,
            uploaded_bytes: 0,
            downloads: 0,
            downloaded_bytes: 0,
        })
    };
}

/// The calling thread's [`Counters`] since it started.
pub fn counters() -> Counters {
    COUNTERS.with(|c| c.get())
}

pub(super) fn count(update: impl FnOnce(&mut Counters)) {
    COUNTERS.with(|c| {
        let mut now = c.get();
        update(&mut now);
        c.set(now);
    })
}

/// cudaMalloc's alignment, kept by every region of an [`Arena`].
pub const ALIGNMENT: usize = 256;

/// One device allocation made once, carved into named regions: the engine's memory, sized
/// by its memory plan before anything else is allocated, so that nothing is allocated or
/// freed while it trains.
pub struct Arena {
    memory: Buffer<u8>,
    used: usize,
    regions: Vec<(String, usize, usize)>,
}

impl Arena {
    /// An arena of `bytes` (zero-filled once).
    pub fn new(device: &Device, bytes: usize) -> Result<Arena> {
        let memory = device.alloc::<u8>(bytes).with_context(|| {
            format!(
                "allocating the engine's arena of {bytes} bytes ({:.2} GiB)",
                bytes as f64 / (1u64 << 30) as f64
            )
        })?;
        Ok(Arena {
            memory,
            used: 0,
            regions: Vec::new(),
        })
    }

    pub fn capacity(&self) -> usize {
        self.memory.len()
    }

    pub fn used(&self) -> usize {
        self.used
    }

    /// The regions carved so far: name, byte offset, bytes.
    pub fn regions(&self) -> &[(String, usize, usize)] {
        &self.regions
    }

    /// The next `len` elements of `T`, [`ALIGNMENT`]-aligned, under `name`.
    pub fn carve<T: bytemuck::Pod>(&mut self, name: &str, len: usize) -> Result<View<T>> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| anyhow!("region {name}: {len} elements are too many"))?;
        let offset = self.used.next_multiple_of(ALIGNMENT);
        ensure!(
            offset + bytes <= self.capacity(),
            "the arena of {} bytes has no room for region {name} ({bytes} bytes at {offset}): \
             the memory plan is smaller than what the engine carves",
            self.capacity()
        );
        let view = self.memory.region(offset, len)?;
        self.used = offset + bytes;
        self.regions.push((name.to_string(), offset, bytes));
        Ok(view)
    }
}

impl Buffer<u8> {
    /// `len` elements of `T` from byte `offset` (a multiple of `T`'s alignment) on.
    pub fn region<T: bytemuck::Pod>(&self, offset: usize, len: usize) -> Result<View<T>> {
        self.view().region(offset, len)
    }
}

impl View<u8> {
    /// `len` elements of `T` from byte `offset` (a multiple of `T`'s alignment) on.
    pub fn region<T: bytemuck::Pod>(&self, offset: usize, len: usize) -> Result<View<T>> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| anyhow!("a region of {len} elements is too large"))?;
        ensure!(
            offset.is_multiple_of(align_of::<T>())
                && offset.checked_add(bytes).is_some_and(|end| end <= self.len),
            "a region of {bytes} bytes at {offset} of a buffer of {} bytes",
            self.len
        );
        Ok(View {
            ptr: self.ptr + offset as u64,
            len,
            on_host: self.on_host,
            _element: PhantomData,
        })
    }
}

/// A device that runs the kernels of `cuda/*.cu`.
pub enum Device {
    Emu,
    #[cfg(feature = "cuda")]
    Gpu(gpu::Gpu),
}

impl Device {
    /// Opens a device: the emulator, or the first GPU. A GPU needs a binary built with
    /// `--features cuda` and a CUDA driver; without either this is an error that says so.
    pub fn open(kind: DeviceKind) -> Result<Device> {
        match kind {
            DeviceKind::Emu => Ok(Device::Emu),
            #[cfg(feature = "cuda")]
            DeviceKind::Cuda => Ok(Device::Gpu(gpu::Gpu::open(0)?)),
            #[cfg(not(feature = "cuda"))]
            DeviceKind::Cuda => Err(anyhow!(
                "this contralign was built without CUDA support; rebuild it with \
                 `cargo build --release --features cuda` (needs nvcc: \
                 tools/install-cuda-toolchain.sh)"
            )),
        }
    }

    /// The bytes a run's memory plan may take on the device: on a GPU what is free once the
    /// driver, the kernels and cuBLAS are loaded, less room for cuBLAS's lazily loaded
    /// kernels; `None` for the emulator, whose memory is the host's.
    pub fn plannable_memory(&self) -> Result<Option<u64>> {
        match self {
            Device::Emu => Ok(None),
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => gpu.plannable_memory().map(Some),
        }
    }

    /// Bytes of the device's memory in use (the driver's total − free); `None` for the
    /// emulator.
    pub fn used_memory(&self) -> Result<Option<u64>> {
        match self {
            Device::Emu => Ok(None),
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => gpu.used_memory().map(Some),
        }
    }

    /// A one-line description: "emulator" or the GPU's name.
    pub fn describe(&self) -> String {
        match self {
            Device::Emu => "CUDA emulator (host threads as fibers)".to_string(),
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => gpu.describe(),
        }
    }

    /// A zero-filled buffer of `len` elements.
    pub fn alloc<T: bytemuck::Pod>(&self, len: usize) -> Result<Buffer<T>> {
        let bytes = len
            .checked_mul(size_of::<T>())
            .ok_or_else(|| anyhow!("buffer of {len} elements is too large"))?;
        let (memory, watched) = match self {
            Device::Emu => {
                let chunks = vec![Chunk([0; 256]); bytes.div_ceil(256).max(1)];
                let watched = emu::Registration::new(chunks.as_ptr().cast(), bytes);
                (Memory::Host(chunks), Some(watched))
            }
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => (Memory::Gpu(gpu.alloc_zeroed(bytes)?), None),
        };
        count(|c| {
            c.allocations += 1;
            c.allocated_bytes += bytes as u64;
        });
        Ok(Buffer {
            len,
            memory,
            _watched: watched,
            _element: PhantomData,
        })
    }

    /// A zero-filled buffer of `len` elements in host memory whatever the device: what an
    /// operation returns after an earlier one failed ([`super::ops::DeviceOps`]), so that
    /// nothing more is asked of a device in error. Never give it to a launch or a GEMM.
    pub fn host_zeros<T: bytemuck::Pod>(len: usize) -> Buffer<T> {
        Buffer {
            len,
            memory: Memory::Host(vec![
                Chunk([0; 256]);
                (len * size_of::<T>()).div_ceil(256).max(1)
            ]),
            _watched: None,
            _element: PhantomData,
        }
    }

    /// Whether `view` lives on this device (a host view on the emulator, a GPU view on a
    /// GPU): a placeholder or a foreign buffer never reaches a kernel or cuBLAS.
    pub(super) fn check_home<T: bytemuck::Pod>(&self, view: &View<T>) -> Result<()> {
        let on_host = matches!(self, Device::Emu);
        ensure!(
            view.on_host == on_host,
            "a {} buffer given to the {}",
            if view.on_host { "host" } else { "GPU" },
            if on_host { "emulator" } else { "GPU" }
        );
        Ok(())
    }

    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<Buffer<T>> {
        let mut buffer = self.alloc(data.len())?;
        self.copy_to(&mut buffer, data)?;
        Ok(buffer)
    }

    /// Overwrites `dst` (a buffer or a view) with `data` (of its length).
    pub fn copy_to<T: bytemuck::Pod>(&self, dst: &mut impl AsView<T>, data: &[T]) -> Result<()> {
        let dst = dst.view();
        ensure!(
            dst.len == data.len(),
            "copy of {} elements into a buffer of {}",
            data.len(),
            dst.len
        );
        self.check_home(&dst)?;
        let bytes: &[u8] = bytemuck::cast_slice(data);
        count(|c| {
            c.uploads += 1;
            c.uploaded_bytes += bytes.len() as u64;
        });
        match self {
            Device::Emu => dst.host_mut().expect("checked").copy_from_slice(data),
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => gpu.copy_to_device(dst.ptr, bytes)?,
        }
        Ok(())
    }

    /// The contents of `src` (a buffer or a view), once every launch before this call has
    /// finished.
    pub fn download<T: bytemuck::Pod>(&self, src: &impl AsView<T>) -> Result<Vec<T>> {
        let src = src.view();
        self.check_home(&src)?;
        let mut data = vec![T::zeroed(); src.len];
        count(|c| {
            c.downloads += 1;
            c.downloaded_bytes += (src.len * size_of::<T>()) as u64;
        });
        match self {
            Device::Emu => data.copy_from_slice(src.host().expect("checked")),
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => {
                gpu.copy_from_device(bytemuck::cast_slice_mut(&mut data), src.ptr)?
            }
        }
        Ok(data)
    }

    /// Sets every byte of `dst` to zero, in launch order.
    pub fn zero<T: bytemuck::Pod>(&self, dst: &mut impl AsView<T>) -> Result<()> {
        let dst = dst.view();
        self.check_home(&dst)?;
        match self {
            Device::Emu => {
                emu::record_memset(dst.len * size_of::<T>());
                bytemuck::cast_slice_mut::<T, u8>(dst.host_mut().expect("checked")).fill(0)
            }
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => gpu.zero(dst.ptr, dst.len * size_of::<T>())?,
        }
        Ok(())
    }

    /// Launches kernel `name` (a `CONTRALIGN_KERNEL` of `cuda/*.cu`). The arguments are
    /// checked against the kernel's parameters (count and byte sizes) on both devices. The
    /// emulator runs the launch to completion; a GPU queues it, and its failures show at the
    /// next [`Device::download`] or [`Device::synchronize`].
    ///
    /// # Safety
    /// As for a CUDA launch: every pointer argument must be the [`Buffer::device_ptr`] of a
    /// live buffer of this device, large enough for what the kernel reads and writes there.
    pub unsafe fn launch(&self, name: &str, config: LaunchConfig, args: &KernelArgs) -> Result<()> {
        self.launch_seeded(name, config, args, None)
    }

    /// [`Device::launch`], on the emulator with scheduling seed `emu_seed` (block order and
    /// thread shuffles) instead of [`emu::default_seed`]; a GPU ignores it.
    ///
    /// # Safety
    /// As for [`Device::launch`].
    pub unsafe fn launch_seeded(
        &self,
        name: &str,
        config: LaunchConfig,
        args: &KernelArgs,
        emu_seed: Option<u64>,
    ) -> Result<()> {
        args.check_homes(name, matches!(self, Device::Emu))?;
        match self {
            Device::Emu => match emu_seed {
                Some(seed) => emu::launch_seeded(name, config, args, seed),
                None => emu::launch(name, config, args),
            },
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => {
                emu::check_args(name, args)?;
                gpu.launch(name, config, args)?;
                if sync_every_launch() {
                    gpu.synchronize()
                        .with_context(|| format!("kernel `{name}` ({SYNC_LAUNCHES}=1)"))?;
                }
                Ok(())
            }
        }
    }

    /// Lets kernel `name` take up to `bytes` of dynamic shared memory per block: more than
    /// the 48 KiB a launch may have by default, up to the architecture's opt-in maximum
    /// (cuFuncSetAttribute on a GPU, [`emu::set_max_dynamic_shared`] on the emulator).
    pub fn set_max_dynamic_shared(&self, name: &str, bytes: u32) -> Result<()> {
        match self {
            Device::Emu => emu::set_max_dynamic_shared(name, bytes),
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => gpu.set_max_dynamic_shared(name, bytes),
        }
    }

    /// A GEMM over an empty sum (`k = 0`: a micro-batch without tokens makes one) is
    /// `c = beta · c`, done here for both devices rather than left to cuBLAS, whose `k = 0`
    /// contract is unwritten (PyTorch's `addmm` does not hand it to cuBLAS either): `β = 0`
    /// zeroes `c` (a fresh gradient of no tokens), `β = 1` leaves it.
    fn empty_sum_gemm<C: Float>(&self, g: &Gemm, mut c: View<C>) -> Result<()> {
        if g.beta == 0.0 {
            self.zero(&mut c)
        } else if g.beta == 1.0 {
            Ok(())
        } else {
            Err(anyhow!(
                "gemm {}x{}x0 with beta {}: an empty sum scales c, which no caller asks for",
                g.m,
                g.n,
                g.beta
            ))
        }
    }

    /// `c = alpha · op(a) · op(b) + beta · c` ([`Gemm`]) with fp32 accumulation: cuBLAS on a
    /// GPU, [`gemm::host_gemm`] on the emulator.
    pub fn gemm<E: Float, C: Float>(
        &self,
        g: &Gemm,
        a: &impl AsView<E>,
        b: &impl AsView<E>,
        c: &mut impl AsView<C>,
    ) -> Result<()> {
        let (a, b, c) = (a.view(), b.view(), c.view());
        g.check(a.len(), b.len(), c.len())?;
        // cublasGemmEx with fp32 compute takes bf16 -> bf16, bf16 -> f32 and f32 -> f32; the
        // emulator refuses what the GPU would.
        ensure!(
            !(E::DTYPE == "f32" && C::DTYPE == "bf16"),
            "gemm: f32 inputs with a bf16 output is no cuBLAS combination; cast the inputs to \
             bf16 or keep the output f32"
        );
        for home in [
            self.check_home(&a),
            self.check_home(&b),
            self.check_home(&c),
        ] {
            home.context("gemm")?;
        }
        if g.k == 0 && g.m * g.n > 0 {
            return self.empty_sum_gemm(g, c);
        }
        match self {
            Device::Emu => {
                emu::record_gemm(g, size_of::<E>(), size_of::<C>());
                gemm::host_gemm(
                    g,
                    a.host().expect("checked"),
                    b.host().expect("checked"),
                    c.host_mut().expect("checked"),
                )
            }
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => {
                // SAFETY: three live views of this device whose lengths `check` accepted.
                unsafe { gpu.gemm(g, E::DTYPE, a.ptr, b.ptr, C::DTYPE, c.ptr) }?;
                if sync_every_launch() {
                    gpu.synchronize().with_context(|| {
                        format!(
                            "gemm {}x{}x{} {} -> {} ({SYNC_LAUNCHES}=1)",
                            g.m,
                            g.n,
                            g.k,
                            E::DTYPE,
                            C::DTYPE
                        )
                    })?;
                }
                Ok(())
            }
        }
    }

    /// [`Device::gemm`] on operands that start at an element offset of their buffers and have
    /// the lengths `g` gives them (the chunks of the fused scoring).
    pub fn gemm_at<E: Float, C: Float>(
        &self,
        g: &Gemm,
        (a, a_at): (&impl AsView<E>, usize),
        (b, b_at): (&impl AsView<E>, usize),
        (c, c_at): (&mut impl AsView<C>, usize),
    ) -> Result<()> {
        let mut c = c.view().slice(c_at, g.m * g.n).context("gemm operand c")?;
        self.gemm(
            g,
            &a.view().slice(a_at, g.m * g.k).context("gemm operand a")?,
            &b.view().slice(b_at, g.k * g.n).context("gemm operand b")?,
            &mut c,
        )
    }

    /// Copies `src` into `dst` (of its length) on the device, in launch order.
    pub fn copy_buffer<T: bytemuck::Pod>(
        &self,
        src: &impl AsView<T>,
        dst: &mut impl AsView<T>,
    ) -> Result<()> {
        let (src, dst) = (src.view(), dst.view());
        ensure!(
            src.len == dst.len,
            "device copy of {} elements into a buffer of {}",
            src.len,
            dst.len
        );
        self.check_home(&src)?;
        self.check_home(&dst)?;
        // cuMemcpyDtoDAsync is a memcpy: overlapping ranges give undefined contents.
        let bytes = (src.len * size_of::<T>()) as u64;
        ensure!(
            src.ptr + bytes <= dst.ptr || dst.ptr + bytes <= src.ptr || bytes == 0,
            "device copy of {bytes} bytes between overlapping ranges"
        );
        match self {
            // SAFETY: two host views of `src.len` live elements that do not overlap (checked
            // above).
            Device::Emu => unsafe {
                std::ptr::copy_nonoverlapping(src.ptr as *const T, dst.ptr as *mut T, src.len)
            },
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => gpu.copy_on_device(dst.ptr, src.ptr, src.len * size_of::<T>())?,
        }
        Ok(())
    }

    /// Waits for every queued launch; reports a kernel's failure.
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Emu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => gpu.synchronize(),
        }
    }
}
