//! grok-shared: the common library of grok-cluster.
//!
//! - [`config`]: Grok-1 hyperparameters, presets, Hugging Face `config.json` parsing.
//! - [`checkpoint`]: memory-mapped safetensors reading (one or many files) and writing.
//! - [`backend`]: the CPU backend (weights in f32/bf16/int8, SIMD kernels, multi-threaded).
//! - [`model`]: the Grok-1 forward pass with the official semantics, sharded or whole.
//! - [`collective`]: the `Communicator` trait the model uses between ranks.
//! - [`sharding`]: layouts (tp, ep, pp), their validation and the shard of each rank.
//! - [`generate`]: single-process prefill + decode loop.
//! - [`tokenizer`], [`sampling`], [`genmodel`] (synthetic checkpoints), [`npy`].
//!
//! The model and tensor code is synchronous and imports no async runtime or RPC crate.

pub mod backend;
pub mod checkpoint;
pub mod ckpt0;
pub mod collective;
pub mod config;
pub mod generate;
pub mod genmodel;
pub mod model;
pub mod npy;
pub mod planner;
pub mod presharded;
pub mod sampling;
pub mod sharding;
pub mod sync;
pub mod threads;
pub mod tokenizer;
