//! The image side of `cairn-hub image`: the partition table (through `cairn_disk::gpt`),
//! the EFI System Partition's FAT (through `fatfs` on a [`Window`] of the image file),
//! and the first-boot file on it. No command-line handling here.

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use cairn_disk::gpt::{self, Disk, ESP_TYPE, Partition, Table};
use cairn_disk::window::Window;

use super::{CONFIG_DIR, CONFIG_NAME, CONFIG_TMP, ImageError, MAX_CONFIG};

// ---------------------------------------------------------------------------------------
// The partition table (read and checked by `cairn_disk::gpt`, the agent's reader too).

/// The partition table as `image` uses it: the partitions of the primary copy, and
/// what is wrong with the backup (a warning: the primary is valid and was used).
#[derive(Debug)]
pub(super) struct Gpt {
    pub(super) sector: u64,
    pub(super) partitions: Vec<Partition>,
    pub(super) warnings: Vec<String>,
}

#[derive(Debug, PartialEq)]
pub(super) enum GptError {
    /// There is no GPT at all.
    Absent(String),
    /// There is one, but it does not check out.
    Damaged(String),
}

impl Gpt {
    /// Reads the table of `disk`. A damaged primary copy is refused even where the
    /// backup is valid: the image is not what its builder made, and flashing it would
    /// spread the damage.
    pub(super) fn read(disk: &Disk) -> Result<Gpt, GptError> {
        let why = |e: gpt::GptError| match e {
            gpt::GptError::Absent(why) => GptError::Absent(why),
            gpt::GptError::Damaged(why) => GptError::Damaged(why),
            e => GptError::Damaged(e.to_string()),
        };
        let table = Table::read(disk).map_err(why)?;
        if !table.primary_valid() {
            return Err(GptError::Damaged(table.problems().join("; ")));
        }
        let partitions = table.partitions().map_err(why)?;
        let warnings = table
            .problems()
            .iter()
            .map(|p| format!("{p} (sgdisk --verify tells more)"))
            .collect();
        Ok(Gpt {
            sector: table.sector_size(),
            partitions,
            warnings,
        })
    }

    /// The first partition of the EFI System Partition type.
    pub(super) fn esp(&self) -> Option<&Partition> {
        self.partitions.iter().find(|p| p.type_guid == ESP_TYPE)
    }
}

// ---------------------------------------------------------------------------------------
// The image and the FAT on its ESP.

/// File times on the FAT: now, in UTC (FAT has no time zone; a config file's time is
/// only informative).
#[derive(Debug)]
pub(super) struct UtcClock;

pub(super) static UTC_CLOCK: UtcClock = UtcClock;

impl fatfs::TimeProvider for UtcClock {
    fn get_current_date(&self) -> fatfs::Date {
        self.get_current_date_time().date
    }

    fn get_current_date_time(&self) -> fatfs::DateTime {
        // "YYYY-MM-DDTHH:MM:SSZ"
        let s = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
        let field = |r: std::ops::Range<usize>| s.get(r).and_then(|f| f.parse::<u16>().ok());
        let fat = |year: Option<u16>| {
            Some(fatfs::DateTime {
                date: fatfs::Date {
                    // The years FAT can store.
                    year: year?.clamp(1980, 2107),
                    month: field(5..7)?,
                    day: field(8..10)?,
                },
                time: fatfs::Time {
                    hour: field(11..13)?,
                    min: field(14..16)?,
                    sec: field(17..19)?,
                    millis: 0,
                },
            })
        };
        fat(field(0..4)).unwrap_or(fatfs::DateTime {
            date: fatfs::Date {
                year: 1980,
                month: 1,
                day: 1,
            },
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        })
    }
}

pub(super) type Fat<'f> = fatfs::FileSystem<Window<'f>>;

/// An image opened and its partition table read.
pub(super) struct Image {
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) len: u64,
    pub(super) gpt: Gpt,
}

