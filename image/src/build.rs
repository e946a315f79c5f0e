//! The image builder: one build gives both the disk image to flash and the slot
//! contents an A/B release is made of, so what is flashed and what is upgraded are
//! the same bytes.
//!
//! Two boot schemes, by board ([`BootScheme::of`]); both GPT, 1 MiB aligned.
//!
//! **UEFI** (`nuc`, `virt`): systemd-boot with boot counting.
//!
//! | # | name | contents |
//! |---|---|---|
//! | 1 | `esp` | FAT32: systemd-boot as the removable-media loader, `loader/entries/cairn-a.conf` and `cairn-b+0.conf`, the slots' unified kernel images `cairn/a.efi`, `cairn/b.efi`, and later the first-boot configuration `cairn/agent.toml` (`cairn-hub image configure`) |
//! | 2 | `cairn-a` | slot A: the read-only root (squashfs) |
//! | 3 | `cairn-b` | slot B: empty until the first upgrade; its loader entry is marked bad |
//! | 4 | `cairn-data` | ext4: the agent's database and keys |
//!
//! A slot is its root file system plus its UKI (systemd-stub + kernel + initramfs +
//! os-release). The loader entry passes `cairn.slot=a|b` on the command line.
//! Release payloads: `rootfs` (→ the slot partition) and `uki` (→ `cairn/X.efi` on the
//! ESP); the agent runs with `--boot sdboot:/boot/efi`.
//!
//! **Raspberry Pi 4** (`rpi4`): the Pi firmware's A/B layout with `tryboot`.
//!
//! | # | name | contents |
//! |---|---|---|
//! | 1 | `boot` | FAT32 (ESP type): `autoboot.txt` (`tryboot_a_b=1`, `boot_partition=2`), later `cairn/agent.toml` |
//! | 2 | `cairn-boot-a` | FAT32: slot A's boot files: `start4.elf`, `fixup4.dat`, the BCM2711 device trees, `config.txt`, `cmdline.txt`, `vmlinuz`, `initrd.img` |
//! | 3 | `cairn-boot-b` | slot B's boot files, empty until the first upgrade (no `autoboot.txt` section names it) |
//! | 4, 5 | `cairn-a`, `cairn-b` | the slots' roots (squashfs) |
//! | 6 | `cairn-data` | ext4 |
//!
//! The EEPROM boot loader reads `autoboot.txt` and boots partition 2, or on a
//! `reboot "0 tryboot"` the `[tryboot]` one, once. It reports the partition it booted
//! in the device tree (`/chosen/bootloader/partition`), which is how the initramfs and
//! the agent learn the slot: the two boot partitions carry the same bytes. Release
//! payloads: `rootfs` and `boot` (the FAT image, → `cairn-boot-X`); the agent runs with
//! `--boot tryboot:/boot/efi:2,3`, and for a trial exits with 11, on which init
//! reboots with `cairn-agent reboot "0 tryboot"` (which passes the tryboot flag).
//!
//! In both, the initramfs mounts the slot's root, the data partition and the first FAT
//! partition (at `/boot/efi`), then starts the root's init, which runs `cairn-agent`
//! under a supervisor loop. There is no login, no getty and no SSH.

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
    /// The ESP (UEFI) or the Pi's firmware partition.
    pub esp_mib: u64,
    /// Each slot's root partition.
    pub slot_mib: u64,
    pub data_mib: u64,
    /// Each slot's boot partition (Raspberry Pi only).
    #[serde(default = "default_boot_mib")]
    pub boot_mib: u64,
}

fn default_boot_mib() -> u64 {
    128
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            esp_mib: 128,
            slot_mib: 512,
            data_mib: 256,
            boot_mib: default_boot_mib(),
        }
    }
}

/// How a board boots its slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootScheme {
    /// UEFI firmware and systemd-boot with boot counting; a slot's kernel is a UKI.
    Uefi,
    /// The Raspberry Pi 4 firmware: `autoboot.txt` with `tryboot_a_b`; a slot's kernel
    /// is on its own FAT boot partition.
    PiTryboot,
}

