//! U-Boot environment boot control, readable and writable by `fw_printenv` /
//! `fw_setenv` (libubootenv) with the same locations in their `fw_env.config`.
//!
//! # The environment on disk
//!
//! One copy is `ENVSIZE` bytes at `OFFSET` of `DEVICE` (a block device, an MTD-less
//! eMMC region, or a plain file such as `uboot.env` on the boot partition):
//!
//! - single copy: CRC32 (4 bytes, little endian) of the rest, then the data;
//! - redundant (two copies, same size): CRC32 of the data, a flags byte, the data.
//!
//! The data is `name=value\0` pairs ending with an empty one (`\0\0`), then padding.
//! Of two valid redundant copies the one with the higher flags byte is current, 255 →
//! 0 counting as a step up (so the counter can wrap); equal flags mean the first. A
//! write goes to the *other* copy with the flags byte one up, and is fsynced: until it
//! is complete the old copy is still the valid, current one, so a power cut at any
//! instant leaves one valid copy. A single copy in a plain file is replaced whole (a
//! temporary file, fsync, rename); a single copy on a device can only be written in
//! place, which a power cut can tear (U-Boot then uses its built-in default
//! environment): use the redundant layout on devices.
//!
//! # The A/B variables
//!
//! | variable        | values   | meaning                                       | absent |
//! |-----------------|----------|-----------------------------------------------|--------|
//! | `cairn_default` | `a`, `b` | the slot booted when no trial is pending      | `a`    |
//! | `cairn_trial`   | `a`, `b` | a slot armed for **one** trial boot           | none   |
//! | `cairn_a_ok`    | `0`, `1` | slot A may be booted (anything but `0` is yes)| yes    |
//! | `cairn_b_ok`    | `0`, `1` | slot B may be booted (only `1` is yes)        | no     |
//!
//! Absent variables read as a freshly provisioned box: slot A, the only bootable one.
//! The boot loader clears `cairn_trial` and saves the environment *before* it boots the
//! trial slot, so a trial that crashes, hangs or loses power is never tried again and
//! the next boot is `cairn_default`. The agent writes (all four variables, other
//! variables untouched):
//! - `mark_unbootable(s)` / `reject(s)`: `cairn_s_ok=0`, no trial of `s`, and if `s` was
//!   the default, the other slot becomes the default;
//! - `arm_trial(s)`: `cairn_s_ok=1`, `cairn_trial=s`;
//! - `commit(s)`: `cairn_default=s`, `cairn_s_ok=1`, no trial.
//!
//! The matching `bootcmd` (hush; the board's environment defines `cairn_boot_a` and
//! `cairn_boot_b`, which load and boot a slot's kernel; `slot` and `try` are shell
//! variables, not saved):
//!
//! ```text
//! slot=
//! if test -n "${cairn_trial}"; then
//!     try=${cairn_trial}
//!     setenv cairn_trial
//!     saveenv
//!     if test "${try}" = a && test "${cairn_a_ok}" != 0; then slot=a; fi
//!     if test "${try}" = b && test "${cairn_b_ok}" = 1; then slot=b; fi
//! fi
//! if test -z "${slot}"; then
//!     if test "${cairn_default}" = b; then
//!         if test "${cairn_b_ok}" = 1; then slot=b; elif test "${cairn_a_ok}" != 0; then slot=a; fi
//!     else
//!         if test "${cairn_a_ok}" != 0; then slot=a; elif test "${cairn_b_ok}" = 1; then slot=b; fi
//!     fi
//! fi
//! if test -z "${slot}"; then
//!     echo "cairn: no bootable slot"
//! else
//!     setenv bootargs "${bootargs} cairn.slot=${slot}"
//!     run cairn_boot_${slot}
//! fi
//! ```
//!
//! [`firmware_boot`] does exactly this (without the `run`).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::{BootControl, BootError, BootState, RebootKind, Slot, write_atomic};

/// Environments larger than this are refused (U-Boot's are 8 KiB to 256 KiB).
const MAX_ENV_SIZE: usize = 4 << 20;

const DEFAULT: &str = "cairn_default";
const TRIAL: &str = "cairn_trial";
/// `name=value` pairs in their on-disk order (bytes: U-Boot does not require UTF-8).
pub type Vars = Vec<(Vec<u8>, Vec<u8>)>;

const A_OK: &str = "cairn_a_ok";
const B_OK: &str = "cairn_b_ok";

/// Where one copy of the environment is: a line of `fw_env.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvCopy {
    pub device: PathBuf,
    pub offset: u64,
    pub size: usize,
}

