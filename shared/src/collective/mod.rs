//! Collective communication between the ranks of one model replica.
//!
//! [`Communicator`] is the one interface the model uses for tensor and expert parallelism
//! (all-reduce after the attention output and after the MoE), between pipeline stages
//! (point-to-point [`send`](Communicator::send) / [`recv`](Communicator::recv)), and for
//! expert-parallel dispatch and combine ([`all_to_all_v`](Communicator::all_to_all_v):
//! variable counts, empty parts allowed).
//!
//! Implementations:
//! - [`SingleRank`]: the world of one process; every collective is the identity.
//! - [`LocalComm`] ([`local_group`]): the ranks are threads of one process, connected by std
//!   channels; for unit tests of sharded code.
//! - [`TcpComm`]: separate processes or hosts, a full mesh of TCP connections; all-reduce is a
//!   real ring (reduce-scatter then all-gather), so each rank sends and receives
//!   `2 (world - 1) / world` of the buffer whatever the world size.
//!
//! Semantics shared by every implementation (one conformance suite checks them all):
//! - Every rank of the group calls the same collectives in the same order with buffers of the
//!   same length. A mismatch (other operation, other length) is detected from the message
//!   headers and reported as [`CommError::Protocol`] naming the peer, never read as data.
//! - `all_reduce_sum` gives the same bits on every rank; the summation order depends only on the
//!   world size and the position in the buffer.
//! - `send` is buffered: it returns once the message is queued, so a ring of `send` then `recv`
//!   cannot deadlock. A failure to deliver is reported by a later call on the same communicator.
//! - Every wait has a deadline; a dead peer, a closed connection or a peer that stays silent
//!   past the deadline is an error naming the peer rank (and, over TCP, its address), never a
//!   hang or a panic. Argument errors ([`CommError::Usage`]) are found before anything is sent
//!   and leave the communicator usable; after a communication error a [`TcpComm`] is
//!   unusable ([`CommError::Broken`]) and tells its peers why before closing its side, so the
//!   whole group fails fast.

use std::net::SocketAddr;

pub mod bootstrap;
mod local;
#[cfg(feature = "cuda")]
pub mod nccl;
mod tcp;
#[cfg(test)]
mod tests;

pub use local::{local_group, LocalComm};
pub use tcp::{TcpComm, TcpConfig};

/// Errors of a communicator. Each names the peer when one is involved; over TCP also the address
/// the peer listens on.
#[derive(Clone, Debug, thiserror::Error)]
pub enum CommError {
    /// The peer failed: it closed or reset its connection, left the group, or reported an
    /// error of its own (`why` says which).
    #[error("rank {peer}{}: {why}", at(.addr))]
    Peer {
        peer: usize,
        addr: Option<SocketAddr>,
        why: String,
    },
    /// The peer stayed silent (sent or read nothing) for the whole deadline.
    #[error("timed out after {ms} ms waiting for rank {peer}{}", at(.addr))]
    Timeout {
        peer: usize,
        addr: Option<SocketAddr>,
        ms: u64,
    },
    /// Setting up the connection with the peer failed or missed the connect deadline.
    #[error("cannot connect with rank {peer} at {addr}: {why}")]
    Connect {
        peer: usize,
        addr: SocketAddr,
        why: String,
    },
    /// The peer sent something other than what this rank expected: another operation or length
    /// (the ranks called different collectives), a bad handshake, a malformed frame.
    #[error("protocol mismatch with rank {peer}{}: {why}", at(.addr))]
    Protocol {
        peer: usize,
        addr: Option<SocketAddr>,
        why: String,
    },
    /// Wrong arguments (buffer lengths, ranks) detected before anything was sent.
    #[error("collective misuse: {0}")]
    Usage(String),
    /// A local resource failed (socket options, threads); no peer is involved.
    #[error("communicator I/O error: {0}")]
    Io(String),
    /// An earlier communication error left the communicator unusable; build a new one.
    #[error("communicator unusable after an earlier error: {0}")]
    Broken(Box<CommError>),
}

fn at(addr: &Option<SocketAddr>) -> String {
    match addr {
        Some(a) => format!(" ({a})"),
        None => String::new(),
    }
}

impl CommError {
    /// The peer rank the error names, if any.
    pub fn peer(&self) -> Option<usize> {
        match self {
            CommError::Peer { peer, .. }
            | CommError::Timeout { peer, .. }
            | CommError::Connect { peer, .. }
            | CommError::Protocol { peer, .. } => Some(*peer),
            CommError::Usage(_) | CommError::Io(_) => None,
            CommError::Broken(e) => e.peer(),
        }
    }
}