impl BootScheme {
    /// The scheme of `board`: `rpi4` boots the Pi way (aarch64 only), every other
    /// board with UEFI.
    pub fn of(arch: Arch, board: &str) -> Result<Self> {
        match (board, arch) {
            ("rpi4", Arch::Aarch64) => Ok(Self::PiTryboot),
            ("rpi4", _) => bail!("board rpi4 is aarch64: give --arch aarch64"),
            ("rpi5", _) => bail!(
                "board rpi5 is not supported yet: Debian's 6.1 kernel has no BCM2712/RP1 support (no device tree, no Ethernet); use rpi4"
            ),
            _ => Ok(Self::Uefi),
        }
    }
}

/// One slot payload besides the root: `uki` or `boot`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payload {
    pub name: String,
    pub path: PathBuf,
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
    /// Kernel console arguments; default: the board's serial console
    /// ([`default_console`]).
    pub console: Option<String>,
    /// The kernel as a `.deb` of Debian's layout (`boot/vmlinuz-*`, `lib/modules/*`,
    /// `usr/lib/linux-image-*/`), e.g. the Raspberry Pi kernel; default: Debian's.
    pub kernel_deb: Option<PathBuf>,
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
    pub scheme: BootScheme,
    /// Slot contents, the release payloads: the root and the rest (`uki`, `boot`).
    pub rootfs: PathBuf,
    pub extra: Vec<Payload>,
    /// SHA-256 Authenticode digest of the UKI (what UEFI measures into PCR 4); none on
    /// a Pi.
    pub uki_authenticode: Option<String>,
    pub kernel: String,
    pub layout: Layout,
    pub fault: Option<Fault>,
}

impl Built {
    /// Every payload as `(name, file)`, the root first.
    pub fn payloads(&self) -> Vec<(&str, &Path)> {
        std::iter::once(("rootfs", self.rootfs.as_path()))
            .chain(
                self.extra
                    .iter()
                    .map(|p| (p.name.as_str(), p.path.as_path())),
            )
            .collect()
    }

    /// The file of payload `name`.
    pub fn payload(&self, name: &str) -> Option<&Path> {
        self.payloads()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p)
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
    // Raspberry Pi 4: SD card (emmc2, sdhost), Ethernet (GENET and its PHY), and the
    // VL805 USB controller's firmware loader for USB boot.
    "sdhci_iproc",
    "bcm2835",
    "genet",
    "mdio_bcm_unimac",
    "broadcom",
    "reset_raspberrypi",
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
    let scheme = BootScheme::of(spec.arch, &spec.board)?;
    let debs = Debs::new(&spec.cache, spec.arch);
    let work = spec.out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;

    let kernel_pkg = match &spec.kernel_deb {
        Some(_) => None,
        None => Some(debs.kernel_package()?),
    };
    let mut packages = vec!["busybox-static"];
    packages.extend(kernel_pkg.as_deref());
    if scheme == BootScheme::Uefi {
        packages.push("systemd-boot-efi");
    }
    packages.extend(LIB_PACKAGES);
    debs.fetch_all(&packages)?;
    let kernel_root = match (&spec.kernel_deb, &kernel_pkg) {
        (Some(deb), _) => debs.unpack_deb("kernel", deb)?,
        (None, Some(pkg)) => debs.unpack(pkg)?,
        (None, None) => bail!("no kernel package"),
    };
    let (kernel_release, vmlinuz, modules) = find_kernel(&kernel_root)?;
    let downstream = downstream_pi_kernel(&kernel_release);
    let console = spec
        .console
        .clone()
        .unwrap_or_else(|| default_console(scheme, downstream).to_string());
    if scheme == BootScheme::PiTryboot && !downstream {
        tracing::warn!(
            kernel = %kernel_release,
            "this kernel cannot pass the tryboot flag to the Pi firmware: on a real Pi every upgrade will boot the old slot and be rolled back; give --kernel-deb with the Raspberry Pi kernel (linux-image-*-rpi-v8)"
        );
    }
    let busybox = debs.unpack("busybox-static")?.join("bin/busybox");

    let initrd = build_initramfs(spec, &work, &busybox, &modules)?;
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