/// Magic numbers of what images are usually shipped in.
pub(super) fn compression(head: &[u8]) -> Option<(&'static str, &'static str)> {
    const FORMATS: [(&[u8], &str, &str); 5] = [
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], "xz", "xz -dk"),
        (&[0x1f, 0x8b], "gzip", "gunzip -k"),
        (&[0x28, 0xb5, 0x2f, 0xfd], "zstd", "zstd -d"),
        (b"BZh", "bzip2", "bunzip2 -k"),
        (b"PK\x03\x04", "zip", "unzip"),
    ];
    FORMATS
        .iter()
        .find(|(magic, ..)| head.starts_with(magic))
        .map(|(_, f, h)| (*f, *h))
}

impl Image {
    pub(super) fn shown(&self) -> String {
        self.path.display().to_string()
    }

    /// Opens the image read-only and reads its partition table.
    pub(super) fn open(path: &Path) -> Result<Image, ImageError> {
        let shown = path.display().to_string();
        let mut file = File::open(path).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => ImageError::Missing {
                path: shown.clone(),
            },
            _ => ImageError::Open {
                path: shown.clone(),
                source: e,
            },
        })?;
        let io_err = |what| {
            let path = shown.clone();
            move |source| ImageError::Io { path, what, source }
        };
        if file
            .metadata()
            .map_err(io_err("reading metadata"))?
            .is_dir()
        {
            return Err(ImageError::Directory { path: shown });
        }
        // Seeking to the end gives the size of block devices too.
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(io_err("measuring the image"))?;
        let mut head = [0u8; 8];
        let n = file.read_at(&mut head, 0).map_err(io_err("reading"))?;
        if let Some((format, cmd)) = compression(&head[..n]) {
            return Err(ImageError::Compressed {
                hint: format!("{cmd} {shown}"),
                path: shown,
                format,
            });
        }
        let disk = file
            .try_clone()
            .and_then(|f| Disk::from_file(path, f))
            .map_err(io_err("reading the partition table"))?;
        let gpt = Gpt::read(&disk).map_err(|e| match e {
            GptError::Absent(why) => ImageError::NoGpt {
                path: shown.clone(),
                why,
            },
            GptError::Damaged(why) => ImageError::BadGpt {
                path: shown.clone(),
                why,
            },
        })?;
        Ok(Image {
            path: path.to_path_buf(),
            file,
            len,
            gpt,
        })
    }

    /// The same image, opened for writing as well.
    pub(super) fn reopen_writable(&self) -> Result<File, ImageError> {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.path)
            .map_err(|e| match (e.kind(), e.raw_os_error()) {
                // EROFS: a read-only mount, a write-protected card.
                (io::ErrorKind::PermissionDenied, _) | (_, Some(30)) => ImageError::ReadOnly {
                    path: self.shown(),
                    source: e,
                },
                _ => ImageError::Open {
                    path: self.shown(),
                    source: e,
                },
            })
    }

    pub(super) fn esp(&self) -> Result<&Partition, ImageError> {
        self.gpt.esp().ok_or_else(|| ImageError::NoEsp {
            path: self.shown(),
            parts: if self.gpt.partitions.is_empty() {
                "none".into()
            } else {
                self.gpt
                    .partitions
                    .iter()
                    .map(|p| {
                        format!(
                            "{} {}",
                            p.number,
                            if p.name.is_empty() { "-" } else { &p.name }
                        )
                    })
                    .collect::<Vec<_>>()
                    .join(", ")
            },
        })
    }

    /// The FAT filesystem on `esp`, through `file` (this image, opened as needed).
    pub(super) fn mount<'f>(&self, file: &'f File, esp: &Partition) -> Result<Fat<'f>, ImageError> {
        let io = Window::new(file, esp.offset, esp.len);
        let options = fatfs::FsOptions::new()
            .update_accessed_date(false)
            .time_provider(&UTC_CLOCK);
        fatfs::FileSystem::new(io, options).map_err(|e| ImageError::NotFat {
            path: self.shown(),
            esp: esp.describe(),
            why: e.to_string(),
        })
    }

    pub(super) fn fat_error(
        &self,
        esp: &Partition,
        what: &'static str,
    ) -> impl FnOnce(io::Error) -> ImageError {
        let (path, esp) = (self.shown(), esp.describe());
        move |source| ImageError::Fat {
            path,
            esp,
            what,
            source,
        }
    }
}

pub(super) fn fat_name(t: fatfs::FatType) -> &'static str {
    match t {
        fatfs::FatType::Fat12 => "FAT12",
        fatfs::FatType::Fat16 => "FAT16",
        fatfs::FatType::Fat32 => "FAT32",
    }
}

