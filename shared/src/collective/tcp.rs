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

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::{check_gather, check_peer, check_root, chunk, mismatch, CommError, Communicator, Op};

const HELLO_MAGIC: [u8; 8] = *b"GROKCOMM";
const VERSION: u32 = 1;
const HELLO_LEN: usize = 24;
const FRAME_MAGIC: [u8; 4] = *b"GRKF";
const HEADER_LEN: usize = 24;
const OP_ABORT: u8 = 0xFF;
/// Longest abort message accepted.
const MAX_ABORT_LEN: u64 = 64 * 1024;
/// Elements read per `read_exact` (256 KiB).
const READ_BLOCK: usize = 64 * 1024;
/// Point-to-point sends queued before `send` waits for the oldest to be written.
const MAX_SENDS_IN_FLIGHT: usize = 16;
/// Frame buffers kept per connection for reuse.
const SPARE_BUFFERS: usize = 4;
/// How long a failing rank waits for its abort messages to be written before closing.
const ABORT_GRACE: Duration = Duration::from_millis(500);

/// Deadlines of a [`TcpComm`].
#[derive(Clone, Copy, Debug)]
pub struct TcpConfig {
    /// Per-operation deadline: the longest any socket read or write may wait without progress
    /// (a silent peer is a [`CommError::Timeout`] after this long). Default 30 s.
    pub timeout: Duration,
    /// Deadline for building the mesh in [`TcpComm::connect`], counted from its start.
    /// Default 30 s.
    pub connect_timeout: Duration,
}

impl Default for TcpConfig {
    fn default() -> Self {
        TcpConfig {
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
        }
    }
}

/// One rank of a group of processes connected by TCP (see the module documentation).
pub struct TcpComm {
    rank: usize,
    world: usize,
    peers: Vec<SocketAddr>,
    state: Mutex<State>,
    bytes_sent: Arc<AtomicU64>,
    comm_nanos: AtomicU64,
}

/// A frame shared between the writer threads that send it (broadcast sends one to many).
type Frame = Arc<Vec<u8>>;
/// What a writer thread returns for each frame: the result of writing it, and the frame.
type Ack = (io::Result<()>, Frame);

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

/// The connection with one peer.
struct Link {
    peer: usize,
    /// The address the peer listens on (named in errors).
    addr: SocketAddr,
    timeout: Duration,
    /// Read by the calling thread; a clone is written by the writer thread.
    stream: TcpStream,
    jobs: Option<Sender<Frame>>,
    acks: Receiver<Ack>,
    /// Frames handed to the writer and not acknowledged yet.
    pending: usize,
    spare: Vec<Vec<u8>>,
    writer: Option<JoinHandle<()>>,
}

fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// The hello of the handshake: magic, version, rank, world size, 4 reserved bytes.
pub(super) fn hello(rank: usize, world: usize) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[0..8].copy_from_slice(&HELLO_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(rank as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(world as u32).to_le_bytes());
    h
}

/// A decoded hello: `(version, rank, world)`, or `None` without the magic.
fn parse_hello(h: &[u8; HELLO_LEN]) -> Option<(u32, usize, usize)> {
    if h[0..8] != HELLO_MAGIC {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    Some((word(8), word(12) as usize, word(16) as usize))
}

fn push_header(buf: &mut Vec<u8>, op: u8, total: u64, count: u64) {
    buf.extend_from_slice(&FRAME_MAGIC);
    buf.push(op);
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&total.to_le_bytes());
    buf.extend_from_slice(&count.to_le_bytes());
}

/// Writes a data frame into `buf` (cleared first).
fn encode(buf: &mut Vec<u8>, op: Op, total: usize, data: &[f32]) {
    buf.clear();
    buf.reserve(HEADER_LEN + 4 * data.len());
    push_header(buf, op as u8, total as u64, data.len() as u64);
    let start = buf.len();
    buf.resize(start + 4 * data.len(), 0);
    for (d, x) in buf[start..].chunks_exact_mut(4).zip(data) {
        d.copy_from_slice(&x.to_le_bytes());
    }
}

