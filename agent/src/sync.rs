//! The agent's decisions on its sync link, sans I/O: what an offered update becomes
//! (stored, refused, or a request for a snapshot), how the outbox is renumbered when
//! the hub holds more than this database numbered, and the reconnect backoff.
//!
//! The QUIC link ([`crate::client`]) with the SQLite store ([`crate::store`]) and the
//! fleet simulator's deterministic mode both carry these out; neither decides anything
//! of its own.

use std::time::Duration;

use cairn_sync_protocol::DeviceId;
use cairn_sync_protocol::message::{EventKind, ReportBody};
use cairn_sync_protocol::state::{StateDocument, StateError, StateUpdate};
use ed25519_dalek::VerifyingKey;
use rand::Rng;

use crate::store::event_body;

/// What the agent answers an offered update with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// "I hold this revision": the new one, or the old one when the offer was refused
    /// (so the hub does not send it again).
    Holds(u64),
    /// "What I hold (`held`) cannot be a base": the hub sends a snapshot.
    Unusable { held: u64 },
}

/// What an offered update becomes.
#[derive(Debug)]
pub struct Offer {
    /// The new desired document, to store (with `event`, in one transaction) before the
    /// reply goes out.
    pub doc: Option<StateDocument>,
    /// The `state-accepted` or `state-rejected` event to record, if any.
    pub event: Option<ReportBody>,
    pub reply: Reply,
    /// Why it was refused, if it was.
    pub refused: Option<StateError>,
}

/// Judges `update` against the held document and the pinned hub key.
///
/// A delta on a base the agent does not hold is no attack (it asks for a snapshot, no
/// event). A delta whose signature fails may come from an inconsistent read on the
/// hub: a snapshot settles it. Anything else refused is recorded and answered with the
/// revision held, so the hub does not offer it again.
pub fn offer(
    update: &StateUpdate,
    device: &DeviceId,
    held: Option<&StateDocument>,
    hub_key: &VerifyingKey,
) -> Offer {
    let held_rev = held.map_or(0, |d| d.revision);
    match update.apply_to(device, held, hub_key) {
        Ok(doc) => {
            let msg = format!(
                "revision {} stored ({} resources, {})",
                doc.revision,
                doc.resources.len(),
                if update.base_revision.is_some() {
                    "delta"
                } else {
                    "snapshot"
                }
            );
            Offer {
                event: Some(event_body(
                    EventKind::StateAccepted,
                    None,
                    Some(doc.revision),
                    &msg,
                )),
                reply: Reply::Holds(doc.revision),
                doc: Some(doc),
                refused: None,
            }
        }
        Err(e @ StateError::BaseMismatch { .. }) => Offer {
            doc: None,
            event: None,
            reply: Reply::Unusable { held: held_rev },
            refused: Some(e),
        },
        Err(e) => {
            let event = Some(event_body(
                EventKind::StateRejected,
                None,
                Some(update.revision),
                &e.to_string(),
            ));
            let reply =
                if matches!(e, StateError::BadSignature { .. }) && update.base_revision.is_some() {
                    Reply::Unusable { held: held_rev }
                } else {
                    Reply::Holds(held_rev)
                };
            Offer {
                doc: None,
                event,
                reply,
                refused: Some(e),
            }
        }
    }
}

/// How to renumber the outbox when the hub says it holds reports up to a mark above
/// the last number this database allocated (it was restored from a backup: the queued
/// reports were never stored under their numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebase {
    /// Added to every queued report's number (0 when nothing is queued).
    pub shift: u64,
    /// The last allocated number afterwards.
    pub last_seq: u64,
}

/// The renumbering for a hub at `hub_acked` and an outbox whose numbers so far end at
/// `last_seq`, holding `queued` (lowest, highest) if not empty; `None` when the hub's
/// mark is not above `last_seq` (the normal case).
pub fn rebase(hub_acked: u64, last_seq: u64, queued: Option<(u64, u64)>) -> Option<Rebase> {
    if hub_acked <= last_seq {
        return None;
    }
    Some(match queued {
        None => Rebase {
            shift: 0,
            last_seq: hub_acked,
        },
        Some((min, max)) => {
            let shift = hub_acked + 1 - min;
            Rebase {
                shift,
                last_seq: max + shift,
            }
        }
    })
}

/// Jittered exponential backoff ("equal jitter": half fixed, half random).
#[derive(Debug, Clone)]
pub struct Backoff {
    cur: Duration,
    min: Duration,
    max: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { cur: min, min, max }
    }

    /// The next delay, drawing the jitter from the thread's generator.
    pub fn next_delay(&mut self) -> Duration {
        self.next_delay_with(&mut rand::thread_rng())
    }

    /// The next delay, drawing the jitter from `rng` (the simulator's seeded one).
    pub fn next_delay_with(&mut self, rng: &mut impl Rng) -> Duration {
        let half = self.cur / 2;
        let jitter = rng.gen_range(0..=half.as_nanos() as u64);
        let d = half + Duration::from_nanos(jitter);
        self.cur = (self.cur * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.cur = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebase_moves_the_queue_above_the_hubs_mark() {
        assert_eq!(rebase(5, 7, Some((6, 7))), None);
        assert_eq!(
            rebase(10, 7, Some((6, 7))),
            Some(Rebase {
                shift: 5,
                last_seq: 12
            })
        );
        assert_eq!(
            rebase(10, 7, None),
            Some(Rebase {
                shift: 0,
                last_seq: 10
            })
        );
    }

    #[test]
    fn backoff_doubles_within_bounds_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(2));
        let mut rng = rand::thread_rng();
        let d: Vec<Duration> = (0..4).map(|_| b.next_delay_with(&mut rng)).collect();
        assert!(d[0] >= Duration::from_millis(250) && d[0] <= Duration::from_millis(500));
        assert!(d[1] >= Duration::from_millis(500) && d[1] <= Duration::from_secs(1));
        assert!(d[3] >= Duration::from_secs(1) && d[3] <= Duration::from_secs(2));
        b.reset();
        assert!(b.next_delay_with(&mut rng) <= Duration::from_millis(500));
    }
}
