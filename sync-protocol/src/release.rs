//! OS releases: the signed manifest of an A/B image, its block index, and how the agent
//! fetches payload bytes from the hub.
//!
//! A release is one or more payloads (the slot's root filesystem image; optionally a
//! kernel/UKI) and a [`Manifest`] that names their sizes, SHA-256 digests and block
//! indexes, the hardware it is for, and the PCR values booting it is expected to
//! measure. The manifest is signed with an ed25519 **release key** that the operator
//! holds (not the hub's transport or state keys); agents take the keys they trust from
//! their signed desired state ([`OsResource::release_keys`]), so keys can be rotated by
//! adding the new one before releases are signed with it.
//!
//! A payload's **block index** is the SHA-256 of each [`BLOCK_SIZE`] block, concatenated
//! (the last block may be short). The manifest carries the digest of the index, so every
//! block an agent writes is checked against the signed manifest as it is written, and
//! blocks the agent already holds (in its active slot) are found by hash and copied
//! locally instead of downloaded.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::bounded::Text;

/// Size of one block of the delta index, in bytes.
pub const BLOCK_SIZE: u32 = 4096;
/// Most payloads in one release.
pub const MAX_PAYLOADS: usize = 8;
/// Largest encoded manifest.
pub const MAX_MANIFEST_LEN: usize = 64 * 1024;
/// Largest block range one fetch request may ask for (4 MiB).
pub const MAX_FETCH_BLOCKS: u32 = 1024;

const SIGNING_CONTEXT: &[u8] = b"cairn/release-manifest/v1\0";

/// Identifies a release key: the first 8 bytes of SHA-256 of its public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    pub fn of(key: &VerifyingKey) -> Self {
        let d = Sha256::digest(key.as_bytes());
        let mut id = [0; 8];
        id.copy_from_slice(&d[..8]);
        Self(id)
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Identifies a release: SHA-256 of its encoded (signed-over) manifest body.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ReleaseId(pub [u8; 32]);

impl ReleaseId {
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl std::fmt::Debug for ReleaseId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex()[..16])
    }
}

/// One of the two A/B slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::A => "a",
            Self::B => "b",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "a" | "A" => Some(Self::A),
            "b" | "B" => Some(Self::B),
            _ => None,
        }
    }

    /// 0 for A, 1 for B.
    pub fn index(self) -> usize {
        match self {
            Self::A => 0,
            Self::B => 1,
        }
    }
}

impl std::ops::Not for Slot {
    type Output = Slot;
    /// The other slot.
    fn not(self) -> Slot {
        match self {
            Self::A => Self::B,
            Self::B => Self::A,
        }
    }
}

impl std::fmt::Display for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::A => "A",
            Self::B => "B",
        })
    }
}

/// What a release is for and what it holds. Signed as its postcard encoding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// A semantic version (`1.4.0`, `2.0.0-rc.1`): releases are ordered by it.
    pub version: Text<64>,
    /// CPU architecture as Rust names it: `x86_64`, `aarch64`.
    pub arch: Text<32>,
    /// Board family: `nuc`, `rpi4`, `rpi5`, `qemu-x86_64`, `sim`, …
    pub board: Text<64>,
    /// When it was built, milliseconds since the Unix epoch (informational).
    pub created_ms: u64,
    pub payloads: Vec<Payload>,
    /// SHA-256 PCR values that booting this release is expected to measure (for the
    /// hub's attestation policy: a planned change, not a quarantine).
    pub expected_pcrs: Vec<(u8, [u8; 32])>,
}

/// One payload of a release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payload {
    /// What it is and where it goes: `rootfs` (the slot itself), `kernel`, `uki`.
    pub name: Text<32>,
    pub size: u64,
    /// SHA-256 of the whole payload.
    pub sha256: [u8; 32],
    /// SHA-256 of the payload's block index.
    pub index_sha256: [u8; 32],
}

