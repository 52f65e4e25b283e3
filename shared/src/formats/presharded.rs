//! Pre-sharded checkpoints: one safetensors file per rank holding exactly that rank's slices
//! (int8 kept as int8 with its scales), and `manifest.json` with the model config, the layout and,
//! per tensor, its rank, shape, dtype, byte range and sha256.
//!
//! A worker opens only its own file; size, dtype and shape are always checked against the
//! manifest before serving, checksums on request (`grokctl verify` or `verify = true`). A
//! directory made for one layout refuses every other layout, naming the one it was made for.

use crate::backend::cpu::{Linear, Weights};
use crate::formats::checkpoint::{
    write_safetensors, Checkpoint, CheckpointError, DType, PendingTensor,
};
use crate::model::names::{self, ExpertProj, Norm, Proj};
use crate::model::{Model, ModelError};
use crate::sharding::Layout;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum PreshardError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("{path}: {why}")]
    Io { path: String, why: String },
    #[error("{dir} was sharded for tp={tp} ep={ep} pp={pp}; this cluster runs tp={want_tp} ep={want_ep} pp={want_pp} (convert again with that layout)")]
    Layout {
        dir: String,
        tp: usize,
        ep: usize,
        pp: usize,
        want_tp: usize,
        want_ep: usize,
        want_pp: usize,
    },
    #[error("{file}: tensor `{name}` does not match the manifest: {why}")]
    Mismatch {
        file: String,
        name: String,
        why: String,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestTensor {
    pub name: String,
    pub dtype: String,
    pub shape: Vec<usize>,
    /// Byte range in the rank's file (absolute).
    pub start: usize,
    pub end: usize,
    pub sha256: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct ManifestRank {
    pub rank: usize,
    pub file: String,
    pub bytes: u64,
    pub tensors: Vec<ManifestTensor>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    pub format: u32,
    pub config: serde_json::Value,
    pub tp: usize,
    pub ep: usize,
    pub pp: usize,
    pub ranks: Vec<ManifestRank>,
}

fn bytes_of<T: bytemuck::Pod>(s: &[T]) -> &[u8] {
    bytemuck::cast_slice(s)
}

/// A tensor to write: name, dtype, shape, little-endian bytes.
pub(crate) type Tensor = (String, DType, Vec<usize>, Vec<u8>);

/// The tensors of a loaded shard, under the canonical names, with their local shapes.
fn shard_tensors(m: &Model) -> Vec<Tensor> {
    model_tensors(m, |out, base, l, _| {
        let shape = vec![l.out_features, l.in_features];
        match &l.w {
            Weights::F32(b) => out.push((
                format!("{base}.weight"),
                DType::F32,
                shape,
                bytes_of(b.as_slice()).to_vec(),
            )),
            Weights::Bf16(b) => out.push((
                format!("{base}.weight"),
                DType::BF16,
                shape,
                bytes_of(b.as_slice()).to_vec(),
            )),
            Weights::I8 { w, scales, nb } => {
                out.push((
                    format!("{base}.weight"),
                    DType::I8,
                    shape,
                    bytes_of(w.as_slice()).to_vec(),
                ));
                out.push((
                    format!("{base}.scales"),
                    DType::F32,
                    vec![*nb, l.out_features],
                    bytes_of(scales.as_slice()).to_vec(),
                ));
            }
        }
    })
}

/// Every tensor of a loaded model (or shard) under its canonical name: norms and the router as
/// f32, each matrix through `lin(out, base name, matrix, nb)` where `nb` is the number of int8
/// scale blocks the official release gives it (1, or 8 for the attention output and
/// `linear_1`; 0 for the embedding, which the release keeps in bf16).
pub(crate) fn model_tensors(
    m: &Model,
    mut lin: impl FnMut(&mut Vec<Tensor>, &str, &Linear, usize),
) -> Vec<Tensor> {
    let mut out = Vec::new();
    let vecf = |out: &mut Vec<Tensor>, name: String, v: &[f32], shape: Vec<usize>| {
        out.push((name, DType::F32, shape, bytes_of(v).to_vec()));
    };
    let d = m.config.emb_size;
    if let Some(e) = &m.embed {
        let base = names::embedding()[0]
            .strip_suffix(".weight")
            .expect("suffix")
            .to_string();
        lin(&mut out, &base, e, 0);
    }
    if let Some(n) = &m.final_norm {
        vecf(&mut out, names::final_norm()[0].clone(), n, vec![d]);
    }
    for l in &m.layers {
        let i = l.index;
        for (w, v) in [
            (Norm::PreAttn, &l.pre_attn_norm),
            (Norm::PostAttn, &l.post_attn_norm),
            (Norm::PreMoe, &l.pre_moe_norm),
            (Norm::PostMoe, &l.post_moe_norm),
        ] {
            vecf(&mut out, names::norm(i, w)[0].clone(), v, vec![d]);
        }
        for (p, x, nb) in [
            (Proj::Q, &l.q, 1),
            (Proj::K, &l.k, 1),
            (Proj::V, &l.v, 1),
            (Proj::O, &l.o, 8),
        ] {
            lin(&mut out, &names::attn(i, p)[0], x, nb);
        }
        vecf(
            &mut out,
            names::router(i)[0].clone(),
            &l.router,
            vec![m.config.num_experts, d],
        );
        for e in &l.experts {
            for (p, x, nb) in [
                (ExpertProj::Linear, &e.linear, 1),
                (ExpertProj::LinearV, &e.linear_v, 1),
                (ExpertProj::Linear1, &e.linear_1, 8),
            ] {
                lin(&mut out, &names::expert(i, e.index, p)[0], x, nb);
            }
        }
    }
    out
}

/// Writes `ts` as one safetensors file.
pub(crate) fn write_tensors(path: &Path, ts: &[Tensor]) -> std::io::Result<()> {
    let pend: Vec<PendingTensor> = ts
        .iter()
        .map(|(n, d, s, _)| PendingTensor {
            name: n.clone(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    write_safetensors(path, &pend, |k, w| w.write_all(&ts[k].3))
}

pub fn rank_file(rank: usize) -> String {
    format!("rank-{rank:05}.safetensors")
}

/// Writes the pre-sharded form of `src` for `layout`. Ranks whose file and manifest fragment
/// exist already (an interrupted run) are kept.
pub fn write(
    src: &Checkpoint,
    dst: &Path,
    layout: Layout,
    mut progress: impl FnMut(usize, usize),
) -> Result<Manifest, PreshardError> {
    let c = &src.config;
    layout.validate(c).map_err(|e| PreshardError::Io {
        path: dst.display().to_string(),
        why: e.to_string(),
    })?;
    let io = |p: &Path, e: std::io::Error| PreshardError::Io {
        path: p.display().to_string(),
        why: e.to_string(),
    };
    std::fs::create_dir_all(dst).map_err(|e| io(dst, e))?;
    let world = layout.world_size();
    let mut ranks = Vec::new();
    for r in 0..world {
        let file = rank_file(r);
        let frag = dst.join(format!("rank-{r:05}.json"));
        if dst.join(&file).exists() && frag.exists() {
            let text = std::fs::read_to_string(&frag).map_err(|e| io(&frag, e))?;
            let mr: ManifestRank = serde_json::from_str(&text).map_err(|e| PreshardError::Io {
                path: frag.display().to_string(),
                why: e.to_string(),
            })?;
            ranks.push(mr);
            progress(r + 1, world);
            continue;
        }
        let m = Model::load_shard(src, &layout.shard(c, r))?;
        let ts = shard_tensors(&m);
        let path = dst.join(&file);
        write_tensors(&path, &ts).map_err(|e| io(&path, e))?;
        // Byte ranges from the written header.
        let ck = Checkpoint::open_files(dst, std::slice::from_ref(&file))?;
        let mut tensors = Vec::new();
        for (name, dt, shape, data) in &ts {
            let info = ck.get(name).expect("just written");
            tensors.push(ManifestTensor {
                name: name.clone(),
                dtype: dt.name().into(),
                shape: shape.clone(),
                start: info.start,
                end: info.end,
                sha256: hex(&Sha256::digest(data)),
            });
        }
        let bytes = std::fs::metadata(&path).map_err(|e| io(&path, e))?.len();
        let mr = ManifestRank {
            rank: r,
            file,
            bytes,
            tensors,
        };
        std::fs::write(&frag, serde_json::to_vec(&mr).expect("json")).map_err(|e| io(&frag, e))?;
        ranks.push(mr);
        progress(r + 1, world);
    }
    let man = Manifest {
        format: 1,
        config: c.to_hf_json(),
        tp: layout.tp,
        ep: layout.ep,
        pp: layout.pp,
        ranks,
    };
    let mp = dst.join("manifest.json");
    std::fs::write(&mp, serde_json::to_vec_pretty(&man).expect("json")).map_err(|e| io(&mp, e))?;
    std::fs::write(
        dst.join("config.json"),
        serde_json::to_vec_pretty(&c.to_hf_json()).expect("json"),
    )
    .map_err(|e| io(dst, e))?;
    for r in 0..world {
        let _ = std::fs::remove_file(dst.join(format!("rank-{r:05}.json")));
    }
    Ok(man)
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn read_manifest(dir: &Path) -> Result<Manifest, PreshardError> {
    let p = dir.join("manifest.json");
    let text = std::fs::read_to_string(&p).map_err(|e| PreshardError::Io {
        path: p.display().to_string(),
        why: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| PreshardError::Io {
        path: p.display().to_string(),
        why: format!("not a manifest: {e}"),
    })
}

/// A rank's file name from the manifest, checked to stay inside the directory.
fn plain<'a>(dir: &Path, file: &'a String) -> Result<&'a String, PreshardError> {
    if crate::formats::checkpoint::is_plain_file_name(file) {
        Ok(file)
    } else {
        Err(PreshardError::Io {
            path: dir.join("manifest.json").display().to_string(),
            why: format!("rank file `{file}` must be a plain name inside the directory"),
        })
    }
}

pub fn is_presharded(dir: &Path) -> bool {
    dir.join("manifest.json").exists()
}

/// Opens only `rank`'s file of a pre-sharded directory, after checking the layout and every
/// tensor's dtype, shape and byte range (and checksum when `verify`).
pub fn open_rank(
    dir: &Path,
    layout: Layout,
    rank: usize,
    verify: bool,
) -> Result<Checkpoint, PreshardError> {
    let man = read_manifest(dir)?;
    if (man.tp, man.ep, man.pp) != (layout.tp, layout.ep, layout.pp) {
        return Err(PreshardError::Layout {
            dir: dir.display().to_string(),
            tp: man.tp,
            ep: man.ep,
            pp: man.pp,
            want_tp: layout.tp,
            want_ep: layout.ep,
            want_pp: layout.pp,
        });
    }
    let mr = man
        .ranks
        .iter()
        .find(|r| r.rank == rank)
        .ok_or_else(|| PreshardError::Io {
            path: dir.display().to_string(),
            why: format!("the manifest has no rank {rank}"),
        })?;
    let mut ck = Checkpoint::open_files(dir, std::slice::from_ref(plain(dir, &mr.file)?))?;
    ck.config =
        crate::config::ModelConfig::from_hf_json(&man.config).map_err(CheckpointError::from)?;
    ck.presharded = true;
    check_rank(&ck, mr, verify)?;
    Ok(ck)
}

fn check_rank(ck: &Checkpoint, mr: &ManifestRank, verify: bool) -> Result<(), PreshardError> {
    let bad = |name: &str, why: String| PreshardError::Mismatch {
        file: mr.file.clone(),
        name: name.into(),
        why,
    };
    // The size the manifest records (a sum over ranks is reported by `verify`).
    let path = ck.dir.join(&mr.file);
    let len = std::fs::metadata(&path)
        .map_err(|e| PreshardError::Io {
            path: path.display().to_string(),
            why: e.to_string(),
        })?
        .len();
    if len != mr.bytes {
        return Err(bad(
            "*",
            format!("the file is {len} bytes, the manifest says {}", mr.bytes),
        ));
    }
    let n_file = ck.tensor_names().count();
    if n_file != mr.tensors.len() {
        return Err(bad(
            "*",
            format!(
                "the file holds {n_file} tensors, the manifest {}",
                mr.tensors.len()
            ),
        ));
    }
    for t in &mr.tensors {
        let info = ck
            .get(&t.name)
            .ok_or_else(|| bad(&t.name, "missing from the file".into()))?;
        if info.dtype.name() != t.dtype
            || info.shape != t.shape
            || info.start != t.start
            || info.end != t.end
        {
            return Err(bad(
                &t.name,
                format!(
                    "file has {} {:?} at {}..{}, manifest {} {:?} at {}..{}",
                    info.dtype, info.shape, info.start, info.end, t.dtype, t.shape, t.start, t.end
                ),
            ));
        }
        if verify {
            let got = hex(&Sha256::digest(ck.bytes(info)));
            if got != t.sha256 {
                return Err(bad(
                    &t.name,
                    format!("sha256 {got} differs from the manifest's {}", t.sha256),
                ));
            }
        }
    }
    Ok(())
}

/// Checks every rank's file against the manifest, checksums included. Returns the bytes checked.
pub fn verify(dir: &Path) -> Result<u64, PreshardError> {
    let man = read_manifest(dir)?;
    let mut bytes = 0;
    for mr in &man.ranks {
        let ck = Checkpoint::open_files(dir, std::slice::from_ref(plain(dir, &mr.file)?))?;
        check_rank(&ck, mr, true)?;
        bytes = u64::saturating_add(bytes, mr.bytes);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_files_outside_the_directory_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        // The rank's file is a real safetensors file one level up: it was opened before.
        let inner = dir.path().join("shard");
        std::fs::create_dir(&inner).unwrap();
        write_safetensors(&dir.path().join("x.safetensors"), &[], |_, _| Ok(())).unwrap();
        std::fs::write(
            inner.join("manifest.json"),
            r#"{"format": 1, "config": {}, "tp": 1, "ep": 1, "pp": 1,
                "ranks": [{"rank": 0, "file": "../x.safetensors", "bytes": 8, "tensors": []}]}"#,
        )
        .unwrap();
        let e = open_rank(&inner, Layout::new(1, 1, 1), 0, true)
            .err()
            .expect("refused")
            .to_string();
        assert!(e.contains("must be a plain name"), "{e}");
        let e = verify(&inner).unwrap_err().to_string();
        assert!(e.contains("must be a plain name"), "{e}");
    }

    #[test]
    fn manifest_byte_counts_are_checked_against_the_files() {
        let dir = tempfile::tempdir().unwrap();
        write_safetensors(&dir.path().join(rank_file(0)), &[], |_, _| Ok(())).unwrap();
        let len = std::fs::metadata(dir.path().join(rank_file(0)))
            .unwrap()
            .len();
        let manifest = |bytes: u64| {
            format!(
                r#"{{"format": 1, "config": {{}}, "tp": 2, "ep": 1, "pp": 1, "ranks": [
                    {{"rank": 0, "file": "{f}", "bytes": {bytes}, "tensors": []}},
                    {{"rank": 1, "file": "{f}", "bytes": {bytes}, "tensors": []}}]}}"#,
                f = rank_file(0)
            )
        };
        std::fs::write(dir.path().join("manifest.json"), manifest(len)).unwrap();
        assert_eq!(verify(dir.path()).unwrap(), 2 * len);
        // Two ranks of u64::MAX bytes: the sum overflowed (a panic in debug builds).
        std::fs::write(dir.path().join("manifest.json"), manifest(u64::MAX)).unwrap();
        let e = verify(dir.path()).unwrap_err().to_string();
        assert!(e.contains("the manifest says 18446744073709551615"), "{e}");
    }
}
