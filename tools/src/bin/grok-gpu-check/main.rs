//! `grok-gpu-check`: proves the CUDA backend on a real GPU in one run.
//!
//! Prints the device, measures the device-to-device copy bandwidth (the HBM roofline), checks
//! every kernel against the CPU backend at Grok-1 widths (GEMV bf16/int8 on tensor cores and on
//! CUDA cores, RMSNorm, RoPE, GELU gate, router top-2, decode attention against an f64 loop),
//! times the GEMVs and a cuBLAS bf16 GEMM, checks and times the cuBLAS path of passes of many
//! rows (`gemm`: both precisions, against the GEMV by row count), writes `DIR/gpu_check.json` and prints a table last.
//! Group `model` runs the whole forward pass (`Model<Cuda>`, one sequence)
//! against the CPU `Model` on small random bf16/int8/f32 checkpoints (prefill, decode, greedy and
//! seeded generation); `model-perf` writes a one-layer Grok-1 checkpoint to a temporary folder
//! and times decode (batch 1) and a 512-token prefill against the copy roofline.
//!
//! Work is split in groups (`--only`, `--skip`). A kernel fault loses the CUDA context for the
//! rest of the process: the remaining groups are skipped, `context_lost_in` names the group in
//! the JSON and the exit code is 3, so a wrapper can run again with `--skip GROUP`.
//!
//! Exit codes: 0 all checks passed; 1 a check failed or errored; 2 CUDA unavailable or the
//! device could not be opened (or the kernels did not compile); 3 the CUDA context was lost.
//! `--compile-only sm_XY` only compiles the kernels with NVRTC (no GPU needed) and prints the
//! registers and spills of each.

mod bench;
mod common;
mod device;
mod gemm;
mod model;
mod ops;

use bench::*;
use clap::Parser;
use common::*;
use grok_shared::backend::cuda::{self, CudaBackend, CudaError, GemvKernel};
use model::*;
use ops::*;
use serde_json::json;
use std::time::Instant;

fn main() {
    let args = Args::parse();
    let code = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(&args))) {
        Ok(c) => c,
        Err(_) => {
            eprintln!("error: internal panic (see the message above)");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &Args) -> i32 {
    if let Err(e) = std::fs::create_dir_all(&args.out) {
        eprintln!("error: cannot create {}: {e}", args.out.display());
        return 2;
    }
    if let Some(arch) = &args.compile_only {
        return compile_only(arch);
    }
    for g in args.only.iter().chain(&args.skip) {
        if !GROUPS.contains(&g.as_str()) {
            eprintln!("error: unknown group `{g}` (groups: {})", GROUPS.join(", "));
            return 2;
        }
    }
    let mut rep = Report::new(args);
    println!("== grok-gpu-check {} ==", env!("CARGO_PKG_VERSION"));
    println!(
        "LD_LIBRARY_PATH={}",
        std::env::var("LD_LIBRARY_PATH").unwrap_or_default()
    );
    if let Err(e) = cuda::cuda_status() {
        eprintln!("error: {e}");
        rep.top.insert("status".into(), json!("cuda_unavailable"));
        rep.top.insert("error".into(), json!(e.to_string()));
        rep.failed = true;
        rep.write(args);
        return 2;
    }
    match cuda::nccl_status() {
        Ok(()) => println!("nccl: loadable"),
        Err(e) => println!("nccl: {e} (not needed by this check)"),
    }
    let count = match cuda::device_count() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("error: {e}");
            rep.top.insert("status".into(), json!("no_device"));
            rep.top.insert("error".into(), json!(e.to_string()));
            rep.failed = true;
            rep.write(args);
            return 2;
        }
    };
    println!("devices: {count}");
    let t0 = Instant::now();
    let be = match CudaBackend::open(args.device) {
        Ok(b) => std::sync::Arc::new(b),
        Err(e) => {
            eprintln!("error: cannot open CUDA device {}: {e}", args.device);
            rep.top.insert("status".into(), json!("open_failed"));
            rep.top.insert("error".into(), json!(e.to_string()));
            rep.failed = true;
            rep.write(args);
            return 2;
        }
    };
    rep.top.insert("status".into(), json!("opened"));
    describe_device(&be, &mut rep, t0.elapsed().as_secs_f64());

    let mut cases = GemvCases::default();
    for &g in GROUPS {
        let selected = (args.only.is_empty() || args.only.iter().any(|o| o == g))
            && !args.skip.iter().any(|s| s == g);
        if !selected {
            continue;
        }
        if let Some(lost) = &rep.context_lost_in {
            println!("\n-- {g}: skipped (CUDA context lost in {lost})");
            rep.groups
                .push(json!({"group": g, "status": "skipped_context_lost"}));
            continue;
        }
        println!("\n-- {g}");
        let t = Instant::now();
        let failed_before = rep.failed;
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_group(g, &be, args, &mut rep, &mut cases)
        }));
        let status = match r {
            Ok(Ok(())) => {
                if rep.failed && !failed_before {
                    "failed"
                } else {
                    "ok"
                }
            }
            Ok(Err(e)) => {
                rep.error(g, &e.to_string());
                if e.is_context_lost() || context_lost(&be) {
                    rep.context_lost_in = Some(g.to_string());
                    println!("  the CUDA context is lost: later groups are skipped");
                    "context_lost"
                } else {
                    "error"
                }
            }
            Err(_) => {
                rep.error(g, "panicked (message above)");
                if context_lost(&be) {
                    rep.context_lost_in = Some(g.to_string());
                    "context_lost"
                } else {
                    "error"
                }
            }
        };
        let secs = t.elapsed().as_secs_f64();
        println!("   ({g}: {status}, {secs:.1} s)");
        rep.groups
            .push(json!({"group": g, "status": status, "seconds": secs}));
    }
    rep.write(args);
    print_summary(&rep);
    if rep.context_lost_in.is_some() {
        3
    } else if rep.failed {
        1
    } else {
        0
    }
}

