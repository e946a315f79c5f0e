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

mod check;
mod fleet;
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
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command as Process};

use self::check::{all_events, check};
use self::fleet::{Fleet, PoolProcess, now_ms};
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
    enroll(fleet, opts).await?;

    let cpu_start = fleet.hub.usage().map_or(0.0, |u| u.cpu_secs) + fleet.hub.cpu_before;
    let timeline_start = Instant::now();
    fleet.timeline_start = Some(timeline_start);
    let bytes_start = (
        fleet.last_status.bytes_to_hub,
        fleet.last_status.bytes_from_hub,
    );
    let phases = play(fleet, timeline_start).await?;
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
    let wire = wire(fleet, bytes_start);
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

/// Enrolls the fleet: one join token per label group, the pools started, every agent
/// enrolled and online (within the enrollment timeout).
async fn enroll(fleet: &mut Fleet, opts: &RealOptions) -> Result<()> {
    let n = fleet.scenario.devices;
    if let Some(p) = &fleet.scenario.attest_policy {
        let _: cairn_hub::attest::AttestPolicy = fleet
            .api
            .put("/v1/attestation/policies", p)
            .await
            .map_err(|e| e.error.context("setting the scenario's attestation policy"))?;
    }
    // Enrollment: one join token per label group.
    let mut tokens: Vec<(usize, String)> = Vec::with_capacity(n);
    for (labels, members) in fleet.scenario.label_groups() {
        let created: cairn_hub::api::CreatedToken = fleet
            .api
            .post(
                "/v1/tokens",
                &cairn_hub::api::CreateToken {
                    ttl_secs: 86_400,
                    uses: u32::try_from(members.len())?,
                    labels,
                },
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
            attest: fleet.scenario.attest,
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
    Ok(())
}

/// Plays the scenario's steps, then ends every fault and waits for the final
/// convergence (desired state, then OS releases) and for the outboxes to drain.
async fn play(fleet: &mut Fleet, timeline_start: Instant) -> Result<Vec<Phase>> {
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
    Ok(phases)
}

/// Bytes on the wire since `start` (to the hub, from the hub), as the relays counted.
fn wire(fleet: &Fleet, start: (u64, u64)) -> Wire {
    let n = fleet.scenario.devices;
    let s = &fleet.last_status;
    Wire {
        counted: if fleet.scenario.direct_links_suffice() {
            "not counted: no link faults in this scenario, so agents talk to the hub directly"
        } else {
            "UDP payload through the relays (QUIC, TLS, retransmits and acks included)"
        }
        .into(),
        to_hub: s.bytes_to_hub - start.0,
        from_hub: s.bytes_from_hub - start.1,
        per_device: (s.bytes_to_hub + s.bytes_from_hub - start.0 - start.1) / n.max(1) as u64,
    }
}
