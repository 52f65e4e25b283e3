//! Where a data-parallel attention replica's experts are, and rebalancing: more copies for the
//! experts that get the most tokens, on the ranks with the least expected work. Pure data.

use crate::cluster::Cluster;
use grok_proto::v1 as pb;
use grok_shared::sharding::Placement;
use grok_shared::sync::lock;
use tonic::Status;

/// The Admin service's Rebalance: from the tokens routed to each expert so far (every layer),
/// `extra_copies` more copies ([`add_copies`]) for replica `replica`; unless `dry_run`, the
/// placement is stored and the replica, when it serves, stops and loads again with it.
pub fn rebalance(
    cluster: &Cluster,
    r: &pb::RebalanceRequest,
) -> Result<pb::RebalanceResponse, Status> {
    let l = cluster.cfg.layout;
    if !l.dp_attention {
        return Err(Status::failed_precondition(format!(
            "rebalancing places copies of experts over data-parallel attention ranks (--dp-attention); this cluster runs tp={} ep={} pp={}",
            l.tp, l.ep, l.pp
        )));
    }
    let ri = r.replica as usize;
    if ri >= l.replicas.max(1) {
        return Err(Status::invalid_argument(format!(
            "replica {ri} does not exist: the cluster has {}",
            l.replicas.max(1)
        )));
    }
    if r.extra_copies == 0 || r.extra_copies as usize > l.ep * cluster.model.num_experts {
        return Err(Status::invalid_argument(format!(
            "extra_copies must be between 1 and {} (every expert on every rank)",
            l.ep * cluster.model.num_experts
        )));
    }
    // Workers load a new placement in place only from the whole checkpoint, on CPU: refuse
    // before storing one they could not load (the replica would never serve again).
    if grok_shared::formats::presharded::is_presharded(&cluster.cfg.model_dir) {
        return Err(Status::failed_precondition(format!(
            "{} is pre-sharded: its rank files hold the experts of the first placement only; rebalancing needs the whole checkpoint",
            cluster.cfg.model_dir.display()
        )));
    }
    let world = l.world_size();
    if let Some(w) = lock(&cluster.workers)[ri * world..(ri + 1) * world]
        .iter()
        .flatten()
        .find(|w| w.device.starts_with("cuda"))
    {
        return Err(Status::failed_precondition(format!(
            "worker `{}` runs on {}: CUDA workers load a new placement of the experts only by restarting; rebalance a CPU replica",
            w.id, w.device
        )));
    }
    let ne = cluster.model.num_experts;
    let mut routed = vec![0u64; ne];
    for (i, v) in lock(&cluster.metrics.expert_tokens).iter().enumerate() {
        routed[i % ne] += v;
    }
    if routed.iter().all(|&v| v == 0) {
        return Err(Status::failed_precondition(
            "no token has been routed to an expert yet: rebalancing needs measured counts (serve some load first)",
        ));
    }
    let before = lock(&cluster.placements)[ri].clone();
    let after = add_copies(&before, &routed, l.ep, r.extra_copies as usize);
    if let Err(e) = l.check_placement(&cluster.model, &after) {
        return Err(Status::internal(format!(
            "the rebalanced placement is invalid: {e}"
        )));
    }
    let resp = pb::RebalanceResponse {
        before: grok_proto::convert::placement_to_pb(&before),
        after: grok_proto::convert::placement_to_pb(&after),
        routed: routed.clone(),
        max_rank_share_before: max_rank_share(&before, &routed, l.ep),
        max_rank_share_after: max_rank_share(&after, &routed, l.ep),
    };
    if !r.dry_run && after != before {
        tracing::info!(replica = ri, ?before, ?after, "experts rebalanced");
        lock(&cluster.placements)[ri] = after;
        // A serving replica sees that its workers' placement is not this one and loads
        // again; one that does not serve loads it when it next does.
        cluster.regroup[ri].notify_one();
    }
    Ok(resp)
}

/// The expected share of the experts' work on each of `ep` ranks: an expert's routed tokens
/// are spread evenly over its copies.
pub fn rank_loads(p: &[Vec<usize>], routed: &[u64], ep: usize) -> Vec<f64> {
    let mut load = vec![0f64; ep];
    for (e, ranks) in p.iter().enumerate() {
        let share = routed.get(e).copied().unwrap_or(0) as f64 / ranks.len().max(1) as f64;
        for &r in ranks {
            if let Some(l) = load.get_mut(r) {
                *l += share;
            }
        }
    }
    load
}

