//! The revision rules of a device's desired-state document, sans IO: which update an
//! agent gets for the revision it holds, and how long removals are remembered. Every
//! store backend and the deterministic fleet simulator decide with these functions, so
//! that a seed that passes in virtual time says something about the store that ships.
//!
//! A document has a revision (incremented by each change), each resource the revision
//! it last changed at, and a tombstone per removed resource with the revision of its
//! removal. Tombstones are kept for [`TOMBSTONE_REVISIONS`]; the *floor* is the highest
//! revision whose tombstones were dropped: a delta can only be built from a revision at
//! or above it.

use std::collections::BTreeMap;

/// Removals are remembered for this many revisions; an agent further behind gets a
/// full snapshot.
pub const TOMBSTONE_REVISIONS: u64 = 128;

/// What an agent holding some revision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdatePlan {
    /// Nothing: it holds the newest revision.
    UpToDate,
    /// The whole document (it holds nothing, or is below the floor).
    Snapshot,
    /// What changed after `base`, the revision it holds: resources newer than it, and
    /// the tombstones newer than it.
    Delta { base: u64 },
}

impl UpdatePlan {
    /// The plan for an agent holding `held` (`None`: nothing, or it does not say) of a
    /// document at `revision` whose tombstones are complete from `floor`.
    pub fn for_agent(held: Option<u64>, revision: u64, floor: u64) -> UpdatePlan {
        if held.is_some_and(|h| h >= revision) {
            return UpdatePlan::UpToDate;
        }
        match held.filter(|&h| h > 0 && h >= floor) {
            Some(base) => UpdatePlan::Delta { base },
            None => UpdatePlan::Snapshot,
        }
    }

    /// The update's `base_revision`.
    pub fn base(self) -> Option<u64> {
        match self {
            UpdatePlan::Delta { base } => Some(base),
            _ => None,
        }
    }

    /// Resources that changed after this revision go into the update (every resource,
    /// for a snapshot).
    pub fn since(self) -> u64 {
        self.base().unwrap_or(0)
    }

    /// Whether a resource last changed at `revision` goes into the update.
    pub fn includes(self, revision: u64) -> bool {
        self != UpdatePlan::UpToDate && revision > self.since()
    }

    /// Whether a tombstone of `revision` goes into the update (never into a snapshot:
    /// a snapshot replaces the whole document).
    pub fn includes_removal(self, revision: u64) -> bool {
        matches!(self, UpdatePlan::Delta { base } if revision > base)
    }
}

/// What a new effective document changes in the stored one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff<K> {
    /// Resources new or with another spec: stored at the next revision, and a tombstone
    /// of the same name (a re-added resource) goes.
    pub changed: Vec<K>,
    /// Resources no longer desired: removed, with a tombstone at the next revision.
    pub removed: Vec<K>,
}

/// The diff from the stored document (`current`: name → spec hash) to the `desired`
/// one; `None` when they are the same, and the document keeps its revision (and its
/// signature). Keys are whatever the caller names resources by.
pub fn diff<K: Ord + Clone, H: PartialEq>(
    current: &BTreeMap<K, H>,
    desired: &BTreeMap<K, H>,
) -> Option<Diff<K>> {
    let changed: Vec<K> = desired
        .iter()
        .filter(|(k, h)| current.get(*k) != Some(*h))
        .map(|(k, _)| k.clone())
        .collect();
    let removed: Vec<K> = current
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .cloned()
        .collect();
    (!changed.is_empty() || !removed.is_empty()).then_some(Diff { changed, removed })
}

/// After the document reached `new_revision`: tombstones at or below the returned
/// revision are dropped, and if any was, the floor rises to it.
pub fn tombstone_cutoff(new_revision: u64) -> Option<u64> {
    new_revision
        .checked_sub(TOMBSTONE_REVISIONS)
        .filter(|&c| c > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans() {
        use UpdatePlan::*;
        assert_eq!(UpdatePlan::for_agent(Some(7), 7, 0), UpToDate);
        assert_eq!(UpdatePlan::for_agent(Some(9), 7, 0), UpToDate);
        assert_eq!(UpdatePlan::for_agent(None, 7, 0), Snapshot);
        assert_eq!(UpdatePlan::for_agent(Some(0), 7, 0), Snapshot);
        assert_eq!(UpdatePlan::for_agent(Some(3), 7, 0), Delta { base: 3 });
        assert_eq!(UpdatePlan::for_agent(Some(3), 200, 4), Snapshot);
        assert_eq!(UpdatePlan::for_agent(Some(4), 200, 4), Delta { base: 4 });
        let d = Delta { base: 4 };
        assert!(d.includes(5) && !d.includes(4));
        assert!(d.includes_removal(5) && !d.includes_removal(4));
        assert!(Snapshot.includes(1) && !Snapshot.includes_removal(9));
        assert!(!UpToDate.includes(9));
    }

    #[test]
    fn diff_names_changed_new_and_removed_resources() {
        let current = BTreeMap::from([("a", 1), ("b", 2), ("c", 3)]);
        assert_eq!(diff(&current, &current.clone()), None);
        let desired = BTreeMap::from([("a", 1), ("b", 9), ("d", 4)]);
        assert_eq!(
            diff(&current, &desired),
            Some(Diff {
                changed: vec!["b", "d"],
                removed: vec!["c"]
            })
        );
    }

    #[test]
    fn tombstones_are_kept_for_the_window() {
        assert_eq!(tombstone_cutoff(TOMBSTONE_REVISIONS), None);
        assert_eq!(tombstone_cutoff(TOMBSTONE_REVISIONS + 1), Some(1));
        assert_eq!(tombstone_cutoff(1000), Some(1000 - TOMBSTONE_REVISIONS));
    }
}
