//! Real mode: a real hub and real agents on this machine, QUIC over loopback.
//!
//! ```text
//!   fleet-sim (orchestrator) ──admin API (HTTPS)──► hub process (`__hub`, the hub library)
//!        │ JSON lines on stdin/stdout                      ▲ QUIC (UDP)
//!        ▼                                                 │
//!   agent pools (`__agents`, up to --pool-size agents each) │
//!        agent ─UDP─► relay (cut / latency / jitter / loss, byte counts) ─┘
//! ```
//!
//! The orchestrator runs the scenario's timeline in wall-clock time: operator actions
//! through the hub's admin API, exactly as `cairn-hub` CLI users make them; faults
//! through the pools (links cut at the relay, agents killed mid-flight) and the hub
//! process (SIGKILL, then restarted on the same ports and data directory). Convergence
//! times come from the hub's own record of when it learned that a device applied its
//! newest revision (`applied_ms`), measured from the operator's action or, for a device
//! that was cut off then, from when its link came back.

pub mod hub;
pub mod os;
pub mod pool;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use cairn_hub::api::DeviceView;
use cairn_hub::cli::{Client, Connect};
use cairn_hub::store::EventRecord;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as Process};

use self::hub::{HubProcess, HubSetup};
use self::pool::{AgentAudit, Command, PoolSetup, Reply, StatusReply};
use crate::report::{
    Action, Events, Faults, HubUsage, InvariantResult, Phase, Report, Sample, Wire,
};
use crate::scenario::{Invariant, Scenario, Step};

/// How to run a scenario in real mode.
pub struct RealOptions {
    /// Where the hub's and agents' data go.
    pub root: PathBuf,
    /// Where the agents' data go instead, if set (e.g. a tmpfs: on a real fleet each
    /// agent fsyncs its own disk; here thousands share one).
    pub agents_root: Option<PathBuf>,
    /// Agents per pool process.
    pub pool_size: usize,
    /// Show the live progress display.
    pub progress: bool,
    /// How long enrollment of the whole fleet may take.
    pub enroll_timeout: Duration,
}

/// One device as the hub's admin API lists it: the API's own type.
type HubDevice = DeviceView;

/// Converged: the agent stored and applied the newest revision, and nothing fails.
fn is_converged(d: &HubDevice) -> bool {
    let r = &d.record;
    r.applied_revision == r.desired_revision
        && r.stored_revision == r.desired_revision
        && r.failing == 0
}

/// A pool process and its command channel.
struct PoolProcess {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl PoolProcess {
    async fn start(exe: &Path, setup: &PoolSetup) -> Result<Self> {
        let mut child = Process::new(exe)
            .arg("__agents")
            .arg(serde_json::to_string(setup)?)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting an agent pool process")?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("pool stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("pool stdout"))?;
        Ok(Self {
            child,
            stdin,
            stdout: BufReader::new(stdout).lines(),
        })
    }

    async fn call(&mut self, cmd: &Command) -> Result<Reply> {
        self.send(cmd).await?;
        self.recv().await
    }

    async fn send(&mut self, cmd: &Command) -> Result<()> {
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    async fn recv(&mut self) -> Result<Reply> {
        let Some(reply) = self.stdout.next_line().await? else {
            let status = self.child.wait().await?;
            bail!("an agent pool process ended ({status})");
        };
        match serde_json::from_str::<Reply>(&reply)? {
            Reply::Error { message } => bail!("agent pool: {message}"),
            r => Ok(r),
        }
    }
}

/// Something the timeline scheduled for later.
#[derive(Debug, Clone)]
enum Timed {
    LinkDown(Vec<usize>),
    LinkUp(Vec<usize>),
    Restart(Vec<usize>),
}

struct Fleet {
    exe: PathBuf,
    scenario: Scenario,
    opts_pool_size: usize,
    hub: HubProcess,
    api: Client,
    pools: Vec<PoolProcess>,
    /// Active faults per device index (cut links, crashed agents); 0: reachable.
    faults_on: Vec<u32>,
    /// Per device: when its current measurement starts (ms since the epoch).
    t_ref: Vec<u64>,
    /// Desired revision per device at the previous `converge`.
    desired_before: Vec<u64>,
    /// Devices that must have started a new session since this time (ms since the
    /// epoch; the hub or the agent restarted then) before they count as converged.
    resync_after: Vec<Option<u64>>,
    /// Devices partitioned without a duration, healed by `heal`.
    open_partitions: BTreeSet<usize>,
    scheduled: Vec<(Instant, Timed)>,
    /// Latest path set for each resource name (for `drift`).
    paths: BTreeMap<String, String>,
    devices: Vec<Option<HubDevice>>,
    last_status: StatusReply,
    last_status_at: Option<Instant>,
    started: Instant,
    timeline_start: Option<Instant>,
    timeline: Vec<Sample>,
    faults: Faults,
    problems: Vec<String>,
    bar: ProgressBar,
    step_text: String,
    rss_peak_mb: f64,
    /// Hub CPU seconds when the last operator action or fault began.
    cpu_mark: f64,
    actions: Vec<Action>,
    /// Releases, images and the release key, with `[upgrades]`.
    os: Option<os::OsFleet>,
    /// The OS version assigned to each device.
    assigned: Vec<Option<String>>,
}

fn now_ms() -> u64 {
    cairn_hub::endpoint::now_ms()
}

impl Fleet {
    fn pool_of(&self, index: usize) -> usize {
        index / self.opts_pool_size
    }

