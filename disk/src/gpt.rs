//! GUID partition tables (UEFI 2.x, chapter 5), read and written in place.
//!
//! A GPT has two copies: the primary (header at LBA 1, entry array after it) and the
//! backup (entry array before the last LBA, header at the last LBA). [`Table::read`]
//! reads and checks both — signature, header size, header CRC32, the header's own LBA,
//! the entry array's shape, placement and CRC32 — and uses the primary if it is valid,
//! else the backup, as firmware does; what is wrong with either copy is in
//! [`Table::problems`]. [`Table::write`] writes the entry array in force to both copies,
//! backup first, each with fresh CRCs and an fsync after it, so that at every instant
//! at least one copy is valid; a damaged copy is rebuilt from the valid one.
//!
//! Sectors of 512 and 4096 bytes are recognised (the first size that holds a valid
//! table). A disk with no table at all gets an [`GptError::Absent`] that says what it
//! holds instead (an MBR, a bare FAT, nothing), for the messages users read.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The smallest header the spec allows (UEFI 2.x: 92 bytes).
const MIN_HEADER: usize = 92;
/// Entry arrays larger than this are refused (the usual one is 16 KiB).
const MAX_ENTRIES_BYTES: usize = 4 << 20;

/// A GPT GUID, as the 16 bytes stored on disk (the first three fields little endian),
/// shown and parsed in the usual text form (`24FDAF0D-3F9E-4298-AB44-...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

/// The EFI System Partition's type, C12A7328-F81F-11D2-BA4B-00A0C93EC93B.
pub const ESP_TYPE: Guid = Guid([
    0x28, 0x73, 0x2a, 0xc1, 0x1f, 0xf8, 0xd2, 0x11, 0xba, 0x4b, 0x00, 0xa0, 0xc9, 0x3e, 0xc9, 0x3b,
]);

impl Guid {
    /// Parses `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx` (any case).
    pub fn parse(s: &str) -> Option<Guid> {
        let parts: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if parts.len() != 5
            || parts
                .iter()
                .zip(lens)
                .any(|(p, n)| p.len() != n || !p.bytes().all(|c| c.is_ascii_hexdigit()))
        {
            return None;
        }
        let hex: String = parts.concat();
        let mut be = [0u8; 16];
        for (i, b) in be.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        let mut d = be;
        d[0..4].reverse();
        d[4..6].reverse();
        d[6..8].reverse();
        Some(Guid(d))
    }

    pub fn is_nil(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }
}

impl std::fmt::Display for Guid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let d = &self.0;
        write!(
            f,
            "{:02X}{:02X}{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-{:02X}{:02X}-",
            d[3], d[2], d[1], d[0], d[5], d[4], d[7], d[6], d[8], d[9]
        )?;
        d[10..].iter().try_for_each(|b| write!(f, "{b:02X}"))
    }
}

/// Which partition is meant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PartRef {
    /// The partition number, from 1 (as `sgdisk -i N` and `/dev/sdaN` count).
    Number(u32),
    /// The partition's unique GUID (`PARTUUID`).
    Guid(Guid),
    /// The partition's name (`PARTLABEL`); must be unique on the disk.
    Name(String),
}

impl std::fmt::Display for PartRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Number(n) => write!(f, "partition {n}"),
            Self::Guid(g) => write!(f, "partition with GUID {g}"),
            Self::Name(n) => write!(f, "partition named {n:?}"),
        }
    }
}

/// What went wrong with a table.
#[derive(Debug)]
pub enum GptError {
    /// There is no GPT at all; says what the disk holds instead.
    Absent(String),
    /// There is one, but no copy of it checks out; says what is wrong with each.
    Damaged(String),
    /// A partition that was asked for is not there, or not only once.
    NoSuchPartition(String),
    /// The table cannot be written back (no room to rebuild a damaged copy).
    Unwritable(String),
    /// Reading or writing the disk failed.
    Io {
        what: &'static str,
        source: io::Error,
    },
}

impl std::fmt::Display for GptError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Absent(why) | Self::Damaged(why) => write!(f, "no valid GPT ({why})"),
            Self::NoSuchPartition(why) | Self::Unwritable(why) => f.write_str(why),
            Self::Io { what, source } => write!(f, "{what}: {source}"),
        }
    }
}

