//! The initramfs: busybox, the kernel modules the boxes need with everything they
//! depend on ([`crate::kmod`]), and our init (`files/initramfs-init.sh`), which loads
//! them, mounts the slot's root, the data partition and the first FAT partition (at
//! `/boot/efi`), then starts the root's init. A newc cpio, reproducible, compressed
//! with zstd.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::kmod;
use crate::tools::{output, run, write_file};
use crate::{Fault, Spec};

/// Kernel modules the initramfs loads, which every kernel must have (built in or as a
/// module): the file systems of the layout.
const MODULES: &[&str] = &[
    "squashfs",
    "ext4",
    "crc32c_generic",
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "efivarfs",
];
/// Kernel modules the initramfs loads where the kernel has them: storage, network and
/// TPM drivers for QEMU, NUCs and the Pi.
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

/// Builds the initramfs in `work` from `busybox` and the modules tree `modules` (a
/// `lib/modules/RELEASE`); returns the compressed file.
pub(crate) fn build(spec: &Spec, work: &Path, busybox: &Path, modules: &Path) -> Result<PathBuf> {
    let initramfs = work.join("initramfs");
    for d in ["proc", "sys", "dev", "root", "bin", "lib/modules"] {
        std::fs::create_dir_all(initramfs.join(d))?;
    }
    std::fs::copy(busybox, initramfs.join("bin/busybox"))?;
    copy_modules(modules, &initramfs.join("lib/modules"))?;
    let fault = match spec.fault {
        None => "",
        Some(Fault::InitPanic) => {
            "fail \"this image was built with --fault init-panic: stopping before the root is mounted\""
        }
    };
    let init = include_str!("../files/initramfs-init.sh")
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

/// Copies [`MODULES`] and the [`MODULES_OPTIONAL`] the kernel has, with their
/// dependencies, from `modules` into `dir`, and writes `load.list`: their names in load
/// order, which the init reads.
fn copy_modules(modules: &Path, dir: &Path) -> Result<()> {
    let mut list = String::new();
    for m in kmod::closure(modules, MODULES, MODULES_OPTIONAL)? {
        let name = m
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .context("module path without a name")?;
        std::fs::copy(&m, dir.join(&name))?;
        list.push_str(&name);
        list.push('\n');
    }
    write_file(&dir.join("load.list"), list.as_bytes(), 0o644)
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
