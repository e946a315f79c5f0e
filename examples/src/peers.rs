//! Peer edge agents measured side by side with ours, for the benchmark harness: the same
//! figures the harness takes of `cairn-agent` (idle RSS of the real process, size of the
//! binary as shipped, size of the shared libraries it maps), taken of a peer's daemon.
//!
//! Only the Mender client 3.4 from Debian (`apt-get install mender-client`) so far. Its
//! paths for the artifact name (`/etc/mender/artifact_info`) and the identity script
//! (`/usr/share/mender/identity/mender-device-identity`) are compiled in, so they are
//! supplied by bind mounts in a private mount namespace (`unshare -m`) where possible,
//! otherwise written for the run only and removed afterwards; everything else lives in a
//! temporary directory (`--config`, `--fallback-config`, `--data`).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// Figures of one peer agent, comparable with the harness's figures of `cairn-agent`.
/// MB are MiB (bytes / 1 048 576, VmRSS KiB / 1024), as the harness reports ours.
#[derive(Debug, Clone)]
pub struct PeerFigures {
    pub name: String,
    pub version: String,
    pub idle_rss_mb: f64,
    pub binary_mb: f64,
    pub shared_libs_mb: f64,
    pub how: String,
}

/// Where the server is said to be: loopback port 1, where nothing listens.
const UNREACHABLE_SERVER: &str = "https://127.0.0.1:1";
const IDENTITY_DIR: &str = "/usr/share/mender/identity";
const IDENTITY_SCRIPT: &str = "/usr/share/mender/identity/mender-device-identity";
const CONF_DIR: &str = "/etc/mender";
const ARTIFACT_INFO: &str = "/etc/mender/artifact_info";

/// Starts the Mender 3.x daemon idle (server unreachable), waits `idle`, and measures it.
/// Blocks for `idle` and a little more: call it from `spawn_blocking` in async code.
///
/// None (with the reason) when the peer is not installed; Err when it is installed but
/// could not be measured.
pub fn mender(idle: Duration) -> Result<Result<PeerFigures, String>> {
    let Some(bin) = find_mender() else {
        return Ok(Err(
            "mender-client not installed: no /usr/bin/mender and no `mender` on PATH \
             (`apt-get install mender-client`)"
                .into(),
        ));
    };
    let version = mender_version(&bin)?;
    let tmp = tempfile::tempdir()?;
    let files = RunFiles::write(tmp.path())?;

    // Files placed outside the temporary directory (fallback only), removed last but
    // one; processes started here, killed and reaped first, on every way out.
    let _placed;
    let mut procs = Procs::default();

    // Mender registers io.mender.* on the system bus (`DBus.Enabled` is on by default):
    // give it a private one rather than the host's.
    let bus_note = match start_private_bus(&files.bus) {
        Ok(child) => {
            procs.0.push(child);
            "on a private system D-Bus"
        }
        Err(e) => {
            tracing::warn!(error = %e, "no private D-Bus; mender runs without a bus");
            "without a system D-Bus (no private dbus-daemon could be started)"
        }
    };
    let (cmd, files_note, placed) = daemon_command(&bin, &files)?;
    _placed = placed;
    let daemon = start_daemon(cmd, &bin, &files, &mut procs)?;
    let seen = idle_and_read(&daemon, idle, &files, &mut procs)?;

    let lib_bytes = files_bytes(&seen.libs)?;
    let (binary_bytes, strip_note) = binary_size(&seen.exe, &files.dir)?;
    const MIB: f64 = 1_048_576.0;
    let how = format!(
        "mender-client {version} ({os}), `mender daemon` as a real process {bus_note}, \
         VmRSS {idle_s} s after start summed over {n} process{es}, server unreachable at \
         {UNREACHABLE_SERVER} (auth retries refused), {files_note}; binary {exe} ({strip_note}); \
         shared libraries: file sizes of the {nlibs} unique .so files it maps; MB = MiB",
        os = os_name(),
        idle_s = idle.as_secs_f64(),
        n = seen.processes,
        es = if seen.processes == 1 { "" } else { "es" },
        exe = seen.exe.display(),
        nlibs = seen.libs.len(),
    );
    Ok(Ok(PeerFigures {
        name: "mender-client".into(),
        version,
        idle_rss_mb: seen.rss_kib as f64 / 1024.0,
        binary_mb: binary_bytes as f64 / MIB,
        shared_libs_mb: lib_bytes as f64 / MIB,
        how,
    }))
}

