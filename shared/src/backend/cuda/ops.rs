//! Safe wrappers of the kernels: argument checks (lengths, shapes), launch shapes from
//! [`shapes`], and errors that name the kernel. Launches are asynchronous (see
//! [`CudaBackend::synchronize`]).

use super::{drv, guarded, shapes, CudaBackend, CudaError};
use crate::backend::cpu::{Linear, Weights};
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{sys, CudaFunction, CudaSlice, LaunchArgs, LaunchConfig, PushKernelArg};
use half::bf16;
use shapes::{GemvKernel, GemvWeights, LaunchShape};

/// Weights of a linear layer on the device, `[out, in]` row-major.
pub enum DeviceWeights {
    /// bf16 bit patterns.
    Bf16(CudaSlice<u16>),
    /// int8 with f32 scales `[nb, out]`: `W[o, i] = q[o, i] * scales[i / (in / nb), o]`.
    I8 {
        q: CudaSlice<i8>,
        scales: CudaSlice<f32>,
        nb: usize,
    },
}

/// A bias-free linear layer on the device, `y = x · Wᵀ`.
pub struct DeviceLinear {
    pub out_features: usize,
    pub in_features: usize,
    pub weights: DeviceWeights,
}

impl DeviceLinear {
    pub fn kind(&self) -> GemvWeights {
        match &self.weights {
            DeviceWeights::Bf16(_) => GemvWeights::Bf16,
            DeviceWeights::I8 { nb, .. } => GemvWeights::I8 { nb: *nb },
        }
    }

    /// Bytes of stored weights (int8 scales at 4 bytes each), what one GEMV call reads.
    pub fn bytes(&self) -> usize {
        self.kind().bytes(self.out_features, self.in_features)
    }

    /// Device addresses of the weights and (int8) the scales (0: none).
    pub fn addresses(&self, stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> (u64, u64) {
        use cudarc::driver::DevicePtr;
        match &self.weights {
            DeviceWeights::Bf16(w) => (w.device_ptr(stream).0, 0),
            DeviceWeights::I8 { q, scales, .. } => {
                (q.device_ptr(stream).0, scales.device_ptr(stream).0)
            }
        }
    }
}

fn to_cfg(s: LaunchShape) -> LaunchConfig {
    LaunchConfig {
        grid_dim: s.grid,
        block_dim: s.block,
        shared_mem_bytes: s.shared_mem_bytes,
    }
}

pub(super) fn i32_of(op: &str, what: &str, v: usize) -> Result<i32, CudaError> {
    i32::try_from(v).map_err(|_| CudaError::invalid(op, format!("{what} = {v} exceeds i32")))
}

pub(super) fn need_len(op: &str, what: &str, have: usize, want: usize) -> Result<(), CudaError> {
    if have < want {
        return Err(CudaError::invalid(
            op,
            format!("{what} holds {have} elements, needs {want}"),
        ));
    }
    Ok(())
}

/// Launches `args` with the kernel's name in any error.
pub(super) fn launch(
    name: &str,
    mut args: LaunchArgs<'_>,
    shape: LaunchShape,
) -> Result<(), CudaError> {
    guarded(name, || {
        // SAFETY: every wrapper below passes the arguments the kernel declares, in order, with
        // buffer lengths checked against the shape, and a launch shape from `shapes`.
        unsafe { args.launch(to_cfg(shape)) }
            .map(|_| ())
            .map_err(drv(format!(
                "launch {name} (grid {:?}, block {:?}, smem {})",
                shape.grid, shape.block, shape.shared_mem_bytes
            )))
    })
}

impl CudaBackend {
    /// Lets `f` use `smem` bytes of dynamic shared memory (beside `static_bytes` of its own)
    /// for an attention over `keys` keys: over the default limit it opts in, up to what the
    /// device allows; more is a clear error.
    fn opt_in_shared_mem(
        &self,
        f: &CudaFunction,
        op: &str,
        smem: usize,
        static_bytes: usize,
        keys: usize,
    ) -> Result<(), CudaError> {
        // Without the opt-in, static and dynamic shared memory share the default 48 KiB.
        if smem + static_bytes <= shapes::DEFAULT_MAX_DYNAMIC_SMEM {
            return Ok(());
        }
        let max = self.info().max_shared_mem_per_block_optin.max(0) as usize;
        if smem + static_bytes > max {
            return Err(CudaError::invalid(
                op,
                format!("{keys} keys need {smem} bytes of shared memory; the device allows {max}"),
            ));
        }
        guarded(op, || {
            f.set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                smem as i32,
            )
            .map_err(drv(format!(
                "{op}: opt in to {smem} bytes of shared memory"
            )))
        })
    }
}

