//! The whole forward pass on CUDA against the CPU `Model`, and its speed.

use crate::common::*;
use grok_shared::backend::cuda::{Cuda, CudaBackend, CudaError, CudaKv};
use grok_shared::collective::SingleRank;
use grok_shared::config::ModelConfig;
use grok_shared::model::{Model, SeqInput, WantLogits};
use grok_shared::sampling::{sample, Rng, SamplingParams};
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

// ---------------------------------------------------------------------------------------------
// Model: the whole forward pass on CUDA against the CPU Model on the same checkpoint
// ---------------------------------------------------------------------------------------------

/// One sequence on the CUDA device through the one forward pass (`Model<Cuda>` over a paged
/// cache whose table is the first blocks in order): what the model checks drive.
pub(crate) struct OneSeq {
    m: Model<Cuda>,
    kv: CudaKv,
    table: Vec<u32>,
    /// Whether f32 checkpoint weights were converted to bf16 on upload.
    pub(crate) converted_f32: bool,
    pub(crate) weight_bytes: usize,
    pub(crate) active_bytes_per_token: f64,
}

impl OneSeq {
    /// The whole model of `ckpt` on the device, with room for `max_len` positions.
    pub(crate) fn load(
        be: std::sync::Arc<CudaBackend>,
        ckpt: &grok_shared::formats::checkpoint::Checkpoint,
        max_len: usize,
    ) -> Result<Self, CudaError> {
        let cpu = Model::load(ckpt).map_err(|e| io_err("load the model", e))?;
        let active = cpu.active_weight_bytes_per_token();
        let (m, conv) = Model::upload(cpu, Cuda::new(be)).map_err(|e| io_err("upload", e))?;
        let blocks = max_len.div_ceil(16).max(1);
        let kv = CudaKv::new(&m, blocks, 16).map_err(|e| io_err("device cache", e))?;
        Ok(OneSeq {
            weight_bytes: m.device_weight_bytes(),
            m,
            kv,
            table: (0..blocks as u32).collect(),
            converted_f32: conv,
            active_bytes_per_token: active,
        })
    }

    /// Runs `tokens` at `start..`: the logits of every token (`all`) or of the last one.
    pub(crate) fn forward(
        &mut self,
        tokens: &[u32],
        start: usize,
        all: bool,
    ) -> Result<Vec<f32>, CudaError> {
        let seq = SeqInput {
            tokens,
            start_pos: start,
            block_table: &self.table,
            want: if all {
                WantLogits::All
            } else {
                WantLogits::Last
            },
        };
        self.m
            .forward(&[seq], &mut self.kv, &SingleRank)
            .map_err(|e| io_err("device forward", e))
    }

    /// Prefill, then sample `max_new` tokens with the CPU generator's per-position streams.
    pub(crate) fn generate(
        &mut self,
        prompt: &[u32],
        max_new: usize,
        params: &SamplingParams,
    ) -> Result<Vec<u32>, CudaError> {
        let mut row = self.forward(prompt, 0, false)?;
        let mut pos = prompt.len();
        let mut ids = Vec::new();
        while ids.len() < max_new {
            let mut rng = Rng::for_token(params.seed, pos);
            let s = sample(&row, params, &mut rng);
            ids.push(s.id);
            if ids.len() == max_new || pos + 1 >= self.table.len() * 16 {
                break;
            }
            row = self.forward(&[s.id], pos, false)?;
            pos += 1;
        }
        Ok(ids)
    }
}

