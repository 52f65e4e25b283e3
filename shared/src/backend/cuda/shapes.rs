//! Launch shapes and kernel sources of the CUDA backend ([`super::cuda`] when the `cuda`
//! feature is on). Pure arithmetic, compiled and unit-tested without CUDA, so CI checks the grid,
//! block and shared-memory sizes of every kernel on machines without a GPU.
//!
//! The kernels (`cuda/kernels.cu`, compiled at run time by NVRTC) document what they expect of
//! their launch; the functions here are the only place those shapes are computed.

use std::fmt;

/// The CUDA C source of every kernel (compiled at run time with NVRTC).
pub const KERNELS_SRC: &str = include_str!("kernels.cu");

/// Output rows per block of the GEMV kernels (one m16 MMA tile; 8 warps x 2 rows for SIMT).
pub const GEMV_ROWS_PER_BLOCK: usize = 16;
/// Input columns per k-block of the tensor-core GEMV (a warp's unit of work), for bf16 and for
/// int8 weights (`KB` in kernels.cu: keep them equal to it). 128 for int8 was measured slower.
pub const GEMV_K_BLOCK_BF16: usize = 64;
pub const GEMV_K_BLOCK_I8: usize = 64;
/// Most activation rows one tensor-core GEMV call takes (8 n8 tiles).
pub const GEMV_MAX_ROWS: usize = 64;
/// Most activation rows one SIMT GEMV launch takes (the wrapper launches once per 8 rows).
pub const GEMV_SIMT_MAX_ROWS: usize = 8;
/// Most warps splitting the input dimension inside one tensor-core GEMV block.
pub const GEMV_MAX_WARPS: usize = 8;
/// Experts the router kernel handles at most.
pub const ROUTER_MAX_EXPERTS: usize = 16;
/// Largest head dimension of the attention kernel (lanes hold hd / 32 dims each).
pub const ATTN_MAX_HEAD_DIM: usize = 256;
/// Threads of the attention, RMSNorm and router blocks.
pub const REDUCE_BLOCK_THREADS: u32 = 256;
/// Dynamic shared memory a kernel may use without opting in (cuFuncSetAttribute).
pub const DEFAULT_MAX_DYNAMIC_SMEM: usize = 48 * 1024;

/// Which GEMV implementation runs a linear layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GemvKernel {
    /// Tensor cores (bf16 m16n8k16, activations split hi + lo): every weight byte read once for
    /// up to 64 activation rows.
    Mma,
    /// CUDA cores, f32 FMA: 8 activation rows per pass.
    Simt,
}

impl GemvKernel {
    pub fn name(self) -> &'static str {
        match self {
            GemvKernel::Mma => "mma",
            GemvKernel::Simt => "simt",
        }
    }
}

/// Weight storage of a GEMV.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemvWeights {
    Bf16,
    /// int8 with `nb` f32 scales per output row along the input dimension.
    I8 {
        nb: usize,
    },
}

impl GemvWeights {
    pub fn name(self) -> &'static str {
        match self {
            GemvWeights::Bf16 => "bf16",
            GemvWeights::I8 { .. } => "int8",
        }
    }
    /// Bytes of stored weights of an `[out, in]` matrix (int8 scales at 4 bytes each).
    pub fn bytes(self, out: usize, in_: usize) -> usize {
        match self {
            GemvWeights::Bf16 => 2 * out * in_,
            GemvWeights::I8 { nb } => out * in_ + 4 * nb * out,
        }
    }
}

/// A shape a kernel cannot take.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShapeError(pub String);

impl fmt::Display for ShapeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ShapeError {}

fn bad<T>(msg: String) -> Result<T, ShapeError> {
    Err(ShapeError(msg))
}

/// Grid, block and dynamic shared memory of one launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchShape {
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub shared_mem_bytes: u32,
}

impl LaunchShape {
    fn linear(grid: usize, block: u32, smem: usize) -> Result<Self, ShapeError> {
        if grid == 0 || grid > i32::MAX as usize {
            return bad(format!("grid of {grid} blocks is out of range"));
        }
        Ok(Self {
            grid: (grid as u32, 1, 1),
            block: (block, 1, 1),
            shared_mem_bytes: smem as u32,
        })
    }
}