impl CudaBackend {
    /// Uploads a CPU linear layer (bf16 or int8 weights; f32 weights are not supported on the
    /// device yet).
    pub fn upload_linear(&self, name: &str, lin: &Linear) -> Result<DeviceLinear, CudaError> {
        let weights = match &lin.w {
            Weights::Bf16(b) => DeviceWeights::Bf16(self.upload(name, b.as_slice())?),
            Weights::I8 { w, scales, nb } => DeviceWeights::I8 {
                q: self.upload(name, w.as_slice())?,
                scales: self.upload(&format!("{name} scales"), scales.as_slice())?,
                nb: *nb,
            },
            Weights::F32(_) => {
                return Err(CudaError::invalid(
                    format!("upload {name}"),
                    "f32 weights are not supported by the CUDA GEMV (use bf16 or int8)",
                ))
            }
        };
        Ok(DeviceLinear {
            out_features: lin.out_features,
            in_features: lin.in_features,
            weights,
        })
    }

    /// `y[m, out] = x[m, in] · Wᵀ` (f32 activations, f32 accumulation), 1 <= m <= 64.
    /// [`GemvKernel::Mma`] reads every weight byte once for all m rows; [`GemvKernel::Simt`]
    /// once per 8 rows.
    pub fn linear(
        &self,
        kernel: GemvKernel,
        lin: &DeviceLinear,
        x: &CudaSlice<f32>,
        m: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (out, k) = (lin.out_features, lin.in_features);
        let kind = lin.kind();
        let op = shapes::gemv_kernel_name(kernel, kind, m.clamp(1, 64));
        shapes::check_gemv(out, k, m, kind).map_err(|e| CudaError::invalid(&op, e.0))?;
        need_len(&op, "x", x.len(), m * k)?;
        need_len(&op, "y", y.len(), m * out)?;
        let (out_i, k_i) = (i32_of(&op, "out", out)?, i32_of(&op, "in", k)?);
        match kernel {
            GemvKernel::Mma => {
                let shape = shapes::gemv_mma_shape(out, k, m, kind)
                    .map_err(|e| CudaError::invalid(&op, e.0))?;
                let f = self.func(&op)?;
                let xs = x.slice(..m * k);
                let mut ys = y.slice_mut(..m * out);
                self.launch_gemv_view(&op, f, lin, xs, &mut ys, m as i32, out_i, k_i, shape)
            }
            GemvKernel::Simt => {
                for (r0, rows) in shapes::gemv_simt_passes(m) {
                    let name = shapes::gemv_kernel_name(kernel, kind, rows);
                    let shape = shapes::gemv_simt_shape(out, k, rows, kind)
                        .map_err(|e| CudaError::invalid(&name, e.0))?;
                    let f = self.func(&name)?;
                    let xs = x.slice(r0 * k..(r0 + rows) * k);
                    let mut ys = y.slice_mut(r0 * out..(r0 + rows) * out);
                    self.launch_gemv_view(
                        &name,
                        f,
                        lin,
                        xs,
                        &mut ys,
                        rows as i32,
                        out_i,
                        k_i,
                        shape,
                    )?;
                }
                Ok(())
            }
        }
    }

