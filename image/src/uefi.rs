//! The UEFI boot scheme (`nuc`, `virt`): systemd-boot with boot counting. The disk:
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

use std::path::Path;

use anyhow::{Context, Result};

use crate::build::Parts;
use crate::debs::Debs;
use crate::gpt::{self, ESP, LINUX, Part};
use crate::tools::write_file;
use crate::{Payload, Spec, fat, uki};

/// What the UEFI part of a build made: the UKI, release payload `uki`.
pub(crate) struct Uki {
    pub payload: Payload,
    /// Its SHA-256 Authenticode digest, hex: what the firmware measures into PCR 4.
    pub authenticode: String,
}

/// Builds the UKI (`spec.out/cairn.efi`), the ESP and the disk.
pub(crate) fn build_disk(spec: &Spec, debs: &Debs, parts: &Parts) -> Result<Uki> {
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
            (".osrel", &parts.osrel),
            (".linux", &parts.kernel.vmlinuz),
            (".initrd", &parts.initrd),
        ],
        &uki_path,
    )?;
    let uki_bytes = std::fs::read(&uki_path)?;
    let authenticode = hex::encode(uki::authenticode_sha256(&uki_bytes)?);
    let esp = parts.work.join("esp.img");
    build_esp(spec, &parts.console, &loader, &uki_path, &esp)?;
    let l = &spec.layout;
    gpt::assemble(
        &[
            Part::new("esp", ESP, l.esp_mib, Some(&esp)),
            Part::new("cairn-a", LINUX, l.slot_mib, Some(&parts.rootfs)),
            Part::new("cairn-b", LINUX, l.slot_mib, None),
            Part::new("cairn-data", LINUX, l.data_mib, Some(&parts.data)),
        ],
        &parts.disk,
    )?;
    Ok(Uki {
        payload: Payload {
            name: "uki".into(),
            path: uki_path,
        },
        authenticode,
    })
}

/// The ESP: systemd-boot as the removable-media loader, its configuration and the two
/// slots' entries (slot B's marked bad), and slot A's UKI.
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
    fat::image(
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
