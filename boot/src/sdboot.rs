//! systemd-boot boot control with boot counting (Automatic Boot Assessment, the
//! semantics of systemd 252).
//!
//! The ESP holds one Type #1 loader entry per slot in `ESP/loader/entries/`, named
//! `cairn-a.conf` / `cairn-b.conf` (the prefix is configurable), each booting that
//! slot's kernel with `cairn.slot=a|b` on its `options` line. A `+LEFT[-DONE]` suffix
//! before `.conf` is the boot counter: systemd-boot, about to boot a counted entry
//! with `LEFT > 0`, first renames it (`+1` → `+0-1`); an entry with `LEFT = 0` is
//! "bad" and sorted after the others; blessing is renaming it to drop the counter.
//! In systemd 252 an entry's identifier is its whole file name, counter included,
//! lower-cased (systemd 258 strips the counter; see the note below).
//!
//! The scheme:
//! - the **default** is the committed slot's *blessed* entry, named in
//!   `loader/loader.conf` by `default cairn-X.conf` (the file is rewritten
//!   atomically, other lines kept). An exact name, not a glob, so that no counted or
//!   bad entry can ever match it. A `LoaderEntryDefault` EFI variable (set by
//!   `bootctl set-default`) would override `loader.conf`, so when the backend moves
//!   the default it deletes that variable if it names anything else;
//! - [`arm_trial`](BootControl::arm_trial): rename the slot's entry to
//!   `cairn-Y+1.conf`, then set `LoaderEntryOneShot` = `cairn-Y+1.conf`. systemd-boot
//!   reads and deletes the one-shot variable, renames the entry to `cairn-Y+0-1.conf`
//!   and boots it: one try. If the trial dies, the next boot has no one-shot, the
//!   default names the old blessed entry, and the tried entry is now bad;
//! - [`commit`](BootControl::commit): bless the entry (`cairn-Y.conf`), then point
//!   `loader.conf` at it. The old slot's entry stays blessed: the fallback;
//! - [`mark_unbootable`](BootControl::mark_unbootable) / [`reject`](BootControl::reject):
//!   drop a one-shot naming the slot, move the default away if it is this slot, then
//!   rename the entry to `cairn-X+0.conf` (bad: never picked by the default, the
//!   one-shot, or the sort order while a good entry exists).
//!
//! Why sort order alone is not used: the order among good entries depends on version
//! comparison of ids and `sort-key`, which we would have to write into the entries;
//! the one-shot variable is exact and consumed by the boot loader itself.
//!
//! Crash safety: every step is a sequence of single renames within one directory (an
//! atomic directory operation), one atomic rewrite of `loader.conf` (temp file,
//! fsync, rename, directory fsync) and single-write EFI variable updates, ordered so
//! that any prefix boots a good slot: the default is moved before an entry is made
//! bad; an entry is counted (`+1`) before the one-shot names it, and an armed entry
//! without a one-shot is simply not picked; an entry is blessed before the default
//! names it. FAT has no journal; a power cut inside one rename is left to
//! `fsck.vfat`. Two files for one slot (what such a cut could leave) are refused
//! with an error naming both, rather than guessed at.
//!
//! Notes. `systemd-bless-boot.service`, if enabled, also blesses the trial entry on
//! `boot-complete.target`: harmless, the default only moves on [`commit`]. Since
//! systemd 258 ids drop the counter, so a one-shot of `cairn-b+1.conf` would match
//! nothing there and the trial would simply not happen (the default boots, the
//! engine sees a failed trial); this backend targets the 252 naming. On efivarfs
//! the systemd-boot variables are immutable files; see
//! [`efiboot::write_var`](super::efiboot::write_var).

use std::path::{Path, PathBuf};

use super::efiboot::{ATTR_BS_RT, ATTR_NV_BS_RT, EFIVARS, delete_var, read_var, write_var};
use super::{
    BootControl, BootError, BootState, RebootKind, Slot, booted_from_cmdline, rename_durable,
    write_atomic,
};

/// The vendor GUID of systemd-boot's variables.
pub const SD_GUID: &str = "4a67b082-0a4c-41cf-b6c7-440b29bb8c4f";

const MAX_FILE: usize = 64 * 1024;
const MAX_ENTRIES: usize = 4096;

