//! A replica: one copy of the model over tp x ep x pp workers, and the loop that serves it.
//!
//! [`supervise`] owns a replica's life: load it ([`load`]), serve until a fault, bring its
//! workers back ([`rejoin`]), reload, serve again, with no operator. Serving is the step loop
//! of continuous-batching servers: each iteration the [`scheduler`] plans a step (decode
//! tokens first, then prefill chunks, under a token budget, a cap on running sequences and
//! the free KV blocks), [`workers`] sends the plan to every worker over its long-lived `Step`
//! stream and gathers the answers, and [`output`] turns the sampled tokens into the clients'
//! events. Requests wait in a bounded queue ([`handle`]); a full queue refuses at once.
//!
//! Sampling is stateless per position (`Rng::for_token`), so a seeded request gives the same
//! tokens alone, in any batch, after preemption, and after moving to another replica.
//!
//! A fault (a broken step stream, a worker the health monitor finds lost, a step that fails)
//! puts the replica in `recovering`; its requests move to another serving replica, or wait
//! for this one for `--fault-hold-ms`, and resume by re-prefilling. The coordinator stays up
//! and answers status throughout.

pub mod blocks;
pub mod handle;
pub mod load;
pub mod output;
pub mod placement;
pub mod rejoin;
pub mod scheduler;
pub mod seq;
pub mod workers;

use crate::cluster::Cluster;
use crate::request::{FinishReason, GenEvent};
use crate::state::ReplicaState;
use grok_proto::v1 as pb;
use grok_shared::sync::lock;
use handle::{Incoming, ReplicaHandle};
use output::OutputRules;
use scheduler::{Budget, Scheduler};
use seq::{Parked, Seq};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tonic::Status;
use workers::{StepFailure, Workers};

/// A request running through this many replica faults ends (it may be their cause).
const MAX_FAULTS: u32 = 3;
/// How often a recovering replica asks its workers whether they are back, at first; the
/// period doubles after each failed reload, up to `REJOIN_MAX_PERIOD`.
const REJOIN_PERIOD: Duration = Duration::from_millis(250);
const REJOIN_MAX_PERIOD: Duration = Duration::from_secs(8);

