//! `cairn-hub`: the hub server (`serve`) and the operator CLI (everything else).
#![forbid(unsafe_code)]

mod cmd;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cairn_hub::cli::{self, CliError, CliResult, Client, Connect, exit};
use cairn_hub::server::{self, HubConfig};
use clap::{Args, Parser, Subcommand};

const AFTER_HELP: &str = "\
Exit codes: 0 ok, 1 the hub refused or failed, 2 bad usage or no hub configured,
3 no such device, 4 admin token refused, 5 hub unreachable, 6 already there
(`image configure` without --force). `cairn-hub image --help` has the image's.

Getting started on one machine:
  cairn-hub serve &                                  # creates keys and DB, writes cli.toml
  cairn-hub token create --ttl 1h --uses 10 --labels site=paris
  cairn-agent run --hub 127.0.0.1:7440 --join-token cairn1_... --data-dir /var/lib/cairn
  cairn-hub set --selector site=paris motd --path etc/motd --content 'hello'
  cairn-hub devices

OS upgrades (A/B):
  cairn-hub release keygen --out release.pem && cairn-hub release key add release.pem.pub
  cairn-hub release build rootfs.img --version 1.2.0 --arch x86_64 --board nuc \
      --key release.pem --out os-1.2.0.cairn
  cairn-hub release push os-1.2.0.cairn
  cairn-hub os set --selector site=paris 1.2.0
  cairn-hub release status 1.2.0

Flashable images (offline; the first-boot configuration goes onto the image's ESP):
  cairn-hub token create --ttl 24h --uses 20 --labels site=paris > batch.token
  cairn-hub image configure cairn.img --hub hub.example.net:7440 --token-file batch.token
  cairn-hub image show cairn.img

Logs: RUST_LOG=cairn_hub=debug (default info).";

/// Cairn hub: manages a fleet of edge boxes that dial home over QUIC.
#[derive(Parser)]
#[command(name = "cairn-hub", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(flatten)]
    connect: Connect,
    /// Print machine-readable JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the hub: the agents' QUIC endpoint and the admin API.
    Serve(ServeArgs),
    /// Create and list join tokens.
    #[command(subcommand)]
    Token(cmd::token::TokenCmd),
    /// List devices (table: id, labels, status, desired vs applied revision, drift), or
    /// act on one.
    Devices {
        #[command(subcommand)]
        cmd: Option<cmd::device::DevicesCmd>,
    },
    /// Show one device.
    Device {
        #[command(subcommand)]
        cmd: cmd::device::DeviceCmd,
    },
    /// Set a managed file in the desired state of a device or of every device matching a
    /// label selector (also devices that enroll later).
    Set(cmd::state::SetArgs),
    /// Remove a resource from the desired state of a device or selector.
    Unset(cmd::state::UnsetArgs),
    /// List events reported by agents and recorded by the hub.
    Events(cmd::events::EventsArgs),
    /// List labels in use with their device counts.
    Labels,
    /// Attestation policies: which devices must prove what (TPM identity, measured boot).
    #[command(subcommand)]
    Policy(cmd::policy::PolicyCmd),
    /// OS releases: signing keys, building and verifying bundles (offline), pushing them
    /// to the hub, listing them and following rollouts.
    #[command(subcommand)]
    Release(cmd::release::ReleaseCmd),
    /// The desired OS release of devices (A/B upgrade with trial boot and rollback).
    #[command(subcommand)]
    Os(cmd::release::OsCmd),
    /// Disk images to flash: write or show the first-boot configuration (hub address,
    /// join token) on an image's EFI System Partition, offline.
    #[command(subcommand, after_help = cmd::image::AFTER_HELP)]
    Image(cmd::image::ImageCmd),
}

