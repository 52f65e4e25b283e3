//! grok-coordinator: the cluster coordinator and the operator CLI (`grokctl`).
//!
//! - [`server`]: membership, the `Cluster`, `Admin` and `Inference` gRPC services.
//! - [`discovery`]: static membership or etcd (worker keys, leader election, standby).
//! - [`engine`]: loading the replica and its step loop.
//! - [`client`]: `grokctl` commands that talk to a running cluster (status, generate, bench).
//! - [`up`]: `grokctl up`, a whole cluster of local processes in the foreground.
//! - [`local`]: the single-process commands of `grokctl` (gen-model, generate, tokenize,
//!   detokenize, bench) on the CPU backend.
//! - [`progress`]: the load progress bar of `grokctl up` and `grokctl launch`.
//! - [`certs`]: `grokctl certs`, a development CA and certificates for mutual TLS
//!   (`grok_proto::tls`).
//!
//! Logs and traces: `grok_proto::telemetry`.

pub mod auth;
pub mod certs;
pub mod chaos;
pub mod client;
pub mod config;
pub mod discovery;
pub mod engine;
pub mod http;
pub mod launch;
pub mod local;
pub mod metrics;
pub mod plan;
pub mod progress;
pub mod server;
pub mod up;

/// Shuts down on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("signal handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
