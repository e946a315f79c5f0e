//! Crash points for the tests that kill the agent at every durability point.
//!
//! [`hit`] is called just before and just after each step that makes something
//! durable (a SQLite commit of the upgrade job, a slot flush, an atomic rename of boot
//! loader state). In a build with the `crashpoints` feature (the end-to-end tests turn
//! it on; the agent as shipped, `cargo build --profile agent -p cairn-agent`, has it
//! off), the environment variable `CAIRN_CRASH_AT=N` makes the `N`th call send SIGKILL
//! to this process — exactly what a power cut or `kill -9` does to the agent at that
//! point. Without the feature the variable is ignored and [`hit`] does nothing.

#[cfg(feature = "crashpoints")]
use std::sync::OnceLock;
#[cfg(feature = "crashpoints")]
use std::sync::atomic::{AtomicU64, Ordering};

#[cfg(feature = "crashpoints")]
static HITS: AtomicU64 = AtomicU64::new(0);
#[cfg(feature = "crashpoints")]
static TARGET: OnceLock<Option<u64>> = OnceLock::new();

/// The crash point a `CAIRN_CRASH_AT` value names, in a build that honours it.
#[cfg_attr(not(feature = "crashpoints"), allow(dead_code))]
fn target(value: Option<&str>) -> Option<u64> {
    if cfg!(feature = "crashpoints") {
        value.and_then(|v| v.trim().parse().ok())
    } else {
        None
    }
}

/// Counts a crash point, and dies here if it is the one `CAIRN_CRASH_AT` names.
#[cfg(feature = "crashpoints")]
pub fn hit(what: &str) {
    let target = *TARGET.get_or_init(|| target(std::env::var("CAIRN_CRASH_AT").ok().as_deref()));
    let Some(target) = target else { return };
    let n = HITS.fetch_add(1, Ordering::Relaxed) + 1;
    if target == n {
        eprintln!("crash point {n}: {what}: SIGKILL");
        let _ =
            rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    }
}

/// A crash point in a build without the `crashpoints` feature: nothing at all.
#[cfg(not(feature = "crashpoints"))]
#[inline(always)]
pub fn hit(_what: &str) {}

#[cfg(test)]
mod tests {
    use super::target;

    #[test]
    fn crash_at_is_honoured_only_with_the_feature() {
        let want = if cfg!(feature = "crashpoints") {
            Some(3)
        } else {
            None
        };
        assert_eq!(target(Some("3")), want);
        assert_eq!(target(Some(" 3\n")), want);
        assert_eq!(target(Some("three")), None);
        assert_eq!(target(None), None);
    }
}
