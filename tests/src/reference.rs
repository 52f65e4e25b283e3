//! A float64 reference of the Grok-1 forward pass, written directly from GROK1_SPEC.md §3 and
//! the official `model.py` it cites. It reads checkpoints with the `safetensors` crate (not the
//! project's loader), dequantizes int8 itself, and runs a full forward without a cache, exactly
//! as the official code does: the mask is applied with -1e30 and the softmax runs over every key.

use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;

#[derive(Clone, Debug)]
pub struct RefConfig {
    pub vocab: usize,
    pub d: usize,
    pub ffn: usize,
    pub layers: usize,
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    pub attn_mult: f64,
    pub emb_mult: f64,
    pub out_mult: f64,
    pub cap: f64,
    pub eps: f64,
    pub theta: f64,
    pub pad: u32,
}

pub struct RefLayer {
    pub norms: [Vec<f64>; 4],
    pub wq: Vec<f64>,
    pub wk: Vec<f64>,
    pub wv: Vec<f64>,
    pub wo: Vec<f64>,
    pub router: Vec<f64>,
    /// (linear [F, D], linear_v [F, D], linear_1 [D, F]) per expert.
    pub experts: Vec<(Vec<f64>, Vec<f64>, Vec<f64>)>,
}

pub struct RefModel {
    pub cfg: RefConfig,
    pub embed: Vec<f64>,
    pub final_norm: Vec<f64>,
    pub layers: Vec<RefLayer>,
}

fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().unwrap_or_else(|| panic!("config key {k}"))
}

/// All tensors of a checkpoint directory as f64 (int8 dequantized with its `.scales`).
pub fn read_tensors(dir: &Path) -> HashMap<String, (Vec<usize>, Vec<f64>)> {
    let mut files = vec![];
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "safetensors") {
            files.push(p);
        }
    }
    let mut raw: HashMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)> = HashMap::new();
    for f in files {
        let bytes = std::fs::read(&f).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            raw.insert(
                name.clone(),
                (view.dtype(), view.shape().to_vec(), view.data().to_vec()),
            );
        }
    }
    let to_f64 = |dt: safetensors::Dtype, b: &[u8]| -> Vec<f64> {
        match dt {
            safetensors::Dtype::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            safetensors::Dtype::BF16 => b
                .chunks_exact(2)
                .map(|c| f32::from_bits((u16::from_le_bytes([c[0], c[1]]) as u32) << 16) as f64)
                .collect(),
            safetensors::Dtype::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f64())
                .collect(),
            safetensors::Dtype::I8 => b.iter().map(|&x| x as i8 as f64).collect(),
            other => panic!("dtype {other:?}"),
        }
    };
    let mut out = HashMap::new();
    for (name, (dt, shape, b)) in &raw {
        if name.ends_with(".scales") {
            continue;
        }
        let mut v = to_f64(*dt, b);
        if *dt == safetensors::Dtype::I8 {
            let base = name.strip_suffix(".weight").unwrap();
            let (sdt, sshape, sb) = &raw[&format!("{base}.scales")];
            let s = to_f64(*sdt, sb);
            let (nb, o) = (sshape[0], sshape[1]);
            let (rows, cols) = (shape[0], shape[1]);
            assert_eq!(o, rows);
            let bs = cols / nb;
            for r in 0..rows {
                for c in 0..cols {
                    v[r * cols + c] *= s[(c / bs) * o + r];
                }
            }
        }
        out.insert(name.clone(), (shape.clone(), v));
    }
    out
}

impl RefModel {
    /// Loads a checkpoint in the §8.1 layout.
    pub fn load(dir: &Path) -> Self {
        let j: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let cfg = RefConfig {
            vocab: num(&j, "vocab_size") as usize,
            d: num(&j, "hidden_size") as usize,
            ffn: num(&j, "intermediate_size") as usize,
            layers: num(&j, "num_hidden_layers") as usize,
            q_heads: num(&j, "num_attention_heads") as usize,
            kv_heads: num(&j, "num_key_value_heads") as usize,
            head_dim: num(&j, "head_dim") as usize,
            experts: num(&j, "num_experts") as usize,
            top_k: num(&j, "num_experts_per_tok") as usize,
            attn_mult: num(&j, "attn_output_multiplier"),
            emb_mult: num(&j, "embedding_multiplier_scale"),
            out_mult: num(&j, "output_multiplier_scale"),
            cap: num(&j, "max_attn_value"),
            eps: num(&j, "rms_norm_eps"),
            theta: j["rope_theta"].as_f64().unwrap_or(10000.0),
            pad: j["pad_token_id"].as_u64().unwrap_or(0) as u32,
        };
        let mut t = read_tensors(dir);
        let mut take = |n: String| {
            t.remove(&n)
                .unwrap_or_else(|| panic!("reference: missing {n}"))
                .1
        };
        let layers = (0..cfg.layers)
            .map(|i| {
                let p = format!("model.layers.{i}");
                RefLayer {
                    norms: [
                        take(format!("{p}.pre_attn_norm.scale")),
                        take(format!("{p}.post_attn_norm.scale")),
                        take(format!("{p}.pre_moe_norm.scale")),
                        take(format!("{p}.post_moe_norm.scale")),
                    ],
                    wq: take(format!("{p}.attn.q_proj.weight")),
                    wk: take(format!("{p}.attn.k_proj.weight")),
                    wv: take(format!("{p}.attn.v_proj.weight")),
                    wo: take(format!("{p}.attn.o_proj.weight")),
                    router: take(format!("{p}.moe_block.gate.weight")),
                    experts: (0..cfg.experts)
                        .map(|e| {
                            let q = format!("{p}.moe_block.experts.{e}");
                            (
                                take(format!("{q}.linear.weight")),
                                take(format!("{q}.linear_v.weight")),
                                take(format!("{q}.linear_1.weight")),
                            )
                        })
                        .collect(),
                }
            })
            .collect();
        RefModel {
            embed: take("model.embed_tokens.weight".into()),
            final_norm: take("model.norm.scale".into()),
            layers,
            cfg,
        }
    }

