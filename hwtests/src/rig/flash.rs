//! Writing an image onto a box's boot medium from the rig host.
//!
//! [`check_target`] refuses anything that is not a whole, unused disk: a path that is
//! not a block device, a partition, a disk with a mounted file system or swap on it
//! (`/proc/self/mountinfo`, `/proc/swaps`), the disk holding the rig host's root, and
//! a disk held by device mapper or RAID (sysfs `holders`). The device is then opened
//! `O_EXCL`, which the kernel refuses while anything else claims it.
//!
//! [`write_image`] copies the image's data extents (`SEEK_DATA`/`SEEK_HOLE`), zeroes
//! its holes on the device with `fallocate` (discard or write-zeroes where the device
//! has them; zeros written otherwise: old contents never show through), zeroes the
//! last MiB of a larger device (a stale backup GPT), fsyncs, drops the range from the
//! page cache, reads it back and compares SHA-256 digests.

use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rustix::fs::{FallocateFlags, Mode, OFlags};
use sha2::{Digest, Sha256};

use super::config::FlashConfig;
use super::shell::Shell;

const MIB: u64 = 1 << 20;
const CHUNK: usize = 4 << 20;

/// A flash target: a whole disk, or (for tests only) a regular file standing in for one.
#[derive(Debug, Clone)]
pub struct Target {
    path: PathBuf,
    regular_file: bool,
}

impl Target {
    /// A whole-disk block device such as `/dev/disk/by-id/usb-…`.
    pub fn block_device(path: &Path) -> Target {
        Target {
            path: path.to_path_buf(),
            regular_file: false,
        }
    }

