//! grokctl: the operator's command line for grok-cluster. It never serves: it starts
//! processes (`up`, `launch`, `bench chaos`), talks to a running cluster over gRPC like any
//! client (`status`, `generate`, `drain`, `bench serve`), or runs the CPU backend in this
//! process (`gen-model`, `generate --local`, `bench`).
//!
//! - [`client`]: commands that talk to a running cluster (status, generate, drain, bench).
//! - [`up`]: `grokctl up`, a whole cluster of local processes in the foreground.
//! - [`launch`]: `grokctl launch`, a cluster over SSH from a cluster file.
//! - [`cluster_file`]: the cluster file (`cluster.toml`) those commands read.
//! - [`local`]: the single-process commands on the CPU backend.
//! - [`plan`]: capacity planning (`plan`, `plan simulate`, `plan validate`, `plan calibrate`).
//! - [`chaos`]: `grokctl bench chaos`, a seeded fault schedule under load.
//! - [`certs`]: `grokctl certs`, a development CA and certificates for mutual TLS.
//! - [`progress`]: the load progress bar; [`auth`]: the bearer token sent to a cluster.
//!
//! Process-wide state lives here only (the token in [`auth`]); the coordinator's library has
//! none of it.

pub mod auth;
pub mod certs;
pub mod chaos;
pub mod client;
pub mod cluster_file;
pub mod launch;
pub mod local;
pub mod plan;
pub mod progress;
pub mod up;
