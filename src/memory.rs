//! Keeping the resident set small: the C allocator (glibc's malloc, which Rust programs use
//! on Linux) keeps freed memory for reuse, spread over one arena per thread that allocated.
//! After a burst — the first listing of a thousand Services, a take-over of hundreds of
//! VIPs — most of it stays resident though nothing uses it. Two arenas are enough for a
//! speaker (tokio runs it on a couple of threads), and freed memory is handed back to the
//! kernel every [`TRIM_EVERY`]. Measured at 1,000 VIPs idle: see the README's numbers.

use std::time::Duration;

/// How often freed memory is handed back (a call takes well under a millisecond).
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Caps the allocator's arenas; call before the runtime starts its threads.
pub fn limit_arenas() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets an allocator parameter; it is called before other threads
    // exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
}

/// Hands freed memory back to the kernel every [`TRIM_EVERY`], for as long as the process
/// runs.
pub async fn trim_periodically() {
    let mut every = tokio::time::interval(TRIM_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        // Off the runtime's threads: on a fragmented heap it can take a few milliseconds.
        #[cfg(target_env = "gnu")]
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim is thread-safe and only releases memory no allocation
            // uses.
            unsafe {
                libc::malloc_trim(0);
            }
        })
        .await;
    }
}