impl Payload {
    /// Number of [`BLOCK_SIZE`] blocks (the last may be short).
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(u64::from(BLOCK_SIZE))
    }

    /// Length of block `i` in bytes.
    pub fn block_len(&self, i: u64) -> u32 {
        let start = i * u64::from(BLOCK_SIZE);
        (self.size.saturating_sub(start)).min(u64::from(BLOCK_SIZE)) as u32
    }

    /// Length of the block index in bytes.
    pub fn index_len(&self) -> u64 {
        self.blocks() * 32
    }
}

/// A manifest as shipped: its encoding, and who signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedManifest {
    /// Postcard encoding of the [`Manifest`]; the signature covers exactly these bytes.
    pub body: Vec<u8>,
    pub key_id: KeyId,
    pub signature: Signature,
}

/// Why a release was refused. Each says what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("manifest is {len} bytes, the limit is {MAX_MANIFEST_LEN}")]
    TooLarge { len: usize },
    #[error("manifest does not decode: {0}")]
    Malformed(String),
    #[error(
        "manifest is signed with release key {key_id}, which this device does not trust; add the key (cairn-hub release key add) or sign with a trusted one"
    )]
    UnknownKey { key_id: KeyId },
    #[error(
        "manifest signature does not verify with release key {key_id}: the manifest was altered or signed with another key"
    )]
    BadSignature { key_id: KeyId },
    #[error("version {0:?} is not a semantic version (like 1.4.0): {1}")]
    BadVersion(String, String),
    #[error("release has {0} payloads; give 1 to {MAX_PAYLOADS}, one of them named rootfs")]
    BadPayloads(usize),
    #[error("release has no rootfs payload")]
    NoRootfs,
    #[error("payload {0} appears twice")]
    DuplicatePayload(String),
    #[error("release {version} is for {arch}/{board}; this device is {want_arch}/{want_board}")]
    WrongTarget {
        version: String,
        arch: String,
        board: String,
        want_arch: String,
        want_board: String,
    },
    #[error("block index of payload {payload} does not match the manifest: {what}")]
    BadIndex { payload: String, what: String },
}

impl Manifest {
    /// The parsed version.
    pub fn semver(&self) -> Result<semver::Version, ReleaseError> {
        parse_version(self.version.as_str())
    }

    pub fn payload(&self, name: &str) -> Option<&Payload> {
        self.payloads.iter().find(|p| p.name.as_str() == name)
    }

    /// Structural checks every consumer needs: a valid version, 1..=8 payloads with
    /// distinct names, one of them `rootfs`.
    pub fn check(&self) -> Result<(), ReleaseError> {
        self.semver()?;
        if self.payloads.is_empty() || self.payloads.len() > MAX_PAYLOADS {
            return Err(ReleaseError::BadPayloads(self.payloads.len()));
        }
        for (i, p) in self.payloads.iter().enumerate() {
            if self.payloads[..i].iter().any(|q| q.name == p.name) {
                return Err(ReleaseError::DuplicatePayload(p.name.to_string()));
            }
        }
        if self.payload("rootfs").is_none() {
            return Err(ReleaseError::NoRootfs);
        }
        Ok(())
    }

    /// Refuses a release made for other hardware.
    pub fn check_target(&self, arch: &str, board: &str) -> Result<(), ReleaseError> {
        if self.arch.as_str() != arch || self.board.as_str() != board {
            return Err(ReleaseError::WrongTarget {
                version: self.version.to_string(),
                arch: self.arch.to_string(),
                board: self.board.to_string(),
                want_arch: arch.into(),
                want_board: board.into(),
            });
        }
        Ok(())
    }

    /// Encodes and signs.
    pub fn sign(&self, key: &SigningKey) -> SignedManifest {
        // Encoding a value we own into a Vec cannot fail for these types.
        let body = postcard::to_allocvec(self).unwrap_or_default();
        let signature = key.sign(&signing_payload(&body));
        SignedManifest {
            body,
            key_id: KeyId::of(&key.verifying_key()),
            signature,
        }
    }
}

/// Parses a semantic version, with an error that says what is wrong.
pub fn parse_version(v: &str) -> Result<semver::Version, ReleaseError> {
    semver::Version::parse(v).map_err(|e| ReleaseError::BadVersion(v.into(), e.to_string()))
}

