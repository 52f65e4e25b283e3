//! The small kernels against the CPU backend: RMSNorm, RoPE, GELU gate, router, attention.

use crate::common::*;
use grok_shared::backend::cpu;
use grok_shared::backend::cuda::{CudaBackend, CudaError};
use grok_shared::config::ModelConfig;
use rayon::prelude::*;
use serde_json::json;

// ---------------------------------------------------------------------------------------------
// Small kernels
// ---------------------------------------------------------------------------------------------

pub(crate) fn rms_norm_check(
    be: &CudaBackend,
    args: &Args,
    rep: &mut Report,
) -> Result<(), CudaError> {
    let d = 6144;
    for rows in [1usize, 8, 64] {
        let s = seed_of(args.seed, &format!("rms {rows}"));
        let mut x = rand_f32(rows * d, s, -1.0, 1.0);
        // Rows of very different magnitudes (1e-3 .. 1e3).
        for r in 0..rows {
            let f = 10f32.powi((r % 7) as i32 - 3);
            for v in &mut x[r * d..(r + 1) * d] {
                *v *= f;
            }
        }
        let gain = rand_f32(d, s ^ 3, 0.5, 1.5);
        let mut want = vec![0f32; rows * d];
        cpu::rms_norm(&x, &gain, 1e-5, &mut want);
        let xd = be.upload("x", &x)?;
        let gd = be.upload("gain", &gain)?;
        let mut od = be.zeros::<f32>("out", rows * d)?;
        be.rms_norm(&xd, &gd, 1e-5, rows, &mut od)?;
        be.synchronize("rms_norm_f32")?;
        let got = be.download("out", &od)?;
        // Per-row relative error (rows differ by 1e6 in scale): normalise each row.
        let mut worst = Cmp::new(&[], &[]);
        for r in 0..rows {
            let c = Cmp::new(&got[r * d..(r + 1) * d], &to_f64(&want[r * d..(r + 1) * d]));
            if c.rel >= worst.rel || c.nonfinite > 0 {
                worst = Cmp {
                    worst: r * d + c.worst,
                    nonfinite: worst.nonfinite + c.nonfinite,
                    ..c
                };
            }
        }
        rep.check(
            "rms_norm",
            &format!("rows={rows} d={d} (worst row)"),
            worst,
            TOL_ELEMENTWISE,
            json!({"rows": rows, "d": d}),
        );
    }
    Ok(())
}

pub(crate) fn rope_check(be: &CudaBackend, args: &Args, rep: &mut Report) -> Result<(), CudaError> {
    let ks = 128;
    let positions: Vec<usize> = vec![0, 1, 2, 17, 1000, 4095, 8191];
    let t = positions.len();
    for heads in [48usize, 8] {
        let s = seed_of(args.seed, &format!("rope {heads}"));
        let x = rand_f32(t * heads * ks, s, -2.0, 2.0);
        let mut want = x.clone();
        cpu::rope(&mut want, heads, ks, &positions, 10000.0);
        let mut xd = be.upload("x", &x)?;
        let pos: Vec<i32> = positions.iter().map(|&p| p as i32).collect();
        let pd = be.upload("positions", &pos)?;
        be.rope(&mut xd, t, heads, ks, &pd, 10000.0)?;
        be.synchronize("rope_f32")?;
        let got = be.download("x", &xd)?;
        rep.check(
            "rope",
            &format!("t={t} heads={heads} ks={ks} pos 0..8191"),
            Cmp::new(&got, &to_f64(&want)),
            TOL_ELEMENTWISE,
            json!({"positions": positions, "heads": heads}),
        );
    }
    Ok(())
}

