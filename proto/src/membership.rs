//! Membership in etcd: where a cluster's keys live, what a worker announces, how to reach etcd
//! (endpoints, user and password, TLS), and the worker's announcement loop.
//!
//! Keys of cluster `NAME`:
//! - `/grok/NAME/workers/ID`: a [`WorkerRecord`] (JSON), bound to the worker's lease, so it
//!   disappears a few seconds after the worker does;
//! - `/grok/NAME/leader`: the election of the coordinators; the leader's value is the address
//!   clients reach it at.
//!
//! Losing etcd never stops a running cluster: the announcement loop and the coordinator's
//! watch retry every second, and a worker whose lease expired meanwhile announces itself anew.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

/// Lease time-to-live of worker keys and of the leader's key, in seconds. A process that
/// stops is forgotten this long after its last keep-alive.
pub const LEASE_TTL_S: i64 = 3;
/// Keep-alive period of a lease.
pub const KEEPALIVE: Duration = Duration::from_secs(1);
/// Pause between attempts when etcd cannot be reached.
pub const RETRY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error(
        "--etcd `{0}`: expected URL[,URL...] (http://HOST:PORT, https://HOST:PORT or HOST:PORT)"
    )]
    BadEndpoints(String),
    #[error("--cluster `{0}`: use letters, digits, '-', '_' or '.' (1 to 64 characters)")]
    BadCluster(String),
    #[error("cannot read {what} {path}: {why}")]
    Read {
        what: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("--etcd-user needs a password (--etcd-password-file or GROK_ETCD_PASSWORD)")]
    NoPassword,
    #[error("etcd at {endpoints}: {why}")]
    Etcd { endpoints: String, why: String },
}

/// How to reach a cluster's etcd. The password never appears in `Debug` output or errors.
#[derive(Clone, Default)]
pub struct EtcdConfig {
    pub endpoints: Vec<String>,
    pub cluster: String,
    pub user: Option<String>,
    pub password: Option<String>,
    /// CA of etcd's server certificates (https endpoints).
    pub ca: Option<PathBuf>,
}

impl fmt::Debug for EtcdConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdConfig")
            .field("endpoints", &self.endpoints)
            .field("cluster", &self.cluster)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "(set)"))
            .field("ca", &self.ca)
            .finish()
    }
}

impl EtcdConfig {
    /// Builds the configuration from the command line's values; `password_file` wins over
    /// `password_env`.
    pub fn new(
        endpoints: &str,
        cluster: &str,
        user: Option<String>,
        password_file: Option<PathBuf>,
        password_env: Option<String>,
        ca: Option<PathBuf>,
    ) -> Result<Self, MembershipError> {
        let endpoints = parse_endpoints(endpoints, ca.is_some())?;
        check_cluster(cluster)?;
        let password = match password_file {
            Some(p) => Some(
                std::fs::read_to_string(&p)
                    .map_err(|e| MembershipError::Read {
                        what: "the etcd password file",
                        path: p.clone(),
                        why: e.to_string(),
                    })?
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string(),
            ),
            None => password_env.filter(|p| !p.is_empty()),
        };
        if user.is_some() && password.is_none() {
            return Err(MembershipError::NoPassword);
        }
        Ok(EtcdConfig {
            endpoints,
            cluster: cluster.to_string(),
            user,
            password,
            ca,
        })
    }

    pub fn workers_prefix(&self) -> String {
        format!("/grok/{}/workers/", self.cluster)
    }

    pub fn worker_key(&self, id: &str) -> String {
        format!("{}{id}", self.workers_prefix())
    }

    pub fn leader_key(&self) -> String {
        format!("/grok/{}/leader", self.cluster)
    }

    fn where_(&self) -> String {
        self.endpoints.join(",")
    }

    pub fn err(&self, e: impl fmt::Display) -> MembershipError {
        MembershipError::Etcd {
            endpoints: self.where_(),
            why: e.to_string(),
        }
    }

    /// Connects (bounded: 3 s to connect, 5 s a request).
    pub async fn connect(&self) -> Result<etcd_client::Client, MembershipError> {
        let mut o = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        if let (Some(u), Some(p)) = (&self.user, &self.password) {
            o = o.with_user(u.clone(), p.clone());
        }
        if let Some(ca) = &self.ca {
            let pem = std::fs::read(ca).map_err(|e| MembershipError::Read {
                what: "the etcd CA",
                path: ca.clone(),
                why: e.to_string(),
            })?;
            o = o.with_tls(
                etcd_client::TlsOptions::new()
                    .ca_certificate(etcd_client::Certificate::from_pem(pem)),
            );
        }
        etcd_client::Client::connect(&self.endpoints, Some(o))
            .await
            .map_err(|e| self.err(e))
    }
}

