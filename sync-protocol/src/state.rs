//! Desired state: revisioned, signed documents of named resources, and the deltas that
//! carry them.
//!
//! The hub signs `(device, revision, digest of the whole document)`. A delta carries only
//! the resources that changed since the revision the agent holds, plus the signature of
//! the *resulting* document, so the agent checks the complete state it will store, not
//! just the bytes that travelled. The digest is built from per-resource hashes so that
//! the hub can sign a new revision without loading every resource body.

use std::collections::BTreeMap;

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bounded::{DeviceId, ResourceName, Text};

/// Most resources one document may hold.
pub const MAX_RESOURCES: usize = 4096;
/// Longest path of a managed file, in bytes.
pub const MAX_PATH_LEN: usize = 1024;

/// Domain separator of the signed payload; a signature made for anything else never
/// verifies as a state signature.
const SIGNING_CONTEXT: &[u8] = b"cairn/desired-state/v1\0";

/// One thing the agent must make true.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Resource {
    /// A file with exact content, mode and (optionally) numeric owner.
    File(FileResource),
    /// The operating system release the device should run (A/B upgrade).
    Os(crate::release::OsResource),
}

/// A managed file. `path` is interpreted below the agent's configured files root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileResource {
    pub path: Text<MAX_PATH_LEN>,
    pub content: Vec<u8>,
    /// Permission bits, e.g. `0o644`. Only the low 12 bits are meaningful.
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

impl Resource {
    /// The kind's name, for messages and listings.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::Os(_) => "os",
        }
    }

    /// SHA-256 of the resource's canonical (postcard) encoding.
    pub fn hash(&self) -> ResourceHash {
        // Encoding a value we own into a Vec cannot fail for these types.
        let bytes = postcard::to_allocvec(self).unwrap_or_default();
        ResourceHash(Sha256::digest(&bytes).into())
    }
}

/// Hash of one resource.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ResourceHash(pub [u8; 32]);

impl std::fmt::Debug for ResourceHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Digest of a whole document.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct DocumentDigest(pub [u8; 32]);

/// Digest of a document given as `(name, resource hash)` pairs in name order.
pub fn document_digest<'a>(
    resources: impl IntoIterator<Item = (&'a ResourceName, ResourceHash)>,
) -> DocumentDigest {
    let mut h = Sha256::new();
    h.update(b"cairn/document/v1\0");
    for (name, hash) in resources {
        h.update((name.as_str().len() as u32).to_le_bytes());
        h.update(name.as_str().as_bytes());
        h.update(hash.0);
    }
    DocumentDigest(h.finalize().into())
}

fn signing_payload(device: &DeviceId, revision: u64, digest: &DocumentDigest) -> Vec<u8> {
    let mut p = Vec::with_capacity(SIGNING_CONTEXT.len() + 1 + device.as_str().len() + 8 + 32);
    p.extend_from_slice(SIGNING_CONTEXT);
    p.push(device.as_str().len() as u8);
    p.extend_from_slice(device.as_str().as_bytes());
    p.extend_from_slice(&revision.to_le_bytes());
    p.extend_from_slice(&digest.0);
    p
}

/// Signs revision `revision` of `device`'s document whose digest is `digest`.
pub fn sign_state(
    key: &SigningKey,
    device: &DeviceId,
    revision: u64,
    digest: &DocumentDigest,
) -> Signature {
    key.sign(&signing_payload(device, revision, digest))
}

/// A complete desired-state document as the agent stores it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateDocument {
    pub device: DeviceId,
    pub revision: u64,
    pub resources: BTreeMap<ResourceName, Resource>,
    pub signature: Signature,
}

impl StateDocument {
    pub fn digest(&self) -> DocumentDigest {
        document_digest(self.resources.iter().map(|(n, r)| (n, r.hash())))
    }

    /// Checks that this whole document, as held, carries the hub's signature: used to
    /// audit stored state (the fleet simulation's "no unsigned state" invariant).
    pub fn verify(&self, hub_key: &VerifyingKey) -> Result<(), StateError> {
        hub_key
            .verify(
                &signing_payload(&self.device, self.revision, &self.digest()),
                &self.signature,
            )
            .map_err(|_| StateError::BadSignature {
                revision: self.revision,
            })
    }
}

