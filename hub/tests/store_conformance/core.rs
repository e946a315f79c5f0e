//! Tokens, enrollment, signed revisions as deltas and snapshots, reports stored once
//! and in order, revocation.

use cairn_hub::desired::{self, Target};
use cairn_hub::store::{
    Change, DynStore, EnrollRefusal, Enrollment, EventFilter, MAX_DOCUMENT_BYTES, NewToken,
    StoreError,
};
use cairn_sync_protocol::message::{Event, EventKind, Labels, Report, ReportBody, Status};
use cairn_sync_protocol::state::{FileResource, Resource};
use cairn_sync_protocol::{DeviceId, ResourceName, Text};

use super::each_backend;

fn file(c: &str) -> Resource {
    Resource::File(FileResource {
        path: Text::new(format!("etc/{c}")).unwrap(),
        content: c.into(),
        mode: 0o644,
        uid: None,
        gid: None,
    })
}

async fn enrolled(s: &DynStore, id: &str, labels: &str) -> DeviceId {
    let t = NewToken {
        id: format!("t-{id}"),
        secret_hash: [1; 32],
        created_ms: 0,
        expires_ms: 1000,
        uses: 1,
        labels: desired::parse_labels(labels).unwrap(),
    };
    s.create_token(t).await.unwrap();
    let d = DeviceId::new(id).unwrap();
    s.enroll(Enrollment {
        token_id: format!("t-{id}"),
        secret_hash: [1; 32],
        device: d.clone(),
        hostname: "h".into(),
        agent_version: "v".into(),
        now_ms: 5,
        attestation: None,
    })
    .await
    .unwrap()
    .unwrap();
    d
}

#[tokio::test]
async fn tokens_are_checked_and_consumed() {
    each_backend(|s, _key| async move {
        let d = enrolled(&s, "dev-a", "site=paris").await;
        let again = Enrollment {
            token_id: "t-dev-a".into(),
            secret_hash: [1; 32],
            device: DeviceId::new("dev-b").unwrap(),
            hostname: "h".into(),
            agent_version: "v".into(),
            now_ms: 6,
            attestation: None,
        };
        assert_eq!(
            s.enroll(again.clone()).await.unwrap().unwrap_err(),
            EnrollRefusal::TokenUsedUp
        );
        let wrong = Enrollment {
            secret_hash: [2; 32],
            ..again.clone()
        };
        assert_eq!(
            s.enroll(wrong).await.unwrap().unwrap_err(),
            EnrollRefusal::UnknownToken
        );
        assert_eq!(s.device(&d).await.unwrap().unwrap().labels.len(), 1);
        // The same key again (a retry after a lost answer) succeeds without a use.
        let retry = Enrollment {
            device: d.clone(),
            ..again
        };
        assert_eq!(s.enroll(retry).await.unwrap().unwrap().id, d);
        assert_eq!(s.tokens().await.unwrap()[0].uses_left, 0);
    })
    .await;
}

