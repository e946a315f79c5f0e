//! The orchestrator's side of a real-mode run: the pool processes it commands, and the
//! [`Fleet`]: what it knows of every device, the faults in force, the timeline's steps
//! (operator actions through the admin API, faults through pools and the hub process)
//! and convergence waits.

use super::*;
use cairn_hub::api::{AddReleaseKey, AddedReleaseKey, FileSpec, OsSpec, StateChange};
use cairn_hub::cli;
use cairn_hub::store::AssignOutcome;

/// A pool process and its command channel.
pub(super) struct PoolProcess {
    pub(super) child: Child,
    pub(super) stdin: ChildStdin,
    pub(super) stdout: Lines<BufReader<ChildStdout>>,
}

impl PoolProcess {
    pub(super) async fn start(exe: &Path, setup: &PoolSetup) -> Result<Self> {
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

    pub(super) async fn call(&mut self, cmd: &Command) -> Result<Reply> {
        self.send(cmd).await?;
        self.recv().await
    }

    pub(super) async fn send(&mut self, cmd: &Command) -> Result<()> {
        let mut line = serde_json::to_string(cmd)?;
        line.push('\n');
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    pub(super) async fn recv(&mut self) -> Result<Reply> {
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
pub(super) enum Timed {
    LinkDown(Vec<usize>),
    LinkUp(Vec<usize>),
    Restart(Vec<usize>),
}

pub(super) struct Fleet {
    pub(super) exe: PathBuf,
    pub(super) scenario: Scenario,
    pub(super) opts_pool_size: usize,
    pub(super) hub: HubProcess,
    pub(super) api: Client,
    pub(super) pools: Vec<PoolProcess>,
    /// Active faults per device index (cut links, crashed agents); 0: reachable.
    pub(super) faults_on: Vec<u32>,
    /// Per device: when its current measurement starts (ms since the epoch).
    pub(super) t_ref: Vec<u64>,
    /// Desired revision per device at the previous `converge`.
    pub(super) desired_before: Vec<u64>,
    /// Devices that must have started a new session since this time (ms since the
    /// epoch; the hub or the agent restarted then) before they count as converged.
    pub(super) resync_after: Vec<Option<u64>>,
    /// Devices partitioned without a duration, healed by `heal`.
    pub(super) open_partitions: BTreeSet<usize>,
    pub(super) scheduled: Vec<(Instant, Timed)>,
    /// Latest path set for each resource name (for `drift`).
    pub(super) paths: BTreeMap<String, String>,
    pub(super) devices: Vec<Option<HubDevice>>,
    pub(super) last_status: StatusReply,
    pub(super) last_status_at: Option<Instant>,
    pub(super) started: Instant,
    pub(super) timeline_start: Option<Instant>,
    pub(super) timeline: Vec<Sample>,
    pub(super) faults: Faults,
    pub(super) problems: Vec<String>,
    pub(super) bar: ProgressBar,
    pub(super) step_text: String,
    pub(super) rss_peak_mb: f64,
    /// Hub CPU seconds when the last operator action or fault began.
    pub(super) cpu_mark: f64,
    pub(super) actions: Vec<Action>,
    /// Releases, images and the release key, with `[upgrades]`.
    pub(super) os: Option<os::OsFleet>,
    /// The OS version assigned to each device.
    pub(super) assigned: Vec<Option<String>>,
}

pub(super) fn now_ms() -> u64 {
    cairn_hub::endpoint::now_ms()
}

impl Fleet {
    pub(super) fn pool_of(&self, index: usize) -> usize {
        index / self.opts_pool_size
    }

    /// CPU seconds of every hub process of this run so far.
    pub(super) fn hub_cpu(&self) -> f64 {
        self.hub.usage().map_or(0.0, |u| u.cpu_secs) + self.hub.cpu_before
    }

    /// Device `i` is connected, holds and applied its newest revision, and started a new
    /// session since its restart if it had one.
    pub(super) fn done(&self, i: usize) -> bool {
        self.devices[i].as_ref().is_some_and(|d| {
            is_converged(d)
                && d.connected
                && self.resync_after[i].is_none_or(|t| d.record.online_since_ms.unwrap_or(0) >= t)
        })
    }

    /// Sends a command for `indices` to the pools holding them.
    pub(super) async fn for_pools(
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

    pub(super) fn fault_begins(&mut self, indices: &[usize]) {
        for &i in indices {
            self.faults_on[i] += 1;
        }
    }

    pub(super) fn fault_ends(&mut self, indices: &[usize]) {
        let now = now_ms();
        for &i in indices {
            self.faults_on[i] = self.faults_on[i].saturating_sub(1);
            if self.faults_on[i] == 0 {
                self.t_ref[i] = now;
            }
        }
    }

    pub(super) async fn fire(&mut self, t: Timed) -> Result<()> {
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

    pub(super) async fn fire_due(&mut self) -> Result<()> {
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
    pub(super) async fn tick(&mut self) -> Result<()> {
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
    pub(super) fn poll_interval(&self) -> Duration {
        Duration::from_millis(100 + 50 * (self.devices.len() as u64 / 1000))
    }

    /// Lets time pass, looking at the fleet every 2 s (due faults fire on time).
    pub(super) async fn sleep(&mut self, d: Duration) -> Result<()> {
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
    pub(super) async fn converge(
        &mut self,
        name: &str,
        timeout: Duration,
        all: bool,
    ) -> Result<Phase> {
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

    pub(super) async fn run_step(&mut self, n: usize, step: &Step) -> Result<Option<Phase>> {
        match step {
            Step::Set {
                selector,
                resource,
                path,
                content,
            } => {
                self.paths
                    .insert(resource.to_string(), path.as_str().to_string());
                let file = FileSpec {
                    path: path.as_str().to_string(),
                    content: Some(content.clone()),
                    content_base64: None,
                    mode: 0o644,
                    uid: None,
                    gid: None,
                };
                let body = cli::state_change(
                    None,
                    Some(selector.to_string()),
                    resource.as_str(),
                    Some(file),
                );
                self.change_state(step, &body).await?;
            }
            Step::Unset { selector, resource } => {
                let body =
                    cli::state_change(None, Some(selector.to_string()), resource.as_str(), None);
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
            Step::Tamper { devices, selector } => {
                let idx = self.scenario.pick(n, *devices, selector.as_ref());
                self.tamper(&idx).await?;
            }
            Step::Accept { selector } => self.accept(selector.as_ref()).await?,
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
                let mut body = cli::state_change(None, Some(selector.to_string()), "os", None);
                body.os = Some(OsSpec {
                    version: version.clone(),
                    allow_downgrade: false,
                    health_timeout_s: u32::try_from(health_timeout.as_secs()).unwrap_or(u32::MAX),
                    require_hub: true,
                    health_commands: health_cmd.iter().cloned().collect(),
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
    pub(super) async fn release(
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
            let _: AddedReleaseKey = self
                .api
                .post(
                    "/v1/release-keys",
                    &AddReleaseKey {
                        public_key: hex::encode(os.key.verifying_key().as_bytes()),
                        name: "fleet-sim".into(),
                    },
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
    pub(super) async fn converge_os(&mut self, name: &str, timeout: Duration) -> Result<Phase> {
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
    /// The boxes `idx` reboot into an image they were not enrolled with.
    pub(super) async fn tamper(&mut self, idx: &[usize]) -> Result<()> {
        self.faults.tampered += idx.len() as u64;
        self.fault_begins(idx);
        self.for_pools(idx, |indices| Command::Tamper { indices })
            .await?;
        self.fault_ends(idx);
        Ok(())
    }

    /// The operator accepts the measurements of every quarantined device (matching
    /// `selector`) through the admin API, as `cairn-hub device accept` does.
    pub(super) async fn accept(
        &mut self,
        selector: Option<&crate::scenario::SelectorText>,
    ) -> Result<()> {
        self.tick().await?;
        let ids: Vec<String> = self
            .devices
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.as_ref().map(|d| (i, d)))
            .filter(|(i, _)| selector.is_none_or(|s| s.0.matches(&self.scenario.labels_of(*i))))
            .filter(|(_, d)| d.record.quarantined())
            .map(|(_, d)| d.record.id.to_string())
            .collect();
        self.operator_action();
        for id in ids {
            let _: cairn_hub::store::AttestRecord = self
                .api
                .post(
                    &format!("/v1/devices/{id}/attestation/accept"),
                    &cairn_hub::api::AcceptRequest { verified_ms: None },
                )
                .await
                .map_err(|e| {
                    e.error
                        .context(format!("accepting the measurements of {id}"))
                })?;
        }
        Ok(())
    }

    pub(super) fn operator_action(&mut self) {
        self.cpu_mark = self.hub_cpu();
        let now = now_ms();
        for i in 0..self.t_ref.len() {
            if self.faults_on[i] == 0 {
                self.t_ref[i] = now;
            }
        }
    }

    /// Ends every fault: pending timed actions fire now, open partitions heal.
    pub(super) async fn end_faults(&mut self) -> Result<()> {
        let mut pending = std::mem::take(&mut self.scheduled);
        pending.sort_by_key(|(t, _)| *t);
        for (_, a) in pending {
            self.fire(a).await?;
        }
        self.heal().await
    }

    /// Heals the partitions made without a duration.
    pub(super) async fn heal(&mut self) -> Result<()> {
        let idx: Vec<usize> = std::mem::take(&mut self.open_partitions)
            .into_iter()
            .collect();
        self.fire(Timed::LinkUp(idx)).await
    }

    /// An operator's `set` or `unset` through the admin API, timed.
    pub(super) async fn change_state(&mut self, step: &Step, body: &StateChange) -> Result<()> {
        self.operator_action();
        let t = Instant::now();
        let _: AssignOutcome = self
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
    pub(super) async fn tick_with_status(&mut self) -> Result<()> {
        self.last_status_at = None;
        self.tick().await
    }
}
