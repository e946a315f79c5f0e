//! `cairn-rig check`: probes a rig without switching power or writing anything.
//! Consoles and relays are opened and configured, PDU URLs parsed and their hosts
//! connected to, flash targets checked as [`super::flash::check_target`] does before
//! writing, images read, and the hub's listen address bound.

use std::net::{TcpStream, ToSocketAddrs, UdpSocket};
use std::path::Path;
use std::time::Duration;

use cairn_image::{BootScheme, downstream_pi_kernel};
use serde::Serialize;

use super::config::{BoxConfig, ConsoleConfig, FlashConfig, PowerConfig, Rig};
use super::flash::check_target;
use super::power::{ManualPower, UsbRelay, credentials_from_env};
use super::serial;
use super::shell::program_found;

/// How a probe went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Works, or cannot be told, but the operator should know.
    Warn,
    /// `cairn-rig run` would fail on it.
    Fail,
}

/// One probe's result.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// `hub` or the box's name.
    pub target: String,
    /// What was probed: `listen`, `console`, `power`, `flash`, `images`, …
    pub part: String,
    pub status: Status,
    pub detail: String,
}

fn probe(target: &str, part: &str, r: Result<String, (Status, String)>) -> Probe {
    let (status, detail) = match r {
        Ok(d) => (Status::Ok, d),
        Err((s, d)) => (s, d),
    };
    Probe {
        target: target.into(),
        part: part.into(),
        status,
        detail,
    }
}

fn fail<T>(d: impl Into<String>) -> Result<T, (Status, String)> {
    Err((Status::Fail, d.into()))
}

fn warn<T>(d: impl Into<String>) -> Result<T, (Status, String)> {
    Err((Status::Warn, d.into()))
}

/// Probes the hub settings and the `boxes`.
pub fn check(rig: &Rig, boxes: &[&BoxConfig]) -> Vec<Probe> {
    let mut out = vec![
        probe("hub", "listen", check_listen(rig)),
        probe("hub", "public", check_public(&rig.hub.public)),
        probe("hub", "ek-ca", check_ek_ca(&rig.hub.ek_ca)),
        probe(
            "hub",
            "cairn-hub",
            match crate::hub::bin_dir() {
                Ok(d) => Ok(format!("{}", d.join("cairn-hub").display())),
                Err(e) => fail(format!("{e:#}")),
            },
        ),
    ];
    for b in boxes {
        let n = b.name.as_str();
        out.push(probe(n, "images", check_images(b)));
        out.push(probe(n, "console", check_console(b)));
        out.push(probe(n, "power", check_power(b)));
        out.push(probe(n, "flash", check_flash(b)));
    }
    out
}

/// Whether no probe failed.
pub fn passed(probes: &[Probe]) -> bool {
    probes.iter().all(|p| p.status != Status::Fail)
}

