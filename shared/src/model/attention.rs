//! Causal attention over the paged KV cache, blocked as flash attention is: the queries of a
//! tile (a few rows of one sequence, every query head of one KV head) go through the keys one
//! block at a time with a running maximum and sum (online softmax), so memory stays linear in
//! the context and each key and value is read once per tile, not once per query.
//!
//! In f32, with Grok-1's soft-cap (`cap * tanh(s * mult / cap)`) on every score and SIMD dots
//! and value sums (`backend::simd`). Keys are taken in fixed chunks of [`KEY_CHUNK`] positions,
//! each with its own running softmax, folded left to right: a query's result is the same
//! arithmetic whatever tile, batch or thread count it is computed in (batch invariance), and
//! when a pass has too few tiles for the threads (decode) its chunks run as separate tasks.
//!
//! A query whose every key is masked (pad tokens) attends uniformly to every key of the pass,
//! as the reference's -1e30 fill makes it.

use super::{KvCache, SeqInput};
use crate::backend::simd::{axpy_rows, dot_rows, softcap};
use rayon::prelude::*;
use std::ops::Range;

/// The local heads and the score constants.
pub struct Heads {
    pub ks: usize,
    /// Local query and KV heads, the group size, the first global query and KV head.
    pub nq: usize,
    pub nkv: usize,
    pub g: usize,
    pub q0: usize,
    pub kv0: usize,
    pub mult: f32,
    pub cap: f32,
}

/// Rows of one sequence per tile.
const ROW_TILE: usize = 16;
/// Keys per block of the online softmax.
const KEY_BLOCK: usize = 64;
/// Keys per chunk: the unit of the fold, and of splitting a tile's keys over tasks.
const KEY_CHUNK: usize = 512;

/// One task: a tile of rows of a sequence, the query heads of one KV head, a range of keys.
struct Unit {
    seq: usize,
    kvh: usize,
    /// Rows (of the pass) of the tile.
    rows: Range<usize>,
    /// Local query heads of the KV head.
    heads: Range<usize>,
    keys: Range<usize>,
}

/// Running softmax state of a unit's queries (query `i` = row-major over rows x heads).
struct Partial {
    m: Vec<f32>,
    l: Vec<f32>,
    acc: Vec<f32>,
}

