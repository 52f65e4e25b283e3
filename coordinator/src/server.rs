//! The coordinator process: membership (workers register over gRPC and get a rank), loading
//! (every worker is told its peers and loads its shard concurrently), the step loop of the
//! replica, and the client-facing `Inference` and `Admin` services.
//!
//! The coordinator never holds model tensors: it plans steps (new tokens, KV block changes,
//! sampling parameters), and the sampling rank returns token ids.

use crate::engine::{self, GenEvent, Job, ReplicaHandle, RequestParams};
use anyhow::{Context, Result};
use grok_proto::v1 as pb;
use grok_shared::config::ModelConfig;
use grok_shared::sampling::SamplingParams;
use grok_shared::sharding::Layout;
use grok_shared::sync::lock;
use grok_shared::tokenizer::Tokenizer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub model_dir: PathBuf,
    pub layout: Layout,
    pub listen: SocketAddr,
    pub tokenizer: Option<PathBuf>,
    pub kv_blocks: usize,
    pub block_size: usize,
    pub comm_timeout_ms: u32,
    /// Requests waiting beyond this are refused at once.
    pub max_queue: usize,
    /// Sequences in the running batch.
    pub max_seqs: usize,
    /// Tokens per step (decode tokens plus prefill chunks).
    pub max_batch_tokens: usize,
    /// How long requests wait for a recovering replica when no other serves (milliseconds).
    pub fault_hold_ms: u64,
    /// The model name clients use (`/v1/models`, the `model` field).
    pub served_model_name: String,
    /// HTTP (OpenAI-compatible API, health, metrics) listen address.
    pub http_listen: Option<SocketAddr>,
    /// Bearer token the client APIs require (None: open).
    pub api_token: Option<String>,
    /// Mutual TLS (None: plaintext): the gRPC port serves TLS, registration needs a client
    /// certificate signed by the CA, and the coordinator presents its certificate to workers.
    pub tls: Option<grok_proto::tls::Tls>,
}

#[derive(Clone, Debug, Default)]
pub struct WorkerEntry {
    pub id: String,
    pub address: String,
    /// "cpu" or "cuda:N".
    pub device: String,
    pub world_comm: String,
    pub tp_comm: String,
    pub state: String,
    pub detail: String,
    pub fraction: f32,
    pub weight_bytes: u64,
    pub resident_bytes: u64,
    pub step_seconds: f64,
    pub comm_seconds: f64,
    pub steps: u64,
}

pub struct Shared {
    pub cfg: CoordinatorConfig,
    pub model: ModelConfig,
    pub tokenizer: Option<Tokenizer>,
    pub workers: Mutex<Vec<Option<WorkerEntry>>>,
    /// (state, detail): waiting_for_workers, loading, ready, failed.
    pub state: Mutex<(String, String)>,
    /// The serving replicas (None: not serving: loading, recovering, failed).
    pub replicas: Mutex<Vec<Option<ReplicaHandle>>>,
    /// (state, detail) of each replica; the cluster state is derived from them.
    pub replica_states: Mutex<Vec<(String, String)>>,
    /// Round-robin cursor over the serving replicas.
    pub next_replica: std::sync::atomic::AtomicUsize,
    /// Each replica's (running, waiting inside the engine, free KV blocks); the metrics' gauges
    /// are their sums.
    pub replica_load: Mutex<Vec<(u64, u64, u64)>>,
    pub generated: AtomicU64,
    pub metrics: crate::metrics::Metrics,
    /// (time, generated tokens, rate) of the last throughput sample.
    pub rate_sample: Mutex<(std::time::Instant, u64, f64)>,
    /// This coordinator process's id, sent with every Load: a worker names the coordinator
    /// that drives it, and only that one rejoins it by itself after a fault.
    pub instance: String,
    /// Per replica: a load is running (one at a time).
    pub loading: Vec<AtomicBool>,
    /// Per replica: it has served (a later load is a reload after a fault).
    pub served: Vec<AtomicBool>,
    /// Per replica: wakes its rejoin loop (a worker registered for one of its ranks).
    pub rejoin: Vec<tokio::sync::Notify>,
    /// Requests waiting for a replica to serve again (none was serving at their fault).
    pub parked: Mutex<Vec<engine::Parked>>,
}