    // The root file system.
    let rootfs = work.join("rootfs");
    build_rootfs(spec, scheme, &debs, &busybox, &osrel, &rootfs)?;
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
    let l = &spec.layout;
    let (extra, uki_authenticode) = match scheme {
        BootScheme::Uefi => {
            let sdboot = debs.unpack("systemd-boot-efi")?;
            let efi_dir = sdboot.join("usr/lib/systemd/boot/efi");
            let suffix = spec.arch.efi_suffix();
            let loader = efi_dir.join(format!("systemd-boot{suffix}.efi"));
            let stub = efi_dir.join(format!("linux{suffix}.efi.stub"));
            // The UKI: kernel + initramfs + os-release, no command line.
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
            let digest = hex::encode(uki::authenticode_sha256(&uki_bytes)?);
            let esp = work.join("esp.img");
            build_esp(spec, &console, &loader, &uki_path, &esp)?;
            assemble(
                &[
                    Part::new("esp", ESP, l.esp_mib, Some(&esp)),
                    Part::new("cairn-a", LINUX, l.slot_mib, Some(&rootfs_img)),
                    Part::new("cairn-b", LINUX, l.slot_mib, None),
                    Part::new("cairn-data", LINUX, l.data_mib, Some(&data)),
                ],
                &disk,
            )?;
            let uki = Payload {
                name: "uki".into(),
                path: uki_path,
            };
            (vec![uki], Some(digest))
        }
        BootScheme::PiTryboot => {
            let deb = debs.fetch_firmware("raspi-firmware")?;
            let firmware = debs.unpack_deb("raspi-firmware", &deb)?;
            let boot_img = spec.out.join("boot.vfat");
            build_pi_boot(
                (spec, &console),
                &firmware,
                &kernel_root,
                (&vmlinuz, downstream),
                &initrd,
                &boot_img,
            )?;
            let fw = work.join("firmware.img");
            build_pi_firmware_partition(spec, &fw)?;
            assemble(
                &[
                    Part::new("boot", ESP, l.esp_mib, Some(&fw)),
                    Part::new("cairn-boot-a", FAT, l.boot_mib, Some(&boot_img)),
                    Part::new("cairn-boot-b", FAT, l.boot_mib, None),
                    Part::new("cairn-a", LINUX, l.slot_mib, Some(&rootfs_img)),
                    Part::new("cairn-b", LINUX, l.slot_mib, None),
                    Part::new("cairn-data", LINUX, l.data_mib, Some(&data)),
                ],
                &disk,
            )?;
            let boot = Payload {
                name: "boot".into(),
                path: boot_img,
            };
            (vec![boot], None)
        }
    };

