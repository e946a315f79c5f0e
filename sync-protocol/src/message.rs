//! The messages of protocol version 1.
//!
//! Wire stability: these types *are* the wire format (postcard encodes fields in order and
//! enum variants by index). Add variants only at the end of an enum and bump
//! [`PROTOCOL_VERSION`] for anything else; internal types of the agent and hub are
//! converted to these at the boundary and never put on the wire directly.

use std::collections::BTreeMap;

use ed25519_dalek::VerifyingKey;
use serde::{Deserialize, Serialize};

use crate::bounded::{DeviceId, LabelKey, LabelValue, ResourceName, Text};
use crate::state::StateUpdate;

/// ALPN protocol identifier of Cairn's QUIC connections.
pub const ALPN: &[u8] = b"cairn/1";
/// The protocol version this crate speaks. A peer announces a range in its hello.
/// Version 2 added attestation (identity in the enrollment request, challenges and
/// evidence); version 1 was never released, so it is not spoken.
pub const PROTOCOL_VERSION: u16 = 2;
/// Oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// Most PCRs a challenge may ask for (a PC Client TPM has 24).
pub const MAX_PCRS: usize = 24;
/// Most reports in one `Reports` message.
pub const MAX_REPORTS_PER_BATCH: usize = 512;
/// Most labels on one device.
pub const MAX_LABELS: usize = 64;

/// Labels of a device, e.g. `site=paris`.
pub type Labels = BTreeMap<LabelKey, LabelValue>;

/// First message of every connection, from the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub min_version: u16,
    pub max_version: u16,
    /// The agent's software version, for the operator's eyes.
    pub agent_version: Text<64>,
    pub intent: Intent,
}

/// What the agent wants from this connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Intent {
    /// Join the fleet with a join token; the connection has no client certificate yet.
    Enroll(EnrollRequest),
    /// Sync as an enrolled device (the connection carries the device certificate).
    Sync {
        /// Revision of the verified desired state the agent holds (0 for none).
        state_revision: u64,
    },
}

/// A request to join the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// The secret part of the join token (the CA fingerprint part never travels).
    pub token: Text<128>,
    /// PKCS#10 certificate signing request (DER) for the key the agent generated.
    pub csr_der: Vec<u8>,
    /// The box's host name, as a hint for operators.
    pub hostname: Text<64>,
    /// The device's root of trust, if it has one; the hub then binds the device to it
    /// (credential activation) before it issues the certificate.
    pub identity: Option<AttestIdentity>,
}

/// What kind of root of trust the agent claims.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum IdentityKind {
    Tpm,
    /// Keys in the agent's memory (fleet simulation, boxes without a TPM): proves
    /// nothing about the hardware; hub policy may refuse it.
    Software,
}

/// The keys a device proves itself with (TPM 2.0 wire structures).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttestIdentity {
    pub kind: IdentityKind,
    /// Endorsement key, `TPM2B_PUBLIC`.
    pub ek_public: Vec<u8>,
    /// EK certificate (DER) from the TPM's NV storage, if it has one.
    pub ek_certificate: Option<Vec<u8>>,
    /// Attestation key (restricted signing), `TPM2B_PUBLIC`.
    pub ak_public: Vec<u8>,
}

/// The hub asks for evidence: a quote over `pcrs` and the event log.
///
/// The quote's qualifying data is not `nonce` itself but
/// [`crate::attest::quote_nonce`]`(nonce, exporter)`, where `exporter` is keying
/// material exported from this connection's TLS session: a quote made for one
/// connection is useless on another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Challenge {
    pub nonce: [u8; 32],
    /// PCR indices of the sha256 bank, ascending.
    pub pcrs: heapless::Vec<u8, MAX_PCRS>,
    /// How many bytes of the device's event log the hub already holds; the agent sends
    /// only the rest if its log starts with exactly those bytes.
    pub log_held: u64,
    /// SHA-256 of the `log_held` bytes the hub holds.
    pub log_held_sha256: [u8; 32],
    /// At enrollment: a credential for the claimed EK and AK (`TPM2_MakeCredential`).
    pub credential: Option<CredentialChallenge>,
    /// How many bytes of the device's IMA measurement list (sha256 per-bank format)
    /// the hub verified, and PCR 10 after replaying them: the agent sends only the rest
    /// if its list starts with a head that replays to that value.
    pub ima_held: u64,
    pub ima_held_pcr10: [u8; 32],
}

