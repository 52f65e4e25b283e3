// Kernels of the grok-cluster CUDA backend (shared/src/backend/cuda).
//
// Compiled at run time by NVRTC for the device's architecture (`sm_XX`). The source is
// self-contained (no #include), so NVRTC needs no CUDA headers on the host.
//
// Conventions (the same as the CPU backend, shared/src/backend/cpu.rs):
// - row-major everywhere; a weight W is stored [out, in] (Hugging Face orientation) and a
//   linear layer computes y[m, out] = x[m, in] . W^T;
// - bf16 is carried as raw 16-bit patterns; int8 weights carry f32 scales [nb, out] with
//   W[o, i] = q[o, i] * scales[i / (in / nb), o];
// - activations are f32; accumulation is f32 (f64 where noted).
//
// Every entry point is `extern "C"` and listed in cuda_shapes::KERNEL_NAMES; the launch shapes
// (grid, block, dynamic shared memory) come from cuda_shapes, which documents each one.

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#define FULL_MASK 0xffffffffu

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

__device__ __forceinline__ float warp_sum_f32(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_f64(double v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max_f32(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Block-wide reduction; blockDim.x is a multiple of 32 (at most 1024). Every thread gets the
// result. The warps' partials are combined in warp order, so the result is deterministic.
// `scratch` holds 32 values of shared memory; the leading barrier lets calls follow each other.
// `Warp` reduces within a warp, `combine` adds one warp's partial.
template <typename T, typename Warp, typename Combine>
__device__ __forceinline__ T block_reduce(T v, T* scratch, Warp warp_reduce, Combine combine) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_reduce(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    T t = scratch[0];
    for (int w = 1; w < nw; ++w) t = combine(t, scratch[w]);
    return t;
}

struct AddF32 { __device__ float operator()(float a, float b) const { return a + b; } };
struct MaxF32 { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct AddF64 { __device__ double operator()(double a, double b) const { return a + b; } };
struct WarpSumF32 { __device__ float operator()(float v) const { return warp_sum_f32(v); } };
struct WarpMaxF32 { __device__ float operator()(float v) const { return warp_max_f32(v); } };
struct WarpSumF64 { __device__ double operator()(double v) const { return warp_sum_f64(v); } };

__device__ float block_sum_f32(float v, float* scratch) {
    return block_reduce(v, scratch, WarpSumF32(), AddF32());
}

__device__ float block_max_f32(float v, float* scratch) {
    return block_reduce(v, scratch, WarpMaxF32(), MaxF32());
}

__device__ double block_sum_f64(double v, double* scratch) {
    return block_reduce(v, scratch, WarpSumF64(), AddF64());
}

// 16-byte load of weights that are read exactly once: read-only path, not kept in L1 (the
// activations, which every block re-reads, live there).
__device__ __forceinline__ uint4 ld_stream(const void* p) {
    uint4 r;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
        : "l"(p));
    return r;
}

__device__ __forceinline__ float bf16_lo(u32 w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf16_hi(u32 w) { return __uint_as_float(w & 0xffff0000u); }

// int8 byte `i` (0..3) of `w` as f32, the plain way (used by the SIMT kernels).
__device__ __forceinline__ float i8_at(u32 w, int i) {
    return (float)(int)(signed char)((w >> (8 * i)) & 0xffu);
}

// ---------------------------------------------------------------------------------------------
// Tensor-core helpers (sm_80+): bf16 m16n8k16 MMA with f32 accumulation.
// ---------------------------------------------------------------------------------------------

#if __CUDA_ARCH__ >= 800
// Two f32 -> packed bf16x2 (round to nearest even); `lo` goes to the low half.
__device__ __forceinline__ u32 pack_bf16x2(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// x = hi + lo + O(2^-17 |x|): hi = bf16(x), lo = bf16(x - hi) (x - hi is exact in f32).
// Two MMAs against the same (exactly representable) weights then give an f32-grade product.
__device__ __forceinline__ void split_bf16x2(float a, float b, u32& hi, u32& lo) {
    hi = pack_bf16x2(a, b);
    lo = pack_bf16x2(a - bf16_lo(hi), b - bf16_hi(hi));
}

// D = A(16x16, row) . B(16x8, col) + D, bf16 inputs, f32 accumulators.
// Fragments (PTX ISA, mma.m16n8k16, .bf16): with g = lane / 4 and t = lane % 4,
//   a0 = A[g][2t..2t+1], a1 = A[g+8][2t..2t+1], a2 = A[g][2t+8..2t+9], a3 = A[g+8][2t+8..2t+9],
//   b0 = B[2t..2t+1][g], b1 = B[2t+8..2t+9][g],
//   d0 = D[g][2t], d1 = D[g][2t+1], d2 = D[g+8][2t], d3 = D[g+8][2t+1]  (low half = lower index).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], u32 a0, u32 a1, u32 a2, u32 a3,
                                               u32 b0, u32 b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// Four int8 (bytes of `w`) -> two bf16x2 words, exactly: the byte, offset to unsigned, is put
// in the mantissa of 2^23 (0x4B000000 | u = 8388608 + u) and the offset removed with one add.
__device__ __forceinline__ void i8x4_to_bf16x2x2(u32 w, u32& p01, u32& p23) {
    const u32 u = w ^ 0x80808080u;
    const float f0 = __uint_as_float(__byte_perm(u, 0x4B00u, 0x5440u)) - 8388736.0f;
    const float f1 = __uint_as_float(__byte_perm(u, 0x4B00u, 0x5441u)) - 8388736.0f;
    const float f2 = __uint_as_float(__byte_perm(u, 0x4B00u, 0x5442u)) - 8388736.0f;
    const float f3 = __uint_as_float(__byte_perm(u, 0x4B00u, 0x5443u)) - 8388736.0f;
    // The values are small integers: their bf16 is the top half of the f32, exactly.
    p01 = __byte_perm(__float_as_uint(f0), __float_as_uint(f1), 0x7632u);
    p23 = __byte_perm(__float_as_uint(f2), __float_as_uint(f3), 0x7632u);
}
#endif

// ---------------------------------------------------------------------------------------------
// Weight-only GEMV / skinny GEMM on tensor cores: y[m, out] = x[m, in] . W^T, m <= 64.
//
// A block owns 16 output rows (one m16 tile) and all m activation rows (NT = ceil(m/8) n8
// tiles: the "swap AB" form, weights are the MMA's A operand). Its warps split the input dim in
// interleaved k-blocks of KB = 64 columns (warp w takes k-blocks w, w + W, ...), and are summed
// in warp order through shared memory at the end (deterministic). (Measured on an H200: int8
// k-blocks of 128 columns, 32 bytes per row per thread, were not faster at m = 1 and slower at
// m >= 8.) Each weight byte is read once per call, with 16-byte loads; the
// k-block after the current one is loaded before the current one is multiplied.
//
// Inside a k-block, lane (g, t) holds EPT = KB/4 consecutive weights W[o0+g][kb*KB + EPT t ..]
// and W[o0+g+8][...], and the same EPT columns of activation row j*8+g for each n8 tile j. The
// MMA's k index is a permutation of the physical columns that is the same for A and B, so the
// dot products are unchanged: MMA step s (0..KB/16-1) uses the thread's elements 4s..4s+3.
//
// Activations are split as x = hi + lo (two bf16) and multiplied by the exact bf16 (or int8)
// weights with two MMAs: products exact, f32 accumulation; the relative error of x is 2^-17.
// int8: each k-block lies inside one scale block ((in / nb) % KB == 0); the partial sums of a
// scale block are multiplied by its per-row scale when the block changes (as the CPU does).
//
// Requirements (checked on the host): in % KB == 0; int8: (in / nb) % KB == 0; 1 <= m <= 8 NT;
// blockDim.x = 32 W (W <= 8); dynamic shared memory = W * NT * 4 * 32 floats when W > 1.
// ---------------------------------------------------------------------------------------------

template <int NT, bool I8>
__device__ __forceinline__ void gemv_mma(const void* __restrict__ wptr,
                                         const float* __restrict__ scales, int nb,
                                         const float* __restrict__ x, float* __restrict__ y,
                                         int m, int out, int K) {
#if __CUDA_ARCH__ >= 800
    extern __shared__ float red[];
    constexpr int ESZ = I8 ? 1 : 2;            // bytes per weight
    constexpr int KB = 64;                     // input columns per k-block (see cuda_shapes)
    constexpr int EPT = KB / 4;                // weights per row per thread per k-block
    constexpr int NV = EPT * ESZ / 16;         // 16-byte loads per row per thread per k-block
    constexpr int STEPS = KB / 16;             // MMA k16 steps per k-block
    constexpr int NWORDS = 2 * STEPS;          // bf16x2 words per row per thread per k-block
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    const int g = lane >> 2, t = lane & 3;
    const int r0 = blockIdx.x * 16 + g, r1 = r0 + 8;
    const bool v0 = r0 < out, v1 = r1 < out;
    const int nkb = K / KB;
    const int bs = K / nb;
    const char* w0 = (const char*)wptr + (size_t)(v0 ? r0 : 0) * (size_t)K * ESZ;
    const char* w1 = (const char*)wptr + (size_t)(v1 ? r1 : 0) * (size_t)K * ESZ;
    const uint4 zero4 = make_uint4(0u, 0u, 0u, 0u);

    float acc[NT][4];
    float part[NT][4];
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) { acc[j][c] = 0.f; part[j][c] = 0.f; }

    uint4 a0[NV], a1[NV];
    int kb = warp;
    if (kb < nkb) {
        const size_t off = ((size_t)kb * KB + t * EPT) * ESZ;
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            a0[v] = v0 ? ld_stream(w0 + off + 16 * v) : zero4;
            a1[v] = v1 ? ld_stream(w1 + off + 16 * v) : zero4;
        }
    }
    int cur_b = -1;
    while (kb < nkb) {
        const int kn = kb + nwarps;
        uint4 n0[NV], n1[NV];
        if (kn < nkb) {
            const size_t off = ((size_t)kn * KB + t * EPT) * ESZ;
#pragma unroll
            for (int v = 0; v < NV; ++v) {
                n0[v] = v0 ? ld_stream(w0 + off + 16 * v) : zero4;
                n1[v] = v1 ? ld_stream(w1 + off + 16 * v) : zero4;
            }
        } else {
#pragma unroll
            for (int v = 0; v < NV; ++v) { n0[v] = zero4; n1[v] = zero4; }
        }

        if (I8) {
            const int b = (kb * KB) / bs;
            if (b != cur_b) {
                if (cur_b >= 0) {
                    const float s0 = v0 ? scales[(size_t)cur_b * out + r0] : 0.f;
                    const float s1 = v1 ? scales[(size_t)cur_b * out + r1] : 0.f;
#pragma unroll
                    for (int j = 0; j < NT; ++j) {
                        acc[j][0] += s0 * part[j][0]; acc[j][1] += s0 * part[j][1];
                        acc[j][2] += s1 * part[j][2]; acc[j][3] += s1 * part[j][3];
                        part[j][0] = 0.f; part[j][1] = 0.f; part[j][2] = 0.f; part[j][3] = 0.f;
                    }
                }
                cur_b = b;
            }
        }

        // A words: word i of a row = its elements (2i, 2i+1) of this k-block, i < NWORDS.
        u32 A0[NWORDS], A1[NWORDS];
#pragma unroll
        for (int v = 0; v < NV; ++v) {
            if (I8) {   // 16 int8 per load -> 8 words
                i8x4_to_bf16x2x2(a0[v].x, A0[8 * v + 0], A0[8 * v + 1]);
                i8x4_to_bf16x2x2(a0[v].y, A0[8 * v + 2], A0[8 * v + 3]);
                i8x4_to_bf16x2x2(a0[v].z, A0[8 * v + 4], A0[8 * v + 5]);
                i8x4_to_bf16x2x2(a0[v].w, A0[8 * v + 6], A0[8 * v + 7]);
                i8x4_to_bf16x2x2(a1[v].x, A1[8 * v + 0], A1[8 * v + 1]);
                i8x4_to_bf16x2x2(a1[v].y, A1[8 * v + 2], A1[8 * v + 3]);
                i8x4_to_bf16x2x2(a1[v].z, A1[8 * v + 4], A1[8 * v + 5]);
                i8x4_to_bf16x2x2(a1[v].w, A1[8 * v + 6], A1[8 * v + 7]);
            } else {    // 8 bf16 per load -> 4 words
                A0[4 * v + 0] = a0[v].x; A0[4 * v + 1] = a0[v].y;
                A0[4 * v + 2] = a0[v].z; A0[4 * v + 3] = a0[v].w;
                A1[4 * v + 0] = a1[v].x; A1[4 * v + 1] = a1[v].y;
                A1[4 * v + 2] = a1[v].z; A1[4 * v + 3] = a1[v].w;
            }
        }

        const int kcol = kb * KB + t * EPT;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            const int n = j * 8 + g;
            const bool nv = n < m;
            const float4* xp = (const float4*)(x + (size_t)(nv ? n : 0) * K + kcol);
#pragma unroll
            for (int s = 0; s < STEPS; ++s) {
                const float4 xv = nv ? __ldg(xp + s) : make_float4(0.f, 0.f, 0.f, 0.f);
                u32 bh0, bl0, bh1, bl1;
                split_bf16x2(xv.x, xv.y, bh0, bl0);
                split_bf16x2(xv.z, xv.w, bh1, bl1);
                if (I8) {
                    mma_bf16_16816(part[j], A0[2 * s], A1[2 * s], A0[2 * s + 1], A1[2 * s + 1], bh0, bh1);
                    mma_bf16_16816(part[j], A0[2 * s], A1[2 * s], A0[2 * s + 1], A1[2 * s + 1], bl0, bl1);
                } else {
                    mma_bf16_16816(acc[j], A0[2 * s], A1[2 * s], A0[2 * s + 1], A1[2 * s + 1], bh0, bh1);
                    mma_bf16_16816(acc[j], A0[2 * s], A1[2 * s], A0[2 * s + 1], A1[2 * s + 1], bl0, bl1);
                }
            }
        }

#pragma unroll
        for (int v = 0; v < NV; ++v) { a0[v] = n0[v]; a1[v] = n1[v]; }
        kb = kn;
    }
    if (I8 && cur_b >= 0) {
        const float s0 = v0 ? scales[(size_t)cur_b * out + r0] : 0.f;
        const float s1 = v1 ? scales[(size_t)cur_b * out + r1] : 0.f;
#pragma unroll
        for (int j = 0; j < NT; ++j) {
            acc[j][0] += s0 * part[j][0]; acc[j][1] += s0 * part[j][1];
            acc[j][2] += s1 * part[j][2]; acc[j][3] += s1 * part[j][3];
        }
    }

    if (nwarps > 1) {
        float* mine = red + (size_t)warp * (NT * 4 * 32);
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) mine[(j * 4 + c) * 32 + lane] = acc[j][c];
        __syncthreads();
        if (warp != 0) return;
#pragma unroll
        for (int j = 0; j < NT; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                float s = 0.f;
                for (int w = 0; w < nwarps; ++w) s += red[(size_t)w * (NT * 4 * 32) + (j * 4 + c) * 32 + lane];
                acc[j][c] = s;
            }
    }
#pragma unroll
    for (int j = 0; j < NT; ++j) {
        const int n0 = j * 8 + 2 * t, n1 = n0 + 1;
        if (v0) {
            if (n0 < m) y[(size_t)n0 * out + r0] = acc[j][0];
            if (n1 < m) y[(size_t)n1 * out + r0] = acc[j][1];
        }
        if (v1) {
            if (n0 < m) y[(size_t)n0 * out + r1] = acc[j][2];
            if (n1 < m) y[(size_t)n1 * out + r1] = acc[j][3];
        }
    }
#else
    asm volatile("trap;");
#endif
}

// The entry points of a GEMV family, `gemv_{bf16,i8}_KIND_{1..8}` (m activation rows; rows
// 5..8 with the `HI` launch bounds): bf16 weights, or int8 weights with `nb` scale blocks.
#define GEMV_ENTRY(KIND, BOUNDS, M)                                                                 \
  extern "C" __global__ void BOUNDS gemv_bf16_##KIND##_##M(const void* w, const float* x, float* y, \
                                                           int m, int out, int k) {                 \
    gemv_##KIND<M, false>(w, nullptr, 1, x, y, m, out, k);                                          \
  }                                                                                                 \
  extern "C" __global__ void BOUNDS gemv_i8_##KIND##_##M(const void* w, const float* s, int nb,     \
                                                         const float* x, float* y, int m, int out,  \
                                                         int k) {                                   \
    gemv_##KIND<M, true>(w, s, nb, x, y, m, out, k);                                                \
  }
