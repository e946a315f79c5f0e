//! A/B OS upgrades: the engine that installs a signed release into the inactive slot,
//! boots it once on trial, and commits it or ends up back on the old slot by itself.
//!
//! - [`plan`]: the decisions, without I/O (admission, what a boot means, health).
//! - [`install`]: writing a payload into a slot (delta copy, resumable, verified).
//! - [`boot`]: the boot-control backends behind [`boot::BootControl`].
//! - [`Engine`]: the driver. One [`Engine::step`] does one durable step and says what
//!   next ([`Next`]). Every phase is stored (with its report, in one transaction)
//!   before the step that follows it starts, so a crash anywhere resumes or cleanly
//!   abandons the job (see `plan` for the state diagram).
//!
//! Architecture invariant: the engine touches boot flags only through
//! [`boot::BootControl`], and marks a slot unbootable before the first byte of it is
//! written.

pub use cairn_boot as boot;
pub mod install;
pub mod offline;
pub mod plan;
pub mod source;

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cairn_sync_protocol::Text;
use cairn_sync_protocol::message::{ReportBody, UpgradePhase, UpgradeReport};
use cairn_sync_protocol::release::{
    BlockIndex, HealthSpec, Manifest, OsResource, ReleaseId, SignedManifest, Slot,
};
use serde::{Deserialize, Serialize};

use crate::store::{Store, now_ms};
use boot::{BootControl, BootError, RebootKind};
use install::{BlockSource, InstallError, LocalBlocks, PayloadJob, Progress, SourceError};
use plan::{Admission, BootFacts, BootVerdict, Health, HealthFacts};

/// Which boot loader the box has, with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSpec {
    /// `file:DIR` — the simulation's boot loader (state in `DIR/boot.json`; the slot
    /// booted is read from `DIR/booted`, written by its firmware model).
    File(PathBuf),
    /// `sdboot:ESP[:EFIVARS]` — systemd-boot boot counting on the mounted ESP.
    SdBoot { esp: PathBuf, efivars: PathBuf },
    /// `efi:A,B[:EFIVARS]` — UEFI `BootNext`/`BootOrder` with the `Boot####` numbers
    /// (hex) of the two slots' load options.
    Efi { entries: [u16; 2], efivars: PathBuf },
    /// `tryboot:BOOT_DIR:PA,PB` — Raspberry Pi `autoboot.txt` on the mounted boot
    /// partition, with the boot partition numbers of slot A and B.
    Tryboot { dir: PathBuf, partitions: [u8; 2] },
    /// `gpt:DISK:A,B` — ChromeOS-style priority/tries/successful attribute bits of the
    /// slot partitions (numbers or names) on the GPT disk.
    Gpt { disk: PathBuf, parts: [String; 2] },
    /// `uboot:FW_ENV_CONFIG` — the U-Boot environment as `fw_setenv` sees it.
    Uboot(PathBuf),
}

const EFIVARS: &str = "/sys/firmware/efi/efivars";

fn pair<T: std::str::FromStr>(s: &str, parse: impl Fn(&str) -> Option<T>) -> Option<[T; 2]> {
    let (a, b) = s.split_once(',')?;
    Some([parse(a)?, parse(b)?])
}

