//! grok-coordinator: drives a cluster of workers that hold the model's shards. It never
//! holds tensors: it admits workers into ranks, loads replicas, plans every step (which
//! tokens, which KV blocks, how to sample) and turns the sampled tokens into the clients'
//! answers.
//!
//! The map, from the wire inwards:
//! - [`serve`]: the gRPC and HTTP servers and the membership source, until shutdown.
//! - [`api`]: gRPC services and the OpenAI-compatible HTTP API: wire to [`request`] and back.
//! - [`request`]: a generation request, its validation and its events.
//! - [`router`]: which serving replica takes a request; drains.
//! - [`membership`] and [`discovery`]: workers joining ranks (Register RPC, static or etcd;
//!   leader election among coordinators).
//! - [`replica`]: a replica's life (load, serve, fault, rejoin) and its step loop, with a pure
//!   [`replica::scheduler`].
//! - [`cluster`]: the state all of these share; [`state`]: its typed states; [`metrics`];
//!   [`config`].
//!
//! Invariants: no lock is held across an await; a client request is answered with an error,
//! never a panic; a replica's faults are recovered by its supervisor without an operator; one
//! supervisor per replica, one step in flight per replica.

pub mod api;
pub mod cluster;
pub mod config;
pub mod discovery;
pub mod membership;
pub mod metrics;
pub mod replica;
pub mod request;
pub mod router;
pub mod serve;
pub mod state;