#define GEMV_ENTRIES(KIND, LO, HI)                                                                  \
  GEMV_ENTRY(KIND, LO, 1) GEMV_ENTRY(KIND, LO, 2) GEMV_ENTRY(KIND, LO, 3) GEMV_ENTRY(KIND, LO, 4)   \
  GEMV_ENTRY(KIND, HI, 5) GEMV_ENTRY(KIND, HI, 6) GEMV_ENTRY(KIND, HI, 7) GEMV_ENTRY(KIND, HI, 8)

#define GEMV_MMA_BOUNDS __launch_bounds__(256, 2)
#define GEMV_MMA_BOUNDS_WIDE __launch_bounds__(256, 1)

GEMV_ENTRIES(mma, GEMV_MMA_BOUNDS, GEMV_MMA_BOUNDS_WIDE)


// The grouped GEMV of the MoE with its routing on the device (`gemv_{bf16,i8}_mmag_{1..8}`):
// blockIdx.y is slot s of a layer's local experts. The slot's weights are at ws[s] (int8: its
// scales at ss[s]), its input rows at x + s * mx * k, its output rows at y + s * mx * out, and
// its row count is counts[ids[s]]: a slot no row chose returns at once and reads no weights.
#define GEMV_GROUPED_ENTRY(BOUNDS, M)                                                               \
  extern "C" __global__ void BOUNDS gemv_bf16_mmag_##M(const unsigned long long* ws,                \
      const int* ids, const int* counts, int mx, const float* x, float* y, int out, int k) {        \
    const int s = blockIdx.y;                                                                       \
    const int m = counts[ids[s]];                                                                   \
    if (m <= 0) return;                                                                             \
    gemv_mma<M, false>((const void*)ws[s], nullptr, 1, x + (size_t)s * mx * k,                      \
                       y + (size_t)s * mx * out, m, out, k);                                        \
  }                                                                                                 \
  extern "C" __global__ void BOUNDS gemv_i8_mmag_##M(const unsigned long long* ws,                  \
      const unsigned long long* ss, int nb, const int* ids, const int* counts, int mx,              \
      const float* x, float* y, int out, int k) {                                                   \
    const int s = blockIdx.y;                                                                       \
    const int m = counts[ids[s]];                                                                   \
    if (m <= 0) return;                                                                             \
    gemv_mma<M, true>((const void*)ws[s], (const float*)ss[s], nb, x + (size_t)s * mx * k,          \
                      y + (size_t)s * mx * out, m, out, k);                                         \
  }
