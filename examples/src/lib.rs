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
use std::time::Duration;

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

    /// Starts (or restarts) the agent. When the agent asks for a reboot and its slots
    /// are file-backed, the task plays the box: the file boot loader's firmware boots
    /// (a slot whose image starts with `PANIC` is a kernel that panics: the firmware
    /// resets and boots again), then the agent starts again. An agent that stops with
    /// an error (or panics) is started again after a second, as its service manager
    /// would; one whose enrollment is refused stays stopped.
    pub fn start(&mut self) {
        let (tx, rx) = watch::channel(false);
        let cfg = self.cfg.clone();
        self.stop = Some(tx);
        self.task = Some(tokio::spawn(async move {
            /// Aborts the agent's own task when the supervisor is dropped (a crash).
            struct AbortOnDrop(JoinHandle<Result<cairn_agent::Stopped, cairn_agent::RunError>>);
            impl Drop for AbortOnDrop {
                fn drop(&mut self) {
                    self.0.abort();
                }
            }
            loop {
                let mut rx2 = rx.clone();
                let shutdown = async move {
                    let _ = rx2.wait_for(|s| *s).await;
                };
                let mut agent = AbortOnDrop(tokio::spawn(cairn_agent::run(cfg.clone(), shutdown)));
                let outcome = (&mut agent.0).await;
                match outcome {
                    Ok(Ok(cairn_agent::Stopped::Shutdown)) => return,
                    Ok(Ok(cairn_agent::Stopped::Reboot(_))) => {
                        if let Err(e) = reboot_sim_box(&cfg) {
                            tracing::error!(host = %cfg.hostname, error = %e, "simulated reboot failed");
                            return;
                        }
                    }
                    Ok(Err(
                        e @ (cairn_agent::RunError::NotEnrolled(_)
                        | cairn_agent::RunError::EnrollRefused { .. }),
                    )) => {
                        tracing::error!(host = %cfg.hostname, error = %e, "agent stopped");
                        return;
                    }
                    Ok(Err(e)) => {
                        tracing::error!(host = %cfg.hostname, error = %e, "agent stopped; starting it again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                    Err(e) => {
                        tracing::error!(host = %cfg.hostname, error = %e, "agent task ended; starting it again");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                if *rx.borrow() || rx.has_changed().is_err() {
                    return;
                }
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

/// `len` random bytes from `seed`: an OS image for simulations and benchmarks.
pub fn random_image(seed: u64, len: usize) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

/// `base` with `fraction` of its 4 KiB blocks rewritten with random bytes at random
/// positions (the delta-upgrade workload).
pub fn mutate_blocks(base: &[u8], fraction: f64, seed: u64) -> Vec<u8> {
    use rand::seq::SliceRandom;
    use rand::{RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = base.to_vec();
    let blocks = v.len() / 4096;
    let mut idx: Vec<usize> = (0..blocks).collect();
    idx.shuffle(&mut rng);
    for &b in &idx[..((blocks as f64 * fraction).round() as usize).min(blocks)] {
        rng.fill_bytes(&mut v[b * 4096..(b + 1) * 4096]);
    }
    v
}

/// Whether a simulated slot holds a kernel that panics: its image starts with `PANIC`.
pub fn kernel_panics(slot: &Path) -> std::io::Result<bool> {
    let mut head = [0u8; 5];
    let f = std::fs::File::open(slot)?;
    let n = std::os::unix::fs::FileExt::read_at(&f, &mut head, 0)?;
    Ok(n == head.len() && &head == b"PANIC")
}

/// Boots a simulated box with file-backed slots again (see [`AgentTask::start`]).
pub fn reboot_sim_box(cfg: &AgentConfig) -> Result<cairn_agent::upgrade::boot::Slot> {
    use cairn_agent::upgrade::BootSpec;
    let Some(u) = &cfg.upgrade else {
        anyhow::bail!("the agent asked for a reboot but has no slots");
    };
    let BootSpec::File(dir) = &u.boot else {
        anyhow::bail!("only file-backed boxes are rebooted in the simulation");
    };
    for _ in 0..8 {
        let slot = cairn_agent::upgrade::boot::file::firmware_boot(dir)?;
        if !kernel_panics(&u.slots.rootfs[slot.index()])? {
            return Ok(slot);
        }
        tracing::info!(%slot, "simulated kernel panic; the firmware resets");
    }
    anyhow::bail!("the box keeps booting a panicking slot")
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