    /// CPU seconds of every hub process of this run so far.
    fn hub_cpu(&self) -> f64 {
        self.hub.usage().map_or(0.0, |u| u.cpu_secs) + self.hub.cpu_before
    }

    /// Device `i` is connected, holds and applied its newest revision, and started a new
    /// session since its restart if it had one.
    fn done(&self, i: usize) -> bool {
        self.devices[i].as_ref().is_some_and(|d| {
            is_converged(d)
                && d.connected
                && self.resync_after[i].is_none_or(|t| d.record.online_since_ms.unwrap_or(0) >= t)
        })
    }

    /// Sends a command for `indices` to the pools holding them.
    async fn for_pools(
        &mut self,
        indices: &[usize],
        make: impl Fn(Vec<usize>) -> Command,
    ) -> Result<()> {
        let mut by_pool: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
        for &i in indices {
            by_pool.entry(self.pool_of(i)).or_default().push(i);
        }
        for (p, idx) in by_pool {
            self.pools[p].call(&make(idx)).await?;
        }
        Ok(())
    }

    fn fault_begins(&mut self, indices: &[usize]) {
        for &i in indices {
            self.faults_on[i] += 1;
        }
    }

    fn fault_ends(&mut self, indices: &[usize]) {
        let now = now_ms();
        for &i in indices {
            self.faults_on[i] = self.faults_on[i].saturating_sub(1);
            if self.faults_on[i] == 0 {
                self.t_ref[i] = now;
            }
        }
    }

    async fn fire(&mut self, t: Timed) -> Result<()> {
        match t {
            Timed::LinkDown(idx) => {
                self.fault_begins(&idx);
                self.for_pools(&idx, |indices| Command::Link { indices, up: false })
                    .await
            }
            Timed::LinkUp(idx) => {
                self.for_pools(&idx, |indices| Command::Link { indices, up: true })
                    .await?;
                self.fault_ends(&idx);
                Ok(())
            }
            Timed::Restart(idx) => {
                self.for_pools(&idx, |indices| Command::Restart { indices })
                    .await?;
                self.fault_ends(&idx);
                let now = now_ms();
                for &i in &idx {
                    self.resync_after[i] = Some(now);
                }
                Ok(())
            }
        }
    }

    async fn fire_due(&mut self) -> Result<()> {
        let now = Instant::now();
        self.scheduled.sort_by_key(|(t, _)| *t);
        while let Some((t, _)) = self.scheduled.first()
            && *t <= now
        {
            let (_, action) = self.scheduled.remove(0);
            self.fire(action).await?;
        }
        Ok(())
    }

    /// One turn of the loop: due faults, the hub's device list, pool status every
    /// second, the hub's usage, a timeline sample and the progress display.
    async fn tick(&mut self) -> Result<()> {
        self.fire_due().await?;
        let list: Vec<HubDevice> = self
            .api
            .get("/v1/devices")
            .await
            .map_err(|e| e.error.context("listing devices"))?;
        for d in list {
            if let Some(i) = pool::index_of(&d.record.hostname)
                && i < self.devices.len()
            {
                self.devices[i] = Some(d);
            }
        }
        // Queue depths are read from every agent's database: for big fleets, less often.
        let status_every = Duration::from_secs(1 + self.devices.len() as u64 / 2000);
        if self
            .last_status_at
            .is_none_or(|t| t.elapsed() > status_every)
        {
            let mut total = StatusReply::default();
            for p in &mut self.pools {
                p.send(&Command::Status).await?;
            }
            for p in &mut self.pools {
                if let Reply::Status(s) = p.recv().await? {
                    total.queued += s.queued;
                    total.bytes_to_hub += s.bytes_to_hub;
                    total.bytes_from_hub += s.bytes_from_hub;
                }
            }
            self.last_status = total;
            self.last_status_at = Some(Instant::now());
        }
        let usage = self.hub.usage();
        if let Some(u) = usage {
            self.rss_peak_mb = self.rss_peak_mb.max(u.rss_peak_mb);
        }
        let online = self
            .devices
            .iter()
            .flatten()
            .filter(|d| d.connected)
            .count();
        let converged = self
            .devices
            .iter()
            .flatten()
            .filter(|d| is_converged(d))
            .count();
        if let Some(t0) = self.timeline_start {
            self.timeline.push(Sample {
                t_ms: t0.elapsed().as_millis() as u64,
                online,
                converged,
                queued: self.last_status.queued,
                hub_cpu_secs: usage.map(|u| u.cpu_secs + self.hub.cpu_before),
                hub_rss_mb: usage.map(|u| u.rss_mb),
            });
        }
        let cut = self.faults_on.iter().filter(|n| **n > 0).count();
        self.bar.set_position(converged as u64);
        self.bar.set_message(format!(
            "online {online} · cut off {cut} · queued reports {} · {}",
            self.last_status.queued, self.step_text
        ));
        Ok(())
    }

