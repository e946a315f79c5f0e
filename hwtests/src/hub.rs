//! A hub for hardware tests: a `cairn-hub serve` process and the operator's CLI
//! against it, as an operator would use them.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_hub::process::{HubProcess, log_tail};
use cairn_hub::server::Endpoints;
use serde_json::Value;

/// The directory holding the workspace binaries: `CAIRN_BIN_DIR`, else the one
/// holding (or one above) the running executable.
pub fn bin_dir() -> Result<PathBuf> {
    if let Some(d) = std::env::var_os("CAIRN_BIN_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        if d.join("cairn-hub").exists() {
            return Ok(d);
        }
        dir = d.parent().map(Path::to_path_buf);
        if dir.as_ref().is_some_and(|d| d.ends_with("target")) {
            break;
        }
    }
    bail!(
        "cairn-hub not found next to {}: build the binaries (`cargo build --bins`) or set CAIRN_BIN_DIR",
        exe.display()
    )
}

/// A hub process (`cairn-hub serve`, through the shared harness), killed on drop.
pub struct HubProc {
    pub dir: PathBuf,
    bin: PathBuf,
    _proc: HubProcess,
    /// The QUIC address it listens on.
    pub quic: String,
}

impl HubProc {
    /// Starts `cairn-hub serve` with its data in `dir`, QUIC on `listen`.
    pub fn start(dir: &Path, listen: &str, extra: &[&str]) -> Result<HubProc> {
        let bin = bin_dir()?.join("cairn-hub");
        std::fs::create_dir_all(dir)?;
        let log = std::fs::File::create(dir.join("hub.log"))?;
        let (b, d, listen) = (bin.clone(), dir.to_path_buf(), listen.to_string());
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let launch = Box::new(move |_: Option<&Endpoints>| {
            let mut c = Command::new(&b);
            c.args(["serve", "--data-dir"])
                .arg(&d)
                .args(["--listen", &listen, "--admin-listen", "127.0.0.1:0"])
                .args(&extra)
                .env("RUST_LOG", "cairn_hub=debug,info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log.try_clone().map_or_else(|_| Stdio::null(), Stdio::from));
            c
        });
        let proc = HubProcess::start(dir, launch, Duration::from_secs(30))
            .map_err(|e| anyhow::anyhow!("{e}:\n{}", log_tail(&dir.join("hub.log"), 20)))?;
        Ok(HubProc {
            dir: dir.to_path_buf(),
            bin,
            quic: proc.endpoints.quic.to_string(),
            _proc: proc,
        })
    }

    /// The QUIC port.
    pub fn port(&self) -> u16 {
        self.quic
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or(0)
    }

    /// Runs `cairn-hub ARGS` as the operator; its stdout, or an error with stderr.
    pub fn cli(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.bin)
            .args(args)
            .env("CAIRN_CONFIG", self.dir.join("cli.toml"))
            .env_remove("CAIRN_HUB_URL")
            .env_remove("CAIRN_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            bail!(
                "cairn-hub {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`HubProc::cli`] with `--json`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<Value> {
        self.json_as(args)
    }

    /// [`HubProc::cli`] with `--json`, read as the API type `T`.
    pub fn json_as<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Result<T> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a)?;
        serde_json::from_str(&out)
            .with_context(|| format!("cairn-hub {}: not the expected JSON: {out}", args.join(" ")))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        log_tail(&self.dir.join("hub.log"), lines)
    }
}
