//! The `Worker` gRPC service: `Load` (the shard, or reconnecting collectives when it holds it
//! already), `Step` (the coordinator's plans in order, one compute thread), `Health` (with the
//! coordinator that owns this worker) and `NcclUniqueId`.

use crate::engine::{self, Engine, LoadSpec};
use grok_proto::v1 as pb;
use grok_shared::backend::cuda_shapes::GemmSettings;
use grok_shared::model::{KvSizing, DEFAULT_KV_MEMORY_FRACTION};
use grok_shared::sync::lock;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

enum Slot {
    /// Waiting for `Load`.
    Idle,
    Loading,
    Ready(Box<Engine>),
    /// Taken by the step thread.
    Stepping,
    Failed(String),
}

#[derive(Clone)]
pub(crate) struct Svc {
    slot: Arc<Mutex<Slot>>,
    /// The collective listeners (all ranks; the tensor-parallel group). They live as long as
    /// the worker: each connection of the collectives (the first, and after a lost peer was
    /// replaced) accepts on clones of them, so peers always find them at the registered ports.
    listeners: Arc<(TcpListener, TcpListener)>,
    rank: Arc<Mutex<Option<u32>>>,
    cuda_device: Option<usize>,
    /// The worker's `--kv-memory`: the most bytes its KV cache may take.
    kv_memory: Option<u64>,
    /// Which passes of a GPU shard take cuBLAS.
    gemm: GemmSettings,
    /// Closes the open step stream: a newer `Load` (a new leader, or the reload after a lost
    /// peer) takes the worker over from whoever holds the stream.
    stream_stop: Arc<Mutex<Option<tokio::sync::oneshot::Sender<()>>>>,
    /// The coordinator instance of the newest Load ("" before any): the one that drives this
    /// worker, and the only one that rejoins it by itself after a fault.
    owner: Arc<Mutex<String>>,
}

impl Svc {
    /// A worker with no shard yet, its collective listeners bound.
    pub(crate) fn new(
        listeners: (TcpListener, TcpListener),
        cuda_device: Option<usize>,
        kv_memory: Option<u64>,
        gemm: GemmSettings,
    ) -> Self {
        Svc {
            slot: Arc::new(Mutex::new(Slot::Idle)),
            listeners: Arc::new(listeners),
            rank: Arc::new(Mutex::new(None)),
            cuda_device,
            kv_memory,
            gemm,
            stream_stop: Arc::default(),
            owner: Arc::default(),
        }
    }
}

/// How the coordinator asks the cache to be sized: `kv_blocks` (0: from the memory budget, the
/// share `kv_memory_fraction` of a GPU, 0 meaning the default), within this worker's cap.
fn kv_sizing(r: &pb::LoadRequest, kv_memory: Option<u64>) -> Result<KvSizing, Status> {
    let f = r.kv_memory_fraction;
    if f != 0.0 && !(f > 0.0 && f <= 1.0) {
        return Err(Status::invalid_argument(format!(
            "kv_memory_fraction {f} is outside (0, 1]"
        )));
    }
    Ok(KvSizing {
        blocks: (r.kv_blocks > 0).then_some(r.kv_blocks as usize),
        memory_fraction: if f == 0.0 {
            DEFAULT_KV_MEMORY_FRACTION
        } else {
            f as f64
        },
        memory_cap: kv_memory,
    })
}

fn parse_addrs(v: &[String]) -> Result<Vec<SocketAddr>, Status> {
    v.iter()
        .map(|a| {
            a.parse()
                .map_err(|_| Status::invalid_argument(format!("bad peer address `{a}`")))
        })
        .collect()
}

#[tonic::async_trait]
impl pb::worker_server::Worker for Svc {
    type LoadStream = ReceiverStream<Result<pb::LoadProgress, Status>>;
    type StepStream = ReceiverStream<Result<pb::StepResult, Status>>;

