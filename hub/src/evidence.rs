//! The hub's side of attestation evidence, sans I/O: the challenge it asks, the checks
//! of what comes back (quote, event log, IMA list), and the verdict against policy.
//!
//! The QUIC endpoint's connection task ([`crate::endpoint`]) and the fleet simulator's
//! deterministic mode both challenge and judge with these functions; the nonce, the
//! TLS exporter and the clock come from the caller.

use std::collections::BTreeMap;

use cairn_sync_protocol::attest::{log_join, log_sha256};
use cairn_sync_protocol::message::{Challenge, CredentialChallenge, Evidence, MAX_PCRS};
use cairn_tpm::attest::{QuoteBytes, verify_evidence};
use cairn_tpm::quote::AkPublic;

use crate::attest::{self as policy, AttestPolicy, Verdict};
use crate::store::{AttestOutcome, AttestRecord, ImaState, NewAttestation, attest_status};

/// No IMA list verified yet.
pub const NO_IMA: ImaState = ImaState {
    len: 0,
    pcr10: [0; 32],
    entries: 0,
};

/// PCRs every challenge covers.
const QUOTED_ALWAYS: std::ops::RangeInclusive<u32> = 0..=15;

/// The values policy judges: those of the policy's PCRs (the rest are quoted so that
/// the log is verified, not compared).
fn judged(pol: Option<&AttestPolicy>, pcrs: &BTreeMap<u32, [u8; 32]>) -> BTreeMap<u32, [u8; 32]> {
    let wanted = pol.map_or_else(policy::default_pcrs, |p| p.pcrs.clone());
    pcrs.iter()
        .filter(|(k, _)| wanted.contains(k))
        .map(|(k, v)| (*k, *v))
        .collect()
}

/// A challenge sent and not yet answered.
pub struct PendingChallenge {
    pub(crate) nonce: [u8; 32],
    pub(crate) pcrs: Vec<u32>,
    /// The log the hub held when it asked (the agent sends what follows it).
    pub(crate) held_log: Vec<u8>,
    /// The credential's secret, at enrollment.
    pub(crate) secret: Option<[u8; 32]>,
    /// The IMA list the hub verified when it asked.
    pub(crate) ima_held: ImaState,
}

impl PendingChallenge {
    /// The challenge's nonce (the quote is over it bound to the connection's exporter).
    pub fn nonce(&self) -> &[u8; 32] {
        &self.nonce
    }
}

/// The PCRs a challenge asks for: the policy's, and always 0–15 (firmware, boot
/// loader, kernel, OS), so that every event a boot log normally holds is covered by
/// the TPM's signature: the log's events for unquoted PCRs would be unverified claims.
pub fn pcr_list(policy: Option<&AttestPolicy>) -> Vec<u32> {
    let mut pcrs = policy.map_or_else(policy::default_pcrs, |p| p.pcrs.clone());
    pcrs.extend(QUOTED_ALWAYS);
    pcrs.sort_unstable();
    pcrs.dedup();
    pcrs.truncate(MAX_PCRS);
    pcrs
}

/// The challenge for a device whose verified log is `held_log` and IMA list
/// `ima_held`, asking for `pcrs` over `nonce` (and, at enrollment, a credential to
/// activate with its secret), and what to keep until the evidence comes back.
pub fn challenge(
    nonce: [u8; 32],
    pcrs: Vec<u32>,
    held_log: Vec<u8>,
    ima_held: ImaState,
    credential: Option<(CredentialChallenge, [u8; 32])>,
) -> (Challenge, PendingChallenge) {
    let challenge = Challenge {
        nonce,
        pcrs: pcrs.iter().filter_map(|p| u8::try_from(*p).ok()).collect(),
        log_held: held_log.len() as u64,
        log_held_sha256: if held_log.is_empty() {
            [0; 32]
        } else {
            log_sha256(&held_log)
        },
        credential: credential.as_ref().map(|(c, _)| c.clone()),
        ima_held: ima_held.len,
        ima_held_pcr10: ima_held.pcr10,
    };
    let pending = PendingChallenge {
        nonce,
        pcrs,
        held_log,
        secret: credential.map(|(_, s)| s),
        ima_held,
    };
    (challenge, pending)
}

/// What the hub held when it challenged an enrolled device: its verified log and IMA
/// list, from its record.
pub fn held(rec: &AttestRecord) -> (Vec<u8>, ImaState) {
    (
        rec.log.clone(),
        ImaState {
            len: rec.ima_len,
            pcr10: rec.ima_pcr10,
            entries: rec.ima_entries,
        },
    )
}

/// The verdict on an enrolled device's evidence for challenge `pc` (`nonce`: the quote
/// nonce bound to the connection), against its record and the policy that applies to
/// it now: what to record. Evidence that does not verify quarantines the device, and
/// so does evidence that verifies after refused evidence, until an operator accepts.
pub fn judge(
    rec: &AttestRecord,
    pol: Option<&AttestPolicy>,
    pc: &PendingChallenge,
    ev: &Evidence,
    nonce: &[u8; 32],
    now: u64,
) -> AttestOutcome {
    match check(&rec.ak_public, pc, ev, nonce) {
        Err(why) => AttestOutcome {
            quarantine: Some(crate::attest::evidence_refused(&why)),
            pcrs: None,
            log: None,
            reset_count: None,
            record: None,
            ima: None,
            now_ms: now,
        },
        Ok((verified, log, ima)) => {
            let verdict = policy::judge(
                pol,
                Some(&rec.kind),
                &rec.accepted,
                &judged(pol, &verified.pcrs),
                now,
            );
            let (quarantine, record) = match verdict {
                // Refused evidence is not forgotten because the next one verifies:
                // something produced bad evidence; an operator reviews and accepts.
                Verdict::Trusted { .. } if refused_before(rec) => (rec.reason.clone(), None),
                Verdict::Trusted { record } => (None, record),
                Verdict::Quarantined(why) => (Some(why), None),
            };
            AttestOutcome {
                quarantine,
                pcrs: Some(policy::pcrs_hex(&verified.pcrs)),
                log: (log != rec.log).then_some(log),
                reset_count: Some(verified.quote.reset_count),
                record,
                ima,
                now_ms: now,
            }
        }
    }
}