impl Shared {
    pub fn set_state(&self, state: &str, detail: impl Into<String>) {
        let detail = detail.into();
        if state == "failed" {
            tracing::error!(%detail, "cluster failed");
        } else {
            tracing::info!(state, %detail, "cluster state");
        }
        *lock(&self.state) = (state.to_string(), detail);
    }

    /// Sets one replica's state and derives the cluster's: `ready` while any replica serves
    /// (kept `draining` during a drain), else the most advanced state of the others.
    pub fn set_replica_state(&self, r: usize, state: &str, detail: impl Into<String>) {
        let detail = detail.into();
        let (cluster, summary) = {
            let mut rs = lock(&self.replica_states);
            rs[r] = (state.to_string(), detail.clone());
            let n = rs.len();
            let serving = rs.iter().filter(|s| s.0 == "ready").count();
            let pick = [
                "ready",
                "loading",
                "recovering",
                "failed",
                "waiting_for_workers",
            ]
            .into_iter()
            .find(|st| rs.iter().any(|s| s.0 == *st))
            .unwrap_or("failed");
            let summary = if n == 1 {
                detail.clone()
            } else {
                let each: Vec<String> = rs
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| s.0 != "ready")
                    .map(|(i, s)| format!("replica {i} {}: {}", s.0, s.1))
                    .collect();
                format!(
                    "{serving} of {n} replicas serving{}{}",
                    if each.is_empty() { "" } else { "; " },
                    each.join("; ")
                )
            };
            (pick, summary)
        };
        let draining = lock(&self.state).0 == "draining";
        if draining && cluster == "ready" {
            *lock(&self.state) = ("draining".into(), summary);
        } else {
            self.set_state(cluster, summary);
        }
    }

    /// Records one replica's load and sets the gauges to the sums over the replicas.
    pub fn set_replica_load(&self, r: usize, load: (u64, u64, u64)) {
        let (running, free, blocks) = {
            let mut l = lock(&self.replica_load);
            l[r] = load;
            (
                l.iter().map(|x| x.0).sum::<u64>(),
                l.iter().map(|x| x.2).sum::<u64>(),
                (self.cfg.kv_blocks * l.len()) as u64,
            )
        };
        let m = &self.metrics;
        m.running.store(running, Ordering::Relaxed);
        m.kv_free.store(free, Ordering::Relaxed);
        m.kv_used.store(blocks - free, Ordering::Relaxed);
    }

    pub fn set_worker(&self, rank: usize, f: impl FnOnce(&mut WorkerEntry)) {
        if let Some(Some(w)) = lock(&self.workers).get_mut(rank) {
            f(w);
        }
    }

    /// Generated tokens per second since the previous sample (taken at most once a second).
    fn tokens_per_s(&self) -> f64 {
        let now = std::time::Instant::now();
        let total = self.generated.load(Ordering::Relaxed);
        let mut s = lock(&self.rate_sample);
        let dt = (now - s.0).as_secs_f64();
        if dt >= 1.0 {
            s.2 = (total - s.1) as f64 / dt;
            *s = (now, total, s.2);
        }
        s.2
    }

    fn status(&self) -> pb::ClusterStatusResponse {
        let (state, detail) = lock(&self.state).clone();
        let l = self.cfg.layout;
        let workers = lock(&self.workers).clone();
        let shards = (0..workers.len())
            .map(|r| {
                let (replica, local) = (r / l.world_size(), r % l.world_size());
                let p = l.place(local);
                let s = l.shard(&self.model, local);
                let w = workers[r].clone().unwrap_or_else(|| WorkerEntry {
                    state: "waiting".into(),
                    ..Default::default()
                });
                let experts: Vec<String> = s
                    .experts
                    .iter()
                    .map(|(e, f)| {
                        if f.len() == self.model.ffn_size {
                            e.to_string()
                        } else {
                            format!("{e}[{}..{}]", f.start, f.end)
                        }
                    })
                    .collect();
                pb::ShardStatus {
                    rank: r as u32,
                    worker_id: w.id,
                    address: w.address,
                    state: w.state,
                    detail: w.detail,
                    stage: p.stage as u32,
                    tp_rank: p.tp_rank as u32,
                    layers: format!("{}..{}", s.layers.start, s.layers.end),
                    heads: format!(
                        "q {}..{} kv {}..{}",
                        s.q_heads.start, s.q_heads.end, s.kv_heads.start, s.kv_heads.end
                    ),
                    experts: experts.join(","),
                    weight_bytes: w.weight_bytes,
                    load_fraction: w.fraction,
                    resident_bytes: w.resident_bytes,
                    step_seconds: w.step_seconds,
                    comm_seconds: w.comm_seconds,
                    steps: w.steps,
                    replica: replica as u32,
                }
            })
            .collect();
        pb::ClusterStatusResponse {
            model: self.cfg.model_dir.display().to_string(),
            layout: Some(pb::Layout {
                tp: l.tp as u32,
                ep: l.ep as u32,
                pp: l.pp as u32,
                replicas: l.replicas as u32,
            }),
            state,
            detail,
            shards,
            generated_tokens: self.generated.load(Ordering::Relaxed),
            kv_blocks_used: self.metrics.kv_used.load(Ordering::Relaxed),
            kv_blocks_free: self.metrics.kv_free.load(Ordering::Relaxed),
            running_sequences: self.metrics.running.load(Ordering::Relaxed),
            // Waiting in the queues and inside the engines (admitted but not yet running).
            queued_requests: self.metrics.queue_depth.load(Ordering::Relaxed)
                + lock(&self.replica_load).iter().map(|l| l.1).sum::<u64>(),
            tokens_per_s: self.tokens_per_s(),
        }
    }
}