impl std::fmt::Display for EnvCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} at offset {:#x} ({:#x} bytes)",
            self.device.display(),
            self.offset,
            self.size
        )
    }
}

fn parse_number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

/// Parses `fw_env.config` text (`DEVICE OFFSET ENVSIZE [SECTORSIZE [SECTORS]]` per
/// line, `#` comments, numbers decimal or `0x` hex); `origin` names it in errors.
pub fn parse_fw_env_config(text: &str, origin: &Path) -> Result<Vec<EnvCopy>, BootError> {
    let mut copies = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_ascii_whitespace().collect();
        let bad = |what: &str| BootError::format(origin, format!("line {}: {what}", n + 1));
        if f.len() < 3 || f.len() > 5 {
            return Err(bad("expected DEVICE OFFSET ENVSIZE [SECTORSIZE [SECTORS]]"));
        }
        let offset = parse_number(f[1]).ok_or_else(|| bad("bad offset"))?;
        let size = parse_number(f[2]).ok_or_else(|| bad("bad size"))?;
        copies.push(EnvCopy {
            device: PathBuf::from(f[0]),
            offset,
            size: usize::try_from(size).map_err(|_| bad("bad size"))?,
        });
    }
    Ok(copies)
}

/// The environment as read: its variables in order, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Env {
    /// `name=value` pairs in their on-disk order (bytes: U-Boot does not require UTF-8).
    pub vars: Vars,
    /// The copy in force (index into the configured copies).
    pub current: usize,
    /// Its flags byte (redundant layout only).
    pub flags: Option<u8>,
    /// What is wrong with the other copy, if anything.
    pub problems: Vec<String>,
}

impl Env {
    /// The value of `name` (the last one, should a name appear twice).
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.vars
            .iter()
            .rev()
            .find(|(n, _)| n == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// Sets (`Some`) or deletes (`None`) `name`; a new name goes at the end.
    fn set(&mut self, name: &str, value: Option<&str>) {
        let pos = self.vars.iter().position(|(n, _)| n == name.as_bytes());
        self.vars.retain(|(n, _)| n != name.as_bytes());
        if let Some(v) = value {
            let entry = (name.as_bytes().to_vec(), v.as_bytes().to_vec());
            match pos {
                Some(p) => self.vars.insert(p, entry),
                None => self.vars.push(entry),
            }
        }
    }
}

/// Parses the data area: `name=value\0` … `\0`. Total on any input.
fn parse_data(data: &[u8]) -> Result<Vars, String> {
    let mut vars = Vec::new();
    let mut rest = data;
    loop {
        let end = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or("the variable list has no terminating NUL")?;
        if end == 0 {
            return Ok(vars);
        }
        let (entry, tail) = rest.split_at(end);
        let eq = entry
            .iter()
            .position(|&b| b == b'=')
            .filter(|&i| i > 0)
            .ok_or_else(|| {
                format!(
                    "entry {:?} is not name=value",
                    String::from_utf8_lossy(entry)
                )
            })?;
        vars.push((entry[..eq].to_vec(), entry[eq + 1..].to_vec()));
        rest = tail.get(1..).unwrap_or_default();
    }
}

/// Serializes `vars` into a data area of `len` bytes, zero-padded.
fn serialize(vars: &[(Vec<u8>, Vec<u8>)], len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len);
    for (n, v) in vars {
        out.extend_from_slice(n);
        out.push(b'=');
        out.extend_from_slice(v);
        out.push(0);
    }
    out.push(0);
    if vars.is_empty() {
        out.push(0);
    }
    if out.len() > len {
        return None;
    }
    out.resize(len, 0);
    Some(out)
}

/// Which of two valid redundant copies is newer, as U-Boot decides.
fn newer(f0: u8, f1: u8) -> usize {
    match (f0, f1) {
        (255, 0) => 1,
        (0, 255) => 0,
        _ if f1 > f0 => 1,
        _ => 0,
    }
}

/// Boot control through the U-Boot environment.
#[derive(Debug, Clone)]
pub struct UbootBoot {
    copies: Vec<EnvCopy>,
}

