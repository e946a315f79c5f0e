//! Attestation on the hub: which policy applies to a device, whether an identity is
//! good enough for it, and what a verified quote means for the device.
//!
//! Trust model (SECURITY.md has the long form):
//! - *Identity.* A device's kind is `tpm` when its EK certificate chains to a
//!   manufacturer CA the operator configured (`--ek-ca`), `tpm-unverified` when it
//!   claims a TPM the hub cannot vouch for (no certificate, or no CA configured),
//!   `software` for the agent's software TPM, `none` without any. Credential activation
//!   at enrollment proves the AK lives in the TPM holding that EK; from then on only
//!   that AK's quotes count.
//! - *Evidence.* Every session starts with a challenge (fresh nonce bound to the TLS
//!   session); until its evidence verifies, the device gets no desired state. Evidence
//!   that does not verify (bad signature, wrong nonce, a log that does not replay to the
//!   quoted PCRs) quarantines the device whatever the policy.
//! - *Policy.* The first policy (by priority, then name) whose selector matches the
//!   device's labels decides: the minimum identity, the PCRs to quote, golden values,
//!   and whether the first verified measurements become the device's accepted set
//!   (trust on first use). Devices no policy matches are attested and recorded, never
//!   quarantined for their measurements.
//! - *Accepted sets.* A device may have several accepted measurement sets, each with a
//!   source: `first-seen`, `accepted by operator`, or `release <version>` — the values
//!   a signed release predicts, added when the release is assigned (before the device
//!   boots it) and retired once the device committed another release. A quote matching
//!   any set is good, so an upgrade never opens a window of false quarantine.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use cairn_sync_protocol::message::{AttestIdentity, IdentityKind, Labels};
use serde::{Deserialize, Serialize};

use crate::desired::Selector;

/// How strong an identity a policy requires.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum Require {
    /// Any device, attested or not.
    None,
    /// A software TPM or a TPM the hub cannot vouch for is enough.
    Software,
    /// A TPM whose EK certificate chains to a configured manufacturer CA.
    Tpm,
}

impl std::str::FromStr for Require {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "software" => Ok(Self::Software),
            "tpm" => Ok(Self::Tpm),
            other => Err(format!(
                "unknown identity requirement {other:?}; use none, software or tpm"
            )),
        }
    }
}

impl std::fmt::Display for Require {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::None => "none",
            Self::Software => "software",
            Self::Tpm => "tpm",
        })
    }
}

/// Kinds of device identity, as stored and shown.
pub mod kind {
    pub const TPM: &str = "tpm";
    pub const TPM_UNVERIFIED: &str = "tpm-unverified";
    pub const SOFTWARE: &str = "software";
}

/// What an identity kind is worth against [`Require`].
pub fn level(kind: Option<&str>) -> Require {
    match kind {
        Some(kind::TPM) => Require::Tpm,
        Some(kind::TPM_UNVERIFIED | kind::SOFTWARE) => Require::Software,
        _ => Require::None,
    }
}

/// An attestation policy, stored by the hub and set by operators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AttestPolicy {
    pub name: String,
    /// Label selector of the devices it applies to (`site=paris,role=kiosk`).
    pub selector: String,
    /// Lower first; ties by name.
    #[serde(default = "default_priority")]
    pub priority: i64,
    #[serde(default = "default_require")]
    pub require: Require,
    /// PCRs (sha256 bank) quoted and compared.
    #[serde(default = "default_pcrs")]
    pub pcrs: Vec<u32>,
    /// Record the first verified values as the device's accepted set.
    #[serde(default)]
    pub tofu: bool,
    /// Allowed values per PCR (hex); a PCR listed here must hold one of them.
    #[serde(default)]
    pub golden: BTreeMap<u32, Vec<String>>,
}

fn default_priority() -> i64 {
    100
}
fn default_require() -> Require {
    Require::None
}
/// The firmware, boot loader and Secure Boot PCRs of the PC Client profile.
pub fn default_pcrs() -> Vec<u32> {
    (0..=7).collect()
}