#[derive(Clone)]
struct Svc(Arc<Shared>);

#[tonic::async_trait]
impl pb::cluster_server::Cluster for Svc {
    async fn register(
        &self,
        req: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        // With TLS on, only a peer whose certificate the CA verified (at the handshake) joins.
        if self.0.cfg.tls.is_some() && req.peer_certs().is_none_or(|c| c.is_empty()) {
            tracing::warn!(peer = ?req.remote_addr(), "registration refused: no client certificate");
            return Err(Status::unauthenticated(
                "registration needs a client certificate signed by the cluster's CA: start the worker with --tls-ca, --tls-cert and --tls-key",
            ));
        }
        if lock(&self.0.state).0 == "standby" {
            return Err(Status::unavailable(
                "this coordinator is a standby: register with the leader (see its status)",
            ));
        }
        admit(&self.0, &req.into_inner()).map(Response::new)
    }
}

/// Admits a worker into the rank it asks for (or the first free one): the Register RPC and the
/// etcd discovery both come here. The registration that completes a replica starts its load.
pub fn admit(s: &Arc<Shared>, r: &pb::RegisterRequest) -> Result<pb::RegisterResponse, Status> {
    let per_replica = s.cfg.layout.world_size();
    let world = per_replica * s.cfg.layout.replicas.max(1);
    let for_addr = |a: &str| {
        a.parse::<SocketAddr>()
            .map_err(|_| Status::invalid_argument(format!("bad address `{a}`")))
    };
    for_addr(&r.address)?;
    for_addr(&r.world_comm_address)?;
    for_addr(&r.tp_comm_address)?;
    // A rank whose worker was lost can be taken again (by the same id, restarted, or another).
    let held = |w: &Option<WorkerEntry>| w.as_ref().is_some_and(|w| w.state != "lost");
    let (rank, complete) = {
        let mut ws = lock(&s.workers);
        if let Some(i) = ws
            .iter()
            .position(|w| held(w) && w.as_ref().is_some_and(|w| w.id == r.worker_id))
        {
            return Err(Status::already_exists(format!(
                "worker id `{}` is already registered as rank {i}",
                r.worker_id
            )));
        }
        let rank = if r.rank >= 0 {
            let k = r.rank as usize;
            if k >= world {
                return Err(Status::invalid_argument(format!(
                    "rank {k} is outside this cluster's {world} ranks (layout tp={} pp={}, {} replicas)",
                    s.cfg.layout.tp, s.cfg.layout.pp, s.cfg.layout.replicas.max(1)
                )));
            }
            if let Some(w) = ws[k].as_ref().filter(|w| w.state != "lost") {
                return Err(Status::already_exists(format!(
                    "rank {k} is already held by worker `{}` at {}",
                    w.id, w.address
                )));
            }
            k
        } else {
            ws.iter().position(|w| !held(w)).ok_or_else(|| {
                Status::resource_exhausted(format!(
                    "all {world} ranks of the layout are taken; this worker is not needed"
                ))
            })?
        };
        ws[rank] = Some(WorkerEntry {
            id: r.worker_id.clone(),
            address: r.address.clone(),
            world_comm: r.world_comm_address.clone(),
            tp_comm: r.tp_comm_address.clone(),
            device: r.device.clone(),
            state: "registered".into(),
            ..Default::default()
        });
        // Only the registration that fills the last rank of its replica starts that
        // replica's load (the first one, or the reload after a lost worker was replaced).
        let replica = rank / per_replica;
        let mine = &ws[replica * per_replica..(replica + 1) * per_replica];
        (rank, mine.iter().all(held))
    };
    tracing::info!(worker = %r.worker_id, rank, address = %r.address, "worker registered");
    if complete {
        let replica = rank / per_replica;
        if s.served[replica].load(Ordering::Acquire) {
            // A replacement for a lost rank: the replica's rejoin loop reloads it.
            s.rejoin[replica].notify_one();
        } else {
            let shared = s.clone();
            tokio::spawn(async move {
                let _ = engine::load_and_serve(shared, replica).await;
            });
        }
    }
    Ok(pb::RegisterResponse {
        rank: rank as u32,
        world_size: world as u32,
    })
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Svc {
    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(self.0.status()))
    }

    async fn drain(
        &self,
        req: Request<pb::DrainRequest>,
    ) -> Result<Response<pb::DrainResponse>, Status> {
        let r = req.into_inner();
        let rank = if r.worker_id.is_empty() {
            None
        } else {
            let at = lock(&self.0.workers)
                .iter()
                .position(|w| w.as_ref().is_some_and(|w| w.id == r.worker_id));
            Some(at.ok_or_else(|| {
                Status::not_found(format!("no worker `{}` in this cluster", r.worker_id))
            })?)
        };
        // With several replicas, draining a worker drains its replica only: the others serve on.
        if let (Some(rank), true) = (rank, self.0.cfg.layout.replicas > 1) {
            let ri = rank / self.0.cfg.layout.world_size();
            let state = lock(&self.0.replica_states)[ri].0.clone();
            match (r.resume, state.as_str()) {
                (false, "ready") => self.0.set_replica_state(
                    ri,
                    "draining",
                    format!("drained for worker `{}`: no new requests", r.worker_id),
                ),
                (true, "draining") => {
                    self.0
                        .set_replica_state(ri, "ready", "serving again after a drain")
                }
                (false, "draining") | (true, "ready") => {}
                (_, other) => {
                    return Err(Status::failed_precondition(format!(
                        "replica {ri} (worker `{}`) is {other}, not serving",
                        r.worker_id
                    )));
                }
            }
            let load = lock(&self.0.replica_load)[ri];
            let queued = lock(&self.0.replicas)[ri]
                .as_ref()
                .map_or(0, |h| h.queued() as u64);
            return Ok(Response::new(pb::DrainResponse {
                state: lock(&self.0.replica_states)[ri].0.clone(),
                running_sequences: load.0,
                queued_requests: load.1 + queued,
            }));
        }
        let state = lock(&self.0.state).0.clone();
        match (r.resume, state.as_str()) {
            (false, "ready") => self
                .0
                .set_state("draining", "no new requests; in-flight ones finish"),
            (false, "draining") => {}
            (true, "draining") => self.0.set_state("ready", "serving again after a drain"),
            (true, "ready") => {}
            (_, other) => {
                return Err(Status::failed_precondition(format!(
                    "the cluster is {other}, not serving"
                )));
            }
        }
        let st = self.0.status();
        Ok(Response::new(pb::DrainResponse {
            state: st.state,
            running_sequences: st.running_sequences,
            queued_requests: st.queued_requests,
        }))
    }
}

