//! The process-wide compute thread pool (rayon).

/// Sets the number of compute threads (call once, before any compute; 0 = one per core).
pub fn init(threads: usize) -> Result<(), rayon::ThreadPoolBuildError> {
    if threads == 0 {
        return Ok(());
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
}
