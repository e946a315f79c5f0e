//! The image builder: one build gives both the disk image to flash and the slot
//! contents an A/B release is made of, so what is flashed and what is upgraded are
//! the same bytes.
//!
//! Disk layout (GPT, 1 MiB aligned):
//!
//! | # | name | contents |
//! |---|---|---|
//! | 1 | `esp` | FAT32: systemd-boot as the removable-media loader, `loader/entries/cairn-a.conf` and `cairn-b+0.conf`, the slots' unified kernel images `cairn/a.efi`, `cairn/b.efi`, and later the first-boot configuration `cairn/agent.toml` (`cairn-hub image configure`) |
//! | 2 | `cairn-a` | slot A: the read-only root (squashfs) |
//! | 3 | `cairn-b` | slot B: empty until the first upgrade; its loader entry is marked bad |
//! | 4 | `cairn-data` | ext4: the agent's database and keys |
//!
//! A slot is its root file system plus its UKI (systemd-stub + kernel + initramfs +
//! os-release). The loader entry passes `cairn.slot=a|b` on the command line; the
//! initramfs mounts that slot's root, the data partition and the ESP, then starts the
//! root's init, which runs `cairn-agent` under a supervisor loop. There is no login,
//! no getty and no SSH.
//!
//! Release payloads: `rootfs` (→ the slot partition) and `uki` (→ `cairn/X.efi` on the
//! ESP). The agent is started with `--boot sdboot:/boot/efi` and
//! `--slot-payload uki=/boot/efi/cairn/a.efi,/boot/efi/cairn/b.efi`.

use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::debs::Debs;
use crate::tools::{copy_tree, output, run, symlink, write_file};
use crate::{Arch, kmod, uki};

const MIB: u64 = 1 << 20;

/// Partition sizes in MiB.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Layout {
    pub esp_mib: u64,
    pub slot_mib: u64,
    pub data_mib: u64,
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            esp_mib: 128,
            slot_mib: 512,
            data_mib: 256,
        }
    }
}

/// A deliberate defect, for testing that broken releases roll back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The initramfs exits before mounting anything: the kernel panics, `panic=5`
    /// reboots, and the boot loader has to fall back.
    InitPanic,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "init-panic" => Ok(Fault::InitPanic),
            other => Err(format!(
                "unknown fault {other:?}; the one known is init-panic"
            )),
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec {
    pub arch: Arch,
    /// Board family releases are built for (`nuc`, `rpi4`).
    pub board: String,
    /// The OS version (semver).
    pub version: String,
    /// The `cairn-agent` binary for `arch`.
    pub agent: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Download cache for Debian packages.
    pub cache: PathBuf,
    pub layout: Layout,
    pub fault: Option<Fault>,
    /// Extra arguments for `cairn-agent run` (e.g. `--keep-alive 2s`).
    pub agent_args: Vec<String>,
    /// Kernel console arguments.
    pub console: String,
}

/// What a build made; also written as `image.json` in the output directory (and read
/// back from there by the real rig).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Built {
    pub arch: Arch,
    pub board: String,
    pub version: String,
    /// The whole disk, to flash.
    pub disk: PathBuf,
    /// Slot contents, the release payloads.
    pub rootfs: PathBuf,
    pub uki: PathBuf,
    /// SHA-256 Authenticode digest of the UKI (what UEFI measures into PCR 4).
    pub uki_authenticode: String,
    pub kernel: String,
    pub layout: Layout,
    pub fault: Option<Fault>,
}

