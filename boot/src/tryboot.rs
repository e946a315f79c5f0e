//! Raspberry Pi 4/5 `tryboot` A/B boot control.
//!
//! The Pi boot partition (partition 1, FAT, mounted, e.g. `/boot/firmware`) holds
//! `autoboot.txt`, which the EEPROM boot loader reads before anything else:
//!
//! ```text
//! [all]
//! tryboot_a_b=1
//! boot_partition=2
//! [tryboot]
//! boot_partition=3
//! ```
//!
//! `boot_partition` in `[all]` is the partition booted normally: the committed slot.
//! The `[tryboot]` section is applied only when the reboot was `reboot "0 tryboot"`;
//! the firmware clears that flag as it boots, so the trial is one-shot by itself: a
//! trial that panics or hangs (watchdog) comes back to the `[all]` partition. As in
//! `config.txt`, a later assignment wins, and `[all]` lines apply on a tryboot too, so
//! the backend checks with the same evaluation [`firmware_boot`] uses and, if a
//! user's layout would shadow a value, appends an `[all]` + `[tryboot]` pair at the
//! end.
//!
//! The scheme (every change is **one** atomic rewrite of `autoboot.txt`: temp file,
//! fsync, rename, fsync of the directory):
//! - [`arm_trial`](BootControl::arm_trial): `[tryboot] boot_partition=<slot>`, returns
//!   [`RebootKind::Tryboot`]. The file keeps saying so after the trial; "armed" on a Pi
//!   means "a tryboot reboot would boot it", the one-shot lives in the reboot flag.
//! - [`commit`](BootControl::commit): `[all]` *and* `[tryboot]` name the slot. The
//!   tryboot section names the committed slot rather than the old one so that a stray
//!   `reboot "0 tryboot"` (say, repeated by the engine after a crash) cannot boot the
//!   old slot once unasked; the old slot stays intact and bootable as the fallback.
//! - [`mark_unbootable`](BootControl::mark_unbootable) / [`reject`](BootControl::reject):
//!   neither section names the slot (tryboot points at the default) before a byte of
//!   it is written.
//!
//! The firmware has no "bad partition" flag, so which slots are bootable is recorded
//! in a comment line, `#cairn-unbootable=a`, which the firmware ignores; it only feeds
//! [`BootState::bootable`] and the refusal to mark the last bootable slot.
//!
//! A crash at any point leaves either the old or the new `autoboot.txt` (plus maybe a
//! stale `autoboot.cairn-tmp`, which the firmware never reads), both of which boot a
//! good slot. FAT has no journal: a power cut in the middle of the rename itself is
//! left to `fsck.vfat`; that window is the same for every tool on this platform.
//!
//! Unknown lines and sections the user added (`[pi5]`, comments, other properties)
//! are kept as they are. `boot_partition` inside a section other than `[all]`,
//! `[tryboot]` or `[none]` is refused: its effect depends on the board and cannot be
//! checked. Malformed lines are an error naming the file and the line.
//!
//! On a booted Pi the firmware reports the boot in the device tree:
//! `/proc/device-tree/chosen/bootloader/tryboot` and `.../partition`, each a 4-byte
//! big-endian integer; see [`booted_on_trial`] and [`booted_partition`].

use std::path::{Path, PathBuf};

use super::{BootControl, BootError, BootState, RebootKind, Slot, write_atomic};

/// The file name on the boot partition.
pub const AUTOBOOT: &str = "autoboot.txt";
/// Where the firmware reports the boot on a running Pi.
pub const DT_BOOTLOADER: &str = "/proc/device-tree/chosen/bootloader";

const MAX_LEN: usize = 64 * 1024;
const MARK: &str = "#cairn-unbootable=";

/// Boot control over `DIR/autoboot.txt`.
#[derive(Debug, Clone)]
pub struct TryBoot {
    dir: PathBuf,
    /// Boot partition number of slot A and of slot B.
    partitions: [u8; 2],
}

