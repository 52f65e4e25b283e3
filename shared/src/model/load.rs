//! Building a model (or one shard of it) from a checkpoint: name resolution across layouts,
//! shape and dtype checks, and slicing so that a shard maps or copies only its own bytes.

use super::names::{self, ExpertProj, Norm, Proj};
use super::{Expert, Layer, Model, ModelError, ShardSpec};
use crate::backend::cpu::{Linear, Weights};
use crate::formats::checkpoint::{Buf, Checkpoint, CheckpointError, DType, TensorInfo};
use std::ops::Range;
use std::sync::Arc;

impl Model {
    /// Loads the whole model.
    pub fn load(ckpt: &Checkpoint) -> Result<Self, ModelError> {
        Self::load_shard(ckpt, &ShardSpec::full(&ckpt.config))
    }

    /// Loads the part of the model described by `shard`.
    pub fn load_shard(ckpt: &Checkpoint, shard: &ShardSpec) -> Result<Self, ModelError> {
        Self::load_shard_with_progress(ckpt, shard, |_, _| {})
    }

    /// As [`Model::load_shard`], calling `progress(layers_done, layers_total)` after each layer.
    pub fn load_shard_with_progress(
        ckpt: &Checkpoint,
        shard: &ShardSpec,
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Self, ModelError> {
        let c = &ckpt.config;
        shard.check(c)?;
        let d = c.emb_size;
        let embed = if shard.embed || shard.logits {
            Some(load_linear(
                ckpt,
                &names::embedding(),
                true,
                c.vocab_size,
                d,
                0..c.vocab_size,
                0..d,
            )?)
        } else {
            None
        };
        let final_norm = if shard.logits {
            Some(load_vec(ckpt, &names::final_norm(), d)?)
        } else {
            None
        };
        let ks = c.key_size;
        let qr = shard.q_heads.start * ks..shard.q_heads.end * ks;
        let kvr = shard.kv_heads.start * ks..shard.kv_heads.end * ks;
        let mut layers = Vec::new();
        for i in shard.layers.clone() {
            let lin = |p: Proj, rows: Range<usize>, cols: Range<usize>, out: usize, inp: usize| {
                load_linear(ckpt, &names::attn(i, p), false, out, inp, rows, cols)
            };
            let mut experts = Vec::new();
            for (e, f) in &shard.experts {
                experts.push(load_expert(ckpt, i, *e, f)?);
            }
            layers.push(Layer {
                index: i,
                pre_attn_norm: load_vec(ckpt, &names::norm(i, Norm::PreAttn), d)?,
                post_attn_norm: load_vec(ckpt, &names::norm(i, Norm::PostAttn), d)?,
                pre_moe_norm: load_vec(ckpt, &names::norm(i, Norm::PreMoe), d)?,
                post_moe_norm: load_vec(ckpt, &names::norm(i, Norm::PostMoe), d)?,
                q: lin(Proj::Q, qr.clone(), 0..d, c.q_size(), d)?,
                k: lin(Proj::K, kvr.clone(), 0..d, c.kv_size(), d)?,
                v: lin(Proj::V, kvr.clone(), 0..d, c.kv_size(), d)?,
                o: lin(Proj::O, 0..d, qr.clone(), d, c.q_size())?,
                router: load_matrix_f32(ckpt, &names::router(i), c.num_experts, d)?,
                experts,
            });
            progress(layers.len(), shard.layers.len());
        }
        Ok(Model {
            dev: super::Cpu,
            config: c.clone(),
            shard: shard.clone(),
            embed,
            final_norm,
            expert_counts: std::sync::Mutex::new(vec![0; layers.len() * c.num_experts]),
            expert_served: std::sync::Mutex::new(vec![0; c.num_experts]),
            dispatch: None,
            layers,
        })
    }
}

/// One expert slice (`f`: its range of the FFN width) of layer `i`.
fn load_expert(
    ckpt: &Checkpoint,
    i: usize,
    e: usize,
    f: &Range<usize>,
) -> Result<Expert, ModelError> {
    let c = &ckpt.config;
    let d = c.emb_size;
    let ex = |p: ExpertProj, out, inp, rows, cols| {
        load_linear(ckpt, &names::expert(i, e, p), false, out, inp, rows, cols)
    };
    Ok(Expert {
        index: e,
        linear: ex(ExpertProj::Linear, c.ffn_size, d, f.clone(), 0..d)?,
        linear_v: ex(ExpertProj::LinearV, c.ffn_size, d, f.clone(), 0..d)?,
        linear_1: ex(ExpertProj::Linear1, d, c.ffn_size, 0..d, f.clone())?,
    })
}

impl Model {
    /// Copies every weight matrix into one anonymous mapping of this process, in huge pages
    /// where the kernel grants them ([`crate::formats::checkpoint::copy_to_huge_pages`]):
    /// decode streams each weight once per token, and 2 MB pages spare it a TLB miss every
    /// 4 KB. Once the checkpoint is dropped its file pages leave this process. Experts loaded
    /// later (`set_experts`) come from the file again; calling this again copies the whole
    /// shard anew.
    pub fn make_resident(&mut self) -> Result<(), ModelError> {
        let mut lins: Vec<&mut crate::backend::cpu::Linear> = self.embed.iter_mut().collect();
        for l in &mut self.layers {
            lins.extend([&mut l.q, &mut l.k, &mut l.v, &mut l.o]);
            for e in &mut l.experts {
                lins.extend([&mut e.linear, &mut e.linear_v, &mut e.linear_1]);
            }
        }
        let parts: Vec<&[u8]> = lins.iter().map(|l| l.weight_bytes_view()).collect();
        // Each matrix's file pages go as soon as it is copied.
        let copied = |i: usize| lins[i].release_pages();
        let (map, starts) = crate::formats::checkpoint::copy_to_huge_pages(&parts, copied)
            .map_err(|e| {
                ModelError::Shard(format!(
                    "copying the weights into this process's memory: {e}"
                ))
            })?;
        drop(parts);
        for (l, s) in lins.into_iter().zip(starts) {
            l.rebase(&map, s);
        }
        Ok(())
    }

