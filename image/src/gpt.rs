//! The disk: a GPT partition table written by sgdisk and each partition's contents, in
//! one sparse file. Partitions start 1 MiB in and are whole MiB; a partition without
//! contents is zeros (a hole).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::MIB;
use crate::tools::run;

// GPT partition type codes (sgdisk's short forms).
/// EFI System Partition: the UEFI ESP, the Pi's firmware partition.
pub(crate) const ESP: &str = "ef00";
/// Linux file system: the slots' roots and the data partition.
pub(crate) const LINUX: &str = "8300";
/// Microsoft basic data: a FAT partition that is not an ESP (the Pi's slot boot
/// partitions).
pub(crate) const FAT: &str = "0700";

/// One partition of the disk: its GPT name, type, size and contents (none: zeros).
pub(crate) struct Part<'a> {
    name: &'a str,
    ty: &'a str,
    mib: u64,
    src: Option<&'a Path>,
}

impl<'a> Part<'a> {
    pub(crate) fn new(name: &'a str, ty: &'a str, mib: u64, src: Option<&'a Path>) -> Self {
        Self { name, ty, mib, src }
    }
}

/// Partition table and contents in one sparse file.
pub(crate) fn assemble(parts: &[Part<'_>], disk: &Path) -> Result<()> {
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
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use super::*;

    /// `mib` MiB of zeros with a 4 KiB block of `byte` at each end.
    fn contents(dir: &Path, name: &str, mib: u64, byte: u8) -> (std::path::PathBuf, Vec<u8>) {
        let mut bytes = vec![0u8; (mib * MIB) as usize];
        bytes[..4096].fill(byte);
        let n = bytes.len();
        bytes[n - 4096..].fill(byte);
        let path = dir.join(name);
        std::fs::write(&path, &bytes).unwrap();
        (path, bytes)
    }

    fn read_at(disk: &Path, offset: u64, len: usize) -> Vec<u8> {
        let mut f = std::fs::File::open(disk).unwrap();
        f.seek(SeekFrom::Start(offset)).unwrap();
        let mut buf = vec![0u8; len];
        f.read_exact(&mut buf).unwrap();
        buf
    }

    #[test]
    fn partitions_are_named_placed_and_filled_and_the_disk_stays_sparse() {
        let dir = tempfile::tempdir().unwrap();
        let (a, a_bytes) = contents(dir.path(), "a.img", 2, 0xa5);
        let (c, c_bytes) = contents(dir.path(), "c.img", 1, 0x5a);
        let disk = dir.path().join("disk.img");
        assemble(
            &[
                Part::new("first", ESP, 3, Some(&a)),
                Part::new("empty", LINUX, 2, None),
                Part::new("last", FAT, 1, Some(&c)),
            ],
            &disk,
        )
        .unwrap();

        // Read back by our own GPT reader, not sgdisk: names, 1 MiB alignment, sizes.
        let parts = cairn_boot::gpt::partitions(&disk).unwrap();
        let got: Vec<_> = parts
            .iter()
            .map(|p| (p.number, p.name.as_str(), p.offset / MIB, p.len / MIB))
            .collect();
        assert_eq!(
            got,
            [(1, "first", 1, 3), (2, "empty", 4, 2), (3, "last", 6, 1)]
        );
        assert_eq!(read_at(&disk, MIB, a_bytes.len()), a_bytes);
        assert_eq!(read_at(&disk, 6 * MIB, c_bytes.len()), c_bytes);
        // What the unused rest of a partition holds: zeros.
        assert!(
            read_at(&disk, 3 * MIB, MIB as usize)
                .iter()
                .all(|b| *b == 0)
        );
        // 8 MiB long; only the tables and the four data blocks are allocated.
        let meta = std::fs::metadata(&disk).unwrap();
        assert_eq!(meta.len(), 8 * MIB);
        assert!(
            meta.blocks() * 512 < MIB,
            "{} bytes allocated",
            meta.blocks() * 512
        );
    }

    #[test]
    fn contents_larger_than_their_partition_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, _) = contents(dir.path(), "a.img", 2, 1);
        let e = assemble(
            &[Part::new("small", LINUX, 1, Some(&a))],
            &dir.path().join("disk.img"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("partition small 1 MiB"), "{e}");
    }
}
