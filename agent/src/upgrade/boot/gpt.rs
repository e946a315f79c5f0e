//! GPT-attribute boot control, as ChromeOS and Bottlerocket do it: the two slots are
//! two partitions of one GUID partition table (a block device or a disk image file),
//! and the boot loader reads three fields from the type-specific attribute bits of
//! each slot's partition entry:
//!
//! | bits  | field      | meaning                                                |
//! |-------|------------|--------------------------------------------------------|
//! | 48-51 | priority   | 0 = never boot; the highest bootable priority boots    |
//! | 52-55 | tries      | boots left before the slot is given up (if not good)   |
//! | 56    | successful | the slot has booted and was found healthy              |
//!
//! A slot is *bootable* when its priority is nonzero and it is successful or has tries
//! left. The boot loader ([`firmware_boot`] models it) boots the bootable slot with the
//! highest priority (ties: the one earlier in the entry array) and, if that slot is
//! not successful, first decrements its tries on disk, so an uncommitted trial is
//! tried exactly as often as `tries` says — once, here.
//!
//! What the backend writes:
//! - [`mark_unbootable`](BootControl::mark_unbootable) and
//!   [`reject`](BootControl::reject): priority 0, tries 0, successful 0;
//! - [`arm_trial`](BootControl::arm_trial): priority above the other slot, tries 1,
//!   successful 0 (the other slot keeps its fields: it is what boots after the trial);
//! - [`commit`](BootControl::commit): successful 1, tries 0, priority 2; the other slot,
//!   if bootable, gets priority 1 as the fallback (0 if not).
//!
//! Only those bits of the two slot entries change; every other byte of the table is
//! kept. Each write rewrites the entry array and header CRC32s of both copies of the
//! table, the backup (entries before the last LBA, header at the last LBA) first, then
//! the primary (header at LBA 1, entries after it), with an fsync after each copy, so
//! that at every instant at least one copy is valid. A reader whose primary copy is
//! damaged uses the backup, as the firmware does, and says so (a `tracing` warning and
//! [`GptBoot::problems`]); the next write repairs the damaged copy.
//!
//! Sectors of 512 and 4096 bytes are recognised (the first that holds a valid header).

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BootControl, BootError, BootState, RebootKind, Slot};

const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The smallest header the spec allows (UEFI 2.x: 92 bytes).
const MIN_HEADER: usize = 92;
/// Entry arrays larger than this are refused (the usual one is 16 KiB).
const MAX_ENTRIES_BYTES: usize = 4 << 20;

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_SHIFT: u32 = 56;
/// The bits this backend owns: priority, tries, successful.
const CAIRN_MASK: u64 = 0x1ff << PRIORITY_SHIFT;

/// A GPT partition GUID, as the 16 bytes stored on disk (the first three fields little
/// endian), shown and parsed in the usual text form (`24FDAF0D-3F9E-4298-AB44-...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Guid(pub [u8; 16]);

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

/// Which partition holds a slot.
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

/// The three fields of one slot's attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SlotAttrs {
    pub priority: u8,
    pub tries: u8,
    pub successful: bool,
}

impl SlotAttrs {
    fn from_attributes(a: u64) -> Self {
        Self {
            priority: ((a >> PRIORITY_SHIFT) & 0xf) as u8,
            tries: ((a >> TRIES_SHIFT) & 0xf) as u8,
            successful: (a >> SUCCESSFUL_SHIFT) & 1 == 1,
        }
    }

    /// `a` with this backend's bits replaced, every other bit kept.
    fn apply(self, a: u64) -> u64 {
        (a & !CAIRN_MASK)
            | (u64::from(self.priority & 0xf) << PRIORITY_SHIFT)
            | (u64::from(self.tries & 0xf) << TRIES_SHIFT)
            | (u64::from(self.successful) << SUCCESSFUL_SHIFT)
    }

    /// Whether the boot loader may pick this slot.
    pub fn bootable(self) -> bool {
        self.priority > 0 && (self.successful || self.tries > 0)
    }

