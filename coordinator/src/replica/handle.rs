//! The queue in front of a serving replica's step loop.

use super::seq::Seq;
use crate::request::Job;
use tokio::sync::mpsc;

/// What a replica's queue carries: a new request, or one moved from a replica in recovery
/// (its tokens so far are re-prefilled here; it goes before the new ones).
pub enum Incoming {
    New(Box<Job>),
    Moved(Box<Seq>),
}

/// Why a replica did not take a request.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("the request queue is full ({0} waiting); retry later")]
    Full(usize),
    #[error("the replica stopped serving")]
    Closed,
}

/// Submits jobs to a serving replica.
#[derive(Clone)]
pub struct ReplicaHandle {
    pub(super) tx: mpsc::Sender<Incoming>,
}

impl ReplicaHandle {
    /// A handle and the queue its step loop reads (at most `max_queue` waiting).
    pub fn channel(max_queue: usize) -> (Self, mpsc::Receiver<Incoming>) {
        let (tx, rx) = mpsc::channel(max_queue.max(1));
        (ReplicaHandle { tx }, rx)
    }

    /// Requests queued for this replica, not yet taken by its step loop.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// Queues a job; a full queue refuses at once.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        self.tx
            .try_send(Incoming::New(Box::new(job)))
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SubmitError::Full(self.tx.max_capacity()),
                mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
            })
    }

    /// Moves a request of a faulted replica here; gives it back when the queue is full.
    pub fn take_over(&self, seq: Box<Seq>) -> Result<(), Box<Seq>> {
        self.tx
            .try_send(Incoming::Moved(seq))
            .map_err(|e| match e.into_inner() {
                Incoming::Moved(s) => s,
                Incoming::New(job) => Box::new(Seq::new(*job)),
            })
    }
}
