//! grok-shared: the common library of grok-cluster.
//!
//! - [`config`]: Grok-1 hyperparameters, presets, Hugging Face `config.json` parsing.
//! - [`formats`]: model files: safetensors checkpoints, the official ckpt-0, pre-sharded
//!   directories, synthetic checkpoints, `.npy`.
//! - [`model`]: the Grok-1 forward pass with the official semantics, sharded or whole, over a
//!   paged KV cache and its block allocator (the coordinator's scheduler uses the same one).
//! - [`backend`]: the CPU backend (weights in f32/bf16/int8, SIMD kernels, multi-threaded) and
//!   the CUDA backend (feature `cuda`).
//! - [`collective`]: the `Communicator` trait the model uses between ranks (TCP, NCCL,
//!   in-process).
//! - [`sharding`]: layouts (tp, ep, pp), their validation and the shard of each rank.
//! - [`planner`]: capacity planning: memory per rank, a roofline step model, a simulator.
//! - [`generate`]: single-process prefill + decode loop; [`tokenizer`], [`sampling`],
//!   [`constrain`] (structured output: grammars to token masks, through llguidance).
//! - [`threads`] (the compute pool), [`sync`] (locks).
//!
//! The model and tensor code is synchronous and imports no async runtime or RPC crate.

pub mod backend;
pub mod collective;
pub mod config;
pub mod constrain;
pub mod formats;
pub mod generate;
pub mod model;
pub mod planner;
pub mod sampling;
pub mod sharding;
pub mod sync;
pub mod threads;
pub mod tokenizer;