    const UNBOOTABLE: SlotAttrs = SlotAttrs {
        priority: 0,
        tries: 0,
        successful: false,
    };
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

/// The disk, opened, with its length in bytes.
struct Disk<'a> {
    path: &'a Path,
    file: File,
    len: u64,
}

impl<'a> Disk<'a> {
    fn open(path: &'a Path, write: bool) -> Result<Self, BootError> {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(write)
            .open(path)
            .map_err(BootError::io("opening", path))?;
        // Seeking to the end gives the size of block devices too.
        let len = file
            .seek(SeekFrom::End(0))
            .map_err(BootError::io("measuring", path))?;
        Ok(Self { path, file, len })
    }

    fn read(&self, at: u64, n: usize) -> Result<Vec<u8>, String> {
        if at.checked_add(n as u64).is_none_or(|end| end > self.len) {
            return Err(format!(
                "{n} bytes at offset {at} are past the end of the disk ({} bytes)",
                self.len
            ));
        }
        let mut buf = vec![0u8; n];
        self.file
            .read_exact_at(&mut buf, at)
            .map_err(|e| format!("reading {n} bytes at offset {at}: {e}"))?;
        Ok(buf)
    }

    fn write(&self, at: u64, bytes: &[u8]) -> Result<(), BootError> {
        self.file
            .write_all_at(bytes, at)
            .map_err(BootError::io("writing", self.path))
    }

    fn sync(&self) -> Result<(), BootError> {
        self.file
            .sync_all()
            .map_err(BootError::io("syncing", self.path))
    }
}