/// The collective operations a rank can take part in.
pub trait Communicator: Send + Sync {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// The NCCL communicator behind this one, if any: a device whose buffers NCCL can reach
    /// uses it directly instead of staging through the host.
    #[cfg(feature = "cuda")]
    fn nccl(&self) -> Option<&nccl::NcclComm> {
        None
    }
    /// Element-wise sum over all ranks, result on every rank.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError>;
    /// `output` (len = world_size * input.len()) receives every rank's input in rank order.
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError>;
    /// Copies `buf` of rank `root` into `buf` of every rank.
    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError>;
    /// Point-to-point; the peer calls `recv` with the same length.
    fn send(&self, buf: &[f32], peer: usize) -> Result<(), CommError>;
    fn recv(&self, buf: &mut [f32], peer: usize) -> Result<(), CommError>;
    fn barrier(&self) -> Result<(), CommError>;
    /// All-to-all with variable counts: `send` is `world` consecutive parts of
    /// `send_counts[j]` elements, part `j` for rank `j`; `recv` receives, in rank order,
    /// `recv_counts[i]` elements from rank `i` (what rank `i` sends to this one). Parts may be
    /// empty; a count that differs from the sender's is a [`CommError::Protocol`] error.
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), CommError>;
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
    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        check_gather(1, input.len(), output.len())?;
        output.copy_from_slice(input);
        Ok(())
    }
    fn broadcast(&self, _buf: &mut [f32], root: usize) -> Result<(), CommError> {
        check_root(1, root)
    }
    fn send(&self, _buf: &[f32], peer: usize) -> Result<(), CommError> {
        check_peer(0, 1, peer, "send")
    }
    fn recv(&self, _buf: &mut [f32], peer: usize) -> Result<(), CommError> {
        check_peer(0, 1, peer, "recv")
    }
    fn barrier(&self) -> Result<(), CommError> {
        Ok(())
    }
    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        check_all_to_all(0, 1, send.len(), send_counts, recv.len(), recv_counts)?;
        recv.copy_from_slice(send);
        Ok(())
    }
}

/// The operation a message belongs to; carried in every message so that ranks calling
/// different operations get a clear error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce = 1,
    AllGather = 2,
    Broadcast = 3,
    P2p = 4,
    Barrier = 5,
    AllToAll = 6,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce_sum",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast",
            Op::P2p => "send/recv",
            Op::Barrier => "barrier",
            Op::AllToAll => "all_to_all_v",
        }
    }

    fn from_u8(b: u8) -> Option<Op> {
        Some(match b {
            1 => Op::AllReduce,
            2 => Op::AllGather,
            3 => Op::Broadcast,
            4 => Op::P2p,
            5 => Op::Barrier,
            6 => Op::AllToAll,
            _ => return None,
        })
    }
}

/// Describes a header mismatch: what this rank called and what the peer sent, each as
/// (operation, caller's buffer length, elements in the message).
fn mismatch(want: (Op, usize, usize), got: (Op, usize, usize)) -> String {
    format!(
        "this rank called {} with {} elements and expects {} of them from this peer; \
         the peer sent {} elements of {} with {} elements",
        want.0.name(),
        want.1,
        want.2,
        got.2,
        got.0.name(),
        got.1
    )
}

/// `peer` must be another rank of the world.
fn check_peer(rank: usize, world: usize, peer: usize, what: &str) -> Result<(), CommError> {
    if peer >= world {
        return Err(CommError::Usage(format!(
            "{what}: peer rank {peer} is outside the world of {world}"
        )));
    }
    if peer == rank {
        return Err(CommError::Usage(format!(
            "{what}: rank {rank} cannot exchange messages with itself"
        )));
    }
    Ok(())
}

fn check_root(world: usize, root: usize) -> Result<(), CommError> {
    if root >= world {
        return Err(CommError::Usage(format!(
            "broadcast: root rank {root} is outside the world of {world}"
        )));
    }
    Ok(())
}

fn check_gather(world: usize, input: usize, output: usize) -> Result<(), CommError> {
    match input.checked_mul(world) {
        Some(n) if n == output => Ok(()),
        _ => Err(CommError::Usage(format!(
            "all_gather: output has {output} elements, expected world size {world} x input {input}"
        ))),
    }
}

/// The offsets of the parts of an all-to-all buffer: `offsets[j]..offsets[j + 1]` is part `j`.
fn offsets(counts: &[usize]) -> Vec<usize> {
    let mut o = Vec::with_capacity(counts.len() + 1);
    let mut at = 0usize;
    o.push(0);
    for &c in counts {
        at += c;
        o.push(at);
    }
    o
}

/// An all-to-all's arguments: a count per rank on both sides, adding up to the buffers, and
/// this rank's part to itself the same size on both sides.
fn check_all_to_all(
    rank: usize,
    world: usize,
    send: usize,
    send_counts: &[usize],
    recv: usize,
    recv_counts: &[usize],
) -> Result<(), CommError> {
    let bad = |m: String| Err(CommError::Usage(format!("all_to_all_v: {m}")));
    if send_counts.len() != world || recv_counts.len() != world {
        return bad(format!(
            "{} send counts and {} receive counts for a world of {world} (one per rank)",
            send_counts.len(),
            recv_counts.len()
        ));
    }
    let sum = |c: &[usize]| c.iter().try_fold(0usize, |a, &x| a.checked_add(x));
    if sum(send_counts) != Some(send) {
        return bad(format!(
            "the send counts add up to {:?}, the send buffer has {send} elements",
            sum(send_counts)
        ));
    }
    if sum(recv_counts) != Some(recv) {
        return bad(format!(
            "the receive counts add up to {:?}, the receive buffer has {recv} elements",
            sum(recv_counts)
        ));
    }
    if send_counts[rank] != recv_counts[rank] {
        return bad(format!(
            "rank {rank} sends itself {} elements but expects {}",
            send_counts[rank], recv_counts[rank]
        ));
    }
    Ok(())
}

/// Chunk `i` of `world` of a buffer of `len` elements: `[i*len/world, (i+1)*len/world)`.
fn chunk(i: usize, len: usize, world: usize) -> std::ops::Range<usize> {
    let edge = |k: usize| (k as u128 * len as u128 / world as u128) as usize;
    edge(i)..edge(i + 1)
}
