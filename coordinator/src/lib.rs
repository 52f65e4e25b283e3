//! grok-coordinator: the cluster coordinator.
//!
//! - [`server`]: membership, the `Cluster`, `Admin` and `Inference` gRPC services.
//! - [`discovery`]: static membership or etcd (worker keys, leader election, standby).
//! - [`engine`]: loading the replica and its step loop.
//! - [`http`]: the OpenAI-compatible HTTP API, health and metrics.
//!
//! Logs and traces: `grok_proto::telemetry`.

pub mod discovery;
pub mod engine;
pub mod http;
pub mod metrics;
pub mod server;