impl Built {
    /// `--input NAME=PATH` pairs for `cairn-hub release build`.
    pub fn payloads(&self) -> [(&'static str, &Path); 2] {
        [("rootfs", &self.rootfs), ("uki", &self.uki)]
    }
}

/// Kernel modules the initramfs loads: storage and network drivers for QEMU and
/// for NUCs, and the file systems of the layout.
const MODULES: &[&str] = &[
    "squashfs",
    "ext4",
    "crc32c_generic",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "efivarfs",
];
const MODULES_OPTIONAL: &[&str] = &[
    "crc32c_intel",
    "virtio_pci",
    "virtio_blk",
    "virtio_net",
    "nvme",
    "ahci",
    "sd_mod",
    "usb_storage",
    "uas",
    "xhci_pci",
    "e1000e",
    "igc",
    "igb",
    "r8169",
    "tpm_crb",
    "tpm_tis_spi",
    "tpm_tis",
];

/// Busybox applets the root file system links (the initramfs installs all of them).
const APPLETS: &[&str] = &[
    "sh", "ash", "cat", "cp", "cut", "date", "df", "dmesg", "echo", "false", "grep", "head",
    "hostname", "ip", "kill", "ln", "ls", "mkdir", "mount", "mv", "ps", "readlink", "reboot",
    "poweroff", "rm", "sed", "sleep", "stat", "sync", "tail", "test", "[", "tr", "true", "udhcpc",
    "umount", "uname", "uptime", "wc",
];

/// Shared libraries the agent needs (tpm2-tss loads its TCTI with dlopen).
const LIB_PACKAGES: &[&str] = &[
    "libc6",
    "libgcc-s1",
    "libssl3",
    "libtss2-esys-3.0.2-0",
    "libtss2-mu0",
    "libtss2-sys1",
    "libtss2-tctildr0",
    "libtss2-tcti-device0",
];

/// Builds the image and its slot contents into `spec.out`.
pub fn build(spec: &Spec) -> Result<Built> {
    cairn_version_ok(&spec.version)?;
    let debs = Debs::new(&spec.cache, spec.arch);
    let work = spec.out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let kernel_pkg = debs.kernel_package()?;
    let mut packages = vec![kernel_pkg.as_str(), "busybox-static", "systemd-boot-efi"];
    packages.extend(LIB_PACKAGES);
    debs.fetch_all(&packages)?;
    let kernel_root = debs.unpack(&kernel_pkg)?;
    let (kernel_release, vmlinuz, modules) = find_kernel(&kernel_root)?;
    let busybox = debs.unpack("busybox-static")?.join("bin/busybox");
    let sdboot = debs.unpack("systemd-boot-efi")?;
    let efi_dir = sdboot.join("usr/lib/systemd/boot/efi");
    let suffix = spec.arch.efi_suffix();
    let loader = efi_dir.join(format!("systemd-boot{suffix}.efi"));
    let stub = efi_dir.join(format!("linux{suffix}.efi.stub"));

    // The initramfs.
    let initramfs = work.join("initramfs");
    for d in ["proc", "sys", "dev", "root", "bin", "lib/modules"] {
        std::fs::create_dir_all(initramfs.join(d))?;
    }
    std::fs::copy(&busybox, initramfs.join("bin/busybox"))?;
    let mut list = String::new();
    for m in kmod::closure(&modules, MODULES, MODULES_OPTIONAL)? {
        let name = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("module path without a name")?;
        std::fs::copy(&m, initramfs.join("lib/modules").join(&name))?;
        list.push_str(&name);
        list.push('\n');
    }
    write_file(
        &initramfs.join("lib/modules/load.list"),
        list.as_bytes(),
        0o644,
    )?;
    let fault = match spec.fault {
        None => "",
        Some(Fault::InitPanic) => {
            "fail \"this image was built with --fault init-panic: stopping before the root is mounted\""
        }
    };
    let init = include_str!("../image/initramfs-init.sh")
        .replace("@VERSION@", &spec.version)
        .replace("@FAULT@", fault);
    write_file(&initramfs.join("init"), init.as_bytes(), 0o755)?;
    let cpio = work.join("initrd.cpio");
    cpio_newc(&initramfs, &cpio)?;
    // zstd (the kernels have RD_ZSTD): the modules are most of it.
    let initrd = work.join("initrd.cpio.zst");
    run(Command::new("zstd")
        .args(["-q", "-f", "-12", "--no-progress"])
        .arg(&cpio)
        .arg("-o")
        .arg(&initrd))?;

    // The UKI: kernel + initramfs + os-release, no command line.
    let osrel = work.join("os-release");
    write_file(
        &osrel,
        format!(
            "NAME=\"Cairn OS\"\nID=cairn\nVERSION_ID={v}\nPRETTY_NAME=\"Cairn OS {v} ({b})\"\nIMAGE_ID=cairn-{b}\nIMAGE_VERSION={v}\n",
            v = spec.version,
            b = spec.board
        )
        .as_bytes(),
        0o644,
    )?;
    let uki_path = spec.out.join("cairn.efi");
    uki::build(
        spec.arch.objcopy(),
        &stub,
        &[
            (".osrel", &osrel),
            (".linux", &vmlinuz),
            (".initrd", &initrd),
        ],
        &uki_path,
    )?;
    let uki_bytes = std::fs::read(&uki_path)?;
    let uki_authenticode = hex::encode(uki::authenticode_sha256(&uki_bytes)?);

    // The root file system.
    let rootfs = work.join("rootfs");
    build_rootfs(spec, &debs, &busybox, &osrel, &rootfs)?;
    let rootfs_img = spec.out.join("rootfs.squashfs");
    let _ = std::fs::remove_file(&rootfs_img);
    run(Command::new("mksquashfs")
        .arg(&rootfs)
        .arg(&rootfs_img)
        .args([
            "-noappend",
            "-no-progress",
            "-quiet",
            "-all-root",
            "-comp",
            "zstd",
        ])
        .args(["-mkfs-time", "0", "-all-time", "0"]))?;
    let squash_len = std::fs::metadata(&rootfs_img)?.len();
    if squash_len > spec.layout.slot_mib * MIB {
        bail!(
            "the root file system is {} MiB, the slots {} MiB: give --slot-mib more",
            squash_len.div_ceil(MIB),
            spec.layout.slot_mib
        );
    }

    // The ESP.
    let esp = work.join("esp.img");
    build_esp(spec, &loader, &uki_path, &esp)?;
    // The data partition, empty.
    let data = work.join("data.img");
    run(Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "cairn-data",
            "-E",
            "root_owner=0:0",
        ])
        .arg(&data)
        .arg(format!("{}M", spec.layout.data_mib)))?;

    let disk = spec
        .out
        .join(format!("cairn-{}-{}.img", spec.board, spec.version));
    assemble(&spec.layout, &esp, &rootfs_img, &data, &disk)?;

    let built = Built {
        arch: spec.arch,
        board: spec.board.clone(),
        version: spec.version.clone(),
        disk,
        rootfs: rootfs_img,
        uki: uki_path,
        uki_authenticode,
        kernel: kernel_release,
        layout: spec.layout,
        fault: spec.fault,
    };
    std::fs::write(
        spec.out.join("image.json"),
        serde_json::to_vec_pretty(&built)?,
    )?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(built)
}

