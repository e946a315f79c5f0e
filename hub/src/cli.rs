//! The operator CLI: a client of the admin API.
//!
//! Where it finds the hub, first match wins: `--hub-url`/`--admin-token`/`--ca-cert`
//! (or `CAIRN_HUB_URL`, `CAIRN_ADMIN_TOKEN`, `CAIRN_CA_CERT`), then the context file given
//! by `--config`/`CAIRN_CONFIG`, then `cli.toml` in the default data directory, which
//! `cairn-hub serve` writes on every start.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use cairn_sync_protocol::message::Labels;

use crate::api::DeviceView;
use crate::attest::AttestPolicy;
use crate::server::CliContext;
use crate::store::{AttestRecord, EventRecord, UpgradeStatus};

/// Exit codes of the CLI, documented in `--help`.
pub mod exit {
    pub const OK: u8 = 0;
    /// The hub answered with an error (bad input, conflict, internal).
    pub const FAILED: u8 = 1;
    /// Wrong command line (clap uses 2 as well).
    pub const USAGE: u8 = 2;
    /// The device (or other object) does not exist.
    pub const NOT_FOUND: u8 = 3;
    /// The admin token was refused.
    pub const UNAUTHORIZED: u8 = 4;
    /// The hub could not be reached, or its certificate did not verify.
    pub const UNREACHABLE: u8 = 5;
    /// What an offline command would create is there already (an image's first-boot
    /// configuration; `--force` replaces it).
    pub const EXISTS: u8 = 6;
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct CliError {
    pub code: u8,
    pub error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for CliError {
    fn from(e: E) -> Self {
        Self {
            code: exit::FAILED,
            error: e.into(),
        }
    }
}

impl CliError {
    pub fn exit(self) -> ExitCode {
        eprintln!("error: {:#}", self.error);
        ExitCode::from(self.code)
    }
}

pub type CliResult<T> = std::result::Result<T, CliError>;

/// Connection settings given on the command line or in the environment.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Connect {
    /// Admin API URL, e.g. https://127.0.0.1:7443.
    #[arg(long, env = "CAIRN_HUB_URL", global = true)]
    pub hub_url: Option<String>,
    /// Admin token (the hub writes it to DATA_DIR/admin-token).
    #[arg(long, env = "CAIRN_ADMIN_TOKEN", global = true, hide_env_values = true)]
    pub admin_token: Option<String>,
    /// PEM file of the hub CA that signed the admin API certificate.
    #[arg(long, env = "CAIRN_CA_CERT", global = true)]
    pub ca_cert: Option<PathBuf>,
    /// Context file with url, token and ca_cert (as written to DATA_DIR/cli.toml).
    #[arg(long, env = "CAIRN_CONFIG", global = true)]
    pub config: Option<PathBuf>,
}

/// The hub's data directory when none is given: `$XDG_DATA_HOME/cairn-hub` or
/// `~/.local/share/cairn-hub`, else `./cairn-hub-data`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("cairn-hub");
    }
    if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(h).join(".local/share/cairn-hub");
    }
    PathBuf::from("cairn-hub-data")
}

fn load_context(path: &Path) -> Result<CliContext> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "reading {}; start the hub with `cairn-hub serve` or pass --hub-url, --admin-token and --ca-cert",
            path.display()
        )
    })?;
    toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

/// A client of one hub's admin API.
pub struct Client {
    http: reqwest::Client,
    url: String,
    token: String,
}

