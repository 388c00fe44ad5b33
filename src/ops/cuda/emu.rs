//! Launches kernels of `cuda/*.cu` in the host emulator of the CUDA execution model
//! (`cuda/emu/`, described in cuda/README.md). build.rs compiles every kernel file with the
//! host C++ compiler and lists the kernels in a table that [`launch`] looks names up in.
//!
//! A launch runs to completion before it returns, on the calling thread; launches from
//! different threads run independently. Within a block, threads run as fibers in an order
//! shuffled by the seed (`CONTRALIGN_EMU_SEED`, or [`launch_seeded`]), so that a missing
//! `__syncthreads` or `__syncwarp` changes the results instead of going unnoticed.
//!
//! Launches fit the limits of a GPU architecture ([`Arch`], sm_80 unless
//! `CONTRALIGN_EMU_ARCH` or [`with_arch`] says otherwise). [`probed`] runs code with the
//! memory probe (`cuda/emu/probe.cpp`): each launch's global-memory traffic counted
//! ([`Traffic`]), and racecheck.

use super::device::{AsView, View};
use super::gemm::Gemm;
use anyhow::{bail, ensure, Result};
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::ffi::{c_char, c_void, CStr};
use std::mem::{align_of, size_of, MaybeUninit};
use std::sync::{Mutex, OnceLock};

/// Grid or block dimensions, as CUDA's `dim3`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Dim3 {
    pub x: u32,
    pub y: u32,
    pub z: u32,
}

impl From<u32> for Dim3 {
    fn from(x: u32) -> Self {
        Dim3 { x, y: 1, z: 1 }
    }
}

impl From<(u32, u32)> for Dim3 {
    fn from((x, y): (u32, u32)) -> Self {
        Dim3 { x, y, z: 1 }
    }
}

impl From<(u32, u32, u32)> for Dim3 {
    fn from((x, y, z): (u32, u32, u32)) -> Self {
        Dim3 { x, y, z }
    }
}

/// The shape of a launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    pub grid: Dim3,
    pub block: Dim3,
    /// Bytes of dynamic shared memory (`extern __shared__ T dyn_smem[]`).
    pub shared_bytes: u32,
}

impl LaunchConfig {
    pub fn new(grid: impl Into<Dim3>, block: impl Into<Dim3>, shared_bytes: u32) -> Self {
        LaunchConfig {
            grid: grid.into(),
            block: block.into(),
            shared_bytes,
        }
    }
}

/// The seed when `CONTRALIGN_EMU_SEED` is unset.
pub const DEFAULT_SEED: u64 = 0x5eed;

/// A kernel's arguments by value, in order, as the kernel declares them (a device pointer is a
/// pointer value). Each launch checks their count and sizes against the kernel's parameters.
#[derive(Default)]
pub struct KernelArgs {
    /// One 16-byte-aligned slot per argument: boxed, so the addresses handed to the kernel
    /// stay put while more arguments are added.
    values: Vec<Box<[MaybeUninit<u128>]>>,
    sizes: Vec<usize>,
    /// Of each argument given as a buffer ([`KernelArgs::buffer`]): its index and whether
    /// its memory is on the host, which a launch checks against its device.
    homes: Vec<(usize, bool)>,
}

impl KernelArgs {
    pub fn new() -> Self {
        KernelArgs::default()
    }

    /// Appends `value`, which must have the size and layout of the kernel's parameter (`i32`
    /// for `int`, `i64` for `long long`, `*const f32` for `const float*`, a `#[repr(C)]`
    /// struct for a struct).
    pub fn arg<T: Copy>(&mut self, value: T) -> &mut Self {
        assert!(
            align_of::<T>() <= align_of::<u128>(),
            "kernel argument over-aligned"
        );
        let mut slot = vec![MaybeUninit::<u128>::uninit(); size_of::<T>().div_ceil(16).max(1)];
        // SAFETY: the slot holds at least size_of::<T>() bytes and is aligned for T.
        unsafe { slot.as_mut_ptr().cast::<T>().write(value) };
        self.values.push(slot.into_boxed_slice());
        self.sizes.push(size_of::<T>());
        self
    }

