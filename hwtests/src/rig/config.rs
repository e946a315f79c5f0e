//! The rig description, `rig.toml`: the hub's addresses on the rig's LAN and, per box,
//! its architecture and board, the images to flash, its serial console, and how the
//! rig host switches its power and writes its boot medium.
//!
//! Unknown fields are errors. Every error names the file, the line, the box and the
//! field. Relative paths (images, CA files) are relative to the file's directory.
//! `rig/rig.example.toml` is the documented example.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_image::{Arch, Built, Fault};
use serde::{Deserialize, Deserializer};

/// A configuration error: the message names the file, the box and the field.
#[derive(Debug)]
pub struct ConfigError(String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// A parsed and checked rig description.
#[derive(Debug, Clone)]
pub struct Rig {
    /// The file it was read from.
    pub path: PathBuf,
    pub hub: HubConfig,
    pub timeouts: TimeoutsConfig,
    pub boxes: Vec<BoxConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RigFile {
    hub: HubConfig,
    #[serde(default)]
    timeouts: TimeoutsConfig,
    #[serde(rename = "box", default)]
    boxes: Vec<BoxConfig>,
}

/// `[hub]`: the hub `cairn-rig run` starts on the rig host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// UDP address the hub's QUIC endpoint binds: the rig host's LAN address.
    pub listen: SocketAddr,
    /// `HOST:PORT` the boxes dial (written into the flashed image).
    pub public: String,
    /// PEM files of TPM manufacturer CAs (roots and intermediates) that the boxes' EK
    /// certificates chain to: the hub's `--ek-ca`.
    #[serde(default)]
    pub ek_ca: Vec<PathBuf>,
}

/// `[timeouts]`: limits for the scenario's waits (humantime: `90s`, `10m`).
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// Power-on to enrolled and attested.
    #[serde(default = "d_enroll", deserialize_with = "duration")]
    pub enroll: Duration,
    /// `os set` to the release committed.
    #[serde(default = "d_upgrade", deserialize_with = "duration")]
    pub upgrade: Duration,
    /// `os set` of the broken release to the box back on the old one.
    #[serde(default = "d_rollback", deserialize_with = "duration")]
    pub rollback: Duration,
}

fn d_enroll() -> Duration {
    crate::scenario::Timeouts::default().enroll
}
fn d_upgrade() -> Duration {
    crate::scenario::Timeouts::default().upgrade
}
fn d_rollback() -> Duration {
    crate::scenario::Timeouts::default().rollback
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        let t = crate::scenario::Timeouts::default();
        Self {
            enroll: t.enroll,
            upgrade: t.upgrade,
            rollback: t.rollback,
        }
    }
}

impl From<TimeoutsConfig> for crate::scenario::Timeouts {
    fn from(t: TimeoutsConfig) -> Self {
        Self {
            enroll: t.enroll,
            upgrade: t.upgrade,
            rollback: t.rollback,
        }
    }
}

/// The board families a rig box can be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Board {
    Nuc,
    Rpi4,
    Rpi5,
}

impl Board {
    /// The architecture the board runs.
    pub fn arch(self) -> Arch {
        match self {
            Board::Nuc => Arch::X86_64,
            Board::Rpi4 | Board::Rpi5 => Arch::Aarch64,
        }
    }

    /// The name images and releases carry (`cairn-image --board`).
    pub fn as_str(self) -> &'static str {
        match self {
            Board::Nuc => "nuc",
            Board::Rpi4 => "rpi4",
            Board::Rpi5 => "rpi5",
        }
    }
}

