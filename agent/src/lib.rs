//! The Cairn agent as a library; `cairn-agent` is a thin binary over it, and the fleet
//! simulation runs many of these in one process.
//!
//! - [`store`]: SQLite state (identity, verified desired state, outbox, applied records).
//! - [`client`]: enrollment and sync sessions over QUIC, with backoff.
//! - [`sync`]: the link's decisions, sans I/O (offered updates, outbox renumbering,
//!   backoff), which the fleet simulator runs too.
//! - [`reconcile`] + [`apply`]: converge the box on the desired state, online or not.
//! - [`tls`]: pinned-CA enrollment and mutual-TLS sync configurations.
#![deny(unsafe_code)]

pub mod apply;
pub mod attest;
pub mod client;
pub use cairn_boot::crashpoint;
pub mod reboot;
pub mod reconcile;
pub mod store;
pub mod sync;
pub mod tls;
pub mod upgrade;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_sync_protocol::SessionConfig;
use cairn_sync_protocol::message::{EventKind, RefusalCode};
use cairn_sync_protocol::token::JoinToken;
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::apply::FileApplier;
use crate::client::{LinkConfig, LinkError, Shared};
use crate::store::Store;

/// Everything `cairn-agent run` needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// `host:port` of the hub's QUIC endpoint.
    pub hub: String,
    pub data_dir: PathBuf,
    /// Managed files are confined below this directory.
    pub files_root: PathBuf,
    /// Needed only until the agent is enrolled.
    pub join_token: Option<String>,
    pub hostname: String,
    /// How often the reconciler checks for local drift.
    pub reconcile_interval: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub session: SessionConfig,
    /// The root of trust to attest with.
    pub attest: attest::AttestSource,
    /// A/B slots and boot loader; without them an OS release in desired state is
    /// refused (reported as failed).
    pub upgrade: Option<upgrade::UpgradeConfig>,
}

impl AgentConfig {
    pub fn new(hub: impl Into<String>, data_dir: impl Into<PathBuf>) -> Self {
        let data_dir = data_dir.into();
        Self {
            hub: hub.into(),
            files_root: data_dir.join("files"),
            data_dir,
            join_token: None,
            hostname: hostname(),
            reconcile_interval: Duration::from_secs(30),
            backoff_min: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            keep_alive: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30),
            session: SessionConfig::default(),
            attest: attest::AttestSource::None,
            upgrade: None,
        }
    }

    pub fn db_path(&self) -> PathBuf {
        db_path(&self.data_dir)
    }
}

/// The database file inside a data directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("agent.db")
}

/// This machine's host name (from /proc or /etc), or "unknown".
pub fn hostname() -> String {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .find_map(|p| std::fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Not enrolled and no usable join token given.
    #[error("{0}")]
    NotEnrolled(String),
    #[error("enrollment refused by the hub ({code:?}): {message}")]
    EnrollRefused { code: RefusalCode, message: String },
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

/// How the agent stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `shutdown` resolved.
    Shutdown,
    /// The upgrade engine needs the box rebooted (into a trial, or back after one).
    /// The caller reboots: `cairn-agent` runs its reboot command, the simulation plays
    /// the firmware.
    Reboot(upgrade::boot::RebootKind),
}

/// Runs the agent until `shutdown` resolves or a reboot is needed: reconciler, upgrade
/// engine and hub link side by side. Returns an error only when the agent cannot go
/// on (store unusable, enrollment refused).
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Stopped, RunError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let (source, dir) = (cfg.attest.clone(), cfg.data_dir.clone());
    let attester = tokio::task::spawn_blocking(move || attest::open(&source, &dir))
        .await
        .map_err(|e| anyhow::anyhow!("opening the attester: {e}"))??;
    run_with_attester(cfg, attester, shutdown).await
}