/// A loader entry file, as systemd-boot sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    /// The file name, as on disk.
    file: String,
    /// The identifier (systemd 252): the file name, lower-cased.
    id: String,
    /// The file name without the counter and `.conf`.
    base: String,
    /// `(LEFT, DONE)`.
    counter: Option<(u32, u32)>,
}

impl Entry {
    fn parse(file: &str) -> Option<Entry> {
        let stem = file
            .len()
            .checked_sub(5)
            .filter(|n| file.is_char_boundary(*n) && file[*n..].eq_ignore_ascii_case(".conf"))
            .map(|n| &file[..n])?;
        let (base, counter) = match stem.rsplit_once('+') {
            Some((b, c)) => match parse_counter(c) {
                Some(c) => (b, Some(c)),
                None => (stem, None),
            },
            None => (stem, None),
        };
        Some(Entry {
            file: file.to_string(),
            id: file.to_ascii_lowercase(),
            base: base.to_string(),
            counter,
        })
    }

    fn bad(&self) -> bool {
        self.counter.is_some_and(|c| c.0 == 0)
    }
}

/// `LEFT` or `LEFT-DONE`, decimal, bounded.
fn parse_counter(s: &str) -> Option<(u32, u32)> {
    let num = |d: &str| -> Option<u32> {
        if d.is_empty() || d.len() > 5 || !d.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        d.parse().ok()
    };
    match s.split_once('-') {
        Some((l, d)) => Some((num(l)?, num(d)?)),
        None => Some((num(s)?, 0)),
    }
}

