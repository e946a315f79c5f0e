//! The hub's decisions for one device's sync session, sans I/O: which desired state to
//! send and when, when reports may be acknowledged, when to challenge the device for
//! evidence, and whether state may flow at all (the gate).
//!
//! [`SyncCore`] sits between the protocol session ([`cairn_sync_protocol::hub`], which
//! owns the wire) and the store. Its inputs are what happened on the session (the
//! device synced, acknowledged a revision, asked for a snapshot, sent reports or
//! evidence), what the store answered, and the clock; its outputs are [`Action`]s,
//! taken one by one with [`SyncCore::poll_action`]. Two drivers run it: the QUIC
//! endpoint's connection task ([`crate::endpoint`]), which performs each action against
//! the real store and session, and the fleet simulator's deterministic mode, which does
//! so in virtual time. Neither decides anything of its own.
//!
//! # Invariants
//!
//! - At most one update is in flight: the next is read only once the device answered
//!   the last (a notification meanwhile is not lost: the answer triggers a fresh read of
//!   the newest revision).
//! - A revision the device refused is not sent again; only a newer one.
//! - Reports are acknowledged only after the store said they are durable.
//! - Nothing flows through a closed gate: an attested device's session waits for its
//!   first evidence; a quarantined one gets nothing until the store says the quarantine
//!   was lifted (re-checked on every push, so an operator's accept takes effect on the
//!   next change).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use cairn_sync_protocol::message::Report as ReportMsg;
use cairn_sync_protocol::sabotage::{self, Sabotage};
use cairn_sync_protocol::state::StateUpdate;

/// Whether desired state may flow on a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Open,
    /// Waiting for this session's first evidence (attested devices).
    Evidence,
    Quarantined,
}

/// What the driver must do next, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Read the update taking a device that holds `holds` to the newest revision (the
    /// store's delta or snapshot; [`crate::store::revisions::UpdatePlan`]) and pass it
    /// to [`SyncCore::update_read`].
    ReadUpdate { holds: u64 },
    /// Read a full snapshot of the newest revision and pass it to
    /// [`SyncCore::update_read`].
    ReadSnapshot,
    /// Send this update on the session.
    Send(StateUpdate),
    /// Record that the device holds `revision`.
    RecordHeld(u64),
    /// Store these reports, then pass the store's acknowledged mark to
    /// [`SyncCore::reports_stored`].
    StoreReports(Vec<ReportMsg>),
    /// Record that the device declared reports `from..=to` lost, then pass the mark to
    /// [`SyncCore::reports_stored`].
    SkipReports { from: u64, to: u64 },
    /// Tell the session that reports up to this number are durable.
    AckReports(u64),
    /// Send the device a challenge for fresh evidence.
    Challenge,
    /// Ask the store whether the quarantine still holds, and pass the answer to
    /// [`SyncCore::quarantine_checked`].
    CheckQuarantine,
}

/// A push waiting for the driver's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    /// The gate is being re-checked; then read.
    Gate { above: u64, snapshot: bool },
    /// The update is being read; send it if newer than `above`.
    Read { above: u64 },
}

/// One device's sync session, as the hub decides it.
#[derive(Debug)]
pub struct SyncCore {
    challenge_every: Duration,
    started: bool,
    attested: bool,
    gate: Gate,
    /// Revision the device said it holds.
    holds: u64,
    /// Revision sent and not yet answered.
    in_flight: Option<u64>,
    waiting: Option<Waiting>,
    next_challenge: Option<Instant>,
    actions: VecDeque<Action>,
}

impl SyncCore {
    /// A core for a new session; `challenge_every` is how often an attested device is
    /// asked for fresh evidence.
    pub fn new(challenge_every: Duration) -> Self {
        Self {
            challenge_every,
            started: false,
            attested: false,
            gate: Gate::Evidence,
            holds: 0,
            in_flight: None,
            waiting: None,
            next_challenge: None,
            actions: VecDeque::new(),
        }
    }

    /// The next action, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Whether desired state (and release bytes) may flow now.
    pub fn gate(&self) -> Gate {
        self.gate
    }

    /// The session was accepted for a device that holds `holds`. An attested device is
    /// challenged and gets nothing before its evidence verified; an unattested one
    /// starts with `unattested_gate` (closed when a policy requires attestation).
    pub fn start(&mut self, holds: u64, attested: bool, unattested_gate: Gate) {
        self.started = true;
        self.holds = holds;
        self.attested = attested;
        if attested {
            self.gate = Gate::Evidence;
            self.actions.push_back(Action::Challenge);
        } else {
            self.gate = unattested_gate;
            self.push(0, false);
        }
    }

    /// The device's desired state changed in the store.
    pub fn state_changed(&mut self) {
        self.push(0, false);
    }

