//! Crash points for the tests that kill the agent at every durability point.
//!
//! [`hit`] is called just before and just after each step that makes something
//! durable (a SQLite commit of the upgrade job, a slot flush, an atomic rename of boot
//! loader state). When the environment variable `CAIRN_CRASH_AT=N` is set, the `N`th
//! call sends SIGKILL to this process — exactly what a power cut or `kill -9` does to
//! the agent at that point. Without the variable it only counts.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

static HITS: AtomicU64 = AtomicU64::new(0);
static TARGET: OnceLock<Option<u64>> = OnceLock::new();

/// Counts a crash point, and dies here if it is the one `CAIRN_CRASH_AT` names.
pub fn hit(what: &str) {
    let target = *TARGET.get_or_init(|| {
        std::env::var("CAIRN_CRASH_AT")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let n = HITS.fetch_add(1, Ordering::Relaxed) + 1;
    if target == Some(n) {
        eprintln!("crash point {n}: {what}: SIGKILL");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// Crash points passed so far in this process.
pub fn hits() -> u64 {
    HITS.load(Ordering::Relaxed)
}
