//! TCP communicator for ranks in separate processes or on separate hosts.
//!
//! **Connections.** A full mesh: rank `i` connects to every rank `j < i` (retrying until the
//! connect deadline, since peers start at different times) and accepts a connection from every
//! rank `j > i`. The connecting side sends a hello (magic `GROKCOMM`, protocol version, its rank,
//! the world size) and the accepting side answers with its own, so both ends know who is at the
//! other end; a wrong or duplicate rank, another world size or another version is a
//! [`CommError::Protocol`] error. Connections from strangers (no magic) are logged and ignored.
//!
//! **Frames.** Every message is a 24-byte header — magic `GRKF`, operation code (1 byte), 3 zero
//! bytes, the length of the caller's buffer (u64) and the number of elements that follow
//! (u64), all little-endian — then the elements as little-endian f32. The receiver checks the
//! header against what it expects, so ranks calling different operations or lengths get a
//! clear error instead of garbage. Operation code `0xFF` is an abort: the length field names the
//! rank blamed, the payload (UTF-8) says why; a rank sends it to every peer when a collective
//! fails, then closes its sending side, so the whole group fails fast and the error names the
//! rank at fault.
//!
//! **Concurrency.** Each connection has a writer thread fed by a channel; the calling thread
//! reads. Sending and receiving in the same ring step therefore proceed at the same time, and
//! buffers of any size cannot deadlock. Every socket read and write has the operation timeout
//! ([`TcpConfig::timeout`]): a peer that makes no progress for that long is a
//! [`CommError::Timeout`]; a closed or reset connection is a [`CommError::Peer`].
//!
//! **Blame.** The rank that waits on a failed peer names it; its abort message then reaches the
//! others, whose errors name the same rank ("reported by rank k"). In a ring, a rank whose own
//! deadline runs out at the same moment may instead name the neighbour it was waiting on.

mod connect;
mod wire;

pub use connect::TcpConfig;
#[cfg(test)]
pub(super) use wire::hello;

use connect::{accept_all, dial};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wire::*;

use crate::collective::{
    check_all_to_all, check_gather, check_peer, check_root, chunk, offsets, CommError,
    Communicator, Op,
};

/// One rank of a group of processes connected by TCP (see the module documentation).
pub struct TcpComm {
    rank: usize,
    world: usize,
    peers: Vec<SocketAddr>,
    state: Mutex<State>,
    bytes_sent: Arc<AtomicU64>,
    comm_nanos: AtomicU64,
}

struct State {
    rank: usize,
    world: usize,
    /// The operation deadline ([`TcpConfig::timeout`]).
    timeout: Duration,
    peers: Vec<SocketAddr>,
    /// `links[j]`: the connection with rank `j` (`None` for this rank).
    links: Vec<Option<Link>>,
    /// The error that made the communicator unusable.
    broken: Option<CommError>,
    /// Receive buffer (bytes) for [`READ_BLOCK`] elements.
    scratch: Vec<u8>,
}

impl State {
    fn link(&mut self, peer: usize) -> Result<&mut Link, CommError> {
        let rank = self.rank;
        self.links
            .get_mut(peer)
            .and_then(Option::as_mut)
            .ok_or_else(|| {
                CommError::Usage(format!("rank {rank} has no connection with rank {peer}"))
            })
    }

    fn send_to(
        &mut self,
        peer: usize,
        op: Op,
        total: usize,
        data: &[f32],
    ) -> Result<(), CommError> {
        self.link(peer)?.post(op, total, data)
    }

    fn recv_from(
        &mut self,
        peer: usize,
        op: Op,
        total: usize,
        dst: &mut [f32],
        add: bool,
    ) -> Result<(), CommError> {
        let rank = self.rank;
        let link = self
            .links
            .get_mut(peer)
            .and_then(Option::as_mut)
            .ok_or_else(|| {
                CommError::Usage(format!("rank {rank} has no connection with rank {peer}"))
            })?;
        link.expect(op, total, dst.len(), rank, &self.peers)?;
        link.read_data(&mut self.scratch, dst, add)
    }

    fn flush(&mut self, peer: usize) -> Result<(), CommError> {
        self.link(peer)?.drain_to(0)
    }

    fn ring(&self) -> (usize, usize) {
        let (r, w) = (self.rank, self.world);
        ((r + 1) % w, (r + w - 1) % w)
    }