/// A request rejected before it reaches the engine: the field at fault and why.
#[derive(Debug)]
pub struct ApiError {
    pub code: tonic::Code,
    pub field: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    pub fn invalid(field: &'static str, message: impl Into<String>) -> Self {
        Self {
            code: tonic::Code::InvalidArgument,
            field: Some(field),
            message: message.into(),
        }
    }
    pub fn status(&self) -> Status {
        Status::new(self.code, self.message.clone())
    }
}

/// The prompt of a request, as text or token ids.
pub enum PromptInput {
    Text(String),
    Ids(Vec<u32>),
}

/// Checks everything a caller can get wrong and builds the engine job.
pub fn build_job(
    s: &Shared,
    prompt: PromptInput,
    p: RequestParams,
    traceparent: Option<&str>,
) -> Result<(Job, tokio::sync::mpsc::UnboundedReceiver<GenEvent>), ApiError> {
    let c = &s.model;
    let prompt = match prompt {
        PromptInput::Text(t) => {
            let tok = s.tokenizer.as_ref().ok_or_else(|| ApiError {
                code: tonic::Code::FailedPrecondition,
                field: Some("prompt"),
                message:
                    "this cluster has no tokenizer: send token ids, or start it with --tokenizer"
                        .into(),
            })?;
            tok.encode(&t)
                .map_err(|e| ApiError::invalid("prompt", e.to_string()))?
        }
        PromptInput::Ids(ids) => ids,
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "the prompt is empty"));
    }
    if let Some((pos, id)) = prompt
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= c.vocab_size)
    {
        return Err(ApiError::invalid(
            "prompt",
            format!(
                "token id {id} at position {pos} is outside the vocabulary (size {})",
                c.vocab_size
            ),
        ));
    }
    let ctx = c.max_position_embeddings;
    if prompt.len() >= ctx {
        return Err(ApiError::invalid(
            "prompt",
            format!("the prompt has {} tokens; the context length is {ctx} (room is needed for at least one new token)", prompt.len()),
        ));
    }
    if p.max_tokens == 0 {
        return Err(ApiError::invalid(
            "max_tokens",
            "max_tokens must be at least 1",
        ));
    }
    if prompt.len() + p.max_tokens > ctx {
        return Err(ApiError::invalid(
            "max_tokens",
            format!(
                "prompt ({} tokens) + max_tokens ({}) exceeds the context length {ctx}",
                prompt.len(),
                p.max_tokens
            ),
        ));
    }
    let cache = s.cfg.kv_blocks * s.cfg.block_size;
    if prompt.len() + 1 > cache {
        return Err(ApiError {
            code: tonic::Code::InvalidArgument,
            field: Some("prompt"),
            message: format!("the prompt needs more than the {cache} tokens the KV cache holds"),
        });
    }
    if !(p.sampling.temperature.is_finite() && p.sampling.temperature >= 0.0) {
        return Err(ApiError::invalid(
            "temperature",
            format!("temperature must be >= 0, got {}", p.sampling.temperature),
        ));
    }
    if !(p.sampling.top_p > 0.0 && p.sampling.top_p <= 1.0) {
        return Err(ApiError::invalid(
            "top_p",
            format!("top_p must be in (0, 1], got {}", p.sampling.top_p),
        ));
    }
    if p.top_logprobs > 20 {
        return Err(ApiError::invalid(
            "logprobs",
            format!("at most 20 top logprobs, got {}", p.top_logprobs),
        ));
    }
    if !p.stop_strings.is_empty() && s.tokenizer.is_none() {
        return Err(ApiError {
            code: tonic::Code::FailedPrecondition,
            field: Some("stop"),
            message: "stop strings need a tokenizer; this cluster has none (use stop token ids)"
                .into(),
        });
    }
    if p.stop_strings.iter().any(|x| x.is_empty()) {
        return Err(ApiError::invalid("stop", "stop strings must not be empty"));
    }
    if p.prompt_logits {
        let bytes = prompt.len() * c.vocab_size * 4;
        if bytes > grok_proto::limits::MAX_PROMPT_LOGITS_BYTES {
            return Err(ApiError::invalid(
                "prompt_logits",
                format!(
                    "the logits of a {}-token prompt take {} MiB ({} x vocabulary {} x 4 bytes); at most {} MiB are returned: send at most {} prompt tokens",
                    prompt.len(),
                    bytes >> 20,
                    prompt.len(),
                    c.vocab_size,
                    grok_proto::limits::MAX_PROMPT_LOGITS_BYTES >> 20,
                    grok_proto::limits::MAX_PROMPT_LOGITS_BYTES / 4 / c.vocab_size.max(1)
                ),
            ));
        }
    }
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let span = tracing::info_span!(
        "request",
        prompt_tokens = prompt.len(),
        max_tokens = p.max_tokens,
        outcome = tracing::field::Empty,
        completion_tokens = tracing::field::Empty
    );
    grok_proto::telemetry::set_parent(&span, traceparent);
    Ok((
        Job {
            prompt,
            params: p,
            tx,
            arrived: std::time::Instant::now(),
            span,
        },
        rx,
    ))
}