impl std::error::Error for GptError {}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> GptError {
    move |source| GptError::Io { what, source }
}

/// A disk (or image file), opened, with its length in bytes.
#[derive(Debug)]
pub struct Disk {
    path: PathBuf,
    file: File,
    len: u64,
}

impl Disk {
    /// Opens `path` read-only, or for reading and writing.
    pub fn open(path: &Path, write: bool) -> io::Result<Disk> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)?;
        Self::from_file(path, file)
    }

    /// A disk from a file the caller opened (`path` is for messages).
    pub fn from_file(path: &Path, mut file: File) -> io::Result<Disk> {
        // Seeking to the end gives the size of block devices too.
        let len = file.seek(SeekFrom::End(0))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
            len,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// The disk's length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `n` bytes at `at`, or why not (past the end, an I/O error).
    fn read(&self, at: u64, n: usize) -> Result<Vec<u8>, String> {
        if at.checked_add(n as u64).is_none_or(|end| end > self.len) {
            return Err(format!(
                "{n} bytes at offset {at} lie past the end of the disk ({} bytes; a truncated image?)",
                self.len
            ));
        }
        let mut buf = vec![0u8; n];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| format!("reading {n} bytes at offset {at}: {e}"))?;
        Ok(buf)
    }

    fn write(&self, at: u64, bytes: &[u8]) -> Result<(), GptError> {
        self.file
            .write_all_at(bytes, at)
            .map_err(io_err("writing the GPT"))
    }

    fn sync(&self) -> Result<(), GptError> {
        self.file.sync_all().map_err(io_err("syncing the GPT"))
    }
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        x.copy_from_slice(s);
    }
    u32::from_le_bytes(x)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        x.copy_from_slice(s);
    }
    u64::from_le_bytes(x)
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    if let Some(s) = b.get_mut(at..at + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn put_u64(b: &mut [u8], at: usize, v: u64) {
    if let Some(s) = b.get_mut(at..at + 8) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// The header CRC32: over the first `size` bytes with the CRC field taken as zero.
fn header_crc(sector: &[u8], size: usize) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&sector[..16.min(size)]);
    h.update(&[0; 4]);
    if size > 20 {
        h.update(&sector[20..size]);
    }
    h.finalize()
}

/// One parsed, CRC-checked header.
#[derive(Debug, Clone)]
struct Header {
    /// The whole sector the header is in (the bytes past the header are kept).
    sector: Vec<u8>,
    size: usize,
    my_lba: u64,
    alternate_lba: u64,
    first_usable: u64,
    last_usable: u64,
    entries_lba: u64,
    num_entries: u32,
    entry_size: u32,
}

impl Header {
    fn entries_bytes(&self) -> usize {
        self.num_entries as usize * self.entry_size as usize
    }
}

