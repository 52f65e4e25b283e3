//! The model's errors.

use crate::collective::CommError;
use crate::formats::checkpoint::CheckpointError;

/// Errors of loading or running the model.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("invalid shard: {0}")]
    Shard(String),
    #[error("token id {id} at position {pos} is outside the vocabulary (size {vocab})")]
    TokenOutOfVocab { id: u32, pos: usize, vocab: usize },
    #[error("sequence of {len} tokens exceeds the context length {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("empty input: a sequence needs at least one token")]
    Empty,
    #[error("kv cache: {0}")]
    Kv(String),
    #[error("this shard holds no {0}")]
    NotInShard(&'static str),
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A device (CUDA) operation failed.
    #[error("device: {0}")]
    Device(String),
}
