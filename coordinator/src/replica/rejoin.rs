//! Bringing a faulted replica's workers back: probes until every worker answers and still
//! names this coordinator as its owner (or a new worker registered for a lost rank); and the
//! requests parked meanwhile, which end when their hold runs out.

use super::seq::Parked;
use super::workers::connect_worker;
use crate::cluster::{Cluster, WorkerEntry};
use crate::request::GenEvent;
use crate::state::{ReplicaState, WorkerState};
use grok_proto::v1 as pb;
use grok_shared::sync::lock;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::Status;

/// Watches the lost ranks of a replica that serves without them (data-parallel attention):
/// resolves when every one of them is back (it answers as this coordinator's, or a worker
/// registered anew for its rank). Probes every `period`, or at once on a registration.
pub async fn lost_ranks_back(shared: Arc<Cluster>, ri: usize, lost: Vec<usize>, period: Duration) {
    let world = shared.cfg.layout.world_size();
    let base = ri * world;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shared.rejoin[ri].notified() => {}
        }
        let entries: Vec<Option<WorkerEntry>> = {
            let ws = lock(&shared.workers);
            lost.iter().map(|&k| ws[base + k].clone()).collect()
        };
        let shared = &shared;
        let probes = futures_util::future::join_all(entries.iter().map(|w| async move {
            match w {
                Some(w) => matches!(probe(shared, w).await, Probe::Back),
                None => false,
            }
        }))
        .await;
        if probes.iter().all(|&b| b) {
            return;
        }
    }
}

/// A health probe of a lost worker gives up after this long.
const PROBE_TIMEOUT: Duration = Duration::from_millis(1500);

/// Ends parked requests whose client went away or whose hold ran out, until none is left.
pub async fn expire_parked(shared: Arc<Cluster>) {
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

async fn probe(shared: &Cluster, w: &WorkerEntry) -> Probe {
    if w.state == WorkerState::Registered {
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

/// Waits until every worker of replica `ri` is back: it answers and is still this
/// coordinator's (a frozen process that resumed, a partition that healed, a step stream that
/// broke), or a worker registered anew for its rank. It probes every `period`, or at once when
/// a registration completes the replica. `ended` is the first moment every worker was back
/// (kept across failed reloads, cleared while any is missing).
///
/// With data-parallel attention it returns sooner, with the ranks that are back, when some
/// are missing but every expert still has a copy among the others: the replica serves on
/// them (`Some(live)`); `None`: every worker is back. When an expert has no copy left the
/// replica's status says so and it keeps waiting.
pub async fn wait_for_workers(
    shared: &Arc<Cluster>,
    ri: usize,
    period: Duration,
    ended: &mut Option<Instant>,
) -> Option<Vec<usize>> {
    let l = shared.cfg.layout;
    let (world, base) = (l.world_size(), ri * l.world_size());
    let mut last_detail = String::new();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = shared.rejoin[ri].notified() => {}
        }
        let entries: Vec<Option<WorkerEntry>> = lock(&shared.workers)[base..base + world].to_vec();
        let probes = futures_util::future::join_all(entries.iter().map(|w| async move {
            match w {
                Some(w) => probe(shared, w).await,
                None => Probe::Gone("no worker registered".into()),
            }
        }))
        .await;
        let mut missing = Vec::new();
        let mut live = Vec::new();
        for (k, p) in probes.into_iter().enumerate() {
            if matches!(p, Probe::Back) {
                live.push(k);
            }
            let rank = base + k;
            let id = entries[k].as_ref().map_or("?", |w| w.id.as_str());
            match p {
                Probe::Back => {}
                Probe::TakenOver(owner) => missing.push(format!(
                    "worker `{id}` (rank {rank}) is driven by another coordinator ({owner})"
                )),
                Probe::Gone(why) => {
                    shared.set_worker(rank, |w| {
                        if w.state != WorkerState::Registered {
                            w.state = WorkerState::Lost;
                            w.detail = why.clone();
                        }
                    });
                    missing.push(format!("worker `{id}` (rank {rank}): {why}"));
                }
            }
        }
        if missing.is_empty() {
            ended.get_or_insert_with(Instant::now);
            return None;
        }
        let mut detail = format!("waiting for its workers: {}", missing.join("; "));
        if l.dp_attention && !live.is_empty() {
            let placement = lock(&shared.placements)[ri].clone();
            match grok_shared::sharding::live_placement(&placement, &live) {
                Ok(_) => {
                    ended.get_or_insert_with(Instant::now);
                    return Some(live);
                }
                Err(e) => {
                    detail = format!("{detail}; it cannot serve without them: {e}");
                }
            }
        }
        *ended = None;
        if detail != last_detail {
            shared.set_replica_state(ri, ReplicaState::Recovering, detail.clone());
            last_detail = detail;
        }
    }
}
