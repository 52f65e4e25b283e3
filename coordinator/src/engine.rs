//! The replica's engine loop, the way continuous-batching servers run it: every iteration
//! schedules a batch (running sequences' decode tokens first, then prefill chunks of waiting
//! ones, under a per-step token budget and a cap on running sequences), sends one StepPlan to
//! every worker over its long-lived `Step` stream, and applies the sampled tokens.
//!
//! The KV cache is paged: the block manager here owns the free list; a sequence gets blocks as it
//! grows, and the plan carries only the blocks appended since the previous step. A sequence is
//! admitted only when blocks for its first chunk are free; when a running sequence needs a block
//! and none is free, the most recently admitted one is preempted (its blocks freed, its tokens
//! kept) and recomputed later. Requests wait in a bounded queue; a full queue refuses at once.
//!
//! Sampling is stateless per position (`Rng::for_token`), so a seeded request gives the same
//! tokens alone, in any batch, and after preemption.
//!
//! Self-healing: a fault (a broken step stream, a worker the health monitor finds lost, a step
//! that fails) puts the replica in `recovering`; its requests move to another serving replica
//! or wait for this one, and [`rejoin`] brings it back by itself: as soon as every worker of
//! the replica answers again and still names this coordinator as its owner (or a new worker
//! registered for a lost rank), the shards are reloaded (a worker that holds its shard only
//! rebuilds its collectives) and the requests resume by re-prefilling. The coordinator stays up
//! and answers status throughout.

use crate::server::{follow_load, Shared, WorkerEntry};
use grok_proto::v1 as pb;
use grok_shared::sampling::SamplingParams;
use grok_shared::sync::lock;
use grok_shared::tokenizer::StreamDecoder;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

type WorkerClient = pb::worker_client::WorkerClient<tonic::transport::Channel>;
use tokio_stream::wrappers::ReceiverStream;

/// Every worker's health is asked this often; one that refuses the connection is lost at
/// once, one that has not answered for `LOST_AFTER` (a network partition) is lost then.
const HEALTH_PERIOD: Duration = Duration::from_millis(500);
const LOST_AFTER: Duration = Duration::from_secs(4);
/// A request running through this many replica faults ends (it may be their cause).
const MAX_FAULTS: u32 = 3;
/// How often a recovering replica asks its workers whether they are back, at first; the
/// period doubles after each failed reload, up to `REJOIN_MAX_PERIOD`.
const REJOIN_PERIOD: Duration = Duration::from_millis(250);
const REJOIN_MAX_PERIOD: Duration = Duration::from_secs(8);
/// A health probe of a lost worker gives up after this long.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
use tonic::Status;

/// What a request asks for besides its prompt.
#[derive(Clone, Debug)]
pub struct RequestParams {
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub stop_ids: Vec<u32>,
    pub stop_strings: Vec<String>,
    pub ignore_eos: bool,
    /// Return this many most likely tokens with each sampled token.
    pub top_logprobs: u32,
    /// Return the logits of every prompt position with the first token (tests).
    pub prompt_logits: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
    ContextLength,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::ContextLength => "context_length",
        }
    }
}

/// One sampled token as the client sees it.
#[derive(Clone, Debug, Default)]
pub struct TokenEvent {
    pub id: u32,
    /// Text released by this token (held back while it may be the start of a stop string).
    pub text: String,
    pub logprob: f32,
    pub top: Vec<(u32, f32)>,
}

#[derive(Clone, Debug)]
pub enum GenEvent {
    /// Whole rows of prompt logits (at most `limits::CHUNK_BYTES`), in order, before the
    /// first token (only when the request asked for them).
    PromptLogits(Vec<f32>),
    Token(TokenEvent),
    /// The last event of a successful request; `text` is any text still held back.
    Done {
        reason: FinishReason,
        text: String,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Error(Status),
}

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub params: RequestParams,
    /// Unbounded: delivering an event never blocks the engine loop (a client that does not
    /// read holds only its own request's events, which its max_tokens bounds).
    pub tx: mpsc::UnboundedSender<GenEvent>,
    pub arrived: Instant,
    /// The request's span (ends when the job is dropped); steps that compute it link to it.
    pub span: tracing::Span,
}

/// Submits jobs to a serving replica.
#[derive(Clone)]
pub struct ReplicaHandle {
    tx: mpsc::Sender<Incoming>,
    shared: Arc<Shared>,
}

impl ReplicaHandle {
    /// Requests queued for this replica, not yet taken by its engine loop.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues a job; a full queue is refused at once with RESOURCE_EXHAUSTED.
    pub fn submit(&self, job: Job) -> Result<(), Status> {
        match self.tx.try_send(Incoming::New(job)) {
            Ok(()) => {
                self.shared
                    .metrics
                    .queue_depth
                    .fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.shared.metrics.request_done("rejected");
                Err(Status::resource_exhausted(format!(
                    "the request queue is full ({} waiting); retry later",
                    self.shared.cfg.max_queue
                )))
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                Err(Status::unavailable("the replica stopped serving"))
            }
        }
    }
}

/// What a replica's queue carries: a new request, or one moved from a lost replica (its
/// tokens so far are re-prefilled here; it goes before the new ones).
enum Incoming {
    New(Job),
    Moved(Box<Seq>),
}

