//! How the coordinator learns its workers, and which coordinator leads.
//!
//! - [`Static`] (the default, nothing to install): the coordinator is the registry. Workers call
//!   `Cluster.Register`; the replicas' health monitors notice the ones that go.
//! - [`Etcd`]: workers announce lease-bound keys under `/grok/NAME/workers/`
//!   (`grok_proto::membership`). Coordinators of the cluster campaign for `/grok/NAME/leader`;
//!   the leader lists and watches the workers' keys and drives them, a standby answers clients
//!   with the leader's address and takes over when the leader's lease lapses (the workers it
//!   finds keep their weights and only reconnect). While etcd is away the cluster goes on
//!   serving; the watch and the leader's lease resume when it returns.

use crate::cluster::Cluster;
use crate::membership::admit;
use crate::state::{ClusterState, WorkerState};
use grok_proto::membership::{
    EtcdConfig, MembershipError, WorkerRecord, KEEPALIVE, LEASE_TTL_S, RETRY,
};
use grok_shared::sync::lock;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

pub type Run = Pin<Box<dyn Future<Output = Result<(), DiscoveryError>> + Send>>;

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("this coordinator lost the leadership of cluster `{0}` (its lease expired while etcd was reachable): exiting so that it restarts as a standby")]
    LostLeadership(String),
    #[error(transparent)]
    Membership(#[from] MembershipError),
}

/// Membership and leadership of a coordinator.
pub trait Discovery: Send + Sync {
    fn name(&self) -> &'static str;
    /// Runs for the life of the coordinator (bound at `bound`); an error ends the process.
    fn run(self: Box<Self>, shared: Arc<Cluster>, bound: std::net::SocketAddr) -> Run;
}

/// Workers register over gRPC; nothing else runs.
pub struct Static;

impl Discovery for Static {
    fn name(&self) -> &'static str {
        "static"
    }
    fn run(self: Box<Self>, _shared: Arc<Cluster>, _bound: std::net::SocketAddr) -> Run {
        Box::pin(std::future::pending())
    }
}

/// Membership and leader election in etcd.
pub struct Etcd {
    pub cfg: EtcdConfig,
    /// The address clients reach this coordinator at (the leader's value; default: the bound
    /// address).
    pub advertise: Option<String>,
}

impl Discovery for Etcd {
    fn name(&self) -> &'static str {
        "etcd"
    }
    fn run(self: Box<Self>, shared: Arc<Cluster>, bound: std::net::SocketAddr) -> Run {
        Box::pin(async move { self.lead(shared, bound).await })
    }
}

