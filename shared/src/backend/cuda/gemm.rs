//! The cuBLAS path of a linear layer, for matrix products of many rows
//! ([`CudaBackend::linear_gemm`] and its [`GemmWorkspace`]); [`super::Cuda`] takes it from
//! `--gemm-min-rows` rows (`Cuda::try_gemm`).

use super::device::{err, Cuda, CudaBuf};
use super::ops::{launch, need_len, DeviceLinear, DeviceWeights};
use super::{guarded, shapes, CudaBackend, CudaError};
use crate::model::ModelError;
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaSlice, PushKernelArg};
use shapes::{GemmPrecision, GemvWeights};

/// Device buffers of [`CudaBackend::linear_gemm`], grown on demand and kept between calls:
/// the bf16 activations (hi, then lo rows), the bf16 copy of a chunk of int8 weights, and the
/// f32 partial sums.
#[derive(Default)]
pub struct GemmWorkspace {
    x: Option<CudaSlice<u16>>,
    w: Option<CudaSlice<u16>>,
    p: Option<CudaSlice<f32>>,
}

impl GemmWorkspace {
    /// Device bytes held.
    pub fn bytes(&self) -> usize {
        self.x.as_ref().map_or(0, |s| 2 * s.len())
            + self.w.as_ref().map_or(0, |s| 2 * s.len())
            + self.p.as_ref().map_or(0, |s| 4 * s.len())
    }

    /// Makes room for a pass of `m` rows through `lin` and returns its plan
    /// ([`shapes::gemm_plan`]) for [`CudaBackend::linear_gemm`]; an allocation that fails
    /// leaves the workspace without that buffer (a later call allocates it again).
    pub fn reserve(
        &mut self,
        be: &CudaBackend,
        lin: &DeviceLinear,
        m: usize,
        prec: GemmPrecision,
    ) -> Result<shapes::GemmPlan, CudaError> {
        let (nb, int8) = nb_of(lin);
        let plan = shapes::gemm_plan(m, lin.out_features, lin.in_features, nb, int8, prec)
            .map_err(|e| CudaError::invalid("linear_gemm", e.0))?;
        self.reserve_plan(be, lin, prec, plan)?;
        Ok(plan)
    }

    /// Makes room for chunks of `plan` (any plan: the GPU check uses small ones to exercise
    /// the chunking).
    pub fn reserve_plan(
        &mut self,
        be: &CudaBackend,
        lin: &DeviceLinear,
        prec: GemmPrecision,
        plan: shapes::GemmPlan,
    ) -> Result<(), CudaError> {
        let (out, k) = (lin.out_features, lin.in_features);
        let (nb, int8) = nb_of(lin);
        let h = prec.halves();
        fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
            be: &CudaBackend,
            slot: &mut Option<CudaSlice<T>>,
            n: usize,
            what: &str,
        ) -> Result<(), CudaError> {
            if slot.as_ref().is_none_or(|s| s.len() < n) {
                *slot = None;
                *slot = Some(be.zeros::<T>(what, n.max(1))?);
            }
            Ok(())
        }
        grow(be, &mut self.x, h * plan.rows * k, "gemm activations")?;
        if int8 {
            grow(
                be,
                &mut self.w,
                plan.out_rows.min(out) * k,
                "gemm bf16 weights",
            )?;
        }
        grow(
            be,
            &mut self.p,
            nb * h * plan.rows * out,
            "gemm partial sums",
        )
    }
}

/// Scale blocks of a matrix (1 for bf16) and whether it is int8.
fn nb_of(lin: &DeviceLinear) -> (usize, bool) {
    match lin.kind() {
        GemvWeights::Bf16 => (1, false),
        GemvWeights::I8 { nb } => (nb, true),
    }
}