/// Queues a job on the serving replica.
pub fn submit(s: &Shared, job: Job) -> Result<(), Status> {
    if lock(&s.state).0 == "draining" {
        s.metrics.request_done("rejected");
        return Err(Status::unavailable(
            "the cluster is draining: it finishes in-flight requests and admits no new ones",
        ));
    }
    let handle = {
        let rs = lock(&s.replicas);
        let states = lock(&s.replica_states);
        let loads = lock(&s.replica_load).clone();
        // A replica being drained (grokctl drain --worker) takes no new requests.
        let serving: Vec<(usize, &ReplicaHandle)> = rs
            .iter()
            .zip(states.iter())
            .enumerate()
            .filter(|(_, (_, st))| st.0 != "draining")
            .filter_map(|(i, (h, _))| h.as_ref().map(|h| (i, h)))
            .collect();
        // The least loaded (running, waiting and queued requests); ties in turn.
        let n = serving.len();
        let start = s.next_replica.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| serving[(start + k) % n])
            .min_by_key(|(i, h)| loads[*i].0 + loads[*i].1 + h.queued() as u64)
            .map(|(_, h)| h.clone())
    };
    let Some(h) = handle else {
        let (state, detail) = lock(&s.state).clone();
        return Err(Status::unavailable(format!(
            "the cluster is not serving (state {state}{}{detail})",
            if detail.is_empty() { "" } else { ": " }
        )));
    };
    h.submit(job)
}

