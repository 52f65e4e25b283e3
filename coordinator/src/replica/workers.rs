//! A serving replica's workers: a client and a step stream each, the health monitor, and the
//! fan-out of one step plan to every worker with its answers gathered.

use crate::cluster::Cluster;
use crate::state::WorkerState;
use grok_proto::v1 as pb;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

pub type WorkerClient = pb::worker_client::WorkerClient<tonic::transport::Channel>;

/// Every worker's health is asked this often; one that refuses the connection is lost at
/// once, one that has not answered for `LOST_AFTER` (a network partition) is lost then.
const HEALTH_PERIOD: Duration = Duration::from_millis(500);
const LOST_AFTER: Duration = Duration::from_secs(4);

/// One worker of a serving replica.
pub struct WorkerLink {
    /// Global rank (`replica * world + rank`).
    pub rank: usize,
    pub id: String,
    pub address: String,
    pub plans: mpsc::Sender<pb::StepPlan>,
    pub results: tonic::Streaming<pb::StepResult>,
    /// For the health monitor.
    pub client: WorkerClient,
}

/// Why a step did not complete.
pub enum StepFailure {
    /// A worker's stream broke or the monitor found it lost: the replica is gone.
    Lost(String),
    /// A worker reported an error for this step (or answered out of protocol).
    Failed(String),
}

/// The workers of one serving replica.
pub struct Workers {
    cluster: Arc<Cluster>,
    links: Vec<WorkerLink>,
    /// The global rank that samples (the last stage's first tensor-parallel rank).
    sampler: usize,
    /// Data-parallel attention: each worker runs its own sequences and samples them; a plan
    /// goes to each worker with its sequences only, and every worker's answer counts.
    dp: bool,
    /// A lost worker, as reported by the health monitor.
    lost_rx: watch::Receiver<Option<String>>,
    step_timeout: Duration,
    next_step: u64,
    /// The expert placement the workers were loaded with (data-parallel attention; empty
    /// otherwise).
    pub placement: grok_shared::sharding::Placement,
    /// KV blocks per worker the replica schedules against (the smallest its workers hold).
    pub kv_blocks: usize,
}

impl Workers {
    pub fn new(cluster: Arc<Cluster>, links: Vec<WorkerLink>, sampler: usize, dp: bool) -> Self {
        let lost_rx = spawn_monitor(cluster.clone(), &links);
        let step_timeout = Duration::from_millis(cluster.cfg.comm_timeout_ms as u64 + 10_000);
        let kv_blocks = cluster
            .cfg
            .kv_blocks
            .unwrap_or(grok_shared::model::DEFAULT_CPU_KV_BLOCKS);
        Workers {
            cluster,
            links,
            sampler,
            dp,
            lost_rx,
            step_timeout,
            next_step: 0,
            placement: Vec::new(),
            kv_blocks,
        }
    }

    /// Resolves when the monitor reports a lost worker.
    pub async fn lost(&mut self) -> String {
        lost_signal(&mut self.lost_rx).await
    }

