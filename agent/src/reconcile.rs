//! The reconciler: makes the box match the stored desired state, on every new revision
//! and on a timer (to catch local drift), with or without a hub.
//!
//! One pass compares each resource of the desired document with the box and with what
//! was applied before, acts through the [`Applier`], and records the outcome — applied
//! rows and the events to report — in one transaction. Events it reports:
//! `applied` (new or changed resource), `drift-corrected` (an applied resource had been
//! changed locally and was restored), `apply-failed` (once per distinct error),
//! `removed` (no longer desired). A status report follows whenever the applied revision
//! or the number of failing resources changes.
//!
//! [`pass`] holds the decisions, with the box behind the [`Applier`] trait; the agent
//! runs it over its SQLite store and files, the fleet simulator over a model of both.
//!
//! A pass acts on the box before it records: a crash in between means the next pass
//! finds the resource already right and records it as applied, without a drift event.

use std::collections::BTreeMap;

use cairn_sync_protocol::ResourceName;
use cairn_sync_protocol::message::{EventKind, ReportBody};
use cairn_sync_protocol::state::{Resource, StateDocument};

use crate::apply::{Applier, Outcome};
use crate::store::{AppliedRecord, Result, Store, event_body};

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PassSummary {
    pub revision: u64,
    pub applied: usize,
    pub drift_corrected: usize,
    pub failed: usize,
    pub removed: usize,
    /// Last outbox sequence number written by this pass (0: none).
    pub last_seq: u64,
}

/// What one pass decided to record: applied rows to write and remove, the events to
/// report and the new status (if it changed), all in one transaction.
#[derive(Debug, Default)]
pub struct Pass {
    pub summary: PassSummary,
    pub upserts: Vec<(ResourceName, AppliedRecord)>,
    pub removals: Vec<String>,
    pub reports: Vec<ReportBody>,
    /// (desired revision, applied revision, failing resources), when it changed.
    pub status: Option<(u64, u64, u32)>,
}

impl Pass {
    /// Whether the pass has nothing to record.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.removals.is_empty()
            && self.reports.is_empty()
            && self.status.is_none()
    }
}

/// Runs one reconcile pass over the store: [`pass`], then its record in one transaction.
pub fn reconcile(store: &mut Store, applier: &dyn Applier) -> Result<PassSummary> {
    let doc = store.desired()?;
    let before = store.applied()?;
    let last = store.last_status()?;
    let mut p = pass(doc.as_ref(), &before, last, applier)?;
    if p.is_empty() {
        return Ok(p.summary);
    }
    p.summary.last_seq = store.commit_pass(p.upserts, p.removals, p.reports, p.status)?;
    Ok(p.summary)
}

