//! The hub of a real-mode run, as a child process of the simulation: the hub library
//! exactly as `cairn-hub serve` runs it, in its own process so that its CPU time and
//! memory can be measured apart from the agents', and so that a hub crash is a real
//! SIGKILL.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_hub::process as harness;
use cairn_hub::server::Endpoints;
use serde::{Deserialize, Serialize};

/// Passed to the hub child as one JSON argument.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HubSetup {
    pub dir: PathBuf,
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
}

/// The child's main: serve until killed, or until the orchestrator goes away (its end
/// of our stdin closes), so that no hub outlives an interrupted run.
pub async fn main(setup: HubSetup) -> Result<()> {
    let mut cfg = cairn_hub::server::HubConfig::new(&setup.dir);
    cfg.listen = setup.listen;
    cfg.admin_listen = setup.admin_listen;
    let hub = cairn_hub::server::start(cfg).await?;
    let mut sink = Vec::new();
    let _ = tokio::io::AsyncReadExt::read_to_end(&mut tokio::io::stdin(), &mut sink).await;
    hub.shutdown().await;
    Ok(())
}

/// The hub child as the orchestrator sees it: the shared hub-process harness
/// (`cairn_hub::process`), launched as this executable's `__hub` subcommand, plus the
/// CPU and memory accounting the report needs.
pub struct HubProcess {
    pub setup: HubSetup,
    /// `None` only while a blocking start runs on the blocking pool.
    proc: Option<harness::HubProcess>,
    pub quic: SocketAddr,
    pub admin_url: String,
    /// CPU seconds of hub processes that already ended (restarts).
    pub cpu_before: f64,
    pub rss_peak_mb: f64,
}

/// The command line of the hub child; a restart asks for the ports it had.
fn launch(exe: PathBuf, setup: HubSetup) -> harness::Launch {
    Box::new(move |prev: Option<&Endpoints>| {
        let mut s = setup.clone();
        if let Some(p) = prev {
            s.listen = p.quic;
            s.admin_listen = admin_addr(&p.admin_url).unwrap_or(s.admin_listen);
        }
        let mut c = std::process::Command::new(&exe);
        // Our end of its stdin stays open while the harness holds the child: the hub
        // ends when the orchestrator goes away.
        c.arg("__hub")
            .arg(serde_json::to_string(&s).unwrap_or_default())
            .stdin(Stdio::piped());
        c
    })
}

impl HubProcess {
    /// Starts the hub child and waits until it has written its endpoints.
    pub async fn start(exe: &Path, setup: HubSetup) -> Result<Self> {
        let (dir, launch) = (setup.dir.clone(), launch(exe.to_path_buf(), setup.clone()));
        let proc = tokio::task::spawn_blocking(move || {
            harness::HubProcess::start(&dir, launch, Duration::from_secs(60))
        })
        .await?
        .context("the hub process (run with RUST_LOG=info)")?;
        Ok(Self {
            setup,
            quic: proc.endpoints.quic,
            admin_url: proc.endpoints.admin_url.clone(),
            proc: Some(proc),
            cpu_before: 0.0,
            rss_peak_mb: 0.0,
        })
    }

    /// SIGKILLs the hub, keeping its CPU time for the report.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(u) = self.usage() {
            self.cpu_before += u.cpu_secs;
            self.rss_peak_mb = self.rss_peak_mb.max(u.rss_peak_mb);
        }
        if let Some(p) = self.proc.as_mut() {
            p.kill();
        }
        Ok(())
    }

    /// Starts it again on the same ports and data directory.
    pub async fn restart(&mut self, _exe: &Path) -> Result<()> {
        let mut proc = self
            .proc
            .take()
            .context("the hub process is being started already")?;
        let (proc, started) = tokio::task::spawn_blocking(move || {
            let r = proc.start_again();
            (proc, r)
        })
        .await?;
        self.quic = proc.endpoints.quic;
        self.admin_url = proc.endpoints.admin_url.clone();
        self.proc = Some(proc);
        started.context("restarting the hub process (run with RUST_LOG=info)")
    }

    /// CPU seconds and memory of the running hub process.
    pub fn usage(&self) -> Option<ProcUsage> {
        proc_usage(self.proc.as_ref()?.pid()?)
    }
}

fn admin_addr(url: &str) -> Option<SocketAddr> {
    url.strip_prefix("https://")?
        .trim_end_matches('/')
        .parse()
        .ok()
}

#[derive(Debug, Clone, Copy)]
pub struct ProcUsage {
    pub cpu_secs: f64,
    pub rss_mb: f64,
    pub rss_peak_mb: f64,
}

/// Reads `/proc/PID/stat` (user + system clock ticks, at Linux's fixed 100 Hz
/// `USER_HZ`) and `/proc/PID/status` (VmRSS, VmHWM).
pub fn proc_usage(pid: u32) -> Option<ProcUsage> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> f64 {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    Some(ProcUsage {
        cpu_secs: (utime + stime) / 100.0,
        rss_mb: kb("VmRSS:") / 1024.0,
        rss_peak_mb: kb("VmHWM:") / 1024.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_usage() {
        let u = proc_usage(std::process::id()).unwrap();
        assert!(u.rss_mb > 0.0 && u.rss_peak_mb >= u.rss_mb);
        assert!(u.cpu_secs >= 0.0);
        assert_eq!(
            admin_addr("https://127.0.0.1:7443"),
            Some(SocketAddr::from(([127, 0, 0, 1], 7443)))
        );
    }
}
