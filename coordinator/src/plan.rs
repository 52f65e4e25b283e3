//! `grokctl plan`: the capacity planner's command line.

use anyhow::{Context, Result};
use grok_shared::config::ModelConfig;
use grok_shared::planner::{self, Catalog, PlanDType, PlanInput};
use std::path::{Path, PathBuf};

pub struct PlanArgs {
    pub model: String,
    pub gpu: String,
    pub gpus_per_node: usize,
    pub nodes: usize,
    pub dtype: String,
    pub context: Option<usize>,
    pub prompt_len: usize,
    pub gen_len: usize,
    pub concurrency: usize,
    pub ttft_ms: Option<f64>,
    pub itl_ms: Option<f64>,
    pub catalog: Option<PathBuf>,
    pub json: bool,
    pub explain: bool,
    pub top: usize,
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
    let c = model_config(&a.model)?;
    let mut cat = Catalog::builtin();
    if let Some(f) = &a.catalog {
        let text = std::fs::read_to_string(f)
            .with_context(|| format!("reading catalog {}", f.display()))?;
        cat.extend(Catalog::parse(&text, &f.display().to_string())?);
    }
    let dtype: PlanDType = a.dtype.parse()?;
    let input = PlanInput {
        device: cat.get(&a.gpu)?.clone(),
        gpus_per_node: a.gpus_per_node,
        nodes: a.nodes,
        dtype,
        context: a.context.unwrap_or(c.max_position_embeddings),
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        concurrency: a.concurrency,
        ttft_slo_ms: a.ttft_ms,
        itl_slo_ms: a.itl_ms,
        memory_utilization: 0.9,
    };
    let plans = planner::plan(&c, &input)?;
    if a.json {
        let j = serde_json::json!({
            "model": a.model, "gpu": a.gpu, "gpus_per_node": a.gpus_per_node, "nodes": a.nodes,
            "dtype": a.dtype, "context": input.context, "prompt_len": a.prompt_len, "gen_len": a.gen_len,
            "concurrency": a.concurrency, "layouts": plans,
            "explanation": planner::explain(&c, &input, &plans),
        });
        println!("{j}");
        return Ok(());
    }
    println!(
        "{} on {} x {} x {} ({:?}), context {}, prompt {} -> {} tokens, {} concurrent",
        a.model,
        a.nodes,
        a.gpus_per_node,
        a.gpu,
        dtype,
        input.context,
        a.prompt_len,
        a.gen_len,
        a.concurrency
    );
    println!(
        "{:>3} {:>3} {:>3} {:>4} {:>5} {:>9} {:>8} {:>10} {:>9} {:>9} {:>10} {:>9} {:>4}  {}",
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
        "SLO",
        "bound"
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

pub struct SimArgs {
    pub model: String,
    pub gpu: String,
    pub gpus_per_node: usize,
    pub nodes: usize,
    pub dtype: String,
    pub layout: Option<(usize, usize, usize)>,
    pub rate: f64,
    pub requests: usize,
    pub prompt_len: (usize, usize),
    pub gen_len: (usize, usize),
    pub ttft_ms: f64,
    pub itl_ms: f64,
    pub max_seqs: usize,
    pub max_batch_tokens: usize,
    pub catalog: Option<PathBuf>,
    pub json: bool,
}

/// `MIN:MAX` or `N`.
pub fn parse_range(s: &str) -> Result<(usize, usize), String> {
    let (a, b) = match s.split_once(':') {
        Some((a, b)) => (a, b),
        None => (s, s),
    };
    let a: usize = a.trim().parse().map_err(|_| format!("`{s}` is not N or MIN:MAX"))?;
    let b: usize = b.trim().parse().map_err(|_| format!("`{s}` is not N or MIN:MAX"))?;
    if a == 0 || b < a {
        return Err(format!("`{s}`: need 1 <= MIN <= MAX"));
    }
    Ok((a, b))
}

pub fn simulate(a: &SimArgs) -> Result<()> {
    let c = model_config(&a.model)?;
    let mut cat = Catalog::builtin();
    if let Some(f) = &a.catalog {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading catalog {}", f.display()))?;
        cat.extend(Catalog::parse(&text, &f.display().to_string())?);
    }
    if !(a.rate > 0.0) || a.requests == 0 {
        anyhow::bail!("--rate and --requests must be positive");
    }
    let dtype: PlanDType = a.dtype.parse()?;
    let dev = cat.get(&a.gpu)?.clone();
    let input = PlanInput {
        device: dev.clone(),
        gpus_per_node: a.gpus_per_node,
        nodes: a.nodes,
        dtype,
        context: c.max_position_embeddings,
        prompt_len: a.prompt_len.1,
        gen_len: a.gen_len.1.min(c.max_position_embeddings.saturating_sub(a.prompt_len.1)).max(1),
        concurrency: a.max_seqs,
        ttft_slo_ms: None,
        itl_slo_ms: None,
        memory_utilization: 0.9,
    };
    let plans = planner::plan(&c, &input)?;
    // The layout of one replica: the one asked for, else the best fitting single-replica layout.
    let chosen = match a.layout {
        Some((tp, ep, pp)) => plans.iter().find(|p| p.tp == tp && p.ep == ep && p.pp == pp && p.replicas == a.gpus_per_node * a.nodes / (tp * pp)),
        None => plans.iter().filter(|p| p.fits).min_by_key(|p| p.tp * p.pp),
    }
    .with_context(|| "no fitting layout for this cluster (see `grokctl plan`)")?;
    if !chosen.fits {
        anyhow::bail!("layout tp={} ep={} pp={} does not fit on {}", chosen.tp, chosen.ep, chosen.pp, a.gpu);
    }
    let layout = grok_shared::sharding::Layout::new(chosen.tp, chosen.ep, chosen.pp);
    let m = planner::StepModel { model: &c, dtype, device: &dev, layout, gpus_per_node: a.gpus_per_node };
    let max_replicas = (a.gpus_per_node * a.nodes) / layout.world_size();
    let sim = planner::SimInput {
        rate: a.rate,
        requests: a.requests,
        prompt_len: a.prompt_len,
        gen_len: a.gen_len,
        max_seqs: a.max_seqs,
        max_batch_tokens: a.max_batch_tokens,
        kv_capacity_tokens: chosen.kv_capacity_tokens,
        ttft_slo_ms: a.ttft_ms,
        itl_slo_ms: a.itl_ms,
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
            serde_json::json!({"layout": {"tp": layout.tp, "ep": layout.ep, "pp": layout.pp}, "rate": a.rate, "runs": results, "fewest_replicas_meeting_slo": fewest})
        );
        return Ok(());
    }
    println!(
        "{} replica layout tp={} ep={} pp={} on {}; {} requests at {} req/s, prompt {:?}, output {:?}; SLO TTFT {} ms, ITL {} ms",
        a.model, layout.tp, layout.ep, layout.pp, a.gpu, a.requests, a.rate, a.prompt_len, a.gen_len, a.ttft_ms, a.itl_ms
    );
    println!("{:>8} {:>10} {:>10} {:>9} {:>9} {:>12} {:>9} {:>11}", "replicas", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "goodput r/s", "in SLO", "out tok/s");
    for r in &results {
        println!(
            "{:>8} {:>8.0}ms {:>8.0}ms {:>7.1}ms {:>7.1}ms {:>12.2} {:>8.1}% {:>11.0}",
            r.replicas, r.ttft_p50_ms, r.ttft_p99_ms, r.itl_p50_ms, r.itl_p99_ms, r.goodput_rps, r.slo_attainment * 100.0, r.output_tokens_per_s
        );
    }
    match fewest {
        Some(r) => println!("fewest replicas meeting the SLO for 99% of requests: {r} ({} devices)", r * layout.world_size()),
        None => println!("even {max_replicas} replicas (all {} devices) miss the SLO; add nodes or relax it", max_replicas * layout.world_size()),
    }
    Ok(())
}
