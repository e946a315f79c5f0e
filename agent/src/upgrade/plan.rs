//! The upgrade engine's decisions, without I/O: which release to start, what a boot
//! means for a job in flight, whether a trial is healthy. The driver
//! ([`super::Engine`]) gathers the facts, asks these functions, and acts.
//!
//! ```text
//!            desired OS changes (admit)
//!                     │
//!   ┌── downloading ──► written ──► verified ──► trial-armed ──► rebooting
//!   │  (resumable)        (superseded / abandoned before arming → failed)   │
//!   │                                                          boot (on_boot)
//!   │                                                                    ▼
//!   │                           committed ◄── healthy ── trial-running ──┤
//!   │                                                  unhealthy, timeout, │
//!   │                                                  crash loop: reject  │
//!   │                                                  + reboot            ▼
//!   └─ refused (bad release, no space, older version) ──► failed      rolled-back
//! ```

use cairn_sync_protocol::message::UpgradePhase;
use cairn_sync_protocol::release::{ReleaseId, Slot};

/// What the device runs as committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub version: semver::Version,
    pub release: Option<ReleaseId>,
}

/// The desired OS, as far as admission needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Desired {
    /// Hash of the desired resource: a changed assignment (even of the same release)
    /// is a new attempt.
    pub resource: [u8; 32],
    pub release: ReleaseId,
    pub version: semver::Version,
    pub allow_downgrade: bool,
}

/// The job in flight, as far as admission needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Current {
    pub resource: [u8; 32],
    pub phase: UpgradePhase,
}

/// What to do about the desired OS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Nothing new: no OS desired, already running it, or its job goes on.
    Nothing,
    /// Start a job for the desired release.
    Start,
    /// Abandon the job in flight (it has not armed a trial) and start the desired one.
    Supersede,
    /// Abandon the job in flight: its release is no longer desired.
    Abandon(String),
    /// Refuse the desired release (recorded as a failed job, reported once).
    Refuse(String),
}

fn armed_or_later(p: UpgradePhase) -> bool {
    matches!(
        p,
        UpgradePhase::TrialArmed | UpgradePhase::Rebooting | UpgradePhase::TrialRunning
    )
}

/// Decides whether to start, supersede, refuse or leave alone.
pub fn admit(job: Option<&Current>, desired: Option<&Desired>, committed: &Committed) -> Admission {
    let active = job.filter(|j| !j.phase.is_final());
    let Some(d) = desired else {
        return match active {
            Some(j) if !armed_or_later(j.phase) => {
                Admission::Abandon("the OS release is no longer desired".into())
            }
            _ => Admission::Nothing,
        };
    };
    if job.is_some_and(|j| j.resource == d.resource) {
        return Admission::Nothing;
    }
    if committed.release == Some(d.release) {
        return match active {
            Some(j) if !armed_or_later(j.phase) => {
                Admission::Abandon(format!("the device already runs {}", d.version))
            }
            _ => Admission::Nothing,
        };
    }
    if let Some(j) = active
        && armed_or_later(j.phase)
    {
        // One upgrade at a time: finish the trial; the newer release starts after it.
        return Admission::Nothing;
    }
    if d.version <= committed.version && !d.allow_downgrade {
        return Admission::Refuse(format!(
            "release {} is not newer than the committed {}; assign it as an explicit downgrade to install it",
            d.version, committed.version
        ));
    }
    match active {
        Some(_) => Admission::Supersede,
        None => Admission::Start,
    }
}

/// The facts about this boot that a job in flight is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootFacts {
    pub booted: Slot,
    /// The slot the boot loader still has armed for a trial, if any.
    pub armed: Option<Slot>,
}

/// A job's trial bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrialFacts {
    pub phase: UpgradePhase,
    pub target: Slot,
    /// Agent starts on the trial slot so far.
    pub trial_boots: u32,
    /// Reboots asked for to reach the trial.
    pub trial_reboots: u32,
    /// Why the trial was given up, once it was.
    pub rollback: Option<String>,
}

/// Most agent starts on a trial slot before it counts as a crash loop.
pub const MAX_TRIAL_BOOTS: u32 = 3;
/// Most reboots asked for to reach a trial before it counts as not booting.
pub const MAX_TRIAL_REBOOTS: u32 = 2;

/// What this boot means for a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootVerdict {
    /// Nothing boot-related to do (the job is not at a trial).
    Continue,
    /// Running the trial slot: count this start and go on with health checks.
    Trial { boots: u32 },
    /// The armed trial has not been booted yet: reboot (again).
    Reboot,
    /// Give the trial up: reject the slot and reboot into the other.
    Reject(String),
    /// Back on the old slot after a trial: the upgrade is rolled back.
    RolledBack(String),
    /// Something impossible happened: stop the job.
    Fail(String),
}

