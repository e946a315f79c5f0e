//! The Linux IMA runtime measurement list (binary format) and its replay, "where
//! present": many boxes do not enable IMA, and then there is nothing to check.
//!
//! # Format
//!
//! The kernel exports the list in securityfs (`security/integrity/ima/ima_fs.c`,
//! `ima_measurements_show()`), one record after another, no header, integers in the
//! CPU's byte order (little-endian on x86 and arm64; big-endian kernels write
//! little-endian only when booted with `ima_canonical_fmt`, and this parser reads
//! little-endian only):
//!
//! | field           | size                                                       |
//! |-----------------|------------------------------------------------------------|
//! | PCR index       | u32                                                        |
//! | template digest | 20 bytes in the sha1 file, the bank's digest size in a per-bank file |
//! | name length     | u32                                                        |
//! | template name   | that many bytes, no NUL (`ima-ng`, or a custom format string such as `d-ng\|n-ng\|buf`) |
//! | data length     | u32 — **absent for the legacy `ima` template**            |
//! | template data   | for every template but `ima`: each field as u32 length + bytes; for `ima`: the 20-byte `d` digest, then u32 length + the `n` name without NUL |
//!
//! Templates (`Documentation/security/IMA-templates.rst`): `ima` = `d|n`, `ima-ng` =
//! `d-ng|n-ng` (the default), `ima-ngv2` = `d-ngv2|n-ng`, `ima-sig` = `d-ng|n-ng|sig`,
//! `ima-sigv2` = `d-ngv2|n-ng|sig`, `ima-buf` = `d-ng|n-ng|buf`, `ima-modsig` =
//! `d-ng|n-ng|sig|d-modsig|modsig`, `evm-sig` = `d-ng|n-ng|evmsig|xattrnames|…|imode`.
//! Field formats (`ima_template_lib.c`): `d-ng` is `<algo>:\0<digest>` (e.g.
//! `sha256:\0` + 32 bytes), `d-ngv2` is `<ima|verity>:<algo>:\0<digest>`, `n-ng` is the
//! path with its terminating NUL (spaces replaced by `_`).
//!
//! # Files and banks
//!
//! `binary_runtime_measurements` carries the **sha1** template digest of every entry.
//! Since Linux 6.10 ("ima: add crypto agility support for template-hash algorithm")
//! there is also one file per PCR bank, `binary_runtime_measurements_<algo>` (e.g.
//! `_sha256`), with that bank's template digest, and the legacy name is a symlink to
//! `binary_runtime_measurements_sha1`.
//!
//! The template digest of a bank is that bank's hash over the template data
//! (`ima_calc_field_array_hash_tfm()` in `ima_crypto.c`): for every template but `ima`
//! exactly the template data as exported; for `ima`, the 20-byte `d` digest followed by
//! the name zero-padded to 256 bytes. Since Linux 5.8 the kernel extends **each bank
//! with its own template digest**. Hence:
//!
//! * The sha1-format file replays **only the sha1 bank**. The sha256 bank of PCR 10 was
//!   extended with sha256 template digests, which are not in that file and cannot be
//!   derived from it without the data and the rules above — and the hub would then be
//!   trusting data it cannot tie to the quote entry by entry. [`ImaLog::replay`] refuses
//!   with [`ImaError::WrongBank`] rather than give a value that would never match.
//! * Only a per-bank file (`binary_runtime_measurements_sha256`) replays the sha256
//!   bank, which is the bank Cairn quotes. **A kernel without per-bank files (before
//!   6.10) gives the hub no way to check PCR 10 in the sha256 bank**: the agent then
//!   reports no IMA list ([`crate::attest::Attester::ima_log`] is `None`), and the hub
//!   must treat IMA as unverified, not as passed.
//! * Kernels before 5.8 extended every bank with the sha1 template digest zero-padded
//!   to the bank's size; this module does not model that (it could not tell such a
//!   kernel from a newer one), so such boxes fail verification rather than pass it.
//!
//! A **violation** (a file opened for write while measured, or the reverse) is an entry
//! whose template digest is all zeros; the kernel extends the PCR with all `0xFF`
//! bytes instead (`ima_add_template_entry()` and `ima_init_digests()` in
//! `ima_queue.c`). Its template data is not bound by any digest.
//!
//! Parsing is pure and total like [`crate::eventlog`]: every length is checked against
//! what is left, sizes and counts are capped, and malformed input gives an
//! [`ImaError`] saying which entry and which byte.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;

