//! Harness for end-to-end tests: real `cairn-hub` and `cairn-agent` processes on
//! loopback, each with its own data directory, driven through their CLIs as an operator
//! would. The binaries come from the same target directory as the test (cargo builds
//! every workspace binary before running `cargo test --workspace`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use cairn_agent::StatusReport;
use cairn_hub::api::{DeviceDetail, DeviceView};
use cairn_hub::process::{HubProcess, log_tail, same_port};
use cairn_hub::server::Endpoints;
use cairn_hub::store::EventRecord;
use serde::de::DeserializeOwned;

pub mod abox;

/// Path of a workspace binary next to the running test.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not found: build the binaries first (`cargo build --bins`, or run `cargo test --workspace`)",
        p.display()
    );
    p
}

/// Waits until `cond` holds, polling, or panics saying what did not happen.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for: {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGKILLs a child process, if any, and reaps it.
fn sigkill(child: &mut Option<Child>) {
    if let Some(mut c) = child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
}

fn log_file(path: &Path) -> Stdio {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map(Stdio::from)
        .unwrap_or_else(|_| Stdio::null())
}

/// A hub process (`cairn-hub serve`), through the shared harness.
pub struct Hub {
    pub dir: PathBuf,
    pub quic: String,
    proc: Option<HubProcess>,
}

impl Hub {
    /// Starts a hub in `dir` on a free loopback port.
    pub fn start(dir: &Path) -> Self {
        Self::start_with(dir, &[])
    }

    /// Starts a hub with extra `serve` arguments (e.g. `--ek-ca FILE`).
    pub fn start_with(dir: &Path, args: &[&str]) -> Self {
        let (d, args) = (
            dir.to_path_buf(),
            args.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
        );
        let launch = Box::new(move |prev: Option<&Endpoints>| {
            let mut c = Command::new(bin("cairn-hub"));
            c.args(["serve", "--data-dir"])
                .arg(&d)
                .args(["--listen", &format!("127.0.0.1:{}", same_port(prev))])
                .args(["--admin-listen", "127.0.0.1:0", "--idle-timeout", "10s"])
                .args(&args)
                .env("RUST_LOG", "cairn_hub=debug,info")
                .stdout(Stdio::null())
                .stderr(log_file(&d.join("hub.log")));
            c
        });
        let proc = HubProcess::start(dir, launch, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("{e}\n{}", log_tail(&dir.join("hub.log"), 30)));
        Self {
            dir: dir.to_path_buf(),
            quic: proc.endpoints.quic.to_string(),
            proc: Some(proc),
        }
    }

    fn proc(&mut self) -> &mut HubProcess {
        self.proc.as_mut().expect("the hub process harness")
    }

    fn started(&mut self, r: Result<(), cairn_hub::process::StartError>) {
        if let Err(e) = r {
            panic!("{e}\n{}", self.log_tail());
        }
        self.quic = self.proc().endpoints.quic.to_string();
    }

    /// SIGKILL, no goodbye.
    pub fn kill(&mut self) {
        self.proc().kill();
    }

    /// Starts again on the same port with the same data directory.
    pub fn restart(&mut self) {
        let r = self.proc().start_again();
        self.started(r);
    }

    /// Starts a killed hub again (after its data directory was changed, say).
    pub fn start_again(&mut self) {
        let r = self.proc().start_again();
        self.started(r);
    }