/// The first word `mender --version` prints.
fn mender_version(bin: &Path) -> Result<String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version", bin.display()))?;
    let version = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .map(str::to_owned)
        .with_context(|| format!("{} --version printed nothing", bin.display()))?;
    if !out.status.success() {
        bail!("{} --version failed: {}", bin.display(), out.status);
    }
    Ok(version)
}

/// The files of one run, in the temporary directory `dir`: the configuration, the data
/// directory, and what goes to Mender's compiled-in paths (`etc` for `/etc/mender`,
/// `ident` for the identity script's directory).
struct RunFiles {
    dir: PathBuf,
    etc: PathBuf,
    ident: PathBuf,
    data: PathBuf,
    conf: PathBuf,
    script: PathBuf,
    /// Where the private system bus listens.
    bus: PathBuf,
}

impl RunFiles {
    fn write(dir: &Path) -> Result<Self> {
        let etc = dir.join("etc-mender");
        let ident = dir.join("identity");
        let data = dir.join("data");
        for d in [&etc, &ident, &data] {
            fs::create_dir(d)?;
        }
        let conf = dir.join("mender.conf");
        fs::write(
            &conf,
            format!("{{\"ServerURL\": \"{UNREACHABLE_SERVER}\"}}\n"),
        )?;
        fs::write(
            etc.join("artifact_info"),
            "artifact_name=cairn-bench-peer\n",
        )?;
        fs::write(data.join("device_type"), "device_type=cairn-bench\n")?;
        let script = ident.join("mender-device-identity");
        fs::write(&script, "#!/bin/sh\necho mac=02:00:00:00:00:01\n")?;
        set_executable(&script)?;
        Ok(RunFiles {
            dir: dir.to_path_buf(),
            etc,
            ident,
            data,
            conf,
            script,
            bus: dir.join("system_bus_socket"),
        })
    }
}

/// The command that runs `mender daemon` with the run's files at Mender's compiled-in
/// paths, and how they got there. Preferred: a private mount namespace, so nothing
/// outside the temporary directory is written. Fallback: files written into place for
/// the run, removed when the returned guard drops.
fn daemon_command(bin: &Path, f: &RunFiles) -> Result<(Command, &'static str, Placed)> {
    let (mut cmd, files_note, placed) = if namespace_works(&f.etc, &f.ident) {
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "--", "sh", "-c"])
            .arg(
                "mount --bind \"$1\" \"$3\" && mount --bind \"$2\" \"$4\" && shift 4 && exec \"$@\"",
            )
            .arg("sh")
            .args([f.etc.as_os_str(), f.ident.as_os_str()])
            .args([CONF_DIR, IDENTITY_DIR])
            .arg(bin);
        (
            c,
            "artifact_info and identity script bind-mounted in a private mount namespace",
            Placed::default(),
        )
    } else {
        let placed = Placed::put(&[
            (Path::new(ARTIFACT_INFO), &f.etc.join("artifact_info")),
            (Path::new(IDENTITY_SCRIPT), &f.script),
        ])?;
        (
            Command::new(bin),
            "artifact_info and identity script placed for the run and removed after",
            placed,
        )
    };
    cmd.arg("--no-syslog")
        .arg("--config")
        .arg(&f.conf)
        .arg("--fallback-config")
        .arg(f.dir.join("no-fallback.conf"))
        .arg("--data")
        .arg(&f.data)
        .arg("daemon");
    Ok((cmd, files_note, placed))
}

/// The daemon, running Mender's binary.
struct Daemon {
    pid: u32,
    started: Instant,
    /// Mender's binary, symbolic links resolved where possible.
    exe: PathBuf,
}

