//! Model files on disk: reading, writing and converting them.
//!
//! - [`checkpoint`]: safetensors checkpoints (one file or many, with an index), memory-mapped,
//!   every header checked against the file before use; and the streaming writer.
//! - [`ckpt0`]: the official `ckpt-0` release (pickled NumPy arrays), read by a closed, bounded
//!   pickle machine, and its conversion to the safetensors layout.
//! - [`presharded`]: one directory per rank with a sha256 manifest.
//! - [`retype`]: a checkpoint of any layout to the canonical one in f32, bf16 or the release's
//!   block-scaled int8 (`grokctl convert --dtype`), with the quantization error measured.
//! - [`genmodel`]: random checkpoints with Grok-1's architecture (tests, benchmarks, the demo).
//! - [`npy`]: NumPy `.npy` files (test vectors).

pub mod checkpoint;
pub mod ckpt0;
pub mod genmodel;
pub mod npy;
pub mod presharded;
pub mod retype;
