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

/// Runs `f` on a thread of the compute pool and returns its result. A parallel loop started
/// from outside the pool hands its work to the pool and sleeps until it is done, so each one
/// costs two thread wake-ups (tens of microseconds on a busy host); started from a thread of
/// the pool, it shares the work with the others directly. Wrapping a whole forward pass
/// pays the hand-over once instead of once per matrix.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran its body")
}
