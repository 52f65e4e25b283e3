//! What every check shares: the command line, tolerances, the report and its summary, and
//! helpers for random data.

use clap::Parser;
use grok_shared::sampling::Rng;
use rayon::prelude::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Instant;

#[derive(Parser)]
#[command(
    name = "grok-gpu-check",
    about = "Checks and benchmarks the CUDA kernels against the CPU backend; writes DIR/gpu_check.json",
    after_help = "Groups: bandwidth, gemv_simt, gemv_mma, rms_norm, rope, gelu, router, attention, bench_gemv, cublas, gemm, grouped, model, device, model-perf, nccl\n\
                  Exit codes: 0 passed, 1 a check failed, 2 CUDA unavailable, 3 CUDA context lost (rerun with --skip GROUP)"
)]
pub(crate) struct Args {
    /// Folder for gpu_check.json (created if missing).
    #[arg(long)]
    pub(crate) out: PathBuf,
    /// Fewer shapes (one GEMV shape; short attention).
    #[arg(long)]
    pub(crate) quick: bool,
    /// CUDA device ordinal.
    #[arg(long, default_value_t = 0)]
    pub(crate) device: usize,
    /// Timed runs per benchmark (median reported).
    #[arg(long, default_value_t = 20)]
    pub(crate) reps: usize,
    /// Seed of every random input.
    #[arg(long, default_value_t = 20240317)]
    pub(crate) seed: u64,
    /// Run only these groups (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub(crate) only: Vec<String>,
    /// Skip these groups (comma separated).
    #[arg(long, value_delimiter = ',')]
    pub(crate) skip: Vec<String>,
    /// Only compile the kernels with NVRTC for this architecture (e.g. sm_90) and print the
    /// registers and spills; needs the NVRTC library but no GPU.
    #[arg(long, value_name = "ARCH")]
    pub(crate) compile_only: Option<String>,
}

pub(crate) const GROUPS: &[&str] = &[
    "bandwidth",
    "gemv_simt",
    "gemv_mma",
    "rms_norm",
    "rope",
    "gelu",
    "router",
    "attention",
    "bench_gemv",
    "cublas",
    "gemm",
    "grouped",
    "model",
    "device",
    "model-perf",
    "nccl",
];

/// Tolerances (max |gpu - cpu| / max |cpu|, over the whole output).
pub(crate) const TOL_GEMV: f64 = 1e-4; // f32 accumulation; the MMA kernel's activations carry 2^-17
pub(crate) const TOL_ELEMENTWISE: f64 = 1e-5; // RMSNorm, RoPE, GELU: f32/f64 arithmetic of the CPU's form
pub(crate) const TOL_ROUTER: f64 = 1e-6; // f64 logits and softmax, f32 probabilities
pub(crate) const TOL_ATTENTION: f64 = 1e-4; // f32 scores and softmax vs an f64 loop
pub(crate) const TOL_CUBLAS_BF16: f64 = 2e-2; // bf16 output
/// Whole-model logits, CUDA vs CPU on the same bf16/int8 weights: both sides dequantise the
/// same weights and keep f32 activations; differences come from summation order, the GEMV's
/// 2^-17 activation split and f32 vs f64 attention. Per position, max|Δ| / max|logit|.
pub(crate) const TOL_MODEL: f64 = 1e-3;

/// What the run found; serialised to gpu_check.json.
pub(crate) struct Report {
    pub(crate) started: Instant,
    pub(crate) top: serde_json::Map<String, Value>,
    pub(crate) groups: Vec<Value>,
    pub(crate) correctness: Vec<Value>,
    pub(crate) perf: Vec<Value>,
    pub(crate) cublas: Vec<Value>,
    pub(crate) errors: Vec<Value>,
    pub(crate) failed: bool,
    pub(crate) context_lost_in: Option<String>,
    pub(crate) copy_gbps: Option<f64>,
}

impl Report {
    pub(crate) fn new(args: &Args) -> Self {
        let mut top = serde_json::Map::new();
        top.insert("tool".into(), json!("grok-gpu-check"));
        top.insert("version".into(), json!(env!("CARGO_PKG_VERSION")));
        top.insert(
            "args".into(),
            json!({"quick": args.quick, "device": args.device, "reps": args.reps, "seed": args.seed,
                   "only": args.only, "skip": args.skip}),
        );
        top.insert(
            "tolerances".into(),
            json!({"metric": "max|gpu-ref| / max|ref| over the output",
                   "gemv": TOL_GEMV, "elementwise": TOL_ELEMENTWISE, "router": TOL_ROUTER,
                   "attention": TOL_ATTENTION, "cublas_bf16": TOL_CUBLAS_BF16, "model_logits": TOL_MODEL}),
        );
        Self {
            started: Instant::now(),
            top,
            groups: Vec::new(),
            correctness: Vec::new(),
            perf: Vec::new(),
            cublas: Vec::new(),
            errors: Vec::new(),
            failed: false,
            context_lost_in: None,
            copy_gbps: None,
        }
    }