pub(crate) fn gelu_check(be: &CudaBackend, args: &Args, rep: &mut Report) -> Result<(), CudaError> {
    let n = 8 * 32768 + 3;
    let s = seed_of(args.seed, "gelu");
    let a = rand_f32(n, s, -6.0, 6.0);
    let b = rand_f32(n, s ^ 5, -2.0, 2.0);
    let want: Vec<f64> = a
        .iter()
        .zip(&b)
        .map(|(&x, &y)| (cpu::gelu_tanh(x) * y) as f64)
        .collect();
    let ad = be.upload("a", &a)?;
    let bd = be.upload("b", &b)?;
    let mut od = be.zeros::<f32>("out", n)?;
    be.gelu_gate(&ad, &bd, &mut od, n)?;
    be.synchronize("gelu_gate_f32")?;
    let got = be.download("out", &od)?;
    rep.check(
        "gelu",
        &format!("n={n} a in [-6, 6]"),
        Cmp::new(&got, &want),
        TOL_ELEMENTWISE,
        json!({"n": n}),
    );
    Ok(())
}

/// The model's own routing (`Model::route`: the CPU device's `route`).
pub(crate) fn cpu_route(router: &[f32], xn: &[f32]) -> Vec<Vec<(usize, f32)>> {
    use grok_shared::model::Device;
    let c = ModelConfig::grok1();
    grok_shared::model::Cpu
        .route(
            &router.to_vec(),
            &xn.to_vec(),
            c.num_experts,
            c.num_selected_experts,
            c.emb_size,
        )
        .expect("the CPU router does not fail")
}

pub(crate) fn router_check(
    be: &CudaBackend,
    args: &Args,
    rep: &mut Report,
) -> Result<(), CudaError> {
    let config = ModelConfig::grok1();
    let (d, ne, k) = (
        config.emb_size,
        config.num_experts,
        config.num_selected_experts,
    );
    let rows = 64;
    let s = seed_of(args.seed, "router");
    let x = rand_f32(rows * d, s, -1.0, 1.0);
    let random_w = rand_f32(ne * d, s ^ 11, -0.05, 0.05);
    // Ties: every expert with the same weights -> equal probabilities -> experts 0 and 1.
    let tied_w: Vec<f32> = (0..ne).flat_map(|_| random_w[..d].to_vec()).collect();
    for (label, w) in [("random router", &random_w), ("all experts tied", &tied_w)] {
        let want = cpu_route(w, &x);
        let xd = be.upload("x", &x)?;
        let wd = be.upload("router", w)?;
        let mut gd = be.zeros::<f32>("gates", rows * k)?;
        let mut ed = be.zeros::<i32>("experts", rows * k)?;
        let mut pd = be.zeros::<f32>("probs", rows * ne)?;
        be.router_topk(&xd, &wd, rows, d, ne, k, &mut gd, &mut ed, &mut pd)?;
        be.synchronize("router_topk_f32")?;
        let gates = be.download("gates", &gd)?;
        let experts = be.download("experts", &ed)?;
        let probs = be.download("probs", &pd)?;
        // Reference probabilities (the CPU returns the top-k only): f64 softmax.
        let mut want_probs = Vec::with_capacity(rows * ne);
        for r in 0..rows {
            let logits: Vec<f64> = (0..ne)
                .map(|e| {
                    (0..d)
                        .map(|i| w[e * d + i] as f64 * x[r * d + i] as f64)
                        .sum()
                })
                .collect();
            let mx = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let ex: Vec<f64> = logits.iter().map(|l| (l - mx).exp()).collect();
            let sum: f64 = ex.iter().sum();
            want_probs.extend(ex.iter().map(|e| e / sum));
        }
        let mut mismatches = 0;
        let mut near_ties = 0;
        let mut want_gates = Vec::new();
        for r in 0..rows {
            for j in 0..k {
                let (we, wg) = want[r][j];
                want_gates.push(wg as f64);
                let ge = experts[r * k + j];
                if ge as usize != we {
                    let pe = want_probs
                        .get(r * ne + ge.max(0) as usize)
                        .copied()
                        .unwrap_or(-1.0);
                    if (pe - wg as f64).abs() <= 1e-6 {
                        near_ties += 1;
                    } else {
                        mismatches += 1;
                        if mismatches <= 5 {
                            println!("  router {label}: row {r} choice {j}: gpu expert {ge}, cpu expert {we}");
                        }
                    }
                }
            }
        }
        let mut cmp = Cmp::new(&gates, &want_gates);
        let pcmp = Cmp::new(&probs, &want_probs);
        if pcmp.rel > cmp.rel || pcmp.nonfinite > 0 {
            cmp = Cmp {
                nonfinite: cmp.nonfinite + pcmp.nonfinite,
                ..pcmp
            };
        }
        if mismatches > 0 {
            cmp.rel = f64::INFINITY;
        }
        rep.check(
            "router",
            &format!("{label}: {rows} rows, top-{k} of {ne}"),
            cmp,
            TOL_ROUTER,
            json!({"rows": rows, "expert_mismatches": mismatches, "near_tie_swaps": near_ties,
                   "first_row_gpu": &experts[..k], "first_row_cpu": want[0].iter().map(|p| p.0).collect::<Vec<_>>()}),
        );
    }
    Ok(())
}

