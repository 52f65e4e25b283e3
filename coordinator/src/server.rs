//! The coordinator process: membership (workers register over gRPC and get a rank), loading
//! (every worker is told its peers and loads its shard concurrently), the step loop of the
//! replica, and the client-facing `Inference` and `Admin` services.
//!
//! The coordinator never holds model tensors: it plans steps (new tokens, KV block changes,
//! sampling parameters), and the sampling rank returns token ids.

use crate::engine::{self, Job, ReplicaHandle};
use anyhow::{Context, Result};
use grok_proto::v1 as pb;
use grok_shared::config::ModelConfig;
use grok_shared::sampling::SamplingParams;
use grok_shared::sharding::Layout;
use grok_shared::tokenizer::Tokenizer;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
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
}

#[derive(Clone, Debug, Default)]
pub struct WorkerEntry {
    pub id: String,
    pub address: String,
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
    pub replica: Mutex<Option<ReplicaHandle>>,
    pub generated: AtomicU64,
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
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

    pub fn set_worker(&self, rank: usize, f: impl FnOnce(&mut WorkerEntry)) {
        if let Some(Some(w)) = lock(&self.workers).get_mut(rank) {
            f(w);
        }
    }

    fn status(&self) -> pb::ClusterStatusResponse {
        let (state, detail) = lock(&self.state).clone();
        let l = self.cfg.layout;
        let workers = lock(&self.workers).clone();
        let shards = (0..l.world_size())
            .map(|r| {
                let p = l.place(r);
                let s = l.shard(&self.model, r);
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
        let r = req.into_inner();
        let world = self.0.cfg.layout.world_size();
        let for_addr = |a: &str| {
            a.parse::<SocketAddr>()
                .map_err(|_| Status::invalid_argument(format!("bad address `{a}`")))
        };
        for_addr(&r.address)?;
        for_addr(&r.world_comm_address)?;
        for_addr(&r.tp_comm_address)?;
        let (rank, complete) = {
            let mut ws = lock(&self.0.workers);
            if let Some(i) = ws
                .iter()
                .position(|w| w.as_ref().is_some_and(|w| w.id == r.worker_id))
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
                        "rank {k} is outside this cluster's {world} ranks (layout tp={} pp={})",
                        self.0.cfg.layout.tp, self.0.cfg.layout.pp
                    )));
                }
                if let Some(w) = &ws[k] {
                    return Err(Status::already_exists(format!(
                        "rank {k} is already held by worker `{}` at {}",
                        w.id, w.address
                    )));
                }
                k
            } else {
                ws.iter().position(|w| w.is_none()).ok_or_else(|| {
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
                state: "registered".into(),
                ..Default::default()
            });
            // Only the registration that fills the last rank starts the load.
            (rank, ws.iter().all(|w| w.is_some()))
        };
        tracing::info!(worker = %r.worker_id, rank, address = %r.address, "worker registered");
        if complete {
            let shared = self.0.clone();
            tokio::spawn(async move { engine::load_and_serve(shared).await });
        }
        Ok(Response::new(pb::RegisterResponse {
            rank: rank as u32,
            world_size: world as u32,
        }))
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for Svc {
    async fn cluster_status(
        &self,
        _req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        Ok(Response::new(self.0.status()))
    }
}

/// Converts a client request into a job, checking everything a caller can get wrong.
fn job_from_request(
    s: &Shared,
    r: pb::GenerateRequest,
) -> Result<
    (
        Job,
        tokio::sync::mpsc::Receiver<Result<pb::GenerateResponse, Status>>,
    ),
    Status,
> {
    let c = &s.model;
    let prompt = match r.prompt {
        Some(pb::generate_request::Prompt::Text(t)) => {
            let tok = s.tokenizer.as_ref().ok_or_else(|| {
                Status::failed_precondition(
                    "this cluster has no tokenizer: send token ids, or start it with --tokenizer",
                )
            })?;
            tok.encode(&t)
                .map_err(|e| Status::invalid_argument(e.to_string()))?
        }
        Some(pb::generate_request::Prompt::Ids(ids)) => ids.ids,
        None => {
            return Err(Status::invalid_argument(
                "the request has no prompt (text or ids)",
            ))
        }
    };
    if prompt.is_empty() {
        return Err(Status::invalid_argument("the prompt is empty"));
    }
    if let Some((pos, id)) = prompt
        .iter()
        .enumerate()
        .find(|(_, &t)| t as usize >= c.vocab_size)
    {
        return Err(Status::invalid_argument(format!(
            "token id {id} at position {pos} is outside the vocabulary (size {})",
            c.vocab_size
        )));
    }
    if prompt.len() > c.max_position_embeddings {
        return Err(Status::invalid_argument(format!(
            "the prompt has {} tokens, more than the context length {}",
            prompt.len(),
            c.max_position_embeddings
        )));
    }
    if r.max_tokens == 0 {
        return Err(Status::invalid_argument("max_tokens must be at least 1"));
    }
    let sampling = SamplingParams {
        temperature: r.temperature,
        top_p: if r.top_p == 0.0 { 1.0 } else { r.top_p },
        top_k: r.top_k as usize,
        seed: r.seed,
    };
    sampling
        .validate()
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    Ok((
        Job {
            prompt,
            max_tokens: r.max_tokens as usize,
            sampling,
            ignore_eos: r.ignore_eos,
            stop_ids: r.stop_token_ids,
            return_logits: r.prompt_logits,
            tx,
        },
        rx,
    ))
}

#[tonic::async_trait]
impl pb::inference_server::Inference for Svc {
    type GenerateStream = ReceiverStream<Result<pb::GenerateResponse, Status>>;

    async fn generate(
        &self,
        req: Request<pb::GenerateRequest>,
    ) -> Result<Response<Self::GenerateStream>, Status> {
        let (job, rx) = job_from_request(&self.0, req.into_inner())?;
        let handle = lock(&self.0.replica).clone();
        let Some(h) = handle else {
            let (state, detail) = lock(&self.0.state).clone();
            return Err(Status::unavailable(format!(
                "the cluster is not serving (state {state}{}{detail})",
                if detail.is_empty() { "" } else { ": " }
            )));
        };
        h.submit(job).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
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
    let world = cfg.layout.world_size();
    Ok(Arc::new(Shared {
        cfg,
        model,
        tokenizer,
        workers: Mutex::new(vec![None; world]),
        state: Mutex::new((
            "waiting_for_workers".into(),
            format!("0 of {world} workers registered"),
        )),
        replica: Mutex::new(None),
        generated: AtomicU64::new(0),
    }))
}

/// Serves until `shutdown` resolves. Prints `listening on ADDR` on stdout once bound.
pub async fn serve(
    shared: Arc<Shared>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(shared.cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", shared.cfg.listen))?;
    let addr = listener.local_addr()?;
    println!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let svc = Svc(shared.clone());
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .add_service(pb::cluster_server::ClusterServer::new(svc.clone()))
        .add_service(pb::admin_server::AdminServer::new(svc.clone()))
        .add_service(pb::inference_server::InferenceServer::new(svc))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            shutdown,
        )
        .await?;
    Ok(())
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
