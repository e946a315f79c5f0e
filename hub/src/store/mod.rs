//! The hub's durable state behind one narrow interface.
//!
//! Everything the hub remembers goes through [`Store`]: join tokens, devices, desired
//! state and its signed revisions, and what agents reported. The interface speaks in
//! domain terms only; no SQL, connection or transaction type crosses it, so another
//! backend (PostgreSQL for several hub processes) implements the same trait without
//! touching the QUIC endpoint or the admin API. [`sqlite::SqliteStore`] is the embedded
//! default.
//!
//! Contract every backend keeps:
//! - a method returns only after its change is durable;
//! - desired-state changes assign a new revision per changed device, sign it with the
//!   [`StateSigner`], and store the signature with it, atomically;
//! - reports are stored at most once per `(device, seq)`, in sequence order, and the
//!   returned acknowledgement never covers a report that is not stored.

pub mod revisions;
pub mod sqlite;
pub mod stream;

use std::collections::BTreeMap;
use std::sync::Arc;

use async_trait::async_trait;
use cairn_sync_protocol::message::{Labels, Report};
use cairn_sync_protocol::state::{DocumentDigest, Resource, StateUpdate, sign_state};
use cairn_sync_protocol::{DeviceId, ResourceName};
use ed25519_dalek::{Signature, SigningKey};
use serde::Serialize;
use tokio::sync::watch;

use crate::attest::{AttestPolicy, MeasurementSet};
use crate::desired::Target;

/// Signs desired-state revisions. Held by the store so that a revision and its signature
/// are written in one transaction.
#[derive(Clone)]
pub struct StateSigner(Arc<SigningKey>);

impl StateSigner {
    pub fn new(key: SigningKey) -> Self {
        Self(Arc::new(key))
    }

    pub fn sign(&self, device: &DeviceId, revision: u64, digest: &DocumentDigest) -> Signature {
        sign_state(&self.0, device, revision, digest)
    }
}

/// Errors of a store. `Refused` outcomes that are the caller's fault are values of the
/// operation's result type, not errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening database {path}: {reason}")]
    Open { path: String, reason: String },
    #[error("database: {0}")]
    Backend(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The change is not acceptable (the caller's fault); nothing was written.
    #[error("{0}")]
    Invalid(String),
    #[error("the store is shut down")]
    Closed,
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A join token as the store keeps it (the secret only as a hash).
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    pub id: String,
    pub created_ms: u64,
    pub expires_ms: u64,
    pub uses_left: u32,
    pub uses_total: u32,
    #[schema(value_type = Object)]
    pub labels: Labels,
}

/// A new join token.
#[derive(Debug, Clone)]
pub struct NewToken {
    pub id: String,
    pub secret_hash: [u8; 32],
    pub created_ms: u64,
    pub expires_ms: u64,
    pub uses: u32,
    pub labels: Labels,
}

/// An enrollment to record.
#[derive(Debug, Clone)]
pub struct Enrollment {
    pub token_id: String,
    pub secret_hash: [u8; 32],
    pub device: DeviceId,
    pub hostname: String,
    pub agent_version: String,
    pub now_ms: u64,
    /// The device's verified root of trust, if it has one.
    pub attestation: Option<NewAttestation>,
}

/// A root of trust verified at enrollment (EK checked, credential activated, first
/// evidence verified), with what policy made of the first evidence.
#[derive(Debug, Clone)]
pub struct NewAttestation {
    /// [`crate::attest::kind`].
    pub kind: String,
    pub ek_public: Vec<u8>,
    /// Issuer of the EK certificate, when it chained to a configured CA.
    pub ek_issuer: Option<String>,
    pub ak_public: Vec<u8>,
    pub outcome: AttestOutcome,
}

/// The result of one verification of a device's evidence.
#[derive(Debug, Clone)]
pub struct AttestOutcome {
    /// `None`: trusted; `Some(reason)`: quarantined.
    pub quarantine: Option<String>,
    /// Quoted PCR values (hex), when the evidence verified.
    pub pcrs: Option<BTreeMap<u32, String>>,
    /// The device's whole event log, when it verified.
    pub log: Option<Vec<u8>>,
    pub reset_count: Option<u32>,
    /// A measurement set to add (first use).
    pub record: Option<MeasurementSet>,
    /// The IMA measurement list verified so far, when the device sent one.
    pub ima: Option<ImaState>,
    pub now_ms: u64,
}

/// How much of a device's IMA measurement list the hub verified: the bytes, PCR 10
/// after them (the next tail continues from there), and the entries they hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImaState {
    pub len: u64,
    pub pcr10: [u8; 32],
    pub entries: u64,
}