/// A credential only the TPM holding both the EK and the AK can open.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialChallenge {
    /// `TPM2B_ID_OBJECT`.
    pub blob: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET`.
    pub secret: Vec<u8>,
}

/// The agent's answer to a [`Challenge`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Evidence {
    /// The credential's secret, recovered by `TPM2_ActivateCredential`.
    pub credential: Option<Vec<u8>>,
    /// `TPMS_ATTEST` as signed.
    pub attest: Vec<u8>,
    /// `TPMT_SIGNATURE`.
    pub signature: Vec<u8>,
    /// The quoted PCR values, in the order of the challenge's `pcrs`.
    pub pcrs: heapless::Vec<[u8; 32], MAX_PCRS>,
    /// Offset in the event log where `log` starts: the challenge's `log_held` if the
    /// agent's log starts with the hub's bytes, else 0 (the whole log).
    pub log_offset: u64,
    pub log: Vec<u8>,
    /// The IMA measurement list from `ima_offset` on, read after the quote; `None` if
    /// the box keeps no sha256 IMA list.
    pub ima: Option<ImaTail>,
}

/// The part of an IMA measurement list the hub has not verified yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImaTail {
    /// The challenge's `ima_held` if the agent's list continues what the hub verified,
    /// else 0 (the whole list: a new boot).
    pub offset: u64,
    pub bytes: Vec<u8>,
}

/// The hub's answer to a successful enrollment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device: DeviceId,
    /// The device certificate (DER), issued by the hub CA for the key in the CSR.
    pub certificate_der: Vec<u8>,
    /// The hub's ed25519 key that signs desired state; the agent pins it.
    pub state_key: VerifyingKey,
    pub labels: Labels,
}

/// The hub's answer to a sync hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Version both sides speak from here on.
    pub version: u16,
    pub device: DeviceId,
    /// Highest report sequence number the hub has stored durably (0 for none).
    pub reports_acked: u64,
}

/// Why a hub refused a hello. Sent before it closes the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalCode {
    UnsupportedVersion,
    UnknownToken,
    TokenExpired,
    TokenUsedUp,
    BadCsr,
    NotEnrolled,
    UnknownDevice,
    DeviceRevoked,
    ProtocolViolation,
    Internal,
    ShuttingDown,
    /// The hub waited too long for the agent (e.g. for its first stream): an overloaded
    /// link or agent, not a broken one.
    Timeout,
    /// The device's identity or evidence did not verify (EK certificate from an
    /// untrusted CA, failed credential activation, bad quote, log that does not replay,
    /// identity the policy does not allow).
    AttestationFailed,
}

impl RefusalCode {
    // Append new codes at the end: the position is the close code and the wire tag.
    const ALL: [RefusalCode; 13] = [
        Self::UnsupportedVersion,
        Self::UnknownToken,
        Self::TokenExpired,
        Self::TokenUsedUp,
        Self::BadCsr,
        Self::NotEnrolled,
        Self::UnknownDevice,
        Self::DeviceRevoked,
        Self::ProtocolViolation,
        Self::Internal,
        Self::ShuttingDown,
        Self::Timeout,
        Self::AttestationFailed,
    ];

    /// The QUIC application error code a hub closes the connection with (0 is a normal
    /// close).
    pub fn close_code(self) -> u32 {
        Self::ALL
            .iter()
            .position(|c| *c == self)
            .map_or(0, |i| i as u32 + 1)
    }

    pub fn from_close_code(code: u64) -> Option<Self> {
        let i = usize::try_from(code).ok()?.checked_sub(1)?;
        Self::ALL.get(i).copied()
    }

    /// Whether an agent can expect a later retry of the same request to succeed.
    pub fn is_retryable(self) -> bool {
        matches!(self, Self::Internal | Self::ShuttingDown | Self::Timeout)
    }
}

/// A refusal with a message saying what to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: RefusalCode,
    pub message: Text<256>,
}

/// One entry of an agent's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// Per-device sequence number, 1, 2, 3, … without gaps.
    pub seq: u64,
    /// Agent wall-clock time in milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub body: ReportBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReportBody {
    Event(Event),
    Status(Status),
    /// Where the device's OS upgrade stands (sent on every phase change and as
    /// download progress).
    Upgrade(UpgradeReport),
}

/// Phases of an A/B upgrade, as the agent records them durably.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpgradePhase {
    /// Writing the inactive slot (blocks copied locally or downloaded).
    Downloading,
    /// Every block written and flushed.
    Written,
    /// The slot read back and matched the signed manifest.
    Verified,
    /// The boot loader will try the new slot once on the next boot.
    TrialArmed,
    /// The agent asked for the reboot into the trial.
    Rebooting,
    /// Running the new slot on trial; health checks in progress.
    TrialRunning,
    /// The new slot passed its checks and is the default now.
    Committed,
    /// The trial failed; the device runs its previous slot again.
    RolledBack,
    /// Refused or abandoned before any reboot (bad release, no space, …); the active
    /// slot was never touched.
    Failed,
}

impl UpgradePhase {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Downloading => "downloading",
            Self::Written => "written",
            Self::Verified => "verified",
            Self::TrialArmed => "trial-armed",
            Self::Rebooting => "rebooting",
            Self::TrialRunning => "trial-running",
            Self::Committed => "committed",
            Self::RolledBack => "rolled-back",
            Self::Failed => "failed",
        }
    }

    /// Whether the upgrade is over (nothing more will happen without a new release).
    pub fn is_final(self) -> bool {
        matches!(self, Self::Committed | Self::RolledBack | Self::Failed)
    }
}

/// One upgrade status report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UpgradeReport {
    /// The release being installed (or that ended in `phase`).
    pub version: Text<64>,
    pub phase: UpgradePhase,
    pub target_slot: crate::release::Slot,
    /// The slot the running system booted from.
    pub booted_slot: crate::release::Slot,
    /// The version the device committed last (what it falls back to).
    pub committed_version: Text<64>,
    /// Bytes of the payloads written so far and in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Of `bytes_done`: bytes that came over the network (the rest was copied locally).
    pub bytes_downloaded: u64,
    /// Why the upgrade failed or was rolled back.
    pub error: Option<Text<256>>,
}

/// Something that happened on the device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    pub kind: EventKind,
    pub resource: Option<ResourceName>,
    pub revision: Option<u64>,
    pub message: Text<512>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventKind {
    /// A verified desired-state revision was stored.
    StateAccepted,
    /// A desired-state revision was refused (stale, badly signed, …).
    StateRejected,
    /// A resource was brought to its desired state.
    Applied,
    /// A resource could not be applied.
    ApplyFailed,
    /// A managed resource had been changed locally and was restored.
    DriftCorrected,
    /// A resource no longer in desired state was removed.
    Removed,
    /// The agent started.
    AgentStarted,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StateAccepted => "state-accepted",
            Self::StateRejected => "state-rejected",
            Self::Applied => "applied",
            Self::ApplyFailed => "apply-failed",
            Self::DriftCorrected => "drift-corrected",
            Self::Removed => "removed",
            Self::AgentStarted => "agent-started",
        }
    }
}

/// Where the device stands: which revision it holds and which it has applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    pub desired_revision: u64,
    pub applied_revision: u64,
    /// Resources of the desired revision that currently fail to apply.
    pub failing: u32,
}

/// Every message an agent sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(Hello),
    /// The agent stored revision `revision` durably.
    StateAck {
        revision: u64,
    },
    /// The agent could not use the last update (e.g. its base differs) and holds
    /// `state_revision`; the hub answers with a full snapshot.
    ResyncRequest {
        state_revision: u64,
    },
    Reports(Vec<Report>),
    /// Reports `after + 1 ..= up_to` no longer exist anywhere: the hub had acknowledged
    /// them, the agent deleted them, and the hub has since lost them (its database was
    /// restored from a backup). Lets the stream continue instead of stalling on the gap;
    /// the hub records the loss as an event.
    ReportsLost {
        after: u64,
        up_to: u64,
    },
    /// Answer to a [`HubMessage::Challenge`] (boxed: its PCR values are inline).
    Evidence(Box<Evidence>),
}

/// Every message a hub sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HubMessage {
    Welcome(Welcome),
    Enrolled(EnrollResponse),
    Refused(Refusal),
    State(StateUpdate),
    /// Every report with `seq <= up_to` is stored durably by the hub.
    ReportAck {
        up_to: u64,
    },
    /// Prove what you are and what you booted.
    Challenge(Challenge),
}

impl crate::frame::Message for AgentMessage {
    const KINDS: u32 = 6;
}

impl crate::frame::Message for HubMessage {
    const KINDS: u32 = 6;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `KINDS` must follow the enums: encoding the last variant gives index KINDS - 1.
    #[test]
    fn kinds_match_the_enums() {
        let last = postcard::to_allocvec(&AgentMessage::Evidence(Box::new(Evidence {
            credential: None,
            attest: vec![],
            signature: vec![],
            pcrs: heapless::Vec::new(),
            log_offset: 0,
            log: vec![],
            ima: None,
        })))
        .unwrap();
        assert_eq!(
            u32::from(last[0]) + 1,
            <AgentMessage as crate::frame::Message>::KINDS
        );
        let last = postcard::to_allocvec(&HubMessage::Challenge(Challenge {
            nonce: [0; 32],
            pcrs: heapless::Vec::new(),
            log_held: 0,
            log_held_sha256: [0; 32],
            credential: None,
            ima_held: 0,
            ima_held_pcr10: [0; 32],
        }))
        .unwrap();
        assert_eq!(
            u32::from(last[0]) + 1,
            <HubMessage as crate::frame::Message>::KINDS
        );
    }
}