fn to_pb(ev: GenEvent) -> Result<pb::GenerateResponse, Status> {
    match ev {
        GenEvent::PromptLogits(prompt_logits) => Ok(pb::GenerateResponse {
            prompt_logits,
            ..Default::default()
        }),
        GenEvent::Token(t) => Ok(pb::GenerateResponse {
            ids: vec![t.id],
            text: t.text,
            logprobs: vec![t.logprob],
            top_logprobs: if t.top.is_empty() {
                vec![]
            } else {
                vec![pb::TopLogprobs {
                    top: t
                        .top
                        .into_iter()
                        .map(|(token, logprob)| pb::TopLogprob { token, logprob })
                        .collect(),
                }]
            },
            ..Default::default()
        }),
        GenEvent::Done {
            reason,
            text,
            prompt_tokens,
            completion_tokens,
        } => Ok(pb::GenerateResponse {
            text,
            finish_reason: reason.as_str().into(),
            usage: Some(pb::Usage {
                prompt_tokens: prompt_tokens as u32,
                completion_tokens: completion_tokens as u32,
            }),
            ..Default::default()
        }),
        GenEvent::Error(s) => Err(s),
    }
}

#[tonic::async_trait]
impl pb::inference_server::Inference for Svc {
    type GenerateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::GenerateResponse, Status>> + Send>,
    >;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let traceparent = req
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let r = req.into_inner();
        let prompt = match r.prompt {
            Some(pb::generate_request::Prompt::Text(t)) => PromptInput::Text(t),
            Some(pb::generate_request::Prompt::Ids(ids)) => PromptInput::Ids(ids.ids),
            None => {
                return Err(Status::invalid_argument(
                    "prompt: the request has no prompt (text or ids)",
                ))
            }
        };
        let params = RequestParams {
            max_tokens: r.max_tokens as usize,
            sampling: SamplingParams {
                temperature: r.temperature,
                top_p: if r.top_p == 0.0 { 1.0 } else { r.top_p },
                top_k: r.top_k as usize,
                seed: r.seed,
            },
            stop_ids: r.stop_token_ids,
            stop_strings: r.stop,
            ignore_eos: r.ignore_eos,
            top_logprobs: r.logprobs,
            prompt_logits: r.prompt_logits,
        };
        let (job, rx) =
            build_job(&self.0, prompt, params, traceparent.as_deref()).map_err(|e| {
                self.0.metrics.request_done("rejected");
                Status::new(
                    e.code,
                    format!("{}: {}", e.field.unwrap_or("request"), e.message),
                )
            })?;
        submit(&self.0, job)?;
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(to_pb);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn tokenize(
        &self,
        req: Request<pb::TokenizeRequest>,
    ) -> Result<Response<pb::TokenizeResponse>, Status> {
        let tok = self
            .0
            .tokenizer
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("this cluster has no tokenizer"))?;
        let ids = tok
            .encode(&req.into_inner().text)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        Ok(Response::new(pb::TokenizeResponse { ids }))
    }

    async fn model_info(
        &self,
        _req: Request<pb::ModelInfoRequest>,
    ) -> Result<Response<pb::ModelInfoResponse>, Status> {
        Ok(Response::new(pb::ModelInfoResponse {
            name: self
                .0
                .cfg
                .model_dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            config_json: self.0.model.to_hf_json().to_string(),
            num_params: self.0.model.num_params(),
        }))
    }
}

