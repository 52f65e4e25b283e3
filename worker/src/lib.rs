//! grok-worker: a process that owns one shard of one model replica.
//!
//! Start-up: bind the gRPC listener and two collective listeners (all ranks of the replica;
//! the tensor-parallel group), register with the coordinator, then serve the `Worker` service:
//! `Load` connects the collectives and loads the shard, `Step` runs the coordinator's step plans
//! in order on one compute thread ([`engine::Engine`]).
//!
//! - [`service`]: the `Worker` gRPC service (load, step, health, NCCL ids).
//! - [`join`]: binding, registering (coordinator or etcd) and serving until shutdown.
//! - [`engine`]: the shard, its KV cache and one step plan at a time.
//! - `group`: a data-parallel attention rank's group (placement, live ranks, dispatch).
//! - [`comm`]: a group's communicator: TCP, and NCCL over it when every member of a GPU group
//!   joins.
//! - [`shard`]: the model shard and its KV cache on the CPU or a GPU, and a step's pass.
//! - [`grammar`]: structured output on the sampling rank (token masks beside the forward pass).

pub mod comm;
pub mod engine;
pub mod grammar;
mod group;
mod join;
mod loaded;
mod service;
pub mod shard;

pub use join::run;
use std::net::SocketAddr;
use std::time::Duration;

/// How a worker joins its cluster.
pub enum Membership {
    /// Register with the coordinator at this address (static membership).
    Coordinator(String),
    /// Announce itself in etcd (the leading coordinator finds it there).
    Etcd(grok_proto::membership::EtcdConfig),
}

pub struct WorkerArgs {
    pub membership: Membership,
    pub listen: SocketAddr,
    pub advertise: Option<String>,
    pub worker_id: String,
    pub rank: Option<u32>,
    pub register_timeout: Duration,
    /// CUDA device ordinal (None: CPU).
    pub cuda_device: Option<usize>,
    /// The most bytes this worker's KV cache may take (`--kv-memory`; None: no cap).
    pub kv_memory: Option<u64>,
    /// Which passes of a GPU worker take cuBLAS.
    pub gemm: grok_shared::backend::cuda_shapes::GemmSettings,
    /// Mutual TLS (None: plaintext): this worker's gRPC server requires a client certificate
    /// signed by the CA, and it registers with its own certificate.
    pub tls: Option<grok_proto::tls::Tls>,
}