    /// How often a `converge` step polls the hub's device list: listing 10,000 devices
    /// is work for the hub, whose CPU the run measures, so big fleets poll less often.
    /// Convergence times do not depend on it (they come from the hub's own records).
    fn poll_interval(&self) -> Duration {
        Duration::from_millis(100 + 50 * (self.devices.len() as u64 / 1000))
    }

    /// Lets time pass, looking at the fleet every 2 s (due faults fire on time).
    async fn sleep(&mut self, d: Duration) -> Result<()> {
        let until = Instant::now() + d;
        let mut next_tick = Instant::now();
        while Instant::now() < until {
            if Instant::now() >= next_tick {
                self.tick().await?;
                next_tick = Instant::now() + Duration::from_secs(2);
            } else {
                self.fire_due().await?;
            }
            let left = until.saturating_duration_since(Instant::now());
            tokio::time::sleep(left.min(Duration::from_millis(100))).await;
        }
        Ok(())
    }

    /// Waits until every reachable device converged; returns the phase.
    async fn converge(&mut self, name: &str, timeout: Duration, all: bool) -> Result<Phase> {
        let start = Instant::now();
        loop {
            self.tick().await?;
            let pending = (0..self.devices.len())
                .filter(|i| all || self.faults_on[*i] == 0)
                .filter(|i| !self.done(*i))
                .count();
            if pending == 0 {
                break;
            }
            if start.elapsed() > timeout {
                self.problems.push(format!(
                    "{name}: {pending} devices had not converged after {}",
                    humantime::format_duration(timeout)
                ));
                break;
            }
            tokio::time::sleep(self.poll_interval()).await;
        }
        // Each device's time: until the hub learned it applied a changed revision, and,
        // after a restart, until its new session began — whichever came later.
        let mut times = Vec::new();
        let mut due = 0;
        for i in 0..self.devices.len() {
            let Some(d) = &self.devices[i] else { continue };
            let changed = d.record.desired_revision != self.desired_before[i];
            if !(changed || self.resync_after[i].is_some()) || !(all || self.faults_on[i] == 0) {
                continue;
            }
            due += 1;
            if self.done(i) {
                let applied = if changed {
                    d.record.applied_ms.unwrap_or(0)
                } else {
                    0
                };
                let session = if self.resync_after[i].is_some() {
                    d.record.online_since_ms.unwrap_or(0)
                } else {
                    0
                };
                times.push(applied.max(session).saturating_sub(self.t_ref[i]));
            }
        }
        for i in 0..self.devices.len() {
            if let Some(d) = &self.devices[i]
                && (all || self.faults_on[i] == 0)
            {
                self.desired_before[i] = d.record.desired_revision;
                self.resync_after[i] = None;
            }
        }
        let mut phase = Phase::from_times(name, due, times);
        phase.hub_cpu_secs = Some(self.hub_cpu() - self.cpu_mark);
        Ok(phase)
    }