/// Validates the configuration (layout against the model) before anything starts.
pub fn prepare(cfg: CoordinatorConfig) -> Result<Arc<Shared>> {
    let model = ModelConfig::from_file(&cfg.model_dir.join("config.json"))
        .with_context(|| format!("reading the model at {}", cfg.model_dir.display()))?;
    cfg.layout.validate(&model)?;
    let tok_path = cfg.tokenizer.clone().or_else(|| {
        let p = cfg.model_dir.join("tokenizer.model");
        p.exists().then_some(p)
    });
    let tokenizer = match tok_path {
        Some(p) => Some(Tokenizer::from_file(&p)?),
        None => None,
    };
    let replicas = cfg.layout.replicas.max(1);
    let world = cfg.layout.world_size() * replicas;
    let kv_blocks = cfg.kv_blocks;
    Ok(Arc::new(Shared {
        cfg,
        tokenizer,
        workers: Mutex::new(vec![None; world]),
        state: Mutex::new((
            "waiting_for_workers".into(),
            format!("0 of {world} workers registered"),
        )),
        replicas: Mutex::new(vec![None; replicas]),
        replica_states: Mutex::new(vec![
            ("waiting_for_workers".into(), String::new());
            replicas
        ]),
        next_replica: std::sync::atomic::AtomicUsize::new(0),
        replica_load: Mutex::new(vec![(0, 0, kv_blocks as u64); replicas]),
        generated: AtomicU64::new(0),
        metrics: crate::metrics::Metrics::new(model.num_layers, model.num_experts, kv_blocks),
        rate_sample: Mutex::new((std::time::Instant::now(), 0, 0.0)),
        model,
        instance: instance_id(),
        loading: (0..replicas).map(|_| AtomicBool::new(false)).collect(),
        served: (0..replicas).map(|_| AtomicBool::new(false)).collect(),
        rejoin: (0..replicas).map(|_| tokio::sync::Notify::new()).collect(),
        parked: Mutex::new(Vec::new()),
    }))
}

/// A coordinator instance id: host name, process id and start time (unique per process).
fn instance_id() -> String {
    let host = grok_proto::process::hostname();
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{host}-{}-{t:x}", std::process::id())
}

