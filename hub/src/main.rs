//! `cairn-hub`: the hub server (`serve`) and the operator CLI (everything else).
#![forbid(unsafe_code)]

mod image_cmd;
mod release_cmd;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use cairn_hub::cli::{self, CliError, CliResult, Client, Connect, exit};
use cairn_hub::server::{self, HubConfig};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

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
    Token(TokenCmd),
    /// List devices (table: id, labels, status, desired vs applied revision, drift), or
    /// act on one.
    Devices {
        #[command(subcommand)]
        cmd: Option<DevicesCmd>,
    },
    /// Show one device.
    Device {
        #[command(subcommand)]
        cmd: DeviceCmd,
    },
    /// Set a managed file in the desired state of a device or of every device matching a
    /// label selector (also devices that enroll later).
    Set(SetArgs),
    /// Remove a resource from the desired state of a device or selector.
    Unset(UnsetArgs),
    /// List events reported by agents and recorded by the hub.
    Events(EventsArgs),
    /// List labels in use with their device counts.
    Labels,
    /// Attestation policies: which devices must prove what (TPM identity, measured boot).
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// OS releases: signing keys, building and verifying bundles (offline), pushing them
    /// to the hub, listing them and following rollouts.
    #[command(subcommand)]
    Release(release_cmd::ReleaseCmd),
    /// The desired OS release of devices (A/B upgrade with trial boot and rollback).
    #[command(subcommand)]
    Os(release_cmd::OsCmd),
    /// Disk images to flash: write or show the first-boot configuration (hub address,
    /// join token) on an image's EFI System Partition, offline.
    #[command(subcommand, after_help = image_cmd::AFTER_HELP)]
    Image(image_cmd::ImageCmd),
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// List policies, first match first.
    Ls,
    /// Create or replace a policy. Devices matching no policy are attested and recorded
    /// but never quarantined for their measurements.
    ///
    /// Examples:
    ///   cairn-hub policy set kiosks --selector role=kiosk --require tpm --tofu
    ///   cairn-hub policy set lab --selector site=lab --pcrs 0-7,9 --golden 4=ab12…
    #[command(verbatim_doc_comment)]
    Set {
        /// Policy name (letters, digits, '-', '_', '.'); setting an existing name replaces it.
        name: String,
        /// Devices it applies to: key=value, key!=value or key, comma-separated.
        #[arg(long)]
        selector: String,
        /// Identity a device needs: none, software (a software TPM or a TPM the hub
        /// cannot vouch for), tpm (EK certificate chaining to a CA given with
        /// `serve --ek-ca`). Checked at enrollment and on every connection.
        #[arg(long, default_value = "none")]
        require: String,
        /// PCRs (sha256 bank) to quote and compare, e.g. 0-7 or 0,2,4,7.
        #[arg(long, default_value = "0-7")]
        pcrs: String,
        /// Trust on first use: the first verified measurements become the device's
        /// accepted set; a later change quarantines it.
        #[arg(long)]
        tofu: bool,
        /// Allowed value of a PCR, as INDEX=HEX (repeatable; several per PCR allowed).
        #[arg(long)]
        golden: Vec<String>,
        /// Lower is checked first.
        #[arg(long, default_value_t = 100)]
        priority: i64,
    },
    /// Delete a policy.
    Rm { name: String },
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

#[derive(Subcommand)]
enum TokenCmd {
    /// Create a join token and print it (shown only once).
    Create {
        /// How long the token is valid, e.g. 30m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// How many devices may enroll with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Labels for devices enrolled with it, e.g. site=paris,role=kiosk.
        #[arg(long, default_value = "")]
        labels: String,
    },
    /// List tokens (without their secrets).
    #[command(visible_alias = "ls")]
    List,
}

#[derive(Subcommand)]
enum DevicesCmd {
    /// List devices (the default).
    #[command(visible_alias = "ls")]
    List,
    /// Revoke a device: its connection is closed at once and it can never sync again.
    Revoke { id: String },
    /// Replace a device's labels, e.g. `devices label dev-1a2b site=paris,role=kiosk`.
    Label { id: String, labels: String },
}

fn parse_pcrs(s: &str) -> CliResult<Vec<u32>> {
    let usage = |what: &str| CliError {
        code: exit::USAGE,
        error: anyhow::anyhow!("--pcrs {s:?}: {what}; write e.g. 0-7 or 0,2,4,7"),
    };
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u32, u32) = (
            a.trim().parse().map_err(|_| usage("not a number"))?,
            b.trim().parse().map_err(|_| usage("not a number"))?,
        );
        if a > b || b > 23 {
            return Err(usage("PCRs are 0-23"));
        }
        out.extend(a..=b);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