#define GEMV_GROUPED_ENTRIES(LO, HI)                                                                \
  GEMV_GROUPED_ENTRY(LO, 1) GEMV_GROUPED_ENTRY(LO, 2) GEMV_GROUPED_ENTRY(LO, 3)                     \
  GEMV_GROUPED_ENTRY(LO, 4) GEMV_GROUPED_ENTRY(HI, 5) GEMV_GROUPED_ENTRY(HI, 6)                     \
  GEMV_GROUPED_ENTRY(HI, 7) GEMV_GROUPED_ENTRY(HI, 8)

GEMV_GROUPED_ENTRIES(GEMV_MMA_BOUNDS, GEMV_MMA_BOUNDS_WIDE)

// ---------------------------------------------------------------------------------------------
// Weight-only GEMV on CUDA cores (the simple, exact-f32 variant; also the fallback and the
// cross-check of the tensor-core kernel): up to MR <= 8 activation rows per launch (the host
// wrapper launches once per group of 8 rows, so above 8 rows the weights are read again).
//
// Block = 256 threads = 8 warps; warp w owns output rows o = 16 blockIdx + 2w and o + 1; its
// lanes stride over the input dim in 16-byte chunks (8 bf16 or 16 int8), each chunk dotted with
// every activation row (f32 FMA), then a warp reduction. int8: the chunk's dot is multiplied by
// its scale block's scale. Requirements: those of the MMA kernel (the host checks one set).
// ---------------------------------------------------------------------------------------------

