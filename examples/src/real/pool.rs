//! An agent pool: one process running many real agents (the agent library, each with its
//! own SQLite file and files root), each behind its own UDP relay to the hub. The relay
//! is how link faults happen to a running agent: it drops every packet while the link is
//! cut, and adds the scenario's latency, jitter and loss otherwise. The relay also
//! counts the bytes on the wire.
//!
//! The orchestrator drives a pool with one JSON command per line on stdin and reads one
//! JSON reply per line on stdout. A pool holds at most a few thousand agents so that its
//! file descriptors (one UDP socket per agent, two per relay, three per SQLite database)
//! stay below the per-process limit.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_agent::AgentConfig;

use crate::AgentTask;
use rand::Rng;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

/// How a pool is set up (passed as one JSON argument).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PoolSetup {
    pub root: PathBuf,
    pub hub: SocketAddr,
    /// Put a relay between each agent and the hub (needed for link faults and byte
    /// counts); without it agents talk to the hub directly.
    pub relay: bool,
    pub latency_us: u64,
    pub jitter_us: u64,
    pub loss: f64,
    /// Boxes get file-backed A/B slots, slot A flashed with this image (OS 1.0.0).
    #[serde(default)]
    pub os_image: Option<PathBuf>,
    /// Agents attest with the software TPM (the scenario's `attest`).
    pub attest: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Command {
    /// Starts agents for the first time: `(index, join token)`, one every `spacing_us`
    /// (a fleet powering up is not one instant; thousands of simultaneous enrollments
    /// on two cores would mostly measure the pile-up).
    Start {
        agents: Vec<(usize, String)>,
        spacing_us: u64,
    },
    /// Cuts (`up: false`) or restores links.
    Link { indices: Vec<usize>, up: bool },
    /// Kills agents: the link is cut first (so no goodbye reaches the hub, as with a
    /// power cut), then the agent's task is dropped mid-flight.
    Crash { indices: Vec<usize> },
    /// Restarts agents as boxes that booted an image they were not enrolled with.
    Tamper { indices: Vec<usize> },
    /// Starts crashed agents again and restores their links.
    Restart { indices: Vec<usize> },
    /// Overwrites a managed file by hand on these agents.
    Drift { indices: Vec<usize>, path: String },
    /// Queue depths and byte counts.
    Status,
    /// Stops every agent gracefully and audits what each holds.
    Finish,
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct StatusReply {
    /// Reports waiting in outboxes (sampled from each agent's database).
    pub queued: u64,
    pub bytes_to_hub: u64,
    pub bytes_from_hub: u64,
}

/// What an agent holds at the end, as read from its own database and files root.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentAudit {
    pub index: usize,
    pub device: Option<String>,
    pub stored_revision: u64,
    pub applied_revision: u64,
    pub outbox_depth: u64,
    pub last_seq: u64,
    /// The stored document verifies with the pinned hub state key.
    pub signed: bool,
    /// Every managed file has the content of the stored document.
    pub files_match: bool,
    pub problem: Option<String>,
    /// With A/B slots: what the box runs.
    #[serde(default)]
    pub os: Option<OsAudit>,
}

/// What a simulated box boots, read from its boot loader state and slot files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OsAudit {
    pub booted: String,
    /// SHA-256 (hex) of the booted slot's first `image_len` bytes.
    pub booted_sha256: String,
    /// The committed version (1.0.0 until an upgrade commits).
    pub committed: String,
    /// The upgrade job's version and phase, if there was one.
    pub job: Option<(String, String)>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "kebab-case")]
pub enum Reply {
    Done,
    Status(StatusReply),
    Audit { agents: Vec<AgentAudit> },
    Error { message: String },
}

/// One direction-agnostic link: up/down plus counters.
struct Link {
    up: AtomicBool,
    to_hub: AtomicU64,
    from_hub: AtomicU64,
    latency: Duration,
    jitter: Duration,
    loss: f64,
}

impl Link {
    /// Whether a packet goes through, and after what delay.
    fn pass(&self) -> Option<Duration> {
        if !self.up.load(Ordering::Relaxed) {
            return None;
        }
        let mut rng = rand::thread_rng();
        if self.loss > 0.0 && rng.gen_bool(self.loss) {
            return None;
        }
        let jitter = if self.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_micros(rng.gen_range(0..=self.jitter.as_micros() as u64))
        };
        Some(self.latency + jitter)
    }
}

