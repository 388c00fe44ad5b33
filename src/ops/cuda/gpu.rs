//! The GPU side of the device layer (`--features cuda`): the CUDA driver API through cudarc's
//! raw bindings, with libcuda loaded at run time, so that building needs no CUDA libraries and
//! a machine without a driver gets an error instead of a failed start.
//!
//! One device, its primary context and one non-blocking stream that everything runs on
//! (allocations, launches, copies, GEMMs and frees in the order they are issued, so a
//! temporary buffer may be dropped right after the launch that uses it; no implicit
//! synchronization with the legacy default stream or anything else in the process), every
//! module of [`super::ptx`] loaded when the device opens. Uploads are asynchronous: the host
//! data is copied into one of two pinned staging halves and the DMA from it is queued on the
//! stream, so the host goes on while it runs; a half is reused once its last copy is done.

use super::emu::{KernelArgs, LaunchConfig};
use super::gemm::{Gemm, Op, CUBLAS_WORKSPACE_BYTES};
use super::ptx;
use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas;
use cudarc::driver::{result, sys, DriverError};
use std::collections::HashMap;
use std::ffi::{c_void, CString};
use std::sync::{Arc, Mutex, OnceLock};

/// Device memory left out of a run's plan for what cuBLAS loads at its first GEMMs (the
/// kernels it picks, loaded lazily by the driver), which no plan can count.
const CUBLAS_LAZY_HEADROOM: u64 = 512 << 20;

/// An event for the host to wait on at length (the logged scalars' copies, which a flush
/// waits a whole step for): the waiting thread sleeps instead of spinning on a core.
fn waited_event() -> Result<sys::CUevent, DriverError> {
    let flags = sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32
        | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
    let mut event = std::mem::MaybeUninit::uninit();
    // SAFETY: the caller's context is current; the driver writes the event on success.
    unsafe {
        sys::cuEventCreate(event.as_mut_ptr(), flags).result()?;
        Ok(event.assume_init())
    }
}

fn driver_error(e: DriverError) -> anyhow::Error {
    use sys::cudaError_enum as E;
    let name = e
        .error_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|_| format!("{:?}", e.0));
    let text = e
        .error_string()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // A kernel fault is sticky: the context is lost and every later call fails the same way.
    let lost = matches!(
        e.0,
        E::CUDA_ERROR_ILLEGAL_ADDRESS
            | E::CUDA_ERROR_ASSERT
            | E::CUDA_ERROR_HARDWARE_STACK_ERROR
            | E::CUDA_ERROR_ILLEGAL_INSTRUCTION
            | E::CUDA_ERROR_MISALIGNED_ADDRESS
            | E::CUDA_ERROR_INVALID_ADDRESS_SPACE
            | E::CUDA_ERROR_INVALID_PC
            | E::CUDA_ERROR_LAUNCH_FAILED
            | E::CUDA_ERROR_LAUNCH_TIMEOUT
            | E::CUDA_ERROR_ECC_UNCORRECTABLE
            | E::CUDA_ERROR_NVLINK_UNCORRECTABLE
            | E::CUDA_ERROR_EXTERNAL_DEVICE
    );
    if lost {
        anyhow!(
            "CUDA driver: {name}: {text}; the GPU context is lost and nothing more can run in \
             this process (rerun with CONTRALIGN_SYNC_LAUNCHES=1 to name the failing kernel)"
        )
    } else {
        anyhow!("CUDA driver: {name}: {text}")
    }
}

/// Dynamic shared memory a kernel may use without opting in (`cuFuncSetAttribute`).
const DEFAULT_DYNAMIC_SHARED: u32 = 48 << 10;

fn gib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// What every buffer keeps alive: the context, current on whichever thread frees memory, and
/// the stream its work is ordered on.
struct PrimaryContext {
    device: sys::CUdevice,
    context: sys::CUcontext,
    stream: sys::CUstream,
}