impl Client {
    pub fn from_connect(c: &Connect) -> CliResult<Self> {
        let ctx = match (&c.config, &c.hub_url, &c.admin_token, &c.ca_cert) {
            (_, Some(url), Some(token), Some(ca)) => CliContext {
                url: url.clone(),
                token: token.clone(),
                ca_cert: ca.clone(),
            },
            (Some(path), ..) => load_context(path).map_err(|e| CliError {
                code: exit::USAGE,
                error: e,
            })?,
            _ => load_context(&default_data_dir().join("cli.toml")).map_err(|e| CliError {
                code: exit::USAGE,
                error: e,
            })?,
        };
        // Flags and env override single fields of a context file.
        let url = c.hub_url.clone().unwrap_or(ctx.url);
        let token = c.admin_token.clone().unwrap_or(ctx.token);
        let ca_path = c.ca_cert.clone().unwrap_or(ctx.ca_cert);
        let pem = std::fs::read(&ca_path)
            .with_context(|| format!("reading hub CA certificate {}", ca_path.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem)
            .with_context(|| format!("parsing {}", ca_path.display()))?;
        let http = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .use_rustls_tls()
            .timeout(Duration::from_secs(120))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_string(),
            token,
        })
    }

    async fn send<T: DeserializeOwned>(&self, req: reqwest::RequestBuilder) -> CliResult<T> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| CliError {
                code: exit::UNREACHABLE,
                error: anyhow!("cannot reach the hub at {}: {e:#}", self.url),
            })?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.json().await.context("decoding the hub's answer")?);
        }
        let body: Value = resp.json().await.unwrap_or(Value::Null);
        let msg = body
            .get("error")
            .and_then(Value::as_str)
            .map_or_else(|| status.to_string(), str::to_string);
        let code = match status.as_u16() {
            401 | 403 => exit::UNAUTHORIZED,
            404 => exit::NOT_FOUND,
            _ => exit::FAILED,
        };
        Err(CliError {
            code,
            error: anyhow!("{msg}"),
        })
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> CliResult<T> {
        self.send(self.http.get(format!("{}{path}", self.url)))
            .await
    }

    pub async fn get_query<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> CliResult<T> {
        self.send(self.http.get(format!("{}{path}", self.url)).query(query))
            .await
    }

    pub async fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> CliResult<T> {
        self.send(self.http.post(format!("{}{path}", self.url)).json(body))
            .await
    }

    pub async fn put<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> CliResult<T> {
        self.send(self.http.put(format!("{}{path}", self.url)).json(body))
            .await
    }

    /// POSTs a body streamed from `body` (`len` bytes), with no overall time limit
    /// beyond a day (a large release over a slow link).
    pub async fn post_stream<T: DeserializeOwned>(
        &self,
        path: &str,
        body: reqwest::Body,
        len: u64,
    ) -> CliResult<T> {
        self.send(
            self.http
                .post(format!("{}{path}", self.url))
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, len)
                .timeout(Duration::from_secs(24 * 3600))
                .body(body),
        )
        .await
    }

    pub async fn delete<T: DeserializeOwned>(&self, path: &str) -> CliResult<T> {
        self.send(self.http.delete(format!("{}{path}", self.url)))
            .await
    }
}