    /// Ring all-reduce: `world - 1` reduce-scatter steps, after which rank `r` holds the sum of
    /// chunk `r + 1`, then `world - 1` all-gather steps passing the summed chunks on. Chunk `c`
    /// is summed in ring order starting at rank `c`, and every rank ends with copies of the same
    /// sums, so the result has the same bits everywhere.
    fn all_reduce(&mut self, buf: &mut [f32]) -> Result<(), CommError> {
        let (r, w, n) = (self.rank, self.world, buf.len());
        if w == 1 {
            return Ok(());
        }
        let (next, prev) = self.ring();
        for s in 0..w - 1 {
            let out = chunk((r + w - s) % w, n, w);
            let inn = chunk((r + 2 * w - s - 1) % w, n, w);
            self.send_to(next, Op::AllReduce, n, &buf[out])?;
            self.recv_from(prev, Op::AllReduce, n, &mut buf[inn], true)?;
        }
        for s in 0..w - 1 {
            let out = chunk((r + 1 + w - s) % w, n, w);
            let inn = chunk((r + w - s) % w, n, w);
            self.send_to(next, Op::AllReduce, n, &buf[out])?;
            self.recv_from(prev, Op::AllReduce, n, &mut buf[inn], false)?;
        }
        self.flush(next)
    }

    /// Ring all-gather: at step `s` rank `r` passes on block `r - s` and receives block
    /// `r - s - 1`.
    fn all_gather(&mut self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let (r, w, n) = (self.rank, self.world, input.len());
        output[r * n..(r + 1) * n].copy_from_slice(input);
        if w == 1 {
            return Ok(());
        }
        let (next, prev) = self.ring();
        for s in 0..w - 1 {
            let out = (r + w - s) % w;
            let inn = (r + 2 * w - s - 1) % w;
            self.send_to(next, Op::AllGather, n, &output[out * n..(out + 1) * n])?;
            self.recv_from(
                prev,
                Op::AllGather,
                n,
                &mut output[inn * n..(inn + 1) * n],
                false,
            )?;
        }
        self.flush(next)
    }