    /// Runs a CLI command against this hub.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("cairn-hub"))
            .args(args)
            .env("CAIRN_CONFIG", self.dir.join("cli.toml"))
            .env_remove("CAIRN_HUB_URL")
            .env_remove("CAIRN_ADMIN_TOKEN")
            .env_remove("CAIRN_CA_CERT")
            .output()
            .expect("run cairn-hub CLI")
    }

    /// Runs a CLI command that must succeed; returns stdout.
    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "cairn-hub {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// `cairn-hub set FLAG TARGET NAME --path PATH --content CONTENT`, which must succeed;
    /// `flag` is `--selector` or `--device`.
    pub fn set_file(
        &self,
        flag: &str,
        target: &str,
        name: &str,
        path: &str,
        content: &str,
    ) -> String {
        self.cli_ok(&[
            "set",
            flag,
            target,
            name,
            "--path",
            path,
            "--content",
            content,
        ])
    }

    /// Runs a CLI command with `--json` that must succeed, and reads its output as the
    /// admin API type `T` (what that command prints, see `hub/src/cmd/`).
    pub fn json_as<T: DeserializeOwned>(&self, args: &[&str]) -> T {
        let (args, out) = self.cli_json(args);
        assert!(
            out.status.success(),
            "cairn-hub {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        decode(&args, &out)
    }

    /// [`Hub::json_as`] for a command that may fail (the hub restarting, say): `None`
    /// when it does. Output that does not decode still fails the test.
    pub fn try_json_as<T: DeserializeOwned>(&self, args: &[&str]) -> Option<T> {
        let (args, out) = self.cli_json(args);
        out.status.success().then(|| decode(&args, &out))
    }

    fn cli_json<'a>(&self, args: &[&'a str]) -> (Vec<&'a str>, Output) {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        (a, out)
    }

    pub fn token(&self, uses: u32, labels: &str) -> String {
        self.cli_ok(&[
            "token",
            "create",
            "--ttl",
            "1h",
            "--uses",
            &uses.to_string(),
            "--labels",
            labels,
        ])
        .trim()
        .to_string()
    }

    /// `cairn-hub devices`.
    pub fn devices(&self) -> Vec<DeviceView> {
        self.json_as(&["devices"])
    }

    /// `cairn-hub device show ID`: the device, its attestation, desired state and events.
    pub fn device(&self, id: &str) -> DeviceDetail {
        self.json_as(&["device", "show", id])
    }

    /// `cairn-hub events` of one device (all of them), optionally of one kind.
    pub fn events(&self, device: &str, kind: Option<&str>) -> Vec<EventRecord> {
        let mut args = vec!["events", "--device", device, "--limit", "100000"];
        if let Some(k) = kind {
            args.extend(["--kind", k]);
        }
        self.json_as(&args)
    }

    /// Tail of the hub's log, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.dir.join("hub.log"))
    }
}

fn tail(p: &Path) -> String {
    log_tail(p, 30)
}