#[derive(Args)]
struct ServeArgs {
    /// Where keys, the database and cli.toml live [default: ~/.local/share/cairn-hub].
    #[arg(long, env = "CAIRN_HUB_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// UDP address for agents (QUIC).
    #[arg(long, default_value = "0.0.0.0:7440")]
    listen: SocketAddr,
    /// TCP address of the admin API (HTTPS). Local only by default.
    #[arg(long, default_value = "127.0.0.1:7443")]
    admin_listen: SocketAddr,
    /// Extra DNS name or IP for the hub certificate (repeatable), for remote admin access.
    #[arg(long = "name")]
    names: Vec<String>,
    /// A connection silent for this long is considered dead.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    idle_timeout: Duration,
    /// PEM file of TPM manufacturer CA certificates (roots and intermediates) that EK
    /// certificates must chain to (repeatable). Without it, TPM devices enroll as
    /// `tpm-unverified`, and policies requiring `tpm` refuse them.
    #[arg(long = "ek-ca")]
    ek_ca: Vec<PathBuf>,
    /// How often a connected attested device must quote again.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    attest_interval: Duration,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.exit(),
    }
}

async fn run(cli: Cli) -> CliResult<()> {
    let json = cli.json;
    match cli.cmd {
        Cmd::Serve(a) => serve(a).await,
        Cmd::Release(r) if cmd::release::is_offline(&r) => cmd::release::offline(r, json),
        Cmd::Image(i) => cmd::image::run(i, json),
        cmd => {
            let client = Client::from_connect(&cli.connect)?;
            operate(&client, cmd, json).await
        }
    }
}

async fn serve(a: ServeArgs) -> CliResult<()> {
    let mut cfg = HubConfig::new(a.data_dir.unwrap_or_else(cli::default_data_dir));
    cfg.listen = a.listen;
    cfg.admin_listen = a.admin_listen;
    cfg.names = a.names;
    cfg.idle_timeout = a.idle_timeout;
    cfg.attest.interval = a.attest_interval;
    if !a.ek_ca.is_empty() {
        let mut pem = Vec::new();
        for path in &a.ek_ca {
            let bytes = std::fs::read(path).map_err(|e| CliError {
                code: exit::USAGE,
                error: anyhow::anyhow!("reading --ek-ca {}: {e}", path.display()),
            })?;
            pem.extend(bytes);
            pem.push(b'\n');
        }
        let trust = cairn_tpm::ekcert::EkTrust::from_pem(&pem).map_err(|e| CliError {
            code: exit::USAGE,
            error: anyhow::anyhow!("--ek-ca: {e}"),
        })?;
        cfg.attest.ek_trust = Some(std::sync::Arc::new(trust));
    }
    let hub = server::start(cfg.clone()).await?;
    eprintln!(
        "cairn-hub: agents connect to {} (QUIC), admin API at {}\n\
         operator CLI: export CAIRN_CONFIG={}",
        hub.endpoints.quic,
        hub.endpoints.admin_url,
        cfg.data_dir.join("cli.toml").display()
    );
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    hub.shutdown().await;
    Ok(())
}

async fn operate(client: &Client, cmd: Cmd, json: bool) -> CliResult<()> {
    match cmd {
        Cmd::Serve(_) | Cmd::Image(_) => unreachable!("handled by run"),
        Cmd::Token(c) => cmd::token::run(client, c, json).await,
        Cmd::Devices { cmd: c } => cmd::device::devices(client, c, json).await,
        Cmd::Device { cmd: c } => cmd::device::device(client, c, json).await,
        Cmd::Policy(c) => cmd::policy::run(client, c, json).await,
        Cmd::Set(a) => cmd::state::set(client, a, json).await,
        Cmd::Unset(a) => cmd::state::unset(client, a, json).await,
        Cmd::Labels => cmd::state::labels(client, json).await,
        Cmd::Events(a) => cmd::events::run(client, a, json).await,
        Cmd::Release(r) => cmd::release::online(client, r, json).await,
        Cmd::Os(o) => cmd::state::print_outcome(cmd::release::os(client, o, json).await?, json),
    }
}