impl std::fmt::Display for Board {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[[box]]`: one box under test.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoxConfig {
    /// Unique on the rig; the device's `rig=NAME` label and its work directory.
    pub name: String,
    pub arch: Arch,
    pub board: Board,
    /// A directory with `1.0.0/`, `2.0.0/` and `3.0.0/`, each a `cairn-image build
    /// --out` directory holding `image.json`.
    #[serde(default)]
    pub images: Option<PathBuf>,
    /// Or one build directory per scenario release.
    #[serde(default)]
    pub image_dirs: Option<ImageDirs>,
    /// The serial console; without one the report has no console for this box.
    #[serde(default)]
    pub console: Option<ConsoleConfig>,
    pub power: PowerConfig,
    pub flash: FlashConfig,
    /// Whether the box has a TPM whose EK certificate chains to `hub.ek_ca` (a NUC
    /// with PTT and an EK certificate; a Pi with a TPM HAT). `false`: the scenario
    /// sets no attestation policy and skips the attestation and PCR-prediction steps.
    #[serde(default = "default_true")]
    pub tpm: bool,
}

fn default_true() -> bool {
    true
}

/// `image_dirs = { v1 = "…", v2 = "…", v3 = "…" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageDirs {
    /// Flashed first (version 1.0.0).
    pub v1: PathBuf,
    /// The upgrade through a power cut (version 2.0.0).
    pub v2: PathBuf,
    /// The broken release that must roll back (version 3.0.0, `--fault init-panic`).
    pub v3: PathBuf,
}

/// `[box.console]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum ConsoleConfig {
    /// A serial device on the rig host, read raw at `baud` (8N1, no flow control).
    Serial {
        device: PathBuf,
        #[serde(default = "d_console_baud")]
        baud: u32,
    },
    /// A program whose output is the console (e.g. `amtterm` for Intel AMT
    /// serial-over-LAN); restarted when it exits.
    Command { command: String },
}

fn d_console_baud() -> u32 {
    115_200
}

/// `[box.power]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum PowerConfig {
    /// A serial-command USB relay board (LCUS-type, CH340): `A0 CH STATE SUM`.
    UsbRelay {
        /// Its serial device, e.g. `/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0`.
        device: PathBuf,
        /// Relay channel, 1 to 8.
        #[serde(default = "d_channel")]
        channel: u8,
        #[serde(default = "d_relay_baud")]
        baud: u32,
        /// Wired to a power button header instead of the supply: on is a short
        /// press, off a long hold (forced power off).
        #[serde(default)]
        button: Option<ButtonConfig>,
    },
    /// A smart PDU (or any HTTP-controlled switch).
    HttpPdu {
        on: HttpRequestConfig,
        off: HttpRequestConfig,
        /// Environment variable holding `USER:PASSWORD` for HTTP basic auth.
        #[serde(default)]
        auth_env: Option<String>,
        /// The status a successful request answers; any 2xx without it.
        #[serde(default)]
        expect_status: Option<u16>,
        #[serde(default = "d_http_timeout", deserialize_with = "duration")]
        timeout: Duration,
        /// PEM CA certificate(s) for an `https://` PDU.
        #[serde(default)]
        ca_cert: Option<PathBuf>,
    },
    /// Shell commands (run with `sh -c`; `CAIRN_BOX` and `CAIRN_POWER=on|off` set).
    Command {
        on: String,
        off: String,
        #[serde(default = "d_command_timeout", deserialize_with = "duration")]
        timeout: Duration,
    },
    /// The operator switches the power when asked on the terminal and presses Enter.
    Manual {
        #[serde(default = "d_manual_timeout", deserialize_with = "duration")]
        timeout: Duration,
    },
}

fn d_channel() -> u8 {
    1
}
fn d_relay_baud() -> u32 {
    9600
}
fn d_http_timeout() -> Duration {
    Duration::from_secs(10)
}
fn d_command_timeout() -> Duration {
    Duration::from_secs(60)
}
fn d_manual_timeout() -> Duration {
    Duration::from_secs(15 * 60)
}