impl AttestPolicy {
    /// Checks the policy is well-formed; the error says what to fix.
    pub fn validate(&self) -> Result<Selector, String> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "policy name {:?} must be 1-64 characters of letters, digits, '-', '_', '.'",
                self.name
            ));
        }
        let selector: Selector = self.selector.parse().map_err(|e| format!("{e}"))?;
        if self.pcrs.is_empty() || self.pcrs.iter().any(|p| *p > 23) {
            return Err("pcrs must list PCR indices 0-23".into());
        }
        for (pcr, values) in &self.golden {
            if !self.pcrs.contains(pcr) {
                return Err(format!(
                    "golden values for PCR {pcr}, which the policy does not quote; add it to pcrs"
                ));
            }
            for v in values {
                if parse_pcr(v).is_none() {
                    return Err(format!(
                        "golden value {v:?} for PCR {pcr} is not 64 hex digits (a sha256 PCR)"
                    ));
                }
            }
        }
        Ok(selector)
    }

    fn matches(&self, labels: &Labels) -> bool {
        self.selector
            .parse::<Selector>()
            .is_ok_and(|s| s.matches(labels))
    }
}

/// The policy for a device with `labels`: the first match by priority, then name.
pub fn policy_for<'a>(policies: &'a [AttestPolicy], labels: &Labels) -> Option<&'a AttestPolicy> {
    let mut sorted: Vec<&AttestPolicy> = policies.iter().collect();
    sorted.sort_by(|a, b| a.priority.cmp(&b.priority).then(a.name.cmp(&b.name)));
    sorted.into_iter().find(|p| p.matches(labels))
}

/// A set of PCR values a device is expected to measure, and where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct MeasurementSet {
    /// `first-seen`, `accepted by operator`, or `release <version>`.
    pub source: String,
    pub added_ms: u64,
    /// PCR index → value (hex).
    pub pcrs: BTreeMap<u32, String>,
}

/// Source of the set recorded at first use.
pub const SOURCE_FIRST_SEEN: &str = "first-seen";
/// Source of the set an operator accepted.
pub const SOURCE_OPERATOR: &str = "accepted by operator";
/// Prefix of sets a release predicts.
pub const SOURCE_RELEASE: &str = "release ";

pub fn parse_pcr(hex_value: &str) -> Option<[u8; 32]> {
    let v = hex::decode(hex_value).ok()?;
    v.try_into().ok()
}

pub fn pcrs_hex(pcrs: &BTreeMap<u32, [u8; 32]>) -> BTreeMap<u32, String> {
    pcrs.iter().map(|(k, v)| (*k, hex::encode(v))).collect()
}

/// What policy makes of verified measurements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Good; `record` is a set to add (first use).
    Trusted {
        record: Option<MeasurementSet>,
    },
    Quarantined(String),
}

