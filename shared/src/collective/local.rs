//! In-process communicator: the ranks are threads of one process, connected pairwise by std
//! channels. For unit tests of sharded code; it follows the same semantics as the TCP
//! implementation (same errors, same bitwise-identical all-reduce on every rank).

use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Mutex;
use std::time::Duration;

use super::{
    check_all_to_all, check_gather, check_peer, check_root, mismatch, offsets, CommError,
    Communicator, Op,
};

/// The deadline of every wait unless [`LocalComm::set_timeout`] changes it.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// One message: the operation, the length of the caller's buffer (to detect mismatched
/// calls), and the data.
struct Msg {
    op: Op,
    total: usize,
    data: Vec<f32>,
}

/// One rank of an in-process group made by [`local_group`]. Use each from its own thread.
/// Dropping it makes the other ranks' waits on it fail with [`CommError::Peer`].
pub struct LocalComm {
    rank: usize,
    world: usize,
    timeout: Duration,
    /// `to[j]`: the channel into rank `j`'s inbox for messages from this rank.
    to: Vec<Option<Sender<Msg>>>,
    /// `from[j]`: this rank's inbox for messages from rank `j`.
    from: Vec<Option<Mutex<Receiver<Msg>>>>,
}

/// A group of `world` ranks connected in-process; element `r` is rank `r`.
pub fn local_group(world: usize) -> Vec<LocalComm> {
    // senders[i][j] / receivers[j][i]: the channel from rank i to rank j.
    let mut to: Vec<Vec<Option<Sender<Msg>>>> = (0..world)
        .map(|_| (0..world).map(|_| None).collect())
        .collect();
    let mut from: Vec<Vec<Option<Mutex<Receiver<Msg>>>>> = (0..world)
        .map(|_| (0..world).map(|_| None).collect())
        .collect();
    for i in 0..world {
        for j in 0..world {
            if i != j {
                let (tx, rx) = channel();
                to[i][j] = Some(tx);
                from[j][i] = Some(Mutex::new(rx));
            }
        }
    }
    to.into_iter()
        .zip(from)
        .enumerate()
        .map(|(rank, (to, from))| LocalComm {
            rank,
            world,
            timeout: DEFAULT_TIMEOUT,
            to,
            from,
        })
        .collect()
}

impl LocalComm {
    /// The deadline of every wait of this rank.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Sets the deadline of every wait of this rank (default 30 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    fn post(&self, peer: usize, op: Op, total: usize, data: &[f32]) -> Result<(), CommError> {
        let gone = || CommError::Peer {
            peer,
            addr: None,
            why: "left the group (its communicator was dropped)".into(),
        };
        let tx = self.to[peer].as_ref().ok_or_else(gone)?;
        tx.send(Msg {
            op,
            total,
            data: data.to_vec(),
        })
        .map_err(|_| gone())
    }

    /// Waits for the next message from `peer`, which must be `op` on a buffer of `total`
    /// elements carrying `count` of them.
    fn take(&self, peer: usize, op: Op, total: usize, count: usize) -> Result<Vec<f32>, CommError> {
        let rx = self.from[peer].as_ref().ok_or_else(|| {
            CommError::Usage(format!(
                "rank {} has no channel from rank {peer}",
                self.rank
            ))
        })?;
        let rx = rx.lock().unwrap_or_else(|e| e.into_inner());
        let msg = rx.recv_timeout(self.timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => CommError::Timeout {
                peer,
                addr: None,
                ms: self.timeout.as_millis() as u64,
            },
            RecvTimeoutError::Disconnected => CommError::Peer {
                peer,
                addr: None,
                why: "left the group (its communicator was dropped)".into(),
            },
        })?;
        if msg.op != op || msg.total != total || msg.data.len() != count {
            return Err(CommError::Protocol {
                peer,
                addr: None,
                why: mismatch((op, total, count), (msg.op, msg.total, msg.data.len())),
            });
        }
        Ok(msg.data)
    }

    fn others(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.world).filter(move |&j| j != self.rank)
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    /// Every rank sends its buffer to every other and sums all of them in rank order, so the
    /// result has the same bits everywhere.
    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<(), CommError> {
        if self.world == 1 {
            return Ok(());
        }
        let n = buf.len();
        for j in self.others() {
            self.post(j, Op::AllReduce, n, buf)?;
        }
        let own = buf.to_vec();
        for j in 0..self.world {
            let theirs;
            let x: &[f32] = if j == self.rank {
                &own
            } else {
                theirs = self.take(j, Op::AllReduce, n, n)?;
                &theirs
            };
            if j == 0 {
                buf.copy_from_slice(x);
            } else {
                buf.iter_mut().zip(x).for_each(|(a, b)| *a += *b);
            }
        }
        Ok(())
    }

    fn all_gather(&self, input: &[f32], output: &mut [f32]) -> Result<(), CommError> {
        let n = input.len();
        check_gather(self.world, n, output.len())?;
        for j in self.others() {
            self.post(j, Op::AllGather, n, input)?;
        }
        output[self.rank * n..(self.rank + 1) * n].copy_from_slice(input);
        for j in self.others() {
            let x = self.take(j, Op::AllGather, n, n)?;
            output[j * n..(j + 1) * n].copy_from_slice(&x);
        }
        Ok(())
    }

    fn broadcast(&self, buf: &mut [f32], root: usize) -> Result<(), CommError> {
        check_root(self.world, root)?;
        let n = buf.len();
        if self.rank == root {
            for j in self.others() {
                self.post(j, Op::Broadcast, n, buf)?;
            }
        } else {
            let x = self.take(root, Op::Broadcast, n, n)?;
            buf.copy_from_slice(&x);
        }
        Ok(())
    }

    fn send(&self, buf: &[f32], peer: usize) -> Result<(), CommError> {
        check_peer(self.rank, self.world, peer, "send")?;
        self.post(peer, Op::P2p, buf.len(), buf)
    }

    fn recv(&self, buf: &mut [f32], peer: usize) -> Result<(), CommError> {
        check_peer(self.rank, self.world, peer, "recv")?;
        let x = self.take(peer, Op::P2p, buf.len(), buf.len())?;
        buf.copy_from_slice(&x);
        Ok(())
    }

    fn barrier(&self) -> Result<(), CommError> {
        for j in self.others() {
            self.post(j, Op::Barrier, 0, &[])?;
        }
        for j in self.others() {
            self.take(j, Op::Barrier, 0, 0)?;
        }
        Ok(())
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
        let (so, ro) = (offsets(send_counts), offsets(recv_counts));
        for j in self.others() {
            self.post(j, Op::AllToAll, 0, &send[so[j]..so[j + 1]])?;
        }
        let r = self.rank;
        recv[ro[r]..ro[r + 1]].copy_from_slice(&send[so[r]..so[r + 1]]);
        for i in self.others() {
            let part = self.take(i, Op::AllToAll, 0, recv_counts[i])?;
            recv[ro[i]..ro[i + 1]].copy_from_slice(&part);
        }
        Ok(())
    }
}