fn cairn_version_ok(v: &str) -> Result<()> {
    let ok = v.split('.').count() >= 3
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c));
    if !ok {
        bail!("version {v:?} is not a semantic version such as 1.2.0");
    }
    Ok(())
}

/// `(release, vmlinuz, lib/modules/RELEASE)` of an unpacked kernel package.
fn find_kernel(root: &Path) -> Result<(String, PathBuf, PathBuf)> {
    let boot = root.join("boot");
    for e in std::fs::read_dir(&boot).with_context(|| format!("listing {}", boot.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(rel) = name.strip_prefix("vmlinuz-") {
            let modules = root.join("lib/modules").join(rel);
            if !modules.is_dir() {
                bail!("kernel {rel} ships no {}", modules.display());
            }
            return Ok((rel.to_string(), boot.join(&name), modules));
        }
    }
    bail!("no vmlinuz-* in {}", boot.display())
}

/// A newc cpio archive of `dir`, owned by root, in sorted order, every time stamp
/// at the epoch: the same inputs give the same bytes (and the same PCR 4).
fn cpio_newc(dir: &Path, out: &Path) -> Result<()> {
    run(Command::new("find")
        .arg(".")
        .args(["-exec", "touch", "-h", "-d", "@0", "{}", "+"])
        .current_dir(dir))?;
    let list = output(Command::new("find").arg(".").current_dir(dir))?;
    let mut names: Vec<&str> = list.lines().collect();
    names.sort_unstable();
    let mut child = Command::new("cpio")
        .args(["--quiet", "-o", "-H", "newc", "-R", "0:0", "--reproducible"])
        .current_dir(dir)
        .stdin(std::process::Stdio::piped())
        .stdout(std::fs::File::create(out)?)
        .spawn()
        .context("starting cpio (apt-get install cpio)")?;
    {
        let mut stdin = child.stdin.take().context("cpio stdin")?;
        for n in names {
            writeln!(stdin, "{n}")?;
        }
    }
    let st = child.wait()?;
    if !st.success() {
        bail!("cpio failed ({st})");
    }
    Ok(())
}

fn build_rootfs(spec: &Spec, debs: &Debs, busybox: &Path, osrel: &Path, root: &Path) -> Result<()> {
    for d in [
        "bin",
        "usr/bin",
        "sbin",
        "etc/cairn",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var/lib/cairn",
        "boot/efi",
        "usr/share/udhcpc",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    for p in LIB_PACKAGES {
        let tree = debs.unpack(p)?;
        copy_tree(&tree, root)?;
    }
    // What the packages ship that a box never reads.
    for junk in [
        "usr/share/doc",
        "usr/share/lintian",
        "usr/share/locale",
        "usr/share/man",
        "etc/ld.so.conf.d",
        ".unpacked",
    ] {
        let _ = std::fs::remove_dir_all(root.join(junk));
        let _ = std::fs::remove_file(root.join(junk));
    }
    let _ = std::fs::remove_dir_all(root.join(format!("usr/lib/{}/gconv", spec.arch.triplet())));
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    for a in APPLETS {
        symlink("busybox", &root.join("bin").join(a))?;
    }
    let agent = root.join("usr/bin/cairn-agent");
    std::fs::copy(&spec.agent, &agent)
        .with_context(|| format!("copying the agent from {}", spec.agent.display()))?;
    run(Command::new(spec.arch.objcopy())
        .arg("--strip-debug")
        .arg(&agent))?;
    write_file(
        &root.join("sbin/init"),
        include_str!("../image/rootfs-init.sh")
            .replace("@VERSION@", &spec.version)
            .replace(
                "@AGENT_ARGS@",
                &std::iter::once(
                    "--slot-payload uki=/boot/efi/cairn/a.efi,/boot/efi/cairn/b.efi".to_string(),
                )
                .chain(spec.agent_args.iter().map(|a| shell_quote(a)))
                .collect::<Vec<_>>()
                .join(" "),
            )
            .as_bytes(),
        0o755,
    )?;
    write_file(
        &root.join("usr/share/udhcpc/default.script"),
        include_str!("../image/udhcpc.sh").as_bytes(),
        0o755,
    )?;
    std::fs::copy(osrel, root.join("etc/os-release"))?;
    symlink("/run/resolv.conf", &root.join("etc/resolv.conf"))?;
    write_file(
        &root.join("etc/passwd"),
        b"root:x:0:0:root:/:/bin/false\n",
        0o644,
    )?;
    write_file(&root.join("etc/group"), b"root:x:0:\n", 0o644)?;
    let config = format!(
        "# Cairn OS {v}: how this image runs the agent. The first-boot configuration\n\
         # (hub, join token) is on the ESP: /boot/efi/cairn/agent.toml.\n\
         data_dir = \"/var/lib/cairn\"\n\
         tpm = \"auto\"\n\
         boot = \"sdboot:/boot/efi\"\n\
         slot_a = \"/dev/disk/by-partlabel/cairn-a\"\n\
         slot_b = \"/dev/disk/by-partlabel/cairn-b\"\n\
         board = \"{b}\"\n\
         os_version = \"{v}\"\n\
         reboot = \"exit\"\n",
        v = spec.version,
        b = spec.board
    );
    write_file(&root.join("etc/cairn/agent.toml"), config.as_bytes(), 0o644)?;
    Ok(())
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn build_esp(spec: &Spec, loader: &Path, uki: &Path, esp: &Path) -> Result<()> {
    let f = std::fs::File::create(esp)?;
    f.set_len(spec.layout.esp_mib * MIB)?;
    drop(f);
    let img = esp.to_string_lossy().into_owned();
    run(Command::new("mformat").args(["-i", &img, "-F", "-v", "ESP", "::"]))?;
    run(Command::new("mmd").args([
        "-i",
        &img,
        "::/EFI",
        "::/EFI/BOOT",
        "::/loader",
        "::/loader/entries",
        "::/cairn",
    ]))?;
    let dir = esp.with_extension("d");
    std::fs::create_dir_all(&dir)?;
    let entry = |slot: char| {
        format!(
            "title Cairn OS (slot {up})\nlinux /cairn/{slot}.efi\noptions cairn.slot={slot} {console} panic=5 quiet loglevel=3\n",
            up = slot.to_ascii_uppercase(),
            console = spec.console
        )
    };
    write_file(
        &dir.join("loader.conf"),
        b"default cairn-a.conf\ntimeout 0\neditor no\n",
        0o644,
    )?;
    write_file(&dir.join("cairn-a.conf"), entry('a').as_bytes(), 0o644)?;
    // Slot B is empty: its entry is bad (no tries left) until an upgrade writes it.
    write_file(&dir.join("cairn-b+0.conf"), entry('b').as_bytes(), 0o644)?;
    let copies: [(&Path, &str); 5] = [
        (
            loader,
            &format!("::/EFI/BOOT/{}", spec.arch.efi_boot_name()),
        ),
        (&dir.join("loader.conf"), "::/loader/loader.conf"),
        (&dir.join("cairn-a.conf"), "::/loader/entries/cairn-a.conf"),
        (
            &dir.join("cairn-b+0.conf"),
            "::/loader/entries/cairn-b+0.conf",
        ),
        (uki, "::/cairn/a.efi"),
    ];
    for (src, dst) in copies {
        run(Command::new("mcopy").args(["-i", &img]).arg(src).arg(dst))?;
    }
    Ok(())
}

/// Partition table and contents in one sparse file.
fn assemble(layout: &Layout, esp: &Path, rootfs: &Path, data: &Path, disk: &Path) -> Result<()> {
    let parts: [(&str, &str, u64, Option<&Path>); 4] = [
        ("esp", "ef00", layout.esp_mib, Some(esp)),
        ("cairn-a", "8300", layout.slot_mib, Some(rootfs)),
        ("cairn-b", "8300", layout.slot_mib, None),
        ("cairn-data", "8300", layout.data_mib, Some(data)),
    ];
    let total = 1 + parts.iter().map(|p| p.2).sum::<u64>() + 1;
    let _ = std::fs::remove_file(disk);
    let f = std::fs::File::create(disk)?;
    f.set_len(total * MIB)?;
    drop(f);
    let mut sg = Command::new("sgdisk");
    sg.arg("--clear");
    let mut start = MIB;
    let mut offsets = Vec::new();
    for (i, (name, ty, mib, _)) in parts.iter().enumerate() {
        let n = i + 1;
        let first = start / 512;
        let last = (start + mib * MIB) / 512 - 1;
        sg.arg(format!("--new={n}:{first}:{last}"))
            .arg(format!("--typecode={n}:{ty}"))
            .arg(format!("--change-name={n}:{name}"));
        offsets.push(start);
        start += mib * MIB;
    }
    run(sg.arg(disk))?;
    let mut out = OpenOptions::new().write(true).open(disk)?;
    for ((_, _, _, src), off) in parts.iter().zip(offsets) {
        let Some(src) = src else { continue };
        let mut inp = std::fs::File::open(src)?;
        out.seek(SeekFrom::Start(off))?;
        copy_sparse(&mut inp, &mut out)?;
    }
    out.sync_all()?;
    Ok(())
}

/// Copies `inp` to `out` at its position, seeking over zero blocks (the disk stays
/// sparse).
fn copy_sparse(inp: &mut std::fs::File, out: &mut std::fs::File) -> Result<()> {
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = read_full(inp, &mut buf)?;
        if n == 0 {
            return Ok(());
        }
        for chunk in buf[..n].chunks(4096) {
            if chunk.iter().all(|b| *b == 0) {
                out.seek(SeekFrom::Current(chunk.len() as i64))?;
            } else {
                out.write_all(chunk)?;
            }
        }
        if n < buf.len() {
            return Ok(());
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::Read;
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}