/// Relays UDP between one agent and the hub. The agent talks to `downstream`'s address
/// as if it were the hub; the hub sees `upstream`'s address.
async fn relay(downstream: Arc<UdpSocket>, hub: SocketAddr, link: Arc<Link>) {
    let upstream = match UdpSocket::bind("127.0.0.1:0").await {
        Ok(s) => Arc::new(s),
        Err(e) => {
            tracing::error!(error = %e, "relay: binding upstream socket");
            return;
        }
    };
    let mut agent: Option<SocketAddr> = None;
    let mut down_buf = vec![0u8; 65536];
    let mut up_buf = vec![0u8; 65536];
    loop {
        tokio::select! {
            r = downstream.recv_from(&mut down_buf) => {
                let Ok((n, from)) = r else { continue };
                agent = Some(from);
                if let Some(delay) = link.pass() {
                    link.to_hub.fetch_add(n as u64, Ordering::Relaxed);
                    forward(upstream.clone(), hub, down_buf[..n].to_vec(), delay);
                }
            }
            r = upstream.recv_from(&mut up_buf) => {
                // Errors here are ICMP "port unreachable" while the hub is down.
                let Ok((n, _)) = r else { continue };
                if let (Some(to), Some(delay)) = (agent, link.pass()) {
                    link.from_hub.fetch_add(n as u64, Ordering::Relaxed);
                    forward(downstream.clone(), to, up_buf[..n].to_vec(), delay);
                }
            }
        }
    }
}

fn forward(sock: Arc<UdpSocket>, to: SocketAddr, packet: Vec<u8>, delay: Duration) {
    if delay.is_zero() {
        // A full socket buffer drops the packet, as a congested link would.
        let _ = sock.try_send_to(&packet, to);
    } else {
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = sock.send_to(&packet, to).await;
        });
    }
}

struct PoolAgent {
    agent: AgentTask,
    link: Arc<Link>,
    _relay: Option<JoinHandle<()>>,
}

/// What the simulated boxes' firmware measures as their boot image (both modes).
pub const SIM_BOOT_IMAGE: &str = "cairn-sim 1.0";
/// What a tampered box boots instead (the `tamper` step).
pub const TAMPERED_BOOT_IMAGE: &str = "cairn-sim 1.0, modified";

/// Agent settings used in the simulation: the agent's defaults, except for a faster
/// local reconcile pass, quicker keep-alives (so a restarted hub is noticed within 2 s)
/// and a shorter backoff ceiling.
pub fn sim_agent_config(hub: &str, dir: &Path, index: usize, attest: bool) -> AgentConfig {
    let mut cfg = AgentConfig::new(hub, dir);
    cfg.hostname = hostname(index);
    cfg.reconcile_interval = Duration::from_secs(5);
    cfg.backoff_min = Duration::from_millis(200);
    cfg.backoff_max = Duration::from_secs(5);
    cfg.keep_alive = Duration::from_secs(2);
    // Simulated boxes attest with the software TPM: the hub verifies every session's
    // quote and event log as it would a real TPM's, and lists them as `software`.
    cfg.attest = if attest {
        cairn_agent::attest::AttestSource::Software {
            boot_image: SIM_BOOT_IMAGE.into(),
        }
    } else {
        cairn_agent::attest::AttestSource::None
    };
    cfg
}

/// The hostname of simulated device `index`; the orchestrator maps hub devices back to
/// indices by it.
pub fn hostname(index: usize) -> String {
    format!("box-{index:06}")
}

pub fn index_of(hostname: &str) -> Option<usize> {
    hostname.strip_prefix("box-")?.parse().ok()
}

struct Pool {
    setup: PoolSetup,
    agents: BTreeMap<usize, PoolAgent>,
}

