//! The replica's step loop: requests are queued (bounded), each step plan goes to every worker
//! over its long-lived `Step` stream, and every worker answers before the next step. A broken
//! stream means a lost worker: the request in flight ends with UNAVAILABLE naming it, and the
//! replica stops serving (the coordinator itself stays up and answers status).

use crate::server::{follow_load, lock, Shared};
use grok_proto::v1 as pb;
use grok_shared::sampling::SamplingParams;
use grok_shared::tokenizer::StreamDecoder;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

/// One generation request.
pub struct Job {
    pub prompt: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    pub ignore_eos: bool,
    pub stop_ids: Vec<u32>,
    pub return_logits: bool,
    pub tx: mpsc::Sender<Result<pb::GenerateResponse, Status>>,
}

/// Submits jobs to a serving replica.
#[derive(Clone)]
pub struct ReplicaHandle {
    tx: mpsc::Sender<Job>,
}

/// Jobs waiting for the replica beyond this are refused with RESOURCE_EXHAUSTED.
const QUEUE_DEPTH: usize = 256;

impl ReplicaHandle {
    pub async fn submit(&self, job: Job) -> Result<(), Status> {
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Status::resource_exhausted(format!(
                "the request queue is full ({QUEUE_DEPTH} waiting); retry later"
            )),
            mpsc::error::TrySendError::Closed(_) => {
                Status::unavailable("the replica stopped serving")
            }
        })
    }
}

struct WorkerLink {
    rank: usize,
    id: String,
    address: String,
    plans: mpsc::Sender<pb::StepPlan>,
    results: tonic::Streaming<pb::StepResult>,
}

struct Replica {
    shared: Arc<Shared>,
    links: Vec<WorkerLink>,
    sampler: usize,
    free_blocks: Vec<u32>,
    next_step: u64,
    next_seq: u64,
    step_timeout: Duration,
}

enum StepFailure {
    /// A worker's stream broke: the replica is gone.
    Lost(String),
    /// A worker reported an error for this step.
    Failed(String),
}

fn endpoint(addr: &str) -> String {
    format!("http://{addr}")
}

