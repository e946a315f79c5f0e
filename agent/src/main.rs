//! `cairn-agent`: the daemon on each edge box, and its local status command.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cairn_agent::{AgentConfig, RunError};
use clap::{Args, Parser, Subcommand};
use serde::Deserialize;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

const AFTER_HELP: &str = "\
Exit codes: 0 stopped cleanly, 1 error (store, files root), 2 bad usage or not
enrolled without a usable join token, 3 enrollment refused (token unknown, expired or used up; device revoked),
10 reboot now and 11 reboot with \"0 tryboot\" (only with --reboot exit).

First start (the token is needed only once):
  cairn-agent run --hub hub.example.net:7440 --join-token cairn1_... --data-dir /var/lib/cairn
Afterwards:
  cairn-agent run --data-dir /var/lib/cairn
  cairn-agent status --data-dir /var/lib/cairn
From a flashed image (`cairn-hub image configure` put hub and token on its ESP):
  cairn-agent run --config /etc/cairn/agent.toml --config /boot/efi/cairn/agent.toml

Logs: RUST_LOG=debug or RUST_LOG=cairn_agent=debug,quinn=warn (default info).";

/// Cairn agent: keeps this box on the desired state its hub signs, online or offline.
#[derive(Parser)]
#[command(name = "cairn-agent", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent.
    Run(Box<RunArgs>),
    /// Install an OS release from a bundle file, without a hub (a USB stick, a
    /// factory line). Run it again after each reboot it asks for: it goes on with the
    /// same job (trial boot, health checks, commit or roll back).
    #[command(after_help = OS_INSTALL_HELP)]
    OsInstall(Box<OsInstallArgs>),
    /// Reboot the box now, after flushing every file system. ARG goes to the boot
    /// firmware: `cairn-agent reboot "0 tryboot"` asks a Raspberry Pi for its one-shot
    /// trial boot (with the Raspberry Pi kernel, whose firmware driver passes it on).
    /// Cairn OS images run it from their init when the agent exits with 11 (a reboot
    /// for a Pi trial, with `--reboot exit`); `--reboot "cairn-agent reboot"` makes the
    /// agent run it itself, appending "0 tryboot" for a trial.
    Reboot {
        /// The restart argument (LINUX_REBOOT_CMD_RESTART2); none for a plain restart.
        arg: Option<String>,
    },
    /// Print identity, hub, connection, revisions and outbox depth.
    Status {
        #[arg(long, default_value = "/var/lib/cairn")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

const OS_INSTALL_HELP: &str = "\
Exit codes: 0 the release is committed (or already running), 1 the install failed or
was rolled back (the reason is printed; the running slot is untouched), 2 bad usage,
10 a reboot is needed and --reboot exit was given (reboot, then run the command again).

Example (a simulated box with file-backed slots):
  cairn-agent os-install release-2.0.0.cairn --release-key 3b6a27bc... \\
    --data-dir /var/lib/cairn --boot file:/var/lib/cairn/boot \\
    --slot-a /dev/disk/by-partlabel/slot-a --slot-b /dev/disk/by-partlabel/slot-b --board nuc";

/// Where the A/B slots are and how the box boots them.
#[derive(Args, Clone, Default)]
struct SlotArgs {
    /// The boot loader's A/B switch: gpt:DISK:A,B (ChromeOS-style partition attribute
    /// bits; A,B are partition numbers or names), sdboot:ESP[:EFIVARS] (systemd-boot
    /// boot counting), efi:A,B[:EFIVARS] (UEFI BootNext/BootOrder; Boot#### numbers in
    /// hex), tryboot:BOOT_DIR:PA,PB (Raspberry Pi autoboot.txt; boot partition
    /// numbers), uboot:FW_ENV_CONFIG (U-Boot environment), file:DIR (the simulation).
    /// The running slot is read from cairn.slot=a|b on the kernel command line (with
    /// tryboot, first from the partition the Pi firmware reports in the device tree).
    /// Without it, OS releases in desired state are refused.
    #[arg(long)]
    boot: Option<String>,
    /// Slot A (a partition or a file) for the rootfs payload.
    #[arg(long)]
    slot_a: Option<PathBuf>,
    /// Slot B.
    #[arg(long)]
    slot_b: Option<PathBuf>,
    /// Where another payload goes in each slot: NAME=PATH_A,PATH_B (e.g. the UKI on
    /// the ESP: uki=/boot/efi/EFI/Linux/cairn-a.efi,/boot/efi/EFI/Linux/cairn-b.efi).
    #[arg(long = "slot-payload", value_name = "NAME=PATH_A,PATH_B")]
    slot_payload: Vec<String>,
    /// Board family that releases must be built for (nuc, rpi4, sim, …).
    #[arg(long)]
    board: Option<String>,
    /// Version of the OS image this box was flashed with (committed until an
    /// upgrade commits) [default: 0.0.0].
    #[arg(long)]
    os_version: Option<String>,
    /// How to reboot: a command line [default: systemctl reboot], or `exit` to stop with
    /// exit code 10 (11: the reboot must pass "0 tryboot") and leave the reboot to the
    /// caller (the image's init, the simulation, tests).
    #[arg(long)]
    reboot: Option<String>,
    /// Flush the slot and record progress every this many MiB [default: 32].
    #[arg(long)]
    checkpoint_mib: Option<u64>,
    /// Where to read the kernel command line (for tests) [default: /proc/cmdline].
    #[arg(long, hide = true)]
    cmdline: Option<PathBuf>,
}

impl SlotArgs {
    fn merge(mut self, file: &FileConfig) -> Self {
        self.boot = self.boot.or(file.boot.clone());
        self.slot_a = self.slot_a.or(file.slot_a.clone());
        self.slot_b = self.slot_b.or(file.slot_b.clone());
        self.board = self.board.or(file.board.clone());
        self.os_version = self.os_version.or(file.os_version.clone());
        self.reboot = self.reboot.or(file.reboot.clone());
        if self.slot_payload.is_empty() {
            self.slot_payload = file.slot_payload.clone().unwrap_or_default();
        }
        self.checkpoint_mib = self.checkpoint_mib.or(file.checkpoint_mib);
        self
    }

    /// The upgrade configuration, `Ok(None)` when no slots are configured.
    fn config(
        &self,
        data_dir: &std::path::Path,
    ) -> Result<Option<cairn_agent::upgrade::UpgradeConfig>, String> {
        use cairn_agent::upgrade::{BootSpec, RebootAction, SlotLayout, UpgradeConfig};
        let (boot, a, b) = match (&self.boot, &self.slot_a, &self.slot_b) {
            (None, None, None) => return Ok(None),
            (Some(boot), Some(a), Some(b)) => (boot, a, b),
            _ => return Err("A/B upgrades need all of --boot, --slot-a and --slot-b".into()),
        };
        let mut extra = Vec::new();
        for p in &self.slot_payload {
            let (name, paths) = p
                .split_once('=')
                .ok_or_else(|| format!("--slot-payload {p:?}: give NAME=PATH_A,PATH_B"))?;
            let (pa, pb) = paths
                .split_once(',')
                .ok_or_else(|| format!("--slot-payload {p:?}: give NAME=PATH_A,PATH_B"))?;
            extra.push((name.to_string(), [PathBuf::from(pa), PathBuf::from(pb)]));
        }
        let layout = SlotLayout {
            rootfs: [a.clone(), b.clone()],
            extra,
        };
        let board = self.board.clone().unwrap_or_else(|| "generic".into());
        let mut cfg = UpgradeConfig::new(BootSpec::parse(boot)?, layout, &board, data_dir);
        if let Some(v) = &self.os_version {
            cairn_sync_protocol::release::parse_version(v).map_err(|e| e.to_string())?;
            cfg.os_version = v.clone();
        }
        match self.reboot.as_deref() {
            None => {}
            Some("exit") => cfg.reboot = RebootAction::Exit,
            Some(cmd) => {
                cfg.reboot =
                    RebootAction::Command(cmd.split_whitespace().map(String::from).collect());
            }
        }
        if let Some(m) = self.checkpoint_mib {
            cfg.checkpoint_bytes = m.max(1) << 20;
        }
        if let Some(c) = &self.cmdline {
            cfg.cmdline = c.clone();
        }
        Ok(Some(cfg))
    }
}

#[derive(Args)]
struct OsInstallArgs {
    /// The release bundle (`cairn-hub release build` makes it).
    bundle: PathBuf,
    /// Public release key (hex) the bundle must be signed with; repeat for several.
    #[arg(long = "release-key", required = true)]
    release_keys: Vec<String>,
    /// Install even if the release is older than the committed one.
    #[arg(long)]
    downgrade: bool,
    /// A command that must succeed on the trial boot before it is committed; repeat.
    #[arg(long = "health-cmd")]
    health_cmds: Vec<String>,
    /// Time the trial boot has to pass its checks.
    #[arg(long, value_parser = humantime::parse_duration, default_value = "5m")]
    health_timeout: Duration,
    #[arg(long, default_value = "/var/lib/cairn")]
    data_dir: PathBuf,
    #[command(flatten)]
    slots: SlotArgs,
}

#[derive(Args)]
struct RunArgs {
    /// TOML file with any of: hub, join_token, data_dir, files_root, reconcile_interval,
    /// backoff_max, keep_alive, hostname, tpm, event_log, ima_log, boot, slot_a, slot_b,
    /// slot_payload (a list of "NAME=PATH_A,PATH_B"), board, os_version, reboot,
    /// checkpoint_mib; durations as for the flags ("30s"). Repeatable: a later file
    /// overrides an earlier one key by key (a list as a whole); flags override them all.
    /// E.g. --config /etc/cairn/agent.toml --config /boot/efi/cairn/agent.toml.
    #[arg(long, value_name = "FILE", env = "CAIRN_AGENT_CONFIG")]
    config: Vec<PathBuf>,
    /// Hub QUIC address, host:port (remembered after enrollment).
    #[arg(long, env = "CAIRN_HUB")]
    hub: Option<String>,
    /// Join token from `cairn-hub token create` (first start only).
    #[arg(long, env = "CAIRN_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Where the database and keys live [default: /var/lib/cairn].
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Managed files are confined below this directory [default: DATA_DIR/files].
    #[arg(long)]
    files_root: Option<PathBuf>,
    /// How often to check managed resources for local drift, e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    reconcile_interval: Option<Duration>,
    /// Longest wait between reconnection attempts.
    #[arg(long, value_parser = humantime::parse_duration)]
    backoff_max: Option<Duration>,
    /// Interval of QUIC keep-alives; keep it well below the hub's idle timeout (30s).
    #[arg(long, value_parser = humantime::parse_duration)]
    keep_alive: Option<Duration>,
    /// Host name reported at enrollment.
    #[arg(long)]
    hostname: Option<String>,
    /// Root of trust the device attests with: `auto` (the TPM at /dev/tpmrm0 if there
    /// is one), `none`, `software` (keys in the data directory; proves nothing about
    /// the hardware, hub policy may refuse it), or a TCTI string such as
    /// device:/dev/tpmrm0 or swtpm:host=127.0.0.1,port=2321. Keep it the same after
    /// enrollment: the hub pins the attestation key. [default: auto]
    #[arg(long, env = "CAIRN_TPM")]
    tpm: Option<String>,
    /// The firmware's TPM event log [default: /sys/kernel/security/tpm0/binary_bios_measurements].
    #[arg(long)]
    event_log: Option<PathBuf>,
    /// IMA's measurement list for the sha256 bank, if the kernel keeps one [default:
    /// /sys/kernel/security/ima/binary_runtime_measurements_sha256].
    #[arg(long)]
    ima_log: Option<PathBuf>,
    #[command(flatten)]
    slots: SlotArgs,
}

/// A config file (`run --config`): the flags' names as keys, each optional.
#[derive(Deserialize, Default, Debug, PartialEq)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    hub: Option<String>,
    join_token: Option<String>,
    data_dir: Option<PathBuf>,
    files_root: Option<PathBuf>,
    #[serde(default, with = "humantime_serde_opt")]
    reconcile_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    backoff_max: Option<Duration>,
    #[serde(default, with = "humantime_serde_opt")]
    keep_alive: Option<Duration>,
    hostname: Option<String>,
    tpm: Option<String>,
    event_log: Option<PathBuf>,
    ima_log: Option<PathBuf>,
    boot: Option<String>,
    slot_a: Option<PathBuf>,
    slot_b: Option<PathBuf>,
    /// As `--slot-payload`, one string per payload.
    slot_payload: Option<Vec<String>>,
    board: Option<String>,
    os_version: Option<String>,
    reboot: Option<String>,
    checkpoint_mib: Option<u64>,
}