/// `cairn/agent.toml` on the FAT, if there is one.
pub(super) fn read_config(fs: &Fat<'_>) -> io::Result<Option<String>> {
    let dir = match fs.root_dir().open_dir(CONFIG_DIR) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let file = match dir.open_file(CONFIG_NAME) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let mut buf = Vec::new();
    file.take(MAX_CONFIG + 1).read_to_end(&mut buf)?;
    if buf.len() as u64 > MAX_CONFIG {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("larger than {MAX_CONFIG} bytes: not a first-boot configuration"),
        ));
    }
    String::from_utf8(buf)
        .map(Some)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "not UTF-8 text"))
}

/// Writes `text` as `cairn/agent.toml` (the directory exists): into `agent.toml.new`,
/// then renamed over the old file, so the old one stays whole if the ESP fills up.
pub(super) fn write_config(fs: &Fat<'_>, text: &str) -> io::Result<()> {
    let dir = fs.root_dir().open_dir(CONFIG_DIR)?;
    let gone_ok = |r: io::Result<()>| match r {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    };
    // A leftover of an interrupted run.
    gone_ok(dir.remove(CONFIG_TMP))?;
    {
        let mut f = dir.create_file(CONFIG_TMP)?;
        f.truncate()?;
        f.write_all(text.as_bytes())?;
        f.flush()?;
    }
    gone_ok(dir.remove(CONFIG_NAME))?;
    dir.rename(CONFIG_TMP, &dir, CONFIG_NAME)
}

