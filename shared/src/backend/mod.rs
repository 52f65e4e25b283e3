//! Compute backends. The CPU backend is the reference every other backend is checked against.
//!
//! - [`cpu`], [`simd`]: the CPU backend.
//! - [`cuda_shapes`]: the CUDA kernels' source and launch shapes (pure; always compiled, so CI
//!   tests them without a GPU).
//! - `cuda` (feature `cuda`): the CUDA backend on cudarc (NVRTC-compiled kernels, cuBLAS).

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[path = "cuda/shapes.rs"]
pub mod cuda_shapes;
pub mod simd;