impl TryBoot {
    /// Boot control over `dir` (the mounted boot partition), with slot A on partition
    /// `partitions[0]` and slot B on `partitions[1]`. When `autoboot.txt` does not
    /// exist it is created: slot A is the default, slot B not bootable yet.
    pub fn open(dir: impl Into<PathBuf>, partitions: [u8; 2]) -> Result<Self, BootError> {
        let dir = dir.into();
        if partitions[0] == 0 || partitions[1] == 0 || partitions[0] == partitions[1] {
            return Err(BootError::Invalid(format!(
                "tryboot: slot partitions must be two different non-zero numbers, not {} and {}",
                partitions[0], partitions[1]
            )));
        }
        let me = Self { dir, partitions };
        let p = me.path();
        if !p.exists() {
            let a = partitions[0];
            let text = format!(
                "[all]\ntryboot_a_b=1\nboot_partition={a}\n{MARK}b\n[tryboot]\nboot_partition={a}\n"
            );
            write_atomic(&p, text.as_bytes())?;
        }
        Ok(me)
    }

    /// `DIR/autoboot.txt`.
    pub fn path(&self) -> PathBuf {
        self.dir.join(AUTOBOOT)
    }

    /// The slot on boot partition `partition`, if any.
    pub fn slot_of_partition(&self, partition: u32) -> Option<Slot> {
        [Slot::A, Slot::B]
            .into_iter()
            .find(|s| u32::from(self.partitions[s.index()]) == partition)
    }

    /// The slot the firmware booted, as it reports it under `dt_dir` (use
    /// [`DT_BOOTLOADER`]); `None` when the device tree says nothing (not a Pi, or no
    /// such firmware) or names a partition that is neither slot.
    pub fn booted_slot(&self, dt_dir: &Path) -> Option<Slot> {
        match booted_partition(dt_dir) {
            Ok(p) => self.slot_of_partition(p),
            Err(e) => {
                tracing::debug!(error = %e, "no booted partition in the device tree");
                None
            }
        }
    }

    fn part(&self, slot: Slot) -> u8 {
        self.partitions[slot.index()]
    }

    fn read(&self) -> Result<Autoboot, BootError> {
        Autoboot::read(&self.path())
    }

    /// The slot state as read from `ab`.
    fn decode(&self, ab: &Autoboot) -> Result<BootState, BootError> {
        let e = ab.eval();
        let normal = e
            .normal
            .ok_or_else(|| BootError::format(&ab.path, "no boot_partition in the [all] section"))?;
        let default = self.slot_of_partition(normal.into()).ok_or_else(|| {
            BootError::format(
                &ab.path,
                format!(
                    "boot_partition={normal} is neither slot A ({}) nor slot B ({})",
                    self.partitions[0], self.partitions[1]
                ),
            )
        })?;
        let trial = match (e.a_b, e.tryboot) {
            (true, Some(t)) if t != normal => {
                let s = self.slot_of_partition(t.into()).ok_or_else(|| {
                    BootError::format(
                        &ab.path,
                        format!(
                            "[tryboot] boot_partition={t} is neither slot A ({}) nor slot B ({})",
                            self.partitions[0], self.partitions[1]
                        ),
                    )
                })?;
                Some(s).filter(|s| !e.marks[s.index()])
            }
            _ => None,
        };
        Ok(BootState {
            default,
            trial,
            bootable: [!e.marks[0], !e.marks[1]],
        })
    }

    /// Rewrites the file (only if it changes) so that a normal boot picks `default`, a
    /// tryboot picks `tryboot`, and `marks` are the unbootable slots.
    fn apply(
        &self,
        mut ab: Autoboot,
        default: Slot,
        tryboot: Slot,
        marks: [bool; 2],
    ) -> Result<(), BootError> {
        let before = ab.render();
        ab.set(self.part(default), self.part(tryboot), marks)?;
        let after = ab.render();
        if after == before {
            return Ok(());
        }
        write_atomic(&ab.path, after.as_bytes())
    }

    /// Shared by mark_unbootable and reject: the slot is neither the default nor the
    /// tryboot target, and marked.
    fn disable(&mut self, slot: Slot, what: &str) -> Result<(), BootError> {
        let ab = self.read()?;
        let st = self.decode(&ab)?;
        let mut marks = [!st.bootable[0], !st.bootable[1]];
        let mut default = st.default;
        if default == slot {
            if marks[(!slot).index()] {
                return Err(BootError::Invalid(format!(
                    "refusing to {what} slot {slot}: it is the default in {} and slot {} is not bootable",
                    ab.path.display(),
                    !slot
                )));
            }
            default = !slot;
        }
        marks[slot.index()] = true;
        self.apply(ab, default, default, marks)
    }
}