/// The output of `cairn-hub ARGS` (with `--json`) read as `T`, or a test failure naming
/// the command, its stderr and what it printed.
fn decode<T: DeserializeOwned>(args: &[&str], out: &Output) -> T {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "cairn-hub {args:?}: output is not a {}: {e}\nstderr: {}\noutput: {}",
            std::any::type_name::<T>(),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// An agent process.
pub struct Agent {
    pub dir: PathBuf,
    hub: String,
    token: Option<String>,
    child: Option<Child>,
    /// Extra `run` arguments; change them between restarts with [`Agent::set_args`].
    args: Vec<String>,
}

impl Agent {
    /// Starts an agent enrolling with `token` (if given).
    pub fn start(dir: &Path, hub: &str, token: Option<&str>) -> Self {
        Self::start_with(dir, hub, token, &[])
    }

    /// Starts an agent with extra `run` arguments (e.g. `--tpm TCTI`).
    pub fn start_with(dir: &Path, hub: &str, token: Option<&str>, args: &[&str]) -> Self {
        let mut a = Self {
            dir: dir.to_path_buf(),
            hub: hub.to_string(),
            token: token.map(str::to_string),
            child: None,
            args: Vec::new(),
        };
        a.set_args(args);
        a.spawn();
        a
    }

    /// The extra arguments of the next (re)start.
    pub fn set_args(&mut self, args: &[&str]) {
        self.args = args.iter().map(|a| a.to_string()).collect();
    }

    pub fn command(&self) -> Command {
        let mut cmd = Command::new(bin("cairn-agent"));
        cmd.args(["run", "--hub", &self.hub, "--data-dir"])
            .arg(&self.dir)
            .args([
                "--reconcile-interval",
                "100ms",
                "--backoff-max",
                "1s",
                "--keep-alive",
                "1s",
            ])
            .env("RUST_LOG", "cairn_agent=debug,info");
        if let Some(t) = &self.token {
            cmd.args(["--join-token", t]);
        }
        cmd.args(&self.args);
        cmd
    }

    /// Starts a killed (or exited) agent again.
    pub fn start_again(&mut self) {
        self.spawn();
    }

    fn spawn(&mut self) {
        std::fs::create_dir_all(&self.dir).unwrap();
        let child = self
            .command()
            .stdout(Stdio::null())
            .stderr(log_file(&self.dir.join("agent.log")))
            .spawn()
            .expect("spawn cairn-agent");
        self.child = Some(child);
    }

    pub fn kill(&mut self) {
        sigkill(&mut self.child);
    }

    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Whether the process is still running; `Some(code)` once it exited.
    pub fn exited(&mut self) -> Option<i32> {
        let c = self.child.as_mut()?;
        match c.try_wait() {
            Ok(Some(st)) => Some(st.code().unwrap_or(-1)),
            _ => None,
        }
    }

    /// What `cairn-agent status` shows, read from the agent's database as the fleet
    /// simulator reads it (`cairn_agent::status`); `None` while the database does not
    /// exist yet or cannot be read. [`Agent::status_cli`] is the command itself.
    pub fn status(&self) -> Option<StatusReport> {
        cairn_agent::status(&self.dir).ok()
    }

    /// The output of `cairn-agent status --json`, as scripts get it.
    pub fn status_cli(&self) -> Output {
        Command::new(bin("cairn-agent"))
            .args(["status", "--json", "--data-dir"])
            .arg(&self.dir)
            .output()
            .expect("run cairn-agent status")
    }

    pub fn device_id(&self) -> Option<String> {
        self.status()?.device
    }

    /// The agent's last report sequence number (0 while its status cannot be read).
    pub fn last_seq(&self) -> u64 {
        self.status().map_or(0, |s| s.last_seq)
    }

    pub fn file(&self, rel: &str) -> PathBuf {
        self.dir.join("files").join(rel)
    }

    pub fn log_tail(&self) -> String {
        tail(&self.dir.join("agent.log"))
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Copies a directory tree (a backup of a stopped process's data directory).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Replaces a directory with a copy of `backup`.
pub fn restore_dir(backup: &Path, dir: &Path) {
    std::fs::remove_dir_all(dir).unwrap();
    copy_dir(backup, dir);
}

/// Whether the hub and the agent agree the device runs its newest desired state and
/// every report has been stored by the hub.
pub fn converged(hub: &Hub, agent: &Agent) -> bool {
    let Some(st) = agent.status() else {
        return false;
    };
    let Some(id) = st.device.as_deref() else {
        return false;
    };
    let Some(d) = hub.try_json_as::<DeviceDetail>(&["device", "show", id]) else {
        return false;
    };
    let dev = &d.device.record;
    let desired = dev.desired_revision;
    st.desired_revision == desired
        && st.applied_revision == desired
        && st.outbox_depth == 0
        && dev.reports_acked == st.last_seq
        && dev.applied_revision == desired
}

/// Checks the agent's managed files against the hub's desired state for the device
/// (paths, sizes and content hashes); returns the mismatches.
pub fn file_mismatches(hub: &Hub, agent: &Agent) -> Vec<String> {
    use sha2::Digest;
    let id = agent.device_id().unwrap_or_default();
    let d = hub.device(&id);
    let mut bad = Vec::new();
    for r in &d.desired.resources {
        let path = r.path.as_str();
        match std::fs::read(agent.file(path)) {
            Ok(content) => {
                let h = hex::encode(sha2::Sha256::digest(&content));
                if h != r.content_sha256 {
                    bad.push(format!("{path}: content differs"));
                }
            }
            Err(e) => bad.push(format!("{path}: {e}")),
        }
    }
    bad
}
