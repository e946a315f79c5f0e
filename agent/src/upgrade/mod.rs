//! A/B OS upgrades: the engine that installs a signed release into the inactive slot,
//! boots it once on trial, and commits it or ends up back on the old slot by itself.
//!
//! - [`plan`]: the decisions, without I/O (admission, what a boot means, health).
//! - [`install`]: writing a payload into a slot (delta copy, resumable, verified).
//! - [`boot`]: the boot-control backends behind [`boot::BootControl`].
//! - [`source`]: release sources (the hub over QUIC) and the box checks (slot
//!   capacity, health commands); [`offline`]: installing from a bundle file.
//! - [`Engine`]: the driver. One [`Engine::step`] does one durable step and says what
//!   next ([`Next`]). Every phase is stored (with its report, in one transaction)
//!   before the step that follows it starts, so a crash anywhere resumes or cleanly
//!   abandons the job (see `plan` for the state diagram). A step first judges the boot
//!   (once per start), then admits the desired OS (`admit.rs`: start, supersede,
//!   abandon, refuse), then advances the job one phase: `download.rs` writes and
//!   verifies the slot; arming, the trial and the commit are here.
//! - [`UpgradeConfig`] and the types it holds (`config.rs`): what the engine knows
//!   about the box. [`Job`] (`job.rs`): the durable job.
//!
//! Architecture invariant: the engine touches boot flags only through
//! [`boot::BootControl`], and marks a slot unbootable before the first byte of it is
//! written.

pub use cairn_boot as boot;
mod admit;
mod config;
mod download;
pub mod install;
mod job;
pub mod offline;
pub mod plan;
pub mod source;

pub use config::{
    BootSpec, REBOOT_EXIT_CODE, RebootAction, SlotLayout, TRYBOOT_EXIT_CODE, UpgradeConfig,
};
pub use job::Job;

use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use cairn_sync_protocol::Text;
use cairn_sync_protocol::message::{ReportBody, UpgradePhase, UpgradeReport};
use cairn_sync_protocol::release::{OsResource, SignedManifest, Slot};

use crate::store::{Store, now_ms};
use boot::{BootControl, BootError, RebootKind};
use install::{BlockSource, LocalBlocks};
use plan::{BootFacts, BootVerdict, Health, HealthFacts};

/// Why the engine could not go on. Job failures are not errors: they end the job
/// (phase `failed`) and are reported; these are about the box itself.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("boot control ({backend}): {source}")]
    Boot {
        backend: &'static str,
        source: BootError,
    },
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("upgrade state {path}: {detail}")]
    State { path: PathBuf, detail: String },
    #[error(
        "cannot tell which slot is running: no cairn.slot=a|b in {0} (the boot loader entry must pass it)"
    )]
    UnknownBootedSlot(PathBuf),
}

/// What the caller should do after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// Step again right away.
    Again,
    /// Nothing to do until the desired state changes (or a periodic look).
    Idle,
    /// Step again at this wall-clock time (ms) or when something changes (health).
    WaitUntil(u64),
    /// The release source is not reachable now; step again when a link exists.
    Offline,
    /// Reboot the box now.
    Reboot(RebootKind),
}

/// What a step is told about the world.
pub struct Ctx<'a> {
    pub store: &'a Mutex<Store>,
    /// The desired OS and the hash of its resource.
    pub desired: Option<([u8; 32], OsResource)>,
    /// When the hub was last reached (a sync session was welcomed), ms.
    pub hub_seen_ms: Option<u64>,
    /// A sync session with the hub is up right now.
    pub hub_connected: bool,
    /// Opens the source of release bytes (`None`: offline now).
    pub source: &'a mut dyn FnMut(&SignedManifest) -> Option<Box<dyn BlockSource>>,
    /// Set to stop a long install at its next checkpoint.
    pub stop: &'a AtomicBool,
    /// Called with the last outbox sequence number after reports were queued.
    pub on_reports: &'a (dyn Fn(u64) + Sync),
}

