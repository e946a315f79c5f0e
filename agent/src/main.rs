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
enrolled without a usable join token, 3 enrollment refused (token unknown, expired or used up; device revoked).

First start (the token is needed only once):
  cairn-agent run --hub hub.example.net:7440 --join-token cairn1_... --data-dir /var/lib/cairn
Afterwards:
  cairn-agent run --data-dir /var/lib/cairn
  cairn-agent status --data-dir /var/lib/cairn

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
    /// Print identity, hub, connection, revisions and outbox depth.
    Status {
        #[arg(long, default_value = "/var/lib/cairn")]
        data_dir: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// TOML file with any of: hub, data_dir, files_root, join_token, reconcile_interval,
    /// tpm, event_log, ima_log.
    /// Flags override it.
    #[arg(long, env = "CAIRN_AGENT_CONFIG")]
    config: Option<PathBuf>,
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
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    hub: Option<String>,
    join_token: Option<String>,
    data_dir: Option<PathBuf>,
    files_root: Option<PathBuf>,
    #[serde(default, with = "humantime_serde_opt")]
    reconcile_interval: Option<Duration>,
    tpm: Option<String>,
    event_log: Option<PathBuf>,
    ima_log: Option<PathBuf>,
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
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(args: RunArgs) -> ExitCode {
    let file = match &args.config {
        Some(p) => match std::fs::read_to_string(p)
            .map_err(anyhow::Error::from)
            .and_then(|t| toml::from_str::<FileConfig>(&t).map_err(Into::into))
        {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: config file {}: {e:#}", p.display());
                return ExitCode::from(2);
            }
        },
        None => FileConfig::default(),
    };
    let data_dir = args
        .data_dir
        .or(file.data_dir)
        .unwrap_or_else(|| PathBuf::from("/var/lib/cairn"));
    // The hub address is remembered after enrollment.
    let remembered = cairn_agent::status(&data_dir).ok().and_then(|s| s.hub);
    let Some(hub) = args.hub.or(file.hub).or(remembered) else {
        eprintln!("error: no hub address: pass --hub HOST:PORT (or `hub` in the config file)");
        return ExitCode::from(2);
    };
    let mut cfg = AgentConfig::new(hub, &data_dir);
    cfg.join_token = args.join_token.or(file.join_token);
    if let Some(r) = args.files_root.or(file.files_root) {
        cfg.files_root = r;
    }
    if let Some(i) = args.reconcile_interval.or(file.reconcile_interval) {
        cfg.reconcile_interval = i;
    }
    if let Some(b) = args.backoff_max {
        cfg.backoff_max = b;
    }
    if let Some(k) = args.keep_alive {
        cfg.keep_alive = k;
    }
    if let Some(h) = args.hostname {
        cfg.hostname = h;
    }
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
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    }
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
        Ok(()) => ExitCode::SUCCESS,
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
