//! The checks at the end of a run: convergence, reports exactly once, signed state only.

use super::*;

impl Sim<'_> {
    pub(super) fn finish(mut self) -> Report {
        let n = self.devs.len();
        let mut problems = Vec::new();
        let mut conv_ok = 0usize;
        let mut reports_ok = 0usize;
        let mut signed_ok = 0usize;
        let mut ev = Events::default();
        for (i, d) in self.devs.iter().enumerate() {
            let id = &self.ids[i];
            let a = &d.agent;
            let h = &d.hub;
            let stored = a.doc.as_ref().map_or(0, |doc| doc.revision);
            let applied = a.last_status.1;
            // Every desired file applied as specified and still so on the box.
            let same_resources = match &a.doc {
                Some(doc) => {
                    doc.resources.len() == a.applied.len()
                        && doc.resources.iter().all(|(n, r)| {
                            let hash = r.hash().0;
                            a.applied.get(n.as_str()).is_some_and(|rec| {
                                rec.hash == hash
                                    && rec.error.is_none()
                                    && a.files.iter().any(|(p, h)| *p == rec.path && *h == hash)
                            })
                        })
                }
                None => a.applied.is_empty(),
            };
            if h.revision == stored && stored == applied && same_resources {
                conv_ok += 1;
            } else {
                problems.push(format!(
                    "{id}: hub desired revision {}, agent stored {stored}, applied {applied}{}",
                    h.revision,
                    if same_resources {
                        ""
                    } else {
                        ", applied files differ from the stored document"
                    }
                ));
            }
            ev.created += a.last_seq;
            ev.delivered += h.reports_stored;
            ev.lost += a.last_seq.saturating_sub(h.reports_stored);
            // Stored and declared lost add up to the mark unless something was stored twice.
            let duplicated = (h.reports_stored + h.reports_skipped).saturating_sub(h.reports_acked);
            ev.duplicated += duplicated;
            ev.drift_corrected += h.drift_corrected;
            if h.reports_acked == a.last_seq
                && h.reports_stored == a.last_seq
                && duplicated == 0
                && a.outbox.is_empty()
            {
                reports_ok += 1;
            } else {
                problems.push(format!(
                    "{id}: hub stored {} reports up to {} ({} declared lost), agent numbered {} ({} still queued)",
                    h.reports_stored,
                    h.reports_acked,
                    h.reports_skipped,
                    a.last_seq,
                    a.outbox.len()
                ));
            }
            let signed = match &a.doc {
                None => true,
                Some(doc) => StateUpdate {
                    device: doc.device.clone(),
                    base_revision: None,
                    revision: doc.revision,
                    upserts: doc
                        .resources
                        .iter()
                        .map(|(n, r)| (n.clone(), r.clone()))
                        .collect(),
                    removals: vec![],
                    signature: doc.signature,
                }
                .apply_to(id, None, &self.vk)
                .is_ok(),
            };
            if signed {
                signed_ok += 1;
            } else {
                problems.push(format!(
                    "{id}: stored revision {stored} does not verify with the hub key"
                ));
            }
        }
        let mut invariants = Vec::new();
        let mut checks = self.scenario.check.clone();
        checks.sort();
        checks.dedup();
        for inv in checks {
            let r = match inv {
                Invariant::AllConverged => {
                    InvariantResult::new(inv, conv_ok == n, format!("{conv_ok} of {n} devices"))
                }
                Invariant::ReportsExactlyOnce => InvariantResult::new(
                    inv,
                    reports_ok == n,
                    format!(
                        "{reports_ok} of {n} devices; {} reports numbered, {} stored, {} lost, {} duplicated",
                        ev.created, ev.delivered, ev.lost, ev.duplicated
                    ),
                ),
                Invariant::SignedStateOnly => {
                    InvariantResult::new(inv, signed_ok == n, format!("{signed_ok} of {n} devices"))
                }
                Invariant::AllAttested => {
                    let (ok, why) = self.attested();
                    problems.extend(why);
                    InvariantResult::new(
                        inv,
                        ok == n,
                        format!("{ok} of {n} devices trusted (software TPM)"),
                    )
                }
                // OS upgrades are checked in real mode (det refuses such scenarios).
                Invariant::OsCommittedOrRolledBack => continue,
            };
            invariants.push(r);
        }
        for p in problems {
            self.problem(p);
        }
        let total = self.report.wire.to_hub + self.report.wire.from_hub;
        self.report.wire.per_device = total / n as u64;
        ev.quarantined = self.quarantined;
        self.report.events = ev;
        self.report.invariants = invariants;
        self.report.simulated_secs = self.now as f64 / SEC as f64;
        self.report
    }
}
