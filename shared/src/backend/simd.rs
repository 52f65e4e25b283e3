//! Row-dot kernels: one weight row against up to four activation rows, for f32, bf16 and int8
//! weights, with AVX-512 and AVX2 paths chosen at run time and a portable fallback.
//!
//! Each kernel reads every weight element once and keeps `M` accumulators, so a GEMV streams
//! the weights at memory speed; the block-scaled int8 kernel applies one scale per block of
//! the input dimension (GROK1_SPEC.md §6) without materialising a dequantized row.

/// Which instruction set the kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    Avx512,
    Avx2,
    Portable,
}

pub fn isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        if std::env::var_os("GROK_CPU_PORTABLE").is_some() {
            return Isa::Portable;
        }
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512bw") {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    })
}

/// Weight row element types.
pub trait WeightElem: Copy + Send + Sync + 'static {
    fn to_f32(self) -> f32;
}
impl WeightElem for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
}
/// bf16 stored as raw bits.
impl WeightElem for u16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f32::from_bits((self as u32) << 16)
    }
}
impl WeightElem for i8 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self as f32
    }
}

/// `acc[r] = Σ_i w[i] * xs[r][i]` for `r < M`, over the whole row.
#[inline(always)]
pub fn dot_rows<T: WeightElem, const M: usize>(w: &[T], xs: [&[f32]; M]) -> [f32; M] {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx512 => unsafe { x86::dot512::<T, M>(w, xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx2 => unsafe { x86::dot256::<T, M>(w, xs) },
        _ => dot_portable::<T, M>(w, xs),
    }
}

/// [`dot_rows`] of two weight rows against the same `M` activation rows at once (a register
/// tile: each activation load feeds two rows, and two weight streams are in flight). Every
/// output is the same arithmetic as [`dot_rows`] gives it alone, bit for bit.
#[inline(always)]
pub fn dot_rows2<T: WeightElem, const M: usize>(
    w0: &[T],
    w1: &[T],
    xs: [&[f32]; M],
) -> [[f32; M]; 2] {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx512 => unsafe { x86::dot2_512::<T, M>(w0, w1, xs) },
        _ => [dot_rows::<T, M>(w0, xs), dot_rows::<T, M>(w1, xs)],
    }
}

/// Block-scaled rows: `out[h][r] = Σ_b scales[h][b · stride] · Σ_{i in block b} ws[h][i]
/// xs[r][i]` over blocks of `bs` weights, for `R` (1 or 2) weight rows at once. With AVX-512 a
/// row's blocks accumulate in registers, scaled as each block ends, and reduce once (one call
/// per row, not one per block); every output has the same arithmetic whatever `R` and `M` are.
#[inline(always)]
pub fn dot_rows_blocks<T: WeightElem, const R: usize, const M: usize>(
    ws: [&[T]; R],
    xs: [&[f32]; M],
    bs: usize,
    scales: [&[f32]; R],
    stride: usize,
) -> [[f32; M]; R] {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx512 => unsafe { x86::dot_blocks512::<T, R, M>(ws, xs, bs, scales, stride) },
        _ => {
            let mut out = [[0f32; M]; R];
            for h in 0..R {
                for (b, w) in ws[h].chunks(bs).enumerate() {
                    let xb: [&[f32]; M] = std::array::from_fn(|r| &xs[r][b * bs..b * bs + w.len()]);
                    let v = dot_rows::<T, M>(w, xb);
                    let s = scales[h][b * stride];
                    for r in 0..M {
                        out[h][r] = if b == 0 {
                            s * v[r]
                        } else {
                            out[h][r] + s * v[r]
                        };
                    }
                }
            }
            out
        }
    }
}

pub fn dot_portable<T: WeightElem, const M: usize>(w: &[T], xs: [&[f32]; M]) -> [f32; M] {
    let mut acc = [[0f32; 8]; M];
    let n = w.len();
    let chunks = n / 8;
    for c in 0..chunks {
        let base = c * 8;
        let mut wf = [0f32; 8];
        for k in 0..8 {
            wf[k] = w[base + k].to_f32();
        }
        for r in 0..M {
            let x = &xs[r][base..base + 8];
            for k in 0..8 {
                acc[r][k] += wf[k] * x[k];
            }
        }
    }
    let mut out = [0f32; M];
    for r in 0..M {
        let mut s: f32 = acc[r].iter().sum();
        for i in chunks * 8..n {
            s += w[i].to_f32() * xs[r][i];
        }
        out[r] = s;
    }
    out
}