    let built = Built {
        arch: spec.arch,
        board: spec.board.clone(),
        version: spec.version.clone(),
        disk,
        scheme,
        rootfs: rootfs_img,
        extra,
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

/// The zstd-compressed initramfs: busybox, the modules the layout needs, our init.
fn build_initramfs(spec: &Spec, work: &Path, busybox: &Path, modules: &Path) -> Result<PathBuf> {
    let initramfs = work.join("initramfs");
    for d in ["proc", "sys", "dev", "root", "bin", "lib/modules"] {
        std::fs::create_dir_all(initramfs.join(d))?;
    }
    std::fs::copy(busybox, initramfs.join("bin/busybox"))?;
    let mut list = String::new();
    for m in kmod::closure(modules, MODULES, MODULES_OPTIONAL)? {
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
    Ok(initrd)
}

/// The kernel console when none is given: the first serial port of a PC or QEMU; on a
/// Pi the GPIO 14/15 UART (`enable_uart=1`), which Debian's kernel calls `ttyS1` and
/// the Raspberry Pi kernel `ttyS0`.
pub fn default_console(scheme: BootScheme, downstream: bool) -> &'static str {
    match (scheme, downstream) {
        (BootScheme::PiTryboot, false) => "console=tty0 console=ttyS1,115200",
        _ => "console=tty0 console=ttyS0,115200",
    }
}

/// Whether `release` is the Raspberry Pi kernel (`6.6.51+rpt-rpi-v8`), whose firmware
/// driver passes `reboot "0 tryboot"` on to the firmware; Debian's does not.
pub fn downstream_pi_kernel(release: &str) -> bool {
    release.contains("rpi")
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
        .context("starting cpio (`scripts/setup.sh images` installs it)")?;
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

fn build_rootfs(
    spec: &Spec,
    scheme: BootScheme,
    debs: &Debs,
    busybox: &Path,
    osrel: &Path,
    root: &Path,
) -> Result<()> {
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
                &std::iter::once(match scheme {
                    BootScheme::Uefi => {
                        "--slot-payload uki=/boot/efi/cairn/a.efi,/boot/efi/cairn/b.efi"
                    }
                    BootScheme::PiTryboot => {
                        "--slot-payload boot=/dev/disk/by-partlabel/cairn-boot-a,/dev/disk/by-partlabel/cairn-boot-b"
                    }
                }
                .to_string())
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
    // The agent stops with exit code 10 and init unmounts and reboots; for a Pi's
    // trial with 11, and init reboots with `cairn-agent reboot "0 tryboot"`.
    let boot = match scheme {
        BootScheme::Uefi => "sdboot:/boot/efi",
        BootScheme::PiTryboot => "tryboot:/boot/efi:2,3",
    };
    let reboot = "exit";
    let config = format!(
        "# Cairn OS {v}: how this image runs the agent. The first-boot configuration\n\
         # (hub, join token) is on the first FAT partition: /boot/efi/cairn/agent.toml.\n\
         data_dir = \"/var/lib/cairn\"\n\
         tpm = \"auto\"\n\
         boot = \"{boot}\"\n\
         slot_a = \"/dev/disk/by-partlabel/cairn-a\"\n\
         slot_b = \"/dev/disk/by-partlabel/cairn-b\"\n\
         board = \"{b}\"\n\
         os_version = \"{v}\"\n\
         reboot = \"{reboot}\"\n",
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

fn build_esp(spec: &Spec, console: &str, loader: &Path, uki: &Path, esp: &Path) -> Result<()> {
    let dir = esp.with_extension("inputs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let entry = |slot: char| {
        format!(
            "title Cairn OS (slot {up})\nlinux /cairn/{slot}.efi\noptions cairn.slot={slot} {console} panic=5 quiet loglevel=3\n",
            up = slot.to_ascii_uppercase(),
        )
    };
    let (conf, a, b) = (
        dir.join("loader.conf"),
        dir.join("cairn-a.conf"),
        dir.join("cairn-b.conf"),
    );
    write_file(
        &conf,
        b"default cairn-a.conf\ntimeout 0\neditor no\n",
        0o644,
    )?;
    write_file(&a, entry('a').as_bytes(), 0o644)?;
    write_file(&b, entry('b').as_bytes(), 0o644)?;
    let boot_name = format!("EFI/BOOT/{}", spec.arch.efi_boot_name());
    fat_image(
        esp,
        spec.layout.esp_mib,
        ("ESP", "ca1e0002"),
        &[
            (loader, &boot_name),
            (&conf, "loader/loader.conf"),
            (&a, "loader/entries/cairn-a.conf"),
            // Slot B is empty: its entry is bad (no tries left) until an upgrade
            // writes it.
            (&b, "loader/entries/cairn-b+0.conf"),
            (uki, "cairn/a.efi"),
        ],
    )
    .context("the ESP (--esp-mib)")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Every FAT time stamp of a slot's boot partition (FAT cannot store the epoch):
/// 2000-01-01, so that the same inputs give the same bytes.
const FAT_TIME: &str = "@946684800";

/// A FAT32 image of `mib` MiB with `files` (source, path in the file system, with
/// `/` between directories), the same bytes for the same inputs on any build machine:
/// a fixed volume serial number, directories made and files copied in order, every
/// time stamp [`FAT_TIME`], in UTC (mtools writes FAT's local times with the build
/// machine's time zone otherwise).
fn fat_image(
    out: &Path,
    mib: u64,
    (label, serial): (&str, &str),
    files: &[(&Path, &str)],
) -> Result<()> {
    let stage = out.with_extension("d");
    let _ = std::fs::remove_dir_all(&stage);
    std::fs::create_dir_all(&stage)?;
    let mut need = 0;
    let mut dirs: Vec<&str> = Vec::new();
    for (src, name) in files {
        let dst = stage.join(name);
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::copy(src, &dst).with_context(|| format!("copying {}", src.display()))?;
        need += std::fs::metadata(&dst)?.len();
        // Every directory on the way, parents first, once.
        for (i, _) in name.match_indices('/') {
            if !dirs.contains(&&name[..i]) {
                dirs.push(&name[..i]);
            }
        }
    }
    // FAT32 reserves a few MiB for its tables; leave room for them.
    if need + 4 * MIB > mib * MIB {
        bail!(
            "{label}: {} MiB of files do not fit a {mib} MiB partition: give it more",
            need.div_ceil(MIB)
        );
    }
    run(Command::new("find")
        .arg(".")
        .args(["-exec", "touch", "-h", "-d", FAT_TIME, "{}", "+"])
        .current_dir(&stage))?;
    let f = std::fs::File::create(out)?;
    f.set_len(mib * MIB)?;
    drop(f);
    let img = out.to_string_lossy().into_owned();
    let mtools = |tool: &str| {
        let mut c = Command::new(tool);
        // mformat stamps the volume label entry with the time: SOURCE_DATE_EPOCH
        // fixes it.
        c.env("SOURCE_DATE_EPOCH", &FAT_TIME[1..]).env("TZ", "UTC");
        c
    };
    run(mtools("mformat").args(["-i", &img, "-F", "-N", serial, "-v", label, "::"]))?;
    for d in dirs {
        run(mtools("mmd").args(["-i", &img, &format!("::/{d}")]))?;
    }
    for (_, name) in files {
        run(mtools("mcopy")
            .args(["-m", "-i", &img])
            .arg(stage.join(name))
            .arg(format!("::/{name}")))?;
    }
    let _ = std::fs::remove_dir_all(&stage);
    Ok(())
}

/// Cuts the FAT32 image at `path` after its last allocated cluster (a FAT keeps
/// nothing after its data): the payload, and each upgrade's write, is what the files
/// take, not the whole partition, which keeps its size on disk. The cut is where the
/// FAT says the data ends, never inside a file, even where a file ends in zeros:
/// after an upgrade the rest of the partition holds an older release's bytes.
fn trim_after_last_cluster(path: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = OpenOptions::new().read(true).write(true).open(path)?;
    let mut boot = [0u8; 512];
    f.read_exact(&mut boot)?;
    let u16_at = |o: usize| u64::from(u16::from_le_bytes([boot[o], boot[o + 1]]));
    let u32_at = |o: usize| {
        u64::from(u32::from_le_bytes([
            boot[o],
            boot[o + 1],
            boot[o + 2],
            boot[o + 3],
        ]))
    };
    let (bps, spc, reserved, fats) = (
        u16_at(11),
        u64::from(boot[13]),
        u16_at(14),
        u64::from(boot[16]),
    );
    let fat_sectors = u32_at(36);
    if &boot[82..87] != b"FAT32" || bps == 0 || spc == 0 || fat_sectors == 0 {
        bail!("{}: not a FAT32 file system", path.display());
    }
    let mut fat = vec![0u8; (fat_sectors * bps) as usize];
    f.seek(SeekFrom::Start(reserved * bps))?;
    f.read_exact(&mut fat)?;
    let last = fat
        .chunks_exact(4)
        .enumerate()
        .skip(2)
        .filter(|(_, e)| u32::from_le_bytes([e[0], e[1], e[2], e[3]]) & 0x0fff_ffff != 0)
        .map(|(i, _)| i as u64)
        .next_back()
        .unwrap_or(2);
    let data = (reserved + fats * fat_sectors) * bps;
    let end = data + (last - 1) * spc * bps;
    let end = end.div_ceil(4096) * 4096;
    if end < f.metadata()?.len() {
        f.set_len(end)?;
    }
    f.sync_all()?;
    Ok(())
}

/// A Pi slot's boot partition: the firmware (`start4.elf`, `fixup4.dat`), the BCM2711
/// device trees of the kernel, `config.txt`, `cmdline.txt`, the kernel and the
/// initramfs. Identical for both slots: the firmware reports which one it booted.
fn build_pi_boot(
    (spec, console): (&Spec, &str),
    firmware: &Path,
    kernel_root: &Path,
    (vmlinuz, downstream): (&Path, bool),
    initrd: &Path,
    out: &Path,
) -> Result<()> {
    let work = out.with_extension("inputs");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let fw = firmware.join("usr/lib/raspi-firmware");
    let config = work.join("config.txt");
    write_file(
        &config,
        format!(
            "# Cairn OS {v}: the Raspberry Pi firmware's configuration of this slot. Both\n\
             # slots' boot partitions hold the same files; autoboot.txt on partition 1\n\
             # picks the slot.\n\
             arm_64bit=1\n\
             enable_uart=1\n\
             {upstream}\
             kernel=vmlinuz\n\
             initramfs initrd.img followkernel\n",
            v = spec.version,
            // A mainline kernel takes mainline device trees and names.
            upstream = if downstream {
                ""
            } else {
                "upstream_kernel=1\n"
            }
        )
        .as_bytes(),
        0o644,
    )?;
    let cmdline = work.join("cmdline.txt");
    write_file(
        &cmdline,
        format!("{console} panic=5 quiet loglevel=3\n").as_bytes(),
        0o644,
    )?;
    let mut dtbs = Vec::new();
    let lib = kernel_root.join("usr/lib");
    for e in std::fs::read_dir(&lib).with_context(|| format!("listing {}", lib.display()))? {
        let dir = e?.path().join("broadcom");
        if !dir.is_dir() {
            continue;
        }
        for d in std::fs::read_dir(&dir)? {
            let p = d?.path();
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            if let Some(n) = name.filter(|n| n.starts_with("bcm2711-") && n.ends_with(".dtb")) {
                dtbs.push((p, n));
            }
        }
    }
    dtbs.sort();
    if dtbs.is_empty() {
        bail!(
            "the kernel package ships no bcm2711-*.dtb under {}: it cannot boot a Pi 4",
            lib.display()
        );
    }
    let (start, fixup) = (fw.join("start4.elf"), fw.join("fixup4.dat"));
    let mut files: Vec<(&Path, &str)> = vec![(&start, "start4.elf"), (&fixup, "fixup4.dat")];
    for (p, n) in &dtbs {
        files.push((p, n));
    }
    files.extend([
        (config.as_path(), "config.txt"),
        (cmdline.as_path(), "cmdline.txt"),
        (vmlinuz, "vmlinuz"),
        (initrd, "initrd.img"),
    ]);
    fat_image(
        out,
        spec.layout.boot_mib,
        ("CAIRN-BOOT", "ca1e0001"),
        &files,
    )
    .context("the slot boot partition (--boot-mib)")?;
    trim_after_last_cluster(out)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// A Pi's partition 1: `autoboot.txt` as the agent's tryboot backend writes it for a
/// fresh box (slot A on partition 2 the default, slot B on 3 not bootable yet);
/// `cairn-hub image configure` adds `cairn/agent.toml`.
fn build_pi_firmware_partition(spec: &Spec, out: &Path) -> Result<()> {
    use cairn_boot::tryboot::{AUTOBOOT, TryBoot};
    let dir = out.with_extension("autoboot");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    TryBoot::open(&dir, [2, 3]).map_err(|e| anyhow::anyhow!("writing autoboot.txt: {e}"))?;
    fat_image(
        out,
        spec.layout.esp_mib,
        ("BOOT", "ca1e0000"),
        &[(&dir.join(AUTOBOOT), AUTOBOOT)],
    )
    .context("the firmware partition (--esp-mib)")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// GPT partition type codes (sgdisk's short forms).
const ESP: &str = "ef00";
const LINUX: &str = "8300";
/// Microsoft basic data: a FAT partition that is not an ESP (the Pi's slot boot
/// partitions).
const FAT: &str = "0700";

/// One partition of the disk: its GPT name, type, size and contents (none: zeros).
struct Part<'a> {
    name: &'a str,
    ty: &'a str,
    mib: u64,
    src: Option<&'a Path>,
}

impl<'a> Part<'a> {
    fn new(name: &'a str, ty: &'a str, mib: u64, src: Option<&'a Path>) -> Self {
        Self { name, ty, mib, src }
    }
}

/// Partition table and contents in one sparse file.
fn assemble(parts: &[Part<'_>], disk: &Path) -> Result<()> {
    let total = 1 + parts.iter().map(|p| p.mib).sum::<u64>() + 1;
    let _ = std::fs::remove_file(disk);
    let f = std::fs::File::create(disk)?;
    f.set_len(total * MIB)?;
    drop(f);
    let mut sg = Command::new("sgdisk");
    sg.arg("--clear");
    let mut start = MIB;
    let mut offsets = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let n = i + 1;
        let first = start / 512;
        let last = (start + p.mib * MIB) / 512 - 1;
        sg.arg(format!("--new={n}:{first}:{last}"))
            .arg(format!("--typecode={n}:{}", p.ty))
            .arg(format!("--change-name={n}:{}", p.name));
        offsets.push(start);
        start += p.mib * MIB;
    }
    run(sg.arg(disk))?;
    let mut out = OpenOptions::new().write(true).open(disk)?;
    for (p, off) in parts.iter().zip(offsets) {
        let Some(src) = p.src else { continue };
        let len = std::fs::metadata(src)?.len();
        if len > p.mib * MIB {
            bail!(
                "{} is {} MiB, partition {} {} MiB",
                src.display(),
                len.div_ceil(MIB),
                p.name,
                p.mib
            );
        }
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
