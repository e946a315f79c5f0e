//! Peers of the OS upgrade path, measured side by side with our installer by the
//! benchmark harness's `upgrade` section:
//!
//! - RAUC 1.8 from Debian (`rauc`, `rauc-service`, and `squashfs-tools` to build its
//!   bundles): a `format=plain` bundle (a signed squashfs; `verity` needs
//!   device-mapper, which this kind of machine lacks), two `type=raw` slots whose
//!   `device=` is a plain file, `bootloader=custom` with a small shell backend, and the
//!   `rauc service` on a private `dbus-daemon` reached through
//!   `DBUS_SYSTEM_BUS_ADDRESS` (set on our children only). Everything lives in a
//!   temporary directory; both daemons are killed and reaped on drop.
//! - casync from Debian: how many bytes of new chunks a second image needs, given the
//!   chunk store of the first, read from the two `.caibx` indexes.

use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A RAUC service ready to install one bundle into slot `rootfs.1`.
pub struct Rauc {
    pub version: String,
    pub bundle: PathBuf,
    bus: String,
    children: Vec<Child>,
    tmp: tempfile::TempDir,
}

fn found(name: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn run(c: &mut Command, what: &str) -> Result<()> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

const BOOT_BACKEND: &str = r#"#!/bin/sh
# The custom boot loader backend of the benchmark: the primary slot in a file.
state="$(dirname "$0")/primary"
case "$1" in
  get-primary) cat "$state" 2>/dev/null || echo A ;;
  set-primary) echo "$2" > "$state" ;;
  get-state) echo good ;;
  set-state) ;;
  get-current) echo A ;;
  *) exit 1 ;;
esac
"#;

impl Rauc {
    /// Builds a plain bundle of `image` (slot class `rootfs`), starts a private bus and
    /// `rauc service` booted from `slot_a` with `slot_b` as the target. `Ok(Err(why))`
    /// when RAUC is not installed here.
    pub fn start(image: &Path, slot_a: &Path, slot_b: &Path) -> Result<Result<Self, String>> {
        if let Some(why) = missing() {
            return Ok(Err(why));
        }
        let out = Command::new("rauc").arg("--version").output()?;
        let version = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .to_string();

        let tmp = tempfile::tempdir_in(image.parent().context("image has no directory")?)?;
        let d = tmp.path();
        let (key, cert) = (d.join("key.pem"), d.join("cert.pem"));
        make_cert(&key, &cert)?;
        let bundle = d.join("bench.raucb");
        make_bundle(image, &key, &cert, d, &bundle)?;
        let conf = write_system(d, &cert, slot_a, slot_b)?;

        let socket = d.join("system_bus_socket");
        let bus = format!("unix:path={}", socket.display());
        // Owned from here on, so that whatever is started is stopped on every way out.
        let mut me = Self {
            version,
            bundle,
            bus,
            children: Vec::new(),
            tmp,
        };
        me.start_bus(&socket)?;
        me.start_service(&conf)?;
        Ok(Ok(me))
    }

