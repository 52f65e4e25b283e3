//! The wire: the hello of the handshake, frame headers and encoding, and one connection with
//! a peer (a writer thread fed by a channel; the calling thread reads).

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::collective::{mismatch, CommError, Op};

pub(super) const HELLO_MAGIC: [u8; 8] = *b"GROKCOMM";
pub(super) const VERSION: u32 = 1;
pub(super) const HELLO_LEN: usize = 24;
pub(super) const FRAME_MAGIC: [u8; 4] = *b"GRKF";
pub(super) const HEADER_LEN: usize = 24;
pub(super) const OP_ABORT: u8 = 0xFF;
/// Longest abort message accepted.
pub(super) const MAX_ABORT_LEN: u64 = 64 * 1024;
/// Elements read per `read_exact` (256 KiB).
pub(super) const READ_BLOCK: usize = 64 * 1024;
/// Point-to-point sends queued before `send` waits for the oldest to be written.
pub(super) const MAX_SENDS_IN_FLIGHT: usize = 16;
/// Frame buffers kept per connection for reuse.
pub(super) const SPARE_BUFFERS: usize = 4;
/// How long a failing rank waits for its abort messages to be written before closing.
pub(super) const ABORT_GRACE: Duration = Duration::from_millis(500);

/// A frame shared between the writer threads that send it (broadcast sends one to many).
pub(super) type Frame = Arc<Vec<u8>>;
/// What a writer thread returns for each frame: the result of writing it, and the frame.
pub(super) type Ack = (io::Result<()>, Frame);

/// The connection with one peer.
pub(super) struct Link {
    pub(super) peer: usize,
    /// The address the peer listens on (named in errors).
    pub(super) addr: SocketAddr,
    pub(super) timeout: Duration,
    /// Read by the calling thread; a clone is written by the writer thread.
    pub(super) stream: TcpStream,
    pub(super) jobs: Option<Sender<Frame>>,
    pub(super) acks: Receiver<Ack>,
    /// Frames handed to the writer and not acknowledged yet.
    pub(super) pending: usize,
    pub(super) spare: Vec<Vec<u8>>,
    pub(super) writer: Option<JoinHandle<()>>,
}

pub(super) fn millis(d: Duration) -> u64 {
    d.as_millis().min(u64::MAX as u128) as u64
}

/// The hello of the handshake: magic, version, rank, world size, 4 reserved bytes.
pub(in crate::collective) fn hello(rank: usize, world: usize) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[0..8].copy_from_slice(&HELLO_MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(rank as u32).to_le_bytes());
    h[16..20].copy_from_slice(&(world as u32).to_le_bytes());
    h
}

/// A decoded hello: `(version, rank, world)`, or `None` without the magic.
pub(super) fn parse_hello(h: &[u8; HELLO_LEN]) -> Option<(u32, usize, usize)> {
    if h[0..8] != HELLO_MAGIC {
        return None;
    }
    let word = |i: usize| u32::from_le_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
    Some((word(8), word(12) as usize, word(16) as usize))
}

pub(super) fn push_header(buf: &mut Vec<u8>, op: u8, total: u64, count: u64) {
    buf.extend_from_slice(&FRAME_MAGIC);
    buf.push(op);
    buf.extend_from_slice(&[0; 3]);
    buf.extend_from_slice(&total.to_le_bytes());
    buf.extend_from_slice(&count.to_le_bytes());
}

/// Writes a data frame into `buf` (cleared first).
pub(super) fn encode(buf: &mut Vec<u8>, op: Op, total: usize, data: &[f32]) {
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
pub(super) fn write_loop(
    mut s: TcpStream,
    jobs: Receiver<Frame>,
    acks: Sender<Ack>,
    sent: Arc<AtomicU64>,
) {
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
    pub(super) fn start(
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
    pub(super) fn io_err(&self, e: &io::Error, doing: &str) -> CommError {
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

    pub(super) fn protocol(&self, why: String) -> CommError {
        CommError::Protocol {
            peer: self.peer,
            addr: Some(self.addr),
            why,
        }
    }

    pub(super) fn writer_gone(&self) -> CommError {
        CommError::Peer {
            peer: self.peer,
            addr: Some(self.addr),
            why: "the sending thread of this connection stopped".into(),
        }
    }

    pub(super) fn post_frame(&mut self, frame: Frame) -> Result<(), CommError> {
        let jobs = self.jobs.as_ref().ok_or_else(|| self.writer_gone())?;
        jobs.send(frame).map_err(|_| self.writer_gone())?;
        self.pending += 1;
        Ok(())
    }

    /// Queues a data frame; returns an earlier send's failure if one is known.
    pub(super) fn post(&mut self, op: Op, total: usize, data: &[f32]) -> Result<(), CommError> {
        self.poll()?;
        let mut buf = self.spare.pop().unwrap_or_default();
        encode(&mut buf, op, total, data);
        self.post_frame(Arc::new(buf))
    }

    pub(super) fn acked(&mut self, (r, frame): Ack) -> Result<(), CommError> {
        self.pending -= 1;
        if let Ok(buf) = Arc::try_unwrap(frame) {
            if self.spare.len() < SPARE_BUFFERS {
                self.spare.push(buf);
            }
        }
        r.map_err(|e| self.io_err(&e, "sending"))
    }

    /// Collects the acknowledgements already there.
    pub(super) fn poll(&mut self) -> Result<(), CommError> {
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
    pub(super) fn drain_to(&mut self, keep: usize) -> Result<(), CommError> {
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
    pub(super) fn expect(
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
    pub(super) fn read_abort(
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
    pub(super) fn read_data(
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