/// The k-block of the tensor-core GEMV for these weights.
pub fn gemv_k_block(w: GemvWeights) -> usize {
    match w {
        GemvWeights::Bf16 => GEMV_K_BLOCK_BF16,
        GemvWeights::I8 { .. } => GEMV_K_BLOCK_I8,
    }
}

/// Checks a GEMV `y[m, out] = x[m, in] · Wᵀ` against what both GEMV kernels require.
pub fn check_gemv(out: usize, in_: usize, m: usize, w: GemvWeights) -> Result<(), ShapeError> {
    if out == 0 || in_ == 0 {
        return bad(format!("gemv: empty weight [{out}, {in_}]"));
    }
    if m == 0 || m > GEMV_MAX_ROWS {
        return bad(format!(
            "gemv: {m} activation rows (1..={GEMV_MAX_ROWS} per call)"
        ));
    }
    let kb = gemv_k_block(w);
    if !in_.is_multiple_of(kb) {
        return bad(format!(
            "gemv: {} input dimension {in_} is not a multiple of {kb}",
            w.name()
        ));
    }
    if out > i32::MAX as usize || in_ > i32::MAX as usize {
        return bad(format!("gemv: [{out}, {in_}] exceeds 32-bit dimensions"));
    }
    if let GemvWeights::I8 { nb } = w {
        if nb == 0 || !in_.is_multiple_of(nb) || !(in_ / nb).is_multiple_of(kb) {
            return bad(format!(
                "gemv: int8 scale blocks: input dimension {in_} / nb {nb} must be a multiple of {kb}"
            ));
        }
    }
    Ok(())
}

/// Warps splitting the input dimension in a tensor-core GEMV block: up to 8, at least 4
/// k-blocks each. Depends on the weights only, never on `m`, so a row's result does not
/// depend on the other rows of the call (the summation order is fixed by the weights).
pub fn gemv_mma_warps(in_: usize, w: GemvWeights) -> usize {
    let kblocks = in_ / gemv_k_block(w);
    let mut w = GEMV_MAX_WARPS;
    while w > 1 && kblocks < 4 * w {
        w /= 2;
    }
    w
}

/// n8 tiles (activation-row groups of 8) of a tensor-core GEMV with `m` rows.
pub fn gemv_mma_tiles(m: usize) -> usize {
    m.div_ceil(8)
}

/// Launch of the tensor-core GEMV kernel `gemv_{bf16,i8}_mma_{tiles}`.
pub fn gemv_mma_shape(
    out: usize,
    in_: usize,
    m: usize,
    w: GemvWeights,
) -> Result<LaunchShape, ShapeError> {
    check_gemv(out, in_, m, w)?;
    let warps = gemv_mma_warps(in_, w);
    let nt = gemv_mma_tiles(m);
    // Cross-warp reduction: one f32 per (warp, tile, accumulator, lane).
    let smem = if warps > 1 {
        warps * nt * 4 * 32 * 4
    } else {
        0
    };
    LaunchShape::linear(out.div_ceil(GEMV_ROWS_PER_BLOCK), (32 * warps) as u32, smem)
}

/// Launch of one pass (at most 8 activation rows) of the SIMT GEMV kernel.
pub fn gemv_simt_shape(
    out: usize,
    in_: usize,
    rows: usize,
    w: GemvWeights,
) -> Result<LaunchShape, ShapeError> {
    check_gemv(out, in_, rows, w)?;
    if rows > GEMV_SIMT_MAX_ROWS {
        return bad(format!(
            "gemv simt: {rows} rows in one pass (at most {GEMV_SIMT_MAX_ROWS})"
        ));
    }
    LaunchShape::linear(out.div_ceil(GEMV_ROWS_PER_BLOCK), 256, 0)
}

/// The SIMT passes of an `m`-row GEMV: (first row, rows) with at most 8 rows each.
pub fn gemv_simt_passes(m: usize) -> Vec<(usize, usize)> {
    (0..m)
        .step_by(GEMV_SIMT_MAX_ROWS)
        .map(|r0| (r0, GEMV_SIMT_MAX_ROWS.min(m - r0)))
        .collect()
}

/// Entry point of a GEMV kernel for `rows` activation rows (tiles for MMA, rows for SIMT).
pub fn gemv_kernel_name(kernel: GemvKernel, w: GemvWeights, rows: usize) -> String {
    let n = match kernel {
        GemvKernel::Mma => gemv_mma_tiles(rows),
        GemvKernel::Simt => rows,
    };
    format!("gemv_{}_{}_{n}", dtype_tag(w), kernel.name())
}