/// The engine. See the module documentation.
pub struct Engine {
    cfg: UpgradeConfig,
    boot: Box<dyn BootControl>,
    booted: Slot,
    /// Whether this process start was judged against the job yet.
    boot_judged: bool,
    /// Result of the custom health checks in this boot.
    checks: Option<Result<(), String>>,
    last_progress_report: Option<(Instant, u64)>,
    /// The running slot's blocks of one payload, kept across download steps.
    local: Option<(String, LocalBlocks)>,
}

const META_VERSION: &str = "os_version";
const META_RELEASE: &str = "os_release";

impl Engine {
    /// Opens the boot loader and learns which slot is running.
    pub fn open(cfg: UpgradeConfig) -> Result<Self, EngineError> {
        let (boot, from_backend) = cfg.boot.open().map_err(|source| EngineError::Boot {
            backend: "open",
            source,
        })?;
        let booted = match from_backend {
            Some(s) => s,
            None => std::fs::read_to_string(&cfg.cmdline)
                .ok()
                .and_then(|c| boot::booted_from_cmdline(&c))
                .ok_or_else(|| EngineError::UnknownBootedSlot(cfg.cmdline.clone()))?,
        };
        std::fs::create_dir_all(&cfg.state_dir).map_err(|e| EngineError::State {
            path: cfg.state_dir.clone(),
            detail: e.to_string(),
        })?;
        Ok(Self {
            cfg,
            boot,
            booted,
            boot_judged: false,
            checks: None,
            last_progress_report: None,
            local: None,
        })
    }

    pub fn booted(&self) -> Slot {
        self.booted
    }

    pub fn config(&self) -> &UpgradeConfig {
        &self.cfg
    }