struct WorkerLink {
    rank: usize,
    id: String,
    address: String,
    plans: mpsc::Sender<pb::StepPlan>,
    results: tonic::Streaming<pb::StepResult>,
    /// For the health monitor.
    client: pb::worker_client::WorkerClient<tonic::transport::Channel>,
}

/// Watches every worker's health until the replica ends; reports the first lost one.
fn spawn_monitor(shared: Arc<Shared>, links: &[WorkerLink]) -> watch::Receiver<Option<String>> {
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
                shared.set_worker(*rank, |w| {
                    w.state = "lost".into();
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

/// A request waiting for a recovering replica (none was serving when its own faulted).
pub struct Parked {
    seq: Box<Seq>,
    /// It ends with a retryable UNAVAILABLE if no replica serves by then.
    until: Instant,
    /// The fault it waits out.
    why: String,
}

/// Ends parked requests whose client went away or whose hold ran out, until none is left.
async fn expire_parked(shared: Arc<Shared>) {
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = Instant::now();
        let (gone, rest_empty) = {
            let mut p = lock(&shared.parked);
            let (gone, keep): (Vec<Parked>, Vec<Parked>) = std::mem::take(&mut *p)
                .into_iter()
                .partition(|x| x.seq.job.tx.is_closed() || now >= x.until);
            *p = keep;
            (gone, p.is_empty())
        };
        for x in gone {
            if x.seq.job.tx.is_closed() {
                shared.metrics.request_done("cancelled");
                continue;
            }
            shared.metrics.request_done("error");
            let _ = x
                .seq
                .job
                .tx
                .send(GenEvent::Error(Status::unavailable(format!(
                    "{}; the replica is recovering, retry the request",
                    x.why
                ))));
        }
        if rest_empty {
            return;
        }
    }
}

/// What a probe of a recovering replica's worker found.
enum Probe {
    /// It answers and is still this coordinator's (or registered anew): it can be reloaded.
    Back,
    /// It answers but a newer Load took it over (another coordinator leads it).
    TakenOver(String),
    Gone(String),
}

async fn probe(shared: &Shared, w: &WorkerEntry) -> Probe {
    if w.state == "registered" {
        return Probe::Back;
    }
    let answer = tokio::time::timeout(PROBE_TIMEOUT, async {
        let mut c = connect_worker(shared, &w.address).await?;
        c.health(pb::HealthRequest {})
            .await
            .map(|r| r.into_inner())
            .map_err(|s| s.message().to_string())
    })
    .await;
    match answer {
        Err(_) => Probe::Gone(format!("no answer within {PROBE_TIMEOUT:?}")),
        Ok(Err(e)) => Probe::Gone(e),
        Ok(Ok(h)) if h.owner == shared.instance => Probe::Back,
        Ok(Ok(h)) if h.owner.is_empty() => {
            Probe::Gone("it was restarted: it rejoins when it registers".into())
        }
        Ok(Ok(h)) => Probe::TakenOver(h.owner),
    }
}

/// Brings a recovering replica back with no operator: it waits until every worker answers
/// and is still this coordinator's (a frozen process that resumed, a partition that healed,
/// a step stream that broke) or registered anew for its rank, then reloads the replica (a
/// worker holding its shard only rebuilds its collectives). The time from the fault's end
/// (the first moment every worker was back) to serving goes to the log and `/metrics`.
pub async fn rejoin(shared: Arc<Shared>, ri: usize, began: Instant) {
    let l = shared.cfg.layout;
    let (world, base) = (l.world_size(), ri * l.world_size());
    let mut period = REJOIN_PERIOD;
    let mut fault_ended: Option<Instant> = None;
    let mut last_detail = String::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shared.rejoin[ri].notified() => {}
        }
        if lock(&shared.replicas)[ri].is_some() {
            return;
        }
        let entries: Vec<Option<WorkerEntry>> = lock(&shared.workers)[base..base + world].to_vec();
        let probes = futures_util::future::join_all(entries.iter().map(|w| {
            let shared = &shared;
            async move {
                match w {
                    Some(w) => probe(shared, w).await,
                    None => Probe::Gone("no worker registered".into()),
                }
            }
        }))
        .await;
        let mut missing = Vec::new();
        for (k, p) in probes.into_iter().enumerate() {
            let rank = base + k;
            let id = entries[k].as_ref().map_or("?", |w| w.id.as_str());
            match p {
                Probe::Back => {}
                Probe::TakenOver(owner) => missing.push(format!(
                    "worker `{id}` (rank {rank}) is driven by another coordinator ({owner})"
                )),
                Probe::Gone(why) => {
                    shared.set_worker(rank, |w| {
                        if w.state != "registered" {
                            w.state = "lost".into();
                            w.detail = why.clone();
                        }
                    });
                    missing.push(format!("worker `{id}` (rank {rank}): {why}"));
                }
            }
        }
        if !missing.is_empty() {
            fault_ended = None;
            let detail = format!("waiting for its workers: {}", missing.join("; "));
            if detail != last_detail {
                shared.set_replica_state(ri, "recovering", detail.clone());
                last_detail = detail;
            }
            continue;
        }
        let ended = *fault_ended.get_or_insert_with(Instant::now);
        match load_and_serve(shared.clone(), ri).await {
            Ok(()) => {
                let took = ended.elapsed();
                shared.metrics.recovery.observe(took.as_secs_f64());
                shared.metrics.recoveries.fetch_add(1, Ordering::Relaxed);
                tracing::info!(
                    replica = ri,
                    "serving again {:.2} s after the fault ended ({:.2} s after it began)",
                    took.as_secs_f64(),
                    began.elapsed().as_secs_f64()
                );
                return;
            }
            Err(e) => {
                tracing::warn!(replica = ri, "rejoining failed: {e}; trying again");
                period = (period * 2).min(REJOIN_MAX_PERIOD);
            }
        }
    }
}

