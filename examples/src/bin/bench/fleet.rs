//! The `fleet` and `det` sections, both run by `fleet-sim`: the hub with 1k/5k/10k real
//! agents (RSS, CPU, one change to all, reconnect storm), and the deterministic
//! simulator's throughput at 100,000 devices.

use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use cairn_examples::report::Report;

use crate::{Row, row};

/// Runs `fleet-sim` (next to this binary) on a scenario and returns its report.
fn fleet_sim(args: &[&str], scenario: &str, dir: &Path) -> Result<Report> {
    let exe = std::env::current_exe()?
        .parent()
        .map(|d| d.join("fleet-sim"))
        .context("no exe dir")?;
    if !exe.exists() {
        bail!(
            "{} missing: cargo build --release -p cairn-examples",
            exe.display()
        );
    }
    let path = dir.join("scenario.toml");
    std::fs::write(&path, scenario)?;
    let out = std::process::Command::new(&exe)
        .arg("--scenario")
        .arg(&path)
        .args(["--json", "--no-progress"])
        .args(args)
        .output()
        .context("running fleet-sim")?;
    if !out.status.success() && out.status.code() != Some(1) {
        bail!(
            "fleet-sim {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: Report = serde_json::from_slice(&out.stdout).context("fleet-sim's report")?;
    if !report.passed() {
        bail!(
            "fleet-sim {args:?}: invariants failed, figures not usable:\n{}",
            report.render()
        );
    }
    Ok(report)
}

/// Hub RSS and CPU with N connected real agents, one change to all, reconnect storm.
pub(crate) fn fleet(sizes: &[usize], dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let scenario = include_str!("../../../scenarios/bench.toml");
    for &n in sizes {
        eprintln!("bench: fleet of {n} real agents…");
        let started = Instant::now();
        // Agents' data on a tmpfs when there is one: on a real fleet each agent fsyncs
        // its own disk; here 10,000 would queue on one. The hub's database stays on disk.
        let shm = Path::new("/dev/shm");
        let mut fs_args = vec!["--devices".to_string(), n.to_string()];
        if shm.is_dir() {
            fs_args.extend(["--agents-dir".to_string(), shm.display().to_string()]);
        }
        let refs: Vec<&str> = fs_args.iter().map(String::as_str).collect();
        let r = fleet_sim(&refs, scenario, dir)?;
        let hub = r.hub.clone().unwrap_or_default();
        // Idle: the first step sleeps 20 s with every agent connected.
        let idle: Vec<_> = r
            .timeline
            .iter()
            .filter(|s| s.t_ms <= 20_000 && s.hub_cpu_secs.is_some())
            .collect();
        let (cpu_idle, rss_idle) = match (idle.first(), idle.last()) {
            (Some(a), Some(b)) if b.t_ms > a.t_ms => (
                100.0 * (b.hub_cpu_secs.unwrap_or(0.0) - a.hub_cpu_secs.unwrap_or(0.0))
                    / ((b.t_ms - a.t_ms) as f64 / 1000.0),
                b.hub_rss_mb.unwrap_or(0.0),
            ),
            _ => (0.0, 0.0),
        };
        let change = r.phases.first().cloned().unwrap_or_default();
        let storm = r.phases.get(1).cloned().unwrap_or_default();
        rows.push(row(
            &format!("hub with {n} connected agents, idle: RSS / CPU"),
            format!("{rss_idle:.0} MB / {cpu_idle:.1}% of a core"),
            if n == 10_000 { "< 350 MB" } else { "—" },
            format!(
                "peak RSS over the run {:.0} MB; quinn alone ~28 KB per connection here (MACHINE.md): {:.0} MB",
                hub.rss_peak_mb,
                n as f64 * 28.0 / 1024.0
            ),
        ));
        rows.push(row(
            &format!("one desired-state change applied by {n} agents: p50 / p99 / max"),
            format!(
                "{} / {} / {} ms",
                change.p50_ms, change.p99_ms, change.max_ms
            ),
            if n == 10_000 { "< 2 s" } else { "—" },
            format!(
                "the hub: admin API call {} ms (signs and stores {n} revisions), {:.1} CPU-s until all applied; bare quinn broadcast + ack to 10k: ~0.4 s (MACHINE.md)",
                r.actions.first().map_or(0, |a| a.ms),
                change.hub_cpu_secs.unwrap_or(0.0)
            ),
        ));
        rows.push(row(
            &format!(
                "reconnect storm: {n} agents after a hub SIGKILL + restart, until all resynced"
            ),
            format!(
                "{:.1} s (p50 {:.1} s)",
                storm.max_ms as f64 / 1000.0,
                storm.p50_ms as f64 / 1000.0
            ),
            if n == 10_000 { "< 30 s" } else { "—" },
            format!(
                "hub CPU {:.1} s for the storm; whole run {:.0} s incl. enrollment",
                storm.hub_cpu_secs.unwrap_or(0.0),
                started.elapsed().as_secs_f64()
            ),
        ));
    }
    Ok(())
}

/// Deterministic simulator throughput at 100,000 devices.
pub(crate) fn det(dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let scenario = include_str!("../../../scenarios/100k.toml");
    eprintln!("bench: deterministic simulator, 100,000 devices…");
    let r = fleet_sim(&["--deterministic"], scenario, dir)?;
    rows.push(row(
        "deterministic simulator: 100,000 devices, scenario 100k",
        format!(
            "{:.0} device-s per wall-s ({:.1} s simulated in {:.1} s)",
            r.devices as f64 * r.simulated_secs / r.wall_secs.max(0.001),
            r.simulated_secs,
            r.wall_secs
        ),
        "100,000 devices on 2 cores",
        format!(
            "real time: {} device-s per wall-s; {} reports delivered, {} sessions",
            r.devices, r.events.delivered, r.faults.sessions
        ),
    ));
    Ok(())
}