#[derive(Subcommand)]
enum DeviceCmd {
    /// Show one device with its attestation and recent events.
    Show { id: String },
    /// Save the boot event log of a device's last verified attestation (TCG PC Client
    /// format, as the firmware wrote it): the reference for predicting what a new
    /// release will measure (`cairn-image predict`), or for `tpm2_eventlog`.
    Eventlog {
        id: String,
        /// File to write; `-` for stdout.
        #[arg(long)]
        out: PathBuf,
    },
    /// Accept a quarantined device's current measurements (e.g. after a firmware update
    /// you made on purpose): they become its accepted set and desired state flows again.
    Accept { id: String },
    /// Pre-approve measurements a device is about to take (a planned firmware update, a
    /// new boot chain): a quote matching them is trusted, with no quarantine window.
    /// Releases whose manifests predict PCRs add these by themselves.
    Expect {
        id: String,
        /// What they are, e.g. "bios 1.2"; expecting the same source again replaces it.
        #[arg(long)]
        source: String,
        /// INDEX=HEX (sha256 bank), repeatable: e.g. --pcr 0=3d45… --pcr 4=9a1c…
        #[arg(long = "pcr", required = true)]
        pcrs: Vec<String>,
    },
    /// Remove the expected measurements of a source.
    Unexpect {
        id: String,
        #[arg(long)]
        source: String,
    },
}

#[derive(Args)]
#[group(id = "target", required = true, multiple = false)]
pub(crate) struct TargetArgs {
    /// One device id.
    #[arg(long, group = "target")]
    pub(crate) device: Option<String>,
    /// Label selector: key=value, key!=value or key, comma-separated, all must hold.
    #[arg(long, group = "target")]
    pub(crate) selector: Option<String>,
}

#[derive(Args)]
struct SetArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Resource name, e.g. motd.
    name: String,
    /// File path below the agent's files root, e.g. etc/motd.
    #[arg(long)]
    path: String,
    /// File content as text.
    #[arg(long, conflicts_with = "content_file")]
    content: Option<String>,
    /// Read the content from this local file.
    #[arg(long)]
    content_file: Option<PathBuf>,
    /// Permission bits in octal.
    #[arg(long, default_value = "644")]
    mode: String,
    /// Numeric owner.
    #[arg(long)]
    uid: Option<u32>,
    /// Numeric group.
    #[arg(long)]
    gid: Option<u32>,
}

#[derive(Args)]
struct UnsetArgs {
    #[command(flatten)]
    target: TargetArgs,
    /// Resource name.
    name: String,
}

#[derive(Args)]
struct EventsArgs {
    /// Only this device's events.
    #[arg(long)]
    device: Option<String>,
    /// Only this kind, e.g. drift-corrected, applied, hub.enrolled.
    #[arg(long)]
    kind: Option<String>,
    /// Only events after this id.
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// At most this many (without --follow).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Keep printing new events as they arrive.
    #[arg(long, short)]
    follow: bool,
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
        Cmd::Release(r) if release_cmd::is_offline(&r) => release_cmd::offline(r, json),
        Cmd::Image(i) => image_cmd::run(i, json),
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

fn parse_mode(s: &str) -> CliResult<u32> {
    u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| CliError {
        code: exit::USAGE,
        error: anyhow::anyhow!("--mode {s:?} is not an octal number such as 644"),
    })
}

