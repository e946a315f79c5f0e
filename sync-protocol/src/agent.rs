//! The agent's side of one connection, without I/O.
//!
//! The driver (the agent's QUIC task) feeds it received bytes, the current time and the
//! results of its own work (state stored, reports loaded from the outbox), and drains
//! frames to send ([`AgentSession::poll_transmit`]), events to act on
//! ([`AgentSession::poll_event`]) and the next deadline ([`AgentSession::poll_timeout`]).
//! Call order after any input: drain transmits, then events, then re-read the timeout.
//!
//! ```text
//!  sync():   Hello{Sync} ──► AwaitingWelcome ──Welcome──► Synced ──► (reports, state, acks)
//!  enroll(): Hello{Enroll} ► AwaitingEnrolled ─Enrolled─► Done
//!            (a Challenge may come in AwaitingEnrolled or Synced: answer with evidence)
//!                    any ──Refused / bad frame / timeout──► Done (Failed or Refused event)
//! ```

use std::collections::VecDeque;
use std::time::Instant;

use crate::bounded::{DeviceId, Text};
use crate::message::{
    AgentMessage, Challenge, EnrollRequest, EnrollResponse, Evidence, Hello, HubMessage, Intent,
    MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, Refusal, Report,
};
use crate::session::{SessionConfig, SessionError, Wire};
use crate::state::StateUpdate;

/// What the driver must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEvent {
    /// Enrollment succeeded: store the identity, then reconnect with the certificate.
    Enrolled(EnrollResponse),
    /// The hub accepted the sync session. If `reports_acked` is above the last sequence
    /// number the agent ever allocated, the agent must continue numbering above it.
    Welcomed {
        device: DeviceId,
        version: u16,
        reports_acked: u64,
    },
    /// The hub refused; the session is over.
    Refused(Refusal),
    /// The hub offers a state update: verify it, store it, then call
    /// [`AgentSession::state_stored`] (or [`AgentSession::state_unusable`]).
    StateOffered(StateUpdate),
    /// Reports up to `up_to` are durable at the hub: delete them from the outbox.
    ReportsAcked { up_to: u64 },
    /// Load up to `limit` reports with sequence numbers after `after` from the outbox and
    /// pass them to [`AgentSession::send_reports`].
    ReportsWanted { after: u64, limit: usize },
    /// The hub asks for attestation evidence: quote, event log, and at enrollment the
    /// credential's secret. Answer with [`AgentSession::send_evidence`].
    Challenged(Challenge),
    /// The session failed; close the connection and reconnect later.
    Failed(SessionError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    AwaitingWelcome { deadline: Instant },
    AwaitingEnrolled { deadline: Instant },
    Synced,
    Done,
}

/// One connection's protocol state on the agent.
#[derive(Debug)]
pub struct AgentSession {
    cfg: SessionConfig,
    phase: Phase,
    wire: Wire,
    events: VecDeque<AgentEvent>,
    /// Highest report sequence number the hub has acknowledged.
    acked: u64,
    /// Highest report sequence number sent on this connection.
    sent: u64,
    /// Highest sequence number in the driver's outbox.
    outbox_tail: u64,
    /// A `ReportsWanted` was emitted and not yet answered.
    wanted_pending: bool,
    /// When the oldest unacknowledged batch was sent.
    in_flight_since: Option<Instant>,
}

impl AgentSession {
    fn start(now: Instant, cfg: SessionConfig, intent: Intent, agent_version: &str) -> Self {
        let deadline = now + cfg.handshake_timeout;
        let phase = match intent {
            Intent::Enroll(_) => Phase::AwaitingEnrolled { deadline },
            Intent::Sync { .. } => Phase::AwaitingWelcome { deadline },
        };
        let mut s = Self {
            wire: Wire::new(cfg.max_frame_len),
            cfg,
            phase,
            events: VecDeque::new(),
            acked: 0,
            sent: 0,
            outbox_tail: 0,
            wanted_pending: false,
            in_flight_since: None,
        };
        let hello = AgentMessage::Hello(Hello {
            min_version: MIN_PROTOCOL_VERSION,
            max_version: PROTOCOL_VERSION,
            agent_version: Text::truncated(agent_version),
            intent,
        });
        s.send(&hello);
        s
    }

