//! Changing a checkpoint's weight type (`grokctl convert --dtype`): any layout the loader reads
//! (§8.1-§8.3, f32, bf16 or int8) to the canonical §8.1 layout in f32, bf16 or int8.
//!
//! int8 is the official release's block-scaled layout (GROK1_SPEC.md §6): q/k/v, `linear` and
//! `linear_v` with one scale per output column (`nb = 1`), the attention output and `linear_1`
//! with 8 blocks along the input dimension (`nb = 8`, when it divides); each block's scale is
//! `max |w| / 127` rounded to bf16, and each weight `round(w / scale)`. The embedding stays
//! bf16, norms and the router f32, as in the release. The relative error of the quantized
//! matrices (Frobenius, against the source weights) is measured while writing.
//!
//! One layer at a time (one output file per layer), so memory stays at one layer's weights.

use crate::backend::cpu::{Linear, Weights};
use crate::formats::checkpoint::{Checkpoint, DType};
use crate::formats::genmodel::{int8_quantization_config, quantize_row, GenDType};
use crate::formats::presharded::{model_tensors, write_tensors, PreshardError, Tensor};
use crate::model::{Model, ShardSpec};
use std::path::Path;

/// What a conversion measured.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RetypeReport {
    pub tensors: usize,
    pub bytes: u64,
    /// ‖W - Q(W)‖ / ‖W‖ over every converted matrix together (0 when nothing was rounded).
    pub rel_error: f64,
    /// The matrix with the largest relative error, and that error.
    pub worst: Option<(String, f64)>,
}

/// Row `j` of `l` in f32 (dequantized when int8).
fn row_f32(l: &Linear, j: usize, out: &mut [f32]) {
    let k = l.in_features;
    match &l.w {
        Weights::F32(b) => out.copy_from_slice(&b.as_slice()[j * k..(j + 1) * k]),
        Weights::Bf16(b) => {
            for (o, &x) in out.iter_mut().zip(&b.as_slice()[j * k..(j + 1) * k]) {
                *o = f32::from_bits((x as u32) << 16);
            }
        }
        Weights::I8 { w, scales, nb } => {
            let bs = k / nb;
            let row = &w.as_slice()[j * k..(j + 1) * k];
            for (i, (o, &q)) in out.iter_mut().zip(row).enumerate() {
                *o = q as f32 * scales[(i / bs) * l.out_features + j];
            }
        }
    }
}

/// Error sums: (Σ (w - q)², Σ w²).
#[derive(Default)]
struct Err2(f64, f64);

/// `l` as `to`, under `base`.weight (and `base`.scales for int8 with `nb` blocks).
fn linear(base: &str, l: &Linear, to: GenDType, nb: usize, e: &mut Err2) -> Vec<Tensor> {
    let (n, k) = (l.out_features, l.in_features);
    let shape = vec![n, k];
    let mut row = vec![0f32; k];
    match to {
        GenDType::F32 => {
            let mut v = Vec::with_capacity(n * k * 4);
            for j in 0..n {
                row_f32(l, j, &mut row);
                v.extend_from_slice(bytemuck::cast_slice(&row));
            }
            vec![(format!("{base}.weight"), DType::F32, shape, v)]
        }
        GenDType::Bf16 => {
            let mut v = Vec::with_capacity(n * k * 2);
            for j in 0..n {
                row_f32(l, j, &mut row);
                for &x in &row {
                    let b = half::bf16::from_f32(x);
                    let d = (x - b.to_f32()) as f64;
                    e.0 += d * d;
                    e.1 += x as f64 * x as f64;
                    v.extend_from_slice(&b.to_bits().to_le_bytes());
                }
            }
            vec![(format!("{base}.weight"), DType::BF16, shape, v)]
        }
        GenDType::Int8 => {
            let nb = if k.is_multiple_of(nb) { nb } else { 1 };
            let mut w = Vec::with_capacity(n * k);
            let mut scales = vec![0u16; nb * n];
            for j in 0..n {
                row_f32(l, j, &mut row);
                let (q, s) = quantize_row(&row, nb);
                let bs = k / nb;
                for (i, (&x, &qi)) in row.iter().zip(&q).enumerate() {
                    let d = (x - qi as f32 * s[i / bs]) as f64;
                    e.0 += d * d;
                    e.1 += x as f64 * x as f64;
                }
                for (b, &sb) in s.iter().enumerate() {
                    scales[b * n + j] = half::bf16::from_f32(sb).to_bits();
                }
                w.extend(q.iter().map(|&x| x as u8));
            }
            vec![
                (format!("{base}.weight"), DType::I8, shape, w),
                (
                    format!("{base}.scales"),
                    DType::BF16,
                    vec![nb, n],
                    bytemuck::cast_slice(&scales).to_vec(),
                ),
            ]
        }
    }
}