/// The cuBLAS path of a linear layer, for passes of many rows.
impl CudaBackend {
    /// `y[m, out] = x[m, in] · Wᵀ` through cuBLAS (bf16 operands, f32 accumulation and output),
    /// after [`GemmWorkspace::reserve`] for the same `lin`, `m` and `prec`:
    /// - the activations become bf16 (`prec`: hi and lo halves stacked as rows, or hi only);
    /// - int8 weights are converted to bf16 (exactly) a chunk of output rows at a time, and each
    ///   scale block is its own GEMM of a strided batch;
    /// - `gemm_finish_f32` adds the halves, applies the int8 scales block by block in order,
    ///   and writes `y`.
    #[allow(clippy::too_many_arguments)]
    pub fn linear_gemm(
        &self,
        blas: &CudaBlas,
        ws: &mut GemmWorkspace,
        prec: GemmPrecision,
        plan: shapes::GemmPlan,
        lin: &DeviceLinear,
        x: &CudaSlice<f32>,
        m: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        use cudarc::cublas::sys as bs;
        use cudarc::driver::{DevicePtr, DevicePtrMut};
        let op = "linear_gemm";
        let (out, k) = (lin.out_features, lin.in_features);
        need_len(op, "x", x.len(), m * k)?;
        need_len(op, "y", y.len(), m * out)?;
        let (nb, int8) = nb_of(lin);
        // The shape checks of a plan, whatever its chunk sizes.
        shapes::gemm_plan(m, out, k, nb, int8, prec).map_err(|e| CudaError::invalid(op, e.0))?;
        if plan.rows == 0 || plan.out_rows == 0 || plan.rows > i32::MAX as usize / 2 {
            return Err(CudaError::invalid(op, format!("bad plan {plan:?}")));
        }
        let h = prec.halves();
        let bsz = k / nb;
        let (Some(xs), Some(ps)) = (ws.x.as_mut(), ws.p.as_mut()) else {
            return Err(CudaError::invalid(op, "workspace not reserved"));
        };
        need_len(op, "workspace activations", xs.len(), h * plan.rows * k)?;
        need_len(
            op,
            "workspace partial sums",
            ps.len(),
            nb * h * plan.rows * out,
        )?;
        if int8 {
            need_len(
                op,
                "workspace weights",
                ws.w.as_ref().map_or(0, |w| w.len()),
                plan.out_rows.min(out) * k,
            )?;
        }
        let stream = self.stream().clone();
        let (alpha, beta) = (1.0f32, 0.0f32);
        let mut r0 = 0;
        while r0 < m {
            let rows = plan.rows.min(m - r0);
            let n = rows * k;
            // The activations of this chunk: hi rows, then (split) lo rows.
            {
                let f = self.func("split_bf16_f32")?;
                let shape =
                    shapes::elementwise_shape(n).map_err(|e| CudaError::invalid(op, e.0))?;
                let xin = x.slice(r0 * k..r0 * k + n);
                let (mut hi, mut lo) = xs.split_at_mut(n);
                let n_i = n as i64;
                let mut b = stream.launch_builder(f);
                b.arg(&xin).arg(&mut hi);
                let null = 0u64;
                let mut lo_view = lo.slice_mut(..n.min(lo.len()));
                if h == 2 {
                    b.arg(&mut lo_view);
                } else {
                    b.arg(&null);
                }
                b.arg(&n_i);
                launch("split_bf16_f32", b, shape)?;
            }
            // Partial sums: one GEMM per weight chunk, a strided batch over the scale blocks.
            let mut o0 = 0;
            while o0 < out {
                let orows = plan.out_rows.min(out - o0);
                let a_ptr = match &lin.weights {
                    DeviceWeights::Bf16(w) => {
                        let (p, _g) = w.device_ptr(&stream);
                        p + (o0 * k * 2) as u64
                    }
                    DeviceWeights::I8 { q, .. } => {
                        let wbuf = ws.w.as_mut().expect("checked above");
                        let cnt = orows * k;
                        let f = self.func("i8_to_bf16")?;
                        let shape = shapes::elementwise_shape(cnt)
                            .map_err(|e| CudaError::invalid(op, e.0))?;
                        let qv = q.slice(o0 * k..o0 * k + cnt);
                        let cnt_i = cnt as i64;
                        let mut b = stream.launch_builder(f);
                        b.arg(&qv).arg(&mut *wbuf).arg(&cnt_i);
                        launch("i8_to_bf16", b, shape)?;
                        let (p, _g) = wbuf.device_ptr(&stream);
                        p
                    }
                };
                let (b_ptr, _gb) = xs.device_ptr(&stream);
                let (c_ptr, _gc) = ps.device_ptr_mut(&stream);
                let c_ptr = c_ptr + (o0 * 4) as u64;
                guarded(op, || {
                    // SAFETY: A is `orows` rows of `k` bf16 (lda k) with nb column blocks of
                    // `bsz` (stride bsz); B is `h * rows` rows of `k` bf16 (ldb k), blocks of
                    // bsz columns; C is nb blocks of [h * rows, out] f32 (ldc out), written in
                    // columns o0..o0 + orows. All fit the buffers checked above.
                    unsafe {
                        cudarc::cublas::result::gemm_strided_batched_ex(
                            *blas.handle(),
                            bs::cublasOperation_t::CUBLAS_OP_T,
                            bs::cublasOperation_t::CUBLAS_OP_N,
                            orows as i32,
                            (h * rows) as i32,
                            bsz as i32,
                            &alpha as *const f32 as *const core::ffi::c_void,
                            a_ptr as *const core::ffi::c_void,
                            bs::cudaDataType::CUDA_R_16BF,
                            k as i32,
                            bsz as i64,
                            b_ptr as *const core::ffi::c_void,
                            bs::cudaDataType::CUDA_R_16BF,
                            k as i32,
                            bsz as i64,
                            &beta as *const f32 as *const core::ffi::c_void,
                            c_ptr as *mut core::ffi::c_void,
                            bs::cudaDataType::CUDA_R_32F,
                            out as i32,
                            (h * rows * out) as i64,
                            nb as i32,
                            bs::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                            bs::cublasGemmAlgo_t::CUBLAS_GEMM_DFALT,
                        )
                    }
                    .map_err(|e| CudaError::Cublas {
                        op: format!(
                            "gemm rows={rows}x{h} out={o0}..{} in={k} blocks={nb}",
                            o0 + orows
                        ),
                        message: e.to_string(),
                    })
                })?;
                o0 += orows;
            }
            // y rows r0.. from the partial sums.
            {
                let cnt = rows * out;
                let f = self.func("gemm_finish_f32")?;
                let shape =
                    shapes::elementwise_shape(cnt).map_err(|e| CudaError::invalid(op, e.0))?;
                let (nb_i, h_i, cnt_i, out_i) = (nb as i32, h as i32, cnt as i64, out as i32);
                let null = 0u64;
                let mut yv = y.slice_mut(r0 * out..r0 * out + cnt);
                let mut b = stream.launch_builder(f);
                b.arg(&*ps);
                match &lin.weights {
                    DeviceWeights::I8 { scales, .. } => b.arg(scales),
                    DeviceWeights::Bf16(_) => b.arg(&null),
                };
                b.arg(&nb_i).arg(&h_i).arg(&cnt_i).arg(&out_i).arg(&mut yv);
                launch("gemm_finish_f32", b, shape)?;
            }
            r0 += rows;
        }
        Ok(())
    }
}