/// Attention outputs `[rows, nq, ks]` for the queries `q` (`[rows, nq, ks]`, after RoPE) of
/// the pass, whose keys and values are in `kv` layer `li`.
pub(super) fn attend(
    q: &[f32],
    seqs: &[SeqInput],
    rows: &[Range<usize>],
    positions: &[usize],
    kv: &KvCache,
    li: usize,
    h: &Heads,
) -> Vec<f32> {
    let t = positions.len();
    let ks = h.ks;
    let mut units = Vec::new();
    for (si, r) in rows.iter().enumerate() {
        for kvh in 0..h.nkv {
            let kv_global = h.kv0 + kvh;
            let lo = (kv_global * h.g).saturating_sub(h.q0).min(h.nq);
            let hi = ((kv_global + 1) * h.g).saturating_sub(h.q0).min(h.nq);
            if lo == hi {
                continue;
            }
            let mut start = r.start;
            while start < r.end {
                let end = (start + ROW_TILE).min(r.end);
                units.push(Unit {
                    seq: si,
                    kvh,
                    rows: start..end,
                    heads: lo..hi,
                    keys: 0..positions[end - 1] + 1,
                });
                start = end;
            }
        }
    }
    // Too few tiles for the threads (decode): one task per chunk of keys (the fold below
    // takes the chunks in the same order either way).
    let threads = rayon::current_num_threads().max(1);
    if units.len() < 2 * threads {
        units = units
            .into_iter()
            .flat_map(|u| {
                let n = u.keys.end;
                (0..n.div_ceil(KEY_CHUNK))
                    .map(|c| Unit {
                        keys: c * KEY_CHUNK..((c + 1) * KEY_CHUNK).min(n),
                        rows: u.rows.clone(),
                        heads: u.heads.clone(),
                        ..u
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
    }
    let partials: Vec<Partial> = units
        .par_iter()
        .map(|u| run_unit(u, q, seqs, positions, kv, li, h))
        .collect();
    // Merge the splits of a tile (consecutive units) and normalize.
    let mut o = vec![0f32; t * h.nq * ks];
    let mut i = 0;
    while i < units.len() {
        let u = &units[i];
        let nq_u = partials[i].m.len();
        let mut p = Partial {
            m: vec![f32::NEG_INFINITY; nq_u],
            l: vec![0f32; nq_u],
            acc: vec![0f32; nq_u * ks],
        };
        merge(&mut p, &partials[i], ks);
        let mut j = i + 1;
        while j < units.len()
            && units[j].seq == u.seq
            && units[j].kvh == u.kvh
            && units[j].rows == u.rows
        {
            merge(&mut p, &partials[j], ks);
            j += 1;
        }
        let nh = u.heads.len();
        for (ri, row) in u.rows.clone().enumerate() {
            for (hi, head) in u.heads.clone().enumerate() {
                let qi = ri * nh + hi;
                let out = &mut o[(row * h.nq + head) * ks..(row * h.nq + head + 1) * ks];
                let acc = &p.acc[qi * ks..(qi + 1) * ks];
                if p.l[qi] > 0.0 {
                    let inv = 1.0 / p.l[qi];
                    for (a, &b) in out.iter_mut().zip(acc) {
                        *a = b * inv;
                    }
                } else {
                    uniform(out, &seqs[u.seq], kv, li, h, u.kvh);
                }
            }
        }
        i = j;
    }
    o
}

/// Folds `b` into `a` (the same queries over other keys).
fn merge(a: &mut Partial, b: &Partial, ks: usize) {
    for qi in 0..a.m.len() {
        let m = a.m[qi].max(b.m[qi]);
        if m == f32::NEG_INFINITY {
            continue;
        }
        let (sa, sb) = ((a.m[qi] - m).exp(), (b.m[qi] - m).exp());
        a.l[qi] = a.l[qi] * sa + b.l[qi] * sb;
        for (x, &y) in a.acc[qi * ks..(qi + 1) * ks]
            .iter_mut()
            .zip(&b.acc[qi * ks..(qi + 1) * ks])
        {
            *x = *x * sa + y * sb;
        }
        a.m[qi] = m;
    }
}

/// Every key masked: the mean of the values of every key of the pass.
fn uniform(out: &mut [f32], s: &SeqInput, kv: &KvCache, li: usize, h: &Heads, kvh: usize) {
    let end = s.start_pos + s.tokens.len();
    let ks = h.ks;
    let mut acc = vec![0f64; ks];
    for u in 0..end {
        let slot = kv.slot(s.block_table, u);
        let v = &kv.v[li][(slot * h.nkv + kvh) * ks..(slot * h.nkv + kvh + 1) * ks];
        for (a, &b) in acc.iter_mut().zip(v) {
            *a += b as f64;
        }
    }
    for (o, a) in out.iter_mut().zip(acc) {
        *o = (a / end as f64) as f32;
    }
}

fn run_unit(
    u: &Unit,
    q: &[f32],
    seqs: &[SeqInput],
    positions: &[usize],
    kv: &KvCache,
    li: usize,
    h: &Heads,
) -> Partial {
    let ks = h.ks;
    let s = &seqs[u.seq];
    let nh = u.heads.len();
    let nqu = u.rows.len() * nh;
    // The unit's queries, their positions.
    let qs: Vec<&[f32]> = u
        .rows
        .clone()
        .flat_map(|row| {
            u.heads
                .clone()
                .map(move |hd| &q[(row * h.nq + hd) * ks..(row * h.nq + hd + 1) * ks])
        })
        .collect();
    let qpos: Vec<usize> = u
        .rows
        .clone()
        .flat_map(|row| std::iter::repeat_n(positions[row], nh))
        .collect();
    let fresh = || Partial {
        m: vec![f32::NEG_INFINITY; nqu],
        l: vec![0f32; nqu],
        acc: vec![0f32; nqu * ks],
    };
    let mut total = fresh();
    let mut c0 = u.keys.start;
    while c0 < u.keys.end {
        let c1 = ((c0 / KEY_CHUNK + 1) * KEY_CHUNK).min(u.keys.end);
        let mut p = fresh();
        chunk(&mut p, c0..c1, &qs, &qpos, s, kv, li, h, u.kvh);
        merge(&mut total, &p, ks);
        c0 = c1;
    }
    total
}

/// One chunk of keys into the running softmax `p` of the queries `qs` (at `qpos`).
fn chunk(
    p: &mut Partial,
    keys: Range<usize>,
    qs: &[&[f32]],
    qpos: &[usize],
    s: &SeqInput,
    kv: &KvCache,
    li: usize,
    h: &Heads,
    kvh: usize,
) {
    let ks = h.ks;
    let nqu = qs.len();
    let (kc, vc) = (&kv.k[li], &kv.v[li]);
    let stride = h.nkv * ks;
    let off = kvh * ks;
    let (mult, cap) = (h.mult, h.cap);
    // Scores of a block: [query][key in block].
    let mut sc = vec![f32::NEG_INFINITY; nqu * KEY_BLOCK];
    let mut slots = [0usize; KEY_BLOCK];
    let mut b0 = keys.start;
    while b0 < keys.end {
        let b1 = (b0 + KEY_BLOCK).min(keys.end);
        let nb = b1 - b0;
        sc.fill(f32::NEG_INFINITY);
        for (j, key) in (b0..b1).enumerate() {
            let slot = kv.slot(s.block_table, key);
            slots[j] = slot;
            if !kv.visible[slot] {
                continue;
            }
            let kvec = &kc[slot * stride + off..slot * stride + off + ks];
            let mut i = 0;
            while i < nqu {
                let take = (nqu - i).min(4);
                let dots: [f32; 4] = match take {
                    4 => dot_rows::<f32, 4>(kvec, [qs[i], qs[i + 1], qs[i + 2], qs[i + 3]]),
                    3 => {
                        let d = dot_rows::<f32, 3>(kvec, [qs[i], qs[i + 1], qs[i + 2]]);
                        [d[0], d[1], d[2], 0.0]
                    }
                    2 => {
                        let d = dot_rows::<f32, 2>(kvec, [qs[i], qs[i + 1]]);
                        [d[0], d[1], 0.0, 0.0]
                    }
                    _ => [dot_rows::<f32, 1>(kvec, [qs[i]])[0], 0.0, 0.0, 0.0],
                };
                for (k, &d) in dots.iter().enumerate().take(take) {
                    if key <= qpos[i + k] {
                        sc[(i + k) * KEY_BLOCK + j] = d * mult;
                    }
                }
                i += take;
            }
        }
        // Soft-cap, then online softmax: rescale to the new maximum, then weights.
        for qi in 0..nqu {
            let row = &mut sc[qi * KEY_BLOCK..qi * KEY_BLOCK + nb];
            softcap(row, cap);
            let bm = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if bm == f32::NEG_INFINITY {
                row.fill(0.0);
                continue;
            }
            let m = p.m[qi].max(bm);
            if p.m[qi] != f32::NEG_INFINITY && m > p.m[qi] {
                let scale = (p.m[qi] - m).exp();
                p.l[qi] *= scale;
                for a in &mut p.acc[qi * ks..(qi + 1) * ks] {
                    *a *= scale;
                }
            }
            p.m[qi] = m;
            let mut sum = 0f32;
            for x in row.iter_mut() {
                *x = if *x == f32::NEG_INFINITY {
                    0.0
                } else {
                    (*x - m).exp()
                };
                sum += *x;
            }
            p.l[qi] += sum;
        }
        // Values: each into the accumulators of the queries that weigh it, four at a time.
        for j in 0..nb {
            let slot = slots[j];
            if !kv.visible[slot] {
                continue;
            }
            let vvec = &vc[slot * stride + off..slot * stride + off + ks];
            let mut i = 0;
            while i < nqu {
                let take = (nqu - i).min(4);
                let w = |k: usize| {
                    if k < take {
                        sc[(i + k) * KEY_BLOCK + j]
                    } else {
                        0.0
                    }
                };
                let ws = [w(0), w(1), w(2), w(3)];
                if ws.iter().any(|&x| x != 0.0) {
                    let accs = &mut p.acc[i * ks..(i + take) * ks];
                    match take {
                        4 => {
                            let (a, rest) = accs.split_at_mut(ks);
                            let (b, rest) = rest.split_at_mut(ks);
                            let (c, d) = rest.split_at_mut(ks);
                            axpy_rows::<4>(vvec, ws, [a, b, c, d]);
                        }
                        _ => {
                            for (k, acc) in accs.chunks_mut(ks).enumerate() {
                                axpy_rows::<1>(vvec, [ws[k]], [acc]);
                            }
                        }
                    }
                }
                i += take;
            }
        }
        b0 = b1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::WantLogits;
    use crate::sampling::Rng;

    /// The definition, in f64, one query at a time.
    fn reference(
        q: &[f32],
        seqs: &[SeqInput],
        rows: &[Range<usize>],
        positions: &[usize],
        kv: &KvCache,
        h: &Heads,
    ) -> Vec<f64> {
        let ks = h.ks;
        let mut o = vec![0f64; positions.len() * h.nq * ks];
        for (si, r) in rows.iter().enumerate() {
            let s = &seqs[si];
            let end = s.start_pos + s.tokens.len();
            for row in r.clone() {
                for hd in 0..h.nq {
                    let kvh = (h.q0 + hd) / h.g - h.kv0;
                    let qv = &q[(row * h.nq + hd) * ks..(row * h.nq + hd + 1) * ks];
                    let val = |u: usize, which: &Vec<Vec<f32>>| -> Vec<f64> {
                        let slot = kv.slot(s.block_table, u);
                        which[0][(slot * h.nkv + kvh) * ks..(slot * h.nkv + kvh + 1) * ks]
                            .iter()
                            .map(|&x| x as f64)
                            .collect()
                    };
                    let mut scores = vec![];
                    for u in 0..=positions[row] {
                        if !kv.visible[kv.slot(s.block_table, u)] {
                            continue;
                        }
                        let k = val(u, &kv.k);
                        let dot: f64 = k.iter().zip(qv).map(|(a, &b)| a * b as f64).sum();
                        let z = dot * h.mult as f64;
                        scores.push((u, h.cap as f64 * (z / h.cap as f64).tanh()));
                    }
                    let out = &mut o[(row * h.nq + hd) * ks..(row * h.nq + hd + 1) * ks];
                    if scores.is_empty() {
                        for u in 0..end {
                            for (a, b) in out.iter_mut().zip(val(u, &kv.v)) {
                                *a += b / end as f64;
                            }
                        }
                        continue;
                    }
                    let m = scores.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores.iter().map(|x| (x.1 - m).exp()).sum();
                    for (u, sc) in scores {
                        let w = (sc - m).exp() / sum;
                        for (a, b) in out.iter_mut().zip(val(u, &kv.v)) {
                            *a += w * b;
                        }
                    }
                }
            }
        }
        o
    }

    /// Prefill tiles, decode rows with split keys, several sequences, scattered blocks,
    /// masked (pad) keys and rows whose every key is masked: within 1e-5 of the f64 definition.
    #[test]
    fn blocked_attention_matches_the_definition() {
        let (nkv, ks, bs) = (2, 32, 16);
        let mut kv = KvCache::zeroed(nkv, ks, 1, 128, bs).unwrap();
        let mut r = Rng::new(5);
        for x in kv.k[0].iter_mut().chain(kv.v[0].iter_mut()) {
            *x = (r.next_f64() * 2.0 - 1.0) as f32 * 3.0;
        }
        for (i, v) in kv.visible.iter_mut().enumerate() {
            // A few masked slots, and every slot of block 0 (a row with no visible key).
            *v = i >= bs && i % 13 != 5;
        }
        // Sequence A: 900 positions (prefill of its last 40, splits and many key blocks);
        // B: decode of one row at position 700; C: a prefill starting on the masked block.
        let mut free: Vec<u32> = (1..128).rev().collect();
        let mut table =
            |n: usize| -> Vec<u32> { (0..n.div_ceil(bs)).map(|_| free.pop().unwrap()).collect() };
        let ta = table(900);
        let tb = table(701);
        let mut tc = vec![0u32];
        tc.extend(table(40 - bs));
        let (toka, tokb, tokc) = (vec![1u32; 40], vec![1u32; 1], vec![1u32; 40]);
        let seqs = [
            SeqInput {
                tokens: &toka,
                start_pos: 860,
                block_table: &ta,
                want: WantLogits::None,
            },
            SeqInput {
                tokens: &tokb,
                start_pos: 700,
                block_table: &tb,
                want: WantLogits::None,
            },
            SeqInput {
                tokens: &tokc,
                start_pos: 0,
                block_table: &tc,
                want: WantLogits::None,
            },
        ];
        let rows = vec![0..40, 40..41, 41..81];
        let positions: Vec<usize> = (860..900).chain(700..701).chain(0..40).collect();
        for (g, nq) in [(3, 6), (2, 4)] {
            let h = Heads {
                ks,
                nq,
                nkv,
                g,
                q0: 0,
                kv0: 0,
                mult: 0.088,
                cap: 30.0,
            };
            let q: Vec<f32> = (0..positions.len() * nq * ks)
                .map(|_| (r.next_f64() * 2.0 - 1.0) as f32 * 4.0)
                .collect();
            let got = attend(&q, &seqs, &rows, &positions, &kv, 0, &h);
            let want = reference(&q, &seqs, &rows, &positions, &kv, &h);
            let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
            let err = got
                .iter()
                .zip(&want)
                .map(|(&a, b)| (a as f64 - b).abs())
                .fold(0f64, f64::max)
                / scale;
            assert!(got.iter().all(|x| x.is_finite()));
            assert!(err < 1e-5, "g {g}: rel err {err:e}");
            // Decode alone (one tile over 701 keys: its two chunks as two tasks).
            let one = attend(
                &q[40 * nq * ks..41 * nq * ks],
                &seqs[1..2],
                std::slice::from_ref(&(0..1)),
                &[700],
                &kv,
                0,
                &h,
            );
            let e1 = one
                .iter()
                .zip(&want[40 * nq * ks..41 * nq * ks])
                .map(|(&a, b)| (a as f64 - b).abs())
                .fold(0f64, f64::max)
                / scale;
            assert!(e1 < 1e-5, "decode: rel err {e1:e}");
            // A chunk of A's prompt alone (other tiles, no other sequence): the same bits.
            let a20 = SeqInput {
                tokens: &toka[..20],
                ..seqs[0]
            };
            let part = attend(
                &q[..20 * nq * ks],
                &[a20],
                std::slice::from_ref(&(0..20)),
                &positions[..20],
                &kv,
                0,
                &h,
            );
            assert_eq!(part, got[..20 * nq * ks], "prefill rows differ alone");
            // Batch invariance: the same bits alone (its chunks as tasks) as in the batch.
            assert_eq!(
                one,
                got[40 * nq * ks..41 * nq * ks],
                "decode row differs alone"
            );
        }
    }
}