    /// Appends the device address of `buffer` (a buffer, a view or a lease), remembering
    /// where its memory is: a launch refuses a host buffer on a GPU and a GPU buffer on the
    /// emulator before the kernel can touch it.
    pub fn buffer<T: bytemuck::Pod>(&mut self, buffer: &impl AsView<T>) -> &mut Self {
        let view = buffer.view();
        self.homes.push((self.values.len(), view.is_on_host()));
        self.arg(view.device_ptr())
    }

    /// Appends the device address of `view`, or null without one (an optional parameter),
    /// its memory checked as [`KernelArgs::buffer`]'s.
    pub fn optional_buffer<T: bytemuck::Pod>(&mut self, view: Option<View<T>>) -> &mut Self {
        match view {
            Some(view) => self.buffer(&view),
            None => self.arg(0u64),
        }
    }

    /// Appends `value`, a struct that holds the addresses of buffers whose memory is on the
    /// host where `on_host` says so, one flag per buffer: a launch checks them as it checks
    /// [`KernelArgs::buffer`]'s.
    pub fn arg_holding<T: Copy>(&mut self, value: T, on_host: &[bool]) -> &mut Self {
        let index = self.values.len();
        self.homes.extend(on_host.iter().map(|&home| (index, home)));
        self.arg(value)
    }

    /// That every argument given as a buffer lives where `on_host` says the launch runs.
    pub(crate) fn check_homes(&self, kernel: &str, on_host: bool) -> Result<()> {
        let place = |host: bool| if host { "host" } else { "GPU" };
        for &(index, home) in &self.homes {
            ensure!(
                home == on_host,
                "kernel `{kernel}`: argument {index} is a {} buffer, given to a launch on the {}",
                place(home),
                if on_host { "emulator" } else { "GPU" }
            );
        }
        Ok(())
    }

    /// `kernelParams` for cuLaunchKernel (and the emulator's entry points): a pointer to each
    /// argument's value, valid while `self` is neither moved nor changed.
    pub(crate) fn param_ptrs(&self) -> Vec<*mut c_void> {
        self.values
            .iter()
            .map(|slot| slot.as_ptr() as *mut c_void)
            .collect()
    }
}

/// A GPU architecture whose limits emulated launches enforce: 1024 threads per block, 48 KiB
/// of static shared memory, 48 KiB of static and dynamic shared memory together unless the
/// kernel opted in ([`set_max_dynamic_shared`]), and then at most the opt-in maximum.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// A100: 163 KiB of shared memory per block with the opt-in.
    Sm80,
    /// H100: 227 KiB.
    Sm90,
}

impl Arch {
    fn number(self) -> u32 {
        match self {
            Arch::Sm80 => 80,
            Arch::Sm90 => 90,
        }
    }

    /// cudaDevAttrMaxSharedMemoryPerBlockOptin.
    pub fn max_shared_opt_in(self) -> u32 {
        match self {
            Arch::Sm80 => 163 * 1024,
            Arch::Sm90 => 227 * 1024,
        }
    }
}

impl std::str::FromStr for Arch {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Arch> {
        match s.trim() {
            "sm_80" | "80" => Ok(Arch::Sm80),
            "sm_90" | "90" => Ok(Arch::Sm90),
            other => bail!("unknown architecture {other:?}: sm_80 or sm_90"),
        }
    }
}

/// What the memory probe does in a launch (see [`probed`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Probe {
    /// Count the global-memory traffic ([`Traffic`]) of every launch.
    pub count: bool,
    /// Fail a launch in which two threads of a block touch a byte of shared or global
    /// memory between the same barriers, one of them writing, or two blocks touch a byte of
    /// global memory, one of them writing (atomics excepted).
    pub racecheck: bool,
}

impl Probe {
    fn flags(self) -> u32 {
        u32::from(self.count) | u32::from(self.racecheck) << 1
    }
}

/// The global-memory traffic of one launch as the probe counted it (`contralign_emu_traffic`
/// in `cuda/emu/probe.h`). Only accesses inside device buffers count ([`Device::alloc`]'s on
/// the emulator). A warp-wide request is what the lanes of a warp access at one instruction
/// for one time. Each access counts as the kernel makes it: a vector access (`load_pack` /
/// `store_pack`) whole, a thread's consecutive scalar accesses apart, as on a GPU.
///
/// [`Device::alloc`]: super::device::Device::alloc
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Distinct 32-byte sectors first accessed by a read (fetched from DRAM).
    pub read_sectors: u64,
    /// Distinct sectors written (written back to DRAM).
    pub write_sectors: u64,
    pub requests: u64,
    /// Sectors the requests touched, summed over requests.
    pub request_sectors: u64,
    /// The fewest sectors that hold the distinct bytes each request asked for, summed.
    pub min_sectors: u64,
    /// Per-thread accesses of 1, 2, 4, 8 and 16 bytes, and of other sizes.
    pub accesses_by_width: [u64; 6],
    /// FLOPs of WMMA `mma_sync` calls.
    pub flops: u64,
    /// Bytes read inside the ranges of a [`watching`] run, every access counted (re-reads
    /// included).
    pub watched_read_bytes: u64,
}