/// Starts `cmd` on the private bus with its output in the run's log files, and waits
/// until the process runs Mender's binary.
fn start_daemon(mut cmd: Command, bin: &Path, f: &RunFiles, procs: &mut Procs) -> Result<Daemon> {
    let log_file = |name: &str| -> Result<Stdio> { Ok(fs::File::create(f.dir.join(name))?.into()) };
    cmd.env(
        "DBUS_SYSTEM_BUS_ADDRESS",
        format!("unix:path={}", f.bus.display()),
    )
    .stdin(Stdio::null())
    .stdout(log_file("mender.out")?)
    .stderr(log_file("mender.log")?);
    let started = Instant::now();
    let child = cmd.spawn().context("starting mender daemon")?;
    let pid = child.id();
    procs.0.push(child);

    // The namespace wrapper execs mender in place: same PID once the exec is done.
    let want = fs::canonicalize(bin).unwrap_or_else(|_| bin.to_path_buf());
    loop {
        if fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|e| e == want) {
            break;
        }
        if procs.exited(pid) || started.elapsed() > Duration::from_secs(10) {
            bail!(
                "mender daemon did not start: {}",
                log_tail(&f.dir.join("mender.log"))
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Daemon {
        pid,
        started,
        exe: want,
    })
}

/// What was read of the daemon's processes after idling.
struct Seen {
    /// How many processes: the daemon and its descendants.
    processes: usize,
    rss_kib: u64,
    libs: BTreeSet<PathBuf>,
    exe: PathBuf,
}

/// Lets the daemon idle until `idle` after its start, reads the memory and the mapped
/// libraries of its process tree, then kills the tree.
fn idle_and_read(d: &Daemon, idle: Duration, f: &RunFiles, procs: &mut Procs) -> Result<Seen> {
    std::thread::sleep(idle.saturating_sub(d.started.elapsed()));
    if procs.exited(d.pid) {
        bail!(
            "mender daemon exited before {} s idle: {}",
            idle.as_secs(),
            log_tail(&f.dir.join("mender.log"))
        );
    }
    let tree = process_tree(d.pid);
    let mut rss_kib = 0u64;
    let mut libs = BTreeSet::new();
    for p in &tree {
        let status = fs::read_to_string(format!("/proc/{p}/status"))
            .with_context(|| format!("reading /proc/{p}/status"))?;
        rss_kib += vm_rss_kib(&status).with_context(|| format!("no VmRSS for {p}"))?;
        if let Ok(maps) = fs::read_to_string(format!("/proc/{p}/maps")) {
            libs.extend(mapped_shared_libs(&maps));
        }
    }
    let exe = fs::read_link(format!("/proc/{}/exe", d.pid)).unwrap_or_else(|_| d.exe.clone());
    // Kill now, so the figures do not wait on the file reads that follow.
    procs.kill_all(&tree);
    Ok(Seen {
        processes: tree.len(),
        rss_kib,
        libs,
        exe,
    })
}

/// The binary's size as it would be shipped stripped, and how it was found.
fn binary_size(exe: &Path, dir: &Path) -> Result<(u64, &'static str)> {
    let exe_bytes = fs::read(exe).with_context(|| format!("reading {}", exe.display()))?;
    Ok(match elf_has_symtab(&exe_bytes) {
        Some(false) => (exe_bytes.len() as u64, "as shipped, already stripped"),
        Some(true) => match stripped_size(exe, dir) {
            Some(n) => (n, "shipped unstripped; size after `strip`"),
            None => (
                exe_bytes.len() as u64,
                "shipped unstripped and no `strip` here; size as shipped",
            ),
        },
        None => (exe_bytes.len() as u64, "not a 64-bit ELF; size as shipped"),
    })
}

/// The summed sizes of `files`.
fn files_bytes(files: &BTreeSet<PathBuf>) -> Result<u64> {
    let mut bytes = 0u64;
    for l in files {
        bytes += fs::metadata(l)
            .with_context(|| format!("size of {}", l.display()))?
            .len();
    }
    Ok(bytes)
}

fn find_mender() -> Option<PathBuf> {
    let usr = PathBuf::from("/usr/bin/mender");
    if usr.is_file() {
        return Some(usr);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("mender"))
            .find(|c| c.is_file())
    })
}