fn signing_payload(body: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(SIGNING_CONTEXT.len() + body.len());
    p.extend_from_slice(SIGNING_CONTEXT);
    p.extend_from_slice(body);
    p
}

impl SignedManifest {
    pub fn id(&self) -> ReleaseId {
        ReleaseId(Sha256::digest(&self.body).into())
    }

    /// Verifies the signature with one of `trusted` (by key id), then decodes and
    /// checks the manifest. Nothing of an unverified body is interpreted.
    pub fn verify(&self, trusted: &[VerifyingKey]) -> Result<Manifest, ReleaseError> {
        if self.body.len() > MAX_MANIFEST_LEN {
            return Err(ReleaseError::TooLarge {
                len: self.body.len(),
            });
        }
        let key = trusted.iter().find(|k| KeyId::of(k) == self.key_id).ok_or(
            ReleaseError::UnknownKey {
                key_id: self.key_id,
            },
        )?;
        key.verify(&signing_payload(&self.body), &self.signature)
            .map_err(|_| ReleaseError::BadSignature {
                key_id: self.key_id,
            })?;
        let m = self.decode_unverified()?;
        m.check()?;
        Ok(m)
    }

    /// Decodes the body without checking the signature: only for display of a
    /// manifest that is then refused, or after [`verify`](Self::verify).
    pub fn decode_unverified(&self) -> Result<Manifest, ReleaseError> {
        postcard::from_bytes(&self.body).map_err(|e| ReleaseError::Malformed(e.to_string()))
    }

    /// The file format of a detached manifest (`*.manifest`): postcard of this struct.
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn from_bytes(b: &[u8]) -> Result<Self, ReleaseError> {
        if b.len() > MAX_MANIFEST_LEN + 256 {
            return Err(ReleaseError::TooLarge { len: b.len() });
        }
        postcard::from_bytes(b).map_err(|e| ReleaseError::Malformed(e.to_string()))
    }
}

/// Builds a payload's block index and digests incrementally from its bytes.
#[derive(Default)]
pub struct IndexBuilder {
    index: Vec<u8>,
    whole: Sha256,
    pending: Vec<u8>,
    size: u64,
}

impl IndexBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds the next bytes of the payload.
    pub fn update(&mut self, mut bytes: &[u8]) {
        self.whole.update(bytes);
        self.size += bytes.len() as u64;
        let bs = BLOCK_SIZE as usize;
        if !self.pending.is_empty() {
            let take = (bs - self.pending.len()).min(bytes.len());
            self.pending.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.pending.len() == bs {
                self.index.extend_from_slice(&Sha256::digest(&self.pending));
                self.pending.clear();
            }
        }
        let mut chunks = bytes.chunks_exact(bs);
        for c in &mut chunks {
            self.index.extend_from_slice(&Sha256::digest(c));
        }
        self.pending.extend_from_slice(chunks.remainder());
    }

    /// The payload description and its block index.
    pub fn finish(mut self, name: Text<32>) -> (Payload, Vec<u8>) {
        if !self.pending.is_empty() {
            self.index.extend_from_slice(&Sha256::digest(&self.pending));
        }
        let payload = Payload {
            name,
            size: self.size,
            sha256: self.whole.finalize().into(),
            index_sha256: Sha256::digest(&self.index).into(),
        };
        (payload, self.index)
    }
}

/// A payload's block index, checked against its manifest entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockIndex {
    hashes: Vec<[u8; 32]>,
}

