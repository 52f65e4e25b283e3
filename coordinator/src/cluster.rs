//! The coordinator's view of its cluster: the configuration, every rank's worker, the
//! state of the cluster and of each replica, the serving replicas' queues, the load, the
//! metrics. Membership, the APIs and the replicas' step loops share it.

use crate::config::CoordinatorConfig;
use crate::metrics::Metrics;
use crate::replica::handle::ReplicaHandle;
use crate::replica::seq::Parked;
use crate::state::{derive_cluster, ClusterState, ReplicaState, WorkerState};
use grok_proto::v1 as pb;
use grok_shared::config::ModelConfig;
use grok_shared::constrain::Constrainer;
use grok_shared::sync::lock;
use grok_shared::tokenizer::Tokenizer;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Default)]
pub struct WorkerEntry {
    pub id: String,
    pub address: String,
    /// "cpu" or "cuda:N".
    pub device: String,
    pub world_comm: String,
    pub tp_comm: String,
    pub state: WorkerState,
    pub detail: String,
    pub fraction: f32,
    pub weight_bytes: u64,
    pub resident_bytes: u64,
    pub kv_bytes: u64,
    pub kv_blocks: u32,
    pub step_seconds: f64,
    pub comm_seconds: f64,
    pub comm_bytes: u64,
    pub steps: u64,
}

/// Everything the coordinator knows of its cluster, shared by the APIs, membership and the
/// replicas' step loops. Each field is locked on its own, briefly, never across an await.
pub struct Cluster {
    pub cfg: CoordinatorConfig,
    pub model: ModelConfig,
    pub tokenizer: Option<Tokenizer>,
    /// The tokenizer's file, sent to the sampling ranks (structured output).
    pub tokenizer_file: Option<Arc<Vec<u8>>>,
    /// Structured output's vocabulary, built once in the background at start.
    pub grammars: Arc<std::sync::OnceLock<Result<Constrainer, String>>>,
    pub workers: Mutex<Vec<Option<WorkerEntry>>>,
    /// The cluster's state and its detail (derived from the replicas' but for `standby`).
    pub state: Mutex<(ClusterState, String)>,
    /// The serving replicas (None: not serving: loading, recovering, failed).
    pub replicas: Mutex<Vec<Option<ReplicaHandle>>>,
    /// (state, detail) of each replica; the cluster state is derived from them.
    pub replica_states: Mutex<Vec<(ReplicaState, String)>>,
    /// Round-robin cursor over the serving replicas.
    pub next_replica: std::sync::atomic::AtomicUsize,
    /// Each replica's (running, waiting inside the engine, free KV blocks); the metrics' gauges
    /// are their sums.
    pub replica_load: Mutex<Vec<(u64, u64, u64)>>,
    /// Each replica's KV blocks per worker, as its workers allocated them (0: not loaded).
    pub kv_blocks: Vec<AtomicUsize>,
    /// Each replica's KV blocks in all (0: not loaded).
    pub kv_capacity: Vec<AtomicU64>,
    pub generated: AtomicU64,
    pub metrics: Metrics,
    /// (time, generated tokens, rate) of the last throughput sample.
    pub rate_sample: Mutex<(std::time::Instant, u64, f64)>,
    /// This coordinator process's id, sent with every Load: a worker names the coordinator
    /// that drives it, and only that one rejoins it by itself after a fault.
    pub instance: String,
    /// Per replica: its supervisor runs (one at a time: it loads, serves, and rejoins after
    /// faults).
    pub supervised: Vec<AtomicBool>,
    /// Per replica: it has served (a later load is a reload after a fault).
    pub served: Vec<AtomicBool>,
    /// Per replica: wakes its rejoin loop (a worker registered for one of its ranks).
    pub rejoin: Vec<tokio::sync::Notify>,
    /// Requests waiting for a replica to serve again (none was serving at their fault).
    pub parked: Mutex<Vec<Parked>>,
    /// Per replica: the block hashes in its prefix cache, for cache-aware routing.
    pub cached_prefixes: Vec<Mutex<std::collections::HashSet<u64>>>,
    /// Per replica (data-parallel attention): the ranks holding each expert; empty otherwise.
    pub placements: Mutex<Vec<grok_shared::sharding::Placement>>,
    /// Per replica: asks its step loop to stop and load again (a new expert placement).
    pub regroup: Vec<tokio::sync::Notify>,
    /// Per replica: stopped for a planned reload (its lost ranks are back, a new placement);
    /// new requests wait for it rather than being refused.
    pub reloading: Vec<AtomicBool>,
}

