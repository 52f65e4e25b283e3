//! The CUDA backend (feature `cuda`): device discovery, run-time compiled kernels and their safe
//! wrappers, on cudarc 0.19 with dynamic loading (nothing of CUDA is needed to build).
//!
//! - [`cuda_status`] checks that the driver, NVRTC and cuBLAS libraries can be loaded. cudarc
//!   PANICS on its first real call when a library is missing, so every entry point here runs this
//!   check first and returns [`CudaError::LibraryMissing`] instead; calls into cudarc are also
//!   wrapped in `catch_unwind` as a last line of defence ([`CudaError::Panic`]).
//! - [`CudaBackend::open`] creates the context and one stream on a device and compiles
//!   `kernels.cu` with NVRTC for its architecture (a cubin for `sm_XX`; the PTX route only as a
//!   fallback, since a newer NVRTC's PTX does not load on an older driver).
//! - Kernels ([`ops`]): weight-only GEMV on tensor cores or CUDA cores (bf16 or block-scaled
//!   int8 weights, f32 activations, f32 accumulation), RMSNorm, RoPE, GELU gate, router top-k,
//!   decode attention; a cuBLAS bf16 GEMM for prefill-sized products. Shapes: [`shapes`].
//!
//! One stream per backend; all work is ordered on it (cudarc's cross-stream event tracking is
//! turned off, see [`CudaBackend::open`]). Kernel launches are asynchronous: an error inside a
//! kernel surfaces at the next synchronising call, which [`CudaBackend::synchronize`] names.

pub mod device;
mod gemm;
mod moe;
mod nvrtc;
mod ops;

pub use super::cuda_shapes as shapes;
pub use cudarc::cublas::CudaBlas;
pub use cudarc::driver::{CudaEvent, CudaSlice, CudaStream, CudaView, CudaViewMut};
pub use device::{Cuda, CudaBuf, CudaKv};
pub use gemm::GemmWorkspace;
pub use half::bf16;
pub use moe::GroupedLinear;
pub use nvrtc::{compile_kernels, nvrtc_version, CompiledKernels};
pub use ops::{DeviceLinear, DeviceWeights};
pub use shapes::{GemmPrecision, GemmSettings, GemvKernel, GemvWeights, LaunchShape};

use cudarc::driver::{sys, CudaContext, CudaFunction, DriverError};
use std::collections::HashMap;
use std::sync::Arc;

/// Errors of the CUDA backend. Messages say what was attempted; kernel errors name the kernel.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    #[error(
        "CUDA is not available: the {what} library could not be loaded (looked for {tried}); \
         install it or add its folder to LD_LIBRARY_PATH"
    )]
    LibraryMissing { what: &'static str, tried: String },
    #[error("no CUDA device {ordinal}: this machine has {count}")]
    NoDevice { ordinal: usize, count: usize },
    #[error("{op}: {source}")]
    Driver { op: String, source: DriverError },
    #[error("nvrtc: {op}: {message}")]
    Nvrtc { op: String, message: String },
    #[error("cublas: {op}: {message}")]
    Cublas { op: String, message: String },
    #[error("{op}: {message}")]
    Invalid { op: String, message: String },
    #[error("{op}: cudarc panicked: {message}")]
    Panic { op: String, message: String },
}

impl CudaError {
    /// Whether the error leaves the context unusable (a kernel faulted: every later call on the
    /// context fails with the same error; only a new process recovers).
    pub fn is_context_lost(&self) -> bool {
        use sys::CUresult::*;
        matches!(
            self,
            CudaError::Driver {
                source: DriverError(
                    CUDA_ERROR_ILLEGAL_ADDRESS
                        | CUDA_ERROR_LAUNCH_FAILED
                        | CUDA_ERROR_MISALIGNED_ADDRESS
                        | CUDA_ERROR_ILLEGAL_INSTRUCTION
                        | CUDA_ERROR_INVALID_ADDRESS_SPACE
                        | CUDA_ERROR_INVALID_PC
                        | CUDA_ERROR_HARDWARE_STACK_ERROR
                        | CUDA_ERROR_ASSERT
                        | CUDA_ERROR_LAUNCH_TIMEOUT
                        | CUDA_ERROR_ECC_UNCORRECTABLE
                ),
                ..
            }
        )
    }

    pub(crate) fn invalid(op: impl Into<String>, message: impl Into<String>) -> Self {
        CudaError::Invalid {
            op: op.into(),
            message: message.into(),
        }
    }
}

/// Maps a driver error to [`CudaError::Driver`] naming the operation.
pub(crate) fn drv(op: impl Into<String>) -> impl FnOnce(DriverError) -> CudaError {
    let op = op.into();
    move |source| CudaError::Driver { op, source }
}