impl BlockIndex {
    /// Checks `bytes` against `payload` (length and digest) and splits it into hashes.
    pub fn verified(payload: &Payload, bytes: &[u8]) -> Result<Self, ReleaseError> {
        let bad = |what: String| ReleaseError::BadIndex {
            payload: payload.name.to_string(),
            what,
        };
        if bytes.len() as u64 != payload.index_len() {
            return Err(bad(format!(
                "{} bytes, expected {} for {} blocks",
                bytes.len(),
                payload.index_len(),
                payload.blocks()
            )));
        }
        if <[u8; 32]>::from(Sha256::digest(bytes)) != payload.index_sha256 {
            return Err(bad(
                "digest differs (corrupted in transit or storage)".into()
            ));
        }
        let hashes = bytes
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0; 32];
                h.copy_from_slice(c);
                h
            })
            .collect();
        Ok(Self { hashes })
    }

    pub fn len(&self) -> u64 {
        self.hashes.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    pub fn hash(&self, block: u64) -> Option<&[u8; 32]> {
        self.hashes.get(usize::try_from(block).ok()?)
    }

    pub fn hashes(&self) -> &[[u8; 32]] {
        &self.hashes
    }
}

/// Magic at the start of a release bundle file.
pub const BUNDLE_MAGIC: &[u8; 16] = b"CAIRN-BUNDLE-v1\n";

/// A release bundle (`*.cairn`) is one file: [`BUNDLE_MAGIC`], the length of the
/// encoded [`SignedManifest`] (u32, little-endian), the manifest, then for each payload
/// in manifest order its block index and its bytes. Every section starts at a multiple
/// of [`BLOCK_SIZE`] (zero padding), so payload blocks can be read aligned.
///
/// This type is the pure layout: which byte range holds what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BundleLayout {
    /// `(index offset, data offset)` per payload.
    pub sections: Vec<(u64, u64)>,
    /// Total length of the bundle file.
    pub len: u64,
}

fn align(n: u64) -> u64 {
    n.div_ceil(u64::from(BLOCK_SIZE)) * u64::from(BLOCK_SIZE)
}

impl BundleLayout {
    /// The bytes that start a bundle: magic, length, manifest (unpadded).
    pub fn header(manifest: &SignedManifest) -> Vec<u8> {
        let m = manifest.to_bytes();
        let mut h = Vec::with_capacity(20 + m.len());
        h.extend_from_slice(BUNDLE_MAGIC);
        h.extend_from_slice(&(m.len() as u32).to_le_bytes());
        h.extend_from_slice(&m);
        h
    }

    /// Reads the manifest from the first bytes of a bundle. `Ok(None)`: more bytes are
    /// needed (give at least 20 + the announced length).
    pub fn parse_header(bytes: &[u8]) -> Result<Option<(SignedManifest, u64)>, ReleaseError> {
        if bytes.len() < 20 {
            return Ok(None);
        }
        if &bytes[..16] != BUNDLE_MAGIC {
            return Err(ReleaseError::Malformed(
                "not a Cairn release bundle (bad magic); build one with `cairn-hub release build`"
                    .into(),
            ));
        }
        let len = u32::from_le_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]) as usize;
        if len > MAX_MANIFEST_LEN + 256 {
            return Err(ReleaseError::TooLarge { len });
        }
        let Some(body) = bytes.get(20..20 + len) else {
            return Ok(None);
        };
        Ok(Some((SignedManifest::from_bytes(body)?, (20 + len) as u64)))
    }

    /// Where each section of `manifest`'s bundle lies, given the header length.
    pub fn new(manifest: &Manifest, header_len: u64) -> Self {
        let mut at = align(header_len);
        let mut sections = Vec::with_capacity(manifest.payloads.len());
        for p in &manifest.payloads {
            let index = at;
            let data = align(index + p.index_len());
            at = align(data + p.size);
            sections.push((index, data));
        }
        Self { sections, len: at }
    }
}

/// What an agent asks the hub for on a fetch stream (one request per stream).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FetchRequest {
    pub release: ReleaseId,
    /// Index into the manifest's payloads.
    pub payload: u8,
    pub what: FetchWhat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchWhat {
    /// The payload's block index.
    Index,
    /// `count` blocks from block `first`; at most [`MAX_FETCH_BLOCKS`].
    Blocks { first: u64, count: u32 },
}

/// How a refusal that only means "not yet in this session" begins: the session's
/// attestation evidence has not verified yet. The agent retries such a fetch later
/// instead of failing the upgrade.
pub const REFUSED_NOT_YET: &str = "this session's attestation evidence has not verified yet";