impl Cluster {
    /// Structured output's compiler (waits for it the first time, while it is built).
    pub fn constrainer(&self) -> Option<Result<&Constrainer, String>> {
        let bytes = self.tokenizer_file.as_ref()?;
        let r = self
            .grammars
            .get_or_init(|| build_grammars(bytes, self.model.vocab_size, self.model.eos_token_id));
        Some(r.as_ref().map_err(Clone::clone))
    }

    pub fn state(&self) -> ClusterState {
        lock(&self.state).0
    }

    pub fn set_state(&self, state: ClusterState, detail: impl Into<String>) {
        let detail = detail.into();
        if state == ClusterState::Failed {
            tracing::error!(%detail, "cluster failed");
        } else {
            tracing::info!(%state, %detail, "cluster state");
        }
        *lock(&self.state) = (state, detail);
    }

    /// Sets one replica's state and derives the cluster's ([`derive_cluster`]).
    pub fn set_replica_state(&self, r: usize, state: ReplicaState, detail: impl Into<String>) {
        let (cluster, summary) = {
            let mut rs = lock(&self.replica_states);
            rs[r] = (state, detail.into());
            derive_cluster(&rs, self.state() == ClusterState::Draining)
        };
        if cluster == ClusterState::Draining {
            // Quietly: the drain was logged when it began.
            *lock(&self.state) = (cluster, summary);
        } else {
            self.set_state(cluster, summary);
        }
    }

    /// Records one replica's load and sets the gauges to the sums over the replicas.
    pub fn set_replica_load(&self, r: usize, load: (u64, u64, u64)) {
        // Under the lock: the gauges are always those of the last update, capacity included.
        let mut l = lock(&self.replica_load);
        l[r] = load;
        let running = l.iter().map(|x| x.0).sum::<u64>();
        let free = l.iter().map(|x| x.2).sum::<u64>();
        let blocks: u64 = self
            .kv_capacity
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        let m = &self.metrics;
        m.running.store(running, Ordering::Relaxed);
        m.kv_free.store(free, Ordering::Relaxed);
        m.kv_used
            .store(blocks.saturating_sub(free), Ordering::Relaxed);
    }

    /// A replica's KV cache as loaded: `blocks` per worker, `capacity` blocks in all (the
    /// blocks of every serving worker with data-parallel attention; 0 and 0 when it stops).
    /// Its load gauges restart with every block free.
    pub fn set_kv_capacity(&self, r: usize, blocks: usize, capacity: usize) {
        self.kv_blocks[r].store(blocks, Ordering::Relaxed);
        self.kv_capacity[r].store(capacity as u64, Ordering::Relaxed);
        self.set_replica_load(r, (0, 0, capacity as u64));
    }

    /// Tokens one sequence's KV cache can hold: the largest of the loaded replicas' (a
    /// worker's with data-parallel attention, where a sequence lives on one worker). Before any
    /// replica is loaded: `--kv-blocks`' worth, or, when the workers size their caches, the
    /// model's context (the replica's scheduler refuses what its cache cannot hold).
    pub fn kv_tokens(&self) -> usize {
        let loaded = self
            .kv_blocks
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .max()
            .unwrap_or(0);
        let blocks = if loaded > 0 {
            loaded
        } else {
            match self.cfg.kv_blocks {
                Some(b) => b,
                None => return self.model.max_position_embeddings,
            }
        };
        blocks * self.cfg.block_size
    }

    pub fn set_worker(&self, rank: usize, f: impl FnOnce(&mut WorkerEntry)) {
        if let Some(Some(w)) = lock(&self.workers).get_mut(rank) {
            f(w);
        }
    }

    /// Generated tokens per second since the previous sample (taken at most once a second).
    pub fn tokens_per_s(&self) -> f64 {
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

    /// What `grokctl status` shows: the cluster, every rank's worker and shard, the load.
    pub fn status(&self) -> pb::ClusterStatusResponse {
        let (state, detail) = lock(&self.state).clone();
        let l = self.cfg.layout;
        let workers = lock(&self.workers).clone();
        let placements = lock(&self.placements).clone();
        let shards = (0..workers.len())
            .map(|r| {
                let (replica, local) = (r / l.world_size(), r % l.world_size());
                let p = l.place(local);
                let s = match placements.get(replica) {
                    Some(pl) if l.dp_attention => l.shard_placed(&self.model, local, pl),
                    _ => l.shard(&self.model, local),
                };
                let w = workers[r].clone().unwrap_or_default();
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
                    state: w.state.to_string(),
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
                    comm_bytes: w.comm_bytes,
                    kv_bytes: w.kv_bytes,
                    kv_blocks: w.kv_blocks,
                    device: w.device.clone(),
                    steps: w.steps,
                    replica: replica as u32,
                }
            })
            .collect();
        pb::ClusterStatusResponse {
            model: self.cfg.model_dir.display().to_string(),
            layout: Some(grok_proto::convert::layout_to_pb(&l)),
            state: state.to_string(),
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
            coordinator_step_seconds: self.metrics.coordinator_step.mean(),
            pipelined_steps: self.metrics.pipelined_steps.load(Ordering::Relaxed),
        }
    }
}