/// `button = { press = "500ms", hold = "6s" }`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ButtonConfig {
    /// How long "on" holds the button.
    #[serde(default = "d_press", deserialize_with = "duration")]
    pub press: Duration,
    /// How long "off" holds it (a forced power off needs 4 s or more).
    #[serde(default = "d_hold", deserialize_with = "duration")]
    pub hold: Duration,
}

fn d_press() -> Duration {
    Duration::from_millis(500)
}
fn d_hold() -> Duration {
    Duration::from_secs(6)
}

/// `on = { method = "POST", url = "http://…" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRequestConfig {
    #[serde(default = "d_method")]
    pub method: String,
    pub url: String,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
}

fn d_method() -> String {
    "POST".into()
}

/// `[box.flash]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum FlashConfig {
    /// The boot medium is a block device on the rig host (USB-SATA/NVMe adapter, a
    /// USB stick behind a USB switch, a Pi in mass-storage mode).
    UsbMassStorage {
        /// A whole disk, best a `/dev/disk/by-id/…` path.
        device: PathBuf,
        /// Shell command run before writing (switch a USB switch to the host, start
        /// `rpiboot`); `CAIRN_BOX` and `CAIRN_DEVICE` set.
        #[serde(default)]
        before: Option<String>,
        /// Shell command run after writing, also when it failed.
        #[serde(default)]
        after: Option<String>,
        /// How long to wait for the device to appear (with a medium).
        #[serde(default = "d_appear", deserialize_with = "duration")]
        appear_timeout: Duration,
    },
    /// An SD card multiplexer (Linux Automation USB-SD-Mux).
    SdMux {
        /// Its control device, e.g. `/dev/usb-sd-mux/id-000000001234`.
        control: PathBuf,
        /// The card reader's block device, e.g. `/dev/disk/by-id/usb-LinuxAut_sdmux_HS-SD_MMC_…`.
        device: PathBuf,
        /// The `usbsdmux` program.
        #[serde(default = "d_sdmux_tool")]
        tool: String,
        #[serde(default = "d_appear", deserialize_with = "duration")]
        appear_timeout: Duration,
    },
    /// A script given the image path as `$1` (and `CAIRN_IMAGE`, `CAIRN_BOX`).
    Command {
        command: String,
        #[serde(default = "d_flash_timeout", deserialize_with = "duration")]
        timeout: Duration,
    },
}

fn d_appear() -> Duration {
    Duration::from_secs(30)
}
fn d_sdmux_tool() -> String {
    "usbsdmux".into()
}
fn d_flash_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "{s:?} is not a duration ({e}); write e.g. \"500ms\", \"90s\", \"10m\""
        ))
    })
}