impl Traffic {
    /// The compulsory DRAM traffic: every sector read once and written once.
    pub fn dram_bytes(&self) -> u64 {
        32 * (self.read_sectors + self.write_sectors)
    }

    /// The fewest sectors the requests could have touched over the sectors they did (1 for
    /// perfectly coalesced accesses; NaN without requests).
    pub fn coalescing(&self) -> f64 {
        self.min_sectors as f64 / self.request_sectors as f64
    }

    /// Adds another launch's counts.
    pub fn add(&mut self, other: &Traffic) {
        self.read_sectors += other.read_sectors;
        self.write_sectors += other.write_sectors;
        self.requests += other.requests;
        self.request_sectors += other.request_sectors;
        self.min_sectors += other.min_sectors;
        for (a, b) in self
            .accesses_by_width
            .iter_mut()
            .zip(other.accesses_by_width)
        {
            *a += b;
        }
        self.flops += other.flops;
        self.watched_read_bytes += other.watched_read_bytes;
    }
}

/// One launch (or emulated GEMM) of a [`probed`] run.
#[derive(Clone, Debug, PartialEq)]
pub struct LaunchRecord {
    /// The kernel, or `gemm` for a GEMM of the device layer.
    pub kernel: String,
    pub config: Option<LaunchConfig>,
    pub traffic: Traffic,
    /// The bytes were counted (kernels); false for GEMMs, whose host implementation is not
    /// instrumented: their bytes are the minimum (each operand read once, the output written
    /// once), as cuBLAS comes close to.
    pub counted: bool,
    /// A GEMM's shape, from which its bytes and FLOPs follow.
    pub gemm: Option<GemmShape>,
}

/// What a GEMM's minimal traffic and FLOPs follow from: `C [m, n] (+)= A [m, k] · B [k, n]`
/// with operands of `input_bytes` per element and an output of `output_bytes`, C read when
/// `reads_c`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub input_bytes: usize,
    pub output_bytes: usize,
    pub reads_c: bool,
}

impl GemmShape {
    /// Each operand read once, the output written once (and read once when accumulated into).
    pub fn min_bytes(&self) -> (usize, usize) {
        let (m, n, k) = (self.m, self.n, self.k);
        let read = (m * k + k * n) * self.input_bytes
            + usize::from(self.reads_c) * m * n * self.output_bytes;
        (read, m * n * self.output_bytes)
    }

    pub fn flops(&self) -> u64 {
        2 * (self.m * self.n * self.k) as u64
    }
}

/// Settings of this OS thread's launches: `None` until first asked (then the environment's).
struct Settings {
    arch: Cell<Option<Arch>>,
    probe: Cell<Probe>,
    records: RefCell<Vec<LaunchRecord>>,
}

thread_local! {
    static SETTINGS: Settings = const {
        Settings {
            arch: Cell::new(None),
            probe: Cell::new(Probe { count: false, racecheck: false }),
            records: RefCell::new(Vec::new()),
        }
    };
}