    pub(crate) fn error(&mut self, group: &str, e: &str) {
        println!("  ERROR [{group}] {e}");
        self.errors.push(json!({"group": group, "error": e}));
        self.failed = true;
    }

    /// Records one correctness comparison and prints it.
    pub(crate) fn check(&mut self, group: &str, name: &str, cmp: Cmp, tol: f64, extra: Value) {
        let pass = cmp.ok(tol);
        if !pass {
            self.failed = true;
        }
        println!(
            "  [{}] {group:<10} {name:<44} rel {:>9.2e}  abs {:>9.2e}  (tol {tol:.0e}){}",
            if pass { "PASS" } else { "FAIL" },
            cmp.rel,
            cmp.abs,
            if cmp.nonfinite > 0 {
                format!("  {} non-finite", cmp.nonfinite)
            } else {
                String::new()
            }
        );
        self.correctness.push(json!({
            "group": group, "name": name, "pass": pass, "max_rel_err": finite_or_null(cmp.rel),
            "max_abs_err": finite_or_null(cmp.abs), "ref_max_abs": cmp.scale, "nonfinite": cmp.nonfinite,
            "worst_index": cmp.worst, "tol": tol, "detail": extra,
        }));
    }

    pub(crate) fn write(&mut self, args: &Args) {
        self.top.insert(
            "seconds".into(),
            json!(self.started.elapsed().as_secs_f64()),
        );
        self.top.insert("groups".into(), json!(self.groups));
        self.top
            .insert("correctness".into(), json!(self.correctness));
        self.top.insert("perf_gemv".into(), json!(self.perf));
        self.top.insert("cublas".into(), json!(self.cublas));
        self.top.insert("errors".into(), json!(self.errors));
        self.top
            .insert("context_lost_in".into(), json!(self.context_lost_in));
        let passed = !self.failed && self.context_lost_in.is_none();
        self.top.insert("passed".into(), json!(passed));
        let path = args.out.join("gpu_check.json");
        let text = serde_json::to_string_pretty(&Value::Object(self.top.clone()))
            .unwrap_or_else(|e| format!("{{\"error\": \"serialise: {e}\"}}"));
        match std::fs::write(&path, text) {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("error: cannot write {}: {e}", path.display()),
        }
    }
}

pub(crate) fn finite_or_null(v: f64) -> Value {
    if v.is_finite() {
        json!(v)
    } else {
        Value::Null
    }
}

/// Normwise comparison of a GPU result with its reference.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cmp {
    pub(crate) rel: f64,
    pub(crate) abs: f64,
    pub(crate) scale: f64,
    pub(crate) nonfinite: usize,
    pub(crate) worst: usize,
}

impl Cmp {
    pub(crate) fn new(got: &[f32], want: &[f64]) -> Self {
        let mut c = Cmp {
            rel: 0.0,
            abs: 0.0,
            scale: 0.0,
            nonfinite: 0,
            worst: 0,
        };
        if got.len() != want.len() {
            c.rel = f64::INFINITY;
            c.nonfinite = got.len().abs_diff(want.len());
            return c;
        }
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            c.scale = c.scale.max(w.abs());
            if !g.is_finite() {
                c.nonfinite += 1;
                continue;
            }
            let d = (g as f64 - w).abs();
            if d > c.abs {
                c.abs = d;
                c.worst = i;
            }
        }
        c.rel = if c.scale > 0.0 {
            c.abs / c.scale
        } else {
            c.abs
        };
        c
    }
    /// A comparison that could not be made (the step failed): never passes.
    pub(crate) fn failed() -> Self {
        Cmp {
            rel: f64::INFINITY,
            abs: f64::INFINITY,
            scale: 0.0,
            nonfinite: 1,
            worst: 0,
        }
    }

    pub(crate) fn ok(&self, tol: f64) -> bool {
        self.nonfinite == 0 && self.rel <= tol
    }
}

pub(crate) fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

pub(crate) fn seed_of(base: u64, label: &str) -> u64 {
    // FNV-1a of the label, mixed with the run's seed.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in label.bytes() {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h ^ base.wrapping_mul(0x9E3779B97F4A7C15)
}