/// Runs `f`, turning a panic inside cudarc into [`CudaError::Panic`].
pub(crate) fn guarded<T>(
    op: &str,
    f: impl FnOnce() -> Result<T, CudaError>,
) -> Result<T, CudaError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(p) => Err(CudaError::Panic {
            op: op.to_string(),
            message: panic_message(p.as_ref()),
        }),
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

/// The shared-library names cudarc tries for `lib` (the `.so` forms; it also tries a few more).
fn lib_names(lib: &str) -> String {
    let plain = format!("lib{lib}.so");
    let names: Vec<String> = cudarc::get_lib_name_candidates(lib)
        .into_iter()
        .filter(|n| n.starts_with(&plain))
        .collect();
    names.join(", ")
}

fn check_lib(what: &'static str, lib: &str, present: fn() -> bool) -> Result<(), CudaError> {
    let ok = std::panic::catch_unwind(present).unwrap_or(false);
    if ok {
        Ok(())
    } else {
        Err(CudaError::LibraryMissing {
            what,
            tried: lib_names(lib),
        })
    }
}

fn driver_present() -> bool {
    // SAFETY: only tries to dlopen the library by its usual names.
    unsafe { cudarc::driver::sys::is_culib_present() }
}
fn nvrtc_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nvrtc::sys::is_culib_present() }
}
fn cublas_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::cublas::sys::is_culib_present() }
}
fn nccl_present() -> bool {
    // SAFETY: as above.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// Checks that the CUDA driver (libcuda), NVRTC and cuBLAS can be loaded; the error names the
/// first missing library and the file names that were tried. Does not touch any device.
pub fn cuda_status() -> Result<(), CudaError> {
    check_lib("CUDA driver (libcuda)", "cuda", driver_present)?;
    check_lib("NVRTC (libnvrtc)", "nvrtc", nvrtc_present)?;
    check_lib("cuBLAS (libcublas)", "cublas", cublas_present)?;
    Ok(())
}

/// Only the NVRTC library (enough to compile the kernels, e.g. on a machine without a GPU).
pub fn nvrtc_status() -> Result<(), CudaError> {
    check_lib("NVRTC (libnvrtc)", "nvrtc", nvrtc_present)
}

/// Whether NCCL can be loaded (cudarc looks for `libnccl.so`, not NCCL's own `libnccl.so.2`).
pub fn nccl_status() -> Result<(), CudaError> {
    check_lib("NCCL (libnccl)", "nccl", nccl_present)
}

/// Number of CUDA devices (after checking that the driver library loads).
pub fn device_count() -> Result<usize, CudaError> {
    check_lib("CUDA driver (libcuda)", "cuda", driver_present)?;
    guarded("cuDeviceGetCount", || {
        CudaContext::device_count()
            .map(|n| n.max(0) as usize)
            .map_err(drv("cuDeviceGetCount"))
    })
}

/// The CUDA driver's version, e.g. 13000 for 13.0.
pub fn driver_version() -> Result<i32, CudaError> {
    check_lib("CUDA driver (libcuda)", "cuda", driver_present)?;
    guarded("cuDriverGetVersion", || {
        let mut v = 0i32;
        // SAFETY: writes one int.
        unsafe { sys::cuDriverGetVersion(&mut v) }
            .result()
            .map_err(drv("cuDriverGetVersion"))?;
        Ok(v)
    })
}

/// What the device is.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    pub total_mem_bytes: usize,
    pub sm_count: i32,
    pub l2_cache_bytes: i32,
    pub memory_clock_khz: i32,
    pub memory_bus_bits: i32,
    pub max_shared_mem_per_block_optin: i32,
    pub driver_version: i32,
}

impl DeviceInfo {
    /// `sm_XY` for NVRTC.
    pub fn arch(&self) -> String {
        format!(
            "sm_{}{}",
            self.compute_capability.0, self.compute_capability.1
        )
    }

    /// Theoretical DRAM bandwidth (double data rate over the bus), bytes per second.
    pub fn theoretical_bandwidth(&self) -> f64 {
        2.0 * self.memory_clock_khz as f64 * 1e3 * self.memory_bus_bits as f64 / 8.0
    }
}

/// Per-kernel resource usage reported by the driver (spills show as local memory).
#[derive(Clone, Debug, serde::Serialize)]
pub struct KernelAttributes {
    pub name: String,
    pub registers: i32,
    pub local_bytes: i32,
    pub static_shared_bytes: i32,
    pub max_threads_per_block: i32,
}

/// A CUDA device with its context, stream and compiled kernels.
pub struct CudaBackend {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    funcs: HashMap<String, CudaFunction>,
    compiled: CompiledKernels,
}