/// [`run`] with an attester the caller opened (`cfg.attest` is not used): for
/// embedding, and for tests that need an attester of their own.
pub async fn run_with_attester(
    cfg: AgentConfig,
    attester: Option<attest::SharedAttester>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Stopped, RunError> {
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("creating data directory {}", cfg.data_dir.display()))?;
    let mut store = Store::open(&cfg.db_path()).map_err(anyhow::Error::from)?;
    if store.identity().map_err(anyhow::Error::from)?.is_none() {
        match cfg.join_token.as_deref() {
            None => {
                return Err(RunError::NotEnrolled(
                    "this agent is not enrolled yet: start it once with --join-token (from `cairn-hub token create`)".into(),
                ));
            }
            Some(t) => {
                JoinToken::parse(t).map_err(|e| RunError::NotEnrolled(e.to_string()))?;
            }
        }
    }
    let applier = FileApplier::new(&cfg.files_root).map_err(anyhow::Error::from)?;
    let tail = store
        .push_reports(vec![store::event_body(
            EventKind::AgentStarted,
            None,
            None,
            &format!("cairn-agent {} started", client::AGENT_VERSION),
        )])
        .map_err(anyhow::Error::from)?;
    let (tail_tx, _) = watch::channel(tail);
    let shared = Arc::new(Shared {
        store: Mutex::new(store),
        state_changed: Notify::new(),
        outbox_tail: tail_tx,
        attester,
        os_changed: Notify::new(),
        link: Mutex::new(None),
        link_up: Notify::new(),
        hub_seen_ms: std::sync::atomic::AtomicU64::new(0),
    });

    // Reconciler and link are futures of this one task, not spawned tasks: dropping the
    // `run` future (a simulated crash in the fleet simulation) stops both at once.
    let (stop_tx, stop_rx) = watch::channel(false);
    let reconciler = reconcile_loop(
        shared.clone(),
        applier,
        cfg.reconcile_interval,
        stop_rx.clone(),
    );
    let link_cfg = LinkConfig {
        hub: cfg.hub.clone(),
        backoff_min: cfg.backoff_min,
        backoff_max: cfg.backoff_max,
        keep_alive: cfg.keep_alive,
        idle_timeout: cfg.idle_timeout,
        session: cfg.session.clone(),
        hostname: cfg.hostname.clone(),
    };
    let upgrade_stop = stop_rx.clone();
    let mut link_stop = stop_rx;
    let link = client::run_link(
        link_cfg,
        shared.clone(),
        cfg.join_token.clone(),
        async move {
            let _ = link_stop.wait_for(|s| *s).await;
        },
    );
    let (reboot_tx, mut reboot_rx) = watch::channel(None);
    let upgrader = upgrade_loop(shared.clone(), cfg.upgrade.clone(), upgrade_stop, reboot_tx);
    let main = async {
        tokio::pin!(link);
        tokio::pin!(shutdown);
        let mut stopped = Stopped::Shutdown;
        let result = tokio::select! {
            r = &mut link => r,
            () = &mut shutdown => {
                let _ = stop_tx.send(true);
                link.await
            }
            Ok(()) = reboot_rx.changed() => {
                if let Some(kind) = *reboot_rx.borrow() {
                    stopped = Stopped::Reboot(kind);
                }
                let _ = stop_tx.send(true);
                link.await
            }
        };
        let _ = stop_tx.send(true);
        result.map(|()| stopped)
    };
    let (result, (), ()) = tokio::join!(main, reconciler, upgrader);
    match result {
        Ok(s) => Ok(s),
        Err(LinkError::EnrollRefused { code, message }) => {
            Err(RunError::EnrollRefused { code, message })
        }
        Err(LinkError::Other(e)) => Err(RunError::Other(e)),
    }
}