/// The hub's answer, followed on the stream by exactly `len` raw bytes when `Ok`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FetchResponse {
    Ok { len: u64 },
    Refused(Text<256>),
}

impl crate::frame::Message for FetchResponse {
    const KINDS: u32 = 2;
}

impl FetchRequest {
    /// Decodes one frame's payload as a request. A request is a struct, not a message
    /// enum, so it has no kind byte for [`frame::decode_payload`](crate::frame::decode_payload)
    /// to check (and no `frame::Message` impl).
    pub fn decode_payload(payload: &[u8]) -> Result<Self, crate::frame::FrameError> {
        use crate::frame::FrameError;
        if payload.is_empty() {
            return Err(FrameError::Empty);
        }
        match postcard::take_from_bytes::<Self>(payload) {
            Ok((req, [])) => Ok(req),
            Ok((_, rest)) => Err(FrameError::TrailingBytes(rest.len())),
            Err(e) => Err(FrameError::Malformed(e.to_string())),
        }
    }
}

/// The desired OS of a device: a release, the keys its manifest may be signed with,
/// and how the trial boot is judged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OsResource {
    pub manifest: SignedManifest,
    /// Public release keys this device trusts (ed25519, 32 bytes each).
    pub release_keys: Vec<[u8; 32]>,
    /// An older version than the committed one is installed only when this is set.
    pub allow_downgrade: bool,
    pub health: HealthSpec,
}

/// How an agent decides that a trial boot is healthy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthSpec {
    /// The hub must be reached from the trial boot (else: local checks only, for boxes
    /// that are expected to be offline).
    pub require_hub: bool,
    /// Seconds the trial boot has to become healthy before it is rolled back.
    pub timeout_s: u32,
    /// Shell commands that must exit 0 (run with `sh -c`, each with the timeout).
    pub commands: Vec<Text<512>>,
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            require_hub: true,
            timeout_s: 300,
            commands: Vec::new(),
        }
    }
}

