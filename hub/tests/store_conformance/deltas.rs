//! Deltas are right from any held revision: random sequences of assignments, removals
//! and label changes on every backend; after each step, the update from every
//! revision an agent could hold applies to that revision's document, verifies with the
//! hub key, and equals the full snapshot. Seed 0 runs past the tombstone window, so
//! agents that far behind get a snapshot.
use std::collections::BTreeMap;

use cairn_hub::desired::{Target, parse_labels};
use cairn_hub::store::{Change, DynStore, Enrollment, NewToken};
use cairn_sync_protocol::state::{FileResource, Resource, StateDocument};
use cairn_sync_protocol::{DeviceId, ResourceName, Text};
use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};

use super::each_backend;

fn file(path: &str, content: String) -> Resource {
    Resource::File(FileResource {
        path: Text::new(path).unwrap(),
        content: content.into_bytes(),
        mode: 0o644,
        uid: None,
        gid: None,
    })
}

async fn run(store: DynStore, key: SigningKey, seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    store
        .create_token(NewToken {
            id: "t".into(),
            secret_hash: [1; 32],
            created_ms: 0,
            expires_ms: i64::MAX as u64,
            uses: 10,
            labels: parse_labels("site=a").unwrap(),
        })
        .await
        .unwrap();
    let dev = DeviceId::new("dev-prop").unwrap();
    store
        .enroll(Enrollment {
            token_id: "t".into(),
            secret_hash: [1; 32],
            device: dev.clone(),
            hostname: "h".into(),
            agent_version: "v".into(),
            now_ms: 1,
            attestation: None,
        })
        .await
        .unwrap()
        .unwrap();

    // Every revision the device ever had, as an agent would hold it.
    let mut history: BTreeMap<u64, StateDocument> = BTreeMap::new();
    let vk = key.verifying_key();
    let steps = if seed == 0 { 200 } else { 60 };
    for step in 0..steps {
        let name = ResourceName::new(&format!("r{}", rng.gen_range(0..6))).unwrap();
        let target = match rng.gen_range(0..3) {
            0 => Target::Device(dev.clone()),
            1 => Target::Selector("site=a".parse().unwrap()),
            _ => Target::Selector("site".parse().unwrap()),
        };
        match rng.gen_range(0..10) {
            0..=5 => {
                let res = file(name.as_str(), format!("{seed}-{step}"));
                store
                    .assign(target, Change::Set(name, res), step)
                    .await
                    .unwrap();
            }
            6..=8 => {
                store
                    .assign(target, Change::Unset(name), step)
                    .await
                    .unwrap();
            }
            _ => {
                let site = if rng.gen_bool(0.5) { "a" } else { "b" };
                store
                    .set_labels(&dev, parse_labels(&format!("site={site}")).unwrap(), step)
                    .await
                    .unwrap();
            }
        }
        let Some(snapshot) = store.state_snapshot(&dev).await.unwrap() else {
            continue;
        };
        let full = snapshot
            .apply_to(&dev, None, &vk)
            .unwrap_or_else(|e| panic!("seed {seed} step {step}: snapshot does not verify: {e}"));
        for (held, doc) in &history {
            match store.state_update(&dev, *held).await.unwrap() {
                None => assert_eq!(*held, full.revision, "seed {seed} step {step}"),
                Some(u) => {
                    let got = u.apply_to(&dev, Some(doc), &vk).unwrap_or_else(|e| {
                        panic!("seed {seed} step {step}: update from {held} fails: {e}")
                    });
                    assert_eq!(
                        got.resources, full.resources,
                        "seed {seed} step {step} from {held}"
                    );
                    assert_eq!(got.revision, full.revision);
                }
            }
        }
        history.insert(full.revision, full);
    }
}

#[tokio::test]
async fn deltas_from_any_held_revision_rebuild_the_snapshot() {
    for seed in 0..10 {
        each_backend(|store, key| run(store, key, seed)).await;
    }
}
