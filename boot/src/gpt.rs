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
//! The table itself is read, checked and written by `cairn_disk::gpt`, the reader
//! `cairn-hub image` uses too; this module owns the three attribute fields and the
//! boot loader's choice.

use std::path::{Path, PathBuf};

use cairn_disk::gpt::{Disk, GptError, Table};
pub use cairn_disk::gpt::{Guid, PartRef, Partition};

use super::{BootControl, BootError, BootState, RebootKind, Slot};

const PRIORITY_SHIFT: u32 = 48;
const TRIES_SHIFT: u32 = 52;
const SUCCESSFUL_SHIFT: u32 = 56;
/// The bits this backend owns: priority, tries, successful.
const CAIRN_MASK: u64 = 0x1ff << PRIORITY_SHIFT;

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

/// A table error as a boot-control error about `path`.
fn gpt_error(path: &Path) -> impl FnOnce(GptError) -> BootError + '_ {
    move |e| match e {
        GptError::Io { what, source } => BootError::Io {
            op: what,
            path: path.to_path_buf(),
            source,
        },
        e => BootError::format(path, e.to_string()),
    }
}

/// The used partitions of the GPT on `disk` (a disk or an image file), read-only,
/// with the same checks as the boot control (CRCs, shape; the backup if the primary
/// is damaged).
pub fn partitions(disk: &Path) -> Result<Vec<Partition>, BootError> {
    cairn_disk::gpt::partitions(disk).map_err(gpt_error(disk))
}

/// Boot control through the GPT attributes of two partitions of `disk`.
#[derive(Debug, Clone)]
pub struct GptBoot {
    disk: PathBuf,
    slots: [PartRef; 2],
}

/// The table as read, with the indexes of the slot entries.
struct Loaded {
    disk: Disk,
    table: Table,
    idx: [usize; 2],
}

impl Loaded {
    fn attrs(&self) -> [SlotAttrs; 2] {
        self.idx
            .map(|i| SlotAttrs::from_attributes(self.table.attributes(i)))
    }

    /// Writes `new` if it differs from what is on disk or a copy needs repair.
    fn store(&mut self, new: [SlotAttrs; 2]) -> Result<(), BootError> {
        if new == self.attrs() && self.table.problems().is_empty() {
            return Ok(());
        }
        for (i, a) in new.into_iter().enumerate() {
            let bits = a.apply(self.table.attributes(self.idx[i]));
            self.table.set_attributes(self.idx[i], bits);
        }
        self.table
            .write(&self.disk)
            .map_err(gpt_error(self.disk.path()))
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

    fn load(&self, write: bool) -> Result<Loaded, BootError> {
        let disk = Disk::open(&self.disk, write).map_err(BootError::io("opening", &self.disk))?;
        let table = Table::read(&disk).map_err(gpt_error(&self.disk))?;
        for p in table.problems() {
            tracing::warn!("{}: {p}", self.disk.display());
        }
        let find = |r| table.find(r).map_err(gpt_error(&self.disk));
        let idx = [find(&self.slots[0])?, find(&self.slots[1])?];
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
        Ok(self.load(false)?.table.problems().to_vec())
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