/// The largest share of all expert work expected on one rank (1/ep is perfect balance).
pub fn max_rank_share(p: &[Vec<usize>], routed: &[u64], ep: usize) -> f64 {
    let load = rank_loads(p, routed, ep);
    let total: f64 = load.iter().sum();
    if total == 0.0 {
        return 0.0;
    }
    load.iter().copied().fold(0.0, f64::max) / total
}

/// `p` with up to `extra` more copies, added one at a time: each is the (expert, rank) pair
/// that leaves the busiest rank the least expected work (ties: the expert with the most
/// routed tokens per copy, then the rank with fewer experts, then the lower indices), and
/// copies stop when none would lower the busiest rank's load. Experts keep their copies, so
/// the ranks that hold them load only the new ones.
pub fn add_copies(p: &[Vec<usize>], routed: &[u64], ep: usize, extra: usize) -> Placement {
    let mut out: Placement = p.to_vec();
    let max_of = |q: &Placement| rank_loads(q, routed, ep).into_iter().fold(0.0, f64::max);
    for _ in 0..extra {
        let now = max_of(&out);
        // (max load after, -tokens per copy, experts on the rank, expert, rank)
        let mut best: Option<(f64, f64, usize, usize, usize)> = None;
        for e in 0..out.len() {
            let per = routed.get(e).copied().unwrap_or(0) as f64 / out[e].len().max(1) as f64;
            for r in (0..ep).filter(|r| !out[e].contains(r)) {
                let mut q = out.clone();
                q[e].push(r);
                let key = (
                    max_of(&q),
                    -per,
                    out.iter().filter(|x| x.contains(&r)).count(),
                    e,
                    r,
                );
                let better = best
                    .as_ref()
                    .is_none_or(|b| key.partial_cmp(b) == Some(std::cmp::Ordering::Less));
                if better {
                    best = Some(key);
                }
            }
        }
        match best {
            Some((after, _, _, e, r)) if after < now - 1e-9 * now.max(1.0) => {
                out[e].push(r);
                out[e].sort_unstable();
            }
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_experts_get_copies_on_the_least_loaded_ranks() {
        // 4 experts on 2 ranks, one copy each; expert 1 gets most of the tokens.
        let p = vec![vec![0], vec![1], vec![0], vec![1]];
        let routed = [10, 100, 10, 10];
        assert!((max_rank_share(&p, &routed, 2) - 110.0 / 130.0).abs() < 1e-9);
        let q = add_copies(&p, &routed, 2, 1);
        assert_eq!(q, vec![vec![0], vec![0, 1], vec![0], vec![1]]);
        assert!(max_rank_share(&q, &routed, 2) < max_rank_share(&p, &routed, 2));
        // An expert on every rank gets no more; the next hottest does.
        let q = add_copies(&p, &routed, 2, 2);
        assert_eq!(q[1], vec![0, 1]);
        assert_eq!(q.iter().map(Vec::len).sum::<usize>(), 6);
        // Every old copy stays where it was.
        for (a, b) in p.iter().zip(&q) {
            assert!(a.iter().all(|r| b.contains(r)));
        }
    }

    #[test]
    fn random_rebalancing_never_worsens_the_busiest_rank_and_keeps_copies_distinct() {
        let mut rng = grok_shared::sampling::Rng::new(3);
        for _ in 0..200 {
            let ep = 2 + (rng.next_u64() % 7) as usize;
            let n = 1 + (rng.next_u64() % 12) as usize;
            let p: Placement = (0..n).map(|e| vec![e % ep]).collect();
            let routed: Vec<u64> = (0..n).map(|_| rng.next_u64() % 1000).collect();
            let extra = (rng.next_u64() % 10) as usize;
            let q = add_copies(&p, &routed, ep, extra);
            for r in &q {
                let mut d = r.clone();
                d.dedup();
                assert_eq!(d.len(), r.len());
                assert!(r.iter().all(|&x| x < ep));
            }
            let added: usize = q.iter().map(Vec::len).sum::<usize>() - n;
            assert!(added <= extra);
            let (a, b) = (rank_loads(&p, &routed, ep), rank_loads(&q, &routed, ep));
            let max = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
            assert!(max(&b) <= max(&a) + 1e-9, "{p:?} -> {q:?} under {routed:?}");
        }
    }
}