/// Prints rows as an aligned table with a header.
pub fn print_table(header: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        println!("{}", s.trim_end());
    };
    line(header.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

pub fn print_json(v: &impl Serialize) -> CliResult<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// "12s ago", "3m ago", … for a past Unix time in ms.
pub fn ago(ms: Option<u64>) -> String {
    let Some(ms) = ms else {
        return "never".into();
    };
    let now = crate::endpoint::now_ms();
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

/// Labels as `k=v,k2=v2`.
pub fn labels_of(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// One device as a table row.
pub fn device_row(d: &DeviceView) -> Vec<String> {
    let r = &d.record;
    let status = if r.revoked_ms.is_some() {
        "revoked".to_string()
    } else if d.connected {
        "online".to_string()
    } else {
        format!("offline ({})", ago(r.last_seen_ms))
    };
    let drift = match (d.drift, r.failing) {
        (false, _) => "no".to_string(),
        (true, 0) => "yes".to_string(),
        (true, n) => format!("yes ({n} failing)"),
    };
    let attest = match (r.attestation.as_deref(), r.attest_status.as_deref()) {
        (None, _) => "none".to_string(),
        (Some(kind), Some("quarantined")) => format!("QUARANTINED ({kind})"),
        (Some(kind), Some(status)) => format!("{kind} {status}"),
        (Some(kind), None) => kind.to_string(),
    };
    vec![
        r.id.to_string(),
        r.hostname.clone(),
        labels_of(&r.labels),
        status,
        r.desired_revision.to_string(),
        r.applied_revision.to_string(),
        drift,
        attest,
        os_cell(r.upgrade.as_ref()),
    ]
}

fn pct(n: u64, of: u64) -> u64 {
    n.saturating_mul(100).checked_div(of).unwrap_or(0).min(100)
}

/// The OS column: the committed version, plus the upgrade when one is under way or
/// failed: `1.0.0 (2.0.0 downloading 45%)`, `1.0.0 (2.0.0 rolled-back)`.
pub fn os_cell(up: Option<&UpgradeStatus>) -> String {
    let Some(up) = up else {
        return "-".into();
    };
    let committed = if up.committed_version.is_empty() {
        "?"
    } else {
        &up.committed_version
    };
    let version = &up.version;
    match up.phase.as_str() {
        "committed" if version == committed => committed.to_string(),
        "committed" => version.clone(),
        "downloading" => format!(
            "{committed} ({version} downloading {}%)",
            pct(up.bytes_done, up.bytes_total)
        ),
        phase => format!("{committed} ({version} {phase})"),
    }
}

/// Bytes for people: 512 B, 3.2 MiB, 1.0 GiB.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

/// A device's upgrade status, for `device show`.
pub fn print_upgrade(up: Option<&UpgradeStatus>) {
    // The device row above has the OS column; nothing to add without a report.
    let Some(up) = up else {
        return;
    };
    println!(
        "{:<13} {} committed, booted from slot {}",
        "boot:",
        up.committed_version,
        up.booted_slot.to_uppercase()
    );
    println!(
        "{:<13} {} {} into slot {} ({} of {}, {} downloaded, the rest copied locally; {})",
        "upgrade:",
        up.version,
        up.phase,
        up.target_slot.to_uppercase(),
        human_bytes(up.bytes_done),
        human_bytes(up.bytes_total),
        human_bytes(up.bytes_downloaded),
        ago(Some(up.at_ms))
    );
    if let Some(e) = &up.error {
        println!("{:<13} {e}", "error:");
    }
}

pub const DEVICE_HEADER: [&str; 9] = [
    "ID",
    "HOSTNAME",
    "LABELS",
    "STATUS",
    "DESIRED",
    "APPLIED",
    "DRIFT",
    "ATTESTATION",
    "OS",
];

/// One attestation policy as a table row.
pub fn policy_row(p: &AttestPolicy) -> Vec<String> {
    let pcrs: Vec<String> = p.pcrs.iter().map(u32::to_string).collect();
    let golden: usize = p.golden.values().map(Vec::len).sum();
    vec![
        p.name.clone(),
        p.priority.to_string(),
        p.selector.clone(),
        p.require.to_string(),
        pcrs.join(","),
        if p.tofu { "yes" } else { "no" }.to_string(),
        format!("{golden} value(s)"),
    ]
}

/// A device's attestation, for `device show`.
pub fn print_attestation(a: &AttestRecord) {
    println!(
        "{:<13} {} (EK sha256:{})",
        "identity:",
        a.kind,
        a.ek_sha256.get(..16).unwrap_or(&a.ek_sha256)
    );
    if let Some(issuer) = &a.ek_issuer {
        println!("{:<13} {issuer}", "ek ca:");
    }
    println!(
        "{:<13} {}{}",
        "attest:",
        a.status,
        a.reason
            .as_deref()
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    println!(
        "{:<13} {} (event log {} bytes)",
        "verified:",
        ago(a.verified_ms),
        a.log_len
    );
    if a.ima_len > 0 {
        println!(
            "{:<13} {} entries verified against PCR 10 ({} bytes of the list)",
            "ima:", a.ima_entries, a.ima_len
        );
    }
    for (i, v) in &a.pcrs {
        println!("  PCR {i:>2}  {v}");
    }
    for set in &a.accepted {
        println!(
            "  accepted: {} ({} PCRs, {})",
            set.source,
            set.pcrs.len(),
            ago(Some(set.added_ms))
        );
    }
}

/// Prints one event line.
pub fn print_event(e: &EventRecord) {
    let when =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(e.at_ms));
    let seq = e.seq.map_or_else(|| "-".to_string(), |s| s.to_string());
    println!(
        "{when}  {:<16} {:>6}  {:<16} {:<12} {}",
        e.device,
        seq,
        e.kind,
        e.resource.as_deref().unwrap_or("-"),
        e.message
    );
}

/// Body of a state change.
pub fn state_change(
    device: Option<String>,
    selector: Option<String>,
    name: &str,
    file: Option<crate::api::FileSpec>,
) -> crate::api::StateChange {
    crate::api::StateChange {
        device,
        selector,
        name: name.to_string(),
        file,
        os: None,
    }
}