template <int MR, bool I8>
__device__ __forceinline__ void gemv_simt(const void* __restrict__ wptr,
                                          const float* __restrict__ scales, int nb,
                                          const float* __restrict__ x, float* __restrict__ y,
                                          int m, int out, int K) {
    constexpr int EPC = I8 ? 16 : 8;   // weights per 16-byte chunk
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int o = blockIdx.x * 16 + warp * 2;
    if (o >= out) return;              // uniform over the warp; no block barrier below
    const bool v1 = o + 1 < out;
    const int nch = K / EPC;
    const int bs = K / nb;
    const uint4* W0 = (const uint4*)((const char*)wptr + (size_t)o * (size_t)K * (I8 ? 1 : 2));
    const uint4* W1 = W0 + (v1 ? nch : 0);
    float acc[MR][2];
#pragma unroll
    for (int r = 0; r < MR; ++r) { acc[r][0] = 0.f; acc[r][1] = 0.f; }

    for (int c = lane; c < nch; c += 32) {
        const uint4 q0 = ld_stream(W0 + c);
        const uint4 q1 = v1 ? ld_stream(W1 + c) : make_uint4(0u, 0u, 0u, 0u);
        float f0[EPC], f1[EPC];
        const u32 u0[4] = {q0.x, q0.y, q0.z, q0.w};
        const u32 u1[4] = {q1.x, q1.y, q1.z, q1.w};
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (I8) {
#pragma unroll
                for (int b = 0; b < 4; ++b) { f0[4 * i + b] = i8_at(u0[i], b); f1[4 * i + b] = i8_at(u1[i], b); }
            } else {
                f0[2 * i] = bf16_lo(u0[i]); f0[2 * i + 1] = bf16_hi(u0[i]);
                f1[2 * i] = bf16_lo(u1[i]); f1[2 * i + 1] = bf16_hi(u1[i]);
            }
        }
        float s0 = 1.f, s1 = 1.f;
        if (I8) {
            const int b = (c * EPC) / bs;
            s0 = scales[(size_t)b * out + o];
            s1 = v1 ? scales[(size_t)b * out + o + 1] : 0.f;
        }
#pragma unroll
        for (int r = 0; r < MR; ++r) {
            if (r < m) {
                const float4* xp = (const float4*)(x + (size_t)r * K + (size_t)c * EPC);
                float p0 = 0.f, p1 = 0.f;
#pragma unroll
                for (int e = 0; e < EPC / 4; ++e) {
                    const float4 xv = __ldg(xp + e);
                    p0 = fmaf(f0[4 * e], xv.x, p0); p0 = fmaf(f0[4 * e + 1], xv.y, p0);
                    p0 = fmaf(f0[4 * e + 2], xv.z, p0); p0 = fmaf(f0[4 * e + 3], xv.w, p0);
                    p1 = fmaf(f1[4 * e], xv.x, p1); p1 = fmaf(f1[4 * e + 1], xv.y, p1);
                    p1 = fmaf(f1[4 * e + 2], xv.z, p1); p1 = fmaf(f1[4 * e + 3], xv.w, p1);
                }
                acc[r][0] = fmaf(s0, p0, acc[r][0]);
                acc[r][1] = fmaf(s1, p1, acc[r][1]);
            }
        }
    }