impl FileConfig {
    /// Reads one file; errors name it (and toml's name the line and the key).
    fn load(path: &std::path::Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("config file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))
    }

    /// The files in order, each over the ones before it.
    fn load_all(paths: &[PathBuf]) -> Result<Self, String> {
        paths
            .iter()
            .try_fold(Self::default(), |acc, p| Ok(acc.then(Self::load(p)?)))
    }

    /// `later` over `self`: every key `later` has replaces this one's (a list as a
    /// whole). Destructured, so that a new key cannot be forgotten here.
    fn then(self, later: FileConfig) -> FileConfig {
        let FileConfig {
            hub,
            join_token,
            data_dir,
            files_root,
            reconcile_interval,
            backoff_max,
            keep_alive,
            hostname,
            tpm,
            event_log,
            ima_log,
            boot,
            slot_a,
            slot_b,
            slot_payload,
            board,
            os_version,
            reboot,
            checkpoint_mib,
        } = later;
        FileConfig {
            hub: hub.or(self.hub),
            join_token: join_token.or(self.join_token),
            data_dir: data_dir.or(self.data_dir),
            files_root: files_root.or(self.files_root),
            reconcile_interval: reconcile_interval.or(self.reconcile_interval),
            backoff_max: backoff_max.or(self.backoff_max),
            keep_alive: keep_alive.or(self.keep_alive),
            hostname: hostname.or(self.hostname),
            tpm: tpm.or(self.tpm),
            event_log: event_log.or(self.event_log),
            ima_log: ima_log.or(self.ima_log),
            boot: boot.or(self.boot),
            slot_a: slot_a.or(self.slot_a),
            slot_b: slot_b.or(self.slot_b),
            slot_payload: slot_payload.or(self.slot_payload),
            board: board.or(self.board),
            os_version: os_version.or(self.os_version),
            reboot: reboot.or(self.reboot),
            checkpoint_mib: checkpoint_mib.or(self.checkpoint_mib),
        }
    }
}

mod humantime_serde_opt {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s: Option<String> = Option::deserialize(d)?;
        s.map(|s| humantime::parse_duration(&s).map_err(serde::de::Error::custom))
            .transpose()
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // `Targets` understands RUST_LOG's `target=level,...` form without pulling a regex
    // engine into the agent (every megabyte counts on a small box).
    let filter: Targets = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| Targets::new().with_default(tracing::Level::INFO));
    tracing_subscriber::registry()
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
        .with(filter)
        .init();
    match cli.cmd {
        Cmd::Status { data_dir, json } => status(&data_dir, json),
        Cmd::Run(args) => run(*args),
        Cmd::OsInstall(args) => os_install(*args),
        Cmd::Reboot { arg } => {
            let e = cairn_agent::reboot::restart_with(arg.as_deref());
            let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
                " (rebooting needs root, or CAP_SYS_BOOT)"
            } else {
                ""
            };
            eprintln!("error: rebooting: {e}{hint}");
            ExitCode::from(1)
        }
    }
}