impl Pool {
    async fn handle(&mut self, cmd: Command) -> Result<Reply> {
        match cmd {
            Command::Start { agents, spacing_us } => {
                for (index, token) in agents {
                    if spacing_us > 0 {
                        tokio::time::sleep(Duration::from_micros(spacing_us)).await;
                    }
                    let link = Arc::new(Link {
                        up: AtomicBool::new(true),
                        to_hub: AtomicU64::new(0),
                        from_hub: AtomicU64::new(0),
                        latency: Duration::from_micros(self.setup.latency_us),
                        jitter: Duration::from_micros(self.setup.jitter_us),
                        loss: self.setup.loss,
                    });
                    let (addr, relay) = if self.setup.relay {
                        let downstream = Arc::new(
                            UdpSocket::bind("127.0.0.1:0")
                                .await
                                .context("binding relay socket")?,
                        );
                        let addr = downstream.local_addr()?;
                        (
                            addr,
                            Some(tokio::spawn(relay(
                                downstream,
                                self.setup.hub,
                                link.clone(),
                            ))),
                        )
                    } else {
                        (self.setup.hub, None)
                    };
                    let dir = self.setup.root.join(format!("agent-{index:06}"));
                    let mut cfg =
                        sim_agent_config(&addr.to_string(), &dir, index, self.setup.attest);
                    cfg.join_token = Some(token);
                    if let Some(image) = &self.setup.os_image {
                        cfg.upgrade = Some(flash_box(&dir, image)?);
                    }
                    let mut a = PoolAgent {
                        agent: AgentTask::new(cfg),
                        link,
                        _relay: relay,
                    };
                    a.agent.start();
                    self.agents.insert(index, a);
                }
                Ok(Reply::Done)
            }
            Command::Link { indices, up } => {
                for i in indices {
                    if let Some(a) = self.agents.get(&i) {
                        a.link.up.store(up, Ordering::Relaxed);
                    }
                }
                Ok(Reply::Done)
            }
            Command::Crash { indices } => {
                for i in indices {
                    if let Some(a) = self.agents.get_mut(&i) {
                        a.link.up.store(false, Ordering::Relaxed);
                        a.agent.abort();
                    }
                }
                Ok(Reply::Done)
            }
            Command::Tamper { indices } => {
                for i in indices {
                    if let Some(a) = self.agents.get_mut(&i) {
                        a.agent.abort();
                        a.agent.cfg.attest = cairn_agent::attest::AttestSource::Software {
                            boot_image: TAMPERED_BOOT_IMAGE.into(),
                        };
                        a.agent.start();
                    }
                }
                Ok(Reply::Done)
            }
            Command::Restart { indices } => {
                for i in indices {
                    if let Some(a) = self.agents.get_mut(&i) {
                        a.agent.abort();
                        a.link.up.store(true, Ordering::Relaxed);
                        a.agent.start();
                    }
                }
                Ok(Reply::Done)
            }
            Command::Drift { indices, path } => {
                for i in indices {
                    if let Some(a) = self.agents.get(&i) {
                        let p = a.agent.cfg.files_root.join(&path);
                        if p.exists() {
                            std::fs::write(&p, b"changed by hand\n")
                                .with_context(|| format!("tampering with {}", p.display()))?;
                        }
                    }
                }
                Ok(Reply::Done)
            }
            Command::Status => {
                let mut s = StatusReply::default();
                for a in self.agents.values() {
                    s.bytes_to_hub += a.link.to_hub.load(Ordering::Relaxed);
                    s.bytes_from_hub += a.link.from_hub.load(Ordering::Relaxed);
                    if let Ok(st) = cairn_agent::status(&a.agent.cfg.data_dir) {
                        s.queued += st.outbox_depth;
                    }
                }
                Ok(Reply::Status(s))
            }
            Command::Finish => {
                crate::stop_all(self.agents.values_mut().map(|a| &mut a.agent)).await;
                let image_len = match &self.setup.os_image {
                    Some(p) => Some(std::fs::metadata(p)?.len()),
                    None => None,
                };
                let agents = self
                    .agents
                    .iter()
                    .map(|(i, a)| audit(*i, &a.agent.cfg, image_len))
                    .collect();
                Ok(Reply::Audit { agents })
            }
        }
    }
}

/// Gives a simulated box two file-backed slots, slot A flashed with `image` (1.0.0)
/// and booted; returns the agent's upgrade configuration.
pub fn flash_box(dir: &Path, image: &Path) -> Result<cairn_agent::upgrade::UpgradeConfig> {
    use cairn_agent::upgrade::{BootSpec, RebootAction, SlotLayout, UpgradeConfig};
    std::fs::create_dir_all(dir)?;
    let len = std::fs::metadata(image)?.len();
    let slots = [dir.join("slot-a.img"), dir.join("slot-b.img")];
    std::fs::copy(image, &slots[0]).with_context(|| format!("flashing {}", slots[0].display()))?;
    for s in &slots {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .open(s)?;
        f.set_len(len + 64 * 1024)?;
    }
    let boot = dir.join("boot");
    cairn_agent::upgrade::boot::file::FileBoot::open(&boot)?;
    cairn_agent::upgrade::boot::file::firmware_boot(&boot)?;
    let layout = SlotLayout {
        rootfs: slots,
        extra: vec![],
    };
    let mut cfg = UpgradeConfig::new(BootSpec::File(boot), layout, "sim", dir);
    cfg.os_version = "1.0.0".into();
    cfg.reboot = RebootAction::Exit;
    cfg.checkpoint_bytes = 64 * 1024;
    Ok(cfg)
}

