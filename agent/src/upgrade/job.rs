//! The durable upgrade job ([`Job`]): what is being installed where, its phase, and
//! how far it got. Stored as JSON in the agent database; every step rewrites it.

use cairn_sync_protocol::message::UpgradePhase;
use cairn_sync_protocol::release::{HealthSpec, Manifest, OsResource, SignedManifest, Slot};
use serde::{Deserialize, Serialize};

use super::install::Progress;

/// The durable job, stored as JSON in the agent database.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// Hash of the desired resource this job is for (hex).
    pub resource: String,
    pub release: String,
    pub version: String,
    /// The signed manifest (hex of [`SignedManifest::to_bytes`]), verified at admission.
    pub manifest: String,
    pub health: HealthSpec,
    pub target: Slot,
    pub phase: UpgradePhase,
    /// The target slot is marked unbootable on disk.
    pub marked: bool,
    /// Per payload, in manifest order.
    pub progress: Vec<Progress>,
    pub verify_failures: u32,
    pub trial_started_ms: Option<u64>,
    pub trial_boots: u32,
    pub trial_reboots: u32,
    /// Set when the trial was given up, before the slot is rejected.
    pub rollback: Option<String>,
    pub error: Option<String>,
    pub reboot_tryboot: bool,
}

impl Job {
    /// For `cairn-agent status`.
    pub fn status(&self) -> crate::UpgradeStatus {
        let (done, total, down) = self
            .manifest()
            .map(|(_, m)| self.totals(&m))
            .unwrap_or((0, 0, 0));
        crate::UpgradeStatus {
            version: self.version.clone(),
            phase: self.phase.as_str().into(),
            target_slot: self.target.to_string(),
            bytes_done: done,
            bytes_total: total,
            bytes_downloaded: down,
            error: self.error.clone().or_else(|| self.rollback.clone()),
        }
    }

    /// A job for the admitted release `m` of `os` (resource `hash`), to be written
    /// into `target` from the first block.
    pub(super) fn start(hash: &[u8; 32], os: &OsResource, m: &Manifest, target: Slot) -> Self {
        Self {
            resource: hex::encode(hash),
            release: os.manifest.id().to_hex(),
            version: m.version.to_string(),
            manifest: hex::encode(os.manifest.to_bytes()),
            health: os.health.clone(),
            target,
            phase: UpgradePhase::Downloading,
            marked: false,
            progress: vec![Progress::default(); m.payloads.len()],
            verify_failures: 0,
            trial_started_ms: None,
            trial_boots: 0,
            trial_reboots: 0,
            rollback: None,
            error: None,
            reboot_tryboot: false,
        }
    }

    /// A failed job recording that `os` (resource `hash`) was refused, so that it is
    /// reported once and not judged again.
    pub(super) fn refused(hash: &[u8; 32], os: &OsResource, target: Slot, reason: &str) -> Self {
        let version = os
            .manifest
            .decode_unverified()
            .map(|m| m.version.to_string())
            .unwrap_or_else(|_| "?".into());
        Self {
            resource: hex::encode(hash),
            release: os.manifest.id().to_hex(),
            version,
            manifest: hex::encode(os.manifest.to_bytes()),
            health: os.health.clone(),
            target,
            phase: UpgradePhase::Failed,
            marked: false,
            progress: vec![],
            verify_failures: 0,
            trial_started_ms: None,
            trial_boots: 0,
            trial_reboots: 0,
            rollback: None,
            error: Some(format!("refused: {reason}")),
            reboot_tryboot: false,
        }
    }

    /// The stored manifest, signed and decoded (it was verified at admission).
    pub(super) fn manifest(&self) -> Result<(SignedManifest, Manifest), String> {
        let bytes = hex::decode(&self.manifest).map_err(|e| e.to_string())?;
        let signed = SignedManifest::from_bytes(&bytes).map_err(|e| e.to_string())?;
        let m = signed.decode_unverified().map_err(|e| e.to_string())?;
        Ok((signed, m))
    }

    /// Bytes written, bytes in all, bytes downloaded.
    pub(super) fn totals(&self, m: &Manifest) -> (u64, u64, u64) {
        let total: u64 = m.payloads.iter().map(|p| p.size).sum();
        let done: u64 = m
            .payloads
            .iter()
            .zip(&self.progress)
            .map(|(p, g)| {
                (g.blocks_done * u64::from(cairn_sync_protocol::release::BLOCK_SIZE)).min(p.size)
            })
            .sum();
        let down = self.progress.iter().map(|g| g.downloaded).sum();
        (done, total, down)
    }
}