    /// The device answered the update in flight: it now holds `revision` (below the
    /// one sent if it refused that).
    pub fn acked(&mut self, revision: u64) {
        let refused = self.in_flight.filter(|&r| revision < r);
        self.in_flight = None;
        self.holds = revision;
        self.actions.push_back(Action::RecordHeld(revision));
        // Do not resend what it refused; a newer revision may exist.
        self.push(refused.unwrap_or(0), false);
    }

    /// The device cannot use what it holds (`holds`) as a base: it gets a snapshot.
    pub fn resync(&mut self, holds: u64) {
        self.holds = holds;
        self.push(0, true);
    }

    /// Reports arrived; they are acknowledged once stored ([`Self::reports_stored`]).
    pub fn reports(&mut self, reports: Vec<ReportMsg>) {
        if sabotage::active(Sabotage::AckBeforeDurable)
            && let Some(last) = reports.last()
        {
            self.actions.push_back(Action::AckReports(last.seq));
        }
        self.actions.push_back(Action::StoreReports(reports));
    }

    /// The device declares reports `from..=to` lost (the hub's database went back).
    pub fn reports_lost(&mut self, from: u64, to: u64) {
        self.actions.push_back(Action::SkipReports { from, to });
    }

    /// The store holds the device's reports up to `acked`.
    pub fn reports_stored(&mut self, acked: u64) {
        self.actions.push_back(Action::AckReports(acked));
    }

    /// The store answered a [`Action::ReadUpdate`] or [`Action::ReadSnapshot`].
    pub fn update_read(&mut self, update: Option<StateUpdate>) {
        let Some(Waiting::Read { above }) = self.waiting.take() else {
            return;
        };
        if let Some(u) = update.filter(|u| u.revision > above) {
            self.in_flight = Some(u.revision);
            self.actions.push_back(Action::Send(u));
        }
    }

    /// The store answered a [`Action::CheckQuarantine`]: whether it was lifted.
    pub fn quarantine_checked(&mut self, lifted: bool) {
        let Some(Waiting::Gate { above, snapshot }) = self.waiting.take() else {
            return;
        };
        if lifted && self.gate == Gate::Quarantined {
            self.gate = Gate::Open;
            self.read(above, snapshot);
        }
    }

    /// The device's evidence was judged at `now`; the gate follows the verdict and the
    /// next challenge is due one interval later. Returns the gate before.
    pub fn evidence_judged(&mut self, now: Instant, quarantined: bool) -> Gate {
        let before = self.gate;
        self.gate = if quarantined {
            Gate::Quarantined
        } else {
            Gate::Open
        };
        self.next_challenge = Some(now + self.challenge_every);
        self.push(0, false);
        before
    }