/// Writes `src` with its weights as `to` into `dst` (config.json, one safetensors file per
/// layer and an index). `progress(done, total)` counts layers.
pub fn convert(
    src: &Checkpoint,
    dst: &Path,
    to: GenDType,
    mut progress: impl FnMut(usize, usize),
) -> Result<RetypeReport, PreshardError> {
    let c = &src.config;
    let io = |p: &Path, e: std::io::Error| PreshardError::Io {
        path: p.display().to_string(),
        why: e.to_string(),
    };
    std::fs::create_dir_all(dst).map_err(|e| io(dst, e))?;
    let nfiles = c.num_layers.max(1);
    let full = ShardSpec::full(c);
    let mut report = RetypeReport::default();
    let mut total = Err2::default();
    let mut weight_map = serde_json::Map::new();
    for li in 0..nfiles {
        let spec = ShardSpec {
            layers: li..(li + 1).min(c.num_layers),
            embed: li == 0,
            logits: li + 1 == nfiles,
            ..full.clone()
        };
        let m = Model::load_shard(src, &spec)?;
        let first = li == 0;
        let ts = model_tensors(&m, |ts, base, l, nb| {
            // The embedding (nb 0): once, in the first file, and in bf16 for int8 as the
            // release keeps it.
            let (t, nb) = match nb {
                0 if !first => return,
                0 if to == GenDType::Int8 => (GenDType::Bf16, 1),
                0 => (to, 1),
                nb => (to, nb),
            };
            let mut e = Err2::default();
            ts.extend(linear(base, l, t, nb, &mut e));
            if e.1 > 0.0 {
                let r = (e.0 / e.1).sqrt();
                if report.worst.as_ref().is_none_or(|w| r > w.1) {
                    report.worst = Some((base.to_string(), r));
                }
            }
            total.0 += e.0;
            total.1 += e.1;
        });
        let fname = format!("model-{:05}-of-{nfiles:05}.safetensors", li + 1);
        let path = dst.join(&fname);
        write_tensors(&path, &ts).map_err(|e| io(&path, e))?;
        for (n, _, _, b) in &ts {
            weight_map.insert(n.clone(), fname.clone().into());
            report.bytes += b.len() as u64;
        }
        report.tensors += ts.len();
        progress(li + 1, nfiles);
    }
    report.rel_error = if total.1 > 0.0 {
        (total.0 / total.1).sqrt()
    } else {
        0.0
    };
    let idx = serde_json::json!({
        "metadata": {"total_size": report.bytes},
        "weight_map": weight_map,
    });
    let ip = dst.join("model.safetensors.index.json");
    std::fs::write(&ip, serde_json::to_vec_pretty(&idx).expect("json")).map_err(|e| io(&ip, e))?;
    let mut cfg = c.to_hf_json();
    if to == GenDType::Int8 {
        cfg["quantization_config"] = int8_quantization_config();
    }
    let cp = dst.join("config.json");
    std::fs::write(&cp, serde_json::to_vec_pretty(&cfg).expect("json")).map_err(|e| io(&cp, e))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ModelConfig;
    use crate::formats::genmodel;
    use crate::model::{KvCache, SeqInput, WantLogits};

    fn logits(m: &Model, toks: &[u32]) -> Vec<f32> {
        let mut kv = KvCache::new(m, 8, 16);
        let table: Vec<u32> = (0..8).collect();
        let s = [SeqInput {
            tokens: toks,
            start_pos: 0,
            block_table: &table,
            want: WantLogits::All,
        }];
        m.forward(&s, &mut kv, &crate::collective::SingleRank)
            .unwrap()
    }

    fn rel(a: &[f32], b: &[f32]) -> f64 {
        let s = b.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs() as f64)
            .fold(0f64, f64::max)
            / s
    }

    /// bf16 → int8 keeps every weight within half a scale step (an independent check on the
    /// loaded result), reports an error that matches, and the logits stay close; int8 → bf16
    /// → f32 keep the int8 values exactly.
    #[test]
    fn int8_from_bf16_is_the_official_layout_within_half_a_step() {
        let dir = tempfile::tempdir().unwrap();
        let c = ModelConfig::preset("tiny8", None).unwrap();
        let (src, q8, back) = (
            dir.path().join("bf16"),
            dir.path().join("int8"),
            dir.path().join("back"),
        );
        genmodel::generate(&c, GenDType::Bf16, 3, &src, 1 << 30, |_, _| {}).unwrap();
        let s = Checkpoint::open(&src).unwrap();
        let r = convert(&s, &q8, GenDType::Int8, |_, _| {}).unwrap();
        assert!(r.rel_error > 1e-4 && r.rel_error < 0.02, "{r:?}");
        let (worst, we) = r.worst.clone().unwrap();
        assert!(we >= r.rel_error && we < 0.03, "{worst}: {we}");
        let a = Model::load(&s).unwrap();
        let q = Checkpoint::open(&q8).unwrap();
        let b = Model::load(&q).unwrap();
        // Layouts: nb = 1 for q, nb = 8 for o and linear_1.
        let nb_of = |l: &Linear| match &l.w {
            Weights::I8 { nb, .. } => *nb,
            _ => panic!("not int8"),
        };
        let (l0, m0) = (&a.layers[0], &b.layers[0]);
        assert_eq!(nb_of(&m0.q), 1);
        assert_eq!(nb_of(&m0.o), 8);
        assert_eq!(nb_of(&m0.experts[0].linear_1), 8);
        assert!(matches!(b.embed.as_ref().unwrap().w, Weights::Bf16(_)));
        let mut num = 0f64;
        let mut den = 0f64;
        for (x, y) in [
            (&l0.q, &m0.q),
            (&l0.o, &m0.o),
            (&l0.experts[1].linear_1, &m0.experts[1].linear_1),
        ] {
            let (k, n) = (x.in_features, x.out_features);
            let (mut rx, mut ry) = (vec![0f32; k], vec![0f32; k]);
            let nb = nb_of(y);
            for j in 0..n {
                row_f32(x, j, &mut rx);
                row_f32(y, j, &mut ry);
                for blk in 0..nb {
                    let r = blk * k / nb..(blk + 1) * k / nb;
                    let amax = rx[r.clone()].iter().fold(0f32, |m, v| m.max(v.abs()));
                    let step = half::bf16::from_f32(amax / 127.0).to_f32();
                    for i in r {
                        assert!((rx[i] - ry[i]).abs() <= 0.5001 * step, "row {j} col {i}");
                        num += ((rx[i] - ry[i]) as f64).powi(2);
                        den += (rx[i] as f64).powi(2);
                    }
                }
            }
        }
        assert!((num / den).sqrt() < 2.0 * r.rel_error);
        let toks: Vec<u32> = (1..20).collect();
        // Random weights amplify rounding through the layers (the per-weight bound above is the
        // check of the quantization); the logits move, boundedly.
        let e = rel(&logits(&b, &toks), &logits(&a, &toks));
        assert!(e > 0.0 && e < 0.5, "int8 logits moved by {e}");
        // int8 → f32 keeps the dequantized values exactly (nothing is rounded).
        let r2 = convert(&q, &back, GenDType::F32, |_, _| {}).unwrap();
        assert_eq!(r2.rel_error, 0.0);
        let f = Model::load(&Checkpoint::open(&back).unwrap()).unwrap();
        // Only the order of rounding differs (the int8 kernel scales per block after the dot).
        let e = rel(&logits(&f, &toks), &logits(&b, &toks));
        assert!(e < 1e-5, "int8 -> f32 moved the logits by {e}");
    }
}