/// A change of desired state on the wire: a delta from `base_revision`, or a full
/// snapshot when `base_revision` is `None`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateUpdate {
    pub device: DeviceId,
    pub base_revision: Option<u64>,
    pub revision: u64,
    pub upserts: Vec<(ResourceName, Resource)>,
    pub removals: Vec<ResourceName>,
    pub signature: Signature,
}

/// Why a state update was refused. Each says what the agent holds and what it was offered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("update is for device {offered}, this device is {expected}")]
    WrongDevice { expected: String, offered: String },
    #[error(
        "revision {offered} is not newer than the held revision {held}: replayed or stale state, ignored"
    )]
    Stale { held: u64, offered: u64 },
    #[error(
        "delta from revision {base} does not apply: this device holds {held:?}; a full snapshot is needed"
    )]
    BaseMismatch { base: u64, held: Option<u64> },
    #[error("full snapshot lists removals, which only deltas may carry")]
    RemovalsInSnapshot,
    #[error("document would hold {count} resources, the limit is {MAX_RESOURCES}")]
    TooManyResources { count: usize },
    #[error("resource {name} appears more than once in one update")]
    DuplicateResource { name: ResourceName },
    #[error(
        "signature of revision {revision} does not verify with the pinned hub state key: state not signed by this hub"
    )]
    BadSignature { revision: u64 },
}

