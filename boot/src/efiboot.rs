//! UEFI boot control through `BootNext` / `BootOrder` (efivarfs).
//!
//! Slots A and B are two existing load options, `Boot####` variables whose numbers
//! are configured (e.g. `0001` and `0002`), each starting the slot's loader or
//! unified kernel image. The firmware (modelled on OVMF/EDK2 in [`firmware_boot`])
//! boots `BootNext` once if it is set and names an active option, deleting it first;
//! otherwise the first *active* option in `BootOrder`.
//!
//! - default = whichever of the two comes first (and is active) in `BootOrder`;
//! - [`arm_trial`](BootControl::arm_trial) sets `LOAD_OPTION_ACTIVE` in the slot's
//!   `Boot####` and writes `BootNext` = its number: one boot, then the firmware has
//!   deleted it and `BootOrder` (untouched) brings back the default;
//! - [`commit`](BootControl::commit) writes `BootOrder` = slot, other slot, then every
//!   other entry in its old order (and drops a leftover `BootNext` naming a slot);
//! - [`mark_unbootable`](BootControl::mark_unbootable) / [`reject`](BootControl::reject)
//!   delete `BootNext` if it names the slot, put the other slot first in `BootOrder`,
//!   then clear `LOAD_OPTION_ACTIVE` in the slot's `Boot####` (the rest of the load
//!   option is kept byte for byte).
//!
//! Each step is a sequence of whole-variable writes, ordered so that every prefix is
//! a bootable state (the default is moved away from a slot before the slot is
//! deactivated; a slot is activated before `BootNext` names it). One variable write
//! is one `SetVariable()`, which the firmware's variable store makes power-fail safe;
//! there is nothing to fsync (efivarfs has no fsync), and no temp files may be made
//! in efivarfs (each would be a new variable).
//!
//! efivarfs files are 4 bytes of little-endian attributes followed by the value, and
//! must be written with a single `write()` of both. The kernel makes files of
//! variables it does not know to be safe **immutable** (`chattr +i`); `Boot####`,
//! `BootOrder` and `BootNext` are on its list and writable, vendor variables such as
//! systemd-boot's are not. [`write_var`] and [`delete_var`] therefore, on
//! `EPERM`, run `chattr -i` on the file once and retry (and put `+i` back after a
//! write). That path cannot be exercised without a real efivarfs and is untested;
//! the tests use a directory of files in the same format.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use super::{BootControl, BootError, BootState, RebootKind, Slot};

/// Where the kernel mounts efivarfs.
pub const EFIVARS: &str = "/sys/firmware/efi/efivars";
/// `EFI_GLOBAL_VARIABLE`, the vendor GUID of `Boot####`, `BootOrder`, `BootNext`.
pub const GLOBAL_GUID: &str = "8be4df61-93ca-11d2-aa0d-00e098032b8c";
/// `NON_VOLATILE | BOOTSERVICE_ACCESS | RUNTIME_ACCESS`.
pub const ATTR_NV_BS_RT: u32 = 0x07;
/// `BOOTSERVICE_ACCESS | RUNTIME_ACCESS` (volatile, e.g. `BootCurrent`).
pub const ATTR_BS_RT: u32 = 0x06;
/// `LOAD_OPTION_ACTIVE` in `EFI_LOAD_OPTION.Attributes`.
pub const LOAD_OPTION_ACTIVE: u32 = 0x0000_0001;

/// Variables larger than this are refused (real ones are a few hundred bytes).
const MAX_VAR: usize = 64 * 1024;

/// The efivarfs file of variable `name` in vendor `guid`.
pub fn var_path(efivars: &Path, name: &str, guid: &str) -> PathBuf {
    efivars.join(format!("{name}-{guid}"))
}

/// One variable as efivarfs shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EfiVar {
    pub attrs: u32,
    pub data: Vec<u8>,
}