impl UbootBoot {
    /// Boot control over one (single) or two (redundant) environment copies. Checks the
    /// layout only; reads nothing.
    pub fn new(copies: Vec<EnvCopy>) -> Result<Self, BootError> {
        let what = match copies.as_slice() {
            [] => Some("no environment copy configured".to_string()),
            [a, b] if a.size != b.size => Some(format!(
                "the two environment copies differ in size ({a}; {b})"
            )),
            [a, b] if a.device == b.device && a.offset.abs_diff(b.offset) < a.size as u64 => {
                Some(format!("the two environment copies overlap ({a}; {b})"))
            }
            [_] | [_, _] => None,
            _ => Some(format!(
                "{} environment copies configured; U-Boot has one or two",
                copies.len()
            )),
        };
        if let Some(w) = what {
            return Err(BootError::Invalid(w));
        }
        if let Some(c) = copies.iter().find(|c| c.size < 8 || c.size > MAX_ENV_SIZE) {
            return Err(BootError::Invalid(format!(
                "{c}: environment size out of range (8 to {MAX_ENV_SIZE} bytes)"
            )));
        }
        Ok(Self { copies })
    }

    /// Boot control over the copies an `fw_env.config` file names.
    pub fn from_fw_env_config(path: &Path) -> Result<Self, BootError> {
        let text = std::fs::read_to_string(path).map_err(BootError::io("reading", path))?;
        Self::new(parse_fw_env_config(&text, path)?)
    }

    /// The configured copies.
    pub fn copies(&self) -> &[EnvCopy] {
        &self.copies
    }

    fn redundant(&self) -> bool {
        self.copies.len() == 2
    }

    /// The header length: CRC, and the flags byte when redundant.
    fn header(&self) -> usize {
        if self.redundant() { 5 } else { 4 }
    }

    /// Reads and checks one copy: its flags byte and variables.
    fn read_copy(&self, c: &EnvCopy) -> Result<(Option<u8>, Vars), String> {
        let f = File::open(&c.device).map_err(|e| format!("opening: {e}"))?;
        let mut buf = vec![0u8; c.size];
        f.read_exact_at(&mut buf, c.offset)
            .map_err(|e| format!("reading: {e}"))?;
        let (head, data) = buf.split_at(self.header());
        let stored = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let computed = crc32fast::hash(data);
        if stored != computed {
            return Err(format!(
                "CRC32 mismatch (stored {stored:08x}, computed {computed:08x})"
            ));
        }
        let vars = parse_data(data)?;
        Ok((head.get(4).copied(), vars))
    }

    /// Reads the environment in force (the valid copy, or the newer of two).
    pub fn read_env(&self) -> Result<Env, BootError> {
        let reads: Vec<_> = self.copies.iter().map(|c| self.read_copy(c)).collect();
        let flag = |r: &Result<(Option<u8>, _), String>| match r {
            Ok((f, _)) => f.unwrap_or(0),
            Err(_) => 0,
        };
        let current = match (reads.first(), reads.get(1)) {
            (Some(Ok(_)), None) => 0,
            (Some(Ok(_)), Some(Err(_))) => 0,
            (Some(Err(_)), Some(Ok(_))) => 1,
            (Some(a @ Ok(_)), Some(b @ Ok(_))) => newer(flag(a), flag(b)),
            _ => {
                let why: Vec<String> = self
                    .copies
                    .iter()
                    .zip(&reads)
                    .filter_map(|(c, r)| r.as_ref().err().map(|e| format!("{c}: {e}")))
                    .collect();
                return Err(BootError::Invalid(format!(
                    "no valid U-Boot environment: {}",
                    why.join("; ")
                )));
            }
        };
        let mut problems = Vec::new();
        for (i, r) in reads.iter().enumerate() {
            if let Err(e) = r
                && i != current
            {
                let p = format!(
                    "U-Boot environment copy {} ({}) is invalid: {e}; using copy {}",
                    i + 1,
                    self.copies[i],
                    current + 1
                );
                tracing::warn!("{p}");
                problems.push(p);
            }
        }
        let (flags, vars) = match reads.into_iter().nth(current) {
            Some(Ok(x)) => x,
            _ => return Err(BootError::Invalid("environment copy vanished".into())),
        };
        Ok(Env {
            vars,
            current,
            flags,
            problems,
        })
    }