fn set_executable(p: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// Whether `unshare -m` and the two bind mounts work here (root with CAP_SYS_ADMIN).
fn namespace_works(etc: &Path, ident: &Path) -> bool {
    if !Path::new(CONF_DIR).is_dir() || !Path::new(IDENTITY_DIR).is_dir() {
        return false;
    }
    Command::new("unshare")
        .args(["-m", "--propagation", "private", "--", "sh", "-c"])
        .arg("mount --bind \"$1\" \"$3\" && mount --bind \"$2\" \"$4\"")
        .arg("sh")
        .args([etc.as_os_str(), ident.as_os_str()])
        .args([CONF_DIR, IDENTITY_DIR])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A `dbus-daemon` with the system bus policy listening on `socket`.
fn start_private_bus(socket: &Path) -> Result<Child> {
    let mut child = Command::new("dbus-daemon")
        .args(["--system", "--nofork", "--nopidfile"])
        .arg(format!("--address=unix:path={}", socket.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting dbus-daemon")?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if socket.exists() {
            return Ok(child);
        }
        if child.try_wait()?.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    bail!("dbus-daemon did not listen on {}", socket.display())
}

/// Children started here; killed and reaped on drop.
#[derive(Default)]
struct Procs(Vec<Child>);

impl Procs {
    fn exited(&mut self, pid: u32) -> bool {
        self.0
            .iter_mut()
            .find(|c| c.id() == pid)
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// Kills the descendants of our children found in `tree` (by PID), then our children.
    fn kill_all(&mut self, tree: &[u32]) {
        let ours: Vec<u32> = self.0.iter().map(Child::id).collect();
        let others: Vec<String> = tree
            .iter()
            .filter(|p| !ours.contains(p))
            .map(u32::to_string)
            .collect();
        if !others.is_empty() {
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&others)
                .stderr(Stdio::null())
                .status();
        }
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.0.clear();
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        self.kill_all(&[]);
    }
}

/// Files put into system paths for the run (only where none was), removed on drop,
/// with any directories that had to be created.
#[derive(Default)]
struct Placed(Vec<PathBuf>);

impl Placed {
    fn put(files: &[(&Path, &Path)]) -> Result<Self> {
        let mut placed = Placed::default();
        for (dst, src) in files {
            if dst.exists() {
                continue;
            }
            if let Some(parent) = dst.parent() {
                let mut missing = Vec::new();
                let mut d = parent;
                while !d.exists() {
                    missing.push(d.to_path_buf());
                    match d.parent() {
                        Some(p) => d = p,
                        None => break,
                    }
                }
                fs::create_dir_all(parent)?;
                placed.0.extend(missing.into_iter().rev());
            }
            fs::copy(src, dst).with_context(|| format!("writing {}", dst.display()))?;
            placed.0.push(dst.to_path_buf());
        }
        Ok(placed)
    }
}

impl Drop for Placed {
    fn drop(&mut self) {
        for p in self.0.iter().rev() {
            let _ = if p.is_dir() {
                fs::remove_dir(p)
            } else {
                fs::remove_file(p)
            };
        }
    }
}

/// `pid` and its descendants, from the parent PIDs in `/proc/*/stat`.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            if let Some(pp) = fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| stat_ppid(&s))
            {
                parent_of.push((p, pp));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let cur = tree[i];
        for &(p, pp) in &parent_of {
            if pp == cur && !tree.contains(&p) {
                tree.push(p);
            }
        }
        i += 1;
    }
    tree
}

/// The parent PID from `/proc/PID/stat` (the field after the state, after the comm's `)`).
fn stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `VmRSS` in KiB from `/proc/PID/status`.
fn vm_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The shared libraries a running process maps: how many, and their file sizes in MiB
/// (the same measure as a peer's `shared_libs_mb`).
pub fn shared_libs_of(pid: u32) -> Result<(usize, f64)> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps"))
        .with_context(|| format!("reading /proc/{pid}/maps"))?;
    let libs = mapped_shared_libs(&maps);
    let bytes = files_bytes(&libs)?;
    Ok((libs.len(), bytes as f64 / 1_048_576.0))
}

/// Unique shared-object files mapped, from `/proc/PID/maps`.
fn mapped_shared_libs(maps: &str) -> BTreeSet<PathBuf> {
    maps.lines()
        .filter_map(|l| {
            // address perms offset dev inode, then the path after padding.
            let path = l.splitn(6, ' ').nth(5)?.trim_start();
            let path = path.strip_suffix(" (deleted)").unwrap_or(path);
            let name = path.strip_prefix('/')?.rsplit('/').next()?;
            (name.ends_with(".so") || name.contains(".so.")).then(|| PathBuf::from(path))
        })
        .collect()
}

/// Whether a 64-bit little-endian ELF image has a symbol table (`SHT_SYMTAB`), i.e. is
/// not stripped; None when it is not such an ELF or its section headers are cut off.
fn elf_has_symtab(elf: &[u8]) -> Option<bool> {
    if elf.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
    let u32_at = |o: usize| Some(u32::from_le_bytes(elf.get(o..o + 4)?.try_into().ok()?));
    let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
    let shoff = usize::try_from(u64_at(0x28)?).ok()?;
    let shentsize = usize::from(u16_at(0x3a)?);
    let shnum = usize::from(u16_at(0x3c)?);
    const SHT_SYMTAB: u32 = 2;
    let mut any = false;
    for i in 0..shnum {
        any |= u32_at(shoff + i * shentsize + 4)? == SHT_SYMTAB;
    }
    Some(any)
}

/// Size of a stripped copy of `bin`, when `strip` is installed.
fn stripped_size(bin: &Path, dir: &Path) -> Option<u64> {
    let out = dir.join("stripped");
    let ok = Command::new("strip")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| fs::metadata(&out).ok().map(|m| m.len()))
        .flatten()
}