impl BootControl for TryBoot {
    fn name(&self) -> &'static str {
        "tryboot"
    }

    fn state(&self) -> Result<BootState, BootError> {
        let ab = self.read()?;
        self.decode(&ab)
    }

    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError> {
        self.disable(slot, "make unbootable")
    }

    fn arm_trial(&mut self, slot: Slot) -> Result<RebootKind, BootError> {
        let ab = self.read()?;
        let st = self.decode(&ab)?;
        let mut marks = [!st.bootable[0], !st.bootable[1]];
        marks[slot.index()] = false;
        self.apply(ab, st.default, slot, marks)?;
        Ok(RebootKind::Tryboot)
    }

    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        let ab = self.read()?;
        let st = self.decode(&ab)?;
        let mut marks = [!st.bootable[0], !st.bootable[1]];
        marks[slot.index()] = false;
        self.apply(ab, slot, slot, marks)
    }

    fn reject(&mut self, slot: Slot) -> Result<(), BootError> {
        self.disable(slot, "reject")
    }
}

/// What the Pi firmware boots, as [`firmware_boot`] decides it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PiBoot {
    /// The partition booted (`boot_partition`).
    pub partition: u8,
    /// Whether the reboot carried the tryboot flag (reported in the device tree).
    pub tryboot: bool,
}

/// Plays the Pi firmware once: reads `BOOT_DIR/autoboot.txt` and returns the partition
/// it boots, given whether the reboot was `reboot "0 tryboot"`. The firmware does not
/// write anything back (the tryboot flag lives in the reboot request, not on disk).
/// With `tryboot_a_b` unset a tryboot does not switch partitions (the firmware would
/// read `tryboot.txt` from the normal one instead).
pub fn firmware_boot(boot_dir: &Path, tryboot: bool) -> Result<PiBoot, BootError> {
    let ab = Autoboot::read(&boot_dir.join(AUTOBOOT))?;
    let e = ab.eval();
    let normal = e
        .normal
        .ok_or_else(|| BootError::format(&ab.path, "no boot_partition in the [all] section"))?;
    let partition = match (tryboot && e.a_b, e.tryboot) {
        (true, Some(t)) => t,
        _ => normal,
    };
    Ok(PiBoot { partition, tryboot })
}

/// Writes what the firmware reports about `boot` the way it appears under
/// [`DT_BOOTLOADER`] (`tryboot` and `partition`, 4-byte big-endian), for the
/// simulation and tests.
pub fn write_device_tree(dt_dir: &Path, boot: &PiBoot) -> Result<(), BootError> {
    std::fs::create_dir_all(dt_dir).map_err(BootError::io("creating", dt_dir))?;
    write_atomic(
        &dt_dir.join("tryboot"),
        &u32::from(boot.tryboot).to_be_bytes(),
    )?;
    write_atomic(
        &dt_dir.join("partition"),
        &u32::from(boot.partition).to_be_bytes(),
    )
}

/// A device-tree integer property: exactly 4 bytes, big-endian.
pub fn parse_dt_u32(path: &Path, bytes: &[u8]) -> Result<u32, BootError> {
    let b: [u8; 4] = bytes.try_into().map_err(|_| {
        BootError::format(
            path,
            format!(
                "a device-tree u32 is 4 bytes, this property has {}",
                bytes.len()
            ),
        )
    })?;
    Ok(u32::from_be_bytes(b))
}

fn read_dt_u32(path: &Path) -> Result<u32, BootError> {
    let mut bytes = Vec::new();
    {
        use std::io::Read;
        let f = std::fs::File::open(path).map_err(BootError::io("opening", path))?;
        // Bounded: a property of a handful of bytes; read one more to see it is not longer.
        f.take(16)
            .read_to_end(&mut bytes)
            .map_err(BootError::io("reading", path))?;
    }
    parse_dt_u32(path, &bytes)
}

