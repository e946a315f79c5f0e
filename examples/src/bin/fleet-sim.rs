//! Fleet simulation: a real hub and N real agents in one process, QUIC over loopback,
//! each agent with its own SQLite file and files root, through a scripted scenario with
//! link faults. Prints what happened and checks the invariants; exits non-zero if one
//! fails.
//!
//! Scenario (the fleet-simulation issue turns this into scenario files):
//! 1. all agents enroll with one join token and come online;
//! 2. the operator sets a file for `site=paris` and another for every device;
//! 3. a fifth of the agents go offline, the operator changes state, they come back;
//! 4. the hub restarts (same data directory and port) and every agent resyncs.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_agent::AgentConfig;
use cairn_examples::{AgentTask, create_token, file, loopback_hub_config, selector, set, stop_all};
use cairn_hub::server::{self, RunningHub};
use clap::Parser;
use serde::Serialize;

/// Run a real hub and a fleet of real agents on this machine.
#[derive(Parser)]
#[command(
    name = "fleet-sim",
    after_help = "Logs: RUST_LOG=info shows every agent's and the hub's log lines (default: warn)."
)]
struct Args {
    /// Number of agents.
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// Fraction of agents taken offline in the partition phase.
    #[arg(long, default_value_t = 0.2)]
    partition: f64,
    /// Keep the hub's and agents' data here instead of a temporary directory.
    #[arg(long)]
    keep: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Give up on a phase after this long.
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Serialize, Default)]
struct Phase {
    name: String,
    /// Devices that had to converge in this phase.
    devices: usize,
    converged: usize,
    p50_ms: u64,
    p99_ms: u64,
    max_ms: u64,
}

