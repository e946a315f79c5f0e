//! Serial ports on the rig host (USB serial adapters, relay boards): opened
//! non-blocking, configured raw (8N1, no flow control, no modem-control hang-ups) at a
//! baud rate with termios.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::event::{PollFd, PollFlags, poll};
use rustix::fs::{Mode, OFlags};
use rustix::termios::{ControlModes, OptionalActions, tcdrain, tcgetattr, tcsetattr};

/// Opens `path` and configures it raw at `baud`.
pub fn open(path: &Path, baud: u32, write: bool) -> Result<OwnedFd> {
    let access = if write { OFlags::RDWR } else { OFlags::RDONLY };
    if std::fs::symlink_metadata(path).is_err() {
        bail!(
            "{} does not exist (is the adapter plugged in? see ls -l /dev/serial/by-id/)",
            path.display()
        );
    }
    let fd = rustix::fs::open(
        path,
        access | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io::Error::from)
    .with_context(|| {
        format!(
            "opening {} (permissions: is this user in the dialout group?)",
            path.display()
        )
    })?;
    configure(&fd, baud).with_context(|| format!("configuring {}", path.display()))?;
    Ok(fd)
}

/// Raw mode at `baud`: no echo, no line editing, no translation, 8 data bits, one
/// stop bit, no parity, receiver on, modem-control lines ignored.
pub fn configure(fd: impl AsFd, baud: u32) -> Result<()> {
    let mut t = tcgetattr(&fd)
        .map_err(io::Error::from)
        .context("not a serial device (tcgetattr failed)")?;
    t.make_raw();
    t.control_modes |= ControlModes::CLOCAL | ControlModes::CREAD;
    t.control_modes -= ControlModes::CSTOPB | ControlModes::PARENB | ControlModes::CRTSCTS;
    t.set_speed(baud)
        .map_err(io::Error::from)
        .with_context(|| format!("setting {baud} baud"))?;
    tcsetattr(&fd, OptionalActions::Now, &t)
        .map_err(io::Error::from)
        .context("tcsetattr")?;
    Ok(())
}

/// Writes all of `bytes` to the non-blocking `fd` within `limit`, then waits for them
/// to be sent.
pub fn write_all(fd: impl AsFd, bytes: &[u8], limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut done = 0;
    while done < bytes.len() {
        match rustix::io::write(&fd, &bytes[done..]) {
            Ok(n) => done += n,
            Err(rustix::io::Errno::AGAIN) | Err(rustix::io::Errno::INTR) => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    bail!("the serial port took no data for {limit:?}");
                }
                let _ = wait_ready(&fd, PollFlags::OUT, left.min(Duration::from_millis(100)));
            }
            Err(e) => return Err(io::Error::from(e)).context("writing"),
        }
    }
    tcdrain(&fd).map_err(io::Error::from).context("tcdrain")?;
    Ok(())
}

/// Waits at most `limit` for `fd` to be ready for `flags`; the events that happened
/// (empty on timeout).
pub fn wait_ready(fd: impl AsFd, flags: PollFlags, limit: Duration) -> io::Result<PollFlags> {
    let ts = rustix::event::Timespec {
        tv_sec: limit.as_secs().try_into().unwrap_or(i64::MAX),
        tv_nsec: limit.subsec_nanos().into(),
    };
    let mut fds = [PollFd::new(&fd, flags)];
    match poll(&mut fds, Some(&ts)) {
        Ok(_) => Ok(fds[0].revents()),
        Err(rustix::io::Errno::INTR) => Ok(PollFlags::empty()),
        Err(e) => Err(e.into()),
    }
}
