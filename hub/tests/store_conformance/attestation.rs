//! The attestation records of a store: enrollment with a root of trust,
//! verifications and the quarantine they cause, the operator's accept, measurement
//! sets a release predicts, one endorsement key per live device, and policies.
use std::collections::BTreeMap;

use cairn_hub::attest::{AttestPolicy, MeasurementSet, Require};
use cairn_hub::desired::parse_labels;
use cairn_hub::store::{
    AttestOutcome, EnrollRefusal, Enrollment, EventFilter, NewAttestation, NewToken, StoreError,
    attest_status, hub_event,
};
use cairn_sync_protocol::DeviceId;

use super::each_backend;

fn pcrs(b: u8) -> BTreeMap<u32, String> {
    (0..8).map(|i| (i, hex::encode([b; 32]))).collect()
}

fn outcome(quarantine: Option<&str>, b: u8, now_ms: u64) -> AttestOutcome {
    AttestOutcome {
        quarantine: quarantine.map(str::to_string),
        pcrs: Some(pcrs(b)),
        log: Some(vec![b; 10]),
        reset_count: Some(1),
        record: None,
        ima: None,
        now_ms,
    }
}

fn enrollment(device: &str, ek: &[u8]) -> Enrollment {
    Enrollment {
        token_id: "t".into(),
        secret_hash: [1; 32],
        device: DeviceId::new(device).unwrap(),
        hostname: "h".into(),
        agent_version: "v".into(),
        now_ms: 1,
        attestation: Some(NewAttestation {
            kind: "tpm".into(),
            ek_public: ek.to_vec(),
            ek_issuer: Some("CN=test CA".into()),
            ak_public: vec![1, 2, 3],
            outcome: AttestOutcome {
                record: Some(MeasurementSet {
                    source: "first-seen".into(),
                    added_ms: 1,
                    pcrs: pcrs(1),
                }),
                ..outcome(None, 1, 1)
            },
        }),
    }
}

#[tokio::test]
async fn quarantine_accept_expectations_and_ek_uniqueness() {
    each_backend(|s, _key| async move {
        s.create_token(NewToken {
            id: "t".into(),
            secret_hash: [1; 32],
            created_ms: 0,
            expires_ms: u64::MAX / 2,
            uses: 10,
            labels: parse_labels("site=a").unwrap(),
        })
        .await
        .unwrap();
        // The token can be checked without using it.
        let d = DeviceId::new("dev-a").unwrap();
        assert_eq!(
            s.check_token("t", [1; 32], &d, 5).await.unwrap().unwrap(),
            parse_labels("site=a").unwrap()
        );
        assert_eq!(
            s.check_token("t", [2; 32], &d, 5)
                .await
                .unwrap()
                .unwrap_err(),
            EnrollRefusal::UnknownToken
        );
        let rec = s
            .enroll(enrollment("dev-a", b"ek-a"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rec.attestation.as_deref(), Some("tpm"));
        assert_eq!(rec.attest_status.as_deref(), Some(attest_status::TRUSTED));
        // Another device with the same EK is refused while the first is not revoked.
        assert_eq!(
            s.enroll(enrollment("dev-b", b"ek-a"))
                .await
                .unwrap()
                .unwrap_err(),
            EnrollRefusal::EkInUse
        );
        let a = s.attestation(&d).await.unwrap().unwrap();
        assert_eq!(a.accepted.len(), 1);
        assert_eq!(a.ak_public, vec![1, 2, 3]);
        assert_eq!(a.log, vec![1; 10]);

        // A failed verification quarantines, with an event; the same again adds none.
        let why = "measurements differ from every accepted set (closest: first-seen): PCR 4";
        s.record_attestation(&d, outcome(Some(why), 2, 10))
            .await
            .unwrap();
        s.record_attestation(&d, outcome(Some(why), 2, 11))
            .await
            .unwrap();
        let dev = s.device(&d).await.unwrap().unwrap();
        assert!(dev.quarantined());
        assert_eq!(dev.quarantine.as_deref(), Some(why));
        let evs = s
            .events(EventFilter {
                device: Some(d.clone()),
                kind: Some(hub_event::QUARANTINED.into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(evs.len(), 1);

        // The operator accepts: the current values replace the first-seen set.
        let seen = s.attestation(&d).await.unwrap().unwrap().verified_ms;
        assert!(
            s.accept_measurements(&d, Some(1), 20)
                .await
                .unwrap()
                .unwrap_err()
                .contains("changed since you looked")
        );
        let a = s.accept_measurements(&d, seen, 20).await.unwrap().unwrap();
        assert_eq!(a.status, attest_status::TRUSTED);
        assert_eq!(a.accepted.len(), 1);
        assert_eq!(a.accepted[0].source, "accepted by operator");
        assert_eq!(a.accepted[0].pcrs, pcrs(2));
        assert!(!s.device(&d).await.unwrap().unwrap().quarantined());

        // A release's predicted values are added and retired by source.
        let set = MeasurementSet {
            source: "release 2.0".into(),
            added_ms: 30,
            pcrs: pcrs(3),
        };
        assert!(s.expect_measurements(&d, set.clone()).await.unwrap());
        assert!(s.expect_measurements(&d, set).await.unwrap());
        assert_eq!(s.attestation(&d).await.unwrap().unwrap().accepted.len(), 2);
        assert_eq!(s.retire_measurements(&d, "release 2.0").await.unwrap(), 1);
        let unknown = DeviceId::new("dev-x").unwrap();
        assert!(
            s.accept_measurements(&unknown, None, 1)
                .await
                .unwrap()
                .is_err()
        );
        // A policy quarantine (identity, golden values) is not the operator's to accept.
        s.record_attestation(
            &d,
            outcome(Some("identity software does not meet policy p"), 4, 50),
        )
        .await
        .unwrap();
        assert!(
            s.accept_measurements(&d, None, 51)
                .await
                .unwrap()
                .unwrap_err()
                .contains("change the policy")
        );

        // Revoked, its EK is free for a re-installed box.
        s.revoke(&d, 40).await.unwrap();
        s.enroll(enrollment("dev-b", b"ek-a"))
            .await
            .unwrap()
            .unwrap();

        // Policies are validated and listed.
        let mut p = AttestPolicy {
            name: "kiosks".into(),
            selector: "site=a".into(),
            priority: 10,
            require: Require::Tpm,
            pcrs: vec![0, 4, 7],
            tofu: true,
            golden: BTreeMap::new(),
        };
        s.put_policy(p.clone()).await.unwrap();
        assert_eq!(s.policies().await.unwrap(), vec![p.clone()]);
        p.selector = String::new();
        assert!(matches!(s.put_policy(p).await, Err(StoreError::Invalid(_))));
        assert!(s.delete_policy("kiosks").await.unwrap());
        assert!(!s.delete_policy("kiosks").await.unwrap());
    })
    .await;
}