/// Why an enrollment was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollRefusal {
    UnknownToken,
    TokenExpired,
    TokenUsedUp,
    DeviceRevoked,
    /// Another device that is not revoked holds this endorsement key.
    EkInUse,
}

/// A device's root of trust and what the hub last saw of it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AttestRecord {
    /// [`crate::attest::kind`].
    pub kind: String,
    /// SHA-256 of the EK's public area (hex): the TPM's identity.
    pub ek_sha256: String,
    pub ek_issuer: Option<String>,
    /// `trusted`, `quarantined`, or `unverified` (not yet verified in any session).
    pub status: String,
    /// Why the device is quarantined.
    pub reason: Option<String>,
    pub verified_ms: Option<u64>,
    /// The PCR values (hex) of the last evidence, if it verified (empty if it did not).
    pub pcrs: BTreeMap<u32, String>,
    pub accepted: Vec<MeasurementSet>,
    pub reset_count: Option<u32>,
    /// Bytes of event log held.
    pub log_len: usize,
    /// Bytes and entries of the IMA measurement list verified (0: none sent).
    pub ima_len: u64,
    pub ima_entries: u64,
    #[serde(skip)]
    pub ima_pcr10: [u8; 32],
    #[serde(skip)]
    pub ak_public: Vec<u8>,
    #[serde(skip)]
    pub log: Vec<u8>,
}

impl AttestRecord {
    /// The record of a device enrolled with the verified root of trust `a`: its first
    /// verification taken in from an empty, unverified record.
    pub fn enrolled(a: &NewAttestation) -> AttestRecord {
        let mut rec = AttestRecord {
            kind: a.kind.clone(),
            ek_sha256: crate::attest::ek_fingerprint(&a.ek_public),
            ek_issuer: a.ek_issuer.clone(),
            status: attest_status::UNVERIFIED.to_string(),
            reason: None,
            verified_ms: None,
            pcrs: BTreeMap::new(),
            accepted: Vec::new(),
            reset_count: None,
            log_len: 0,
            ima_len: 0,
            ima_entries: 0,
            ima_pcr10: [0; 32],
            ak_public: a.ak_public.clone(),
            log: Vec::new(),
        };
        rec.apply(&a.outcome);
        rec
    }

    /// The operator accepts the measurements last verified (the ones shown to them, if
    /// `seen_verified_ms` says when): they replace the first-seen and earlier accepted
    /// sets, and the quarantine is lifted. Refused, with what to do, when the policy
    /// itself quarantines the device, the measurements changed since they were shown,
    /// or none ever verified.
    pub fn accept(
        &mut self,
        device: &DeviceId,
        seen_verified_ms: Option<u64>,
        now_ms: u64,
    ) -> std::result::Result<(), String> {
        if let Some(reason) = self.reason.as_deref()
            && !crate::attest::QuarantineKind::of(reason).accept_lifts()
        {
            return Err(format!(
                "device {device} is quarantined by its policy ({reason}); accepting measurements cannot change that: change the policy or revoke the device"
            ));
        }
        if seen_verified_ms.is_some() && seen_verified_ms != self.verified_ms {
            return Err(format!(
                "the measurements of {device} changed since you looked (verified at {:?} ms, you saw {:?}); review `cairn-hub device show {device}` and accept again",
                self.verified_ms, seen_verified_ms
            ));
        }
        if self.pcrs.is_empty() {
            return Err(format!(
                "device {device} has no verified measurements yet (its evidence never verified: {}); \
                 fix the device or revoke it",
                self.reason.as_deref().unwrap_or("none received")
            ));
        }
        self.accepted.retain(|s| {
            s.source != crate::attest::SOURCE_FIRST_SEEN
                && s.source != crate::attest::SOURCE_OPERATOR
        });
        self.accepted.push(MeasurementSet {
            source: crate::attest::SOURCE_OPERATOR.into(),
            added_ms: now_ms,
            pcrs: self.pcrs.clone(),
        });
        self.status = attest_status::TRUSTED.to_string();
        self.reason = None;
        Ok(())
    }

