//! Loading a replica: the NCCL ids of its groups (GPU replicas), a `Load` to every worker with
//! its peers, the progress of each, then the step streams.

use super::workers::{connect_worker, WorkerClient, WorkerLink, Workers};
use crate::cluster::{Cluster, WorkerEntry};
use crate::state::{ReplicaState, WorkerState};
use grok_proto::v1 as pb;
use grok_shared::sync::lock;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;

/// How a replica's ranks exchange tensors, from where they run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Collectives {
    /// Every rank on a GPU of its own: NCCL ids are made and sent with `Load`.
    Nccl,
    /// The TCP collective, staged through the host; why not NCCL.
    Tcp(String),
}

/// The collectives of a replica whose ranks run at `(address, device)` (a worker's gRPC
/// address, `HOST:PORT`, and its device, `cpu` or `cuda:N`): NCCL only when every rank is on a
/// GPU and no two share one (the same host and device; NCCL refuses two ranks on one GPU).
pub fn collectives_for(ranks: &[(&str, &str)]) -> Collectives {
    if ranks.len() < 2 {
        return Collectives::Tcp("one rank: nothing to exchange".into());
    }
    if let Some((_, d)) = ranks.iter().find(|(_, d)| !d.starts_with("cuda")) {
        return Collectives::Tcp(format!("a rank runs on `{d}`"));
    }
    let host = |a: &str| a.rsplit_once(':').map_or(a, |(h, _)| h).to_string();
    let mut seen = std::collections::HashSet::new();
    for (a, d) in ranks {
        if !seen.insert((host(a), d.to_string())) {
            return Collectives::Tcp(format!("two ranks share {d} on {}", host(a)));
        }
    }
    Collectives::Nccl
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
/// reconnect its collectives), then opens the step streams. Ranks in messages and in
/// `Cluster.workers` are global (`ri * world + rank`); workers are told their rank inside the
/// replica. A worker that fails is marked `failed` on a first load and `lost` on a reload
/// (so that a replacement can register for its rank).
///
/// `live`: with data-parallel attention after the loss of ranks, the ranks (inside the
/// replica) that serve without the others; only they are loaded (they hold their shards: they
/// reconnect in a smaller group) and only they get step streams.
pub async fn load_replica(
    shared: &Arc<Cluster>,
    ri: usize,
    live: Option<&[usize]>,
) -> Result<Workers, String> {
    let reload = shared.served[ri].load(Ordering::Acquire);
    let l = shared.cfg.layout;
    let world = l.world_size();
    let base = ri * world;
    let members: Vec<usize> = live.map_or_else(|| (0..world).collect(), <[usize]>::to_vec);
    let workers: Vec<WorkerEntry> = {
        let ws = lock(&shared.workers);
        members
            .iter()
            .map(|&k| {
                ws[base + k]
                    .clone()
                    .ok_or("a rank of the replica has no worker")
            })
            .collect::<Result<_, _>>()?
    };
    shared.set_replica_state(
        ri,
        ReplicaState::Loading,
        format!("{} workers loading their shards", members.len()),
    );
    let world_peers: Vec<String> = workers.iter().map(|w| w.world_comm.clone()).collect();
    let placement = lock(&shared.placements)[ri].clone();
    // GPU replicas of more than one worker: each NCCL group's first rank makes its unique id.
    let ranks: Vec<(&str, &str)> = workers
        .iter()
        .map(|w| (w.address.as_str(), w.device.as_str()))
        .collect();
    let choice = collectives_for(&ranks);
    if let Collectives::Tcp(why) = &choice {
        if ranks.iter().any(|(_, d)| d.starts_with("cuda")) && world > 1 {
            tracing::info!(replica = ri, why = %why, "GPU ranks exchange tensors over TCP");
        }
    }
    let nccl = if choice == Collectives::Nccl && live.is_none() {
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
                    // No NCCL there (the library is missing, say): the TCP collective serves.
                    tracing::warn!(
                        replica = ri,
                        worker = %w.id,
                        rank = base + g.root,
                        group = %g.name,
                        error = %e,
                        "no NCCL id: the replica's ranks exchange tensors over TCP"
                    );
                    ids.clear();
                    break;
                }
            }
        }
        (!ids.is_empty()).then_some(ids)
    } else {
        None
    };
    let mut tasks = Vec::new();
    for (&rank, w) in members.iter().zip(&workers) {
        let p = l.place(rank);
        let (world_nccl_id, tp_nccl_id) = nccl
            .as_ref()
            .map(|ids| nccl_ids_of(&l, rank, ids))
            .unwrap_or_default();
        // With data-parallel attention the tensor-parallel group is the whole (live) group.
        let tp_peers: Vec<String> = if l.dp_attention {
            workers.iter().map(|w| w.tp_comm.clone()).collect()
        } else {
            (0..l.tp)
                .map(|t| workers[p.stage * l.tp + t].tp_comm.clone())
                .collect()
        };
        let req = pb::LoadRequest {
            model_dir: shared.cfg.model_dir.display().to_string(),
            layout: Some(grok_proto::convert::layout_to_pb(
                &grok_shared::sharding::Layout { replicas: 1, ..l },
            )),
            rank: rank as u32,
            world_peers: world_peers.clone(),
            tp_peers,
            kv_blocks: shared.cfg.kv_blocks.unwrap_or(0) as u32,
            kv_memory_fraction: shared.cfg.kv_memory_fraction as f32,
            block_size: shared.cfg.block_size as u32,
            comm_timeout_ms: shared.cfg.comm_timeout_ms,
            world_nccl_id,
            tp_nccl_id,
            coordinator_id: shared.instance.clone(),
            // Only the sampling ranks (last stage, tensor rank 0; every rank with
            // data-parallel attention) need it.
            tokenizer: match &shared.tokenizer_file {
                Some(t) if p.stage + 1 == l.pp && (p.tp_rank == 0 || l.dp_attention) => {
                    t.as_ref().clone()
                }
                _ => Vec::new(),
            },
            live_ranks: live
                .map(|v| v.iter().map(|&x| x as u32).collect())
                .unwrap_or_default(),
            placement: grok_proto::convert::placement_to_pb(&placement),
        };
        let addr = w.address.clone();
        let id = w.id.clone();
        let shared = shared.clone();
        let rank = base + rank;
        tasks.push(tokio::spawn(async move {
            let r: Result<(WorkerClient, usize), String> = async {
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
                let blocks = follow_load(&shared, rank, s).await.map_err(|e| {
                    format!("worker `{id}` (rank {rank}) at {addr} failed to load: {e}")
                })?;
                Ok((c, blocks))
            }
            .await;
            if let Err(e) = &r {
                shared.set_worker(rank, |w| {
                    w.state = if reload {
                        WorkerState::Lost
                    } else {
                        WorkerState::Failed
                    };
                    w.detail = e.clone();
                });
            }
            r
        }));
    }
    let mut clients = Vec::new();
    let mut blocks = Vec::new();
    let mut errors = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok((c, b))) => {
                clients.push(c);
                blocks.push(b);
            }
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
        let rank = base + members[local];
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
    for &r in &members {
        shared.set_worker(base + r, |w| w.state = WorkerState::Ready);
    }
    let sampler = base + (l.pp - 1) * l.tp;
    let mut w = Workers::new(shared.clone(), links, sampler, l.dp_attention);
    w.placement = placement;
    w.kv_blocks = replica_kv_blocks(&blocks, shared.cfg.kv_blocks).map_err(|e| {
        format!(
            "{e} (workers {:?})",
            workers.iter().map(|w| &w.id).collect::<Vec<_>>()
        )
    })?;
    if blocks.iter().any(|&b| b != w.kv_blocks) {
        tracing::info!(
            ?blocks,
            used = w.kv_blocks,
            "the replica's workers allocated different KV caches: it schedules against the smallest"
        );
    }
    Ok(w)
}