impl BootSpec {
    /// Parses `file:DIR`, `sdboot:ESP[:EFIVARS]`, `efi:A,B[:EFIVARS]`,
    /// `tryboot:BOOT_DIR:PA,PB`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        let usage = || {
            format!(
                "boot loader {s:?} not understood; give file:DIR, gpt:DISK:A,B (partition numbers or names), sdboot:ESP[:EFIVARS], efi:A,B[:EFIVARS] (Boot#### numbers in hex), tryboot:BOOT_DIR:PA,PB or uboot:FW_ENV_CONFIG"
            )
        };
        let (first, second) = match rest.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        if first.is_empty() {
            return Err(usage());
        }
        match kind {
            "file" => Ok(Self::File(rest.into())),
            "uboot" => Ok(Self::Uboot(rest.into())),
            "gpt" => Ok(Self::Gpt {
                disk: first.into(),
                parts: second
                    .and_then(|p| pair(p, |x| Some(x.to_string())))
                    .ok_or_else(usage)?,
            }),
            "sdboot" => Ok(Self::SdBoot {
                esp: first.into(),
                efivars: second.unwrap_or(EFIVARS).into(),
            }),
            "efi" => Ok(Self::Efi {
                entries: pair(first, |x| u16::from_str_radix(x, 16).ok()).ok_or_else(usage)?,
                efivars: second.unwrap_or(EFIVARS).into(),
            }),
            "tryboot" => Ok(Self::Tryboot {
                dir: first.into(),
                partitions: second
                    .and_then(|p| pair(p, |x| x.parse().ok()))
                    .ok_or_else(usage)?,
            }),
            _ => Err(usage()),
        }
    }

    fn open(&self) -> Result<(Box<dyn BootControl>, Option<Slot>), BootError> {
        match self {
            Self::File(dir) => {
                let b = boot::file::FileBoot::open(dir)?;
                let booted = b.booted().ok();
                Ok((Box::new(b), booted))
            }
            Self::SdBoot { esp, efivars } => {
                Ok((Box::new(boot::sdboot::SdBoot::new(esp, efivars)), None))
            }
            Self::Efi { entries, efivars } => Ok((
                Box::new(boot::efiboot::EfiBoot::new(efivars, *entries)?),
                None,
            )),
            Self::Gpt { disk, parts } => {
                let part = |p: &str| match p.parse::<u32>() {
                    Ok(n) => boot::gpt::PartRef::Number(n),
                    Err(_) => boot::gpt::PartRef::Name(p.to_string()),
                };
                let [a, b] = parts;
                Ok((
                    Box::new(boot::gpt::GptBoot::open(disk, part(a), part(b))?),
                    None,
                ))
            }
            Self::Uboot(conf) => Ok((
                Box::new(boot::uboot::UbootBoot::from_fw_env_config(conf)?),
                None,
            )),
            Self::Tryboot { dir, partitions } => {
                let tb = boot::tryboot::TryBoot::open(dir, *partitions)?;
                // The firmware says which partition it booted; the two slots' boot
                // partitions can then carry the same bytes (no per-slot cmdline.txt).
                let booted = tb.booted_slot(Path::new(boot::tryboot::DT_BOOTLOADER));
                Ok((Box::new(tb), booted))
            }
        }
    }
}

/// Where each payload of a release goes, per slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLayout {
    /// The slots themselves (partitions or files): the `rootfs` payload.
    pub rootfs: [PathBuf; 2],
    /// Other payloads by name (`kernel`, `uki`): a file per slot, on a file system
    /// (the ESP). A file payload is resized to what the release holds; the rootfs
    /// target keeps its size (a partition, or a file standing in for one).
    pub extra: Vec<(String, [PathBuf; 2])>,
}

impl SlotLayout {
    pub fn target(&self, payload: &str, slot: Slot) -> Option<&Path> {
        if payload == "rootfs" {
            return Some(&self.rootfs[slot.index()]);
        }
        self.extra
            .iter()
            .find(|(n, _)| n == payload)
            .map(|(_, p)| p[slot.index()].as_path())
    }

    /// Whether `payload` goes into a file on a file system, sized to the payload (an
    /// extra payload whose target is not a block device, such as a UKI on the ESP),
    /// rather than into a partition that keeps its size (a Pi's boot partition).
    pub fn is_file(&self, payload: &str, slot: Slot) -> bool {
        use std::os::unix::fs::FileTypeExt;
        payload != "rootfs"
            && self.target(payload, slot).is_some_and(|t| {
                // A device node, or a /dev path (a missing link must not become a
                // file on /dev's RAM file system).
                !t.starts_with("/dev")
                    && !std::fs::metadata(t).is_ok_and(|m| m.file_type().is_block_device())
            })
    }
}

/// How the agent reboots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootAction {
    /// Run this command (`systemctl reboot`; with `"0 tryboot"` appended for a Pi trial).
    Command(Vec<String>),
    /// Stop the agent and exit with [`REBOOT_EXIT_CODE`] (or, for a Pi trial,
    /// [`TRYBOOT_EXIT_CODE`]): the box's init, or the simulation's and tests' "machine",
    /// then reboots (or runs its firmware model) and starts the agent again.
    Exit,
}

/// Exit status of `cairn-agent` when it stopped to be rebooted (`--reboot exit`).
pub const REBOOT_EXIT_CODE: i32 = 10;
/// Exit status when the reboot must carry the tryboot flag (`--reboot exit` with the
/// `tryboot` boot loader): `cairn-agent reboot "0 tryboot"` does that.
pub const TRYBOOT_EXIT_CODE: i32 = 11;