async fn reconcile_loop(
    shared: Arc<Shared>,
    applier: FileApplier,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        // A pass may fsync many files: keep it off the runtime thread, which also drives
        // the QUIC connection.
        let (sh, ap) = (shared.clone(), applier.clone());
        let pass =
            tokio::task::spawn_blocking(move || sh.with_store(|s| reconcile::reconcile(s, &ap)))
                .await
                .unwrap_or_else(|e| Err(anyhow::anyhow!("reconcile task: {e}")));
        match pass {
            Ok(summary) => {
                if summary.last_seq > 0 {
                    shared.outbox_tail.send_replace(summary.last_seq);
                }
                if summary.applied + summary.drift_corrected + summary.removed + summary.failed > 0
                {
                    tracing::info!(
                        revision = summary.revision,
                        applied = summary.applied,
                        drift_corrected = summary.drift_corrected,
                        removed = summary.removed,
                        failed = summary.failed,
                        "reconciled"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "reconcile pass failed"),
        }
        tokio::select! {
            () = shared.state_changed.notified() => {}
            () = tokio::time::sleep(interval) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// Drives the upgrade engine: a step at a time on a blocking thread, waiting between
/// steps for what the step asked for (a new desired state, a link, a deadline).
async fn upgrade_loop(
    shared: Arc<Shared>,
    cfg: Option<upgrade::UpgradeConfig>,
    mut stop: watch::Receiver<bool>,
    reboot: watch::Sender<Option<upgrade::boot::RebootKind>>,
) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use upgrade::Next;

    /// Stops a running install at its next checkpoint when the loop goes away (also
    /// when the `run` future is dropped: a simulated crash).
    struct StopOnDrop(Arc<AtomicBool>);
    impl Drop for StopOnDrop {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop_flag = Arc::new(AtomicBool::new(false));
    let _guard = StopOnDrop(stop_flag.clone());
    let mut engine = match cfg {
        None => None,
        Some(cfg) => match tokio::task::spawn_blocking(move || upgrade::Engine::open(cfg)).await {
            Ok(Ok(e)) => {
                tracing::info!(slot = %e.booted(), "upgrade engine ready");
                Some(e)
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, "upgrade engine unavailable; OS releases will be refused");
                None
            }
            Err(e) => {
                tracing::error!(error = %e, "opening the upgrade engine");
                None
            }
        },
    };
    let rt = tokio::runtime::Handle::current();
    loop {
        let desired = shared
            .with_store(|s| s.desired())
            .ok()
            .flatten()
            .and_then(|d| {
                use cairn_sync_protocol::state::Resource;
                let r = d
                    .resources
                    .into_values()
                    .find(|r| matches!(r, Resource::Os(_)))?;
                let hash = r.hash().0;
                match r {
                    Resource::Os(os) => Some((hash, os)),
                    Resource::File(_) => None,
                }
            });
        let Some(mut e) = engine.take() else {
            if desired.is_some() {
                tracing::warn!(
                    "desired state names an OS release, but this agent has no A/B slots configured (--boot, --slot-a, --slot-b)"
                );
            }
            tokio::select! {
                () = shared.os_changed.notified() => continue,
                _ = stop.wait_for(|s| *s) => return,
            }
        };
        let (sh, flag, rt2) = (shared.clone(), stop_flag.clone(), rt.clone());
        let hub_seen = match shared.hub_seen_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        };
        let joined = tokio::task::spawn_blocking(move || {
            let link = sh.link.lock().ok().and_then(|l| l.clone());
            let hub_connected = link.is_some();
            let mut source = |m: &cairn_sync_protocol::release::SignedManifest| {
                link.clone().map(|c| {
                    Box::new(upgrade::source::QuicSource::new(rt2.clone(), c, m.id()))
                        as Box<dyn upgrade::install::BlockSource>
                })
            };
            let on_reports = |tail: u64| {
                sh.outbox_tail.send_replace(tail);
            };
            let mut ctx = upgrade::Ctx {
                store: &sh.store,
                desired,
                hub_seen_ms: hub_seen,
                hub_connected,
                source: &mut source,
                stop: &flag,
                on_reports: &on_reports,
            };
            let r = e.step(&mut ctx);
            (e, r)
        })
        .await;
        let (e, result) = match joined {
            Ok(x) => x,
            Err(err) => {
                tracing::error!(error = %err, "upgrade step panicked; upgrades stop until restart");
                return;
            }
        };
        engine = Some(e);
        let wait = match result {
            Ok(Next::Again) => {
                if *stop.borrow() {
                    return;
                }
                continue;
            }
            Ok(Next::Reboot(kind)) => {
                let _ = reboot.send(Some(kind));
                return;
            }
            Ok(Next::Idle) => Duration::from_secs(60),
            Ok(Next::WaitUntil(ms)) => Duration::from_millis(ms.saturating_sub(store::now_ms()))
                .min(Duration::from_secs(60)),
            Ok(Next::Offline) => Duration::from_secs(30),
            Err(err) => {
                tracing::error!(error = %err, "upgrade step failed; retrying in 30 s");
                Duration::from_secs(30)
            }
        };
        tokio::select! {
            () = shared.os_changed.notified() => {}
            () = shared.link_up.notified() => {}
            () = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}

/// What `cairn-agent status` shows.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    pub device: Option<String>,
    pub hub: Option<String>,
    pub connection: String,
    pub connection_since_ms: Option<u64>,
    pub revoked: Option<String>,
    pub desired_revision: u64,
    pub applied_revision: u64,
    pub failing: u32,
    pub resources: usize,
    pub outbox_depth: u64,
    pub last_seq: u64,
    /// The committed OS version (as flashed until an upgrade commits), if known.
    pub os_version: Option<String>,
    /// The last (or current) A/B upgrade.
    pub upgrade: Option<UpgradeStatus>,
}

/// The upgrade job as `cairn-agent status` shows it.
#[derive(Debug, Serialize)]
pub struct UpgradeStatus {
    pub version: String,
    pub phase: String,
    pub target_slot: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub bytes_downloaded: u64,
    pub error: Option<String>,
}

/// Reads the status from a data directory (works while the agent runs).
pub fn status(data_dir: &Path) -> Result<StatusReport> {
    let path = db_path(data_dir);
    if !path.exists() {
        anyhow::bail!(
            "no agent database at {}; has `cairn-agent run --data-dir {}` been started?",
            path.display(),
            data_dir.display()
        );
    }
    let store = Store::open_read_only(&path)?;
    let identity = store.identity()?;
    let (_, applied, failing) = store.last_status()?;
    let desired = store.desired()?;
    Ok(StatusReport {
        device: identity.map(|i| i.device.to_string()),
        hub: store.meta_text("hub")?,
        connection: store
            .meta_text("conn_state")?
            .unwrap_or_else(|| "never connected".into()),
        connection_since_ms: store
            .meta("conn_since_ms")?
            .and_then(|v| v.try_into().ok())
            .map(u64::from_le_bytes),
        revoked: client::revoked(&store)?,
        desired_revision: desired.as_ref().map_or(0, |d| d.revision),
        applied_revision: applied,
        failing,
        resources: desired.map_or(0, |d| d.resources.len()),
        outbox_depth: store.outbox_depth()?,
        last_seq: store.last_seq()?,
        os_version: store.meta_text("os_version")?,
        upgrade: store
            .upgrade_job()?
            .and_then(|j| serde_json::from_str::<upgrade::Job>(&j).ok())
            .map(|j| j.status()),
    })
}