    /// Makes this shard hold the expert slices `experts` in each of its layers: those it holds
    /// already are kept, the others are loaded from `ckpt` (of the same model), and experts no
    /// longer listed are dropped. Nothing changes when a load fails. Returns the number of
    /// expert slices loaded per layer.
    pub fn set_experts(
        &mut self,
        ckpt: &Checkpoint,
        experts: &[(usize, Range<usize>)],
    ) -> Result<usize, ModelError> {
        if ckpt.config != self.config {
            return Err(ModelError::Shard(
                "the checkpoint is not the model this shard was loaded from".into(),
            ));
        }
        let spec = ShardSpec {
            experts: experts.to_vec(),
            ..self.shard.clone()
        };
        spec.check(&self.config)?;
        let held =
            |e: usize, f: &Range<usize>| self.shard.experts.iter().any(|(x, g)| *x == e && g == f);
        let was: Vec<bool> = experts.iter().map(|(e, f)| held(*e, f)).collect();
        let new: Vec<&(usize, Range<usize>)> = experts
            .iter()
            .zip(&was)
            .filter(|(_, w)| !**w)
            .map(|(x, _)| x)
            .collect();
        // Load everything first: a failure leaves the shard as it was.
        let mut loaded = Vec::with_capacity(self.layers.len());
        for l in &self.layers {
            let mut v = Vec::with_capacity(new.len());
            for (e, f) in &new {
                v.push(load_expert(ckpt, l.index, *e, f)?);
            }
            loaded.push(v);
        }
        for (l, mut fresh) in self.layers.iter_mut().zip(loaded) {
            let mut old = std::mem::take(&mut l.experts);
            for ((e, f), &w) in experts.iter().zip(&was) {
                let pos = old
                    .iter()
                    .position(|x| x.index == *e && x.linear.out_features == f.len());
                match pos {
                    Some(p) if w => l.experts.push(old.swap_remove(p)),
                    _ => {
                        let p = fresh
                            .iter()
                            .position(|x| x.index == *e)
                            .expect("loaded above");
                        l.experts.push(fresh.swap_remove(p));
                    }
                }
            }
        }
        self.shard = spec;
        Ok(new.len())
    }
}

fn check_float(ckpt: &Checkpoint, name: &str, info: &TensorInfo) -> Result<(), CheckpointError> {
    if info.dtype == DType::I8 {
        return Err(CheckpointError::DType {
            name: name.to_string(),
            file: ckpt.file_path(info).to_path_buf(),
            expected: "F32, BF16 or F16".into(),
            found: info.dtype.to_string(),
        });
    }
    Ok(())
}

fn load_vec(ckpt: &Checkpoint, names: &[String], d: usize) -> Result<Vec<f32>, CheckpointError> {
    let (name, info) = ckpt.find(names)?;
    ckpt.expect_shape(name, info, &[d])?;
    check_float(ckpt, name, info)?;
    ckpt.f32_vec(name, info)
}

fn load_matrix_f32(
    ckpt: &Checkpoint,
    names: &[String],
    rows: usize,
    cols: usize,
) -> Result<Vec<f32>, CheckpointError> {
    let (name, info) = ckpt.find(names)?;
    ckpt.expect_shape(name, info, &[rows, cols])?;
    check_float(ckpt, name, info)?;
    ckpt.f32_vec(name, info)
}

/// Elements `[rows] x [cols]` of a row-major `[_, in_dim]` tensor: mapped when the rows are
/// whole, copied otherwise.
fn slice2d<T: bytemuck::Pod>(
    ckpt: &Checkpoint,
    info: &TensorInfo,
    in_dim: usize,
    rows: &Range<usize>,
    cols: &Range<usize>,
) -> Buf<T> {
    let size = std::mem::size_of::<T>();
    if cols.start == 0 && cols.end == in_dim {
        let sub = TensorInfo {
            start: info.start + rows.start * in_dim * size,
            end: info.start + rows.end * in_dim * size,
            ..info.clone()
        };
        return ckpt.buf(&sub);
    }
    let bytes = ckpt.bytes(info);
    let mut out: Vec<T> = Vec::with_capacity(rows.len() * cols.len());
    for r in rows.clone() {
        let s = (r * in_dim + cols.start) * size;
        let e = (r * in_dim + cols.end) * size;
        out.extend_from_slice(&bytemuck::pod_collect_to_vec::<u8, T>(&bytes[s..e]));
    }
    Buf::owned(out)
}

fn to_f32_owned(
    ckpt: &Checkpoint,
    info: &TensorInfo,
    in_dim: usize,
    rows: &Range<usize>,
    cols: &Range<usize>,
) -> Vec<f32> {
    let h: Buf<u16> = slice2d(ckpt, info, in_dim, rows, cols);
    h.as_slice()
        .iter()
        .map(|&b| half::f16::from_bits(b).to_f32())
        .collect()
}

/// Loads `[rows, cols]` of a weight stored `[out, in]` under one of `bases` (`.weight` appended
/// unless `full_names`), with int8 scales from `.scales` or `.weight_scale`.
fn load_linear(
    ckpt: &Checkpoint,
    bases: &[String],
    full_names: bool,
    out: usize,
    inp: usize,
    rows: Range<usize>,
    cols: Range<usize>,
) -> Result<Linear, CheckpointError> {
    let wnames = if full_names {
        bases.to_vec()
    } else {
        names::with_suffix(bases, ".weight")
    };
    let (name, info) = ckpt.find(&wnames)?;
    let (n_out, n_in) = (rows.len(), cols.len());
    if ckpt.presharded {
        // The file holds exactly this rank's slice.
        ckpt.expect_shape(name, info, &[n_out, n_in])?;
        let all_rows = 0..n_out;
        let all_cols = 0..n_in;
        let w = match info.dtype {
            DType::F32 => Weights::F32(slice2d(ckpt, info, n_in, &all_rows, &all_cols)),
            DType::BF16 => Weights::Bf16(slice2d(ckpt, info, n_in, &all_rows, &all_cols)),
            DType::F16 => Weights::F32(Buf::owned(to_f32_owned(
                ckpt, info, n_in, &all_rows, &all_cols,
            ))),
            DType::I8 => {
                let base = name.strip_suffix(".weight").unwrap_or(name);
                let (sname, sinfo) = ckpt.find(&[format!("{base}.scales")])?;
                let nb = sinfo.shape.first().copied().unwrap_or(0);
                if sinfo.shape.len() != 2
                    || sinfo.shape[1] != n_out
                    || nb == 0
                    || !n_in.is_multiple_of(nb)
                {
                    return Err(CheckpointError::Shape {
                        name: sname.to_string(),
                        file: ckpt.file_path(sinfo).to_path_buf(),
                        expected: vec![nb.max(1), n_out],
                        found: sinfo.shape.clone(),
                    });
                }
                Weights::I8 {
                    w: slice2d(ckpt, info, n_in, &all_rows, &all_cols),
                    scales: Arc::new(ckpt.f32_vec(sname, sinfo)?),
                    nb,
                }
            }
        };
        return Ok(Linear::new(n_out, n_in, w));
    }
    ckpt.expect_shape(name, info, &[out, inp])?;
    let w = match info.dtype {
        DType::F32 => Weights::F32(slice2d(ckpt, info, inp, &rows, &cols)),
        DType::BF16 => Weights::Bf16(slice2d(ckpt, info, inp, &rows, &cols)),
        DType::F16 => Weights::F32(Buf::owned(to_f32_owned(ckpt, info, inp, &rows, &cols))),
        DType::I8 => {
            let base = name.strip_suffix(".weight").unwrap_or(name);
            let snames = vec![format!("{base}.scales"), format!("{base}.weight_scale")];
            let (sname, sinfo) = ckpt.find(&snames)?;
            let all = ckpt.f32_vec(sname, sinfo)?;
            let nb = match sinfo.shape.as_slice() {
                [nb, o] if *o == out => *nb,
                [o] | [o, 1] if *o == out => 1,
                _ => {
                    return Err(CheckpointError::Shape {
                        name: sname.to_string(),
                        file: ckpt.file_path(sinfo).to_path_buf(),
                        expected: vec![1, out],
                        found: sinfo.shape.clone(),
                    })
                }
            };
            let bad = |why: String| CheckpointError::Bad {
                name: sname.to_string(),
                file: ckpt.file_path(sinfo).to_path_buf(),
                why,
            };
            if nb == 0 || !inp.is_multiple_of(nb) {
                return Err(bad(format!(
                    "{nb} scale blocks do not divide the input dimension {inp}"
                )));
            }
            if all.iter().any(|s| !s.is_finite()) {
                return Err(bad("scales contain a non-finite value".into()));
            }
            let bs = inp / nb;
            // Blocks covered by the column slice: whole blocks, or a part of one block.
            let (b0, new_nb) = if cols.start.is_multiple_of(bs) && n_in % bs == 0 {
                (cols.start / bs, n_in / bs)
            } else if cols.start / bs == (cols.end - 1) / bs {
                (cols.start / bs, 1)
            } else {
                return Err(bad(format!(
                    "input columns {cols:?} cut through a scale block of {bs} rows"
                )));
            };
            let mut scales = Vec::with_capacity(new_nb * n_out);
            for b in b0..b0 + new_nb {
                scales.extend_from_slice(&all[b * out + rows.start..b * out + rows.end]);
            }
            Weights::I8 {
                w: slice2d(ckpt, info, inp, &rows, &cols),
                scales: Arc::new(scales),
                nb: new_nb,
            }
        }
    };
    Ok(Linear::new(n_out, n_in, w))
}