/// The grouped tensor-core GEMV (`gemv_{bf16,i8}_mmag_{tiles}`) of the MoE with its routing on
/// the device, for slots of at most `rows` rows.
pub fn gemv_grouped_kernel_name(w: GemvWeights, rows: usize) -> String {
    format!("gemv_{}_mmag_{}", dtype_tag(w), gemv_mma_tiles(rows))
}

/// Launch of the grouped GEMV: the tensor-core GEMV's blocks for `rows` rows, once per slot
/// (grid.y).
pub fn gemv_grouped_shape(
    out: usize,
    in_: usize,
    rows: usize,
    slots: usize,
    w: GemvWeights,
) -> Result<LaunchShape, ShapeError> {
    if slots == 0 || slots > 65535 {
        return bad(format!("grouped gemv: {slots} slots"));
    }
    let mut s = gemv_mma_shape(out, in_, rows, w)?;
    s.grid.1 = slots as u32;
    Ok(s)
}

/// Experts the MoE with its routing on the device takes at most (its plan's bit mask).
pub const MOE_DEVICE_MAX_EXPERTS: usize = 32;

fn dtype_tag(w: GemvWeights) -> &'static str {
    match w {
        GemvWeights::Bf16 => "bf16",
        GemvWeights::I8 { .. } => "i8",
    }
}

/// RMSNorm: one block per row.
pub fn rms_norm_shape(rows: usize, d: usize) -> Result<LaunchShape, ShapeError> {
    if rows == 0 || d == 0 || d > i32::MAX as usize {
        return bad(format!("rms_norm: rows {rows}, d {d}"));
    }
    LaunchShape::linear(rows, REDUCE_BLOCK_THREADS, 0)
}

/// RoPE: one thread per (row, head, i < key_size / 2).
pub fn rope_shape(t: usize, heads: usize, key_size: usize) -> Result<LaunchShape, ShapeError> {
    if t == 0 || heads == 0 || key_size == 0 || !key_size.is_multiple_of(2) {
        return bad(format!(
            "rope: t {t}, heads {heads}, key_size {key_size} (even, non-zero)"
        ));
    }
    let total = t * heads * key_size / 2;
    LaunchShape::linear(total.div_ceil(128), 128, 0)
}

/// Element-wise kernels (GELU gate): grid-stride loop, at most 8192 blocks of 256 threads.
pub fn elementwise_shape(n: usize) -> Result<LaunchShape, ShapeError> {
    if n == 0 {
        return bad("elementwise: no elements".into());
    }
    LaunchShape::linear(n.div_ceil(256).min(8192), 256, 0)
}

/// Router: one block per row.
pub fn router_shape(
    rows: usize,
    d: usize,
    experts: usize,
    k: usize,
) -> Result<LaunchShape, ShapeError> {
    if experts == 0 || experts > ROUTER_MAX_EXPERTS {
        return bad(format!(
            "router: {experts} experts (1..={ROUTER_MAX_EXPERTS})"
        ));
    }
    if k == 0 || k > experts {
        return bad(format!("router: top-{k} of {experts} experts"));
    }
    if rows == 0 || d == 0 {
        return bad(format!("router: rows {rows}, d {d}"));
    }
    LaunchShape::linear(rows, REDUCE_BLOCK_THREADS, 0)
}

/// Decode attention: one block of 8 warps per query head; dynamic shared memory holds the
/// `len` scores and the warps' partial outputs. The caller opts in above 48 KiB.
pub fn attention_shape(
    len: usize,
    nq: usize,
    nkv: usize,
    head_dim: usize,
) -> Result<LaunchShape, ShapeError> {
    if len == 0 || len > i32::MAX as usize {
        return bad(format!("attention: {len} keys"));
    }
    if nq == 0 || nkv == 0 || !nq.is_multiple_of(nkv) {
        return bad(format!(
            "attention: {nq} query heads are not a multiple of {nkv} kv heads"
        ));
    }
    if head_dim == 0 || !head_dim.is_multiple_of(32) || head_dim > ATTN_MAX_HEAD_DIM {
        return bad(format!(
            "attention: head dim {head_dim} (a multiple of 32, at most {ATTN_MAX_HEAD_DIM})"
        ));
    }
    let warps = (REDUCE_BLOCK_THREADS / 32) as usize;
    let smem = (len + warps * head_dim) * 4;
    LaunchShape::linear(nq, REDUCE_BLOCK_THREADS, smem)
}