use ring::digest;

use crate::eventlog::{MAX_PCR, alg};

/// The PCR IMA extends unless its policy says otherwise (`CONFIG_IMA_MEASURE_PCR_IDX`).
pub const IMA_PCR: u32 = 10;
/// Where securityfs shows IMA's files.
pub const SECURITYFS_DIR: &str = "/sys/kernel/security/ima";
/// Most entries a list may hold (a full `tcb` policy on a busy box reaches 10⁵).
pub const MAX_ENTRIES: usize = 1_000_000;
/// Largest list accepted, in bytes.
pub const MAX_LIST_BYTES: usize = 256 * 1024 * 1024;
/// Largest template data of one entry (`ima-buf` and signatures are the big ones).
pub const MAX_TEMPLATE_DATA: usize = 16 * 1024 * 1024;
/// Longest template name (a custom format string) accepted.
pub const MAX_TEMPLATE_NAME: usize = 255;
/// Most fields a template has (`IMA_TEMPLATE_NUM_FIELDS_MAX`).
pub const MAX_FIELDS: usize = 15;
/// The name of the first entry of every list: the aggregate of the boot PCRs.
pub const BOOT_AGGREGATE: &str = "boot_aggregate";

/// The legacy template, with its implicit data length and padded name.
const LEGACY_TEMPLATE: &str = "ima";
/// `IMA_DIGEST_SIZE`: the legacy `d` field (sha1, or md5 zero-padded).
const LEGACY_DIGEST_LEN: usize = 20;
/// `IMA_EVENT_NAME_LEN_MAX`: the legacy `n` field's longest name; hashed padded to +1.
const LEGACY_NAME_MAX: usize = 255;

/// The kernel's built-in templates and their formats.
const TEMPLATES: &[(&str, &str)] = &[
    ("ima", "d|n"),
    ("ima-ng", "d-ng|n-ng"),
    ("ima-ngv2", "d-ngv2|n-ng"),
    ("ima-sig", "d-ng|n-ng|sig"),
    ("ima-sigv2", "d-ngv2|n-ng|sig"),
    ("ima-buf", "d-ng|n-ng|buf"),
    ("ima-modsig", "d-ng|n-ng|sig|d-modsig|modsig"),
    (
        "evm-sig",
        "d-ng|n-ng|evmsig|xattrnames|xattrlengths|xattrvalues|iuid|igid|imode",
    ),
];

/// Every template field id the kernel knows (`supported_fields[]` in `ima_template.c`).
const FIELD_IDS: &[&str] = &[
    "d",
    "n",
    "d-ng",
    "d-ngv2",
    "n-ng",
    "sig",
    "d-modsig",
    "modsig",
    "buf",
    "evmsig",
    "iuid",
    "igid",
    "imode",
    "xattrnames",
    "xattrlengths",
    "xattrvalues",
];