#[derive(Serialize, Default)]
struct Report {
    devices: usize,
    phases: Vec<Phase>,
    events_stored: usize,
    invariants: BTreeMap<String, bool>,
    problems: Vec<String>,
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Waits until every device in `ids` has applied its newest desired revision; returns
/// per-device times since `start`.
async fn converge(
    hub: &RunningHub,
    ids: &[String],
    start: Instant,
    timeout: Duration,
) -> Result<Vec<u64>> {
    let mut done: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        for d in hub.store.devices().await? {
            let id = d.id.to_string();
            if ids.contains(&id)
                && !done.contains_key(&id)
                && d.desired_revision > 0
                && d.applied_revision == d.desired_revision
                && d.stored_revision == d.desired_revision
            {
                done.insert(id, start.elapsed().as_millis() as u64);
            }
        }
        if done.len() == ids.len() {
            let mut v: Vec<u64> = done.into_values().collect();
            v.sort_unstable();
            return Ok(v);
        }
        if start.elapsed() > timeout {
            bail!(
                "{} of {} devices converged within {timeout:?}",
                done.len(),
                ids.len()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn phase(name: &str, devices: usize, times: &[u64]) -> Phase {
    Phase {
        name: name.into(),
        devices,
        converged: times.len(),
        p50_ms: percentile(times, 0.5),
        p99_ms: percentile(times, 0.99),
        max_ms: times.last().copied().unwrap_or(0),
    }
}

async fn wait_online(hub: &RunningHub, n: usize, timeout: Duration) -> Result<()> {
    let start = Instant::now();
    while hub.registry.online_count() < n {
        if start.elapsed() > timeout {
            bail!(
                "only {} of {n} agents online after {timeout:?}",
                hub.registry.online_count()
            );
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(())
}

async fn simulate(args: &Args, root: &Path) -> Result<Report> {
    let mut hub_cfg = loopback_hub_config(&root.join("hub"))?;
    let mut hub = server::start(hub_cfg.clone()).await?;
    hub_cfg.listen = hub.endpoints.quic;
    let mut report = Report {
        devices: args.devices,
        ..Default::default()
    };

    // 1. Enrollment: even agents join with a site=paris token, odd ones with site=rome.
    let paris = create_token(&hub, args.devices as u32, "site=paris").await?;
    let rome = create_token(&hub, args.devices as u32, "site=rome").await?;
    let mut agents = Vec::new();
    for i in 0..args.devices {
        let dir = root.join(format!("agent-{i:05}"));
        let mut cfg = AgentConfig::new(hub.endpoints.quic.to_string(), &dir);
        cfg.hostname = format!("box-{i:05}");
        cfg.join_token = Some(if i % 2 == 0 {
            paris.clone()
        } else {
            rome.clone()
        });
        cfg.reconcile_interval = Duration::from_secs(5);
        cfg.backoff_min = Duration::from_millis(200);
        cfg.backoff_max = Duration::from_secs(2);
        cfg.keep_alive = Duration::from_secs(2);
        agents.push(AgentTask::new(cfg));
    }
    let t0 = Instant::now();
    for a in &mut agents {
        a.start();
    }
    wait_online(&hub, args.devices, args.timeout).await?;
    eprintln!(
        "fleet-sim: {} agents enrolled and online in {:.1}s",
        args.devices,
        t0.elapsed().as_secs_f64()
    );
    let ids: Vec<String> = hub
        .store
        .devices()
        .await?
        .into_iter()
        .map(|d| d.id.to_string())
        .collect();

    // 2. Desired state by selector and for everyone.
    let t1 = Instant::now();
    set(
        &hub,
        selector("site=paris")?,
        "motd",
        file("etc/motd", "bonjour\n")?,
    )
    .await?;
    set(
        &hub,
        selector("site")?,
        "ntp",
        file("etc/ntp.conf", "server 10.0.0.1\n")?,
    )
    .await?;
    let times = converge(&hub, &ids, t1, args.timeout).await?;
    eprintln!(
        "fleet-sim: state set by selector: all converged, max {} ms",
        times.last().unwrap_or(&0)
    );
    report
        .phases
        .push(phase("set-by-selector", ids.len(), &times));

    // 3. A partition: some agents go away, state changes, they come back.
    let cut = ((args.devices as f64) * args.partition).round() as usize;
    stop_all(agents.iter_mut().take(cut)).await;
    set(
        &hub,
        selector("site")?,
        "ntp",
        file("etc/ntp.conf", "server 10.0.0.2\n")?,
    )
    .await?;
    let t2 = Instant::now();
    for a in agents.iter_mut().take(cut) {
        a.start();
    }
    let times = converge(&hub, &ids, t2, args.timeout).await?;
    eprintln!(
        "fleet-sim: {cut} agents partitioned and back: all converged, max {} ms",
        times.last().unwrap_or(&0)
    );
    report
        .phases
        .push(phase("partition-heal", ids.len(), &times));

    // 4. Hub restart.
    hub.shutdown().await;
    let t3 = Instant::now();
    hub = server::start(hub_cfg.clone()).await?;
    wait_online(&hub, args.devices, args.timeout).await?;
    set(
        &hub,
        selector("site=rome")?,
        "motd",
        file("etc/motd", "ciao\n")?,
    )
    .await?;
    let times = converge(&hub, &ids, t3, args.timeout).await?;
    eprintln!(
        "fleet-sim: hub restarted: all back and converged, max {} ms",
        times.last().unwrap_or(&0)
    );
    report.phases.push(phase("hub-restart", ids.len(), &times));

    // Let outboxes drain, then stop everyone and check the invariants.
    let drain = Instant::now();
    loop {
        let mut pending = 0;
        for a in &agents {
            let st = cairn_agent::status(&a.cfg.data_dir)?;
            if st.outbox_depth > 0 {
                pending += 1;
            }
        }
        if pending == 0 || drain.elapsed() > args.timeout {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_all(agents.iter_mut()).await;
    check(&hub, &agents, &mut report).await?;
    hub.shutdown().await;
    Ok(report)
}

async fn check(hub: &RunningHub, agents: &[AgentTask], report: &mut Report) -> Result<()> {
    let devices = hub.store.devices().await?;
    let by_host: BTreeMap<String, _> = devices.iter().map(|d| (d.hostname.clone(), d)).collect();
    let mut all_converged = true;
    let mut none_lost = true;
    let mut files_match = true;
    for a in agents {
        let st = cairn_agent::status(&a.cfg.data_dir)?;
        let Some(d) = by_host.get(&a.cfg.hostname) else {
            report
                .problems
                .push(format!("{} never enrolled", a.cfg.hostname));
            all_converged = false;
            continue;
        };
        if st.applied_revision != d.desired_revision || d.applied_revision != d.desired_revision {
            all_converged = false;
            report.problems.push(format!(
                "{}: applied {} of desired {}",
                d.id, st.applied_revision, d.desired_revision
            ));
        }
        if st.outbox_depth != 0 || d.reports_acked != st.last_seq {
            none_lost = false;
            report.problems.push(format!(
                "{}: hub stored reports up to {}, agent numbered {} ({} queued)",
                d.id, d.reports_acked, st.last_seq, st.outbox_depth
            ));
        }
        let want = if d.labels.values().any(|v| v.as_str() == "paris") {
            "bonjour\n"
        } else {
            "ciao\n"
        };
        let motd = std::fs::read_to_string(a.cfg.files_root.join("etc/motd")).unwrap_or_default();
        let ntp =
            std::fs::read_to_string(a.cfg.files_root.join("etc/ntp.conf")).unwrap_or_default();
        if motd != want || ntp != "server 10.0.0.2\n" {
            files_match = false;
            report
                .problems
                .push(format!("{}: files differ from desired state", d.id));
        }
    }
    let events = hub
        .store
        .events(cairn_hub::store::EventFilter {
            limit: 1_000_000,
            ..Default::default()
        })
        .await?;
    let mut seen = std::collections::BTreeSet::new();
    let mut none_doubled = true;
    for e in &events {
        if let Some(seq) = e.seq
            && !seen.insert((e.device.to_string(), seq))
        {
            none_doubled = false;
        }
    }
    report.events_stored = events.len();
    report
        .invariants
        .insert("every device converged".into(), all_converged);
    report.invariants.insert("no report lost".into(), none_lost);
    report
        .invariants
        .insert("no report doubled".into(), none_doubled);
    report
        .invariants
        .insert("files match the signed state".into(), files_match);
    Ok(())
}

fn print(report: &Report) {
    println!(
        "fleet simulation: {} devices (real hub, real agents, QUIC on loopback)",
        report.devices
    );
    println!(
        "{:<18} {:>8} {:>10} {:>8} {:>8} {:>8}",
        "phase", "devices", "converged", "p50 ms", "p99 ms", "max ms"
    );
    for p in &report.phases {
        println!(
            "{:<18} {:>8} {:>10} {:>8} {:>8} {:>8}",
            p.name, p.devices, p.converged, p.p50_ms, p.p99_ms, p.max_ms
        );
    }
    println!("events stored at the hub: {}", report.events_stored);
    println!("invariants:");
    for (name, ok) in &report.invariants {
        println!("  [{}] {name}", if *ok { "ok" } else { "FAILED" });
    }
    for p in &report.problems {
        println!("  problem: {p}");
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    // Agents write their SQLite files with fsync on the runtime's threads; more threads
    // let those waits overlap (each real agent has its own process).
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(32)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(async {
        let tmp;
        let root = match &args.keep {
            Some(p) => {
                std::fs::create_dir_all(p).context("creating --keep directory")?;
                p.clone()
            }
            None => {
                tmp = tempfile::tempdir()?;
                tmp.path().to_path_buf()
            }
        };
        simulate(&args, &root).await
    });
    match result {
        Ok(report) => {
            if args.json {
                match serde_json::to_string_pretty(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("error: {e}"),
                }
            } else {
                print(&report);
            }
            if report.invariants.values().all(|ok| *ok) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("fleet-sim failed: {e:#}");
            ExitCode::from(1)
        }
    }
}