/// A plain-text table.
pub fn table(probes: &[Probe]) -> String {
    let w0 = probes
        .iter()
        .map(|p| p.target.len())
        .max()
        .unwrap_or(3)
        .max(3);
    let w1 = probes
        .iter()
        .map(|p| p.part.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut s = format!("{:<w0$}  {:<w1$}  {:<5}  DETAIL\n", "BOX", "PART", "STATE");
    for p in probes {
        let st = match p.status {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        s.push_str(&format!(
            "{:<w0$}  {:<w1$}  {st:<5}  {}\n",
            p.target, p.part, p.detail
        ));
    }
    let fails = probes.iter().filter(|p| p.status == Status::Fail).count();
    let warns = probes.iter().filter(|p| p.status == Status::Warn).count();
    s.push_str(&format!(
        "{} probes: {fails} failed, {warns} warnings\n",
        probes.len()
    ));
    s
}

fn check_listen(rig: &Rig) -> Result<String, (Status, String)> {
    let a = rig.hub.listen;
    match UdpSocket::bind(a) {
        Ok(_) => Ok(format!("UDP {a} can be bound")),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            fail(format!("UDP {a} is in use (another hub running? ss -ulpn)"))
        }
        Err(e) => fail(format!(
            "cannot bind UDP {a}: {e} (is it an address of this host? ip -br addr)"
        )),
    }
}

fn check_public(public: &str) -> Result<String, (Status, String)> {
    match public.to_socket_addrs() {
        Ok(mut addrs) => match addrs.next() {
            Some(a) if a.ip().is_loopback() || a.ip().is_unspecified() => warn(format!(
                "{public} is {}: boxes on the LAN cannot reach it",
                a.ip()
            )),
            Some(a) => Ok(format!("boxes dial {public} ({a})")),
            None => fail(format!("{public} resolves to no address")),
        },
        Err(e) => fail(format!("{public}: {e}")),
    }
}

fn check_ek_ca(files: &[std::path::PathBuf]) -> Result<String, (Status, String)> {
    if files.is_empty() {
        return warn(
            "none: TPMs enroll as tpm-unverified and the scenario's `--require tpm` policy refuses them",
        );
    }
    let mut total = 0;
    for f in files {
        match std::fs::read_to_string(f) {
            Ok(t) => {
                let n = t.matches("-----BEGIN CERTIFICATE-----").count();
                if n == 0 {
                    return fail(format!("{}: no PEM certificate in it", f.display()));
                }
                total += n;
            }
            Err(e) => return fail(format!("{}: {e}", f.display())),
        }
    }
    Ok(format!("{total} CA certificates in {} files", files.len()))
}

fn check_images(b: &BoxConfig) -> Result<String, (Status, String)> {
    match b.load_releases() {
        Ok(r) => {
            // On a real Pi the trial boot needs a kernel that hands "0 tryboot" to the
            // firmware; with Debian's, every upgrade of the scenario rolls back.
            let mainline: Vec<String> = [&r.v1, &r.v2, &r.v3]
                .iter()
                .filter(|v| v.scheme == BootScheme::PiTryboot && !downstream_pi_kernel(&v.kernel))
                .map(|v| format!("{} ({})", v.version, v.kernel))
                .collect();
            if !mainline.is_empty() {
                return warn(format!(
                    "{} carry a kernel that cannot pass the tryboot flag to the Pi firmware: the upgrade steps will roll back on this box; build them with `cairn-image --kernel-deb` and the Raspberry Pi kernel (linux-image-*-rpi-v8)",
                    mainline.join(", ")
                ));
            }
            let size = std::fs::metadata(&r.v1.disk).map(|m| m.len()).unwrap_or(0);
            Ok(format!(
                "1.0.0, 2.0.0, 3.0.0 (init-panic) for {}/{}; disk {} MiB",
                b.arch,
                b.board,
                size.div_ceil(1 << 20)
            ))
        }
        Err(e) => fail(e.to_string()),
    }
}

fn check_console(b: &BoxConfig) -> Result<String, (Status, String)> {
    match &b.console {
        None => warn(
            "none: the report has no console for this box, and the scenario's v3 step, which looks for the broken initramfs on the console, cannot pass",
        ),
        Some(ConsoleConfig::Serial { device, baud }) => match serial::open(device, *baud, false) {
            Ok(_) => Ok(format!("{} opens at {baud} baud", device.display())),
            Err(e) => fail(format!("{e:#}")),
        },
        Some(ConsoleConfig::Command { command }) => program(command, "runs"),
    }
}

fn program(command: &str, verb: &str) -> Result<String, (Status, String)> {
    match program_found(command) {
        Some((p, true)) => Ok(format!("{verb} `{command}` ({p} found; not run)")),
        Some((p, false)) => fail(format!("`{command}`: {p} is not installed or not on PATH")),
        None => Ok(format!("{verb} `{command}` (not run)")),
    }
}

fn check_power(b: &BoxConfig) -> Result<String, (Status, String)> {
    match &b.power {
        PowerConfig::UsbRelay {
            device,
            channel,
            baud,
            button,
        } => match UsbRelay::new(device, *channel, *baud, *button).probe() {
            Ok(()) => Ok(format!(
                "relay {} opens at {baud} baud; channel {channel} not switched",
                device.display()
            )),
            Err(e) => fail(format!("{e:#}")),
        },
        PowerConfig::HttpPdu {
            on, off, auth_env, ..
        } => {
            if let Some(var) = auth_env
                && let Err(e) = credentials_from_env(var)
            {
                return fail(format!("{e:#}"));
            }
            let mut hosts = Vec::new();
            for r in [on, off] {
                let Ok(url) = reqwest::Url::parse(&r.url) else {
                    return fail(format!("{:?} is not a URL", r.url));
                };
                let host = url.host_str().unwrap_or_default().to_string();
                let port = url.port_or_known_default().unwrap_or(80);
                if !hosts.contains(&(host.clone(), port)) {
                    hosts.push((host, port));
                }
            }
            for (host, port) in &hosts {
                let addr = (host.as_str(), *port)
                    .to_socket_addrs()
                    .ok()
                    .and_then(|mut a| a.next());
                let Some(addr) = addr else {
                    return fail(format!("PDU host {host} does not resolve"));
                };
                if let Err(e) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
                    return fail(format!("PDU {host}:{port} does not answer: {e}"));
                }
            }
            Ok(format!(
                "{} {} / {} {}: reachable; not switched",
                on.method, on.url, off.method, off.url
            ))
        }
        PowerConfig::Command { on, .. } => program(on, "on"),
        PowerConfig::Manual { timeout } => {
            match ManualPower::new(&b.name, Path::new("/dev/tty"), *timeout).probe() {
                Ok(()) => Ok("the operator is asked on this terminal".into()),
                Err(e) => warn(format!("{e:#}")),
            }
        }
    }
}

fn check_flash(b: &BoxConfig) -> Result<String, (Status, String)> {
    let need = b
        .load_releases()
        .ok()
        .and_then(|r| std::fs::metadata(&r.v1.disk).ok())
        .map(|m| m.len());
    let target = |device: &Path, may_be_absent: bool| match check_target(device) {
        Ok(t) if t.size == 0 => warn(format!(
            "{} has no medium now (an SD mux switched to the box?)",
            t.path.display()
        )),
        Ok(t) => match need {
            Some(n) if n > t.size => fail(format!(
                "{} is {} MiB, the image {} MiB",
                t.path.display(),
                t.size >> 20,
                n.div_ceil(1 << 20)
            )),
            _ => Ok(format!(
                "{} is an unused whole disk of {:.1} GiB",
                t.path.display(),
                t.size as f64 / (1u64 << 30) as f64
            )),
        },
        Err(e) if may_be_absent && !device.exists() => warn(format!(
            "{e:#} (it may appear once `before` ran; not run by check)"
        )),
        Err(e) => fail(format!("{e:#}")),
    };
    match &b.flash {
        FlashConfig::UsbMassStorage { device, before, .. } => target(device, before.is_some()),
        FlashConfig::SdMux {
            control,
            device,
            tool,
            ..
        } => {
            if !control.exists() {
                return fail(format!(
                    "SD mux control {} does not exist (is the mux plugged in? ls /dev/usb-sd-mux/)",
                    control.display()
                ));
            }
            if let Some((p, false)) = program_found(tool) {
                return fail(format!("{p} is not installed (pip install usbsdmux)"));
            }
            target(device, false)
        }
        FlashConfig::Command { command, .. } => program(command, "flashes with"),
    }
}
