//! The operator's shell commands (power, flashing hooks, console programs), run with
//! `sh -c` in their own process group so a timeout kills the whole pipeline.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// One command line for `sh -c`.
pub struct Shell<'a> {
    pub script: &'a str,
    /// `$1`, `$2`, …
    pub args: Vec<OsString>,
    pub env: Vec<(&'static str, OsString)>,
    pub timeout: Duration,
}

impl Shell<'_> {
    fn command(&self) -> Command {
        let mut c = Command::new("sh");
        c.arg("-c")
            .arg(self.script)
            .arg("cairn-rig")
            .args(&self.args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .process_group(0);
        c
    }

    /// Runs it to completion within the timeout; its output (stdout and stderr), or
    /// an error with the exit status and the output's tail.
    pub fn run(&self) -> Result<String> {
        let out = tempfile::tempfile().context("creating a temporary file")?;
        let child = self
            .command()
            .stdout(out.try_clone()?)
            .stderr(out.try_clone()?)
            .spawn()
            .context("starting sh")?;
        let status = wait_bounded(child, self.timeout);
        let text = read_all(out);
        let tail = tail(&text, 15);
        match status {
            Ok(st) if st.success() => Ok(text),
            Ok(st) => bail!("`{}` failed ({st}): {tail}", self.script),
            Err(e) => bail!("`{}` {e:#}: {tail}", self.script),
        }
    }

    /// Starts it with stdout and stderr appended to `log` (a long-running command).
    pub fn spawn_into(&self, log: &std::fs::File) -> Result<Child> {
        self.command()
            .stdout(log.try_clone()?)
            .stderr(log.try_clone()?)
            .spawn()
            .with_context(|| format!("starting `{}`", self.script))
    }
}

/// Waits for `child` at most `limit`; past it, kills its process group.
pub fn wait_bounded(mut child: Child, limit: Duration) -> Result<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st);
        }
        if Instant::now() >= deadline {
            kill_group(&mut child);
            bail!("did not finish within {limit:?} (killed)");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILL to the child's process group (it leads one: `process_group(0)`), then reaps it.
pub fn kill_group(child: &mut Child) {
    let pid = rustix::process::Pid::from_child(child);
    let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    let _ = child.kill();
    let _ = child.wait();
}

fn read_all(mut f: std::fs::File) -> String {
    use std::io::{Read, Seek};
    let mut s = Vec::new();
    let _ = f.rewind();
    let _ = f.read_to_end(&mut s);
    String::from_utf8_lossy(&s).into_owned()
}

/// The last `n` non-empty lines of `s`, joined with " | "; "(no output)" if none.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return "(no output)".into();
    }
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// Whether the program a command line starts looks runnable (a path that exists, or a
/// name on `PATH`); `None` when that cannot be told (shell syntax, builtins).
pub fn program_found(command: &str) -> Option<(String, bool)> {
    let first = command.split_whitespace().next()?;
    if first.contains('=') || first.contains('$') || first.contains('(') {
        return None;
    }
    const BUILTINS: [&str; 8] = ["cd", "echo", "exec", "exit", "printf", "test", "[", "true"];
    if BUILTINS.contains(&first) {
        return None;
    }
    let found = if first.contains('/') {
        std::path::Path::new(first).exists()
    } else {
        std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(first).is_file()))
            .unwrap_or(false)
    };
    Some((first.to_string(), found))
}