#pragma unroll
    for (int r = 0; r < MR; ++r) {
        const float a = warp_sum_f32(acc[r][0]);
        const float b = warp_sum_f32(acc[r][1]);
        if (lane == 0 && r < m) {
            y[(size_t)r * out + o] = a;
            if (v1) y[(size_t)r * out + o + 1] = b;
        }
    }
}

#define GEMV_SIMT_BOUNDS __launch_bounds__(256)

GEMV_ENTRIES(simt, GEMV_SIMT_BOUNDS, GEMV_SIMT_BOUNDS)


// ---------------------------------------------------------------------------------------------
// RMSNorm: out[r, i] = gain[i] * (x[r, i] * inv_r), inv_r = 1 / sqrt(mean_i x[r, i]^2 + eps).
// The gain is used as is (not 1 + g). The mean square is accumulated in f64 and inv_r rounded
// to f32 once, exactly the CPU's arithmetic. One block per row; any blockDim.x multiple of 32.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(1024) rms_norm_f32(const float* __restrict__ x,
                                                                const float* __restrict__ gain,
                                                                float* __restrict__ out, int d,
                                                                double eps) {
    __shared__ double scratch[32];
    const float* xr = x + (size_t)blockIdx.x * d;
    float* orow = out + (size_t)blockIdx.x * d;
    double s = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const double v = (double)xr[i];
        s += v * v;
    }
    s = block_sum_f64(s, scratch);
    const float inv = (float)(1.0 / sqrt(s / (double)d + eps));
    for (int i = threadIdx.x; i < d; i += blockDim.x) orow[i] = gain[i] * (xr[i] * inv);
}

// ---------------------------------------------------------------------------------------------
// Half-split (GPT-NeoX) RoPE in place on x[t, heads, ks]: for i < ks/2, with
// phase = pos[row] / theta^(2i/ks) (f64), (a, b) = (x[i], x[i + ks/2]) ->
// (a cos - b sin, b cos + a sin), computed in f64 and rounded to f32 (the CPU's arithmetic).
// One thread per (row, head, i).
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void rope_f32(float* __restrict__ x, const int* __restrict__ positions,
                                    int t, int heads, int ks, double theta) {
    const int half = ks >> 1;
    const long long total = (long long)t * heads * half;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    const int i = (int)(idx % half);
    const long long rh = idx / half;            // row * heads + head
    const int row = (int)(rh / heads);
    const double inv_freq = 1.0 / pow(theta, (double)(2 * i) / (double)ks);
    const double ph = (double)positions[row] * inv_freq;
    double sn, cs;
    sincos(ph, &sn, &cs);
    float* p = x + (size_t)rh * ks;
    const double a = (double)p[i], b = (double)p[i + half];
    p[i] = (float)(a * cs - b * sn);
    p[i + half] = (float)(b * cs + a * sn);
}

// ---------------------------------------------------------------------------------------------
// GeGLU gate: out[i] = gelu_tanh(a[i]) * b[i], gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x +
// 0.044715 x^3))) (jax.nn.gelu's default). Grid-stride loop over n elements.
// ---------------------------------------------------------------------------------------------
extern "C" __global__ void gelu_gate_f32(const float* __restrict__ a, const float* __restrict__ b,
                                         float* __restrict__ out, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = a[i];
        const float g = 0.5f * v * (1.0f + tanhf(0.7978846f * (v + 0.044715f * v * v * v)));
        out[i] = g * b[i];
    }
}

// ---------------------------------------------------------------------------------------------
// Router: logits[e] = sum_i x[r, i] w[e, i] (f64), probs = softmax over all ne experts (f64,
// rounded to f32), then the top k by f32 probability with ties to the lower index
// (jax.lax.top_k; the CPU's stable sort). Gates are the raw probabilities (not renormalised).
// One block per row (blockDim.x multiple of 32); ne <= 16, k <= ne. `probs` may be null.
// ---------------------------------------------------------------------------------------------
#define ROUTER_MAX_EXPERTS 16
extern "C" __global__ void __launch_bounds__(1024) router_topk_f32(
    const float* __restrict__ x, const float* __restrict__ w, int d, int ne, int k,
    float* __restrict__ gates, int* __restrict__ experts, float* __restrict__ probs) {
    __shared__ double part[ROUTER_MAX_EXPERTS][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const float* xr = x + (size_t)blockIdx.x * d;
    double acc[ROUTER_MAX_EXPERTS];
#pragma unroll
    for (int e = 0; e < ROUTER_MAX_EXPERTS; ++e) acc[e] = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const double xv = (double)xr[i];
#pragma unroll
        for (int e = 0; e < ROUTER_MAX_EXPERTS; ++e)
            if (e < ne) acc[e] += (double)w[(size_t)e * d + i] * xv;
    }
#pragma unroll
    for (int e = 0; e < ROUTER_MAX_EXPERTS; ++e) {
        const double v = warp_sum_f64(acc[e]);
        if (lane == 0) part[e][warp] = v;
    }
    __syncthreads();
    if (threadIdx.x != 0) return;
    double logit[ROUTER_MAX_EXPERTS];
    double mx = -1.0e308;
    for (int e = 0; e < ne; ++e) {
        double s = 0.0;
        for (int q = 0; q < nw; ++q) s += part[e][q];
        logit[e] = s;
        mx = fmax(mx, s);
    }
    double sum = 0.0;
    for (int e = 0; e < ne; ++e) { logit[e] = exp(logit[e] - mx); sum += logit[e]; }
    float p[ROUTER_MAX_EXPERTS];
    for (int e = 0; e < ne; ++e) {
        p[e] = (float)(logit[e] / sum);
        if (probs) probs[(size_t)blockIdx.x * ne + e] = p[e];
    }
    u32 taken = 0u;
    for (int j = 0; j < k; ++j) {
        int best = -1;
        for (int e = 0; e < ne; ++e) {
            if (taken & (1u << e)) continue;
            if (best < 0 || p[e] > p[best]) best = e;
        }
        taken |= 1u << best;
        gates[(size_t)blockIdx.x * k + j] = p[best];
        experts[(size_t)blockIdx.x * k + j] = best;
    }
}