impl CudaBackend {
    /// Opens device `ordinal`: checks the libraries and the device count, creates the context
    /// and a stream, compiles and loads every kernel. Never panics.
    pub fn open(ordinal: usize) -> Result<Self, CudaError> {
        cuda_status()?;
        let count = device_count()?;
        if ordinal >= count {
            return Err(CudaError::NoDevice { ordinal, count });
        }
        guarded("open the CUDA device", || Self::open_inner(ordinal))
    }

    fn open_inner(ordinal: usize) -> Result<Self, CudaError> {
        let ctx = CudaContext::new(ordinal)
            .map_err(drv(format!("create a context on device {ordinal}")))?;
        // SAFETY: the backend orders all its work on one stream, so cudarc's cross-stream
        // synchronisation (an event record/wait per kernel argument) is not needed.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream().map_err(drv("create a stream"))?;
        let attr = |a: sys::CUdevice_attribute, what: &str| {
            ctx.attribute(a)
                .map_err(drv(format!("device attribute {what}")))
        };
        use sys::CUdevice_attribute::*;
        let info = DeviceInfo {
            ordinal,
            name: ctx.name().map_err(drv("device name"))?,
            compute_capability: ctx
                .compute_capability()
                .map_err(drv("compute capability"))?,
            total_mem_bytes: ctx.total_mem().map_err(drv("device memory size"))?,
            sm_count: attr(CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, "multiprocessors")?,
            l2_cache_bytes: attr(CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE, "L2 size")?,
            memory_clock_khz: attr(CU_DEVICE_ATTRIBUTE_MEMORY_CLOCK_RATE, "memory clock")?,
            memory_bus_bits: attr(CU_DEVICE_ATTRIBUTE_GLOBAL_MEMORY_BUS_WIDTH, "memory bus")?,
            max_shared_mem_per_block_optin: attr(
                CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN,
                "shared memory opt-in",
            )?,
            driver_version: driver_version()?,
        };
        if info.compute_capability.0 < 8 {
            return Err(CudaError::invalid(
                "open the CUDA device",
                format!(
                    "{} has compute capability {}.{}; the kernels need 8.0 or newer (bf16 tensor cores)",
                    info.name, info.compute_capability.0, info.compute_capability.1
                ),
            ));
        }
        keep_pool_memory(&ctx);
        let compiled = compile_kernels(&info.arch(), &[])?;
        let (module, binary) = nvrtc::load(&ctx, &compiled)?;
        let mut compiled = compiled;
        compiled.loaded_as = binary;
        let mut funcs = HashMap::new();
        for name in shapes::kernel_names() {
            let f = module
                .load_function(&name)
                .map_err(drv(format!("load kernel {name}")))?;
            funcs.insert(name, f);
        }
        Ok(Self {
            ctx,
            stream,
            info,
            funcs,
            compiled,
        })
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// How the kernels were compiled (NVRTC version, arch, cubin or PTX, time, log).
    pub fn compiled(&self) -> &CompiledKernels {
        &self.compiled
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Free and total device memory, bytes.
    pub fn memory(&self) -> Result<(usize, usize), CudaError> {
        guarded("cuMemGetInfo", || {
            self.ctx.mem_get_info().map_err(drv("cuMemGetInfo"))
        })
    }

    pub(crate) fn func(&self, name: &str) -> Result<&CudaFunction, CudaError> {
        self.funcs
            .get(name)
            .ok_or_else(|| CudaError::invalid("launch", format!("no kernel named {name}")))
    }

    /// Registers, local (spill) bytes and static shared memory of every kernel.
    pub fn kernel_attributes(&self) -> Vec<KernelAttributes> {
        let mut names: Vec<&String> = self.funcs.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let f = &self.funcs[n];
                KernelAttributes {
                    name: n.clone(),
                    registers: f.num_regs().unwrap_or(-1),
                    local_bytes: f.local_size_bytes().unwrap_or(-1),
                    static_shared_bytes: f.shared_size_bytes().unwrap_or(-1),
                    max_threads_per_block: f.max_threads_per_block().unwrap_or(-1),
                }
            })
            .collect()
    }

    /// Waits for all work on the stream; an error from an earlier asynchronous launch surfaces
    /// here, reported as happening during `op`.
    pub fn synchronize(&self, op: &str) -> Result<(), CudaError> {
        guarded(op, || {
            self.stream
                .synchronize()
                .map_err(drv(format!("{op} (synchronize)")))
        })
    }