async fn operate(client: &Client, cmd: Cmd, json: bool) -> CliResult<()> {
    match cmd {
        Cmd::Serve(_) | Cmd::Image(_) => unreachable!("handled by run"),
        Cmd::Token(TokenCmd::Create { ttl, uses, labels }) => {
            let body = json!({ "ttl_secs": ttl.as_secs().max(1), "uses": uses, "labels": labels });
            let t: Value = client.post("/v1/tokens", &body).await?;
            if json {
                cli::print_json(&t)?;
            } else {
                println!("{}", t["token"].as_str().unwrap_or_default());
                eprintln!(
                    "token {}: {} use(s), expires in {}, labels {}",
                    t["id"].as_str().unwrap_or_default(),
                    uses,
                    humantime::format_duration(ttl),
                    if labels.is_empty() { "(none)" } else { &labels }
                );
            }
        }
        Cmd::Token(TokenCmd::List) => {
            let ts: Vec<Value> = client.get("/v1/tokens").await?;
            if json {
                cli::print_json(&ts)?;
            } else {
                let now = cairn_hub::endpoint::now_ms();
                let rows: Vec<Vec<String>> = ts
                    .iter()
                    .map(|t| {
                        let exp = t["expires_ms"].as_u64().unwrap_or(0);
                        vec![
                            t["id"].as_str().unwrap_or("").to_string(),
                            format!("{}/{}", t["uses_left"], t["uses_total"]),
                            if exp <= now {
                                "expired".into()
                            } else {
                                format!(
                                    "in {}",
                                    humantime::format_duration(Duration::from_secs(
                                        (exp - now) / 1000
                                    ))
                                )
                            },
                            cli::labels_of(t),
                        ]
                    })
                    .collect();
                cli::print_table(&["ID", "USES LEFT", "EXPIRES", "LABELS"], &rows);
            }
        }
        Cmd::Devices {
            cmd: None | Some(DevicesCmd::List),
        } => {
            let ds: Vec<Value> = client.get("/v1/devices").await?;
            if json {
                cli::print_json(&ds)?;
            } else {
                let rows: Vec<Vec<String>> = ds.iter().map(cli::device_row).collect();
                cli::print_table(&cli::DEVICE_HEADER, &rows);
            }
        }
        Cmd::Devices {
            cmd: Some(DevicesCmd::Revoke { id }),
        } => {
            let r: Value = client
                .post(&format!("/v1/devices/{id}/revoke"), &json!({}))
                .await?;
            if json {
                cli::print_json(&r)?;
            } else {
                let how = if r["disconnected"].as_bool().unwrap_or(false) {
                    "its connection was closed"
                } else {
                    "it was not connected"
                };
                println!("revoked {id}; {how}");
            }
        }
        Cmd::Devices {
            cmd: Some(DevicesCmd::Label { id, labels }),
        } => {
            let r: Value = client
                .put(
                    &format!("/v1/devices/{id}/labels"),
                    &json!({ "labels": labels }),
                )
                .await?;
            if json {
                cli::print_json(&r)?;
            } else {
                let changed = r["changed"].as_array().map_or(0, Vec::len);
                println!(
                    "labels of {id} set to {labels}; desired state {}",
                    if changed > 0 { "changed" } else { "unchanged" }
                );
            }
        }
        Cmd::Device {
            cmd: DeviceCmd::Eventlog { id, out },
        } => {
            use anyhow::Context as _;
            let v: Value = client
                .get(&format!("/v1/devices/{id}/attestation/log"))
                .await?;
            let log = base64::engine::general_purpose::STANDARD
                .decode(v["log_base64"].as_str().unwrap_or_default())
                .context("the hub sent a log that is not base64")?;
            if out.as_os_str() == "-" {
                use std::io::Write as _;
                std::io::stdout()
                    .write_all(&log)
                    .context("writing the log to stdout")?;
            } else {
                std::fs::write(&out, &log).with_context(|| format!("writing {}", out.display()))?;
                if json {
                    cli::print_json(
                        &json!({"device": id, "out": out, "len": log.len(), "pcrs": v["pcrs"]}),
                    )?;
                } else {
                    println!(
                        "{} bytes of boot event log of {id} written to {}",
                        log.len(),
                        out.display()
                    );
                }
            }
        }
        Cmd::Device {
            cmd: DeviceCmd::Accept { id },
        } => {
            // Accept exactly what is shown: the hub refuses if newer measurements
            // arrived in between.
            let seen: Value = client.get(&format!("/v1/devices/{id}/attestation")).await?;
            let body = json!({ "verified_ms": seen["verified_ms"] });
            let a: Value = client
                .post(&format!("/v1/devices/{id}/attestation/accept"), &body)
                .await?;
            if json {
                cli::print_json(&a)?;
            } else {
                cli::print_attestation(&a);
                println!(
                    "accepted these measurements of {id}; it is trusted again and gets desired state"
                );
            }
        }
        Cmd::Device {
            cmd: DeviceCmd::Expect { id, source, pcrs },
        } => {
            let mut map = serde_json::Map::new();
            for p in &pcrs {
                let Some((i, v)) = p.split_once('=') else {
                    return Err(CliError {
                        code: exit::USAGE,
                        error: anyhow::anyhow!("--pcr {p:?}: write INDEX=HEX, e.g. 4=9a1c…"),
                    });
                };
                map.insert(i.trim().to_string(), json!(v.trim()));
            }
            let body = json!({ "source": source, "added_ms": 0, "pcrs": map });
            let a: Value = client
                .post(&format!("/v1/devices/{id}/attestation/expected"), &body)
                .await?;
            if json {
                cli::print_json(&a)?;
            } else {
                println!(
                    "{id} may now also measure {source:?} ({} PCRs) without quarantine",
                    pcrs.len()
                );
            }
        }
        Cmd::Device {
            cmd: DeviceCmd::Unexpect { id, source },
        } => {
            let a: Value = client
                .delete(&format!(
                    "/v1/devices/{id}/attestation/expected?source={}",
                    url_escape(&source)
                ))
                .await?;
            if json {
                cli::print_json(&a)?;
            } else {
                println!("removed the expected measurements {source:?} of {id}");
            }
        }
        Cmd::Policy(PolicyCmd::Ls) => {
            let ps: Vec<Value> = client.get("/v1/attestation/policies").await?;
            if json {
                cli::print_json(&ps)?;
            } else {
                let mut ps = ps;
                ps.sort_by_key(|p| (p["priority"].as_i64().unwrap_or(0), p["name"].to_string()));
                let rows: Vec<Vec<String>> = ps.iter().map(cli::policy_row).collect();
                cli::print_table(
                    &[
                        "NAME", "PRIORITY", "SELECTOR", "REQUIRE", "PCRS", "TOFU", "GOLDEN",
                    ],
                    &rows,
                );
            }
        }
        Cmd::Policy(PolicyCmd::Set {
            name,
            selector,
            require,
            pcrs,
            tofu,
            golden,
            priority,
        }) => {
            let mut gold: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
            for g in &golden {
                let Some((i, v)) = g.split_once('=') else {
                    return Err(CliError {
                        code: exit::USAGE,
                        error: anyhow::anyhow!("--golden {g:?}: write INDEX=HEX, e.g. 4=ab12…"),
                    });
                };
                let i: u32 = i.trim().parse().map_err(|_| CliError {
                    code: exit::USAGE,
                    error: anyhow::anyhow!("--golden {g:?}: {i:?} is not a PCR index"),
                })?;
                gold.entry(i).or_default().push(v.trim().to_lowercase());
            }
            let body = json!({
                "name": name, "selector": selector, "priority": priority, "require": require,
                "pcrs": parse_pcrs(&pcrs)?, "tofu": tofu, "golden": gold,
            });
            let p: Value = client.put("/v1/attestation/policies", &body).await?;
            if json {
                cli::print_json(&p)?;
            } else {
                println!(
                    "policy {name} applies to devices matching {selector} from their next connection"
                );
            }
        }
        Cmd::Policy(PolicyCmd::Rm { name }) => {
            let r: Value = client
                .delete(&format!("/v1/attestation/policies/{name}"))
                .await?;
            if json {
                cli::print_json(&r)?;
            } else {
                println!("policy {name} deleted");
            }
        }
        Cmd::Device {
            cmd: DeviceCmd::Show { id },
        } => {
            let d: Value = client.get(&format!("/v1/devices/{id}")).await?;
            let attestation: Option<Value> = if d["attestation"].is_null() {
                None
            } else {
                Some(client.get(&format!("/v1/devices/{id}/attestation")).await?)
            };
            let state: Value = client.get(&format!("/v1/devices/{id}/state")).await?;
            let evs: Vec<Value> = client
                .get_query(
                    "/v1/events",
                    &[("device", id.clone()), ("limit", "100000".into())],
                )
                .await?;
            if json {
                cli::print_json(
                    &json!({ "device": d, "attestation": attestation, "desired": state, "events": evs }),
                )?;
            } else {
                let row = cli::device_row(&d);
                for (k, v) in cli::DEVICE_HEADER.iter().zip(&row) {
                    println!("{:<13} {v}", format!("{}:", k.to_lowercase()));
                }
                println!(
                    "{:<13} {}",
                    "agent:",
                    d["agent_version"].as_str().unwrap_or("")
                );
                println!(
                    "{:<13} revision {} (the newest the agent confirmed it stored)",
                    "stored:", d["stored_revision"]
                );
                println!("{:<13} {}", "reports:", d["reports_acked"]);
                cli::print_upgrade(&d);
                match &attestation {
                    Some(a) => cli::print_attestation(a),
                    None => println!("{:<13} none (enrolled without a TPM)", "identity:"),
                }
                println!("desired state (revision {}):", state["revision"]);
                let empty = Vec::new();
                for r in state["resources"].as_array().unwrap_or(&empty) {
                    if r["kind"] == "os" {
                        println!(
                            "  {:<16} release {} (id {}), downgrade {}, trial boot {}s",
                            r["name"].as_str().unwrap_or(""),
                            r["version"].as_str().unwrap_or("?"),
                            &r["content_sha256"].as_str().unwrap_or("")
                                [..16.min(r["content_sha256"].as_str().unwrap_or("").len())],
                            if r["allow_downgrade"].as_bool().unwrap_or(false) {
                                "allowed"
                            } else {
                                "refused"
                            },
                            r["health_timeout_s"]
                        );
                        continue;
                    }
                    println!(
                        "  {:<16} {} {:o} {} bytes sha256:{}",
                        r["name"].as_str().unwrap_or(""),
                        r["path"].as_str().unwrap_or(""),
                        r["mode"].as_u64().unwrap_or(0),
                        r["size"],
                        &r["content_sha256"].as_str().unwrap_or("")
                            [..12.min(r["content_sha256"].as_str().unwrap_or("").len())]
                    );
                }
                println!("recent events:");
                for e in evs.iter().rev().take(10).rev() {
                    cli::print_event(e);
                }
            }
        }
        Cmd::Set(a) => {
            let content = match (&a.content, &a.content_file) {
                (_, Some(f)) => {
                    std::fs::read(f).map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?
                }
                (Some(c), None) => c.clone().into_bytes(),
                (None, None) => Vec::new(),
            };
            let file = json!({
                "path": a.path,
                "content_base64": base64::engine::general_purpose::STANDARD.encode(content),
                "mode": parse_mode(&a.mode)?,
                "uid": a.uid,
                "gid": a.gid,
            });
            let body = cli::state_change(a.target.device, a.target.selector, &a.name, Some(file));
            print_outcome(client.post("/v1/state", &body).await?, json)?;
        }
        Cmd::Unset(a) => {
            let body = cli::state_change(a.target.device, a.target.selector, &a.name, None);
            print_outcome(client.post("/v1/state", &body).await?, json)?;
        }
        Cmd::Events(a) => events(client, a, json).await?,
        Cmd::Release(r) => release_cmd::online(client, r, json).await?,
        Cmd::Os(o) => print_outcome(release_cmd::os(client, o, json).await?, json)?,
        Cmd::Labels => {
            let ls: Vec<Value> = client.get("/v1/labels").await?;
            if json {
                cli::print_json(&ls)?;
            } else {
                let rows: Vec<Vec<String>> = ls
                    .iter()
                    .map(|l| {
                        vec![
                            l["key"].as_str().unwrap_or("").to_string(),
                            l["value"].as_str().unwrap_or("").to_string(),
                            l["devices"].to_string(),
                        ]
                    })
                    .collect();
                cli::print_table(&["KEY", "VALUE", "DEVICES"], &rows);
            }
        }
    }
    Ok(())
}