/// Reads and checks the header at `lba` and its entry array. `primary` says which
/// copy it should be (for the self-reference checks).
fn read_copy(
    disk: &Disk<'_>,
    ss: u64,
    lba: u64,
    primary: bool,
) -> Result<(Header, Vec<u8>), String> {
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
        return Err(format!("header says it is at LBA {}", h.my_lba));
    }
    if h.entry_size < 128 || !h.entry_size.is_multiple_of(8) || h.num_entries == 0 {
        return Err(format!(
            "bad entry array shape ({} entries of {} bytes)",
            h.num_entries, h.entry_size
        ));
    }
    let n = h.entries_bytes();
    if n > MAX_ENTRIES_BYTES {
        return Err(format!("entry array of {n} bytes is too large"));
    }
    let sectors = (n as u64).div_ceil(ss);
    if h.first_usable > h.last_usable || h.last_usable >= last_lba {
        return Err(format!(
            "usable LBAs {}..={} do not fit the disk (last LBA {last_lba})",
            h.first_usable, h.last_usable
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

/// Both copies of the table as read, and which one is in force.
struct Table {
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
    fn read(disk: &Disk<'_>) -> Result<Table, BootError> {
        let path = disk.path;
        let mut failures = Vec::new();
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
                    "primary points to a backup at LBA {backup_lba}, outside the disk"
                ))
            };
            let mut problems = Vec::new();
            let (entries, primary, backup) = match (primary, backup) {
                (Ok((p, pe)), Ok((b, be))) => {
                    if pe != be || p.num_entries != b.num_entries {
                        problems.push(format!(
                            "{}: the backup GPT differs from the primary (an interrupted update?); using the primary",
                            path.display()
                        ));
                    }
                    (pe, Some(p), Some(b))
                }
                (Ok((p, pe)), Err(e)) => {
                    problems.push(format!(
                        "{}: backup GPT header at LBA {backup_lba} is invalid: {e}; using the primary",
                        path.display()
                    ));
                    (pe, Some(p), None)
                }
                (Err(e), Ok((b, be))) => {
                    problems.push(format!(
                        "{}: primary GPT header at LBA 1 is invalid: {e}; using the backup at LBA {backup_lba}",
                        path.display()
                    ));
                    (be, None, Some(b))
                }
                (Err(pe), Err(be)) => {
                    failures.push(format!(
                        "{ss}-byte sectors: primary at LBA 1: {pe}; backup at LBA {backup_lba}: {be}"
                    ));
                    continue;
                }
            };
            for p in &problems {
                tracing::warn!("{p}");
            }
            return Ok(Table {
                ss,
                last_lba,
                primary,
                backup,
                entries,
                problems,
            });
        }
        Err(BootError::format(
            path,
            format!("no valid GPT ({})", failures.join("; ")),
        ))
    }

    /// The header in force (primary if valid, else backup).
    fn header(&self) -> Option<&Header> {
        self.primary.as_ref().or(self.backup.as_ref())
    }

    fn entry_size(&self) -> usize {
        self.header().map_or(128, |h| h.entry_size as usize)
    }

    fn entry(&self, i: usize) -> Option<&[u8]> {
        let es = self.entry_size();
        self.entries.get(i * es..(i + 1) * es)
    }

    fn used(e: &[u8]) -> bool {
        e[..16].iter().any(|&b| b != 0)
    }

    /// The index in the entry array of the partition `r` names.
    fn find(&self, path: &Path, r: &PartRef) -> Result<usize, BootError> {
        let n = self.entries.len() / self.entry_size();
        let found: Vec<usize> = (0..n)
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
            [] => Err(BootError::format(path, format!("no {r} in the GPT"))),
            _ => Err(BootError::format(
                path,
                format!("{r}: {} partitions match", found.len()),
            )),
        }
    }

    fn attrs(&self, i: usize) -> SlotAttrs {
        SlotAttrs::from_attributes(self.entry(i).map_or(0, |e| le_u64(e, 48)))
    }

    fn set_attrs(&mut self, i: usize, a: SlotAttrs) {
        let es = self.entry_size();
        if let Some(e) = self.entries.get_mut(i * es..(i + 1) * es) {
            let v = a.apply(le_u64(e, 48));
            put_u64(e, 48, v);
        }
    }

    /// Writes the entry array in force to both copies (backup first), each with fresh
    /// CRCs, fsyncing after each. A damaged copy is rebuilt from the valid one.
    fn write(&self, disk: &Disk<'_>) -> Result<(), BootError> {
        let path = disk.path;
        let ss = self.ss;
        let src = self
            .header()
            .ok_or_else(|| BootError::format(path, "no valid GPT header to write from"))?;
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
                    return Err(BootError::format(
                        path,
                        "cannot rebuild the backup GPT: no room between the usable area and the last LBA",
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
                    return Err(BootError::format(
                        path,
                        "cannot rebuild the primary GPT: no room for the entry array before the first usable LBA",
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

/// One used entry of a GPT, as [`partitions`] lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionInfo {
    /// 1-based, as the kernel numbers it (`sda3`).
    pub number: u32,
    pub name: String,
    /// Where it starts and how long it is, in bytes.
    pub offset: u64,
    pub len: u64,
}

/// The used partitions of the GPT on `disk` (a disk or an image file), read-only,
/// with the same checks as the boot control (CRCs, shape; the backup if the primary
/// is damaged).
pub fn partitions(disk: &Path) -> Result<Vec<PartitionInfo>, BootError> {
    let d = Disk::open(disk, false)?;
    let t = Table::read(&d)?;
    let n = t.entries.len() / t.entry_size();
    let mut out = Vec::new();
    for i in 0..n {
        let Some(e) = t.entry(i).filter(|e| Table::used(e)) else {
            continue;
        };
        let (first, last) = (le_u64(e, 32), le_u64(e, 40));
        let usable = t
            .header()
            .map_or(0..=t.last_lba, |h| h.first_usable..=h.last_usable);
        if last < first || !usable.contains(&first) || !usable.contains(&last) {
            return Err(BootError::format(
                disk,
                format!(
                    "partition {} spans LBAs {first}..={last}, outside the usable LBAs {}..={} (a damaged table?)",
                    i + 1,
                    usable.start(),
                    usable.end()
                ),
            ));
        }
        // Within the disk, so these cannot overflow.
        out.push(PartitionInfo {
            number: i as u32 + 1,
            name: entry_name(e),
            offset: first * t.ss,
            len: (last - first + 1) * t.ss,
        });
    }
    Ok(out)
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

/// Boot control through the GPT attributes of two partitions of `disk`.
#[derive(Debug, Clone)]
pub struct GptBoot {
    disk: PathBuf,
    slots: [PartRef; 2],
}

/// The table as read, with the indexes of the slot entries.
struct Loaded<'a> {
    disk: Disk<'a>,
    table: Table,
    idx: [usize; 2],
}

impl Loaded<'_> {
    fn attrs(&self) -> [SlotAttrs; 2] {
        [self.table.attrs(self.idx[0]), self.table.attrs(self.idx[1])]
    }

    /// Writes `new` if it differs from what is on disk or a copy needs repair.
    fn store(&mut self, new: [SlotAttrs; 2]) -> Result<(), BootError> {
        if new == self.attrs() && self.table.problems.is_empty() {
            return Ok(());
        }
        for (i, a) in new.into_iter().enumerate() {
            self.table.set_attrs(self.idx[i], a);
        }
        self.table.write(&self.disk)
    }

    /// The slot the boot loader picks, or `None` when neither is bootable.
    fn pick(&self) -> Option<Slot> {
        let [a, b] = self.attrs();
        match (a.bootable(), b.bootable()) {
            (false, false) => None,
            (true, false) => Some(Slot::A),
            (false, true) => Some(Slot::B),
            // Equal priorities: the entry earlier in the array wins.
            (true, true) => Some(if (a.priority, self.idx[1]) >= (b.priority, self.idx[0]) {
                Slot::A
            } else {
                Slot::B
            }),
        }
    }
}

impl GptBoot {
    /// Boot control over `disk`, slot A in partition `a` and slot B in `b`. Reads the
    /// table to check that both partitions exist and are distinct; writes nothing.
    pub fn open(disk: impl Into<PathBuf>, a: PartRef, b: PartRef) -> Result<Self, BootError> {
        let me = Self {
            disk: disk.into(),
            slots: [a, b],
        };
        me.load(false)?;
        Ok(me)
    }

    /// The disk (or image file).
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    fn load(&self, write: bool) -> Result<Loaded<'_>, BootError> {
        let disk = Disk::open(&self.disk, write)?;
        let table = Table::read(&disk)?;
        let idx = [
            table.find(&self.disk, &self.slots[0])?,
            table.find(&self.disk, &self.slots[1])?,
        ];
        if idx[0] == idx[1] {
            return Err(BootError::Invalid(format!(
                "{}: slots A and B are the same partition ({})",
                self.disk.display(),
                idx[0] + 1
            )));
        }
        Ok(Loaded { disk, table, idx })
    }

    /// The attribute fields of both slots (index 0 = A), as the boot loader reads them.
    pub fn attrs(&self) -> Result<[SlotAttrs; 2], BootError> {
        Ok(self.load(false)?.attrs())
    }

    /// What is wrong with the table on disk (a damaged copy, copies that disagree);
    /// empty when both copies are valid and equal.
    pub fn problems(&self) -> Result<Vec<String>, BootError> {
        Ok(self.load(false)?.table.problems)
    }

    fn refuse_last(&self, what: &str, slot: Slot, attrs: [SlotAttrs; 2]) -> Result<(), BootError> {
        if attrs[slot.index()].bootable() && !attrs[(!slot).index()].bootable() {
            return Err(BootError::Invalid(format!(
                "refusing to {what} slot {slot} on {}: slot {} is not bootable",
                self.disk.display(),
                !slot
            )));
        }
        Ok(())
    }
}

impl BootControl for GptBoot {
    fn name(&self) -> &'static str {
        "gpt"
    }

    fn state(&self) -> Result<BootState, BootError> {
        let l = self.load(false)?;
        let attrs = l.attrs();
        let bootable = [attrs[0].bootable(), attrs[1].bootable()];
        let (default, trial) = match l.pick() {
            None => (Slot::A, None),
            Some(top) if attrs[top.index()].successful => (top, None),
            // The top slot is on trial: after it, the other boots if it can.
            Some(top) if bootable[(!top).index()] => (!top, Some(top)),
            Some(top) => (top, Some(top)),
        };
        Ok(BootState {
            default,
            trial,
            bootable,
        })
    }

    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError> {
        let mut l = self.load(true)?;
        let mut attrs = l.attrs();
        self.refuse_last("make unbootable", slot, attrs)?;
        attrs[slot.index()] = SlotAttrs::UNBOOTABLE;
        l.store(attrs)
    }

    fn arm_trial(&mut self, slot: Slot) -> Result<RebootKind, BootError> {
        let mut l = self.load(true)?;
        let mut attrs = l.attrs();
        let other = attrs[(!slot).index()].priority;
        let me = &mut attrs[slot.index()];
        if me.priority <= other {
            if other >= 15 {
                attrs[(!slot).index()].priority = 14;
                attrs[slot.index()].priority = 15;
            } else {
                me.priority = other + 1;
            }
        }
        let me = &mut attrs[slot.index()];
        me.tries = 1;
        me.successful = false;
        l.store(attrs)?;
        Ok(RebootKind::Normal)
    }

    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        let mut l = self.load(true)?;
        let mut attrs = l.attrs();
        attrs[slot.index()] = SlotAttrs {
            priority: 2,
            tries: 0,
            successful: true,
        };
        let other = &mut attrs[(!slot).index()];
        other.priority = if other.bootable() { 1 } else { 0 };
        l.store(attrs)
    }

    fn reject(&mut self, slot: Slot) -> Result<(), BootError> {
        let mut l = self.load(true)?;
        let mut attrs = l.attrs();
        self.refuse_last("reject", slot, attrs)?;
        attrs[slot.index()] = SlotAttrs::UNBOOTABLE;
        l.store(attrs)
    }
}