fn os_name() -> String {
    fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                .map(|v| v.trim_matches('"').to_owned())
        })
        .unwrap_or_else(|| "unknown OS".into())
}

fn log_tail(p: &Path) -> String {
    let s = fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_give_unique_shared_objects() {
        let maps = "\
00400000-00401000 r--p 00000000 08:01 123                                /usr/bin/mender
7f00-7f01 r--p 00000000 08:01 5                          /usr/lib/x86_64-linux-gnu/libc.so.6
7f01-7f02 r-xp 00001000 08:01 5                          /usr/lib/x86_64-linux-gnu/libc.so.6
7f02-7f03 r--p 00000000 08:01 6                          /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7f03-7f04 r--p 00000000 08:01 7                          /usr/lib/x86_64-linux-gnu/gconv/gconv-modules.cache
7f04-7f05 r--p 00000000 08:01 8                          /opt/my lib/libfoo.so (deleted)
7f05-7f06 rw-p 00000000 00:00 0                          [heap]
7f06-7f07 rw-p 00000000 00:00 0 
7ffd-7ffe r-xp 00000000 00:00 0                          [vdso]
";
        let libs: Vec<PathBuf> = mapped_shared_libs(maps).into_iter().collect();
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/opt/my lib/libfoo.so"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
            ]
        );
    }

    #[test]
    fn status_and_stat_fields() {
        let status = "Name:\tmender\nVmHWM:\t   38264 kB\nVmRSS:\t   33364 kB\nThreads:\t8\n";
        assert_eq!(vm_rss_kib(status), Some(33364));
        assert_eq!(vm_rss_kib("Name:\tkthreadd\n"), None);
        let stat = "8988 (odd) name) S 8987 8988 1 0 -1 4194560 1 0";
        assert_eq!(stat_ppid(stat), Some(8987));
    }

    /// A minimal ELF64 header with two section headers of the given types.
    fn elf_with_sections(types: [u32; 2]) -> Vec<u8> {
        let mut e = vec![0u8; 64 + 2 * 64];
        e[..6].copy_from_slice(b"\x7fELF\x02\x01");
        e[0x28..0x30].copy_from_slice(&64u64.to_le_bytes());
        e[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        e[0x3c..0x3e].copy_from_slice(&2u16.to_le_bytes());
        for (i, t) in types.iter().enumerate() {
            let o = 64 + i * 64 + 4;
            e[o..o + 4].copy_from_slice(&t.to_le_bytes());
        }
        e
    }

    #[test]
    fn elf_symtab_detection() {
        assert_eq!(elf_has_symtab(&elf_with_sections([1, 2])), Some(true));
        assert_eq!(elf_has_symtab(&elf_with_sections([1, 3])), Some(false));
        assert_eq!(elf_has_symtab(b"#!/bin/sh\n"), None);
        let cut = elf_with_sections([1, 2]);
        assert_eq!(elf_has_symtab(&cut[..100]), None);
        // This test binary is built with symbols (debug profile).
        if let Ok(exe) = std::env::current_exe().and_then(fs::read) {
            assert!(elf_has_symtab(&exe).is_some());
        }
    }

    /// Needs `apt-get install mender-client` (and root): run with
    /// `cargo test -p cairn-examples --lib peers -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn measures_mender_when_installed() {
        match mender(Duration::from_secs(20)).expect("mender installed but not measurable") {
            Ok(f) => {
                println!("{f:#?}");
                assert!(f.idle_rss_mb > 1.0, "{f:?}");
                assert!(f.binary_mb > 1.0, "{f:?}");
                assert!(f.shared_libs_mb > 0.0, "{f:?}");
                assert!(f.version.starts_with('3'), "{f:?}");
            }
            Err(why) => println!("skipped: {why}"),
        }
    }
}
