//! The CPU backend: weight storage (f32, bf16, block-scaled int8, computed on directly) and the
//! operations of the forward pass, multi-threaded with rayon and vectorised at run time.
//!
//! Activations are f32. `Linear::matmul` computes `y[m, out] = x[m, in] · Wᵀ` for a weight
//! stored `[out, in]` (the Hugging Face orientation): small `m` (decode) streams each weight row
//! once against all activation rows; larger `m` (prefill) runs blocks of weight rows against
//! groups of activation rows with the same row-dot kernel. Weights are never dequantized into a
//! copy, and every output element is computed by the same arithmetic whatever the batch.

use super::simd::{dot_rows, dot_rows2, dot_rows_blocks, WeightElem};
use crate::formats::checkpoint::Buf;
use rayon::prelude::*;
use std::sync::Arc;

/// Stored weights of a `[out, in]` matrix.
#[derive(Clone)]
pub enum Weights {
    F32(Buf<f32>),
    /// bf16 as raw bits.
    Bf16(Buf<u16>),
    /// int8 with `nb` scales per output row along the input dimension: `scales[b * out + o]`.
    I8 {
        w: Buf<i8>,
        scales: Arc<Vec<f32>>,
        nb: usize,
    },
}

impl Weights {
    pub fn dtype_name(&self) -> &'static str {
        match self {
            Weights::F32(_) => "f32",
            Weights::Bf16(_) => "bf16",
            Weights::I8 { .. } => "int8",
        }
    }
}

/// A bias-free linear layer, `y = x · Wᵀ`, `W: [out_features, in_features]`.
#[derive(Clone)]
pub struct Linear {
    pub out_features: usize,
    pub in_features: usize,
    pub w: Weights,
}

/// Activation rows at or below this count take the streaming (GEMV) path.
const GEMV_MAX_ROWS: usize = 8;
/// Weight rows per GEMM task.
const GEMM_TILE_ROWS: usize = 16;
/// Activation rows dotted against one weight row at a time (kept in L1/L2).
const GEMM_X_ROWS: usize = 4;

impl Linear {
    pub fn new(out_features: usize, in_features: usize, w: Weights) -> Self {
        let n = out_features * in_features;
        match &w {
            Weights::F32(b) => assert_eq!(b.len(), n),
            Weights::Bf16(b) => assert_eq!(b.len(), n),
            Weights::I8 { w, scales, nb } => {
                assert_eq!(w.len(), n);
                assert!(*nb > 0 && in_features.is_multiple_of(*nb));
                assert_eq!(scales.len(), nb * out_features);
            }
        }
        Self {
            out_features,
            in_features,
            w,
        }
    }

    /// Bytes of stored weights (including int8 scales at 4 bytes each).
    pub fn bytes(&self) -> usize {
        let n = self.out_features * self.in_features;
        match &self.w {
            Weights::F32(_) => 4 * n,
            Weights::Bf16(_) => 2 * n,
            Weights::I8 { scales, .. } => n + 4 * scales.len(),
        }
    }

    /// Row `j` of W as f32 (dequantized).
    pub fn row_f32(&self, j: usize, out: &mut [f32]) {
        let k = self.in_features;
        let range = j * k..(j + 1) * k;
        match &self.w {
            Weights::F32(b) => out[..k].copy_from_slice(&b.as_slice()[range]),
            Weights::Bf16(b) => {
                for (o, &v) in out.iter_mut().zip(&b.as_slice()[range]) {
                    *o = v.to_f32();
                }
            }
            Weights::I8 { w, scales, nb } => {
                let bs = k / nb;
                let row = &w.as_slice()[range];
                for b in 0..*nb {
                    let s = scales[b * self.out_features + j];
                    for i in b * bs..(b + 1) * bs {
                        out[i] = row[i] as f32 * s;
                    }
                }
            }
        }
    }

    /// The weights' bytes (not the int8 scales).
    pub fn weight_bytes_view(&self) -> &[u8] {
        match &self.w {
            Weights::F32(b) => b.bytes(),
            Weights::Bf16(b) => b.bytes(),
            Weights::I8 { w, .. } => w.bytes(),
        }
    }

    /// Drops the weights' file pages from resident memory ([`Buf::release_pages`]).
    pub fn release_pages(&self) {
        match &self.w {
            Weights::F32(b) => b.release_pages(),
            Weights::Bf16(b) => b.release_pages(),
            Weights::I8 { w, .. } => w.release_pages(),
        }
    }