/// Plays the ChromeOS-style boot loader once on `disk` (slot A in partition `a`, B in
/// `b`): picks the bootable slot with the highest priority, decrements its tries on
/// disk if it is not yet successful, and returns it. Fails when no slot is bootable.
pub fn firmware_boot(disk: &Path, a: &PartRef, b: &PartRef) -> Result<Slot, BootError> {
    let gb = GptBoot {
        disk: disk.to_path_buf(),
        slots: [a.clone(), b.clone()],
    };
    let mut l = gb.load(true)?;
    let slot = l.pick().ok_or_else(|| {
        BootError::Invalid(format!("no bootable slot in the GPT of {}", disk.display()))
    })?;
    let mut attrs = l.attrs();
    let s = &mut attrs[slot.index()];
    if !s.successful {
        s.tries = s.tries.saturating_sub(1);
        l.store(attrs)?;
    }
    Ok(slot)
}

#[cfg(test)]
mod tests {
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
    }

    #[test]
    fn attribute_bits_are_where_cgpt_puts_them() {
        let a = SlotAttrs {
            priority: 15,
            tries: 1,
            successful: true,
        };
        let other_bits = 0x8000_0000_0000_0001u64 | (1 << 60);
        let v = a.apply(other_bits);
        assert_eq!(v, other_bits | 0x011f_0000_0000_0000);
        assert_eq!(SlotAttrs::from_attributes(v), a);
        assert_eq!(SlotAttrs::UNBOOTABLE.apply(v), other_bits);
    }

    #[test]
    fn a_file_with_no_gpt_is_a_clear_error() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("blank.img");
        std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
        let e = GptBoot::open(&p, PartRef::Number(2), PartRef::Number(3))
            .unwrap_err()
            .to_string();
        assert!(e.contains(&*p.to_string_lossy()), "{e}");
        assert!(e.contains("no valid GPT"), "{e}");
        let tiny = d.path().join("tiny.img");
        std::fs::write(&tiny, b"x").unwrap();
        assert!(GptBoot::open(&tiny, PartRef::Number(2), PartRef::Number(3)).is_err());
    }
}
