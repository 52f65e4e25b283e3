//! `grokctl` commands that talk to a running cluster over gRPC.

use anyhow::{bail, Context, Result};
use grok_proto::v1 as pb;
use std::io::Write;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

static CLIENT_TLS: std::sync::OnceLock<Option<grok_proto::tls::Tls>> = std::sync::OnceLock::new();

/// Sets the TLS settings (the cluster's CA, optionally a client certificate) `grokctl` uses
/// for every connection to a coordinator (once, at start-up; None: plaintext).
pub fn set_tls(t: Option<grok_proto::tls::Tls>) {
    let _ = CLIENT_TLS.set(t);
}

fn client_tls() -> Option<&'static grok_proto::tls::Tls> {
    CLIENT_TLS.get().and_then(|t| t.as_ref())
}

/// A failed call as an error: its message, its cause, its code and, when the failure looks like
/// a TLS mismatch, what to do.
fn rpc_error(s: tonic::Status) -> anyhow::Error {
    let m = grok_proto::tls::explain(grok_proto::tls::status_chain(&s), client_tls().is_some());
    anyhow::anyhow!("{m} ({:?})", s.code())
}

/// The one place `grokctl` opens channels to a coordinator: https with the CA when TLS is set.
pub(crate) async fn channel(endpoint: &str) -> Result<tonic::transport::Channel> {
    let tls = client_tls();
    let ep = grok_proto::tls::endpoint(endpoint, tls)?;
    let url = ep.uri().to_string();
    let url = url.trim_end_matches('/');
    ep.connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| {
            let why = grok_proto::tls::explain(grok_proto::tls::error_chain(&e), tls.is_some());
            anyhow::anyhow!("cannot reach the coordinator at {url}: {why}")
        })
}

pub async fn fetch_status(endpoint: &str) -> Result<pb::ClusterStatusResponse> {
    let mut c = grok_proto::limited!(pb::admin_client::AdminClient::new(channel(endpoint).await?));
    Ok(
        c.cluster_status(crate::auth::request(pb::ClusterStatusRequest {}))
            .await
            .map_err(rpc_error)?
            .into_inner(),
    )
}

pub fn format_status(s: &pb::ClusterStatusResponse) -> String {
    let l = s.layout.unwrap_or_default();
    let mut out = format!(
        "model   {}\nlayout  tp={} ep={} pp={} replicas={}{}\nstate   {}{}\ntokens  {} generated, {:.1} tokens/s\nbatch   {} running, {} queued\nkv      {} blocks used, {} free\nsteps   {:.0} us of coordinator time each, {} pipelined\n\n",
        s.model,
        l.tp,
        l.ep,
        l.pp,
        l.replicas.max(1),
        if l.dp_attention {
            format!(
                " (data-parallel attention, {} cop{} of each expert)",
                l.expert_copies.max(1),
                if l.expert_copies > 1 { "ies" } else { "y" }
            )
        } else {
            String::new()
        },
        s.state,
        if s.detail.is_empty() {
            String::new()
        } else {
            format!(" ({})", s.detail)
        },
        s.generated_tokens,
        s.tokens_per_s,
        s.running_sequences,
        s.queued_requests,
        s.kv_blocks_used,
        s.kv_blocks_free,
        s.coordinator_step_seconds * 1e6,
        s.pipelined_steps
    );
    out += &format!(
        "{:<5} {:<7} {:<6} {:<4} {:<10} {:<9} {:<22} {:<24} {:>10} {:>10} {:>10}  {}\n",
        "RANK",
        "REPLICA",
        "STAGE",
        "TP",
        "STATE",
        "LAYERS",
        "HEADS",
        "WORKER",
        "WEIGHTS",
        "KV",
        "RSS",
        "EXPERTS"
    );
    for sh in &s.shards {
        let state = if sh.state == "loading" {
            format!("loading {:.0}%", sh.load_fraction * 100.0)
        } else {
            sh.state.clone()
        };
        out += &format!(
            "{:<5} {:<7} {:<6} {:<4} {:<10} {:<9} {:<22} {:<24} {:>8.1}MB {:>8.1}MB {:>8.1}MB  {}\n",
            sh.rank,
            sh.replica,
            sh.stage,
            sh.tp_rank,
            state,
            sh.layers,
            sh.heads,
            if sh.worker_id.is_empty() {
                "-".to_string()
            } else {
                format!("{} {}", sh.worker_id, sh.address)
            },
            sh.weight_bytes as f64 / 1e6,
            sh.kv_bytes as f64 / 1e6,
            sh.resident_bytes as f64 / 1e6,
            sh.experts
        );
        if !sh.detail.is_empty() && (sh.state == "failed" || sh.state == "lost") {
            out += &format!("      {}\n", sh.detail);
        }
    }
    out
}