/// A client of the worker at `addr`: over TLS with the coordinator's certificate as client
/// identity when the cluster uses TLS (workers accept only CA-signed clients), plaintext
/// otherwise.
pub(crate) async fn connect_worker(
    shared: &Shared,
    addr: &str,
) -> Result<pb::worker_client::WorkerClient<tonic::transport::Channel>, String> {
    let tls = shared.cfg.tls.as_ref();
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

/// Whether a replica on these devices talks NCCL: all of them GPUs.
pub fn uses_nccl(devices: &[&str]) -> bool {
    !devices.is_empty() && devices.iter().all(|d| d.starts_with("cuda"))
}

/// The NCCL ids rank `rank` (inside the replica) gets: its world group's and its stage's
/// tensor-parallel group's (empty where the group does not exist).
pub fn nccl_ids_of(
    l: &grok_shared::sharding::Layout,
    rank: usize,
    ids: &std::collections::HashMap<String, Vec<u8>>,
) -> (Vec<u8>, Vec<u8>) {
    let stage = l.place(rank).stage;
    (
        ids.get("world").cloned().unwrap_or_default(),
        ids.get(&format!("tp{stage}")).cloned().unwrap_or_default(),
    )
}

/// Tells every worker of replica `ri` to load its shard (or, when it holds it already, to
/// reconnect), then opens the step streams and starts serving. Ranks in messages and in
/// `Shared.workers` are global (`ri * world + rank`); workers are told their rank inside the
/// replica.
///
/// One load of a replica runs at a time (a second call returns an error at once). A first
/// load that fails leaves the replica `failed`; a reload after a fault that fails leaves it
/// `recovering` (the workers that failed are marked lost, so that a replacement can register)
/// for [`rejoin`] to try again.
///
/// (A boxed future: the replica it starts may fault and rejoin through this again.)
pub fn load_and_serve(
    shared: Arc<Shared>,
    ri: usize,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>> {
    Box::pin(async move {
        if shared.loading[ri].swap(true, Ordering::AcqRel) {
            return Err(format!("replica {ri} is being loaded already"));
        }
        let r = load_replica(&shared, ri).await;
        shared.loading[ri].store(false, Ordering::Release);
        if let Err(e) = &r {
            let state = if shared.served[ri].load(Ordering::Acquire) {
                "recovering"
            } else {
                "failed"
            };
            shared.set_replica_state(ri, state, e.clone());
        }
        r
    })
}

async fn load_replica(shared: &Arc<Shared>, ri: usize) -> Result<(), String> {
    let reload = shared.served[ri].load(Ordering::Acquire);
    let l = shared.cfg.layout;
    let world = l.world_size();
    let base = ri * world;
    let workers: Vec<WorkerEntry> = lock(&shared.workers)[base..base + world]
        .iter()
        .map(|w| w.clone().ok_or("a rank of the replica has no worker"))
        .collect::<Result<_, _>>()?;
    shared.set_replica_state(
        ri,
        "loading",
        format!("{world} workers loading their shards"),
    );
    let world_peers: Vec<String> = workers.iter().map(|w| w.world_comm.clone()).collect();
    // GPU replicas of more than one worker: each NCCL group's first rank makes its unique id.
    let devices: Vec<&str> = workers.iter().map(|w| w.device.as_str()).collect();
    let nccl = if uses_nccl(&devices) && world > 1 {
        let mut ids = std::collections::HashMap::new();
        for g in grok_shared::collective::bootstrap::groups(&l) {
            let w = &workers[g.root];
            let r: Result<Vec<u8>, String> = async {
                let mut c = connect_worker(shared, &w.address).await?;
                let id = c
                    .nccl_unique_id(pb::NcclIdRequest {})
                    .await
                    .map_err(|s| s.message().to_string())?
                    .into_inner()
                    .id;
                grok_shared::collective::bootstrap::check_id(&g.name, &id)
                    .map_err(|e| e.to_string())?;
                Ok(id)
            }
            .await;
            match r {
                Ok(id) => {
                    ids.insert(g.name.clone(), id);
                }
                Err(e) => {
                    return Err(format!(
                        "worker `{}` (rank {}) gave no NCCL id for group {}: {e}",
                        w.id,
                        base + g.root,
                        g.name
                    ));
                }
            }
        }
        Some(ids)
    } else {
        None
    };
    let mut tasks = Vec::new();
    for (rank, w) in workers.iter().enumerate() {
        let p = l.place(rank);
        let (world_nccl_id, tp_nccl_id) = nccl
            .as_ref()
            .map(|ids| nccl_ids_of(&l, rank, ids))
            .unwrap_or_default();
        let tp_peers: Vec<String> = (0..l.tp)
            .map(|t| workers[p.stage * l.tp + t].tp_comm.clone())
            .collect();
        let req = pb::LoadRequest {
            model_dir: shared.cfg.model_dir.display().to_string(),
            layout: Some(pb::Layout {
                tp: l.tp as u32,
                ep: l.ep as u32,
                pp: l.pp as u32,
                replicas: 1,
            }),
            rank: rank as u32,
            world_peers: world_peers.clone(),
            tp_peers,
            kv_blocks: shared.cfg.kv_blocks as u32,
            block_size: shared.cfg.block_size as u32,
            comm_timeout_ms: shared.cfg.comm_timeout_ms,
            world_nccl_id,
            tp_nccl_id,
            coordinator_id: shared.instance.clone(),
        };
        let addr = w.address.clone();
        let id = w.id.clone();
        let shared = shared.clone();
        let rank = base + rank;
        tasks.push(tokio::spawn(async move {
            let r: Result<pb::worker_client::WorkerClient<tonic::transport::Channel>, String> =
                async {
                    let mut c = connect_worker(&shared, &addr).await.map_err(|e| {
                        format!("cannot reach worker `{id}` (rank {rank}) at {addr}: {e}")
                    })?;
                    let s = c
                        .load(req)
                        .await
                        .map_err(|e| {
                            format!(
                                "worker `{id}` (rank {rank}) at {addr} refused to load: {}",
                                e.message()
                            )
                        })?
                        .into_inner();
                    follow_load(&shared, rank, s).await.map_err(|e| {
                        format!("worker `{id}` (rank {rank}) at {addr} failed to load: {e}")
                    })?;
                    Ok(c)
                }
                .await;
            if let Err(e) = &r {
                shared.set_worker(rank, |w| {
                    w.state = if reload { "lost" } else { "failed" }.into();
                    w.detail = e.clone();
                });
            }
            r
        }));
    }
    let mut clients = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(c)) => clients.push(c),
            Ok(Err(e)) => errors.push(e),
            Err(e) => errors.push(format!("load task failed: {e}")),
        }
    }
    if !errors.is_empty() {
        return Err(errors.join("; "));
    }
    let mut links = Vec::new();
    for (local, mut c) in clients.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(4);
        let rank = base + local;
        match c.step(ReceiverStream::new(rx)).await {
            Ok(resp) => links.push(WorkerLink {
                rank,
                id: workers[local].id.clone(),
                address: workers[local].address.clone(),
                plans: tx,
                results: resp.into_inner(),
                client: c.clone(),
            }),
            Err(e) => {
                return Err(format!(
                    "worker `{}` (rank {rank}) refused the step stream: {}",
                    workers[local].id,
                    e.message()
                ));
            }
        }
    }
    for r in base..base + world {
        shared.set_worker(r, |w| w.state = "ready".into());
    }
    let (tx, rx) = mpsc::channel(shared.cfg.max_queue.max(1));
    let sampler = base + (l.pp - 1) * l.tp;
    let lost_rx = spawn_monitor(shared.clone(), &links);
    let mut replica = Replica {
        index: ri,
        shared: shared.clone(),
        lost_rx,
        links,
        sampler,
        free_blocks: (0..shared.cfg.kv_blocks as u32).rev().collect(),
        next_step: 0,
        next_wid: 1,
        step_timeout: Duration::from_millis(shared.cfg.comm_timeout_ms as u64 + 10_000),
        waiting: VecDeque::new(),
        running: Vec::new(),
        pending_free: Vec::new(),
    };
    // Requests that waited for a replica to serve again go first.
    let parked = std::mem::take(&mut *lock(&shared.parked));
    let resumed = parked.len();
    replica.waiting.extend(parked.into_iter().map(|p| *p.seq));
    shared
        .metrics
        .resumed
        .fetch_add(resumed as u64, Ordering::Relaxed);
    lock(&shared.replicas)[ri] = Some(ReplicaHandle {
        tx,
        shared: shared.clone(),
    });
    shared.served[ri].store(true, Ordering::Release);
    shared.set_replica_state(
        ri,
        "ready",
        if reload {
            format!("serving again with {world} workers")
        } else {
            format!("serving with {world} workers")
        },
    );
    if resumed > 0 {
        tracing::info!(replica = ri, resumed, "requests resume after a fault");
    }
    tokio::spawn(replica.run(rx));
    Ok(())
}

