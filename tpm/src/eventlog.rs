//! TCG PC Client firmware event logs (crypto-agile format) and their replay.
//!
//! The log starts with a legacy SHA-1 `TCG_PCR_EVENT` whose data is the "Spec ID Event03"
//! structure listing the digest algorithms and their sizes; every following event is a
//! `TCG_PCR_EVENT2` with one digest per algorithm. Replaying a bank extends, per PCR,
//! `pcr = H(pcr || digest)` from all zeros, except that a `StartupLocality` no-action
//! event sets PCR 0's initial value to the locality the firmware started in.
//!
//! Parsing is pure and total: every length is checked against what is left, counts and
//! sizes are bounded, and malformed input gives an [`EventLogError`] saying where.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256, Sha384, Sha512};

/// TPM algorithm ids of the digest algorithms a log may carry.
pub mod alg {
    pub const SHA1: u16 = 0x0004;
    pub const SHA256: u16 = 0x000b;
    pub const SHA384: u16 = 0x000c;
    pub const SHA512: u16 = 0x000d;
    pub const SM3_256: u16 = 0x0012;
}

/// Event types this module treats specially.
pub mod event_type {
    /// Not extended into any PCR (Spec ID, StartupLocality, …).
    pub const EV_NO_ACTION: u32 = 0x0000_0003;
    pub const EV_SEPARATOR: u32 = 0x0000_0004;
}

/// Most events a log may hold (real firmware logs have tens to a few hundred).
pub const MAX_EVENTS: usize = 100_000;
/// Largest event data accepted.
pub const MAX_EVENT_DATA: usize = 16 * 1024 * 1024;
/// Highest PCR index (TPM 2.0 PC Client platforms have 24).
pub const MAX_PCR: u32 = 23;

/// One measured event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub pcr: u32,
    pub event_type: u32,
    /// `(algorithm id, digest)` pairs, in log order.
    pub digests: Vec<(u16, Vec<u8>)>,
    pub data: Vec<u8>,
}

impl Event {
    pub fn digest(&self, alg: u16) -> Option<&[u8]> {
        self.digests
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, d)| d.as_slice())
    }
}

/// A parsed log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventLog {
    /// `(algorithm id, digest size)` from the Spec ID event.
    pub algorithms: Vec<(u16, u16)>,
    /// Locality from a StartupLocality event, if any (sets PCR 0's start value).
    pub startup_locality: Option<u8>,
    /// Every event after the Spec ID header, including no-action events.
    pub events: Vec<Event>,
}