/// Everything the engine needs to know about the box.
#[derive(Debug, Clone)]
pub struct UpgradeConfig {
    pub boot: BootSpec,
    pub slots: SlotLayout,
    /// `x86_64`, `aarch64` (default: this build's).
    pub arch: String,
    /// Board family releases must name (`nuc`, `rpi4`, `sim`).
    pub board: String,
    /// The version of the image the box was flashed with (committed until the first
    /// upgrade commits).
    pub os_version: String,
    /// Where the engine keeps block indexes of the slots.
    pub state_dir: PathBuf,
    /// The kernel command line, to learn the booted slot (`cairn.slot=a|b`).
    pub cmdline: PathBuf,
    /// Flush and record progress after this many bytes.
    pub checkpoint_bytes: u64,
    pub reboot: RebootAction,
}

impl UpgradeConfig {
    pub fn new(boot: BootSpec, slots: SlotLayout, board: &str, data_dir: &Path) -> Self {
        Self {
            boot,
            slots,
            arch: std::env::consts::ARCH.into(),
            board: board.into(),
            os_version: "0.0.0".into(),
            state_dir: data_dir.join("upgrade"),
            cmdline: "/proc/cmdline".into(),
            checkpoint_bytes: 32 << 20,
            reboot: RebootAction::Command(vec!["systemctl".into(), "reboot".into()]),
        }
    }
}

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

/// The durable job, stored as JSON in the agent database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Hash of the desired resource this job is for (hex).
    pub resource: String,
    pub release: String,
    pub version: String,
    /// The signed manifest (hex of [`SignedManifest::to_bytes`]), verified at admission.
    pub manifest: String,
    pub health: HealthSpec,
    pub target: Slot,
    pub phase: UpgradePhase,
    /// The target slot is marked unbootable on disk.
    pub marked: bool,
    /// Per payload, in manifest order.
    pub progress: Vec<Progress>,
    pub verify_failures: u32,
    pub trial_started_ms: Option<u64>,
    pub trial_boots: u32,
    pub trial_reboots: u32,
    /// Set when the trial was given up, before the slot is rejected.
    pub rollback: Option<String>,
    pub error: Option<String>,
    pub reboot_tryboot: bool,
}

impl Job {
    /// For `cairn-agent status`.
    pub fn status(&self) -> crate::UpgradeStatus {
        let (done, total, down) = self
            .manifest()
            .map(|(_, m)| self.totals(&m))
            .unwrap_or((0, 0, 0));
        crate::UpgradeStatus {
            version: self.version.clone(),
            phase: self.phase.as_str().into(),
            target_slot: self.target.to_string(),
            bytes_done: done,
            bytes_total: total,
            bytes_downloaded: down,
            error: self.error.clone().or_else(|| self.rollback.clone()),
        }
    }

    fn manifest(&self) -> Result<(SignedManifest, Manifest), String> {
        let bytes = hex::decode(&self.manifest).map_err(|e| e.to_string())?;
        let signed = SignedManifest::from_bytes(&bytes).map_err(|e| e.to_string())?;
        let m = signed.decode_unverified().map_err(|e| e.to_string())?;
        Ok((signed, m))
    }