struct Replica {
    /// Which replica of the cluster this is.
    index: usize,
    shared: Arc<Shared>,
    /// A lost worker, as reported by the health monitor.
    lost_rx: watch::Receiver<Option<String>>,
    links: Vec<WorkerLink>,
    sampler: usize,
    free_blocks: Vec<u32>,
    next_step: u64,
    next_wid: u64,
    step_timeout: Duration,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Worker-side sequence ids to free in the next plan.
    pending_free: Vec<u64>,
}

enum Grow {
    Ok,
    /// The sequence itself was the most recent one and went back to the queue.
    SelfPreempted,
    /// Alone and still out of blocks.
    Impossible,
}

enum StepFailure {
    /// A worker's stream broke: the replica is gone.
    Lost(String),
    /// A worker reported an error for this step.
    Failed(String),
}

/// A request inside the engine.
struct Seq {
    job: Job,
    /// Prompt followed by the generated tokens.
    tokens: Vec<u32>,
    prompt_len: usize,
    /// Tokens whose keys and values are in the cache.
    computed: usize,
    blocks: Vec<u32>,
    /// Blocks already announced to the workers.
    sent_blocks: usize,
    /// Id of this sequence on the workers (new after each preemption), 0 = not started.
    wid: u64,
    generated: usize,
    decoder: StreamDecoder,
    /// Decoded text not yet released (a stop string may be forming).
    held: String,
    last_token: Option<Instant>,
    /// Prompt logits rows already delivered (rows are sent as their prefill chunks complete,
    /// each once, whatever preemption or recovery recomputes).
    logit_rows_sent: usize,
    /// Replica faults (a lost worker, a failed step) this sequence was running through.
    faults: u32,
}