/// Why a coordinator cannot start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("reading the model at {dir}: {why}")]
    Model { dir: PathBuf, why: String },
    #[error("{0}")]
    Layout(String),
    #[error("the tokenizer: {0}")]
    Tokenizer(String),
}

/// Validates the configuration (layout against the model) before anything starts.
pub fn prepare(cfg: CoordinatorConfig) -> Result<Arc<Cluster>, StartError> {
    let model = ModelConfig::from_file(&cfg.model_dir.join("config.json")).map_err(|e| {
        StartError::Model {
            dir: cfg.model_dir.clone(),
            why: e.to_string(),
        }
    })?;
    cfg.layout
        .validate(&model)
        .map_err(|e| StartError::Layout(e.to_string()))?;
    let placement = match (&cfg.expert_placement, cfg.layout.dp_attention) {
        (Some(_), false) => {
            return Err(StartError::Layout(
                "an expert placement needs data-parallel attention (--dp-attention)".into(),
            ))
        }
        (Some(p), true) => {
            cfg.layout
                .check_placement(&model, p)
                .map_err(|e| StartError::Layout(format!("the expert placement: {e}")))?;
            p.clone()
        }
        (None, true) => cfg.layout.expert_ranks(&model),
        (None, false) => Vec::new(),
    };
    let tok_path = cfg.tokenizer.clone().or_else(|| {
        let p = cfg.model_dir.join("tokenizer.model");
        p.exists().then_some(p)
    });
    let (tokenizer, tokenizer_file) = match tok_path {
        Some(p) => {
            let bytes = std::fs::read(&p)
                .map_err(|e| StartError::Tokenizer(format!("{}: {e}", p.display())))?;
            let t = Tokenizer::from_bytes(&bytes)
                .map_err(|e| StartError::Tokenizer(format!("{}: {e}", p.display())))?;
            (Some(t), Some(Arc::new(bytes)))
        }
        None => (None, None),
    };
    let grammars = Arc::new(std::sync::OnceLock::new());
    if let Some(bytes) = &tokenizer_file {
        // Some hundred milliseconds for Grok-1's vocabulary: off the start-up path.
        let (g, bytes, vocab, eos) = (
            grammars.clone(),
            bytes.clone(),
            model.vocab_size,
            model.eos_token_id,
        );
        std::thread::spawn(move || {
            g.get_or_init(|| build_grammars(&bytes, vocab, eos));
        });
    }
    let replicas = cfg.layout.replicas.max(1);
    let world = cfg.layout.world_size() * replicas;
    Ok(Arc::new(Cluster {
        cfg,
        tokenizer,
        tokenizer_file,
        grammars,
        workers: Mutex::new(vec![None; world]),
        state: Mutex::new((
            ClusterState::WaitingForWorkers,
            format!("0 of {world} workers registered"),
        )),
        replicas: Mutex::new(vec![None; replicas]),
        replica_states: Mutex::new(vec![
            (ReplicaState::WaitingForWorkers, String::new());
            replicas
        ]),
        next_replica: std::sync::atomic::AtomicUsize::new(0),
        replica_load: Mutex::new(vec![(0, 0, 0); replicas]),
        kv_blocks: (0..replicas).map(|_| AtomicUsize::new(0)).collect(),
        kv_capacity: (0..replicas).map(|_| AtomicU64::new(0)).collect(),
        generated: AtomicU64::new(0),
        metrics: Metrics::new(model.num_layers, model.num_experts),
        rate_sample: Mutex::new((std::time::Instant::now(), 0, 0.0)),
        model,
        instance: instance_id(),
        supervised: (0..replicas).map(|_| AtomicBool::new(false)).collect(),
        served: (0..replicas).map(|_| AtomicBool::new(false)).collect(),
        rejoin: (0..replicas).map(|_| tokio::sync::Notify::new()).collect(),
        parked: Mutex::new(Vec::new()),
        cached_prefixes: (0..replicas).map(|_| Mutex::default()).collect(),
        placements: Mutex::new(vec![placement; replicas]),
        regroup: (0..replicas).map(|_| tokio::sync::Notify::new()).collect(),
        reloading: (0..replicas).map(|_| AtomicBool::new(false)).collect(),
    }))
}

fn build_grammars(tokenizer: &[u8], vocab: usize, eos: u32) -> Result<Constrainer, String> {
    let t = Tokenizer::from_bytes(tokenizer).map_err(|e| e.to_string())?;
    Constrainer::new(&t, vocab, eos).map_err(|e| e.to_string())
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