/// A fresh temporary folder (removed by the caller).
pub(crate) fn temp_model_dir(label: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "grok-gpu-check-{label}-{}-{}",
        std::process::id(),
        Instant::now().elapsed().as_nanos()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

pub(crate) fn io_err(op: &str, e: impl std::fmt::Display) -> CudaError {
    CudaError::Invalid {
        op: op.into(),
        message: e.to_string(),
    }
}

/// Tiny8's structure (8 experts, top-2, GQA) at widths the GEMV takes: input dims multiples
/// of 64, and of 8 × 64 where the int8 layout keeps 8 scale blocks (attention output, linear_1).
pub(crate) fn model_test_config() -> ModelConfig {
    let mut c = ModelConfig::preset("tiny8", None).expect("tiny8 preset");
    c.vocab_size = 512;
    c.emb_size = 128;
    c.ffn_size = 512;
    c.num_layers = 2;
    c.num_q_heads = 8;
    c.num_kv_heads = 2;
    c.key_size = 64;
    c.attn_output_multiplier = 1.0 / (c.key_size as f64).sqrt();
    c.embedding_multiplier_scale = (c.emb_size as f64).sqrt();
    c
}

/// Per position: max|Δ| / max|ref| over the vocabulary.
pub(crate) fn per_row_rel(got: &[f32], want: &[f32], vocab: usize) -> Vec<f64> {
    got.chunks(vocab)
        .zip(want.chunks(vocab))
        .map(|(g, w)| {
            let scale = w.iter().fold(0f64, |m, &v| m.max((v as f64).abs()));
            let d = g
                .iter()
                .zip(w)
                .fold(0f64, |m, (&a, &b)| m.max((a as f64 - b as f64).abs()));
            if g.iter().any(|v| !v.is_finite()) {
                f64::INFINITY
            } else {
                d / scale.max(1e-30)
            }
        })
        .collect()
}

pub(crate) fn top2_margin(row: &[f32]) -> f32 {
    let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
    for &v in row {
        if v > a {
            b = a;
            a = v;
        } else if v > b {
            b = v;
        }
    }
    a - b
}

pub(crate) fn model_check(
    be: &std::sync::Arc<CudaBackend>,
    args: &Args,
    rep: &mut Report,
) -> Result<(), CudaError> {
    use grok_shared::formats::genmodel::{self, GenDType};
    use grok_shared::model::{BlockAllocator, KvCache};
    let c = model_test_config();
    let vocab = c.vocab_size;
    // A prompt that starts with the pad id (position 0 sees only masked keys: the uniform
    // case) and holds another pad in the middle.
    let mut r = Rng::new(seed_of(args.seed, "model prompt"));
    let mut prompt: Vec<u32> = (0..21)
        .map(|_| 1 + (r.next_u64() % (vocab as u64 - 1)) as u32)
        .collect();
    prompt[0] = 0;
    prompt[7] = 0;
    let steps = 8;
    let mut results = Vec::new();
    for (dt, name) in [
        (GenDType::Bf16, "bf16"),
        (GenDType::Int8, "int8"),
        (GenDType::F32, "f32"),
    ] {
        let dir = temp_model_dir(name);
        genmodel::generate(&c, dt, seed_of(args.seed, name), &dir, 1 << 30, |_, _| {})
            .map_err(|e| io_err("generate the test model", e))?;
        let ckpt = grok_shared::formats::checkpoint::Checkpoint::open(&dir)
            .map_err(|e| io_err("open the test model", e))?;
        // CPU reference: greedy ids, then one pass over prompt + ids with every logit.
        let cpu = Model::load(&ckpt).map_err(|e| io_err("load the CPU model", e))?;
        let opts = grok_shared::generate::GenerateOptions {
            max_new_tokens: steps,
            stop_at_eos: false,
            ..Default::default()
        };
        let out = grok_shared::generate::generate(&cpu, &prompt, &opts, |_| {})
            .map_err(|e| io_err("CPU generate", e))?;
        // The same passes as the CUDA side (the all-masked case is uniform over the keys of
        // the PASS, so the pass structure must match): the prompt with every logit, then one
        // pass per decoded token.
        let total = prompt.len() + steps;
        let mut kv = KvCache::new(&cpu, total.div_ceil(16), 16);
        let mut alloc = BlockAllocator::new(total.div_ceil(16));
        let mut table = Vec::new();
        alloc
            .ensure(&mut table, total, 16)
            .map_err(|e| io_err("kv", e))?;
        let mut ref_logits = Vec::new();
        let mut pos = 0;
        let mut passes: Vec<&[u32]> = vec![&prompt];
        passes.extend(out.ids[..steps - 1].iter().map(std::slice::from_ref));
        for toks in passes {
            let want = if pos == 0 {
                WantLogits::All
            } else {
                WantLogits::Last
            };
            ref_logits.extend(
                cpu.forward(
                    &[SeqInput {
                        tokens: toks,
                        start_pos: pos,
                        block_table: &table,
                        want,
                    }],
                    &mut kv,
                    &SingleRank,
                )
                .map_err(|e| io_err("CPU forward", e))?,
            );
            pos += toks.len();
        }
        drop(cpu);
        // CUDA: prefill with all logits, then decode the CPU's ids one by one.
        let mut gm = OneSeq::load(std::sync::Arc::clone(be), &ckpt, 64)?;
        let mut got = gm.forward(&prompt, 0, true)?;
        for (i, &id) in out.ids[..steps - 1].iter().enumerate() {
            got.extend(gm.forward(&[id], prompt.len() + i, false)?);
        }
        be.synchronize("model forward")?;
        let want = &ref_logits[..got.len()];
        let rel = per_row_rel(&got, want, vocab);
        let worst_prefill = rel[..prompt.len()].iter().copied().fold(0f64, f64::max);
        let worst_decode = rel[prompt.len()..].iter().copied().fold(0f64, f64::max);
        let cmp = Cmp::new(&got, &to_f64(want));
        // f32 checkpoints: the CPU keeps f32 weights, CUDA rounds them to bf16 on upload, so
        // the two run different models (a near-tie of the router can flip an expert and move a
        // whole row): reported, never failed (tolerance 1 = anything finite).
        let tol = if name == "f32" { 1.0 } else { TOL_MODEL };
        rep.check(
            "model",
            &format!(
                "{name} logits: prefill {} + decode {}{}",
                prompt.len(),
                steps - 1,
                if name == "f32" {
                    " (f32->bf16: info)"
                } else {
                    ""
                }
            ),
            cmp,
            tol,
            json!({"per_position_rel": rel.iter().map(|&v| finite_or_null(v)).collect::<Vec<_>>(),
                   "worst_prefill_rel": finite_or_null(worst_prefill),
                   "worst_decode_rel": finite_or_null(worst_decode),
                   "converted_f32_to_bf16": gm.converted_f32}),
        );
        // A 100-token prompt: projections in passes of 64 + 36 rows.
        let long: Vec<u32> = (0..100)
            .map(|i| {
                if i % 17 == 5 {
                    0
                } else {
                    1 + (r.next_u64() % (vocab as u64 - 1)) as u32
                }
            })
            .collect();
        {
            let cpu = Model::load(&ckpt).map_err(|e| io_err("load the CPU model", e))?;
            let mut kv = KvCache::new(&cpu, 7, 16);
            let table: Vec<u32> = (0..7).collect();
            let want = cpu
                .forward(
                    &[SeqInput {
                        tokens: &long,
                        start_pos: 0,
                        block_table: &table,
                        want: WantLogits::All,
                    }],
                    &mut kv,
                    &SingleRank,
                )
                .map_err(|e| io_err("CPU forward", e))?;
            let mut gl = OneSeq::load(std::sync::Arc::clone(be), &ckpt, 128)?;
            let got = gl.forward(&long, 0, true)?;
            let rel = per_row_rel(&got, &want, vocab);
            rep.check(
                "model",
                &format!("{name} logits: prefill {} (pads every 17){}", long.len(), if name == "f32" { " (f32->bf16: info)" } else { "" }),
                Cmp::new(&got, &to_f64(&want)),
                tol,
                json!({"worst_position_rel": finite_or_null(rel.iter().copied().fold(0f64, f64::max))}),
            );
        }
        // Greedy generation on CUDA against the CPU's ids.
        let ids = gm.generate(&prompt, steps, &SamplingParams::default())?;
        let mut agree = 0;
        let mut clear_disagree = 0;
        let mut margins = Vec::new();
        for (i, (&a, &b)) in ids.iter().zip(&out.ids).enumerate() {
            let row = prompt.len() - 1 + i;
            let m = top2_margin(&ref_logits[row * vocab..(row + 1) * vocab]);
            margins.push(m);
            if a == b {
                agree += 1;
            } else {
                let scale = ref_logits[row * vocab..(row + 1) * vocab]
                    .iter()
                    .fold(0f32, |a, &v| a.max(v.abs()));
                if m > 1e-3 * scale {
                    clear_disagree += 1;
                }
            }
            if a != b {
                break; // later steps depend on the diverged token
            }
        }
        // A seeded sampled run must match too (same per-position random streams).
        let sp = SamplingParams {
            temperature: 0.8,
            top_p: 0.95,
            top_k: 40,
            seed: 7,
        };
        let cpu2 = Model::load(&ckpt).map_err(|e| io_err("load the CPU model", e))?;
        let opts2 = grok_shared::generate::GenerateOptions {
            max_new_tokens: steps,
            stop_at_eos: false,
            sampling: sp.clone(),
            ..Default::default()
        };
        let out2 = grok_shared::generate::generate(&cpu2, &prompt, &opts2, |_| {})
            .map_err(|e| io_err("CPU generate", e))?;
        drop(cpu2);
        let ids2 = gm.generate(&prompt, steps, &sp)?;
        let pass = clear_disagree == 0 || name == "f32";
        println!(
            "  [{}] model      {name} greedy: cuda {ids:?} cpu {:?} ({agree}/{steps} agree; top-2 margins {margins:?}); sampled t=0.8 seed 7: cuda {ids2:?} cpu {:?}",
            if pass { "ok" } else { "FAIL" },
            out.ids,
            out2.ids
        );
        if !pass {
            rep.failed = true;
        }
        results.push(
            json!({"dtype": name, "prompt": prompt, "greedy_cuda": ids, "greedy_cpu": out.ids,
                            "greedy_agree": agree, "top2_margins": margins,
                            "sampled_cuda": ids2, "sampled_cpu": out2.ids,
                            "sampled_equal": ids2 == out2.ids,
                            "worst_prefill_rel": finite_or_null(worst_prefill),
                            "worst_decode_rel": finite_or_null(worst_decode)}),
        );
        drop(gm);
        let _ = std::fs::remove_dir_all(&dir);
    }
    rep.top.insert("model".into(), json!({"config": {"vocab": c.vocab_size, "emb": c.emb_size,
        "ffn": c.ffn_size, "layers": c.num_layers, "q_heads": c.num_q_heads, "kv_heads": c.num_kv_heads,
        "key_size": c.key_size, "experts": c.num_experts}, "results": results}));
    Ok(())
}

pub(crate) fn model_perf(
    be: &std::sync::Arc<CudaBackend>,
    args: &Args,
    rep: &mut Report,
) -> Result<(), CudaError> {
    use grok_shared::formats::genmodel::{self, GenDType};
    let layers = 1;
    let c = ModelConfig::preset("grok-1", Some(layers)).expect("grok-1 preset");
    let copy_gbps = match rep.copy_gbps {
        Some(g) => g,
        None => {
            let bytes = 1usize << 30;
            let ms = be.copy_time_ms(bytes, 5)? as f64;
            2.0 * bytes as f64 / (ms * 1e-3) / 1e9
        }
    };
    let name = be.info().name.clone();
    // Dense bf16 tensor-core peak (no sparsity), TFLOP/s.
    let peak_tflops = if name.contains("H100") || name.contains("H200") {
        Some(989.0)
    } else {
        None
    };
    let mut rows = Vec::new();
    let dtypes: &[(GenDType, &str)] = if args.quick {
        &[(GenDType::Bf16, "bf16")]
    } else {
        &[(GenDType::Bf16, "bf16"), (GenDType::Int8, "int8")]
    };
    for &(dt, dname) in dtypes {
        let dir = temp_model_dir(dname);
        let t0 = Instant::now();
        genmodel::generate(&c, dt, seed_of(args.seed, dname), &dir, 4 << 30, |_, _| {})
            .map_err(|e| io_err("generate the grok-1 model", e))?;
        let gen_s = t0.elapsed().as_secs_f64();
        let ckpt = grok_shared::formats::checkpoint::Checkpoint::open(&dir)
            .map_err(|e| io_err("open the grok-1 model", e))?;
        let t1 = Instant::now();
        let mut gm = OneSeq::load(std::sync::Arc::clone(be), &ckpt, 1024)?;
        be.synchronize("upload")?;
        let load_s = t1.elapsed().as_secs_f64();
        drop(ckpt);
        let _ = std::fs::remove_dir_all(&dir);
        let mut r = Rng::new(seed_of(args.seed, "perf prompt"));
        let prompt: Vec<u32> = (0..640)
            .map(|_| 1 + (r.next_u64() % (c.vocab_size as u64 - 1)) as u32)
            .collect();
        // Decode at batch 1 after a prefill of 128 tokens.
        gm.forward(&prompt[..128], 0, false)?;
        let mut times = Vec::new();
        for i in 0..(args.reps.max(5)) {
            let t = Instant::now();
            gm.forward(&[prompt[128 + i]], 128 + i, false)?;
            times.push(t.elapsed().as_secs_f64());
        }
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let decode_s = times[times.len() / 2];
        let active = gm.active_bytes_per_token;
        // DRAM roofline: the copy's bytes moved (read + write) per second.
        let roof_s = active / (copy_gbps * 1e9);
        // Prefill of 512 tokens.
        gm.forward(&prompt[..64], 0, false)?; // warm-up (positions are overwritten)
        let t = Instant::now();
        gm.forward(&prompt[..512], 0, false)?;
        let prefill_s = t.elapsed().as_secs_f64();
        // Matmul FLOPs: per token 2 per attention/router weight and per weight of the 2
        // selected experts; the logits of the last row only.
        let (d, f) = (c.emb_size as f64, c.ffn_size as f64);
        let (qs, kvs) = (c.q_size() as f64, c.kv_size() as f64);
        let per_layer = d * (qs + 2.0 * kvs)
            + qs * d
            + c.num_experts as f64 * d
            + c.num_selected_experts as f64 * 3.0 * d * f;
        let flops = 2.0 * per_layer * layers as f64 * 512.0 + 2.0 * c.vocab_size as f64 * d;
        let tflops = flops / prefill_s / 1e12;
        println!(
            "  grok-1 x{layers} layer {dname}: gen {gen_s:.1} s, upload {load_s:.1} s ({}); decode b=1 after 128: {:.3} ms/token = {:.0}% of the copy roofline ({:.3} ms for {:.2} GB active at the copy's {:.0} GB/s); prefill 512: {:.1} ms = {:.0} tok/s, {tflops:.1} TFLOP/s{}",
            fmt_bytes(gm.weight_bytes),
            decode_s * 1e3,
            100.0 * roof_s / decode_s,
            roof_s * 1e3,
            active / 1e9,
            copy_gbps,
            prefill_s * 1e3,
            512.0 / prefill_s,
            peak_tflops.map_or(String::new(), |p| format!(" = {:.1}% of the {p:.0} TFLOP/s bf16 peak", 100.0 * tflops / p))
        );
        rows.push(
            json!({"dtype": dname, "layers": layers, "gen_model_s": gen_s, "upload_s": load_s,
            "weight_bytes": gm.weight_bytes, "active_bytes_per_token": active,
            "decode_batch": 1, "decode_after": 128, "decode_ms_median": decode_s * 1e3,
            "decode_roofline_ms": roof_s * 1e3, "decode_frac_of_roofline": roof_s / decode_s,
            "prefill_tokens": 512, "prefill_ms": prefill_s * 1e3, "prefill_tflops": tflops,
            "prefill_frac_of_peak": peak_tflops.map(|p| tflops / p),
            "copy_gbps_read_plus_write": copy_gbps}),
        );
    }
    rep.top.insert("model_perf".into(), json!({"note": "batch 1 (one sequence through the one forward pass on the device); prefill through the tensor-core GEMV in passes of 64 rows (weights re-read per pass), not a GEMM",
        "rows": rows}));
    Ok(())
}
