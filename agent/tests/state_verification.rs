//! The agent's store refuses replayed, stale and foreign-signed desired state, records a
//! `state-rejected` event saying why, and keeps what it held. Real SQLite files.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;

use cairn_agent::store::{Identity, Store};
use cairn_agent::sync::Reply;
use cairn_sync_protocol::message::{EventKind, ReportBody};
use cairn_sync_protocol::state::{
    FileResource, Resource, StateError, StateUpdate, document_digest, sign_state,
};
use cairn_sync_protocol::{DeviceId, ResourceName, Text};
use ed25519_dalek::SigningKey;

fn update(key: &SigningKey, dev: &DeviceId, rev: u64, content: &str) -> StateUpdate {
    let name = ResourceName::new("motd").unwrap();
    let res = Resource::File(FileResource {
        path: Text::new("etc/motd").unwrap(),
        content: content.into(),
        mode: 0o644,
        uid: None,
        gid: None,
    });
    let mut doc = BTreeMap::new();
    doc.insert(name.clone(), res.clone());
    let digest = document_digest(doc.iter().map(|(n, r)| (n, r.hash())));
    StateUpdate {
        device: dev.clone(),
        base_revision: None,
        revision: rev,
        upserts: vec![(name, res)],
        removals: vec![],
        signature: sign_state(key, dev, rev, &digest),
    }
}

fn rejected_events(store: &Store) -> Vec<String> {
    store
        .outbox_after(0, 1000)
        .unwrap()
        .into_iter()
        .filter_map(|r| match r.body {
            ReportBody::Event(e) if e.kind == EventKind::StateRejected => {
                Some(e.message.to_string())
            }
            _ => None,
        })
        .collect()
}

#[test]
fn replayed_stale_and_foreign_state_is_refused_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.db");
    let hub_key = SigningKey::from_bytes(&[1; 32]);
    let dev = DeviceId::new("dev-test").unwrap();
    let identity = Identity {
        device: dev.clone(),
        key_der: vec![1],
        cert_der: vec![2],
        ca_der: vec![3],
        state_key: hub_key.verifying_key(),
    };
    let mut store = Store::open(&path).unwrap();
    store.save_identity(&identity).unwrap();

    let r1 = update(&hub_key, &dev, 1, "one");
    let r2 = update(&hub_key, &dev, 2, "two");
    assert_eq!(
        store.accept_state(&identity, &r1).unwrap().reply,
        Reply::Holds(1)
    );
    assert_eq!(
        store.accept_state(&identity, &r2).unwrap().reply,
        Reply::Holds(2)
    );

    // Replay of an old revision, and of the held one.
    for old in [&r1, &r2] {
        match store.accept_state(&identity, old).unwrap().refused {
            Some(StateError::Stale { held: 2, .. }) => {}
            other => panic!("replay must be refused as stale, got {other:?}"),
        }
    }
    // A newer revision signed by another key.
    let forged = update(&SigningKey::from_bytes(&[2; 32]), &dev, 3, "evil");
    match store.accept_state(&identity, &forged).unwrap().refused {
        Some(StateError::BadSignature { revision: 3 }) => {}
        other => panic!("foreign signature must be refused, got {other:?}"),
    }
    // State for another device.
    let other = update(&hub_key, &DeviceId::new("dev-other").unwrap(), 4, "x");
    assert!(matches!(
        store.accept_state(&identity, &other).unwrap().refused,
        Some(StateError::WrongDevice { .. })
    ));
    drop(store);

    // After a restart the held state is still revision 2 with its content, and every
    // refusal is queued for the hub with its reason.
    let store = Store::open(&path).unwrap();
    let doc = store.desired().unwrap().unwrap();
    assert_eq!(doc.revision, 2);
    let Resource::File(f) = &doc.resources[&ResourceName::new("motd").unwrap()] else {
        panic!("motd is a file")
    };
    assert_eq!(f.content, b"two");
    let msgs = rejected_events(&store);
    assert_eq!(msgs.len(), 4, "{msgs:?}");
    assert!(msgs[0].contains("replayed or stale"), "{msgs:?}");
    assert!(msgs[2].contains("not signed by this hub"), "{msgs:?}");
}