#[tokio::test]
async fn assignments_produce_signed_deltas_and_snapshots() {
    each_backend(|s, key| async move {
        let a = enrolled(&s, "dev-a", "site=paris").await;
        let b = enrolled(&s, "dev-b", "site=rome").await;
        let sel = Target::Selector("site=paris".parse().unwrap());
        let n1 = ResourceName::new("one").unwrap();
        let n2 = ResourceName::new("two").unwrap();
        let out = s
            .assign(sel.clone(), Change::Set(n1.clone(), file("1")), 1)
            .await
            .unwrap();
        assert_eq!(out.matched, 1);
        assert_eq!(out.changed, vec![(a.clone(), 1)]);
        assert!(s.state_update(&b, 0).await.unwrap().is_none());

        let u1 = s.state_update(&a, 0).await.unwrap().unwrap();
        assert_eq!(u1.base_revision, None);
        let d1 = u1.apply_to(&a, None, &key.verifying_key()).unwrap();

        s.assign(sel.clone(), Change::Set(n2.clone(), file("2")), 2)
            .await
            .unwrap();
        s.assign(sel.clone(), Change::Unset(n1.clone()), 3)
            .await
            .unwrap();
        // Setting the same value again changes nothing.
        let same = s
            .assign(sel.clone(), Change::Set(n2.clone(), file("2")), 4)
            .await
            .unwrap();
        assert!(same.changed.is_empty());

        let u3 = s.state_update(&a, 1).await.unwrap().unwrap();
        assert_eq!(u3.base_revision, Some(1));
        assert_eq!(u3.revision, 3);
        assert_eq!(u3.upserts.len(), 1);
        assert_eq!(u3.removals, vec![n1.clone()]);
        let d3 = u3.apply_to(&a, Some(&d1), &key.verifying_key()).unwrap();
        assert_eq!(d3.resources.keys().collect::<Vec<_>>(), vec![&n2]);
        assert!(s.state_update(&a, 3).await.unwrap().is_none());

        // A device-level override and a label change re-sign only that device.
        let out = s
            .assign(
                Target::Device(b.clone()),
                Change::Set(n1.clone(), file("b")),
                5,
            )
            .await
            .unwrap();
        assert_eq!(out.changed, vec![(b.clone(), 1)]);
        let out = s
            .set_labels(&b, desired::parse_labels("site=paris").unwrap(), 6)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.changed, vec![(b.clone(), 2)]);
        // Two resources for one file, or a document over the limits, are refused whole.
        let clash = s
            .assign(
                Target::Device(b.clone()),
                Change::Set(ResourceName::new("three").unwrap(), file("b")),
                7,
            )
            .await;
        assert!(
            matches!(&clash, Err(StoreError::Invalid(m)) if m.contains("same file")),
            "{clash:?}"
        );
        let huge = Resource::File(FileResource {
            path: Text::new("big").unwrap(),
            content: vec![0; MAX_DOCUMENT_BYTES + 1],
            mode: 0o644,
            uid: None,
            gid: None,
        });
        let big = s
            .assign(
                Target::Device(b.clone()),
                Change::Set(ResourceName::new("big").unwrap(), huge),
                8,
            )
            .await;
        assert!(matches!(big, Err(StoreError::Invalid(_))), "{big:?}");
        let snap = s.state_snapshot(&b).await.unwrap().unwrap();
        let doc = snap.apply_to(&b, None, &key.verifying_key()).unwrap();
        assert_eq!(doc.resources.len(), 2);
        assert_eq!(doc.resources[&n1], file("b"));
    })
    .await;
}

#[tokio::test]
async fn reports_are_stored_once_in_order() {
    each_backend(|s, _key| async move {
        let d = enrolled(&s, "dev-a", "").await;
        let ev = |seq| Report {
            seq,
            at_ms: seq,
            body: ReportBody::Event(Event {
                kind: EventKind::DriftCorrected,
                resource: None,
                revision: None,
                message: Text::truncated("x"),
            }),
        };
        let status = Report {
            seq: 3,
            at_ms: 3,
            body: ReportBody::Status(Status {
                desired_revision: 4,
                applied_revision: 4,
                failing: 1,
            }),
        };
        assert_eq!(
            s.record_reports(&d, vec![ev(1), ev(2)], 1).await.unwrap(),
            2
        );
        // Resend of 2, then 3, then a gap at 5: stops at 4.
        assert_eq!(
            s.record_reports(&d, vec![ev(2), status, ev(4), ev(6)], 2)
                .await
                .unwrap(),
            4
        );
        let evs = s
            .events(EventFilter {
                device: Some(d.clone()),
                kind: Some("drift-corrected".into()),
                after_id: 0,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(
            evs.iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>(),
            vec![1, 2, 4]
        );
        let rec = s.device(&d).await.unwrap().unwrap();
        assert_eq!(
            (rec.applied_revision, rec.failing, rec.reports_acked),
            (4, 1, 4)
        );
        assert!(*s.event_watch().borrow() >= 3);
    })
    .await;
}

#[tokio::test]
async fn revoked_devices_cannot_re_enroll() {
    each_backend(|s, _key| async move {
        let d = enrolled(&s, "dev-a", "").await;
        assert!(s.revoke(&d, 9).await.unwrap());
        s.create_token(NewToken {
            id: "t2".into(),
            secret_hash: [3; 32],
            created_ms: 0,
            expires_ms: 100,
            uses: 5,
            labels: Labels::new(),
        })
        .await
        .unwrap();
        let e = Enrollment {
            token_id: "t2".into(),
            secret_hash: [3; 32],
            device: d.clone(),
            hostname: "h".into(),
            agent_version: "v".into(),
            now_ms: 10,
            attestation: None,
        };
        assert_eq!(
            s.enroll(e.clone()).await.unwrap().unwrap_err(),
            EnrollRefusal::DeviceRevoked
        );
        let late = Enrollment {
            now_ms: 100,
            device: DeviceId::new("dev-new").unwrap(),
            ..e
        };
        assert_eq!(
            s.enroll(late).await.unwrap().unwrap_err(),
            EnrollRefusal::TokenExpired
        );
    })
    .await;
}
