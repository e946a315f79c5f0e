//! Admission of the desired OS, at every step: start a job for it, supersede or
//! abandon the job in flight, or refuse it. [`plan::admit`] decides; this checks the
//! release against the box, gathers the facts, and stores what was decided.

use cairn_sync_protocol::message::UpgradePhase;
use cairn_sync_protocol::release::{Manifest, OsResource, ReleaseId, Slot};

use super::plan::{self, Admission};
use super::{Ctx, Engine, EngineError, Job, Next};

/// The desired OS (hash of its resource, the resource) and its manifest as checked
/// against this box ([`Engine::check_release`]).
type Checked<'a> = (&'a [u8; 32], &'a OsResource, Result<Manifest, String>);

impl Engine {
    /// Acts on the desired OS given the job in flight and the committed version and
    /// release (as [`Engine::committed`] gives them). `Some(next)` ends the step there;
    /// `None`: the job in flight (if any) goes on.
    pub(super) fn admit(
        &self,
        ctx: &Ctx<'_>,
        job: Option<&mut Job>,
        committed: &(String, Option<String>),
    ) -> Result<Option<Next>, EngineError> {
        let desired = ctx
            .desired
            .as_ref()
            .map(|(hash, os)| (hash, os, self.check_release(os)));
        match admission(desired.as_ref(), job.as_deref(), committed) {
            Admission::Nothing => Ok(None),
            Admission::Start | Admission::Supersede => {
                let Some((hash, os, Ok(m))) = desired else {
                    return Ok(Some(Next::Idle));
                };
                self.start(ctx, job, hash, os, &m)?;
                Ok(Some(Next::Again))
            }
            Admission::Abandon(reason) => {
                if let Some(j) = job {
                    tracing::info!(version = %j.version, %reason, "upgrade abandoned");
                    j.phase = UpgradePhase::Failed;
                    j.error = Some(format!("abandoned: {reason}"));
                    self.save(ctx, j, true, &[])?;
                }
                Ok(Some(Next::Again))
            }
            Admission::Refuse(reason) => {
                let Some((hash, os, _)) = desired else {
                    return Ok(Some(Next::Idle));
                };
                tracing::warn!(%reason, "desired OS release refused");
                let refused = Job::refused(hash, os, !self.booted, &reason);
                self.save(ctx, &refused, true, &[])?;
                Ok(Some(Next::Idle))
            }
        }
    }

    /// Stores a new job for release `m`, after failing the job in flight (superseded).
    fn start(
        &self,
        ctx: &Ctx<'_>,
        job: Option<&mut Job>,
        hash: &[u8; 32],
        os: &OsResource,
        m: &Manifest,
    ) -> Result<(), EngineError> {
        if let Some(old) = job.filter(|j| !j.phase.is_final()) {
            old.phase = UpgradePhase::Failed;
            old.error = Some(format!("superseded by release {}", m.version));
            self.save(ctx, old, true, &[])?;
        }
        let target = !self.booted;
        // A previous job may have written the same slot: keep its progress only
        // if it was the same release (resume), else start over.
        let new = Job::start(hash, os, m, target);
        tracing::info!(version = %m.version, slot = %target, "upgrade started");
        self.save(ctx, &new, true, &[])
    }

    /// Verifies the desired release for this device: signature with the trusted keys,
    /// structure, target hardware, a slot for every payload.
    fn check_release(&self, os: &OsResource) -> Result<Manifest, String> {
        let keys = os.keys().map_err(|e| e.to_string())?;
        let m = os.manifest.verify(&keys).map_err(|e| e.to_string())?;
        m.check_target(&self.cfg.arch, &self.cfg.board)
            .map_err(|e| e.to_string())?;
        for p in &m.payloads {
            if self.cfg.slots.target(p.name.as_str(), Slot::A).is_none() {
                return Err(format!(
                    "release {} has a payload {:?} this device has no place for (configure --slot-payload {}=PATH_A,PATH_B)",
                    m.version,
                    p.name.as_str(),
                    p.name.as_str()
                ));
            }
        }
        Ok(m)
    }
}

/// What to do about the desired OS (nothing is stored): [`plan::admit`], except that
/// a release this box refuses is refused once per assignment, and not while a trial
/// is to be finished.
fn admission(
    desired: Option<&Checked<'_>>,
    job: Option<&Job>,
    (committed_v, committed_r): &(String, Option<String>),
) -> Admission {
    let committed = plan::Committed {
        version: cairn_sync_protocol::release::parse_version(committed_v)
            .unwrap_or_else(|_| semver::Version::new(0, 0, 0)),
        release: committed_r.as_deref().and_then(release_from_hex),
    };
    let current = job.map(|j| plan::Current {
        resource: hash_from_hex(&j.resource),
        phase: j.phase,
    });
    match desired {
        None => plan::admit(current.as_ref(), None, &committed),
        Some((hash, _, Err(reason))) => {
            // Refused once (same assignment), or a trial to finish first.
            if job.is_some_and(|j| {
                hash_from_hex(&j.resource) == **hash
                    || matches!(
                        j.phase,
                        UpgradePhase::TrialArmed
                            | UpgradePhase::Rebooting
                            | UpgradePhase::TrialRunning
                    )
            }) {
                Admission::Nothing
            } else {
                Admission::Refuse(reason.clone())
            }
        }
        Some((hash, os, Ok(m))) => {
            let d = plan::Desired {
                resource: **hash,
                release: os.manifest.id(),
                version: m.semver().unwrap_or_else(|_| semver::Version::new(0, 0, 0)),
                allow_downgrade: os.allow_downgrade,
            };
            plan::admit(current.as_ref(), Some(&d), &committed)
        }
    }
}

fn hash_from_hex(s: &str) -> [u8; 32] {
    let mut h = [0u8; 32];
    if let Ok(b) = hex::decode(s)
        && b.len() == 32
    {
        h.copy_from_slice(&b);
    }
    h
}

fn release_from_hex(s: &str) -> Option<ReleaseId> {
    let b = hex::decode(s).ok()?;
    Some(ReleaseId(b.try_into().ok()?))
}
