//! grok-coordinator: the cluster coordinator and the operator CLI (`grokctl`).
//!
//! - [`local`]: the single-process commands of `grokctl` (gen-model, generate, tokenize,
//!   detokenize, bench) on the CPU backend.
//! - [`logging`]: tracing set-up shared by the binaries.

pub mod local;
pub mod logging;