    async fn run_step(&mut self, n: usize, step: &Step) -> Result<Option<Phase>> {
        match step {
            Step::Set {
                selector,
                resource,
                path,
                content,
            } => {
                self.paths
                    .insert(resource.to_string(), path.as_str().to_string());
                let body = json!({
                    "selector": selector.to_string(),
                    "name": resource.as_str(),
                    "file": { "path": path.as_str(), "content": content, "mode": 0o644 },
                });
                self.change_state(step, &body).await?;
            }
            Step::Unset { selector, resource } => {
                let body = json!({ "selector": selector.to_string(), "name": resource.as_str() });
                self.change_state(step, &body).await?;
            }
            Step::Converge { name, timeout } => {
                return Ok(Some(self.converge(name, *timeout, false).await?));
            }
            Step::Partition {
                devices,
                selector,
                duration,
            } => {
                let idx = self.scenario.pick(n, *devices, selector.as_ref());
                self.faults.partitions += idx.len() as u64;
                self.fire(Timed::LinkDown(idx.clone())).await?;
                match duration {
                    Some(d) => self
                        .scheduled
                        .push((Instant::now() + *d, Timed::LinkUp(idx))),
                    None => self.open_partitions.extend(idx),
                }
            }
            Step::Heal => self.heal().await?,
            Step::Flap {
                devices,
                selector,
                period,
                duration,
            } => {
                let idx = self.scenario.pick(n, *devices, selector.as_ref());
                self.faults.flaps += idx.len() as u64;
                let now = Instant::now();
                let mut t = Duration::ZERO;
                while t + *period <= *duration {
                    self.scheduled.push((now + t, Timed::LinkDown(idx.clone())));
                    self.scheduled
                        .push((now + t + *period / 2, Timed::LinkUp(idx.clone())));
                    t += *period;
                }
                self.fire_due().await?;
            }
            Step::HubRestart { down } => {
                self.faults.hub_restarts += 1;
                self.cpu_mark = self.hub_cpu();
                self.hub.kill().await?;
                // The hub cannot be asked while it is down: only due faults fire.
                let back = Instant::now() + *down;
                while Instant::now() < back {
                    self.fire_due().await?;
                    let left = back.saturating_duration_since(Instant::now());
                    tokio::time::sleep(left.min(Duration::from_millis(100))).await;
                }
                self.hub.restart(&self.exe).await?;
                let now = now_ms();
                for t in &mut self.t_ref {
                    *t = (*t).max(now);
                }
                self.resync_after.fill(Some(now));
            }
            Step::Crash {
                devices,
                selector,
                down,
            } => {
                let idx = self.scenario.pick(n, *devices, selector.as_ref());
                self.faults.agent_crashes += idx.len() as u64;
                self.fault_begins(&idx);
                self.for_pools(&idx, |indices| Command::Crash { indices })
                    .await?;
                self.scheduled
                    .push((Instant::now() + *down, Timed::Restart(idx)));
            }
            Step::Drift {
                devices,
                selector,
                resource,
            } => {
                let idx = self.scenario.pick(n, *devices, selector.as_ref());
                let path = self.paths.get(resource.as_str()).cloned().ok_or_else(|| {
                    anyhow!(
                        "step {}: drift of {resource}, which no earlier step set",
                        n + 1
                    )
                })?;
                self.for_pools(&idx, |indices| Command::Drift {
                    indices,
                    path: path.clone(),
                })
                .await?;
            }
            Step::Sleep { duration } => self.sleep(*duration).await?,
            Step::Release {
                version,
                changed,
                broken,
            } => self.release(step, version, *changed, *broken).await?,
            Step::OsSet {
                selector,
                version,
                health_cmd,
                health_timeout,
            } => {
                let body = json!({
                    "selector": selector.to_string(),
                    "name": "os",
                    "os": {
                        "version": version,
                        "health_timeout_s": health_timeout.as_secs(),
                        "require_hub": true,
                        "health_commands": health_cmd.iter().collect::<Vec<_>>(),
                    },
                });
                self.change_state(step, &body).await?;
                for i in 0..self.assigned.len() {
                    if selector.0.matches(&self.scenario.labels_of(i)) {
                        self.assigned[i] = Some(version.clone());
                    }
                }
            }
            Step::ConvergeOs { name, timeout } => {
                return Ok(Some(self.converge_os(name, *timeout).await?));
            }
        }
        Ok(None)
    }

    /// Builds a release bundle and pushes it with the operator's release key.
    async fn release(
        &mut self,
        step: &Step,
        version: &str,
        changed: f64,
        broken: bool,
    ) -> Result<()> {
        let Some(os) = self.os.as_mut() else {
            bail!("release steps need [upgrades]");
        };
        let bundle = os.build(version, changed, broken)?;
        if !os.key_added {
            let _: serde_json::Value = self
                .api
                .post(
                    "/v1/release-keys",
                    &json!({
                        "public_key": hex::encode(os.key.verifying_key().as_bytes()),
                        "name": "fleet-sim",
                    }),
                )
                .await
                .map_err(|e| e.error.context("trusting the release key"))?;
            os.key_added = true;
        }
        let bytes = tokio::fs::read(&bundle).await?;
        let len = bytes.len() as u64;
        let t = Instant::now();
        let _: serde_json::Value = self
            .api
            .post_stream("/v1/releases", reqwest::Body::from(bytes), len)
            .await
            .map_err(|e| e.error.context(format!("pushing release {version}")))?;
        self.actions.push(Action {
            what: step.describe(),
            ms: t.elapsed().as_millis() as u64,
        });
        Ok(())
    }