impl StateUpdate {
    /// Builds the document this update leads to from `held` (what the agent stores now),
    /// verifying revision order, delta base and the hub's signature. Nothing is changed
    /// unless every check passes.
    pub fn apply_to(
        &self,
        device: &DeviceId,
        held: Option<&StateDocument>,
        hub_key: &VerifyingKey,
    ) -> Result<StateDocument, StateError> {
        if &self.device != device {
            return Err(StateError::WrongDevice {
                expected: device.to_string(),
                offered: self.device.to_string(),
            });
        }
        let held_rev = held.map(|d| d.revision);
        if let Some(h) = held_rev
            && self.revision <= h
        {
            return Err(StateError::Stale {
                held: h,
                offered: self.revision,
            });
        }
        let mut resources = match self.base_revision {
            None => {
                if !self.removals.is_empty() {
                    return Err(StateError::RemovalsInSnapshot);
                }
                BTreeMap::new()
            }
            Some(base) => match held {
                Some(doc) if doc.revision == base => doc.resources.clone(),
                _ if base == 0 && held.is_none() => BTreeMap::new(),
                _ => {
                    return Err(StateError::BaseMismatch {
                        base,
                        held: held_rev,
                    });
                }
            },
        };
        let mut seen = std::collections::BTreeSet::new();
        for name in &self.removals {
            if !seen.insert(name) {
                return Err(StateError::DuplicateResource { name: name.clone() });
            }
            resources.remove(name);
        }
        for (name, res) in &self.upserts {
            if !seen.insert(name) {
                return Err(StateError::DuplicateResource { name: name.clone() });
            }
            resources.insert(name.clone(), res.clone());
        }
        if resources.len() > MAX_RESOURCES {
            return Err(StateError::TooManyResources {
                count: resources.len(),
            });
        }
        let doc = StateDocument {
            device: device.clone(),
            revision: self.revision,
            resources,
            signature: self.signature,
        };
        if crate::sabotage::active(crate::sabotage::Sabotage::SkipSignatureCheck) {
            return Ok(doc);
        }
        hub_key
            .verify(
                &signing_payload(device, self.revision, &doc.digest()),
                &self.signature,
            )
            .map_err(|_| StateError::BadSignature {
                revision: self.revision,
            })?;
        Ok(doc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn file(path: &str, content: &str) -> Resource {
        Resource::File(FileResource {
            path: Text::new(path).unwrap(),
            content: content.as_bytes().to_vec(),
            mode: 0o644,
            uid: None,
            gid: None,
        })
    }

    fn name(s: &str) -> ResourceName {
        ResourceName::new(s).unwrap()
    }

    /// What the hub does: sign the document that results from the resources.
    fn signed_update(
        key: &SigningKey,
        device: &DeviceId,
        base: Option<u64>,
        revision: u64,
        full: &BTreeMap<ResourceName, Resource>,
        upserts: Vec<(ResourceName, Resource)>,
        removals: Vec<ResourceName>,
    ) -> StateUpdate {
        let digest = document_digest(full.iter().map(|(n, r)| (n, r.hash())));
        StateUpdate {
            device: device.clone(),
            base_revision: base,
            revision,
            upserts,
            removals,
            signature: sign_state(key, device, revision, &digest),
        }
    }

    #[test]
    fn snapshot_then_delta_then_replay() {
        let dev = DeviceId::new("dev-1").unwrap();
        let k = key(1);
        let mut full = BTreeMap::new();
        full.insert(name("motd"), file("etc/motd", "hi"));
        full.insert(name("issue"), file("etc/issue", "x"));
        let u1 = signed_update(
            &k,
            &dev,
            None,
            1,
            &full,
            full.clone().into_iter().collect(),
            vec![],
        );
        let d1 = u1.apply_to(&dev, None, &k.verifying_key()).unwrap();
        assert_eq!(d1.resources, full);

        full.insert(name("motd"), file("etc/motd", "hello"));
        full.remove(&name("issue"));
        let u2 = signed_update(
            &k,
            &dev,
            Some(1),
            2,
            &full,
            vec![(name("motd"), file("etc/motd", "hello"))],
            vec![name("issue")],
        );
        let d2 = u2.apply_to(&dev, Some(&d1), &k.verifying_key()).unwrap();
        assert_eq!(d2.resources, full);
        d2.verify(&k.verifying_key()).unwrap();
        let mut forged = d2.clone();
        forged
            .resources
            .insert(name("extra"), file("etc/extra", "x"));
        assert_eq!(
            forged.verify(&k.verifying_key()),
            Err(StateError::BadSignature { revision: 2 })
        );
        assert_eq!(d2.revision, 2);

        // Replay of revision 1 (and of revision 2 itself) is refused.
        assert_eq!(
            u1.apply_to(&dev, Some(&d2), &k.verifying_key()),
            Err(StateError::Stale {
                held: 2,
                offered: 1
            })
        );
        assert!(matches!(
            u2.apply_to(&dev, Some(&d2), &k.verifying_key()),
            Err(StateError::Stale { .. })
        ));
    }

    #[test]
    fn other_key_wrong_device_and_tampering_are_refused() {
        let dev = DeviceId::new("dev-1").unwrap();
        let mut full = BTreeMap::new();
        full.insert(name("motd"), file("etc/motd", "hi"));
        let u = signed_update(
            &key(2),
            &dev,
            None,
            1,
            &full,
            full.clone().into_iter().collect(),
            vec![],
        );
        assert_eq!(
            u.apply_to(&dev, None, &key(1).verifying_key()),
            Err(StateError::BadSignature { revision: 1 })
        );
        let other = DeviceId::new("dev-2").unwrap();
        assert!(matches!(
            u.apply_to(&other, None, &key(2).verifying_key()),
            Err(StateError::WrongDevice { .. })
        ));
        let mut tampered = u.clone();
        tampered.upserts[0].1 = file("etc/motd", "evil");
        assert!(matches!(
            tampered.apply_to(&dev, None, &key(2).verifying_key()),
            Err(StateError::BadSignature { .. })
        ));
        let mut bumped = u.clone();
        bumped.revision = 7;
        assert!(matches!(
            bumped.apply_to(&dev, None, &key(2).verifying_key()),
            Err(StateError::BadSignature { .. })
        ));
    }

    #[test]
    fn delta_on_wrong_base_asks_for_snapshot() {
        let dev = DeviceId::new("dev-1").unwrap();
        let k = key(1);
        let full = BTreeMap::new();
        let u = signed_update(&k, &dev, Some(5), 6, &full, vec![], vec![]);
        assert_eq!(
            u.apply_to(&dev, None, &k.verifying_key()),
            Err(StateError::BaseMismatch {
                base: 5,
                held: None
            })
        );
    }
}