/// Judges verified PCR values against the policy and the device's accepted sets.
pub fn judge(
    policy: Option<&AttestPolicy>,
    device_kind: Option<&str>,
    accepted: &[MeasurementSet],
    pcrs: &BTreeMap<u32, [u8; 32]>,
    now_ms: u64,
) -> Verdict {
    let Some(policy) = policy else {
        return Verdict::Trusted { record: None };
    };
    if level(device_kind) < policy.require {
        return Verdict::Quarantined(format!(
            "identity {} does not meet policy {} (requires --require {})",
            device_kind.unwrap_or("none"),
            policy.name,
            policy.require
        ));
    }
    for (pcr, allowed) in &policy.golden {
        let Some(value) = pcrs.get(pcr) else {
            return Verdict::Quarantined(format!("PCR {pcr} was not quoted"));
        };
        let value = hex::encode(value);
        if !allowed.iter().any(|a| a.eq_ignore_ascii_case(&value)) {
            return Verdict::Quarantined(format!(
                "PCR {pcr} = {value} is not among policy {}'s golden values",
                policy.name
            ));
        }
    }
    let current = pcrs_hex(pcrs);
    if accepted.is_empty() {
        if policy.tofu {
            return Verdict::Trusted {
                record: Some(MeasurementSet {
                    source: SOURCE_FIRST_SEEN.into(),
                    added_ms: now_ms,
                    pcrs: current,
                }),
            };
        }
        return Verdict::Trusted { record: None };
    }
    if accepted.iter().any(|set| set_matches(set, &current)) {
        return Verdict::Trusted { record: None };
    }
    // Say which PCRs differ from the closest accepted set.
    let differ = |set: &MeasurementSet| -> Vec<u32> {
        current
            .iter()
            .filter(|(k, v)| set.pcrs.get(k).is_none_or(|s| !s.eq_ignore_ascii_case(v)))
            .map(|(k, _)| *k)
            .collect()
    };
    let Some(set) = accepted.iter().min_by_key(|s| differ(s).len()) else {
        return Verdict::Trusted { record: None };
    };
    let detail: Vec<String> = differ(set)
        .iter()
        .map(|p| match set.pcrs.get(p) {
            Some(expected) => format!(
                "PCR {p} = {} (expected {})",
                short(current.get(p).map_or("", String::as_str)),
                short(expected)
            ),
            None => format!("PCR {p} is not in the accepted set"),
        })
        .collect();
    Verdict::Quarantined(format!(
        "{MEASUREMENTS_DIFFER} (closest: {}): {}",
        set.source,
        detail.join(", ")
    ))
}

/// How a quarantine for measurements that match no accepted set starts.
pub const MEASUREMENTS_DIFFER: &str = "measurements differ from every accepted set";
/// How a quarantine for evidence that did not verify starts.
pub const EVIDENCE_REFUSED: &str = "evidence refused";

/// The kinds of quarantine, told apart by how their stored reason starts (the reason is
/// the text operators read, stored as it was shown). The one place that classifies a
/// reason: the endpoint and the store ask this, never the text itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuarantineKind {
    /// The evidence did not verify (quote, nonce, log replay).
    EvidenceRefused,
    /// Verified measurements that match no accepted set.
    MeasurementsDiffer,
    /// What the policy itself requires (identity, golden values): only a change of the
    /// policy lifts it.
    Policy,
}

impl QuarantineKind {
    pub fn of(reason: &str) -> Self {
        if reason.starts_with(EVIDENCE_REFUSED) {
            Self::EvidenceRefused
        } else if reason.starts_with(MEASUREMENTS_DIFFER) {
            Self::MeasurementsDiffer
        } else {
            Self::Policy
        }
    }

    /// Whether an operator's accept of the current measurements can lift it.
    pub fn accept_lifts(self) -> bool {
        matches!(self, Self::EvidenceRefused | Self::MeasurementsDiffer)
    }
}

/// The reason stored for evidence that did not verify.
pub fn evidence_refused(why: &str) -> String {
    format!("{EVIDENCE_REFUSED}: {why}")
}

fn short(h: &str) -> &str {
    h.get(..16).unwrap_or(h)
}

/// A set matches when it has every judged PCR, each with the current value; PCRs it
/// has beyond those are not judged (the policy dropped them). A set that lacks a PCR the
/// policy now judges matches nothing: re-baseline with an accept.
fn set_matches(set: &MeasurementSet, current: &BTreeMap<u32, String>) -> bool {
    !current.is_empty()
        && current
            .iter()
            .all(|(k, v)| set.pcrs.get(k).is_some_and(|s| s.eq_ignore_ascii_case(v)))
}

/// Hub-wide attestation settings.
#[derive(Clone)]
pub struct AttestConfig {
    /// Manufacturer CAs EK certificates must chain to; `None`: none configured.
    pub ek_trust: Option<Arc<cairn_tpm::ekcert::EkTrust>>,
    /// How often a connected device is challenged again.
    pub interval: Duration,
    /// How long a device has to answer a challenge.
    pub evidence_timeout: Duration,
}

