//! File-backed boot control, for the fleet simulation and tests: the boot loader's
//! state is one JSON file (`boot.json`), written atomically, and [`firmware_boot`]
//! plays the boot loader: it consumes a trial, picks the slot and records it in
//! `booted`, which the agent reads as its running slot.
//!
//! The boot loader modelled is the common one (systemd-boot boot counting, ChromeOS
//! GPT priorities, Pi tryboot): an armed trial is tried once; a trial that was tried
//! and not committed is never tried again, the default boots.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{BootControl, BootError, BootState, RebootKind, Slot, write_atomic};

/// The on-disk state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct OnDisk {
    default: Slot,
    /// Armed slot and the boots it may still be tried.
    trial: Option<(Slot, u8)>,
    bootable: [bool; 2],
}

/// Boot control over `DIR/boot.json`.
#[derive(Debug, Clone)]
pub struct FileBoot {
    dir: PathBuf,
}

impl FileBoot {
    /// Opens (and on first use creates, booting slot A) the boot state in `dir`.
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, BootError> {
        let dir = dir.into();
        std::fs::create_dir_all(&dir).map_err(BootError::io("creating", &dir))?;
        let me = Self { dir };
        if !me.state_path().exists() {
            me.write(&OnDisk {
                default: Slot::A,
                trial: None,
                bootable: [true, false],
            })?;
        }
        Ok(me)
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("boot.json")
    }

    /// Where [`firmware_boot`] records the slot it booted.
    pub fn booted_path(dir: &Path) -> PathBuf {
        dir.join("booted")
    }

    fn read(&self) -> Result<OnDisk, BootError> {
        let p = self.state_path();
        let bytes = std::fs::read(&p).map_err(BootError::io("reading", &p))?;
        serde_json::from_slice(&bytes).map_err(|e| BootError::format(&p, e.to_string()))
    }

    fn write(&self, s: &OnDisk) -> Result<(), BootError> {
        let bytes = serde_json::to_vec(s).map_err(|e| BootError::Invalid(e.to_string()))?;
        write_atomic(&self.state_path(), &bytes)
    }

    /// The slot the simulated firmware booted last.
    pub fn booted(&self) -> Result<Slot, BootError> {
        let p = Self::booted_path(&self.dir);
        let s = std::fs::read_to_string(&p).map_err(BootError::io("reading", &p))?;
        Slot::parse(s.trim()).ok_or_else(|| BootError::format(&p, format!("not a slot: {s:?}")))
    }
}

impl BootControl for FileBoot {
    fn name(&self) -> &'static str {
        "file"
    }

    fn state(&self) -> Result<BootState, BootError> {
        let s = self.read()?;
        Ok(BootState {
            default: s.default,
            trial: s.trial.filter(|t| t.1 > 0).map(|t| t.0),
            bootable: s.bootable,
        })
    }

    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError> {
        let mut s = self.read()?;
        if s.default == slot {
            if !s.bootable[(!slot).index()] {
                return Err(BootError::Invalid(format!(
                    "refusing to make slot {slot} unbootable: it is the default and slot {} is not bootable",
                    !slot
                )));
            }
            s.default = !slot;
        }
        if s.trial.is_some_and(|t| t.0 == slot) {
            s.trial = None;
        }
        if !s.bootable[slot.index()] && s.trial.is_none() {
            return Ok(());
        }
        s.bootable[slot.index()] = false;
        self.write(&s)
    }

    fn arm_trial(&mut self, slot: Slot) -> Result<RebootKind, BootError> {
        let mut s = self.read()?;
        s.bootable[slot.index()] = true;
        s.trial = Some((slot, 1));
        self.write(&s)?;
        Ok(RebootKind::Normal)
    }

    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        let mut s = self.read()?;
        let new = OnDisk {
            default: slot,
            trial: None,
            bootable: {
                let mut b = s.bootable;
                b[slot.index()] = true;
                b
            },
        };
        if new == s {
            return Ok(());
        }
        s = new;
        self.write(&s)
    }

    fn reject(&mut self, slot: Slot) -> Result<(), BootError> {
        let mut s = self.read()?;
        if s.default == slot {
            if !s.bootable[(!slot).index()] {
                return Err(BootError::Invalid(format!(
                    "refusing to reject slot {slot}: it is the default and slot {} is not bootable",
                    !slot
                )));
            }
            s.default = !slot;
        }
        s.trial = None;
        s.bootable[slot.index()] = false;
        self.write(&s)
    }
}

/// Plays the boot loader once: consumes an armed trial, picks the slot, records it in
/// `DIR/booted`, and returns it. Fails when no slot is bootable.
pub fn firmware_boot(dir: &Path) -> Result<Slot, BootError> {
    let fb = FileBoot::open(dir)?;
    let mut s = fb.read()?;
    let slot = match s.trial {
        Some((t, n)) if n > 0 && s.bootable[t.index()] => {
            s.trial = Some((t, n - 1));
            fb.write(&s)?;
            t
        }
        _ if s.bootable[s.default.index()] => s.default,
        _ if s.bootable[(!s.default).index()] => !s.default,
        _ => {
            return Err(BootError::Invalid(format!(
                "no bootable slot in {}",
                fb.state_path().display()
            )));
        }
    };
    write_atomic(&FileBoot::booted_path(dir), slot.as_str().as_bytes())?;
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trial_is_tried_once_then_falls_back() {
        let d = tempfile::tempdir().unwrap();
        let mut b = FileBoot::open(d.path()).unwrap();
        assert_eq!(firmware_boot(d.path()).unwrap(), Slot::A);
        b.mark_unbootable(Slot::B).unwrap();
        assert_eq!(firmware_boot(d.path()).unwrap(), Slot::A);
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(b.state().unwrap().trial, Some(Slot::B));
        assert_eq!(firmware_boot(d.path()).unwrap(), Slot::B);
        assert_eq!(b.booted().unwrap(), Slot::B);
        // Not committed (crash, panic): the next boot is the old default.
        assert_eq!(firmware_boot(d.path()).unwrap(), Slot::A);
        assert_eq!(firmware_boot(d.path()).unwrap(), Slot::A);
    }

    #[test]
    fn commit_makes_the_trial_the_default_and_keeps_the_fallback() {
        let d = tempfile::tempdir().unwrap();
        let mut b = FileBoot::open(d.path()).unwrap();
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(firmware_boot(d.path()).unwrap(), Slot::B);
        b.commit(Slot::B).unwrap();
        b.commit(Slot::B).unwrap();
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, None, [true, true])
        );
        assert_eq!(firmware_boot(d.path()).unwrap(), Slot::B);
        // Writing A now: A must not be picked while it is half-written.
        b.mark_unbootable(Slot::A).unwrap();
        assert_eq!(b.state().unwrap().bootable, [false, true]);
        assert!(b.mark_unbootable(Slot::B).is_err(), "last bootable slot");
        b.reject(Slot::A).unwrap();
        assert_eq!(firmware_boot(d.path()).unwrap(), Slot::B);
    }
}