    fn launch_gemv_view(
        &self,
        name: &str,
        f: &CudaFunction,
        lin: &DeviceLinear,
        x: cudarc::driver::CudaView<'_, f32>,
        y: &mut cudarc::driver::CudaViewMut<'_, f32>,
        m: i32,
        out: i32,
        k: i32,
        shape: LaunchShape,
    ) -> Result<(), CudaError> {
        let mut b = self.stream().launch_builder(f);
        match &lin.weights {
            DeviceWeights::Bf16(w) => {
                b.arg(w).arg(&x).arg(y).arg(&m).arg(&out).arg(&k);
                launch(name, b, shape)
            }
            DeviceWeights::I8 { q, scales, nb } => {
                let nb = *nb as i32;
                b.arg(q)
                    .arg(scales)
                    .arg(&nb)
                    .arg(&x)
                    .arg(y)
                    .arg(&m)
                    .arg(&out)
                    .arg(&k);
                launch(name, b, shape)
            }
        }
    }

    /// RMSNorm of `rows` rows of width `gain.len()`: `out = gain ⊙ x / sqrt(mean(x²) + eps)`.
    pub fn rms_norm(
        &self,
        x: &CudaSlice<f32>,
        gain: &CudaSlice<f32>,
        eps: f64,
        rows: usize,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let op = "rms_norm_f32";
        let d = gain.len();
        let shape = shapes::rms_norm_shape(rows, d).map_err(|e| CudaError::invalid(op, e.0))?;
        need_len(op, "x", x.len(), rows * d)?;
        need_len(op, "out", out.len(), rows * d)?;
        let d_i = i32_of(op, "d", d)?;
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(x).arg(gain).arg(out).arg(&d_i).arg(&eps);
        launch(op, b, shape)
    }

    /// Half-split RoPE in place on `x: [t, heads, key_size]`, row `i` at `positions[i]`.
    pub fn rope(
        &self,
        x: &mut CudaSlice<f32>,
        t: usize,
        heads: usize,
        key_size: usize,
        positions: &CudaSlice<i32>,
        theta: f64,
    ) -> Result<(), CudaError> {
        let op = "rope_f32";
        let shape =
            shapes::rope_shape(t, heads, key_size).map_err(|e| CudaError::invalid(op, e.0))?;
        need_len(op, "x", x.len(), t * heads * key_size)?;
        need_len(op, "positions", positions.len(), t)?;
        let (t_i, h_i, k_i) = (
            i32_of(op, "t", t)?,
            i32_of(op, "heads", heads)?,
            i32_of(op, "key_size", key_size)?,
        );
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(x)
            .arg(positions)
            .arg(&t_i)
            .arg(&h_i)
            .arg(&k_i)
            .arg(&theta);
        launch(op, b, shape)
    }

    /// `out[i] = gelu_tanh(a[i]) * b[i]` for `i < n`.
    pub fn gelu_gate(
        &self,
        a: &CudaSlice<f32>,
        b_: &CudaSlice<f32>,
        out: &mut CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let op = "gelu_gate_f32";
        let shape = shapes::elementwise_shape(n).map_err(|e| CudaError::invalid(op, e.0))?;
        need_len(op, "a", a.len(), n)?;
        need_len(op, "b", b_.len(), n)?;
        need_len(op, "out", out.len(), n)?;
        let n_i = n as i64;
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(a).arg(b_).arg(out).arg(&n_i);
        launch(op, b, shape)
    }