    /// Waits until every reachable device with an assigned OS has finished upgrading to
    /// it (committed, rolled back or refused); the phase's times run from the
    /// assignment to the device's final report.
    async fn converge_os(&mut self, name: &str, timeout: Duration) -> Result<Phase> {
        let start = Instant::now();
        let finished = |f: &Fleet, i: usize| -> bool {
            match (
                &f.assigned[i],
                f.devices[i]
                    .as_ref()
                    .and_then(|d| d.record.upgrade.as_ref()),
            ) {
                (None, _) => true,
                (Some(v), Some(u)) => &u.version == v && u.is_final(),
                (Some(_), None) => false,
            }
        };
        loop {
            self.tick().await?;
            let pending = (0..self.devices.len())
                .filter(|i| self.faults_on[*i] == 0 && !finished(self, *i))
                .count();
            if pending == 0 {
                break;
            }
            if start.elapsed() > timeout {
                self.problems.push(format!(
                    "{name}: {pending} devices had not finished their upgrade after {}",
                    humantime::format_duration(timeout)
                ));
                break;
            }
            tokio::time::sleep(self.poll_interval()).await;
        }
        let mut times = Vec::new();
        let mut due = 0;
        let (mut committed, mut rolled_back, mut failed, mut downloaded, mut total) =
            (0, 0, 0, 0u64, 0u64);
        for i in 0..self.devices.len() {
            if self.assigned[i].is_none() || self.faults_on[i] > 0 {
                continue;
            }
            due += 1;
            if let Some(u) = self.devices[i]
                .as_ref()
                .and_then(|d| d.record.upgrade.as_ref())
                && finished(self, i)
            {
                times.push(u.at_ms.saturating_sub(self.t_ref[i]));
                match u.phase.as_str() {
                    "committed" => committed += 1,
                    "rolled-back" => rolled_back += 1,
                    _ => failed += 1,
                }
                downloaded += u.bytes_downloaded;
                total += u.bytes_total;
            }
        }
        let mut phase = Phase::from_times(name, due, times);
        phase.hub_cpu_secs = Some(self.hub_cpu() - self.cpu_mark);
        self.bar.println(format!(
            "         {name}: {committed} committed, {rolled_back} rolled back, {failed} failed; {:.1}% of the image bytes downloaded",
            100.0 * downloaded as f64 / total.max(1) as f64
        ));
        Ok(phase)
    }

    /// An operator action starts a new measurement for every reachable device.
    fn operator_action(&mut self) {
        self.cpu_mark = self.hub_cpu();
        let now = now_ms();
        for i in 0..self.t_ref.len() {
            if self.faults_on[i] == 0 {
                self.t_ref[i] = now;
            }
        }
    }

    /// Ends every fault: pending timed actions fire now, open partitions heal.
    async fn end_faults(&mut self) -> Result<()> {
        let mut pending = std::mem::take(&mut self.scheduled);
        pending.sort_by_key(|(t, _)| *t);
        for (_, a) in pending {
            self.fire(a).await?;
        }
        self.heal().await
    }

    /// Heals the partitions made without a duration.
    async fn heal(&mut self) -> Result<()> {
        let idx: Vec<usize> = std::mem::take(&mut self.open_partitions)
            .into_iter()
            .collect();
        self.fire(Timed::LinkUp(idx)).await
    }

    /// An operator's `set` or `unset` through the admin API, timed.
    async fn change_state(&mut self, step: &Step, body: &serde_json::Value) -> Result<()> {
        self.operator_action();
        let t = Instant::now();
        let _: serde_json::Value = self
            .api
            .post("/v1/state", body)
            .await
            .map_err(|e| e.error.context(step.describe()))?;
        self.actions.push(Action {
            what: step.describe(),
            ms: t.elapsed().as_millis() as u64,
        });
        Ok(())
    }

    /// A tick that reads the pools' queue depths and byte counts now, not on schedule.
    async fn tick_with_status(&mut self) -> Result<()> {
        self.last_status_at = None;
        self.tick().await
    }
}

/// Runs `scenario` with a real hub and real agents.
pub async fn run(scenario: &Scenario, opts: &RealOptions) -> Result<Report> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("finding the fleet-sim executable")?;
    let n = scenario.devices;
    let hub = HubProcess::start(
        &exe,
        HubSetup {
            dir: opts.root.join("hub"),
            listen: "127.0.0.1:0".parse()?,
            admin_listen: "127.0.0.1:0".parse()?,
        },
    )
    .await?;
    let api = Client::from_connect(&Connect {
        config: Some(opts.root.join("hub").join("cli.toml")),
        ..Default::default()
    })
    .map_err(|e| e.error)?;

