//! A hub as a child process: started, ready once it has written `endpoints.json`,
//! SIGKILLed, and started again on the same QUIC port and data directory. The one
//! harness the end-to-end tests, the hardware tests and the fleet simulation start their
//! hubs with; each says only how its hub is launched (the `cairn-hub serve` command
//! line, or the simulator's own executable running the hub library).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use crate::server::Endpoints;

/// Makes the command that starts the hub. Given the endpoints of the previous run
/// (`None` at the first start), so that a restart can ask for the same ports.
pub type Launch = Box<dyn FnMut(Option<&Endpoints>) -> Command + Send + Sync>;

/// Why a hub did not come up.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("starting the hub ({command}): {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("the hub exited at start ({0}); its log says why")]
    Exited(ExitStatus),
    #[error("the hub did not write {} within {waited:?}", file.display())]
    Timeout { file: PathBuf, waited: Duration },
}

/// A hub process, SIGKILLed when dropped.
pub struct HubProcess {
    dir: PathBuf,
    launch: Launch,
    timeout: Duration,
    child: Option<Child>,
    /// What the running (or last) hub wrote to `endpoints.json`.
    pub endpoints: Endpoints,
}

impl HubProcess {
    /// Starts the hub `launch` makes, whose data directory is `dir`, and waits until it
    /// wrote its endpoints (at most `timeout`).
    pub fn start(dir: &Path, launch: Launch, timeout: Duration) -> Result<Self, StartError> {
        let mut hub = Self {
            dir: dir.to_path_buf(),
            launch,
            timeout,
            child: None,
            endpoints: Endpoints {
                quic: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                admin_url: String::new(),
                ca_fingerprint: String::new(),
            },
        };
        hub.spawn(None)?;
        Ok(hub)
    }

    fn spawn(&mut self, previous: Option<Endpoints>) -> Result<(), StartError> {
        let file = self.dir.join("endpoints.json");
        let _ = std::fs::remove_file(&file);
        let _ = std::fs::create_dir_all(&self.dir);
        let mut cmd = (self.launch)(previous.as_ref());
        let child = cmd.spawn().map_err(|source| StartError::Spawn {
            command: format!("{cmd:?}"),
            source,
        })?;
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(status) = self.exited() {
                return Err(StartError::Exited(status));
            }
            if let Ok(text) = std::fs::read_to_string(&file)
                && let Ok(e) = serde_json::from_str::<Endpoints>(&text)
            {
                self.endpoints = e;
                return Ok(());
            }
            if start.elapsed() > self.timeout {
                self.kill();
                return Err(StartError::Timeout {
                    file,
                    waited: self.timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id of the running hub.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status, if the hub has exited (it is reaped then).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.as_mut()?.try_wait().ok().flatten()?;
        self.child = None;
        Some(status)
    }

    /// SIGKILL, no goodbye; returns once the process is reaped.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the hub again, asking for the ports it had; a hub still running is
    /// SIGKILLed first.
    pub fn start_again(&mut self) -> Result<(), StartError> {
        self.kill();
        self.spawn(Some(self.endpoints.clone()))
    }
}

impl Drop for HubProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The QUIC port of `previous`, or 0 (any) at a first start.
pub fn same_port(previous: Option<&Endpoints>) -> u16 {
    previous.map_or(0, |e| e.quic.port())
}

/// The last `lines` lines of a log file (empty if there is none), for failure messages.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let s = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