/// Tells every worker to load its shard, then opens the step streams and starts serving.
pub async fn load_and_serve(shared: Arc<Shared>) {
    let l = shared.cfg.layout;
    let world = l.world_size();
    let workers: Vec<_> = lock(&shared.workers)
        .iter()
        .map(|w| w.clone().expect("all registered"))
        .collect();
    shared.set_state("loading", format!("{world} workers loading their shards"));
    let world_peers: Vec<String> = workers.iter().map(|w| w.world_comm.clone()).collect();
    let mut tasks = Vec::new();
    for (rank, w) in workers.iter().enumerate() {
        let p = l.place(rank);
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
        };
        let addr = w.address.clone();
        let id = w.id.clone();
        let shared = shared.clone();
        tasks.push(tokio::spawn(async move {
            let r: Result<pb::worker_client::WorkerClient<tonic::transport::Channel>, String> =
                async {
                    let mut c = pb::worker_client::WorkerClient::connect(endpoint(&addr))
                        .await
                        .map_err(|e| {
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
                    w.state = "failed".into();
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
        shared.set_state("failed", errors.join("; "));
        return;
    }
    let mut links = Vec::new();
    for (rank, mut c) in clients.into_iter().enumerate() {
        let (tx, rx) = mpsc::channel(4);
        match c.step(ReceiverStream::new(rx)).await {
            Ok(resp) => links.push(WorkerLink {
                rank,
                id: workers[rank].id.clone(),
                address: workers[rank].address.clone(),
                plans: tx,
                results: resp.into_inner(),
            }),
            Err(e) => {
                shared.set_state(
                    "failed",
                    format!(
                        "worker `{}` (rank {rank}) refused the step stream: {}",
                        workers[rank].id,
                        e.message()
                    ),
                );
                return;
            }
        }
    }
    for r in 0..world {
        shared.set_worker(r, |w| w.state = "ready".into());
    }
    let (tx, rx) = mpsc::channel(QUEUE_DEPTH);
    let sampler = (l.pp - 1) * l.tp;
    let replica = Replica {
        shared: shared.clone(),
        links,
        sampler,
        free_blocks: (0..shared.cfg.kv_blocks as u32).rev().collect(),
        next_step: 0,
        next_seq: 1,
        step_timeout: Duration::from_millis(shared.cfg.comm_timeout_ms as u64 + 10_000),
    };
    *lock(&shared.replica) = Some(ReplicaHandle { tx });
    shared.set_state("ready", format!("serving with {world} workers"));
    tokio::spawn(replica.run(rx));
}

impl Replica {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        while let Some(job) = rx.recv().await {
            if let Err(StepFailure::Lost(why)) = self.serve(job).await {
                *lock(&self.shared.replica) = None;
                self.shared.set_state("failed", why.clone());
                // Refuse whatever is still queued.
                rx.close();
                while let Some(j) = rx.recv().await {
                    let _ = j.tx.send(Err(Status::unavailable(why.clone()))).await;
                }
                return;
            }
        }
    }

    /// Sends one plan to every worker and waits for every answer.
    async fn step(
        &mut self,
        seqs: Vec<pb::SeqStep>,
        free: Vec<u64>,
    ) -> Result<pb::StepResult, StepFailure> {
        self.next_step += 1;
        let plan = pb::StepPlan {
            step_id: self.next_step,
            seqs,
            free_seqs: free,
        };
        let lost = |l: &WorkerLink, why: String| {
            StepFailure::Lost(format!(
                "worker `{}` (rank {}, {}) was lost: {why}",
                l.id, l.rank, l.address
            ))
        };
        for l in &self.links {
            if l.plans.send(plan.clone()).await.is_err() {
                return Err(lost(l, "its step stream is closed".into()));
            }
        }
        let mut out = None;
        let mut errors = Vec::new();
        let mut lost_err = None;
        for l in &mut self.links {
            let msg = tokio::time::timeout(self.step_timeout, l.results.message()).await;
            let r = match msg {
                Err(_) => Err(format!("no answer within {:?}", self.step_timeout)),
                Ok(Err(s)) => Err(s.message().to_string()),
                Ok(Ok(None)) => Err("it closed its step stream".into()),
                Ok(Ok(Some(r))) => Ok(r),
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

    fn take_blocks(&mut self, table_len: &mut usize, positions: usize) -> Option<Vec<u32>> {
        let bs = self.shared.cfg.block_size;
        let mut new = Vec::new();
        while (*table_len + new.len()) * bs < positions {
            match self.free_blocks.pop() {
                Some(b) => new.push(b),
                None => {
                    self.free_blocks.extend(new);
                    return None;
                }
            }
        }
        *table_len += new.len();
        Some(new)
    }

    async fn serve(&mut self, job: Job) -> Result<(), StepFailure> {
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut blocks: Vec<u32> = Vec::new();
        let res = self.generate(seq, &job, &mut blocks).await;
        self.free_blocks.append(&mut blocks);
        // Free the sequence on the workers (also after a failed step, unless the replica is gone).
        if !matches!(res, Err(StepFailure::Lost(_))) {
            if let Err(StepFailure::Lost(w)) = self.step(vec![], vec![seq]).await {
                let _ = job.tx.send(Err(Status::unavailable(w.clone()))).await;
                return Err(StepFailure::Lost(w));
            }
        }
        match res {
            Ok(()) => Ok(()),
            Err(StepFailure::Lost(w)) => {
                let _ = job.tx.send(Err(Status::unavailable(w.clone()))).await;
                Err(StepFailure::Lost(w))
            }
            Err(StepFailure::Failed(e)) => {
                let _ = job
                    .tx
                    .send(Err(Status::internal(format!("the step failed: {e}"))))
                    .await;
                Ok(())
            }
        }
    }

    async fn generate(
        &mut self,
        seq: u64,
        job: &Job,
        blocks: &mut Vec<u32>,
    ) -> Result<(), StepFailure> {
        let c = &self.shared.model;
        let ctx = c.max_position_embeddings;
        let eos = c.eos_token_id;
        let mut table_len = 0usize;
        let mut tokens = job.prompt.clone();
        let mut start = 0usize;
        let mut generated = 0usize;
        let mut decoder = StreamDecoder::default();
        let mut first = true;
        loop {
            let end = tokens.len();
            let Some(new) = self.take_blocks(&mut table_len, end) else {
                let _ = job
                    .tx
                    .send(Err(Status::resource_exhausted(
                        "the KV cache is full; retry later or lower max_tokens",
                    )))
                    .await;
                return Ok(());
            };
            blocks.extend_from_slice(&new);
            let s = &job.sampling;
            let step = pb::SeqStep {
                seq_id: seq,
                tokens: tokens[start..end].to_vec(),
                start_pos: start as u32,
                new_blocks: new,
                sampling: first.then_some(pb::SamplingParams {
                    temperature: s.temperature,
                    top_p: s.top_p,
                    top_k: s.top_k as u32,
                    seed: s.seed,
                }),
                sample: true,
                return_logits: job.return_logits && start == 0,
            };
            first = false;
            let r = self.step(vec![step], vec![]).await?;
            let Some(t) = r.tokens.iter().find(|t| t.seq_id == seq) else {
                return Err(StepFailure::Failed(
                    "the sampling rank returned no token".into(),
                ));
            };
            let id = t.token;
            generated += 1;
            self.shared.generated.fetch_add(1, Ordering::Relaxed);
            start = end;
            tokens.push(id);
            let stop = (!job.ignore_eos && id == eos) || job.stop_ids.contains(&id);
            let finish = if stop {
                Some("stop")
            } else if generated >= job.max_tokens {
                Some("length")
            } else if tokens.len() >= ctx {
                Some("context_length")
            } else {
                None
            };
            let text = match &self.shared.tokenizer {
                Some(tok) => decoder.push(tok, id).unwrap_or_default(),
                None => String::new(),
            };
            let msg = pb::GenerateResponse {
                ids: vec![id],
                text,
                finish_reason: finish.unwrap_or_default().to_string(),
                usage: finish.map(|_| pb::Usage {
                    prompt_tokens: job.prompt.len() as u32,
                    completion_tokens: generated as u32,
                }),
                logprobs: vec![t.logprob],
                prompt_logits: if start == job.prompt.len() {
                    r.logits.clone()
                } else {
                    vec![]
                },
            };
            if job.tx.send(Ok(msg)).await.is_err() {
                // The client went away: stop and free the sequence.
                return Ok(());
            }
            if finish.is_some() {
                return Ok(());
            }
        }
    }
}