/// How far ahead of the row-dot kernels the weights are prefetched: 4 KB, measured against 2
/// and 8 KB with the weights in 2 MB pages (decode at 1 thread: int8 +8%, bf16 +3%; 2 threads
/// level or better; prefill unchanged).
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 4096;

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{WeightElem, PREFETCH_BYTES};
    use std::any::TypeId;
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f,avx512bw")]
    #[inline]
    unsafe fn load16<T: WeightElem>(p: *const T) -> __m512 {
        // SAFETY (all arms): the caller guarantees 16 readable elements at `p`.
        unsafe {
            if TypeId::of::<T>() == TypeId::of::<f32>() {
                _mm512_loadu_ps(p as *const f32)
            } else if TypeId::of::<T>() == TypeId::of::<u16>() {
                let h = _mm256_loadu_si256(p as *const __m256i);
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
            } else {
                let b = _mm_loadu_si128(p as *const __m128i);
                _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))
            }
        }
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot512<T: WeightElem, const M: usize>(w: &[T], xs: [&[f32]; M]) -> [f32; M] {
        let n = w.len();
        for x in xs.iter() {
            assert!(x.len() >= n);
        }
        let mut a0 = [_mm512_setzero_ps(); M];
        let mut a1 = [_mm512_setzero_ps(); M];
        let mut i = 0;
        let wp = w.as_ptr();
        // Weights stream from memory: ask for them PREFETCH_BYTES ahead (a hint: never faults).
        let ahead = PREFETCH_BYTES / std::mem::size_of::<T>();
        // SAFETY: every load below stays inside `w[..n]` and `xs[r][..n]` (checked above).
        unsafe {
            while i + 32 <= n {
                _mm_prefetch::<_MM_HINT_T0>(wp.wrapping_add(i + ahead) as *const i8);
                let w0 = load16(wp.add(i));
                let w1 = load16(wp.add(i + 16));
                for r in 0..M {
                    let xp = xs[r].as_ptr().add(i);
                    a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), a0[r]);
                    a1[r] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), a1[r]);
                }
                i += 32;
            }
            if i + 16 <= n {
                let w0 = load16(wp.add(i));
                for r in 0..M {
                    a0[r] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xs[r].as_ptr().add(i)), a0[r]);
                }
                i += 16;
            }
        }
        let mut out = [0f32; M];
        for r in 0..M {
            let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0[r], a1[r]));
            for k in i..n {
                s += w[k].to_f32() * xs[r][k];
            }
            out[r] = s;
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn axpy512<const M: usize>(x: &[f32], ps: [f32; M], ys: [&mut [f32]; M]) {
        let n = x.len();
        for y in ys.iter() {
            assert!(y.len() >= n);
        }
        let pv = ps.map(|p| _mm512_set1_ps(p));
        let mut i = 0;
        // SAFETY: every access stays inside `x[..n]` and `ys[r][..n]` (checked above).
        unsafe {
            while i + 16 <= n {
                let xv = _mm512_loadu_ps(x.as_ptr().add(i));
                for r in 0..M {
                    let yp = ys[r].as_ptr().add(i) as *mut f32;
                    _mm512_storeu_ps(yp, _mm512_fmadd_ps(pv[r], xv, _mm512_loadu_ps(yp)));
                }
                i += 16;
            }
        }
        for r in 0..M {
            for k in i..n {
                ys[r][k] += ps[r] * x[k];
            }
        }
    }

    /// Two rows of [`dot512`] at once, each with exactly its accumulation order.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot2_512<T: WeightElem, const M: usize>(
        w0: &[T],
        w1: &[T],
        xs: [&[f32]; M],
    ) -> [[f32; M]; 2] {
        let n = w0.len();
        assert_eq!(w1.len(), n);
        for x in xs.iter() {
            assert!(x.len() >= n);
        }
        let mut a0 = [[_mm512_setzero_ps(); M]; 2];
        let mut a1 = [[_mm512_setzero_ps(); M]; 2];
        let mut i = 0;
        let wp = [w0.as_ptr(), w1.as_ptr()];
        let ahead = PREFETCH_BYTES / std::mem::size_of::<T>();
        // SAFETY: every load below stays inside `w0[..n]`, `w1[..n]` and `xs[r][..n]`.
        unsafe {
            while i + 32 <= n {
                _mm_prefetch::<_MM_HINT_T0>(wp[0].wrapping_add(i + ahead) as *const i8);
                _mm_prefetch::<_MM_HINT_T0>(wp[1].wrapping_add(i + ahead) as *const i8);
                let u0 = [load16(wp[0].add(i)), load16(wp[1].add(i))];
                let u1 = [load16(wp[0].add(i + 16)), load16(wp[1].add(i + 16))];
                for r in 0..M {
                    let xp = xs[r].as_ptr().add(i);
                    let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
                    for w in 0..2 {
                        a0[w][r] = _mm512_fmadd_ps(u0[w], x0, a0[w][r]);
                        a1[w][r] = _mm512_fmadd_ps(u1[w], x1, a1[w][r]);
                    }
                }
                i += 32;
            }
            if i + 16 <= n {
                let u0 = [load16(wp[0].add(i)), load16(wp[1].add(i))];
                for r in 0..M {
                    let x0 = _mm512_loadu_ps(xs[r].as_ptr().add(i));
                    for w in 0..2 {
                        a0[w][r] = _mm512_fmadd_ps(u0[w], x0, a0[w][r]);
                    }
                }
                i += 16;
            }
        }
        let ws = [w0, w1];
        let mut out = [[0f32; M]; 2];
        for w in 0..2 {
            for r in 0..M {
                let mut s = _mm512_reduce_add_ps(_mm512_add_ps(a0[w][r], a1[w][r]));
                for k in i..n {
                    s += ws[w][k].to_f32() * xs[r][k];
                }
                out[w][r] = s;
            }
        }
        out
    }

    /// [`super::dot_rows_blocks`] with AVX-512.
    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn dot_blocks512<T: WeightElem, const R: usize, const M: usize>(
        ws: [&[T]; R],
        xs: [&[f32]; M],
        bs: usize,
        scales: [&[f32]; R],
        stride: usize,
    ) -> [[f32; M]; R] {
        let n = ws[0].len();
        assert!(bs > 0 && n.is_multiple_of(bs));
        let nb = n / bs;
        for h in 0..R {
            assert!(ws[h].len() == n && (nb == 0 || scales[h].len() > (nb - 1) * stride));
        }
        for x in xs.iter() {
            assert!(x.len() >= n);
        }
        let ahead = PREFETCH_BYTES / std::mem::size_of::<T>();
        let mut tot = [[_mm512_setzero_ps(); M]; R];
        let mut tail = [[0f32; M]; R];
        // SAFETY: every load stays inside `ws[h][..n]`, `xs[r][..n]` and the scales (checked).
        unsafe {
            for b in 0..nb {
                let (mut i, end) = (b * bs, (b + 1) * bs);
                let mut a0 = [[_mm512_setzero_ps(); M]; R];
                let mut a1 = [[_mm512_setzero_ps(); M]; R];
                while i + 32 <= end {
                    for w in ws.iter() {
                        _mm_prefetch::<_MM_HINT_T0>(w.as_ptr().wrapping_add(i + ahead) as *const i8);
                    }
                    let u0: [__m512; R] = std::array::from_fn(|h| load16(ws[h].as_ptr().add(i)));
                    let u1: [__m512; R] =
                        std::array::from_fn(|h| load16(ws[h].as_ptr().add(i + 16)));
                    for r in 0..M {
                        let xp = xs[r].as_ptr().add(i);
                        let (x0, x1) = (_mm512_loadu_ps(xp), _mm512_loadu_ps(xp.add(16)));
                        for h in 0..R {
                            a0[h][r] = _mm512_fmadd_ps(u0[h], x0, a0[h][r]);
                            a1[h][r] = _mm512_fmadd_ps(u1[h], x1, a1[h][r]);
                        }
                    }
                    i += 32;
                }
                if i + 16 <= end {
                    let u0: [__m512; R] = std::array::from_fn(|h| load16(ws[h].as_ptr().add(i)));
                    for r in 0..M {
                        let x0 = _mm512_loadu_ps(xs[r].as_ptr().add(i));
                        for h in 0..R {
                            a0[h][r] = _mm512_fmadd_ps(u0[h], x0, a0[h][r]);
                        }
                    }
                    i += 16;
                }
                for h in 0..R {
                    let s = *scales[h].get_unchecked(b * stride);
                    let sv = _mm512_set1_ps(s);
                    for r in 0..M {
                        let blk = _mm512_add_ps(a0[h][r], a1[h][r]);
                        tot[h][r] = _mm512_fmadd_ps(sv, blk, tot[h][r]);
                        let mut t = 0f32;
                        for k in i..end {
                            t += ws[h][k].to_f32() * xs[r][k];
                        }
                        tail[h][r] += s * t;
                    }
                }
            }
        }
        let mut out = [[0f32; M]; R];
        for h in 0..R {
            for r in 0..M {
                out[h][r] = _mm512_reduce_add_ps(tot[h][r]) + tail[h][r];
            }
        }
        out
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn softcap512(xs: &mut [f32], cap: f32) {
        super::softcap_portable(xs, cap)
    }

    #[target_feature(enable = "avx512f,avx512bw")]
    pub unsafe fn gelu_gate512(a: &mut [f32], b: &[f32]) {
        super::gelu_gate_portable(a, b)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn gelu_gate256(a: &mut [f32], b: &[f32]) {
        super::gelu_gate_portable(a, b)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn softcap256(xs: &mut [f32], cap: f32) {
        super::softcap_portable(xs, cap)
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy256<const M: usize>(x: &[f32], ps: [f32; M], ys: [&mut [f32]; M]) {
        let n = x.len();
        for y in ys.iter() {
            assert!(y.len() >= n);
        }
        let pv = ps.map(|p| _mm256_set1_ps(p));
        let mut i = 0;
        // SAFETY: every access stays inside `x[..n]` and `ys[r][..n]` (checked above).
        unsafe {
            while i + 8 <= n {
                let xv = _mm256_loadu_ps(x.as_ptr().add(i));
                for r in 0..M {
                    let yp = ys[r].as_ptr().add(i) as *mut f32;
                    _mm256_storeu_ps(yp, _mm256_fmadd_ps(pv[r], xv, _mm256_loadu_ps(yp)));
                }
                i += 8;
            }
        }
        for r in 0..M {
            for k in i..n {
                ys[r][k] += ps[r] * x[k];
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn load8<T: WeightElem>(p: *const T) -> __m256 {
        // SAFETY (all arms): the caller guarantees 8 readable elements at `p`.
        unsafe {
            if TypeId::of::<T>() == TypeId::of::<f32>() {
                _mm256_loadu_ps(p as *const f32)
            } else if TypeId::of::<T>() == TypeId::of::<u16>() {
                let h = _mm_loadu_si128(p as *const __m128i);
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
            } else {
                let b = _mm_loadl_epi64(p as *const __m128i);
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot256<T: WeightElem, const M: usize>(w: &[T], xs: [&[f32]; M]) -> [f32; M] {
        let n = w.len();
        for x in xs.iter() {
            assert!(x.len() >= n);
        }
        let mut a0 = [_mm256_setzero_ps(); M];
        let mut a1 = [_mm256_setzero_ps(); M];
        let mut i = 0;
        let wp = w.as_ptr();
        // SAFETY: every load below stays inside `w[..n]` and `xs[r][..n]` (checked above).
        unsafe {
            while i + 16 <= n {
                let w0 = load8(wp.add(i));
                let w1 = load8(wp.add(i + 8));
                for r in 0..M {
                    let xp = xs[r].as_ptr().add(i);
                    a0[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), a0[r]);
                    a1[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp.add(8)), a1[r]);
                }
                i += 16;
            }
        }
        let mut out = [0f32; M];
        for r in 0..M {
            let v = _mm256_add_ps(a0[r], a1[r]);
            let mut lanes = [0f32; 8];
            // SAFETY: `lanes` holds 8 floats.
            unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), v) };
            let mut s: f32 = lanes.iter().sum();
            for k in i..n {
                s += w[k].to_f32() * xs[r][k];
            }
            out[r] = s;
        }
        out
    }
}

/// `ys[r][i] += ps[r] * x[i]` for `r < M` (the same `x` into `M` accumulators: attention's
/// probability-weighted sum of values).
#[inline(always)]
pub fn axpy_rows<const M: usize>(x: &[f32], ps: [f32; M], ys: [&mut [f32]; M]) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx512 => unsafe { x86::axpy512::<M>(x, ps, ys) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx2 => unsafe { x86::axpy256::<M>(x, ps, ys) },
        _ => axpy_portable::<M>(x, ps, ys),
    }
}

pub fn axpy_portable<const M: usize>(x: &[f32], ps: [f32; M], ys: [&mut [f32]; M]) {
    for (y, p) in ys.into_iter().zip(ps) {
        for (a, &b) in y.iter_mut().zip(x) {
            *a += p * b;
        }
    }
}

/// `x = cap * tanh(x / cap)` for every finite `x` (-inf stays -inf): Grok-1's attention
/// soft-cap, vectorised. `tanh(y) = 1 - 2 / (exp(2y) + 1)` with a polynomial `exp` (about 1e-7
/// relative), so the result is within about 1e-7 * cap of the exact value.
pub fn softcap(xs: &mut [f32], cap: f32) {
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx512 => unsafe { x86::softcap512(xs, cap) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx2 => unsafe { x86::softcap256(xs, cap) },
        _ => softcap_portable(xs, cap),
    }
}

#[inline(always)]
fn softcap_portable(xs: &mut [f32], cap: f32) {
    let k = 2.0 / cap;
    for x in xs.iter_mut() {
        let y = *x;
        let v = cap * (1.0 - 2.0 / (exp_poly(y * k) + 1.0));
        *x = if y == f32::NEG_INFINITY { y } else { v };
    }
}

/// `a[i] = gelu_tanh(a[i]) * b[i]`, vectorised: the MoE's gate. `0.5 (1 + tanh u)` is written
/// as `1 / (1 + e^(-2u))` (no cancellation for negative inputs), with the polynomial `exp`.
pub fn gelu_gate(a: &mut [f32], b: &[f32]) {
    assert_eq!(a.len(), b.len(), "gelu_gate: lengths differ");
    match isa() {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx512 => unsafe { x86::gelu_gate512(a, b) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the feature was detected at run time.
        Isa::Avx2 => unsafe { x86::gelu_gate256(a, b) },
        _ => gelu_gate_portable(a, b),
    }
}

#[inline(always)]
fn gelu_gate_portable(a: &mut [f32], b: &[f32]) {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    for (x, &y) in a.iter_mut().zip(b) {
        let v = *x;
        let u = C * (v + 0.044715 * v * v * v);
        *x = v / (1.0 + exp_poly(-2.0 * u)) * y;
    }
}

/// `e^x` for f32 in branch-free arithmetic (vectorisable): `x` is clamped to [-87, 88], split
/// as `n ln2 + r` with |r| <= ln2/2, and `e^r` is Cephes' degree-6 polynomial.
#[inline(always)]
pub fn exp_poly(x: f32) -> f32 {
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest with the 1.5 * 2^23 shift (no rounding instruction needed).
    let shift = 12_582_912.0f32;
    let n = (x * std::f32::consts::LOG2_E + shift) - shift;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 0.166_666_65;
    p = p * r + 0.5;
    let e = p * r * r + r + 1.0;
    e * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Sum of a slice, vectorised where possible (used by the bandwidth probe).
pub fn sum_f32(x: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for k in 0..16 {
            acc[k] += c[k];
        }
    }
    acc.iter().sum::<f32>() + rem.iter().sum::<f32>()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check<T: WeightElem>(w: &[T]) {
        let n = w.len();
        let xs: Vec<Vec<f32>> = (0..4)
            .map(|r| {
                (0..n)
                    .map(|i| ((i * 7 + r * 13) % 17) as f32 / 17.0 - 0.4)
                    .collect()
            })
            .collect();
        let want: Vec<f64> = (0..4)
            .map(|r| (0..n).map(|i| w[i].to_f32() as f64 * xs[r][i] as f64).sum())
            .collect();
        let got4 = dot_rows::<T, 4>(w, [&xs[0], &xs[1], &xs[2], &xs[3]]);
        let got1 = dot_rows::<T, 1>(w, [&xs[2]]);
        // The two-row tile gives each row's bits exactly.
        let rev: Vec<T> = w.iter().rev().copied().collect();
        let tile = dot_rows2::<T, 4>(w, &rev, [&xs[0], &xs[1], &xs[2], &xs[3]]);
        assert_eq!(tile[0], got4);
        assert_eq!(
            tile[1],
            dot_rows::<T, 4>(&rev, [&xs[0], &xs[1], &xs[2], &xs[3]])
        );
        let one = dot_rows2::<T, 1>(w, &rev, [&xs[2]]);
        assert_eq!(one, [got1, dot_rows::<T, 1>(&rev, [&xs[2]])]);
        let port = dot_portable::<T, 3>(w, [&xs[0], &xs[1], &xs[2]]);
        for r in 0..4 {
            assert!(
                (got4[r] as f64 - want[r]).abs() < 1e-4 * (1.0 + want[r].abs()),
                "{n} {r}"
            );
        }
        assert!((got1[0] as f64 - want[2]).abs() < 1e-4 * (1.0 + want[2].abs()));
        for r in 0..3 {
            assert!((port[r] as f64 - want[r]).abs() < 1e-4 * (1.0 + want[r].abs()));
        }
    }

    #[test]
    fn exp_and_softcap_are_accurate() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let e = exp_poly(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max((e - want).abs() / want);
            x += 0.013;
        }
        assert!(worst < 3e-7, "exp: rel err {worst:e}");
        let cap = 30.0f32;
        let mut xs: Vec<f32> = (-4000..4000).map(|i| i as f32 * 0.05).collect();
        xs.push(f32::NEG_INFINITY);
        xs.push(1e-30);
        let want: Vec<f64> = xs
            .iter()
            .map(|&v| cap as f64 * (v as f64 / cap as f64).tanh())
            .collect();
        let mut got = xs.clone();
        softcap(&mut got, cap);
        let mut port = xs.clone();
        softcap_portable(&mut port, cap);
        assert_eq!(got.last(), port.last());
        assert_eq!(got[got.len() - 2], f32::NEG_INFINITY);
        for (((g, p), w), x) in got.iter().zip(&port).zip(&want).zip(&xs) {
            if x.is_finite() {
                assert!((*g as f64 - w).abs() < 2e-7 * cap as f64, "{g} vs {w}");
                assert!((*p as f64 - w).abs() < 2e-7 * cap as f64, "{p} vs {w}");
            }
        }
    }

    #[test]
    fn gelu_gate_matches_f64() {
        let xs: Vec<f32> = (-3000..3000).map(|i| i as f32 * 0.01).collect();
        let ys: Vec<f32> = (0..6000).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let mut got = xs.clone();
        gelu_gate(&mut got, &ys);
        let mut port = xs.clone();
        gelu_gate_portable(&mut port, &ys);
        for i in 0..xs.len() {
            let x = xs[i] as f64;
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let want = 0.5 * x * (1.0 + (c * (x + 0.044715 * x * x * x)).tanh()) * ys[i] as f64;
            for (what, g) in [("dispatched", got[i]), ("portable", port[i])] {
                let err = (g as f64 - want).abs();
                assert!(
                    err <= 2e-6 * want.abs().max(1e-3),
                    "{what} at {x}: {g} vs {want}"
                );
            }
        }
        let mut big = [-90.0f32, 90.0, 0.0];
        gelu_gate(&mut big, &[1.0; 3]);
        // Far in the tails: 0 (to f32's range) and the identity; finite, never NaN.
        assert!(big[0] <= 0.0 && big[0] > -1e-30, "{big:?}");
        assert_eq!(big[1..], [90.0, 0.0]);
    }

    #[test]
    fn axpy_matches_f64_for_odd_lengths() {
        for n in [1usize, 7, 8, 15, 16, 17, 33, 128, 257] {
            let x: Vec<f32> = (0..n).map(|i| ((i * 31) % 11) as f32 - 5.3).collect();
            let ps = [0.25f32, -1.5, 3.0];
            let mut ys: Vec<Vec<f32>> = (0..3)
                .map(|r| (0..n).map(|i| (i + r) as f32 * 0.1).collect())
                .collect();
            let want: Vec<Vec<f64>> = (0..3)
                .map(|r| {
                    (0..n)
                        .map(|i| ys[r][i] as f64 + ps[r] as f64 * x[i] as f64)
                        .collect()
                })
                .collect();
            let mut port = ys.clone();
            let [a, b, c] = &mut ys[..] else {
                unreachable!()
            };
            axpy_rows::<3>(&x, ps, [a, b, c]);
            let [a, b, c] = &mut port[..] else {
                unreachable!()
            };
            axpy_portable::<3>(&x, ps, [a, b, c]);
            for r in 0..3 {
                for i in 0..n {
                    assert!((ys[r][i] as f64 - want[r][i]).abs() < 1e-5 * (1.0 + want[r][i].abs()));
                    assert!(
                        (port[r][i] as f64 - want[r][i]).abs() < 1e-5 * (1.0 + want[r][i].abs())
                    );
                }
            }
        }
    }

    #[test]
    fn kernels_match_f64_for_odd_lengths() {
        for n in [1usize, 15, 16, 17, 31, 32, 33, 63, 100, 257] {
            let f: Vec<f32> = (0..n).map(|i| ((i * 31) % 11) as f32 - 5.3).collect();
            let b: Vec<u16> = f
                .iter()
                .map(|v| half::bf16::from_f32(*v).to_bits())
                .collect();
            let q: Vec<i8> = (0..n).map(|i| ((i * 37) % 255) as i32 as i8).collect();
            check(&f);
            check(&b);
            check(&q);
        }
    }
}
