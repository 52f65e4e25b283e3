//! Run-time compilation of `kernels.cu` with NVRTC, and loading into a context.
//!
//! NVRTC compiles for the device's real architecture (`--gpu-architecture=sm_XY`), which yields
//! both a cubin and the PTX. The cubin is loaded first: it needs no JIT and, unlike PTX, also
//! loads when NVRTC is newer than the driver (PTX of a newer ISA version is refused with
//! CUDA_ERROR_UNSUPPORTED_PTX_VERSION). The PTX is the fallback.

use super::{drv, guarded, nvrtc_status, shapes, CudaError};
use cudarc::driver::{CudaContext, CudaModule};
use cudarc::nvrtc::{result, sys, Ptx};
use std::ffi::{c_char, CString};
use std::sync::Arc;

/// The output of one NVRTC compilation of every kernel.
#[derive(Clone, Debug)]
pub struct CompiledKernels {
    pub arch: String,
    /// NVRTC's (major, minor) version.
    pub nvrtc_version: (i32, i32),
    pub options: Vec<String>,
    pub seconds: f64,
    /// NVRTC's log (warnings; with `--ptxas-options=-v`, registers and spills per kernel).
    pub log: String,
    pub cubin: Option<Vec<u8>>,
    pub ptx: Vec<u8>,
    /// Set by the loader: "cubin" or "ptx (...why the cubin was not used)".
    pub loaded_as: String,
}

/// NVRTC's version.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    nvrtc_status()?;
    guarded("nvrtcVersion", || {
        let (mut a, mut b) = (0i32, 0i32);
        // SAFETY: writes two ints.
        unsafe { sys::nvrtcVersion(&mut a, &mut b) }
            .result()
            .map_err(|e| CudaError::Nvrtc {
                op: "version".into(),
                message: format!("{e:?}"),
            })?;
        Ok((a, b))
    })
}

/// Compiles [`shapes::KERNELS_SRC`] for `arch` (e.g. "sm_90"), with `extra` NVRTC options.
/// Needs only the NVRTC library (no driver, no GPU).
pub fn compile_kernels(arch: &str, extra: &[String]) -> Result<CompiledKernels, CudaError> {
    nvrtc_status()?;
    let nvrtc_version = nvrtc_version()?;
    guarded("compile the kernels", || {
        let t0 = std::time::Instant::now();
        let mut options = vec![
            format!("--gpu-architecture={arch}"),
            "--std=c++17".to_string(),
        ];
        options.extend(extra.iter().cloned());
        let src = CString::new(shapes::KERNELS_SRC)
            .map_err(|_| CudaError::invalid("compile the kernels", "source contains a NUL"))?;
        let name = CString::new("grok_kernels.cu").expect("static name");
        let nv = |op: &str| {
            let op = op.to_string();
            move |e: result::NvrtcError| CudaError::Nvrtc {
                op,
                message: format!("{e:?}"),
            }
        };
        let prog = result::create_program(&src, Some(&name)).map_err(nv("create program"))?;
        let out = (|| {
            // SAFETY: `prog` is a live program; options are valid C strings.
            let compiled = unsafe { result::compile_program(prog, &options) };
            // SAFETY: as above.
            let log = unsafe { result::get_program_log(prog) }
                .map(|v| c_chars_to_string(&v))
                .unwrap_or_else(|e| format!("(no log: {e:?})"));
            if let Err(e) = compiled {
                return Err(CudaError::Nvrtc {
                    op: format!("compile for {arch} with {options:?}"),
                    message: format!("{e:?}\n{log}"),
                });
            }
            // SAFETY: as above.
            let ptx = unsafe { result::get_ptx(prog) }.map_err(nv("get PTX"))?;
            let ptx: Vec<u8> = ptx
                .iter()
                .map(|&c| c as u8)
                .take_while(|&c| c != 0)
                .collect();
            let cubin = get_cubin(prog).ok();
            Ok((log, ptx, cubin))
        })();
        // SAFETY: destroyed once, after use.
        let _ = unsafe { result::destroy_program(prog) };
        let (log, ptx, cubin) = out?;
        Ok(CompiledKernels {
            arch: arch.to_string(),
            nvrtc_version,
            options,
            seconds: t0.elapsed().as_secs_f64(),
            log,
            cubin,
            ptx,
            loaded_as: String::new(),
        })
    })
}

fn get_cubin(prog: sys::nvrtcProgram) -> Result<Vec<u8>, CudaError> {
    let err = |op: &str| {
        let op = op.to_string();
        move |e: result::NvrtcError| CudaError::Nvrtc {
            op,
            message: format!("{e:?}"),
        }
    };
    let mut size = 0usize;
    // SAFETY: `prog` is a compiled program; writes one size.
    unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) }
        .result()
        .map_err(err("cubin size"))?;
    if size == 0 {
        return Err(CudaError::invalid("get cubin", "NVRTC produced no cubin"));
    }
    let mut buf = vec![0u8; size];
    // SAFETY: `buf` holds `size` bytes.
    unsafe { sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut c_char) }
        .result()
        .map_err(err("get cubin"))?;
    Ok(buf)
}

fn c_chars_to_string(v: &[c_char]) -> String {
    let bytes: Vec<u8> = v.iter().map(|&c| c as u8).take_while(|&c| c != 0).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Loads the compiled kernels: the cubin if there is one and it loads, else the PTX.
/// Returns the module and how it was loaded.
pub(crate) fn load(
    ctx: &Arc<CudaContext>,
    k: &CompiledKernels,
) -> Result<(Arc<CudaModule>, String), CudaError> {
    let mut why = String::from("no cubin from NVRTC");
    if let Some(cubin) = &k.cubin {
        match ctx.load_module(Ptx::from_binary(cubin.clone())) {
            Ok(m) => return Ok((m, "cubin".to_string())),
            Err(e) => why = format!("cubin did not load: {e}"),
        }
    }
    let ptx = String::from_utf8_lossy(&k.ptx).into_owned();
    let m = ctx.load_module(Ptx::from_src(ptx)).map_err(drv(format!(
        "load the kernels' PTX ({why}; NVRTC {}.{} must not be newer than the driver for PTX)",
        k.nvrtc_version.0, k.nvrtc_version.1
    )))?;
    Ok((m, format!("ptx ({why})")))
}
