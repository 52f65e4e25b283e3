//! `grokctl plan`: the capacity planner's command line.

use anyhow::{Context, Result};
use grok_shared::config::ModelConfig;
use grok_shared::planner::{self, Catalog, PlanDType, PlanInput};
use std::path::{Path, PathBuf};

/// The model and the hardware a plan is for.
#[derive(clap::Args)]
pub struct Hardware {
    /// `grok-1`, or a model directory / config.json.
    #[arg(long, default_value = "grok-1")]
    pub model: String,
    #[arg(long, default_value = "h100-sxm")]
    pub gpu: String,
    #[arg(long, default_value_t = 8)]
    pub gpus_per_node: usize,
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// bf16, int8, fp8 (or f32).
    #[arg(long, default_value = "int8")]
    pub dtype: String,
}

#[derive(clap::Args)]
pub struct PlanArgs {
    #[command(flatten)]
    pub hw: Hardware,
    /// Context length (default: the model's).
    #[arg(long)]
    pub context: Option<usize>,
    #[arg(long, default_value_t = 1000)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 200)]
    pub gen_len: usize,
    /// Sequences in flight across the cluster.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Time-to-first-token objective.
    #[arg(long)]
    pub ttft_ms: Option<f64>,
    /// Time-per-output-token objective (the decode step time at the concurrency).
    #[arg(long, alias = "itl-ms")]
    pub tpot_ms: Option<f64>,
    /// A TOML file of extra or replacement devices (same fields as the built-in catalog).
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
    /// Say why the top layout wins and what limits it.
    #[arg(long)]
    pub explain: bool,
    /// Rows of the table.
    #[arg(long, default_value_t = 15)]
    pub top: usize,
}

/// The built-in catalog, extended by the user's file when given.
fn catalog(file: Option<&std::path::Path>) -> Result<Catalog> {
    let mut cat = Catalog::builtin();
    if let Some(f) = file {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading catalog {}", f.display()))?;
        cat.extend(Catalog::parse(&text, &f.display().to_string())?);
    }
    Ok(cat)
}

/// `grok-1` or a model directory / config.json.
pub fn model_config(m: &str) -> Result<ModelConfig> {
    if m == "grok-1" || m == "grok1" {
        return Ok(ModelConfig::grok1());
    }
    let p = Path::new(m);
    let f = if p.is_dir() {
        p.join("config.json")
    } else {
        p.to_path_buf()
    };
    ModelConfig::from_file(&f)
        .with_context(|| format!("--model `{m}` is neither `grok-1` nor a readable config"))
}

