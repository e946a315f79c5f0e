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
use serde_json::{Value, json};

use crate::server::CliContext;

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

pub fn labels_of(v: &Value) -> String {
    v.get("labels")
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default()
}

fn u(v: &Value, k: &str) -> u64 {
    v.get(k).and_then(Value::as_u64).unwrap_or(0)
}

/// One device as a table row.
pub fn device_row(d: &Value) -> Vec<String> {
    let status = if d.get("revoked_ms").is_some_and(|v| !v.is_null()) {
        "revoked".to_string()
    } else if d.get("connected").and_then(Value::as_bool).unwrap_or(false) {
        "online".to_string()
    } else {
        format!(
            "offline ({})",
            ago(d.get("last_seen_ms").and_then(Value::as_u64))
        )
    };
    let drift = if d.get("drift").and_then(Value::as_bool).unwrap_or(false) {
        if u(d, "failing") > 0 {
            format!("yes ({} failing)", u(d, "failing"))
        } else {
            "yes".into()
        }
    } else {
        "no".into()
    };
    let attest = match (
        d.get("attestation").and_then(Value::as_str),
        d.get("attest_status").and_then(Value::as_str),
    ) {
        (None, _) => "none".to_string(),
        (Some(kind), Some("quarantined")) => format!("QUARANTINED ({kind})"),
        (Some(kind), Some(status)) => format!("{kind} {status}"),
        (Some(kind), None) => kind.to_string(),
    };
    vec![
        d.get("id")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        d.get("hostname")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string(),
        labels_of(d),
        status,
        u(d, "desired_revision").to_string(),
        u(d, "applied_revision").to_string(),
        drift,
        attest,
        os_cell(d),
    ]
}

fn pct(n: u64, of: u64) -> u64 {
    n.saturating_mul(100).checked_div(of).unwrap_or(0).min(100)
}

/// The OS column: the committed version, plus the upgrade when one is under way or
/// failed: `1.0.0 (2.0.0 downloading 45%)`, `1.0.0 (2.0.0 rolled-back)`.
pub fn os_cell(d: &Value) -> String {
    let Some(up) = d.get("upgrade").filter(|u| u.is_object()) else {
        return "-".into();
    };
    let s = |k: &str| up.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let (committed, version, phase) = (s("committed_version"), s("version"), s("phase"));
    let committed = if committed.is_empty() {
        "?".to_string()
    } else {
        committed
    };
    match phase.as_str() {
        "committed" if version == committed => committed,
        "committed" => version,
        "downloading" => format!(
            "{committed} ({version} downloading {}%)",
            pct(u(up, "bytes_done"), u(up, "bytes_total"))
        ),
        _ => format!("{committed} ({version} {phase})"),
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
pub fn print_upgrade(d: &Value) {
    // The device row above has the OS column; nothing to add without a report.
    let Some(up) = d.get("upgrade").filter(|u| u.is_object()) else {
        return;
    };
    let s = |k: &str| up.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    println!(
        "{:<13} {} committed, booted from slot {}",
        "boot:",
        s("committed_version"),
        s("booted_slot").to_uppercase()
    );
    let (done, total, down) = (
        u(up, "bytes_done"),
        u(up, "bytes_total"),
        u(up, "bytes_downloaded"),
    );
    println!(
        "{:<13} {} {} into slot {} ({} of {}, {} downloaded, the rest copied locally; {})",
        "upgrade:",
        s("version"),
        s("phase"),
        s("target_slot").to_uppercase(),
        human_bytes(done),
        human_bytes(total),
        human_bytes(down),
        ago(up.get("at_ms").and_then(Value::as_u64))
    );
    if let Some(e) = up.get("error").and_then(Value::as_str) {
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
pub fn policy_row(p: &Value) -> Vec<String> {
    let s = |k: &str| p.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    let pcrs: Vec<String> = p["pcrs"]
        .as_array()
        .map(|a| a.iter().map(|v| v.to_string()).collect())
        .unwrap_or_default();
    let golden = p["golden"].as_object().map_or(0, |g| {
        g.values().map(|v| v.as_array().map_or(0, Vec::len)).sum()
    });
    vec![
        s("name"),
        p["priority"].to_string(),
        s("selector"),
        s("require"),
        pcrs.join(","),
        if p["tofu"].as_bool().unwrap_or(false) {
            "yes".into()
        } else {
            "no".into()
        },
        format!("{golden} value(s)"),
    ]
}

/// A device's attestation, for `device show`.
pub fn print_attestation(a: &Value) {
    let s = |k: &str| a.get(k).and_then(Value::as_str).unwrap_or("").to_string();
    println!(
        "{:<13} {} (EK sha256:{})",
        "identity:",
        s("kind"),
        &s("ek_sha256")[..16.min(s("ek_sha256").len())]
    );
    if let Some(issuer) = a.get("ek_issuer").and_then(Value::as_str) {
        println!("{:<13} {issuer}", "ek ca:");
    }
    println!(
        "{:<13} {}{}",
        "attest:",
        s("status"),
        a.get("reason")
            .and_then(Value::as_str)
            .map(|r| format!(": {r}"))
            .unwrap_or_default()
    );
    println!(
        "{:<13} {} (event log {} bytes)",
        "verified:",
        ago(a.get("verified_ms").and_then(Value::as_u64)),
        a["log_len"]
    );
    if a["ima_len"].as_u64().unwrap_or(0) > 0 {
        println!(
            "{:<13} {} entries verified against PCR 10 ({} bytes of the list)",
            "ima:", a["ima_entries"], a["ima_len"]
        );
    }
    if let Some(pcrs) = a["pcrs"].as_object() {
        let mut pcrs: Vec<(u32, &str)> = pcrs
            .iter()
            .filter_map(|(i, v)| Some((i.parse().ok()?, v.as_str().unwrap_or(""))))
            .collect();
        pcrs.sort_unstable();
        for (i, v) in pcrs {
            println!("  PCR {i:>2}  {v}");
        }
    }
    let empty = Vec::new();
    for set in a["accepted"].as_array().unwrap_or(&empty) {
        println!(
            "  accepted: {} ({} PCRs, {})",
            set["source"].as_str().unwrap_or(""),
            set["pcrs"].as_object().map_or(0, serde_json::Map::len),
            ago(set["added_ms"].as_u64())
        );
    }
}

/// Prints one event line.
pub fn print_event(e: &Value) {
    let at = e.get("at_ms").and_then(Value::as_u64).unwrap_or(0);
    let when = humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(at));
    let seq = e
        .get("seq")
        .and_then(Value::as_u64)
        .map_or_else(|| "-".to_string(), |s| s.to_string());
    let res = e.get("resource").and_then(Value::as_str).unwrap_or("-");
    println!(
        "{when}  {:<16} {:>6}  {:<16} {:<12} {}",
        e.get("device").and_then(Value::as_str).unwrap_or(""),
        seq,
        e.get("kind").and_then(Value::as_str).unwrap_or(""),
        res,
        e.get("message").and_then(Value::as_str).unwrap_or("")
    );
}

/// Body of a state change.
pub fn state_change(
    device: Option<String>,
    selector: Option<String>,
    name: &str,
    file: Option<Value>,
) -> Value {
    let mut v = json!({ "name": name });
    if let Some(d) = device {
        v["device"] = json!(d);
    }
    if let Some(s) = selector {
        v["selector"] = json!(s);
    }
    if let Some(f) = file {
        v["file"] = f;
    }
    v
}
