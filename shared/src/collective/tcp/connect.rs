//! Building the mesh: dialing the lower ranks, accepting the higher ones, the handshake.

use super::wire::*;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use crate::collective::CommError;

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

/// Connects to rank `peer` (lower than `rank`) at `addr`, retrying until `deadline`, and runs
/// the handshake.
pub(super) fn dial(
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
pub(super) fn accept_all(
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
pub(super) fn handshake_in(
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