pub fn run(a: &PlanArgs) -> Result<()> {
    let c = model_config(&a.hw.model)?;
    let cat = catalog(a.catalog.as_deref())?;
    let dtype: PlanDType = a.hw.dtype.parse()?;
    let input = PlanInput {
        device: cat.get(&a.hw.gpu)?.clone(),
        gpus_per_node: a.hw.gpus_per_node,
        nodes: a.hw.nodes,
        dtype,
        context: a.context.unwrap_or(c.max_position_embeddings),
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        concurrency: a.concurrency,
        ttft_slo_ms: a.ttft_ms,
        tpot_slo_ms: a.tpot_ms,
        memory_utilization: 0.9,
    };
    let plans = planner::plan(&c, &input)?;
    if a.json {
        let j = serde_json::json!({
            "model": a.hw.model, "gpu": a.hw.gpu, "gpus_per_node": a.hw.gpus_per_node, "nodes": a.hw.nodes,
            "dtype": a.hw.dtype, "context": input.context, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
            "concurrency": a.concurrency, "layouts": plans,
            "explanation": planner::explain(&c, &input, &plans),
        });
        println!("{j}");
        return Ok(());
    }
    println!(
        "{} on {} x {} x {} ({:?}), context {}, prompt {} -> {} tokens, {} concurrent",
        a.hw.model,
        a.hw.nodes,
        a.hw.gpus_per_node,
        a.hw.gpu,
        dtype,
        input.context,
        a.prompt_len,
        a.gen_len,
        a.concurrency
    );
    println!(
        "{:>3} {:>3} {:>3} {:>4} {:>5} {:>9} {:>8} {:>10} {:>9} {:>9} {:>10} {:>9} {:>4}  bound",
        "tp",
        "ep",
        "pp",
        "repl",
        "fits",
        "weights",
        "KV/tok",
        "KV tokens",
        "TTFT",
        "ITL",
        "out tok/s",
        "$/M tok",
        "SLO"
    );
    for p in plans.iter().take(a.top) {
        println!(
            "{:>3} {:>3} {:>3} {:>4} {:>5} {:>7.1}GB {:>6.0}KB {:>10} {:>7.0}ms {:>7.1}ms {:>10.0} {:>9.2} {:>4}  {}",
            p.tp,
            p.ep,
            p.pp,
            p.replicas,
            if p.fits { "yes" } else { "no" },
            p.weight_bytes_per_gpu as f64 / 1e9,
            p.kv_bytes_per_token_per_gpu as f64 / 1024.0,
            p.kv_capacity_tokens,
            p.ttft_ms,
            p.itl_ms,
            p.output_tokens_per_s,
            p.cost_per_million_output_tokens,
            if p.meets_slo { "ok" } else { "-" },
            if p.fits { p.decode_bound.clone() } else { format!("short {:.1} GB/device", p.shortfall_bytes_per_gpu as f64 / 1e9) }
        );
    }
    if plans.len() > a.top {
        println!(
            "({} more layouts; --top N shows more, --json all)",
            plans.len() - a.top
        );
    }
    if a.explain {
        println!("\n{}", planner::explain(&c, &input, &plans));
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct SimArgs {
    #[command(flatten)]
    pub hw: Hardware,
    /// Layout of one replica as TP,EP,PP (default: the smallest fitting one).
    #[arg(long, value_parser = parse_layout)]
    pub layout: Option<(usize, usize, usize)>,
    /// Poisson arrival rate, requests per second.
    #[arg(long, default_value_t = 2.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 500)]
    pub requests: usize,
    /// N or MIN:MAX (uniform).
    #[arg(long, default_value = "200:2000", value_parser = parse_range)]
    pub prompt_len: (usize, usize),
    #[arg(long, default_value = "50:400", value_parser = parse_range)]
    pub gen_len: (usize, usize),
    /// SLO: time to first token.
    #[arg(long, default_value_t = 2000.0)]
    pub ttft_ms: f64,
    /// SLO: time per output token (a request's mean gap after its first token).
    #[arg(long, alias = "itl-ms", default_value_t = 100.0)]
    pub tpot_ms: f64,
    /// Reported beside the SLO: the share of requests whose longest gap between two tokens
    /// exceeds this.
    #[arg(long, default_value_t = 1000.0)]
    pub max_gap_ms: f64,
    #[arg(long, default_value_t = 64)]
    pub max_seqs: usize,
    #[arg(long, default_value_t = 2048)]
    pub max_batch_tokens: usize,
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// `TP,EP,PP`.
pub fn parse_layout(s: &str) -> Result<(usize, usize, usize), String> {
    let v: Vec<usize> = s
        .split(',')
        .map(|x| x.trim().parse::<usize>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("`{s}` is not TP,EP,PP"))?;
    match v.as_slice() {
        [t, e, p] if *t > 0 && *e > 0 && *p > 0 => Ok((*t, *e, *p)),
        _ => Err(format!("`{s}` is not TP,EP,PP (three positive numbers)")),
    }
}

/// `MIN:MAX` or `N`.
pub fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = match s.split_once(':') {
        Some((a, b)) => (a, b),
        None => (s, s),
    };
    let a: usize = a
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not N or MIN:MAX"))?;
    let b: usize = b
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not N or MIN:MAX"))?;
    if a == 0 || b < a {
        return Err(format!("`{s}`: need 1 <= MIN <= MAX"));
    }
    Ok((a, b))
}

pub fn simulate(a: &SimArgs) -> Result<()> {
    let c = model_config(&a.hw.model)?;
    let cat = catalog(a.catalog.as_deref())?;
    if a.rate.is_nan() || a.rate <= 0.0 || a.requests == 0 {
        anyhow::bail!("--rate and --requests must be positive");
    }
    let dtype: PlanDType = a.hw.dtype.parse()?;
    let dev = cat.get(&a.hw.gpu)?.clone();
    let input = PlanInput {
        device: dev.clone(),
        gpus_per_node: a.hw.gpus_per_node,
        nodes: a.hw.nodes,
        dtype,
        context: c.max_position_embeddings,
        prompt_len: a.prompt_len.1,
        gen_len: a
            .gen_len
            .1
            .min(c.max_position_embeddings.saturating_sub(a.prompt_len.1))
            .max(1),
        concurrency: a.max_seqs,
        ttft_slo_ms: None,
        tpot_slo_ms: None,
        memory_utilization: 0.9,
    };
    let plans = planner::plan(&c, &input)?;
    // The layout of one replica: the one asked for, else the best fitting single-replica layout.
    let chosen = match a.layout {
        Some((tp, ep, pp)) => plans.iter().find(|p| {
            p.tp == tp
                && p.ep == ep
                && p.pp == pp
                && p.replicas == a.hw.gpus_per_node * a.hw.nodes / (tp * pp)
        }),
        None => plans.iter().filter(|p| p.fits).min_by_key(|p| p.tp * p.pp),
    }
    .with_context(|| "no fitting layout for this cluster (see `grokctl plan`)")?;
    if !chosen.fits {
        anyhow::bail!(
            "layout tp={} ep={} pp={} does not fit on {}",
            chosen.tp,
            chosen.ep,
            chosen.pp,
            a.hw.gpu
        );
    }
    let layout = grok_shared::sharding::Layout::new(chosen.tp, chosen.ep, chosen.pp);
    let m = planner::StepModel {
        model: &c,
        dtype,
        device: &dev,
        layout,
        gpus_per_node: a.hw.gpus_per_node,
    };
    let max_replicas = (a.hw.gpus_per_node * a.hw.nodes) / layout.world_size();
    let sim = planner::SimInput {
        rate: a.rate,
        requests: a.requests,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        max_seqs: a.max_seqs,
        max_batch_tokens: a.max_batch_tokens,
        kv_capacity_tokens: chosen.kv_capacity_tokens,
        ttft_slo_ms: a.ttft_ms,
        tpot_slo_ms: a.tpot_ms,
        max_gap_ms: a.max_gap_ms,
        seed: 7,
    };
    let mut results = Vec::new();
    let mut fewest = None;
    for r in 1..=max_replicas.max(1) {
        let res = planner::simulate(&m, &sim, r);
        let ok = res.slo_attainment >= 0.99;
        results.push(res);
        if ok {
            fewest = Some(r);
            break;
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::json!({"layout": {"tp": layout.tp, "ep": layout.ep, "pp": layout.pp}, "rate": a.rate,
                "slo": {"ttft_ms": a.ttft_ms, "tpot_ms": a.tpot_ms, "max_gap_ms": a.max_gap_ms,
                        "definitions": planner::SLO_DEFINITIONS},
                "runs": results, "fewest_replicas_meeting_slo": fewest})
        );
        return Ok(());
    }
    println!(
        "{} replica layout tp={} ep={} pp={} on {}; {} requests at {} req/s, prompt {:?}, output {:?}; SLO TTFT {} ms and TPOT {} ms; gap bound {} ms",
        a.hw.model, layout.tp, layout.ep, layout.pp, a.hw.gpu, a.requests, a.rate, a.prompt_len, a.gen_len, a.ttft_ms, a.tpot_ms, a.max_gap_ms
    );
    println!(
        "{:>8} {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>9} {:>11}",
        "replicas",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "ITL p50",
        "ITL p99",
        "gap>bound",
        "goodput r/s",
        "in SLO",
        "out tok/s"
    );
    for r in &results {
        println!(
            "{:>8} {:>8.0}ms {:>8.0}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>7.1}ms {:>8.1}% {:>12.2} {:>8.1}% {:>11.0}",
            r.replicas,
            r.ttft_p50_ms,
            r.ttft_p99_ms,
            r.tpot_p50_ms,
            r.tpot_p99_ms,
            r.itl_p50_ms,
            r.itl_p99_ms,
            r.gap_over_bound * 100.0,
            r.goodput_rps,
            r.slo_attainment * 100.0,
            r.output_tokens_per_s
        );
    }
    println!("{}", planner::SLO_DEFINITIONS);
    match fewest {
        Some(r) => println!(
            "fewest replicas meeting the SLO for 99% of requests: {r} ({} devices)",
            r * layout.world_size()
        ),
        None => println!(
            "even {max_replicas} replicas (all {} devices) miss the SLO; add nodes or relax it",
            max_replicas * layout.world_size()
        ),
    }
    Ok(())
}

/// What this host's kernels and links achieve, as a catalog entry.
#[derive(Clone, Debug)]
pub struct HostCalibration {
    pub threads: usize,
    /// Weight bytes per second a batch-1 matmul streams (bf16 weights, well above the caches).
    pub gemv_bytes_per_s: f64,
    /// FLOP/s of a 32-row matmul on bf16 weights larger than the caches.
    pub gemm_flops: f64,
    pub allreduce_latency_s: f64,
    pub allreduce_bytes_per_s: f64,
    /// Time of a tiny matmul call (the fixed cost of one call).
    pub call_overhead_s: f64,
    /// (rows per call, FLOP/s) of the same matmul at a range of row counts.
    pub gemm_curve: Vec<(f64, f64)>,
    /// Time to sample a token (and its log-probability), per logit.
    pub sample_s_per_logit: f64,
}

fn bf16_linear(out: usize, inp: usize) -> grok_shared::backend::cpu::Linear {
    use grok_shared::backend::cpu::{Linear, Weights};
    use grok_shared::formats::checkpoint::Buf;
    let mut r = grok_shared::sampling::Rng::new(9);
    let w: Vec<u16> = (0..out * inp)
        .map(|_| half::bf16::from_f32(r.next_f64() as f32 - 0.5).to_bits())
        .collect();
    Linear::new(out, inp, Weights::Bf16(Buf::owned(w)))
}

/// The median time of `n` runs of `f`.
fn median_time(n: usize, mut f: impl FnMut()) -> f64 {
    let mut v: Vec<f64> = (0..n)
        .map(|_| {
            let t = std::time::Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v[n / 2]
}

/// Greedy sampling and the log-probability of the sampled token (what every sampled token
/// costs at least; nucleus sampling sorts and costs more), per logit.
fn sample_cost() -> f64 {
    let mut r = grok_shared::sampling::Rng::new(3);
    let logits: Vec<f32> = (0..131072).map(|_| (r.next_f64() * 8.0) as f32).collect();
    let p = grok_shared::sampling::SamplingParams::default();
    let t = median_time(7, || {
        let s = grok_shared::sampling::sample(&logits, &p, &mut r);
        std::hint::black_box(grok_shared::sampling::logprob_of(&logits, s.id));
    });
    t / logits.len() as f64
}

/// Measures the kernels with `threads` threads and the TCP collective between two local ranks.
pub fn calibrate_host(threads: usize) -> Result<HostCalibration> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()?;
    let (gemv, gemm, call, curve) = pool.install(|| {
        let big = bf16_linear(16384, 8192); // 268 MB of weights
        let x = vec![0.5f32; 8192];
        let mut y = vec![0f32; 16384];
        big.matmul(&x, 1, &mut y);
        // The median of several runs: what a long benchmark sustains, not the luckiest run.
        let gemv = big.bytes() as f64 / median_time(9, || big.matmul(&x, 1, &mut y));
        // Larger than the last-level cache, with a row count like a prefill chunk's per expert.
        let sq = bf16_linear(8192, 4096);
        let m = 32;
        let xs = vec![0.25f32; m * 4096];
        let mut ys = vec![0f32; m * 8192];
        sq.matmul(&xs, m, &mut ys);
        let best = median_time(5, || sq.matmul(&xs, m, &mut ys));
        let tiny = bf16_linear(64, 64);
        let xt = vec![0.5f32; 64];
        let mut yt = vec![0f32; 64];
        let t = std::time::Instant::now();
        for _ in 0..2000 {
            tiny.matmul(&xt, 1, &mut yt);
        }
        let call = t.elapsed().as_secs_f64() / 2000.0;
        // The same matmul at the row counts of decode batches and of experts' prefill shares.
        let mut curve = Vec::new();
        for rows in [1usize, 2, 4, 8, 16, 32, 64] {
            let xs = vec![0.25f32; rows * 4096];
            let mut ys = vec![0f32; rows * 8192];
            sq.matmul(&xs, rows, &mut ys);
            let best = median_time(5, || sq.matmul(&xs, rows, &mut ys));
            curve.push((rows as f64, 2.0 * rows as f64 * 8192.0 * 4096.0 / best));
        }
        (gemv, 2.0 * m as f64 * 8192.0 * 4096.0 / best, call, curve)
    });
    // Two ranks on loopback: small all-reduces for latency, 4 MB ones for bandwidth.
    let l0 = std::net::TcpListener::bind("127.0.0.1:0")?;
    let l1 = std::net::TcpListener::bind("127.0.0.1:0")?;
    let peers = vec![l0.local_addr()?, l1.local_addr()?];
    let p2 = peers.clone();
    let cfg = grok_shared::collective::TcpConfig {
        timeout: std::time::Duration::from_secs(30),
        connect_timeout: std::time::Duration::from_secs(10),
    };
    let other = std::thread::spawn(move || -> Result<(), grok_shared::collective::CommError> {
        use grok_shared::collective::Communicator;
        let c = grok_shared::collective::TcpComm::connect(1, &p2, l1, cfg)?;
        let mut small = vec![1f32; 1];
        for _ in 0..200 {
            c.all_reduce_sum(&mut small)?;
        }
        let mut big = vec![1f32; 1 << 20];
        for _ in 0..10 {
            c.all_reduce_sum(&mut big)?;
        }
        Ok(())
    });
    use grok_shared::collective::Communicator;
    let c = grok_shared::collective::TcpComm::connect(0, &peers, l0, cfg)?;
    let mut small = vec![1f32; 1];
    let t = std::time::Instant::now();
    for _ in 0..200 {
        c.all_reduce_sum(&mut small)?;
    }
    let lat = t.elapsed().as_secs_f64() / 200.0;
    let mut big = vec![1f32; 1 << 20];
    let t = std::time::Instant::now();
    for _ in 0..10 {
        c.all_reduce_sum(&mut big)?;
    }
    let per = t.elapsed().as_secs_f64() / 10.0;
    other
        .join()
        .map_err(|_| anyhow::anyhow!("calibration peer panicked"))??;
    // A ring all-reduce of B bytes moves 2(w-1)/w x B per rank: B at w = 2.
    let bw = (4 << 20) as f64 / (per - 2.0 * lat).max(1e-6);
    Ok(HostCalibration {
        threads,
        gemv_bytes_per_s: gemv,
        gemm_flops: gemm,
        allreduce_latency_s: lat,
        allreduce_bytes_per_s: bw,
        call_overhead_s: call,
        gemm_curve: curve,
        sample_s_per_logit: sample_cost(),
    })
}

impl HostCalibration {
    /// The catalog entry of one worker with this many threads.
    pub fn device(
        &self,
        name: &str,
        memory_gb: f64,
        workers_per_host: usize,
    ) -> grok_shared::planner::Device {
        grok_shared::planner::Device {
            name: name.into(),
            memory_gb,
            mem_bw_gbs: self.gemv_bytes_per_s / 1e9,
            bf16_tflops: self.gemm_flops / 1e12,
            fp8_tflops: 0.0,
            int8_tops: self.gemm_flops / 1e12,
            intra_node_gbs: self.allreduce_bytes_per_s / 1e9,
            // One all-reduce step of the ring is one message; a 2-rank ring has 2 per all-reduce.
            intra_node_latency_us: self.allreduce_latency_s * 1e6 / 2.0,
            inter_node_gbs: self.allreduce_bytes_per_s / 1e9,
            inter_node_latency_us: self.allreduce_latency_s * 1e6 / 2.0,
            price_per_hour: 0.1,
            max_per_node: workers_per_host,
            launch_overhead_us: self.call_overhead_s * 1e6,
            gemm_rows: self.gemm_curve.iter().map(|c| c.0).collect(),
            gemm_tflops: self.gemm_curve.iter().map(|c| c.1 / 1e12).collect(),
            sample_ns_per_logit: self.sample_s_per_logit * 1e9,
            // Measured directly (the GEMV bandwidth above is the kernel's own).
            bf16_stream_efficiency: 1.0,
            int8_stream_efficiency: 1.0,
            // The TCP collective: a ring of messages on the figures above.
            nccl: Default::default(),
        }
    }

    pub fn toml(&self, d: &grok_shared::planner::Device) -> String {
        format!(
            "# measured by `grokctl plan calibrate` with {} thread(s) per worker\n[[device]]\nname = \"{}\"\nmemory_gb = {:.1}\nmem_bw_gbs = {:.2}\nbf16_tflops = {:.4}\nfp8_tflops = 0\nint8_tops = {:.4}\nintra_node_gbs = {:.3}\nintra_node_latency_us = {:.1}\ninter_node_gbs = {:.3}\ninter_node_latency_us = {:.1}\nprice_per_hour = {}\nmax_per_node = {}\nlaunch_overhead_us = {:.1}\ngemm_rows = {:?}\ngemm_tflops = [{}]\nsample_ns_per_logit = {:.3}\n",
            self.threads, d.name, d.memory_gb, d.mem_bw_gbs, d.bf16_tflops, d.int8_tops, d.intra_node_gbs, d.intra_node_latency_us, d.inter_node_gbs, d.inter_node_latency_us, d.price_per_hour, d.max_per_node, d.launch_overhead_us,
            d.gemm_rows,
            d.gemm_tflops.iter().map(|t| format!("{t:.4}")).collect::<Vec<_>>().join(", "),
            d.sample_ns_per_logit
        )
    }
}

#[derive(clap::Args)]
pub struct ValidateArgs {
    #[arg(long)]
    pub model: PathBuf,
    /// TP,EP,PP; repeat for several layouts.
    #[arg(long, value_parser = parse_layout, default_value = "1,1,1")]
    pub layouts: Vec<(usize, usize, usize)>,
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    pub concurrency: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub requests: usize,
    #[arg(long, default_value_t = 32)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 32)]
    pub gen_len: usize,
}

struct UpProc(std::process::Child);
impl Drop for UpProc {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let _ = self.0.wait();
    }
}

fn start_cluster(model: &Path, tp: usize, ep: usize, pp: usize) -> Result<(UpProc, String)> {
    use std::io::BufRead;
    let me = std::env::current_exe()?;
    let mut c = std::process::Command::new(me)
        .args(["up", "--model"])
        .arg(model)
        .args([
            "--tp",
            &tp.to_string(),
            "--ep",
            &ep.to_string(),
            "--pp",
            &pp.to_string(),
            "--listen",
            "127.0.0.1:0",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    let out = c.stdout.take().context("stdout")?;
    let p = UpProc(c);
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        if let Some(e) = line.strip_prefix("ready: ") {
            return Ok((p, e.to_string()));
        }
    }
    anyhow::bail!("the cluster tp={tp} ep={ep} pp={pp} did not start")
}

/// Runs real CPU clusters of this project and compares measured TTFT, ITL and throughput with
/// the planner's predictions for a device calibrated on this host.
pub async fn validate(a: &ValidateArgs) -> Result<()> {
    let c = model_config(&a.model.display().to_string())?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut cal: std::collections::HashMap<usize, HostCalibration> = Default::default();
    println!(
        "{:>9} {:>5} | {:>10} {:>10} {:>6} | {:>9} {:>9} {:>6} | {:>10} {:>10} {:>6}",
        "layout",
        "conc",
        "TTFT meas",
        "TTFT pred",
        "err",
        "ITL meas",
        "ITL pred",
        "err",
        "tok/s meas",
        "tok/s pred",
        "err"
    );
    let mut errors = Vec::new();
    for &(tp, ep, pp) in &a.layouts {
        let world = tp * pp;
        let threads = (cores / world).max(1);
        if let std::collections::hash_map::Entry::Vacant(e) = cal.entry(threads) {
            e.insert(calibrate_host(threads)?);
        }
        let dev = cal[&threads].device("calibrated", 24.0 / world as f64, world);
        let layout = grok_shared::sharding::Layout::new(tp, ep, pp);
        layout.validate(&c)?;
        let m = planner::StepModel {
            model: &c,
            dtype: PlanDType::Bf16,
            device: &dev,
            layout,
            gpus_per_node: world,
        };
        let (_cluster, endpoint) = start_cluster(&a.model, tp, ep, pp)?;
        for &conc in &a.concurrency {
            let mut r = crate::client::bench_serve_level(
                &endpoint,
                conc,
                a.requests,
                a.prompt_len,
                a.gen_len,
                c.vocab_size as u32,
            )
            .await?;
            let j = r.json();
            let (l, g) = (a.prompt_len as f64, a.gen_len as f64);
            let cf = conc as f64;
            let itl_p = m.time(cf, cf, l + g / 2.0);
            let ttft_p = m.time(cf, cf * l, l / 2.0);
            let tps_p = cf * g / (ttft_p + (g - 1.0) * itl_p);
            let meas = (
                j["ttft_p50_ms"].as_f64().unwrap_or(0.0),
                j["itl_p50_ms"].as_f64().unwrap_or(0.0),
                j["output_tokens_per_s"].as_f64().unwrap_or(0.0),
            );
            let pred = (ttft_p * 1e3, itl_p * 1e3, tps_p);
            let err = |m: f64, p: f64| (p - m) / m.max(1e-9);
            let e = (
                err(meas.0, pred.0),
                err(meas.1, pred.1),
                err(meas.2, pred.2),
            );
            errors.extend([e.0.abs(), e.1.abs(), e.2.abs()]);
            println!(
                "{:>9} {:>5} | {:>8.1}ms {:>8.1}ms {:>5.0}% | {:>7.1}ms {:>7.1}ms {:>5.0}% | {:>10.1} {:>10.1} {:>5.0}%",
                format!("{tp},{ep},{pp}"),
                conc,
                meas.0,
                pred.0,
                e.0 * 100.0,
                meas.1,
                pred.1,
                e.1 * 100.0,
                meas.2,
                pred.2,
                e.2 * 100.0
            );
        }
    }
    errors.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let med = errors.get(errors.len() / 2).copied().unwrap_or(0.0);
    println!(
        "median absolute error: {:.1}% over {} predictions",
        med * 100.0,
        errors.len()
    );
    for (t, h) in &cal {
        println!(
            "calibration, {t} thread(s): matmul streams {:.1} GB/s at batch 1, {:.1} GFLOP/s at 32 rows; all-reduce {:.0} us + {:.2} GB/s; {:.0} us per matmul call",
            h.gemv_bytes_per_s / 1e9,
            h.gemm_flops / 1e9,
            h.allreduce_latency_s * 1e6,
            h.allreduce_bytes_per_s / 1e9,
            h.call_overhead_s * 1e6
        );
    }
    Ok(())
}

#[derive(clap::Args)]
pub struct EpArgs {
    #[command(flatten)]
    pub hw: Hardware,
    /// GPUs of the replica (the expert-parallel world).
    #[arg(long, default_value_t = 8)]
    pub ranks: usize,
    /// Copies of each expert, on distinct ranks.
    #[arg(long, default_value_t = 2)]
    pub expert_copies: usize,
    /// Sequences in flight on the replica.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    #[arg(long, default_value_t = 1000)]
    pub prompt_len: usize,
    #[arg(long, default_value_t = 200)]
    pub gen_len: usize,
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// `grokctl plan ep`.
pub fn ep(a: &EpArgs) -> Result<()> {
    let c = model_config(&a.hw.model)?;
    let cat = catalog(a.catalog.as_deref())?;
    let p = planner::ep::EpInput {
        device: cat.get(&a.hw.gpu)?.clone(),
        dtype: a.hw.dtype.parse()?,
        ranks: a.ranks,
        copies: a.expert_copies,
        gpus_per_node: a.hw.gpus_per_node,
        sequences: a.concurrency,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        memory_utilization: 0.9,
    };
    let r = planner::ep::plan(&c, &p)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    println!(
        "{} on {} x {} ({}), dp-attention + ep {} with {} copies of each expert, {} sequences",
        a.hw.model, a.ranks, a.hw.gpu, a.hw.dtype, a.ranks, a.expert_copies, a.concurrency
    );
    println!(
        "memory: {:.1} GB of weights per GPU ({} expert copies per layer), KV room for {} tokens per GPU: {}",
        gb(r.weight_bytes_per_gpu),
        r.experts_per_rank,
        r.kv_capacity_tokens_per_gpu,
        if r.fits {
            "fits".to_string()
        } else {
            format!("does not fit ({:.1} GB short per GPU)", gb(r.shortfall_bytes_per_gpu))
        }
    );
    println!(
        "all-to-all: {:.0} KB sent per rank per layer, twice (dispatch and combine)",
        r.all_to_all_bytes_per_rank / 1e3
    );
    for (what, s) in [
        ("all ranks", &r.before),
        ("after losing one", &r.after_loss),
    ] {
        if s.serving {
            println!(
                "{what} ({} ranks, {:.1} sequences each, expert load {:.2}x the even share): {:.1} ms a token, {:.0} tokens/s",
                s.ranks, s.sequences_per_rank, s.expert_load_imbalance, s.itl_ms, s.output_tokens_per_s
            );
        } else {
            println!(
                "{what} ({} ranks): not serving: {}",
                s.ranks,
                s.why_not.as_deref().unwrap_or("")
            );
        }
    }
    println!("\n{}", planner::breakdown_table(&r.before.decode_step));
    Ok(())
}