impl std::fmt::Debug for AttestConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AttestConfig")
            .field("ek_trust", &self.ek_trust.as_ref().map(|_| "configured"))
            .field("interval", &self.interval)
            .field("evidence_timeout", &self.evidence_timeout)
            .finish()
    }
}

/// How often a connected device is challenged again, unless configured otherwise.
pub const DEFAULT_CHALLENGE_INTERVAL: Duration = Duration::from_secs(3600);
/// How long a device has to answer a challenge, unless configured otherwise.
pub const DEFAULT_EVIDENCE_TIMEOUT: Duration = Duration::from_secs(60);

impl Default for AttestConfig {
    fn default() -> Self {
        Self {
            ek_trust: None,
            interval: DEFAULT_CHALLENGE_INTERVAL,
            evidence_timeout: DEFAULT_EVIDENCE_TIMEOUT,
        }
    }
}

/// What identifies a TPM: SHA-256 (hex) of its endorsement key's key material (ECC
/// point, or RSA modulus and exponent), not of the whole public area, whose attributes
/// and policy a device could vary to pass one TPM off as several.
pub fn ek_fingerprint(ek_public: &[u8]) -> String {
    use sha2::Digest;
    let key = cairn_tpm::quote::AkPublic::from_tpm2b_public(ek_public)
        .map(|k| k.key_bytes())
        .unwrap_or_else(|_| ek_public.to_vec());
    hex::encode(sha2::Sha256::digest(key))
}

/// The identity a device claims at enrollment, checked as far as possible without the
/// TPM's help: its EK certificate against the configured CAs.
pub fn check_identity(
    cfg: &AttestConfig,
    identity: &AttestIdentity,
    now_secs: u64,
) -> Result<(&'static str, Option<String>), String> {
    cairn_tpm::quote::check_ak_attributes(&identity.ak_public)
        .map_err(|e| format!("attestation key: {e}"))?;
    match identity.kind {
        IdentityKind::Software => Ok((kind::SOFTWARE, None)),
        IdentityKind::Tpm => match (&identity.ek_certificate, &cfg.ek_trust) {
            (Some(cert), Some(trust)) => {
                let info = cairn_tpm::ekcert::verify_ek_certificate(
                    cert,
                    &identity.ek_public,
                    trust,
                    now_secs,
                )
                .map_err(|e| format!("EK certificate: {e}"))?;
                Ok((kind::TPM, Some(info.issuer)))
            }
            _ => Ok((kind::TPM_UNVERIFIED, None)),
        },
    }
}

#[cfg(test)]
mod quarantine_tests {
    use super::*;

