//! Group `gemm`: the cuBLAS path of a linear layer (`CudaBackend::linear_gemm`, taken by passes
//! of at least `--gemm-min-rows` rows) against an f64 reference on the same weights, in both
//! precisions, with the default chunking and with small chunks; then its time against the
//! tensor-core GEMV (`linear_rows`) by row count at Grok-1's expert shapes, and the crossover:
//! the fewest rows from which cuBLAS is faster (what `--gemm-min-rows` should be on this card).

use crate::bench::median;
use crate::common::*;
use grok_shared::backend::cpu::{Linear, Weights};
use grok_shared::backend::cuda::{
    shapes, CudaBackend, CudaError, DeviceLinear, GemmPrecision, GemmWorkspace,
};
use grok_shared::formats::checkpoint::Buf;
use serde_json::{json, Value};
use std::sync::Arc;

/// Activations rounded to bf16 (2^-9 relative) against f64 on f32 activations.
const TOL_GEMM_BF16: f64 = 1e-2;

fn weights(out: usize, in_: usize, nb: Option<usize>, seed: u64) -> Linear {
    let n = out * in_;
    let w = match nb {
        None => Weights::Bf16(Buf::owned(par_fill(n, seed, |r| {
            half::bf16::from_f32(uniform(r, -0.05, 0.05)).to_bits()
        }))),
        Some(nb) => Weights::I8 {
            w: Buf::owned(par_fill(n, seed, |r| (r.next_u64() >> 56) as u8 as i8)),
            scales: Arc::new(rand_f32(nb * out, seed ^ 1, 0.5e-3, 2e-3)),
            nb,
        },
    };
    Linear::new(out, in_, w)
}

/// `x · Wᵀ` in f64 on the dequantised weights.
fn reference(lin: &Linear, x: &[f32], m: usize) -> Vec<f64> {
    let (out, k) = (lin.out_features, lin.in_features);
    let mut w = vec![0f32; k];
    let mut y = vec![0f64; m * out];
    for o in 0..out {
        lin.row_f32(o, &mut w);
        for r in 0..m {
            let xr = &x[r * k..(r + 1) * k];
            y[r * out + o] = xr.iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum();
        }
    }
    y
}

#[allow(clippy::too_many_arguments)]
fn run_gemm(
    be: &CudaBackend,
    blas: &grok_shared::backend::cuda::CudaBlas,
    ws: &mut GemmWorkspace,
    prec: GemmPrecision,
    plan: Option<shapes::GemmPlan>,
    dev: &DeviceLinear,
    xd: &grok_shared::backend::cuda::CudaSlice<f32>,
    m: usize,
    yd: &mut grok_shared::backend::cuda::CudaSlice<f32>,
) -> Result<(), CudaError> {
    let plan = match plan {
        Some(p) => {
            ws.reserve_plan(be, dev, prec, p)?;
            p
        }
        None => ws.reserve(be, dev, m, prec)?,
    };
    be.linear_gemm(blas, ws, prec, plan, dev, xd, m, yd)
}