/// Reads an efivarfs file; `None` when the variable does not exist.
pub fn read_var(path: &Path) -> Result<Option<EfiVar>, BootError> {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(BootError::io("opening", path)(e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_VAR as u64 + 5)
        .read_to_end(&mut bytes)
        .map_err(BootError::io("reading", path))?;
    if bytes.len() > MAX_VAR + 4 {
        return Err(BootError::format(
            path,
            format!("EFI variable larger than {MAX_VAR} bytes"),
        ));
    }
    let Some((a, data)) = bytes.split_first_chunk::<4>() else {
        return Err(BootError::format(
            path,
            format!(
                "{} bytes: an efivarfs file starts with 4 bytes of attributes",
                bytes.len()
            ),
        ));
    };
    Ok(Some(EfiVar {
        attrs: u32::from_le_bytes(*a),
        data: data.to_vec(),
    }))
}

fn is_eperm(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::PermissionDenied
}

/// Runs `chattr FLAG path`; whether it succeeded.
fn chattr(flag: &str, path: &Path) -> bool {
    std::process::Command::new("chattr")
        .arg(flag)
        .arg(path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn write_once(path: &Path, buf: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)?;
    // efivarfs takes the attributes and the value in a single write.
    let n = f.write(buf)?;
    if n != buf.len() {
        return Err(std::io::Error::other(format!(
            "short write: {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

/// Writes (creates or replaces) a variable: one `write()` of attributes and value.
pub fn write_var(path: &Path, attrs: u32, data: &[u8]) -> Result<(), BootError> {
    if data.len() > MAX_VAR {
        return Err(BootError::Invalid(format!(
            "{}: refusing to write {} bytes",
            path.display(),
            data.len()
        )));
    }
    let mut buf = Vec::with_capacity(4 + data.len());
    buf.extend_from_slice(&attrs.to_le_bytes());
    buf.extend_from_slice(data);
    match write_once(path, &buf) {
        Ok(()) => Ok(()),
        Err(e) if is_eperm(&e) && chattr("-i", path) => {
            write_once(path, &buf).map_err(BootError::io(
                "writing EFI variable (after chattr -i)",
                path,
            ))?;
            // Best effort: back to the kernel's protection against stray deletes.
            chattr("+i", path);
            Ok(())
        }
        Err(e) => Err(BootError::io(
            "writing EFI variable (efivarfs files may need chattr -i)",
            path,
        )(e)),
    }
}

/// Deletes a variable; nothing to do when it does not exist.
pub fn delete_var(path: &Path) -> Result<(), BootError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) if is_eperm(&e) && chattr("-i", path) => std::fs::remove_file(path).map_err(
            BootError::io("deleting EFI variable (after chattr -i)", path),
        ),
        Err(e) => Err(BootError::io(
            "deleting EFI variable (efivarfs files may need chattr -i)",
            path,
        )(e)),
    }
}

/// A parsed `EFI_LOAD_OPTION` (the value of a `Boot####` variable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOption {
    pub attributes: u32,
    pub description: String,
    /// The device path list, validated node by node.
    pub file_path_list: Vec<u8>,
    pub optional_data: Vec<u8>,
}

impl LoadOption {
    pub fn active(&self) -> bool {
        self.attributes & LOAD_OPTION_ACTIVE != 0
    }

    /// The bytes of the option: `Attributes`, `FilePathListLength`, the description in
    /// UTF-16LE with its NUL, the device path list, the optional data.
    pub fn to_bytes(&self) -> Result<Vec<u8>, BootError> {
        let fpl = u16::try_from(self.file_path_list.len()).map_err(|_| {
            BootError::Invalid(format!(
                "device path list of {} bytes",
                self.file_path_list.len()
            ))
        })?;
        let mut b = Vec::new();
        b.extend_from_slice(&self.attributes.to_le_bytes());
        b.extend_from_slice(&fpl.to_le_bytes());
        for u in self.description.encode_utf16().chain([0]) {
            b.extend_from_slice(&u.to_le_bytes());
        }
        b.extend_from_slice(&self.file_path_list);
        b.extend_from_slice(&self.optional_data);
        Ok(b)
    }
}

/// Parses an `EFI_LOAD_OPTION`; every length is checked against the data, the device
/// path must be a sequence of well-formed nodes ending with End Entire Device Path.
pub fn parse_load_option(path: &Path, data: &[u8]) -> Result<LoadOption, BootError> {
    let bad = |what: String| BootError::format(path, format!("EFI_LOAD_OPTION: {what}"));
    let (Some(a), Some(l)) = (data.first_chunk::<4>(), data.get(4..6)) else {
        return Err(bad(format!(
            "{} bytes, shorter than its header",
            data.len()
        )));
    };
    let attributes = u32::from_le_bytes(*a);
    let fpl = usize::from(u16::from_le_bytes([l[0], l[1]]));
    let mut pos = 6;
    let mut units = Vec::new();
    loop {
        let Some(u) = data.get(pos..pos + 2) else {
            return Err(bad("the description has no terminating NUL".into()));
        };
        pos += 2;
        let u = u16::from_le_bytes([u[0], u[1]]);
        if u == 0 {
            break;
        }
        units.push(u);
    }
    let description = String::from_utf16(&units)
        .map_err(|_| bad("the description is not valid UTF-16".into()))?;
    let Some(list) = data.get(pos..pos + fpl) else {
        return Err(bad(format!(
            "FilePathListLength {fpl} runs past the end ({} bytes left)",
            data.len() - pos
        )));
    };
    let mut rest = list;
    loop {
        let Some(h) = rest.first_chunk::<4>() else {
            return Err(bad("the device path does not end with an End node".into()));
        };
        let len = usize::from(u16::from_le_bytes([h[2], h[3]]));
        if len < 4 || len > rest.len() {
            return Err(bad(format!(
                "device path node type {:#04x}/{:#04x} has length {len} ({} bytes left)",
                h[0],
                h[1],
                rest.len()
            )));
        }
        if h[0] == 0x7f && h[1] == 0xff {
            if len != rest.len() {
                return Err(bad("bytes after the End of the device path".into()));
            }
            break;
        }
        rest = &rest[len..];
    }
    Ok(LoadOption {
        attributes,
        description,
        file_path_list: list.to_vec(),
        optional_data: data[pos + fpl..].to_vec(),
    })
}

fn parse_u16_list(path: &Path, data: &[u8]) -> Result<Vec<u16>, BootError> {
    if !data.len().is_multiple_of(2) {
        return Err(BootError::format(
            path,
            format!("{} bytes: not a list of 16-bit numbers", data.len()),
        ));
    }
    Ok(data
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .collect())
}

fn u16_list_bytes(list: &[u16]) -> Vec<u8> {
    list.iter().flat_map(|n| n.to_le_bytes()).collect()
}

fn boot_var_name(n: u16) -> String {
    format!("Boot{n:04X}")
}

/// Reads a variable holding one 16-bit number (`BootNext`, `BootCurrent`).
fn read_u16_var(path: &Path) -> Result<Option<u16>, BootError> {
    let Some(v) = read_var(path)? else {
        return Ok(None);
    };
    match v.data[..] {
        [a, b] => Ok(Some(u16::from_le_bytes([a, b]))),
        _ => Err(BootError::format(
            path,
            format!("{} bytes of value, expected 2", v.data.len()),
        )),
    }
}

/// Reads `Boot####` `n`: the variable and its parsed load option, if it exists.
fn read_option(efivars: &Path, n: u16) -> Result<Option<(EfiVar, LoadOption)>, BootError> {
    let p = var_path(efivars, &boot_var_name(n), GLOBAL_GUID);
    let Some(v) = read_var(&p)? else {
        return Ok(None);
    };
    let o = parse_load_option(&p, &v.data)?;
    Ok(Some((v, o)))
}

/// `BootCurrent`: the option the firmware booted this time (set by [`firmware_boot`]
/// in the simulation, by the firmware on a real machine).
pub fn boot_current(efivars: &Path) -> Result<Option<u16>, BootError> {
    read_u16_var(&var_path(efivars, "BootCurrent", GLOBAL_GUID))
}

/// Boot control over `BootNext`/`BootOrder` in an efivarfs directory.
#[derive(Debug, Clone)]
pub struct EfiBoot {
    efivars: PathBuf,
    /// The `Boot####` numbers of slot A and slot B.
    entries: [u16; 2],
}

impl EfiBoot {
    /// Slots A and B are `Boot{entries[0]:04X}` and `Boot{entries[1]:04X}` in
    /// `efivars` (normally [`EFIVARS`]).
    pub fn new(efivars: impl Into<PathBuf>, entries: [u16; 2]) -> Result<Self, BootError> {
        if entries[0] == entries[1] {
            return Err(BootError::Invalid(format!(
                "efiboot: slots A and B are both Boot{:04X}",
                entries[0]
            )));
        }
        Ok(Self {
            efivars: efivars.into(),
            entries,
        })
    }

    /// The slot whose load option is `Boot####` `n`.
    pub fn slot_of(&self, n: u16) -> Option<Slot> {
        [Slot::A, Slot::B]
            .into_iter()
            .find(|s| self.entries[s.index()] == n)
    }

    fn num(&self, slot: Slot) -> u16 {
        self.entries[slot.index()]
    }

    fn path(&self, name: &str) -> PathBuf {
        var_path(&self.efivars, name, GLOBAL_GUID)
    }

    fn boot_order(&self) -> Result<Vec<u16>, BootError> {
        let p = self.path("BootOrder");
        match read_var(&p)? {
            Some(v) => parse_u16_list(&p, &v.data),
            None => Ok(Vec::new()),
        }
    }

    fn write_boot_order(&self, order: &[u16]) -> Result<(), BootError> {
        let p = self.path("BootOrder");
        let attrs = read_var(&p)?.map_or(ATTR_NV_BS_RT, |v| v.attrs);
        write_var(&p, attrs, &u16_list_bytes(order))
    }

    /// `BootOrder` with `first`, then `second`, then the other entries in their order;
    /// written only if that changes it.
    fn put_first(&self, first: Slot) -> Result<(), BootError> {
        let old = self.boot_order()?;
        let (f, s) = (self.num(first), self.num(!first));
        let mut new = vec![f, s];
        new.extend(old.iter().copied().filter(|n| *n != f && *n != s));
        if new != old {
            self.write_boot_order(&new)?;
        }
        Ok(())
    }

    fn boot_next(&self) -> Result<Option<u16>, BootError> {
        read_u16_var(&self.path("BootNext"))
    }

    /// Sets or clears `LOAD_OPTION_ACTIVE` of the slot's option (only if it changes).
    fn set_active(&self, slot: Slot, active: bool) -> Result<(), BootError> {
        let n = self.num(slot);
        let p = self.path(&boot_var_name(n));
        let Some((v, o)) = read_option(&self.efivars, n)? else {
            if active {
                return Err(BootError::format(
                    &p,
                    format!("slot {slot}'s load option does not exist"),
                ));
            }
            return Ok(());
        };
        if o.active() == active {
            return Ok(());
        }
        let attributes = if active {
            o.attributes | LOAD_OPTION_ACTIVE
        } else {
            o.attributes & !LOAD_OPTION_ACTIVE
        };
        // Only the Attributes field changes; the rest stays byte for byte.
        let mut data = v.data;
        data[..4].copy_from_slice(&attributes.to_le_bytes());
        write_var(&p, v.attrs, &data)
    }

    /// mark_unbootable and reject: not BootNext, not first, not active.
    fn disable(&mut self, slot: Slot, what: &str) -> Result<(), BootError> {
        let st = self.state()?;
        if st.default == slot && !st.bootable[(!slot).index()] {
            return Err(BootError::Invalid(format!(
                "refusing to {what} slot {slot}: it is the default in {} and slot {} (Boot{:04X}) is not bootable",
                self.path("BootOrder").display(),
                !slot,
                self.num(!slot)
            )));
        }
        if self.boot_next()? == Some(self.num(slot)) {
            delete_var(&self.path("BootNext"))?;
        }
        self.put_first(!slot)?;
        self.set_active(slot, false)
    }
}

impl BootControl for EfiBoot {
    fn name(&self) -> &'static str {
        "efiboot"
    }

    fn state(&self) -> Result<BootState, BootError> {
        let order = self.boot_order()?;
        let mut bootable = [false; 2];
        for s in [Slot::A, Slot::B] {
            bootable[s.index()] =
                read_option(&self.efivars, self.num(s))?.is_some_and(|(_, o)| o.active());
        }
        let listed: Vec<Slot> = order.iter().filter_map(|n| self.slot_of(*n)).collect();
        let default = listed
            .iter()
            .find(|s| bootable[s.index()])
            .or(listed.first())
            .copied()
            .ok_or_else(|| {
                BootError::format(
                    &self.path("BootOrder"),
                    format!(
                        "lists neither slot A (Boot{:04X}) nor slot B (Boot{:04X})",
                        self.entries[0], self.entries[1]
                    ),
                )
            })?;
        let trial = self
            .boot_next()?
            .and_then(|n| self.slot_of(n))
            .filter(|s| bootable[s.index()]);
        Ok(BootState {
            default,
            trial,
            bootable,
        })
    }

    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError> {
        self.disable(slot, "make unbootable")
    }

    fn arm_trial(&mut self, slot: Slot) -> Result<RebootKind, BootError> {
        self.set_active(slot, true)?;
        let n = self.num(slot);
        if self.boot_next()? != Some(n) {
            write_var(&self.path("BootNext"), ATTR_NV_BS_RT, &n.to_le_bytes())?;
        }
        Ok(RebootKind::Normal)
    }

    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        self.set_active(slot, true)?;
        self.put_first(slot)?;
        if self.boot_next()?.and_then(|n| self.slot_of(n)).is_some() {
            delete_var(&self.path("BootNext"))?;
        }
        Ok(())
    }

    fn reject(&mut self, slot: Slot) -> Result<(), BootError> {
        self.disable(slot, "reject")
    }
}

/// Plays the firmware (OVMF/EDK2 boot manager) once: if `BootNext` is set it is
/// deleted and its option booted if it exists and is active; otherwise the first
/// active option in `BootOrder` boots. Records it in `BootCurrent` and returns its
/// number. Fails when nothing is bootable (a real firmware would go on to removable
/// media or its setup screen).
pub fn firmware_boot(efivars: &Path) -> Result<u16, BootError> {
    let bootable = |n: u16| -> Result<bool, BootError> {
        Ok(read_option(efivars, n)?.is_some_and(|(_, o)| o.active()))
    };
    let next_path = var_path(efivars, "BootNext", GLOBAL_GUID);
    let mut chosen = None;
    if let Some(n) = read_u16_var(&next_path)? {
        delete_var(&next_path)?;
        if bootable(n)? {
            chosen = Some(n);
        }
    }
    if chosen.is_none() {
        let p = var_path(efivars, "BootOrder", GLOBAL_GUID);
        let order = match read_var(&p)? {
            Some(v) => parse_u16_list(&p, &v.data)?,
            None => Vec::new(),
        };
        for n in order {
            if bootable(n)? {
                chosen = Some(n);
                break;
            }
        }
    }
    let n = chosen.ok_or_else(|| {
        BootError::Invalid(format!(
            "no active boot option in BootNext or BootOrder in {}",
            efivars.display()
        ))
    })?;
    write_var(
        &var_path(efivars, "BootCurrent", GLOBAL_GUID),
        ATTR_BS_RT,
        &n.to_le_bytes(),
    )?;
    Ok(n)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A realistic load option: a GPT hard-drive node, a file path node, the End node.
    pub(crate) fn load_option(desc: &str, file: &str, active: bool, optional: &[u8]) -> Vec<u8> {
        let mut dp = Vec::new();
        // HARDDRIVE_DEVICE_PATH: type 4 (media), subtype 1, length 42.
        dp.extend_from_slice(&[0x04, 0x01, 42, 0]);
        dp.extend_from_slice(&1u32.to_le_bytes()); // partition number
        dp.extend_from_slice(&2048u64.to_le_bytes()); // start LBA
        dp.extend_from_slice(&1_048_576u64.to_le_bytes()); // size in LBAs
        dp.extend_from_slice(&[0x5a; 16]); // partition GUID
        dp.extend_from_slice(&[0x02, 0x02]); // GPT, GUID signature
        // FILEPATH_DEVICE_PATH: type 4, subtype 4, a NUL-terminated UTF-16 path.
        let path: Vec<u8> = file
            .encode_utf16()
            .chain([0])
            .flat_map(|u| u.to_le_bytes())
            .collect();
        let len = u16::try_from(4 + path.len()).unwrap();
        dp.extend_from_slice(&[0x04, 0x04]);
        dp.extend_from_slice(&len.to_le_bytes());
        dp.extend_from_slice(&path);
        // End of Entire Device Path.
        dp.extend_from_slice(&[0x7f, 0xff, 0x04, 0x00]);
        LoadOption {
            attributes: if active { LOAD_OPTION_ACTIVE } else { 0 },
            description: desc.into(),
            file_path_list: dp,
            optional_data: optional.to_vec(),
        }
        .to_bytes()
        .unwrap()
    }

    fn put(dir: &Path, name: &str, data: &[u8]) {
        write_var(&var_path(dir, name, GLOBAL_GUID), ATTR_NV_BS_RT, data).unwrap();
    }

    fn raw(dir: &Path, name: &str) -> Option<Vec<u8>> {
        std::fs::read(var_path(dir, name, GLOBAL_GUID)).ok()
    }

    fn order(dir: &Path) -> Vec<u16> {
        let v = read_var(&var_path(dir, "BootOrder", GLOBAL_GUID))
            .unwrap()
            .unwrap();
        parse_u16_list(Path::new("BootOrder"), &v.data).unwrap()
    }

    /// Slot A = Boot0001 (active), slot B = Boot0002 (not active yet), a PXE entry
    /// Boot0003; BootOrder 0001, 0002, 0003.
    fn setup() -> (tempfile::TempDir, EfiBoot) {
        let d = tempfile::tempdir().unwrap();
        put(
            d.path(),
            "Boot0001",
            &load_option("cairn slot A", "\\EFI\\cairn\\a.efi", true, &[]),
        );
        put(
            d.path(),
            "Boot0002",
            &load_option("cairn slot B", "\\EFI\\cairn\\b.efi", false, &[]),
        );
        put(
            d.path(),
            "Boot0003",
            &load_option("UEFI PXEv4", "\\pxe", true, b"opt"),
        );
        put(d.path(), "BootOrder", &u16_list_bytes(&[1, 2, 3]));
        let b = EfiBoot::new(d.path(), [1, 2]).unwrap();
        (d, b)
    }

    fn boots(dir: &Path) -> Slot {
        let n = firmware_boot(dir).unwrap();
        assert_eq!(boot_current(dir).unwrap(), Some(n));
        match n {
            1 => Slot::A,
            2 => Slot::B,
            n => panic!("booted Boot{n:04X}"),
        }
    }

    #[test]
    fn trial_is_tried_once_then_falls_back() {
        let (d, mut b) = setup();
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::A, None, [true, false])
        );
        assert_eq!(boots(d.path()), Slot::A);
        b.mark_unbootable(Slot::B).unwrap();
        b.mark_unbootable(Slot::B).unwrap();
        assert_eq!(order(d.path()), [1, 2, 3]);
        assert_eq!(boots(d.path()), Slot::A);

        assert_eq!(b.arm_trial(Slot::B).unwrap(), RebootKind::Normal);
        assert_eq!(b.arm_trial(Slot::B).unwrap(), RebootKind::Normal);
        assert_eq!(raw(d.path(), "BootNext").unwrap(), [7, 0, 0, 0, 2, 0]);
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::A, Some(Slot::B), [true, true])
        );
        assert_eq!(boots(d.path()), Slot::B);
        assert!(
            raw(d.path(), "BootNext").is_none(),
            "the firmware consumed it"
        );
        // Not committed: back to the default, for good.
        assert_eq!(boots(d.path()), Slot::A);
        assert_eq!(boots(d.path()), Slot::A);
        assert_eq!(order(d.path()), [1, 2, 3]);
    }

    #[test]
    fn commit_makes_the_trial_the_default_and_keeps_the_fallback() {
        let (d, mut b) = setup();
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(boots(d.path()), Slot::B);
        b.commit(Slot::B).unwrap();
        b.commit(Slot::B).unwrap();
        assert_eq!(order(d.path()), [2, 1, 3]);
        assert_eq!(
            raw(d.path(), "BootOrder").unwrap(),
            [7, 0, 0, 0, 2, 0, 1, 0, 3, 0]
        );
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, None, [true, true])
        );
        assert_eq!(boots(d.path()), Slot::B);
        assert_eq!(boots(d.path()), Slot::B);

        // The next upgrade writes A.
        let a_before = raw(d.path(), "Boot0001").unwrap();
        b.mark_unbootable(Slot::A).unwrap();
        b.mark_unbootable(Slot::A).unwrap();
        let a_after = raw(d.path(), "Boot0001").unwrap();
        assert_eq!(a_after[4..8], [0, 0, 0, 0], "LOAD_OPTION_ACTIVE cleared");
        assert_eq!(
            a_before[8..],
            a_after[8..],
            "the rest of the option is kept"
        );
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, None, [false, true])
        );
        let e = b.mark_unbootable(Slot::B).unwrap_err().to_string();
        assert!(e.contains("slot A (Boot0001) is not bootable"), "{e}");
        assert!(b.reject(Slot::B).is_err());

        // A armed, but rejected before it booted: BootNext goes too.
        b.arm_trial(Slot::A).unwrap();
        assert_eq!(b.state().unwrap().trial, Some(Slot::A));
        b.reject(Slot::A).unwrap();
        b.reject(Slot::A).unwrap();
        assert!(raw(d.path(), "BootNext").is_none());
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, None, [false, true])
        );
        assert_eq!(boots(d.path()), Slot::B);
    }

    #[test]
    fn marking_the_default_hands_over_first() {
        let (d, mut b) = setup();
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(boots(d.path()), Slot::B);
        b.commit(Slot::B).unwrap();
        // B is the default, A bootable: A takes first place before B is deactivated.
        b.mark_unbootable(Slot::B).unwrap();
        assert_eq!(order(d.path()), [1, 2, 3]);
        let s = b.state().unwrap();
        assert_eq!((s.default, s.bootable), (Slot::A, [true, false]));
        assert_eq!(boots(d.path()), Slot::A);
    }

    #[test]
    fn other_entries_keep_their_order() {
        let (d, mut b) = setup();
        put(
            d.path(),
            "BootOrder",
            &u16_list_bytes(&[3, 1, 5, 0x1a, 2, 4]),
        );
        b.arm_trial(Slot::B).unwrap();
        b.commit(Slot::B).unwrap();
        assert_eq!(order(d.path()), [2, 1, 3, 5, 0x1a, 4]);
        // The PXE entry first in the old order booted before; now slot B does.
        assert_eq!(boots(d.path()), Slot::B);
        assert!(
            var_path(d.path(), "Boot001A", GLOBAL_GUID)
                .ends_with(format!("Boot001A-{GLOBAL_GUID}"))
        );
    }

    #[test]
    fn a_crash_between_steps_leaves_a_bootable_state() {
        let (d, mut b) = setup();
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(boots(d.path()), Slot::B);
        b.commit(Slot::B).unwrap();

        // mark_unbootable(B) cut after BootOrder, before B was deactivated.
        put(d.path(), "BootOrder", &u16_list_bytes(&[1, 2, 3]));
        assert_eq!(boots(d.path()), Slot::A);
        b.mark_unbootable(Slot::B).unwrap();
        assert_eq!(b.state().unwrap().bootable, [true, false]);

        // arm_trial(B) cut after activating B, before BootNext: the default boots.
        b.set_active(Slot::B, true).unwrap();
        assert_eq!(boots(d.path()), Slot::A);
        assert_eq!(b.state().unwrap().trial, None);
        b.arm_trial(Slot::B).unwrap();
        assert_eq!(boots(d.path()), Slot::B);

        // commit(B) cut after BootOrder with a stale BootNext left: B either way.
        put(d.path(), "BootOrder", &u16_list_bytes(&[2, 1, 3]));
        put(d.path(), "BootNext", &2u16.to_le_bytes());
        b.commit(Slot::B).unwrap();
        assert!(raw(d.path(), "BootNext").is_none());
        assert_eq!(boots(d.path()), Slot::B);
    }

    #[test]
    fn boot_next_naming_an_inactive_option_is_dropped_by_the_firmware() {
        let (d, _) = setup();
        put(d.path(), "BootNext", &2u16.to_le_bytes());
        assert_eq!(boots(d.path()), Slot::A, "Boot0002 is not active");
        assert!(raw(d.path(), "BootNext").is_none());
    }

    #[test]
    fn load_options_parse_totally() {
        let bytes = load_option("cairn slot A", "\\EFI\\cairn\\a.efi", true, b"xy");
        let o = parse_load_option(Path::new("Boot0001"), &bytes).unwrap();
        assert_eq!(o.description, "cairn slot A");
        assert!(o.active());
        assert_eq!(o.optional_data, b"xy");
        assert_eq!(
            o.file_path_list[o.file_path_list.len() - 4..],
            [0x7f, 0xff, 4, 0]
        );
        assert_eq!(o.to_bytes().unwrap(), bytes);
        // Every truncation and every single-byte corruption is an error or a value,
        // never a panic.
        for n in 0..bytes.len() - 2 {
            assert!(
                parse_load_option(Path::new("x"), &bytes[..n]).is_err(),
                "prefix {n}"
            );
        }
        for i in 0..bytes.len() {
            for v in [0x00, 0x03, 0x7f, 0xff] {
                let mut c = bytes.clone();
                c[i] = v;
                let _ = parse_load_option(Path::new("x"), &c);
            }
        }
        let e = parse_load_option(Path::new("Boot0007"), &[1, 0, 0, 0, 4, 0, b'a', 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("Boot0007") && e.contains("NUL"), "{e}");
        // A device path without an End node.
        let e = parse_load_option(Path::new("x"), &[1, 0, 0, 0, 4, 0, 0, 0, 4, 1, 4, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("End"), "{e}");
        // A node shorter than its header.
        let e = parse_load_option(Path::new("x"), &[1, 0, 0, 0, 4, 0, 0, 0, 4, 1, 2, 0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("length 2"), "{e}");
    }

    #[test]
    fn malformed_variables_are_errors() {
        let (d, b) = setup();
        std::fs::write(
            var_path(d.path(), "BootOrder", GLOBAL_GUID),
            [7, 0, 0, 0, 1, 0, 2],
        )
        .unwrap();
        let e = b.state().unwrap_err().to_string();
        assert!(e.contains("BootOrder-") && e.contains("16-bit"), "{e}");
        std::fs::write(var_path(d.path(), "BootOrder", GLOBAL_GUID), [7, 0]).unwrap();
        assert!(b.state().unwrap_err().to_string().contains("attributes"));
        put(d.path(), "BootOrder", &u16_list_bytes(&[3]));
        let e = b.state().unwrap_err().to_string();
        assert!(e.contains("neither slot A (Boot0001)"), "{e}");
        put(d.path(), "BootOrder", &u16_list_bytes(&[1, 2]));
        put(d.path(), "BootNext", &[1, 0, 0]);
        assert!(b.state().unwrap_err().to_string().contains("expected 2"));
        assert!(firmware_boot(d.path()).is_err());
        assert!(EfiBoot::new(d.path(), [4, 4]).is_err());
    }

    /// Cross-check of the variable formats with efibootmgr (Debian package
    /// `efibootmgr`; libefivar honours `EFIVARFS_PATH`, so it works on a plain
    /// directory); scripts/test.sh installs it.
    #[test]
    fn efibootmgr_reads_and_writes_the_same_variables() {
        let (d, mut b) = setup();
        let efibootmgr = |args: &[&str]| {
            let out = std::process::Command::new("efibootmgr")
                .args(args)
                .env("EFIVARFS_PATH", format!("{}/", d.path().display()))
                .output()
                .unwrap_or_else(|e| {
                    panic!("efibootmgr: {e} (install the Debian package efibootmgr)")
                });
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8(out.stdout).unwrap()
        };
        // Ours, read by efibootmgr.
        b.arm_trial(Slot::B).unwrap();
        boots(d.path());
        b.commit(Slot::B).unwrap();
        b.mark_unbootable(Slot::A).unwrap();
        b.arm_trial(Slot::A).unwrap();
        let out = efibootmgr(&["-v"]);
        assert!(out.contains("BootNext: 0001\n"), "{out}");
        assert!(out.contains("BootOrder: 0002,0001,0003\n"), "{out}");
        assert!(out.contains("Boot0001* cairn slot A\tHD(1,GPT,"), "{out}");
        assert!(out.contains("Boot0002* cairn slot B\tHD(1,GPT,"), "{out}");
        assert!(out.contains("File(\\EFI\\cairn\\b.efi)"), "{out}");
        b.reject(Slot::A).unwrap();
        let out = efibootmgr(&[]);
        assert!(!out.contains("BootNext"), "{out}");
        assert!(out.contains("Boot0001  cairn slot A"), "inactive: {out}");
        // efibootmgr's, read by us.
        efibootmgr(&["-a", "-b", "0001"]);
        efibootmgr(&["-n", "0001"]);
        let s = b.state().unwrap();
        assert_eq!(
            (s.default, s.trial, s.bootable),
            (Slot::B, Some(Slot::A), [true, true])
        );
        efibootmgr(&["-o", "0001,0003,0002"]);
        efibootmgr(&["-N"]);
        let s = b.state().unwrap();
        assert_eq!((s.default, s.trial), (Slot::A, None));
        assert_eq!(boots(d.path()), Slot::A);
    }
}