    /// Router of `rows` rows of `x: [rows, d]` against `w: [experts, d]` (f32): softmax over
    /// all experts, top `k` (ties to the lower index). Writes `gates`/`experts` `[rows, k]` and
    /// `probs` `[rows, experts]`.
    pub fn router_topk(
        &self,
        x: &CudaSlice<f32>,
        w: &CudaSlice<f32>,
        rows: usize,
        d: usize,
        num_experts: usize,
        k: usize,
        gates: &mut CudaSlice<f32>,
        experts: &mut CudaSlice<i32>,
        probs: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let op = "router_topk_f32";
        let shape = shapes::router_shape(rows, d, num_experts, k)
            .map_err(|e| CudaError::invalid(op, e.0))?;
        need_len(op, "x", x.len(), rows * d)?;
        need_len(op, "w", w.len(), num_experts * d)?;
        need_len(op, "gates", gates.len(), rows * k)?;
        need_len(op, "experts", experts.len(), rows * k)?;
        need_len(op, "probs", probs.len(), rows * num_experts)?;
        let (d_i, e_i, k_i) = (i32_of(op, "d", d)?, num_experts as i32, k as i32);
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(x)
            .arg(w)
            .arg(&d_i)
            .arg(&e_i)
            .arg(&k_i)
            .arg(gates)
            .arg(experts)
            .arg(probs);
        launch(op, b, shape)
    }

    /// Decode attention for one query token: `q: [nq, hd]`, caches `[len, nkv, hd]`, out
    /// `[nq, hd]`; logits × `mult`, soft-cap `cap·tanh(s/cap)` when `cap > 0`, f32 softmax.
    pub fn attention_decode(
        &self,
        q: &CudaSlice<f32>,
        k_cache: &CudaSlice<f32>,
        v_cache: &CudaSlice<f32>,
        len: usize,
        nq: usize,
        nkv: usize,
        head_dim: usize,
        mult: f32,
        cap: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let op = "attn_decode_f32";
        let shape = shapes::attention_shape(len, nq, nkv, head_dim)
            .map_err(|e| CudaError::invalid(op, e.0))?;
        need_len(op, "q", q.len(), nq * head_dim)?;
        need_len(op, "k cache", k_cache.len(), len * nkv * head_dim)?;
        need_len(op, "v cache", v_cache.len(), len * nkv * head_dim)?;
        need_len(op, "out", out.len(), nq * head_dim)?;
        let f = self.func(op)?;
        let smem = shape.shared_mem_bytes as usize;
        // The kernel's static shared memory (32 floats) also counts against the limit.
        self.opt_in_shared_mem(f, op, smem, 128, len)?;
        let (len_i, nq_i, nkv_i, hd_i) = (
            i32_of(op, "len", len)?,
            nq as i32,
            nkv as i32,
            head_dim as i32,
        );
        let mut b = self.stream().launch_builder(f);
        b.arg(q)
            .arg(k_cache)
            .arg(v_cache)
            .arg(out)
            .arg(&len_i)
            .arg(&nq_i)
            .arg(&nkv_i)
            .arg(&hd_i)
            .arg(&mult)
            .arg(&cap);
        launch(op, b, shape)
    }

    /// cuBLAS GEMM in bf16 (f32 accumulation): `y[m, out] = x[m, in] · Wᵀ` with `W: [out, in]`
    /// row-major. In cuBLAS's column-major terms: `C[out, m] = op(A)=Wᵀ-as-stored [out, in] ·
    /// B [in, m]`, i.e. transa = T (lda = in), transb = N (ldb = in), ldc = out.
    pub fn gemm_bf16(
        &self,
        blas: &CudaBlas,
        x: &CudaSlice<bf16>,
        w: &CudaSlice<bf16>,
        m: usize,
        out: usize,
        in_: usize,
        y: &mut CudaSlice<bf16>,
    ) -> Result<(), CudaError> {
        let op = "cublas bf16 gemm";
        need_len(op, "x", x.len(), m * in_)?;
        need_len(op, "w", w.len(), out * in_)?;
        need_len(op, "y", y.len(), m * out)?;
        let cfg = GemmConfig {
            transa: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T,
            transb: cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N,
            m: i32_of(op, "out", out)?,
            n: i32_of(op, "m", m)?,
            k: i32_of(op, "in", in_)?,
            alpha: bf16::ONE,
            lda: in_ as i32,
            ldb: in_ as i32,
            beta: bf16::ZERO,
            ldc: out as i32,
        };
        guarded(op, || {
            // SAFETY: lengths checked above match the GEMM's m, n, k and leading dimensions.
            unsafe { blas.gemm(cfg, w, x, y) }.map_err(|e| CudaError::Cublas {
                op: format!("gemm m={m} out={out} in={in_}"),
                message: e.to_string(),
            })
        })
    }
}

