//! Launches kernels of `cuda/*.cu` in the host emulator of the CUDA execution model
//! (`cuda/emu/`, described in cuda/README.md). build.rs compiles every kernel file with the
//! host C++ compiler and lists the kernels in a table that [`launch`] looks names up in.
//!
//! A launch runs to completion before it returns, on the calling thread; launches from
//! different threads run independently. Within a block, threads run as fibers in an order
//! shuffled by the seed (`CONTRALIGN_EMU_SEED`, or [`launch_seeded`]), so that a missing
//! `__syncthreads` or `__syncwarp` changes the results instead of going unnoticed.

use anyhow::{bail, ensure, Result};
use std::ffi::{c_char, c_void, CStr};
use std::mem::{align_of, size_of, MaybeUninit};
use std::sync::OnceLock;

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

    /// `kernelParams` for cuLaunchKernel (and the emulator's entry points): a pointer to each
    /// argument's value, valid while `self` is neither moved nor changed.
    pub(crate) fn param_ptrs(&self) -> Vec<*mut c_void> {
        self.values
            .iter()
            .map(|slot| slot.as_ptr() as *mut c_void)
            .collect()
    }
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
    fn contralign_emu_launch(
        entry: unsafe extern "C" fn(params: *mut *mut c_void),
        params: *mut *mut c_void,
        grid: Dim3,
        block: Dim3,
        dynamic_shared_bytes: u32,
        seed: u64,
        error: *mut c_char,
        error_len: usize,
    ) -> i32;
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
    let mut params = args.param_ptrs();
    let mut error = [0 as c_char; 1024];
    let status = contralign_emu_launch(
        desc.entry,
        params.as_mut_ptr(),
        config.grid,
        config.block,
        config.shared_bytes,
        seed,
        error.as_mut_ptr(),
        error.len(),
    );
    if status != 0 {
        let message = CStr::from_ptr(error.as_ptr()).to_string_lossy();
        bail!("kernel `{name}` (emulated, seed {seed}): {message}");
    }
    Ok(())
}

/// Checks that kernel `name` exists and that `args` match its parameters in number and byte
/// sizes. The GPU device layer checks its launches here too: the emulator build sees the same
/// kernel declarations as nvcc, and the driver checks nothing.
pub(crate) fn check_args(name: &str, args: &KernelArgs) -> Result<KernelDesc> {
    let Ok(index) = EMU_KERNELS.binary_search_by(|(kernel, _)| kernel.cmp(&name)) else {
        bail!("no kernel named `{name}` (kernels are the CONTRALIGN_KERNEL lines of cuda/*.cu)");
    };
    // SAFETY: the descriptor functions only return static data.
    let desc = unsafe { (EMU_KERNELS[index].1)() };
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
