//! [`build`]: one build gives both the disk image to flash and the slot contents an A/B
//! release is made of, so what is flashed and what is upgraded are the same bytes.
//!
//! Two boot schemes, by board ([`BootScheme::of`]), each with its own disk (both GPT,
//! 1 MiB aligned): UEFI (`crate::uefi`) and the Raspberry Pi 4's tryboot
//! (`crate::pi`). The steps: download every package in one go, unpack the kernel; the
//! initramfs, the os-release, the root file system (squashfs) and the empty data
//! partition, which both schemes share ([`Parts`]); then the scheme's boot files and
//! the disk; last `image.json`.
//!
//! In both, the initramfs mounts the slot's root, the data partition and the first FAT
//! partition (at `/boot/efi`), then starts the root's init, which runs `cairn-agent`
//! under a supervisor loop. There is no login, no getty and no SSH.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::debs::Debs;
use crate::kernel::{Kernel, KernelSource};
use crate::tools::{run, write_file};
use crate::{BootScheme, Built, Spec, initramfs, pi, rootfs, uefi};

/// What both boot schemes' disks are made of, built before the scheme's own parts.
pub(crate) struct Parts {
    pub kernel: Kernel,
    /// The kernel command line's console arguments.
    pub console: String,
    /// The compressed initramfs.
    pub initrd: PathBuf,
    /// The image's `os-release` (in the root, and a section of the UKI).
    pub osrel: PathBuf,
    /// Slot A's root, `rootfs.squashfs`: release payload `rootfs`.
    pub rootfs: PathBuf,
    /// The data partition's empty ext4 file system.
    pub data: PathBuf,
    /// Where the disk goes: `cairn-BOARD-VERSION.img`.
    pub disk: PathBuf,
    /// Scratch space under the output directory, removed after the build.
    pub work: PathBuf,
}

/// Builds the image and its slot contents into `spec.out`.
pub fn build(spec: &Spec) -> Result<Built> {
    check_version(&spec.version)?;
    let scheme = BootScheme::of(spec.arch, &spec.board)?;
    let debs = Debs::new(&spec.cache, spec.arch);
    let work = spec.out.join("work");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let parts = shared_parts(spec, scheme, &debs, work)?;
    let (extra, uki_authenticode) = match scheme {
        BootScheme::Uefi => {
            let uki = uefi::build_disk(spec, &debs, &parts)?;
            (vec![uki.payload], Some(uki.authenticode))
        }
        BootScheme::PiTryboot => (vec![pi::build_disk(spec, &debs, &parts)?], None),
    };
    let built = Built {
        arch: spec.arch,
        board: spec.board.clone(),
        version: spec.version.clone(),
        disk: parts.disk,
        scheme,
        rootfs: parts.rootfs,
        extra,
        uki_authenticode,
        kernel: parts.kernel.release,
        layout: spec.layout,
        fault: spec.fault,
    };
    std::fs::write(
        spec.out.join("image.json"),
        serde_json::to_vec_pretty(&built)?,
    )?;
    let _ = std::fs::remove_dir_all(&parts.work);
    Ok(built)
}

/// Everything but the boot scheme's own files: the packages, the kernel, the
/// initramfs, the os-release, the root file system and the data partition.
fn shared_parts(spec: &Spec, scheme: BootScheme, debs: &Debs, work: PathBuf) -> Result<Parts> {
    let kernel = fetch_packages(spec, scheme, debs)?;
    kernel.warn_if_no_tryboot(scheme);
    let console = kernel.console(scheme, spec.console.as_deref());
    let busybox = debs.unpack("busybox-static")?.join("bin/busybox");
    let initrd = initramfs::build(spec, &work, &busybox, &kernel.modules)?;
    let osrel = write_os_release(spec, &work)?;
    let rootfs = rootfs::build(spec, scheme, debs, &busybox, &osrel, &work)?;
    let data = data_partition(spec, &work)?;
    let disk = spec
        .out
        .join(format!("cairn-{}-{}.img", spec.board, spec.version));
    Ok(Parts {
        kernel,
        console,
        initrd,
        osrel,
        rootfs,
        data,
        disk,
        work,
    })
}

/// Downloads every package the image is made of in one `apt-get` call (the kernel
/// unless `spec.kernel_deb` gives it, busybox, systemd-boot for UEFI, the agent's
/// libraries) and unpacks the kernel.
fn fetch_packages(spec: &Spec, scheme: BootScheme, debs: &Debs) -> Result<Kernel> {
    let kernel = KernelSource::of(spec.kernel_deb.as_deref(), debs)?;
    let mut packages = vec!["busybox-static"];
    packages.extend(kernel.package());
    if scheme == BootScheme::Uefi {
        packages.push("systemd-boot-efi");
    }
    packages.extend(rootfs::LIB_PACKAGES);
    debs.fetch_all(&packages)?;
    kernel.unpack(debs)
}

/// `work/os-release`: Cairn OS, the version and the board.
fn write_os_release(spec: &Spec, work: &Path) -> Result<PathBuf> {
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
    Ok(osrel)
}

/// `work/data.img`: the data partition, an empty ext4 labelled `cairn-data`.
fn data_partition(spec: &Spec, work: &Path) -> Result<PathBuf> {
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
    Ok(data)
}

/// Refuses a version that is not `MAJOR.MINOR.PATCH[-PRE][+BUILD]`-shaped.
fn check_version(v: &str) -> Result<()> {
    let ok = v.split('.').count() >= 3
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-+".contains(c));
    if !ok {
        bail!("version {v:?} is not a semantic version such as 1.2.0");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_be_semantic() {
        for ok in ["1.0.0", "2.10.3", "1.0.0-rc.1", "1.0.0+build.5"] {
            assert!(check_version(ok).is_ok(), "{ok}");
        }
        for bad in ["1.0", "v1", "1.0.0 ", "1.0.0/../x", "1.0.0;reboot", ""] {
            assert!(check_version(bad).is_err(), "{bad:?}");
        }
    }
}