/// After an error: is the context still usable? (A faulted kernel poisons every later call.)
fn context_lost(be: &CudaBackend) -> bool {
    match be.synchronize("probe") {
        Err(e) => e.is_context_lost(),
        Ok(()) => match be.zeros::<u8>("probe", 256) {
            Err(e) => e.is_context_lost(),
            Ok(_) => false,
        },
    }
}

fn compile_only(arch: &str) -> i32 {
    println!("== grok-gpu-check --compile-only {arch} ==");
    match cuda::nvrtc_version() {
        Ok((a, b)) => println!("nvrtc {a}.{b}"),
        Err(e) => {
            eprintln!("error: {e}");
            return 2;
        }
    }
    match cuda::compile_kernels(arch, &["--ptxas-options=-v".to_string()]) {
        Ok(k) => {
            println!(
                "compiled for {} in {:.2} s: cubin {} bytes, ptx {} bytes, options {:?}",
                k.arch,
                k.seconds,
                k.cubin.as_ref().map(|c| c.len()).unwrap_or(0),
                k.ptx.len(),
                k.options
            );
            let summary = ptxas_summary(&k.log);
            for line in &summary {
                println!("  {line}");
            }
            let spills = summary.iter().filter(|l| l.contains("SPILLS")).count();
            if spills > 0 {
                println!("warning: {spills} kernels spill registers");
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            1
        }
    }
}

/// One line per kernel from ptxas's `-v` log: registers, stack, spills.
fn ptxas_summary(log: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur: Option<String> = None;
    let mut stack = String::new();
    for line in log.lines() {
        if let Some(p) = line.find("Function properties for ") {
            cur = Some(line[p + 24..].trim().to_string());
            stack.clear();
        } else if line.contains("bytes stack frame") {
            stack = line
                .trim_start_matches("ptxas")
                .trim()
                .trim_start_matches('.')
                .trim()
                .to_string();
        } else if let Some(p) = line.find("Used ") {
            if let Some(name) = cur.take() {
                let spill = !stack.contains("0 bytes spill stores");
                out.push(format!(
                    "{name:<20} {} | {stack}{}",
                    line[p..].trim(),
                    if spill { "  <-- SPILLS" } else { "" }
                ));
            }
        }
    }
    out
}

fn describe_device(be: &CudaBackend, rep: &mut Report, open_secs: f64) {
    let i = be.info();
    let k = be.compiled();
    println!(
        "device {}: {} | compute {}.{} ({}) | {} SMs | {} | L2 {} MiB | bus {} bit @ {} MHz (theoretical {:.0} GB/s) | driver {}.{}",
        i.ordinal,
        i.name,
        i.compute_capability.0,
        i.compute_capability.1,
        i.arch(),
        i.sm_count,
        fmt_bytes(i.total_mem_bytes),
        i.l2_cache_bytes >> 20,
        i.memory_bus_bits,
        i.memory_clock_khz / 1000,
        i.theoretical_bandwidth() / 1e9,
        i.driver_version / 1000,
        (i.driver_version % 1000) / 10
    );
    println!(
        "kernels: NVRTC {}.{} for {} in {:.2} s, loaded as {} (open took {open_secs:.2} s)",
        k.nvrtc_version.0, k.nvrtc_version.1, k.arch, k.seconds, k.loaded_as
    );
    if !k.log.trim().is_empty() {
        println!("nvrtc log:\n{}", k.log.trim());
    }
    let attrs = be.kernel_attributes();
    let spilling: Vec<&cuda::KernelAttributes> =
        attrs.iter().filter(|a| a.local_bytes > 0).collect();
    println!(
        "kernel registers: {}",
        attrs
            .iter()
            .map(|a| format!("{}={}", a.name, a.registers))
            .collect::<Vec<_>>()
            .join(" ")
    );
    if !spilling.is_empty() {
        println!(
            "note: kernels with local memory (spills or stack): {}",
            spilling
                .iter()
                .map(|a| format!("{}({} B)", a.name, a.local_bytes))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    let mem = be.memory().ok();
    if let Some((free, total)) = mem {
        println!("memory: {} free of {}", fmt_bytes(free), fmt_bytes(total));
    }
    let libs = loaded_libraries();
    for l in &libs {
        println!("loaded: {l}");
    }
    rep.top.insert("device".into(), json!(i));
    rep.top.insert(
        "compile".into(),
        json!({"nvrtc_version": [k.nvrtc_version.0, k.nvrtc_version.1], "arch": k.arch,
               "options": k.options, "seconds": k.seconds, "loaded_as": k.loaded_as,
               "log": k.log, "cubin_bytes": k.cubin.as_ref().map(|c| c.len()),
               "ptx_bytes": k.ptx.len(), "kernels": attrs}),
    );
    rep.top.insert("loaded_libraries".into(), json!(libs));
    rep.top
        .insert("memory_free_total".into(), json!(mem.map(|(f, t)| [f, t])));
}

/// Paths of the CUDA libraries mapped into this process (which copies were picked up).
fn loaded_libraries() -> Vec<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mut v: Vec<String> = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .filter(|p| {
            ["libcuda.", "libnvrtc", "libcublas", "libnccl"]
                .iter()
                .any(|k| p.contains(k))
        })
        .map(|s| s.to_string())
        .collect();
    v.sort();
    v.dedup();
    v
}

fn run_group(
    g: &str,
    be: &std::sync::Arc<CudaBackend>,
    args: &Args,
    rep: &mut Report,
    cases: &mut GemvCases,
) -> Result<(), CudaError> {
    match g {
        "bandwidth" => bandwidth(be, rep),
        "gemv_simt" => gemv_check(be, args, rep, cases, GemvKernel::Simt),
        "gemv_mma" => gemv_check(be, args, rep, cases, GemvKernel::Mma),
        "rms_norm" => rms_norm_check(be, args, rep),
        "rope" => rope_check(be, args, rep),
        "gelu" => gelu_check(be, args, rep),
        "router" => router_check(be, args, rep),
        "attention" => attention_check(be, args, rep),
        "bench_gemv" => bench_gemv(be, args, rep, cases),
        "cublas" => cublas_bench(be, args, rep, cases),
        "gemm" => gemm::gemm_check(be, args, rep),
        "grouped" => gemm::grouped_check(be, args, rep),
        "model" => model_check(be, args, rep),
        "device" => device::device_check(be, args, rep),
        "model-perf" => model_perf(be, args, rep),
        "nccl" => nccl_check(be, rep),
        _ => Err(CudaError::Invalid {
            op: "run".into(),
            message: format!("unknown group {g}"),
        }),
    }
}