/// A PCR bank, and so the per-bank list format whose template digests it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Bank {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl Bank {
    /// Template digest size in this bank's list, and PCR size.
    pub fn digest_len(self) -> usize {
        self.algorithm().output_len()
    }

    /// The TPM algorithm id ([`crate::eventlog::alg`]).
    pub fn alg(self) -> u16 {
        match self {
            Bank::Sha1 => alg::SHA1,
            Bank::Sha256 => alg::SHA256,
            Bank::Sha384 => alg::SHA384,
            Bank::Sha512 => alg::SHA512,
        }
    }

    pub fn from_alg(id: u16) -> Option<Self> {
        [Bank::Sha1, Bank::Sha256, Bank::Sha384, Bank::Sha512]
            .into_iter()
            .find(|b| b.alg() == id)
    }

    /// The kernel's name for the hash (`hash_algo_name[]`).
    pub fn name(self) -> &'static str {
        match self {
            Bank::Sha1 => "sha1",
            Bank::Sha256 => "sha256",
            Bank::Sha384 => "sha384",
            Bank::Sha512 => "sha512",
        }
    }

    /// The securityfs file (in [`SECURITYFS_DIR`]) holding this bank's list, e.g.
    /// `binary_runtime_measurements_sha256` (Linux 6.10+). Before 6.10 only the sha1 list
    /// exists, as `binary_runtime_measurements`.
    pub fn list_file(self) -> String {
        format!("binary_runtime_measurements_{}", self.name())
    }

    fn algorithm(self) -> &'static digest::Algorithm {
        match self {
            Bank::Sha1 => &digest::SHA1_FOR_LEGACY_USE_ONLY,
            Bank::Sha256 => &digest::SHA256,
            Bank::Sha384 => &digest::SHA384,
            Bank::Sha512 => &digest::SHA512,
        }
    }
}

impl fmt::Display for Bank {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What was wrong with a list, or with what it claims.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImaError {
    #[error(
        "IMA list truncated in entry {entry} at byte {offset}: {what} needs {need} bytes, {have} left"
    )]
    Truncated {
        entry: usize,
        offset: usize,
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("IMA list entry {entry} at byte {offset}: {reason}")]
    Malformed {
        entry: usize,
        offset: usize,
        reason: String,
    },
    #[error("IMA list of {size} bytes is larger than the {MAX_LIST_BYTES} accepted")]
    TooLarge { size: usize },
    #[error("IMA list holds more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    #[error(
        "a list of {list} template digests cannot be replayed into the {asked} bank: the kernel \
         extends each bank with its own template digest, exported only in {}; a box \
         without that file cannot have PCR 10 checked in the {asked} bank",
        asked.list_file()
    )]
    WrongBank { list: Bank, asked: Bank },
    #[error("IMA list entry {entry} at byte {offset}: template digest does not match its data")]
    TemplateDigest { entry: usize, offset: usize },
    #[error(
        "IMA list entry {entry} is extended into PCR {pcr}; only PCR {IMA_PCR} is checked \
         against the quote, so an IMA policy using other PCRs cannot be verified here"
    )]
    OtherPcr { entry: usize, pcr: u32 },
    #[error(
        "IMA list does not replay to the quoted PCR {IMA_PCR} (sha256) {quoted}: none of its \
         {entries} prefixes does (the whole list gives {log}); was it read before the quote, \
         or altered?"
    )]
    Mismatch {
        entries: usize,
        log: String,
        quoted: String,
    },
}

/// One measurement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Where the entry starts in the list.
    pub offset: usize,
    pub pcr: u32,
    /// The list's bank's template digest; all zeros for a violation.
    pub template_digest: Vec<u8>,
    /// The template's name (`ima-ng`, …) or, for a custom template, its format string.
    pub template_name: String,
    /// The template data as exported (see the module docs; for `ima`, the 20-byte
    /// digest, the u32 name length and the name).
    pub template_data: Vec<u8>,
    /// Where each field's value lies in `template_data`.
    fields: Vec<Range<usize>>,
}

/// A file digest from a `d`, `d-ng` or `d-ngv2` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileDigest<'a> {
    /// `ima` or `verity` (`d-ngv2` only).
    pub digest_type: Option<&'a str>,
    /// The kernel's name of the hash (`sha256`, …); `None` for the legacy `d` field
    /// (sha1, or md5 zero-padded to 20 bytes).
    pub algo: Option<&'a str>,
    /// All zeros in a violation.
    pub digest: &'a [u8],
}

impl Entry {
    /// A violation: extended as all `0xFF`, and its data is bound by nothing.
    pub fn is_violation(&self) -> bool {
        self.template_digest.iter().all(|&b| b == 0)
    }

    /// The field values, in template order (without their length prefixes).
    pub fn fields(&self) -> impl Iterator<Item = &[u8]> {
        self.fields
            .iter()
            .filter_map(|r| self.template_data.get(r.clone()))
    }