impl Rig {
    /// Reads and checks `path`. Image directories are not read here (see
    /// [`BoxConfig::load_releases`]).
    pub fn load(path: &Path) -> Result<Rig, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("reading {}: {e}", path.display())))?;
        Rig::parse(path, &text)
    }

    /// Parses `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Rig, ConfigError> {
        let file: RigFile = toml::from_str(text).map_err(|e| {
            let at = e.span().map(|s| s.start);
            let line = at.map(|at| {
                let before = &text[..at.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{col}")
            });
            let boxed = at
                .and_then(|at| box_at(text, at))
                .map(|b| format!("{b}: "))
                .unwrap_or_default();
            ConfigError(format!(
                "{}{}: {boxed}{}",
                path.display(),
                line.unwrap_or_default(),
                e.message().trim()
            ))
        })?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let err = |what: String| ConfigError(format!("{}: {what}", path.display()));
        let mut rig = Rig {
            path: path.to_path_buf(),
            hub: file.hub,
            timeouts: file.timeouts,
            boxes: file.boxes,
        };
        check_host_port(&rig.hub.public).map_err(|e| err(format!("hub.public: {e}")))?;
        for ca in &mut rig.hub.ek_ca {
            *ca = resolve(&dir, ca);
        }
        if rig.boxes.is_empty() {
            return Err(err(
                "no [[box]]: describe at least one box (see rig.example.toml)".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for b in &mut rig.boxes {
            let berr = |what: String| err(format!("box {:?}: {what}", b.name));
            check_name(&b.name).map_err(|e| berr(format!("name: {e}")))?;
            if !names.insert(b.name.clone()) {
                return Err(berr("name: two boxes have this name".into()));
            }
            if b.board.arch() != b.arch {
                return Err(berr(format!(
                    "arch: board {} is {}, not {}",
                    b.board,
                    b.board.arch(),
                    b.arch
                )));
            }
            match (&mut b.images, &mut b.image_dirs) {
                (Some(_), Some(_)) => {
                    return Err(berr(
                        "images and image_dirs: give one of them, not both".into(),
                    ));
                }
                (None, None) => {
                    return Err(berr(
                        "images: missing; give `images = \"DIR\"` (with 1.0.0/, 2.0.0/, 3.0.0/) or `image_dirs = { v1 = …, v2 = …, v3 = … }`".into(),
                    ));
                }
                (Some(d), None) => *d = resolve(&dir, d),
                (None, Some(d)) => {
                    for p in [&mut d.v1, &mut d.v2, &mut d.v3] {
                        *p = resolve(&dir, p);
                    }
                }
            }
            if let Some(ConsoleConfig::Serial { baud, .. }) = &b.console {
                check_baud(*baud).map_err(|e| berr(format!("console.baud: {e}")))?;
            }
            if let Some(ConsoleConfig::Command { command }) = &b.console
                && command.trim().is_empty()
            {
                return Err(berr("console.command: empty".into()));
            }
            check_power(&mut b.power, &dir).map_err(|e| berr(format!("power.{e}")))?;
            check_flash(&b.flash).map_err(|e| berr(format!("flash.{e}")))?;
        }
        Ok(rig)
    }

    /// The boxes named in `names`, all of them when it is empty.
    pub fn select(&self, names: &[String]) -> Result<Vec<&BoxConfig>, ConfigError> {
        if names.is_empty() {
            return Ok(self.boxes.iter().collect());
        }
        names
            .iter()
            .map(|n| {
                self.boxes.iter().find(|b| &b.name == n).ok_or_else(|| {
                    ConfigError(format!(
                        "{}: no box named {n:?}; the rig has {}",
                        self.path.display(),
                        self.boxes
                            .iter()
                            .map(|b| b.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ))
                })
            })
            .collect()
    }
}

/// Which `[[box]]` the byte offset `at` of `text` is in, for error messages.
fn box_at(text: &str, at: usize) -> Option<String> {
    let mut starts = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with("[[box]]") {
            starts.push(offset);
        }
        offset += line.len();
    }
    let index = starts.iter().filter(|s| **s <= at).count().checked_sub(1)?;
    let name = toml::from_str::<toml::Table>(text).ok().and_then(|t| {
        t.get("box")?
            .as_array()?
            .get(index)?
            .get("name")?
            .as_str()
            .map(str::to_string)
    });
    Some(match name {
        Some(n) => format!("box {n:?}"),
        None => format!("[[box]] number {}", index + 1),
    })
}

fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p)
    }
}

fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{name:?}: use 1 to 63 letters, digits, '-', '_' or '.', starting with a letter or digit"
        ))
    }
}

fn check_host_port(s: &str) -> Result<(), String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?} is not HOST:PORT"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(format!("{s:?} has no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("{s:?}: {port:?} is not a port (1 to 65535)")),
    }
}

fn check_baud(baud: u32) -> Result<(), String> {
    if (50..=4_000_000).contains(&baud) {
        Ok(())
    } else {
        Err(format!("{baud} is not a baud rate (e.g. 115200)"))
    }
}

fn check_command(field: &str, c: &str) -> Result<(), String> {
    if c.trim().is_empty() {
        Err(format!("{field}: empty command"))
    } else {
        Ok(())
    }
}

