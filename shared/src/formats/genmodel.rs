//! Synthetic checkpoints: random weights with Grok-1's architecture, written in the §8.1 layout
//! (`config.json` + safetensors, split into several files with an index when large).
//!
//! Weights are scaled so the network behaves numerically like a trained one: embeddings give a
//! residual stream of RMS about 1 after `× embedding_multiplier_scale`; query and key
//! projections give attention logits with a standard deviation near 9 (so the tail reaches the
//! soft-cap of 30); router logits have a spread near 2 (tokens pick different experts); the
//! final norm gain sharpens the output distribution so greedy decoding is not constant.
//!
//! Every row is generated from its own seed, so tensors stream to disk with bounded memory and
//! int8 scales can be computed without holding a matrix. With `int8`, matrices of the layers are
//! quantized as the official release is (§6): q/k/v, `linear` and `linear_v` with one scale per
//! output column (`nb = 1`), the attention output and `linear_1` with 8 blocks along the input
//! dimension (`nb = 8`); the embedding is stored as bf16.

use crate::config::ModelConfig;
use crate::formats::checkpoint::{write_safetensors, DType, PendingTensor};
use crate::model::names::{self, ExpertProj, Norm, Proj};
use crate::sampling::Rng;
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;

/// Storage type of generated weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenDType {
    F32,
    Bf16,
    Int8,
}

impl std::str::FromStr for GenDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "int8" => Ok(Self::Int8),
            o => Err(format!("unknown dtype `{o}` (expected f32, bf16 or int8)")),
        }
    }
}

