//! Installing a release from a bundle file, without a hub (`cairn-agent os-install`).
//!
//! The same engine and the same durable job as a hub-driven upgrade: the bundle is the
//! block source and the desired OS is built from it and the given release keys. Each
//! run goes as far as it can: to the reboot into the trial, then (run again after the
//! reboot) through the health checks to commit, or back.

use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use cairn_sync_protocol::Text;
use cairn_sync_protocol::message::UpgradePhase;
use cairn_sync_protocol::release::{HealthSpec, OsResource, SignedManifest};
use cairn_sync_protocol::state::Resource;

use super::install::{BlockSource, BundleSource};
use super::{Ctx, Engine, Next, RebootAction, UpgradeConfig, boot::RebootKind};
use crate::store::{Store, now_ms};

pub struct Request<'a> {
    pub bundle: &'a Path,
    /// Hex ed25519 public keys.
    pub release_keys: &'a [String],
    pub downgrade: bool,
    pub health_cmds: &'a [String],
    pub health_timeout: Duration,
    pub data_dir: &'a Path,
    pub upgrade: UpgradeConfig,
}

#[derive(Debug)]
pub enum Outcome {
    /// Committed or already running; the message says which.
    Done(String),
    /// Refused, failed or rolled back; the message says why.
    Failed(String),
    /// Reboot now (then run again).
    Reboot(RebootAction, RebootKind),
}

fn parse_key(k: &str) -> Result<[u8; 32]> {
    let b = hex::decode(k.trim()).map_err(|e| anyhow!("usage: --release-key {k:?}: {e}"))?;
    b.try_into().map_err(|_| {
        anyhow!("usage: --release-key {k:?}: an ed25519 public key is 32 bytes (64 hex digits)")
    })
}

/// Runs the engine on the bundle until it needs a reboot or the job is over.
pub fn install(req: &Request<'_>) -> Result<Outcome> {
    std::fs::create_dir_all(req.data_dir)
        .with_context(|| format!("creating {}", req.data_dir.display()))?;
    let store = Mutex::new(Store::open(&crate::db_path(req.data_dir))?);
    let bundle = BundleSource::open(req.bundle)
        .with_context(|| format!("reading bundle {}", req.bundle.display()))?;
    let manifest = bundle.manifest().clone();
    let keys = req
        .release_keys
        .iter()
        .map(|k| parse_key(k))
        .collect::<Result<Vec<_>>>()?;
    let mut commands = Vec::new();
    for c in req.health_cmds {
        commands.push(Text::new(c.clone()).map_err(|e| anyhow!("usage: --health-cmd: {e}"))?);
    }
    let os = OsResource {
        manifest: manifest.clone(),
        release_keys: keys,
        allow_downgrade: req.downgrade,
        health: HealthSpec {
            require_hub: false,
            timeout_s: req.health_timeout.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
            commands,
        },
    };
    let hash = Resource::Os(os.clone()).hash().0;
    let reboot = req.upgrade.reboot.clone();
    let mut engine = Engine::open(req.upgrade.clone())?;
    let mut bundle = Some(bundle);
    let mut source = |_: &SignedManifest| {
        bundle
            .take()
            .map(|b| Box::new(b) as Box<dyn BlockSource>)
            .or_else(|| {
                BundleSource::open(req.bundle)
                    .ok()
                    .map(|b| Box::new(b) as Box<dyn BlockSource>)
            })
    };
    let stop = AtomicBool::new(false);
    let on_reports = |_: u64| {};
    loop {
        let mut ctx = Ctx {
            store: &store,
            desired: Some((hash, os.clone())),
            hub_seen_ms: None,
            hub_connected: false,
            source: &mut source,
            stop: &stop,
            on_reports: &on_reports,
        };
        match engine.step(&mut ctx)? {
            Next::Again => continue,
            Next::Reboot(kind) => return Ok(Outcome::Reboot(reboot, kind)),
            Next::WaitUntil(ms) => {
                std::thread::sleep(Duration::from_millis(
                    ms.saturating_sub(now_ms()).clamp(10, 1000),
                ));
            }
            Next::Offline => {
                return Ok(Outcome::Failed(format!(
                    "the bundle {} could not be read",
                    req.bundle.display()
                )));
            }
            Next::Idle => {
                let guard = store.lock().map_err(|_| anyhow!("store lock poisoned"))?;
                let (version, _) = engine.committed(&guard)?;
                let job = guard.upgrade_job()?;
                drop(guard);
                let job: Option<super::Job> = job.and_then(|j| serde_json::from_str(&j).ok());
                let release = manifest.id().to_hex();
                return Ok(match job {
                    Some(j) if j.release == release && j.phase == UpgradePhase::Committed => {
                        Outcome::Done(format!("{} committed on slot {}", j.version, j.target))
                    }
                    Some(j) if j.release == release && j.phase.is_final() => Outcome::Failed(
                        j.error
                            .unwrap_or_else(|| format!("{}: {}", j.version, j.phase.as_str())),
                    ),
                    Some(j) if j.release == release => Outcome::Failed(format!(
                        "{} waits in phase {} (reboot to go on)",
                        j.version,
                        j.phase.as_str()
                    )),
                    _ => Outcome::Done(format!("running {version}; nothing to install")),
                });
            }
        }
    }
}
