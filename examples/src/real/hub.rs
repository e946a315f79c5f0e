//! The hub of a real-mode run, as a child process of the simulation: the hub library
//! exactly as `cairn-hub serve` runs it, in its own process so that its CPU time and
//! memory can be measured apart from the agents', and so that a hub crash is a real
//! SIGKILL.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};
use tokio::process::{Child, Command};

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

#[derive(Debug, Deserialize)]
struct EndpointsFile {
    quic: SocketAddr,
    admin_url: String,
}

/// The hub child as the orchestrator sees it.
pub struct HubProcess {
    pub setup: HubSetup,
    pub child: Child,
    pub quic: SocketAddr,
    pub admin_url: String,
    /// CPU seconds of hub processes that already ended (restarts).
    pub cpu_before: f64,
    pub rss_peak_mb: f64,
}

impl HubProcess {
    /// Starts the hub child and waits until it has written its endpoints.
    pub async fn start(exe: &Path, setup: HubSetup) -> Result<Self> {
        let endpoints = setup.dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        std::fs::create_dir_all(&setup.dir)?;
        let child = Command::new(exe)
            .arg("__hub")
            .arg(serde_json::to_string(&setup)?)
            .stdin(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting the hub process")?;
        let mut hub = Self {
            setup,
            child,
            quic: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_url: String::new(),
            cpu_before: 0.0,
            rss_peak_mb: 0.0,
        };
        hub.wait_ready(&endpoints).await?;
        Ok(hub)
    }

    async fn wait_ready(&mut self, endpoints: &Path) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("the hub process exited at start ({status}); run with RUST_LOG=info");
            }
            if let Ok(text) = std::fs::read_to_string(endpoints)
                && let Ok(e) = serde_json::from_str::<EndpointsFile>(&text)
            {
                self.quic = e.quic;
                self.admin_url = e.admin_url;
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the hub did not come up within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the hub, keeping its CPU time for the report.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(u) = self.usage() {
            self.cpu_before += u.cpu_secs;
            self.rss_peak_mb = self.rss_peak_mb.max(u.rss_peak_mb);
        }
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// Starts it again on the same ports and data directory.
    pub async fn restart(&mut self, exe: &Path) -> Result<()> {
        let mut setup = self.setup.clone();
        setup.listen = self.quic;
        setup.admin_listen = admin_addr(&self.admin_url).unwrap_or(setup.admin_listen);
        let cpu_before = self.cpu_before;
        let rss_peak = self.rss_peak_mb;
        *self = Self::start(exe, setup).await?;
        self.cpu_before = cpu_before;
        self.rss_peak_mb = rss_peak;
        Ok(())
    }

    /// CPU seconds and memory of the running hub process.
    pub fn usage(&self) -> Option<ProcUsage> {
        proc_usage(self.child.id()?)
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