/// The architecture of this thread's launches: [`with_arch`]'s, else `CONTRALIGN_EMU_ARCH`
/// (`sm_80` or `sm_90`), else sm_80.
pub fn arch() -> Result<Arch> {
    static DEFAULT: OnceLock<Result<Arch, String>> = OnceLock::new();
    if let Some(arch) = SETTINGS.with(|s| s.arch.get()) {
        return Ok(arch);
    }
    DEFAULT
        .get_or_init(|| match std::env::var("CONTRALIGN_EMU_ARCH") {
            Err(std::env::VarError::NotPresent) => Ok(Arch::Sm80),
            Ok(text) => text
                .parse()
                .map_err(|e| format!("CONTRALIGN_EMU_ARCH: {e:#}")),
            Err(e) => Err(format!("CONTRALIGN_EMU_ARCH: {e}")),
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

/// Runs `f` with this thread's launches held to `arch`'s limits.
pub fn with_arch<R>(arch: Arch, f: impl FnOnce() -> R) -> R {
    let before = SETTINGS.with(|s| s.arch.replace(Some(arch)));
    let _restore = Restore(move || SETTINGS.with(|s| s.arch.set(before)));
    f()
}

/// Runs `f` with the memory probe on for this thread's launches, and returns what it gave
/// with the record of every launch and device GEMM it made (traffic counts when
/// `probe.count`). Probed runs nest: an inner one takes its own records.
pub fn probed<R>(probe: Probe, f: impl FnOnce() -> R) -> (R, Vec<LaunchRecord>) {
    let (before, outer) = SETTINGS.with(|s| (s.probe.replace(probe), s.records.take()));
    let mut outer = Some(outer);
    let _restore = Restore(move || {
        SETTINGS.with(|s| {
            s.probe.set(before);
            *s.records.borrow_mut() = outer.take().unwrap_or_default();
        })
    });
    let result = f();
    (result, SETTINGS.with(|s| s.records.take()))
}

/// Runs `f` with the reads of `ranges` (device addresses and byte lengths) counted into each
/// counting launch's [`Traffic::watched_read_bytes`]: how often a kernel loads one buffer,
/// seen from outside the kernel. The ranges are process-wide while `f` runs.
pub fn watching<R>(ranges: &[(u64, usize)], f: impl FnOnce() -> R) -> R {
    let set = |ranges: &[(u64, usize)]| {
        let starts: Vec<*const c_void> = ranges.iter().map(|r| r.0 as *const c_void).collect();
        let bytes: Vec<usize> = ranges.iter().map(|r| r.1).collect();
        // SAFETY: the probe copies the addresses and lengths; it dereferences nothing.
        unsafe { contralign_emu_watch(starts.as_ptr(), bytes.as_ptr(), ranges.len()) };
    };
    set(ranges);
    let _restore = Restore(move || set(&[]));
    f()
}

/// Runs its closure when dropped (also when unwinding): puts a thread's settings back.
struct Restore<F: FnMut()>(F);

impl<F: FnMut()> Drop for Restore<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

fn record(entry: LaunchRecord) {
    SETTINGS.with(|s| s.records.borrow_mut().push(entry));
}

/// Records a device GEMM on the emulator in a counting [`probed`] run: its FLOPs, and its
/// minimal bytes for operands of `input_bytes` and an output of `output_bytes` per element.
pub(crate) fn record_gemm(g: &Gemm, input_bytes: usize, output_bytes: usize) {
    if !SETTINGS.with(|s| s.probe.get().count) {
        return;
    }
    let shape = GemmShape {
        m: g.m,
        n: g.n,
        k: g.k,
        input_bytes,
        output_bytes,
        reads_c: g.beta != 0.0,
    };
    let (read, write) = shape.min_bytes();
    record(LaunchRecord {
        kernel: "gemm".into(),
        config: None,
        traffic: Traffic {
            read_sectors: read.div_ceil(32) as u64,
            write_sectors: write.div_ceil(32) as u64,
            flops: shape.flops(),
            ..Traffic::default()
        },
        counted: false,
        gemm: Some(shape),
    });
}

/// The name under which [`record_memset`] records a device memset.
pub const MEMSET: &str = "memset";

/// Records a device memset ([`Device::zero`]) on the emulator in a counting [`probed`] run:
/// the bytes it writes, which a GPU's `cuMemsetD8Async` moves as a kernel would (the step
/// model prices them; the kernel profile, which is about kernels, leaves them out).
///
/// [`Device::zero`]: super::device::Device::zero
pub(crate) fn record_memset(bytes: usize) {
    // A GPU issues nothing for an empty one.
    if bytes == 0 || !SETTINGS.with(|s| s.probe.get().count) {
        return;
    }
    record(LaunchRecord {
        kernel: MEMSET.into(),
        config: None,
        traffic: Traffic {
            write_sectors: bytes.div_ceil(32) as u64,
            ..Traffic::default()
        },
        counted: false,
        gemm: None,
    });
}

/// The opt-ins of kernels to more dynamic shared memory, by name.
static MAX_DYNAMIC_SHARED: Mutex<BTreeMap<String, u32>> = Mutex::new(BTreeMap::new());

/// Lets kernel `name` take up to `bytes` of dynamic shared memory per block, as
/// `cuFuncSetAttribute(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES)` does on a GPU. A
/// launch fails when its static shared memory and `bytes` pass its architecture's opt-in
/// maximum ([`Arch::max_shared_opt_in`]).
pub fn set_max_dynamic_shared(name: &str, bytes: u32) -> Result<()> {
    descriptor(name)?;
    MAX_DYNAMIC_SHARED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(name.to_string(), bytes);
    Ok(())
}

fn max_dynamic_shared(name: &str) -> u32 {
    MAX_DYNAMIC_SHARED
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(name)
        .copied()
        .unwrap_or(0)
}

/// A device buffer in host memory whose accesses the probe counts and checks, from creation
/// to drop.
pub(crate) struct Registration(usize);

impl Registration {
    pub(crate) fn new(start: *const u8, bytes: usize) -> Registration {
        // SAFETY: the registry only keeps and compares the address.
        unsafe { contralign_emu_register_global(start.cast(), bytes) };
        Registration(start as usize)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { contralign_emu_unregister_global(self.0 as *const c_void) };
    }
}

/// `contralign_emu_options` of `cuda/emu/probe.h`.
#[repr(C)]
struct LaunchOptions {
    arch: u32,
    max_dynamic_shared: u32,
    probe: u32,
}

/// What `CONTRALIGN_KERNEL` exports for each kernel (`contralign_emu::KernelDesc` in
/// `cuda/emu/cuda_emu.h`).
#[repr(C)]
pub(crate) struct KernelDesc {
    entry: unsafe extern "C" fn(params: *mut *mut c_void),
    arity: u32,
    param_sizes: *const u32,
}

extern "C" {
    /// `cuda/emu/runtime.cpp`: runs every block of the launch; 0, or 1 with a message.
    #[allow(clippy::too_many_arguments)]
    fn contralign_emu_launch_with(
        entry: unsafe extern "C" fn(params: *mut *mut c_void),
        params: *mut *mut c_void,
        grid: Dim3,
        block: Dim3,
        dynamic_shared_bytes: u32,
        seed: u64,
        options: *const LaunchOptions,
        traffic: *mut Traffic,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
    /// `cuda/emu/probe.cpp`: the device buffers the probe watches.
    fn contralign_emu_register_global(start: *const c_void, bytes: usize);
    fn contralign_emu_unregister_global(start: *const c_void);
    fn contralign_emu_watch(starts: *const *const c_void, bytes: *const usize, count: usize);
}

include!(concat!(env!("OUT_DIR"), "/emu_kernels.rs"));

/// The names of every emulated kernel, sorted.
pub fn kernel_names() -> impl Iterator<Item = &'static str> {
    EMU_KERNELS.iter().map(|(name, _)| *name)
}

/// The seed of [`launch`]: `CONTRALIGN_EMU_SEED` (a decimal u64) or [`DEFAULT_SEED`].
pub fn default_seed() -> Result<u64> {
    static SEED: OnceLock<Result<u64, String>> = OnceLock::new();
    SEED.get_or_init(|| match std::env::var("CONTRALIGN_EMU_SEED") {
        Err(std::env::VarError::NotPresent) => Ok(DEFAULT_SEED),
        Ok(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("CONTRALIGN_EMU_SEED={text:?} is not an unsigned integer")),
        Err(e) => Err(format!("CONTRALIGN_EMU_SEED: {e}")),
    })
    .clone()
    .map_err(anyhow::Error::msg)
}

/// Runs kernel `name` with [`default_seed`].
///
/// # Safety
/// As for a CUDA launch: every pointer argument must be valid for whatever the kernel reads
/// and writes through it, with the alignment it assumes, and nothing else may access that
/// memory during the launch.
pub unsafe fn launch(name: &str, config: LaunchConfig, args: &KernelArgs) -> Result<()> {
    launch_seeded(name, config, args, default_seed()?)
}

/// Runs kernel `name` to completion with the given scheduling seed. Errors: an unknown
/// kernel, arguments that do not match its parameters, an invalid configuration, or a
/// failure inside the kernel (`__trap`, a failed `assert`, mismatched warp collectives, a
/// deadlock).
///
/// # Safety
/// As for [`launch`].
pub unsafe fn launch_seeded(
    name: &str,
    config: LaunchConfig,
    args: &KernelArgs,
    seed: u64,
) -> Result<()> {
    let desc = check_args(name, args)?;
    let arch = arch()?;
    let probe = SETTINGS.with(|s| s.probe.get());
    let options = LaunchOptions {
        arch: arch.number(),
        max_dynamic_shared: max_dynamic_shared(name),
        probe: probe.flags(),
    };
    let mut params = args.param_ptrs();
    let mut error = [0 as c_char; 1024];
    let mut traffic = Traffic::default();
    let status = contralign_emu_launch_with(
        desc.entry,
        params.as_mut_ptr(),
        config.grid,
        config.block,
        config.shared_bytes,
        seed,
        &options,
        &mut traffic,
        error.as_mut_ptr(),
        error.len(),
    );
    if status != 0 {
        let message = CStr::from_ptr(error.as_ptr()).to_string_lossy();
        bail!(
            "kernel `{name}` (emulated sm_{}, seed {seed}): {message}",
            arch.number()
        );
    }
    if probe.count {
        record(LaunchRecord {
            kernel: name.to_string(),
            config: Some(config),
            traffic,
            counted: true,
            gemm: None,
        });
    }
    Ok(())
}

/// Checks that kernel `name` exists and that `args` match its parameters in number and byte
/// sizes. The GPU device layer checks its launches here too: the emulator build sees the same
/// kernel declarations as nvcc, and the driver checks nothing.
pub(crate) fn check_args(name: &str, args: &KernelArgs) -> Result<KernelDesc> {
    let desc = descriptor(name)?;
    // SAFETY: CONTRALIGN_KERNEL makes param_sizes point to `arity` sizes.
    let param_sizes = unsafe { std::slice::from_raw_parts(desc.param_sizes, desc.arity as usize) };
    ensure!(
        param_sizes.len() == args.sizes.len(),
        "kernel `{name}` takes {} arguments, got {}",
        param_sizes.len(),
        args.sizes.len()
    );
    for (i, (&want, &got)) in param_sizes.iter().zip(&args.sizes).enumerate() {
        ensure!(
            want as usize == got,
            "kernel `{name}`: argument {i} has {got} bytes, the parameter {want}"
        );
    }
    Ok(desc)
}

/// The descriptor of kernel `name`.
fn descriptor(name: &str) -> Result<KernelDesc> {
    let Ok(index) = EMU_KERNELS.binary_search_by(|(kernel, _)| kernel.cmp(&name)) else {
        bail!("no kernel named `{name}` (kernels are the CONTRALIGN_KERNEL lines of cuda/*.cu)");
    };
    // SAFETY: the descriptor functions only return static data.
    Ok(unsafe { (EMU_KERNELS[index].1)() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::cuda::device::Device;

    /// Host memory given every way a kernel argument can point at a buffer — directly, as an
    /// optional buffer, or inside a struct — is refused on a GPU and accepted on the emulator;
    /// an absent optional buffer is a null that refers to no memory.
    #[test]
    fn every_way_of_passing_a_buffer_is_checked_for_its_memory() {
        let buffer = Device::Emu.upload(&[1.0f32, 2.0, 3.0]).unwrap();
        let view = buffer.view();
        type Pass = fn(&mut KernelArgs, View<f32>);
        let ways: [(&str, Pass); 3] = [
            ("buffer", |a, v| {
                a.buffer(&v);
            }),
            ("optional buffer", |a, v| {
                a.optional_buffer(Some(v));
            }),
            ("a struct holding it", |a, v| {
                a.arg_holding(v.device_ptr(), &[v.is_on_host(), v.is_on_host()]);
            }),
        ];
        for (way, pass) in ways {
            let mut args = KernelArgs::new();
            args.arg(7i32);
            pass(&mut args, view);
            args.check_homes("k", true).unwrap();
            let err = args.check_homes("k", false).unwrap_err().to_string();
            assert!(
                err.contains("kernel `k`: argument 1 is a host buffer"),
                "{way}: {err}"
            );
        }
        let mut args = KernelArgs::new();
        args.optional_buffer::<f32>(None);
        args.check_homes("k", false).unwrap();
        assert_eq!(args.sizes, [8]);
    }
}
