//! Conversion of a ckpt-0 directory to the safetensors layout the loader reads.

use super::array::{leaf_names, list_files, Ckpt0Error, Leaf, NpArray, NpDType};
use super::pickle::TensorFile;
use std::path::Path;

fn transpose(src: &[u8], rows: usize, cols: usize, size: usize) -> Vec<u8> {
    let mut out = vec![0u8; src.len()];
    for r in 0..rows {
        for c in 0..cols {
            let s = (r * cols + c) * size;
            let d = (c * rows + r) * size;
            out[d..d + size].copy_from_slice(&src[s..s + size]);
        }
    }
    out
}

fn np_to_dtype(d: NpDType) -> crate::formats::checkpoint::DType {
    match d {
        NpDType::F32 => crate::formats::checkpoint::DType::F32,
        NpDType::I8 => crate::formats::checkpoint::DType::I8,
        NpDType::Bf16 => crate::formats::checkpoint::DType::BF16,
    }
}

/// One output tensor: its name, dtype, shape and bytes.
type OutTensor = (
    String,
    crate::formats::checkpoint::DType,
    Vec<usize>,
    Vec<u8>,
);

fn expect(f: &TensorFile, name: &str, a: &NpArray, shape: &[usize]) -> Result<(), Ckpt0Error> {
    if a.shape != shape {
        return Err(Ckpt0Error::Shape {
            path: f.path.clone(),
            name: name.into(),
            expected: shape.to_vec(),
            found: a.shape.clone(),
        });
    }
    Ok(())
}

/// A `[.., in, out]` matrix leaf (expert `e` of a stacked one of `n` experts when `expert` is
/// `Some((e, n))`) as Hugging Face tensors `base.weight` `[out, in]` (+ `base.scales`
/// `[nb, out]` for int8).
pub(super) fn matrix_out(
    f: &TensorFile,
    leaf: &str,
    expert: Option<(usize, usize)>,
    inp: usize,
    out: usize,
    base: &str,
) -> Result<Vec<OutTensor>, Ckpt0Error> {
    let (w, s) = match &f.leaf {
        Leaf::Quantized { weight, scales } => (weight, Some(scales)),
        Leaf::Array(a) => (a, None),
    };
    // The stack must hold every expert the config names: its leading size is checked too.
    let lead: Vec<usize> = expert.map(|(_, n)| vec![n]).unwrap_or_default();
    let e = expert.map_or(0, |(e, _)| e);
    let mut want = lead.clone();
    want.extend([inp, out]);
    expect(f, leaf, w, &want)?;
    let per = inp * out;
    let data = f.c_range(w, e * per, per);
    let mut v = vec![(
        format!("{base}.weight"),
        np_to_dtype(w.dtype),
        vec![out, inp],
        transpose(&data, inp, out, w.dtype.size()),
    )];
    if let Some(s) = s {
        let nb = *s.shape.get(s.shape.len().wrapping_sub(2)).unwrap_or(&0);
        let mut want = lead;
        want.extend([nb, out]);
        if (nb != 1 && nb != 8) || !inp.is_multiple_of(nb) {
            return Err(Ckpt0Error::Shape {
                path: f.path.clone(),
                name: format!("{leaf} scales"),
                expected: want,
                found: s.shape.clone(),
            });
        }
        expect(f, &format!("{leaf} scales"), s, &want)?;
        let sper = nb * out;
        v.push((
            format!("{base}.scales"),
            np_to_dtype(s.dtype),
            vec![nb, out],
            f.c_range(s, e * sper, sper).into_owned(),
        ));
    }
    Ok(v)
}

fn vector_out(
    f: &TensorFile,
    leaf: &str,
    d: usize,
    name: &str,
) -> Result<Vec<OutTensor>, Ckpt0Error> {
    let Leaf::Array(a) = &f.leaf else {
        return Err(Ckpt0Error::Layout(format!(
            "{}: `{leaf}` should be a plain array",
            f.path.display()
        )));
    };
    expect(f, leaf, a, &[d])?;
    Ok(vec![(
        name.into(),
        np_to_dtype(a.dtype),
        vec![d],
        f.bytes(a).into_owned(),
    )])
}

fn write_group(dst: &Path, fname: &str, ts: Vec<OutTensor>) -> std::io::Result<()> {
    let pend: Vec<crate::formats::checkpoint::PendingTensor> = ts
        .iter()
        .map(|(n, d, s, _)| crate::formats::checkpoint::PendingTensor {
            name: n.clone(),
            dtype: *d,
            shape: s.clone(),
        })
        .collect();
    crate::formats::checkpoint::write_safetensors(&dst.join(fname), &pend, |k, w| {
        w.write_all(&ts[k].3)
    })
}

