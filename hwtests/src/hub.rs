//! A hub for hardware tests: a `cairn-hub serve` process and the operator's CLI
//! against it, as an operator would use them.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
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

/// A hub process, killed on drop.
pub struct HubProc {
    pub dir: PathBuf,
    bin: PathBuf,
    child: Child,
    /// The QUIC address it listens on.
    pub quic: String,
}

impl HubProc {
    /// Starts `cairn-hub serve` with its data in `dir`, QUIC on `listen`.
    pub fn start(dir: &Path, listen: &str, extra: &[&str]) -> Result<HubProc> {
        let bin = bin_dir()?.join("cairn-hub");
        std::fs::create_dir_all(dir)?;
        let endpoints = dir.join("endpoints.json");
        let _ = std::fs::remove_file(&endpoints);
        let child = Command::new(&bin)
            .args(["serve", "--data-dir"])
            .arg(dir)
            .args(["--listen", listen, "--admin-listen", "127.0.0.1:0"])
            .args(extra)
            .env("RUST_LOG", "cairn_hub=debug,info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("hub.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut hub = HubProc {
            dir: dir.to_path_buf(),
            bin,
            child,
            quic: String::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !endpoints.exists() {
            if let Some(st) = hub.child.try_wait()? {
                bail!("the hub exited ({st}):\n{}", hub.log_tail(20));
            }
            if Instant::now() > deadline {
                bail!("the hub did not start within 30 s:\n{}", hub.log_tail(20));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&endpoints)?)?;
        hub.quic = v["quic"].as_str().unwrap_or_default().to_string();
        Ok(hub)
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
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a)?;
        serde_json::from_str(&out)
            .with_context(|| format!("cairn-hub {}: not JSON: {out}", args.join(" ")))
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let t = std::fs::read_to_string(self.dir.join("hub.log")).unwrap_or_default();
        let all: Vec<&str> = t.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
