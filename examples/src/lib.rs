//! Pieces the fleet simulation and the benchmarks share: an in-process hub on loopback,
//! join tokens made directly in its store, agents run as tasks, and desired-state
//! changes pushed the way the admin API pushes them.
#![forbid(unsafe_code)]

pub mod det;
pub mod peers;
pub mod peers_rauc;
pub mod plot;
pub mod real;
pub mod report;
pub mod scenario;

use std::path::Path;

use anyhow::Result;
use cairn_agent::AgentConfig;
use cairn_hub::desired::{Target, parse_labels};
use cairn_hub::server::{self, HubConfig, RunningHub};
use cairn_hub::store::{AssignOutcome, Change, NewToken};
use cairn_sync_protocol::state::{FileResource, Resource};
use cairn_sync_protocol::token::JoinToken;
use cairn_sync_protocol::{ResourceName, Text};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Config of a hub in `dir` listening on loopback ports chosen by the OS.
pub fn loopback_hub_config(dir: &Path) -> Result<HubConfig> {
    let mut cfg = HubConfig::new(dir);
    cfg.listen = "127.0.0.1:0".parse()?;
    cfg.admin_listen = "127.0.0.1:0".parse()?;
    Ok(cfg)
}

/// Starts a hub in `dir` on loopback.
pub async fn start_hub(dir: &Path) -> Result<RunningHub> {
    server::start(loopback_hub_config(dir)?).await
}

/// Creates a join token valid for an hour with `uses` uses and `labels` (`k=v,...`).
pub async fn create_token(hub: &RunningHub, uses: u32, labels: &str) -> Result<String> {
    let t = JoinToken {
        id: rand::random(),
        secret: rand::random(),
        ca_fingerprint: hub.keys.ca_fingerprint(),
    };
    let now = cairn_hub::endpoint::now_ms();
    hub.store
        .create_token(NewToken {
            id: t.id_hex(),
            secret_hash: t.secret_hash(),
            created_ms: now,
            expires_ms: now + 3_600_000,
            uses,
            labels: parse_labels(labels).map_err(anyhow::Error::msg)?,
        })
        .await?;
    Ok(t.encode())
}

/// A managed file with mode 0644.
pub fn file(path: &str, content: &str) -> Result<Resource> {
    Ok(Resource::File(FileResource {
        path: Text::new(path)?,
        content: content.as_bytes().to_vec(),
        mode: 0o644,
        uid: None,
        gid: None,
    }))
}

/// A label-selector target such as `site=paris`.
pub fn selector(s: &str) -> Result<Target> {
    Ok(Target::Selector(
        s.parse().map_err(|e| anyhow::anyhow!("{e}"))?,
    ))
}

/// Sets a resource for a target and wakes the sessions of the devices that changed, as
/// the admin API does.
pub async fn set(
    hub: &RunningHub,
    target: Target,
    name: &str,
    resource: Resource,
) -> Result<AssignOutcome> {
    let out = hub
        .store
        .assign(
            target,
            Change::Set(ResourceName::new(name)?, resource),
            cairn_hub::endpoint::now_ms(),
        )
        .await?;
    for (d, _) in &out.changed {
        hub.registry.notify(d);
    }
    Ok(out)
}

/// An agent running as a task of this process.
pub struct AgentTask {
    pub cfg: AgentConfig,
    stop: Option<watch::Sender<bool>>,
    task: Option<JoinHandle<()>>,
}

impl AgentTask {
    pub fn new(cfg: AgentConfig) -> Self {
        Self {
            cfg,
            stop: None,
            task: None,
        }
    }

    /// Starts (or restarts) the agent.
    pub fn start(&mut self) {
        let (tx, mut rx) = watch::channel(false);
        let cfg = self.cfg.clone();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(async move {
            let shutdown = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = cairn_agent::run(cfg, shutdown).await {
                tracing::error!(error = %e, "agent stopped");
            }
        }));
    }

    /// Drops the agent mid-flight, as a crash would (its SQLite transactions roll back;
    /// what it committed stays).
    pub fn abort(&mut self) {
        self.stop = None;
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }

    /// Asks the agent to stop, without waiting.
    pub fn signal_stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(true);
        }
    }

    /// Waits until a stopped agent has finished.
    pub async fn join(&mut self) {
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub async fn stop(&mut self) {
        self.signal_stop();
        self.join().await;
    }
}

/// Stops agents all at once, then waits for each.
pub async fn stop_all<'a>(agents: impl Iterator<Item = &'a mut AgentTask>) {
    let mut stopping: Vec<&mut AgentTask> = agents.collect();
    for a in stopping.iter_mut() {
        a.signal_stop();
    }
    for a in stopping.iter_mut() {
        a.join().await;
    }
}