/// How the cuBLAS path of a linear layer takes its f32 activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GemmPrecision {
    /// `x = hi + lo`, two bf16 halves stacked as twice the rows of one GEMM: the GEMV's
    /// 2^-17, at twice the tensor work.
    Split,
    /// `x` rounded to bf16 (relative error 2^-9), one GEMM of the rows.
    Bf16,
}

impl GemmPrecision {
    /// Activation halves (rows of the GEMM per row of the pass).
    pub fn halves(self) -> usize {
        match self {
            GemmPrecision::Split => 2,
            GemmPrecision::Bf16 => 1,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            GemmPrecision::Split => "split",
            GemmPrecision::Bf16 => "bf16",
        }
    }
}

/// Bytes of f32 partial sums one GEMM chunk may hold (`[nb][halves x rows, out]`).
pub const GEMM_PARTIALS_BYTES: usize = 128 << 20;
/// Bytes of bf16 activations one GEMM chunk may hold (`[halves x rows, in]`).
pub const GEMM_ACTIVATIONS_BYTES: usize = 64 << 20;
/// Bytes of bf16 weights converted from int8 per chunk of output rows.
pub const GEMM_WEIGHTS_BYTES: usize = 64 << 20;

/// How `CudaBackend::linear_gemm` cuts a pass of `m` rows through `[out, in]` weights with `nb`
/// scale blocks (1 for bf16).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmPlan {
    /// Rows of the pass per chunk (the partial sums of a chunk fit [`GEMM_PARTIALS_BYTES`],
    /// its bf16 activations [`GEMM_ACTIVATIONS_BYTES`]).
    pub rows: usize,
    /// Output rows per weight chunk (int8: the bf16 copy fits [`GEMM_WEIGHTS_BYTES`]; bf16:
    /// all of them).
    pub out_rows: usize,
}

/// Which matrix products of a CUDA device take the cuBLAS path, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GemmSettings {
    /// Products of at least this many rows through bf16 weights go through cuBLAS (0: never;
    /// fewer rows take the tensor-core GEMV, which reads the weights once per 64 rows).
    pub min_rows: usize,
    /// The same for int8 weights (which cuBLAS takes after converting them to bf16: 5 bytes
    /// moved per weight, where the GEMV reads 1 per 64 rows).
    pub min_rows_int8: usize,
    pub precision: GemmPrecision,
}

/// Rows from which a pass takes cuBLAS by default. On an H200 (BENCHMARKS.md, GPU kernels) the
/// tensor-core GEMV of [6144 x 6144] bf16 was level with cuBLAS at 8 rows (28 against 30 µs) and
/// took 4x its time at 64 (127 against 31 µs); 16 sits between, counting the split's double
/// tensor work. The GPU check's `gemm` group measures the crossover of this code on a card.
pub const DEFAULT_GEMM_MIN_ROWS: usize = 16;
/// The same for int8 weights: the GEMV reads 1 byte per weight per 64 rows where the conversion
/// and the GEMM move 5, so cuBLAS can only pay from about 64 rows (a guess from that arithmetic
/// until the `gemm` group has measured it).
pub const DEFAULT_GEMM_MIN_ROWS_INT8: usize = 64;

impl Default for GemmSettings {
    fn default() -> Self {
        GemmSettings {
            min_rows: DEFAULT_GEMM_MIN_ROWS,
            min_rows_int8: DEFAULT_GEMM_MIN_ROWS_INT8,
            precision: GemmPrecision::Split,
        }
    }
}

impl GemmSettings {
    /// Whether a product of `rows` rows through weights of `kind` takes cuBLAS.
    pub fn uses(&self, rows: usize, kind: GemvWeights) -> bool {
        let min = match kind {
            GemvWeights::Bf16 => self.min_rows,
            GemvWeights::I8 { .. } => self.min_rows_int8,
        };
        min > 0 && rows >= min
    }
}