    /// Points the weights at their copy at byte `start` of `map` (same length and type).
    pub fn rebase(&mut self, map: &Arc<memmap2::Mmap>, start: usize) {
        let at = |len| (map.clone(), start, len);
        self.w = match &self.w {
            Weights::F32(b) => {
                let (m, s, l) = at(b.len());
                Weights::F32(Buf::in_map(m, s, l))
            }
            Weights::Bf16(b) => {
                let (m, s, l) = at(b.len());
                Weights::Bf16(Buf::in_map(m, s, l))
            }
            Weights::I8 { w, scales, nb } => {
                let (m, s, l) = at(w.len());
                Weights::I8 {
                    w: Buf::in_map(m, s, l),
                    scales: scales.clone(),
                    nb: *nb,
                }
            }
        };
    }

    /// `y[m, out] = x[m, in] · Wᵀ`.
    pub fn matmul(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.in_features, self.out_features);
        assert_eq!(x.len(), m * k, "matmul input");
        assert_eq!(y.len(), m * n, "matmul output");
        if m == 0 {
            return;
        }
        if m <= GEMV_MAX_ROWS {
            self.gemv(x, m, y)
        } else {
            self.gemm(x, m, y)
        }
    }

    fn gemv(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.in_features, self.out_features);
        // Transposed result [n, m] so that each task owns a contiguous range of output rows.
        let mut t = vec![0f32; n * m];
        let threads = rayon::current_num_threads().max(1);
        let rows_per_task = (n / (threads * 4)).clamp(4, 256);
        t.par_chunks_mut(rows_per_task * m)
            .enumerate()
            .for_each(|(c, chunk)| {
                let j0 = c * rows_per_task;
                for (jj, out) in chunk.chunks_mut(m).enumerate() {
                    let j = j0 + jj;
                    self.row_dots(j, x, m, k, out);
                }
            });
        for r in 0..m {
            for j in 0..n {
                y[r * n + j] = t[j * m + r];
            }
        }
    }

    /// `out[r] = Σ_i W[j, i] x[r, i]` for all `r < m`.
    #[inline]
    fn row_dots(&self, j: usize, x: &[f32], m: usize, k: usize, out: &mut [f32]) {
        match &self.w {
            Weights::F32(b) => dots_m(&b.as_slice()[j * k..(j + 1) * k], x, m, out),
            Weights::Bf16(b) => dots_m(&b.as_slice()[j * k..(j + 1) * k], x, m, out),
            Weights::I8 { w, scales, nb } => {
                let (bs, n) = (k / nb, self.out_features);
                let row = [&w.as_slice()[j * k..(j + 1) * k]];
                let sc = [&scales[j..]];
                let mut r0 = 0;
                while r0 < m {
                    let g = (m - r0).min(4);
                    let xr = |r: usize| &x[(r0 + r) * k..(r0 + r + 1) * k];
                    let o = &mut out[r0..r0 + g];
                    match g {
                        1 => o.copy_from_slice(&dot_rows_blocks(row, [xr(0)], bs, sc, n)[0]),
                        2 => o.copy_from_slice(&dot_rows_blocks(row, [xr(0), xr(1)], bs, sc, n)[0]),
                        3 => o.copy_from_slice(
                            &dot_rows_blocks(row, [xr(0), xr(1), xr(2)], bs, sc, n)[0],
                        ),
                        _ => o.copy_from_slice(
                            &dot_rows_blocks(row, [xr(0), xr(1), xr(2), xr(3)], bs, sc, n)[0],
                        ),
                    }
                    r0 += g;
                }
            }
        }
    }

    /// Rows `j` and `j + 1` against the `M` activation rows `x`: the same arithmetic as
    /// [`Linear::row_dots`] for each row (int8: block by block, each block's dot scaled and
    /// summed in block order).
    #[inline]
    fn pair_dots<const M: usize>(&self, j: usize, x: &[f32], k: usize) -> [[f32; M]; 2] {
        let xs: [&[f32]; M] = std::array::from_fn(|r| &x[r * k..(r + 1) * k]);
        match &self.w {
            Weights::F32(b) => {
                let b = b.as_slice();
                dot_rows2(&b[j * k..(j + 1) * k], &b[(j + 1) * k..(j + 2) * k], xs)
            }
            Weights::Bf16(b) => {
                let b = b.as_slice();
                dot_rows2(&b[j * k..(j + 1) * k], &b[(j + 1) * k..(j + 2) * k], xs)
            }
            Weights::I8 { w, scales, nb } => {
                let (w, n) = (w.as_slice(), self.out_features);
                let rows = [&w[j * k..(j + 1) * k], &w[(j + 1) * k..(j + 2) * k]];
                dot_rows_blocks(rows, xs, k / nb, [&scales[j..], &scales[j + 1..]], n)
            }
        }
    }

    /// Many activation rows: blocks of weight rows in parallel, each row dotted against groups
    /// of activation rows with the same kernel as the GEMV path, so every output element is
    /// computed by the same arithmetic whatever `m` is (batch invariance: a sequence's logits do
    /// not depend on what else is in the batch).
    fn gemm(&self, x: &[f32], m: usize, y: &mut [f32]) {
        let (k, n) = (self.in_features, self.out_features);
        let yp = SendPtr(y.as_mut_ptr());
        let blocks = n.div_ceil(GEMM_TILE_ROWS);
        (0..blocks)
            .into_par_iter()
            .for_each_init(Vec::new, |tmp: &mut Vec<f32>, bi| {
                let j0 = bi * GEMM_TILE_ROWS;
                let nb = GEMM_TILE_ROWS.min(n - j0);
                let yp = &yp;
                let mut r0 = 0;
                while r0 < m {
                    let mc = GEMM_X_ROWS.min(m - r0);
                    tmp.resize(mc, 0.0);
                    let xs = &x[r0 * k..(r0 + mc) * k];
                    let mut j = j0;
                    while j < j0 + nb {
                        // Two weight rows against four activation rows per call where it can
                        // (the same bits as one row at a time).
                        if j + 1 < j0 + nb && mc == 4 {
                            let pair = self.pair_dots::<4>(j, xs, k);
                            for (w, vals) in pair.iter().enumerate() {
                                for (r, v) in vals.iter().enumerate() {
                                    // SAFETY: (r0 + r, j + w) lies inside y [m, n]; each task
                                    // owns columns j0..j0+nb, so no two tasks write the same
                                    // element.
                                    unsafe { *yp.0.add((r0 + r) * n + j + w) = *v };
                                }
                            }
                            j += 2;
                            continue;
                        }
                        self.row_dots(j, xs, mc, k, tmp);
                        for (r, v) in tmp.iter().enumerate() {
                            // SAFETY: as above.
                            unsafe { *yp.0.add((r0 + r) * n + j) = *v };
                        }
                        j += 1;
                    }
                    r0 += mc;
                }
            });
    }
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output blocks to rayon tasks.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// `out[r] = Σ_i w[i] x[r, i]` for every row `r < m` (rows of `w.len()`), in groups of up to four.
#[inline]
fn dots_m<T: WeightElem>(w: &[T], x: &[f32], m: usize, out: &mut [f32]) {
    let k = w.len();
    let row = |r: usize| &x[r * k..(r + 1) * k];
    let mut r0 = 0;
    while r0 < m {
        let g = (m - r0).min(4);
        let vals: [f32; 4] = match g {
            1 => {
                let a = dot_rows::<T, 1>(w, [row(r0)]);
                [a[0], 0.0, 0.0, 0.0]
            }
            2 => {
                let a = dot_rows::<T, 2>(w, [row(r0), row(r0 + 1)]);
                [a[0], a[1], 0.0, 0.0]
            }
            3 => {
                let a = dot_rows::<T, 3>(w, [row(r0), row(r0 + 1), row(r0 + 2)]);
                [a[0], a[1], a[2], 0.0]
            }
            _ => dot_rows::<T, 4>(w, [row(r0), row(r0 + 1), row(r0 + 2), row(r0 + 3)]),
        };
        out[r0..r0 + g].copy_from_slice(&vals[..g]);
        r0 += g;
    }
}