    fn boot_err(&self) -> impl FnOnce(BootError) -> EngineError + '_ {
        move |source| EngineError::Boot {
            backend: self.boot.name(),
            source,
        }
    }

    /// The committed version and release.
    pub fn committed(&self, store: &Store) -> Result<(String, Option<String>), EngineError> {
        let v = store
            .meta_text(META_VERSION)?
            .unwrap_or_else(|| self.cfg.os_version.clone());
        Ok((v, store.meta_text(META_RELEASE)?))
    }

    fn load(&self, store: &Store) -> Result<Option<Job>, EngineError> {
        match store.upgrade_job()? {
            None => Ok(None),
            Some(j) => serde_json::from_str(&j)
                .map(Some)
                .map_err(|e| EngineError::State {
                    path: "agent database, table upgrade".into(),
                    detail: e.to_string(),
                }),
        }
    }

    fn report(&self, job: &Job, committed: &str) -> ReportBody {
        let (done, total, down) = job
            .manifest()
            .map(|(_, m)| job.totals(&m))
            .unwrap_or((0, 0, 0));
        ReportBody::Upgrade(UpgradeReport {
            version: Text::truncated(&job.version),
            phase: job.phase,
            target_slot: job.target,
            booted_slot: self.booted,
            committed_version: Text::truncated(committed),
            bytes_done: done,
            bytes_total: total,
            bytes_downloaded: down,
            error: job
                .error
                .as_deref()
                .or(job.rollback.as_deref())
                .map(Text::truncated),
        })
    }

    /// Stores `job` (and, with `report`, its status report) in one transaction.
    fn save(
        &self,
        ctx: &Ctx<'_>,
        job: &Job,
        report: bool,
        meta: &[(&str, &str)],
    ) -> Result<(), EngineError> {
        let json = serde_json::to_string(job).map_err(|e| EngineError::State {
            path: "upgrade job".into(),
            detail: e.to_string(),
        })?;
        let mut store = ctx.store.lock().map_err(|_| EngineError::State {
            path: "agent store".into(),
            detail: "lock poisoned".into(),
        })?;
        let committed = meta
            .iter()
            .find(|(k, _)| *k == META_VERSION)
            .map(|(_, v)| v.to_string())
            .map_or_else(|| self.committed(&store).map(|c| c.0), Ok)?;
        let reports = if report {
            vec![self.report(job, &committed)]
        } else {
            vec![]
        };
        crate::crashpoint::hit("upgrade job: before commit");
        let last = store.save_upgrade_job_with_meta(&json, meta, reports)?;
        drop(store);
        crate::crashpoint::hit("upgrade job: after commit");
        if last > 0 {
            (ctx.on_reports)(last);
        }
        Ok(())
    }

    fn with_store<T>(
        &self,
        ctx: &Ctx<'_>,
        f: impl FnOnce(&Store) -> Result<T, EngineError>,
    ) -> Result<T, EngineError> {
        let store = ctx.store.lock().map_err(|_| EngineError::State {
            path: "agent store".into(),
            detail: "lock poisoned".into(),
        })?;
        f(&store)
    }

    /// Does one durable step. See [`Next`] for what the caller does then.
    pub fn step(&mut self, ctx: &mut Ctx<'_>) -> Result<Next, EngineError> {
        let (mut job, committed) =
            self.with_store(ctx, |s| Ok((self.load(s)?, self.committed(s)?)))?;

        // Once per start: what does this boot mean for the job in flight?
        if !self.boot_judged {
            self.boot_judged = true;
            if let Some(j) = job.as_mut()
                && let Some(next) = self.judge_boot(ctx, j)?
            {
                return Ok(next);
            }
        }

        // The desired OS: start, supersede, abandon or refuse.
        if let Some(next) = self.admit(ctx, job.as_mut(), &committed)? {
            return Ok(next);
        }

        match job {
            Some(mut job) => self.advance(ctx, &mut job),
            None => Ok(Next::Idle),
        }
    }

    /// Takes the job in flight one step along its phase.
    fn advance(&mut self, ctx: &mut Ctx<'_>, job: &mut Job) -> Result<Next, EngineError> {
        match job.phase {
            UpgradePhase::Downloading => self.download(ctx, job),
            UpgradePhase::Written => self.verify(ctx, job),
            UpgradePhase::Verified => {
                let kind = self.boot.arm_trial(job.target).map_err(self.boot_err())?;
                job.reboot_tryboot = kind == RebootKind::Tryboot;
                job.phase = UpgradePhase::TrialArmed;
                self.save(ctx, job, true, &[])?;
                Ok(Next::Again)
            }
            UpgradePhase::TrialArmed => {
                job.phase = UpgradePhase::Rebooting;
                job.trial_reboots += 1;
                self.save(ctx, job, true, &[])?;
                tracing::info!(version = %job.version, slot = %job.target, "rebooting into the trial");
                Ok(Next::Reboot(self.reboot_kind(job)))
            }
            // Asked for a reboot that has not happened yet.
            UpgradePhase::Rebooting => Ok(Next::Idle),
            UpgradePhase::TrialRunning => self.trial(ctx, job),
            UpgradePhase::Committed | UpgradePhase::RolledBack | UpgradePhase::Failed => {
                Ok(Next::Idle)
            }
        }
    }

    /// The reboot the armed trial needs.
    fn reboot_kind(&self, job: &Job) -> RebootKind {
        if job.reboot_tryboot {
            RebootKind::Tryboot
        } else {
            RebootKind::Normal
        }
    }

    /// Once per start: what this boot means for the job in flight (the trial runs,
    /// is rejected, rolled back...). `Some(next)` ends the step there.
    fn judge_boot(&mut self, ctx: &Ctx<'_>, job: &mut Job) -> Result<Option<Next>, EngineError> {
        let state = self.boot.state().map_err(self.boot_err())?;
        let facts = BootFacts {
            booted: self.booted,
            armed: state.trial,
        };
        let t = plan::TrialFacts {
            phase: job.phase,
            target: job.target,
            trial_boots: job.trial_boots,
            trial_reboots: job.trial_reboots,
            rollback: job.rollback.clone(),
        };
        match plan::on_boot(&t, facts) {
            BootVerdict::Continue => Ok(None),
            BootVerdict::Trial { boots } => {
                job.phase = UpgradePhase::TrialRunning;
                job.trial_boots = boots;
                if job.trial_started_ms.is_none() {
                    job.trial_started_ms = Some(now_ms());
                }
                tracing::info!(version = %job.version, slot = %job.target, boots, "running the trial boot");
                self.save(ctx, job, boots == 1, &[])?;
                Ok(None)
            }
            BootVerdict::Reboot => {
                job.phase = UpgradePhase::Rebooting;
                job.trial_reboots += 1;
                self.save(ctx, job, false, &[])?;
                Ok(Some(Next::Reboot(self.reboot_kind(job))))
            }
            BootVerdict::Reject(reason) => {
                tracing::warn!(version = %job.version, %reason, "trial failed; rolling back");
                job.rollback = Some(reason);
                self.save(ctx, job, false, &[])?;
                self.boot.reject(job.target).map_err(self.boot_err())?;
                Ok(Some(Next::Reboot(RebootKind::Normal)))
            }
            BootVerdict::RolledBack(reason) => {
                // Make sure the failed slot is not tried again (idempotent).
                self.boot.reject(job.target).map_err(self.boot_err())?;
                tracing::warn!(version = %job.version, %reason, "upgrade rolled back");
                job.phase = UpgradePhase::RolledBack;
                job.error = Some(format!("rolled back: {reason}"));
                self.save(ctx, job, true, &[])?;
                Ok(None)
            }
            BootVerdict::Fail(reason) => {
                job.phase = UpgradePhase::Failed;
                job.error = Some(reason);
                self.save(ctx, job, true, &[])?;
                Ok(None)
            }
        }
    }

    /// Ends the job as failed, for `reason` (stored and reported).
    fn fail(&mut self, ctx: &Ctx<'_>, job: &mut Job, reason: String) -> Result<Next, EngineError> {
        tracing::warn!(version = %job.version, %reason, "upgrade failed; the running slot is untouched");
        job.phase = UpgradePhase::Failed;
        job.error = Some(reason);
        self.save(ctx, job, true, &[])?;
        Ok(Next::Idle)
    }

    /// Phase `trial-running`: waits for the health verdict, then commits the slot or
    /// rejects it and reboots.
    fn trial(&mut self, ctx: &Ctx<'_>, job: &mut Job) -> Result<Next, EngineError> {
        if self.booted != job.target {
            // Judged at start; nothing to do in this boot.
            return Ok(Next::Idle);
        }
        if self.checks.is_none() {
            self.checks = Some(source::run_checks(&job.health));
        }
        let started = job.trial_started_ms.unwrap_or_else(now_ms);
        let facts = HealthFacts {
            started_ms: started,
            now_ms: now_ms(),
            timeout_ms: u64::from(job.health.timeout_s) * 1000,
            require_hub: job.health.require_hub,
            // Welcomed since the trial began, or connected now (the session may have
            // come up before this boot's trial was recorded).
            hub_reached: ctx.hub_connected || ctx.hub_seen_ms.is_some_and(|h| h >= started),
            checks: self.checks.clone(),
        };
        match plan::health(&facts) {
            Health::Wait { until_ms } => Ok(Next::WaitUntil(until_ms)),
            Health::Healthy => {
                self.boot.commit(job.target).map_err(self.boot_err())?;
                job.phase = UpgradePhase::Committed;
                job.error = None;
                let release = job.release.clone();
                let version = job.version.clone();
                self.save(
                    ctx,
                    job,
                    true,
                    &[(META_VERSION, &version), (META_RELEASE, &release)],
                )?;
                tracing::info!(%version, slot = %job.target, "upgrade committed");
                Ok(Next::Idle)
            }
            Health::Unhealthy(reason) => {
                tracing::warn!(version = %job.version, %reason, "trial unhealthy; rolling back");
                job.rollback = Some(reason);
                self.save(ctx, job, true, &[])?;
                self.boot.reject(job.target).map_err(self.boot_err())?;
                Ok(Next::Reboot(RebootKind::Normal))
            }
        }
    }
}
