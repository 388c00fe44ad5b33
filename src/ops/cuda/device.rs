//! The device layer of the CUDA backend: typed buffers, copies between host and device, and
//! kernel launches by name, on one of two devices (design.md, "CUDA kernels that run
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
use anyhow::{bail, ensure, Result};
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

    fn host(&self) -> Option<&[T]> {
        match &self.memory {
            Memory::Host(chunks) => Some(&bytemuck::cast_slice::<Chunk, T>(chunks)[..self.len]),
            #[cfg(feature = "cuda")]
            Memory::Gpu(_) => None,
        }
    }

    fn host_mut(&mut self) -> Option<&mut [T]> {
        match &mut self.memory {
            Memory::Host(chunks) => {
                Some(&mut bytemuck::cast_slice_mut::<Chunk, T>(chunks)[..self.len])
            }
            #[cfg(feature = "cuda")]
            Memory::Gpu(_) => None,
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
            DeviceKind::Cuda => bail!(
                "this contralign was built without CUDA support; rebuild it with \
                 `cargo build --release --features cuda` (needs nvcc: \
                 tools/install-cuda-toolchain.sh)"
            ),
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
            .ok_or_else(|| anyhow::anyhow!("buffer of {len} elements is too large"))?;
        let (memory, watched) = match self {
            Device::Emu => {
                let chunks = vec![Chunk([0; 256]); bytes.div_ceil(256).max(1)];
                let watched = emu::Registration::new(chunks.as_ptr().cast(), bytes);
                (Memory::Host(chunks), Some(watched))
            }
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => (Memory::Gpu(gpu.alloc_zeroed(bytes)?), None),
        };
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

    pub fn upload<T: bytemuck::Pod>(&self, data: &[T]) -> Result<Buffer<T>> {
        let mut buffer = self.alloc(data.len())?;
        self.copy_to(&mut buffer, data)?;
        Ok(buffer)
    }

    /// Overwrites `buffer` with `data` (of its length).
    pub fn copy_to<T: bytemuck::Pod>(&self, buffer: &mut Buffer<T>, data: &[T]) -> Result<()> {
        ensure!(
            buffer.len == data.len(),
            "copy of {} elements into a buffer of {}",
            data.len(),
            buffer.len
        );
        let bytes: &[u8] = bytemuck::cast_slice(data);
        match &mut buffer.memory {
            Memory::Host(chunks) => {
                bytemuck::cast_slice_mut::<Chunk, u8>(chunks)[..bytes.len()].copy_from_slice(bytes)
            }
            #[cfg(feature = "cuda")]
            Memory::Gpu(allocation) => match self {
                Device::Gpu(gpu) => gpu.copy_to_device(allocation, bytes)?,
                Device::Emu => bail!("a GPU buffer given to the emulator"),
            },
        }
        Ok(())
    }

    /// The buffer's contents, once every launch before this call has finished.
    pub fn download<T: bytemuck::Pod>(&self, buffer: &Buffer<T>) -> Result<Vec<T>> {
        let mut data = vec![T::zeroed(); buffer.len];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut data);
        match &buffer.memory {
            Memory::Host(chunks) => {
                bytes.copy_from_slice(&bytemuck::cast_slice::<Chunk, u8>(chunks)[..bytes.len()])
            }
            #[cfg(feature = "cuda")]
            Memory::Gpu(allocation) => match self {
                Device::Gpu(gpu) => gpu.copy_from_device(bytes, allocation)?,
                Device::Emu => bail!("a GPU buffer given to the emulator"),
            },
        }
        Ok(data)
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
        match self {
            Device::Emu => emu::launch(name, config, args),
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => {
                emu::check_args(name, args)?;
                gpu.launch(name, config, args)
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

    /// `c = alpha · op(a) · op(b) + beta · c` ([`Gemm`]) with fp32 accumulation: cuBLAS on a
    /// GPU, [`gemm::host_gemm`] on the emulator.
    pub fn gemm<E: Float, C: Float>(
        &self,
        g: &Gemm,
        a: &Buffer<E>,
        b: &Buffer<E>,
        c: &mut Buffer<C>,
    ) -> Result<()> {
        g.check(a.len(), b.len(), c.len())?;
        // cublasGemmEx with fp32 compute takes bf16 -> bf16, bf16 -> f32 and f32 -> f32; the
        // emulator refuses what the GPU would.
        ensure!(
            !(E::DTYPE == "f32" && C::DTYPE == "bf16"),
            "gemm: f32 inputs with a bf16 output is no cuBLAS combination; cast the inputs to \
             bf16 or keep the output f32"
        );
        match self {
            Device::Emu => match (a.host(), b.host(), c.host_mut()) {
                (Some(a), Some(b), Some(c)) => {
                    emu::record_gemm(g, size_of::<E>(), size_of::<C>());
                    gemm::host_gemm(g, a, b, c)
                }
                _ => bail!("a GPU buffer given to the emulator"),
            },
            #[cfg(feature = "cuda")]
            // SAFETY: three live buffers of this device whose lengths `check` accepted.
            Device::Gpu(gpu) => unsafe {
                gpu.gemm(
                    g,
                    E::DTYPE,
                    a.device_ptr(),
                    b.device_ptr(),
                    C::DTYPE,
                    c.device_ptr(),
                )
            },
        }
    }

    /// Copies `src` into `dst` (of its length) on the device, in launch order.
    pub fn copy_buffer<T: bytemuck::Pod>(
        &self,
        src: &Buffer<T>,
        dst: &mut Buffer<T>,
    ) -> Result<()> {
        ensure!(
            src.len == dst.len,
            "device copy of {} elements into a buffer of {}",
            src.len,
            dst.len
        );
        match self {
            Device::Emu => match (src.host(), dst.host_mut()) {
                (Some(s), Some(d)) => d.copy_from_slice(s),
                _ => bail!("a GPU buffer given to the emulator"),
            },
            #[cfg(feature = "cuda")]
            Device::Gpu(gpu) => {
                gpu.copy_on_device(dst.device_ptr(), src.device_ptr(), src.len * size_of::<T>())?
            }
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