/// The blocks a replica schedules against: the smallest cache its workers allocated (a worker
/// that reports none, an older build, holds what the coordinator asked for).
fn replica_kv_blocks(reported: &[usize], asked: Option<usize>) -> Result<usize, String> {
    let per = reported
        .iter()
        .map(|&b| if b == 0 { asked.unwrap_or(0) } else { b });
    match per.min() {
        Some(b) if b > 0 => Ok(b),
        _ => Err("the workers reported no KV blocks: give --kv-blocks".into()),
    }
}

/// Drains a load-progress stream into the worker's entry; returns the KV blocks it allocated.
async fn follow_load(
    shared: &Cluster,
    rank: usize,
    mut s: tonic::Streaming<pb::LoadProgress>,
) -> Result<usize, String> {
    loop {
        match s.next().await {
            Some(Ok(p)) => {
                let ready = p.stage == "ready";
                shared.set_worker(rank, |w| {
                    w.state = WorkerState::from_stage(&p.stage);
                    w.detail = p.detail.clone();
                    w.fraction = p.fraction;
                    w.resident_bytes = p.resident_bytes;
                    if ready {
                        w.weight_bytes = p.weight_bytes;
                        w.kv_bytes = p.kv_bytes;
                        w.kv_blocks = p.kv_blocks;
                    }
                });
                if ready {
                    return Ok(p.kv_blocks as usize);
                }
            }
            Some(Err(e)) => return Err(e.message().to_string()),
            None => return Err("the worker closed the load stream before it was ready".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_bootstrap_goes_to_gpu_replicas_and_each_rank_gets_its_groups() {
        use Collectives::*;
        let c = |r: &[(&str, &str)]| collectives_for(r);
        assert_eq!(
            c(&[("10.0.0.1:5", "cuda:0"), ("10.0.0.1:6", "cuda:1")]),
            Nccl
        );
        // One GPU on each of two hosts.
        assert_eq!(
            c(&[("10.0.0.1:5", "cuda:0"), ("10.0.0.2:5", "cuda:0")]),
            Nccl
        );
        assert_eq!(c(&[("[::1]:5", "cuda:0"), ("[::2]:5", "cuda:0")]), Nccl);
        // Two workers on one GPU, a CPU rank, a lone rank: TCP, saying why.
        let shared = c(&[("10.0.0.1:5", "cuda:0"), ("10.0.0.1:6", "cuda:0")]);
        assert!(
            matches!(&shared, Tcp(w) if w.contains("share cuda:0 on 10.0.0.1")),
            "{shared:?}"
        );
        let cpu = c(&[("h:5", "cuda:0"), ("h:6", "cpu")]);
        assert!(matches!(&cpu, Tcp(w) if w.contains("`cpu`")), "{cpu:?}");
        assert!(matches!(c(&[("h:5", "cuda:0")]), Tcp(_)));
        assert!(matches!(c(&[]), Tcp(_)));
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