pub fn gemm_plan(
    m: usize,
    out: usize,
    in_: usize,
    nb: usize,
    int8: bool,
    prec: GemmPrecision,
) -> Result<GemmPlan, ShapeError> {
    if m == 0 || out == 0 || in_ == 0 || nb == 0 || !in_.is_multiple_of(nb) {
        return bad(format!(
            "gemm: {m} rows through [{out} x {in_}] with {nb} scale blocks"
        ));
    }
    let h = prec.halves();
    let rows = (GEMM_PARTIALS_BYTES / (nb * h * out * 4))
        .min(GEMM_ACTIVATIONS_BYTES / (h * in_ * 2))
        .clamp(1, m);
    // Whole multiples of 64 output rows keep every chunk's output columns 256-byte aligned.
    let out_rows = if int8 {
        let r = GEMM_WEIGHTS_BYTES / (2 * in_);
        (if r >= 64 { r / 64 * 64 } else { r }).clamp(1, out)
    } else {
        out
    };
    // cuBLAS takes i32 dimensions and leading dimensions; batch strides are i64.
    let fits = |v: usize| v <= i32::MAX as usize;
    if !fits(in_) || !fits(out) || !fits(h * rows) || !fits(nb) {
        return bad(format!(
            "gemm: [{out} x {in_}] exceeds cuBLAS's i32 dimensions"
        ));
    }
    Ok(GemmPlan { rows, out_rows })
}