/// Prints the cluster; with `wait_ready`, polls until it serves (exit 0) or fails/times out.
pub async fn status(endpoint: &str, wait_ready: Option<u64>, json: bool) -> Result<()> {
    let start = Instant::now();
    loop {
        let s = match fetch_status(endpoint).await {
            Ok(s) => s,
            Err(e) => {
                if wait_ready.is_some_and(|w| start.elapsed() < Duration::from_secs(w)) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                return Err(e);
            }
        };
        let done = wait_ready.is_none() || s.state == "ready" || s.state == "failed";
        let timed_out = wait_ready.is_some_and(|w| start.elapsed() >= Duration::from_secs(w));
        if done || timed_out {
            if json {
                println!("{}", status_json(&s));
            } else {
                print!("{}", format_status(&s));
            }
            if wait_ready.is_some() && s.state != "ready" {
                if s.state == "failed" {
                    bail!("the cluster failed: {}", s.detail);
                }
                bail!(
                    "the cluster is not ready after {} s (state {})",
                    wait_ready.unwrap_or(0),
                    s.state
                );
            }
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn status_json(s: &pb::ClusterStatusResponse) -> serde_json::Value {
    let l = s.layout.unwrap_or_default();
    serde_json::json!({
        "model": s.model, "state": s.state, "detail": s.detail,
        "layout": {"tp": l.tp, "ep": l.ep, "pp": l.pp, "dp_attention": l.dp_attention,
                   "expert_copies": l.expert_copies.max(1)},
        "generated_tokens": s.generated_tokens, "tokens_per_s": s.tokens_per_s,
        "kv_blocks_used": s.kv_blocks_used, "kv_blocks_free": s.kv_blocks_free,
        "running_sequences": s.running_sequences, "queued_requests": s.queued_requests,
        "coordinator_step_seconds": s.coordinator_step_seconds, "pipelined_steps": s.pipelined_steps,
        "shards": s.shards.iter().map(|x| serde_json::json!({
            "rank": x.rank, "stage": x.stage, "tp_rank": x.tp_rank, "state": x.state, "detail": x.detail,
            "worker_id": x.worker_id, "address": x.address, "layers": x.layers, "heads": x.heads,
            "experts": x.experts, "weight_bytes": x.weight_bytes, "kv_bytes": x.kv_bytes, "kv_blocks": x.kv_blocks, "device": x.device, "resident_bytes": x.resident_bytes,
        })).collect::<Vec<_>>(),
    })
}

#[derive(Clone)]
pub struct RemoteGenerate {
    pub endpoint: String,
    pub prompt: Option<String>,
    pub prompt_ids: Option<Vec<u32>>,
    pub max_new_tokens: usize,
    pub sampling: grok_shared::sampling::SamplingParams,
    pub ignore_eos: bool,
    pub json: bool,
    pub logits_out: Option<std::path::PathBuf>,
}

/// Result of a remote generation.
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish: String,
    pub first_token_s: f64,
    pub total_s: f64,
    pub prompt_logits: Vec<f32>,
    pub prompt_len: usize,
}

pub async fn generate_stream(
    a: &RemoteGenerate,
    mut on_delta: impl FnMut(&[u32], &str),
) -> Result<Generated> {
    let mut c = grok_proto::limited!(pb::inference_client::InferenceClient::new(
        channel(&a.endpoint).await?
    ));
    let prompt = match (&a.prompt, &a.prompt_ids) {
        (Some(t), None) => pb::generate_request::Prompt::Text(t.clone()),
        (None, Some(ids)) => pb::generate_request::Prompt::Ids(pb::TokenIds { ids: ids.clone() }),
        _ => bail!("give exactly one of --prompt or --prompt-ids"),
    };
    let t0 = Instant::now();
    let mut s = c
        .generate(crate::auth::request(pb::GenerateRequest {
            prompt: Some(prompt),
            max_tokens: a.max_new_tokens as u32,
            temperature: a.sampling.temperature,
            top_p: a.sampling.top_p,
            top_k: a.sampling.top_k as u32,
            seed: a.sampling.seed,
            ignore_eos: a.ignore_eos,
            prompt_logits: a.logits_out.is_some(),
            ..Default::default()
        }))
        .await
        .map_err(rpc_error)?
        .into_inner();
    let mut out = Generated {
        ids: vec![],
        text: String::new(),
        finish: String::new(),
        first_token_s: 0.0,
        total_s: 0.0,
        prompt_logits: vec![],
        prompt_len: 0,
    };
    while let Some(m) = s.next().await {
        let m = m.map_err(rpc_error)?;
        if out.ids.is_empty() {
            out.first_token_s = t0.elapsed().as_secs_f64();
        }
        on_delta(&m.ids, &m.text);
        out.ids.extend_from_slice(&m.ids);
        if !m.prompt_logits.is_empty() {
            out.prompt_logits.extend(m.prompt_logits);
        }
        if let Some(u) = &m.usage {
            out.prompt_len = u.prompt_tokens as usize;
        }
        out.text.push_str(&m.text);
        if !m.finish_reason.is_empty() {
            out.finish = m.finish_reason;
        }
    }
    out.total_s = t0.elapsed().as_secs_f64();
    Ok(out)
}

pub async fn generate(a: &RemoteGenerate) -> Result<()> {
    let json = a.json;
    let out = generate_stream(a, |ids, text| {
        if json {
            return;
        }
        let mut o = std::io::stdout().lock();
        if text.is_empty() {
            for id in ids {
                let _ = write!(o, "{id} ");
            }
        } else {
            let _ = write!(o, "{text}");
        }
        let _ = o.flush();
    })
    .await?;
    if let Some(path) = &a.logits_out {
        if out.prompt_len == 0 || out.prompt_logits.len() % out.prompt_len != 0 {
            bail!("the cluster returned no prompt logits");
        }
        let vocab = out.prompt_logits.len() / out.prompt_len;
        grok_shared::formats::npy::write_f32(path, &[out.prompt_len, vocab], &out.prompt_logits)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if json {
        let mut j = serde_json::json!({"ids": out.ids});
        if !out.text.is_empty() {
            j["text"] = out.text.clone().into();
        }
        println!("{j}");
    } else {
        println!();
    }
    eprintln!(
        "{} tokens in {:.3} s (first after {:.3} s); finish: {}",
        out.ids.len(),
        out.total_s,
        out.first_token_s,
        out.finish
    );
    Ok(())
}

/// Decode speed of a running cluster at batch 1.
pub async fn bench(endpoint: &str, prompt_len: usize, gen_len: usize, json: bool) -> Result<()> {
    let st = fetch_status(endpoint).await?;
    if st.state != "ready" {
        bail!("the cluster is not ready (state {})", st.state);
    }
    let mut rng = grok_shared::sampling::Rng::new(42);
    let ids: Vec<u32> = (0..prompt_len)
        .map(|_| 3 + (rng.next_u64() % 250) as u32)
        .collect();
    let a = RemoteGenerate {
        endpoint: endpoint.to_string(),
        prompt: None,
        prompt_ids: Some(ids),
        max_new_tokens: gen_len + 1,
        sampling: grok_shared::sampling::SamplingParams {
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
        },
        ignore_eos: true,
        json: false,
        logits_out: None,
    };
    // Warm-up.
    generate_stream(
        &RemoteGenerate {
            max_new_tokens: 2,
            ..clone_gen(&a)
        },
        |_, _| {},
    )
    .await?;
    let before = fetch_status(endpoint).await?;
    let out = generate_stream(&a, |_, _| {}).await?;
    let after = fetch_status(endpoint).await?;
    let decode_s = out.total_s - out.first_token_s;
    let per_worker: Vec<serde_json::Value> = after
        .shards
        .iter()
        .zip(&before.shards)
        .map(|(x, y)| {
            let steps = (x.steps - y.steps).max(1) as f64;
            let step = (x.step_seconds - y.step_seconds) / steps;
            let comm = (x.comm_seconds - y.comm_seconds) / steps;
            serde_json::json!({"rank": x.rank, "step_ms": step * 1e3, "comm_ms": comm * 1e3, "compute_ms": (step - comm) * 1e3})
        })
        .collect();
    let decode_tps = gen_len as f64 / decode_s;
    let l = st.layout.unwrap_or_default();
    let j = serde_json::json!({
        "endpoint": endpoint, "tp": l.tp, "ep": l.ep, "pp": l.pp,
        "prompt_len": prompt_len, "gen_len": gen_len,
        "time_to_first_token_s": out.first_token_s,
        "prompt_tokens_per_s": prompt_len as f64 / out.first_token_s,
        "decode_tokens_per_s": decode_tps,
        "per_step": per_worker,
    });
    if json {
        println!("{j}");
    } else {
        println!("layout  tp={} ep={} pp={}", l.tp, l.ep, l.pp);
        println!(
            "prefill {:.1} tokens/s (time to first token {:.3} s, {prompt_len} tokens)",
            prompt_len as f64 / out.first_token_s,
            out.first_token_s
        );
        println!("decode  {decode_tps:.2} tokens/s ({gen_len} tokens, batch 1)");
        println!("per step (prefill and decode), by rank:");
        for w in &per_worker {
            println!(
                "  rank {}: {:.2} ms in the step = {:.2} ms compute + {:.2} ms collectives (waiting included)",
                w["rank"], w["step_ms"].as_f64().unwrap_or(0.0), w["compute_ms"].as_f64().unwrap_or(0.0), w["comm_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    Ok(())
}

fn clone_gen(a: &RemoteGenerate) -> RemoteGenerate {
    RemoteGenerate {
        logits_out: None,
        ..a.clone()
    }
}

/// One concurrency level of `grokctl bench serve`.
pub struct ServeBenchResult {
    pub concurrency: usize,
    pub requests: usize,
    pub seconds: f64,
    pub output_tokens: usize,
    pub ttft: Vec<f64>,
    pub itl: Vec<f64>,
    /// Steps of the level (the busiest rank's), their mean time on a rank, and the bytes all
    /// ranks sent through their collectives per step (from the cluster's status).
    pub steps: u64,
    pub step_s: f64,
    pub comm_bytes_per_step: f64,
}

impl ServeBenchResult {
    /// Fills the step figures from the cluster's status before and after the level.
    pub fn steps_from(
        &mut self,
        before: &pb::ClusterStatusResponse,
        after: &pb::ClusterStatusResponse,
    ) {
        let d: Vec<(u64, f64, u64)> = after
            .shards
            .iter()
            .filter_map(|x| {
                let y = before.shards.iter().find(|y| y.rank == x.rank)?;
                Some((
                    x.steps.saturating_sub(y.steps),
                    x.step_seconds - y.step_seconds,
                    x.comm_bytes.saturating_sub(y.comm_bytes),
                ))
            })
            .collect();
        self.steps = d.iter().map(|x| x.0).max().unwrap_or(0);
        let steps: u64 = d.iter().map(|x| x.0).sum();
        self.step_s = d.iter().map(|x| x.1).sum::<f64>() / steps.max(1) as f64;
        self.comm_bytes_per_step =
            d.iter().map(|x| x.2).sum::<u64>() as f64 / self.steps.max(1) as f64;
    }
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    let i = ((p / 100.0) * (v.len() - 1) as f64).round() as usize;
    v[i.min(v.len() - 1)]
}

impl ServeBenchResult {
    pub fn json(&mut self) -> serde_json::Value {
        serde_json::json!({
            "concurrency": self.concurrency,
            "requests": self.requests,
            "duration_s": self.seconds,
            "request_throughput_per_s": self.requests as f64 / self.seconds,
            "output_tokens_per_s": self.output_tokens as f64 / self.seconds,
            "ttft_p50_ms": percentile(&mut self.ttft, 50.0) * 1e3,
            "ttft_p99_ms": percentile(&mut self.ttft, 99.0) * 1e3,
            "itl_p50_ms": percentile(&mut self.itl, 50.0) * 1e3,
            "itl_p99_ms": percentile(&mut self.itl, 99.0) * 1e3,
            "steps": self.steps,
            "step_ms": self.step_s * 1e3,
            "collective_bytes_per_step": self.comm_bytes_per_step,
        })
    }
}

/// Sends `requests` generations with `concurrency` in flight at a time, like vLLM's serving
/// benchmark: random token-id prompts of `prompt_len`, exactly `gen_len` tokens each.
pub async fn bench_serve_level(
    endpoint: &str,
    concurrency: usize,
    requests: usize,
    prompt_len: usize,
    gen_len: usize,
    vocab: u32,
) -> Result<ServeBenchResult> {
    let ch = channel(endpoint).await?;
    let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..requests {
        let permit = sem.clone().acquire_owned().await.expect("semaphore");
        let mut c = grok_proto::limited!(pb::inference_client::InferenceClient::new(ch.clone()));
        let mut rng = grok_shared::sampling::Rng::new(1000 + i as u64);
        let ids: Vec<u32> = (0..prompt_len)
            .map(|_| 3 + (rng.next_u64() % (vocab as u64 - 3)) as u32)
            .collect();
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let start = Instant::now();
            let mut s = c
                .generate(crate::auth::request(pb::GenerateRequest {
                    prompt: Some(pb::generate_request::Prompt::Ids(pb::TokenIds { ids })),
                    max_tokens: gen_len as u32,
                    ignore_eos: true,
                    ..Default::default()
                }))
                .await
                .map_err(rpc_error)?
                .into_inner();
            let mut ttft = None;
            let mut last = start;
            let mut itl = Vec::new();
            let mut n = 0usize;
            while let Some(m) = s.next().await {
                let m = m.map_err(rpc_error)?;
                if m.ids.is_empty() {
                    continue;
                }
                let now = Instant::now();
                match ttft {
                    None => ttft = Some((now - start).as_secs_f64()),
                    Some(_) => itl.push((now - last).as_secs_f64()),
                }
                last = now;
                n += m.ids.len();
            }
            anyhow::Ok((ttft.unwrap_or(0.0), itl, n))
        }));
    }
    let mut r = ServeBenchResult {
        concurrency,
        requests,
        seconds: 0.0,
        output_tokens: 0,
        ttft: vec![],
        itl: vec![],
        steps: 0,
        step_s: 0.0,
        comm_bytes_per_step: 0.0,
    };
    for t in tasks {
        let (ttft, itl, n) = t.await.context("benchmark task")??;
        r.ttft.push(ttft);
        r.itl.extend(itl);
        r.output_tokens += n;
    }
    r.seconds = t0.elapsed().as_secs_f64();
    Ok(r)
}

pub async fn bench_serve(
    endpoint: &str,
    levels: &[usize],
    requests: usize,
    prompt_len: usize,
    gen_len: usize,
    json: bool,
) -> Result<()> {
    let st = fetch_status(endpoint).await?;
    if st.state != "ready" {
        bail!("the cluster is not ready (state {})", st.state);
    }
    let mut info = grok_proto::limited!(pb::inference_client::InferenceClient::new(
        channel(endpoint).await?
    ));
    let cfg: serde_json::Value = serde_json::from_str(
        &info
            .model_info(pb::ModelInfoRequest {})
            .await?
            .into_inner()
            .config_json,
    )?;
    let vocab = cfg["vocab_size"].as_u64().unwrap_or(256) as u32;
    if !json {
        println!(
            "{:>11} {:>9} {:>10} {:>13} {:>10} {:>10} {:>10} {:>10} {:>10} {:>12}",
            "concurrency",
            "requests",
            "req/s",
            "output tok/s",
            "TTFT p50",
            "TTFT p99",
            "ITL p50",
            "ITL p99",
            "step",
            "comm B/step"
        );
    }
    let mut all = Vec::new();
    for &c in levels {
        let before = fetch_status(endpoint).await?;
        let mut r = bench_serve_level(endpoint, c, requests, prompt_len, gen_len, vocab).await?;
        let after = fetch_status(endpoint).await?;
        r.steps_from(&before, &after);
        let j = r.json();
        if !json {
            println!(
                "{:>11} {:>9} {:>10.2} {:>13.1} {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>8.1}ms {:>12.0}",
                c,
                requests,
                j["request_throughput_per_s"].as_f64().unwrap_or(0.0),
                j["output_tokens_per_s"].as_f64().unwrap_or(0.0),
                j["ttft_p50_ms"].as_f64().unwrap_or(0.0),
                j["ttft_p99_ms"].as_f64().unwrap_or(0.0),
                j["itl_p50_ms"].as_f64().unwrap_or(0.0),
                j["itl_p99_ms"].as_f64().unwrap_or(0.0),
                r.step_s * 1e3,
                r.comm_bytes_per_step
            );
        }
        all.push(j);
    }
    if json {
        println!(
            "{}",
            serde_json::json!({"endpoint": endpoint, "prompt_len": prompt_len, "gen_len": gen_len, "levels": all})
        );
    }
    Ok(())
}

/// `grokctl rebalance`: more copies for the busiest experts; prints the placement.
pub async fn rebalance(endpoint: &str, ask: pb::RebalanceRequest, json: bool) -> Result<()> {
    let mut c = grok_proto::limited!(pb::admin_client::AdminClient::new(channel(endpoint).await?));
    let r = c
        .rebalance(crate::auth::request(ask))
        .await
        .map_err(rpc_error)?
        .into_inner();
    let ranks =
        |p: &[pb::ExpertRanks]| -> Vec<Vec<u32>> { p.iter().map(|x| x.ranks.clone()).collect() };
    let (before, after) = (ranks(&r.before), ranks(&r.after));
    let applied = !ask.dry_run && before != after;
    if json {
        println!(
            "{}",
            serde_json::json!({"replica": ask.replica, "routed": r.routed, "before": before, "after": after,
                "max_rank_share_before": r.max_rank_share_before, "max_rank_share_after": r.max_rank_share_after,
                "applied": applied})
        );
        return Ok(());
    }
    println!(
        "{:>6} {:>10}  {:<16} {:<16}",
        "expert", "routed", "ranks before", "ranks after"
    );
    for (e, (b, a)) in before.iter().zip(&after).enumerate() {
        println!(
            "{e:>6} {:>10}  {:<16} {:<16}",
            r.routed.get(e).copied().unwrap_or(0),
            format!("{b:?}"),
            format!("{a:?}")
        );
    }
    println!(
        "busiest rank's expected share of the expert work: {:.1}% -> {:.1}%",
        r.max_rank_share_before * 100.0,
        r.max_rank_share_after * 100.0
    );
    if before == after {
        println!("no copy would lower the busiest rank's load: the placement is unchanged");
    } else if ask.dry_run {
        println!("dry run: nothing applied");
    } else {
        println!("applied: the replica loads the new copies and serves again");
    }
    Ok(())
}

/// `grokctl drain`: stop admitting, wait until in-flight requests finish, report drained.
pub async fn drain(
    endpoint: &str,
    worker: Option<String>,
    resume: bool,
    timeout_s: u64,
) -> Result<()> {
    let mut c = grok_proto::limited!(pb::admin_client::AdminClient::new(channel(endpoint).await?));
    let ask = pb::DrainRequest {
        worker_id: worker.clone().unwrap_or_default(),
        resume,
    };
    let r = c
        .drain(crate::auth::request(ask.clone()))
        .await
        .map_err(rpc_error)?
        .into_inner();
    if resume {
        println!("{}: {}", endpoint, r.state);
        return Ok(());
    }
    let start = Instant::now();
    // Asking again is harmless and answers for what was drained (the cluster, or the
    // worker's replica).
    loop {
        let s = c
            .drain(crate::auth::request(ask.clone()))
            .await
            .map_err(rpc_error)?
            .into_inner();
        if s.running_sequences == 0 && s.queued_requests == 0 {
            println!("drained: no request running or waiting (state {})", s.state);
            return Ok(());
        }
        if start.elapsed() > Duration::from_secs(timeout_s) {
            bail!(
                "not drained after {timeout_s} s: {} running, {} waiting",
                s.running_sequences,
                s.queued_requests
            );
        }
        eprintln!(
            "draining: {} running, {} waiting",
            s.running_sequences, s.queued_requests
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
