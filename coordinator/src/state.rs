//! Typed states of the cluster, its replicas and its workers, and how the cluster's state
//! follows from its replicas'. The strings are the wire values (`ClusterStatus`, `/ready`).

use std::fmt;

/// The cluster as a whole (what `grokctl status`, `/ready` and gRPC health report).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterState {
    /// Not every rank of any replica has a worker yet.
    WaitingForWorkers,
    Loading,
    /// At least one replica serves.
    Ready,
    /// Serving in-flight requests, admitting none (`grokctl drain`).
    Draining,
    /// No replica serves; at least one is bringing its workers back by itself.
    Recovering,
    /// No replica serves and none will without an operator (a first load failed).
    Failed,
    /// Another coordinator leads this cluster (etcd); this one takes over if it goes.
    Standby,
}

impl ClusterState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WaitingForWorkers => "waiting_for_workers",
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Recovering => "recovering",
            Self::Failed => "failed",
            Self::Standby => "standby",
        }
    }
}

/// One replica (tp x ep x pp workers holding one copy of the model).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplicaState {
    WaitingForWorkers,
    Loading,
    Ready,
    /// Serving its requests, taking no new ones (`grokctl drain --worker`).
    Draining,
    Recovering,
    Failed,
}

impl ReplicaState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::WaitingForWorkers => "waiting_for_workers",
            Self::Loading => "loading",
            Self::Ready => "ready",
            Self::Draining => "draining",
            Self::Recovering => "recovering",
            Self::Failed => "failed",
        }
    }
}

/// One rank's worker as the coordinator sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum WorkerState {
    /// No worker holds the rank.
    #[default]
    Waiting,
    Registered,
    /// Loading its shard; the stage the worker reports (e.g. `connecting`, `reading`).
    Loading(String),
    Ready,
    /// Unreachable, or its step stream broke; its rank can be taken by a new registration.
    Lost,
    /// Its first load failed.
    Failed,
}

impl WorkerState {
    pub fn as_str(&self) -> &str {
        match self {
            Self::Waiting => "waiting",
            Self::Registered => "registered",
            Self::Loading(stage) => stage,
            Self::Ready => "ready",
            Self::Lost => "lost",
            Self::Failed => "failed",
        }
    }

    /// A load-progress stage as the worker names it.
    pub fn from_stage(stage: &str) -> Self {
        match stage {
            "ready" => Self::Ready,
            s => Self::Loading(s.to_string()),
        }
    }
}

macro_rules! display_as_str {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    )*};
}
display_as_str!(ClusterState, ReplicaState, WorkerState);

/// The cluster's state from its replicas': `ready` while any serves (kept `draining` during a
/// drain), else the most advanced state of the others; and a one-line summary (the replica's
/// own detail when there is one replica).
pub fn derive_cluster(
    replicas: &[(ReplicaState, String)],
    draining: bool,
) -> (ClusterState, String) {
    use ReplicaState as R;
    let n = replicas.len();
    let serving = replicas.iter().filter(|s| s.0 == R::Ready).count();
    let has = |st: R| replicas.iter().any(|s| s.0 == st);
    let state = if has(R::Ready) {
        if draining {
            ClusterState::Draining
        } else {
            ClusterState::Ready
        }
    } else if has(R::Loading) {
        ClusterState::Loading
    } else if has(R::Recovering) {
        ClusterState::Recovering
    } else if has(R::Failed) {
        ClusterState::Failed
    } else if has(R::WaitingForWorkers) {
        ClusterState::WaitingForWorkers
    } else {
        // Every replica drained one by one (`grokctl drain --worker`).
        ClusterState::Draining
    };
    let summary = if n == 1 {
        replicas[0].1.clone()
    } else {
        let each: Vec<String> = replicas
            .iter()
            .enumerate()
            .filter(|(_, s)| s.0 != R::Ready)
            .map(|(i, s)| format!("replica {i} {}: {}", s.0, s.1))
            .collect();
        format!(
            "{serving} of {n} replicas serving{}{}",
            if each.is_empty() { "" } else { "; " },
            each.join("; ")
        )
    };
    (state, summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ReplicaState as R;

    #[test]
    fn the_cluster_serves_while_any_replica_does() {
        let r = |s: &[R]| {
            s.iter()
                .map(|&x| (x, format!("{x} detail")))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            derive_cluster(&r(&[R::Ready]), false).0,
            ClusterState::Ready
        );
        assert_eq!(derive_cluster(&r(&[R::Ready]), false).1, "ready detail");
        let (st, sum) = derive_cluster(&r(&[R::Recovering, R::Ready]), false);
        assert_eq!(st, ClusterState::Ready);
        assert_eq!(
            sum,
            "1 of 2 replicas serving; replica 0 recovering: recovering detail"
        );
        assert_eq!(
            derive_cluster(&r(&[R::Ready, R::Ready]), true).0,
            ClusterState::Draining
        );
        assert_eq!(
            derive_cluster(&r(&[R::Failed, R::Loading]), false).0,
            ClusterState::Loading
        );
        assert_eq!(
            derive_cluster(&r(&[R::Failed, R::Recovering]), false).0,
            ClusterState::Recovering
        );
        assert_eq!(
            derive_cluster(&r(&[R::WaitingForWorkers, R::Failed]), false).0,
            ClusterState::Failed
        );
        assert_eq!(
            derive_cluster(&r(&[R::WaitingForWorkers]), false).0,
            ClusterState::WaitingForWorkers
        );
        // Replicas drained one by one: none takes requests.
        assert_eq!(
            derive_cluster(&r(&[R::Draining]), false).0,
            ClusterState::Draining
        );
    }

    #[test]
    fn worker_stages_map_to_states() {
        assert_eq!(WorkerState::from_stage("ready"), WorkerState::Ready);
        assert_eq!(WorkerState::from_stage("connecting").as_str(), "connecting");
        assert_eq!(WorkerState::default().to_string(), "waiting");
    }
}