    /// Direct broadcast: the root writes one shared frame to every peer concurrently.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        let n = buf.len();
        if self.rank != root {
            return self.recv_from(root, Op::Broadcast, n, buf, false);
        }
        let mut frame = Vec::new();
        encode(&mut frame, Op::Broadcast, n, buf);
        let frame = Arc::new(frame);
        for link in self.links.iter_mut().flatten() {
            link.poll()?;
            link.post_frame(frame.clone())?;
        }
        drop(frame);
        for link in self.links.iter_mut().flatten() {
            link.drain_to(0)?;
        }
        Ok(())
    }

    /// A ring pass of `world - 1` empty messages: rank `r` finishes step `k` only after rank
    /// `r - 1 - k` has entered, so after the last step every rank has entered.
    fn barrier(&mut self) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        let (next, prev) = self.ring();
        for _ in 0..self.world - 1 {
            self.send_to(next, Op::Barrier, 0, &[])?;
            self.recv_from(prev, Op::Barrier, 0, &mut [], false)?;
        }
        self.flush(next)
    }

    /// All-to-all: every part is queued to its peer's writer at once, then the parts from the
    /// peers are read in rank order (the writers send while this thread reads, so no order of
    /// the ranks' calls can deadlock). Empty parts still travel (a header), so mismatched
    /// counts are found.
    fn all_to_all(
        &mut self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        let (r, w) = (self.rank, self.world);
        let (so, ro) = (offsets(send_counts), offsets(recv_counts));
        for j in (0..w).filter(|&j| j != r) {
            self.send_to(j, Op::AllToAll, 0, &send[so[j]..so[j + 1]])?;
        }
        recv[ro[r]..ro[r + 1]].copy_from_slice(&send[so[r]..so[r + 1]]);
        for i in (0..w).filter(|&i| i != r) {
            self.link(i)?.poll()?;
            self.recv_from(i, Op::AllToAll, 0, &mut recv[ro[i]..ro[i + 1]], false)?;
        }
        for j in (0..w).filter(|&j| j != r) {
            self.flush(j)?;
        }
        Ok(())
    }

    /// After a communication error: tells every peer why (blaming the rank the error names),
    /// closes the sending side of every connection so that no peer keeps waiting on this rank,
    /// and marks the communicator unusable.
    fn fail(&mut self, err: &CommError) {
        let blamed = err.peer().unwrap_or(self.rank);
        let mut why = err.to_string().into_bytes();
        why.truncate(MAX_ABORT_LEN as usize);
        let mut frame = Vec::with_capacity(HEADER_LEN + why.len());
        push_header(&mut frame, OP_ABORT, blamed as u64, why.len() as u64);
        frame.extend_from_slice(&why);
        let frame = Arc::new(frame);
        for link in self.links.iter_mut().flatten() {
            let _ = link.post_frame(frame.clone());
        }
        let grace = Instant::now() + ABORT_GRACE.min(self.timeout);
        for link in self.links.iter_mut().flatten() {
            while link.pending > 0 {
                let left = grace.saturating_duration_since(Instant::now());
                match link.acks.recv_timeout(left) {
                    Ok(_) => link.pending -= 1,
                    Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            let _ = link.stream.shutdown(Shutdown::Write);
        }
        self.broken = Some(err.clone());
    }
}

impl TcpComm {
    /// `listener` is this rank's already-bound listener; `peers[r]` is the address rank `r`
    /// listens on (`peers[rank]` is ignored).
    ///
    /// Returns once connections with every other rank are up, or fails by
    /// `cfg.connect_timeout` with an error naming a missing peer and its address.
    pub fn connect(
        rank: usize,
        peers: &[SocketAddr],
        listener: TcpListener,
        cfg: TcpConfig,
    ) -> Result<TcpComm, CommError> {
        let world = peers.len();
        if rank >= world {
            return Err(CommError::Usage(format!(
                "rank {rank} is outside the world of {world} peer addresses"
            )));
        }
        if world > u32::MAX as usize {
            return Err(CommError::Usage(format!(
                "world of {world} ranks is too large"
            )));
        }
        if cfg.timeout.is_zero() || cfg.connect_timeout.is_zero() {
            return Err(CommError::Usage(format!(
                "timeouts must be positive: {cfg:?}"
            )));
        }
        let deadline = Instant::now() + cfg.connect_timeout;
        let mut streams: Vec<Option<TcpStream>> = (0..world).map(|_| None).collect();
        for j in 0..rank {
            streams[j] = Some(dial(rank, world, j, peers[j], deadline, &cfg)?);
        }
        accept_all(rank, peers, &listener, deadline, &cfg, &mut streams)?;
        drop(listener);
        let bytes_sent = Arc::new(AtomicU64::new(0));
        let mut links = Vec::with_capacity(world);
        for (j, s) in streams.into_iter().enumerate() {
            links.push(match s {
                Some(s) => Some(Link::start(rank, j, peers[j], s, cfg.timeout, &bytes_sent)?),
                None => None,
            });
        }
        Ok(TcpComm {
            rank,
            world,
            peers: peers.to_vec(),
            state: Mutex::new(State {
                rank,
                world,
                timeout: cfg.timeout,
                peers: peers.to_vec(),
                links,
                broken: None,
                scratch: Vec::new(),
            }),
            bytes_sent,
            comm_nanos: AtomicU64::new(0),
        })
    }

    /// The address each rank listens on, as given to [`TcpComm::connect`].
    pub fn peer_addrs(&self) -> &[SocketAddr] {
        &self.peers
    }

    /// Bytes written to the sockets so far (headers included).
    pub fn bytes_sent(&self) -> u64 {
        self.bytes_sent.load(Ordering::Relaxed)
    }

    /// Wall time spent inside this communicator's operations (collectives, `send`, `recv`,
    /// `barrier`), in seconds.
    pub fn comm_seconds(&self) -> f64 {
        self.comm_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// Runs one operation on the state; a communication error breaks the communicator.
    fn run<R>(&self, op: impl FnOnce(&mut State) -> Result<R, CommError>) -> Result<R, CommError> {
        let start = Instant::now();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let r = match &st.broken {
            Some(e) => Err(CommError::Broken(Box::new(e.clone()))),
            None => {
                let r = op(&mut st);
                if let Err(e) = &r {
                    if !matches!(e, CommError::Usage(_)) {
                        st.fail(e);
                    }
                }
                r
            }
        };
        drop(st);
        let ns = start.elapsed().as_nanos().min(u64::MAX as u128) as u64;
        self.comm_nanos.fetch_add(ns, Ordering::Relaxed);
        r
    }
}

impl Communicator for TcpComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        self.run(|st| st.all_reduce(buf))
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        check_gather(self.world, input.len(), output.len())?;
        self.run(|st| st.all_gather(input, output))
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        check_root(self.world, root)?;
        self.run(|st| st.broadcast(buf, root))
    }

    /// Queues `buf` for `peer` and returns; waits only when many sends are still unwritten.
    fn send(&self, buf: &[f32], peer: usize) -> Result<(), CommError> {
        check_peer(self.rank, self.world, peer, "send")?;
        self.run(|st| {
            let link = st.link(peer)?;
            link.post(Op::P2p, buf.len(), buf)?;
            link.drain_to(MAX_SENDS_IN_FLIGHT)
        })
    }

    fn recv(&self, buf: &mut [f32], peer: usize) -> Result<(), CommError> {
        check_peer(self.rank, self.world, peer, "recv")?;
        self.run(|st| {
            st.link(peer)?.poll()?;
            st.recv_from(peer, Op::P2p, buf.len(), buf, false)
        })
    }

    fn barrier(&self) -> Result<(), CommError> {
        self.run(State::barrier)
    }

    fn all_to_all_v(
        &self,
        send: &[f32],
        send_counts: &[usize],
        recv: &mut [f32],
        recv_counts: &[usize],
    ) -> Result<(), CommError> {
        check_all_to_all(
            self.rank,
            self.world,
            send.len(),
            send_counts,
            recv.len(),
            recv_counts,
        )?;
        self.run(|st| st.all_to_all(send, send_counts, recv, recv_counts))
    }
}