/// Reads and checks the header at `lba` and its entry array. `primary` says which
/// copy it should be (for the placement checks).
fn read_copy(disk: &Disk, ss: u64, lba: u64, primary: bool) -> Result<(Header, Vec<u8>), String> {
    let last_lba = disk.len / ss - 1;
    let sector = disk.read(lba * ss, ss as usize)?;
    if &sector[..8] != SIGNATURE {
        return Err("no \"EFI PART\" signature".into());
    }
    let size = le_u32(&sector, 12) as usize;
    if size < MIN_HEADER || size > sector.len() {
        return Err(format!("header size {size} out of range"));
    }
    let stored = le_u32(&sector, 16);
    let computed = header_crc(&sector, size);
    if stored != computed {
        return Err(format!(
            "header CRC32 mismatch (stored {stored:08x}, computed {computed:08x})"
        ));
    }
    let h = Header {
        size,
        my_lba: le_u64(&sector, 24),
        alternate_lba: le_u64(&sector, 32),
        first_usable: le_u64(&sector, 40),
        last_usable: le_u64(&sector, 48),
        entries_lba: le_u64(&sector, 72),
        num_entries: le_u32(&sector, 80),
        entry_size: le_u32(&sector, 84),
        sector,
    };
    if h.my_lba != lba {
        return Err(format!(
            "header read at LBA {lba} says it is at LBA {}",
            h.my_lba
        ));
    }
    if h.entry_size < 128 || !h.entry_size.is_multiple_of(8) || h.num_entries == 0 {
        return Err(format!(
            "bad entry array shape ({} entries of {} bytes)",
            h.num_entries, h.entry_size
        ));
    }
    let n = h.entries_bytes();
    if n > MAX_ENTRIES_BYTES {
        return Err(format!("an entry array of {n} bytes is too large"));
    }
    let sectors = (n as u64).div_ceil(ss);
    if h.first_usable > h.last_usable {
        return Err(format!(
            "usable LBAs {}..={} are empty",
            h.first_usable, h.last_usable
        ));
    }
    if h.last_usable >= last_lba {
        return Err(format!(
            "usable LBAs {}..={} do not fit the disk (last LBA {last_lba}, {} bytes; a truncated image?)",
            h.first_usable, h.last_usable, disk.len
        ));
    }
    let entries_end = h.entries_lba.saturating_add(sectors);
    let placed = if primary {
        h.entries_lba >= 2 && entries_end <= h.first_usable
    } else {
        h.entries_lba > h.last_usable && entries_end <= h.my_lba
    };
    if !placed {
        return Err(format!(
            "entry array at LBA {} ({sectors} sectors) overlaps the header or the usable area",
            h.entries_lba
        ));
    }
    let entries = disk.read(h.entries_lba * ss, n)?;
    let stored = le_u32(&h.sector, 88);
    let computed = crc32fast::hash(&entries);
    if stored != computed {
        return Err(format!(
            "entry array CRC32 mismatch (stored {stored:08x}, computed {computed:08x})"
        ));
    }
    Ok((h, entries))
}

/// One used entry of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// From 1, as the kernel (`sda3`) and sgdisk count.
    pub number: u32,
    pub name: String,
    pub type_guid: Guid,
    pub unique_guid: Guid,
    /// Where it starts and how long it is, in bytes.
    pub offset: u64,
    pub len: u64,
}

impl Partition {
    /// `partition 2 "slot-a"`, or `partition 2` when it has no name.
    pub fn describe(&self) -> String {
        if self.name.is_empty() {
            format!("partition {}", self.number)
        } else {
            format!("partition {} {:?}", self.number, self.name)
        }
    }
}

/// Both copies of a table as read, and which one is in force.
#[derive(Debug)]
pub struct Table {
    ss: u64,
    last_lba: u64,
    primary: Option<Header>,
    backup: Option<Header>,
    /// The entry array in force: the primary's if it is valid, else the backup's.
    entries: Vec<u8>,
    /// What is wrong with either copy (empty when both are valid and agree).
    problems: Vec<String>,
}