/// Percent-encodes a query value.
fn url_escape(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn print_outcome(out: Value, json: bool) -> CliResult<()> {
    if json {
        return cli::print_json(&out);
    }
    let changed = out["changed"].as_array().map_or(0, Vec::len);
    let matched = out["matched"].as_u64().unwrap_or(0);
    println!(
        "{matched} {} match; {changed} got a new signed revision and {} being updated",
        if matched == 1 { "device" } else { "devices" },
        if changed == 1 { "is" } else { "are" },
    );
    Ok(())
}

async fn events(client: &Client, a: EventsArgs, json: bool) -> CliResult<()> {
    let mut after = a.after;
    loop {
        let mut q = vec![("after", after.to_string()), ("limit", a.limit.to_string())];
        if let Some(d) = &a.device {
            q.push(("device", d.clone()));
        }
        if let Some(k) = &a.kind {
            q.push(("kind", k.clone()));
        }
        if a.follow {
            q.push(("wait_ms", "30000".into()));
        }
        let evs: Vec<Value> = client.get_query("/v1/events", &q).await?;
        if let Some(last) = evs.last().and_then(|e| e["id"].as_u64()) {
            after = last;
        }
        if json {
            if a.follow {
                for e in &evs {
                    println!("{}", serde_json::to_string(e)?);
                }
            } else {
                cli::print_json(&evs)?;
            }
        } else {
            for e in &evs {
                cli::print_event(e);
            }
        }
        if !a.follow {
            return Ok(());
        }
    }
}