impl PrimaryContext {
    fn bind(&self) -> Result<()> {
        // SAFETY: the context is retained for as long as `self` lives.
        unsafe { result::ctx::set_current(self.context) }.map_err(driver_error)
    }
}

impl Drop for PrimaryContext {
    fn drop(&mut self) {
        if self.bind().is_ok() {
            // SAFETY: created in Gpu::open, destroyed once, after every buffer freed on it
            // (they hold this context); queued work still completes.
            let _ = unsafe { result::stream::destroy(self.stream) };
        }
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
            let _ = unsafe { result::free_async(self.ptr, self.context.stream) };
        }
    }
}

/// A cuBLAS handle on the context's stream, the one every launch and copy uses, with its
/// workspace (dropped after the handle is destroyed).
struct Blas {
    handle: cublas::sys::cublasHandle_t,
    context: Arc<PrimaryContext>,
    workspace: Allocation,
}

impl Blas {
    fn create(context: Arc<PrimaryContext>, workspace: Allocation) -> Result<Blas> {
        // SAFETY: only tries to load the library.
        if !unsafe { cublas::sys::is_culib_present() } {
            bail!(
                "cuBLAS could not be loaded (libcublas.so): put the folder that holds it on \
                 LD_LIBRARY_PATH (a CUDA toolkit's lib64, or the nvidia-cublas wheel's lib)"
            );
        }
        context.bind()?;
        let handle = cublas::result::create_handle()
            .map_err(|e| anyhow!("cuBLAS: creating a handle: {e:?}"))?;
        let blas = Blas {
            handle,
            context,
            workspace,
        };
        // SAFETY: a live handle and the context's live stream (the same handle type).
        unsafe { cublas::result::set_stream(blas.handle, blas.context.stream as _) }
            .map_err(|e| anyhow!("cuBLAS: setting the stream: {e:?}"))?;
        // Without a workspace of its own, cuBLAS allocates one per handle and stream behind
        // the memory plan's back. SAFETY: a live handle; the workspace lives as long as it.
        let status = unsafe {
            cublas::sys::cublasSetWorkspace_v2(
                blas.handle,
                blas.workspace.ptr as *mut c_void,
                blas.workspace.bytes,
            )
        };
        if status != cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            bail!(
                "cuBLAS: setting its {} MiB workspace: {status:?}",
                blas.workspace.bytes >> 20
            );
        }
        // By default cuBLAS may sum split-K partial products in a bf16 output's type: a bf16
        // GEMM (and a bf16 gradient accumulated with beta = 1) then rounds more than once,
        // where the emulator and the CPU's bf16 mode round once, from fp32. SAFETY: a live
        // handle.
        let status = unsafe {
            cublas::sys::cublasSetMathMode(
                blas.handle,
                cublas::sys::cublasMath_t::CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION,
            )
        };
        if status != cublas::sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            bail!("cuBLAS: setting its math mode to fp32 reductions: {status:?}");
        }
        Ok(blas)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        if self.context.bind().is_ok() {
            // SAFETY: created in Blas::create, destroyed once.
            let _ = unsafe { cublas::result::destroy_handle(self.handle) };
        }
    }
}

// SAFETY: the handle is used only with its context bound, from one thread at a time (Gpu is
// used behind & by one thread; cuBLAS handles may move between threads).
unsafe impl Send for Blas {}
// SAFETY: as above.
unsafe impl Sync for Blas {}

fn blas_type(dtype: &str) -> Result<cublas::sys::cudaDataType> {
    match dtype {
        "f32" => Ok(cublas::sys::cudaDataType::CUDA_R_32F),
        "bf16" => Ok(cublas::sys::cudaDataType::CUDA_R_16BF),
        other => bail!("gemm: no cuBLAS type for {other}"),
    }
}

fn blas_op(op: Op) -> cublas::sys::cublasOperation_t {
    match op {
        Op::N => cublas::sys::cublasOperation_t::CUBLAS_OP_N,
        Op::T => cublas::sys::cublasOperation_t::CUBLAS_OP_T,
    }
}

