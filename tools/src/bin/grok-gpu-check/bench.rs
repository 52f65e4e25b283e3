//! NCCL on one GPU, the copy bandwidth, the GEMVs (checked and timed) and cuBLAS.

use crate::common::*;
use grok_shared::backend::cpu::{Linear, Weights};
use grok_shared::backend::cuda::{
    bf16, shapes, CudaBackend, CudaError, DeviceLinear, GemvKernel, GemvWeights,
};
use grok_shared::formats::checkpoint::Buf;
use grok_shared::sampling::Rng;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// NCCL: a group of one on this GPU (a lent host has one GPU; NCCL refuses two ranks on one
// device). Bootstrap through a unique id as the workers do, every collective, the device path.
// ---------------------------------------------------------------------------------------------

pub(crate) fn nccl_check(be: &CudaBackend, rep: &mut Report) -> Result<(), CudaError> {
    use grok_shared::collective::nccl::{unique_id, NcclComm};
    use grok_shared::collective::Communicator;
    let inv = |e: grok_shared::collective::CommError| CudaError::Invalid {
        op: "nccl".into(),
        message: e.to_string(),
    };
    let id = unique_id().map_err(inv)?;
    let c = NcclComm::new(be.stream().clone(), 0, 1, id, Duration::from_secs(20)).map_err(inv)?;
    let x: Vec<f32> = (0..4099).map(|i| (i as f32 * 0.37).sin()).collect();
    let want: Vec<f64> = x.iter().map(|&v| v as f64).collect();
    let mut b = x.clone();
    c.all_reduce_sum(&mut b).map_err(inv)?;
    rep.check(
        "nccl",
        "all_reduce_sum (world 1)",
        Cmp::new(&b, &want),
        0.0,
        json!({"n": x.len()}),
    );
    let mut g = vec![0f32; x.len()];
    c.all_gather(&x, &mut g).map_err(inv)?;
    rep.check(
        "nccl",
        "all_gather (world 1)",
        Cmp::new(&g, &want),
        0.0,
        json!({}),
    );
    let mut bc = x.clone();
    c.broadcast(&mut bc, 0).map_err(inv)?;
    rep.check(
        "nccl",
        "broadcast (world 1)",
        Cmp::new(&bc, &want),
        0.0,
        json!({}),
    );
    c.barrier().map_err(inv)?;
    let mut d = be.upload("nccl input", &x)?;
    c.all_reduce_device(&mut d, x.len()).map_err(inv)?;
    let back = be.download("nccl output", &d)?;
    rep.check(
        "nccl",
        "all_reduce_device (world 1)",
        Cmp::new(&back, &want),
        0.0,
        json!({}),
    );
    // Misuse is an error, not a hang or a crash.
    let mut out = vec![0f32; 3];
    let e = c.all_gather(&x[..2], &mut out).is_err() && c.broadcast(&mut b, 1).is_err();
    if !e {
        rep.error("nccl", "misuse (bad lengths, bad root) was not refused");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Bandwidth
// ---------------------------------------------------------------------------------------------

pub(crate) fn bandwidth(be: &CudaBackend, rep: &mut Report) -> Result<(), CudaError> {
    let bytes = 1usize << 30;
    let ms = be.copy_time_ms(bytes, 5)? as f64;
    let gbps = 2.0 * bytes as f64 / (ms * 1e-3) / 1e9;
    let theo = be.info().theoretical_bandwidth() / 1e9;
    println!(
        "  device-to-device copy of 1 GiB: best {ms:.3} ms = {gbps:.0} GB/s moved (read + write), {:.0}% of the theoretical {theo:.0} GB/s",
        100.0 * gbps / theo
    );
    rep.copy_gbps = Some(gbps);
    rep.top.insert(
        "bandwidth".into(),
        json!({"copy_bytes": bytes, "best_ms": ms, "copy_gbps": gbps,
               "definition": "2 * bytes / time (each byte read once and written once)",
               "theoretical_gbps": theo}),
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// GEMV
// ---------------------------------------------------------------------------------------------

/// One weight matrix: CPU copy, device copy, and CPU results per m (computed once).
pub(crate) struct WeightCase {
    pub(crate) label: String,
    pub(crate) out: usize,
    pub(crate) in_: usize,
    pub(crate) kind: GemvWeights,
    pub(crate) cpu: Linear,
    pub(crate) dev: Option<DeviceLinear>,
    pub(crate) refs: HashMap<usize, Vec<f32>>,
    /// Checked with these m; benchmarked too when `bench` is set.
    pub(crate) ms: Vec<usize>,
    pub(crate) bench: bool,
}

#[derive(Default)]
pub(crate) struct GemvCases {
    pub(crate) built: bool,
    pub(crate) cases: Vec<WeightCase>,
    pub(crate) seed: u64,
}

impl GemvCases {
    pub(crate) fn build(&mut self, args: &Args) {
        if self.built {
            return;
        }
        self.built = true;
        self.seed = args.seed;
        let t = Instant::now();
        // (out, in, weights, ms, benchmarked). Grok-1: q/o [6144, 6144] (o: nb 8), expert
        // linear/linear_v [32768, 6144] (nb 1), expert linear_1 [6144, 32768] (nb 8).
        let mut spec: Vec<(usize, usize, GemvWeights, Vec<usize>, bool)> = Vec::new();
        let i8_1 = GemvWeights::I8 { nb: 1 };
        let i8_8 = GemvWeights::I8 { nb: 8 };
        if args.quick {
            spec.push((6144, 6144, GemvWeights::Bf16, vec![1, 5, 8, 64], true));
            spec.push((6144, 6144, i8_8, vec![1, 5, 8, 64], true));
            spec.push((1000, 640, GemvWeights::I8 { nb: 5 }, vec![1, 7, 17], false));
        } else {
            let small = vec![1, 2, 3, 5, 8, 9, 13, 33, 64];
            spec.push((6144, 6144, GemvWeights::Bf16, small.clone(), true));
            spec.push((6144, 6144, i8_8, small.clone(), true));
            spec.push((6144, 6144, i8_1, vec![1, 8, 64], false));
            spec.push((32768, 6144, GemvWeights::Bf16, vec![1, 8, 64], true));
            spec.push((32768, 6144, i8_1, vec![1, 8, 64], true));
            spec.push((6144, 32768, GemvWeights::Bf16, vec![1, 8, 64], true));
            spec.push((6144, 32768, i8_8, vec![1, 8, 64], true));
            spec.push((1000, 640, GemvWeights::Bf16, vec![1, 7, 17], false));
            spec.push((1000, 640, GemvWeights::I8 { nb: 5 }, vec![1, 7, 17], false));
            spec.push((24, 256, GemvWeights::I8 { nb: 2 }, vec![1, 3, 64], false));
            spec.push((40, 192, GemvWeights::Bf16, vec![1, 9, 64], false));
        }
        for (out, in_, kind, ms, bench) in spec {
            let label = format!(
                "{} [{out}x{in_}]{}",
                kind.name(),
                match kind {
                    GemvWeights::I8 { nb } => format!(" nb={nb}"),
                    _ => String::new(),
                }
            );
            let s = seed_of(args.seed, &label);
            let n = out * in_;
            let w = match kind {
                GemvWeights::Bf16 => Weights::Bf16(Buf::owned(par_fill(n, s, |r| {
                    half::bf16::from_f32(uniform(r, -0.05, 0.05)).to_bits()
                }))),
                GemvWeights::I8 { nb } => Weights::I8 {
                    // The full range, -128 included.
                    w: Buf::owned(par_fill(n, s, |r| (r.next_u64() >> 56) as u8 as i8)),
                    scales: Arc::new(rand_f32(nb * out, s ^ 1, 0.5e-3, 2e-3)),
                    nb,
                },
            };
            self.cases.push(WeightCase {
                label,
                out,
                in_,
                kind,
                cpu: Linear::new(out, in_, w),
                dev: None,
                refs: HashMap::new(),
                ms,
                bench,
            });
        }
        println!(
            "  generated {} weight matrices in {:.1} s",
            self.cases.len(),
            t.elapsed().as_secs_f64()
        );
    }

    pub(crate) fn x(&self, in_: usize, m: usize) -> Vec<f32> {
        rand_f32(
            m * in_,
            seed_of(self.seed, &format!("x {in_} {m}")),
            -1.0,
            1.0,
        )
    }
}

impl WeightCase {
    pub(crate) fn device(&mut self, be: &CudaBackend) -> Result<&DeviceLinear, CudaError> {
        if self.dev.is_none() {
            self.dev = Some(be.upload_linear(&self.label, &self.cpu)?);
        }
        Ok(self.dev.as_ref().expect("uploaded above"))
    }

    pub(crate) fn reference(&mut self, x: &[f32], m: usize) -> &Vec<f32> {
        let (out, cpu) = (self.out, &self.cpu);
        self.refs.entry(m).or_insert_with(|| {
            let mut y = vec![0f32; m * out];
            cpu.matmul(x, m, &mut y);
            y
        })
    }
}

pub(crate) fn gemv_check(
    be: &CudaBackend,
    args: &Args,
    rep: &mut Report,
    cases: &mut GemvCases,
    kernel: GemvKernel,
) -> Result<(), CudaError> {
    cases.build(args);
    let group = format!("gemv_{}", kernel.name());
    for ci in 0..cases.cases.len() {
        let ms = cases.cases[ci].ms.clone();
        for m in ms {
            let in_ = cases.cases[ci].in_;
            let x = cases.x(in_, m);
            let c = &mut cases.cases[ci];
            let t = Instant::now();
            let want = to_f64(c.reference(&x, m));
            let cpu_s = t.elapsed().as_secs_f64();
            let (out, case_label, kind) = (c.out, c.label.clone(), c.kind);
            let dev = c.device(be)?;
            let xd = be.upload("x", &x)?;
            let mut yd = be.zeros::<f32>("y", m * out)?;
            be.linear(kernel, dev, &xd, m, &mut yd)?;
            let name = shapes::gemv_kernel_name(
                kernel,
                dev.kind(),
                m.min(if kernel == GemvKernel::Simt { 8 } else { 64 }),
            );
            be.synchronize(&name)?;
            let got = be.download("y", &yd)?;
            // Batch invariance: row 0 alone must give the same bits as row 0 of the batch.
            let mut inv = Value::Null;
            if m > 1 {
                let x0 = be.upload("x row 0", &x[..in_])?;
                let mut y0 = be.zeros::<f32>("y row 0", out)?;
                be.linear(kernel, dev, &x0, 1, &mut y0)?;
                be.synchronize(&name)?;
                let got0 = be.download("y row 0", &y0)?;
                let same = got0
                    .iter()
                    .zip(&got[..out])
                    .filter(|(a, b)| a.to_bits() == b.to_bits())
                    .count();
                inv = json!({"row0_bitwise_equal": same == out, "equal_elements": same});
                if same != out {
                    println!("  note: {case_label} m={m}: row 0 differs from the m=1 result in {} of {out} elements", out - same);
                }
            }
            let cmp = Cmp::new(&got, &want);
            let label = format!("{case_label} m={m}");
            rep.check(
                &group,
                &label,
                cmp,
                TOL_GEMV,
                json!({"kernel": kernel.name(), "dtype": kind.name(), "out": out, "in": in_, "m": m,
                       "cpu_seconds": cpu_s, "batch_invariance": inv,
                       "worst": {"row": cmp.worst / out.max(1), "col": cmp.worst % out.max(1),
                                 "got": got.get(cmp.worst), "want": want.get(cmp.worst)}}),
            );
        }
    }
    Ok(())
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

pub(crate) fn bench_gemv(
    be: &CudaBackend,
    args: &Args,
    rep: &mut Report,
    cases: &mut GemvCases,
) -> Result<(), CudaError> {
    cases.build(args);
    let reps = args.reps.max(1);
    let l2 = (be.info().l2_cache_bytes.max(0) as usize).max(1 << 20);
    let mut scratch = be.zeros::<u8>("L2 flush buffer", (4 * l2).max(256 << 20))?;
    let events: Vec<_> = (0..2 * reps)
        .map(|_| be.timing_event())
        .collect::<Result<_, _>>()?;
    println!(
        "  {reps} runs each, L2 flushed before each run; GB/s = weight bytes / median time{}",
        match rep.copy_gbps {
            Some(c) => format!("; % of the copy bandwidth {c:.0} GB/s"),
            None => String::new(),
        }
    );
    for ci in 0..cases.cases.len() {
        if !cases.cases[ci].bench {
            continue;
        }
        for m in [1usize, 8, 64] {
            let in_ = cases.cases[ci].in_;
            let x = cases.x(in_, m);
            let c = &mut cases.cases[ci];
            let (out, label, kind) = (c.out, c.label.clone(), c.kind);
            let dev = c.device(be)?;
            let bytes = dev.bytes();
            let xd = be.upload("x", &x)?;
            let mut yd = be.zeros::<f32>("y", m * out)?;
            for kernel in [GemvKernel::Mma, GemvKernel::Simt] {
                // Warm-up (also surfaces launch errors before timing).
                for _ in 0..2 {
                    be.linear(kernel, dev, &xd, m, &mut yd)?;
                }
                be.synchronize(&format!("{} warm-up", kernel.name()))?;
                for r in 0..reps {
                    be.flush_l2(&mut scratch)?;
                    be.record(&events[2 * r])?;
                    be.linear(kernel, dev, &xd, m, &mut yd)?;
                    be.record(&events[2 * r + 1])?;
                }
                be.synchronize(&format!("{} benchmark", kernel.name()))?;
                let mut us: Vec<f64> = (0..reps)
                    .map(|r| {
                        be.elapsed_ms(&events[2 * r], &events[2 * r + 1])
                            .map(|ms| ms as f64 * 1e3)
                    })
                    .collect::<Result<_, _>>()?;
                let min = us.iter().cloned().fold(f64::INFINITY, f64::min);
                let med = median(&mut us);
                let gbps = bytes as f64 / (med * 1e-6) / 1e9;
                let frac = rep.copy_gbps.map(|c| gbps / c);
                println!(
                    "  {:<5} {label:<24} m={m:<3} median {med:>9.1} us  min {min:>9.1} us  {gbps:>7.0} GB/s{}",
                    kernel.name(),
                    frac.map(|f| format!("  {:>5.1}%", 100.0 * f)).unwrap_or_default()
                );
                rep.perf.push(json!({
                    "kernel": kernel.name(), "dtype": kind.name(), "label": label,
                    "out": out, "in": in_, "nb": match kind { GemvWeights::I8 { nb } => json!(nb), _ => Value::Null },
                    "m": m, "weight_bytes": bytes, "median_us": med, "min_us": min, "gbps": gbps,
                    "frac_copy_bw": frac, "reps": reps,
                    "weight_reads": if kernel == GemvKernel::Simt { m.div_ceil(8) } else { 1 },
                }));
            }
        }
    }
    Ok(())
}

pub(crate) fn cublas_bench(
    be: &CudaBackend,
    args: &Args,
    rep: &mut Report,
    cases: &mut GemvCases,
) -> Result<(), CudaError> {
    let _ = cases;
    let blas = be.cublas()?;
    match be.cublas_version(&blas) {
        Ok(v) => {
            println!("  cuBLAS version {v}");
            rep.top.insert("cublas_version".into(), json!(v));
        }
        Err(e) => println!("  cuBLAS version unknown: {e}"),
    }
    let reps = args.reps.max(1);
    let m = 512usize;
    let shapes_: &[(usize, usize)] = if args.quick {
        &[(6144, 6144)]
    } else {
        &[(6144, 6144), (32768, 6144)]
    };
    let events: Vec<_> = (0..2 * reps)
        .map(|_| be.timing_event())
        .collect::<Result<_, _>>()?;
    for &(out, in_) in shapes_ {
        let s = seed_of(args.seed, &format!("cublas {out} {in_}"));
        let x: Vec<bf16> = par_fill(m * in_, s, |r| bf16::from_f32(uniform(r, -1.0, 1.0)));
        let w: Vec<bf16> = par_fill(out * in_, s ^ 7, |r| {
            bf16::from_f32(uniform(r, -0.05, 0.05))
        });
        let xd = be.upload("gemm x", &x)?;
        let wd = be.upload("gemm w", &w)?;
        let mut yd = be.zeros::<bf16>("gemm y", m * out)?;
        for _ in 0..3 {
            be.gemm_bf16(&blas, &xd, &wd, m, out, in_, &mut yd)?;
        }
        be.synchronize("cublas warm-up")?;
        for r in 0..reps {
            be.record(&events[2 * r])?;
            be.gemm_bf16(&blas, &xd, &wd, m, out, in_, &mut yd)?;
            be.record(&events[2 * r + 1])?;
        }
        be.synchronize("cublas benchmark")?;
        let mut us: Vec<f64> = (0..reps)
            .map(|r| {
                be.elapsed_ms(&events[2 * r], &events[2 * r + 1])
                    .map(|ms| ms as f64 * 1e3)
            })
            .collect::<Result<_, _>>()?;
        let med = median(&mut us);
        let tflops = 2.0 * (m * out * in_) as f64 / (med * 1e-6) / 1e12;
        // Spot check 512 outputs against f64 on the bf16 inputs (also proves the column-major
        // mapping of y = x · Wᵀ).
        let y = be.download("gemm y", &yd)?;
        let mut rng = Rng::new(s ^ 99);
        let mut got = Vec::new();
        let mut want = Vec::new();
        for _ in 0..512 {
            let r = (rng.next_u64() % m as u64) as usize;
            let o = (rng.next_u64() % out as u64) as usize;
            let dot: f64 = (0..in_)
                .map(|i| x[r * in_ + i].to_f64() * w[o * in_ + i].to_f64())
                .sum();
            want.push(dot);
            got.push(y[r * out + o].to_f32());
        }
        let cmp = Cmp::new(&got, &want);
        println!(
            "  cublas bf16 gemm m={m} [{out}x{in_}]: median {med:.1} us = {tflops:.0} TFLOP/s"
        );
        rep.check(
            "cublas",
            &format!("bf16 gemm m={m} [{out}x{in_}] (512 samples)"),
            cmp,
            TOL_CUBLAS_BF16,
            json!({"m": m, "out": out, "in": in_}),
        );
        rep.cublas.push(
            json!({"m": m, "out": out, "in": in_, "median_us": med, "tflops": tflops,
                               "max_rel_err": finite_or_null(cmp.rel), "reps": reps}),
        );
    }
    Ok(())
}