    /// Writes `env` as the new environment: into the other copy with the flags byte one
    /// up (redundant), or replacing the single copy; fsynced.
    fn write_env(&self, env: &Env) -> Result<(), BootError> {
        let target = if self.redundant() { 1 - env.current } else { 0 };
        let c = &self.copies[target];
        let data = serialize(&env.vars, c.size - self.header()).ok_or_else(|| {
            BootError::Invalid(format!(
                "{c}: the environment does not fit (U-Boot environment full)"
            ))
        })?;
        let mut buf = crc32fast::hash(&data).to_le_bytes().to_vec();
        if self.redundant() {
            buf.push(env.flags.unwrap_or(0).wrapping_add(1));
        }
        buf.extend_from_slice(&data);
        let path = &c.device;
        let meta = std::fs::metadata(path).map_err(BootError::io("inspecting", path))?;
        if !self.redundant() && meta.is_file() {
            // A plain file: replace it whole, so that a power cut leaves old or new.
            let mut whole = std::fs::read(path).map_err(BootError::io("reading", path))?;
            let start = usize::try_from(c.offset)
                .map_err(|_| BootError::format(path, "offset too large"))?;
            let end = start + buf.len();
            if whole.len() < end {
                whole.resize(end, 0);
            }
            whole[start..end].copy_from_slice(&buf);
            return write_atomic(path, &whole);
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .map_err(BootError::io("opening", path))?;
        f.write_all_at(&buf, c.offset)
            .map_err(BootError::io("writing", path))?;
        f.sync_all().map_err(BootError::io("syncing", path))
    }

    /// Sets (`Some`) or deletes (`None`) variables in one write, other variables kept.
    /// Writes nothing when nothing changes and no copy needs repair.
    pub fn set_vars(&self, changes: &[(&str, Option<&str>)]) -> Result<(), BootError> {
        for (n, v) in changes {
            if n.is_empty() || n.contains(['=', '\0']) || v.is_some_and(|v| v.contains('\0')) {
                return Err(BootError::Invalid(format!(
                    "not a U-Boot variable assignment: {n:?}={v:?}"
                )));
            }
        }
        let mut env = self.read_env()?;
        let before = env.vars.clone();
        for (n, v) in changes {
            env.set(n, *v);
        }
        if env.vars == before && env.problems.is_empty() {
            return Ok(());
        }
        self.write_env(&env)
    }

    fn read_ab(&self) -> Result<(Env, Ab), BootError> {
        let env = self.read_env()?;
        let ab = Ab::from_env(&env);
        Ok((env, ab))
    }

    fn store(&self, ab: Ab) -> Result<(), BootError> {
        self.set_vars(&[
            (DEFAULT, Some(ab.default.as_str())),
            (TRIAL, ab.trial.map(Slot::as_str)),
            (A_OK, Some(if ab.ok[0] { "1" } else { "0" })),
            (B_OK, Some(if ab.ok[1] { "1" } else { "0" })),
        ])
    }

    fn refuse_last(&self, what: &str, slot: Slot, ab: &Ab) -> Result<(), BootError> {
        if ab.default == slot && !ab.ok[(!slot).index()] {
            return Err(BootError::Invalid(format!(
                "refusing to {what} slot {slot} in the U-Boot environment ({}): it is the default and slot {} is not bootable",
                self.copies[0], !slot
            )));
        }
        Ok(())
    }

    fn unboot(&self, what: &str, slot: Slot) -> Result<(), BootError> {
        let (_, mut ab) = self.read_ab()?;
        self.refuse_last(what, slot, &ab)?;
        if ab.default == slot {
            ab.default = !slot;
        }
        if ab.trial == Some(slot) {
            ab.trial = None;
        }
        ab.ok[slot.index()] = false;
        self.store(ab)
    }
}

/// The A/B variables, read as the `bootcmd` script reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Ab {
    default: Slot,
    /// `cairn_trial`, if it names a slot (any other value is cleared and ignored).
    trial: Option<Slot>,
    ok: [bool; 2],
}

impl Ab {
    fn from_env(env: &Env) -> Ab {
        let slot = |v: Option<&[u8]>| match v {
            Some(b"a") => Some(Slot::A),
            Some(b"b") => Some(Slot::B),
            _ => None,
        };
        Ab {
            default: if env.get(DEFAULT) == Some(b"b") {
                Slot::B
            } else {
                Slot::A
            },
            trial: slot(env.get(TRIAL)),
            ok: [env.get(A_OK) != Some(b"0"), env.get(B_OK) == Some(b"1")],
        }
    }
}