/// Judges the running boot for a job in `t.phase`.
pub fn on_boot(t: &TrialFacts, b: BootFacts) -> BootVerdict {
    let on_target = b.booted == t.target;
    match t.phase {
        // Armed on disk, and the power went before the phase was recorded: this is the
        // trial boot of a verified slot.
        UpgradePhase::Verified if on_target => BootVerdict::Trial { boots: 1 },
        UpgradePhase::Downloading | UpgradePhase::Written | UpgradePhase::Verified => {
            if on_target {
                BootVerdict::Fail(format!(
                    "the system booted slot {}, which was being written; installing into it stopped",
                    t.target
                ))
            } else {
                BootVerdict::Continue
            }
        }
        UpgradePhase::TrialArmed | UpgradePhase::Rebooting => {
            if on_target {
                BootVerdict::Trial { boots: 1 }
            } else if b.armed == Some(t.target) && t.trial_reboots < MAX_TRIAL_REBOOTS {
                BootVerdict::Reboot
            } else {
                BootVerdict::RolledBack(format!(
                    "the trial boot of slot {} did not come up (kernel panic, hang or power loss); running slot {} again",
                    t.target, b.booted
                ))
            }
        }
        UpgradePhase::TrialRunning => {
            if on_target {
                if let Some(r) = &t.rollback {
                    BootVerdict::Reject(r.clone())
                } else if t.trial_boots >= MAX_TRIAL_BOOTS {
                    BootVerdict::Reject(format!(
                        "crash loop: the agent started {} times on the trial slot without passing its health checks",
                        t.trial_boots + 1
                    ))
                } else {
                    BootVerdict::Trial {
                        boots: t.trial_boots + 1,
                    }
                }
            } else {
                BootVerdict::RolledBack(t.rollback.clone().unwrap_or_else(|| {
                    format!(
                        "the trial of slot {} ended (crash, panic or power loss) before it passed its health checks; running slot {} again",
                        t.target, b.booted
                    )
                }))
            }
        }
        UpgradePhase::Committed | UpgradePhase::RolledBack | UpgradePhase::Failed => {
            BootVerdict::Continue
        }
    }
}

/// What the health checks found so far.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    Healthy,
    /// Not yet: look again at this time (ms) or when something changes.
    Wait {
        until_ms: u64,
    },
    Unhealthy(String),
}

/// Inputs of one health judgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthFacts {
    pub started_ms: u64,
    pub now_ms: u64,
    pub timeout_ms: u64,
    pub require_hub: bool,
    /// The hub was reached after the trial started.
    pub hub_reached: bool,
    /// Result of the custom checks, once they ran in this boot.
    pub checks: Option<Result<(), String>>,
}

/// Healthy when the checks passed and (if required) the hub was reached; unhealthy on
/// a failed check or when the timeout passed first.
pub fn health(f: &HealthFacts) -> Health {
    if let Some(Err(e)) = &f.checks {
        return Health::Unhealthy(format!("health check failed: {e}"));
    }
    let checks_ok = matches!(f.checks, Some(Ok(())));
    if checks_ok && (f.hub_reached || !f.require_hub) {
        return Health::Healthy;
    }
    let deadline = f.started_ms.saturating_add(f.timeout_ms);
    if f.now_ms >= deadline {
        let what = if !checks_ok {
            "the health checks did not finish"
        } else {
            "the hub was not reached"
        };
        return Health::Unhealthy(format!(
            "{what} within {} s of the trial boot",
            f.timeout_ms / 1000
        ));
    }
    Health::Wait { until_ms: deadline }
}

#[cfg(test)]
mod tests {
    use super::*;
    use UpgradePhase::*;

    fn v(s: &str) -> semver::Version {
        semver::Version::parse(s).unwrap()
    }

    fn desired(r: u8, version: &str, down: bool) -> Desired {
        Desired {
            resource: [r; 32],
            release: ReleaseId([r; 32]),
            version: v(version),
            allow_downgrade: down,
        }
    }

    fn committed(version: &str, r: Option<u8>) -> super::Committed {
        super::Committed {
            version: v(version),
            release: r.map(|r| ReleaseId([r; 32])),
        }
    }

