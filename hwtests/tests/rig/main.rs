//! The real rig's parts, with real stand-ins where a rig has hardware: pseudo-terminals
//! for serial consoles, relay boards and the operator's terminal, a local HTTP server
//! for a PDU, shell commands, regular files and loop devices for disks. Fast: no image
//! is built, no box booted.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod cli;
mod config;
mod flash;
mod parts;

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_hwtests::rig::serial::wait_ready;
use rustix::event::PollFlags;
use rustix::pty::{OpenptFlags, grantpt, openpt, ptsname, unlockpt};

/// A pseudo-terminal pair: the test holds the master side; the slave path stands in
/// for `/dev/ttyUSB0`. The test keeps one slave descriptor open so the other side
/// never sees a hang-up when the code under test closes its own.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: PathBuf,
    _slave_fd: OwnedFd,
}

impl Pty {
    pub fn open() -> Pty {
        let master =
            openpt(OpenptFlags::RDWR | OpenptFlags::NOCTTY | OpenptFlags::CLOEXEC).unwrap();
        grantpt(&master).unwrap();
        unlockpt(&master).unwrap();
        let name = ptsname(&master, Vec::new()).unwrap();
        let slave = PathBuf::from(
            <std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(name.as_bytes())
                .to_owned(),
        );
        let slave_fd = rustix::fs::open(
            &slave,
            rustix::fs::OFlags::RDWR | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::NONBLOCK,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        // Raw from the start: what the code under test writes arrives unchanged.
        cairn_hwtests::rig::serial::configure(&slave_fd, 9600).unwrap();
        Pty {
            master,
            slave,
            _slave_fd: slave_fd,
        }
    }

    /// The terminal settings the code under test left (opened without becoming the
    /// test's controlling terminal).
    pub fn attrs(&self) -> rustix::termios::Termios {
        let fd = rustix::fs::open(
            &self.slave,
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::NOCTTY | rustix::fs::OFlags::NONBLOCK,
            rustix::fs::Mode::empty(),
        )
        .unwrap();
        rustix::termios::tcgetattr(&fd).unwrap()
    }

    /// Writes `bytes` as the box (or the operator) would.
    pub fn write(&self, bytes: &[u8]) {
        let mut done = 0;
        while done < bytes.len() {
            done += rustix::io::write(&self.master, &bytes[done..]).unwrap();
        }
    }

    /// Reads exactly `n` bytes written on the slave side, within `limit`.
    pub fn read_exact(&self, n: usize, limit: Duration) -> Vec<u8> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        while out.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "got only {out:02x?} of {n} bytes within {limit:?}"
            );
            if wait_ready(&self.master, PollFlags::IN, left)
                .unwrap()
                .is_empty()
            {
                continue;
            }
            let k = rustix::io::read(&self.master, &mut buf[..n - out.len()]).unwrap();
            out.extend_from_slice(&buf[..k]);
        }
        out
    }

    /// Reads what arrives until `pred` holds for everything read so far.
    pub fn read_until(&self, limit: Duration, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        let mut buf = [0u8; 256];
        loop {
            let text = String::from_utf8_lossy(&out).into_owned();
            if pred(&text) {
                return text;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "within {limit:?} only: {text:?}");
            if wait_ready(&self.master, PollFlags::IN, left)
                .unwrap()
                .is_empty()
            {
                continue;
            }
            let k = rustix::io::read(&self.master, &mut buf).unwrap();
            out.extend_from_slice(&buf[..k]);
        }
    }

    /// Whether nothing is waiting to be read within `d`.
    pub fn silent_for(&self, d: Duration) -> bool {
        wait_ready(self.master.as_fd(), PollFlags::IN, d)
            .unwrap()
            .is_empty()
    }
}

/// Polls `cond` every 10 ms until it holds; panics with `what` after `limit`.
pub fn wait_until(what: &str, limit: Duration, cond: impl FnMut() -> bool) {
    assert!(poll_until(limit, cond), "timed out after {limit:?}: {what}");
}

/// Polls `cond` every 10 ms until it holds (true) or `limit` has passed (false).
pub fn poll_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

pub fn read(p: &Path) -> String {
    String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned()
}