fn audit_os(cfg: &AgentConfig, image_len: u64) -> Result<Option<OsAudit>> {
    use sha2::Digest;
    let Some(u) = &cfg.upgrade else {
        return Ok(None);
    };
    let cairn_agent::upgrade::BootSpec::File(boot) = &u.boot else {
        return Ok(None);
    };
    let booted = cairn_agent::upgrade::boot::file::FileBoot::open(boot)?.booted()?;
    let mut bytes = std::fs::read(&u.slots.rootfs[booted.index()])?;
    bytes.truncate(image_len as usize);
    let st = cairn_agent::status(&cfg.data_dir)?;
    Ok(Some(OsAudit {
        booted: booted.as_str().into(),
        booted_sha256: hex::encode(sha2::Sha256::digest(&bytes)),
        committed: st.os_version.unwrap_or_else(|| u.os_version.clone()),
        job: st.upgrade.map(|j| (j.version, j.phase)),
    }))
}

/// Reads what a stopped agent holds and checks it against its own pinned hub key.
fn audit(index: usize, cfg: &AgentConfig, image_len: Option<u64>) -> AgentAudit {
    let mut out = AgentAudit {
        index,
        device: None,
        stored_revision: 0,
        applied_revision: 0,
        outbox_depth: 0,
        last_seq: 0,
        signed: false,
        files_match: false,
        problem: None,
        os: None,
    };
    if let Err(e) = audit_into(cfg, &mut out) {
        out.problem = Some(format!("{e:#}"));
    }
    if let Some(image_len) = image_len {
        match audit_os(cfg, image_len) {
            Ok(os) => out.os = os,
            Err(e) => out.problem = Some(format!("OS audit: {e:#}")),
        }
    }
    out
}

fn audit_into(cfg: &AgentConfig, out: &mut AgentAudit) -> Result<()> {
    let st = cairn_agent::status(&cfg.data_dir)?;
    out.device = st.device.clone();
    out.applied_revision = st.applied_revision;
    out.outbox_depth = st.outbox_depth;
    out.last_seq = st.last_seq;
    let store = cairn_agent::store::Store::open_read_only(&cfg.db_path())?;
    let Some(identity) = store.identity()? else {
        anyhow::bail!("not enrolled");
    };
    let Some(doc) = store.desired()? else {
        // Nothing stored: trivially signed, nothing to match.
        out.signed = true;
        out.files_match = true;
        return Ok(());
    };
    out.stored_revision = doc.revision;
    out.signed = doc.verify(&identity.state_key).is_ok() && doc.device == identity.device;
    let mut files_match = true;
    for res in doc.resources.values() {
        let cairn_sync_protocol::state::Resource::File(f) = res else {
            continue;
        };
        let p = cfg.files_root.join(f.path.as_str().trim_start_matches('/'));
        if std::fs::read(&p).ok().as_deref() != Some(f.content.as_slice()) {
            files_match = false;
            out.problem = Some(format!("{} differs from the stored state", p.display()));
        }
    }
    out.files_match = files_match;
    Ok(())
}

/// The pool process's main loop: commands on stdin, replies on stdout, until stdin ends.
pub async fn main(setup: PoolSetup) -> Result<()> {
    let mut pool = Pool {
        setup,
        agents: BTreeMap::new(),
    };
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut stdout = tokio::io::stdout();
    while let Some(line) = lines.next_line().await? {
        let reply = match serde_json::from_str::<Command>(&line) {
            Ok(cmd) => pool.handle(cmd).await.unwrap_or_else(|e| Reply::Error {
                message: format!("{e:#}"),
            }),
            Err(e) => Reply::Error {
                message: format!("bad command {line:?}: {e}"),
            },
        };
        let mut text = serde_json::to_string(&reply)?;
        text.push('\n');
        stdout.write_all(text.as_bytes()).await?;
        stdout.flush().await?;
    }
    Ok(())
}