impl CudaBackend {
    /// cuBLAS's version number (e.g. 130100 for 13.1.0).
    pub fn cublas_version(&self, blas: &CudaBlas) -> Result<i32, CudaError> {
        guarded("cublasGetVersion", || {
            let mut v = 0i32;
            // SAFETY: the handle is live; writes one int.
            unsafe { cudarc::cublas::sys::cublasGetVersion_v2(*blas.handle(), &mut v) }
                .result()
                .map_err(|e| CudaError::Cublas {
                    op: "get version".into(),
                    message: e.to_string(),
                })?;
            Ok(v)
        })
    }
}

/// Blocks of 128 threads for the row kernels of the model pass.
const ROW_THREADS: u32 = 128;

pub(super) fn rows_shape(op: &str, rows: usize) -> Result<LaunchShape, CudaError> {
    if rows == 0 || rows > i32::MAX as usize {
        return Err(CudaError::invalid(op, format!("{rows} rows")));
    }
    Ok(LaunchShape {
        grid: (rows as u32, 1, 1),
        block: (ROW_THREADS, 1, 1),
        shared_mem_bytes: 0,
    })
}

/// Helpers of the model pass ([`super::model`]).
impl CudaBackend {
    /// As [`CudaBackend::linear`] with the tensor-core kernel, for any number of rows: passes
    /// of at most 64 rows (each pass reads the weights once).
    pub fn linear_rows(
        &self,
        lin: &DeviceLinear,
        x: &CudaSlice<f32>,
        m: usize,
        y: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (out, k) = (lin.out_features, lin.in_features);
        let kind = lin.kind();
        let op = "linear_rows";
        need_len(op, "x", x.len(), m * k)?;
        need_len(op, "y", y.len(), m * out)?;
        let (out_i, k_i) = (i32_of(op, "out", out)?, i32_of(op, "in", k)?);
        let mut r0 = 0;
        while r0 < m {
            let rows = (m - r0).min(shapes::GEMV_MAX_ROWS);
            let name = shapes::gemv_kernel_name(GemvKernel::Mma, kind, rows);
            shapes::check_gemv(out, k, rows, kind).map_err(|e| CudaError::invalid(&name, e.0))?;
            let shape = shapes::gemv_mma_shape(out, k, rows, kind)
                .map_err(|e| CudaError::invalid(&name, e.0))?;
            let f = self.func(&name)?;
            let xs = x.slice(r0 * k..(r0 + rows) * k);
            let mut ys = y.slice_mut(r0 * out..(r0 + rows) * out);
            self.launch_gemv_view(&name, f, lin, xs, &mut ys, rows as i32, out_i, k_i, shape)?;
            r0 += rows;
        }
        Ok(())
    }

    /// `h[i] += a[i]` for `i < n`.
    pub fn add_assign(
        &self,
        h: &mut CudaSlice<f32>,
        a: &CudaSlice<f32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let op = "add_f32";
        let shape = shapes::elementwise_shape(n).map_err(|e| CudaError::invalid(op, e.0))?;
        need_len(op, "h", h.len(), n)?;
        need_len(op, "a", a.len(), n)?;
        let n_i = n as i64;
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(h).arg(a).arg(&n_i);
        launch(op, b, shape)
    }