/// Serves until `shutdown` resolves, or `discovery` fails. Prints `listening on ADDR` on
/// stdout once bound.
pub async fn serve(
    shared: Arc<Shared>,
    discovery: Box<dyn crate::discovery::Discovery>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(shared.cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", shared.cfg.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(discovery = discovery.name(), "membership");
    let (fail_tx, fail_rx) = tokio::sync::oneshot::channel::<String>();
    let run = discovery.run(shared.clone(), addr);
    tokio::spawn(async move {
        if let Err(e) = run.await {
            let _ = fail_tx.send(e.to_string());
        }
    });
    let failed: Arc<Mutex<Option<String>>> = Arc::default();
    let shutdown = {
        let failed = failed.clone();
        async move {
            tokio::select! {
                _ = shutdown => {}
                r = fail_rx => if let Ok(why) = r {
                    tracing::error!("{why}");
                    *lock(&failed) = Some(why);
                },
            }
        }
    };
    if let Some(h) = shared.cfg.http_listen {
        let l = tokio::net::TcpListener::bind(h)
            .await
            .with_context(|| format!("cannot listen for HTTP on {h}"))?;
        println!("http listening on {}", l.local_addr()?);
        let _ = std::io::stdout().flush();
        let app = crate::http::router(shared.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!("http server stopped: {e}");
            }
        });
    }
    let svc = Svc(shared.clone());
    // Standard gRPC health: "" is liveness (always SERVING while the process runs);
    // "grok.v1.Inference" is readiness (SERVING once every shard is loaded).
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let watched = shared.clone();
    tokio::spawn(async move {
        let mut last = None;
        loop {
            let ready = lock(&watched.state).0 == "ready";
            if last != Some(ready) {
                let st = if ready {
                    tonic_health::ServingStatus::Serving
                } else {
                    tonic_health::ServingStatus::NotServing
                };
                reporter.set_service_status("grok.v1.Inference", st).await;
                last = Some(ready);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    });
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(grok_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building the reflection service")?;
    let mut server = tonic::transport::Server::builder();
    if let Some(t) = &shared.cfg.tls {
        // Client certificates are optional at the handshake (clients share this port with the
        // workers); `register` requires one.
        server = server
            .tls_config(t.server_config(false)?)
            .context("setting up TLS")?;
        tracing::info!("gRPC over TLS; workers need a certificate signed by the cluster's CA");
    }
    server
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .add_service(health)
        .add_service(reflection)
        .add_service(grok_proto::limited!(
            pb::cluster_server::ClusterServer::new(svc.clone())
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            grok_proto::limited!(pb::admin_server::AdminServer::new(svc.clone())),
            auth_check(&shared),
        ))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            grok_proto::limited!(pb::inference_server::InferenceServer::new(svc)),
            auth_check(&shared),
        ))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    if let Some(why) = lock(&failed).take() {
        anyhow::bail!(why);
    }
    Ok(())
}

/// The client APIs' bearer-token check (a no-op when no token is configured).
#[allow(clippy::result_large_err)]
fn auth_check(shared: &Shared) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    let token = shared.cfg.api_token.clone();
    move |req: Request<()>| match &token {
        None => Ok(req),
        Some(t) => {
            let h = req
                .metadata()
                .get("authorization")
                .and_then(|v| v.to_str().ok());
            if grok_proto::auth::bearer_matches(t, h) {
                Ok(req)
            } else {
                Err(Status::unauthenticated(
                    "missing or wrong bearer token: send `authorization: Bearer <token>`",
                ))
            }
        }
    }
}

/// Drains a load-progress stream into the worker's entry.
pub(crate) async fn follow_load(
    shared: &Shared,
    rank: usize,
    mut s: tonic::Streaming<pb::LoadProgress>,
) -> Result<(), String> {
    loop {
        match s.next().await {
            Some(Ok(p)) => {
                let ready = p.stage == "ready";
                shared.set_worker(rank, |w| {
                    w.state = p.stage.clone();
                    w.detail = p.detail.clone();
                    w.fraction = p.fraction;
                    w.resident_bytes = p.resident_bytes;
                    if ready {
                        w.weight_bytes = p.weight_bytes;
                    }
                });
                if ready {
                    return Ok(());
                }
            }
            Some(Err(e)) => return Err(e.message().to_string()),
            None => return Err("the worker closed the load stream before it was ready".into()),
        }
    }
}