    /// Logits `[T, vocab]` of a full forward pass over `tokens`.
    pub fn forward(&self, tokens: &[u32]) -> Vec<f64> {
        let c = &self.cfg;
        let (d, t) = (c.d, tokens.len());
        let mut h = vec![0f64; t * d];
        for (i, &tok) in tokens.iter().enumerate() {
            for k in 0..d {
                h[i * d + k] = self.embed[tok as usize * d + k] * c.emb_mult;
            }
        }
        for l in &self.layers {
            let x = rms(&h, &l.norms[0], c.eps, d);
            let a = self.attention(l, &x, tokens);
            let a = rms(&a, &l.norms[1], c.eps, d);
            for i in 0..h.len() {
                h[i] += a[i];
            }
            let x = rms(&h, &l.norms[2], c.eps, d);
            let m = self.moe(l, &x, t);
            let m = rms(&m, &l.norms[3], c.eps, d);
            for i in 0..h.len() {
                h[i] += m[i];
            }
        }
        let x = rms(&h, &self.final_norm, c.eps, d);
        let y = matmul(&x, t, d, &self.embed, c.vocab);
        y.into_iter().map(|v| v * c.out_mult).collect()
    }

    fn attention(&self, l: &RefLayer, x: &[f64], tokens: &[u32]) -> Vec<f64> {
        let c = &self.cfg;
        let (d, t, hd) = (c.d, tokens.len(), c.head_dim);
        let mut q = matmul(x, t, d, &l.wq, c.q_heads * hd);
        let mut k = matmul(x, t, d, &l.wk, c.kv_heads * hd);
        let v = matmul(x, t, d, &l.wv, c.kv_heads * hd);
        rope(&mut q, t, c.q_heads, hd, c.theta);
        rope(&mut k, t, c.kv_heads, hd, c.theta);
        let g = c.q_heads / c.kv_heads;
        let mut o = vec![0f64; t * c.q_heads * hd];
        for hq in 0..c.q_heads {
            let hk = hq / g;
            for i in 0..t {
                let mut s = vec![0f64; t];
                for u in 0..t {
                    let mut dot = 0.0;
                    for e in 0..hd {
                        dot += q[(i * c.q_heads + hq) * hd + e] * k[(u * c.kv_heads + hk) * hd + e];
                    }
                    let z = dot * c.attn_mult;
                    let z = c.cap * (z / c.cap).tanh();
                    let visible = u <= i && tokens[u] > c.pad;
                    s[u] = if visible { z } else { -1e30 };
                }
                let mx = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = s.iter().map(|z| (z - mx).exp()).collect();
                let sum: f64 = ex.iter().sum();
                for u in 0..t {
                    let p = ex[u] / sum;
                    for e in 0..hd {
                        o[(i * c.q_heads + hq) * hd + e] += p * v[(u * c.kv_heads + hk) * hd + e];
                    }
                }
            }
        }
        matmul(&o, t, c.q_heads * hd, &l.wo, d)
    }

    /// Router probabilities (softmax over all experts) of each row.
    pub fn router_probs(&self, l: &RefLayer, x: &[f64], t: usize) -> Vec<Vec<f64>> {
        let c = &self.cfg;
        let r = matmul(x, t, c.d, &l.router, c.experts);
        (0..t)
            .map(|i| {
                let row = &r[i * c.experts..(i + 1) * c.experts];
                let mx = row.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let ex: Vec<f64> = row.iter().map(|z| (z - mx).exp()).collect();
                let s: f64 = ex.iter().sum();
                ex.iter().map(|e| e / s).collect()
            })
            .collect()
    }