// ---------------------------------------------------------------------------------------------
// Decode attention: one query token, keys/values in a contiguous cache [len, nkv, hd] (all
// visible). Query head h uses kv head h / (nq / nkv) (GQA). s_u = mult * (q . k_u), then the
// soft-cap s_u = cap * tanh(s_u / cap) when cap > 0, softmax over u in f32, out = sum_u p_u v_u.
//
// One block per query head, blockDim.x = 32 W. Warps take keys u = w, w + W, ...; lanes split
// the head dim (d = lane + 32 j, hd % 32 == 0, hd <= 256). Dynamic shared memory:
// (len + W * hd) floats (scores, then the per-warp partial outputs, summed in warp order).
// ---------------------------------------------------------------------------------------------
#define ATTN_MAX_HD 256
extern "C" __global__ void __launch_bounds__(1024) attn_decode_f32(
    const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc,
    float* __restrict__ out, int len, int nq, int nkv, int hd, float mult, float cap) {
    extern __shared__ float smem[];
    __shared__ float scratch[32];
    float* sc = smem;              // [len]
    float* po = smem + len;        // [W][hd]
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int h = blockIdx.x;
    const int kvh = h / (nq / nkv);
    const int nd = hd >> 5;        // dims per lane
    float qr[ATTN_MAX_HD / 32];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_HD / 32; ++j) qr[j] = j < nd ? q[(size_t)h * hd + lane + 32 * j] : 0.f;
    const size_t row = (size_t)nkv * hd;   // floats per cache position

    float lmax = -3.0e38f;
    for (int u = warp; u < len; u += nw) {
        const float* kr = kc + (size_t)u * row + (size_t)kvh * hd;
        float dot = 0.f;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_HD / 32; ++j)
            if (j < nd) dot = fmaf(qr[j], kr[lane + 32 * j], dot);
        dot = warp_sum_f32(dot);
        float s = dot * mult;
        if (cap > 0.f) s = cap * tanhf(s / cap);
        if (lane == 0) sc[u] = s;
        lmax = fmaxf(lmax, s);
    }
    const float mx = block_max_f32(lmax, scratch);   // its barriers also publish sc[]
    float lsum = 0.f;
    for (int u = threadIdx.x; u < len; u += blockDim.x) {
        const float p = expf(sc[u] - mx);
        sc[u] = p;
        lsum += p;
    }
    const float sum = block_sum_f32(lsum, scratch);  // and publish the probabilities
    float acc[ATTN_MAX_HD / 32];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_HD / 32; ++j) acc[j] = 0.f;
    for (int u = warp; u < len; u += nw) {
        const float p = sc[u];
        const float* vr = vc + (size_t)u * row + (size_t)kvh * hd;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_HD / 32; ++j)
            if (j < nd) acc[j] = fmaf(p, vr[lane + 32 * j], acc[j]);
    }
#pragma unroll
    for (int j = 0; j < ATTN_MAX_HD / 32; ++j)
        if (j < nd) po[(size_t)warp * hd + lane + 32 * j] = acc[j];
    __syncthreads();
    const float inv = 1.0f / sum;
    for (int dd = threadIdx.x; dd < hd; dd += blockDim.x) {
        float s = 0.f;
        for (int w = 0; w < nw; ++w) s += po[(size_t)w * hd + dd];
        out[(size_t)h * hd + dd] = s * inv;
    }
}

// ---------------------------------------------------------------------------------------------
// Model-pass helpers (shared/src/backend/cuda/model.rs).
// ---------------------------------------------------------------------------------------------
// h[i] += a[i].
extern "C" __global__ void add_f32(float* __restrict__ h, const float* __restrict__ a, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) h[i] += a[i];
}
// x[i] *= s.
extern "C" __global__ void scale_f32(float* __restrict__ x, float s, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) x[i] *= s;
}
// dst[j, :] = src[idx[j], :], j < n rows of width d (one block per row).
extern "C" __global__ void gather_rows_f32(const float* __restrict__ src, const int* __restrict__ idx,
                                           float* __restrict__ dst, int d) {
    const float* s = src + (size_t)idx[blockIdx.x] * d;
    float* o = dst + (size_t)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = s[i];
}
// dst[idx[j], :] += gate[j] * src[j, :] (idx distinct within one launch; one block per row).
extern "C" __global__ void scatter_add_rows_f32(float* __restrict__ dst, const int* __restrict__ idx,
                                                const float* __restrict__ gate,
                                                const float* __restrict__ src, int d) {
    float* o = dst + (size_t)idx[blockIdx.x] * d;
    const float* s = src + (size_t)blockIdx.x * d;
    const float g = gate[blockIdx.x];
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] += g * s[i];
}