    #[test]
    fn admission() {
        let c = committed("1.0.0", Some(1));
        assert_eq!(admit(None, None, &c), Admission::Nothing);
        assert_eq!(
            admit(None, Some(&desired(2, "2.0.0", false)), &c),
            Admission::Start
        );
        assert_eq!(
            admit(None, Some(&desired(1, "1.0.0", false)), &c),
            Admission::Nothing
        );
        assert!(matches!(
            admit(None, Some(&desired(3, "0.9.0", false)), &c),
            Admission::Refuse(m) if m.contains("explicit downgrade")
        ));
        assert_eq!(
            admit(None, Some(&desired(3, "0.9.0", true)), &c),
            Admission::Start
        );
        let dl = Current {
            resource: [2; 32],
            phase: Downloading,
        };
        assert_eq!(
            admit(Some(&dl), Some(&desired(2, "2.0.0", false)), &c),
            Admission::Nothing
        );
        assert_eq!(
            admit(Some(&dl), Some(&desired(4, "2.1.0", false)), &c),
            Admission::Supersede
        );
        assert!(matches!(admit(Some(&dl), None, &c), Admission::Abandon(_)));
        let armed = Current {
            resource: [2; 32],
            phase: TrialArmed,
        };
        assert_eq!(
            admit(Some(&armed), Some(&desired(4, "2.1.0", false)), &c),
            Admission::Nothing,
            "one upgrade at a time: a trial is finished first"
        );
        assert_eq!(admit(Some(&armed), None, &c), Admission::Nothing);
        // A final job of another release does not block a new one.
        let failed = Current {
            resource: [2; 32],
            phase: RolledBack,
        };
        assert_eq!(
            admit(Some(&failed), Some(&desired(4, "2.1.0", false)), &c),
            Admission::Start
        );
        assert_eq!(
            admit(Some(&failed), Some(&desired(2, "2.0.0", false)), &c),
            Admission::Nothing,
            "a rolled-back assignment is not retried by itself"
        );
    }

    fn trial(phase: UpgradePhase) -> TrialFacts {
        TrialFacts {
            phase,
            target: Slot::B,
            trial_boots: 0,
            trial_reboots: 0,
            rollback: None,
        }
    }

    #[test]
    fn boots_during_a_job() {
        let on = |s, armed| BootFacts { booted: s, armed };
        assert_eq!(
            on_boot(&trial(Downloading), on(Slot::A, None)),
            BootVerdict::Continue
        );
        assert!(matches!(
            on_boot(&trial(Written), on(Slot::B, None)),
            BootVerdict::Fail(_)
        ));
        assert_eq!(
            on_boot(&trial(Verified), on(Slot::B, None)),
            BootVerdict::Trial { boots: 1 },
            "armed, then power lost before the phase was stored"
        );
        assert_eq!(
            on_boot(&trial(Rebooting), on(Slot::B, None)),
            BootVerdict::Trial { boots: 1 }
        );
        assert_eq!(
            on_boot(&trial(TrialArmed), on(Slot::A, Some(Slot::B))),
            BootVerdict::Reboot,
            "armed but not rebooted yet (crash before the reboot)"
        );
        let mut t = trial(Rebooting);
        t.trial_reboots = MAX_TRIAL_REBOOTS;
        assert!(matches!(
            on_boot(&t, on(Slot::A, Some(Slot::B))),
            BootVerdict::RolledBack(_)
        ));
        assert!(matches!(
            on_boot(&trial(Rebooting), on(Slot::A, None)),
            BootVerdict::RolledBack(m) if m.contains("did not come up")
        ));
        let mut t = trial(TrialRunning);
        t.trial_boots = 1;
        assert_eq!(
            on_boot(&t, on(Slot::B, None)),
            BootVerdict::Trial { boots: 2 }
        );
        t.trial_boots = MAX_TRIAL_BOOTS;
        assert!(matches!(
            on_boot(&t, on(Slot::B, None)),
            BootVerdict::Reject(m) if m.contains("crash loop")
        ));
        t.trial_boots = 1;
        t.rollback = Some("health check failed: x".into());
        assert_eq!(
            on_boot(&t, on(Slot::B, None)),
            BootVerdict::Reject("health check failed: x".into())
        );
        assert_eq!(
            on_boot(&t, on(Slot::A, None)),
            BootVerdict::RolledBack("health check failed: x".into())
        );
    }

    #[test]
    fn health_judgement() {
        let f = |checks: Option<Result<(), String>>, hub, now| HealthFacts {
            started_ms: 1000,
            now_ms: now,
            timeout_ms: 10_000,
            require_hub: true,
            hub_reached: hub,
            checks,
        };
        assert_eq!(health(&f(Some(Ok(())), true, 2000)), Health::Healthy);
        assert_eq!(
            health(&f(Some(Ok(())), false, 2000)),
            Health::Wait { until_ms: 11_000 }
        );
        assert!(matches!(
            health(&f(Some(Ok(())), false, 11_000)),
            Health::Unhealthy(m) if m.contains("hub was not reached")
        ));
        assert!(matches!(
            health(&f(Some(Err("exit 1".into())), true, 2000)),
            Health::Unhealthy(m) if m.contains("exit 1")
        ));
        let mut offline = f(Some(Ok(())), false, 2000);
        offline.require_hub = false;
        assert_eq!(health(&offline), Health::Healthy);
    }
}
