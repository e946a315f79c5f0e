//! The store contract (`cairn_hub::store`), checked against every backend: tokens,
//! enrollment, signed revisions as deltas and snapshots, reports stored once and in
//! order, revocation. A backend is added to [`backends`]; every test runs on each, with
//! a fresh database, unchanged (`core`: tokens, enrollment, revisions, reports;
//! `deltas`: deltas from any held revision; `attestation`: roots of trust, quarantine,
//! accept, expectations, policies). Tests that need a particular backend's internals
//! live beside its code.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;

use cairn_hub::store::sqlite::SqliteStore;
use cairn_hub::store::{DynStore, StateSigner};
use ed25519_dalek::SigningKey;

type Open = fn(&Path, StateSigner) -> DynStore;

/// Every backend the contract is checked against, by name.
fn backends() -> Vec<(&'static str, Open)> {
    vec![("sqlite", |dir, signer| {
        Arc::new(SqliteStore::open(&dir.join("hub.db"), signer).unwrap())
    })]
}

/// Runs `test` once per backend, each on a fresh database in its own directory.
async fn each_backend<F, Fut>(test: F)
where
    F: Fn(DynStore, SigningKey) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    for (name, open) in backends() {
        let dir = tempfile::tempdir().unwrap();
        let key = SigningKey::from_bytes(&[9; 32]);
        eprintln!("backend {name}");
        test(open(dir.path(), StateSigner::new(key.clone())), key).await;
    }
}

mod attestation;
mod core;
mod deltas;
