//! The checks at the end of a real-mode run, over the agents' own audits and the hub's
//! records: convergence, reports exactly once, signed state only, attestation, OS
//! releases booted as committed.

use super::*;

pub(super) async fn all_events(api: &Client) -> Result<Vec<EventRecord>> {
    let mut out: Vec<EventRecord> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e.id);
        let page: Vec<EventRecord> = api
            .get_query(
                "/v1/events",
                &[("after", after.to_string()), ("limit", "50000".into())],
            )
            .await
            .map_err(|e| e.error.context("listing events"))?;
        if page.is_empty() {
            return Ok(out);
        }
        out.extend(page);
    }
}

pub(super) fn check(
    fleet: &Fleet,
    audits: &[AgentAudit],
    events: &[EventRecord],
    report: &mut Report,
) {
    let by_index: BTreeMap<usize, &AgentAudit> = audits.iter().map(|a| (a.index, a)).collect();
    let mut converged = 0;
    let mut signed = 0;
    let mut exact = 0;
    let (mut ev, lost_declared) = tally(events, report);
    for i in 0..fleet.scenario.devices {
        let name = pool::hostname(i);
        let (Some(a), Some(d)) = (by_index.get(&i), fleet.devices[i].as_ref()) else {
            report
                .problems
                .push(format!("{name}: not enrolled at the hub or not audited"));
            continue;
        };
        if let Some(p) = &a.problem {
            report
                .problems
                .push(format!("{} ({name}): {p}", d.record.id));
        }
        ev.created += a.last_seq;
        ev.delivered += d.record.reports_acked.min(a.last_seq);
        ev.lost += a.last_seq.saturating_sub(d.record.reports_acked);
        if a.stored_revision == d.record.desired_revision
            && a.applied_revision == d.record.desired_revision
            && is_converged(d)
            && a.files_match
        {
            converged += 1;
        } else {
            report.problems.push(format!(
                "{}: desired revision {}, agent stored {} and applied {}{}",
                d.record.id,
                d.record.desired_revision,
                a.stored_revision,
                a.applied_revision,
                if a.files_match { "" } else { ", files differ" }
            ));
        }
        if a.outbox_depth == 0 && d.record.reports_acked == a.last_seq {
            exact += 1;
        } else {
            report.problems.push(format!(
                "{}: hub stored reports up to {}, agent numbered {} ({} still queued)",
                d.record.id, d.record.reports_acked, a.last_seq, a.outbox_depth
            ));
        }
        if a.signed {
            signed += 1;
        } else {
            report.problems.push(format!(
                "{}: stored state does not verify with the hub key",
                d.record.id
            ));
        }
    }
    ev.lost += lost_declared;
    report.events = ev;
    report.problems.truncate(300);
    let n = fleet.scenario.devices;
    for inv in &fleet.scenario.check {
        let r = match inv {
            Invariant::AllConverged => {
                InvariantResult::new(*inv, converged == n, format!("{converged} of {n} devices"))
            }
            Invariant::ReportsExactlyOnce => InvariantResult::new(
                *inv,
                exact == n && report.events.duplicated == 0 && lost_declared == 0,
                format!(
                    "{exact} of {n} devices; {} reports stored, {} duplicated",
                    report.events.delivered, report.events.duplicated
                ),
            ),
            Invariant::SignedStateOnly => {
                InvariantResult::new(*inv, signed == n, format!("{signed} of {n} devices"))
            }
            Invariant::AllAttested => attested(fleet, *inv, report),
            Invariant::OsCommittedOrRolledBack => {
                let Some(r) = os_booted(fleet, audits, *inv, report) else {
                    continue;
                };
                r
            }
        };
        report.invariants.push(r);
    }
}