    /// **Tests only**: an existing regular file standing in for a disk of its size. The
    /// block-device checks are skipped; the writing, zeroing and verifying are the same.
    /// No configuration reaches this.
    pub fn regular_file_standing_in_for_a_disk(path: &Path) -> Target {
        Target {
            path: path.to_path_buf(),
            regular_file: true,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`check_target`], or for a stand-in file its size.
    pub fn check(&self) -> Result<TargetInfo> {
        if self.regular_file {
            let m = std::fs::metadata(&self.path)
                .with_context(|| format!("stand-in disk {}", self.path.display()))?;
            if !m.is_file() {
                bail!(
                    "stand-in disk {} is not a regular file",
                    self.path.display()
                );
            }
            return Ok(TargetInfo {
                path: self.path.clone(),
                size: m.len(),
                block: false,
            });
        }
        check_target(&self.path)
    }
}

/// A target that passed the checks.
#[derive(Debug, Clone)]
pub struct TargetInfo {
    /// The device node (symlinks resolved).
    pub path: PathBuf,
    /// Bytes; 0 when there is no medium.
    pub size: u64,
    pub block: bool,
}

/// Checks that `path` is a whole disk nothing on the rig host uses.
pub fn check_target(path: &Path) -> Result<TargetInfo> {
    let shown = path.display();
    let meta = std::fs::metadata(path).map_err(|e| {
        if e.kind() == io::ErrorKind::NotFound {
            anyhow::anyhow!(
                "{shown} does not exist: is the adapter (or SD mux, or the box in mass-storage mode) plugged in? Disks are listed in /dev/disk/by-id/"
            )
        } else {
            anyhow::anyhow!("{shown}: {e}")
        }
    })?;
    let real = std::fs::canonicalize(path).with_context(|| format!("resolving {shown}"))?;
    let via = if real != path {
        format!("{shown} (→ {})", real.display())
    } else {
        shown.to_string()
    };
    let ft = meta.file_type();
    if !ft.is_block_device() {
        let kind = if ft.is_file() {
            "a regular file"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_char_device() {
            "a character device"
        } else {
            "not a device"
        };
        bail!(
            "{via} is not a block device but {kind}: a flash target is a whole disk such as /dev/disk/by-id/usb-…"
        );
    }
    let dev = DevNum::of(meta.rdev());
    let sys = dev.sysfs()?;
    if sys.join("partition").exists() {
        let disk = sys
            .parent()
            .and_then(|p| p.file_name())
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        bail!(
            "{via} is a partition of /dev/{disk}: give the whole disk, the image has its own partition table"
        );
    }
    let name = sys
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();

    let mounts =
        std::fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for m in parse_mountinfo(&mounts) {
        let disks = m.disks();
        if !disks.contains(&dev) {
            continue;
        }
        if m.mount_point == "/" {
            bail!(
                "{via} is the rig host's own root disk (/ is mounted from {}): refusing to write to it",
                m.source
            );
        }
        bail!(
            "{via} is in use: {} is mounted on {}; unmount it first (umount {})",
            m.source,
            m.mount_point,
            m.mount_point
        );
    }
    if let Ok(swaps) = std::fs::read_to_string("/proc/swaps") {
        for line in swaps.lines().skip(1) {
            let Some(p) = line.split_whitespace().next() else {
                continue;
            };
            if let Ok(m) = std::fs::metadata(p)
                && m.file_type().is_block_device()
                && DevNum::of(m.rdev()).disks().contains(&dev)
            {
                bail!("{via} is in use: {p} on it is swap (swapoff {p})");
            }
        }
    }
    let mut holders = list(&sys.join("holders"));
    for part in partitions(&sys, &name) {
        holders.extend(list(&sys.join(&part).join("holders")));
    }
    if !holders.is_empty() {
        bail!(
            "{via} is in use by {} (device mapper: LVM, dm-crypt; or RAID): refusing to write to it",
            holders.join(", ")
        );
    }
    let size = device_size(&real)?;
    Ok(TargetInfo {
        path: real,
        size,
        block: true,
    })
}

fn device_size(path: &Path) -> Result<u64> {
    let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    rustix::fs::seek(&f, rustix::fs::SeekFrom::End(0))
        .map_err(io::Error::from)
        .with_context(|| format!("reading the size of {}", path.display()))
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn partitions(sys: &Path, name: &str) -> Vec<String> {
    list(sys)
        .into_iter()
        .filter(|n| n.starts_with(name) && sys.join(n).join("partition").exists())
        .collect()
}

/// A block device number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DevNum {
    pub major: u32,
    pub minor: u32,
}

impl DevNum {
    fn of(rdev: u64) -> DevNum {
        DevNum {
            major: rustix::fs::major(rdev),
            minor: rustix::fs::minor(rdev),
        }
    }

    fn parse(s: &str) -> Option<DevNum> {
        let (a, b) = s.trim().split_once(':')?;
        Some(DevNum {
            major: a.parse().ok()?,
            minor: b.parse().ok()?,
        })
    }

    fn sysfs(self) -> Result<PathBuf> {
        let p = format!("/sys/dev/block/{}:{}", self.major, self.minor);
        std::fs::canonicalize(&p).with_context(|| format!("{p} (is /sys mounted?)"))
    }

    /// The whole disks this device lives on: itself, the disk of a partition, or the
    /// disks under a device-mapper or RAID device.
    pub fn disks(self) -> Vec<DevNum> {
        let mut out = Vec::new();
        self.disks_into(&mut out, 0);
        out
    }

    fn disks_into(self, out: &mut Vec<DevNum>, depth: usize) {
        let Ok(sys) = self.sysfs() else {
            return;
        };
        if sys.join("partition").exists() {
            if let Some(d) = sys
                .parent()
                .and_then(|p| std::fs::read_to_string(p.join("dev")).ok())
                .and_then(|s| DevNum::parse(&s))
            {
                out.push(d);
            }
            return;
        }
        let slaves = list(&sys.join("slaves"));
        if slaves.is_empty() || depth > 8 {
            out.push(self);
            return;
        }
        for s in slaves {
            if let Some(d) = std::fs::read_to_string(format!("/sys/class/block/{s}/dev"))
                .ok()
                .and_then(|s| DevNum::parse(&s))
            {
                d.disks_into(out, depth + 1);
            }
        }
    }
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub dev: Option<DevNum>,
    pub mount_point: String,
    pub source: String,
}

impl Mount {
    /// The whole disks the mounted file system is on: by its device number, and by its
    /// source when that is a block device (btrfs reports anonymous device numbers).
    pub fn disks(&self) -> Vec<DevNum> {
        let mut d: Vec<DevNum> = self
            .dev
            .filter(|d| d.major != 0)
            .map(|d| d.disks())
            .unwrap_or_default();
        if self.source.starts_with('/')
            && let Ok(m) = std::fs::metadata(&self.source)
            && m.file_type().is_block_device()
        {
            d.extend(DevNum::of(m.rdev()).disks());
        }
        d
    }
}

/// Parses `/proc/self/mountinfo` (octal escapes in paths decoded).
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            Some(Mount {
                dev: DevNum::parse(f.get(2)?),
                mount_point: unescape(f.get(4)?),
                source: unescape(r.get(1)?),
            })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What [`write_image`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    pub device: PathBuf,
    pub bytes: u64,
    /// Bytes copied; the rest were holes, zeroed on the device.
    pub data_bytes: u64,
    pub sha256: String,
    pub write_seconds: f64,
    pub verify_seconds: f64,
}

/// Writes `image` onto `target`, fsyncs, and verifies a read-back digest.
/// `label` names the box in the progress bar.
pub fn write_image(image: &Path, target: &Target, label: &str) -> Result<Written> {
    let info = target.check()?;
    let src = File::open(image).with_context(|| format!("opening {}", image.display()))?;
    let len = src.metadata()?.len();
    if info.size == 0 {
        bail!(
            "{} has no medium (empty card reader, or an SD mux switched to the box)",
            info.path.display()
        );
    }
    if len > info.size {
        bail!(
            "{} is {} MiB, {} only {} MiB",
            image.display(),
            len.div_ceil(MIB),
            info.path.display(),
            info.size / MIB
        );
    }
    let dst = open_target(&info)?;
    let t = Instant::now();
    let bar = progress(len, &format!("{label}: writing"));
    let mut hash = Sha256::new();
    let mut zeroer = Zeroer::default();
    let mut data_bytes = 0;
    let mut pos = 0;
    let mut buf = vec![0u8; CHUNK];
    let zeros = vec![0u8; CHUNK];
    let werr = |what: &str, at: u64| format!("{what} {} at byte {at}", info.path.display());
    for (start, end) in data_extents(&src, len)? {
        if start > pos {
            zeroer
                .zero(&dst, pos, start - pos)
                .with_context(|| werr("zeroing", pos))?;
            hash_zeros(&mut hash, &zeros, start - pos);
            bar.inc(start - pos);
        }
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(CHUNK);
            src.read_exact_at(&mut buf[..n], at)
                .with_context(|| format!("reading {} at byte {at}", image.display()))?;
            dst.write_all_at(&buf[..n], at)
                .with_context(|| werr("writing", at))?;
            hash.update(&buf[..n]);
            at += n as u64;
            data_bytes += n as u64;
            bar.inc(n as u64);
        }
        pos = end;
    }
    if pos < len {
        zeroer
            .zero(&dst, pos, len - pos)
            .with_context(|| werr("zeroing", pos))?;
        hash_zeros(&mut hash, &zeros, len - pos);
        bar.inc(len - pos);
    }
    // A larger device may keep a backup GPT of an older image at its end.
    if info.size > len {
        let tail = (info.size - len).min(MIB);
        zeroer
            .zero(&dst, info.size - tail, tail)
            .with_context(|| werr("zeroing the end of", info.size - tail))?;
    }
    bar.set_message(format!("{label}: syncing"));
    dst.sync_all()
        .with_context(|| format!("fsync of {}", info.path.display()))?;
    bar.finish_and_clear();
    let write_seconds = t.elapsed().as_secs_f64();
    let want = hex::encode(hash.finalize());

    let t = Instant::now();
    let _ = rustix::fs::fadvise(
        &dst,
        0,
        std::num::NonZeroU64::new(len),
        rustix::fs::Advice::DontNeed,
    );
    let bar = progress(len, &format!("{label}: verifying"));
    let mut hash = Sha256::new();
    let mut at = 0;
    while at < len {
        let n = ((len - at) as usize).min(CHUNK);
        dst.read_exact_at(&mut buf[..n], at)
            .with_context(|| format!("reading back {} at byte {at}", info.path.display()))?;
        hash.update(&buf[..n]);
        at += n as u64;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    let got = hex::encode(hash.finalize());
    if got != want {
        bail!(
            "verifying {}: the first {len} bytes read back as SHA-256 {got}, the image is {want}: the medium does not keep what is written (a failing or fake-capacity card?)",
            info.path.display()
        );
    }
    let w = Written {
        device: info.path.clone(),
        bytes: len,
        data_bytes,
        sha256: want,
        write_seconds,
        verify_seconds: t.elapsed().as_secs_f64(),
    };
    tracing::info!(
        device = %w.device.display(),
        mib = len / MIB,
        data_mib = data_bytes / MIB,
        write_s = format!("{:.1}", w.write_seconds),
        verify_s = format!("{:.1}", w.verify_seconds),
        "image written and verified"
    );
    Ok(w)
}

fn open_target(info: &TargetInfo) -> Result<File> {
    let mut flags = OFlags::RDWR | OFlags::CLOEXEC;
    if info.block {
        flags |= OFlags::EXCL;
    }
    let fd: OwnedFd = rustix::fs::open(&info.path, flags, Mode::empty()).map_err(|e| {
        if e == rustix::io::Errno::BUSY {
            anyhow::anyhow!(
                "{} is in use (the kernel refused an exclusive open: mounted, swap, or held by LVM/RAID/dm-crypt)",
                info.path.display()
            )
        } else {
            anyhow::Error::from(io::Error::from(e))
                .context(format!("opening {} for writing", info.path.display()))
        }
    })?;
    Ok(File::from(fd))
}

fn hash_zeros(h: &mut Sha256, zeros: &[u8], mut n: u64) {
    while n > 0 {
        let k = (n as usize).min(zeros.len());
        h.update(&zeros[..k]);
        n -= k as u64;
    }
}

/// The image's data extents `[start, end)`; all of it where holes cannot be told.
fn data_extents(f: &File, len: u64) -> Result<Vec<(u64, u64)>> {
    use rustix::fs::{SeekFrom, seek};
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let start = match seek(f, SeekFrom::Data(pos)) {
            Ok(s) => s,
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return Ok(vec![(0, len)]),
        };
        let end = match seek(f, SeekFrom::Hole(start)) {
            Ok(e) => e.min(len),
            Err(_) => len,
        };
        if end <= start {
            break;
        }
        out.push((start, end));
        pos = end;
    }
    Ok(out)
}

/// Zeroes ranges of the target the cheapest way it supports, remembering what failed.
#[derive(Default)]
struct Zeroer {
    no_punch: bool,
    no_zero_range: bool,
}

impl Zeroer {
    fn zero(&mut self, f: &File, off: u64, len: u64) -> io::Result<()> {
        // fallocate on block devices wants logical-block alignment; write the edges.
        let a0 = off.next_multiple_of(4096).min(off + len);
        let a1 = ((off + len) / 4096 * 4096).max(a0);
        write_zeros(f, off, a0 - off)?;
        write_zeros(f, a1, off + len - a1)?;
        if a1 == a0 {
            return Ok(());
        }
        let keep = FallocateFlags::KEEP_SIZE;
        if !self.no_punch {
            match rustix::fs::fallocate(f, keep | FallocateFlags::PUNCH_HOLE, a0, a1 - a0) {
                Ok(()) => return Ok(()),
                Err(_) => self.no_punch = true,
            }
        }
        if !self.no_zero_range {
            match rustix::fs::fallocate(f, keep | FallocateFlags::ZERO_RANGE, a0, a1 - a0) {
                Ok(()) => return Ok(()),
                Err(_) => self.no_zero_range = true,
            }
        }
        write_zeros(f, a0, a1 - a0)
    }
}

fn write_zeros(f: &File, mut off: u64, mut len: u64) -> io::Result<()> {
    let zeros = vec![0u8; (len as usize).min(CHUNK)];
    while len > 0 {
        let n = (len as usize).min(zeros.len());
        f.write_all_at(&zeros[..n], off)?;
        off += n as u64;
        len -= n as u64;
    }
    Ok(())
}

fn progress(len: u64, msg: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    let style = indicatif::ProgressStyle::with_template(
        "{msg:<24} [{bar:32}] {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>12} eta {eta}",
    )
    .map(|s| s.progress_chars("=> "))
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar.set_message(msg.to_string());
    bar
}

/// Waits until `path` exists and, for a block device, has a medium.
fn wait_for_medium(path: &Path, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let ready = match std::fs::metadata(path) {
            Ok(m) if m.file_type().is_block_device() => device_size(path).unwrap_or(0) > 0,
            Ok(_) => true,
            Err(_) => false,
        };
        if ready {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{} did not appear with a medium within {}",
                path.display(),
                humantime::format_duration(limit)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// How the rig writes one box's boot medium.
pub enum Flasher {
    MassStorage {
        target: Target,
        before: Option<String>,
        after: Option<String>,
        appear_timeout: Duration,
    },
    SdMux {
        control: PathBuf,
        target: Target,
        tool: String,
        appear_timeout: Duration,
    },
    Command {
        command: String,
        timeout: Duration,
    },
}

/// Hooks and switching commands: bounded.
const HOOK_TIMEOUT: Duration = Duration::from_secs(120);

impl Flasher {
    /// From `[box.flash]`: targets are block devices.
    pub fn from_config(cfg: &FlashConfig) -> Flasher {
        Flasher::with_target(cfg, Target::block_device)
    }

    /// From `[box.flash]`, with `target` making the [`Target`] from the configured
    /// device path (tests pass [`Target::regular_file_standing_in_for_a_disk`]).
    pub fn with_target(cfg: &FlashConfig, target: impl Fn(&Path) -> Target) -> Flasher {
        match cfg {
            FlashConfig::UsbMassStorage {
                device,
                before,
                after,
                appear_timeout,
            } => Flasher::MassStorage {
                target: target(device),
                before: before.clone(),
                after: after.clone(),
                appear_timeout: *appear_timeout,
            },
            FlashConfig::SdMux {
                control,
                device,
                tool,
                appear_timeout,
            } => Flasher::SdMux {
                control: control.clone(),
                target: target(device),
                tool: tool.clone(),
                appear_timeout: *appear_timeout,
            },
            FlashConfig::Command { command, timeout } => Flasher::Command {
                command: command.clone(),
                timeout: *timeout,
            },
        }
    }

    /// One line for logs and tables.
    pub fn describe(&self) -> String {
        match self {
            Flasher::MassStorage { target, .. } => {
                format!("usb-mass-storage {}", target.path().display())
            }
            Flasher::SdMux {
                control, target, ..
            } => format!("sd-mux {} ({})", target.path().display(), control.display()),
            Flasher::Command { .. } => "command".into(),
        }
    }

    /// Writes `image` for box `name` (which is off).
    pub fn flash(&self, image: &Path, name: &str) -> Result<()> {
        match self {
            Flasher::MassStorage {
                target,
                before,
                after,
                appear_timeout,
            } => {
                let hook = |script: &str| {
                    Shell {
                        script,
                        args: vec![],
                        env: vec![
                            ("CAIRN_BOX", OsString::from(name)),
                            ("CAIRN_DEVICE", target.path().as_os_str().to_owned()),
                        ],
                        timeout: HOOK_TIMEOUT,
                    }
                    .run()
                };
                if let Some(b) = before {
                    hook(b).context("flash.before")?;
                }
                let r = wait_for_medium(target.path(), *appear_timeout)
                    .and_then(|()| write_image(image, target, name));
                let a = after.as_deref().map(|a| hook(a).context("flash.after"));
                r?;
                if let Some(a) = a {
                    a?;
                }
                Ok(())
            }
            Flasher::SdMux {
                control,
                target,
                tool,
                appear_timeout,
            } => {
                let mux = |to: &str| {
                    Shell {
                        script: &format!("{tool} \"$1\" {to}"),
                        args: vec![control.as_os_str().to_owned()],
                        env: vec![("CAIRN_BOX", OsString::from(name))],
                        timeout: HOOK_TIMEOUT,
                    }
                    .run()
                    .with_context(|| format!("switching the SD mux {} to {to}", control.display()))
                };
                mux("host")?;
                let r = wait_for_medium(target.path(), *appear_timeout)
                    .and_then(|()| write_image(image, target, name));
                let back = mux("dut");
                r?;
                back.map(|_| ())
            }
            Flasher::Command { command, timeout } => {
                Shell {
                    script: command,
                    args: vec![image.as_os_str().to_owned()],
                    env: vec![
                        ("CAIRN_BOX", OsString::from(name)),
                        ("CAIRN_IMAGE", image.as_os_str().to_owned()),
                    ],
                    timeout: *timeout,
                }
                .run()
                .context("flash command")?;
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines() {
        let t = "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard\n\
                 40 27 8:17 / /media/my\\040stick rw - vfat /dev/sdb1 rw\n\
                 41 27 0:45 / /data rw - btrfs /dev/sdc2 rw\n\
                 garbage\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 3);
        assert_eq!(
            m[0],
            Mount {
                dev: Some(DevNum {
                    major: 254,
                    minor: 0
                }),
                mount_point: "/".into(),
                source: "/dev/vda".into()
            }
        );
        assert_eq!(m[1].mount_point, "/media/my stick");
        assert_eq!(
            m[2].dev,
            Some(DevNum {
                major: 0,
                minor: 45
            })
        );
        assert_eq!(m[2].source, "/dev/sdc2");
    }
}