impl Seq {
    fn new(job: Job) -> Self {
        let tokens = job.prompt.clone();
        Seq {
            prompt_len: tokens.len(),
            tokens,
            job,
            computed: 0,
            blocks: Vec::new(),
            sent_blocks: 0,
            wid: 0,
            generated: 0,
            decoder: StreamDecoder::default(),
            held: String::new(),
            last_token: None,
            logit_rows_sent: 0,
            faults: 0,
        }
    }
}

impl Replica {
    fn block_size(&self) -> usize {
        self.shared.cfg.block_size
    }

    fn update_gauges(&self) {
        let mine = (
            self.running.len() as u64,
            self.waiting.len() as u64,
            self.free_blocks.len() as u64,
        );
        self.shared.set_replica_load(self.index, mine);
    }

    fn release(&mut self, seq: &mut Seq) {
        self.free_blocks.append(&mut seq.blocks);
        seq.sent_blocks = 0;
        seq.computed = 0;
        if seq.wid != 0 {
            self.pending_free.push(seq.wid);
            seq.wid = 0;
        }
    }

    async fn finish(&mut self, mut seq: Seq, ev: GenEvent, outcome: &str) {
        self.release(&mut seq);
        self.shared.metrics.request_done(outcome);
        seq.job.span.record("outcome", outcome);
        seq.job.span.record("completion_tokens", seq.generated);
        // The load seen by the next request's routing counts this one as gone before its
        // client can send another.
        self.update_gauges();
        let _ = seq.job.tx.send(ev);
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Incoming>) {
        loop {
            let cap = self.shared.cfg.max_seqs;
            if self.running.is_empty() && self.waiting.is_empty() {
                self.update_gauges();
                // Idle: a worker lost now is noticed before the next request needs it.
                tokio::select! {
                    job = rx.recv() => match job {
                        Some(job) => self.take(job),
                        None => return,
                    },
                    why = lost_signal(&mut self.lost_rx) => {
                        self.fault(why, rx).await;
                        return;
                    }
                }
            }
            // Take from the bounded queue only what the batch can admit, so that the queue
            // bound is what callers see.
            while self.waiting.len() + self.running.len() < cap {
                match rx.try_recv() {
                    Ok(job) => self.take(job),
                    Err(_) => break,
                }
            }
            self.reap_cancelled().await;
            match self.iteration().await {
                Ok(()) => {}
                Err(StepFailure::Lost(why)) => {
                    self.fault(why, rx).await;
                    return;
                }
                Err(StepFailure::Failed(e)) => {
                    // A failed step may have left the collectives broken (a peer's deadline):
                    // the workers reconnect and the sequences resume, as after a lost worker.
                    self.fault(format!("a step failed: {e}"), rx).await;
                    return;
                }
            }
            self.update_gauges();
        }
    }

    /// A fault (a lost worker, a failed step): the survivors' step streams close and the
    /// replica is `recovering` until its workers are back: the same processes once they answer
    /// again (weights kept, collectives rebuilt), or a worker that registers for a lost rank.
    /// [`rejoin`] brings it back with no operator. Its requests move to another serving
    /// replica, which re-prefills their tokens so far and goes on (seeded sampling depends on
    /// positions only, so the output is the one they would have had); with none serving, they
    /// wait for this one for `--fault-hold-ms`, then end with a retryable UNAVAILABLE. A request
    /// running through [`MAX_FAULTS`] faults ends alone with INTERNAL (it may be their cause).
    async fn fault(mut self, why: String, mut rx: mpsc::Receiver<Incoming>) {
        let me = self.index;
        let began = Instant::now();
        lock(&self.shared.replicas)[me] = None;
        self.shared
            .metrics
            .replica_faults
            .fetch_add(1, Ordering::Relaxed);
        tracing::warn!(replica = me, "{why}");
        self.shared
            .set_replica_state(me, "recovering", format!("{why}; rejoining its workers"));
        self.links.clear();
        let mut moving: Vec<Seq> = self.running.drain(..).collect();
        for s in &mut moving {
            s.faults += 1;
        }
        moving.extend(self.waiting.drain(..));
        rx.close();
        while let Some(m) = rx.recv().await {
            match m {
                Incoming::New(j) => {
                    self.shared
                        .metrics
                        .queue_depth
                        .fetch_sub(1, Ordering::Relaxed);
                    moving.push(Seq::new(j));
                }
                Incoming::Moved(s) => moving.push(*s),
            }
        }
        let others: Vec<ReplicaHandle> = lock(&self.shared.replicas)
            .iter()
            .flatten()
            .cloned()
            .collect();
        let hold = Duration::from_millis(self.shared.cfg.fault_hold_ms);
        let (mut moved, mut parked, mut failed) = (0, 0, 0);
        for (i, mut s) in moving.into_iter().enumerate() {
            // Its blocks and worker state died with the replica's step streams.
            s.blocks.clear();
            s.sent_blocks = 0;
            s.computed = 0;
            s.wid = 0;
            if s.faults >= MAX_FAULTS {
                failed += 1;
                self.shared.metrics.request_done("error");
                let _ = s.job.tx.send(GenEvent::Error(Status::internal(format!(
                    "the request was running through {} replica faults (the last: {why}); it is not retried again",
                    s.faults
                ))));
                continue;
            }
            let target = (!others.is_empty()).then(|| &others[i % others.len()]);
            let s = match target {
                Some(h) => match h.tx.try_send(Incoming::Moved(Box::new(s))) {
                    Ok(()) => {
                        moved += 1;
                        continue;
                    }
                    Err(e) => match e.into_inner() {
                        Incoming::Moved(s) => *s,
                        Incoming::New(_) => unreachable!("only moved sequences are sent here"),
                    },
                },
                None => s,
            };
            parked += 1;
            lock(&self.shared.parked).push(Parked {
                seq: Box::new(s),
                until: began + hold,
                why: why.clone(),
            });
        }
        if moved + parked + failed > 0 {
            tracing::warn!(
                replica = me,
                moved,
                parked,
                failed,
                "requests of a replica in recovery"
            );
        }
        if parked > 0 {
            tokio::spawn(expire_parked(self.shared.clone()));
        }
        let blocks = self.shared.cfg.kv_blocks as u64;
        self.shared.set_replica_load(me, (0, 0, blocks));
        tokio::spawn(rejoin(self.shared.clone(), me, began));
    }

