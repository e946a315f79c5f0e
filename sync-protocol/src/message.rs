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
pub const PROTOCOL_VERSION: u16 = 1;
/// Oldest protocol version this crate still speaks.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
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
}

impl RefusalCode {
    // Append new codes at the end: the position is the close code and the wire tag.
    const ALL: [RefusalCode; 12] = [
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
}

impl crate::frame::Message for AgentMessage {
    const KINDS: u32 = 5;
}

impl crate::frame::Message for HubMessage {
    const KINDS: u32 = 5;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `KINDS` must follow the enums: encoding the last variant gives index KINDS - 1.
    #[test]
    fn kinds_match_the_enums() {
        let last =
            postcard::to_allocvec(&AgentMessage::ReportsLost { after: 0, up_to: 0 }).unwrap();
        assert_eq!(
            u32::from(last[0]) + 1,
            <AgentMessage as crate::frame::Message>::KINDS
        );
        let last = postcard::to_allocvec(&HubMessage::ReportAck { up_to: 0 }).unwrap();
        assert_eq!(
            u32::from(last[0]) + 1,
            <HubMessage as crate::frame::Message>::KINDS
        );
    }
}