    /// A sync session for an enrolled device holding `state_revision`.
    pub fn sync(
        now: Instant,
        cfg: SessionConfig,
        state_revision: u64,
        agent_version: &str,
    ) -> Self {
        Self::start(now, cfg, Intent::Sync { state_revision }, agent_version)
    }

    /// An enrollment session.
    pub fn enroll(
        now: Instant,
        cfg: SessionConfig,
        request: EnrollRequest,
        agent_version: &str,
    ) -> Self {
        Self::start(now, cfg, Intent::Enroll(request), agent_version)
    }

    /// Whether the session has ended (after an event saying why).
    pub fn is_done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Highest report sequence number the hub acknowledged in this session.
    pub fn reports_acked(&self) -> u64 {
        self.acked
    }

    fn send(&mut self, msg: &AgentMessage) {
        if let Err(e) = self.wire.send(msg) {
            self.fail(SessionError::Frame(e));
        }
    }

    fn fail(&mut self, e: SessionError) {
        if self.phase != Phase::Done {
            self.phase = Phase::Done;
            self.events.push_back(AgentEvent::Failed(e));
        }
    }

    /// Bytes received on the session stream.
    pub fn handle_input(&mut self, now: Instant, bytes: &[u8]) {
        if self.phase == Phase::Done {
            return;
        }
        self.wire.push(bytes);
        loop {
            match self.wire.next::<HubMessage>() {
                Ok(Some(msg)) => self.handle_message(now, msg),
                Ok(None) => break,
                Err(e) => {
                    self.fail(e.into());
                    break;
                }
            }
            if self.phase == Phase::Done {
                break;
            }
        }
    }

    /// The hub closed its side of the stream.
    pub fn handle_end_of_stream(&mut self) {
        let err = self.wire.end_of_stream();
        self.fail(err);
    }