    /// `x[i] *= s` for `i < n`.
    pub fn scale(&self, x: &mut CudaSlice<f32>, s: f32, n: usize) -> Result<(), CudaError> {
        let op = "scale_f32";
        let shape = shapes::elementwise_shape(n).map_err(|e| CudaError::invalid(op, e.0))?;
        need_len(op, "x", x.len(), n)?;
        let n_i = n as i64;
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(x).arg(&s).arg(&n_i);
        launch(op, b, shape)
    }

    /// `dst[j, :] = src[idx[j], :]` for `j < n`, rows of width `d`.
    pub fn gather_rows(
        &self,
        src: &CudaSlice<f32>,
        idx: &CudaSlice<i32>,
        n: usize,
        d: usize,
        dst: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let op = "gather_rows_f32";
        let shape = rows_shape(op, n)?;
        need_len(op, "idx", idx.len(), n)?;
        need_len(op, "dst", dst.len(), n * d)?;
        let d_i = i32_of(op, "d", d)?;
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(src).arg(idx).arg(dst).arg(&d_i);
        launch(op, b, shape)
    }

    /// `dst[idx[j], :] += gate[j] * src[j, :]` for `j < n` (indices distinct).
    pub fn scatter_add_rows(
        &self,
        dst: &mut CudaSlice<f32>,
        idx: &CudaSlice<i32>,
        gate: &CudaSlice<f32>,
        src: &CudaSlice<f32>,
        n: usize,
        d: usize,
    ) -> Result<(), CudaError> {
        let op = "scatter_add_rows_f32";
        let shape = rows_shape(op, n)?;
        need_len(op, "idx", idx.len(), n)?;
        need_len(op, "gate", gate.len(), n)?;
        need_len(op, "src", src.len(), n * d)?;
        let d_i = i32_of(op, "d", d)?;
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(dst).arg(idx).arg(gate).arg(src).arg(&d_i);
        launch(op, b, shape)
    }
}

/// The kernels of the one forward pass's CUDA device (`device.rs`).
impl CudaBackend {
    /// `out[r, :] = w[tokens[r], :] · mult` for the embedding `w` (bf16 or int8 rows).
    pub fn embed_rows(
        &self,
        w: &DeviceLinear,
        tokens: &CudaSlice<i32>,
        n: usize,
        mult: f32,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let d = w.in_features;
        let op = match &w.weights {
            DeviceWeights::Bf16(_) => "embed_rows_bf16",
            DeviceWeights::I8 { .. } => "embed_rows_i8",
        };
        let shape = rows_shape(op, n)?;
        need_len(op, "tokens", tokens.len(), n)?;
        need_len(op, "out", out.len(), n * d)?;
        let d_i = i32_of(op, "d", d)?;
        let mut b = self.stream().launch_builder(self.func(op)?);
        match &w.weights {
            DeviceWeights::Bf16(q) => {
                b.arg(q).arg(tokens).arg(out).arg(&d_i).arg(&mult);
                launch(op, b, shape)
            }
            DeviceWeights::I8 { q, scales, nb } => {
                let nb_i = i32_of(op, "nb", *nb)?;
                let rows_i = i32_of(op, "rows", w.out_features)?;
                b.arg(q)
                    .arg(scales)
                    .arg(&nb_i)
                    .arg(&rows_i)
                    .arg(tokens)
                    .arg(out)
                    .arg(&d_i)
                    .arg(&mult);
                launch(op, b, shape)
            }
        }
    }

    /// Row `r` of `k` and `v` (`[n, w]`) to slot `slots[r]` of the caches.
    #[allow(clippy::too_many_arguments)]
    pub fn kv_write(
        &self,
        kc: &mut CudaSlice<f32>,
        vc: &mut CudaSlice<f32>,
        k: &CudaSlice<f32>,
        v: &CudaSlice<f32>,
        slots: &CudaSlice<i32>,
        n: usize,
        w: usize,
    ) -> Result<(), CudaError> {
        let op = "kv_write_f32";
        let shape = rows_shape(op, n)?;
        need_len(op, "k", k.len(), n * w)?;
        need_len(op, "v", v.len(), n * w)?;
        need_len(op, "slots", slots.len(), n)?;
        let w_i = i32_of(op, "w", w)?;
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(kc).arg(vc).arg(k).arg(v).arg(slots).arg(&w_i);
        launch(op, b, shape)
    }