impl Table {
    /// Reads the table of `disk`: the primary copy if valid, else the backup.
    pub fn read(disk: &Disk) -> Result<Table, GptError> {
        let mut failures = Vec::new();
        let mut signature_seen = false;
        for ss in [512u64, 4096] {
            if disk.len < ss * 4 {
                failures.push(format!("{ss}-byte sectors: the disk is too small"));
                continue;
            }
            let last_lba = disk.len / ss - 1;
            let primary = read_copy(disk, ss, 1, true);
            let backup_lba = match &primary {
                Ok((h, _)) => h.alternate_lba,
                Err(_) => last_lba,
            };
            let backup = if (2..=last_lba).contains(&backup_lba) {
                read_copy(disk, ss, backup_lba, false)
            } else {
                Err(format!(
                    "the primary points to a backup at LBA {backup_lba}, outside the disk \
                     (last LBA {last_lba}; a truncated image?)"
                ))
            };
            let mut problems = Vec::new();
            let (entries, primary, backup) = match (primary, backup) {
                (Ok((p, pe)), Ok((b, be))) => {
                    if pe != be || p.num_entries != b.num_entries {
                        problems.push(
                            "the backup GPT differs from the primary (an interrupted update?); \
                             using the primary"
                                .to_string(),
                        );
                    }
                    (pe, Some(p), Some(b))
                }
                (Ok((p, pe)), Err(e)) => {
                    problems.push(format!(
                        "the backup GPT header at LBA {backup_lba} is invalid: {e}; using the primary"
                    ));
                    (pe, Some(p), None)
                }
                (Err(e), Ok((b, be))) => {
                    problems.push(format!(
                        "the primary GPT header at LBA 1 is invalid: {e}; using the backup at LBA {backup_lba}"
                    ));
                    (be, None, Some(b))
                }
                (Err(pe), Err(be)) => {
                    let sig = |lba: u64| {
                        disk.read(lba * ss, 8)
                            .is_ok_and(|s| s.as_slice() == SIGNATURE.as_slice())
                    };
                    signature_seen |= sig(1) || sig(last_lba);
                    failures.push(format!(
                        "{ss}-byte sectors: primary at LBA 1: {pe}; backup at LBA {backup_lba}: {be}"
                    ));
                    continue;
                }
            };
            return Ok(Table {
                ss,
                last_lba,
                primary,
                backup,
                entries,
                problems,
            });
        }
        if signature_seen {
            Err(GptError::Damaged(failures.join("; ")))
        } else {
            Err(GptError::Absent(why_absent(disk)))
        }
    }

    /// The sector size the table was found with.
    pub fn sector_size(&self) -> u64 {
        self.ss
    }

    /// Whether the primary copy checked out (else the backup is in force).
    pub fn primary_valid(&self) -> bool {
        self.primary.is_some()
    }

    /// What is wrong with the table on disk (a damaged copy, copies that disagree);
    /// empty when both copies are valid and equal. The next [`Table::write`] repairs it.
    pub fn problems(&self) -> &[String] {
        &self.problems
    }

    /// The header in force (primary if valid, else backup).
    fn header(&self) -> Option<&Header> {
        self.primary.as_ref().or(self.backup.as_ref())
    }

    fn entry_size(&self) -> usize {
        self.header().map_or(128, |h| h.entry_size as usize)
    }

    /// How many entries the array has (used or not).
    pub fn entry_count(&self) -> usize {
        self.entries.len() / self.entry_size()
    }

    fn entry(&self, i: usize) -> Option<&[u8]> {
        let es = self.entry_size();
        self.entries.get(i * es..(i + 1) * es)
    }

    fn used(e: &[u8]) -> bool {
        e[..16].iter().any(|&b| b != 0)
    }

    /// The index in the entry array of the partition `r` names.
    pub fn find(&self, r: &PartRef) -> Result<usize, GptError> {
        let found: Vec<usize> = (0..self.entry_count())
            .filter(|&i| {
                self.entry(i).is_some_and(|e| {
                    Self::used(e)
                        && match r {
                            PartRef::Number(k) => *k as usize == i + 1,
                            PartRef::Guid(g) => e[16..32] == g.0,
                            PartRef::Name(name) => entry_name(e) == *name,
                        }
                })
            })
            .collect();
        match found.as_slice() {
            [i] => Ok(*i),
            [] => Err(GptError::NoSuchPartition(format!("no {r} in the GPT"))),
            _ => Err(GptError::NoSuchPartition(format!(
                "{r}: {} partitions match",
                found.len()
            ))),
        }
    }

    /// The 64 attribute bits of entry `i` (0 for an index past the array).
    pub fn attributes(&self, i: usize) -> u64 {
        self.entry(i).map_or(0, |e| le_u64(e, 48))
    }

    /// Sets the attribute bits of entry `i` in memory; [`Table::write`] stores them.
    pub fn set_attributes(&mut self, i: usize, bits: u64) {
        let es = self.entry_size();
        if let Some(e) = self.entries.get_mut(i * es..(i + 1) * es) {
            put_u64(e, 48, bits);
        }
    }