// ---------------------------------------------------------------------------------------------
// The MoE with its routing on the device (Cuda::moe_routed): the plan, the gather of each
// expert's rows, and the gated sum; the experts' products are the grouped GEMV above.
// ---------------------------------------------------------------------------------------------
// One thread per expert e < ne (ne <= 32) lists, in row order, the rows of the t-row pass that
// chose e (choice/gates [t, k]): rows[e * t + i] and g[e * t + i] for i < counts[e], and
// pos[r * ne + e] = i (-1: row r did not choose e). It adds counts[e] to routed[li * ne + e]
// and, when bit e of `local` is set, to served[e] (the per-expert metrics, read once a step).
extern "C" __global__ void moe_plan_i32(const int* __restrict__ choice,
                                        const float* __restrict__ gates, int t, int k, int ne,
                                        int li, unsigned local, int* __restrict__ counts,
                                        int* __restrict__ rows, float* __restrict__ g,
                                        int* __restrict__ pos,
                                        unsigned long long* __restrict__ routed,
                                        unsigned long long* __restrict__ served) {
    const int e = threadIdx.x;
    if (e >= ne) return;
    int c = 0;
    for (int r = 0; r < t; ++r) {
        int p = -1;
        for (int j = 0; j < k; ++j)
            if (p < 0 && choice[r * k + j] == e) {
                rows[e * t + c] = r;
                g[e * t + c] = gates[r * k + j];
                p = c++;
            }
        pos[r * ne + e] = p;
    }
    counts[e] = c;
    routed[(size_t)li * ne + e] += (unsigned long long)c;
    if ((local >> e) & 1u) served[e] += (unsigned long long)c;
}
// dst[(s * t + i), :] = src[rows[e * t + i], :] for slot s = blockIdx.y of expert e = ids[s] and
// i = blockIdx.x < counts[e] (other blocks return; dst rows they would write stay as they are).
extern "C" __global__ void moe_gather_f32(const float* __restrict__ src, const int* __restrict__ ids,
                                          const int* __restrict__ counts,
                                          const int* __restrict__ rows, int t,
                                          float* __restrict__ dst, int d) {
    const int s = blockIdx.y, i = blockIdx.x, e = ids[s];
    if (i >= counts[e]) return;
    const float* a = src + (size_t)rows[e * t + i] * d;
    float* o = dst + ((size_t)s * t + i) * d;
    for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] = a[c];
}
// m[r, :] += g[e * t + p] * y[(s * t + p), :] for each slot s < nslots in order, e = ids[s],
// p = pos[r * ne + e] >= 0 (row r = blockIdx.x): the gated outputs of the row's experts added in
// the order of the slots, as one scatter per expert in that order adds them.
extern "C" __global__ void moe_combine_f32(float* __restrict__ m, const int* __restrict__ ids,
                                           int nslots, int ne, const int* __restrict__ pos,
                                           const float* __restrict__ g,
                                           const float* __restrict__ y, int t, int d) {
    const int r = blockIdx.x;
    float* o = m + (size_t)r * d;
    for (int s = 0; s < nslots; ++s) {
        const int e = ids[s];
        const int p = pos[r * ne + e];
        if (p < 0) continue;
        const float gate = g[e * t + p];
        const float* a = y + ((size_t)s * t + p) * d;
        for (int c = threadIdx.x; c < d; c += blockDim.x) o[c] += gate * a[c];
    }
}

// ---------------------------------------------------------------------------------------------
// Operands of the cuBLAS GEMM that takes passes of many rows (CudaBackend::linear_gemm).
// ---------------------------------------------------------------------------------------------
// f32 -> bf16 bits, round to nearest even (as cvt.rn.bf16.f32; NaN stays NaN), on any arch.
__device__ __forceinline__ unsigned short f32_to_bf16_bits(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (unsigned short)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (unsigned short)(u >> 16);
}
// hi[i] = bf16(x[i]); when lo is not null, lo[i] = bf16(x[i] - hi[i]) (x - hi is exact in f32):
// the GEMV's split, x = hi + lo + O(2^-17 |x|).
extern "C" __global__ void split_bf16_f32(const float* __restrict__ x, unsigned short* __restrict__ hi,
                                          unsigned short* __restrict__ lo, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float v = x[i];
        const unsigned short h = f32_to_bf16_bits(v);
        hi[i] = h;
        if (lo != nullptr) lo[i] = f32_to_bf16_bits(v - __uint_as_float(((unsigned)h) << 16));
    }
}
// w[i] = bf16(q[i]), exact (|q| <= 128 has 8 significant bits).
extern "C" __global__ void i8_to_bf16(const signed char* __restrict__ q, unsigned short* __restrict__ w,
                                      long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        w[i] = f32_to_bf16_bits((float)q[i]);
}
// The GEMM's partial sums to the output: p holds nb blocks (the int8 scale blocks; 1 for bf16)
// of `halves` x n floats, n = rows * out, each block [halves * rows, out] row-major (with
// halves = 2, rows of the hi activations, then rows of the lo ones). y[r, o] = sum over
// b = 0..nb-1, in order, of s[b * out + o] * (p_b[r, o] + p_b[rows + r, o]) (s null: 1).
extern "C" __global__ void gemm_finish_f32(const float* __restrict__ p, const float* __restrict__ s,
                                           int nb, int halves, long long n, int out,
                                           float* __restrict__ y) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int o = (int)(i % out);
        float acc = 0.f;
        for (int b = 0; b < nb; ++b) {
            const float* pb = p + (size_t)b * halves * n;
            float v = pb[i];
            if (halves == 2) v += pb[n + i];
            acc += s != nullptr ? s[(size_t)b * out + o] * v : v;
        }
        y[i] = acc;
    }
}