    async fn load(
        &self,
        req: Request<pb::LoadRequest>,
    ) -> Result<Response<Self::LoadStream>, Status> {
        let r = req.into_inner();
        let layout = r
            .layout
            .ok_or_else(|| Status::invalid_argument("layout missing"))?;
        let layout = grok_proto::convert::layout_of(&layout);
        let world_peers = parse_addrs(&r.world_peers)?;
        let live_ranks: Vec<usize> = r.live_ranks.iter().map(|&x| x as usize).collect();
        let placement = grok_proto::convert::placement_of(&r.placement);
        let tp_peers = parse_addrs(&r.tp_peers)?;
        let kv = kv_sizing(&r, self.kv_memory)?;
        // NCCL ids come only to GPU workers, and must be whole.
        for (group, id) in [("world", &r.world_nccl_id), ("tp", &r.tp_nccl_id)] {
            if !id.is_empty() && self.cuda_device.is_none() {
                return Err(Status::invalid_argument(format!(
                    "an NCCL id for group {group} was sent to a CPU worker"
                )));
            }
        }
        let nccl = crate::comm::NcclIds::parse(&r.world_nccl_id, &r.tp_nccl_id)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let clone = |l: &TcpListener| {
            l.try_clone()
                .map_err(|e| Status::internal(format!("collective listener: {e}")))
        };
        let (world, tp) = (clone(&self.listeners.0)?, clone(&self.listeners.1)?);
        let comm_timeout = Duration::from_millis(if r.comm_timeout_ms == 0 {
            30_000
        } else {
            r.comm_timeout_ms as u64
        });
        // A loaded worker asked to load again (a lost peer was replaced, or a new leader took
        // over): the open step stream, if any, is closed (the newer Load wins), and once the
        // step in flight ends the worker reconnects, keeping its weights.
        let deadline = std::time::Instant::now() + comm_timeout + Duration::from_secs(5);
        let engine = loop {
            let taken = {
                let mut s = lock(&self.slot);
                match std::mem::replace(&mut *s, Slot::Loading) {
                    Slot::Idle => Ok(None),
                    Slot::Ready(e) => Ok(Some(e)),
                    Slot::Stepping if std::time::Instant::now() < deadline => {
                        *s = Slot::Stepping;
                        // Whoever holds the step stream gives it up; the step in flight ends.
                        if let Some(stop) = lock(&self.stream_stop).take() {
                            let _ = stop.send(());
                        }
                        Err(true)
                    }
                    other => {
                        *s = other;
                        Err(false)
                    }
                }
            };
            match taken {
                Ok(e) => break e,
                Err(true) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(false) => {
                    return Err(Status::failed_precondition(
                        "this worker is loading, or its step stream is still open",
                    ))
                }
            }
        };
        if let Some(mut engine) = engine {
            let want = engine::LoadedShard {
                model_dir: PathBuf::from(&r.model_dir),
                layout,
                rank: r.rank as usize,
                kv,
                block_size: r.block_size.max(1) as usize,
            };
            if let Err(why) = engine.loaded().serves(&want, engine.kv_blocks() as usize) {
                *lock(&self.slot) = Slot::Ready(engine);
                return Err(Status::failed_precondition(why));
            }
            // The newest Load wins: from now on this worker is its caller's.
            *lock(&self.owner) = r.coordinator_id.clone();
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let slot = self.slot.clone();
            std::thread::spawn(move || {
                let _ = tx.blocking_send(Ok(pb::LoadProgress {
                    stage: "connecting".into(),
                    fraction: 0.0,
                    detail: "reconnecting to replaced peers; weights kept".into(),
                    weight_bytes: 0,
                    resident_bytes: engine::resident_bytes(),
                    kv_bytes: 0,
                    kv_blocks: 0,
                }));
                engine.use_tokenizer(r.tokenizer);
                match engine.reconnect(
                    &world_peers,
                    &tp_peers,
                    &live_ranks,
                    &placement,
                    world,
                    tp,
                    comm_timeout,
                    nccl,
                ) {
                    Ok(loaded) => {
                        if loaded > 0 {
                            tracing::info!(
                                rank = engine.rank(),
                                experts = loaded,
                                "new experts loaded for a new placement"
                            );
                        }
                        tracing::info!(rank = engine.rank(), "collectives reconnected");
                        let bytes = engine.weight_bytes();
                        let kv_bytes = engine.kv_bytes();
                        let kv_blocks = engine.kv_blocks();
                        *lock(&slot) = Slot::Ready(engine);
                        let _ = tx.blocking_send(Ok(pb::LoadProgress {
                            stage: "ready".into(),
                            fraction: 1.0,
                            detail: String::new(),
                            weight_bytes: bytes,
                            resident_bytes: engine::resident_bytes(),
                            kv_bytes,
                            kv_blocks,
                        }));
                    }
                    Err(e) => {
                        tracing::error!("reconnect failed: {e}");
                        // The weights stay: a later Load can try again.
                        *lock(&slot) = Slot::Ready(engine);
                        let _ = tx.blocking_send(Err(Status::unavailable(e.to_string())));
                    }
                }
            });
            return Ok(Response::new(ReceiverStream::new(rx)));
        }
        *lock(&self.rank) = Some(r.rank);
        *lock(&self.owner) = r.coordinator_id.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let slot = self.slot.clone();
        let cuda_device = self.cuda_device;
        let gemm = self.gemm;
        std::thread::spawn(move || {
            let dir = PathBuf::from(&r.model_dir);
            let spec = LoadSpec {
                model_dir: &dir,
                layout,
                rank: r.rank as usize,
                world_peers,
                tp_peers,
                kv,
                block_size: r.block_size.max(1) as usize,
                comm_timeout,
                cuda_device,
                live_ranks,
                placement,
                nccl,
                gemm,
            };
            let txp = tx.clone();
            let res = Engine::load(spec, world, tp, |stage, fraction, detail| {
                let _ = txp.blocking_send(Ok(pb::LoadProgress {
                    stage: stage.into(),
                    fraction,
                    detail,
                    weight_bytes: 0,
                    resident_bytes: engine::resident_bytes(),
                    kv_bytes: 0,
                    kv_blocks: 0,
                }));
            });
            match res {
                Ok((mut engine, bytes)) => {
                    tracing::info!(rank = engine.rank(), weight_bytes = bytes, "shard loaded");
                    engine.use_tokenizer(r.tokenizer);
                    let kv_bytes = engine.kv_bytes();
                    let kv_blocks = engine.kv_blocks();
                    *lock(&slot) = Slot::Ready(Box::new(engine));
                    let _ = tx.blocking_send(Ok(pb::LoadProgress {
                        stage: "ready".into(),
                        fraction: 1.0,
                        detail: String::new(),
                        weight_bytes: bytes,
                        resident_bytes: engine::resident_bytes(),
                        kv_bytes,
                        kv_blocks,
                    }));
                }
                Err(e) => {
                    tracing::error!("load failed: {e}");
                    *lock(&slot) = Slot::Failed(e.to_string());
                    let _ = tx.blocking_send(Err(Status::failed_precondition(e.to_string())));
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn step(
        &self,
        req: Request<Streaming<pb::StepPlan>>,
    ) -> Result<Response<Self::StepStream>, Status> {
        let mut engine = {
            let mut s = lock(&self.slot);
            match std::mem::replace(&mut *s, Slot::Stepping) {
                Slot::Ready(e) => e,
                other => {
                    let msg = match &other {
                        Slot::Failed(why) => format!("shard failed to load: {why}"),
                        Slot::Stepping => "a step stream is already open".into(),
                        _ => "shard not loaded".into(),
                    };
                    *s = other;
                    return Err(Status::failed_precondition(msg));
                }
            }
        };
        let mut inbound = req.into_inner();
        let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
        *lock(&self.stream_stop) = Some(stop_tx);
        let (plan_tx, plan_rx) = std::sync::mpsc::channel::<pb::StepPlan>();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let slot = self.slot.clone();
        std::thread::spawn(move || {
            while let Ok(plan) = plan_rx.recv() {
                let span = tracing::info_span!(
                    "worker.step",
                    rank = engine.rank(),
                    step_id = plan.step_id,
                    seqs = plan.seqs.len(),
                    compute_seconds = tracing::field::Empty,
                    comm_seconds = tracing::field::Empty,
                    error = tracing::field::Empty
                );
                grok_proto::telemetry::set_parent(&span, Some(&plan.traceparent));
                let res = span.in_scope(|| engine.step(plan));
                span.record("compute_seconds", res.compute_seconds);
                span.record("comm_seconds", res.comm_seconds);
                if !res.error.is_empty() {
                    span.record("error", res.error.as_str());
                }
                drop(span);
                if send_result(&tx, res).is_err() {
                    break;
                }
            }
            // The coordinator closed the stream: keep the shard for the next stream.
            *lock(&slot) = Slot::Ready(engine);
        });
        tokio::spawn(async move {
            loop {
                let m = tokio::select! {
                    m = inbound.next() => m,
                    _ = &mut stop_rx => {
                        tracing::warn!("a newer Load takes this worker over: closing the step stream");
                        break;
                    }
                };
                match m {
                    Some(Ok(plan)) => {
                        if plan_tx.send(plan).is_err() {
                            break;
                        }
                    }
                    Some(Err(e)) => {
                        tracing::warn!("step stream from the coordinator broke: {e}");
                        break;
                    }
                    None => break,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn nccl_unique_id(
        &self,
        _req: Request<pb::NcclIdRequest>,
    ) -> Result<Response<pb::NcclIdResponse>, Status> {
        nccl_unique_id(self.cuda_device).map(|id| Response::new(pb::NcclIdResponse { id }))
    }

    async fn health(
        &self,
        _req: Request<pb::HealthRequest>,
    ) -> Result<Response<pb::HealthResponse>, Status> {
        let state = match &*lock(&self.slot) {
            Slot::Idle => "waiting",
            Slot::Loading => "loading",
            Slot::Ready(_) | Slot::Stepping => "ready",
            Slot::Failed(_) => "failed",
        };
        Ok(Response::new(pb::HealthResponse {
            state: state.into(),
            rank: lock(&self.rank).unwrap_or(0),
            owner: lock(&self.owner).clone(),
        }))
    }
}

/// Sends a step's result, its logits split into messages of at most
/// [`grok_proto::limits::CHUNK_BYTES`] (all but the last with `more` set), so that no prompt
/// can make a message reach the transport's limit.
fn send_result(
    tx: &tokio::sync::mpsc::Sender<Result<pb::StepResult, Status>>,
    mut res: pb::StepResult,
) -> Result<(), ()> {
    let per = grok_proto::limits::CHUNK_BYTES / 4;
    if res.logits.len() > per {
        let logits = std::mem::take(&mut res.logits);
        let mut chunks = grok_proto::limits::float_chunks(&logits).peekable();
        while let Some(c) = chunks.next() {
            if chunks.peek().is_none() {
                res.logits = c.to_vec();
                break;
            }
            let part = pb::StepResult {
                step_id: res.step_id,
                logits: c.to_vec(),
                more: true,
                ..Default::default()
            };
            tx.blocking_send(Ok(part)).map_err(|_| ())?;
        }
    }
    tx.blocking_send(Ok(res)).map_err(|_| ())
}

/// A fresh NCCL unique id for a group this worker is the first rank of.
fn nccl_unique_id(cuda_device: Option<usize>) -> Result<Vec<u8>, Status> {
    if cuda_device.is_none() {
        return Err(Status::failed_precondition(
            "this worker runs on the CPU: its collectives are TCP, it has no NCCL id to give",
        ));
    }
    #[cfg(feature = "cuda")]
    {
        grok_shared::collective::nccl::unique_id()
            .map(|id| id.to_vec())
            .map_err(|e| Status::failed_precondition(e.to_string()))
    }
    #[cfg(not(feature = "cuda"))]
    Err(Status::failed_precondition(
        "this build has no CUDA support (build with --features cuda)",
    ))
}