    /// Copies host data to a new device buffer.
    pub fn upload<T: cudarc::driver::DeviceRepr>(
        &self,
        what: &str,
        data: &[T],
    ) -> Result<CudaSlice<T>, CudaError> {
        guarded(what, || {
            self.stream.clone_htod(data).map_err(drv(format!(
                "upload {what} ({} bytes)",
                std::mem::size_of_val(data)
            )))
        })
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: cudarc::driver::DeviceRepr + Default + Clone>(
        &self,
        what: &str,
        buf: &CudaSlice<T>,
    ) -> Result<Vec<T>, CudaError> {
        guarded(what, || {
            self.stream
                .clone_dtoh(buf)
                .map_err(drv(format!("download {what}")))
        })
    }

    /// A zeroed device buffer of `len` elements.
    /// `len` elements of device memory from the stream's pool, not initialised: for outputs a
    /// kernel writes in full before anything reads them.
    pub fn uninit<T: cudarc::driver::DeviceRepr>(
        &self,
        what: &str,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        guarded(what, || {
            // SAFETY: the memory is only read after a kernel has written it (the callers'
            // contract); T is plain data.
            unsafe { self.stream.alloc::<T>(len) }.map_err(drv(format!(
                "allocate {what} ({} bytes)",
                len * std::mem::size_of::<T>()
            )))
        })
    }

    pub fn zeros<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
        &self,
        what: &str,
        len: usize,
    ) -> Result<CudaSlice<T>, CudaError> {
        guarded(what, || {
            self.stream.alloc_zeros::<T>(len).map_err(drv(format!(
                "allocate {what} ({} bytes)",
                len * std::mem::size_of::<T>()
            )))
        })
    }

    /// Overwrites `scratch` (make it a few times the L2 size) so the next kernel finds no
    /// weights in the L2 cache.
    pub fn flush_l2(&self, scratch: &mut CudaSlice<u8>) -> Result<(), CudaError> {
        guarded("flush L2", || {
            self.stream
                .memset_zeros(scratch)
                .map_err(drv("flush L2 (memset)"))
        })
    }

    /// A timing event (`record` it on [`Self::stream`], then [`Self::elapsed_ms`]).
    pub fn timing_event(&self) -> Result<CudaEvent, CudaError> {
        guarded("create an event", || {
            self.ctx
                .new_event(Some(sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(drv("create an event"))
        })
    }

    pub fn record(&self, ev: &CudaEvent) -> Result<(), CudaError> {
        guarded("record an event", || {
            ev.record(&self.stream).map_err(drv("record an event"))
        })
    }

    /// Milliseconds between two recorded events (waits for `end`).
    pub fn elapsed_ms(&self, start: &CudaEvent, end: &CudaEvent) -> Result<f32, CudaError> {
        guarded("event elapsed time", || {
            start.elapsed_ms(end).map_err(drv("event elapsed time"))
        })
    }

    /// Device-to-device copy bandwidth: copies `bytes` `reps` times (after one warm-up copy);
    /// returns the best time in milliseconds. Bytes moved = 2 x `bytes` (read + write).
    pub fn copy_time_ms(&self, bytes: usize, reps: usize) -> Result<f32, CudaError> {
        let src = self.zeros::<u8>("copy source", bytes)?;
        let mut dst = self.zeros::<u8>("copy destination", bytes)?;
        let (a, b) = (self.timing_event()?, self.timing_event()?);
        let mut best = f32::INFINITY;
        for i in 0..=reps.max(1) {
            self.record(&a)?;
            guarded("device-to-device copy", || {
                self.stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(drv("device-to-device copy"))
            })?;
            self.record(&b)?;
            let ms = self.elapsed_ms(&a, &b)?;
            if i > 0 {
                best = best.min(ms);
            }
        }
        self.synchronize("device-to-device copy")?;
        Ok(best)
    }

    /// A cuBLAS handle bound to this backend's stream.
    pub fn cublas(&self) -> Result<CudaBlas, CudaError> {
        guarded("create a cuBLAS handle", || {
            CudaBlas::new(self.stream.clone()).map_err(|e| CudaError::Cublas {
                op: "create a handle".into(),
                message: e.to_string(),
            })
        })
    }
}

/// The buffers of a pass come from the device's stream-ordered pool (`cuMemAllocAsync`). By
/// default the pool gives its free memory back to the driver at every synchronisation, so each
/// step would allocate from the driver again; with a release threshold the pool keeps up to
/// that much free memory and later passes reuse it. 1 GiB, the KV sizing's reserve: a step's
/// buffers stay, an outlier's (a long prefill's) go back. Without pool support the default
/// stays (a debug line says so).
fn keep_pool_memory(ctx: &Arc<CudaContext>) {
    let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
    let mut max: u64 = 1 << 30;
    // SAFETY: the context is current on this thread (just created and bound by cudarc); `pool`
    // and `max` are valid for the calls.
    let r = unsafe {
        ctx.bind_to_thread().ok();
        let r = sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device());
        if r == sys::CUresult::CUDA_SUCCESS {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                &mut max as *mut u64 as *mut core::ffi::c_void,
            )
        } else {
            r
        }
    };
    if r != sys::CUresult::CUDA_SUCCESS {
        tracing::debug!(result = ?r, "the device's memory pool keeps its default release threshold");
    }
}
