//! Console capture: a thread that appends everything a box prints to its console log.
//!
//! A serial device is read raw at its baud rate; when it goes away (an adapter that
//! re-enumerates, a pty whose other side closed) the thread reopens it until it is
//! back. A console program (`amtterm`, `ipmitool sol activate`) writes straight into
//! the log and is restarted when it exits. [`Console::stop`] ends the thread within
//! a poll interval; [`Console::start`] starts it again, appending to the same log.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use rustix::event::PollFlags;

use super::serial;
use super::shell::{Shell, kill_group};

/// How often the capture thread looks at its stop flag.
const TICK: Duration = Duration::from_millis(100);
/// How long it waits before reopening a console that went away.
const REOPEN: Duration = Duration::from_millis(500);

/// Where the console comes from.
#[derive(Debug, Clone)]
pub enum ConsoleSource {
    Serial { device: PathBuf, baud: u32 },
    Command { command: String },
}

impl std::fmt::Display for ConsoleSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConsoleSource::Serial { device, baud } => {
                write!(f, "{} at {baud} baud", device.display())
            }
            ConsoleSource::Command { command } => write!(f, "`{command}`"),
        }
    }
}

/// A console captured into a log file.
pub struct Console {
    source: ConsoleSource,
    log: PathBuf,
    worker: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl Console {
    /// A capture of `source` into `log` (appended to, created if missing); not started.
    pub fn new(source: ConsoleSource, log: &Path) -> Console {
        Console {
            source,
            log: log.to_path_buf(),
            worker: None,
        }
    }

    pub fn source(&self) -> &ConsoleSource {
        &self.source
    }

    pub fn log(&self) -> &Path {
        &self.log
    }

    /// Starts capturing, unless it already runs.
    pub fn start(&mut self) -> Result<()> {
        if self.is_running() {
            return Ok(());
        }
        self.stop();
        let log = append(&self.log)?;
        let stop = Arc::new(AtomicBool::new(false));
        let source = self.source.clone();
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || match source {
                ConsoleSource::Serial { device, baud } => read_serial(&device, baud, log, &flag),
                ConsoleSource::Command { command } => run_program(&command, log, &flag),
            })
            .context("starting the console thread")?;
        self.worker = Some((stop, handle));
        Ok(())
    }

    /// Whether the capture thread runs.
    pub fn is_running(&self) -> bool {
        self.worker.as_ref().is_some_and(|(_, h)| !h.is_finished())
    }

    /// Stops capturing (within about 100 ms).
    pub fn stop(&mut self) {
        if let Some((stop, handle)) = self.worker.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
    }

    /// Appends a line of the rig's own (`[cairn-rig …] text`) to the log.
    pub fn mark(&self, text: &str) {
        mark(&self.log, text);
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Appends `[cairn-rig TIME] text` on a line of its own to `log`.
pub fn mark(log: &Path, text: &str) {
    if let Ok(mut f) = append(log) {
        let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
        let _ = write!(f, "\n[cairn-rig {now}] {text}\n");
    }
}

fn append(log: &Path) -> Result<File> {
    if let Some(d) = log.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening the console log {}", log.display()))
}

/// Sleeps `d` in ticks; `false` if asked to stop meanwhile.
fn pause(d: Duration, stop: &AtomicBool) -> bool {
    let mut left = d;
    while !left.is_zero() {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let t = left.min(TICK);
        std::thread::sleep(t);
        left -= t;
    }
    !stop.load(Ordering::Relaxed)
}

fn read_serial(device: &Path, baud: u32, mut log: File, stop: &AtomicBool) {
    let mut last_error = String::new();
    let mut buf = vec![0u8; 4096];
    while !stop.load(Ordering::Relaxed) {
        let fd = match serial::open(device, baud, false) {
            Ok(fd) => fd,
            Err(e) => {
                let e = format!("{e:#}");
                if e != last_error {
                    tracing::warn!(device = %device.display(), error = %e, "console unavailable; retrying");
                    last_error = e;
                }
                if !pause(REOPEN, stop) {
                    return;
                }
                continue;
            }
        };
        last_error.clear();
        tracing::debug!(device = %device.display(), baud, "console open");
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let ready = match serial::wait_ready(&fd, PollFlags::IN, TICK) {
                Ok(r) => r,
                Err(_) => break,
            };
            if ready.is_empty() {
                continue;
            }
            match rustix::io::read(&fd, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    if log.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
                Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {
                    // A hang-up with nothing to read: the device went away.
                    if ready.intersects(PollFlags::HUP | PollFlags::ERR) {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
        tracing::debug!(device = %device.display(), "console closed; reopening");
        if !pause(REOPEN, stop) {
            return;
        }
    }
}

fn run_program(command: &str, log: File, stop: &AtomicBool) {
    let shell = Shell {
        script: command,
        args: vec![],
        env: vec![],
        timeout: Duration::ZERO,
    };
    while !stop.load(Ordering::Relaxed) {
        let mut child = match shell.spawn_into(&log) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "console program; retrying");
                if !pause(REOPEN * 4, stop) {
                    return;
                }
                continue;
            }
        };
        loop {
            if stop.load(Ordering::Relaxed) {
                kill_group(&mut child);
                return;
            }
            match child.try_wait() {
                Ok(None) => std::thread::sleep(TICK),
                Ok(Some(st)) => {
                    tracing::debug!(%st, "console program exited; restarting");
                    break;
                }
                Err(_) => {
                    kill_group(&mut child);
                    break;
                }
            }
        }
        if !pause(REOPEN * 2, stop) {
            return;
        }
    }
}