/// Whether this boot was a tryboot: `DT_DIR/tryboot` (use [`DT_BOOTLOADER`] on a Pi).
pub fn booted_on_trial(dt_dir: &Path) -> Result<bool, BootError> {
    let p = dt_dir.join("tryboot");
    match read_dt_u32(&p)? {
        0 => Ok(false),
        1 => Ok(true),
        n => Err(BootError::format(&p, format!("tryboot is {n}, not 0 or 1"))),
    }
}

/// The partition this boot came from: `DT_DIR/partition`.
pub fn booted_partition(dt_dir: &Path) -> Result<u32, BootError> {
    read_dt_u32(&dt_dir.join("partition"))
}

/// The section a line is in.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Section {
    All,
    Tryboot,
    None,
    Other(String),
}

#[derive(Debug, Clone)]
enum Kind {
    /// Blank, comment, or a property we do not touch.
    Keep,
    Header,
    BootPartition,
    TrybootAB,
    Mark,
}

#[derive(Debug, Clone)]
struct Line {
    raw: String,
    kind: Kind,
    /// The section the line is in (for a header: the one it opens).
    section: Section,
    /// For `BootPartition`/`TrybootAB`: the value; for `Mark`: the slot index.
    value: u8,
}

/// `autoboot.txt`, line by line.
#[derive(Debug, Clone)]
struct Autoboot {
    path: PathBuf,
    lines: Vec<Line>,
}

#[derive(Debug, Default)]
struct Eval {
    normal: Option<u8>,
    tryboot: Option<u8>,
    a_b: bool,
    marks: [bool; 2],
}

impl Autoboot {
    fn read(path: &Path) -> Result<Self, BootError> {
        let mut bytes = Vec::new();
        {
            use std::io::Read;
            let f = std::fs::File::open(path).map_err(BootError::io("opening", path))?;
            f.take(MAX_LEN as u64 + 1)
                .read_to_end(&mut bytes)
                .map_err(BootError::io("reading", path))?;
        }
        if bytes.len() > MAX_LEN {
            return Err(BootError::format(
                path,
                format!("longer than {MAX_LEN} bytes"),
            ));
        }
        let text = String::from_utf8(bytes)
            .map_err(|e| BootError::format(path, format!("not UTF-8: {e}")))?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, BootError> {
        let mut section = Section::All;
        let mut lines = Vec::new();
        let body = text.strip_suffix('\n').unwrap_or(text);
        if body.is_empty() {
            return Ok(Self {
                path: path.to_path_buf(),
                lines,
            });
        }
        for (i, raw) in body.split('\n').enumerate() {
            let raw = raw.strip_suffix('\r').unwrap_or(raw);
            let n = i + 1;
            let bad = |what: String| BootError::format(path, format!("line {n}: {what}"));
            let t = raw.trim();
            let mut line = Line {
                raw: raw.to_string(),
                kind: Kind::Keep,
                section: section.clone(),
                value: 0,
            };
            if let Some(m) = t.strip_prefix(MARK) {
                line.value = match m.trim() {
                    "a" => 0,
                    "b" => 1,
                    other => return Err(bad(format!("{MARK} names no slot: {other:?}"))),
                };
                line.kind = Kind::Mark;
            } else if t.is_empty() || t.starts_with('#') {
            } else if let Some(h) = t.strip_prefix('[') {
                let name = h
                    .strip_suffix(']')
                    .filter(|s| {
                        !s.is_empty()
                            && s.chars()
                                .all(|c| c.is_ascii_graphic() && c != '[' && c != ']')
                    })
                    .ok_or_else(|| bad(format!("malformed section header {}", short(t))))?;
                section = match name.to_ascii_lowercase().as_str() {
                    "all" => Section::All,
                    "tryboot" => Section::Tryboot,
                    "none" => Section::None,
                    _ => Section::Other(name.to_string()),
                };
                line.kind = Kind::Header;
                line.section = section.clone();
            } else if let Some((k, v)) = t.split_once('=') {
                let (k, v) = (k.trim(), v.trim());
                if k.is_empty() || !k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Err(bad(format!("malformed property name in {}", short(t))));
                }
                match k {
                    "boot_partition" => {
                        line.value = v.parse::<u8>().ok().filter(|p| *p != 0).ok_or_else(|| {
                            bad(format!(
                                "boot_partition must be a partition number 1-255, not {}",
                                short(v)
                            ))
                        })?;
                        if let Section::Other(s) = &section {
                            return Err(bad(format!(
                                "boot_partition in section [{s}]: only [all], [tryboot] and [none] are supported"
                            )));
                        }
                        line.kind = Kind::BootPartition;
                    }
                    "tryboot_a_b" => {
                        line.value = match v {
                            "0" => 0,
                            "1" => 1,
                            _ => {
                                return Err(bad(format!(
                                    "tryboot_a_b must be 0 or 1, not {}",
                                    short(v)
                                )));
                            }
                        };
                        if let Section::Other(s) = &section {
                            return Err(bad(format!(
                                "tryboot_a_b in section [{s}]: only [all], [tryboot] and [none] are supported"
                            )));
                        }
                        line.kind = Kind::TrybootAB;
                    }
                    _ => {}
                }
            } else {
                return Err(bad(format!(
                    "expected key=value, a [section] or a # comment, found {}",
                    short(t)
                )));
            }
            lines.push(line);
        }
        Ok(Self {
            path: path.to_path_buf(),
            lines,
        })
    }