/// The life of replica `ri`: load it, serve until a fault, wait for its workers, reload,
/// serve again. One runs per replica (a second call returns at once). A first load that fails
/// leaves the replica `failed` (a registration that completes it again starts a new
/// supervisor); a reload that fails leaves it `recovering` and is tried again, the period
/// doubling. The time from a fault's end (every worker back) to serving goes to the log and
/// `/metrics`.
pub async fn supervise(cluster: Arc<Cluster>, ri: usize) {
    if cluster.supervised[ri].swap(true, Ordering::AcqRel) {
        return;
    }
    // When the fault being recovered from began (or the planned reload).
    let mut fault: Option<Stopped> = None;
    let mut period = REJOIN_PERIOD;
    let mut ended = None;
    loop {
        // Data-parallel attention: the ranks that serve without the lost ones.
        let mut live = None;
        if fault.is_some() {
            live = rejoin::wait_for_workers(&cluster, ri, period, &mut ended).await;
        }
        let workers = match load::load_replica(&cluster, ri, live.as_deref()).await {
            Ok(w) => w,
            Err(e) if fault.is_some() => {
                tracing::warn!(replica = ri, "rejoining failed: {e}; trying again");
                cluster.set_replica_state(ri, ReplicaState::Recovering, e);
                period = (period * 2).min(REJOIN_MAX_PERIOD);
                continue;
            }
            Err(e) => {
                cluster.set_replica_state(ri, ReplicaState::Failed, e);
                break;
            }
        };
        let replica = Replica::start(cluster.clone(), ri, workers, live);
        if let Some(Stopped { began, fault: was }) = fault.take() {
            let took = ended
                .take()
                .map_or(Duration::ZERO, |t: Instant| t.elapsed());
            if was {
                cluster.metrics.recovery.observe(took.as_secs_f64());
                cluster.metrics.recoveries.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(
                replica = ri,
                "serving again {:.2} s after the fault ended ({:.2} s after it began)",
                took.as_secs_f64(),
                began.elapsed().as_secs_f64()
            );
            period = REJOIN_PERIOD;
        }
        match replica.run().await {
            Some(s) => fault = Some(s),
            None => break,
        }
    }
    cluster.supervised[ri].store(false, Ordering::Release);
}

/// What the sampling rank needs of a request, sent with its first step after each admission.
/// `generated`: the tokens after the prompt so far (the grammar has passed them).
fn sampling_params(
    p: &crate::request::RequestParams,
    prompt_len: usize,
    generated: &[u32],
    eos: u32,
) -> pb::SamplingParams {
    let pen = &p.penalties;
    let mut stops = p.stop_ids.clone();
    if !p.ignore_eos {
        stops.push(eos);
    }
    pb::SamplingParams {
        temperature: p.sampling.temperature,
        top_p: p.sampling.top_p,
        top_k: p.sampling.top_k as u32,
        seed: p.sampling.seed,
        logit_bias: pen.logit_bias.iter().copied().collect(),
        presence_penalty: pen.presence,
        frequency_penalty: pen.frequency,
        repetition_penalty: pen.repetition,
        min_tokens: pen.min_tokens,
        min_tokens_stop_ids: if pen.min_tokens > 0 { stops } else { vec![] },
        prompt_len: prompt_len as u32,
        constraint: p
            .constraint
            .as_ref()
            .map(grok_proto::convert::constraint_of),
        generated: if p.constraint.is_some() {
            generated.to_vec()
        } else {
            vec![]
        },
    }
}

/// Why and when a replica stopped serving: a fault, or a planned reload (its lost ranks are
/// back, a new placement of the experts), which is neither counted against its requests nor
/// as a recovery.
struct Stopped {
    began: Instant,
    fault: bool,
}

/// A step sent to the workers whose result has not been applied yet.
struct InFlight {
    slots: Vec<scheduler::Slot>,
    /// Per slot: the step returns its logits.
    returns: Vec<bool>,
    /// Logits asked of each sampling worker (one; with data-parallel attention one per worker).
    want_logits: Vec<usize>,
    /// The coordinator's time planning it.
    coordinator: Duration,
    /// The step's span, open until its result is applied.
    _span: tracing::Span,
}

struct Replica {
    /// Which replica of the cluster this is.
    index: usize,
    cluster: Arc<Cluster>,
    workers: Workers,
    sched: Scheduler<Seq>,
    rx: mpsc::Receiver<Incoming>,
    /// Serving without lost ranks (data-parallel attention): ends when they are all back.
    back: Option<tokio::task::JoinHandle<()>>,
}

/// Resolves when the lost ranks of a replica serving without them are back (never when it
/// serves with every rank).
async fn ranks_back(back: &mut Option<tokio::task::JoinHandle<()>>) {
    match back {
        Some(h) => {
            let _ = h.await;
        }
        None => std::future::pending().await,
    }
}

impl Replica {
    /// Opens the replica's queue and starts taking requests: those parked by a fault first.
    /// `live`: with data-parallel attention, the ranks that serve without the lost others.
    fn start(cluster: Arc<Cluster>, ri: usize, workers: Workers, live: Option<Vec<usize>>) -> Self {
        let cfg = &cluster.cfg;
        let (handle, rx) = ReplicaHandle::channel(cfg.max_queue);
        let budget = Budget {
            max_batch_tokens: cfg.max_batch_tokens,
            max_seqs: cfg.max_seqs,
            block_size: cfg.block_size,
        };
        // Data-parallel attention: a KV cache per worker, each running its own sequences.
        let ranks = match (&live, cfg.layout.dp_attention) {
            (Some(l), true) => l.len(),
            (None, true) => cfg.layout.world_size(),
            _ => 1,
        };
        // The blocks the workers allocated (the smallest cache of the replica's workers).
        let blocks = workers.kv_blocks;
        let mut sched = Scheduler::with_ranks(budget, ranks, blocks, cfg.prefix_caching);
        cluster.set_kv_capacity(ri, blocks, cfg.replica_kv_blocks(blocks, ranks));
        // Serving from here: the router parks no request once the handle is in (it decides
        // under the same lock), so none is left behind.
        let reload = cluster.served[ri].swap(true, Ordering::AcqRel);
        let parked = {
            let mut rs = lock(&cluster.replicas);
            rs[ri] = Some(handle);
            cluster.reloading[ri].store(false, Ordering::Release);
            std::mem::take(&mut *lock(&cluster.parked))
        };
        let resumed = parked.len();
        for p in parked {
            sched.push_back(*p.seq);
        }
        cluster
            .metrics
            .resumed
            .fetch_add(resumed as u64, Ordering::Relaxed);
        let world = cfg.layout.world_size();
        let lost: Vec<usize> = match &live {
            Some(l) => (0..world).filter(|r| !l.contains(r)).collect(),
            None => Vec::new(),
        };
        let detail = if !lost.is_empty() {
            format!(
                "serving with {} of {world} workers: rank{} {lost:?} lost, their experts served by their other copies; they are taken back when they return",
                world - lost.len(),
                if lost.len() > 1 { "s" } else { "" }
            )
        } else if reload {
            format!("serving again with {world} workers")
        } else {
            format!("serving with {world} workers")
        };
        if !lost.is_empty() {
            tracing::warn!(replica = ri, ?lost, "serving without lost ranks");
        }
        cluster.set_replica_state(ri, ReplicaState::Ready, detail);
        let back = (!lost.is_empty()).then(|| {
            tokio::spawn(rejoin::lost_ranks_back(
                cluster.clone(),
                ri,
                lost,
                Duration::from_millis(500),
            ))
        });
        if resumed > 0 {
            tracing::info!(replica = ri, resumed, "requests resume after a fault");
        }
        Replica {
            index: ri,
            cluster,
            workers,
            sched,
            rx,
            back,
        }
    }

    /// Serves until a fault; returns when it began (`None`: the queue closed).
    ///
    /// With `pp` stages, up to `pp` steps are in flight, each over its own sequences: while
    /// the last stage works on one step, the stage before works on the next, and the loop
    /// applies each result as it arrives (in order) and sends the next step at once.
    async fn run(mut self) -> Option<Stopped> {
        let depth = self.cluster.cfg.layout.pp.max(1);
        let mut inflight: VecDeque<InFlight> = VecDeque::new();
        loop {
            // The cap holds per rank with data-parallel attention.
            let cap = self.cluster.cfg.max_seqs * self.sched.ranks();
            if self.sched.is_idle() && inflight.is_empty() {
                self.update_gauges();
                // Idle: a worker lost now is noticed before the next request needs it.
                tokio::select! {
                    job = self.rx.recv() => match job {
                        Some(job) => self.take(job),
                        None => {
                            if let Some(h) = self.back.take() {
                                h.abort();
                            }
                            return None;
                        }
                    },
                    why = self.workers.lost() => return Some(self.fault(why).await),
                    _ = ranks_back(&mut self.back) => return Some(self.regroup().await),
                    // Woken for a new placement; the check below decides.
                    _ = self.cluster.regroup[self.index].notified() => {}
                }
            }
            if self.back.as_ref().is_some_and(|h| h.is_finished()) {
                return Some(self.regroup().await);
            }
            // The placement the workers hold is not the cluster's (a rebalance): load again.
            if lock(&self.cluster.placements)[self.index] != self.workers.placement {
                return Some(self.replace_experts().await);
            }
            // Take from the bounded queue only what the batch can admit, so that the queue
            // bound is what callers see.
            while self.sched.num_waiting() + self.sched.running().len() < cap {
                match self.rx.try_recv() {
                    Ok(job) => self.take(job),
                    Err(_) => break,
                }
            }
            self.reap_cancelled();
            let r = async {
                // Fill the pipeline, then apply the oldest step's result.
                while inflight.len() < depth {
                    match self
                        .launch(depth - inflight.len(), !inflight.is_empty())
                        .await?
                    {
                        Some(f) => inflight.push_back(f),
                        None => break,
                    }
                }
                match inflight.pop_front() {
                    Some(f) => self.complete(f).await,
                    None => {
                        // Nothing fits now (every block is held by sequences that cannot run):
                        // wait a little for cancellations rather than spin.
                        tokio::time::sleep(Duration::from_millis(5)).await;
                        Ok(())
                    }
                }
            }
            .await;
            match r {
                Ok(()) => {}
                Err(StepFailure::Lost(why)) => return Some(self.fault(why).await),
                // A failed step may have left the collectives broken (a peer's deadline): the
                // workers reconnect and the sequences resume, as after a lost worker.
                Err(StepFailure::Failed(e)) => {
                    return Some(self.fault(format!("a step failed: {e}")).await)
                }
            }
            self.update_gauges();
            self.publish_cache();
        }
    }

    fn update_gauges(&self) {
        let mine = (
            self.sched.running().len() as u64,
            self.sched.num_waiting() as u64,
            self.sched.free_blocks() as u64,
        );
        self.cluster.set_replica_load(self.index, mine);
        self.cluster
            .metrics
            .set_cached_blocks(self.index, self.sched.cached_blocks() as u64);
    }

    /// Shows the router what this replica's prefix cache gained and lost.
    fn publish_cache(&mut self) {
        let (added, removed) = self.sched.cache_changes();
        if added.is_empty() && removed.is_empty() {
            return;
        }
        let mut set = lock(&self.cluster.cached_prefixes[self.index]);
        for h in removed {
            set.remove(&h);
        }
        set.extend(added);
    }

    /// Ends a request (its blocks are free already) with its last event.
    fn finish(&self, seq: Seq, ev: GenEvent, outcome: &str) {
        self.cluster.metrics.request_done(outcome);
        seq.job.span.record("outcome", outcome);
        seq.job.span.record("completion_tokens", seq.generated);
        // The load seen by the next request's routing counts this one as gone before its
        // client can send another.
        self.update_gauges();
        let _ = seq.job.tx.send(ev);
    }

    fn take(&mut self, m: Incoming) {
        match m {
            Incoming::New(job) => {
                self.cluster
                    .metrics
                    .queue_depth
                    .fetch_sub(1, Ordering::Relaxed);
                self.sched.push_back(Seq::new(*job));
            }
            // A request moved from a replica in recovery goes first: it has waited already.
            Incoming::Moved(s) => self.sched.push_front(*s),
        }
    }

    /// Ends requests whose client went away, freeing their blocks at once.
    fn reap_cancelled(&mut self) {
        for s in self.sched.remove_where(|s| s.job.tx.is_closed()) {
            self.finish(
                s,
                GenEvent::Error(Status::cancelled("cancelled")),
                "cancelled",
            );
        }
    }

    /// Plans a step (this step's share of the runnable sequences, `parts` steps being still
    /// to form) and sends it. `None`: nothing to send.
    async fn launch(
        &mut self,
        parts: usize,
        pipelined: bool,
    ) -> Result<Option<InFlight>, StepFailure> {
        let began = Instant::now();
        let cluster = self.cluster.clone();
        let m = &cluster.metrics;
        let plan = self.sched.schedule(parts);
        m.preemptions
            .fetch_add(plan.preempted as u64, Ordering::Relaxed);
        m.prompt_tokens
            .fetch_add(plan.admitted_tokens as u64, Ordering::Relaxed);
        m.prefix_hit_tokens
            .fetch_add(plan.reused_tokens as u64, Ordering::Relaxed);
        for s in plan.too_long {
            let st = Status::resource_exhausted(format!(
                "the sequence needs more than the {} KV blocks of {} tokens the cache holds",
                self.workers.kv_blocks, cluster.cfg.block_size
            ));
            self.finish(s, GenEvent::Error(st), "error");
        }
        if plan.slots.is_empty() && plan.free.is_empty() {
            return Ok(None);
        }
        let vocab = cluster.model.vocab_size;
        let eos = cluster.model.eos_token_id;
        // Logits the sampling rank returns: `n` rows of every sequence that asks for them (per
        // worker with data-parallel attention).
        let mut want_logits = vec![0; self.sched.ranks()];
        let mut seqs = Vec::with_capacity(plan.slots.len());
        let mut returns = Vec::with_capacity(plan.slots.len());
        for slot in &plan.slots {
            let s = &mut self.sched.running_mut()[slot.index].seq;
            if slot.first && s.generated == 0 && s.cached_tokens == 0 {
                s.cached_tokens = slot.reused.min(s.prompt_len);
            }
            let s = &*s;
            let p = &s.job.params;
            let return_logits = output::wants_prompt_logits(s, slot.start, slot.n);
            if return_logits {
                want_logits[slot.rank] += slot.n * vocab;
            }
            returns.push(return_logits);
            seqs.push(pb::SeqStep {
                seq_id: slot.wid,
                tokens: s.tokens[slot.start..slot.start + slot.n].to_vec(),
                start_pos: slot.start as u32,
                new_blocks: slot.new_blocks.clone(),
                sampling: slot
                    .first
                    .then(|| sampling_params(p, s.prompt_len, &s.tokens[s.prompt_len..], eos)),
                // A request that only scores its prompt (max_tokens 0) samples nothing.
                sample: slot.start + slot.n == s.tokens.len() && p.max_tokens > 0,
                return_logits,
                top_logprobs: p.top_logprobs,
                score_prompt: output::wants_prompt_scores(s, slot.start, slot.n),
                prompt_top: p.prompt_logprobs.unwrap_or(0),
                next_token: s.tokens[..s.prompt_len].get(slot.start + slot.n).copied(),
            });
        }
        let running = self.sched.running();
        let spans: Vec<&tracing::Span> = plan
            .slots
            .iter()
            .map(|x| &running[x.index].seq.job.span)
            .collect();
        let coordinator = began.elapsed();
        let ranks: Vec<usize> = plan.slots.iter().map(|x| x.rank).collect();
        let span = self.workers.send(seqs, &ranks, plan.free, &spans).await?;
        if pipelined {
            m.pipelined_steps.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(InFlight {
            slots: plan.slots,
            returns,
            want_logits,
            coordinator,
            _span: span,
        }))
    }

    /// Waits for a step's result and applies it: prompt logits, sampled tokens, finished
    /// requests.
    async fn complete(&mut self, f: InFlight) -> Result<(), StepFailure> {
        let r = self.workers.receive(&f.want_logits).await?;
        let began = Instant::now();
        let cluster = self.cluster.clone();
        let m = &cluster.metrics;
        let want_logits: usize = f.want_logits.iter().sum();
        if r.logits.len() != want_logits {
            return Err(StepFailure::Failed(format!(
                "the sampling rank returned {} logits, {want_logits} were asked for",
                r.logits.len()
            )));
        }
        let vocab = cluster.model.vocab_size;
        let rules = OutputRules {
            eos: cluster.model.eos_token_id,
            max_positions: cluster.model.max_position_embeddings,
            tokenizer: cluster.tokenizer.as_ref(),
        };
        // Apply: advance every scheduled sequence, then handle sampled tokens. Logits come in
        // worker order, each worker's in the order of its slots.
        let mut off: Vec<usize> = f
            .want_logits
            .iter()
            .scan(0, |acc, &w| {
                let start = *acc;
                *acc += w;
                Some(start)
            })
            .collect();
        let mut done: Vec<(usize, GenEvent, &'static str)> = Vec::new();
        for (k, slot) in f.slots.iter().enumerate() {
            let Some(i) = self.sched.complete(slot) else {
                return Err(StepFailure::Failed(format!(
                    "sequence {} of the step is not running",
                    slot.wid
                )));
            };
            let e = &mut self.sched.running_mut()[i];
            if f.returns[k] {
                let o = &mut off[slot.rank];
                let rows = &r.logits[*o..*o + slot.n * vocab];
                *o += slot.n * vocab;
                output::deliver_prompt_logits(&mut e.seq, rows, slot.start, vocab);
            }
            if e.seq.job.params.prompt_logprobs.is_some() {
                let scores = r
                    .prompt_logprobs
                    .iter()
                    .filter(|x| x.seq_id == slot.wid)
                    .map(|x| crate::request::PromptScore {
                        position: x.position as usize,
                        token: x.token,
                        logprob: x.logprob,
                        top: x.top.iter().map(|t| (t.token, t.logprob)).collect(),
                    });
                output::deliver_prompt_scores(&mut e.seq, scores);
            }
            if e.computed() < e.seq.tokens.len() {
                continue;
            }
            if e.seq.job.params.max_tokens == 0 {
                // Scored, nothing to generate.
                done.push((i, output::done(&mut e.seq, FinishReason::Length), "length"));
                continue;
            }
            let Some(t) = r.tokens.iter().find(|t| t.seq_id == slot.wid) else {
                return Err(StepFailure::Failed(format!(
                    "the sampling rank returned no token for sequence {}",
                    slot.wid
                )));
            };
            if !t.error.is_empty() {
                // The sequence cannot go on: it ends alone, the replica goes on. Its grammar's
                // own failure is the caller's to fix; anything else is the server's.
                let grammar = t.error.starts_with("structured output cannot continue")
                    || t.error.starts_with("the grammar does not compile");
                let st = if grammar {
                    Status::invalid_argument(t.error.clone())
                } else {
                    Status::internal(t.error.clone())
                };
                done.push((i, GenEvent::Error(st), "error"));
                continue;
            }
            if t.token as usize >= vocab {
                return Err(StepFailure::Failed(format!(
                    "the sampling rank returned token {} for sequence {}, outside the vocabulary ({vocab})",
                    t.token, slot.wid
                )));
            }
            let s = &mut e.seq;
            let now = Instant::now();
            match s.last_token {
                None => m.ttft.observe((now - s.job.arrived).as_secs_f64()),
                Some(prev) => m.itl.observe((now - prev).as_secs_f64()),
            }
            s.last_token = Some(now);
            m.generated_tokens.fetch_add(1, Ordering::Relaxed);
            cluster.generated.fetch_add(1, Ordering::Relaxed);
            let top = t.top.iter().map(|x| (x.token, x.logprob)).collect();
            let (ev, reason) = rules.on_token(s, t.token, t.logprob, top);
            let send_ok = s.job.tx.send(GenEvent::Token(ev)).is_ok();
            if let Some(reason) = reason {
                done.push((i, output::done(s, reason), reason.as_str()));
            } else if !send_ok {
                let ev = GenEvent::Error(Status::cancelled("cancelled"));
                done.push((i, ev, "cancelled"));
            }
        }
        // Remove finished sequences (highest index first keeps the others' indices valid).
        done.sort_by_key(|d| std::cmp::Reverse(d.0));
        for (i, ev, outcome) in done {
            let s = self.sched.finish(i);
            self.finish(s, ev, outcome);
        }
        // The coordinator's own time for this step: planning it and applying its result.
        m.coordinator_step
            .observe((f.coordinator + began.elapsed()).as_secs_f64());
        Ok(())
    }

    /// A fault (a lost worker, a failed step): the survivors' step streams close and the
    /// replica is `recovering` until [`supervise`] has its workers back. Its requests move to
    /// another serving replica, which re-prefills their tokens so far and goes on (seeded
    /// sampling depends on positions only, so the output is the one they would have had);
    /// with none serving, they wait for this one for `--fault-hold-ms`, then end with a
    /// retryable UNAVAILABLE. A request running through [`MAX_FAULTS`] faults ends alone with
    /// INTERNAL (it may be their cause). Returns when the fault began.
    async fn fault(self, why: String) -> Stopped {
        self.stop(why, true).await
    }

    /// The lost ranks of a replica serving without them are back: it stops as after a fault
    /// (without counting one against its requests) and its supervisor loads it with every
    /// rank; the requests resume by re-prefilling.
    async fn regroup(self) -> Stopped {
        self.stop(
            "its lost ranks are back: it takes them in again".into(),
            false,
        )
        .await
    }

    /// A new placement of the experts (rebalancing): it stops as for [`Replica::regroup`] and
    /// its supervisor loads it again; each worker loads only the experts placed on it anew.
    async fn replace_experts(self) -> Stopped {
        self.stop(
            "a new placement of the experts: its workers load the experts placed on them anew"
                .into(),
            false,
        )
        .await
    }

    async fn stop(self, why: String, is_fault: bool) -> Stopped {
        let Replica {
            index: me,
            cluster,
            workers,
            mut sched,
            mut rx,
            back,
        } = self;
        if let Some(h) = back {
            h.abort();
        }
        let began = Instant::now();
        lock(&cluster.replicas)[me] = None;
        cluster.reloading[me].store(!is_fault, Ordering::Release);
        // Its prefix cache goes with the workers' state.
        lock(&cluster.cached_prefixes[me]).clear();
        if is_fault {
            cluster
                .metrics
                .replica_faults
                .fetch_add(1, Ordering::Relaxed);
            tracing::warn!(replica = me, "{why}");
        } else {
            tracing::info!(replica = me, "{why}");
        }
        cluster.set_replica_state(
            me,
            ReplicaState::Recovering,
            format!("{why}; rejoining its workers"),
        );
        drop(workers);
        let (mut moving, waiting) = sched.drain();
        if is_fault {
            for s in &mut moving {
                s.faults += 1;
            }
        }
        moving.extend(waiting);
        rx.close();
        while let Some(m) = rx.recv().await {
            match m {
                Incoming::New(j) => {
                    cluster.metrics.queue_depth.fetch_sub(1, Ordering::Relaxed);
                    moving.push(Seq::new(*j));
                }
                Incoming::Moved(s) => moving.push(*s),
            }
        }
        let others: Vec<ReplicaHandle> =
            lock(&cluster.replicas).iter().flatten().cloned().collect();
        let hold = Duration::from_millis(cluster.cfg.fault_hold_ms);
        let (mut moved, mut parked, mut failed) = (0, 0, 0);
        for (i, s) in moving.into_iter().enumerate() {
            if s.faults >= MAX_FAULTS {
                failed += 1;
                cluster.metrics.request_done("error");
                let _ = s.job.tx.send(GenEvent::Error(Status::internal(format!(
                    "the request was running through {} replica faults (the last: {why}); it is not retried again",
                    s.faults
                ))));
                continue;
            }
            let s = match others.get(i % others.len().max(1)) {
                Some(h) => match h.take_over(Box::new(s)) {
                    Ok(()) => {
                        moved += 1;
                        continue;
                    }
                    Err(s) => s,
                },
                None => Box::new(s),
            };
            parked += 1;
            lock(&cluster.parked).push(Parked {
                seq: s,
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
            tokio::spawn(rejoin::expire_parked(cluster.clone()));
        }
        // A stopped replica holds no cache until it serves again.
        cluster.set_kv_capacity(me, 0, 0);
        Stopped {
            began,
            fault: is_fault,
        }
    }
}