    /// Takes in the outcome of one verification: status and reason, a measurement set
    /// to accept (replacing the one from the same source), and what verified (PCR
    /// values, or none if it did not; the event log, IMA list and reset count when
    /// known). Returns whether the status or the reason changed: an event is due. Every
    /// backend records attestation through this, and so does the simulator.
    pub fn apply(&mut self, o: &AttestOutcome) -> bool {
        let status = if o.quarantine.is_some() {
            attest_status::QUARANTINED
        } else {
            attest_status::TRUSTED
        };
        if let Some(set) = &o.record {
            self.accepted.retain(|s| s.source != set.source);
            self.accepted.push(set.clone());
        }
        let changed = self.status != status || self.reason != o.quarantine;
        self.status = status.to_string();
        self.reason.clone_from(&o.quarantine);
        if o.pcrs.is_some() {
            self.verified_ms = Some(o.now_ms);
        }
        self.pcrs = o.pcrs.clone().unwrap_or_default();
        if let Some(n) = o.reset_count {
            self.reset_count = Some(n);
        }
        if let Some(log) = &o.log {
            self.log.clone_from(log);
            self.log_len = log.len();
        }
        if let Some(ima) = o.ima {
            self.ima_len = ima.len;
            self.ima_pcr10 = ima.pcr10;
            self.ima_entries = ima.entries;
        }
        changed
    }
}

/// Attestation statuses.
pub mod attest_status {
    pub const TRUSTED: &str = "trusted";
    pub const QUARANTINED: &str = "quarantined";
    pub const UNVERIFIED: &str = "unverified";
}

/// Everything the hub knows about one device.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct DeviceRecord {
    #[schema(value_type = String)]
    pub id: DeviceId,
    pub hostname: String,
    #[schema(value_type = Object)]
    pub labels: Labels,
    pub agent_version: String,
    pub enrolled_ms: u64,
    pub revoked_ms: Option<u64>,
    /// Whether a hub process holds a live session with it (as last recorded).
    pub online: bool,
    pub last_seen_ms: Option<u64>,
    /// Newest desired-state revision (0: none yet).
    pub desired_revision: u64,
    /// Newest revision the agent confirmed it stored.
    pub stored_revision: u64,
    /// Revision the agent last reported as applied.
    pub applied_revision: u64,
    /// Resources the agent reported as failing to apply.
    pub failing: u32,
    /// Highest report sequence number stored.
    pub reports_acked: u64,
    /// When the hub learned of the current `applied_revision` (ms since the epoch).
    pub applied_ms: Option<u64>,
    /// When the current (or, if offline, the last) session began.
    pub online_since_ms: Option<u64>,
    /// Identity kind ([`crate::attest::kind`]); `None` for an unattested device.
    pub attestation: Option<String>,
    /// [`attest_status`], for attested devices.
    pub attest_status: Option<String>,
    /// Why the device is quarantined.
    pub quarantine: Option<String>,
    /// The latest OS upgrade status the agent reported.
    pub upgrade: Option<UpgradeStatus>,
}

/// A device's latest OS upgrade report, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct UpgradeStatus {
    /// The release being installed (or that ended in `phase`).
    pub version: String,
    /// [`cairn_sync_protocol::message::UpgradePhase::as_str`]: downloading, written,
    /// verified, trial-armed, rebooting, trial-running, committed, rolled-back, failed.
    pub phase: String,
    /// `a` or `b`.
    pub target_slot: String,
    pub booted_slot: String,
    /// What the device falls back to.
    pub committed_version: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Of `bytes_done`, what came over the network (the rest was copied locally).
    pub bytes_downloaded: u64,
    pub error: Option<String>,
    /// When the agent recorded it (its clock, ms since the epoch).
    pub at_ms: u64,
}

impl UpgradeStatus {
    /// Whether nothing more happens without a new release.
    pub fn is_final(&self) -> bool {
        matches!(self.phase.as_str(), "committed" | "rolled-back" | "failed")
    }