/// How the rows of one matrix are drawn.
#[derive(Clone, Copy, Debug)]
enum Init {
    /// N(mean, std²) via a 4-uniform Irwin-Hall approximation.
    Normal { mean: f32, std: f32 },
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Store {
    Float(DType),
    /// int8 weights with `nb` scale blocks; the scales tensor follows as its own entry.
    Int8 {
        nb: usize,
    },
    Int8Scales {
        nb: usize,
    },
}

struct Spec {
    name: String,
    rows: usize,
    cols: usize,
    init: Init,
    store: Store,
    seed: u64,
}

fn row_values(init: Init, seed: u64, row: usize, out: &mut [f32]) {
    let mut rng = Rng::new(seed ^ (row as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let Init::Normal { mean, std } = init;
    // Sum of four uniform 16-bit draws: mean 2·65535, standard deviation 65536/sqrt(3).
    let k = std * 3f32.sqrt() / 65536.0;
    for v in out.iter_mut() {
        let x = rng.next_u64();
        let s = (x & 0xFFFF) + ((x >> 16) & 0xFFFF) + ((x >> 32) & 0xFFFF) + (x >> 48);
        *v = mean + (s as f32 - 131070.0) * k;
    }
}

/// The `quantization_config` of an int8 checkpoint's config.json.
pub fn int8_quantization_config() -> serde_json::Value {
    serde_json::json!({
        "quant_method": "grok-int8-weight-only",
        "description": "<name>.weight is I8 [out, in]; <name>.scales is [nb, out]; W[o, i] = weight[o, i] * scales[i / (in / nb), o]"
    })
}

/// Quantizes one row `[cols]` into `nb` blocks: returns (int8 values, per-block scales).
pub fn quantize_row(row: &[f32], nb: usize) -> (Vec<i8>, Vec<f32>) {
    let bs = row.len() / nb;
    let mut q = Vec::with_capacity(row.len());
    let mut scales = Vec::with_capacity(nb);
    for b in 0..nb {
        let blk = &row[b * bs..(b + 1) * bs];
        let amax = blk.iter().fold(0f32, |a, v| a.max(v.abs()));
        // Scales are stored as bf16 (as in the release); quantize against the rounded scale.
        let s = half::bf16::from_f32(if amax > 0.0 { amax / 127.0 } else { 1.0 }).to_f32();
        scales.push(s);
        q.extend(
            blk.iter()
                .map(|v| (v / s).round().clamp(-127.0, 127.0) as i8),
        );
    }
    (q, scales)
}

fn specs(c: &ModelConfig, dtype: GenDType, seed: u64) -> Vec<Spec> {
    let d = c.emb_size;
    let fd = d as f32;
    let mut out = Vec::new();
    let mut n = 0u64;
    let mut next_seed = || {
        n += 1;
        seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ n.wrapping_mul(0xC2B2_AE3D_27D4_EB4F)
    };
    let float = match dtype {
        GenDType::F32 => DType::F32,
        _ => DType::BF16,
    };
    let push =
        |out: &mut Vec<Spec>, name: String, rows, cols, init, nb: Option<usize>, s: u64| match (
            dtype, nb,
        ) {
            (GenDType::Int8, Some(nb)) => {
                let base = name.strip_suffix(".weight").unwrap_or(&name).to_string();
                out.push(Spec {
                    name: name.clone(),
                    rows,
                    cols,
                    init,
                    store: Store::Int8 { nb },
                    seed: s,
                });
                out.push(Spec {
                    name: format!("{base}.scales"),
                    rows,
                    cols,
                    init,
                    store: Store::Int8Scales { nb },
                    seed: s,
                });
            }
            _ => out.push(Spec {
                name,
                rows,
                cols,
                init,
                store: Store::Float(float),
                seed: s,
            }),
        };
    let normal = |std: f32| Init::Normal { mean: 0.0, std };
    let gain = |mean: f32| Init::Normal {
        mean,
        std: 0.1 * mean,
    };
    push(
        &mut out,
        names::embedding()[0].clone(),
        c.vocab_size,
        d,
        normal(1.0 / fd.sqrt()),
        None,
        next_seed(),
    );
    let vec_store = match dtype {
        GenDType::F32 => DType::F32,
        _ => DType::BF16,
    };
    for i in 0..c.num_layers {
        for (w, g) in [
            (Norm::PreAttn, 1.0),
            (Norm::PostAttn, 2.0),
            (Norm::PreMoe, 1.0),
            (Norm::PostMoe, 2.0),
        ] {
            out.push(Spec {
                name: names::norm(i, w)[0].clone(),
                rows: 1,
                cols: d,
                init: gain(g),
                store: Store::Float(vec_store),
                seed: next_seed(),
            });
        }
        let qk = 2.5 / fd.sqrt();
        let w = |p| format!("{}.weight", names::attn(i, p)[0]);
        push(
            &mut out,
            w(Proj::Q),
            c.q_size(),
            d,
            normal(qk),
            Some(1),
            next_seed(),
        );
        push(
            &mut out,
            w(Proj::K),
            c.kv_size(),
            d,
            normal(qk),
            Some(1),
            next_seed(),
        );
        push(
            &mut out,
            w(Proj::V),
            c.kv_size(),
            d,
            normal(1.0 / fd.sqrt()),
            Some(1),
            next_seed(),
        );
        let nb_o = if c.q_size().is_multiple_of(8) { 8 } else { 1 };
        push(
            &mut out,
            w(Proj::O),
            d,
            c.q_size(),
            normal(1.0 / (c.q_size() as f32).sqrt()),
            Some(nb_o),
            next_seed(),
        );
        // The router stays f32, as in the release.
        out.push(Spec {
            name: names::router(i)[0].clone(),
            rows: c.num_experts,
            cols: d,
            init: normal(2.0 / fd.sqrt()),
            store: Store::Float(DType::F32),
            seed: next_seed(),
        });
        for e in 0..c.num_experts {
            let w = |p| format!("{}.weight", names::expert(i, e, p)[0]);
            push(
                &mut out,
                w(ExpertProj::Linear),
                c.ffn_size,
                d,
                normal(1.0 / fd.sqrt()),
                Some(1),
                next_seed(),
            );
            push(
                &mut out,
                w(ExpertProj::LinearV),
                c.ffn_size,
                d,
                normal(1.0 / fd.sqrt()),
                Some(1),
                next_seed(),
            );
            let nb_d = if c.ffn_size.is_multiple_of(8) { 8 } else { 1 };
            push(
                &mut out,
                w(ExpertProj::Linear1),
                d,
                c.ffn_size,
                normal(1.0 / (c.ffn_size as f32).sqrt()),
                Some(nb_d),
                next_seed(),
            );
        }
    }
    out.push(Spec {
        name: names::final_norm()[0].clone(),
        rows: 1,
        cols: d,
        init: gain(4.0),
        store: Store::Float(vec_store),
        seed: next_seed(),
    });
    out
}

impl Spec {
    fn pending(&self) -> PendingTensor {
        let (dtype, shape) = match self.store {
            Store::Float(dt) if self.rows == 1 => (dt, vec![self.cols]),
            Store::Float(dt) => (dt, vec![self.rows, self.cols]),
            Store::Int8 { .. } => (DType::I8, vec![self.rows, self.cols]),
            Store::Int8Scales { nb } => (DType::BF16, vec![nb, self.rows]),
        };
        PendingTensor {
            name: self.name.clone(),
            dtype,
            shape,
        }
    }

    fn write(&self, w: &mut dyn Write) -> std::io::Result<()> {
        const CHUNK: usize = 256;
        let mut r0 = 0;
        let mut scale_rows: Vec<Vec<f32>> = Vec::new();
        while r0 < self.rows {
            let n = CHUNK.min(self.rows - r0);
            let parts: Vec<(Vec<u8>, Vec<f32>)> = (r0..r0 + n)
                .into_par_iter()
                .map(|r| {
                    let mut row = vec![0f32; self.cols];
                    row_values(self.init, self.seed, r, &mut row);
                    match self.store {
                        Store::Float(DType::F32) => (bytemuck::cast_slice(&row).to_vec(), vec![]),
                        Store::Float(_) => {
                            let b: Vec<u16> = row
                                .iter()
                                .map(|v| half::bf16::from_f32(*v).to_bits())
                                .collect();
                            (bytemuck::cast_slice(&b).to_vec(), vec![])
                        }
                        Store::Int8 { nb } => {
                            let (q, _) = quantize_row(&row, nb);
                            (bytemuck::cast_slice(&q).to_vec(), vec![])
                        }
                        Store::Int8Scales { nb } => (vec![], quantize_row(&row, nb).1),
                    }
                })
                .collect();
            for (bytes, s) in parts {
                w.write_all(&bytes)?;
                if matches!(self.store, Store::Int8Scales { .. }) {
                    scale_rows.push(s);
                }
            }
            r0 += n;
        }
        if let Store::Int8Scales { nb } = self.store {
            // Stored [nb, out]: block-major.
            for b in 0..nb {
                let col: Vec<u16> = scale_rows
                    .iter()
                    .map(|s| half::bf16::from_f32(s[b]).to_bits())
                    .collect();
                w.write_all(bytemuck::cast_slice(&col))?;
            }
        }
        Ok(())
    }
}

/// Writes a random checkpoint to `dir`. Files hold at most about `max_file_bytes` each.
pub fn generate(
    c: &ModelConfig,
    dtype: GenDType,
    seed: u64,
    dir: &Path,
    max_file_bytes: usize,
    mut progress: impl FnMut(usize, usize),
) -> std::io::Result<()> {
    c.validate().map_err(std::io::Error::other)?;
    std::fs::create_dir_all(dir)?;
    let specs = specs(c, dtype, seed);
    let total: usize = specs.iter().map(|s| s.pending().nbytes()).sum();
    // Group tensors into files (a weight and its scales stay together).
    let mut groups: Vec<Vec<usize>> = vec![vec![]];
    let mut size = 0;
    for (i, s) in specs.iter().enumerate() {
        let b = s.pending().nbytes();
        let is_scales = matches!(s.store, Store::Int8Scales { .. });
        if size + b > max_file_bytes && size > 0 && !is_scales {
            groups.push(vec![]);
            size = 0;
        }
        groups.last_mut().expect("non-empty").push(i);
        size += b;
    }
    let nfiles = groups.len();
    let mut weight_map = serde_json::Map::new();
    let mut done = 0;
    for (fi, g) in groups.iter().enumerate() {
        let fname = if nfiles == 1 {
            "model.safetensors".to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", fi + 1, nfiles)
        };
        let pend: Vec<PendingTensor> = g.iter().map(|&i| specs[i].pending()).collect();
        write_safetensors(&dir.join(&fname), &pend, |k, w| {
            let s = &specs[g[k]];
            s.write(w)?;
            done += pend[k].nbytes();
            progress(done, total);
            Ok(())
        })?;
        for &i in g {
            weight_map.insert(specs[i].name.clone(), fname.clone().into());
        }
    }
    if nfiles > 1 {
        let idx = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        std::fs::write(
            dir.join("model.safetensors.index.json"),
            serde_json::to_vec_pretty(&idx)?,
        )?;
    } else {
        let _ = std::fs::remove_file(dir.join("model.safetensors.index.json"));
    }
    let mut cfg = c.to_hf_json();
    if dtype == GenDType::Int8 {
        cfg["quantization_config"] = int8_quantization_config();
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&cfg)?)?;
    Ok(())
}