fn check_power(p: &mut PowerConfig, dir: &Path) -> Result<(), String> {
    match p {
        PowerConfig::UsbRelay {
            channel,
            baud,
            button,
            ..
        } => {
            if !(1..=8).contains(channel) {
                return Err(format!(
                    "channel: {channel} is not a relay channel (1 to 8)"
                ));
            }
            check_baud(*baud).map_err(|e| format!("baud: {e}"))?;
            if let Some(b) = button
                && b.hold <= b.press
            {
                return Err("button.hold: must be longer than button.press".into());
            }
            Ok(())
        }
        PowerConfig::HttpPdu {
            on,
            off,
            auth_env,
            expect_status,
            ca_cert,
            ..
        } => {
            for (field, r) in [("on", &*on), ("off", &*off)] {
                check_request(r).map_err(|e| format!("{field}.{e}"))?;
            }
            if let Some(v) = auth_env
                && (v.is_empty() || v.contains('='))
            {
                return Err(format!(
                    "auth_env: {v:?} is not an environment variable name"
                ));
            }
            if let Some(s) = expect_status
                && !(100..=599).contains(s)
            {
                return Err(format!("expect_status: {s} is not an HTTP status"));
            }
            if let Some(ca) = ca_cert {
                *ca = resolve(dir, ca);
            }
            Ok(())
        }
        PowerConfig::Command { on, off, .. } => {
            check_command("on", on)?;
            check_command("off", off)
        }
        PowerConfig::Manual { .. } => Ok(()),
    }
}

fn check_request(r: &HttpRequestConfig) -> Result<(), String> {
    const METHODS: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];
    if !METHODS.contains(&r.method.as_str()) {
        return Err(format!(
            "method: {:?} is not one of {}",
            r.method,
            METHODS.join(", ")
        ));
    }
    let url = reqwest::Url::parse(&r.url).map_err(|e| format!("url: {:?}: {e}", r.url))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "url: {:?} is not an http:// or https:// URL",
            r.url
        ));
    }
    Ok(())
}

fn check_flash(f: &FlashConfig) -> Result<(), String> {
    match f {
        FlashConfig::UsbMassStorage {
            device,
            before,
            after,
            ..
        } => {
            check_device(device)?;
            for (field, c) in [("before", before), ("after", after)] {
                if let Some(c) = c {
                    check_command(field, c)?;
                }
            }
            Ok(())
        }
        FlashConfig::SdMux {
            control,
            device,
            tool,
            ..
        } => {
            check_device(device)?;
            if !control.is_absolute() {
                return Err(format!(
                    "control: {} is not an absolute path such as /dev/usb-sd-mux/id-…",
                    control.display()
                ));
            }
            check_command("tool", tool)
        }
        FlashConfig::Command { command, .. } => check_command("command", command),
    }
}

fn check_device(device: &Path) -> Result<(), String> {
    if device.is_absolute() {
        Ok(())
    } else {
        Err(format!(
            "device: {} is not an absolute path such as /dev/disk/by-id/usb-…",
            device.display()
        ))
    }
}

/// The three builds the scenario flashes and pushes.
#[derive(Debug, Clone)]
pub struct LoadedReleases {
    pub v1: Built,
    pub v2: Built,
    pub v3: Built,
}

impl LoadedReleases {
    pub fn as_releases(&self) -> crate::scenario::Releases<'_> {
        crate::scenario::Releases {
            v1: &self.v1,
            v2: Some(&self.v2),
            v3: Some(&self.v3),
        }
    }
}

/// The versions the scenario pushes (`os set 2.0.0`, `os set 3.0.0`).
pub const VERSIONS: [&str; 3] = ["1.0.0", "2.0.0", "3.0.0"];

impl BoxConfig {
    /// The build directories of v1, v2 and v3.
    pub fn release_dirs(&self) -> [PathBuf; 3] {
        match (&self.images, &self.image_dirs) {
            (_, Some(d)) => [d.v1.clone(), d.v2.clone(), d.v3.clone()],
            (Some(d), None) => VERSIONS.map(|v| d.join(v)),
            (None, None) => VERSIONS.map(PathBuf::from),
        }
    }

