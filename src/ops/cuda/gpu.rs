//! The GPU side of the device layer (`--features cuda`): the CUDA driver API through cudarc's
//! raw bindings, with libcuda loaded at run time, so that building needs no CUDA libraries and
//! a machine without a driver gets an error instead of a failed start.
//!
//! One device, its primary context, the legacy default stream (allocations, launches, copies
//! and frees run in the order they are issued, so a temporary buffer may be dropped right
//! after the launch that uses it), every module of [`super::ptx`] loaded when the device
//! opens.

use super::emu::{KernelArgs, LaunchConfig};
use super::ptx;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{result, sys, DriverError};
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::Arc;

fn driver_error(e: DriverError) -> anyhow::Error {
    let name = e
        .error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    anyhow!("CUDA driver: {name}: {text}")
}

/// What every buffer keeps alive: the context, current on whichever thread frees memory.
struct PrimaryContext {
    device: sys::CUdevice,
    context: sys::CUcontext,
}

impl PrimaryContext {
    fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for as long as `self` lives.
        unsafe { result::ctx::set_current(self.context) }.map_err(driver_error)
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        // SAFETY: retained in Gpu::open from this device; released once.
        let _ = unsafe { result::primary_ctx::release(self.device) };
    }
}

// SAFETY: driver handles may be used from any thread once the context is bound there, which
// every use does first.
unsafe impl Send for PrimaryContext {}
// SAFETY: as above.
unsafe impl Sync for PrimaryContext {}

/// A device allocation, freed on drop.
pub struct Allocation {
    ptr: sys::CUdeviceptr,
    bytes: usize,
    context: Arc<PrimaryContext>,
}

impl Allocation {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        if self.bytes > 0 && self.context.bind().is_ok() {
            // SAFETY: allocated by malloc_async in this context and freed once, in stream
            // order: after every launch queued before the drop, which may still use it. A
            // failure here (a context broken by a failed kernel) leaves nothing to recover.
            let _ = unsafe { result::free_async(self.ptr, result::stream::null()) };
        }
    }
}

/// An open GPU with the kernels loaded.
pub struct Gpu {
    context: Arc<PrimaryContext>,
    name: String,
    capability: (i32, i32),
    functions: HashMap<&'static str, sys::CUfunction>,
}

impl Gpu {
    /// Device `ordinal`: loads libcuda, initializes the driver, retains the primary context
    /// and loads every PTX module.
    pub fn open(ordinal: usize) -> Result<Gpu> {
        // SAFETY: only tries to load the library.
        if !unsafe { sys::is_culib_present() } {
            bail!("no CUDA driver found (libcuda.so could not be loaded): is there a GPU here?");
        }
        result::init().map_err(driver_error)?;
        let count = result::device::get_count().map_err(driver_error)?;
        if ordinal >= count as usize {
            bail!("no CUDA device {ordinal}: the driver reports {count} device(s)");
        }
        let device = result::device::get(ordinal as i32).map_err(driver_error)?;
        let name = result::device::get_name(device).map_err(driver_error)?;
        // SAFETY: `device` comes from device::get.
        let context = unsafe { result::primary_ctx::retain(device) }.map_err(driver_error)?;
        let context = Arc::new(PrimaryContext { device, context });
        context.bind()?;
        let attribute = |a| {
            // SAFETY: a valid device and attribute.
            unsafe { result::device::get_attribute(device, a) }.map_err(driver_error)
        };
        let capability = (
            attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        );
        let mut modules = HashMap::new();
        for (module, text) in ptx::PTX {
            let image = CString::new(*text).context("PTX with a NUL byte")?;
            // SAFETY: a NUL-terminated PTX text; the context is current. Modules stay loaded
            // for the life of the process (the context is primary and shared).
            let handle = unsafe { result::module::load_data(image.as_ptr().cast()) }
                .map_err(driver_error)
                .with_context(|| format!("loading the PTX of cuda/{module}.cu"))?;
            modules.insert(*module, handle);
        }
        let mut functions = HashMap::new();
        for (kernel, module) in ptx::KERNELS {
            // SAFETY: a loaded module; the name is one of its entries (build.rs checks).
            let function =
                unsafe { result::module::get_function(modules[module], CString::new(*kernel)?) }
                    .map_err(driver_error)
                    .with_context(|| format!("kernel {kernel} in cuda/{module}.cu"))?;
            functions.insert(*kernel, function);
        }
        Ok(Gpu {
            context,
            name,
            capability,
            functions,
        })
    }

    pub fn describe(&self) -> String {
        format!(
            "{} (sm_{}{})",
            self.name, self.capability.0, self.capability.1
        )
    }

    pub fn alloc_zeroed(&self, bytes: usize) -> Result<Allocation> {
        self.context.bind()?;
        // cuMemAlloc refuses 0 bytes; an empty buffer needs no memory and is never read.
        let ptr = if bytes == 0 {
            0
        } else {
            // SAFETY: the context is current; the memory is zeroed, in stream order, before
            // anything else on the stream can read it.
            unsafe {
                let stream = result::stream::null();
                let ptr = result::malloc_async(stream, bytes).map_err(driver_error)?;
                result::memset_d8_async(ptr, 0, bytes, stream).map_err(driver_error)?;
                ptr
            }
        };
        Ok(Allocation {
            ptr,
            bytes,
            context: self.context.clone(),
        })
    }

    pub fn copy_to_device(&self, dst: &mut Allocation, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.context.bind()?;
        assert!(src.len() <= dst.bytes);
        // SAFETY: `dst` holds at least src.len() bytes; the copy is synchronous.
        unsafe { result::memcpy_htod_sync(dst.ptr, src) }.map_err(driver_error)
    }

    pub fn copy_from_device(&self, dst: &mut [u8], src: &Allocation) -> Result<()> {
        if dst.is_empty() {
            return self.synchronize();
        }
        self.context.bind()?;
        assert!(dst.len() <= src.bytes);
        // SAFETY: `src` holds at least dst.len() bytes; the copy waits for earlier launches.
        unsafe { result::memcpy_dtoh_sync(dst, src.ptr) }
            .map_err(driver_error)
            .context("copying from the GPU (or a kernel before it failed)")
    }

    /// # Safety
    /// As for [`super::device::Device::launch`]; the arguments are already checked.
    pub unsafe fn launch(&self, name: &str, config: LaunchConfig, args: &KernelArgs) -> Result<()> {
        let function = *self
            .functions
            .get(name)
            .ok_or_else(|| anyhow!("kernel `{name}` is not in the embedded PTX"))?;
        self.context.bind()?;
        let mut params = args.param_ptrs();
        let (g, b) = (config.grid, config.block);
        result::launch_kernel(
            function,
            (g.x, g.y, g.z),
            (b.x, b.y, b.z),
            config.shared_bytes,
            result::stream::null(),
            &mut params,
        )
        .map_err(driver_error)
        .with_context(|| format!("launching kernel `{name}`"))
    }

    pub fn synchronize(&self) -> Result<()> {
        self.context.bind()?;
        result::ctx::synchronize()
            .map_err(driver_error)
            .context("waiting for the GPU (a kernel failed)")
    }
}