fn status(data_dir: &std::path::Path, json: bool) -> ExitCode {
    match cairn_agent::status(data_dir) {
        Ok(s) if json => match serde_json::to_string_pretty(&s) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Ok(s) => {
            let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
            println!("device:      {}", opt(&s.device));
            println!("hub:         {}", opt(&s.hub));
            println!("connection:  {}", s.connection);
            if let Some(r) = &s.revoked {
                println!("revoked:     {r}");
            }
            println!(
                "desired:     revision {} ({} resources)",
                s.desired_revision, s.resources
            );
            println!(
                "applied:     revision {}{}",
                s.applied_revision,
                if s.failing > 0 {
                    format!(", {} failing", s.failing)
                } else {
                    String::new()
                }
            );
            println!(
                "outbox:      {} report(s) queued (last seq {})",
                s.outbox_depth, s.last_seq
            );
            if let Some(v) = &s.os_version {
                println!("os:          {v} (committed)");
            }
            if let Some(u) = &s.upgrade {
                let pct = match (
                    (u.bytes_done * 100).checked_div(u.bytes_total),
                    (u.bytes_downloaded * 100).checked_div(u.bytes_total),
                ) {
                    (Some(w), Some(d)) => format!(", {w}% written, {d}% downloaded"),
                    _ => String::new(),
                };
                println!(
                    "upgrade:     {} {} into slot {}{pct}",
                    u.version, u.phase, u.target_slot
                );
                if let Some(e) = &u.error {
                    println!("             {e}");
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// The agent's configuration: the config files in order, then the flags over them.
/// An error is bad usage (exit code 2).
fn agent_config(args: RunArgs) -> Result<AgentConfig, String> {
    let file = FileConfig::load_all(&args.config)?;
    let slots = args.slots.clone().merge(&file);
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("/var/lib/cairn"));
    // The hub address is remembered after enrollment.
    let remembered = cairn_agent::status(&data_dir).ok().and_then(|s| s.hub);
    let Some(hub) = args.hub.or(file.hub).or(remembered) else {
        return Err("no hub address: pass --hub HOST:PORT (or `hub` in a config file)".into());
    };
    let mut cfg = AgentConfig::new(hub, &data_dir);
    cfg.join_token = args.join_token.or(file.join_token);
    if let Some(r) = args.files_root.or(file.files_root) {
        cfg.files_root = r;
    }
    if let Some(i) = args.reconcile_interval.or(file.reconcile_interval) {
        cfg.reconcile_interval = i;
    }
    if let Some(b) = args.backoff_max.or(file.backoff_max) {
        cfg.backoff_max = b;
    }
    if let Some(k) = args.keep_alive.or(file.keep_alive) {
        cfg.keep_alive = k;
    }
    if let Some(h) = args.hostname.or(file.hostname) {
        cfg.hostname = h;
    }
    cfg.upgrade = slots.config(&data_dir)?;
    let tpm = args.tpm.or(file.tpm).unwrap_or_else(|| "auto".into());
    match cairn_agent::attest::AttestSource::parse(&tpm) {
        Ok(cairn_agent::attest::AttestSource::Tpm { tcti, .. }) => {
            let event_log = args
                .event_log
                .or(file.event_log)
                .unwrap_or_else(|| cairn_agent::attest::FIRMWARE_LOG.into());
            let ima_log = args
                .ima_log
                .or(file.ima_log)
                .unwrap_or_else(|| cairn_agent::attest::IMA_LOG.into());
            cfg.attest = cairn_agent::attest::AttestSource::Tpm {
                tcti,
                event_log,
                ima_log,
            };
        }
        Ok(source) => cfg.attest = source,
        Err(e) => return Err(format!("{e:#}")),
    }
    Ok(cfg)
}

fn run(args: RunArgs) -> ExitCode {
    let cfg = match agent_config(args) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let reboot = cfg.upgrade.as_ref().map(|u| u.reboot.clone());
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = rt.block_on(cairn_agent::run(cfg, async {
        let term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
        match term {
            Ok(mut t) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = t.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        tracing::info!("shutting down");
    }));
    match result {
        Ok(cairn_agent::Stopped::Shutdown) => ExitCode::SUCCESS,
        Ok(cairn_agent::Stopped::Reboot(kind)) => reboot_now(reboot.as_ref(), kind),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(match e {
                RunError::NotEnrolled(_) => 2,
                RunError::EnrollRefused { .. } => 3,
                RunError::Other(_) => 1,
            })
        }
    }
}

/// Reboots as configured, after the agent stopped cleanly.
fn reboot_now(
    action: Option<&cairn_agent::upgrade::RebootAction>,
    kind: cairn_agent::upgrade::boot::RebootKind,
) -> ExitCode {
    use cairn_agent::upgrade::{
        REBOOT_EXIT_CODE, RebootAction, TRYBOOT_EXIT_CODE, boot::RebootKind,
    };
    match action {
        None | Some(RebootAction::Exit) => {
            let code = match kind {
                RebootKind::Normal => REBOOT_EXIT_CODE,
                RebootKind::Tryboot => TRYBOOT_EXIT_CODE,
            };
            tracing::info!(?kind, "stopping for a reboot (exit code {code})");
            ExitCode::from(code as u8)
        }
        Some(RebootAction::Command(argv)) => {
            let mut argv = argv.clone();
            if kind == RebootKind::Tryboot {
                argv.push("0 tryboot".into());
            }
            tracing::info!(command = ?argv, "rebooting");
            let Some((prog, rest)) = argv.split_first() else {
                eprintln!("error: empty reboot command");
                return ExitCode::from(1);
            };
            match std::process::Command::new(prog).args(rest).status() {
                Ok(s) if s.success() => ExitCode::SUCCESS,
                Ok(s) => {
                    eprintln!("error: reboot command {argv:?} exited with {s}");
                    ExitCode::from(1)
                }
                Err(e) => {
                    eprintln!("error: running reboot command {argv:?}: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn os_install(args: OsInstallArgs) -> ExitCode {
    match cairn_agent::upgrade::offline::install(&cairn_agent::upgrade::offline::Request {
        bundle: &args.bundle,
        release_keys: &args.release_keys,
        downgrade: args.downgrade,
        health_cmds: &args.health_cmds,
        health_timeout: args.health_timeout,
        data_dir: &args.data_dir,
        upgrade: match args.slots.config(&args.data_dir) {
            Ok(Some(u)) => u,
            Ok(None) => {
                eprintln!("error: give --boot, --slot-a and --slot-b");
                return ExitCode::from(2);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
    }) {
        Ok(cairn_agent::upgrade::offline::Outcome::Done(msg)) => {
            println!("{msg}");
            ExitCode::SUCCESS
        }
        Ok(cairn_agent::upgrade::offline::Outcome::Failed(msg)) => {
            eprintln!("error: {msg}");
            ExitCode::from(1)
        }
        Ok(cairn_agent::upgrade::offline::Outcome::Reboot(action, kind)) => {
            reboot_now(Some(&action), kind)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(if e.to_string().contains("usage:") {
                2
            } else {
                1
            })
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::path::Path;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn run_args(argv: &[&str]) -> RunArgs {
        let argv = ["cairn-agent", "run"].iter().chain(argv);
        match Cli::try_parse_from(argv).unwrap().cmd {
            Cmd::Run(a) => *a,
            _ => unreachable!(),
        }
    }

    /// The image's own defaults (/etc/cairn/agent.toml in its root filesystem).
    fn image_defaults(dir: &Path) -> PathBuf {
        let data = dir.join("data");
        write(
            dir,
            "etc.toml",
            &format!(
                r#"
hub = "default.example:7440"
data_dir = "{}"
tpm = "none"
reconcile_interval = "1m"
keep_alive = "5s"
hostname = "cairn-box"
boot = "file:{}"
slot_a = "/dev/disk/by-partlabel/slot-a"
slot_b = "/dev/disk/by-partlabel/slot-b"
slot_payload = ["uki=/boot/efi/EFI/Linux/a.efi,/boot/efi/EFI/Linux/b.efi"]
board = "nuc"
checkpoint_mib = 8
"#,
                data.display(),
                dir.join("boot").display()
            ),
        )
    }

    #[test]
    fn later_config_files_override_earlier_ones_key_by_key_and_flags_override_all() {
        let d = tempfile::tempdir().unwrap();
        let etc = image_defaults(d.path());
        let esp = write(
            d.path(),
            "esp.toml",
            r#"
hub = "hub.example.net:7440"
join_token = "cairn1_x"
keep_alive = "7s"
backoff_max = "2m"
slot_payload = ["kernel=/boot/a/vmlinuz,/boot/b/vmlinuz"]
"#,
        );
        let merged = FileConfig::load_all(&[etc.clone(), esp.clone()]).unwrap();
        assert_eq!(merged.hub.as_deref(), Some("hub.example.net:7440"));
        assert_eq!(merged.join_token.as_deref(), Some("cairn1_x"));
        assert_eq!(merged.keep_alive, Some(Duration::from_secs(7)));
        assert_eq!(merged.reconcile_interval, Some(Duration::from_secs(60)));
        assert_eq!(merged.board.as_deref(), Some("nuc"));
        // A list is replaced as a whole.
        assert_eq!(
            merged.slot_payload,
            Some(vec!["kernel=/boot/a/vmlinuz,/boot/b/vmlinuz".to_string()])
        );
        // The other order: the image defaults win.
        let reversed = FileConfig::load_all(&[esp.clone(), etc.clone()]).unwrap();
        assert_eq!(reversed.hub.as_deref(), Some("default.example:7440"));
        assert_eq!(reversed.keep_alive, Some(Duration::from_secs(5)));
        assert_eq!(reversed.join_token.as_deref(), Some("cairn1_x"));

        // Through `run`'s own resolution: files, then flags.
        let (etc_s, esp_s) = (etc.to_str().unwrap(), esp.to_str().unwrap());
        let cfg = agent_config(run_args(&["--config", etc_s, "--config", esp_s])).unwrap();
        assert_eq!(cfg.hub, "hub.example.net:7440");
        assert_eq!(cfg.join_token.as_deref(), Some("cairn1_x"));
        assert_eq!(cfg.data_dir, d.path().join("data"));
        assert_eq!(cfg.keep_alive, Duration::from_secs(7));
        assert_eq!(cfg.backoff_max, Duration::from_secs(120));
        assert_eq!(cfg.reconcile_interval, Duration::from_secs(60));
        assert_eq!(cfg.hostname, "cairn-box");
        let up = cfg.upgrade.unwrap();
        assert_eq!(up.board, "nuc");
        assert_eq!(up.checkpoint_bytes, 8 << 20);
        assert_eq!(
            up.slots.extra,
            [(
                "kernel".to_string(),
                [
                    PathBuf::from("/boot/a/vmlinuz"),
                    PathBuf::from("/boot/b/vmlinuz")
                ]
            )]
        );

        let cfg = agent_config(run_args(&[
            "--config",
            etc_s,
            "--config",
            esp_s,
            "--hub",
            "flag.example:1",
            "--keep-alive",
            "3s",
            "--backoff-max",
            "9s",
            "--hostname",
            "from-flag",
            "--slot-payload",
            "uki=/u/a,/u/b",
            "--checkpoint-mib",
            "4",
        ]))
        .unwrap();
        assert_eq!(cfg.hub, "flag.example:1");
        assert_eq!(cfg.keep_alive, Duration::from_secs(3));
        assert_eq!(cfg.backoff_max, Duration::from_secs(9));
        assert_eq!(cfg.hostname, "from-flag");
        assert_eq!(cfg.join_token.as_deref(), Some("cairn1_x"));
        let up = cfg.upgrade.unwrap();
        assert_eq!(up.checkpoint_bytes, 4 << 20);
        assert_eq!(up.slots.extra[0].0, "uki");
        assert_eq!(up.slots.extra.len(), 1);
    }

    #[test]
    fn a_bad_config_file_is_named_with_the_key_or_line_at_fault() {
        let d = tempfile::tempdir().unwrap();
        let good = image_defaults(d.path());
        let cases = [
            (
                "unknown.toml",
                "hub = \"h:1\"\nslot_payloads = []\n",
                "slot_payloads",
            ),
            ("syntax.toml", "hub = \"h:1\njoin_token = 1\n", "line 1"),
            ("type.toml", "checkpoint_mib = \"lots\"\n", "checkpoint_mib"),
            ("duration.toml", "keep_alive = \"soon\"\n", "keep_alive"),
        ];
        for (name, text, want) in cases {
            let bad = write(d.path(), name, text);
            let args = run_args(&[
                "--config",
                good.to_str().unwrap(),
                "--config",
                bad.to_str().unwrap(),
            ]);
            let e = agent_config(args).unwrap_err();
            assert!(
                e.contains(&format!("config file {}", bad.display())) && e.contains(want),
                "{name}: {e}"
            );
            assert!(!e.contains("etc.toml"), "{name}: blames the good file: {e}");
        }
        let missing = d.path().join("missing.toml");
        let e = FileConfig::load_all(std::slice::from_ref(&missing)).unwrap_err();
        assert!(e.contains(&missing.display().to_string()), "{e}");
    }

    /// What `cairn-hub image configure` writes onto an image's ESP (the hub's unit test
    /// checks it writes exactly this file) is a valid config file for this agent.
    #[test]
    fn the_first_boot_file_the_hub_writes_is_a_valid_config_file() {
        let text = include_str!("../../hub/tests/data/first-boot.toml");
        let f: FileConfig = toml::from_str(text).unwrap();
        let token = f.join_token.clone().unwrap();
        assert_eq!(
            f,
            FileConfig {
                hub: Some("hub.example.net:7440".into()),
                join_token: Some(token.clone()),
                ..FileConfig::default()
            }
        );
        let t = cairn_sync_protocol::token::JoinToken::parse(&token).unwrap();
        assert_eq!(t.ca_fingerprint, [0x33; 32]);
        // Over the image's defaults it sets exactly the hub and the token.
        let d = tempfile::tempdir().unwrap();
        let etc = image_defaults(d.path());
        let esp = write(d.path(), "agent.toml", text);
        let cfg = agent_config(run_args(&[
            "--config",
            etc.to_str().unwrap(),
            "--config",
            esp.to_str().unwrap(),
        ]))
        .unwrap();
        assert_eq!(cfg.hub, "hub.example.net:7440");
        assert_eq!(cfg.join_token, Some(token));
        assert_eq!(cfg.keep_alive, Duration::from_secs(5));
    }
}
