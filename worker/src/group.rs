//! A data-parallel attention rank's group: the expert placement a load asks for, the rank's
//! place among the ranks that serve, and where each expert's rows go.

use grok_shared::sharding::{live_placement, Layout, Placement};

/// The placement a load asks for, checked: the given one, or the layout's round-robin one.
pub fn placement_for(
    layout: &Layout,
    c: &grok_shared::config::ModelConfig,
    given: &[Vec<usize>],
) -> Result<Placement, String> {
    if !layout.dp_attention {
        if !given.is_empty() {
            return Err("an expert placement is for data-parallel attention only".into());
        }
        return Ok(Vec::new());
    }
    let p = if given.is_empty() {
        layout.expert_ranks(c)
    } else {
        given.to_vec()
    };
    layout
        .check_placement(c, &p)
        .map_err(|e| format!("expert placement: {e}"))?;
    Ok(p)
}

/// This rank's data-parallel attention group: its index among the ranks that serve, and
/// their count (every rank of the replica when `live` is empty).
pub fn dp_group(layout: &Layout, rank: usize, live: &[usize]) -> Result<(usize, usize), String> {
    if live.is_empty() {
        return Ok((rank, layout.world_size()));
    }
    if !layout.dp_attention {
        return Err("live ranks are for data-parallel attention only".into());
    }
    let mut sorted = live.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    if sorted.len() != live.len() || sorted.iter().any(|&r| r >= layout.world_size()) {
        return Err(format!(
            "live ranks {live:?} are not distinct ranks of the {} of the replica",
            layout.world_size()
        ));
    }
    let me = live
        .iter()
        .position(|&r| r == rank)
        .ok_or_else(|| format!("rank {rank} is not among the live ranks {live:?}"))?;
    Ok((me, live.len()))
}

/// The experts' ranks in a data-parallel attention group of the `live` ranks (all: empty).
pub fn dispatch_of(
    layout: &Layout,
    placement: &[Vec<usize>],
    live: &[usize],
) -> Result<grok_shared::model::ExpertDispatch, String> {
    let all: Vec<usize> = (0..layout.world_size()).collect();
    let live = if live.is_empty() { &all[..] } else { live };
    let ranks = live_placement(placement, live)?;
    Ok(grok_shared::model::ExpertDispatch { ranks })
}