/// Glob match as systemd-boot does for `default` and the variables: `*` and `?`,
/// case-insensitive (ids are lower-case). Linear backtracking, bounded by the lengths.
fn glob(pattern: &str, s: &str) -> bool {
    let p: Vec<char> = pattern.to_lowercase().chars().collect();
    let s: Vec<char> = s.to_lowercase().chars().collect();
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, si));
            pi += 1;
        } else if let Some((sp, ss)) = star {
            pi = sp + 1;
            si = ss + 1;
            star = Some((sp, ss + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Reads a small text file, bounded, UTF-8; `None` when it does not exist.
fn read_text(path: &Path) -> Result<Option<String>, BootError> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(BootError::io("opening", path)(e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_FILE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(BootError::io("reading", path))?;
    if bytes.len() > MAX_FILE {
        return Err(BootError::format(
            path,
            format!("longer than {MAX_FILE} bytes"),
        ));
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| BootError::format(path, format!("not UTF-8: {e}")))
}

/// The value of the last `default` line of `loader.conf`.
fn loader_conf_default(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (k, v) = l.split_once(|c: char| c.is_ascii_whitespace())?;
            (k == "default").then(|| v.trim().to_string())
        })
        .next_back()
}

/// `text` with its `default` lines replaced by one `default ID` (where the first
/// was, or at the end).
fn loader_conf_with_default(text: &str, id: &str) -> String {
    let mut out = String::new();
    let mut done = false;
    for l in text.lines() {
        let t = l.trim();
        let is_default = t
            .split_once(|c: char| c.is_ascii_whitespace())
            .is_some_and(|(k, _)| k == "default")
            || t == "default";
        if is_default {
            if !done {
                out.push_str(&format!("default {id}\n"));
                done = true;
            }
        } else {
            out.push_str(l);
            out.push('\n');
        }
    }
    if !done {
        out.push_str(&format!("default {id}\n"));
    }
    out
}

/// A UTF-16LE, NUL-terminated variable value.
fn read_str_var(path: &Path) -> Result<Option<String>, BootError> {
    let Some(v) = read_var(path)? else {
        return Ok(None);
    };
    if !v.data.len().is_multiple_of(2) {
        return Err(BootError::format(
            path,
            format!("{} bytes: not a UTF-16 string", v.data.len()),
        ));
    }
    let mut units: Vec<u16> = v
        .data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect();
    while units.last() == Some(&0) {
        units.pop();
    }
    String::from_utf16(&units)
        .map(Some)
        .map_err(|_| BootError::format(path, "not valid UTF-16"))
}

fn write_str_var(path: &Path, attrs: u32, s: &str) -> Result<(), BootError> {
    let data: Vec<u8> = s
        .encode_utf16()
        .chain([0])
        .flat_map(|u| u.to_le_bytes())
        .collect();
    write_var(path, attrs, &data)
}

/// Everything systemd-boot looks at.
#[derive(Debug)]
struct View {
    entries: Vec<Entry>,
    oneshot: Option<String>,
    efi_default: Option<String>,
    conf_default: Option<String>,
}

impl View {
    fn read(esp: &Path, efivars: &Path) -> Result<View, BootError> {
        let dir = entries_dir(esp);
        let rd = std::fs::read_dir(&dir).map_err(BootError::io("listing", &dir))?;
        let mut entries = Vec::new();
        for de in rd {
            let de = de.map_err(BootError::io("listing", &dir))?;
            let Some(name) = de.file_name().to_str().map(str::to_string) else {
                continue;
            };
            let Some(e) = Entry::parse(&name) else {
                continue;
            };
            if !de
                .file_type()
                .map_err(BootError::io("listing", &dir))?
                .is_file()
            {
                continue;
            }
            if entries.len() == MAX_ENTRIES {
                return Err(BootError::format(
                    &dir,
                    format!("more than {MAX_ENTRIES} loader entries"),
                ));
            }
            entries.push(e);
        }
        // systemd-boot's order, simplified: bad entries last, then by identifier.
        entries.sort_by(|a, b| (a.bad(), &a.id).cmp(&(b.bad(), &b.id)));
        let conf = loader_conf(esp);
        Ok(View {
            entries,
            oneshot: read_str_var(&var(efivars, "LoaderEntryOneShot"))?,
            efi_default: read_str_var(&var(efivars, "LoaderEntryDefault"))?,
            conf_default: read_text(&conf)?.as_deref().and_then(loader_conf_default),
        })
    }

    fn find(&self, pattern: Option<&str>) -> Option<&Entry> {
        let p = pattern?;
        self.entries.iter().find(|e| glob(p, &e.id))
    }

    /// The entry booted when there is no one-shot.
    fn default_entry(&self) -> Option<&Entry> {
        self.find(self.efi_default.as_deref())
            .or_else(|| self.find(self.conf_default.as_deref()))
            .or(self.entries.first())
    }
}

fn entries_dir(esp: &Path) -> PathBuf {
    esp.join("loader").join("entries")
}

fn loader_conf(esp: &Path) -> PathBuf {
    esp.join("loader").join("loader.conf")
}

fn var(efivars: &Path, name: &str) -> PathBuf {
    super::efiboot::var_path(efivars, name, SD_GUID)
}

/// Boot control over systemd-boot's loader entries on a mounted ESP.
#[derive(Debug, Clone)]
pub struct SdBoot {
    esp: PathBuf,
    efivars: PathBuf,
    prefix: String,
}

impl SdBoot {
    /// Entries `cairn-a.conf` / `cairn-b.conf` on the ESP mounted at `esp`, variables
    /// in `efivars` (normally [`EFIVARS`]).
    pub fn new(esp: impl Into<PathBuf>, efivars: impl Into<PathBuf>) -> Self {
        Self {
            esp: esp.into(),
            efivars: efivars.into(),
            prefix: "cairn".into(),
        }
    }

    /// On the running system's efivarfs.
    pub fn on_efivarfs(esp: impl Into<PathBuf>) -> Self {
        Self::new(esp, EFIVARS)
    }

    /// Entries named `PREFIX-a.conf` / `PREFIX-b.conf` (lower-case ASCII letters,
    /// digits and `-`).
    pub fn with_prefix(mut self, prefix: &str) -> Result<Self, BootError> {
        if prefix.is_empty()
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(BootError::Invalid(format!(
                "systemd-boot entry prefix {prefix:?}: use lower-case letters, digits and -"
            )));
        }
        self.prefix = prefix.into();
        Ok(self)
    }

    fn base(&self, slot: Slot) -> String {
        format!("{}-{}", self.prefix, slot.as_str())
    }

    fn blessed_name(&self, slot: Slot) -> String {
        format!("{}.conf", self.base(slot))
    }

    fn slot_of(&self, e: &Entry) -> Option<Slot> {
        [Slot::A, Slot::B]
            .into_iter()
            .find(|s| e.base.eq_ignore_ascii_case(&self.base(*s)))
    }

    /// The entry file of each slot (at most one each).
    fn slot_entries(&self, v: &View) -> Result<[Option<Entry>; 2], BootError> {
        let mut out: [Option<Entry>; 2] = [None, None];
        for e in &v.entries {
            if let Some(s) = self.slot_of(e) {
                if let Some(prev) = &out[s.index()] {
                    return Err(BootError::format(
                        &entries_dir(&self.esp),
                        format!(
                            "two loader entries for slot {s}: {} and {} (remove one)",
                            prev.file, e.file
                        ),
                    ));
                }
                out[s.index()] = Some(e.clone());
            }
        }
        Ok(out)
    }

    fn view(&self) -> Result<(View, [Option<Entry>; 2]), BootError> {
        let v = View::read(&self.esp, &self.efivars)?;
        let mine = self.slot_entries(&v)?;
        Ok((v, mine))
    }

    fn decode(&self, v: &View, mine: &[Option<Entry>; 2]) -> Result<BootState, BootError> {
        let dir = entries_dir(&self.esp);
        let d = v
            .default_entry()
            .ok_or_else(|| BootError::format(&dir, "no loader entries"))?;
        let default = self.slot_of(d).ok_or_else(|| {
            BootError::format(
                &dir,
                format!("the default entry {} is not a cairn slot", d.file),
            )
        })?;
        let trial = v
            .find(v.oneshot.as_deref())
            .filter(|e| !e.bad())
            .and_then(|e| self.slot_of(e));
        let ok = |s: Slot| mine[s.index()].as_ref().is_some_and(|e| !e.bad());
        Ok(BootState {
            default,
            trial,
            bootable: [ok(Slot::A), ok(Slot::B)],
        })
    }

    /// Renames `e` to `name` (if different) and makes the rename durable.
    fn rename(&self, e: &Entry, name: &str) -> Result<(), BootError> {
        if e.file == name {
            return Ok(());
        }
        let dir = entries_dir(&self.esp);
        let to = dir.join(name);
        rename_durable(&dir.join(&e.file), &to)
    }

    /// Deletes `LoaderEntryOneShot` if it would pick `e`.
    fn drop_oneshot_for(&self, v: &View, e: &Entry) -> Result<(), BootError> {
        if v.oneshot.as_deref().is_some_and(|p| glob(p, &e.id)) {
            delete_var(&var(&self.efivars, "LoaderEntryOneShot"))?;
        }
        Ok(())
    }

    /// Makes the blessed entry of `slot` the default: `loader.conf`, and no
    /// `LoaderEntryDefault` overriding it.
    fn set_default(&self, v: &View, slot: Slot) -> Result<(), BootError> {
        let id = self.blessed_name(slot);
        if v.efi_default.as_deref().is_some_and(|d| d != id) {
            delete_var(&var(&self.efivars, "LoaderEntryDefault"))?;
        }
        if v.conf_default.as_deref() != Some(id.as_str()) {
            let p = loader_conf(&self.esp);
            let old = read_text(&p)?.unwrap_or_default();
            write_atomic(&p, loader_conf_with_default(&old, &id).as_bytes())?;
        }
        Ok(())
    }

    fn disable(&mut self, slot: Slot, what: &str) -> Result<(), BootError> {
        let (v, mine) = self.view()?;
        let st = self.decode(&v, &mine)?;
        if st.default == slot {
            let other_blessed = mine[(!slot).index()]
                .as_ref()
                .is_some_and(|e| e.counter.is_none());
            if !other_blessed {
                return Err(BootError::Invalid(format!(
                    "refusing to {what} slot {slot}: it is the default and slot {} has no blessed entry {} in {}",
                    !slot,
                    self.blessed_name(!slot),
                    entries_dir(&self.esp).display()
                )));
            }
        }
        let Some(e) = &mine[slot.index()] else {
            return Ok(());
        };
        self.drop_oneshot_for(&v, e)?;
        if st.default == slot {
            self.set_default(&v, !slot)?;
        }
        if !e.bad() {
            self.rename(e, &format!("{}+0.conf", self.base(slot)))?;
        }
        Ok(())
    }

    fn need_entry(&self, mine: &[Option<Entry>; 2], slot: Slot) -> Result<Entry, BootError> {
        mine[slot.index()].clone().ok_or_else(|| {
            BootError::format(
                &entries_dir(&self.esp),
                format!(
                    "no loader entry for slot {slot} ({}[+N[-M]].conf)",
                    self.base(slot)
                ),
            )
        })
    }
}

impl BootControl for SdBoot {
    fn name(&self) -> &'static str {
        "systemd-boot"
    }

    fn state(&self) -> Result<BootState, BootError> {
        let (v, mine) = self.view()?;
        self.decode(&v, &mine)
    }

    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError> {
        self.disable(slot, "make unbootable")
    }

    fn arm_trial(&mut self, slot: Slot) -> Result<RebootKind, BootError> {
        let (v, mine) = self.view()?;
        let st = self.decode(&v, &mine)?;
        if st.default == slot {
            return Err(BootError::Invalid(format!(
                "refusing to arm a trial of slot {slot}: it is already the default"
            )));
        }
        let e = self.need_entry(&mine, slot)?;
        let name = format!("{}+1.conf", self.base(slot));
        self.rename(&e, &name)?;
        if v.oneshot.as_deref() != Some(name.as_str()) {
            write_str_var(
                &var(&self.efivars, "LoaderEntryOneShot"),
                ATTR_NV_BS_RT,
                &name,
            )?;
        }
        Ok(RebootKind::Normal)
    }

    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        let (v, mine) = self.view()?;
        let e = self.need_entry(&mine, slot)?;
        self.drop_oneshot_for(&v, &e)?;
        self.rename(&e, &self.blessed_name(slot))?;
        self.set_default(&v, slot)
    }

    fn reject(&mut self, slot: Slot) -> Result<(), BootError> {
        self.disable(slot, "reject")
    }
}

