//! The hub's side of one connection, without I/O. Same polling discipline as
//! [`crate::agent::AgentSession`].
//!
//! ```text
//!  AwaitingHello ──Hello{Sync}──► AwaitingDecision ──accept_sync──► Synced
//!        │         Hello{Enroll}─► AwaitingDecision ──accept_enroll─► Done
//!        │                            │  ▲
//!        │                  challenge ▼  │ Evidence
//!        │                         AwaitingEvidence
//!        └── timeout / bad frame / refuse ──────────────────────────► Done
//! ```
//!
//! In `Synced` the driver may [`HubSession::challenge`] at any time (on connect and
//! periodically); the evidence comes back as [`HubEvent::Evidence`], and a challenge
//! left unanswered past its deadline fails the session.
//!
//! In `Synced`, reports are passed on only once each and in order: duplicates of what
//! was already passed on are dropped, a gap is a protocol violation. The driver makes
//! them durable and then calls [`HubSession::reports_durable`], which acknowledges.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::bounded::{DeviceId, Text};
use crate::message::{
    AgentMessage, Challenge, EnrollRequest, EnrollResponse, Evidence, HubMessage, Intent,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Refusal, RefusalCode, Report, Welcome,
};
use crate::session::{SessionConfig, SessionError, Wire};
use crate::state::StateUpdate;

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HubEvent {
    /// An agent without a certificate wants to join with a token. Answer with
    /// [`HubSession::accept_enroll`] or [`HubSession::refuse`].
    EnrollRequested {
        agent_version: String,
        request: EnrollRequest,
    },
    /// An enrolled agent wants to sync. Answer with [`HubSession::accept_sync`] or
    /// [`HubSession::refuse`].
    SyncRequested {
        agent_version: String,
        state_revision: u64,
    },
    /// New reports, in order, each seen for the first time in this session.
    Reports(Vec<Report>),
    /// The agent declares reports `from ..= to` lost (see
    /// [`AgentMessage::ReportsLost`]): record that, then call
    /// [`HubSession::reports_durable`] with `to` once it is durable.
    ReportsLost { from: u64, to: u64 },
    /// The agent stored `revision`.
    StateAcked { revision: u64 },
    /// The agent needs a full snapshot; it holds `state_revision`.
    ResyncRequested { state_revision: u64 },
    /// The agent's answer to the outstanding [`HubSession::challenge`]. During
    /// enrollment, answer with `accept_enroll` or `refuse` afterwards.
    Evidence(Box<Evidence>),
    /// The session failed; close the connection.
    Failed(SessionError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingHello { deadline: Instant },
    AwaitingDecision { deadline: Instant, enroll: bool },
    AwaitingEvidence { deadline: Instant },
    Synced,
    Done,
}

/// One connection's protocol state on the hub.
#[derive(Debug)]
pub struct HubSession {
    phase: Phase,
    wire: Wire,
    events: VecDeque<HubEvent>,
    version: u16,
    /// Highest report sequence number known durable.
    durable: u64,
    /// Highest report sequence number passed to the driver.
    received: u64,
    max_batch: usize,
    max_frame_len: usize,
    handshake_timeout: Duration,
    /// In `Synced`: when the outstanding challenge must be answered by.
    evidence_deadline: Option<Instant>,
}

impl HubSession {
    pub fn new(now: Instant, cfg: &SessionConfig) -> Self {
        Self {
            phase: Phase::AwaitingHello {
                deadline: now + cfg.handshake_timeout,
            },
            wire: {
                let mut w = Wire::new(cfg.max_frame_len);
                w.set_max_frame_len(cfg.max_handshake_frame_len.min(cfg.max_frame_len));
                w
            },
            events: VecDeque::new(),
            version: PROTOCOL_VERSION,
            durable: 0,
            received: 0,
            max_batch: cfg.max_batch,
            max_frame_len: cfg.max_frame_len,
            handshake_timeout: cfg.handshake_timeout,
            evidence_deadline: None,
        }
    }

    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The protocol version agreed in the hello.
    pub fn version(&self) -> u16 {
        self.version
    }

    fn send(&mut self, msg: &HubMessage) {
        if let Err(e) = self.wire.send(msg) {
            self.fail(SessionError::Frame(e));
        }
    }

    fn fail(&mut self, e: SessionError) {
        if self.phase != Phase::Done {
            self.phase = Phase::Done;
            self.events.push_back(HubEvent::Failed(e));
        }
    }

    fn violation(&mut self, what: String) {
        let refusal = Refusal {
            code: RefusalCode::ProtocolViolation,
            message: Text::truncated(&what),
        };
        self.send(&HubMessage::Refused(refusal));
        self.fail(SessionError::Protocol(what));
    }

    /// Bytes received on the session stream.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        if self.phase == Phase::Done {
            return;
        }
        self.wire.push(bytes);
        loop {
            match self.wire.next::<AgentMessage>() {
                Ok(Some(msg)) => self.handle_message(now, msg),
                Ok(None) => break,
                Err(e) => {
                    let what = format!("bad frame: {e}");
                    self.send(&HubMessage::Refused(Refusal {
                        code: RefusalCode::ProtocolViolation,
                        message: Text::truncated(&what),
                    }));
                    self.fail(e.into());
                    break;
                }
            }
            if self.phase == Phase::Done {
                break;
            }
        }
    }

    /// The agent closed its side of the stream.
    pub fn handle_end_of_stream(&mut self) {
        let err = self.wire.end_of_stream();
        self.fail(err);
    }

    fn handle_message(&mut self, now: Instant, msg: AgentMessage) {
        match (self.phase, msg) {
            (Phase::AwaitingEvidence { .. }, AgentMessage::Evidence(e)) => {
                self.phase = Phase::AwaitingDecision {
                    deadline: now + self.handshake_timeout,
                    enroll: true,
                };
                self.events.push_back(HubEvent::Evidence(e));
            }
            (Phase::Synced, AgentMessage::Evidence(e)) => {
                if self.evidence_deadline.take().is_none() {
                    return self.violation("evidence without a challenge".into());
                }
                self.events.push_back(HubEvent::Evidence(e));
            }
            (Phase::AwaitingHello { deadline }, AgentMessage::Hello(h)) => {
                let lo = h.min_version.max(MIN_PROTOCOL_VERSION);
                let hi = h.max_version.min(PROTOCOL_VERSION);
                if lo > hi {
                    let refusal = Refusal {
                        code: RefusalCode::UnsupportedVersion,
                        message: Text::truncated(&format!(
                            "agent speaks protocol versions {}..={}, this hub {}..={}; upgrade the older side",
                            h.min_version, h.max_version, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION
                        )),
                    };
                    return self.refuse(refusal);
                }
                self.version = hi;
                let agent_version = h.agent_version.as_str().to_string();
                match h.intent {
                    Intent::Enroll(request) => {
                        self.phase = Phase::AwaitingDecision {
                            deadline,
                            enroll: true,
                        };
                        self.events.push_back(HubEvent::EnrollRequested {
                            agent_version,
                            request,
                        });
                    }
                    Intent::Sync { state_revision } => {
                        self.phase = Phase::AwaitingDecision {
                            deadline,
                            enroll: false,
                        };
                        self.events.push_back(HubEvent::SyncRequested {
                            agent_version,
                            state_revision,
                        });
                    }
                }
            }
            (Phase::Synced, AgentMessage::Reports(reports)) => self.handle_reports(reports),
            (Phase::Synced, AgentMessage::ReportsLost { after, up_to }) => {
                if after != self.received || up_to <= after {
                    return self.violation(format!(
                        "reports lost after {after} up to {up_to}, but {} were received",
                        self.received
                    ));
                }
                self.received = up_to;
                self.events.push_back(HubEvent::ReportsLost {
                    from: after + 1,
                    to: up_to,
                });
            }
            (Phase::Synced, AgentMessage::StateAck { revision }) => {
                self.events.push_back(HubEvent::StateAcked { revision });
            }
            (Phase::Synced, AgentMessage::ResyncRequest { state_revision }) => {
                self.events
                    .push_back(HubEvent::ResyncRequested { state_revision });
            }
            (phase, msg) => self.violation(format!(
                "unexpected {} in phase {}",
                agent_message_name(&msg),
                phase_name(phase)
            )),
        }
    }

    fn handle_reports(&mut self, reports: Vec<Report>) {
        if reports.len() > self.max_batch {
            return self.violation(format!(
                "batch of {} reports exceeds the limit of {}",
                reports.len(),
                self.max_batch
            ));
        }
        let mut fresh = Vec::new();
        for r in reports {
            if r.seq <= self.received {
                continue; // resend of something already passed on: idempotent
            }
            if r.seq != self.received + 1 {
                return self.violation(format!(
                    "report {} follows {}: sequence numbers must not have gaps",
                    r.seq, self.received
                ));
            }
            self.received = r.seq;
            fresh.push(r);
        }
        if fresh.is_empty() {
            if self.received == self.durable {
                self.send(&HubMessage::ReportAck {
                    up_to: self.durable,
                });
            }
        } else {
            self.events.push_back(HubEvent::Reports(fresh));
        }
    }

    /// Accept a sync hello; `reports_acked` is the highest report sequence number the
    /// hub holds durably for this device.
    pub fn accept_sync(&mut self, device: DeviceId, reports_acked: u64) {
        if !matches!(self.phase, Phase::AwaitingDecision { enroll: false, .. }) {
            return;
        }
        self.phase = Phase::Synced;
        self.wire.set_max_frame_len(self.max_frame_len);
        self.durable = reports_acked;
        self.received = reports_acked;
        let welcome = Welcome {
            version: self.version,
            device,
            reports_acked,
        };
        self.send(&HubMessage::Welcome(welcome));
    }

    /// Answer an enrollment; the session ends (the agent reconnects with its certificate).
    pub fn accept_enroll(&mut self, response: EnrollResponse) {
        if !matches!(self.phase, Phase::AwaitingDecision { enroll: true, .. }) {
            return;
        }
        self.send(&HubMessage::Enrolled(response));
        self.phase = Phase::Done;
    }

    /// Ask for evidence, to arrive within `timeout`. During enrollment (after the
    /// request was found acceptable so far) this also lifts the handshake's frame-size
    /// limit: event logs are larger than a hello.
    pub fn challenge(&mut self, now: Instant, challenge: Challenge, timeout: Duration) {
        match self.phase {
            Phase::AwaitingDecision { enroll: true, .. } => {
                self.wire.set_max_frame_len(self.max_frame_len);
                self.phase = Phase::AwaitingEvidence {
                    deadline: now + timeout,
                };
            }
            Phase::Synced if self.evidence_deadline.is_none() => {
                self.evidence_deadline = Some(now + timeout);
            }
            _ => return,
        }
        self.send(&HubMessage::Challenge(challenge));
    }

    /// Whether a challenge is waiting for its evidence.
    pub fn challenge_outstanding(&self) -> bool {
        matches!(self.phase, Phase::AwaitingEvidence { .. }) || self.evidence_deadline.is_some()
    }

    /// Refuse, saying why; the session ends.
    pub fn refuse(&mut self, refusal: Refusal) {
        if self.phase == Phase::Done {
            return;
        }
        self.send(&HubMessage::Refused(refusal));
        self.phase = Phase::Done;
    }

    /// Reports up to `up_to` are stored durably: acknowledge them.
    pub fn reports_durable(&mut self, up_to: u64) {
        if self.phase != Phase::Synced || up_to <= self.durable {
            return;
        }
        self.durable = up_to.min(self.received);
        self.send(&HubMessage::ReportAck {
            up_to: self.durable,
        });
    }

    /// Send a state update (delta or snapshot).
    pub fn send_state(&mut self, update: StateUpdate) {
        if self.phase == Phase::Synced {
            self.send(&HubMessage::State(update));
        }
    }

    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.wire.poll_transmit()
    }

    #[must_use]
    pub fn poll_event(&mut self) -> Option<HubEvent> {
        self.events.pop_front()
    }

    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitingHello { deadline }
            | Phase::AwaitingDecision { deadline, .. }
            | Phase::AwaitingEvidence { deadline } => Some(deadline),
            Phase::Synced => self.evidence_deadline,
            Phase::Done => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(deadline) = self.poll_timeout()
            && now >= deadline
        {
            self.fail(match self.phase {
                Phase::Synced | Phase::AwaitingEvidence { .. } => SessionError::EvidenceTimeout,
                _ => SessionError::HandshakeTimeout,
            });
        }
    }
}

fn agent_message_name(m: &AgentMessage) -> &'static str {
    match m {
        AgentMessage::Hello(_) => "Hello",
        AgentMessage::StateAck { .. } => "StateAck",
        AgentMessage::ResyncRequest { .. } => "ResyncRequest",
        AgentMessage::Reports(_) => "Reports",
        AgentMessage::ReportsLost { .. } => "ReportsLost",
        AgentMessage::Evidence(_) => "Evidence",
    }
}

fn phase_name(p: Phase) -> &'static str {
    match p {
        Phase::AwaitingHello { .. } => "awaiting hello",
        Phase::AwaitingDecision { .. } => "awaiting decision",
        Phase::AwaitingEvidence { .. } => "awaiting evidence",
        Phase::Synced => "synced",
        Phase::Done => "done",
    }
}