    /// A `dbus-daemon` with the system bus policy listening on `socket`, the address in
    /// `self.bus`.
    fn start_bus(&mut self, socket: &Path) -> Result<()> {
        self.children.push(
            Command::new("dbus-daemon")
                .args(["--system", "--nofork", "--nopidfile"])
                .arg(format!("--address={}", self.bus))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting dbus-daemon")?,
        );
        let start = Instant::now();
        while !socket.exists() {
            if start.elapsed() > Duration::from_secs(5) {
                bail!("dbus-daemon did not listen on {}", socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    /// `rauc service` with the system configuration `conf` on the private bus, booted from
    /// slot A; returns once it answers on the bus.
    fn start_service(&mut self, conf: &Path) -> Result<()> {
        let log = fs::File::create(self.dir().join("rauc-service.log"))?;
        self.children.push(
            Command::new("rauc")
                .arg("service")
                .arg(format!("--conf={}", conf.display()))
                .arg(format!("--mount={}", self.dir().join("mnt").display()))
                .arg("--override-boot-slot=A")
                .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting rauc service")?,
        );
        // Ready once it answers on the bus.
        let start = Instant::now();
        loop {
            let ok = Command::new("rauc")
                .arg("status")
                .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                return Ok(());
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "rauc service did not answer within 10 s: {}",
                    self.service_log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }

    fn service_log(&self) -> String {
        let log = fs::read_to_string(self.dir().join("rauc-service.log")).unwrap_or_default();
        log.lines().rev().take(5).collect::<Vec<_>>().join(" / ")
    }

    /// One `rauc install` of the bundle, timed from the client's start to its exit
    /// (the service verifies the bundle's signature, mounts it, copies the image into
    /// slot `rootfs.1` and marks it primary).
    pub fn install(&self) -> Result<Duration> {
        let start = Instant::now();
        let out = Command::new("rauc")
            .arg("install")
            .arg(&self.bundle)
            .env("DBUS_SYSTEM_BUS_ADDRESS", &self.bus)
            .stdin(Stdio::null())
            .output()
            .context("running rauc install")?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!(
                "rauc install failed ({}): {} {}; service: {}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim(),
                self.service_log()
            );
        }
        Ok(took)
    }
}

impl Drop for Rauc {
    fn drop(&mut self) {
        // The service first, then its bus.
        for c in self.children.iter_mut().rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// What RAUC needs that is not installed here, and how to install it; None when all is.
fn missing() -> Option<String> {
    for (tool, pkg) in [
        ("rauc", "rauc rauc-service"),
        ("mksquashfs", "squashfs-tools"),
        ("openssl", "openssl"),
        ("dbus-daemon", "dbus"),
    ] {
        if !found(tool) {
            return Some(format!("{tool} not installed (apt-get install {pkg})"));
        }
    }
    if !Path::new("/usr/share/dbus-1/system.d/de.pengutronix.rauc.conf").exists() {
        return Some("RAUC's D-Bus policy missing (apt-get install rauc-service)".into());
    }
    None
}

/// A fresh RSA key and a self-signed certificate for it, to sign the bundle with and
/// to be RAUC's keyring.
fn make_cert(key: &Path, cert: &Path) -> Result<()> {
    run(
        Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=cairn-bench-rauc",
            ])
            .arg("-keyout")
            .arg(key)
            .arg("-out")
            .arg(cert),
        "openssl req",
    )
}

/// A plain bundle at `bundle` holding `image` as the `rootfs` image, signed with
/// `key`/`cert`; its content is staged under `d` and removed after.
fn make_bundle(image: &Path, key: &Path, cert: &Path, d: &Path, bundle: &Path) -> Result<()> {
    let content = d.join("bundle-content");
    fs::create_dir(&content)?;
    // A hard link where possible: the same bytes, not a second copy on disk.
    let inside = content.join("rootfs.img");
    if fs::hard_link(image, &inside).is_err() {
        fs::copy(image, &inside)?;
    }
    fs::write(
        content.join("manifest.raucm"),
        "[update]\ncompatible=cairn-bench\nversion=2.0.0\n\n[bundle]\nformat=plain\n\n\
         [image.rootfs]\nfilename=rootfs.img\n",
    )?;
    run(
        Command::new("rauc")
            .arg("bundle")
            .arg(format!("--cert={}", cert.display()))
            .arg(format!("--key={}", key.display()))
            .arg(&content)
            .arg(bundle),
        "rauc bundle",
    )?;
    fs::remove_dir_all(&content)?;
    Ok(())
}

/// RAUC's system configuration under `d` (two raw slots on the slot files, the custom
/// boot backend, `cert` as the keyring), with the directories the service uses; returns
/// the configuration's path.
fn write_system(d: &Path, cert: &Path, slot_a: &Path, slot_b: &Path) -> Result<PathBuf> {
    let backend = d.join("boot-backend.sh");
    fs::write(&backend, BOOT_BACKEND)?;
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(&backend, fs::Permissions::from_mode(0o755))?;
    }
    let conf = d.join("system.conf");
    fs::write(
        &conf,
        format!(
            "[system]\ncompatible=cairn-bench\nbootloader=custom\ndata-directory={data}\n\n\
             [handlers]\nbootloader-custom-backend={backend}\n\n\
             [keyring]\npath={cert}\n\n\
             [slot.rootfs.0]\ndevice={a}\ntype=raw\nbootname=A\n\n\
             [slot.rootfs.1]\ndevice={b}\ntype=raw\nbootname=B\n",
            data = d.join("data").display(),
            backend = backend.display(),
            cert = cert.display(),
            a = slot_a.display(),
            b = slot_b.display(),
        ),
    )?;
    fs::create_dir(d.join("data"))?;
    fs::create_dir(d.join("mnt"))?;
    Ok(conf)
}
/// Chunks of a casync blob index (`.caibx`): (id, length) in order.
fn caibx_chunks(path: &Path, image_len: u64) -> Result<Vec<([u8; 32], u64)>> {
    let b = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let le = |at: usize| -> Result<u64> {
        let s: [u8; 8] = b
            .get(at..at + 8)
            .and_then(|s| s.try_into().ok())
            .context("caibx truncated")?;
        Ok(u64::from_le_bytes(s))
    };
    // The index header (its own length first), then the table header (16 bytes), then
    // 40-byte items (end offset, chunk id) until the tail, whose first word is zero.
    let mut at = usize::try_from(le(0)?)? + 16;
    let mut chunks = Vec::new();
    let mut prev = 0u64;
    loop {
        let end = le(at)?;
        if end == 0 {
            break;
        }
        let id: [u8; 32] = b
            .get(at + 8..at + 40)
            .and_then(|s| s.try_into().ok())
            .context("caibx truncated in an item")?;
        if end <= prev {
            bail!("caibx offsets not increasing at byte {at}");
        }
        chunks.push((id, end - prev));
        prev = end;
        at += 40;
    }
    if prev != image_len {
        bail!("caibx covers {prev} bytes, the image has {image_len}");
    }
    Ok(chunks)
}

/// Bytes of the chunks of `v2` (each counted once) that the store made from `v1` lacks,
/// with `casync make` and its default chunking or `--chunk-size=N`. Also returns the
/// number of chunks of v2. `Ok(Err(why))` when casync is not installed.
pub fn casync_new_bytes(
    v1: &Path,
    v2: &Path,
    chunk_size: Option<u32>,
    work: &Path,
) -> Result<Result<(u64, usize), String>> {
    if !found("casync") {
        return Ok(Err("casync not installed (apt-get install casync)".into()));
    }
    let tmp = tempfile::tempdir_in(work)?;
    let store = tmp.path().join("store.castr");
    let mut chunks = Vec::new();
    for (img, name) in [(v1, "v1.caibx"), (v2, "v2.caibx")] {
        let idx = tmp.path().join(name);
        let mut c = Command::new("casync");
        c.arg("make").arg(format!("--store={}", store.display()));
        if let Some(n) = chunk_size {
            c.arg(format!("--chunk-size={n}"));
        }
        run(c.arg(&idx).arg(img), "casync make")?;
        chunks.push(caibx_chunks(&idx, fs::metadata(img)?.len())?);
    }
    let old: HashSet<[u8; 32]> = chunks[0].iter().map(|c| c.0).collect();
    let mut seen = HashSet::new();
    let new = chunks[1]
        .iter()
        .filter(|(id, _)| !old.contains(id) && seen.insert(*id))
        .map(|c| c.1)
        .sum();
    Ok(Ok((new, chunks[1].len())))
}