impl Cuda {
    /// `out = x · wᵀ` through cuBLAS when the settings take `rows` rows there, cuBLAS loads and
    /// the workspace fits; Ok(false) when the GEMV should run instead.
    pub(super) fn try_gemm(
        &self,
        w: &DeviceLinear,
        x: &CudaBuf,
        rows: usize,
        out: &mut CudaBuf,
    ) -> Result<bool, ModelError> {
        if !self.gemm.uses(rows, w.kind()) {
            return Ok(false);
        }
        // A size that found no room once takes the GEMV from then on (no retry per layer).
        if rows >= self.gemm_no_room.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(false);
        }
        let blas = self.blas.get_or_init(|| match self.be.cublas() {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(error = %e, "no cuBLAS: passes of many rows take the GEMV");
                None
            }
        });
        let Some(blas) = blas else {
            return Ok(false);
        };
        let mut ws = self.ws.lock().unwrap_or_else(|p| p.into_inner());
        let prec = self.gemm.precision;
        let plan = match ws.reserve(&self.be, w, rows, prec) {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, rows, "no room for the GEMM's buffers: products of this many rows take the GEMV");
                self.gemm_no_room
                    .fetch_min(rows, std::sync::atomic::Ordering::Relaxed);
                return Ok(false);
            }
        };
        self.be
            .linear_gemm(blas, &mut ws, prec, plan, w, &x.s, rows, &mut out.s)
            .map_err(err)?;
        Ok(true)
    }
}