/// Counts over the hub's event log: duplicates (a device's sequence number seen twice),
/// drift corrections, and reports the hub recorded as lost.
fn tally(events: &[EventRecord], report: &mut Report) -> (Events, u64) {
    let mut ev = Events::default();
    let mut seen: BTreeSet<(&str, u64)> = BTreeSet::new();
    for e in events {
        if let Some(seq) = e.seq
            && !seen.insert((e.device.as_str(), seq))
        {
            ev.duplicated += 1;
        }
        if e.kind == "drift-corrected" {
            ev.drift_corrected += 1;
        }
        if e.kind == cairn_hub::store::hub_event::QUARANTINED {
            ev.quarantined += 1;
        }
        if e.kind == "hub.reports-lost" {
            report
                .problems
                .push(format!("{}: the hub recorded lost reports", e.device));
        }
    }
    let lost_declared = events
        .iter()
        .filter(|e| e.kind == "hub.reports-lost")
        .count() as u64;
    (ev, lost_declared)
}

/// Every device attested and trusted, with its kind (software, tpm) counted.
fn attested(fleet: &Fleet, inv: Invariant, report: &mut Report) -> InvariantResult {
    let n = fleet.scenario.devices;
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    let mut trusted = 0;
    for d in fleet.devices.iter().flatten() {
        *kinds
            .entry(
                d.record
                    .attestation
                    .clone()
                    .unwrap_or_else(|| "none".into()),
            )
            .or_default() += 1;
        if d.record.attestation.is_some() && d.record.attest_status.as_deref() == Some("trusted") {
            trusted += 1;
        } else if report.problems.len() < 300 {
            report.problems.push(format!(
                "{} ({}): attestation {:?}, status {:?}: {}",
                d.record.id,
                d.record.hostname,
                d.record.attestation,
                d.record.attest_status,
                d.record.quarantine.as_deref().unwrap_or("")
            ));
        }
    }
    let kinds: Vec<String> = kinds.iter().map(|(k, v)| format!("{v} {k}")).collect();
    InvariantResult::new(
        inv,
        trusted == n,
        format!("{trusted} of {n} devices trusted ({})", kinds.join(", ")),
    )
}

/// Every box boots the release it committed (the new one, or the old one after a
/// rollback), with no job left mid-way; `None` without OS upgrades in the scenario.
fn os_booted(
    fleet: &Fleet,
    audits: &[AgentAudit],
    inv: Invariant,
    report: &mut Report,
) -> Option<InvariantResult> {
    let n = fleet.scenario.devices;
    let os = fleet.os.as_ref()?;
    let mut ok = 0;
    let mut on: BTreeMap<String, usize> = BTreeMap::new();
    let mut outcomes: BTreeMap<String, usize> = BTreeMap::new();
    for a in audits {
        let Some(o) = &a.os else { continue };
        let expected = os.sha256(&o.committed);
        let settled = o.job.as_ref().is_none_or(|(_, phase)| {
            matches!(phase.as_str(), "committed" | "rolled-back" | "failed")
        });
        if expected.as_deref() == Some(o.booted_sha256.as_str()) && settled {
            ok += 1;
            *on.entry(o.committed.clone()).or_default() += 1;
            if let Some((v, phase)) = &o.job {
                *outcomes.entry(format!("{v} {phase}")).or_default() += 1;
            }
        } else if report.problems.len() < 300 {
            report.problems.push(format!(
                "{}: boots slot {} holding {}, committed {}, upgrade {:?}",
                pool::hostname(a.index),
                o.booted,
                if os
                    .images
                    .keys()
                    .any(|v| os.sha256(v).as_deref() == Some(o.booted_sha256.as_str()))
                {
                    "another release"
                } else {
                    "an image that is no release"
                },
                o.committed,
                o.job
            ));
        }
    }
    let on: Vec<String> = on.iter().map(|(v, c)| format!("{c} on {v}")).collect();
    let outcomes: Vec<String> = outcomes.iter().map(|(v, c)| format!("{c} {v}")).collect();
    Some(InvariantResult::new(
        inv,
        ok == n,
        format!(
            "{ok} of {n} boxes boot the release they committed ({}; upgrades: {})",
            on.join(", "),
            outcomes.join(", ")
        ),
    ))
}