pub(crate) fn gemm_check(be: &CudaBackend, args: &Args, rep: &mut Report) -> Result<(), CudaError> {
    let blas = be.cublas()?;
    let mut ws = GemmWorkspace::default();
    // Correctness: (out, in, int8 scale blocks).
    let cases: &[(usize, usize, Option<usize>)] = &[
        (1000, 640, None),
        (1000, 640, Some(5)),
        (384, 1024, Some(8)),
        (40, 192, None),
    ];
    let small = shapes::GemmPlan {
        rows: 37,
        out_rows: 100,
    };
    for &(out, in_, nb) in cases {
        let label = format!(
            "{} [{out}x{in_}]{}",
            if nb.is_some() { "int8" } else { "bf16" },
            nb.map_or(String::new(), |n| format!(" nb={n}"))
        );
        let lin = weights(out, in_, nb, seed_of(args.seed, &format!("gemm {label}")));
        let dev = be.upload_linear(&label, &lin)?;
        for m in [1usize, 65, 300] {
            let x = rand_f32(
                m * in_,
                seed_of(args.seed, &format!("gemm x {label} {m}")),
                -1.0,
                1.0,
            );
            let want = reference(&lin, &x, m);
            let xd = be.upload("gemm x", &x)?;
            for prec in [GemmPrecision::Split, GemmPrecision::Bf16] {
                for (plan, pname) in [
                    (None, "default chunks"),
                    (Some(small), "chunks of 37 rows x 100 outputs"),
                ] {
                    let mut yd = be.zeros::<f32>("gemm y", m * out)?;
                    run_gemm(be, &blas, &mut ws, prec, plan, &dev, &xd, m, &mut yd)?;
                    be.synchronize("linear_gemm")?;
                    let got = be.download("gemm y", &yd)?;
                    let tol = match prec {
                        GemmPrecision::Split => TOL_GEMV,
                        GemmPrecision::Bf16 => TOL_GEMM_BF16,
                    };
                    rep.check(
                        "gemm",
                        &format!("{label} m={m} {} ({pname})", prec.name()),
                        Cmp::new(&got, &want),
                        tol,
                        json!({"out": out, "in": in_, "nb": nb, "m": m, "precision": prec.name()}),
                    );
                }
            }
        }
    }
    // Time against the GEMV at Grok-1's expert shapes.
    let reps = args.reps.max(1);
    let ms: &[usize] = if args.quick {
        &[16, 64, 512]
    } else {
        &[8, 16, 32, 64, 128, 256, 512, 2048]
    };
    let events: Vec<_> = (0..2 * reps)
        .map(|_| be.timing_event())
        .collect::<Result<_, _>>()?;
    let mut rows: Vec<Value> = Vec::new();
    let mut crossover = serde_json::Map::new();
    for &(out, in_, nb) in &[(32768usize, 6144usize, None), (6144, 32768, Some(8usize))] {
        let label = format!(
            "{} [{out}x{in_}]{}",
            if nb.is_some() { "int8" } else { "bf16" },
            nb.map_or(String::new(), |n| format!(" nb={n}"))
        );
        let lin = weights(
            out,
            in_,
            nb,
            seed_of(args.seed, &format!("gemm bench {label}")),
        );
        let dev = be.upload_linear(&label, &lin)?;
        drop(lin);
        let mut first_faster: Option<usize> = None;
        for &m in ms {
            let x = rand_f32(
                m * in_,
                seed_of(args.seed, &format!("gemm bench x {m}")),
                -1.0,
                1.0,
            );
            let xd = be.upload("gemm x", &x)?;
            let mut yd = be.zeros::<f32>("gemm y", m * out)?;
            let time = |f: &mut dyn FnMut() -> Result<(), CudaError>| -> Result<f64, CudaError> {
                for _ in 0..2 {
                    f()?;
                }
                be.synchronize("warm-up")?;
                for r in 0..reps {
                    be.record(&events[2 * r])?;
                    f()?;
                    be.record(&events[2 * r + 1])?;
                }
                be.synchronize("timed runs")?;
                let mut us: Vec<f64> = (0..reps)
                    .map(|r| {
                        be.elapsed_ms(&events[2 * r], &events[2 * r + 1])
                            .map(|t| t as f64 * 1e3)
                    })
                    .collect::<Result<_, _>>()?;
                Ok(median(&mut us))
            };
            let gemv = time(&mut || be.linear_rows(&dev, &xd, m, &mut yd))?;
            let split = time(&mut || {
                run_gemm(
                    be,
                    &blas,
                    &mut ws,
                    GemmPrecision::Split,
                    None,
                    &dev,
                    &xd,
                    m,
                    &mut yd,
                )
            })?;
            let bf = time(&mut || {
                run_gemm(
                    be,
                    &blas,
                    &mut ws,
                    GemmPrecision::Bf16,
                    None,
                    &dev,
                    &xd,
                    m,
                    &mut yd,
                )
            })?;
            let flop = 2.0 * (m * out * in_) as f64;
            let tf = |us: f64| flop / (us * 1e-6) / 1e12;
            println!(
                "  {label} m={m}: GEMV {gemv:.1} us ({:.0} TFLOP/s), cuBLAS split {split:.1} us ({:.0}), bf16 {bf:.1} us ({:.0})",
                tf(gemv),
                tf(split),
                tf(bf)
            );
            if first_faster.is_none() && split < gemv {
                first_faster = Some(m);
            }
            rows.push(
                json!({"label": label, "out": out, "in": in_, "nb": nb, "m": m,
                "gemv_us": gemv, "gemm_split_us": split, "gemm_bf16_us": bf,
                "gemv_tflops": tf(gemv), "gemm_split_tflops": tf(split), "gemm_bf16_tflops": tf(bf),
                "reps": reps}),
            );
        }
        crossover.insert(label, json!(first_faster));
    }
    println!(
        "  fewest rows from which cuBLAS (split) beats the GEMV: {}",
        Value::Object(crossover.clone())
    );
    rep.top.insert(
        "gemm".into(),
        json!({"default_min_rows": shapes::DEFAULT_GEMM_MIN_ROWS,
               "default_min_rows_int8": shapes::DEFAULT_GEMM_MIN_ROWS_INT8, "times": rows,
               "split_faster_from_rows": crossover,
               "workspace_bytes": ws.bytes()}),
    );
    Ok(())
}