    /// `vis[slots[i]] = vals[i]` for `i < n`.
    pub fn set_flags(
        &self,
        vis: &mut CudaSlice<i32>,
        slots: &CudaSlice<i32>,
        vals: &CudaSlice<i32>,
        n: usize,
    ) -> Result<(), CudaError> {
        let op = "set_flags_i32";
        let shape = shapes::elementwise_shape(n).map_err(|e| CudaError::invalid(op, e.0))?;
        need_len(op, "slots", slots.len(), n)?;
        need_len(op, "vals", vals.len(), n)?;
        let n_i = n as i64;
        let mut b = self.stream().launch_builder(self.func(op)?);
        b.arg(vis).arg(slots).arg(vals).arg(&n_i);
        launch(op, b, shape)
    }

    /// Attention of the `t` rows of a batched pass over the paged caches (see
    /// `attn_paged_f32`): per row its position, the end of its sequence's pass and the offset
    /// of its sequence's block table in `tables`; `heads`: (nq, nkv, hd, group size, first
    /// global query head, first global KV head) of this shard.
    #[allow(clippy::too_many_arguments)]
    pub fn attention_paged(
        &self,
        q: &CudaSlice<f32>,
        kv: (&CudaSlice<f32>, &CudaSlice<f32>, &CudaSlice<i32>),
        tables: &CudaSlice<i32>,
        rows: (&CudaSlice<i32>, &CudaSlice<i32>, &CudaSlice<i32>),
        t: usize,
        max_end: usize,
        block_size: usize,
        heads: (usize, usize, usize, usize, usize, usize),
        mult: f64,
        cap: f64,
        out: &mut CudaSlice<f32>,
    ) -> Result<(), CudaError> {
        let (nq, nkv, hd, g, q0, kv0) = heads;
        let op = "attn_paged_f32";
        let mut shape = shapes::attention_shape(max_end, nq, nkv.max(1), hd)
            .map_err(|e| CudaError::invalid(op, e.0))?;
        let warps = (shape.block.0 / 32) as usize;
        let smem = max_end * 8 + warps * hd * 4;
        shape.grid = (nq as u32, t as u32, 1);
        shape.shared_mem_bytes = smem as u32;
        // Rows go on the grid's y dimension.
        if t == 0 || t > 65_535 || cap <= 0.0 || g == 0 || block_size == 0 {
            return Err(CudaError::invalid(
                op,
                format!("{t} rows, soft-cap {cap}, group {g}, block size {block_size}"),
            ));
        }
        need_len(op, "q", q.len(), t * nq * hd)?;
        need_len(op, "out", out.len(), t * nq * hd)?;
        for (what, b) in [
            ("row positions", rows.0),
            ("row ends", rows.1),
            ("row tables", rows.2),
        ] {
            need_len(op, what, b.len(), t)?;
        }
        let f = self.func(op)?;
        self.opt_in_shared_mem(f, op, smem, 512, max_end)?;
        let ints: Vec<i32> = [block_size, nq, nkv, hd, g, q0, kv0]
            .iter()
            .map(|&x| i32_of(op, "a dimension", x))
            .collect::<Result<_, _>>()?;
        let mut b = self.stream().launch_builder(f);
        b.arg(q)
            .arg(kv.0)
            .arg(kv.1)
            .arg(kv.2)
            .arg(tables)
            .arg(rows.0)
            .arg(rows.1)
            .arg(rows.2)
            .arg(out);
        for x in &ints {
            b.arg(x);
        }
        b.arg(&mult).arg(&cap);
        launch(op, b, shape)
    }
}