/// The writer thread of a connection: writes frames in order and acknowledges each. After a
/// failed write it writes nothing more (the stream is out of step) and fails every frame.
fn write_loop(mut s: TcpStream, jobs: Receiver<Frame>, acks: Sender<Ack>, sent: Arc<AtomicU64>) {
    let mut failed: Option<(io::ErrorKind, String)> = None;
    while let Ok(frame) = jobs.recv() {
        let r = match &failed {
            Some((kind, why)) => Err(io::Error::new(*kind, why.clone())),
            None => s.write_all(&frame),
        };
        match &r {
            Ok(()) => {
                sent.fetch_add(frame.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                if failed.is_none() {
                    failed = Some((e.kind(), e.to_string()));
                }
            }
        }
        if acks.send((r, frame)).is_err() {
            return;
        }
    }
}

impl Link {
    fn start(
        rank: usize,
        peer: usize,
        addr: SocketAddr,
        stream: TcpStream,
        timeout: Duration,
        sent: &Arc<AtomicU64>,
    ) -> Result<Link, CommError> {
        let fail = |what: &str, e: io::Error| CommError::Peer {
            peer,
            addr: Some(addr),
            why: format!("{what}: {e}"),
        };
        stream
            .set_nodelay(true)
            .map_err(|e| fail("setting TCP_NODELAY", e))?;
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| fail("setting the read timeout", e))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| fail("setting the write timeout", e))?;
        let w = stream
            .try_clone()
            .map_err(|e| fail("cloning the socket", e))?;
        let (jobs_tx, jobs_rx) = channel::<Frame>();
        let (acks_tx, acks_rx) = channel::<Ack>();
        let sent = sent.clone();
        let writer = std::thread::Builder::new()
            .name(format!("comm{rank}->{peer}"))
            .spawn(move || write_loop(w, jobs_rx, acks_tx, sent))
            .map_err(|e| {
                CommError::Io(format!("starting the writer thread for rank {peer}: {e}"))
            })?;
        Ok(Link {
            peer,
            addr,
            timeout,
            stream,
            jobs: Some(jobs_tx),
            acks: acks_rx,
            pending: 0,
            spare: Vec::new(),
            writer: Some(writer),
        })
    }

    /// Maps an I/O error on this connection: no progress is a timeout, anything else a peer
    /// failure.
    fn io_err(&self, e: &io::Error, doing: &str) -> CommError {
        match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => CommError::Timeout {
                peer: self.peer,
                addr: Some(self.addr),
                ms: millis(self.timeout),
            },
            io::ErrorKind::UnexpectedEof => CommError::Peer {
                peer: self.peer,
                addr: Some(self.addr),
                why: format!("connection closed while {doing}"),
            },
            _ => CommError::Peer {
                peer: self.peer,
                addr: Some(self.addr),
                why: format!("{doing}: {e}"),
            },
        }
    }

    fn protocol(&self, why: String) -> CommError {
        CommError::Protocol {
            peer: self.peer,
            addr: Some(self.addr),
            why,
        }
    }

    fn writer_gone(&self) -> CommError {
        CommError::Peer {
            peer: self.peer,
            addr: Some(self.addr),
            why: "the sending thread of this connection stopped".into(),
        }
    }

    fn post_frame(&mut self, frame: Frame) -> Result<(), CommError> {
        let jobs = self.jobs.as_ref().ok_or_else(|| self.writer_gone())?;
        jobs.send(frame).map_err(|_| self.writer_gone())?;
        self.pending += 1;
        Ok(())
    }

    /// Queues a data frame; returns an earlier send's failure if one is known.
    fn post(&mut self, op: Op, total: usize, data: &[f32]) -> Result<(), CommError> {
        self.poll()?;
        let mut buf = self.spare.pop().unwrap_or_default();
        encode(&mut buf, op, total, data);
        self.post_frame(Arc::new(buf))
    }

    fn acked(&mut self, (r, frame): Ack) -> Result<(), CommError> {
        self.pending -= 1;
        if let Ok(buf) = Arc::try_unwrap(frame) {
            if self.spare.len() < SPARE_BUFFERS {
                self.spare.push(buf);
            }
        }
        r.map_err(|e| self.io_err(&e, "sending"))
    }

    /// Collects the acknowledgements already there.
    fn poll(&mut self) -> Result<(), CommError> {
        while self.pending > 0 {
            match self.acks.try_recv() {
                Ok(a) => self.acked(a)?,
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(self.writer_gone()),
            }
        }
        Ok(())
    }

    /// Waits until at most `keep` frames are unacknowledged. The writer answers every frame
    /// within the socket timeout of no progress, so this wait is bounded too.
    fn drain_to(&mut self, keep: usize) -> Result<(), CommError> {
        while self.pending > keep {
            match self.acks.recv() {
                Ok(a) => self.acked(a)?,
                Err(_) => return Err(self.writer_gone()),
            }
        }
        Ok(())
    }

    /// Reads the next frame's header, which must be `op` on a buffer of `total` elements
    /// carrying `count`. An abort frame becomes the error it reports.
    fn expect(
        &mut self,
        op: Op,
        total: usize,
        count: usize,
        rank: usize,
        peers: &[SocketAddr],
    ) -> Result<(), CommError> {
        let mut h = [0u8; HEADER_LEN];
        self.stream
            .read_exact(&mut h)
            .map_err(|e| self.io_err(&e, "waiting for a message"))?;
        if h[0..4] != FRAME_MAGIC {
            return Err(self.protocol(format!(
                "bad frame magic {:02x?} (the connection is out of step)",
                &h[0..4]
            )));
        }
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&h[i..i + 8]);
            u64::from_le_bytes(b)
        };
        let (got_total, got_count) = (word(8), word(16));
        if h[4] == OP_ABORT {
            return Err(self.read_abort(got_total, got_count, rank, peers));
        }
        let Some(got_op) = Op::from_u8(h[4]) else {
            return Err(self.protocol(format!("unknown operation code {}", h[4])));
        };
        if got_op != op || got_total != total as u64 || got_count != count as u64 {
            let got = (got_op, got_total as usize, got_count as usize);
            return Err(self.protocol(mismatch((op, total, count), got)));
        }
        Ok(())
    }

    /// Turns an abort frame into the error it reports, blaming the rank it names.
    fn read_abort(
        &mut self,
        blamed: u64,
        len: u64,
        rank: usize,
        peers: &[SocketAddr],
    ) -> CommError {
        if len > MAX_ABORT_LEN {
            return self.protocol(format!("abort message of {len} bytes"));
        }
        let mut msg = vec![0u8; len as usize];
        if let Err(e) = self.stream.read_exact(&mut msg) {
            return self.io_err(&e, "reading an abort message");
        }
        let why = String::from_utf8_lossy(&msg);
        match usize::try_from(blamed) {
            Ok(b) if b < peers.len() && b != rank && b != self.peer => CommError::Peer {
                peer: b,
                addr: Some(peers[b]),
                why: format!("reported by rank {}: {why}", self.peer),
            },
            _ => CommError::Peer {
                peer: self.peer,
                addr: Some(self.addr),
                why: format!("aborted: {why}"),
            },
        }
    }

    /// Reads `dst.len()` elements, adding them to `dst` or overwriting it.
    fn read_data(
        &mut self,
        scratch: &mut Vec<u8>,
        dst: &mut [f32],
        add: bool,
    ) -> Result<(), CommError> {
        if scratch.len() < 4 * READ_BLOCK {
            scratch.resize(4 * READ_BLOCK, 0);
        }
        for part in dst.chunks_mut(READ_BLOCK) {
            let bytes = &mut scratch[..4 * part.len()];
            self.stream
                .read_exact(bytes)
                .map_err(|e| self.io_err(&e, "receiving a message"))?;
            let vals = bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            if add {
                part.iter_mut().zip(vals).for_each(|(d, v)| *d += v);
            } else {
                part.iter_mut().zip(vals).for_each(|(d, v)| *d = v);
            }
        }
        Ok(())
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Wakes a writer blocked in a write and tells the peer this rank is gone.
        let _ = self.stream.shutdown(Shutdown::Both);
        self.jobs = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
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

/// Connects to rank `peer` (lower than `rank`) at `addr`, retrying until `deadline`, and runs
/// the handshake.
fn dial(
    rank: usize,
    world: usize,
    peer: usize,
    addr: SocketAddr,
    deadline: Instant,
    cfg: &TcpConfig,
) -> Result<TcpStream, CommError> {
    let connect_err = |why: String| CommError::Connect { peer, addr, why };
    let mut pause = Duration::from_millis(10);
    let mut last = String::from("no attempt made");
    let stream = loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(connect_err(format!(
                "not reachable within the connect timeout of {} ms (last error: {last})",
                millis(cfg.connect_timeout)
            )));
        }
        match TcpStream::connect_timeout(&addr, left.min(Duration::from_secs(5))) {
            Ok(s) => break s,
            Err(e) => {
                last = e.to_string();
                let left = deadline.saturating_duration_since(Instant::now());
                std::thread::sleep(pause.min(left));
                pause = (pause * 2).min(Duration::from_millis(200));
            }
        }
    };
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let setup = |e: io::Error| connect_err(format!("setting socket options: {e}"));
    stream.set_read_timeout(Some(left)).map_err(setup)?;
    stream.set_write_timeout(Some(left)).map_err(setup)?;
    (&stream)
        .write_all(&hello(rank, world))
        .map_err(|e| connect_err(format!("sending the handshake: {e}")))?;
    let mut h = [0u8; HELLO_LEN];
    (&stream).read_exact(&mut h).map_err(|e| {
        connect_err(match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!(
                "connected, but no handshake answer within the connect timeout of {} ms",
                millis(cfg.connect_timeout)
            ),
            _ => format!("reading the handshake answer: {e}"),
        })
    })?;
    let protocol = |why: String| CommError::Protocol {
        peer,
        addr: Some(addr),
        why,
    };
    match parse_hello(&h) {
        None => Err(connect_err(
            "the process listening there does not speak the communicator protocol".into(),
        )),
        Some((v, _, _)) if v != VERSION => Err(protocol(format!(
            "protocol version {v}, this rank speaks version {VERSION}"
        ))),
        Some((_, r, w)) if r != peer || w != world => Err(protocol(format!(
            "the process listening there is rank {r} of a world of {w}, expected rank {peer} of {world}"
        ))),
        Some(_) => Ok(stream),
    }
}