    /// The template's field ids, if it is a built-in template or a format string of
    /// known fields.
    pub fn field_ids(&self) -> Option<Vec<&str>> {
        field_ids(&self.template_name)
    }

    /// The value of field `id` (`"n-ng"`, `"sig"`, `"buf"`, …), if the template has it.
    pub fn field(&self, id: &str) -> Option<&[u8]> {
        let i = self.field_ids()?.iter().position(|f| *f == id)?;
        self.template_data.get(self.fields.get(i)?.clone())
    }

    /// The measured file's (or buffer's) digest, if the template has a digest field and
    /// it is well formed.
    pub fn file_digest(&self) -> Option<FileDigest<'_>> {
        if let Some(d) = self.field("d") {
            return Some(FileDigest {
                digest_type: None,
                algo: None,
                digest: d,
            });
        }
        if let Some(v) = self.field("d-ng") {
            let (prefix, digest) = split_digest(v)?;
            return (!prefix.contains(':')).then_some(FileDigest {
                digest_type: None,
                algo: Some(prefix),
                digest,
            });
        }
        let (prefix, digest) = split_digest(self.field("d-ngv2")?)?;
        let (digest_type, algo) = prefix.split_once(':')?;
        (!algo.contains(':')).then_some(FileDigest {
            digest_type: Some(digest_type),
            algo: Some(algo),
            digest,
        })
    }

    /// The event name (a file path, `boot_aggregate`, a key ring, …) without the
    /// trailing NUL; bytes, as Linux paths are.
    pub fn name(&self) -> Option<&[u8]> {
        if let Some(n) = self.field("n") {
            return Some(n);
        }
        let n = self.field("n-ng")?;
        Some(n.strip_suffix(&[0]).unwrap_or(n))
    }

    pub fn is_boot_aggregate(&self) -> bool {
        self.name() == Some(BOOT_AGGREGATE.as_bytes())
    }

    /// The template digest `bank` would give this entry's data (what a non-violation
    /// entry's `template_digest` must be in `bank`'s list).
    pub fn computed_template_digest(&self, bank: Bank) -> Vec<u8> {
        let mut ctx = digest::Context::new(bank.algorithm());
        if self.template_name == LEGACY_TEMPLATE {
            // `d`, then the name padded with zeros to IMA_EVENT_NAME_LEN_MAX + 1 bytes.
            let mut fields = self.fields();
            let d = fields.next().unwrap_or_default();
            let n = fields.next().unwrap_or_default();
            ctx.update(d);
            ctx.update(n);
            let pad = (LEGACY_NAME_MAX + 1).saturating_sub(n.len());
            ctx.update(&[0u8; LEGACY_NAME_MAX + 1][..pad]);
        } else {
            ctx.update(&self.template_data);
        }
        ctx.finish().as_ref().to_vec()
    }

    /// What the kernel extended the PCR with for this entry.
    fn extended(&self) -> Vec<u8> {
        if self.is_violation() {
            vec![0xff; self.template_digest.len()]
        } else {
            self.template_digest.clone()
        }
    }
}

/// `<prefix>:\0<digest>` → (prefix without its final ':', digest).
fn split_digest(v: &[u8]) -> Option<(&str, &[u8])> {
    let nul = v.iter().position(|&b| b == 0)?;
    let prefix = std::str::from_utf8(v.get(..nul)?).ok()?;
    let prefix = prefix.strip_suffix(':')?;
    Some((prefix, v.get(nul + 1..)?))
}

fn field_ids(template_name: &str) -> Option<Vec<&str>> {
    let format = TEMPLATES
        .iter()
        .find(|(name, _)| *name == template_name)
        .map_or(template_name, |(_, format)| *format);
    let ids: Vec<&str> = format.split('|').collect();
    ids.iter().all(|id| FIELD_IDS.contains(id)).then_some(ids)
}

/// A parsed list, as exported for [`ImaLog::bank`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImaLog {
    /// The bank whose template digests the list carries (the file it came from).
    pub bank: Bank,
    pub entries: Vec<Entry>,
}