/// `n` values from `f`, filled in parallel chunks each with its own seeded generator.
pub(crate) fn par_fill<T: Send>(
    n: usize,
    seed: u64,
    f: impl Fn(&mut Rng) -> T + Sync + Send,
) -> Vec<T> {
    const CHUNK: usize = 1 << 16;
    (0..n.div_ceil(CHUNK))
        .into_par_iter()
        .flat_map_iter(|c| {
            let mut r = Rng::new(seed ^ (c as u64 + 1).wrapping_mul(0xD1B54A32D192ED03));
            let end = n.min((c + 1) * CHUNK);
            let f = &f;
            (c * CHUNK..end).map(move |_| f(&mut r)).collect::<Vec<T>>()
        })
        .collect()
}

pub(crate) fn uniform(r: &mut Rng, lo: f32, hi: f32) -> f32 {
    lo + (hi - lo) * r.next_f64() as f32
}

pub(crate) fn rand_f32(n: usize, seed: u64, lo: f32, hi: f32) -> Vec<f32> {
    par_fill(n, seed, |r| uniform(r, lo, hi))
}

pub(crate) fn fmt_bytes(b: usize) -> String {
    format!("{:.2} GiB", b as f64 / (1u64 << 30) as f64)
}

// ---------------------------------------------------------------------------------------------
// Summary
// ---------------------------------------------------------------------------------------------

pub(crate) fn print_summary(rep: &Report) {
    println!("\n================ summary ================");
    if let Some(c) = rep.copy_gbps {
        println!("copy bandwidth (HBM roofline): {c:.0} GB/s");
    }
    let mut by_group: Vec<(String, usize, usize)> = Vec::new();
    for c in &rep.correctness {
        let g = c["group"].as_str().unwrap_or("?").to_string();
        let pass = c["pass"].as_bool().unwrap_or(false);
        match by_group.iter_mut().find(|e| e.0 == g) {
            Some(e) => {
                e.1 += pass as usize;
                e.2 += 1;
            }
            None => by_group.push((g, pass as usize, 1)),
        }
    }
    println!(
        "{:<12} {:>6} {:>6}  worst rel err",
        "check", "pass", "total"
    );
    for (g, p, t) in &by_group {
        let worst = rep
            .correctness
            .iter()
            .filter(|c| c["group"] == g.as_str())
            .filter_map(|c| c["max_rel_err"].as_f64())
            .fold(0f64, f64::max);
        println!(
            "{g:<12} {p:>6} {t:>6}  {worst:.2e}{}",
            if p != t { "  <-- FAILED" } else { "" }
        );
    }
    if !rep.perf.is_empty() {
        println!(
            "\n{:<24} {:>4} {:>11} {:>8} {:>6} {:>11} {:>8} {:>6}",
            "gemv", "m", "mma us", "GB/s", "%copy", "simt us", "GB/s", "%copy"
        );
        let mut seen = Vec::new();
        for p in &rep.perf {
            let key = (
                p["label"].as_str().unwrap_or("").to_string(),
                p["m"].as_u64().unwrap_or(0),
            );
            if seen.contains(&key) {
                continue;
            }
            seen.push(key.clone());
            let get = |k: &str| {
                rep.perf.iter().find(|q| {
                    q["label"].as_str() == Some(key.0.as_str())
                        && q["m"].as_u64() == Some(key.1)
                        && q["kernel"] == k
                })
            };
            let cell = |q: Option<&Value>| match q {
                Some(q) => format!(
                    "{:>11.1} {:>8.0} {:>6}",
                    q["median_us"].as_f64().unwrap_or(f64::NAN),
                    q["gbps"].as_f64().unwrap_or(f64::NAN),
                    q["frac_copy_bw"]
                        .as_f64()
                        .map(|f| format!("{:.0}%", 100.0 * f))
                        .unwrap_or_else(|| "-".into())
                ),
                None => format!("{:>11} {:>8} {:>6}", "-", "-", "-"),
            };
            println!(
                "{:<24} {:>4} {} {}",
                key.0,
                key.1,
                cell(get("mma")),
                cell(get("simt"))
            );
        }
    }
    for c in &rep.cublas {
        println!(
            "cublas bf16 gemm m={} [{}x{}]: {:.1} us, {:.0} TFLOP/s",
            c["m"],
            c["out"],
            c["in"],
            c["median_us"].as_f64().unwrap_or(f64::NAN),
            c["tflops"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if !rep.errors.is_empty() {
        println!("\nerrors:");
        for e in &rep.errors {
            println!(
                "  [{}] {}",
                e["group"].as_str().unwrap_or("?"),
                e["error"].as_str().unwrap_or("?")
            );
        }
    }
    if let Some(g) = &rep.context_lost_in {
        println!("\nCUDA CONTEXT LOST in group {g}: rerun with --skip {g}");
    }
    let passed = !rep.failed && rep.context_lost_in.is_none();
    println!(
        "\nRESULT: {} ({:.1} s)",
        if passed { "PASS" } else { "FAIL" },
        rep.started.elapsed().as_secs_f64()
    );
}