/// What was wrong with a log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventLogError {
    #[error("event log truncated at byte {offset}: {what} needs {need} bytes, {have} left")]
    Truncated {
        offset: usize,
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error("event log does not start with a TCG Spec ID Event03 header (not a crypto-agile log)")]
    NotCryptoAgile,
    #[error("event at byte {offset}: {reason}")]
    Malformed { offset: usize, reason: String },
    #[error("algorithm {alg:#06x} appears in an event but not in the Spec ID header")]
    UnknownAlgorithm { alg: u16 },
    #[error("event log holds more than {MAX_EVENTS} events")]
    TooManyEvents,
    #[error("algorithm {alg:#06x} cannot be replayed here")]
    UnsupportedAlgorithm { alg: u16 },
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], EventLogError> {
        let have = self.buf.len() - self.pos;
        if n > have {
            return Err(EventLogError::Truncated {
                offset: self.pos,
                what,
                need: n,
                have,
            });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, EventLogError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, EventLogError> {
        let b = self.take(2, what)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, EventLogError> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn done(&self) -> bool {
        self.pos >= self.buf.len()
    }
}

const SPEC_ID_SIGNATURE: &[u8; 16] = b"Spec ID Event03\0";
const STARTUP_LOCALITY_SIGNATURE: &[u8; 16] = b"StartupLocality\0";

fn parse_spec_id(data: &[u8], offset: usize) -> Result<Vec<(u16, u16)>, EventLogError> {
    let mut r = Reader { buf: data, pos: 0 };
    if r.take(16, "Spec ID signature")? != SPEC_ID_SIGNATURE {
        return Err(EventLogError::NotCryptoAgile);
    }
    let _platform_class = r.u32("platform class")?;
    let _minor = r.u8("spec minor")?;
    let major = r.u8("spec major")?;
    let _errata = r.u8("spec errata")?;
    let _uintn = r.u8("uintn size")?;
    if major != 2 {
        return Err(EventLogError::Malformed {
            offset,
            reason: format!("Spec ID event for TCG spec version {major}, expected 2"),
        });
    }
    let n = r.u32("number of algorithms")? as usize;
    if n == 0 || n > 16 {
        return Err(EventLogError::Malformed {
            offset,
            reason: format!("Spec ID event lists {n} algorithms"),
        });
    }
    let mut algs = Vec::with_capacity(n);
    for _ in 0..n {
        let id = r.u16("algorithm id")?;
        let size = r.u16("digest size")?;
        if size == 0 || size > 64 {
            return Err(EventLogError::Malformed {
                offset,
                reason: format!("algorithm {id:#06x} has digest size {size}"),
            });
        }
        algs.push((id, size));
    }
    Ok(algs)
}

/// Parses a crypto-agile event log.
pub fn parse(bytes: &[u8]) -> Result<EventLog, EventLogError> {
    let mut r = Reader { buf: bytes, pos: 0 };
    // Legacy header event: pcr, type, SHA-1 digest, size, data.
    let start = r.pos;
    let _pcr = r.u32("header PCR index")?;
    let ty = r.u32("header event type")?;
    let _sha1 = r.take(20, "header SHA-1 digest")?;
    let size = r.u32("header event size")? as usize;
    let data = r.take(size, "header event data")?;
    if ty != event_type::EV_NO_ACTION {
        return Err(EventLogError::NotCryptoAgile);
    }
    let algorithms = parse_spec_id(data, start)?;

    let mut events = Vec::new();
    let mut startup_locality = None;
    while !r.done() {
        if events.len() >= MAX_EVENTS {
            return Err(EventLogError::TooManyEvents);
        }
        let offset = r.pos;
        let pcr = r.u32("PCR index")?;
        let event_type = r.u32("event type")?;
        // Some firmware pads the log with 0xFF after the last event.
        if pcr == u32::MAX && event_type == u32::MAX {
            break;
        }
        if pcr > MAX_PCR {
            return Err(EventLogError::Malformed {
                offset,
                reason: format!("PCR index {pcr} is above {MAX_PCR}"),
            });
        }
        let count = r.u32("digest count")? as usize;
        if count > algorithms.len() {
            return Err(EventLogError::Malformed {
                offset,
                reason: format!(
                    "{count} digests, the header lists {} algorithms",
                    algorithms.len()
                ),
            });
        }
        let mut digests = Vec::with_capacity(count);
        for _ in 0..count {
            let alg = r.u16("digest algorithm")?;
            let size = algorithms
                .iter()
                .find(|(a, _)| *a == alg)
                .map(|(_, s)| *s as usize)
                .ok_or(EventLogError::UnknownAlgorithm { alg })?;
            digests.push((alg, r.take(size, "digest")?.to_vec()));
        }
        let size = r.u32("event size")? as usize;
        if size > MAX_EVENT_DATA {
            return Err(EventLogError::Malformed {
                offset,
                reason: format!("event data of {size} bytes"),
            });
        }
        let data = r.take(size, "event data")?.to_vec();
        if event_type == event_type::EV_NO_ACTION
            && pcr == 0
            && data.len() == 17
            && data[..16] == STARTUP_LOCALITY_SIGNATURE[..]
        {
            startup_locality = Some(data[16]);
        }
        events.push(Event {
            pcr,
            event_type,
            digests,
            data,
        });
    }
    Ok(EventLog {
        algorithms,
        startup_locality,
        events,
    })
}

fn extend(alg: u16, pcr: &[u8], digest: &[u8]) -> Result<Vec<u8>, EventLogError> {
    fn h<D: Digest>(a: &[u8], b: &[u8]) -> Vec<u8> {
        let mut d = D::new();
        d.update(a);
        d.update(b);
        d.finalize().to_vec()
    }
    Ok(match alg {
        alg::SHA256 => h::<Sha256>(pcr, digest),
        alg::SHA384 => h::<Sha384>(pcr, digest),
        alg::SHA512 => h::<Sha512>(pcr, digest),
        other => return Err(EventLogError::UnsupportedAlgorithm { alg: other }),
    })
}

impl EventLog {
    /// The PCR values of bank `alg` this log replays to, for every PCR it touches.
    pub fn replay(&self, alg: u16) -> Result<BTreeMap<u32, Vec<u8>>, EventLogError> {
        let size = self
            .algorithms
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, s)| *s as usize)
            .ok_or(EventLogError::UnknownAlgorithm { alg })?;
        let mut pcrs: BTreeMap<u32, Vec<u8>> = BTreeMap::new();
        if let Some(loc) = self.startup_locality {
            let mut v = vec![0u8; size];
            v[size - 1] = loc;
            pcrs.insert(0, v);
        }
        for e in &self.events {
            if e.event_type == event_type::EV_NO_ACTION {
                continue;
            }
            let Some(d) = e.digest(alg) else {
                return Err(EventLogError::Malformed {
                    offset: 0,
                    reason: format!(
                        "event for PCR {} has no digest for algorithm {alg:#06x}",
                        e.pcr
                    ),
                });
            };
            let cur = pcrs.entry(e.pcr).or_insert_with(|| vec![0u8; size]);
            *cur = extend(alg, cur, d)?;
        }
        Ok(pcrs)
    }
}