/// Accepts connections until every rank above `rank` has connected and identified itself.
fn accept_all(
    rank: usize,
    peers: &[SocketAddr],
    listener: &TcpListener,
    deadline: Instant,
    cfg: &TcpConfig,
    streams: &mut [Option<TcpStream>],
) -> Result<(), CommError> {
    let world = peers.len();
    if rank + 1 >= world {
        return Ok(());
    }
    let local = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| "?".into());
    listener
        .set_nonblocking(true)
        .map_err(|e| CommError::Io(format!("listener on {local}: {e}")))?;
    loop {
        let missing: Vec<usize> = (rank + 1..world)
            .filter(|&j| streams[j].is_none())
            .collect();
        let Some(&first) = missing.first() else {
            return Ok(());
        };
        match listener.accept() {
            Ok((s, from)) => {
                if let Some((j, s)) = handshake_in(rank, peers, s, from, deadline, cfg, streams)? {
                    streams[j] = Some(s);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return Err(CommError::Connect {
                        peer: first,
                        addr: peers[first],
                        why: format!(
                            "rank {first} did not connect to rank {rank} (listening on {local}) within the \
                             connect timeout of {} ms; ranks still missing: {missing:?}",
                            millis(cfg.connect_timeout)
                        ),
                    });
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted
                        | io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                ) => {}
            Err(e) => return Err(CommError::Io(format!("accepting on {local}: {e}"))),
        }
    }
}