/// RMSNorm of each row of `x` (`[rows, d]`) into `out`: `g ⊙ x / sqrt(mean(x²) + eps)`.
pub fn rms_norm(x: &[f32], gain: &[f32], eps: f64, out: &mut [f32]) {
    let d = gain.len();
    assert_eq!(x.len(), out.len());
    for (xr, orow) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let ms = xr.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>() / d as f64;
        let inv = (1.0 / (ms + eps).sqrt()) as f32;
        for i in 0..d {
            orow[i] = gain[i] * (xr[i] * inv);
        }
    }
}

/// Half-split (GPT-NeoX) rotary embedding in place on `x: [t, heads, key_size]`, row `i` at
/// position `positions[i]`. The phase is computed in f64 (GROK1_SPEC.md §10).
pub fn rope(x: &mut [f32], heads: usize, key_size: usize, positions: &[usize], theta: f64) {
    let half = key_size / 2;
    let mut cos = vec![0f64; half];
    let mut sin = vec![0f64; half];
    for (t, row) in x.chunks_exact_mut(heads * key_size).enumerate() {
        let pos = positions[t] as f64;
        for i in 0..half {
            let inv_freq = 1.0 / theta.powf((2 * i) as f64 / key_size as f64);
            let ph = pos * inv_freq;
            cos[i] = ph.cos();
            sin[i] = ph.sin();
        }
        for h in row.chunks_exact_mut(key_size) {
            for i in 0..half {
                let (a, b) = (h[i] as f64, h[i + half] as f64);
                h[i] = (a * cos[i] - b * sin[i]) as f32;
                h[i + half] = (b * cos[i] + a * sin[i]) as f32;
            }
        }
    }
}