/// Every `extern "C"` entry point of [`KERNELS_SRC`].
pub fn kernel_names() -> Vec<String> {
    let mut v = Vec::new();
    for kernel in [GemvKernel::Mma, GemvKernel::Simt] {
        for w in [GemvWeights::Bf16, GemvWeights::I8 { nb: 1 }] {
            for n in 1..=8 {
                v.push(format!("gemv_{}_{}_{n}", dtype_tag(w), kernel.name()));
            }
        }
    }
    for w in [GemvWeights::Bf16, GemvWeights::I8 { nb: 1 }] {
        for n in 1..=8 {
            v.push(gemv_grouped_kernel_name(w, n * 8));
        }
    }
    for k in [
        "rms_norm_f32",
        "rope_f32",
        "gelu_gate_f32",
        "router_topk_f32",
        "attn_decode_f32",
        "add_f32",
        "scale_f32",
        "gather_rows_f32",
        "scatter_add_rows_f32",
        "embed_rows_bf16",
        "embed_rows_i8",
        "kv_write_f32",
        "set_flags_i32",
        "attn_paged_f32",
        "split_bf16_f32",
        "i8_to_bf16",
        "gemm_finish_f32",
        "moe_plan_i32",
        "moe_gather_f32",
        "moe_combine_f32",
    ] {
        v.push(k.to_string());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grouped_gemv_is_the_gemv_once_per_slot() {
        let one = gemv_mma_shape(32768, 6144, 3, GemvWeights::Bf16).unwrap();
        let g = gemv_grouped_shape(32768, 6144, 3, 8, GemvWeights::Bf16).unwrap();
        assert_eq!(
            (g.grid.0, g.grid.1, g.block, g.shared_mem_bytes),
            (one.grid.0, 8, one.block, one.shared_mem_bytes)
        );
        assert_eq!(gemv_grouped_kernel_name(I8_8, 9), "gemv_i8_mmag_2");
        assert!(gemv_grouped_shape(64, 64, 1, 0, GemvWeights::Bf16).is_err());
        assert!(gemv_grouped_shape(64, 64, 65, 2, GemvWeights::Bf16).is_err());
    }

    #[test]
    fn gemm_settings_pick_cublas_by_rows_and_weights() {
        let g = GemmSettings::default();
        let i8 = GemvWeights::I8 { nb: 8 };
        assert!(!g.uses(DEFAULT_GEMM_MIN_ROWS - 1, GemvWeights::Bf16));
        assert!(g.uses(DEFAULT_GEMM_MIN_ROWS, GemvWeights::Bf16));
        assert!(
            !g.uses(DEFAULT_GEMM_MIN_ROWS_INT8 - 1, i8) && g.uses(DEFAULT_GEMM_MIN_ROWS_INT8, i8)
        );
        let never = GemmSettings {
            min_rows: 0,
            min_rows_int8: 0,
            ..g
        };
        assert!(!never.uses(1 << 20, GemvWeights::Bf16) && !never.uses(1 << 20, i8));
    }

    #[test]
    fn gemm_plans_bound_their_buffers_and_cover_the_pass() {
        use GemmPrecision::*;
        // Grok-1's widths: the MoE's up projection and its int8 down projection (nb 8).
        let p = gemm_plan(4096, 32768, 6144, 1, false, Split).unwrap();
        assert_eq!(p.out_rows, 32768, "bf16 weights are used in place");
        assert!(
            p.rows * 2 * 32768 * 4 <= GEMM_PARTIALS_BYTES && p.rows >= 512,
            "{p:?}"
        );
        let p = gemm_plan(4096, 6144, 32768, 8, true, Bf16).unwrap();
        assert!(
            p.rows * 8 * 6144 * 4 <= GEMM_PARTIALS_BYTES && p.rows >= 512,
            "{p:?}"
        );
        assert!(p.rows * 32768 * 2 <= GEMM_ACTIVATIONS_BYTES, "{p:?}");
        assert!(
            p.out_rows * 32768 * 2 <= GEMM_WEIGHTS_BYTES && p.out_rows >= 512,
            "{p:?}"
        );
        let p = gemm_plan(64, 32768, 6144, 1, true, Split).unwrap();
        assert_eq!(p.out_rows % 64, 0, "{p:?}");
        // Few rows: one chunk; a row wider than the budget still gets one row.
        assert_eq!(
            gemm_plan(3, 8, 16, 1, true, Split).unwrap(),
            GemmPlan {
                rows: 3,
                out_rows: 8
            }
        );
        assert_eq!(gemm_plan(9, 1 << 26, 64, 8, false, Split).unwrap().rows, 1);
        for bad in [(0, 8, 16, 1), (4, 0, 16, 1), (4, 8, 16, 3), (4, 8, 16, 0)] {
            assert!(
                gemm_plan(bad.0, bad.1, bad.2, bad.3, false, Split).is_err(),
                "{bad:?}"
            );
        }
    }

    const I8_1: GemvWeights = GemvWeights::I8 { nb: 1 };
    const I8_8: GemvWeights = GemvWeights::I8 { nb: 8 };

    #[test]
    fn sources_define_every_entry_point() {
        assert!(KERNELS_SRC.len() > 1000);
        let names = kernel_names();
        assert_eq!(names.len(), 68);
        // The GEMV entry points `gemv_{bf16,i8}_{KIND}_{1..8}` come from one
        // `GEMV_ENTRIES(KIND, ...)` line per kind (a macro of two extern "C" definitions per
        // row count); every other entry point is written out.
        let mut generated = 0;
        for n in &names {
            let family = n
                .strip_prefix("gemv_bf16_")
                .or_else(|| n.strip_prefix("gemv_i8_"))
                .and_then(|rest| rest.rsplit_once('_'))
                .filter(|(_, m)| matches!(m.parse::<u32>(), Ok(1..=8)));
            if let Some((kind, _)) = family {
                let line = if kind == "mmag" {
                    "\nGEMV_GROUPED_ENTRIES(".to_string()
                } else {
                    format!("\nGEMV_ENTRIES({kind}, ")
                };
                assert_eq!(
                    KERNELS_SRC.matches(&line).count(),
                    1,
                    "kernels.cu has no single GEMV_ENTRIES line for {n}"
                );
                generated += 1;
                continue;
            }
            let decl = format!(" {n}(");
            assert!(
                KERNELS_SRC.contains(&decl),
                "kernels.cu has no entry point {n}"
            );
            assert_eq!(
                KERNELS_SRC.matches(&decl).count(),
                1,
                "{n} is defined more than once"
            );
        }
        assert_eq!(
            generated, 48,
            "three GEMV kinds (one grouped) x two weight types x 8 row counts"
        );
        // Each entry point is extern "C" (unmangled names for cuModuleGetFunction): the
        // written ones, and the two in each of the two GEMV macros.
        let externs = KERNELS_SRC.matches("extern \"C\" __global__").count();
        assert_eq!(externs, names.len() - generated + 4);
        // Self-contained: NVRTC gets no include paths.
        assert!(!KERNELS_SRC
            .lines()
            .any(|l| l.trim_start().starts_with("#include")));
    }

    #[test]
    fn gemv_names_follow_rows() {
        assert_eq!(
            gemv_kernel_name(GemvKernel::Mma, GemvWeights::Bf16, 1),
            "gemv_bf16_mma_1"
        );
        assert_eq!(gemv_kernel_name(GemvKernel::Mma, I8_8, 9), "gemv_i8_mma_2");
        assert_eq!(gemv_kernel_name(GemvKernel::Mma, I8_1, 64), "gemv_i8_mma_8");
        assert_eq!(
            gemv_kernel_name(GemvKernel::Simt, I8_1, 5),
            "gemv_i8_simt_5"
        );
        for m in 1..=64 {
            let n = gemv_kernel_name(GemvKernel::Mma, GemvWeights::Bf16, m);
            assert!(kernel_names().contains(&n), "{n}");
        }
    }

    #[test]
    fn gemv_mma_shapes_of_grok1() {
        // q / o projections [6144, 6144], expert up [32768, 6144], expert down [6144, 32768].
        let s = gemv_mma_shape(6144, 6144, 1, GemvWeights::Bf16).unwrap();
        assert_eq!(s.grid, (384, 1, 1));
        assert_eq!(s.block, (256, 1, 1));
        assert_eq!(s.shared_mem_bytes, 8 * 4 * 32 * 4);
        let s = gemv_mma_shape(32768, 6144, 64, I8_1).unwrap();
        assert_eq!(s.grid, (2048, 1, 1));
        assert_eq!(s.shared_mem_bytes, 8 * 8 * 512);
        assert!(s.shared_mem_bytes as usize <= DEFAULT_MAX_DYNAMIC_SMEM);
        let s = gemv_mma_shape(6144, 32768, 8, I8_8).unwrap();
        assert_eq!(s.grid, (384, 1, 1));
        // kv projections of one tp rank: [128, 6144]; odd row counts round up.
        let s = gemv_mma_shape(1000, 6144, 3, GemvWeights::Bf16).unwrap();
        assert_eq!(s.grid, (63, 1, 1));
    }

    #[test]
    fn gemv_mma_warps_depend_on_the_weights_only() {
        let bf = GemvWeights::Bf16;
        assert_eq!(gemv_mma_warps(6144, bf), 8);
        assert_eq!(gemv_mma_warps(32768, bf), 8);
        assert_eq!(gemv_mma_warps(64, bf), 1);
        assert_eq!(gemv_mma_warps(256, bf), 1);
        assert_eq!(gemv_mma_warps(512, bf), 2);
        assert_eq!(gemv_mma_warps(1024, bf), 4);
        assert_eq!(gemv_mma_warps(2048, bf), 8);
        assert_eq!(gemv_mma_warps(6144, I8_8), 8);
        assert_eq!(gemv_mma_warps(2048, I8_1), 8);
        assert_eq!(gemv_mma_warps(1024, I8_1), 4);
        assert_eq!(gemv_mma_warps(256, I8_1), 1);
        for w in [bf, I8_1] {
            let kb = gemv_k_block(w);
            for k in (kb..=65536).step_by(kb) {
                let warps = gemv_mma_warps(k, w);
                assert!(warps.is_power_of_two() && warps <= GEMV_MAX_WARPS);
                assert!(warps == 1 || k / kb >= 4 * warps);
                // The block shape is the same for every m (batch invariance).
                let s1 = gemv_mma_shape(128, k, 1, w).unwrap();
                let s64 = gemv_mma_shape(128, k, 64, w).unwrap();
                assert_eq!((s1.grid, s1.block), (s64.grid, s64.block));
                assert!(s64.shared_mem_bytes as usize <= DEFAULT_MAX_DYNAMIC_SMEM);
            }
        }
    }

    #[test]
    fn gemv_rejects_shapes_the_kernels_cannot_take() {
        assert!(check_gemv(6144, 6144, 0, GemvWeights::Bf16).is_err());
        assert!(check_gemv(6144, 6144, 65, GemvWeights::Bf16).is_err());
        assert!(check_gemv(6144, 6100, 1, GemvWeights::Bf16).is_err());
        assert!(check_gemv(0, 6144, 1, GemvWeights::Bf16).is_err());
        assert!(check_gemv(6144, 6208, 1, GemvWeights::Bf16).is_ok());
        assert!(check_gemv(6144, 6208, 1, I8_1).is_ok());
        assert!(check_gemv(6144, 6176, 1, I8_1).is_err());
        // 6144 / 8 = 768 = 12 * 64: fine; 32768 / 8 = 4096: fine; 6144 / 96 = 64: fine.
        assert!(check_gemv(6144, 6144, 1, I8_8).is_ok());
        assert!(check_gemv(6144, 32768, 1, I8_8).is_ok());
        assert!(check_gemv(6144, 6144, 1, GemvWeights::I8 { nb: 96 }).is_ok());
        // 6144 / 192 = 32: a scale block smaller than a k-block.
        assert!(check_gemv(6144, 6144, 1, GemvWeights::I8 { nb: 192 }).is_err());
        assert!(check_gemv(6144, 6144, 1, GemvWeights::I8 { nb: 0 }).is_err());
        assert!(check_gemv(6144, 6144, 1, GemvWeights::I8 { nb: 5 }).is_err());
        assert!(gemv_simt_shape(6144, 6144, 9, GemvWeights::Bf16).is_err());
    }

    #[test]
    fn simt_passes_cover_all_rows() {
        assert_eq!(gemv_simt_passes(1), vec![(0, 1)]);
        assert_eq!(gemv_simt_passes(8), vec![(0, 8)]);
        assert_eq!(gemv_simt_passes(13), vec![(0, 8), (8, 5)]);
        assert_eq!(gemv_simt_passes(64).len(), 8);
        for m in 1..=64 {
            let p = gemv_simt_passes(m);
            assert_eq!(p.iter().map(|x| x.1).sum::<usize>(), m);
            assert!(p.iter().all(|&(_, r)| (1..=8).contains(&r)));
            let s = gemv_simt_shape(6144, 6144, p[0].1, GemvWeights::Bf16).unwrap();
            assert_eq!(s.grid, (384, 1, 1));
            assert_eq!(s.block, (256, 1, 1));
        }
    }

    #[test]
    fn weight_bytes() {
        assert_eq!(GemvWeights::Bf16.bytes(6144, 6144), 2 * 6144 * 6144);
        assert_eq!(I8_8.bytes(6144, 32768), 6144 * 32768 + 4 * 8 * 6144);
    }

    #[test]
    fn small_kernel_shapes() {
        let s = rms_norm_shape(64, 6144).unwrap();
        assert_eq!((s.grid, s.block), ((64, 1, 1), (256, 1, 1)));
        assert!(rms_norm_shape(0, 6144).is_err());

        // 48 q heads x 128 dims: 64 threads per head.
        let s = rope_shape(1, 48, 128).unwrap();
        assert_eq!(s.grid.0 as usize * s.block.0 as usize, 48 * 64);
        let s = rope_shape(3, 8, 128).unwrap();
        assert!(s.grid.0 as usize * s.block.0 as usize >= 3 * 8 * 64);
        assert!(rope_shape(1, 8, 127).is_err());

        let s = elementwise_shape(64 * 32768).unwrap();
        assert_eq!(s.grid, (8192, 1, 1));
        let s = elementwise_shape(1000).unwrap();
        assert_eq!(s.grid, (4, 1, 1));
        assert!(elementwise_shape(0).is_err());

        let s = router_shape(8, 6144, 8, 2).unwrap();
        assert_eq!(s.grid, (8, 1, 1));
        assert!(router_shape(8, 6144, 17, 2).is_err());
        assert!(router_shape(8, 6144, 8, 9).is_err());
        assert!(router_shape(8, 6144, 8, 0).is_err());
    }

    #[test]
    fn attention_shapes() {
        // Grok-1: 48 q heads, 8 kv heads, 128 dims; the full 8192-token context fits the
        // default 48 KiB of dynamic shared memory.
        let s = attention_shape(8192, 48, 8, 128).unwrap();
        assert_eq!(s.grid, (48, 1, 1));
        assert_eq!(s.block, (256, 1, 1));
        assert_eq!(s.shared_mem_bytes as usize, (8192 + 8 * 128) * 4);
        assert!((s.shared_mem_bytes as usize) <= DEFAULT_MAX_DYNAMIC_SMEM);
        let s = attention_shape(1, 6, 1, 128).unwrap();
        assert_eq!(s.grid, (6, 1, 1));
        // Longer contexts need the opt-in.
        let s = attention_shape(16384, 48, 8, 128).unwrap();
        assert!((s.shared_mem_bytes as usize) > DEFAULT_MAX_DYNAMIC_SMEM);
        assert!(attention_shape(8, 48, 7, 128).is_err());
        assert!(attention_shape(8, 48, 8, 100).is_err());
        assert!(attention_shape(8, 48, 8, 512).is_err());
        assert!(attention_shape(0, 48, 8, 128).is_err());
    }
}