    #[test]
    fn reasons_are_classified_by_the_kind_they_were_made_as() {
        assert_eq!(
            QuarantineKind::of(&evidence_refused("bad nonce")),
            QuarantineKind::EvidenceRefused
        );
        let differ = format!("{MEASUREMENTS_DIFFER} (closest: operator): PCR 4 = ab");
        assert_eq!(
            QuarantineKind::of(&differ),
            QuarantineKind::MeasurementsDiffer
        );
        let policy = "PCR 0 = 00 is not among policy kiosks's golden values";
        assert_eq!(QuarantineKind::of(policy), QuarantineKind::Policy);
        assert!(!QuarantineKind::Policy.accept_lifts());
        assert!(QuarantineKind::MeasurementsDiffer.accept_lifts());
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn pcrs(v: &[(u32, u8)]) -> BTreeMap<u32, [u8; 32]> {
        v.iter().map(|(k, b)| (*k, [*b; 32])).collect()
    }

    fn policy() -> AttestPolicy {
        AttestPolicy {
            name: "p".into(),
            selector: "site=a".into(),
            priority: 100,
            require: Require::Software,
            pcrs: vec![0, 4],
            tofu: true,
            golden: BTreeMap::new(),
        }
    }

    #[test]
    fn first_use_records_then_a_change_quarantines_and_a_predicted_set_does_not() {
        let p = policy();
        let first = pcrs(&[(0, 1), (4, 2)]);
        let Verdict::Trusted { record: Some(set) } =
            judge(Some(&p), Some(kind::SOFTWARE), &[], &first, 7)
        else {
            panic!("first use must record");
        };
        let mut accepted = vec![set];
        assert_eq!(
            judge(Some(&p), Some(kind::SOFTWARE), &accepted, &first, 8),
            Verdict::Trusted { record: None }
        );
        let changed = pcrs(&[(0, 1), (4, 3)]);
        let Verdict::Quarantined(why) =
            judge(Some(&p), Some(kind::SOFTWARE), &accepted, &changed, 9)
        else {
            panic!("a changed PCR must quarantine");
        };
        assert!(why.contains("PCR 4"), "{why}");
        assert!(!why.contains("PCR 0"), "{why}");
        // A set that lacks a judged PCR (a narrower `expect`, or a policy that grew)
        // trusts nothing.
        let partial = MeasurementSet {
            source: "partial".into(),
            added_ms: 9,
            pcrs: pcrs_hex(&pcrs(&[(4, 3)])),
        };
        assert!(matches!(
            judge(Some(&p), Some(kind::SOFTWARE), &[partial], &changed, 9),
            Verdict::Quarantined(w) if w.contains("PCR 0 is not in the accepted set")
        ));
        accepted.push(MeasurementSet {
            source: format!("{SOURCE_RELEASE}2.0"),
            added_ms: 9,
            pcrs: pcrs_hex(&changed),
        });
        assert_eq!(
            judge(Some(&p), Some(kind::SOFTWARE), &accepted, &changed, 10),
            Verdict::Trusted { record: None }
        );
    }

    #[test]
    fn identity_and_golden_values_are_enforced() {
        let mut p = policy();
        p.require = Require::Tpm;
        let v = pcrs(&[(0, 1), (4, 2)]);
        assert!(matches!(
            judge(Some(&p), Some(kind::SOFTWARE), &[], &v, 0),
            Verdict::Quarantined(w) if w.contains("requires")
        ));
        p.require = Require::None;
        p.golden.insert(4, vec![hex::encode([9u8; 32])]);
        assert!(matches!(
            judge(Some(&p), None, &[], &v, 0),
            Verdict::Quarantined(w) if w.contains("golden")
        ));
        p.golden.insert(4, vec![hex::encode([2u8; 32])]);
        assert!(matches!(
            judge(Some(&p), None, &[], &v, 0),
            Verdict::Trusted { .. }
        ));
        // No policy: recorded, never quarantined.
        assert_eq!(
            judge(None, None, &[], &v, 0),
            Verdict::Trusted { record: None }
        );
    }

    #[test]
    fn the_first_matching_policy_by_priority_wins_and_bad_policies_are_explained() {
        let mut a = policy();
        a.name = "a".into();
        a.priority = 50;
        let mut b = policy();
        b.name = "b".into();
        b.selector = "site".into();
        b.priority = 10;
        let labels: Labels = crate::desired::parse_labels("site=a").unwrap();
        let pols = [a.clone(), b];
        assert_eq!(policy_for(&pols, &labels).unwrap().name, "b");
        let other: Labels = crate::desired::parse_labels("zone=x").unwrap();
        assert!(policy_for(&pols, &other).is_none());
        a.golden.insert(9, vec!["00".into()]);
        assert!(a.validate().unwrap_err().contains("does not quote"));
        a.golden = BTreeMap::from([(4, vec!["zz".into()])]);
        assert!(a.validate().unwrap_err().contains("64 hex"));
        a.golden.clear();
        a.name = "bad name".into();
        assert!(a.validate().is_err());
    }
}