impl ImaLog {
    /// The value of every PCR the list extends, in `bank`: each starts at zero and is
    /// extended with each of its entries' template digests in order (all `0xFF` for a
    /// violation). Only the bank the list was exported for can be replayed
    /// ([`ImaError::WrongBank`] otherwise; see the module docs).
    pub fn replay(&self, bank: Bank) -> Result<BTreeMap<u32, Vec<u8>>, ImaError> {
        self.require_bank(bank)?;
        let mut pcrs: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        for e in &self.entries {
            let cur = pcrs
                .entry(e.pcr)
                .or_insert_with(|| vec![0u8; bank.digest_len()]);
            *cur = extend(bank, cur, &e.extended());
        }
        Ok(pcrs)
    }

    /// The value `pcr` replays to in `bank`; `None` if the list has no entry for it.
    pub fn replay_pcr(&self, bank: Bank, pcr: u32) -> Result<Option<Vec<u8>>, ImaError> {
        Ok(self.replay(bank)?.remove(&pcr))
    }

    /// Checks that every entry's template digest is the digest of its data (violations
    /// excepted: they carry none), so that what the entries say is bound by the PCR.
    pub fn check_template_digests(&self) -> Result<(), ImaError> {
        for (i, e) in self.entries.iter().enumerate() {
            if !e.is_violation() && e.computed_template_digest(self.bank) != e.template_digest {
                return Err(ImaError::TemplateDigest {
                    entry: i,
                    offset: e.offset,
                });
            }
        }
        Ok(())
    }

    fn require_bank(&self, bank: Bank) -> Result<(), ImaError> {
        if bank == self.bank {
            Ok(())
        } else {
            Err(ImaError::WrongBank {
                list: self.bank,
                asked: bank,
            })
        }
    }
}