    /// Sends one plan to every worker (they answer in order: [`Workers::receive`]).
    /// `spans`: the requests the step computes (the step's span is the first one's child and
    /// links to the others). Returns the step's span, to keep until its result arrives.
    /// With data-parallel attention `ranks[i]` is the worker (index in the replica) that runs
    /// `seqs[i]`, and each worker's plan holds its own sequences (every worker gets a plan,
    /// empty or not: it serves its experts to the others).
    pub async fn send(
        &mut self,
        seqs: Vec<pb::SeqStep>,
        ranks: &[usize],
        free: Vec<u64>,
        spans: &[&tracing::Span],
    ) -> Result<tracing::Span, StepFailure> {
        self.next_step += 1;
        let span = tracing::info_span!(
            "step",
            step_id = self.next_step,
            seqs = seqs.len(),
            rows = seqs.iter().map(|s| s.tokens.len()).sum::<usize>()
        );
        // Trace context only when spans are exported: this runs every step.
        let traceparent = if grok_proto::telemetry::exporting() {
            for (k, s) in spans.iter().enumerate() {
                if k == 0 {
                    grok_proto::telemetry::set_parent_span(&span, s);
                } else {
                    grok_proto::telemetry::add_link(&span, s);
                }
            }
            grok_proto::telemetry::traceparent(&span)
        } else {
            String::new()
        };
        let mut plan = pb::StepPlan {
            step_id: self.next_step,
            seqs: Vec::new(),
            free_seqs: free,
            traceparent,
        };
        let mut all = Some(seqs);
        for (k, l) in self.links.iter().enumerate() {
            plan.seqs = if self.dp {
                let all = all.as_ref().expect("kept with dp");
                all.iter()
                    .zip(ranks)
                    .filter(|(_, &r)| r == k)
                    .map(|(s, _)| s.clone())
                    .collect()
            } else {
                all.take().unwrap_or_else(|| plan.seqs.clone())
            };
            if l.plans.send(plan.clone()).await.is_err() {
                self.cluster.set_worker(l.rank, |w| {
                    w.state = WorkerState::Lost;
                    w.detail = "its step stream is closed".into();
                });
                return Err(StepFailure::Lost(format!(
                    "worker `{}` (rank {}, {}) was lost: its step stream is closed",
                    l.id, l.rank, l.address
                )));
            }
        }
        Ok(span)
    }

    /// Waits for every worker's answer to the oldest step sent and not yet received; returns
    /// the sampling rank's. `want_logits`: the logits the step asked of each sampling worker
    /// (one entry; with data-parallel attention one per worker). With data-parallel attention
    /// the answer merges every worker's: tokens and prompt scores, and logits in worker order.
    pub async fn receive(&mut self, want_logits: &[usize]) -> Result<pb::StepResult, StepFailure> {
        let mut out: Option<pb::StepResult> = None;
        let mut errors = Vec::new();
        let mut lost_err = None;
        for (k, l) in self.links.iter_mut().enumerate() {
            let want = if self.dp {
                want_logits.get(k).copied().unwrap_or(0)
            } else {
                want_logits.first().copied().unwrap_or(0)
            };
            let r = tokio::select! {
                r = read_result(&mut l.results, self.step_timeout, want) => r,
                why = lost_signal(&mut self.lost_rx) => return Err(StepFailure::Lost(why)),
            };
            match r {
                Err(why) => {
                    if lost_err.is_none() {
                        lost_err = Some(StepFailure::Lost(format!(
                            "worker `{}` (rank {}, {}) was lost: {why}",
                            l.id, l.rank, l.address
                        )));
                    }
                    self.cluster.set_worker(l.rank, |w| {
                        w.state = WorkerState::Lost;
                        w.detail = why.clone();
                    });
                }
                Ok(r) => {
                    self.cluster.set_worker(l.rank, |w| {
                        w.steps += 1;
                        w.step_seconds += r.compute_seconds;
                        w.comm_seconds += r.comm_seconds;
                        w.comm_bytes += r.comm_bytes;
                    });
                    if !r.expert_served.is_empty() {
                        self.cluster
                            .metrics
                            .add_expert_served(l.rank, &r.expert_served);
                    }
                    if !r.expert_counts.is_empty() {
                        self.cluster
                            .metrics
                            .add_expert_counts(r.first_layer as usize, &r.expert_counts);
                    }
                    if !r.error.is_empty() {
                        errors.push(r.error.clone());
                    }
                    if self.dp {
                        let o = out.get_or_insert_with(Default::default);
                        o.tokens.extend(r.tokens);
                        o.logits.extend(r.logits);
                        o.prompt_logprobs.extend(r.prompt_logprobs);
                    } else if l.rank == self.sampler {
                        out = Some(r);
                    }
                }
            }
        }
        if let Some(e) = lost_err {
            return Err(e);
        }
        if !errors.is_empty() {
            return Err(StepFailure::Failed(errors.join("; ")));
        }
        Ok(out.unwrap_or_default())
    }
}