    /// What the firmware makes of the file: later assignments win; `[all]` applies on
    /// every boot, `[tryboot]` only on a tryboot, `[none]` never.
    fn eval(&self) -> Eval {
        let mut e = Eval::default();
        let mut a_b_normal = false;
        for l in &self.lines {
            match (&l.kind, &l.section) {
                (Kind::BootPartition, Section::All) => {
                    e.normal = Some(l.value);
                    e.tryboot = Some(l.value);
                }
                (Kind::BootPartition, Section::Tryboot) => e.tryboot = Some(l.value),
                (Kind::TrybootAB, Section::All) => a_b_normal = l.value == 1,
                (Kind::Mark, _) => e.marks[usize::from(l.value)] = true,
                _ => {}
            }
        }
        // The firmware decides on A/B mode from what applies before it knows it will
        // use the tryboot section: the [all] value.
        e.a_b = a_b_normal;
        e
    }

    fn set(&mut self, default: u8, tryboot: u8, marks: [bool; 2]) -> Result<(), BootError> {
        self.lines.retain(|l| !matches!(l.kind, Kind::Mark));
        for l in &mut self.lines {
            let v = match (&l.kind, &l.section) {
                (Kind::BootPartition, Section::All) => default,
                (Kind::BootPartition, Section::Tryboot) => tryboot,
                (Kind::TrybootAB, Section::All) => 1,
                _ => continue,
            };
            if l.value != v {
                l.value = v;
                l.raw = match l.kind {
                    Kind::TrybootAB => format!("tryboot_a_b={v}"),
                    _ => format!("boot_partition={v}"),
                };
            }
        }
        let ok = |ab: &Autoboot| {
            let e = ab.eval();
            e.a_b && e.normal == Some(default) && e.tryboot == Some(tryboot)
        };
        if !ok(self) {
            // Missing or shadowed: an [all] + [tryboot] pair at the end wins.
            let mut push = |raw: String, kind: Kind, section: Section, value: u8| {
                self.lines.push(Line {
                    raw,
                    kind,
                    section,
                    value,
                })
            };
            push("[all]".into(), Kind::Header, Section::All, 0);
            push("tryboot_a_b=1".into(), Kind::TrybootAB, Section::All, 1);
            push(
                format!("boot_partition={default}"),
                Kind::BootPartition,
                Section::All,
                default,
            );
            push("[tryboot]".into(), Kind::Header, Section::Tryboot, 0);
            push(
                format!("boot_partition={tryboot}"),
                Kind::BootPartition,
                Section::Tryboot,
                tryboot,
            );
        }
        for (i, name) in ["a", "b"].into_iter().enumerate() {
            if marks[i] {
                let section = self
                    .lines
                    .last()
                    .map_or(Section::All, |l| l.section.clone());
                self.lines.push(Line {
                    raw: format!("{MARK}{name}"),
                    kind: Kind::Mark,
                    section,
                    value: i as u8,
                });
            }
        }
        if !ok(self) {
            return Err(BootError::Invalid(format!(
                "{}: could not make boot_partition {default} / tryboot {tryboot} effective",
                self.path.display()
            )));
        }
        Ok(())
    }