// ---------------------------------------------------------------------------------------------
// The device of the one forward pass (shared/src/backend/cuda/device.rs): embedding rows, the
// paged KV cache and attention over it.
// ---------------------------------------------------------------------------------------------
// out[r, :] = bf16 row tokens[r] of w [_, d], times mult (one block per row).
extern "C" __global__ void embed_rows_bf16(const unsigned short* __restrict__ w,
                                           const int* __restrict__ tokens, float* __restrict__ out,
                                           int d, float mult) {
    const unsigned short* s = w + (size_t)tokens[blockIdx.x] * d;
    float* o = out + (size_t)blockIdx.x * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        o[i] = __uint_as_float(((unsigned)s[i]) << 16) * mult;
}
// The same for int8 rows with f32 scales [nb, rows]: w[t, i] = q[t, i] * scales[i / (d / nb), t].
extern "C" __global__ void embed_rows_i8(const signed char* __restrict__ q,
                                         const float* __restrict__ scales, int nb, int rows,
                                         const int* __restrict__ tokens, float* __restrict__ out,
                                         int d, float mult) {
    const int t = tokens[blockIdx.x];
    const signed char* s = q + (size_t)t * d;
    float* o = out + (size_t)blockIdx.x * d;
    const int bs = d / nb;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        o[i] = (float)s[i] * scales[(size_t)(i / bs) * rows + t] * mult;
}
// Row r of k and v ([rows, w]) to slot slots[r] of the caches [slots, w] (one block per row).
extern "C" __global__ void kv_write_f32(float* __restrict__ kc, float* __restrict__ vc,
                                        const float* __restrict__ k, const float* __restrict__ v,
                                        const int* __restrict__ slots, int w) {
    const size_t dst = (size_t)slots[blockIdx.x] * w, src = (size_t)blockIdx.x * w;
    for (int i = threadIdx.x; i < w; i += blockDim.x) {
        kc[dst + i] = k[src + i];
        vc[dst + i] = v[src + i];
    }
}
// vis[slots[i]] = vals[i], i < n.
extern "C" __global__ void set_flags_i32(int* __restrict__ vis, const int* __restrict__ slots,
                                         const int* __restrict__ vals, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        vis[slots[i]] = vals[i];
}

// Attention of the official semantics over the paged cache, for every row of a batched pass:
// row r (blockIdx.y) at position row_pos[r] of its sequence attends to the keys u <= pos whose
// slot's flag is set; the slot of key u is tab[u / bs] * bs + u % bs with tab = tables +
// row_tab[r] (the sequence's block table). If every key u <= pos is masked, the weights are
// uniform over every key of the sequence's pass, 0 <= u < row_end[r]. Local query head h
// (blockIdx.x) is global head q0 + h and uses local KV head (q0 + h) / g - kv0. Scores and the
// softmax in f64 from f32 products. blockDim.x = 32 W; lanes split the
// head dim (hd % 32 == 0, hd <= 256). Dynamic shared memory: max_end doubles + W * hd floats.
extern "C" __global__ void __launch_bounds__(1024) attn_paged_f32(
    const float* __restrict__ q, const float* __restrict__ kc, const float* __restrict__ vc,
    const int* __restrict__ vis, const int* __restrict__ tables, const int* __restrict__ row_pos,
    const int* __restrict__ row_end, const int* __restrict__ row_tab, float* __restrict__ out,
    int bs, int nq, int nkv, int hd, int g, int q0, int kv0, double mult, double cap) {
    extern __shared__ double dsm[];
    __shared__ float scratch[32];
    __shared__ double dscratch[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int h = blockIdx.x, r = blockIdx.y;
    const int pos = row_pos[r], end = row_end[r];
    const int* tab = tables + row_tab[r];
    double* sc = dsm;                              // [end]
    float* po = (float*)(dsm + end);               // [W][hd]
    const int kvh = (q0 + h) / g - kv0;
    const int nd = hd >> 5;
    const float* qrow = q + ((size_t)r * nq + h) * hd;
    float qr[ATTN_MAX_HD / 32];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_HD / 32; ++j) qr[j] = j < nd ? qrow[lane + 32 * j] : 0.f;
    const size_t row = (size_t)nkv * hd;
    float lany = 0.f;
    double lmax = -1.0e300;
    for (int u = warp; u <= pos; u += nw) {
        const size_t slot = (size_t)tab[u / bs] * bs + u % bs;
        if (!vis[slot]) { if (lane == 0) sc[u] = -1.0e300; continue; }
        const float* kr = kc + slot * row + (size_t)kvh * hd;
        double dot = 0.0;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_HD / 32; ++j)
            if (j < nd) dot += (double)qr[j] * (double)kr[lane + 32 * j];
        dot = warp_sum_f64(dot);
        const double s = cap * tanh(dot * mult / cap);
        if (lane == 0) sc[u] = s;
        lmax = fmax(lmax, s);
        lany = 1.f;
    }
    const float any = block_max_f32(lany, scratch);
    for (int o = 16; o > 0; o >>= 1) lmax = fmax(lmax, __shfl_xor_sync(0xffffffffu, lmax, o));
    if (lane == 0) dscratch[warp] = lmax;
    __syncthreads();
    double mx = -1.0e300;
    for (int w = 0; w < nw; ++w) mx = fmax(mx, dscratch[w]);
    __syncthreads();
    const int n = any > 0.f ? pos + 1 : end;
    double lsum = 0.0;
    for (int u = threadIdx.x; u < n; u += blockDim.x) {
        double p;
        if (any > 0.f) p = vis[(size_t)tab[u / bs] * bs + u % bs] ? exp(sc[u] - mx) : 0.0;
        else p = 1.0;
        sc[u] = p;
        lsum += p;
    }
    const double sum = block_sum_f64(lsum, dscratch);
    const double inv = 1.0 / sum;
    float acc[ATTN_MAX_HD / 32];
#pragma unroll
    for (int j = 0; j < ATTN_MAX_HD / 32; ++j) acc[j] = 0.f;
    for (int u = warp; u < n; u += nw) {
        const float p = (float)(sc[u] * inv);
        if (p == 0.f) continue;
        const size_t slot = (size_t)tab[u / bs] * bs + u % bs;
        const float* vr = vc + slot * row + (size_t)kvh * hd;
#pragma unroll
        for (int j = 0; j < ATTN_MAX_HD / 32; ++j)
            if (j < nd) acc[j] = fmaf(p, vr[lane + 32 * j], acc[j]);
    }
#pragma unroll
    for (int j = 0; j < ATTN_MAX_HD / 32; ++j)
        if (j < nd) po[(size_t)warp * hd + lane + 32 * j] = acc[j];
    __syncthreads();
    float* orow = out + ((size_t)r * nq + h) * hd;
    for (int dd = threadIdx.x; dd < hd; dd += blockDim.x) {
        float s = 0.f;
        for (int w = 0; w < nw; ++w) s += po[(size_t)w * hd + dd];
        orow[dd] = s;
    }
}
