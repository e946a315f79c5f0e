//! The rules of a device's report stream, sans IO: which reports of a batch are stored
//! and how far the acknowledgement moves. Every store backend and the deterministic
//! fleet simulator apply these, so a report is stored at most once per `(device, seq)`
//! and in sequence order everywhere.

use cairn_sync_protocol::message::Report;

/// The reports of `batch` (in the order sent) that a stream acknowledged up to `acked`
/// stores, and the new mark: each next number in turn. One at or below the mark was
/// stored before (a resend after a lost acknowledgement) and is skipped; a gap ends the
/// batch (the agent resends from the mark).
pub fn accept(acked: u64, batch: Vec<Report>) -> (Vec<Report>, u64) {
    let mut mark = acked;
    let mut keep = Vec::with_capacity(batch.len());
    for r in batch {
        if r.seq <= mark {
            continue;
        }
        if r.seq != mark + 1 {
            break;
        }
        mark = r.seq;
        keep.push(r);
    }
    (keep, mark)
}

/// The device declares reports `from..=to` lost (this hub's database went back in time
/// after it had acknowledged them): the new mark, or `None` when it changes nothing.
pub fn skip(acked: u64, from: u64, to: u64) -> Option<u64> {
    let _ = from;
    (to > acked).then_some(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_sync_protocol::message::{ReportBody, Status};

    fn r(seq: u64) -> Report {
        Report {
            seq,
            at_ms: 0,
            body: ReportBody::Status(Status {
                desired_revision: 0,
                applied_revision: 0,
                failing: 0,
            }),
        }
    }

    fn seqs(v: &[Report]) -> Vec<u64> {
        v.iter().map(|r| r.seq).collect()
    }

    #[test]
    fn resends_are_skipped_and_a_gap_ends_the_batch() {
        let (kept, mark) = accept(2, vec![r(1), r(2), r(3), r(4), r(6), r(7)]);
        assert_eq!((seqs(&kept), mark), (vec![3, 4], 4));
        let (kept, mark) = accept(4, vec![r(3), r(4)]);
        assert_eq!((seqs(&kept), mark), (vec![], 4));
    }

    #[test]
    fn declared_losses_only_move_the_mark_forward() {
        assert_eq!(skip(5, 6, 9), Some(9));
        assert_eq!(skip(9, 6, 9), None);
    }
}
