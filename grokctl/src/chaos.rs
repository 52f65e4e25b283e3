//! `grokctl bench chaos`: a seeded, bounded fault schedule against a local cluster under
//! continuous load, and what it cost.
//!
//! The cluster is started here (coordinator and workers as local processes, as `grokctl up`
//! does). Every request is seeded, so its tokens are known from a fault-free run made first;
//! then `--clients` streaming clients send requests in a loop while faults are injected one at
//! a time: SIGKILL of a worker and its restart for the same rank (`kill`), SIGSTOP and SIGCONT
//! of a worker (`stop`). After each fault the replica must serve again by itself. The report:
//! requests completed, failed with a retryable error (each retried until it succeeds), lost
//! (hung past the request deadline, a non-retryable error, or tokens other than the fault-free
//! run's), time to recover (from the fault's end to the replica serving) p50 and max, and any
//! replica left down. It exits non-zero when anything was lost or left down.

use crate::up::{die_with_parent, sibling};
use anyhow::{bail, Context, Result};
use grok_proto::v1 as pb;
use grok_shared::sampling::Rng;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_stream::StreamExt;

#[derive(clap::Args)]
pub struct ChaosArgs {
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value_t = 2)]
    pub tp: usize,
    #[arg(long, default_value_t = 2)]
    pub replicas: usize,
    /// Concurrent streaming clients.
    #[arg(long, default_value_t = 8)]
    pub clients: usize,
    /// How long faults are injected (the clients' last requests finish after).
    #[arg(long, default_value_t = 120)]
    pub duration_s: u64,
    /// Seed of the fault schedule (which fault, which worker, how long).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Fault kinds to draw from.
    #[arg(long, value_delimiter = ',', default_value = "kill,stop")]
    pub faults: Vec<String>,
    /// Mean seconds of load between a recovery and the next fault.
    #[arg(long, default_value_t = 4.0)]
    pub interval_s: f64,
    /// Tokens per request.
    #[arg(long, default_value_t = 48)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 1)]
    pub threads_per_worker: usize,
    #[arg(long)]
    pub json: bool,
}

/// What one run of the schedule measured.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct ChaosReport {
    pub faults: Vec<String>,
    pub completed: u64,
    /// Attempts that ended with a retryable error (UNAVAILABLE, RESOURCE_EXHAUSTED).
    pub failed_retryable: u64,
    /// Requests still failing (retryable) when the run's last deadline passed.
    pub retries_exhausted: u64,
    /// Hung, non-retryable error, or wrong tokens.
    pub lost: u64,
    pub lost_detail: Vec<String>,
    /// Seconds from each fault's end to its replica serving again.
    pub recover_s: Vec<f64>,
    pub recover_p50_s: f64,
    pub recover_max_s: f64,
    pub replicas_left_down: u64,
}

const REQUEST_DEADLINE: Duration = Duration::from_secs(120);
const RECOVERY_DEADLINE: Duration = Duration::from_secs(90);

struct Worker {
    id: String,
    rank: usize,
    child: Option<Child>,
}

/// The processes of the cluster; killed when dropped.
struct Procs {
    coordinator: Child,
    workers: Vec<Worker>,
    worker_bin: PathBuf,
    addr: String,
    threads: usize,
}