fn extend(bank: Bank, pcr: &[u8], value: &[u8]) -> Vec<u8> {
    let mut ctx = digest::Context::new(bank.algorithm());
    ctx.update(pcr);
    ctx.update(value);
    ctx.finish().as_ref().to_vec()
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Absolute offset of `buf[0]` in the list, for errors.
    base: usize,
    entry: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ImaError> {
        let rest = self.buf.get(self.pos..).unwrap_or_default();
        match rest.get(..n) {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(ImaError::Truncated {
                entry: self.entry,
                offset: self.base + self.pos,
                what,
                need: n,
                have: rest.len(),
            }),
        }
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ImaError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn len(&mut self, what: &'static str, max: usize) -> Result<usize, ImaError> {
        let offset = self.base + self.pos;
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(self.malformed(offset, format!("{what} {n} is above {max}")));
        }
        Ok(n)
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn malformed(&self, offset: usize, reason: String) -> ImaError {
        ImaError::Malformed {
            entry: self.entry,
            offset,
            reason,
        }
    }
}

/// Parses a binary runtime measurement list exported for `bank`:
/// `binary_runtime_measurements` (or `_sha1`) with [`Bank::Sha1`],
/// `binary_runtime_measurements_sha256` with [`Bank::Sha256`], and so on. Structure
/// only; [`ImaLog::check_template_digests`] ties the data to the digests.
pub fn parse(bytes: &[u8], bank: Bank) -> Result<ImaLog, ImaError> {
    if bytes.len() > MAX_LIST_BYTES {
        return Err(ImaError::TooLarge { size: bytes.len() });
    }
    let mut r = Reader {
        buf: bytes,
        pos: 0,
        base: 0,
        entry: 0,
    };
    let mut entries = Vec::new();
    while !r.done() {
        if entries.len() >= MAX_ENTRIES {
            return Err(ImaError::TooManyEntries);
        }
        r.entry = entries.len();
        let offset = r.pos;
        let pcr = r.u32("PCR index")?;
        if pcr > MAX_PCR {
            let hint = if pcr.swap_bytes() <= MAX_PCR {
                " (a big-endian list? boot the box with ima_canonical_fmt)"
            } else {
                ""
            };
            return Err(r.malformed(offset, format!("PCR index {pcr} is above {MAX_PCR}{hint}")));
        }
        let template_digest = r.take(bank.digest_len(), "template digest")?.to_vec();
        let name_at = r.pos;
        let name_len = r.len("template name length", MAX_TEMPLATE_NAME)?;
        let name = r.take(name_len, "template name")?;
        if name.is_empty() || !name.iter().all(u8::is_ascii_graphic) {
            return Err(r.malformed(
                name_at,
                format!(
                    "template name {:?} is not a printable name",
                    String::from_utf8_lossy(name)
                ),
            ));
        }
        let template_name = String::from_utf8_lossy(name).into_owned();
        let (template_data, fields) = if template_name == LEGACY_TEMPLATE {
            legacy_data(&mut r)?
        } else {
            let data_at = r.pos;
            let len = r.len("template data length", MAX_TEMPLATE_DATA)?;
            let data = r.take(len, "template data")?;
            let fields = split_fields(data, data_at + 4, r.entry)?;
            (data.to_vec(), fields)
        };
        if let Some(ids) = field_ids(&template_name)
            && ids.len() != fields.len()
        {
            return Err(r.malformed(
                offset,
                format!(
                    "template {template_name} has {} fields, the entry {}",
                    ids.len(),
                    fields.len()
                ),
            ));
        }
        entries.push(Entry {
            offset,
            pcr,
            template_digest,
            template_name,
            template_data,
            fields,
        });
    }
    Ok(ImaLog { bank, entries })
}

/// The legacy `ima` template's data: `d` (20 bytes), then u32 length + name, with no
/// data length in front.
fn legacy_data(r: &mut Reader<'_>) -> Result<(Vec<u8>, Vec<Range<usize>>), ImaError> {
    let d = r.take(LEGACY_DIGEST_LEN, "'ima' template digest")?;
    let n = r.len("'ima' template name length", LEGACY_NAME_MAX)?;
    let name = r.take(n, "'ima' template name")?;
    let mut data = Vec::with_capacity(LEGACY_DIGEST_LEN + 4 + n);
    data.extend_from_slice(d);
    data.extend_from_slice(&(n as u32).to_le_bytes());
    data.extend_from_slice(name);
    let at = LEGACY_DIGEST_LEN + 4;
    Ok((data, vec![0..LEGACY_DIGEST_LEN, at..at + n]))
}

/// Splits template data into its fields (each u32 length + bytes), which must use it up.
fn split_fields(data: &[u8], base: usize, entry: usize) -> Result<Vec<Range<usize>>, ImaError> {
    let mut r = Reader {
        buf: data,
        pos: 0,
        base,
        entry,
    };
    let mut fields = Vec::new();
    while !r.done() {
        if fields.len() >= MAX_FIELDS {
            return Err(r.malformed(
                base + r.pos,
                format!("more than {MAX_FIELDS} template fields"),
            ));
        }
        let len = r.u32("template field length")? as usize;
        let start = r.pos;
        r.take(len, "template field")?;
        fields.push(start..start + len);
    }
    Ok(fields)
}

/// The boot aggregate the kernel computes over a sha256 bank (Linux 5.8+,
/// `ima_calc_boot_aggregate_tfm()`): sha256 of PCRs 0–9 concatenated. It is the first
/// entry's digest when that is `sha256:` — the kernel uses the bank of its `ima_hash`
/// algorithm if the TPM has it, else sha256, else sha1 (over PCRs 0–7 only). `None`
/// unless all of PCRs 0–9 are given.
pub fn boot_aggregate_sha256(pcrs: &BTreeMap<u32, [u8; 32]>) -> Option<[u8; 32]> {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for i in 0..=9 {
        ctx.update(pcrs.get(&i)?);
    }
    ctx.finish().as_ref().try_into().ok()
}

/// The boot aggregate from a list's first entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootAggregate {
    /// `sha256`, `sha1`, …: the PCR bank it was computed over.
    pub algo: String,
    pub digest: Vec<u8>,
}

