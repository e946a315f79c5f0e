//! Power control of a real box: a serial-command USB relay, a smart PDU over HTTP,
//! shell commands, or the operator at the terminal.
//!
//! None of these can tell whether the box is on; [`super::RealBox`] remembers the last
//! state it commanded.

use std::ffi::OsString;
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::event::PollFlags;

use super::config::{ButtonConfig, HttpRequestConfig, PowerConfig};
use super::serial;
use super::shell::Shell;

/// How the rig switches one box.
pub enum Power {
    Relay(UsbRelay),
    Pdu(Box<HttpPdu>),
    Command(CommandPower),
    Manual(ManualPower),
}

impl Power {
    /// From `[box.power]`; reads the PDU's credentials from the environment.
    pub fn from_config(box_name: &str, cfg: &PowerConfig) -> Result<Power> {
        Ok(match cfg {
            PowerConfig::UsbRelay {
                device,
                channel,
                baud,
                button,
            } => Power::Relay(UsbRelay::new(device, *channel, *baud, *button)),
            PowerConfig::HttpPdu { auth_env, .. } => {
                let auth = match auth_env {
                    None => None,
                    Some(var) => Some(
                        credentials_from_env(var)
                            .with_context(|| format!("box {box_name:?}: power.auth_env"))?,
                    ),
                };
                Power::Pdu(Box::new(HttpPdu::new(cfg, auth)?))
            }
            PowerConfig::Command { on, off, timeout } => Power::Command(CommandPower {
                box_name: box_name.to_string(),
                on: on.clone(),
                off: off.clone(),
                timeout: *timeout,
            }),
            PowerConfig::Manual { timeout } => {
                Power::Manual(ManualPower::new(box_name, Path::new("/dev/tty"), *timeout))
            }
        })
    }

    /// Switches the box on or off.
    pub fn set(&mut self, on: bool) -> Result<()> {
        match self {
            Power::Relay(r) => r.set(on),
            Power::Pdu(p) => p.set(on),
            Power::Command(c) => c.set(on),
            Power::Manual(m) => m.set(on),
        }
    }

    /// One line for logs and tables.
    pub fn describe(&self) -> String {
        match self {
            Power::Relay(r) => format!(
                "usb-relay {} channel {}{}",
                r.device.display(),
                r.channel,
                if r.button.is_some() { " (button)" } else { "" }
            ),
            Power::Pdu(p) => format!("http-pdu {} {}", p.on.method, p.on.url),
            Power::Command(_) => "command".into(),
            Power::Manual(_) => "manual".into(),
        }
    }
}

/// `USER:PASSWORD` from the environment variable `var`.
pub fn credentials_from_env(var: &str) -> Result<(String, String)> {
    let v = std::env::var(var).map_err(|_| {
        anyhow::anyhow!(
            "environment variable {var} is not set (it holds USER:PASSWORD for the PDU)"
        )
    })?;
    match v.split_once(':') {
        Some((u, p)) => Ok((u.to_string(), p.to_string())),
        None => bail!("environment variable {var} must be USER:PASSWORD (it has no ':')"),
    }
}

/// An LCUS-type serial relay board (CH340 USB serial, 9600 baud): each command is
/// the four bytes `A0 CHANNEL STATE SUM`, STATE 1 closing the relay, SUM the low
/// byte of the sum of the first three. Wire the box's supply through the relay's
/// normally-open contacts: closed is on.
pub struct UsbRelay {
    device: PathBuf,
    channel: u8,
    baud: u32,
    button: Option<ButtonConfig>,
    /// The last state commanded, for the button mode (a press toggles).
    last: Option<bool>,
}

/// The command that closes (`on`) or opens relay `channel`.
pub fn relay_command(channel: u8, on: bool) -> [u8; 4] {
    let state = u8::from(on);
    [
        0xA0,
        channel,
        state,
        0xA0u8.wrapping_add(channel).wrapping_add(state),
    ]
}

impl UsbRelay {
    pub fn new(device: &Path, channel: u8, baud: u32, button: Option<ButtonConfig>) -> UsbRelay {
        UsbRelay {
            device: device.to_path_buf(),
            channel,
            baud,
            button,
            last: None,
        }
    }

    /// Opens and configures the port without switching anything.
    pub fn probe(&self) -> Result<()> {
        serial::open(&self.device, self.baud, true).map(|_| ())
    }

    /// Closes (`true`) or opens the relay.
    pub fn switch(&self, closed: bool) -> Result<()> {
        let fd = serial::open(&self.device, self.baud, true)?;
        serial::write_all(
            &fd,
            &relay_command(self.channel, closed),
            Duration::from_secs(2),
        )
        .with_context(|| {
            format!(
                "switching relay {} of {}",
                self.channel,
                self.device.display()
            )
        })
    }

    pub fn set(&mut self, on: bool) -> Result<()> {
        match self.button {
            None => self.switch(on)?,
            Some(b) => {
                if self.last == Some(on) {
                    return Ok(());
                }
                self.switch(true)?;
                std::thread::sleep(if on { b.press } else { b.hold });
                self.switch(false)?;
            }
        }
        self.last = Some(on);
        Ok(())
    }
}

/// A smart PDU: one HTTP request switches the outlet on, another off.
pub struct HttpPdu {
    client: reqwest::blocking::Client,
    on: HttpRequestConfig,
    off: HttpRequestConfig,
    auth: Option<(String, String)>,
    expect_status: Option<u16>,
}