    fn take(&mut self, m: Incoming) {
        match m {
            Incoming::New(job) => {
                self.shared
                    .metrics
                    .queue_depth
                    .fetch_sub(1, Ordering::Relaxed);
                self.waiting.push_back(Seq::new(job));
            }
            // A request moved from a lost replica goes first: it has waited already.
            Incoming::Moved(s) => self.waiting.push_front(*s),
        }
    }

    /// Ends requests whose client went away, freeing their blocks at once.
    async fn reap_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].job.tx.is_closed() {
                let s = self.running.remove(i);
                self.finish(
                    s,
                    GenEvent::Error(Status::cancelled("cancelled")),
                    "cancelled",
                )
                .await;
            } else {
                i += 1;
            }
        }
        let mut keep = VecDeque::new();
        while let Some(s) = self.waiting.pop_front() {
            if s.job.tx.is_closed() {
                self.finish(
                    s,
                    GenEvent::Error(Status::cancelled("cancelled")),
                    "cancelled",
                )
                .await;
            } else {
                keep.push_back(s);
            }
        }
        self.waiting = keep;
    }

    /// Gives `running[i]` blocks for `positions`, preempting the most recently admitted
    /// sequences when none are free (sequence `i` itself when it is the most recent).
    fn grow(&mut self, i: usize, positions: usize) -> Grow {
        let bs = self.block_size();
        while self.running[i].blocks.len() * bs < positions {
            if let Some(b) = self.free_blocks.pop() {
                self.running[i].blocks.push(b);
                continue;
            }
            if self.running.len() == 1 {
                return Grow::Impossible;
            }
            let mut victim = self.running.pop().expect("len > 1");
            self.release(&mut victim);
            self.shared
                .metrics
                .preemptions
                .fetch_add(1, Ordering::Relaxed);
            self.waiting.push_front(victim);
            if self.running.len() == i {
                return Grow::SelfPreempted;
            }
        }
        Grow::Ok
    }

    /// One engine iteration: schedule, run the step on every worker, apply the results.
    async fn iteration(&mut self) -> Result<(), StepFailure> {
        let cfg = self.shared.cfg.clone();
        let (budget0, cap, bs) = (
            cfg.max_batch_tokens.max(1),
            cfg.max_seqs.max(1),
            cfg.block_size,
        );
        let mut budget = budget0;
        // (index in running, tokens this step)
        let mut sched: Vec<(usize, usize)> = Vec::new();
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let need = self.running[i].tokens.len() - self.running[i].computed;
            let n = need.min(budget);
            let end = self.running[i].computed + n;
            match self.grow(i, end) {
                Grow::Ok => {}
                Grow::SelfPreempted => break,
                Grow::Impossible => {
                    // Alone and still out of blocks: the cache cannot hold this sequence.
                    let s = self.running.remove(i);
                    let st = Status::resource_exhausted(format!(
                    "the sequence needs more than the {} KV blocks of {bs} tokens the cache holds",
                    cfg.kv_blocks
                ));
                    self.finish(s, GenEvent::Error(st), "error").await;
                    continue;
                }
            }
            sched.push((i, n));
            budget -= n;
            i += 1;
        }
        // Admit waiting sequences while blocks for their first chunk are free.
        while budget > 0 && self.running.len() < cap {
            let Some(front) = self.waiting.front() else {
                break;
            };
            let n = (front.tokens.len() - front.computed).min(budget);
            let blocks = n.div_ceil(bs);
            if blocks > self.free_blocks.len() {
                break;
            }
            let mut s = self.waiting.pop_front().expect("front exists");
            for _ in 0..blocks {
                s.blocks.push(self.free_blocks.pop().expect("checked"));
            }
            self.shared
                .metrics
                .prompt_tokens
                .fetch_add(s.tokens.len() as u64, Ordering::Relaxed);
            self.running.push(s);
            sched.push((self.running.len() - 1, n));
            budget -= n;
        }
        if sched.is_empty() {
            // Nothing fits now (every block is held by sequences that cannot run): wait a
            // little for cancellations rather than spin.
            if !self.pending_free.is_empty() {
                let free = std::mem::take(&mut self.pending_free);
                self.step(vec![], free, 0).await?;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            return Ok(());
        }
        let mut seqs = Vec::with_capacity(sched.len());
        let vocab = self.shared.model.vocab_size;
        // Logits the sampling rank returns: `n` rows of every sequence that asks for them.
        let mut want_logits = 0;
        for &(i, n) in &sched {
            let first = self.running[i].wid == 0;
            if first {
                self.running[i].wid = self.next_wid;
                self.next_wid += 1;
            }
            let s = &mut self.running[i];
            let p = &s.job.params;
            let start = s.computed;
            seqs.push(pb::SeqStep {
                seq_id: s.wid,
                tokens: s.tokens[start..start + n].to_vec(),
                start_pos: start as u32,
                new_blocks: s.blocks[s.sent_blocks..].to_vec(),
                sampling: first.then_some(pb::SamplingParams {
                    temperature: p.sampling.temperature,
                    top_p: p.sampling.top_p,
                    top_k: p.sampling.top_k as u32,
                    seed: p.sampling.seed,
                }),
                sample: start + n == s.tokens.len(),
                return_logits: p.prompt_logits
                    && start < s.prompt_len
                    && start + n > s.logit_rows_sent,
                top_logprobs: p.top_logprobs,
            });
            if seqs.last().is_some_and(|x| x.return_logits) {
                want_logits += n * vocab;
            }
            s.sent_blocks = s.blocks.len();
        }
        let free = std::mem::take(&mut self.pending_free);
        let returns: Vec<bool> = seqs.iter().map(|x| x.return_logits).collect();
        let r = self.step(seqs, free, want_logits).await?;
        if r.logits.len() != want_logits {
            return Err(StepFailure::Failed(format!(
                "the sampling rank returned {} logits, {want_logits} were asked for",
                r.logits.len()
            )));
        }
        // Apply: advance every scheduled sequence, then handle sampled tokens.
        let mut off = 0;
        let mut done: Vec<(usize, GenEvent, &'static str)> = Vec::new();
        for (k, &(i, n)) in sched.iter().enumerate() {
            let s = &mut self.running[i];
            if returns[k] {
                // Rows start..start+n; deliver the prompt rows not delivered yet.
                let rows = &r.logits[off..off + n * vocab];
                off += n * vocab;
                let start = s.computed;
                let (from, to) = (s.logit_rows_sent.max(start), (start + n).min(s.prompt_len));
                if from < to {
                    let per = grok_proto::limits::rows_per_chunk(vocab) * vocab;
                    for c in rows[(from - start) * vocab..(to - start) * vocab].chunks(per) {
                        let _ = s.job.tx.send(GenEvent::PromptLogits(c.to_vec()));
                    }
                    s.logit_rows_sent = to;
                }
            }
            s.computed += n;
            if s.computed < s.tokens.len() {
                continue;
            }
            let Some(t) = r.tokens.iter().find(|t| t.seq_id == s.wid) else {
                return Err(StepFailure::Failed(format!(
                    "the sampling rank returned no token for sequence {}",
                    s.wid
                )));
            };
            if t.token as usize >= vocab {
                return Err(StepFailure::Failed(format!(
                    "the sampling rank returned token {} for sequence {}, outside the vocabulary ({vocab})",
                    t.token, s.wid
                )));
            }
            let mut ev = TokenEvent {
                id: t.token,
                logprob: t.logprob,
                top: t.top.iter().map(|x| (x.token, x.logprob)).collect(),
                ..Default::default()
            };
            let now = Instant::now();
            match s.last_token {
                None => self
                    .shared
                    .metrics
                    .ttft
                    .observe((now - s.job.arrived).as_secs_f64()),
                Some(prev) => self.shared.metrics.itl.observe((now - prev).as_secs_f64()),
            }
            s.last_token = Some(now);
            s.tokens.push(t.token);
            s.generated += 1;
            self.shared
                .metrics
                .generated_tokens
                .fetch_add(1, Ordering::Relaxed);
            self.shared.generated.fetch_add(1, Ordering::Relaxed);
            let p = &s.job.params;
            let eos = self.shared.model.eos_token_id;
            let mut reason = if (!p.ignore_eos && t.token == eos) || p.stop_ids.contains(&t.token) {
                Some(FinishReason::Stop)
            } else if s.generated >= p.max_tokens {
                Some(FinishReason::Length)
            } else if s.tokens.len() >= self.shared.model.max_position_embeddings {
                Some(FinishReason::ContextLength)
            } else {
                None
            };
            // Text: decode, then hold back what could be the start of a stop string.
            if let Some(tok) = &self.shared.tokenizer {
                // A stop token's own text is not part of the output.
                if reason != Some(FinishReason::Stop) {
                    s.held
                        .push_str(&s.decoder.push(tok, t.token).unwrap_or_default());
                }
                if let Some((pos, _)) = p
                    .stop_strings
                    .iter()
                    .filter_map(|st| s.held.find(st.as_str()).map(|p| (p, st)))
                    .min()
                {
                    s.held.truncate(pos);
                    reason = Some(FinishReason::Stop);
                }
                if reason.is_none() {
                    let keep = p
                        .stop_strings
                        .iter()
                        .map(|x| x.len())
                        .max()
                        .unwrap_or(1)
                        .saturating_sub(1);
                    let mut cut = s.held.len().saturating_sub(keep);
                    while !s.held.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    ev.text = s.held[..cut].to_string();
                    s.held.drain(..cut);
                }
            }
            let send_ok = s.job.tx.send(GenEvent::Token(ev)).is_ok();
            if let Some(reason) = reason {
                let text = std::mem::take(&mut s.held);
                let ev = GenEvent::Done {
                    reason,
                    text,
                    prompt_tokens: s.prompt_len,
                    completion_tokens: s.generated,
                };
                done.push((i, ev, reason.as_str()));
            } else if !send_ok {
                done.push((
                    i,
                    GenEvent::Error(Status::cancelled("cancelled")),
                    "cancelled",
                ));
            }
        }
        // Remove finished sequences (highest index first keeps the others' indices valid).
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, ev, outcome) in done {
            let s = self.running.remove(i);
            self.finish(s, ev, outcome).await;
        }
        Ok(())
    }

    /// Sends one plan to every worker and waits for every answer.
    async fn step(
        &mut self,
        seqs: Vec<pb::SeqStep>,
        free: Vec<u64>,
        want_logits: usize,
    ) -> Result<pb::StepResult, StepFailure> {
        self.next_step += 1;
        // The step span: the child of the first request it computes, linked to the others.
        let span = tracing::info_span!(
            "step",
            step_id = self.next_step,
            seqs = seqs.len(),
            rows = seqs.iter().map(|s| s.tokens.len()).sum::<usize>()
        );
        // Trace context only when spans are exported: this runs every step.
        let traceparent = if grok_proto::telemetry::exporting() {
            let ids: std::collections::HashSet<u64> = seqs.iter().map(|x| x.seq_id).collect();
            let mut parented = false;
            for s in self
                .running
                .iter()
                .filter(|s| s.wid != 0 && ids.contains(&s.wid))
            {
                if parented {
                    grok_proto::telemetry::add_link(&span, &s.job.span);
                } else {
                    grok_proto::telemetry::set_parent_span(&span, &s.job.span);
                    parented = true;
                }
            }
            grok_proto::telemetry::traceparent(&span)
        } else {
            String::new()
        };
        let plan = pb::StepPlan {
            step_id: self.next_step,
            seqs,
            free_seqs: free,
            traceparent,
        };
        for l in &self.links {
            if l.plans.send(plan.clone()).await.is_err() {
                self.shared.set_worker(l.rank, |w| {
                    w.state = "lost".into();
                    w.detail = "its step stream is closed".into();
                });
                return Err(StepFailure::Lost(format!(
                    "worker `{}` (rank {}, {}) was lost: its step stream is closed",
                    l.id, l.rank, l.address
                )));
            }
        }
        let mut out = None;
        let mut errors = Vec::new();
        let mut lost_err = None;
        for l in &mut self.links {
            let r = tokio::select! {
                r = read_result(&mut l.results, self.step_timeout, want_logits) => r,
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
                    self.shared.set_worker(l.rank, |w| {
                        w.state = "lost".into();
                        w.detail = why.clone();
                    });
                }
                Ok(r) => {
                    self.shared.set_worker(l.rank, |w| {
                        w.steps += 1;
                        w.step_seconds += r.compute_seconds;
                        w.comm_seconds += r.comm_seconds;
                    });
                    if !r.expert_counts.is_empty() {
                        self.shared
                            .metrics
                            .add_expert_counts(r.first_layer as usize, &r.expert_counts);
                    }
                    if !r.error.is_empty() {
                        errors.push(r.error.clone());
                    }
                    if l.rank == self.sampler {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_bootstrap_goes_to_gpu_replicas_and_each_rank_gets_its_groups() {
        assert!(uses_nccl(&["cuda:0", "cuda:1"]));
        assert!(!uses_nccl(&["cuda:0", "cpu"]));
        assert!(!uses_nccl(&[]));
        let l = grok_shared::sharding::Layout::new(2, 1, 2);
        let mut ids = std::collections::HashMap::new();
        for g in grok_shared::collective::bootstrap::groups(&l) {
            ids.insert(g.name.clone(), vec![g.root as u8; 128]);
        }
        // Rank 3 is stage 1, tp rank 1: the world id (root 0) and tp1's (root 2).
        let (w, t) = nccl_ids_of(&l, 3, &ids);
        assert_eq!((w[0], t[0]), (0, 2));
        let (w, t) = nccl_ids_of(&l, 1, &ids);
        assert_eq!((w[0], t[0]), (0, 0));
        // tp = 1: no tensor-parallel group, an empty id.
        let l1 = grok_shared::sharding::Layout::new(1, 1, 2);
        let ids1: std::collections::HashMap<String, Vec<u8>> =
            [("world".to_string(), vec![9u8; 128])].into();
        assert!(nccl_ids_of(&l1, 1, &ids1).1.is_empty());
    }
}