/// Watches every worker's health until the replica ends; reports the first lost one.
fn spawn_monitor(cluster: Arc<Cluster>, links: &[WorkerLink]) -> watch::Receiver<Option<String>> {
    let workers: Vec<(usize, String, String, WorkerClient)> = links
        .iter()
        .map(|l| (l.rank, l.id.clone(), l.address.clone(), l.client.clone()))
        .collect();
    let (tx, rx) = watch::channel(None);
    tokio::spawn(async move {
        let mut last_ok = vec![Instant::now(); workers.len()];
        loop {
            tokio::select! {
                _ = tokio::time::sleep(HEALTH_PERIOD) => {}
                _ = tx.closed() => return,
            }
            let answers =
                futures_util::future::join_all(
                    workers.iter().map(|w| {
                        let mut c = w.3.clone();
                        async move {
                            tokio::time::timeout(LOST_AFTER, c.health(pb::HealthRequest {})).await
                        }
                    }),
                )
                .await;
            for (i, a) in answers.into_iter().enumerate() {
                let why = match a {
                    Ok(Ok(_)) => {
                        last_ok[i] = Instant::now();
                        continue;
                    }
                    Ok(Err(s)) if s.code() == tonic::Code::Unavailable => {
                        format!("it is unreachable ({})", s.message())
                    }
                    _ if last_ok[i].elapsed() >= LOST_AFTER => format!(
                        "no health answer for {:.1} s",
                        last_ok[i].elapsed().as_secs_f64()
                    ),
                    _ => continue,
                };
                let (rank, id, address, _) = &workers[i];
                cluster.set_worker(*rank, |w| {
                    w.state = WorkerState::Lost;
                    w.detail = why.clone();
                });
                let _ = tx.send(Some(format!(
                    "worker `{id}` (rank {rank}, {address}) was lost: {why}"
                )));
                return;
            }
        }
    });
    rx
}

/// Resolves when the monitor reports a lost worker.
async fn lost_signal(rx: &mut watch::Receiver<Option<String>>) -> String {
    loop {
        if let Some(why) = rx.borrow_and_update().clone() {
            return why;
        }
        if rx.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// A client of the worker at `addr`: over TLS with the coordinator's certificate as client
/// identity when the cluster uses TLS (workers accept only CA-signed clients), plaintext
/// otherwise.
pub async fn connect_worker(cluster: &Cluster, addr: &str) -> Result<WorkerClient, String> {
    let tls = cluster.cfg.tls.as_ref();
    let ep = grok_proto::tls::endpoint(addr, tls).map_err(|e| e.to_string())?;
    let ch = ep
        .connect_timeout(Duration::from_secs(5))
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(4))
        .connect()
        .await
        .map_err(|e| grok_proto::tls::explain(grok_proto::tls::error_chain(&e), tls.is_some()))?;
    Ok(grok_proto::limited!(pb::worker_client::WorkerClient::new(
        ch
    )))
}

/// Reads one step's result from a worker: its messages up to the one without `more`, the
/// logits concatenated (never more than the step asked for).
async fn read_result(
    results: &mut tonic::Streaming<pb::StepResult>,
    timeout: Duration,
    want_logits: usize,
) -> Result<pb::StepResult, String> {
    let mut logits = Vec::new();
    loop {
        let mut r = match tokio::time::timeout(timeout, results.message()).await {
            Err(_) => return Err(format!("no answer within {timeout:?}")),
            Ok(Err(s)) => return Err(s.message().to_string()),
            Ok(Ok(None)) => return Err("it closed its step stream".into()),
            Ok(Ok(Some(r))) => r,
        };
        if logits.len() + r.logits.len() > want_logits {
            return Err(format!(
                "it returned more than the {want_logits} logits the step asked for"
            ));
        }
        if !r.more {
            if !logits.is_empty() {
                logits.append(&mut r.logits);
                r.logits = logits;
            }
            return Ok(r);
        }
        logits.append(&mut r.logits);
    }
}