    fn handle_message(&mut self, now: Instant, msg: HubMessage) {
        match (self.phase, msg) {
            (_, HubMessage::Refused(r)) => {
                self.phase = Phase::Done;
                self.events.push_back(AgentEvent::Refused(r));
            }
            (Phase::AwaitingEnrolled { .. }, HubMessage::Challenge(c)) => {
                // The TPM's work counts against a fresh handshake deadline.
                self.phase = Phase::AwaitingEnrolled {
                    deadline: now + self.cfg.handshake_timeout,
                };
                self.events.push_back(AgentEvent::Challenged(c));
            }
            (Phase::Synced, HubMessage::Challenge(c)) => {
                self.events.push_back(AgentEvent::Challenged(c));
            }
            (Phase::AwaitingEnrolled { .. }, HubMessage::Enrolled(resp)) => {
                self.phase = Phase::Done;
                self.events.push_back(AgentEvent::Enrolled(resp));
            }
            (Phase::AwaitingWelcome { .. }, HubMessage::Welcome(w)) => {
                if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&w.version) {
                    return self.fail(SessionError::Protocol(format!(
                        "hub chose protocol version {} outside the offered range",
                        w.version
                    )));
                }
                self.phase = Phase::Synced;
                self.acked = w.reports_acked;
                self.sent = w.reports_acked;
                self.events.push_back(AgentEvent::Welcomed {
                    device: w.device,
                    version: w.version,
                    reports_acked: w.reports_acked,
                });
                // What the hub stored before this connection is acknowledged too (its
                // ack may have been lost with the previous connection).
                self.events.push_back(AgentEvent::ReportsAcked {
                    up_to: w.reports_acked,
                });
                self.maybe_want_reports(now);
            }
            (Phase::Synced, HubMessage::State(update)) => {
                self.events.push_back(AgentEvent::StateOffered(update));
            }
            (Phase::Synced, HubMessage::ReportAck { up_to }) => {
                if up_to > self.sent {
                    return self.fail(SessionError::Protocol(format!(
                        "hub acknowledged report {up_to}, only {} were sent",
                        self.sent
                    )));
                }
                if up_to > self.acked {
                    self.acked = up_to;
                    self.events.push_back(AgentEvent::ReportsAcked { up_to });
                }
                if self.acked == self.sent {
                    self.in_flight_since = None;
                }
                self.maybe_want_reports(now);
            }
            (phase, msg) => self.fail(SessionError::Protocol(format!(
                "unexpected {} in phase {phase:?}",
                hub_message_name(&msg)
            ))),
        }
    }

    /// The outbox now holds reports up to `seq`.
    pub fn outbox_tail(&mut self, now: Instant, seq: u64) {
        self.outbox_tail = self.outbox_tail.max(seq);
        self.maybe_want_reports(now);
    }

    fn maybe_want_reports(&mut self, _now: Instant) {
        if self.phase == Phase::Synced
            && !self.wanted_pending
            && self.sent == self.acked
            && self.outbox_tail > self.sent
        {
            self.wanted_pending = true;
            self.events.push_back(AgentEvent::ReportsWanted {
                after: self.sent,
                limit: self.cfg.max_batch,
            });
        }
    }

    /// Answer to [`AgentEvent::ReportsWanted`]: reports in sequence order, starting right
    /// after the `after` of the request. An empty list means none are left. If the first
    /// report comes later than `after + 1`, the reports in between are gone from the
    /// outbox although the hub does not hold them (the hub's database went back in
    /// time); the session declares them lost before sending the batch.
    pub fn send_reports(&mut self, now: Instant, reports: Vec<Report>) {
        self.wanted_pending = false;
        if self.phase != Phase::Synced {
            return;
        }
        let (Some(first), Some(last)) = (
            reports.first().map(|r| r.seq),
            reports.last().map(|r| r.seq),
        ) else {
            return;
        };
        let contiguous = reports
            .iter()
            .enumerate()
            .all(|(i, r)| r.seq == first + i as u64);
        if !contiguous || reports.len() > self.cfg.max_batch || first <= self.sent {
            // A driver bug, not a peer's fault; refuse rather than send a gap.
            return self.fail(SessionError::Protocol(format!(
                "outbox returned a non-contiguous or oversized batch after {}",
                self.sent
            )));
        }
        if first > self.sent + 1 {
            self.send(&AgentMessage::ReportsLost {
                after: self.sent,
                up_to: first - 1,
            });
        }
        self.sent = last;
        self.outbox_tail = self.outbox_tail.max(last);
        self.in_flight_since = Some(now);
        self.send(&AgentMessage::Reports(reports));
    }

    /// The answer to [`AgentEvent::Challenged`].
    pub fn send_evidence(&mut self, evidence: Evidence) {
        if matches!(self.phase, Phase::AwaitingEnrolled { .. } | Phase::Synced) {
            self.send(&AgentMessage::Evidence(Box::new(evidence)));
        }
    }

    /// The update to `revision` was verified and stored durably.
    pub fn state_stored(&mut self, revision: u64) {
        if self.phase == Phase::Synced {
            self.send(&AgentMessage::StateAck { revision });
        }
    }

    /// The last update could not be used (its base did not match); ask for a snapshot.
    pub fn state_unusable(&mut self, held_revision: u64) {
        if self.phase == Phase::Synced {
            self.send(&AgentMessage::ResyncRequest {
                state_revision: held_revision,
            });
        }
    }

    /// Next frame to write to the stream.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.wire.poll_transmit()
    }

    /// Next event for the driver.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<AgentEvent> {
        self.events.pop_front()
    }

    /// The earliest instant at which [`AgentSession::handle_timeout`] must be called.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::AwaitingWelcome { deadline } | Phase::AwaitingEnrolled { deadline } => {
                Some(deadline)
            }
            Phase::Synced => self.in_flight_since.map(|t| t + self.cfg.ack_timeout),
            Phase::Done => None,
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        match self.phase {
            Phase::AwaitingWelcome { deadline } | Phase::AwaitingEnrolled { deadline }
                if now >= deadline =>
            {
                self.fail(SessionError::HandshakeTimeout)
            }
            Phase::Synced => {
                if let Some(since) = self.in_flight_since
                    && now >= since + self.cfg.ack_timeout
                {
                    self.fail(SessionError::AckTimeout);
                }
            }
            _ => {}
        }
    }
}

fn hub_message_name(m: &HubMessage) -> &'static str {
    match m {
        HubMessage::Welcome(_) => "Welcome",
        HubMessage::Enrolled(_) => "Enrolled",
        HubMessage::Refused(_) => "Refused",
        HubMessage::State(_) => "State",
        HubMessage::ReportAck { .. } => "ReportAck",
        HubMessage::Challenge(_) => "Challenge",
    }
}