/// Decode attention in f64 (the reference): one query token against `len` cached keys.
pub(crate) fn attention_ref(
    q: &[f32],
    kc: &[f32],
    vc: &[f32],
    len: usize,
    nq: usize,
    nkv: usize,
    hd: usize,
    mult: f64,
    cap: f64,
) -> Vec<f64> {
    let g = nq / nkv;
    (0..nq)
        .into_par_iter()
        .flat_map_iter(|h| {
            let kvh = h / g;
            let qv = &q[h * hd..(h + 1) * hd];
            let s: Vec<f64> = (0..len)
                .map(|u| {
                    let k = &kc[(u * nkv + kvh) * hd..(u * nkv + kvh + 1) * hd];
                    let dot: f64 = qv.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let z = dot * mult;
                    if cap > 0.0 {
                        cap * (z / cap).tanh()
                    } else {
                        z
                    }
                })
                .collect();
            let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let p: Vec<f64> = s.iter().map(|v| (v - mx).exp()).collect();
            let sum: f64 = p.iter().sum();
            let mut o = vec![0f64; hd];
            for u in 0..len {
                let v = &vc[(u * nkv + kvh) * hd..(u * nkv + kvh + 1) * hd];
                for (a, &b) in o.iter_mut().zip(v) {
                    *a += p[u] / sum * b as f64;
                }
            }
            o
        })
        .collect()
}

pub(crate) fn attention_check(
    be: &CudaBackend,
    args: &Args,
    rep: &mut Report,
) -> Result<(), CudaError> {
    let config = ModelConfig::grok1();
    let (nq, nkv, hd) = (config.num_q_heads, config.num_kv_heads, config.key_size);
    let mult = config.attn_output_multiplier;
    let cap = config.max_attn_value;
    let lens: &[usize] = if args.quick {
        &[1, 100, 2048]
    } else {
        &[1, 7, 100, 3000, 8192]
    };
    for &len in lens {
        for (qscale, what) in [(1.0f32, "logits small"), (20.0, "logits past the cap")] {
            let s = seed_of(args.seed, &format!("attn {len} {qscale}"));
            let q = rand_f32(nq * hd, s, -qscale, qscale);
            let kc = rand_f32(len * nkv * hd, s ^ 1, -4.0, 4.0);
            let vc = rand_f32(len * nkv * hd, s ^ 2, -1.0, 1.0);
            let want = attention_ref(&q, &kc, &vc, len, nq, nkv, hd, mult, cap);
            let qd = be.upload("q", &q)?;
            let kd = be.upload("k cache", &kc)?;
            let vd = be.upload("v cache", &vc)?;
            let mut od = be.zeros::<f32>("out", nq * hd)?;
            be.attention_decode(
                &qd,
                &kd,
                &vd,
                len,
                nq,
                nkv,
                hd,
                mult as f32,
                cap as f32,
                &mut od,
            )?;
            be.synchronize("attn_decode_f32")?;
            let got = be.download("out", &od)?;
            rep.check(
                "attention",
                &format!("len={len} {nq}q/{nkv}kv x{hd}, {what}"),
                Cmp::new(&got, &want),
                TOL_ATTENTION,
                json!({"len": len, "q_scale": qscale, "mult": mult, "cap": cap}),
            );
        }
    }
    Ok(())
}