impl Procs {
    fn start_worker(&mut self, i: usize) -> Result<()> {
        let w = &mut self.workers[i];
        let mut c = Command::new(&self.worker_bin);
        c.args(["--coordinator", &self.addr, "--listen", "127.0.0.1:0"])
            .args(["--id", &w.id, "--rank", &w.rank.to_string()])
            .args(["--threads", &self.threads.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut c);
        w.child = Some(c.spawn().context("starting a worker")?);
        Ok(())
    }

    fn signal(&self, i: usize, sig: i32) {
        if let Some(c) = &self.workers[i].child {
            // SAFETY: signalling our own child.
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(c) = &mut w.child {
                // SAFETY: our own child; SIGCONT first so that a stopped one can die.
                unsafe {
                    libc::kill(c.id() as i32, libc::SIGCONT);
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
    }
}

/// The request of pool entry `k`: a short prompt and a seed of its own.
fn request(k: usize, max_tokens: u32, vocab: u32) -> pb::GenerateRequest {
    let k32 = k as u32;
    pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::Ids(pb::TokenIds {
            ids: vec![
                1 + (k32 * 37) % (vocab - 1),
                1 + (k32 * 101 + 5) % (vocab - 1),
                1 + (k32 * 13 + 2) % (vocab - 1),
            ],
        })),
        max_tokens,
        temperature: 0.9,
        seed: 1000 + k as u64,
        ignore_eos: true,
        ..Default::default()
    }
}

type Client = pb::inference_client::InferenceClient<tonic::transport::Channel>;

/// One attempt: the ids, or the status it ended with.
async fn attempt(c: &mut Client, r: pb::GenerateRequest) -> Result<Vec<u32>, tonic::Status> {
    let mut s = c.generate(r).await?.into_inner();
    let mut ids = vec![];
    while let Some(m) = s.next().await {
        ids.extend(m?.ids);
    }
    Ok(ids)
}

fn retryable(s: &tonic::Status) -> bool {
    matches!(
        s.code(),
        tonic::Code::Unavailable | tonic::Code::ResourceExhausted
    )
}

async fn replicas_ready(addr: &str) -> Option<Vec<bool>> {
    let s = crate::client::fetch_status(addr).await.ok()?;
    let n = s.layout.as_ref().map_or(1, |l| l.replicas.max(1)) as usize;
    let mut ready = vec![true; n];
    for sh in &s.shards {
        if sh.state != "ready" {
            ready[sh.replica as usize] = false;
        }
    }
    Some(ready)
}

pub async fn run(a: &ChaosArgs) -> Result<ChaosReport> {
    for f in &a.faults {
        if f != "kill" && f != "stop" {
            bail!("unknown fault `{f}`: use kill, stop");
        }
    }
    if a.faults.is_empty() || a.clients == 0 || a.tp == 0 || a.replicas == 0 || a.max_tokens == 0 {
        bail!("--faults, --clients, --tp, --replicas and --max-tokens must not be empty or zero");
    }
    let cfg = grok_shared::config::ModelConfig::from_file(&a.model.join("config.json"))
        .with_context(|| format!("reading the model at {}", a.model.display()))?;
    let vocab = cfg.vocab_size as u32;
    let coord_bin = sibling("grok-coordinator")?;
    let worker_bin = sibling("grok-worker")?;
    let mut cmd = Command::new(&coord_bin);
    cmd.arg("--model")
        .arg(&a.model)
        .args(["--tp", &a.tp.to_string()])
        .args(["--replicas", &a.replicas.to_string()])
        .args(["--listen", "127.0.0.1:0", "--comm-timeout-ms", "3000"])
        .args(["--fault-hold-ms", "30000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    die_with_parent(&mut cmd);
    let mut coordinator = cmd.spawn().context("starting the coordinator")?;
    let out = coordinator.stdout.take().expect("piped");
    let addr = tokio::task::spawn_blocking(move || {
        use std::io::BufRead;
        let mut l = String::new();
        let _ = std::io::BufReader::new(out).read_line(&mut l);
        l.trim().strip_prefix("listening on ").map(str::to_string)
    })
    .await?
    .context("the coordinator did not start")?;
    let world = a.tp * a.replicas;
    let mut procs = Procs {
        coordinator,
        workers: (0..world)
            .map(|r| Worker {
                id: format!("chaos-w{r}"),
                rank: r,
                child: None,
            })
            .collect(),
        worker_bin,
        addr: addr.clone(),
        threads: a.threads_per_worker,
    };
    for i in 0..world {
        procs.start_worker(i)?;
    }
    let t = Instant::now();
    while replicas_ready(&addr)
        .await
        .is_none_or(|r| r.iter().any(|x| !x))
    {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("the cluster is not ready after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ch = crate::client::channel(&addr).await?;
    let client = grok_proto::limited!(Client::new(ch));
    // The fault-free tokens of every request of the pool.
    let pool = a.clients * 2;
    eprintln!("chaos: {pool} fault-free reference requests");
    let mut reference = Vec::with_capacity(pool);
    for k in 0..pool {
        let mut c = client.clone();
        let ids = attempt(&mut c, request(k, a.max_tokens, vocab))
            .await
            .map_err(|s| anyhow::anyhow!("a fault-free request failed: {}", s.message()))?;
        reference.push(ids);
    }
    let reference = Arc::new(reference);

    let stop = Arc::new(AtomicBool::new(false));
    let counts = Arc::new([
        AtomicU64::new(0), // completed
        AtomicU64::new(0), // failed retryable
        AtomicU64::new(0), // retries exhausted
    ]);
    let lost = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut clients = vec![];
    for ci in 0..a.clients {
        let (mut c, stop, counts, lost, reference) = (
            client.clone(),
            stop.clone(),
            counts.clone(),
            lost.clone(),
            reference.clone(),
        );
        let max_tokens = a.max_tokens;
        clients.push(tokio::spawn(async move {
            let mut j = 0;
            while !stop.load(Ordering::Relaxed) {
                let k = (ci + j * 7) % reference.len();
                j += 1;
                // Retry a retryable failure until it succeeds (or the run ends).
                loop {
                    let r = tokio::time::timeout(
                        REQUEST_DEADLINE,
                        attempt(&mut c, request(k, max_tokens, vocab)),
                    )
                    .await;
                    match r {
                        Err(_) => {
                            grok_shared::sync::lock(&lost)
                                .push(format!("request {k} hung past {REQUEST_DEADLINE:?}"));
                        }
                        Ok(Ok(ids)) if ids == reference[k] => {
                            counts[0].fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Ok(ids)) => grok_shared::sync::lock(&lost).push(format!(
                            "request {k}: {} tokens other than the fault-free run's",
                            ids.iter()
                                .zip(reference[k].iter())
                                .filter(|(x, y)| x != y)
                                .count()
                                + ids.len().abs_diff(reference[k].len())
                        )),
                        Ok(Err(s)) if retryable(&s) => {
                            counts[1].fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(250)).await;
                            continue;
                        }
                        Ok(Err(s)) => grok_shared::sync::lock(&lost).push(format!(
                            "request {k}: {:?}: {}",
                            s.code(),
                            s.message()
                        )),
                    }
                    break;
                }
            }
        }));
    }

    let mut rng = Rng::new(a.seed);
    let mut report = ChaosReport::default();
    let end = Instant::now() + Duration::from_secs(a.duration_s);
    while Instant::now() < end {
        let wait = a.interval_s * (0.5 + rng.next_f64());
        tokio::time::sleep(Duration::from_secs_f64(wait)).await;
        if Instant::now() >= end {
            break;
        }
        let kind = &a.faults[(rng.next_u64() % a.faults.len() as u64) as usize];
        let i = (rng.next_u64() % world as u64) as usize;
        let replica = i / a.tp;
        let ended = match kind.as_str() {
            "kill" => {
                procs.signal(i, libc::SIGKILL);
                if let Some(c) = &mut procs.workers[i].child {
                    let _ = c.wait();
                }
                tokio::time::sleep(Duration::from_millis(500 + rng.next_u64() % 1500)).await;
                procs.start_worker(i)?;
                Instant::now()
            }
            _ => {
                procs.signal(i, libc::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(2000 + rng.next_u64() % 5000)).await;
                procs.signal(i, libc::SIGCONT);
                Instant::now()
            }
        };
        let what = format!(
            "{kind} worker {} (replica {replica}) at {:.1} s",
            procs.workers[i].id,
            (Instant::now() - (end - Duration::from_secs(a.duration_s))).as_secs_f64()
        );
        eprintln!("chaos: {what}");
        // The replica serves again by itself (no operator), or it is counted as left down.
        let recovered = loop {
            if replicas_ready(&addr)
                .await
                .is_some_and(|r| r.get(replica).copied().unwrap_or(false))
            {
                break Some(ended.elapsed());
            }
            if ended.elapsed() > RECOVERY_DEADLINE {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        match recovered {
            Some(d) => {
                eprintln!(
                    "chaos: replica {replica} serves {:.2} s after",
                    d.as_secs_f64()
                );
                report.recover_s.push(d.as_secs_f64());
            }
            None => {
                eprintln!("chaos: replica {replica} still down {RECOVERY_DEADLINE:?} after");
                report.replicas_left_down += 1;
            }
        }
        report.faults.push(what);
    }
    stop.store(true, Ordering::Relaxed);
    // Each client finishes its request (retrying a retryable failure until it succeeds); one
    // still retrying after the deadline is counted.
    let last = Instant::now() + REQUEST_DEADLINE + Duration::from_secs(10);
    for c in clients {
        let left = last.saturating_duration_since(Instant::now());
        if tokio::time::timeout(left, c).await.is_err() {
            counts[2].fetch_add(1, Ordering::Relaxed);
        }
    }
    if let Some(r) = replicas_ready(&addr).await {
        report.replicas_left_down = report
            .replicas_left_down
            .max(r.iter().filter(|x| !**x).count() as u64);
    }
    report.completed = counts[0].load(Ordering::Relaxed);
    report.failed_retryable = counts[1].load(Ordering::Relaxed);
    report.retries_exhausted = counts[2].load(Ordering::Relaxed);
    report.lost_detail = grok_shared::sync::lock(&lost).clone();
    report.lost = report.lost_detail.len() as u64;
    let mut s = report.recover_s.clone();
    s.sort_by(f64::total_cmp);
    if !s.is_empty() {
        report.recover_p50_s = s[s.len() / 2];
        report.recover_max_s = s[s.len() - 1];
    }
    drop(procs);
    Ok(report)
}

/// Runs the schedule and prints the report; an error when anything was lost or left down.
pub async fn bench_chaos(a: &ChaosArgs) -> Result<()> {
    let r = run(a).await?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "faults {}  completed {}  failed (retryable) {}  retries unfinished {}  lost {}",
            r.faults.len(),
            r.completed,
            r.failed_retryable,
            r.retries_exhausted,
            r.lost
        );
        println!(
            "time to recover: p50 {:.2} s, max {:.2} s; replicas left down: {}",
            r.recover_p50_s, r.recover_max_s, r.replicas_left_down
        );
        for l in &r.lost_detail {
            println!("lost: {l}");
        }
    }
    if r.lost > 0 || r.replicas_left_down > 0 {
        bail!(
            "{} requests lost, {} replicas left down",
            r.lost,
            r.replicas_left_down
        );
    }
    Ok(())
}