/// The tanh approximation of GELU (`jax.nn.gelu` default).
#[inline]
pub fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2/pi)
    0.5 * x * (1.0 + (C * (x + 0.044715 * x * x * x)).tanh())
}

/// In-place softmax of one row.
pub fn softmax(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

/// Measures read bandwidth: sums a buffer of `bytes` (well above the caches) with the current
/// rayon pool, best of `reps` passes. Returns bytes per second.
pub fn measure_read_bandwidth(bytes: usize, reps: usize) -> f64 {
    let n = bytes / 4;
    let mut buf = vec![0f32; n];
    buf.par_chunks_mut(1 << 16).enumerate().for_each(|(i, c)| {
        for (k, v) in c.iter_mut().enumerate() {
            *v = ((i + k) % 7) as f32;
        }
    });
    let mut best = f64::INFINITY;
    let mut sink = 0f32;
    for _ in 0..reps.max(1) {
        let t = std::time::Instant::now();
        let s: f32 = buf.par_chunks(1 << 18).map(super::simd::sum_f32).sum();
        sink += s;
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(sink);
    (n * 4) as f64 / best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ref_matmul(x: &[f32], m: usize, lin: &Linear) -> Vec<f64> {
        let (k, n) = (lin.in_features, lin.out_features);
        let mut row = vec![0f32; k];
        let mut y = vec![0f64; m * n];
        for j in 0..n {
            lin.row_f32(j, &mut row);
            for r in 0..m {
                y[r * n + j] = (0..k).map(|i| row[i] as f64 * x[r * k + i] as f64).sum();
            }
        }
        y
    }

    #[test]
    fn matmul_paths_agree_with_f64() {
        let (n, k) = (70, 96);
        let wf: Vec<f32> = (0..n * k)
            .map(|i| (((i * 2654435761) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        let wb: Vec<u16> = wf
            .iter()
            .map(|v| half::bf16::from_f32(*v).to_bits())
            .collect();
        let wq: Vec<i8> = (0..n * k).map(|i| ((i * 97) % 251) as u8 as i8).collect();
        let scales: Vec<f32> = (0..8 * n).map(|i| 0.001 + (i % 13) as f32 * 1e-3).collect();
        let lins = [
            Linear::new(n, k, Weights::F32(Buf::owned(wf))),
            Linear::new(n, k, Weights::Bf16(Buf::owned(wb))),
            Linear::new(
                n,
                k,
                Weights::I8 {
                    w: Buf::owned(wq.clone()),
                    scales: Arc::new(scales[..n].to_vec()),
                    nb: 1,
                },
            ),
            Linear::new(
                n,
                k,
                Weights::I8 {
                    w: Buf::owned(wq),
                    scales: Arc::new(scales),
                    nb: 8,
                },
            ),
        ];
        for m in [1, 3, 4, 5, 8, 9, 33] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 31 % 17) as f32 - 8.0) / 8.0)
                .collect();
            for lin in &lins {
                let mut y = vec![0f32; m * n];
                lin.matmul(&x, m, &mut y);
                let want = ref_matmul(&x, m, lin);
                let scale = want.iter().fold(0f64, |a, b| a.max(b.abs()));
                for i in 0..m * n {
                    assert!(
                        (y[i] as f64 - want[i]).abs() <= 1e-5 * scale,
                        "m={m} {} i={i}",
                        lin.w.dtype_name()
                    );
                }
                // Batch invariance: each row alone gives the same bits as in the batch (the
                // GEMM's two-row tile and the GEMV's one-row kernel agree).
                for r in 0..m {
                    let mut one = vec![0f32; n];
                    lin.matmul(&x[r * k..(r + 1) * k], 1, &mut one);
                    let got: Vec<u32> = y[r * n..(r + 1) * n].iter().map(|v| v.to_bits()).collect();
                    let alone: Vec<u32> = one.iter().map(|v| v.to_bits()).collect();
                    assert_eq!(got, alone, "m={m} {} row {r}", lin.w.dtype_name());
                }
            }
        }
    }
}