/// An enrolling device's root of trust, once its first evidence (for challenge `pc`,
/// after the credential was activated) verified: what to record, with what the policy
/// its token's labels select made of it (it may start quarantined). `Err`: why the
/// evidence does not verify; the enrollment is refused.
#[allow(clippy::too_many_arguments)]
pub fn first(
    kind: &str,
    ek_public: Vec<u8>,
    ek_issuer: Option<String>,
    ak_public: Vec<u8>,
    pol: Option<&AttestPolicy>,
    pc: &PendingChallenge,
    ev: &Evidence,
    nonce: &[u8; 32],
    now: u64,
) -> Result<NewAttestation, String> {
    let (verified, log, ima) = check(&ak_public, pc, ev, nonce)?;
    let (quarantine, record) =
        match policy::judge(pol, Some(kind), &[], &judged(pol, &verified.pcrs), now) {
            Verdict::Trusted { record } => (None, record),
            Verdict::Quarantined(why) => (Some(why), None),
        };
    Ok(NewAttestation {
        kind: kind.to_string(),
        ek_public,
        ek_issuer,
        ak_public,
        outcome: AttestOutcome {
            quarantine,
            pcrs: Some(policy::pcrs_hex(&verified.pcrs)),
            log: Some(log),
            reset_count: Some(verified.quote.reset_count),
            record,
            ima,
            now_ms: now,
        },
    })
}

fn refused_before(rec: &crate::store::AttestRecord) -> bool {
    rec.status == attest_status::QUARANTINED
        && rec.reason.as_deref().is_some_and(|r| {
            crate::attest::QuarantineKind::of(r) == crate::attest::QuarantineKind::EvidenceRefused
        })
}

/// Verifies evidence against a pending challenge; on success the device's whole event
/// log and, if it sent one, how much of its IMA list is now verified.
pub fn check(
    ak_public: &[u8],
    pc: &PendingChallenge,
    ev: &Evidence,
    nonce: &[u8; 32],
) -> Result<(cairn_tpm::attest::Verified, Vec<u8>, Option<ImaState>), String> {
    let ak = AkPublic::from_tpm2b_public(ak_public).map_err(|e| format!("stored AK: {e}"))?;
    if ev.pcrs.len() != pc.pcrs.len() {
        return Err(format!(
            "{} PCR values for {} PCRs asked",
            ev.pcrs.len(),
            pc.pcrs.len()
        ));
    }
    let pcrs: BTreeMap<u32, [u8; 32]> = pc
        .pcrs
        .iter()
        .copied()
        .zip(ev.pcrs.iter().copied())
        .collect();
    let log = log_join(&pc.held_log, ev.log_offset, &ev.log).ok_or_else(|| {
        format!(
            "event log delta at offset {} does not continue the {} bytes the hub holds",
            ev.log_offset,
            pc.held_log.len()
        )
    })?;
    // A device does not get to choose what is checked: what it sent before, it sends.
    if log.is_empty() && !pc.held_log.is_empty() {
        return Err("no firmware event log, though the device sent one before".into());
    }
    if ev.ima.is_none() && pc.ima_held.len > 0 {
        return Err("no IMA measurement list, though the device sent one before".into());
    }
    let quote = QuoteBytes {
        attest: ev.attest.clone(),
        signature: ev.signature.clone(),
    };
    let verified =
        verify_evidence(&ak, &quote, &pcrs, nonce, &pc.pcrs, &log).map_err(|e| e.to_string())?;
    let ima = match &ev.ima {
        None => None,
        Some(tail) => Some(check_ima(&pc.ima_held, tail, &verified.pcrs)?),
    };
    Ok((verified, log, ima))
}

/// Verifies an IMA list tail: it continues what the hub verified (or starts over),
/// every entry's template digest matches its data, and it replays to the quoted PCR 10.
fn check_ima(
    held: &ImaState,
    tail: &cairn_sync_protocol::message::ImaTail,
    pcrs: &BTreeMap<u32, [u8; 32]>,
) -> Result<ImaState, String> {
    use cairn_tpm::ima::{IMA_PCR, verify_ima_from};
    let quoted = pcrs
        .get(&IMA_PCR)
        .ok_or("an IMA list came with a quote that does not cover PCR 10")?;
    let (start, base) = match tail.offset {
        0 => (NO_IMA.pcr10, NO_IMA),
        n if n == held.len => (held.pcr10, *held),
        n => {
            return Err(format!(
                "IMA list tail at byte {n} does not continue the {} bytes the hub verified",
                held.len
            ));
        }
    };
    let (summary, consumed) = verify_ima_from(&start, &tail.bytes, quoted)
        .map_err(|e| format!("IMA measurement list: {e}"))?;
    Ok(ImaState {
        len: base.len + consumed as u64,
        pcr10: *quoted,
        entries: base.entries + summary.entries as u64,
    })
}
