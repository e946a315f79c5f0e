//! `cairn-hub devices` and `cairn-hub device`: listing, revoking and labelling devices;
//! one device's state, attestation, boot event log and expected measurements.

use std::path::PathBuf;

use base64::Engine;
use cairn_hub::api::{
    AcceptRequest, DesiredView, DeviceDetail, DeviceView, EventLogView, Revoked, SetLabels,
};
use cairn_hub::attest::MeasurementSet;
use cairn_hub::cli::{self, CliError, CliResult, Client, exit};
use cairn_hub::store::{AssignOutcome, AttestRecord, EventRecord};
use clap::Subcommand;
use serde_json::json;

use super::events::url_escape;

#[derive(Subcommand)]
pub(crate) enum DevicesCmd {
    /// List devices (the default).
    #[command(visible_alias = "ls")]
    List,
    /// Revoke a device: its connection is closed at once and it can never sync again.
    Revoke { id: String },
    /// Replace a device's labels, e.g. `devices label dev-1a2b site=paris,role=kiosk`.
    Label { id: String, labels: String },
}

#[derive(Subcommand)]
pub(crate) enum DeviceCmd {
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

pub(crate) async fn devices(client: &Client, cmd: Option<DevicesCmd>, json: bool) -> CliResult<()> {
    match cmd {
        None | Some(DevicesCmd::List) => {
            let ds: Vec<DeviceView> = client.get("/v1/devices").await?;
            if json {
                cli::print_json(&ds)?;
            } else {
                let rows: Vec<Vec<String>> = ds.iter().map(cli::device_row).collect();
                cli::print_table(&cli::DEVICE_HEADER, &rows);
            }
        }
        Some(DevicesCmd::Revoke { id }) => {
            let r: Revoked = client
                .post(&format!("/v1/devices/{id}/revoke"), &json!({}))
                .await?;
            if json {
                cli::print_json(&r)?;
            } else {
                let how = if r.disconnected {
                    "its connection was closed"
                } else {
                    "it was not connected"
                };
                println!("revoked {id}; {how}");
            }
        }
        Some(DevicesCmd::Label { id, labels }) => {
            let r: AssignOutcome = client
                .put(
                    &format!("/v1/devices/{id}/labels"),
                    &SetLabels {
                        labels: labels.clone(),
                    },
                )
                .await?;
            if json {
                cli::print_json(&r)?;
            } else {
                println!(
                    "labels of {id} set to {labels}; desired state {}",
                    if r.changed.is_empty() {
                        "unchanged"
                    } else {
                        "changed"
                    }
                );
            }
        }
    }
    Ok(())
}

pub(crate) async fn device(client: &Client, cmd: DeviceCmd, json: bool) -> CliResult<()> {
    match cmd {
        DeviceCmd::Eventlog { id, out } => {
            use anyhow::Context as _;
            let v: EventLogView = client
                .get(&format!("/v1/devices/{id}/attestation/log"))
                .await?;
            let log = base64::engine::general_purpose::STANDARD
                .decode(&v.log_base64)
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
                        &json!({"device": id, "out": out, "len": log.len(), "pcrs": v.pcrs}),
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
        DeviceCmd::Accept { id } => {
            // Accept exactly what is shown: the hub refuses if newer measurements
            // arrived in between.
            let seen: AttestRecord = client.get(&format!("/v1/devices/{id}/attestation")).await?;
            let body = AcceptRequest {
                verified_ms: seen.verified_ms,
            };
            let a: AttestRecord = client
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
        DeviceCmd::Expect { id, source, pcrs } => {
            let mut map = std::collections::BTreeMap::new();
            for p in &pcrs {
                let usage = || CliError {
                    code: exit::USAGE,
                    error: anyhow::anyhow!("--pcr {p:?}: write INDEX=HEX, e.g. 4=9a1c…"),
                };
                let (i, v) = p.split_once('=').ok_or_else(usage)?;
                let i: u32 = i.trim().parse().map_err(|_| usage())?;
                map.insert(i, v.trim().to_string());
            }
            let body = MeasurementSet {
                source: source.clone(),
                added_ms: 0,
                pcrs: map,
            };
            let a: AttestRecord = client
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
        DeviceCmd::Unexpect { id, source } => {
            let a: AttestRecord = client
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
        DeviceCmd::Show { id } => show(client, &id, json).await?,
    }
    Ok(())
}

/// `device show`: the device row, its attestation, desired state and recent events.
async fn show(client: &Client, id: &str, json: bool) -> CliResult<()> {
    let id = id.to_string();
    let d: DeviceView = client.get(&format!("/v1/devices/{id}")).await?;
    let attestation: Option<AttestRecord> = if d.record.attestation.is_none() {
        None
    } else {
        Some(client.get(&format!("/v1/devices/{id}/attestation")).await?)
    };
    let state: DesiredView = client.get(&format!("/v1/devices/{id}/state")).await?;
    let evs: Vec<EventRecord> = client
        .get_query(
            "/v1/events",
            &[("device", id.clone()), ("limit", "100000".into())],
        )
        .await?;
    let detail = DeviceDetail {
        device: d,
        attestation,
        desired: state,
        events: evs,
    };
    if json {
        cli::print_json(&detail)?;
    } else {
        let DeviceDetail {
            device: d,
            attestation,
            desired: state,
            events: evs,
        } = detail;
        let row = cli::device_row(&d);
        for (k, v) in cli::DEVICE_HEADER.iter().zip(&row) {
            println!("{:<13} {v}", format!("{}:", k.to_lowercase()));
        }
        let r = &d.record;
        println!("{:<13} {}", "agent:", r.agent_version);
        println!(
            "{:<13} revision {} (the newest the agent confirmed it stored)",
            "stored:", r.stored_revision
        );
        println!("{:<13} {}", "reports:", r.reports_acked);
        cli::print_upgrade(r.upgrade.as_ref());
        match &attestation {
            Some(a) => cli::print_attestation(a),
            None => println!("{:<13} none (enrolled without a TPM)", "identity:"),
        }
        println!("desired state (revision {}):", state.revision);
        for r in &state.resources {
            let sha = |n: usize| r.content_sha256.get(..n).unwrap_or(&r.content_sha256);
            if r.kind == "os" {
                println!(
                    "  {:<16} release {} (id {}), downgrade {}, trial boot {}s",
                    r.name,
                    r.version.as_deref().unwrap_or("?"),
                    sha(16),
                    if r.allow_downgrade.unwrap_or(false) {
                        "allowed"
                    } else {
                        "refused"
                    },
                    r.health_timeout_s.unwrap_or(0)
                );
                continue;
            }
            println!(
                "  {:<16} {} {:o} {} bytes sha256:{}",
                r.name,
                r.path,
                r.mode,
                r.size,
                sha(12)
            );
        }
        println!("recent events:");
        for e in evs.iter().rev().take(10).rev() {
            cli::print_event(e);
        }
    }
    Ok(())
}