impl Etcd {
    async fn lead(
        self,
        shared: Arc<Cluster>,
        bound: std::net::SocketAddr,
    ) -> Result<(), DiscoveryError> {
        let cfg = self.cfg.clone();
        let advertise = self.advertise.clone().unwrap_or_else(|| bound.to_string());
        shared.set_state(
            ClusterState::Standby,
            format!(
                "campaigning for the leadership of cluster `{}` in etcd",
                cfg.cluster
            ),
        );
        // A lease for the campaign; kept alive for the life of the process.
        let (client, lease) = loop {
            match async {
                let mut c = cfg.connect().await?;
                let l = c
                    .lease_grant(LEASE_TTL_S, None)
                    .await
                    .map_err(|e| cfg.err(e))?
                    .id();
                Ok::<_, MembershipError>((c, l))
            }
            .await
            {
                Ok(x) => break x,
                Err(e) => {
                    shared.set_state(ClusterState::Standby, format!("{e}; retrying"));
                    tokio::time::sleep(RETRY).await;
                }
            }
        };
        let (lost_tx, mut lost_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(keep_lease(cfg.clone(), client.clone(), lease, lost_tx));
        // While campaigning, say who leads.
        let watcher = tokio::spawn({
            let (cfg, shared, mut c) = (cfg.clone(), shared.clone(), client.clone());
            async move {
                loop {
                    if let Ok(r) = c.leader(cfg.leader_key()).await {
                        if let Some(kv) = r.kv() {
                            let who = String::from_utf8_lossy(kv.value()).to_string();
                            shared.set_state(
                                ClusterState::Standby,
                                format!("standby of cluster `{}`: the leader is {who}; this coordinator takes over if it goes", cfg.cluster),
                            );
                        }
                    }
                    tokio::time::sleep(KEEPALIVE).await;
                }
            }
        });
        let mut c = client.clone();
        let won = loop {
            tokio::select! {
                r = c.campaign(cfg.leader_key(), advertise.clone(), lease) => match r {
                    Ok(_) => break true,
                    Err(e) => {
                        tracing::warn!("campaign: {}", cfg.err(e));
                        tokio::time::sleep(RETRY).await;
                    }
                },
                _ = &mut lost_rx => break false,
            }
        };
        // The watcher may be between its `leader` answer and its "standby" state when aborted:
        // wait until it has stopped, or it could overwrite the leader's state below (a leader
        // saying it is a standby, until workers arrive).
        watcher.abort();
        let _ = watcher.await;
        if !won {
            return Err(DiscoveryError::LostLeadership(cfg.cluster.clone()));
        }
        tracing::info!(cluster = %cfg.cluster, "leading the cluster");
        shared.set_state(
            ClusterState::WaitingForWorkers,
            format!(
                "leader of cluster `{}`; waiting for the workers announced in etcd",
                cfg.cluster
            ),
        );
        tokio::select! {
            r = watch_workers(cfg.clone(), client, shared) => r,
            _ = &mut lost_rx => Err(DiscoveryError::LostLeadership(cfg.cluster.clone())),
        }
    }
}

/// Keeps the campaign lease alive. etcd away: keep trying (the cluster serves on). The lease
/// reported gone while etcd answers: leadership is lost, say so and stop.
async fn keep_lease(
    cfg: EtcdConfig,
    client: etcd_client::Client,
    lease: i64,
    lost: tokio::sync::oneshot::Sender<()>,
) {
    let mut warned = false;
    loop {
        // Ok: etcd answered that the lease is gone; Err: etcd could not be reached.
        let r: Result<(), MembershipError> = async {
            let mut c = client.clone();
            let (mut keeper, mut answers) =
                c.lease_keep_alive(lease).await.map_err(|e| cfg.err(e))?;
            loop {
                keeper.keep_alive().await.map_err(|e| cfg.err(e))?;
                match answers.message().await.map_err(|e| cfg.err(e))? {
                    Some(a) if a.ttl() > 0 => {}
                    Some(_) => return Ok(()),
                    None => return Err(cfg.err("the keep-alive stream ended")),
                }
                tokio::time::sleep(KEEPALIVE).await;
            }
        }
        .await;
        match r {
            Ok(()) => {
                let _ = lost.send(());
                return;
            }
            Err(e) => {
                if !warned {
                    tracing::warn!("etcd unreachable, serving on: {e}");
                    warned = true;
                }
            }
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// Lists the workers' keys, then follows changes; etcd away: retry, re-list and follow again.
async fn watch_workers(
    cfg: EtcdConfig,
    client: etcd_client::Client,
    shared: Arc<Cluster>,
) -> Result<(), DiscoveryError> {
    let prefix = cfg.workers_prefix();
    loop {
        let r: Result<(), MembershipError> = async {
            let mut c = client.clone();
            let got = c
                .get(
                    prefix.clone(),
                    Some(etcd_client::GetOptions::new().with_prefix()),
                )
                .await
                .map_err(|e| cfg.err(e))?;
            let rev = got.header().map_or(0, |h| h.revision());
            for kv in got.kvs() {
                put(&shared, kv.value());
            }
            let mut stream = c
                .watch(
                    prefix.clone(),
                    Some(
                        etcd_client::WatchOptions::new()
                            .with_prefix()
                            .with_start_revision(rev + 1),
                    ),
                )
                .await
                .map_err(|e| cfg.err(e))?;
            while let Some(resp) = stream.message().await.map_err(|e| cfg.err(e))? {
                if resp.canceled() {
                    return Err(cfg.err("the watch was cancelled"));
                }
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    match ev.event_type() {
                        etcd_client::EventType::Put => put(&shared, kv.value()),
                        etcd_client::EventType::Delete => {
                            let id = String::from_utf8_lossy(kv.key())
                                .trim_start_matches(&prefix)
                                .to_string();
                            gone(&shared, &id);
                        }
                    }
                }
            }
            Err(cfg.err("the watch ended"))
        }
        .await;
        if let Err(e) = r {
            tracing::warn!("worker membership: {e}; serving on, retrying");
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// A worker's key was written: admit it, unless it is already registered as announced.
fn put(shared: &Arc<Cluster>, value: &[u8]) {
    let rec: WorkerRecord = match serde_json::from_slice(value) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!("ignoring a malformed worker record in etcd: {e}");
            return;
        }
    };
    let known = lock(&shared.workers)
        .iter()
        .flatten()
        .any(|w| w.id == rec.id && w.address == rec.address && w.state != WorkerState::Lost);
    if known {
        return;
    }
    if let Err(s) = admit(shared, &rec.register_request()) {
        tracing::warn!(worker = %rec.id, "not admitted: {}", s.message());
    }
}

/// A worker's key expired or was deleted. A serving worker is the health monitor's to judge;
/// one that is only registered gives its rank back.
fn gone(shared: &Arc<Cluster>, id: &str) {
    let mut ws = lock(&shared.workers);
    for w in ws.iter_mut() {
        if w.as_ref()
            .is_some_and(|w| w.id == id && w.state == WorkerState::Registered)
        {
            tracing::info!(worker = %id, "left before its replica loaded");
            *w = None;
        }
    }
}