/// Bytes of each pinned staging half: large enough that a copy's fixed cost is small against
/// its transfer, small enough to pin without notice.
const STAGING_HALF_BYTES: usize = 8 << 20;

/// Pinned host memory that uploads go through, in two halves: the host fills one while the
/// copy from the other runs. Each half's event marks the end of the last copy that read it.
struct Staging {
    halves: [(*mut u8, sys::CUevent); 2],
    next: usize,
    context: Arc<PrimaryContext>,
}

impl Staging {
    fn new(context: Arc<PrimaryContext>) -> Result<Staging> {
        context.bind()?;
        let half = || -> Result<(*mut u8, sys::CUevent)> {
            // SAFETY: the context is current; freed once in Drop.
            let ptr = unsafe { result::malloc_host(STAGING_HALF_BYTES, 0) }
                .map_err(driver_error)
                .context("pinning the upload staging memory")?;
            let event = result::event::create(sys::CUevent_flags::CU_EVENT_DISABLE_TIMING)
                .map_err(driver_error)?;
            Ok((ptr.cast(), event))
        };
        Ok(Staging {
            halves: [half()?, half()?],
            next: 0,
            context,
        })
    }

    /// Queues the copy of `src` to `dst` on the stream and returns once `src` is staged.
    fn upload(&mut self, dst: u64, src: &[u8]) -> Result<()> {
        for (i, chunk) in src.chunks(STAGING_HALF_BYTES).enumerate() {
            let (ptr, event) = self.halves[self.next];
            self.next ^= 1;
            // SAFETY: `ptr` holds STAGING_HALF_BYTES pinned bytes, no copy still reads them
            // once `event` (recorded after the last one, or never) has completed, and the
            // device layer checked that `dst` holds `src.len()` bytes.
            unsafe {
                result::event::synchronize(event).map_err(driver_error)?;
                std::ptr::copy_nonoverlapping(chunk.as_ptr(), ptr, chunk.len());
                let staged = std::slice::from_raw_parts(ptr, chunk.len());
                let at = dst + (i * STAGING_HALF_BYTES) as u64;
                result::memcpy_htod_async(at, staged, self.context.stream).map_err(driver_error)?;
                result::event::record(event, self.context.stream).map_err(driver_error)?;
            }
        }
        Ok(())
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.context.bind().is_ok() {
            for (ptr, event) in self.halves {
                // SAFETY: made in Staging::new, freed once, after the copies that read them.
                unsafe {
                    let _ = result::event::synchronize(event);
                    let _ = result::event::destroy(event);
                    let _ = result::free_host(ptr.cast());
                }
            }
        }
    }
}

// SAFETY: the pinned memory and events are used only behind the Gpu's mutex, with the
// context bound.
unsafe impl Send for Staging {}

/// Pinned host memory that copies from the device land in while the host goes on (a step's
/// logged scalars, [`super::readback`]), with an event recorded after the last copy queued.
pub struct Pinned {
    ptr: *mut u8,
    capacity: usize,
    event: sys::CUevent,
    context: Arc<PrimaryContext>,
}

impl Pinned {
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Queues the copy of `bytes` bytes at the device address `src` to byte `at`, after every
    /// earlier launch on the stream, and records the event after it.
    ///
    /// # Safety
    /// `src` must hold `bytes` bytes, and nothing may read bytes `at..at + bytes` until
    /// [`Pinned::wait`] has returned.
    pub unsafe fn queue_from_device(&mut self, at: usize, src: u64, bytes: usize) -> Result<()> {
        ensure!(
            at + bytes <= self.capacity,
            "a copy of {bytes} bytes at {at} into {} pinned bytes",
            self.capacity
        );
        self.context.bind()?;
        let dst = std::slice::from_raw_parts_mut(self.ptr.add(at), bytes);
        result::memcpy_dtoh_async(dst, src, self.context.stream)
            .and_then(|()| result::event::record(self.event, self.context.stream))
            .map_err(driver_error)
            .context("queueing a copy from the GPU")
    }

