//! Attestation as both sides see it, without a TPM library.
//!
//! The agent side is the [`Attester`] trait: a real TPM through tss-esapi
//! (`crate::device::Device`, feature `agent`) or the software TPM of the fleet
//! simulation ([`crate::soft::SoftTpm`]). The hub side is [`verify_evidence`]: the quote
//! is checked against the PCR values the agent reports, and the firmware event log is
//! replayed to those same values, so every PCR the hub reasons about is covered by the
//! TPM's signature.

use std::collections::BTreeMap;

use crate::eventlog::{self, EventLog, alg, event_type};
use crate::quote::{self, AkPublic, QuoteError, VerifiedQuote};

/// A quote as it goes on the wire: `TPMS_ATTEST` and `TPMT_SIGNATURE` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuoteBytes {
    pub attest: Vec<u8>,
    pub signature: Vec<u8>,
}

/// What kind of root of trust an attester is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityKind {
    /// A TPM 2.0 chip (or an emulator the hub cannot tell from one, unless its EK
    /// certificate does not chain to a trusted manufacturer CA).
    Tpm,
    /// Keys and PCRs in the agent's own memory: proves nothing about the hardware; for
    /// simulations and boxes without a TPM whose policy allows it.
    Software,
}

/// The keys a device proves itself with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub kind: IdentityKind,
    /// The endorsement key's public area (`TPM2B_PUBLIC`).
    pub ek_public: Vec<u8>,
    /// The EK certificate (DER) from the TPM's NV storage, if it has one.
    pub ek_certificate: Option<Vec<u8>>,
    /// The attestation key's public area (`TPM2B_PUBLIC`): restricted, signing.
    pub ak_public: Vec<u8>,
}

/// A quote and the PCR values it covers (sha256 bank), read around the quote so they
/// are the values quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quoted {
    pub quote: QuoteBytes,
    pub pcrs: BTreeMap<u32, [u8; 32]>,
}

/// Why an attester failed.
#[derive(Debug, thiserror::Error)]
pub enum AttestError {
    #[error("TPM: {0}")]
    Tpm(String),
    #[error("reading {path}: {source}")]
    Log {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Unsupported(String),
}

/// A device's root of trust, as the agent uses it. Calls block (a TPM command takes
/// milliseconds to a few hundred); async callers run them on a blocking thread.
pub trait Attester: Send {
    fn identity(&self) -> &Identity;

    /// Recovers the secret of a credential the hub made for this device's EK and AK
    /// (`blob`: `TPM2B_ID_OBJECT`, `secret`: `TPM2B_ENCRYPTED_SECRET`). Fails unless
    /// both keys are this device's.
    fn activate_credential(&mut self, blob: &[u8], secret: &[u8]) -> Result<Vec<u8>, AttestError>;

    /// Quotes the sha256 bank's `pcrs` over `nonce` (at most 64 bytes) with the AK.
    fn quote(&mut self, nonce: &[u8], pcrs: &[u32]) -> Result<Quoted, AttestError>;

    /// The firmware event log as of now (crypto-agile TCG format); empty if the
    /// platform keeps none.
    fn event_log(&mut self) -> Result<Vec<u8>, AttestError>;

    /// The Linux IMA runtime measurement list as of now, in the sha256 per-bank binary
    /// format (`binary_runtime_measurements_sha256`, which [`crate::ima::verify_ima`]
    /// checks against the quoted PCR 10); `None` if the box keeps none: IMA off, or a
    /// kernel without per-bank lists (before 6.10), whose PCR 10 the hub cannot check in
    /// the sha256 bank. Read it after quoting: the hub accepts entries added since.
    fn ima_log(&mut self) -> Result<Option<Vec<u8>>, AttestError> {
        Ok(None)
    }

    /// Seals `data` to this device (only this TPM can unseal it); `None` if the
    /// attester cannot seal.
    fn seal(&mut self, data: &[u8]) -> Result<Option<Vec<u8>>, AttestError> {
        let _ = data;
        Ok(None)
    }

    /// Recovers what [`Attester::seal`] sealed.
    fn unseal(&mut self, blob: &[u8]) -> Result<Vec<u8>, AttestError> {
        let _ = blob;
        Err(AttestError::Unsupported(
            "this attester cannot unseal".into(),
        ))
    }
}

/// The PCRs the firmware event log must account for completely (PC Client: 0–7 are
/// the firmware's; any other PCR is checked only if the log has events for it).
pub const FIRMWARE_PCRS: std::ops::RangeInclusive<u32> = 0..=7;

/// Why evidence was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EvidenceError {
    #[error("quote: {0}")]
    Quote(#[from] QuoteError),
    #[error("event log: {0}")]
    Log(#[from] eventlog::EventLogError),
    #[error(
        "event log does not replay to the quoted PCR {pcr}: the log gives {log}, the TPM quoted {quoted}"
    )]
    LogMismatch {
        pcr: u32,
        log: String,
        quoted: String,
    },
    #[error("the quote covers PCRs {quoted:?}, the hub asked for {asked:?}")]
    WrongSelection { quoted: Vec<u32>, asked: Vec<u32> },
}

/// Evidence that verified: the PCR values are the TPM's, and the log explains them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub quote: VerifiedQuote,
    pub pcrs: BTreeMap<u32, [u8; 32]>,
    /// The parsed log (empty when the device sent none).
    pub log: Option<EventLog>,
}

/// Verifies evidence from a device whose AK is `ak`: the quote answers `nonce`, covers
/// exactly `asked`, and its digest matches `pcrs`; the event log (`log`, may be empty)
/// replays to `pcrs` for PCRs 0–7 and every other PCR it has events for.
pub fn verify_evidence(
    ak: &AkPublic,
    quote: &QuoteBytes,
    pcrs: &BTreeMap<u32, [u8; 32]>,
    nonce: &[u8],
    asked: &[u32],
    log: &[u8],
) -> Result<Verified, EvidenceError> {
    let verified = quote::verify_quote(ak, &quote.attest, &quote.signature, nonce, pcrs)?;
    if verified.pcrs != asked || !pcrs.keys().copied().eq(asked.iter().copied()) {
        return Err(EvidenceError::WrongSelection {
            quoted: verified.pcrs,
            asked: asked.to_vec(),
        });
    }
    let parsed = if log.is_empty() {
        None
    } else {
        Some(eventlog::parse(log)?)
    };
    let replayed = match &parsed {
        Some(l) => l.replay(alg::SHA256)?,
        None => BTreeMap::new(),
    };
    for (&pcr, quoted) in pcrs {
        let log_value = match replayed.get(&pcr) {
            Some(v) => v.clone(),
            // Firmware PCRs with no events must still be at their reset value.
            None if FIRMWARE_PCRS.contains(&pcr) && parsed.is_some() => vec![0u8; 32],
            None => continue,
        };
        if log_value.as_slice() != quoted.as_slice() {
            return Err(EvidenceError::LogMismatch {
                pcr,
                log: hex(&log_value),
                quoted: hex(quoted),
            });
        }
    }
    Ok(Verified {
        quote: verified,
        pcrs: pcrs.clone(),
        log: parsed,
    })
}

/// The events of `log` that were extended into `pcr`, as `(event type, sha256 digest)`.
pub fn measured(log: &EventLog, pcr: u32) -> Vec<(u32, Vec<u8>)> {
    log.events
        .iter()
        .filter(|e| e.pcr == pcr && e.event_type != event_type::EV_NO_ACTION)
        .filter_map(|e| e.digest(alg::SHA256).map(|d| (e.event_type, d.to_vec())))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