    fn moe(&self, l: &RefLayer, x: &[f64], t: usize) -> Vec<f64> {
        let c = &self.cfg;
        let d = c.d;
        let probs = self.router_probs(l, x, t);
        let mut y = vec![0f64; t * d];
        for i in 0..t {
            // top-k, ties to the lower index
            let mut idx: Vec<usize> = (0..c.experts).collect();
            idx.sort_by(|&a, &b| {
                probs[i][b]
                    .partial_cmp(&probs[i][a])
                    .unwrap()
                    .then(a.cmp(&b))
            });
            let xi = &x[i * d..(i + 1) * d];
            for &e in &idx[..c.top_k] {
                let (w1, wv, w2) = &l.experts[e];
                let a = matmul(xi, 1, d, w1, c.ffn);
                let b = matmul(xi, 1, d, wv, c.ffn);
                let hmid: Vec<f64> = a.iter().zip(&b).map(|(&a, &b)| gelu_tanh(a) * b).collect();
                let out = matmul(&hmid, 1, c.ffn, w2, d);
                for k in 0..d {
                    y[i * d + k] += probs[i][e] * out[k];
                }
            }
        }
        y
    }
}

pub fn gelu_tanh(x: f64) -> f64 {
    0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
}

pub fn rms(x: &[f64], g: &[f64], eps: f64, d: usize) -> Vec<f64> {
    let mut out = vec![0f64; x.len()];
    for (r, o) in x.chunks(d).zip(out.chunks_mut(d)) {
        let ms = r.iter().map(|v| v * v).sum::<f64>() / d as f64;
        let inv = 1.0 / (ms + eps).sqrt();
        for k in 0..d {
            o[k] = g[k] * r[k] * inv;
        }
    }
    out
}

/// `x [m, k] · W[n, k]ᵀ`.
pub fn matmul(x: &[f64], m: usize, k: usize, w: &[f64], n: usize) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for e in 0..k {
                s += x[i * k + e] * w[j * k + e];
            }
            y[i * n + j] = s;
        }
    }
    y
}

/// Half-split rotary embedding, positions 0..t.
pub fn rope(x: &mut [f64], t: usize, heads: usize, hd: usize, theta: f64) {
    let half = hd / 2;
    for p in 0..t {
        for h in 0..heads {
            let base = (p * heads + h) * hd;
            for i in 0..half {
                let ang = p as f64 / theta.powf(2.0 * i as f64 / hd as f64);
                let (s, c) = ang.sin_cos();
                let (a, b) = (x[base + i], x[base + i + half]);
                x[base + i] = a * c - b * s;
                x[base + i + half] = b * c + a * s;
            }
        }
    }
}

/// max |a - b| / max |b|.
///
/// Panics, naming the index, when either side holds a NaN or an infinity, and when `b` is all
/// zeros (the ratio is undefined): a bound asserted on the result (`e < tol`, or `e > tol` to
/// show that something moved) can then never pass by accident, as it did when `f64::max` folded
/// NaN away.
pub fn rel_err(a: &[f32], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "rel_err: lengths differ");
    if let Some(i) = a.iter().position(|x| !x.is_finite()) {
        panic!("rel_err: a[{i}] = {} is not finite", a[i]);
    }
    if let Some(i) = b.iter().position(|x| !x.is_finite()) {
        panic!("rel_err: b[{i}] = {} is not finite", b[i]);
    }
    let scale = b.iter().fold(0f64, |m, v| m.max(v.abs()));
    assert!(
        scale > 0.0,
        "rel_err: b is all zeros ({} values), the relative error is undefined",
        b.len()
    );
    let diff = a
        .iter()
        .zip(b)
        .fold(0f64, |m, (x, y)| m.max((*x as f64 - y).abs()));
    let e = diff / scale;
    assert!(e.is_finite(), "rel_err: {diff} / {scale} is not finite");
    e
}

#[cfg(test)]
mod tests {
    use super::rel_err;

    fn fails(a: &[f32], b: &[f64]) -> String {
        let p = std::panic::catch_unwind(|| rel_err(a, b)).expect_err("must not return");
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default()
    }

    #[test]
    fn nan_and_infinity_fail_on_either_side() {
        let b = [1.0f64, -2.0, 0.5];
        assert_eq!(rel_err(&[1.0, -2.0, 0.5], &b), 0.0);
        assert!((rel_err(&[1.0, -1.0, 0.5], &b) - 0.5).abs() < 1e-12);
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let e = fails(&[1.0, bad, 0.5], &b);
            assert!(e.contains("a[1]") && e.contains("not finite"), "{e}");
        }
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
            let e = fails(&[1.0, -2.0, 0.5], &[1.0, -2.0, bad]);
            assert!(e.contains("b[2]") && e.contains("not finite"), "{e}");
        }
        // NaN alone in the computed logits, where the old fold returned 0 for it.
        let e = fails(&[f32::NAN; 3], &b);
        assert!(e.contains("a[0]"), "{e}");
        // An all-zero reference has no relative error (0 / 0 was NaN).
        assert!(fails(&[0.0; 2], &[0.0; 2]).contains("all zeros"));
        // Finite inputs whose ratio overflows.
        assert!(fails(&[1e30], &[1e-300]).contains("not finite"));
    }
}