/// Plays systemd-boot (252) once: takes `LoaderEntryOneShot` (deleting it), else
/// `LoaderEntryDefault`, else `loader.conf`'s `default`, else the first entry in
/// order (bad ones last); counts a counted entry down by renaming it; records the
/// choice in `LoaderEntrySelected`; returns the slot named by `cairn.slot=` on the
/// entry's `options` line.
pub fn firmware_boot(esp: &Path, efivars: &Path) -> Result<Slot, BootError> {
    let v = View::read(esp, efivars)?;
    let dir = entries_dir(esp);
    if v.oneshot.is_some() {
        delete_var(&var(efivars, "LoaderEntryOneShot"))?;
    }
    let e = v
        .find(v.oneshot.as_deref())
        .or_else(|| v.default_entry())
        .ok_or_else(|| BootError::format(&dir, "no loader entries"))?
        .clone();
    let mut file = e.file.clone();
    if let Some((left, done)) = e.counter
        && left > 0
    {
        file = format!("{}+{}-{}.conf", e.base, left - 1, done.saturating_add(1));
        rename_durable(&dir.join(&e.file), &dir.join(&file))?;
    }
    write_str_var(&var(efivars, "LoaderEntrySelected"), ATTR_BS_RT, &e.id)?;
    let p = dir.join(&file);
    let text = read_text(&p)?.ok_or_else(|| BootError::format(&p, "vanished"))?;
    let options: Vec<&str> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("options"))
        .collect();
    booted_from_cmdline(&options.join(" "))
        .ok_or_else(|| BootError::format(&p, "no cairn.slot= on an options line"))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Esp {
        _t: tempfile::TempDir,
        esp: PathBuf,
        vars: PathBuf,
    }

    fn entry_text(slot: &str) -> String {
        format!(
            "title Cairn (slot {slot})\nlinux /cairn/{slot}/vmlinuz\ninitrd /cairn/{slot}/initrd.img\noptions root=PARTLABEL=root-{slot} ro\noptions cairn.slot={slot} quiet\n"
        )
    }

    /// A provisioned ESP: slot A blessed and the default, slot B bad (never written).
    fn setup() -> (Esp, SdBoot) {
        let t = tempfile::tempdir().unwrap();
        let esp = t.path().join("esp");
        let vars = t.path().join("efivars");
        std::fs::create_dir_all(entries_dir(&esp)).unwrap();
        std::fs::create_dir_all(&vars).unwrap();
        std::fs::write(entries_dir(&esp).join("cairn-a.conf"), entry_text("a")).unwrap();
        std::fs::write(entries_dir(&esp).join("cairn-b+0.conf"), entry_text("b")).unwrap();
        std::fs::write(
            loader_conf(&esp),
            "timeout 3\ndefault cairn-a.conf\neditor no\n",
        )
        .unwrap();
        let b = SdBoot::new(&esp, &vars);
        (Esp { _t: t, esp, vars }, b)
    }

    fn names(esp: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(entries_dir(esp))
            .unwrap()
            .map(|d| d.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn oneshot(e: &Esp) -> Option<Vec<u8>> {
        std::fs::read(var(&e.vars, "LoaderEntryOneShot")).ok()
    }

    fn boots(e: &Esp) -> Slot {
        firmware_boot(&e.esp, &e.vars).unwrap()
    }

    #[test]
    fn trial_is_tried_once_then_falls_back() {
        let (e, mut b) = setup();
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::A, None, [true, false])
        );
        assert_eq!(boots(&e), Slot::A);
        b.mark_unbootable(Slot::B).unwrap();
        b.mark_unbootable(Slot::B).unwrap();
        assert_eq!(names(&e.esp), ["cairn-a.conf", "cairn-b+0.conf"]);

        assert_eq!(b.arm_trial(Slot::B).unwrap(), RebootKind::Normal);
        assert_eq!(b.arm_trial(Slot::B).unwrap(), RebootKind::Normal);
        assert_eq!(names(&e.esp), ["cairn-a.conf", "cairn-b+1.conf"]);
        let mut want = vec![7, 0, 0, 0];
        for u in "cairn-b+1.conf".encode_utf16().chain([0]) {
            want.extend_from_slice(&u.to_le_bytes());
        }
        assert_eq!(oneshot(&e).unwrap(), want);
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::A, Some(Slot::B), [true, true])
        );

        assert_eq!(boots(&e), Slot::B);
        assert_eq!(
            names(&e.esp),
            ["cairn-a.conf", "cairn-b+0-1.conf"],
            "counted down"
        );
        assert!(oneshot(&e).is_none(), "consumed");
        assert_eq!(
            read_str_var(&var(&e.vars, "LoaderEntrySelected"))
                .unwrap()
                .as_deref(),
            Some("cairn-b+1.conf")
        );
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::A, None, [true, false])
        );
        // Not committed: the default, and the bad entry is left alone.
        assert_eq!(boots(&e), Slot::A);
        assert_eq!(boots(&e), Slot::A);
        assert_eq!(names(&e.esp), ["cairn-a.conf", "cairn-b+0-1.conf"]);
    }

    #[test]
    fn commit_makes_the_trial_the_default_and_keeps_the_fallback() {
        let (e, mut b) = setup();
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(boots(&e), Slot::B);
        b.commit(Slot::B).unwrap();
        b.commit(Slot::B).unwrap();
        assert_eq!(names(&e.esp), ["cairn-a.conf", "cairn-b.conf"]);
        assert_eq!(
            std::fs::read_to_string(loader_conf(&e.esp)).unwrap(),
            "timeout 3\ndefault cairn-b.conf\neditor no\n"
        );
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, None, [true, true])
        );
        assert_eq!(boots(&e), Slot::B);
        assert_eq!(boots(&e), Slot::B);

        // The next upgrade writes A.
        b.mark_unbootable(Slot::A).unwrap();
        b.mark_unbootable(Slot::A).unwrap();
        assert_eq!(names(&e.esp), ["cairn-a+0.conf", "cairn-b.conf"]);
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, None, [false, true])
        );
        let err = b.mark_unbootable(Slot::B).unwrap_err().to_string();
        assert!(err.contains("slot A has no blessed entry"), "{err}");
        assert!(b.reject(Slot::B).is_err());

        // A tried and failed: rejected, B boots.
        b.arm_trial(Slot::A).unwrap();
        assert_eq!(boots(&e), Slot::A);
        b.reject(Slot::A).unwrap();
        b.reject(Slot::A).unwrap();
        assert_eq!(names(&e.esp), ["cairn-a+0-1.conf", "cairn-b.conf"]);
        assert_eq!(boots(&e), Slot::B);
        // Rejected before it booted: the one-shot goes too.
        b.arm_trial(Slot::A).unwrap();
        b.reject(Slot::A).unwrap();
        assert!(oneshot(&e).is_none());
        assert_eq!(names(&e.esp), ["cairn-a+0.conf", "cairn-b.conf"]);
        assert_eq!(boots(&e), Slot::B);
        assert!(b.arm_trial(Slot::B).is_err(), "B is the default already");
    }

    #[test]
    fn marking_the_default_moves_the_default_first() {
        let (e, mut b) = setup();
        b.arm_trial(Slot::B).unwrap();
        boots(&e);
        b.commit(Slot::B).unwrap();
        b.mark_unbootable(Slot::B).unwrap();
        assert_eq!(names(&e.esp), ["cairn-a.conf", "cairn-b+0.conf"]);
        assert_eq!(b.state().unwrap().default, Slot::A);
        assert_eq!(boots(&e), Slot::A);
    }

    #[test]
    fn loader_entry_default_variable_is_honoured_then_replaced() {
        let (e, mut b) = setup();
        // bootctl set-default pointed at B's blessed entry after an earlier life.
        std::fs::rename(
            entries_dir(&e.esp).join("cairn-b+0.conf"),
            entries_dir(&e.esp).join("cairn-b.conf"),
        )
        .unwrap();
        let efi_default = var(&e.vars, "LoaderEntryDefault");
        write_str_var(&efi_default, ATTR_NV_BS_RT, "cairn-b.conf").unwrap();
        assert_eq!(b.state().unwrap().default, Slot::B, "the variable wins");
        assert_eq!(boots(&e), Slot::B);
        b.mark_unbootable(Slot::B).unwrap();
        assert!(!efi_default.exists());
        assert_eq!(b.state().unwrap().default, Slot::A);
        assert_eq!(boots(&e), Slot::A);
    }

    #[test]
    fn a_crash_between_steps_leaves_a_bootable_state() {
        let (e, mut b) = setup();
        let dir = entries_dir(&e.esp);
        // arm_trial cut after the rename, before the one-shot: the default boots and
        // the counted entry is not touched.
        std::fs::rename(dir.join("cairn-b+0.conf"), dir.join("cairn-b+1.conf")).unwrap();
        assert_eq!(boots(&e), Slot::A);
        assert_eq!(names(&e.esp), ["cairn-a.conf", "cairn-b+1.conf"]);
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(boots(&e), Slot::B);

        // commit cut after blessing, before loader.conf (and a half-written temp copy
        // of loader.conf left behind): still the old default.
        std::fs::rename(dir.join("cairn-b+0-1.conf"), dir.join("cairn-b.conf")).unwrap();
        let tmp = e.esp.join("loader/loader.cairn-tmp");
        std::fs::write(&tmp, "timeout 3\ndefau").unwrap();
        assert_eq!(boots(&e), Slot::A);
        b.commit(Slot::B).unwrap();
        assert!(!tmp.exists());
        assert_eq!(boots(&e), Slot::B);

        // mark_unbootable(B) cut after moving the default: A boots, B is intact.
        let conf = std::fs::read_to_string(loader_conf(&e.esp)).unwrap();
        write_atomic(
            &loader_conf(&e.esp),
            conf.replace("cairn-b.conf", "cairn-a.conf").as_bytes(),
        )
        .unwrap();
        assert_eq!(boots(&e), Slot::A);
        b.mark_unbootable(Slot::B).unwrap();
        assert_eq!(names(&e.esp), ["cairn-a.conf", "cairn-b+0.conf"]);
        assert_eq!(boots(&e), Slot::A);
    }

    #[test]
    fn bad_layouts_are_errors() {
        let (e, mut b) = setup();
        let dir = entries_dir(&e.esp);
        std::fs::write(dir.join("cairn-b+0-1.conf"), entry_text("b")).unwrap();
        let err = b.state().unwrap_err().to_string();
        assert!(
            err.contains("two loader entries for slot B")
                && err.contains("cairn-b+0.conf")
                && err.contains("cairn-b+0-1.conf"),
            "{err}"
        );
        std::fs::remove_file(dir.join("cairn-b+0-1.conf")).unwrap();
        std::fs::remove_file(dir.join("cairn-b+0.conf")).unwrap();
        let err = b.arm_trial(Slot::B).unwrap_err().to_string();
        assert!(err.contains("no loader entry for slot B"), "{err}");
        // A foreign entry as the default is not a slot.
        std::fs::write(
            dir.join("memtest.conf"),
            "title memtest\nefi /memtest.efi\n",
        )
        .unwrap();
        write_atomic(&loader_conf(&e.esp), b"default memtest.conf\n").unwrap();
        let err = b.state().unwrap_err().to_string();
        assert!(err.contains("memtest.conf is not a cairn slot"), "{err}");
        assert!(firmware_boot(&e.esp, &e.vars).is_err(), "no cairn.slot=");
        // A malformed variable.
        std::fs::write(var(&e.vars, "LoaderEntryOneShot"), [7, 0, 0, 0, b'x']).unwrap();
        let err = b.state().unwrap_err().to_string();
        assert!(
            err.contains("LoaderEntryOneShot-") && err.contains("UTF-16"),
            "{err}"
        );
        assert!(SdBoot::new("/x", "/y").with_prefix("Bad Name").is_err());
    }

    #[test]
    fn names_counters_and_globs() {
        let e = Entry::parse("cairn-b+3-12.conf").unwrap();
        assert_eq!((e.base.as_str(), e.counter), ("cairn-b", Some((3, 12))));
        let e = Entry::parse("Cairn-A+0.CONF").unwrap();
        assert_eq!(
            (e.id.as_str(), e.counter, e.bad()),
            ("cairn-a+0.conf", Some((0, 0)), true)
        );
        // Not a counter: part of the name.
        let e = Entry::parse("x+y.conf").unwrap();
        assert_eq!((e.base.as_str(), e.counter), ("x+y", None));
        assert_eq!(Entry::parse("x+999999.conf").unwrap().counter, None);
        assert!(Entry::parse("cairn-a.conf.bak").is_none());
        assert!(Entry::parse("conf").is_none());
        assert!(Entry::parse("é.conf").is_some());
        assert!(glob("cairn-a.conf", "cairn-a.conf"));
        assert!(!glob("cairn-a.conf", "cairn-a+1.conf"));
        assert!(glob("cairn-a*", "cairn-a+1.conf"));
        assert!(glob("*-?.conf", "cairn-b.conf"));
        assert!(!glob("*-?.conf", "cairn-b+1.conf"));
        assert!(glob("*", ""));
        assert_eq!(
            loader_conf_with_default("#x\ndefault a\ntimeout 1\ndefault b\n", "c.conf"),
            "#x\ndefault c.conf\ntimeout 1\n"
        );
        assert_eq!(
            loader_conf_default("default  a.conf \n# default b\n"),
            Some("a.conf".into())
        );
    }

    /// Needs the Debian package `mtools` (mformat, mcopy, mdir, mren).
    #[test]
    fn entry_names_survive_on_a_real_fat_image() {
        use std::process::Command;
        let (e, mut b) = setup();
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(boots(&e), Slot::B);
        b.mark_unbootable(Slot::B).unwrap();
        b.arm_trial(Slot::B).unwrap();
        // Now: cairn-a.conf, cairn-b+1.conf, loader.conf.
        let img = e._t.path().join("esp.img");
        let run = |args: &[&std::ffi::OsStr]| {
            let out = Command::new(args[0])
                .args(&args[1..])
                .output()
                .unwrap_or_else(|err| {
                    panic!("{:?}: {err} (install the Debian package mtools)", args[0])
                });
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        let os = |s: &str| std::ffi::OsString::from(s);
        // FAT32 needs at least 65525 clusters: 128 Ki sectors of 512 bytes (sparse).
        run(&[
            &os("mformat"),
            &os("-i"),
            img.as_os_str(),
            &os("-F"),
            &os("-C"),
            &os("-T"),
            &os("131072"),
            &os("::"),
        ]);
        run(&[
            &os("mcopy"),
            &os("-s"),
            &os("-i"),
            img.as_os_str(),
            e.esp.join("loader").as_os_str(),
            &os("::"),
        ]);
        let listing = run(&[
            &os("mdir"),
            &os("-b"),
            &os("-i"),
            img.as_os_str(),
            &os("::/loader/entries"),
        ]);
        let mut got: Vec<&str> = listing.lines().map(str::trim).collect();
        got.sort();
        assert_eq!(
            got,
            [
                "::/loader/entries/cairn-a.conf",
                "::/loader/entries/cairn-b+1.conf"
            ]
        );
        // systemd-boot's count-down rename, done on the FAT itself.
        run(&[
            &os("mren"),
            &os("-i"),
            img.as_os_str(),
            &os("::/loader/entries/cairn-b+1.conf"),
            &os("::/loader/entries/cairn-b+0-1.conf"),
        ]);
        // Back out of the image: the backend reads the same state.
        let back = e._t.path().join("back");
        std::fs::create_dir_all(&back).unwrap();
        run(&[
            &os("mcopy"),
            &os("-s"),
            &os("-i"),
            img.as_os_str(),
            &os("::/loader"),
            back.as_os_str(),
        ]);
        let b2 = SdBoot::new(&back, &e.vars);
        assert_eq!(names(&back), ["cairn-a.conf", "cairn-b+0-1.conf"]);
        let s = b2.state().unwrap();
        assert_eq!((s.default, s.bootable), (Slot::A, [true, false]));
    }
}