pub(super) fn has_config_dir(fs: &Fat<'_>) -> io::Result<bool> {
    match fs.root_dir().open_dir(CONFIG_DIR) {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// The 8.3 name fatfs gives [`CONFIG_DIR`], as stored.
pub(super) const CONFIG_DIR_SFN: &[u8; 11] = b"CAIRN      ";
pub(super) const DOT: &[u8; 11] = b".          ";
pub(super) const DOTDOT: &[u8; 11] = b"..         ";
pub(super) const ATTR_LFN: u8 = 0x0f;
pub(super) const ATTR_DIR: u8 = 0x10;

/// Puts "." and ".." back into the first two slots of the directory fatfs just created
/// as [`CONFIG_DIR`] in the root directory.
///
/// fatfs 0.3.6, the newest release, writes a long-name entry before each of them
/// (rafalh/rust-fatfs#117): [LFN, ".", LFN, ".."]. FAT requires "." and ".." first, and
/// fsck.fat "repairs" such a directory by moving and renaming entries — which is what
/// systemd-fsck would do at a box's first boot. This rewrites the four slots as [".",
/// "..", end, end] when, and only when, they are laid out that way (a fixed fatfs
/// leaves nothing to do; returns whether it changed anything). On FAT32 it also sets
/// the cluster of ".." to 0, as FAT wants for a directory in the root (fatfs writes the
/// root's cluster). Reads the boot sector and the root directory itself, since fatfs
/// does not expose cluster positions.
pub(super) fn fix_dot_entries(part: &mut Window<'_>, fat32: bool) -> io::Result<bool> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut boot = [0u8; 512];
    part.seek(SeekFrom::Start(0))?;
    part.read_exact(&mut boot)?;
    let u16_at = |at: usize| u64::from(u16::from_le_bytes([boot[at], boot[at + 1]]));
    let u32_at = |at: usize| {
        u64::from(u32::from_le_bytes([
            boot[at],
            boot[at + 1],
            boot[at + 2],
            boot[at + 3],
        ]))
    };
    let bps = u16_at(11);
    let spc = u64::from(boot[13]);
    let reserved = u16_at(14);
    let fats = u64::from(boot[16]);
    let root_entries = u16_at(17);
    let spf = match u16_at(22) {
        0 => u32_at(36),
        n => n,
    };
    if bps == 0 || spc == 0 {
        return Err(invalid("boot sector without sector or cluster size"));
    }
    let root_sectors = (root_entries * 32).div_ceil(bps);
    let first_data = reserved + fats * spf + root_sectors;
    let cluster_len = spc * bps;
    let cluster_at = |c: u64| (first_data + c.saturating_sub(2) * spc) * bps;

    // The root directory as (offset, length) runs.
    let mut runs = Vec::new();
    if fat32 {
        let mut c = u32_at(44);
        while (2..0x0fff_fff8).contains(&c) && runs.len() < 4096 {
            runs.push((cluster_at(c), cluster_len));
            let mut next = [0u8; 4];
            part.seek(SeekFrom::Start(reserved * bps + c * 4))?;
            part.read_exact(&mut next)?;
            c = u64::from(u32::from_le_bytes(next) & 0x0fff_ffff);
        }
    } else {
        runs.push(((reserved + fats * spf) * bps, root_entries * 32));
    }
    let mut cluster = None;
    'runs: for (at, len) in runs {
        let mut buf = vec![0u8; usize::try_from(len).map_err(|_| invalid("huge cluster"))?];
        part.seek(SeekFrom::Start(at))?;
        part.read_exact(&mut buf)?;
        for e in buf.chunks_exact(32) {
            if e[0] == 0 {
                break 'runs;
            }
            if e[0] != 0xe5
                && e[11] != ATTR_LFN
                && e[11] & ATTR_DIR != 0
                && &e[..11] == CONFIG_DIR_SFN
            {
                let hi = if fat32 {
                    u16::from_le_bytes([e[20], e[21]])
                } else {
                    0
                };
                let lo = u16::from_le_bytes([e[26], e[27]]);
                cluster = Some((u64::from(hi) << 16) | u64::from(lo));
                break 'runs;
            }
        }
    }
    let Some(c) = cluster else {
        return Err(invalid("the new directory is not in the root directory"));
    };
    let mut slots = [0u8; 128];
    part.seek(SeekFrom::Start(cluster_at(c)))?;
    part.read_exact(&mut slots)?;
    let mut fixed = slots;
    let (lfn1, dot, lfn2, dotdot) = (&slots[..32], &slots[32..64], &slots[64..96], &slots[96..]);
    if lfn1[11] == ATTR_LFN && &dot[..11] == DOT && lfn2[11] == ATTR_LFN && &dotdot[..11] == DOTDOT
    {
        fixed = [0u8; 128];
        fixed[..32].copy_from_slice(dot);
        fixed[32..64].copy_from_slice(dotdot);
    }
    // ".." of a directory in the root says cluster 0 (fatfs writes the FAT32 root's).
    if &fixed[32..43] == DOTDOT {
        fixed[32 + 20..32 + 22].fill(0);
        fixed[32 + 26..32 + 28].fill(0);
    }
    if fixed == slots {
        return Ok(false);
    }
    part.seek(SeekFrom::Start(cluster_at(c)))?;
    part.write_all(&fixed)?;
    Ok(true)
}

/// Whether the FAT has room for `text` (and the directory, if it is missing).
pub(super) fn free_space(fs: &Fat<'_>, text: &str) -> io::Result<(u64, u64)> {
    let stats = fs.stats()?;
    let cluster = u64::from(stats.cluster_size());
    let free = u64::from(stats.free_clusters()) * cluster;
    let dir_missing = !has_config_dir(fs)?;
    let clusters = (text.len() as u64).div_ceil(cluster).max(1) + u64::from(dir_missing);
    Ok((free, clusters * cluster))
}

/// fatfs says "No space left on device" as `ErrorKind::Other`.
pub(super) fn is_full(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::StorageFull || e.to_string().contains("No space left")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_images_are_recognised() {
        assert_eq!(
            compression(&[0xfd, b'7', b'z', b'X', b'Z', 0, 0, 4])
                .unwrap()
                .0,
            "xz"
        );
        assert_eq!(compression(&[0x1f, 0x8b, 8]).unwrap().0, "gzip");
        assert_eq!(compression(&[0; 8]), None);
    }

    #[test]
    fn fat_clock_is_a_valid_date() {
        use fatfs::TimeProvider;
        let now = UTC_CLOCK.get_current_date_time();
        assert!((2024..=2107).contains(&now.date.year));
        assert!((1..=12).contains(&now.date.month) && (1..=31).contains(&now.date.day));
        assert!(now.time.hour < 24 && now.time.min < 60 && now.time.sec < 61);
    }
}
