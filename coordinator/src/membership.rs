//! Membership: a worker joins a rank (by the `Register` RPC or an etcd announcement), and
//! the registration that completes a replica starts its supervisor.

use crate::cluster::{Cluster, WorkerEntry};
use crate::state::WorkerState;
use grok_proto::v1 as pb;
use grok_shared::sync::lock;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tonic::Status;

/// Admits a worker into the rank it asks for (or the first free one): the Register RPC and the
/// etcd discovery both come here. The registration that completes a replica starts its load.
pub fn admit(s: &Arc<Cluster>, r: &pb::RegisterRequest) -> Result<pb::RegisterResponse, Status> {
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
    let held = |w: &Option<WorkerEntry>| w.as_ref().is_some_and(|w| w.state != WorkerState::Lost);
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
            if let Some(w) = ws[k].as_ref().filter(|w| w.state != WorkerState::Lost) {
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
            state: WorkerState::Registered,
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
            // A replacement for a lost rank: the replica's supervisor reloads it.
            s.rejoin[replica].notify_one();
        } else {
            tokio::spawn(crate::replica::supervise(s.clone(), replica));
        }
    }
    Ok(pb::RegisterResponse {
        rank: rank as u32,
        world_size: world as u32,
    })
}