    fn totals(&self, m: &Manifest) -> (u64, u64, u64) {
        let total: u64 = m.payloads.iter().map(|p| p.size).sum();
        let done: u64 = m
            .payloads
            .iter()
            .zip(&self.progress)
            .map(|(p, g)| {
                (g.blocks_done * u64::from(cairn_sync_protocol::release::BLOCK_SIZE)).min(p.size)
            })
            .sum();
        let down = self.progress.iter().map(|g| g.downloaded).sum();
        (done, total, down)
    }
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
        let (job, (committed_v, committed_r)) =
            self.with_store(ctx, |s| Ok((self.load(s)?, self.committed(s)?)))?;
        let mut job = job;

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
        let desired = ctx
            .desired
            .as_ref()
            .map(|(hash, os)| (hash, os, self.check_release(os)));
        let committed = plan::Committed {
            version: cairn_sync_protocol::release::parse_version(&committed_v)
                .unwrap_or_else(|_| semver::Version::new(0, 0, 0)),
            release: committed_r.as_deref().and_then(release_from_hex),
        };
        let current = job.as_ref().map(|j| plan::Current {
            resource: hash_from_hex(&j.resource),
            phase: j.phase,
        });
        let admission = match &desired {
            None => plan::admit(current.as_ref(), None, &committed),
            Some((hash, _, Err(reason))) => {
                // Refused once (same assignment), or a trial to finish first.
                if job.as_ref().is_some_and(|j| {
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
        };
        match admission {
            Admission::Nothing => {}
            Admission::Start | Admission::Supersede => {
                let Some((hash, os, Ok(m))) = desired else {
                    return Ok(Next::Idle);
                };
                if let Some(old) = job.as_mut().filter(|j| !j.phase.is_final()) {
                    old.phase = UpgradePhase::Failed;
                    old.error = Some(format!("superseded by release {}", m.version));
                    self.save(ctx, old, true, &[])?;
                }
                let target = !self.booted;
                // A previous job may have written the same slot: keep its progress only
                // if it was the same release (resume), else start over.
                let new = Job {
                    resource: hex::encode(hash),
                    release: os.manifest.id().to_hex(),
                    version: m.version.to_string(),
                    manifest: hex::encode(os.manifest.to_bytes()),
                    health: os.health.clone(),
                    target,
                    phase: UpgradePhase::Downloading,
                    marked: false,
                    progress: vec![Progress::default(); m.payloads.len()],
                    verify_failures: 0,
                    trial_started_ms: None,
                    trial_boots: 0,
                    trial_reboots: 0,
                    rollback: None,
                    error: None,
                    reboot_tryboot: false,
                };
                tracing::info!(version = %m.version, slot = %target, "upgrade started");
                self.save(ctx, &new, true, &[])?;
                return Ok(Next::Again);
            }
            Admission::Abandon(reason) => {
                if let Some(j) = job.as_mut() {
                    tracing::info!(version = %j.version, %reason, "upgrade abandoned");
                    j.phase = UpgradePhase::Failed;
                    j.error = Some(format!("abandoned: {reason}"));
                    self.save(ctx, j, true, &[])?;
                }
                return Ok(Next::Again);
            }
            Admission::Refuse(reason) => {
                let Some((hash, os, _)) = desired else {
                    return Ok(Next::Idle);
                };
                tracing::warn!(%reason, "desired OS release refused");
                let version = os
                    .manifest
                    .decode_unverified()
                    .map(|m| m.version.to_string())
                    .unwrap_or_else(|_| "?".into());
                let refused = Job {
                    resource: hex::encode(hash),
                    release: os.manifest.id().to_hex(),
                    version,
                    manifest: hex::encode(os.manifest.to_bytes()),
                    health: os.health.clone(),
                    target: !self.booted,
                    phase: UpgradePhase::Failed,
                    marked: false,
                    progress: vec![],
                    verify_failures: 0,
                    trial_started_ms: None,
                    trial_boots: 0,
                    trial_reboots: 0,
                    rollback: None,
                    error: Some(format!("refused: {reason}")),
                    reboot_tryboot: false,
                };
                self.save(ctx, &refused, true, &[])?;
                return Ok(Next::Idle);
            }
        }

        let Some(mut job) = job else {
            return Ok(Next::Idle);
        };
        match job.phase {
            UpgradePhase::Downloading => self.download(ctx, &mut job),
            UpgradePhase::Written => self.verify(ctx, &mut job),
            UpgradePhase::Verified => {
                let kind = self.boot.arm_trial(job.target).map_err(self.boot_err())?;
                job.reboot_tryboot = kind == RebootKind::Tryboot;
                job.phase = UpgradePhase::TrialArmed;
                self.save(ctx, &job, true, &[])?;
                Ok(Next::Again)
            }
            UpgradePhase::TrialArmed => {
                job.phase = UpgradePhase::Rebooting;
                job.trial_reboots += 1;
                self.save(ctx, &job, true, &[])?;
                tracing::info!(version = %job.version, slot = %job.target, "rebooting into the trial");
                Ok(Next::Reboot(self.reboot_kind(&job)))
            }
            // Asked for a reboot that has not happened yet.
            UpgradePhase::Rebooting => Ok(Next::Idle),
            UpgradePhase::TrialRunning => self.trial(ctx, &mut job),
            UpgradePhase::Committed | UpgradePhase::RolledBack | UpgradePhase::Failed => {
                Ok(Next::Idle)
            }
        }
    }

    fn reboot_kind(&self, job: &Job) -> RebootKind {
        if job.reboot_tryboot {
            RebootKind::Tryboot
        } else {
            RebootKind::Normal
        }
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

    fn fail(&mut self, ctx: &Ctx<'_>, job: &mut Job, reason: String) -> Result<Next, EngineError> {
        tracing::warn!(version = %job.version, %reason, "upgrade failed; the running slot is untouched");
        job.phase = UpgradePhase::Failed;
        job.error = Some(reason);
        self.save(ctx, job, true, &[])?;
        Ok(Next::Idle)
    }

    /// The blocks of payload `name` in the running slot: from the index kept when
    /// this slot was written, else by reading and hashing it.
    fn local_blocks(&self, name: &str) -> Option<LocalBlocks> {
        let active = self.cfg.slots.target(name, self.booted)?;
        match std::fs::read(self.index_path(self.booted, name)) {
            Ok(index) => LocalBlocks::from_index(active, &index).ok(),
            Err(_) => LocalBlocks::scan(active, None).ok(),
        }
    }

    /// Where payload `name` goes in `slot` (checked to exist at admission).
    fn slot_path(&self, name: &str, slot: Slot) -> PathBuf {
        self.cfg
            .slots
            .target(name, slot)
            .map(Path::to_path_buf)
            .unwrap_or_default()
    }

    fn index_path(&self, slot: Slot, payload: &str) -> PathBuf {
        self.cfg
            .state_dir
            .join(format!("slot-{}.{payload}.index", slot.as_str()))
    }

    fn download(&mut self, ctx: &mut Ctx<'_>, job: &mut Job) -> Result<Next, EngineError> {
        let (signed, m) = match job.manifest() {
            Ok(x) => x,
            Err(e) => return self.fail(ctx, job, format!("stored manifest unreadable: {e}")),
        };
        if !job.marked {
            // Before a single byte of the slot changes, no boot loader may pick it.
            self.boot
                .mark_unbootable(job.target)
                .map_err(self.boot_err())?;
            job.marked = true;
            self.save(ctx, job, false, &[])?;
        }
        // Room for every payload, before writing anything.
        for p in &m.payloads {
            let Some(target) = self.cfg.slots.target(p.name.as_str(), job.target) else {
                return self.fail(ctx, job, format!("no slot for payload {}", p.name));
            };
            let file = self.cfg.slots.is_file(p.name.as_str(), job.target);
            if let Err(e) = source::check_capacity(target, p.size, job.target, file) {
                return self.fail(ctx, job, e);
            }
        }
        let mut src: Option<Box<dyn BlockSource>> = None;
        for (n, p) in m.payloads.iter().enumerate() {
            let prog = job.progress.get(n).copied().unwrap_or_default();
            if prog.blocks_done >= p.blocks() && p.blocks() > 0 {
                continue;
            }
            let name = p.name.to_string();
            let target = self.slot_path(&name, job.target);
            // The block index: kept from an interrupted attempt, else fetched.
            let index_file = self.index_path(job.target, &name);
            let saved = std::fs::read(&index_file)
                .ok()
                .and_then(|b| BlockIndex::verified(p, &b).ok());
            let index = match saved {
                Some(i) => i,
                None => {
                    if src.is_none() {
                        src = (ctx.source)(&signed);
                    }
                    let Some(s) = src.as_mut() else {
                        return Ok(Next::Offline);
                    };
                    let raw = match s.index(n as u8) {
                        Ok(r) => r,
                        Err(SourceError::Offline(e)) => {
                            tracing::info!(error = %e, "release source offline; resuming later");
                            return Ok(Next::Offline);
                        }
                        Err(e) => return self.fail(ctx, job, e.to_string()),
                    };
                    let index = match BlockIndex::verified(p, &raw) {
                        Ok(i) => i,
                        Err(e) => return self.fail(ctx, job, e.to_string()),
                    };
                    boot::write_atomic(&index_file, &raw).map_err(self.boot_err())?;
                    index
                }
            };
            // Blocks the active slot holds are copied, not downloaded. Its index is
            // kept between steps: a download that resumes after a link loss does not
            // read the whole active slot again.
            let local = match self.local.take() {
                Some((n, l)) if n == name => Some(l),
                _ => self.local_blocks(&name),
            };
            if src.is_none() {
                src = (ctx.source)(&signed);
            }
            let Some(s) = src.as_mut() else {
                return Ok(Next::Offline);
            };
            let pj = PayloadJob {
                payload: p,
                number: n as u8,
                index: &index,
                target: &target,
                local: local.as_ref(),
                checkpoint_bytes: self.cfg.checkpoint_bytes,
            };
            let started = Instant::now();
            let stop = ctx.stop;
            let mut cp_err: Option<EngineError> = None;
            let result = {
                let job_ref = &mut *job;
                let this = &mut *self;
                let ctx_ref = &*ctx;
                install::install_payload(&pj, s.as_mut(), prog, &mut |g| {
                    if let Some(slot) = job_ref.progress.get_mut(n) {
                        *slot = *g;
                    }
                    let report = this.progress_due(job_ref, &m);
                    if let Err(e) = this.save(ctx_ref, job_ref, report, &[]) {
                        cp_err = Some(e);
                        return Err(InstallError::Interrupted);
                    }
                    if stop.load(Ordering::Relaxed) {
                        return Err(InstallError::Interrupted);
                    }
                    Ok(())
                })
            };
            self.local = local.map(|l| (name.clone(), l));
            if let Some(e) = cp_err {
                return Err(e);
            }
            match result {
                Ok(g) => {
                    tracing::info!(
                        payload = %name,
                        bytes = p.size,
                        downloaded = g.downloaded,
                        copied = g.copied,
                        ms = started.elapsed().as_millis() as u64,
                        "payload written"
                    );
                }
                Err(InstallError::Interrupted) => return Ok(Next::Again),
                Err(InstallError::Source(SourceError::Offline(e))) => {
                    tracing::info!(error = %e, "release source went away; resuming at the last checkpoint");
                    return Ok(Next::Offline);
                }
                Err(e) => return self.fail(ctx, job, e.to_string()),
            }
        }
        // File payloads end where the payload ends (the old file may have been
        // longer). Idempotent: done again after a crash here.
        for p in &m.payloads {
            let name = p.name.to_string();
            if self.cfg.slots.is_file(&name, job.target) {
                let target = self.slot_path(&name, job.target);
                if let Err(e) = trim_file(&target, p.size) {
                    return self.fail(ctx, job, e);
                }
            }
        }
        job.phase = UpgradePhase::Written;
        self.save(ctx, job, true, &[])?;
        Ok(Next::Again)
    }

    /// A progress report every 10% or 5 s, whichever is rarer.
    fn progress_due(&mut self, job: &Job, m: &Manifest) -> bool {
        let (done, total, _) = job.totals(m);
        let tenth = (total / 10).max(1);
        let due = match self.last_progress_report {
            None => true,
            Some((at, last)) => done >= last + tenth && at.elapsed() >= Duration::from_secs(5),
        };
        if due {
            self.last_progress_report = Some((Instant::now(), done));
        }
        due
    }

    fn verify(&mut self, ctx: &Ctx<'_>, job: &mut Job) -> Result<Next, EngineError> {
        let (_, m) = match job.manifest() {
            Ok(x) => x,
            Err(e) => return self.fail(ctx, job, format!("stored manifest unreadable: {e}")),
        };
        for p in &m.payloads {
            let name = p.name.to_string();
            let target = self.slot_path(&name, job.target);
            let index = std::fs::read(self.index_path(job.target, &name))
                .ok()
                .and_then(|b| BlockIndex::verified(p, &b).ok());
            let outcome = match index {
                Some(i) => install::verify_payload(p, &i, &target),
                None => Err(InstallError::VerifyFailed {
                    path: target.clone(),
                    what: "the block index kept for it is gone".into(),
                }),
            };
            if let Err(e) = outcome {
                job.verify_failures += 1;
                if job.verify_failures >= 2 {
                    return self.fail(ctx, job, e.to_string());
                }
                tracing::warn!(error = %e, "verification failed; writing the slot again");
                job.progress = vec![Progress::default(); m.payloads.len()];
                job.phase = UpgradePhase::Downloading;
                self.save(ctx, job, true, &[])?;
                return Ok(Next::Again);
            }
        }
        job.phase = UpgradePhase::Verified;
        self.save(ctx, job, true, &[])?;
        Ok(Next::Again)
    }

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

/// Cuts `path` to `size` bytes and makes that durable.
fn trim_file(path: &Path, size: u64) -> Result<(), String> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    let len = f
        .metadata()
        .map_err(|e| format!("reading {}: {e}", path.display()))?
        .len();
    if len != size {
        f.set_len(size)
            .and_then(|()| f.sync_all())
            .map_err(|e| format!("resizing {} to {size} bytes: {e}", path.display()))?;
    }
    Ok(())
}