/// Converts an official `ckpt-0` directory into the Hugging Face layout this project loads
/// (int8 kept as int8 with its scales), one layer at a time. Files already written by an earlier,
/// interrupted run are kept (each file appears only once complete), so the conversion resumes.
pub fn convert_to_hf(
    src: &Path,
    dst: &Path,
    cfg: &crate::config::ModelConfig,
    mut progress: impl FnMut(usize, usize),
) -> Result<(), Ckpt0Error> {
    use std::io::Write as _;
    let files = list_files(src)?;
    let layers = (files.len() - 2) / 12;
    if layers != cfg.num_layers {
        return Err(Ckpt0Error::Layout(format!(
            "{} holds {layers} layers but the config says {}",
            src.display(),
            cfg.num_layers
        )));
    }
    let io = |e: std::io::Error| Ckpt0Error::Io {
        path: dst.into(),
        why: e.to_string(),
    };
    std::fs::create_dir_all(dst).map_err(io)?;
    let names = leaf_names(layers);
    let (d, v, f, e) = (cfg.emb_size, cfg.vocab_size, cfg.ffn_size, cfg.num_experts);
    let (q, kv) = (cfg.q_size(), cfg.kv_size());
    let mut weight_map = serde_json::Map::new();
    let total = 1 + layers;
    // Embedding and final norm.
    let fname = "model-embed.safetensors".to_string();
    if !dst.join(&fname).exists() {
        let emb = TensorFile::open(&files[0])?;
        let Leaf::Array(a) = &emb.leaf else {
            return Err(Ckpt0Error::Layout(
                "the embedding should be a plain array".into(),
            ));
        };
        expect(&emb, &names[0], a, &[v, d])?;
        let mut ts = vec![(
            "model.embed_tokens.weight".to_string(),
            np_to_dtype(a.dtype),
            vec![v, d],
            emb.bytes(a).into_owned(),
        )];
        ts.extend(vector_out(
            &TensorFile::open(&files[1])?,
            &names[1],
            d,
            "model.norm.scale",
        )?);
        write_group(dst, &fname, ts).map_err(io)?;
    }
    for n in ["model.embed_tokens.weight", "model.norm.scale"] {
        weight_map.insert(n.into(), fname.clone().into());
    }
    progress(1, total);
    // Layers, in the files' (lexicographic) order; each is written as model-layer-NNN.
    let mut order: Vec<usize> = (0..layers).collect();
    order.sort_by_key(|i| format!("decoder_layer_{i}"));
    for (k, &li) in order.iter().enumerate() {
        let fname = format!("model-layer-{li:03}.safetensors");
        let base = 2 + 12 * k;
        let p = format!("model.layers.{li}");
        let mut ts: Vec<OutTensor> = Vec::new();
        let done = dst.join(&fname).exists();
        if !done {
            let open = |j: usize| TensorFile::open(&files[base + j]);
            let (lin, lin1, linv) = (open(0)?, open(1)?, open(2)?);
            for x in 0..e {
                let eb = format!("{p}.moe_block.experts.{x}");
                ts.extend(matrix_out(
                    &lin,
                    &names[base],
                    Some((x, e)),
                    d,
                    f,
                    &format!("{eb}.linear"),
                )?);
                ts.extend(matrix_out(
                    &lin1,
                    &names[base + 1],
                    Some((x, e)),
                    f,
                    d,
                    &format!("{eb}.linear_1"),
                )?);
                ts.extend(matrix_out(
                    &linv,
                    &names[base + 2],
                    Some((x, e)),
                    d,
                    f,
                    &format!("{eb}.linear_v"),
                )?);
            }
            ts.extend(matrix_out(
                &open(3)?,
                &names[base + 3],
                None,
                d,
                kv,
                &format!("{p}.attn.k_proj"),
            )?);
            ts.extend(matrix_out(
                &open(4)?,
                &names[base + 4],
                None,
                q,
                d,
                &format!("{p}.attn.o_proj"),
            )?);
            ts.extend(matrix_out(
                &open(5)?,
                &names[base + 5],
                None,
                d,
                q,
                &format!("{p}.attn.q_proj"),
            )?);
            ts.extend(matrix_out(
                &open(6)?,
                &names[base + 6],
                None,
                d,
                kv,
                &format!("{p}.attn.v_proj"),
            )?);
            for (j, norm) in [
                "pre_attn_norm",
                "post_attn_norm",
                "pre_moe_norm",
                "post_moe_norm",
            ]
            .iter()
            .enumerate()
            {
                ts.extend(vector_out(
                    &open(7 + j)?,
                    &names[base + 7 + j],
                    d,
                    &format!("{p}.{norm}.scale"),
                )?);
            }
            let r = open(11)?;
            let Leaf::Array(a) = &r.leaf else {
                return Err(Ckpt0Error::Layout(
                    "the router should be a plain array".into(),
                ));
            };
            expect(&r, &names[base + 11], a, &[d, e])?;
            ts.push((
                format!("{p}.moe_block.gate.weight"),
                np_to_dtype(a.dtype),
                vec![e, d],
                transpose(&r.bytes(a), d, e, a.dtype.size()),
            ));
            for t in &ts {
                weight_map.insert(t.0.clone(), fname.clone().into());
            }
            write_group(dst, &fname, ts).map_err(io)?;
        } else {
            // Resumed: list the names of the finished file from its header.
            let ck = crate::formats::checkpoint::Checkpoint::open_files(
                dst,
                std::slice::from_ref(&fname),
            )
            .map_err(|e| Ckpt0Error::Layout(e.to_string()))?;
            for n in ck.tensor_names() {
                weight_map.insert(n.to_string(), fname.clone().into());
            }
        }
        progress(k + 2, total);
    }
    let idx = serde_json::json!({"metadata": {"format": "converted from the official ckpt-0"}, "weight_map": weight_map});
    std::fs::write(
        dst.join("model.safetensors.index.json"),
        serde_json::to_vec_pretty(&idx).expect("json"),
    )
    .map_err(io)?;
    let mut cj = std::fs::File::create(dst.join("config.json")).map_err(io)?;
    cj.write_all(&serde_json::to_vec_pretty(&cfg.to_hf_json()).expect("json"))
        .map_err(io)?;
    Ok(())
}
