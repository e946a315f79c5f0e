//! Unified kernel images: systemd-stub with the kernel, the initramfs and an
//! os-release as PE sections (the `objcopy` method; Debian 12 has no `ukify`), and the
//! Authenticode digest the firmware measures into PCR 4 when it loads one.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use object::read::pe::{ImageNtHeaders, PeFile64};
use sha2::{Digest, Sha256};

use crate::tools::run;

/// Where the next section may start: after every section of `stub`, aligned.
fn sections_end(stub: &[u8]) -> Result<(u64, u64)> {
    let pe = PeFile64::parse(stub).context("the systemd stub is not a PE32+ image")?;
    let opt = pe.nt_headers().optional_header();
    let base = object::read::pe::ImageOptionalHeader::image_base(opt);
    let align = u64::from(object::read::pe::ImageOptionalHeader::section_alignment(
        opt,
    ));
    let mut end = 0u64;
    for s in pe.section_table().iter() {
        let va = u64::from(s.virtual_address.get(object::LittleEndian));
        let size = u64::from(s.virtual_size.get(object::LittleEndian));
        end = end.max(va + size);
    }
    if align == 0 || end == 0 {
        bail!("the systemd stub has no sections or no section alignment");
    }
    Ok((base + end.div_ceil(align) * align, align))
}

/// Builds `out` from `stub` (`linuxx64.efi.stub` / `linuxaa64.efi.stub`) and the
/// given sections, in order. No `.cmdline`: the boot loader entry passes it, so one
/// image serves both slots (`cairn.slot=a|b`).
pub fn build(objcopy: &str, stub: &Path, sections: &[(&str, &Path)], out: &Path) -> Result<()> {
    let bytes = std::fs::read(stub).with_context(|| format!("reading {}", stub.display()))?;
    let (mut vma, align) = sections_end(&bytes)?;
    let mut cmd = Command::new(objcopy);
    for (name, path) in sections {
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading {}", path.display()))?
            .len();
        cmd.arg("--add-section")
            .arg(format!("{name}={}", path.display()))
            .arg("--change-section-vma")
            .arg(format!("{name}={vma:#x}"));
        vma += len.div_ceil(align) * align;
    }
    cmd.arg(stub).arg(out);
    run(&mut cmd)?;
    clear_timestamp(out)
}

/// objcopy stamps the PE header with the time of the build; zero it (and the header
/// checksum, which covered it and which UEFI does not check), so that building the
/// same inputs again gives the same image and the same measurement.
fn clear_timestamp(path: &Path) -> Result<()> {
    let mut b = std::fs::read(path)?;
    let pe = b
        .get(0x3c..0x40)
        .map(|x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]) as usize)
        .context("no DOS header")?;
    if b.get(pe..pe + 4) != Some(b"PE\0\0".as_slice()) {
        bail!("{}: no PE signature", path.display());
    }
    let stamp = pe + 8;
    let checksum = pe + 24 + 64;
    if b.len() < checksum + 4 {
        bail!("{}: truncated PE header", path.display());
    }
    b[stamp..stamp + 4].fill(0);
    b[checksum..checksum + 4].fill(0);
    std::fs::write(path, b)?;
    Ok(())
}

/// The SHA-256 Authenticode digest of a PE image: what UEFI's image verification
/// measures as `EV_EFI_BOOT_SERVICES_APPLICATION`.
pub fn authenticode_sha256(image: &[u8]) -> Result<[u8; 32]> {
    let pe = PeFile64::parse(image).context("not a PE32+ image")?;
    let mut h = Sha256::new();
    authenticode::authenticode_digest(&pe, &mut h)
        .map_err(|e| anyhow::anyhow!("computing the Authenticode digest: {e}"))?;
    Ok(h.finalize().into())
}
