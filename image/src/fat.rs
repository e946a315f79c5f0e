//! FAT32 file systems made with mtools: the same bytes for the same inputs on any
//! build machine ([`image`]), and cut after their last cluster where the file system
//! is a payload ([`trim_after_last_cluster`]).

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::MIB;
use crate::tools::run;

/// Every time stamp in the FAT images (FAT cannot store the epoch): 2000-01-01, so
/// that the same inputs give the same bytes.
const FAT_TIME: &str = "@946684800";

/// A FAT32 image of `mib` MiB with `files` (source, path in the file system, with
/// `/` between directories), the same bytes for the same inputs on any build machine:
/// a fixed volume serial number, directories made and files copied in order, every
/// time stamp [`FAT_TIME`], in UTC (mtools writes FAT's local times with the build
/// machine's time zone otherwise).
pub(crate) fn image(
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
pub(crate) fn trim_after_last_cluster(path: &Path) -> Result<()> {
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

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    /// Bytes that do not repeat (a FAT of them cannot be mistaken for zeros).
    fn noise(len: usize, seed: u32) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    /// `name` from the FAT image `img`, through mtools.
    fn mread(img: &Path, name: &str) -> Vec<u8> {
        let out = Command::new("mcopy")
            .args(["-n", "-i"])
            .arg(img)
            .arg(format!("::/{name}"))
            .arg("-")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    #[test]
    fn the_same_files_give_the_same_bytes_whatever_their_time_stamps() {
        let dir = tempfile::tempdir().unwrap();
        let (k, c) = (dir.path().join("k"), dir.path().join("c"));
        std::fs::write(&k, noise(300 << 10, 7)).unwrap();
        std::fs::write(&c, b"enable_uart=1\n").unwrap();
        let files = [
            (k.as_path(), "vmlinuz"),
            (c.as_path(), "sub/dir/config.txt"),
        ];
        let (one, two) = (dir.path().join("one.vfat"), dir.path().join("two.vfat"));
        image(&one, 40, ("TEST", "12345678"), &files).unwrap();
        // The sources touched since: a build machine's checkout has any time stamps.
        let later = SystemTime::now() + Duration::from_secs(86_400);
        for f in [&k, &c] {
            let f = std::fs::File::options().write(true).open(f).unwrap();
            f.set_modified(later).unwrap();
        }
        image(&two, 40, ("TEST", "12345678"), &files).unwrap();
        assert!(std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap());
        assert_eq!(mread(&one, "sub/dir/config.txt"), b"enable_uart=1\n");
    }

    #[test]
    fn files_that_do_not_fit_are_refused_naming_the_partition() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big");
        std::fs::write(&big, vec![1u8; (37 * MIB) as usize]).unwrap();
        let e = image(
            &dir.path().join("out.vfat"),
            40,
            ("CAIRN-BOOT", "ca1e0001"),
            &[(&big, "big")],
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("CAIRN-BOOT: 37 MiB of files do not fit a 40 MiB"),
            "{e}"
        );
    }

    /// A trimmed boot partition is written over an older release's bytes: every file,
    /// even one that ends in zeros, must read back whole from what is on the disk.
    #[test]
    fn trimming_keeps_every_file_even_one_ending_in_zeros() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("k");
        let mut padded = noise(64 << 10, 3);
        padded.extend(vec![0u8; 200 << 10]);
        std::fs::write(&k, noise(500 << 10, 9)).unwrap();
        let z = dir.path().join("z");
        std::fs::write(&z, &padded).unwrap();
        let img = dir.path().join("boot.vfat");
        image(
            &img,
            40,
            ("CAIRN-BOOT", "ca1e0001"),
            &[(&k, "vmlinuz"), (&z, "initrd.img")],
        )
        .unwrap();
        trim_after_last_cluster(&img).unwrap();
        let trimmed = std::fs::read(&img).unwrap();
        assert!(
            trimmed.len() < (2 * MIB) as usize,
            "{} bytes",
            trimmed.len()
        );
        assert_eq!(trimmed.len() % 4096, 0);

        let mut slot = trimmed.clone();
        slot.resize((40 * MIB) as usize, 0xee);
        let on_disk = dir.path().join("slot");
        std::fs::write(&on_disk, &slot).unwrap();
        assert_eq!(mread(&on_disk, "vmlinuz"), noise(500 << 10, 9));
        assert_eq!(mread(&on_disk, "initrd.img"), padded);
        // Trimming again changes nothing.
        trim_after_last_cluster(&img).unwrap();
        assert_eq!(std::fs::read(&img).unwrap(), trimmed);
    }

    #[test]
    fn trimming_refuses_what_is_not_fat32() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("x");
        std::fs::write(&f, vec![0u8; 4096]).unwrap();
        let e = trim_after_last_cluster(&f).unwrap_err();
        assert!(e.to_string().contains("not a FAT32 file system"), "{e}");
    }
}