    /// The used entries, each checked to lie inside the usable area (and so inside the
    /// disk).
    pub fn partitions(&self) -> Result<Vec<Partition>, GptError> {
        let usable = self
            .header()
            .map_or(0..=self.last_lba, |h| h.first_usable..=h.last_usable);
        let mut out = Vec::new();
        for i in 0..self.entry_count() {
            let Some(e) = self.entry(i).filter(|e| Self::used(e)) else {
                continue;
            };
            let (first, last) = (le_u64(e, 32), le_u64(e, 40));
            let guid = |at: usize| {
                let mut g = [0u8; 16];
                g.copy_from_slice(&e[at..at + 16]);
                Guid(g)
            };
            let p = Partition {
                number: i as u32 + 1,
                name: entry_name(e),
                type_guid: guid(0),
                unique_guid: guid(16),
                offset: first.saturating_mul(self.ss),
                len: last
                    .saturating_sub(first)
                    .saturating_add(1)
                    .saturating_mul(self.ss),
            };
            if last < first || !usable.contains(&first) || !usable.contains(&last) {
                return Err(GptError::Damaged(format!(
                    "{} spans LBAs {first}..={last}, outside the usable LBAs {}..={}",
                    p.describe(),
                    usable.start(),
                    usable.end()
                )));
            }
            out.push(p);
        }
        Ok(out)
    }

    /// Writes the entry array in force to both copies (backup first), each with fresh
    /// CRCs, fsyncing after each. A damaged copy is rebuilt from the valid one.
    pub fn write(&self, disk: &Disk) -> Result<(), GptError> {
        let ss = self.ss;
        let src = self
            .header()
            .ok_or_else(|| GptError::Unwritable("no valid GPT header to write from".into()))?;
        let sectors = (self.entries.len() as u64).div_ceil(ss);
        let backup = match &self.backup {
            Some(b) => b.clone(),
            None => {
                // Where the primary says the backup is, if that can hold it; else
                // the last LBA.
                let mut b = src.clone();
                let at = src.alternate_lba;
                b.my_lba = if at > src.last_usable.saturating_add(sectors) && at <= self.last_lba {
                    at
                } else {
                    self.last_lba
                };
                b.alternate_lba = 1;
                b.entries_lba = b.my_lba.saturating_sub(sectors);
                if b.entries_lba <= b.last_usable {
                    return Err(GptError::Unwritable(
                        "cannot rebuild the backup GPT: no room between the usable area and the last LBA"
                            .into(),
                    ));
                }
                b
            }
        };
        let mut primary = match &self.primary {
            Some(p) => p.clone(),
            None => {
                let mut p = src.clone();
                p.my_lba = 1;
                p.entries_lba = 2;
                if 2 + sectors > p.first_usable {
                    return Err(GptError::Unwritable(
                        "cannot rebuild the primary GPT: no room for the entry array before the first usable LBA"
                            .into(),
                    ));
                }
                p
            }
        };
        primary.alternate_lba = backup.my_lba;
        let crc = crc32fast::hash(&self.entries);
        for h in [backup, primary] {
            let mut sector = h.sector.clone();
            put_u64(&mut sector, 24, h.my_lba);
            put_u64(&mut sector, 32, h.alternate_lba);
            put_u64(&mut sector, 72, h.entries_lba);
            put_u32(&mut sector, 88, crc);
            let hcrc = header_crc(&sector, h.size);
            put_u32(&mut sector, 16, hcrc);
            disk.write(h.entries_lba * ss, &self.entries)?;
            disk.write(h.my_lba * ss, &sector)?;
            disk.sync()?;
        }
        Ok(())
    }
}

/// The used partitions of the GPT on `path` (a disk or an image file), read-only,
/// with every check of [`Table::read`] (the backup if the primary is damaged).
pub fn partitions(path: &Path) -> Result<Vec<Partition>, GptError> {
    let disk = Disk::open(path, false).map_err(io_err("opening the disk"))?;
    Table::read(&disk)?.partitions()
}

/// A partition entry's name (UTF-16LE, up to the first NUL).
fn entry_name(e: &[u8]) -> String {
    let units = e
        .get(56..128)
        .unwrap_or_default()
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0);
    char::decode_utf16(units)
        .map(|c| c.unwrap_or(char::REPLACEMENT_CHARACTER))
        .collect()
}

