//! Boot control: how the upgrade engine tells the boot loader which slot to boot. Its
//! own crate, so that image builders and rigs use the backends and boot-loader models
//! without the rest of the agent (`cairn_agent::upgrade::boot` re-exports it).
//!
//! Every backend implements [`BootControl`]. The engine calls, in this order and each
//! only after the previous step is durable in its own database:
//! 1. [`mark_unbootable`](BootControl::mark_unbootable) on the inactive slot, *before*
//!    a single byte of it is overwritten, so that no boot loader ever picks a
//!    half-written slot;
//! 2. [`arm_trial`](BootControl::arm_trial) once the slot is written and verified: the
//!    boot loader boots it **once**; the slot that runs now stays the default, so any
//!    failure of the trial boot (kernel panic, hang + watchdog, power cut) comes back
//!    to it by itself;
//! 3. after a healthy trial, [`commit`](BootControl::commit) makes the booted slot the
//!    default; after a failed one, [`reject`](BootControl::reject) makes sure the
//!    trial slot is not tried again.
//!
//! Every method is idempotent (the engine repeats a step after a crash) and leaves the
//! on-disk state valid at every instant (write a copy, fsync, rename; or a redundant
//! copy with a generation counter). [`BootControl::state`] reads what the boot loader
//! will see, without changing it.
//!
//! Which slot is running is not the backend's business: the boot loader tells the
//! kernel (`cairn.slot=a|b` on the command line; see [`booted_from_cmdline`]), and the
//! simulation's firmware writes it to a file.

use std::path::{Path, PathBuf};

pub use cairn_sync_protocol::release::Slot;

pub mod crashpoint;
pub mod efiboot;
pub mod file;
pub mod gpt;
pub mod sdboot;
pub mod tryboot;
pub mod uboot;

/// What the boot loader will do, as a backend reads it from disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootState {
    /// The slot booted when no trial is pending (or after a trial fails).
    pub default: Slot,
    /// A slot armed for one trial boot and not yet tried, if any.
    pub trial: Option<Slot>,
    /// Whether each slot (index 0 = A) may be booted at all.
    pub bootable: [bool; 2],
}

/// How to reboot so that the boot loader honours an armed trial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RebootKind {
    /// An ordinary reboot.
    Normal,
    /// Raspberry Pi: `reboot "0 tryboot"` (the firmware reads `[tryboot]` once).
    Tryboot,
}

/// Why a boot-control operation failed. Messages name the file or device.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Format { path: PathBuf, what: String },
    #[error("{0}")]
    Invalid(String),
}

impl BootError {
    pub fn io<'a>(
        op: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> BootError + 'a {
        move |source| BootError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }

    pub fn format(path: &Path, what: impl Into<String>) -> BootError {
        BootError::Format {
            path: path.to_path_buf(),
            what: what.into(),
        }
    }
}

/// A boot loader's A/B switch.
pub trait BootControl: Send {
    /// Short name for logs and status (`file`, `gpt`, `systemd-boot`, `tryboot`, `uboot`).
    fn name(&self) -> &'static str;

    /// What the boot loader will see on the next boot.
    fn state(&self) -> Result<BootState, BootError>;

    /// Makes `slot` unbootable (not the default, not armed). Called before writing it.
    /// Refuses to mark the default slot when the other one is not bootable.
    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError>;

    /// Arms one trial boot of `slot`; the default stays as it is.
    fn arm_trial(&mut self, slot: Slot) -> Result<RebootKind, BootError>;

    /// `slot` (booted on trial and healthy) becomes the default. The other slot stays
    /// bootable as the fallback.
    fn commit(&mut self, slot: Slot) -> Result<(), BootError>;

    /// `slot` failed its trial: it is never tried again until re-armed, and the other
    /// slot boots.
    fn reject(&mut self, slot: Slot) -> Result<(), BootError>;
}

/// The slot named by `cairn.slot=a|b` on a kernel command line (`/proc/cmdline`).
pub fn booted_from_cmdline(cmdline: &str) -> Option<Slot> {
    cmdline
        .split_ascii_whitespace()
        .find_map(|w| w.strip_prefix("cairn.slot="))
        .and_then(Slot::parse)
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory,
/// fsynced, renamed over `path` with [`rename_durable`].
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), BootError> {
    use std::io::Write;
    path.parent()
        .ok_or_else(|| BootError::Invalid(format!("{} has no parent", path.display())))?;
    let tmp = path.with_extension("cairn-tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(BootError::io("creating", &tmp))?;
        f.write_all(bytes).map_err(BootError::io("writing", &tmp))?;
        f.sync_all().map_err(BootError::io("syncing", &tmp))?;
    }
    crashpoint::hit("boot state: before rename");
    rename_durable(&tmp, path)?;
    crashpoint::hit("boot state: after rename");
    Ok(())
}

/// Renames `from` to `to` (in one directory) and makes the rename durable, on FAT too.
///
/// On FAT, Linux writes a renamed file's new directory entry in two steps: the name at
/// once, the start cluster and size later with the file's inode. Fsyncing only the
/// directory can therefore persist the new name, the removed old entry and, when a
/// file was replaced, the freeing of its clusters, but not where the new entry points:
/// after a power cut the file names a free cluster (the virtual Pi hit this with
/// `autoboot.txt`; `fsck.vfat` then truncates it to nothing). So the renamed file is
/// fsynced first, which writes its entry, then the directory.
pub fn rename_durable(from: &Path, to: &Path) -> Result<(), BootError> {
    let dir = to
        .parent()
        .ok_or_else(|| BootError::Invalid(format!("{} has no parent", to.display())))?;
    std::fs::rename(from, to).map_err(BootError::io("renaming into place", to))?;
    std::fs::File::open(to)
        .and_then(|f| f.sync_all())
        .map_err(BootError::io("syncing", to))?;
    sync_dir(dir)
}

/// fsyncs a directory (so that a rename in it is durable).
pub fn sync_dir(dir: &Path) -> Result<(), BootError> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(BootError::io("syncing directory", dir))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_names_the_slot() {
        assert_eq!(
            booted_from_cmdline("root=PARTUUID=x ro cairn.slot=b quiet"),
            Some(Slot::B)
        );
        assert_eq!(booted_from_cmdline("cairn.slot=a"), Some(Slot::A));
        assert_eq!(booted_from_cmdline("cairn.slot=c"), None);
        assert_eq!(booted_from_cmdline("ro quiet"), None);
        assert_eq!(!Slot::A, Slot::B);
    }
}