impl BootControl for UbootBoot {
    fn name(&self) -> &'static str {
        "uboot"
    }

    fn state(&self) -> Result<BootState, BootError> {
        let (_, ab) = self.read_ab()?;
        Ok(BootState {
            default: ab.default,
            trial: ab.trial.filter(|t| ab.ok[t.index()]),
            bootable: ab.ok,
        })
    }

    fn mark_unbootable(&mut self, slot: Slot) -> Result<(), BootError> {
        self.unboot("make unbootable", slot)
    }

    fn arm_trial(&mut self, slot: Slot) -> Result<RebootKind, BootError> {
        let (_, mut ab) = self.read_ab()?;
        ab.ok[slot.index()] = true;
        ab.trial = Some(slot);
        self.store(ab)?;
        Ok(RebootKind::Normal)
    }

    fn commit(&mut self, slot: Slot) -> Result<(), BootError> {
        let (_, mut ab) = self.read_ab()?;
        ab.default = slot;
        ab.trial = None;
        ab.ok[slot.index()] = true;
        self.store(ab)
    }

    fn reject(&mut self, slot: Slot) -> Result<(), BootError> {
        self.unboot("reject", slot)
    }
}

/// Plays the `bootcmd` script of the module documentation once: a pending trial is
/// cleared (and the environment saved) before it is booted; otherwise the default
/// boots, or the other slot if the default is not bootable. Returns the slot; fails
/// when none is bootable.
pub fn firmware_boot(boot: &UbootBoot) -> Result<Slot, BootError> {
    let env = boot.read_env()?;
    let ab = Ab::from_env(&env);
    let mut slot = None;
    if env.get(TRIAL).is_some_and(|v| !v.is_empty()) {
        boot.set_vars(&[(TRIAL, None)])?;
        slot = ab.trial.filter(|t| ab.ok[t.index()]);
    }
    let slot = slot
        .or_else(|| {
            [ab.default, !ab.default]
                .into_iter()
                .find(|s| ab.ok[s.index()])
        })
        .ok_or_else(|| {
            BootError::Invalid(format!(
                "no bootable slot in the U-Boot environment ({})",
                boot.copies[env.current]
            ))
        })?;
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_parsing_is_total() {
        assert_eq!(
            parse_data(b"a=1\0bb=\0c==x\0\0\xff\xff").unwrap(),
            vec![
                (b"a".to_vec(), b"1".to_vec()),
                (b"bb".to_vec(), b"".to_vec()),
                (b"c".to_vec(), b"=x".to_vec())
            ]
        );
        assert_eq!(parse_data(b"\0\0").unwrap(), vec![]);
        assert!(parse_data(b"a=1\0b=2").is_err());
        assert!(parse_data(b"a=1").is_err());
        assert!(parse_data(b"").is_err());
        assert!(parse_data(b"noequals\0\0").is_err());
        assert!(parse_data(b"=v\0\0").is_err());
    }

    #[test]
    fn serialize_round_trips_and_knows_when_full() {
        let vars = vec![(b"x".to_vec(), b"yz".to_vec())];
        let d = serialize(&vars, 16).unwrap();
        assert_eq!(&d[..6], b"x=yz\0\0");
        assert_eq!(parse_data(&d).unwrap(), vars);
        assert!(serialize(&vars, 5).is_none());
        assert!(serialize(&vars, 6).is_some());
        assert_eq!(parse_data(&serialize(&[], 4).unwrap()).unwrap(), vec![]);
    }

    #[test]
    fn flags_wrap_like_u_boot() {
        assert_eq!(newer(1, 2), 1);
        assert_eq!(newer(2, 1), 0);
        assert_eq!(newer(255, 0), 1);
        assert_eq!(newer(0, 255), 0);
        assert_eq!(newer(7, 7), 0);
    }

    #[test]
    fn fw_env_config_lines() {
        let c = parse_fw_env_config(
            "# comment\n\n/dev/mmcblk0 0x3fe000 0x2000 0x200 # inline\n/dev/mmcblk0\t4194304 8192\n",
            Path::new("/etc/fw_env.config"),
        )
        .unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(
            (c[0].offset, c[0].size, c[1].offset, c[1].size),
            (0x3fe000, 0x2000, 0x3fe000 + 0x2000, 0x2000)
        );
        let e = parse_fw_env_config("/dev/x zz 0x2000\n", Path::new("/etc/fw_env.config"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("/etc/fw_env.config") && e.contains("line 1"),
            "{e}"
        );
        assert!(UbootBoot::new(c.clone()).is_ok());
        let mut overlap = c.clone();
        overlap[1].offset = 0x3fe000 + 0x1000;
        assert!(UbootBoot::new(overlap).is_err());
        assert!(UbootBoot::new(vec![]).is_err());
        assert!(UbootBoot::new(vec![c[0].clone(), c[1].clone(), c[0].clone()]).is_err());
    }
}
