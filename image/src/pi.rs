//! The Raspberry Pi 4 boot scheme (`rpi4`): the Pi firmware's A/B layout with
//! `tryboot`. The disk:
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

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use cairn_boot::tryboot::{AUTOBOOT, TryBoot};

use crate::build::Parts;
use crate::debs::Debs;
use crate::gpt::{self, ESP, FAT, LINUX, Part};
use crate::tools::write_file;
use crate::{Payload, Spec, fat};

/// Builds the slot's boot partition (`spec.out/boot.vfat`, release payload `boot`),
/// the firmware partition and the disk.
pub(crate) fn build_disk(spec: &Spec, debs: &Debs, parts: &Parts) -> Result<Payload> {
    let deb = debs.fetch_firmware("raspi-firmware")?;
    let firmware = debs.unpack_deb("raspi-firmware", &deb)?;
    let boot_img = spec.out.join("boot.vfat");
    build_boot(spec, parts, &firmware, &boot_img)?;
    let fw = parts.work.join("firmware.img");
    build_firmware_partition(spec, &fw)?;
    let l = &spec.layout;
    gpt::assemble(
        &[
            Part::new("boot", ESP, l.esp_mib, Some(&fw)),
            Part::new("cairn-boot-a", FAT, l.boot_mib, Some(&boot_img)),
            Part::new("cairn-boot-b", FAT, l.boot_mib, None),
            Part::new("cairn-a", LINUX, l.slot_mib, Some(&parts.rootfs)),
            Part::new("cairn-b", LINUX, l.slot_mib, None),
            Part::new("cairn-data", LINUX, l.data_mib, Some(&parts.data)),
        ],
        &parts.disk,
    )?;
    Ok(Payload {
        name: "boot".into(),
        path: boot_img,
    })
}

/// A slot's boot partition: the firmware (`start4.elf`, `fixup4.dat`), the BCM2711
/// device trees of the kernel, `config.txt`, `cmdline.txt`, the kernel and the
/// initramfs. Identical for both slots: the firmware reports which one it booted.
/// Cut after its last cluster: the payload is what the files take.
fn build_boot(spec: &Spec, parts: &Parts, firmware: &Path, out: &Path) -> Result<()> {
    let work = out.with_extension("inputs");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let fw = firmware.join("usr/lib/raspi-firmware");
    let config = work.join("config.txt");
    write_file(
        &config,
        config_txt(spec, parts.kernel.downstream_pi()).as_bytes(),
        0o644,
    )?;
    let cmdline = work.join("cmdline.txt");
    write_file(
        &cmdline,
        format!("{} panic=5 quiet loglevel=3\n", parts.console).as_bytes(),
        0o644,
    )?;
    let dtbs = bcm2711_device_trees(&parts.kernel.root)?;
    let (start, fixup) = (fw.join("start4.elf"), fw.join("fixup4.dat"));
    let mut files: Vec<(&Path, &str)> = vec![(&start, "start4.elf"), (&fixup, "fixup4.dat")];
    for (p, n) in &dtbs {
        files.push((p, n));
    }
    files.extend([
        (config.as_path(), "config.txt"),
        (cmdline.as_path(), "cmdline.txt"),
        (parts.kernel.vmlinuz.as_path(), "vmlinuz"),
        (parts.initrd.as_path(), "initrd.img"),
    ]);
    fat::image(
        out,
        spec.layout.boot_mib,
        ("CAIRN-BOOT", "ca1e0001"),
        &files,
    )
    .context("the slot boot partition (--boot-mib)")?;
    fat::trim_after_last_cluster(out)?;
    let _ = std::fs::remove_dir_all(&work);
    Ok(())
}

/// The firmware's `config.txt` of a slot; `downstream`: the kernel is the Raspberry Pi
/// one, else a mainline kernel, which takes mainline device trees and names.
fn config_txt(spec: &Spec, downstream: bool) -> String {
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
        upstream = if downstream {
            ""
        } else {
            "upstream_kernel=1\n"
        }
    )
}

/// The Pi 4 family's device trees (`bcm2711-*.dtb`) the kernel package ships under
/// `usr/lib/*/broadcom/`, as `(file, name)` in order of path.
fn bcm2711_device_trees(kernel_root: &Path) -> Result<Vec<(PathBuf, String)>> {
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
    Ok(dtbs)
}

/// Partition 1: `autoboot.txt` as the agent's tryboot backend writes it for a fresh
/// box (slot A on partition 2 the default, slot B on 3 not bootable yet);
/// `cairn-hub image configure` adds `cairn/agent.toml`.
fn build_firmware_partition(spec: &Spec, out: &Path) -> Result<()> {
    let dir = out.with_extension("autoboot");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    TryBoot::open(&dir, [2, 3]).map_err(|e| anyhow::anyhow!("writing autoboot.txt: {e}"))?;
    fat::image(
        out,
        spec.layout.esp_mib,
        ("BOOT", "ca1e0000"),
        &[(&dir.join(AUTOBOOT), AUTOBOOT)],
    )
    .context("the firmware partition (--esp-mib)")?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
