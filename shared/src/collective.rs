//! Collective communication between the ranks of one model replica.
//!
//! [`Communicator`] is the one interface the model uses for tensor and expert parallelism
//! (all-reduce after the attention output and after the MoE) and between pipeline stages.
//! [`SingleRank`] is the world of one process.

/// Errors of a collective operation. Each names the peer when one is involved.
#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("peer rank {peer}: {why}")]
    Peer { peer: usize, why: String },
    #[error("collective timed out after {ms} ms waiting for rank {peer}")]
    Timeout { peer: usize, ms: u64 },
    #[error("collective misuse: {0}")]
    Usage(String),
}

/// The collective operations a rank can take part in.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Element-wise sum over all ranks, result on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
}

/// A world of one: every collective is the identity.
#[derive(Clone, Copy, Debug, Default)]
pub struct SingleRank;

impl Communicator for SingleRank {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _buf: &mut [f32]) -> Result<(), CommError> {
        Ok(())
    }
}