/// What a disk with no GPT signature holds instead, for the error message.
fn why_absent(disk: &Disk) -> String {
    if disk.len < 4 * 512 {
        return format!("it is only {} bytes long", disk.len);
    }
    let mbr = disk.read(0, 512).unwrap_or_default();
    if mbr.len() < 512 || mbr[510..512] != [0x55, 0xaa] {
        return "it has no partition table".into();
    }
    let bare_fat = &mbr[0x36..0x39] == b"FAT" || &mbr[0x52..0x57] == b"FAT32";
    // A partition entry starts with its status, 0x00 or 0x80.
    let entries: Vec<&[u8]> = (0..4).map(|i| &mbr[446 + 16 * i..462 + 16 * i]).collect();
    let types: Vec<u8> = if entries.iter().all(|e| e[0] & 0x7f == 0) {
        entries.iter().map(|e| e[4]).collect()
    } else {
        Vec::new()
    };
    if bare_fat {
        "it is a bare FAT filesystem, not a partitioned disk image".into()
    } else if types.contains(&0xee) {
        "a protective MBR, but no GPT header at LBA 1".into()
    } else if types.iter().any(|t| *t != 0) {
        "it has an MBR (DOS) partition table, not a GPT".into()
    } else {
        "it has a boot sector but no partition table (a bare filesystem image?)".into()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn guid_text_round_trips_in_mixed_endian() {
        let g = Guid::parse("24fdaf0d-3f9e-4298-ab44-5f39784e9ee8").unwrap();
        assert_eq!(&g.0[..4], &[0x0d, 0xaf, 0xfd, 0x24]);
        assert_eq!(&g.0[8..10], &[0xab, 0x44]);
        assert_eq!(g.to_string(), "24FDAF0D-3F9E-4298-AB44-5F39784E9EE8");
        assert!(Guid::parse("24fdaf0d-3f9e-4298-ab44-5f39784e9ee").is_none());
        assert!(Guid::parse("24fdaf0d_3f9e-4298-ab44-5f39784e9ee8").is_none());
        assert!(Guid::parse("g4fdaf0d-3f9e-4298-ab44-5f39784e9ee8").is_none());
        assert_eq!(ESP_TYPE.to_string(), "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
    }

    fn disk_of(dir: &Path, name: &str, bytes: &[u8]) -> Disk {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        Disk::open(&p, false).unwrap()
    }

    #[test]
    fn what_a_disk_without_a_gpt_holds_is_said() {
        let d = tempfile::tempdir().unwrap();
        let why = |bytes: &[u8]| match Table::read(&disk_of(d.path(), "x.img", bytes)) {
            Err(GptError::Absent(why)) => why,
            other => panic!("{other:?}"),
        };
        assert!(why(b"x").contains("only 1 bytes"));
        assert!(why(&[0u8; 1 << 16]).contains("no partition table"));
        let mut mbr = vec![0u8; 1 << 16];
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        mbr[446 + 4] = 0x83;
        assert!(why(&mbr).contains("MBR (DOS)"));
        mbr[446 + 4] = 0xee;
        assert!(why(&mbr).contains("protective MBR"));
        mbr[0x52..0x57].copy_from_slice(b"FAT32");
        assert!(why(&mbr).contains("bare FAT"));
        // A signature without a valid header is damage, not absence.
        let mut sig = vec![0u8; 1 << 16];
        sig[512..520].copy_from_slice(SIGNATURE);
        match Table::read(&disk_of(d.path(), "sig.img", &sig)) {
            Err(e @ GptError::Damaged(_)) => {
                let e = e.to_string();
                assert!(
                    e.contains("no valid GPT") && e.contains("header size 0"),
                    "{e}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    proptest::proptest! {
        /// Whatever the bytes, reading a table is an answer, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..8192),
            sig in proptest::bool::ANY,
        ) {
            let d = tempfile::tempdir().unwrap();
            let mut bytes = bytes;
            if sig && bytes.len() >= 520 {
                bytes[512..520].copy_from_slice(SIGNATURE);
            }
            if let Ok(t) = Table::read(&disk_of(d.path(), "p.img", &bytes)) {
                let _ = t.partitions();
            }
        }
    }
}