    /// One line: `2.0.0 downloading 45% (12% downloaded)`, `2.0.0 rolled back: why`.
    pub fn summary(&self) -> String {
        let pct = |n: u64| {
            n.saturating_mul(100)
                .checked_div(self.bytes_total)
                .unwrap_or(0)
                .min(100)
        };
        match (self.phase.as_str(), &self.error) {
            ("downloading", _) => format!(
                "{} downloading {}% ({}% downloaded)",
                self.version,
                pct(self.bytes_done),
                pct(self.bytes_downloaded)
            ),
            ("rolled-back", Some(e)) => format!("{} rolled back: {e}", self.version),
            ("failed", Some(e)) => format!("{} failed: {e}", self.version),
            (phase, _) => format!(
                "{} {phase} (slot {}, booted {})",
                self.version,
                self.target_slot.to_uppercase(),
                self.booted_slot.to_uppercase()
            ),
        }
    }
}

/// A trusted release key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ReleaseKeyRecord {
    /// [`cairn_sync_protocol::release::KeyId`] in hex (16 digits).
    pub key_id: String,
    /// The ed25519 public key, 64 hex digits.
    pub public_key: String,
    pub name: String,
    pub added_ms: u64,
}

/// One payload of a stored release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct PayloadInfo {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

/// A release stored on the hub (its bundle is `DATA_DIR/releases/<id>.cairn`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ReleaseRecord {
    /// [`cairn_sync_protocol::release::ReleaseId`] in hex.
    pub id: String,
    pub version: String,
    pub arch: String,
    pub board: String,
    /// When it was built (from the manifest).
    pub created_ms: u64,
    pub pushed_ms: u64,
    pub key_id: String,
    /// Length of the bundle file.
    pub bundle_len: u64,
    pub payloads: Vec<PayloadInfo>,
    /// The encoded [`cairn_sync_protocol::release::SignedManifest`].
    #[serde(skip)]
    pub manifest: Vec<u8>,
    /// Bytes of the bundle header (where the layout starts counting).
    #[serde(skip)]
    pub header_len: u64,
}

/// What storing a release did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutRelease {
    Stored,
    /// The same release (same id) was already stored.
    AlreadyPresent,
    /// Another release with this version exists.
    Conflict(ReleaseRecord),
}

/// Resource name under which a device's desired OS is assigned.
pub const OS_RESOURCE: &str = "os";

impl DeviceRecord {
    pub fn quarantined(&self) -> bool {
        self.attest_status.as_deref() == Some(attest_status::QUARANTINED)
    }
}

impl DeviceRecord {
    /// Whether the device runs something other than its newest desired state.
    pub fn drift(&self) -> bool {
        self.applied_revision != self.desired_revision || self.failing > 0
    }
}

/// A change to desired state.
#[derive(Debug, Clone)]
pub enum Change {
    Set(ResourceName, Resource),
    Unset(ResourceName),
}

/// What an assignment changed.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AssignOutcome {
    /// Devices the target matches now.
    pub matched: usize,
    /// Devices that got a new revision, with that revision.
    #[schema(value_type = Vec<Object>)]
    pub changed: Vec<(DeviceId, u64)>,
}

/// One stored event: reported by an agent, or recorded by the hub itself.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct EventRecord {
    /// Store-wide increasing id, for paging and following.
    pub id: u64,
    #[schema(value_type = String)]
    pub device: DeviceId,
    /// The agent's report sequence number; absent for events the hub recorded.
    pub seq: Option<u64>,
    /// When it happened, by the clock of whoever recorded it (ms since the epoch).
    pub at_ms: u64,
    pub kind: String,
    pub resource: Option<String>,
    pub revision: Option<u64>,
    pub message: String,
}

/// Which events to list.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub device: Option<DeviceId>,
    pub kind: Option<String>,
    /// Only events with an id above this.
    pub after_id: u64,
    pub limit: usize,
}