/// Reads the hello of an accepted connection and answers it. `Ok(None)`: a stranger, ignored.
fn handshake_in(
    rank: usize,
    peers: &[SocketAddr],
    s: TcpStream,
    from: SocketAddr,
    deadline: Instant,
    cfg: &TcpConfig,
    streams: &[Option<TcpStream>],
) -> Result<Option<(usize, TcpStream)>, CommError> {
    let world = peers.len();
    let left = deadline
        .saturating_duration_since(Instant::now())
        .min(cfg.timeout)
        .max(Duration::from_millis(1));
    let opts = s
        .set_nonblocking(false)
        .and_then(|_| s.set_read_timeout(Some(left)))
        .and_then(|_| s.set_write_timeout(Some(left)));
    if let Err(e) = opts {
        tracing::warn!(%from, error = %e, "ignoring a connection: cannot set socket options");
        return Ok(None);
    }
    let mut h = [0u8; HELLO_LEN];
    if let Err(e) = (&s).read_exact(&mut h) {
        tracing::warn!(%from, error = %e, "ignoring a connection that sent no handshake");
        return Ok(None);
    }
    let Some((v, j, w)) = parse_hello(&h) else {
        tracing::warn!(%from, "ignoring a connection that does not speak the communicator protocol");
        return Ok(None);
    };
    let protocol = |why: String| CommError::Protocol {
        peer: j,
        addr: Some(from),
        why,
    };
    if v != VERSION {
        return Err(protocol(format!(
            "protocol version {v}, this rank speaks version {VERSION}"
        )));
    }
    if w != world {
        return Err(protocol(format!(
            "the connecting process is in a world of {w}, this rank (rank {rank}) in a world of {world}"
        )));
    }
    if j <= rank || j >= world {
        return Err(protocol(format!(
            "a connection from {from} says it is rank {j}; rank {rank} accepts connections only from \
             ranks {} to {}",
            rank + 1,
            world - 1
        )));
    }
    if let Some(first) = &streams[j] {
        let first = first
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        return Err(protocol(format!(
            "rank {j} connected twice (first from {first}, again from {from})"
        )));
    }
    (&s).write_all(&hello(rank, world))
        .map_err(|e| CommError::Connect {
            peer: j,
            addr: peers[j],
            why: format!("answering the handshake: {e}"),
        })?;
    Ok(Some((j, s)))
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
}