/// One pass's decisions: acts on the box through `applier` (the only I/O), and returns
/// what to record, given the desired document, the applied rows before and the last
/// status reported (desired, applied, failing).
pub fn pass(
    doc: Option<&StateDocument>,
    before: &BTreeMap<String, AppliedRecord>,
    last: (u64, u64, u32),
    applier: &dyn Applier,
) -> Result<Pass> {
    let revision = doc.map_or(0, |d| d.revision);
    let mut summary = PassSummary {
        revision,
        ..Default::default()
    };
    let mut upserts = Vec::new();
    let mut removals = Vec::new();
    let mut reports = Vec::new();

    // The OS release is the upgrade engine's (`crate::upgrade`), not an applier's.
    let resources: BTreeMap<&ResourceName, &Resource> = doc
        .iter()
        .flat_map(|d| d.resources.iter())
        .filter(|(_, r)| !matches!(r, Resource::Os(_)))
        .collect();
    for (&name, &res) in &resources {
        let hash = res.hash().0;
        let prev = before.get(name.as_str());
        let same_spec = prev.is_some_and(|p| p.hash == hash);
        let path = applier
            .locate(res)
            .unwrap_or_else(|_| describe(res).to_string());
        match applier.apply(res) {
            Ok(outcome) => {
                let was_failing = prev.is_some_and(|p| p.error.is_some());
                match (&outcome, same_spec && !was_failing) {
                    (Outcome::Unchanged, true) => {
                        // Applied before and still right: nothing to say, unless the
                        // revision moved on without touching this resource.
                        if prev.is_some_and(|p| p.revision != revision) {
                            upserts.push((name.clone(), record(hash, revision, &path, None)));
                        }
                        continue;
                    }
                    (Outcome::Changed { before: how }, true) => {
                        summary.drift_corrected += 1;
                        reports.push(event_body(
                            EventKind::DriftCorrected,
                            Some(name),
                            Some(revision),
                            &format!("{path} was changed locally ({how}); restored"),
                        ));
                    }
                    (outcome, false) => {
                        summary.applied += 1;
                        let what = match outcome {
                            Outcome::Unchanged => "already as desired".to_string(),
                            Outcome::Changed { before } => format!("written (was {before})"),
                        };
                        reports.push(event_body(
                            EventKind::Applied,
                            Some(name),
                            Some(revision),
                            &format!("{path}: {what}"),
                        ));
                    }
                }
                upserts.push((name.clone(), record(hash, revision, &path, None)));
            }
            Err(e) => {
                summary.failed += 1;
                let err = e.to_string();
                let already_reported =
                    same_spec && prev.is_some_and(|p| p.error.as_deref() == Some(&err));
                if !already_reported {
                    reports.push(event_body(
                        EventKind::ApplyFailed,
                        Some(name),
                        Some(revision),
                        &err,
                    ));
                    upserts.push((name.clone(), record(hash, revision, &path, Some(err))));
                }
            }
        }
    }
    let desired_paths: std::collections::BTreeSet<String> = resources
        .values()
        .filter_map(|r| applier.locate(r).ok())
        .collect();
    for (name, prev) in before {
        if resources.keys().any(|n| n.as_str() == name) {
            continue;
        }
        let msg = if desired_paths.contains(&prev.path) {
            // Another desired resource now owns this path (a rename): leave the file.
            format!(
                "{} no longer managed as {name}; the path is managed by another resource",
                prev.path
            )
        } else {
            match applier.remove(&prev.path) {
                Ok(true) => format!("{} removed: no longer in desired state", prev.path),
                Ok(false) => format!("{} no longer in desired state (already gone)", prev.path),
                Err(e) => {
                    // Keep the record so the removal is retried; report each error once.
                    summary.failed += 1;
                    let err = format!("removing {}: {e}", prev.path);
                    if prev.error.as_deref() != Some(&err) {
                        reports.push(event_body(
                            EventKind::ApplyFailed,
                            None,
                            Some(revision),
                            &err,
                        ));
                        let mut rec = prev.clone();
                        rec.error = Some(err);
                        upserts.push((
                            cairn_sync_protocol::ResourceName::new(name).map_err(|e| {
                                crate::store::StoreError::Corrupt {
                                    path: Default::default(),
                                    what: "applied",
                                    detail: e.to_string(),
                                }
                            })?,
                            rec,
                        ));
                    }
                    continue;
                }
            }
        };
        summary.removed += 1;
        removals.push(name.to_string());
        reports.push(event_body(EventKind::Removed, None, Some(revision), &msg));
    }

    let failing = summary.failed as u32;
    let applied_rev = if failing == 0 { revision } else { last.1 };
    let status = (revision, applied_rev, failing);
    Ok(Pass {
        summary,
        upserts,
        removals,
        reports,
        status: (last != status).then_some(status),
    })
}

fn record(hash: [u8; 32], revision: u64, path: &str, error: Option<String>) -> AppliedRecord {
    AppliedRecord {
        hash,
        revision,
        path: path.to_string(),
        error,
    }
}

fn describe(res: &Resource) -> &str {
    match res {
        Resource::File(f) => f.path.as_str(),
        Resource::Os(_) => "os",
    }
}