    /// Reads the three `image.json` files and checks them against this box and the
    /// scenario: versions 1.0.0, 2.0.0, 3.0.0; this box's arch and board; only v3
    /// built with a fault.
    pub fn load_releases(&self) -> Result<LoadedReleases, ConfigError> {
        let [d1, d2, d3] = self.release_dirs();
        let load = |i: usize, dir: &Path| -> Result<Built, ConfigError> {
            let err = |what: String| {
                ConfigError(format!("box {:?}: release v{}: {what}", self.name, i + 1))
            };
            let b = read_built(dir).map_err(err)?;
            if b.version != VERSIONS[i] {
                return Err(err(format!(
                    "{} is version {}, the scenario needs {} (build it with --version {})",
                    dir.display(),
                    b.version,
                    VERSIONS[i],
                    VERSIONS[i]
                )));
            }
            if b.arch != self.arch || b.board != self.board.as_str() {
                return Err(err(format!(
                    "{} is built for {}/{}, the box is {}/{}",
                    dir.display(),
                    b.arch,
                    b.board,
                    self.arch,
                    self.board
                )));
            }
            let want_fault = (i == 2).then_some(Fault::InitPanic);
            if b.fault != want_fault {
                return Err(err(match want_fault {
                    Some(_) => format!(
                        "{} has no fault: v3 must be built with --fault init-panic (it has to fail to boot and roll back)",
                        dir.display()
                    ),
                    None => format!(
                        "{} is built with a fault ({:?}): only v3 may be",
                        dir.display(),
                        b.fault
                    ),
                }));
            }
            Ok(b)
        };
        Ok(LoadedReleases {
            v1: load(0, &d1)?,
            v2: load(1, &d2)?,
            v3: load(2, &d3)?,
        })
    }
}

/// Reads `DIR/image.json`. The files it names are looked up next to it first (the
/// build directory may have been copied to the rig host), then where it says.
pub fn read_built(dir: &Path) -> Result<Built, String> {
    let path = dir.join("image.json");
    let text = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let mut b: Built = serde_json::from_slice(&text).map_err(|e| {
        format!(
            "{}: not an image.json of this cairn-image ({e}): build the image again",
            path.display()
        )
    })?;
    let extra = b.extra.iter_mut().map(|p| &mut p.path);
    for p in [&mut b.disk, &mut b.rootfs].into_iter().chain(extra) {
        let here = p.file_name().map(|n| dir.join(n));
        match here {
            Some(h) if h.exists() => *p = h,
            _ if p.is_absolute() && p.exists() => {}
            _ => {
                return Err(format!(
                    "{} names {}, which is neither in {} nor at that path",
                    path.display(),
                    p.display(),
                    dir.display()
                ));
            }
        }
    }
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_at_names_the_enclosing_box() {
        let t = "[hub]\nlisten = \"x\"\n[[box]]\nname = \"a\"\n[box.power]\nk = 1\n[[box]]\nname = \"b\"\n";
        assert_eq!(box_at(t, 2), None);
        assert_eq!(
            box_at(t, t.find("k = 1").unwrap_or(0)).as_deref(),
            Some("box \"a\"")
        );
        assert_eq!(box_at(t, t.len() - 1).as_deref(), Some("box \"b\""));
    }

    #[test]
    fn host_port() {
        assert!(check_host_port("192.168.50.1:7440").is_ok());
        assert!(check_host_port("hub.lan:7440").is_ok());
        assert!(check_host_port("[fd00::1]:7440").is_ok());
        assert!(check_host_port("hub.lan").is_err());
        assert!(check_host_port(":7440").is_err());
        assert!(check_host_port("hub:0").is_err());
    }
}