/// Kinds of events the hub records itself (agents' kinds are
/// [`cairn_sync_protocol::message::EventKind::as_str`]).
pub mod hub_event {
    pub const ENROLLED: &str = "hub.enrolled";
    pub const REVOKED: &str = "hub.revoked";
    pub const LABELS_CHANGED: &str = "hub.labels-changed";
    pub const REPORTS_LOST: &str = "hub.reports-lost";
    pub const QUARANTINED: &str = "hub.quarantined";
    pub const ATTESTED: &str = "hub.attested";
    pub const MEASUREMENTS_ACCEPTED: &str = "hub.measurements-accepted";
}

/// Prefix of the events recorded from upgrade reports (`upgrade.downloading`, …).
pub const UPGRADE_EVENT_PREFIX: &str = "upgrade.";

/// Label keys and values in use, with device counts.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct LabelCount {
    pub key: String,
    pub value: String,
    pub devices: usize,
}

/// The hub's durable state, one trait per aggregate, so that a backend (and its
/// conformance tests) can be written and read an aggregate at a time. See the module
/// documentation for the contract. Callers hold a [`DynStore`] and bring the aggregate
/// traits they use into scope.
pub trait Store: Enrollments + Attestations + Devices + DesiredState + Reports + Releases {}

impl<T: Enrollments + Attestations + Devices + DesiredState + Reports + Releases> Store for T {}

/// Join tokens and enrollment.
#[async_trait]
pub trait Enrollments: Send + Sync + 'static {
    async fn create_token(&self, token: NewToken) -> Result<TokenInfo>;

    async fn tokens(&self) -> Result<Vec<TokenInfo>>;

    /// Consumes one use of a token and records the device with its initial desired state,
    /// atomically. An existing, not revoked device enrolling again with the same key (a
    /// retry after a lost answer) needs a valid token secret but consumes no use.
    async fn enroll(&self, e: Enrollment) -> Result<Result<DeviceRecord, EnrollRefusal>>;

    /// Checks a token without using it: its labels if it could enroll `device` now (a
    /// device already enrolled and not revoked retries with a valid secret only, as in
    /// [`Enrollments::enroll`]).
    async fn check_token(
        &self,
        token_id: &str,
        secret_hash: [u8; 32],
        device: &DeviceId,
        now_ms: u64,
    ) -> Result<Result<Labels, EnrollRefusal>>;
}

/// Roots of trust, verified evidence, accepted measurements and policies.
#[async_trait]
pub trait Attestations: Send + Sync + 'static {
    /// The device that is not revoked and holds the EK with this SHA-256 (hex).
    async fn ek_owner(&self, ek_sha256: &str) -> Result<Option<DeviceId>>;

    /// A device's root of trust; `None` for an unattested or unknown device.
    async fn attestation(&self, id: &DeviceId) -> Result<Option<AttestRecord>>;

    /// Records one verification; a change of status also records an event.
    async fn record_attestation(&self, id: &DeviceId, outcome: AttestOutcome) -> Result<()>;

    /// refused if newer ones arrived since.
    async fn accept_measurements(
        &self,
        id: &DeviceId,
        seen_verified_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Result<AttestRecord, String>>;

    /// Adds (or replaces, by source) a set of values the device is expected to measure,
    /// e.g. what a release predicts, before the device boots it. `false` if the device
    /// is not attested.
    async fn expect_measurements(&self, id: &DeviceId, set: MeasurementSet) -> Result<bool>;

    /// Removes the sets with this source; how many were removed.
    async fn retire_measurements(&self, id: &DeviceId, source: &str) -> Result<usize>;

    async fn put_policy(&self, policy: AttestPolicy) -> Result<()>;

    async fn delete_policy(&self, name: &str) -> Result<bool>;

    async fn policies(&self) -> Result<Vec<AttestPolicy>>;
}

/// Devices: listings, labels, revocation, sessions.
#[async_trait]
pub trait Devices: Send + Sync + 'static {
    async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>>;

    async fn devices(&self) -> Result<Vec<DeviceRecord>>;

    /// Marks a device revoked; `false` if it does not exist.
    async fn revoke(&self, id: &DeviceId, now_ms: u64) -> Result<bool>;

    /// Replaces a device's labels and recomputes its desired state. `None` if unknown.
    async fn set_labels(
        &self,
        id: &DeviceId,
        labels: Labels,
        now_ms: u64,
    ) -> Result<Option<AssignOutcome>>;

    async fn labels(&self) -> Result<Vec<LabelCount>>;

    /// Records that session `session` of a device started (`online`) or ended. An end is
    /// recorded only if no newer session started meanwhile.
    async fn set_online(
        &self,
        id: &DeviceId,
        session: u64,
        online: bool,
        now_ms: u64,
    ) -> Result<()>;
}