/// `a:1,http://b:2` -> `http://a:1`, `http://b:2` (`https://` by default when a CA is given).
pub fn parse_endpoints(s: &str, tls: bool) -> Result<Vec<String>, MembershipError> {
    let bad = || MembershipError::BadEndpoints(s.to_string());
    let v: Vec<String> = s
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(|x| {
            let (scheme, rest) = match x.split_once("://") {
                Some((sc, r)) if sc == "http" || sc == "https" => (sc.to_string(), r),
                Some(_) => return Err(bad()),
                None => ((if tls { "https" } else { "http" }).to_string(), x),
            };
            let hostport = rest.trim_end_matches('/');
            match hostport.rsplit_once(':') {
                Some((h, p)) if !h.is_empty() && p.parse::<u16>().is_ok() => {
                    Ok(format!("{scheme}://{hostport}"))
                }
                _ => Err(bad()),
            }
        })
        .collect::<Result<_, _>>()?;
    if v.is_empty() {
        return Err(bad());
    }
    Ok(v)
}

pub fn check_cluster(c: &str) -> Result<(), MembershipError> {
    let ok = !c.is_empty()
        && c.len() <= 64
        && c.chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
    if ok {
        Ok(())
    } else {
        Err(MembershipError::BadCluster(c.to_string()))
    }
}

/// What a worker announces under `/grok/NAME/workers/ID`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    pub id: String,
    /// Its gRPC address (Worker service).
    pub address: String,
    /// Its collective listeners (all ranks of the replica; its tensor-parallel group).
    pub world_comm: String,
    pub tp_comm: String,
    /// The rank it serves (numbered across replicas).
    pub rank: u32,
    pub device: String,
}

impl WorkerRecord {
    pub fn register_request(&self) -> crate::v1::RegisterRequest {
        crate::v1::RegisterRequest {
            worker_id: self.id.clone(),
            address: self.address.clone(),
            world_comm_address: self.world_comm.clone(),
            tp_comm_address: self.tp_comm.clone(),
            rank: self.rank as i32,
            device: self.device.clone(),
        }
    }
}

/// Keeps `rec` announced in etcd for as long as the future runs: a lease-bound key, refreshed
/// every [`KEEPALIVE`]; when etcd is away the loop retries, and when the lease expired it
/// announces anew. `on_state` hears each change ("announced", or why etcd is unreachable).
pub async fn announce(cfg: EtcdConfig, rec: WorkerRecord, mut on_state: impl FnMut(&str)) {
    let key = cfg.worker_key(&rec.id);
    let value = serde_json::to_string(&rec).expect("a worker record is JSON");
    let mut last = String::new();
    let mut say = |s: String| {
        if s != last {
            on_state(&s);
            last = s;
        }
    };
    loop {
        let r: Result<(), MembershipError> = async {
            let mut c = cfg.connect().await?;
            let lease = c
                .lease_grant(LEASE_TTL_S, None)
                .await
                .map_err(|e| cfg.err(e))?
                .id();
            c.put(
                key.clone(),
                value.clone(),
                Some(etcd_client::PutOptions::new().with_lease(lease)),
            )
            .await
            .map_err(|e| cfg.err(e))?;
            say("announced".into());
            let (mut keeper, mut answers) =
                c.lease_keep_alive(lease).await.map_err(|e| cfg.err(e))?;
            loop {
                tokio::time::sleep(KEEPALIVE).await;
                keeper.keep_alive().await.map_err(|e| cfg.err(e))?;
                match answers.message().await.map_err(|e| cfg.err(e))? {
                    Some(a) if a.ttl() > 0 => {}
                    _ => return Err(cfg.err("the lease expired")),
                }
            }
        }
        .await;
        if let Err(e) = r {
            say(format!("{e}; retrying every {} s", RETRY.as_secs()));
        }
        tokio::time::sleep(RETRY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_clusters_and_passwords_are_checked() {
        assert_eq!(
            parse_endpoints("127.0.0.1:2379, http://b:1", false).unwrap(),
            ["http://127.0.0.1:2379", "http://b:1"]
        );
        assert_eq!(parse_endpoints("e:2379", true).unwrap(), ["https://e:2379"]);
        for bad in ["", "x", "ftp://a:1", "a:notaport", ":1"] {
            assert!(parse_endpoints(bad, false).is_err(), "{bad}");
        }
        assert!(check_cluster("prod-1.a_b").is_ok());
        for bad in ["", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_cluster(bad).is_err(), "{bad}");
        }
        let e = EtcdConfig::new("a:1", "c", Some("u".into()), None, None, None).unwrap_err();
        assert!(e.to_string().contains("password"), "{e}");
        let c = EtcdConfig::new(
            "a:1",
            "c",
            Some("u".into()),
            None,
            Some("s3cret".into()),
            None,
        )
        .unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert_eq!(c.worker_key("w0"), "/grok/c/workers/w0");
        assert_eq!(c.leader_key(), "/grok/c/leader");
    }
}