/// What a verified list says, counting only the entries the quote covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImaSummary {
    /// Entries covered by the quote: a prefix of the list, usually all of it.
    pub entries: usize,
    /// Of those, file measurements (not the boot aggregate, buffers or violations).
    pub files: usize,
    /// Of those, buffer measurements (`buf` field: keys, kexec command lines,
    /// device-mapper tables, …).
    pub buffers: usize,
    /// Of those, violations: PCR 10 holds them as `0xFF…`, and their data is unbound.
    pub violations: usize,
    /// Entries after the quoted point (measured after the quote, or extended into the
    /// TPM just after being listed): not attested by this quote.
    pub pending: usize,
    /// The first entry's boot aggregate, if the list starts with one (compare with
    /// [`boot_aggregate_sha256`] when its `algo` is `sha256`).
    pub boot_aggregate: Option<BootAggregate>,
}

/// Verifies a `binary_runtime_measurements_sha256` list against PCR 10 of the sha256
/// bank as the TPM quoted it: every entry is for PCR 10, every non-violation entry's
/// template digest is the sha256 of its data, and the list, or a prefix of it, replays
/// to the quoted value.
///
/// A prefix is accepted because the list only grows and the kernel appends an entry
/// before extending the PCR: a list read after the quote may hold a few more entries,
/// which [`ImaSummary::pending`] counts and nothing else does. A list read *before* the
/// quote may be too short and then fails: agents read it after quoting.
///
/// This needs the per-bank list (Linux 6.10+); see the module docs for why the sha1
/// list cannot stand in for it.
pub fn verify_ima(log: &[u8], quoted_pcr10_sha256: &[u8; 32]) -> Result<ImaSummary, ImaError> {
    verify_ima_from(&[0; 32], log, quoted_pcr10_sha256).map(|(summary, _)| summary)
}

/// [`verify_ima`] for the tail of a list whose head the verifier already checked:
/// `start` is PCR 10 after the head (the replay of the head is a hash chain over it, so
/// the verifier need not keep the head's bytes). Also returns how many bytes of `tail`
/// the quote covers; the head for the next check is `tail[..that]`, and PCR 10 after it
/// is the quoted value.
pub fn verify_ima_from(
    start: &[u8; 32],
    tail: &[u8],
    quoted_pcr10_sha256: &[u8; 32],
) -> Result<(ImaSummary, usize), ImaError> {
    let log = tail;
    let list = parse(log, Bank::Sha256)?;
    if let Some((i, e)) = list
        .entries
        .iter()
        .enumerate()
        .find(|(_, e)| e.pcr != IMA_PCR)
    {
        return Err(ImaError::OtherPcr {
            entry: i,
            pcr: e.pcr,
        });
    }
    list.check_template_digests()?;

    let mut pcr = start.to_vec();
    let mut covered = (pcr == quoted_pcr10_sha256[..]).then_some(0);
    if covered.is_none() {
        for (i, e) in list.entries.iter().enumerate() {
            pcr = extend(Bank::Sha256, &pcr, &e.extended());
            if pcr == quoted_pcr10_sha256[..] {
                covered = Some(i + 1);
                break;
            }
        }
    }
    let Some(n) = covered else {
        return Err(ImaError::Mismatch {
            entries: list.entries.len(),
            log: hex(&pcr),
            quoted: hex(quoted_pcr10_sha256),
        });
    };

    let attested = list.entries.get(..n).unwrap_or_default();
    let mut summary = ImaSummary {
        entries: n,
        files: 0,
        buffers: 0,
        violations: 0,
        pending: list.entries.len() - n,
        boot_aggregate: None,
    };
    for e in attested {
        if e.is_violation() {
            summary.violations += 1;
        } else if e.field("buf").is_some() {
            summary.buffers += 1;
        } else if e.file_digest().is_some() && !e.is_boot_aggregate() {
            summary.files += 1;
        }
    }
    summary.boot_aggregate = attested
        .first()
        .filter(|e| e.is_boot_aggregate() && !e.is_violation())
        .and_then(|e| e.file_digest())
        .map(|d| BootAggregate {
            algo: d.algo.unwrap_or("sha1").to_string(),
            digest: d.digest.to_vec(),
        });
    let consumed = list.entries.get(n).map_or(log.len(), |e| e.offset);
    Ok((summary, consumed))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