impl OsResource {
    /// The trusted keys, refusing bytes that are not ed25519 public keys.
    pub fn keys(&self) -> Result<Vec<VerifyingKey>, ReleaseError> {
        self.release_keys
            .iter()
            .map(|k| {
                VerifyingKey::from_bytes(k)
                    .map_err(|e| ReleaseError::Malformed(format!("release key: {e}")))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(bytes: &[u8]) -> (Payload, Vec<u8>) {
        let mut b = IndexBuilder::new();
        // Feed in odd pieces: the index must not depend on how bytes arrive.
        for c in bytes.chunks(1000) {
            b.update(c);
        }
        b.finish(Text::new("rootfs").unwrap())
    }

    fn manifest(p: Payload) -> Manifest {
        Manifest {
            version: Text::new("1.2.0").unwrap(),
            arch: Text::new("x86_64").unwrap(),
            board: Text::new("sim").unwrap(),
            created_ms: 1,
            payloads: vec![p],
            expected_pcrs: vec![(4, [7; 32])],
        }
    }

    #[test]
    fn index_matches_block_hashes() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (p, idx) = payload(&data);
        assert_eq!(p.size, 10_000);
        assert_eq!(p.blocks(), 3);
        assert_eq!(p.block_len(2), 10_000 - 8192);
        let index = BlockIndex::verified(&p, &idx).unwrap();
        assert_eq!(
            index.hash(2).unwrap(),
            &<[u8; 32]>::from(Sha256::digest(&data[8192..]))
        );
        assert_eq!(p.sha256, <[u8; 32]>::from(Sha256::digest(&data)));
        let mut bad = idx.clone();
        bad[5] ^= 1;
        assert!(matches!(
            BlockIndex::verified(&p, &bad),
            Err(ReleaseError::BadIndex { .. })
        ));
        assert!(BlockIndex::verified(&p, &idx[..64]).is_err());
    }

    #[test]
    fn signature_key_and_target_are_checked() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let other = SigningKey::from_bytes(&[2; 32]);
        let (p, _) = payload(b"hello");
        let m = manifest(p);
        let signed = m.sign(&key);
        assert_eq!(
            signed
                .verify(&[other.verifying_key(), key.verifying_key()])
                .unwrap(),
            m
        );
        assert!(matches!(
            signed.verify(&[other.verifying_key()]),
            Err(ReleaseError::UnknownKey { .. })
        ));
        let mut tampered = signed.clone();
        let last = tampered.body.len() - 1;
        tampered.body[last] ^= 1;
        assert!(matches!(
            tampered.verify(&[key.verifying_key()]),
            Err(ReleaseError::BadSignature { .. })
        ));
        // A key id pointing at a trusted key, signature by another: refused.
        let mut forged = m.sign(&other);
        forged.key_id = KeyId::of(&key.verifying_key());
        assert!(matches!(
            forged.verify(&[key.verifying_key()]),
            Err(ReleaseError::BadSignature { .. })
        ));
        assert!(m.check_target("x86_64", "sim").is_ok());
        let e = m.check_target("aarch64", "rpi4").unwrap_err();
        assert!(e.to_string().contains("this device is aarch64/rpi4"), "{e}");
        let back = SignedManifest::from_bytes(&signed.to_bytes()).unwrap();
        assert_eq!(back, signed);
    }

    #[test]
    fn bundle_sections_are_aligned_and_disjoint() {
        let key = SigningKey::from_bytes(&[1; 32]);
        let (p, _) = payload(&[5; 10_000]);
        let signed = manifest(p.clone()).sign(&key);
        let header = BundleLayout::header(&signed);
        assert_eq!(BundleLayout::parse_header(&header[..19]).unwrap(), None);
        assert_eq!(
            BundleLayout::parse_header(&header[..header.len() - 1]).unwrap(),
            None
        );
        let (back, hlen) = BundleLayout::parse_header(&header).unwrap().unwrap();
        assert_eq!((back, hlen), (signed.clone(), header.len() as u64));
        let l = BundleLayout::new(&signed.verify(&[key.verifying_key()]).unwrap(), hlen);
        assert_eq!(l.sections, vec![(4096, 8192)]);
        assert_eq!(l.len, 8192 + 12288);
        let mut bad = header.clone();
        bad[0] = b'X';
        assert!(BundleLayout::parse_header(&bad).is_err());
    }

    #[test]
    fn fetch_requests_decode_from_their_frames() {
        let req = FetchRequest {
            release: ReleaseId([0xab; 32]),
            payload: 1,
            what: FetchWhat::Blocks { first: 7, count: 3 },
        };
        let f = crate::frame::encode(&req, 1024).unwrap();
        assert_eq!(FetchRequest::decode_payload(&f[4..]).unwrap(), req);
        // Any first byte of the id decodes (a struct has no kind byte).
        let low = FetchRequest {
            release: ReleaseId([0x05; 32]),
            ..req.clone()
        };
        let f = crate::frame::encode(&low, 1024).unwrap();
        assert_eq!(FetchRequest::decode_payload(&f[4..]).unwrap(), low);
        let mut long = f[4..].to_vec();
        long.push(0);
        assert!(FetchRequest::decode_payload(&long).is_err());
        assert!(FetchRequest::decode_payload(&[]).is_err());
    }

    #[test]
    fn structure_is_checked() {
        let (p, _) = payload(b"x");
        let mut m = manifest(p.clone());
        m.version = Text::new("one").unwrap();
        assert!(matches!(m.check(), Err(ReleaseError::BadVersion(..))));
        let mut m = manifest(p.clone());
        m.payloads.push(p.clone());
        assert!(matches!(m.check(), Err(ReleaseError::DuplicatePayload(_))));
        let mut m = manifest(p);
        m.payloads[0].name = Text::new("kernel").unwrap();
        assert_eq!(m.check(), Err(ReleaseError::NoRootfs));
        assert!(
            parse_version("2.0.0").unwrap() > parse_version("2.0.0-rc.1").unwrap(),
            "pre-releases order before the release"
        );
    }
}
