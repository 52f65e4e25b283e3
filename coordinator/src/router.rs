//! Routing: which serving replica takes a request (the least loaded, ties in turn; none
//! that drains), and draining the cluster or one replica.

use crate::cluster::Cluster;
use crate::replica::blocks::prefix_hashes;
use crate::replica::handle::{ReplicaHandle, SubmitError};
use crate::request::Job;
use crate::state::{ClusterState, ReplicaState};
use grok_proto::v1 as pb;
use grok_shared::sync::lock;
use std::sync::atomic::Ordering;
use tonic::Status;

/// Queues a job on the serving replica.
pub fn submit(s: &std::sync::Arc<Cluster>, job: Job) -> Result<(), Status> {
    if s.state() == ClusterState::Draining {
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
            .filter(|(_, (_, st))| st.0 != ReplicaState::Draining)
            .filter_map(|(i, (h, _))| h.as_ref().map(|h| (i, h)))
            .collect();
        // Replicas whose KV cache holds the prompt (caches differ when each worker sizes its
        // own); when none does, every replica stays a candidate and refuses it with its size.
        let bs_tokens = s.cfg.block_size.max(1);
        let holds = |i: usize| {
            let b = s.kv_blocks[i].load(Ordering::Relaxed);
            b == 0 || b * bs_tokens > job.prompt.len()
        };
        let serving: Vec<(usize, &ReplicaHandle)> = if serving.iter().any(|&(i, _)| holds(i)) {
            serving.into_iter().filter(|&(i, _)| holds(i)).collect()
        } else {
            serving
        };
        // The least loaded (running, waiting and queued requests); ties in turn.
        let n = serving.len();
        let start = s.next_replica.fetch_add(1, Ordering::Relaxed);
        let load = |i: usize, h: &ReplicaHandle| loads[i].0 + loads[i].1 + h.queued() as u64;
        let least = (0..n)
            .map(|k| serving[(start + k) % n])
            .min_by_key(|(i, h)| load(*i, h));
        // Cache-aware: the replica holding the longest cached prefix of the prompt, unless it
        // is busier than the least loaded by more than a quarter of a batch.
        let slack = (s.cfg.max_seqs as u64 / 4).max(2);
        // The last token is always computed, so only the blocks before it count.
        let bs = s.cfg.block_size.max(1);
        let hashes = prefix_hashes(&job.prompt, bs, job.prompt.len().saturating_sub(1) / bs);
        let cached = (!hashes.is_empty())
            .then(|| {
                serving
                    .iter()
                    .map(|&(i, h)| {
                        let set = lock(&s.cached_prefixes[i]);
                        (hashes.iter().take_while(|x| set.contains(x)).count(), i, h)
                    })
                    .filter(|(m, _, _)| *m > 0)
                    .max_by_key(|(m, i, _)| (*m, std::cmp::Reverse(*i)))
            })
            .flatten();
        match (cached, least) {
            (Some((_, i, h)), Some((j, l))) if load(i, h) <= load(j, l) + slack => Some(h.clone()),
            (_, least) => least.map(|(_, h)| h.clone()),
        }
    };
    let Some(h) = handle else {
        // A replica stopped for a planned reload serves again in moments: the request waits
        // for it (as a fault's requests do, up to --fault-hold-ms) instead of being refused.
        let rs = lock(&s.replicas);
        if rs.iter().all(Option::is_none) && s.reloading.iter().any(|r| r.load(Ordering::Acquire)) {
            let hold = std::time::Duration::from_millis(s.cfg.fault_hold_ms);
            let first = {
                let mut p = lock(&s.parked);
                p.push(crate::replica::seq::Parked {
                    seq: Box::new(crate::replica::seq::Seq::new(job)),
                    until: std::time::Instant::now() + hold,
                    why: "its replica was reloading".into(),
                });
                p.len() == 1
            };
            drop(rs);
            if first {
                tokio::spawn(crate::replica::rejoin::expire_parked(s.clone()));
            }
            return Ok(());
        }
        drop(rs);
        let (state, detail) = lock(&s.state).clone();
        return Err(Status::unavailable(format!(
            "the cluster is not serving (state {state}{}{detail})",
            if detail.is_empty() { "" } else { ": " }
        )));
    };
    match h.submit(job) {
        Ok(()) => {
            s.metrics.queue_depth.fetch_add(1, Ordering::Relaxed);
            Ok(())
        }
        Err(e @ SubmitError::Full(_)) => {
            s.metrics.request_done("rejected");
            Err(Status::resource_exhausted(e.to_string()))
        }
        Err(e @ SubmitError::Closed) => Err(Status::unavailable(e.to_string())),
    }
}

/// `grokctl drain`: the cluster (or, with several replicas, one worker's replica) stops
/// taking requests and finishes its in-flight ones; `resume` undoes it.
pub fn drain(s: &Cluster, r: &pb::DrainRequest) -> Result<pb::DrainResponse, Status> {
    let rank = if r.worker_id.is_empty() {
        None
    } else {
        let at = lock(&s.workers)
            .iter()
            .position(|w| w.as_ref().is_some_and(|w| w.id == r.worker_id));
        Some(at.ok_or_else(|| {
            Status::not_found(format!("no worker `{}` in this cluster", r.worker_id))
        })?)
    };
    // With several replicas, draining a worker drains its replica only: the others serve on.
    if let (Some(rank), true) = (rank, s.cfg.layout.replicas > 1) {
        let ri = rank / s.cfg.layout.world_size();
        let state = lock(&s.replica_states)[ri].0;
        match (r.resume, state) {
            (false, ReplicaState::Ready) => s.set_replica_state(
                ri,
                ReplicaState::Draining,
                format!("drained for worker `{}`: no new requests", r.worker_id),
            ),
            (true, ReplicaState::Draining) => {
                s.set_replica_state(ri, ReplicaState::Ready, "serving again after a drain")
            }
            (false, ReplicaState::Draining) | (true, ReplicaState::Ready) => {}
            (_, other) => {
                return Err(Status::failed_precondition(format!(
                    "replica {ri} (worker `{}`) is {other}, not serving",
                    r.worker_id
                )));
            }
        }
        let load = lock(&s.replica_load)[ri];
        let queued = lock(&s.replicas)[ri]
            .as_ref()
            .map_or(0, |h| h.queued() as u64);
        return Ok(pb::DrainResponse {
            state: lock(&s.replica_states)[ri].0.to_string(),
            running_sequences: load.0,
            queued_requests: load.1 + queued,
        });
    }
    let state = s.state();
    match (r.resume, state) {
        (false, ClusterState::Ready) => s.set_state(
            ClusterState::Draining,
            "no new requests; in-flight ones finish",
        ),
        (false, ClusterState::Draining) | (true, ClusterState::Ready) => {}
        (true, ClusterState::Draining) => {
            s.set_state(ClusterState::Ready, "serving again after a drain")
        }
        (_, other) => {
            return Err(Status::failed_precondition(format!(
                "the cluster is {other}, not serving"
            )));
        }
    }
    let st = s.status();
    Ok(pb::DrainResponse {
        state: st.state,
        running_sequences: st.running_sequences,
        queued_requests: st.queued_requests,
    })
}