    /// Waits for every copy queued so far.
    pub fn wait(&self) -> Result<()> {
        self.context.bind()?;
        // SAFETY: the event was made with the context, which is current.
        unsafe { result::event::synchronize(self.event) }
            .map_err(driver_error)
            .context("copying from the GPU (or a kernel before it failed)")
    }

    /// Writes `bytes` at the start, from the host (no copy may be in flight).
    pub fn fill(&mut self, bytes: &[u8]) {
        let len = bytes.len().min(self.capacity);
        // SAFETY: `ptr` holds `capacity` bytes; the caller waited for the copies.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr, len) };
    }

    /// The first `len` bytes, as the copies left them once [`Pinned::wait`] has returned.
    pub fn bytes(&self, len: usize) -> &[u8] {
        // SAFETY: `ptr` holds `capacity` pinned bytes, allocated in Gpu::pinned and
        // initialized there.
        unsafe { std::slice::from_raw_parts(self.ptr, len.min(self.capacity)) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        if self.context.bind().is_ok() {
            // SAFETY: made in Gpu::pinned, freed once, after the copies that write them.
            unsafe {
                let _ = result::event::synchronize(self.event);
                let _ = result::event::destroy(self.event);
                let _ = result::free_host(self.ptr.cast());
            }
        }
    }
}

// SAFETY: the pinned memory and its event belong to the one context, bound before each use.
unsafe impl Send for Pinned {}

/// An open GPU with the kernels loaded.
pub struct Gpu {
    context: Arc<PrimaryContext>,
    name: String,
    capability: (i32, i32),
    functions: HashMap<&'static str, sys::CUfunction>,
    /// Created at the first GEMM, so that the kernels run where cuBLAS is missing.
    blas: OnceLock<Result<Blas, String>>,
    staging: Mutex<Staging>,
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
        // SAFETY: the context was just retained.
        unsafe { result::ctx::set_current(context) }.map_err(driver_error)?;
        let stream = match result::stream::create(result::stream::StreamKind::NonBlocking) {
            Ok(stream) => stream,
            Err(e) => {
                // SAFETY: retained above; released once.
                let _ = unsafe { result::primary_ctx::release(device) };
                return Err(driver_error(e)).context("creating the GPU's stream");
            }
        };
        let context = Arc::new(PrimaryContext {
            device,
            context,
            stream,
        });
        let staging = Mutex::new(Staging::new(context.clone())?);
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
            blas: OnceLock::new(),
            staging,
        })
    }

    /// The bytes a run's memory plan may take: what the driver reports free once this
    /// process's context, kernels and cuBLAS handle are loaded (and any other process's
    /// memory is taken), plus the cuBLAS workspace, which the plan counts, less
    /// [`CUBLAS_LAZY_HEADROOM`].
    pub fn plannable_memory(&self) -> Result<u64> {
        self.blas()?;
        self.context.bind()?;
        let (free, _) = result::mem_get_info().map_err(driver_error)?;
        Ok((free as u64 + CUBLAS_WORKSPACE_BYTES).saturating_sub(CUBLAS_LAZY_HEADROOM))
    }

    /// The cuBLAS handle with its workspace, made at the first use.
    fn blas(&self) -> Result<&Blas> {
        self.blas
            .get_or_init(|| {
                self.alloc_zeroed(CUBLAS_WORKSPACE_BYTES as usize)
                    .and_then(|workspace| Blas::create(self.context.clone(), workspace))
                    .map_err(|e| format!("{e:#}"))
            })
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// Bytes of the device's memory in use, by this process and any other (total − free).
    pub fn used_memory(&self) -> Result<u64> {
        self.context.bind()?;
        let (free, total) = result::mem_get_info().map_err(driver_error)?;
        Ok((total - free) as u64)
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
                let stream = self.context.stream;
                let ptr = result::malloc_async(stream, bytes).map_err(|e| {
                    if e.0 == sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY {
                        let (free, total) = result::mem_get_info().unwrap_or((0, 0));
                        anyhow!(
                            "out of GPU memory: {bytes} bytes ({:.2} GiB) asked for, {:.2} GiB \
                             free of {:.2} GiB; `contralign plan` shows what a configuration \
                             needs",
                            gib(bytes),
                            gib(free),
                            gib(total)
                        )
                    } else {
                        driver_error(e)
                    }
                })?;
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

    /// Copies `src` to the device address `dst`, which holds at least `src.len()` bytes, in
    /// stream order; returns once `src` is staged, before the copy has run.
    pub fn copy_to_device(&self, dst: u64, src: &[u8]) -> Result<()> {
        if src.is_empty() {
            return Ok(());
        }
        self.context.bind()?;
        self.staging
            .lock()
            .map_err(|_| anyhow!("the GPU's upload staging was poisoned by a panic"))?
            .upload(dst, src)
    }

    /// `capacity` bytes of pinned host memory, zeroed, for [`Pinned::queue_from_device`].
    pub fn pinned(&self, capacity: usize) -> Result<Pinned> {
        self.context.bind()?;
        // SAFETY: the context is current; freed once in Drop.
        let ptr: *mut u8 = unsafe { result::malloc_host(capacity.max(1), 0) }
            .map_err(driver_error)
            .context("pinning host memory for the logged scalars")?
            .cast();
        // SAFETY: `ptr` holds `capacity` bytes just allocated.
        unsafe { std::ptr::write_bytes(ptr, 0, capacity) };
        let event = match waited_event() {
            Ok(event) => event,
            Err(e) => {
                // SAFETY: allocated above, not used since.
                let _ = unsafe { result::free_host(ptr.cast()) };
                return Err(driver_error(e));
            }
        };
        Ok(Pinned {
            ptr,
            capacity,
            event,
            context: self.context.clone(),
        })
    }

    /// Copies `dst.len()` bytes from the device address `src`, after every earlier launch.
    pub fn copy_from_device(&self, dst: &mut [u8], src: u64) -> Result<()> {
        if dst.is_empty() {
            return self.synchronize();
        }
        self.context.bind()?;
        // SAFETY: the device layer checked that `src` holds `dst.len()` bytes; the copy runs
        // after earlier work on the stream, and `dst` is not touched until the stream is done.
        unsafe {
            result::memcpy_dtoh_async(dst, src, self.context.stream)
                .and_then(|()| result::stream::synchronize(self.context.stream))
        }
        .map_err(driver_error)
        .context("copying from the GPU (or a kernel before it failed)")
    }

    /// Zeroes `bytes` at the device address `dst`, in stream order.
    pub fn zero(&self, dst: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.context.bind()?;
        // SAFETY: the device layer checked that `dst` holds `bytes` bytes.
        unsafe { result::memset_d8_async(dst, 0, bytes, self.context.stream) }.map_err(driver_error)
    }

    /// # Safety
    /// As for [`super::device::Device::launch`]; the arguments are already checked.
    pub unsafe fn launch(&self, name: &str, config: LaunchConfig, args: &KernelArgs) -> Result<()> {
        let function = *self
            .functions
            .get(name)
            .ok_or_else(|| anyhow!("kernel `{name}` is not in the embedded PTX"))?;
        self.context.bind()?;
        if config.shared_bytes > DEFAULT_DYNAMIC_SHARED {
            // SAFETY: a loaded function of the current context; the driver refuses more than
            // the device's opt-in maximum with an error.
            unsafe {
                result::function::set_function_attribute(
                    function,
                    sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    config.shared_bytes as i32,
                )
            }
            .map_err(driver_error)
            .with_context(|| {
                format!(
                    "kernel `{name}` asks for {} bytes of dynamic shared memory, more than this \
                     GPU allows",
                    config.shared_bytes
                )
            })?;
        }
        let mut params = args.param_ptrs();
        let (g, b) = (config.grid, config.block);
        result::launch_kernel(
            function,
            (g.x, g.y, g.z),
            (b.x, b.y, b.z),
            config.shared_bytes,
            self.context.stream,
            &mut params,
        )
        .map_err(driver_error)
        .with_context(|| format!("launching kernel `{name}`"))
    }

    /// Lets kernel `name` take up to `bytes` of dynamic shared memory per block (more than
    /// the default 48 KiB, up to the GPU's opt-in maximum).
    pub fn set_max_dynamic_shared(&self, name: &str, bytes: u32) -> Result<()> {
        let function = *self
            .functions
            .get(name)
            .ok_or_else(|| anyhow!("kernel `{name}` is not in the embedded PTX"))?;
        self.context.bind()?;
        let value = i32::try_from(bytes).context("dynamic shared memory size")?;
        // SAFETY: a function of a loaded module of the current context.
        unsafe {
            result::function::set_function_attribute(
                function,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                value,
            )
        }
        .map_err(driver_error)
        .with_context(|| format!("kernel `{name}`: {bytes} bytes of dynamic shared memory"))
    }

    /// Copies `bytes` from `src` to `dst` on the GPU, in stream order.
    pub fn copy_on_device(&self, dst: u64, src: u64, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        self.context.bind()?;
        // SAFETY: the callers pass two live allocations of at least `bytes` bytes.
        unsafe { result::memcpy_dtod_async(dst, src, bytes, self.context.stream) }
            .map_err(driver_error)
    }

    /// `c = alpha · op(a) · op(b) + beta · c` through cuBLAS with fp32 accumulation; `a`, `b`
    /// and `c` are device addresses of `a_type`, `a_type` and `c_type` elements.
    ///
    /// # Safety
    /// The addresses must be live allocations of this GPU of the lengths [`Gemm::check`]
    /// accepts.
    pub unsafe fn gemm(
        &self,
        g: &Gemm,
        a_type: &str,
        a: u64,
        b: u64,
        c_type: &str,
        c: u64,
    ) -> Result<()> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let blas = self.blas()?;
        self.context.bind()?;
        let (lda, ldb, ldc) = g.leading_dims();
        // Row-major c = op(a)·op(b) is column-major cᵀ = op(b)ᵀ·op(a)ᵀ, and a row-major matrix
        // is its column-major transpose: the same call with the operands swapped.
        cublas::result::gemm_ex(
            blas.handle,
            blas_op(g.op_b),
            blas_op(g.op_a),
            g.n as i32,
            g.m as i32,
            g.k as i32,
            (&g.alpha as *const f32).cast::<c_void>(),
            b as *const c_void,
            blas_type(a_type)?,
            ldb.max(1) as i32,
            a as *const c_void,
            blas_type(a_type)?,
            lda.max(1) as i32,
            (&g.beta as *const f32).cast::<c_void>(),
            c as *mut c_void,
            blas_type(c_type)?,
            ldc.max(1) as i32,
            cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas::sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
        .map_err(|e| {
            // Launches are asynchronous: a kernel that faulted before this GEMM shows first
            // here, as a cuBLAS failure. The stream's own state says whether that is so.
            let message = format!("cuBLAS gemm {g:?}: {e:?}");
            match unsafe { sys::cuStreamQuery(self.context.stream) }.result() {
                Err(d) if d.0 != sys::cudaError_enum::CUDA_ERROR_NOT_READY => {
                    driver_error(d).context(message)
                }
                _ => anyhow!(message),
            }
        })
    }

    pub fn synchronize(&self) -> Result<()> {
        self.context.bind()?;
        result::ctx::synchronize()
            .map_err(driver_error)
            .context("waiting for the GPU (a kernel failed)")
    }
}