/// Desired state: assignments, signed revisions, and what an agent needs next.
#[async_trait]
pub trait DesiredState: Send + Sync + 'static {
    /// Sets or unsets a resource for a target and re-signs every device whose document
    /// changes. Refused with [`StoreError::Invalid`] if a device's document would exceed
    /// the protocol's limits (resource count, encoded size) or two of its files would
    /// share a path.
    async fn assign(&self, target: Target, change: Change, now_ms: u64) -> Result<AssignOutcome>;

    /// The update that brings an agent holding `held_revision` to the newest revision: a
    /// delta when the store can compute one, else a full snapshot. `None` when the agent
    /// is up to date.
    async fn state_update(&self, id: &DeviceId, held_revision: u64) -> Result<Option<StateUpdate>>;

    /// A full snapshot of the newest revision (`None` when there is no revision yet).
    async fn state_snapshot(&self, id: &DeviceId) -> Result<Option<StateUpdate>>;

    /// The agent confirmed it stored `revision`.
    async fn state_stored(&self, id: &DeviceId, revision: u64) -> Result<()>;
}

/// What agents reported, and the event log.
#[async_trait]
pub trait Reports: Send + Sync + 'static {
    /// Stores reports in sequence order, skipping those already stored; returns the
    /// highest sequence number now stored.
    async fn record_reports(&self, id: &DeviceId, reports: Vec<Report>, now_ms: u64)
    -> Result<u64>;

    /// Records that reports `from ..= to` of a device are lost for good (the agent had
    /// deleted them after an acknowledgement the hub's restored database no longer
    /// holds) and moves the device's report mark to `to`; returns the new mark.
    async fn skip_reports(&self, id: &DeviceId, from: u64, to: u64, now_ms: u64) -> Result<u64>;

    async fn events(&self, filter: EventFilter) -> Result<Vec<EventRecord>>;

    /// The id of the newest event, updated after every commit that adds events.
    fn event_watch(&self) -> watch::Receiver<u64>;
}

/// Release keys, releases, and every device's desired OS.
#[async_trait]
pub trait Releases: Send + Sync + 'static {
    /// Adds a trusted release key; `false` if it was already trusted (its name is kept).
    async fn add_release_key(&self, key: ReleaseKeyRecord) -> Result<bool>;

    async fn release_keys(&self) -> Result<Vec<ReleaseKeyRecord>>;

    /// Removes a trusted release key by id; `false` if there was none.
    async fn remove_release_key(&self, key_id: &str) -> Result<bool>;

    /// Records a release whose bundle is already durable in place. A version is stored
    /// once: the same id again is [`PutRelease::AlreadyPresent`], another id a conflict.
    async fn put_release(&self, release: ReleaseRecord) -> Result<PutRelease>;

    async fn releases(&self) -> Result<Vec<ReleaseRecord>>;

    async fn release(&self, version: &str) -> Result<Option<ReleaseRecord>>;

    async fn release_by_id(&self, id: &str) -> Result<Option<ReleaseRecord>>;

    /// Deletes a release record. `Err(why)` while an assignment still refers to it.
    async fn delete_release(&self, version: &str) -> Result<Result<Option<ReleaseRecord>, String>>;

    /// Every device's desired OS (the [`OS_RESOURCE`] resource of its current
    /// document): `(device, release id hex, version)`.
    async fn desired_os(&self) -> Result<Vec<(DeviceId, String, String)>>;
}

/// Most bytes of resources in one device's document, leaving room in a frame for the
/// names, the signature and the framing: [`DesiredState::assign`] refuses a change
/// that would make a document larger.
pub const MAX_DOCUMENT_BYTES: usize =
    cairn_sync_protocol::frame::DEFAULT_MAX_FRAME_LEN - 256 * 1024;

/// Shared handle to a store.
pub type DynStore = Arc<dyn Store>;