impl HttpPdu {
    /// From an `http-pdu` power configuration, with these credentials.
    pub fn new(cfg: &PowerConfig, auth: Option<(String, String)>) -> Result<HttpPdu> {
        let PowerConfig::HttpPdu {
            on,
            off,
            expect_status,
            timeout,
            ca_cert,
            ..
        } = cfg
        else {
            bail!("not an http-pdu power configuration");
        };
        let mut b = reqwest::blocking::Client::builder()
            .timeout(*timeout)
            .connect_timeout(*timeout);
        if let Some(ca) = ca_cert {
            let pem =
                std::fs::read(ca).with_context(|| format!("reading ca_cert {}", ca.display()))?;
            for c in reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("ca_cert {}: not PEM certificates", ca.display()))?
            {
                b = b.add_root_certificate(c);
            }
        }
        Ok(HttpPdu {
            client: b.build().context("building the HTTP client")?,
            on: on.clone(),
            off: off.clone(),
            auth,
            expect_status: *expect_status,
        })
    }

    pub fn set(&mut self, on: bool) -> Result<()> {
        let r = if on { &self.on } else { &self.off };
        let method = reqwest::Method::from_bytes(r.method.as_bytes())
            .with_context(|| format!("method {:?}", r.method))?;
        let mut req = self.client.request(method, &r.url);
        if let Some((u, p)) = &self.auth {
            req = req.basic_auth(u, Some(p));
        }
        if let Some(ct) = &r.content_type {
            req = req.header(reqwest::header::CONTENT_TYPE, ct);
        }
        if let Some(body) = &r.body {
            req = req.body(body.clone());
        }
        let what = format!("PDU {} {}", r.method, r.url);
        let resp = req.send().with_context(|| what.clone())?;
        let status = resp.status();
        let good = match self.expect_status {
            Some(s) => status.as_u16() == s,
            None => status.is_success(),
        };
        if !good {
            let body = resp.text().unwrap_or_default();
            let body: String = body.trim().chars().take(200).collect();
            bail!(
                "{what} answered {status} (expected {}){}",
                self.expect_status
                    .map_or("a 2xx status".to_string(), |s| s.to_string()),
                if body.is_empty() {
                    String::new()
                } else {
                    format!(": {body}")
                }
            );
        }
        Ok(())
    }
}

/// Shell commands for on and off.
pub struct CommandPower {
    box_name: String,
    on: String,
    off: String,
    timeout: Duration,
}

impl CommandPower {
    pub fn new(box_name: &str, on: &str, off: &str, timeout: Duration) -> CommandPower {
        CommandPower {
            box_name: box_name.into(),
            on: on.into(),
            off: off.into(),
            timeout,
        }
    }

    pub fn set(&mut self, on: bool) -> Result<()> {
        Shell {
            script: if on { &self.on } else { &self.off },
            args: vec![],
            env: vec![
                ("CAIRN_BOX", OsString::from(&self.box_name)),
                ("CAIRN_POWER", OsString::from(if on { "on" } else { "off" })),
            ],
            timeout: self.timeout,
        }
        .run()
        .with_context(|| format!("power {} {}", if on { "on" } else { "off" }, self.box_name))?;
        Ok(())
    }
}

/// The operator switches the power: asked on the terminal, answered with Enter.
pub struct ManualPower {
    box_name: String,
    terminal: PathBuf,
    timeout: Duration,
}

impl ManualPower {
    /// Prompts on `terminal` (`/dev/tty` from the configuration).
    pub fn new(box_name: &str, terminal: &Path, timeout: Duration) -> ManualPower {
        ManualPower {
            box_name: box_name.into(),
            terminal: terminal.to_path_buf(),
            timeout,
        }
    }

    /// Whether the terminal can be opened.
    pub fn probe(&self) -> Result<()> {
        self.open().map(|_| ())
    }

    fn open(&self) -> Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.terminal)
            .with_context(|| {
                format!(
                    "manual power needs a terminal ({}): run cairn-rig from one, or configure a usb-relay, http-pdu or command power kind",
                    self.terminal.display()
                )
            })
    }

    pub fn set(&mut self, on: bool) -> Result<()> {
        let mut tty = self.open()?;
        let what = if on {
            "switch the power ON"
        } else {
            "CUT the power (pull the plug)"
        };
        write!(
            tty,
            "\n>>> cairn-rig: box {}: {what} now, then press Enter (waiting up to {}) ",
            self.box_name,
            humantime::format_duration(self.timeout)
        )?;
        tty.flush()?;
        read_line(&tty, self.timeout).with_context(|| {
            format!(
                "box {}: nobody answered the power prompt on {}",
                self.box_name,
                self.terminal.display()
            )
        })
    }
}

/// Reads up to a newline from `tty` within `limit`.
fn read_line(tty: impl AsFd, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let mut buf = [0u8; 256];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            bail!("no answer within {}", humantime::format_duration(limit));
        }
        let ready = serial::wait_ready(&tty, PollFlags::IN, left.min(Duration::from_millis(200)))?;
        if ready.is_empty() {
            continue;
        }
        match rustix::io::read(&tty, &mut buf) {
            Ok(0) => bail!("the terminal closed"),
            Ok(n) if buf[..n].iter().any(|b| *b == b'\n' || *b == b'\r') => return Ok(()),
            Ok(_) => {}
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => {}
            Err(e) => return Err(io::Error::from(e)).context("reading the terminal"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_commands_carry_their_checksum() {
        assert_eq!(relay_command(1, true), [0xA0, 0x01, 0x01, 0xA2]);
        assert_eq!(relay_command(1, false), [0xA0, 0x01, 0x00, 0xA1]);
        assert_eq!(relay_command(4, true), [0xA0, 0x04, 0x01, 0xA5]);
        assert_eq!(relay_command(8, false), [0xA0, 0x08, 0x00, 0xA8]);
    }
}