    /// When [`Self::handle_timeout`] is due.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_challenge
    }

    /// The clock reached `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.next_challenge.is_some_and(|t| t <= now) {
            self.next_challenge = None;
            if self.attested {
                self.actions.push_back(Action::Challenge);
            }
        }
    }

    /// Sends the update from what the device holds to the newest revision above
    /// `above`, unless one is on its way (a snapshot asked for replaces it).
    fn push(&mut self, above: u64, snapshot: bool) {
        if !self.started {
            return;
        }
        if !snapshot && (self.in_flight.is_some() || self.waiting.is_some()) {
            return;
        }
        match self.gate {
            Gate::Open => self.read(above, snapshot),
            Gate::Evidence => {}
            Gate::Quarantined => {
                self.waiting = Some(Waiting::Gate { above, snapshot });
                self.actions.push_back(Action::CheckQuarantine);
            }
        }
    }

    fn read(&mut self, above: u64, snapshot: bool) {
        self.waiting = Some(Waiting::Read { above });
        self.actions.push_back(if snapshot {
            Action::ReadSnapshot
        } else {
            Action::ReadUpdate { holds: self.holds }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_sync_protocol::DeviceId;
    use cairn_sync_protocol::message::ReportBody;

    fn update(base: Option<u64>, revision: u64) -> StateUpdate {
        StateUpdate {
            device: DeviceId::new("d1").unwrap(),
            base_revision: base,
            revision,
            upserts: Vec::new(),
            removals: Vec::new(),
            signature: ed25519_dalek::Signature::from_bytes(&[0; 64]),
        }
    }

    fn drain(c: &mut SyncCore) -> Vec<Action> {
        std::iter::from_fn(|| c.poll_action()).collect()
    }

    fn report(seq: u64) -> ReportMsg {
        ReportMsg {
            seq,
            at_ms: 0,
            body: ReportBody::Status(cairn_sync_protocol::message::Status {
                desired_revision: 1,
                applied_revision: 1,
                failing: 0,
            }),
        }
    }

    #[test]
    fn one_update_in_flight_and_the_answer_reads_the_newest() {
        let mut c = SyncCore::new(Duration::from_secs(60));
        c.start(3, false, Gate::Open);
        assert_eq!(drain(&mut c), [Action::ReadUpdate { holds: 3 }]);
        c.update_read(Some(update(Some(3), 5)));
        assert_eq!(drain(&mut c), [Action::Send(update(Some(3), 5))]);
        // A change while 5 is in flight is not read now...
        c.state_changed();
        assert_eq!(drain(&mut c), []);
        // ...but on the answer.
        c.acked(5);
        assert_eq!(
            drain(&mut c),
            [Action::RecordHeld(5), Action::ReadUpdate { holds: 5 }]
        );
        c.update_read(None);
        assert_eq!(drain(&mut c), []);
    }

    #[test]
    fn a_refused_revision_is_not_sent_again() {
        let mut c = SyncCore::new(Duration::from_secs(60));
        c.start(1, false, Gate::Open);
        drain(&mut c);
        c.update_read(Some(update(Some(1), 4)));
        drain(&mut c);
        c.acked(1); // refused 4
        assert_eq!(
            drain(&mut c),
            [Action::RecordHeld(1), Action::ReadUpdate { holds: 1 }]
        );
        c.update_read(Some(update(Some(1), 4)));
        assert_eq!(drain(&mut c), [], "4 again");
        c.state_changed();
        drain(&mut c);
        c.update_read(Some(update(Some(1), 6)));
        assert_eq!(drain(&mut c), [Action::Send(update(Some(1), 6))]);
    }

    #[test]
    fn resync_sends_a_snapshot_even_with_an_update_in_flight() {
        let mut c = SyncCore::new(Duration::from_secs(60));
        c.start(2, false, Gate::Open);
        drain(&mut c);
        c.update_read(Some(update(Some(2), 3)));
        drain(&mut c);
        c.resync(2);
        assert_eq!(drain(&mut c), [Action::ReadSnapshot]);
        c.update_read(Some(update(None, 3)));
        assert_eq!(drain(&mut c), [Action::Send(update(None, 3))]);
    }

    #[test]
    fn reports_are_acknowledged_only_once_stored() {
        let mut c = SyncCore::new(Duration::from_secs(60));
        c.start(0, false, Gate::Open);
        drain(&mut c);
        c.reports(vec![report(1), report(2)]);
        assert_eq!(
            drain(&mut c),
            [Action::StoreReports(vec![report(1), report(2)])]
        );
        c.reports_stored(2);
        assert_eq!(drain(&mut c), [Action::AckReports(2)]);
    }

    #[test]
    fn an_attested_device_gets_nothing_before_its_evidence() {
        let mut c = SyncCore::new(Duration::from_secs(60));
        c.start(0, true, Gate::Open);
        assert_eq!(drain(&mut c), [Action::Challenge]);
        assert_eq!(c.gate(), Gate::Evidence);
        c.state_changed();
        c.resync(0);
        assert_eq!(drain(&mut c), []);
        let t0 = Instant::now();
        assert_eq!(c.evidence_judged(t0, false), Gate::Evidence);
        assert_eq!(drain(&mut c), [Action::ReadUpdate { holds: 0 }]);
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(60)));
        c.handle_timeout(t0 + Duration::from_secs(59));
        assert_eq!(drain(&mut c), []);
        c.handle_timeout(t0 + Duration::from_secs(60));
        assert_eq!(drain(&mut c), [Action::Challenge]);
        assert_eq!(c.poll_timeout(), None);
    }

    #[test]
    fn quarantine_is_rechecked_on_every_push() {
        let mut c = SyncCore::new(Duration::from_secs(60));
        c.start(0, true, Gate::Open);
        drain(&mut c);
        c.evidence_judged(Instant::now(), true);
        assert_eq!(drain(&mut c), [Action::CheckQuarantine]);
        c.quarantine_checked(false);
        assert_eq!(drain(&mut c), []);
        assert_eq!(c.gate(), Gate::Quarantined);
        c.state_changed();
        assert_eq!(drain(&mut c), [Action::CheckQuarantine]);
        c.quarantine_checked(true);
        assert_eq!(c.gate(), Gate::Open);
        assert_eq!(drain(&mut c), [Action::ReadUpdate { holds: 0 }]);
    }

    #[test]
    fn an_unattested_device_under_a_requiring_policy_starts_closed() {
        let mut c = SyncCore::new(Duration::from_secs(60));
        c.start(0, false, Gate::Quarantined);
        assert_eq!(drain(&mut c), [Action::CheckQuarantine]);
        c.quarantine_checked(false);
        c.handle_timeout(Instant::now() + Duration::from_secs(3600));
        assert_eq!(drain(&mut c), [], "never challenged: it has no AK");
    }
}