    fn render(&self) -> String {
        let mut s = String::new();
        for l in &self.lines {
            s.push_str(&l.raw);
            s.push('\n');
        }
        s
    }
}

/// A line fragment for an error message, bounded.
fn short(s: &str) -> String {
    let mut t: String = s.chars().take(60).collect();
    if t.len() < s.len() {
        t.push('…');
    }
    format!("{t:?}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTS: [u8; 2] = [2, 3];

    fn boots(dir: &Path, tryboot: bool) -> Slot {
        let b = firmware_boot(dir, tryboot).unwrap();
        assert_eq!(b.tryboot, tryboot);
        match b.partition {
            2 => Slot::A,
            3 => Slot::B,
            p => panic!("booted partition {p}, not a slot"),
        }
    }

    fn text(dir: &Path) -> String {
        std::fs::read_to_string(dir.join(AUTOBOOT)).unwrap()
    }

    #[test]
    fn the_booted_slot_comes_from_the_device_tree() {
        let d = tempfile::tempdir().unwrap();
        let b = TryBoot::open(d.path(), PARTS).unwrap();
        let dt = d.path().join("chosen/bootloader");
        assert_eq!(b.booted_slot(&dt), None, "no device tree: ask the cmdline");
        for (part, tryboot, slot) in [
            (3, true, Some(Slot::B)),
            (2, false, Some(Slot::A)),
            (1, false, None),
        ] {
            write_device_tree(
                &dt,
                &PiBoot {
                    partition: part,
                    tryboot,
                },
            )
            .unwrap();
            assert_eq!(b.booted_slot(&dt), slot, "partition {part}");
            assert_eq!(booted_on_trial(&dt).unwrap(), tryboot);
        }
        std::fs::write(dt.join("partition"), [0, 3]).unwrap();
        assert_eq!(
            b.booted_slot(&dt),
            None,
            "a 2-byte property is not a partition number"
        );
    }

    #[test]
    fn trial_is_tried_once_then_falls_back() {
        let d = tempfile::tempdir().unwrap();
        let mut b = TryBoot::open(d.path(), PARTS).unwrap();
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::A, None, [true, false])
        );
        assert_eq!(boots(d.path(), false), Slot::A);
        assert_eq!(boots(d.path(), true), Slot::A, "nothing armed");

        b.mark_unbootable(Slot::B).unwrap();
        let before = text(d.path());
        b.mark_unbootable(Slot::B).unwrap();
        assert_eq!(text(d.path()), before, "idempotent, no change");
        assert_eq!(boots(d.path(), true), Slot::A);

        assert_eq!(b.arm_trial(Slot::B).unwrap(), RebootKind::Tryboot);
        assert_eq!(b.arm_trial(Slot::B).unwrap(), RebootKind::Tryboot);
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::A, Some(Slot::B), [true, true])
        );
        assert_eq!(
            text(d.path()),
            "[all]\ntryboot_a_b=1\nboot_partition=2\n[tryboot]\nboot_partition=3\n"
        );
        // reboot "0 tryboot": the trial slot.
        assert_eq!(boots(d.path(), true), Slot::B);
        // Not committed: the watchdog's (normal) reboot is the default.
        assert_eq!(boots(d.path(), false), Slot::A);
        assert_eq!(boots(d.path(), false), Slot::A);
    }

    #[test]
    fn commit_makes_the_trial_the_default_and_keeps_the_fallback() {
        let d = tempfile::tempdir().unwrap();
        let mut b = TryBoot::open(d.path(), PARTS).unwrap();
        b.mark_unbootable(Slot::B).unwrap();
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(boots(d.path(), true), Slot::B);
        b.commit(Slot::B).unwrap();
        b.commit(Slot::B).unwrap();
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, None, [true, true])
        );
        assert_eq!(boots(d.path(), false), Slot::B);
        assert_eq!(boots(d.path(), true), Slot::B, "a stray tryboot stays on B");

        // The next upgrade writes A.
        b.mark_unbootable(Slot::A).unwrap();
        b.mark_unbootable(Slot::A).unwrap();
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, None, [false, true])
        );
        let e = b.mark_unbootable(Slot::B).unwrap_err().to_string();
        assert!(e.contains("slot A is not bootable"), "{e}");
        assert!(b.reject(Slot::B).is_err(), "last bootable slot");

        // A armed, tried, failed: rejected, B boots either way.
        b.arm_trial(Slot::A).unwrap();
        assert_eq!(boots(d.path(), true), Slot::A);
        b.reject(Slot::A).unwrap();
        b.reject(Slot::A).unwrap();
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, None, [false, true])
        );
        assert_eq!(boots(d.path(), true), Slot::B);
        assert_eq!(boots(d.path(), false), Slot::B);
    }

    #[test]
    fn marking_the_default_moves_the_default_first() {
        let d = tempfile::tempdir().unwrap();
        let mut b = TryBoot::open(d.path(), PARTS).unwrap();
        b.arm_trial(Slot::B).unwrap();
        b.commit(Slot::B).unwrap();
        // Both bootable, B the default: making B unbootable makes A the default.
        b.mark_unbootable(Slot::B).unwrap();
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::A, None, [true, false])
        );
        assert_eq!(boots(d.path(), false), Slot::A);
        assert_eq!(boots(d.path(), true), Slot::A);
    }

    #[test]
    fn user_lines_and_sections_are_kept() {
        let d = tempfile::tempdir().unwrap();
        let orig = "# my Pi\n[all]\ntryboot_a_b=1\nboot_partition=2\n\n[pi5]\nsomething_else = 7\n[none]\nboot_partition=9\n[tryboot]\nboot_partition=2\n# end\n";
        std::fs::write(d.path().join(AUTOBOOT), orig).unwrap();
        let mut b = TryBoot::open(d.path(), PARTS).unwrap();
        assert_eq!(text(d.path()), orig, "open leaves an existing file alone");
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(
            text(d.path()),
            orig.replace("[tryboot]\nboot_partition=2", "[tryboot]\nboot_partition=3")
        );
        b.commit(Slot::B).unwrap();
        assert_eq!(
            text(d.path()),
            orig.replace("boot_partition=2", "boot_partition=3")
        );
        assert_eq!(boots(d.path(), false), Slot::B);
    }

    #[test]
    fn a_shadowed_tryboot_value_is_made_effective() {
        let d = tempfile::tempdir().unwrap();
        // [all] after [tryboot] wins on a tryboot too: the trial would never happen.
        std::fs::write(
            d.path().join(AUTOBOOT),
            "[tryboot]\nboot_partition=3\n[all]\ntryboot_a_b=1\nboot_partition=2\n",
        )
        .unwrap();
        let mut b = TryBoot::open(d.path(), PARTS).unwrap();
        assert_eq!(
            b.state().unwrap().trial,
            None,
            "tryboot boots 2 = the default"
        );
        assert_eq!(boots(d.path(), true), Slot::A);
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(b.state().unwrap().trial, Some(Slot::B));
        assert_eq!(boots(d.path(), true), Slot::B);
        assert_eq!(boots(d.path(), false), Slot::A);
        let once = text(d.path());
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(text(d.path()), once, "the fix-up is not appended twice");
    }

    #[test]
    fn missing_tryboot_a_b_is_added() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(AUTOBOOT), "boot_partition=2\n").unwrap();
        let mut b = TryBoot::open(d.path(), PARTS).unwrap();
        assert_eq!(b.state().unwrap().default, Slot::A);
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(boots(d.path(), true), Slot::B);
        assert_eq!(boots(d.path(), false), Slot::A);
    }

    #[test]
    fn malformed_input_is_refused_with_file_and_line() {
        let d = tempfile::tempdir().unwrap();
        let b = TryBoot {
            dir: d.path().to_path_buf(),
            partitions: PARTS,
        };
        for (body, line, what) in [
            ("[all]\n[tryboot\n", "line 2", "section header"),
            (
                "[all]\nboot_partition=2\njunk\n",
                "line 3",
                "expected key=value",
            ),
            ("boot_partition=two\n", "line 1", "partition number"),
            ("boot_partition=0\n", "line 1", "partition number"),
            ("boot_partition=300\n", "line 1", "partition number"),
            ("[pi4]\nboot_partition=3\n", "line 2", "[pi4]"),
            ("tryboot_a_b=yes\n", "line 1", "0 or 1"),
            ("bad key=1\n", "line 1", "property name"),
            ("#cairn-unbootable=c\n", "line 1", "names no slot"),
        ] {
            std::fs::write(d.path().join(AUTOBOOT), body).unwrap();
            let e = b.state().unwrap_err().to_string();
            assert!(
                e.contains("autoboot.txt") && e.contains(line) && e.contains(what),
                "{body:?}: {e}"
            );
            assert!(firmware_boot(d.path(), false).is_err());
        }
        std::fs::write(d.path().join(AUTOBOOT), [0xff, 0xfe, b'\n']).unwrap();
        assert!(b.state().unwrap_err().to_string().contains("UTF-8"));
        std::fs::write(d.path().join(AUTOBOOT), "boot_partition=7\n").unwrap();
        let e = b.state().unwrap_err().to_string();
        assert!(e.contains("neither slot A (2) nor slot B (3)"), "{e}");
        std::fs::write(d.path().join(AUTOBOOT), "tryboot_a_b=1\n").unwrap();
        assert!(
            b.state()
                .unwrap_err()
                .to_string()
                .contains("no boot_partition")
        );
        assert!(TryBoot::open(d.path(), [2, 2]).is_err());
    }

    #[test]
    fn a_crash_mid_write_leaves_a_bootable_state() {
        let d = tempfile::tempdir().unwrap();
        let mut b = TryBoot::open(d.path(), PARTS).unwrap();
        b.mark_unbootable(Slot::B).unwrap();
        // A crash inside write_atomic: half a temp file, never renamed.
        let tmp = d.path().join("autoboot.cairn-tmp");
        std::fs::write(&tmp, "[all]\ntryboot_a_b=1\nboot_parti").unwrap();
        assert_eq!(boots(d.path(), false), Slot::A);
        assert_eq!(boots(d.path(), true), Slot::A, "B is not armed");
        // The engine repeats the step.
        b.arm_trial(Slot::B).unwrap();
        assert!(!tmp.exists());
        assert_eq!(boots(d.path(), true), Slot::B);
        assert_eq!(boots(d.path(), false), Slot::A);
    }

    #[test]
    fn device_tree_properties() {
        let d = tempfile::tempdir().unwrap();
        let dt = d.path().join("chosen/bootloader");
        std::fs::create_dir_all(&dt).unwrap();
        std::fs::write(dt.join("tryboot"), [0, 0, 0, 1]).unwrap();
        std::fs::write(dt.join("partition"), [0, 0, 0, 3]).unwrap();
        assert!(booted_on_trial(&dt).unwrap());
        assert_eq!(booted_partition(&dt).unwrap(), 3);
        let b = TryBoot::open(d.path(), PARTS).unwrap();
        assert_eq!(b.slot_of_partition(3), Some(Slot::B));
        assert_eq!(b.slot_of_partition(1), None);

        std::fs::write(dt.join("tryboot"), [0, 0, 0, 0]).unwrap();
        assert!(!booted_on_trial(&dt).unwrap());
        std::fs::write(dt.join("tryboot"), [0, 0, 0, 2]).unwrap();
        assert!(booted_on_trial(&dt).is_err());
        std::fs::write(dt.join("partition"), [0, 3]).unwrap();
        let e = booted_partition(&dt).unwrap_err().to_string();
        assert!(e.contains("partition") && e.contains("has 2"), "{e}");
        std::fs::write(dt.join("partition"), [0, 0, 0, 0, 3]).unwrap();
        assert!(booted_partition(&dt).is_err());
        assert!(booted_on_trial(&d.path().join("nowhere")).is_err());

        // The simulated firmware writes what a real one reports.
        let mut tb = b.clone();
        tb.arm_trial(Slot::B).unwrap();
        let boot = firmware_boot(d.path(), true).unwrap();
        write_device_tree(&dt, &boot).unwrap();
        assert!(booted_on_trial(&dt).unwrap());
        assert_eq!(
            b.slot_of_partition(booted_partition(&dt).unwrap()),
            Some(Slot::B)
        );
    }
}