/// Group `grouped`: the grouped GEMV of the MoE with its routing on the device
/// (`CudaBackend::gemv_grouped`, one launch for all of a layer's experts) against the plain
/// tensor-core GEMV (`linear_rows`) of each expert on its own rows: bit for bit, for pass sizes
/// on both sides of each 8-row tile, with slots of uneven counts (one empty), and rows past a
/// slot's count left as they were.
pub(crate) fn grouped_check(
    be: &CudaBackend,
    args: &Args,
    rep: &mut Report,
) -> Result<(), CudaError> {
    let (out, in_) = (384usize, 512usize);
    let ids = [0i32, 2, 5];
    let ne = 6usize;
    for nb in [None, Some(8usize)] {
        let label = if nb.is_some() { "int8 nb=8" } else { "bf16" };
        let lins: Vec<Linear> = ids
            .iter()
            .map(|&e| {
                weights(
                    out,
                    in_,
                    nb,
                    seed_of(args.seed, &format!("grouped {label} {e}")),
                )
            })
            .collect();
        let devs: Vec<DeviceLinear> = lins
            .iter()
            .map(|l| be.upload_linear(label, l))
            .collect::<Result<_, _>>()?;
        let refs: Vec<&DeviceLinear> = devs.iter().collect();
        let gl = be.group_linears(&refs)?;
        let ids_d = be.upload("slot experts", &ids)?;
        for t in [1usize, 8, 9, 15, 17, 63, 64] {
            let per_slot = [t, t.div_ceil(2), 0];
            let mut counts = vec![0i32; ne];
            for (s, &e) in ids.iter().enumerate() {
                counts[e as usize] = per_slot[s] as i32;
            }
            let counts_d = be.upload("slot counts", &counts)?;
            let x = rand_f32(
                ids.len() * t * in_,
                seed_of(args.seed, &format!("grouped x {t}")),
                -1.0,
                1.0,
            );
            let xd = be.upload("grouped x", &x)?;
            let mut yd = be.zeros::<f32>("grouped y", ids.len() * t * out)?;
            be.gemv_grouped(&gl, &ids_d, &counts_d, ids.len(), t, &xd, &mut yd)?;
            be.synchronize("gemv_grouped")?;
            let y = be.download("grouped y", &yd)?;
            let mut equal = true;
            let mut untouched = true;
            for (s, &c) in per_slot.iter().enumerate() {
                let ys = &y[s * t * out..(s + 1) * t * out];
                if c > 0 {
                    let xs = be.upload("slot x", &x[s * t * in_..(s * t + c) * in_])?;
                    let mut rd = be.zeros::<f32>("slot y", c * out)?;
                    be.linear_rows(&devs[s], &xs, c, &mut rd)?;
                    let r = be.download("slot y", &rd)?;
                    equal &= r
                        .iter()
                        .zip(&ys[..c * out])
                        .all(|(a, b)| a.to_bits() == b.to_bits());
                }
                untouched &= ys[c * out..].iter().all(|&v| v == 0.0);
            }
            rep.check(
                "grouped",
                &format!("{label} [{out}x{in_}] t={t}, slots of {per_slot:?} rows"),
                if equal && untouched { Cmp::new(&[0.0], &[0.0]) } else { Cmp::failed() },
                0.0,
                json!({"t": t, "rows_per_slot": per_slot, "bitwise_equal": equal, "rows_past_count_untouched": untouched}),
            );
        }
    }
    Ok(())
}
