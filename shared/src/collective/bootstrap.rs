//! Bootstrap of NCCL groups, the control-plane half (no CUDA needed): which rank of each group
//! makes the unique id, and checks on the ids that travel over gRPC.
//!
//! A replica with tp x pp GPU workers has one world group when pp > 1 (every rank;
//! point-to-point between stages) and one tensor-parallel group per stage when tp > 1. The coordinator asks each group's root for
//! a unique id (`Worker.NcclUniqueId`) and sends every member the ids of its groups in its
//! `LoadRequest`.

use super::CommError;
use crate::sharding::Layout;

/// Bytes of an NCCL unique id.
pub const ID_BYTES: usize = 128;

/// One group of a replica: its name, the rank (in the replica) that makes its id, and its
/// members in group-rank order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: String,
    pub root: usize,
    pub members: Vec<usize>,
}

/// The NCCL groups of a replica of `layout`: the world group (with pipeline stages), then each
/// stage's tensor-parallel group (none of size one).
pub fn groups(layout: &Layout) -> Vec<Group> {
    let world = layout.world_size();
    let mut g = Vec::new();
    // Only the pipeline's send and receive use the world group: without stages it would be
    // device memory and an initialisation for nothing.
    if world > 1 && layout.pp > 1 {
        g.push(Group {
            name: "world".into(),
            root: 0,
            members: (0..world).collect(),
        });
    }
    if layout.tp > 1 {
        for stage in 0..layout.pp {
            let members: Vec<usize> = (0..layout.tp).map(|t| stage * layout.tp + t).collect();
            g.push(Group {
                name: format!("tp{stage}"),
                root: members[0],
                members,
            });
        }
    }
    g
}

/// Checks an id received over the wire.
pub fn check_id(group: &str, bytes: &[u8]) -> Result<[u8; ID_BYTES], CommError> {
    bytes.try_into().map_err(|_| {
        CommError::Usage(format!(
            "the NCCL id of group {group} has {} bytes, not {ID_BYTES}",
            bytes.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_and_roots_follow_the_layout() {
        assert!(groups(&Layout::new(1, 1, 1)).is_empty());
        let g = groups(&Layout::new(4, 2, 2));
        assert_eq!(g.len(), 3);
        assert_eq!(
            (g[0].name.as_str(), g[0].root, g[0].members.len()),
            ("world", 0, 8)
        );
        assert_eq!(g[1].members, [0, 1, 2, 3]);
        assert_eq!((g[2].root, g[2].members.clone()), (4, vec![4, 5, 6, 7]));
        let pp = groups(&Layout::new(1, 1, 3));
        assert_eq!(pp.len(), 1, "pipeline only: the world group");
        let tp = groups(&Layout::new(2, 1, 1));
        assert_eq!(tp.len(), 1, "no stages: no world group");
        assert_eq!(
            (tp[0].name.as_str(), tp[0].members.clone()),
            ("tp0", vec![0, 1])
        );
        let dp = groups(&Layout::dp_attention(4, 2));
        assert_eq!(dp.len(), 1);
        assert_eq!(
            dp[0].members,
            [0, 1, 2, 3],
            "data-parallel attention: one group of all"
        );
        assert!(check_id("world", &[7u8; ID_BYTES]).is_ok());
        let e = check_id("tp1", &[0u8; 5]).unwrap_err().to_string();
        assert!(e.contains("tp1") && e.contains("5 bytes"), "{e}");
    }
}