    let bar = if opts.progress {
        ProgressBar::new(n as u64)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} converged · {wide_msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.enable_steady_tick(Duration::from_millis(200));

    let mut fleet = Fleet {
        exe: exe.clone(),
        scenario: scenario.clone(),
        opts_pool_size: opts.pool_size.max(1),
        hub,
        api,
        pools: Vec::new(),
        faults_on: vec![0; n],
        t_ref: vec![now_ms(); n],
        desired_before: vec![0; n],
        resync_after: vec![None; n],
        open_partitions: BTreeSet::new(),
        scheduled: Vec::new(),
        paths: BTreeMap::new(),
        devices: vec![None; n],
        last_status: StatusReply::default(),
        last_status_at: None,
        started,
        timeline_start: None,
        timeline: Vec::new(),
        faults: Faults::default(),
        problems: Vec::new(),
        bar,
        step_text: "enrolling".into(),
        rss_peak_mb: 0.0,
        cpu_mark: 0.0,
        actions: Vec::new(),
        os: None,
        assigned: vec![None; n],
    };
    let result = drive(&mut fleet, opts).await;
    fleet.bar.finish_and_clear();
    let report = result?;
    let _ = fleet.hub.kill().await;
    Ok(report)
}

async fn drive(fleet: &mut Fleet, opts: &RealOptions) -> Result<Report> {
    let n = fleet.scenario.devices;
    // Enrollment: one join token per label group.
    let mut tokens: Vec<(usize, String)> = Vec::with_capacity(n);
    for (labels, members) in fleet.scenario.label_groups() {
        #[derive(Deserialize)]
        struct Created {
            token: String,
        }
        let created: Created = fleet
            .api
            .post(
                "/v1/tokens",
                &json!({ "ttl_secs": 86_400, "uses": members.len(), "labels": labels }),
            )
            .await
            .map_err(|e| e.error.context("creating a join token"))?;
        tokens.extend(members.iter().map(|m| (*m, created.token.clone())));
    }
    tokens.sort_unstable();
    let os_image = match &fleet.scenario.upgrades {
        Some(u) => {
            let (o, image) =
                os::OsFleet::new(&opts.root.join("os"), u.image_kib, fleet.scenario.seed)?;
            fleet.os = Some(o);
            Some(image)
        }
        None => None,
    };
    let pool_size = fleet.opts_pool_size;
    for p in 0..tokens.len().div_ceil(pool_size) {
        let setup = PoolSetup {
            root: opts
                .agents_root
                .as_deref()
                .unwrap_or(&opts.root)
                .join(format!("pool-{p:03}")),
            hub: fleet.hub.quic,
            relay: !fleet.scenario.direct_links_suffice(),
            latency_us: fleet.scenario.network.latency.as_micros() as u64,
            jitter_us: fleet.scenario.network.jitter.as_micros() as u64,
            loss: fleet.scenario.network.loss,
            os_image: os_image.clone(),
        };
        fleet
            .pools
            .push(PoolProcess::start(&fleet.exe, &setup).await?);
    }
    // Pools start their agents in parallel, the whole fleet at about START_RATE per
    // second.
    const START_RATE: u64 = 1000;
    let spacing_us = 1_000_000 * fleet.pools.len() as u64 / START_RATE;
    for (chunk, pool) in tokens.chunks(pool_size).zip(fleet.pools.iter_mut()) {
        pool.send(&Command::Start {
            agents: chunk.to_vec(),
            spacing_us,
        })
        .await?;
    }
    for pool in &mut fleet.pools {
        pool.recv().await?;
    }
    let enroll_start = Instant::now();
    loop {
        fleet.tick().await?;
        let online = fleet
            .devices
            .iter()
            .flatten()
            .filter(|d| d.connected)
            .count();
        if online == n {
            break;
        }
        if enroll_start.elapsed() > opts.enroll_timeout {
            bail!(
                "only {online} of {n} agents enrolled and online after {}",
                humantime::format_duration(opts.enroll_timeout)
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let enroll_secs = enroll_start.elapsed().as_secs_f64();
    tracing::info!(devices = n, secs = enroll_secs, "fleet enrolled and online");

    // The timeline.
    let cpu_start = fleet.hub.usage().map_or(0.0, |u| u.cpu_secs) + fleet.hub.cpu_before;
    let timeline_start = Instant::now();
    fleet.timeline_start = Some(timeline_start);
    let bytes_start = (
        fleet.last_status.bytes_to_hub,
        fleet.last_status.bytes_from_hub,
    );
    let mut phases = Vec::new();
    let steps = fleet.scenario.steps.clone();
    for (i, step) in steps.iter().enumerate() {
        fleet.step_text = format!("step {}/{}: {}", i + 1, steps.len(), step.describe());
        fleet.bar.println(format!(
            "[{:>6.1}s] {}",
            timeline_start.elapsed().as_secs_f64(),
            fleet.step_text
        ));
        if let Some(p) = fleet.run_step(i, step).await? {
            phases.push(p);
        }
    }
    fleet.step_text = "all faults ended, final convergence".into();
    fleet.end_faults().await?;
    let last = fleet
        .converge("final (all faults ended)", Duration::from_secs(180), true)
        .await?;
    if last.devices > 0 {
        phases.push(last);
    }
    if fleet.os.is_some() && fleet.assigned.iter().any(Option::is_some) {
        // Boxes that were cut off or down finish their upgrades too.
        let os_last = fleet
            .converge_os("final OS (all faults ended)", Duration::from_secs(180))
            .await?;
        phases.push(os_last);
    }
    // Outboxes drain.
    let drain = Instant::now();
    fleet.tick_with_status().await?;
    while fleet.last_status.queued > 0 && drain.elapsed() < Duration::from_secs(120) {
        fleet.last_status_at = None;
        fleet.sleep(Duration::from_millis(500)).await?;
    }
    let simulated_secs = timeline_start.elapsed().as_secs_f64();
    let usage = fleet.hub.usage();
    let cpu_secs = usage.map_or(0.0, |u| u.cpu_secs) + fleet.hub.cpu_before - cpu_start;
    let rss_end = usage.map_or(0.0, |u| u.rss_mb);
    let rss_peak = fleet
        .rss_peak_mb
        .max(fleet.hub.rss_peak_mb)
        .max(usage.map_or(0.0, |u| u.rss_peak_mb));

    // Final audit: agents stop gracefully and show what they hold.
    fleet.tick_with_status().await?;
    let wire = Wire {
        counted: if fleet.scenario.direct_links_suffice() {
            "not counted: no link faults in this scenario, so agents talk to the hub directly"
        } else {
            "UDP payload through the relays (QUIC, TLS, retransmits and acks included)"
        }
        .into(),
        to_hub: fleet.last_status.bytes_to_hub - bytes_start.0,
        from_hub: fleet.last_status.bytes_from_hub - bytes_start.1,
        per_device: (fleet.last_status.bytes_to_hub + fleet.last_status.bytes_from_hub
            - bytes_start.0
            - bytes_start.1)
            / n.max(1) as u64,
    };
    let mut audits: Vec<AgentAudit> = Vec::with_capacity(n);
    for p in &mut fleet.pools {
        if let Reply::Audit { agents } = p.call(&Command::Finish).await? {
            audits.extend(agents);
        }
    }
    let events = all_events(&fleet.api).await?;

    let mut report = Report {
        scenario: fleet.scenario.name.clone(),
        mode: "real".into(),
        seed: fleet.scenario.seed,
        devices: n,
        wall_secs: fleet.started.elapsed().as_secs_f64(),
        simulated_secs,
        phases,
        wire,
        hub: Some(HubUsage {
            cpu_secs,
            cpu_percent: 100.0 * cpu_secs / simulated_secs.max(0.001),
            rss_peak_mb: rss_peak,
            rss_end_mb: rss_end,
        }),
        faults: fleet.faults.clone(),
        timeline: std::mem::take(&mut fleet.timeline),
        actions: std::mem::take(&mut fleet.actions),
        problems: std::mem::take(&mut fleet.problems),
        ..Default::default()
    };
    check(fleet, &audits, &events, &mut report);
    Ok(report)
}

async fn all_events(api: &Client) -> Result<Vec<EventRecord>> {
    let mut out: Vec<EventRecord> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e.id);
        let page: Vec<EventRecord> = api
            .get_query(
                "/v1/events",
                &[("after", after.to_string()), ("limit", "50000".into())],
            )
            .await
            .map_err(|e| e.error.context("listing events"))?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}

fn check(fleet: &Fleet, audits: &[AgentAudit], events: &[EventRecord], report: &mut Report) {
    let by_index: BTreeMap<usize, &AgentAudit> = audits.iter().map(|a| (a.index, a)).collect();
    let mut converged = 0;
    let mut signed = 0;
    let mut exact = 0;
    let mut ev = Events::default();
    let mut seen: BTreeSet<(&str, u64)> = BTreeSet::new();
    for e in events {
        if let Some(seq) = e.seq
            && !seen.insert((e.device.as_str(), seq))
        {
            ev.duplicated += 1;
        }
        if e.kind == "drift-corrected" {
            ev.drift_corrected += 1;
        }
        if e.kind == "hub.reports-lost" {
            report
                .problems
                .push(format!("{}: the hub recorded lost reports", e.device));
        }
    }
    let lost_declared = events
        .iter()
        .filter(|e| e.kind == "hub.reports-lost")
        .count() as u64;
    for i in 0..fleet.scenario.devices {
        let name = pool::hostname(i);
        let (Some(a), Some(d)) = (by_index.get(&i), fleet.devices[i].as_ref()) else {
            report
                .problems
                .push(format!("{name}: not enrolled at the hub or not audited"));
            continue;
        };
        if let Some(p) = &a.problem {
            report
                .problems
                .push(format!("{} ({name}): {p}", d.record.id));
        }
        ev.created += a.last_seq;
        ev.delivered += d.record.reports_acked.min(a.last_seq);
        ev.lost += a.last_seq.saturating_sub(d.record.reports_acked);
        if a.stored_revision == d.record.desired_revision
            && a.applied_revision == d.record.desired_revision
            && is_converged(d)
            && a.files_match
        {
            converged += 1;
        } else {
            report.problems.push(format!(
                "{}: desired revision {}, agent stored {} and applied {}{}",
                d.record.id,
                d.record.desired_revision,
                a.stored_revision,
                a.applied_revision,
                if a.files_match { "" } else { ", files differ" }
            ));
        }
        if a.outbox_depth == 0 && d.record.reports_acked == a.last_seq {
            exact += 1;
        } else {
            report.problems.push(format!(
                "{}: hub stored reports up to {}, agent numbered {} ({} still queued)",
                d.record.id, d.record.reports_acked, a.last_seq, a.outbox_depth
            ));
        }
        if a.signed {
            signed += 1;
        } else {
            report.problems.push(format!(
                "{}: stored state does not verify with the hub key",
                d.record.id
            ));
        }
    }
    ev.lost += lost_declared;
    report.events = ev;
    report.problems.truncate(300);
    let n = fleet.scenario.devices;
    for inv in &fleet.scenario.check {
        let r = match inv {
            Invariant::AllConverged => {
                InvariantResult::new(*inv, converged == n, format!("{converged} of {n} devices"))
            }
            Invariant::ReportsExactlyOnce => InvariantResult::new(
                *inv,
                exact == n && report.events.duplicated == 0 && lost_declared == 0,
                format!(
                    "{exact} of {n} devices; {} reports stored, {} duplicated",
                    report.events.delivered, report.events.duplicated
                ),
            ),
            Invariant::SignedStateOnly => {
                InvariantResult::new(*inv, signed == n, format!("{signed} of {n} devices"))
            }
            Invariant::AllAttested => {
                let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
                let mut trusted = 0;
                for d in fleet.devices.iter().flatten() {
                    *kinds
                        .entry(
                            d.record
                                .attestation
                                .clone()
                                .unwrap_or_else(|| "none".into()),
                        )
                        .or_default() += 1;
                    if d.record.attestation.is_some()
                        && d.record.attest_status.as_deref() == Some("trusted")
                    {
                        trusted += 1;
                    } else if report.problems.len() < 300 {
                        report.problems.push(format!(
                            "{} ({}): attestation {:?}, status {:?}: {}",
                            d.record.id,
                            d.record.hostname,
                            d.record.attestation,
                            d.record.attest_status,
                            d.record.quarantine.as_deref().unwrap_or("")
                        ));
                    }
                }
                let kinds: Vec<String> = kinds.iter().map(|(k, v)| format!("{v} {k}")).collect();
                InvariantResult::new(
                    *inv,
                    trusted == n,
                    format!("{trusted} of {n} devices trusted ({})", kinds.join(", ")),
                )
            }
            Invariant::OsCommittedOrRolledBack => {
                let Some(os) = &fleet.os else { continue };
                let mut ok = 0;
                let mut on: BTreeMap<String, usize> = BTreeMap::new();
                let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
                for a in audits {
                    let Some(o) = &a.os else { continue };
                    let expected = os.sha256(&o.committed);
                    let settled = o.job.as_ref().is_none_or(|(_, phase)| {
                        matches!(phase.as_str(), "committed" | "rolled-back" | "failed")
                    });
                    if expected.as_deref() == Some(o.booted_sha256.as_str()) && settled {
                        ok += 1;
                        *on.entry(o.committed.clone()).or_default() += 1;
                        if let Some((v, phase)) = &o.job {
                            *outcomes.entry(format!("{v} {phase}")).or_default() += 1;
                        }
                    } else if report.problems.len() < 300 {
                        report.problems.push(format!(
                            "{}: boots slot {} holding {}, committed {}, upgrade {:?}",
                            pool::hostname(a.index),
                            o.booted,
                            if os
                                .images
                                .keys()
                                .any(|v| os.sha256(v).as_deref() == Some(o.booted_sha256.as_str()))
                            {
                                "another release"
                            } else {
                                "an image that is no release"
                            },
                            o.committed,
                            o.job
                        ));
                    }
                }
                let on: Vec<String> = on.iter().map(|(v, c)| format!("{c} on {v}")).collect();
                let outcomes: Vec<String> =
                    outcomes.iter().map(|(v, c)| format!("{c} {v}")).collect();
                InvariantResult::new(
                    *inv,
                    ok == n,
                    format!(
                        "{ok} of {n} boxes boot the release they committed ({}; upgrades: {})",
                        on.join(", "),
                        outcomes.join(", ")
                    ),
                )
            }
        };
        report.invariants.push(r);
    }
}
