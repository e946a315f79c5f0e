//! The device table: listings (with each device's latest upgrade status), labels,
//! revocation and sessions.

use std::collections::BTreeMap;

use async_trait::async_trait;
use cairn_sync_protocol::DeviceId;
use cairn_sync_protocol::message::Labels;
use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{AssignOutcome, DeviceRecord, LabelCount, Result, hub_event};

use super::reports::insert_hub_event;
use super::state::{live_devices, load_assignments, recompute};
use super::{SqliteStore, backend, device_id, labels_json, parse_labels};
use crate::store::Devices;

pub(super) const DEVICE_COLUMNS: &str = "id, hostname, labels, agent_version, enrolled_ms, revoked_ms, online, \
     last_seen_ms, revision, stored_revision, applied_revision, failing, reports_acked, applied_ms, online_since_ms, \
     attest_kind, attest_status, attest_reason, \
     u.version, u.phase, u.target_slot, u.booted_slot, u.committed_version, u.bytes_done, u.bytes_total, \
     u.bytes_downloaded, u.error, u.at_ms";

/// The device table with each device's latest upgrade status (tables releases and
/// upgrades came with OS upgrades; older databases get them at open).
pub(super) const DEVICE_FROM: &str = "devices LEFT JOIN upgrades u ON u.device = devices.id";

pub(super) fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawDevice> {
    Ok(RawDevice {
        id: r.get(0)?,
        hostname: r.get(1)?,
        labels: r.get(2)?,
        agent_version: r.get(3)?,
        enrolled_ms: r.get(4)?,
        revoked_ms: r.get(5)?,
        online: r.get(6)?,
        last_seen_ms: r.get(7)?,
        desired_revision: r.get(8)?,
        stored_revision: r.get(9)?,
        applied_revision: r.get(10)?,
        failing: r.get(11)?,
        reports_acked: r.get(12)?,
        applied_ms: r.get(13)?,
        online_since_ms: r.get(14)?,
        attest_kind: r.get(15)?,
        attest_status: r.get(16)?,
        attest_reason: r.get(17)?,
        upgrade: match r.get::<_, Option<String>>(18)? {
            None => None,
            Some(version) => Some(crate::store::UpgradeStatus {
                version,
                phase: r.get(19)?,
                target_slot: r.get(20)?,
                booted_slot: r.get(21)?,
                committed_version: r.get(22)?,
                bytes_done: r.get(23)?,
                bytes_total: r.get(24)?,
                bytes_downloaded: r.get(25)?,
                error: r.get(26)?,
                at_ms: r.get(27)?,
            }),
        },
    })
}

pub(super) struct RawDevice {
    id: String,
    hostname: String,
    labels: String,
    agent_version: String,
    enrolled_ms: u64,
    revoked_ms: Option<u64>,
    online: bool,
    last_seen_ms: Option<u64>,
    desired_revision: u64,
    stored_revision: u64,
    applied_revision: u64,
    failing: u32,
    reports_acked: u64,
    applied_ms: Option<u64>,
    online_since_ms: Option<u64>,
    attest_kind: Option<String>,
    attest_status: Option<String>,
    attest_reason: Option<String>,
    upgrade: Option<crate::store::UpgradeStatus>,
}

impl RawDevice {
    fn into_record(self) -> Result<DeviceRecord> {
        Ok(DeviceRecord {
            id: device_id(self.id)?,
            hostname: self.hostname,
            labels: parse_labels(&self.labels)?,
            agent_version: self.agent_version,
            enrolled_ms: self.enrolled_ms,
            revoked_ms: self.revoked_ms,
            online: self.online,
            last_seen_ms: self.last_seen_ms,
            desired_revision: self.desired_revision,
            stored_revision: self.stored_revision,
            applied_revision: self.applied_revision,
            failing: self.failing,
            reports_acked: self.reports_acked,
            applied_ms: self.applied_ms,
            online_since_ms: self.online_since_ms,
            attestation: self.attest_kind,
            attest_status: self.attest_status,
            quarantine: self.attest_reason,
            upgrade: self.upgrade,
        })
    }
}

pub(super) fn load_device(conn: &Connection, id: &DeviceId) -> Result<Option<DeviceRecord>> {
    conn.query_row(
        &format!("SELECT {DEVICE_COLUMNS} FROM {DEVICE_FROM} WHERE devices.id = ?1"),
        [id.as_str()],
        device_row,
    )
    .optional()
    .map_err(backend)?
    .map(RawDevice::into_record)
    .transpose()
}

#[async_trait]
impl Devices for SqliteStore {
    async fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>> {
        let id = id.clone();
        self.read(move |conn| load_device(conn, &id)).await
    }

    async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare(&format!(
                    "SELECT {DEVICE_COLUMNS} FROM {DEVICE_FROM} ORDER BY devices.id"
                ))
                .map_err(backend)?;
            let rows = stmt.query_map([], device_row).map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                out.push(row.map_err(backend)?.into_record()?);
            }
            Ok(out)
        })
        .await
    }

    async fn revoke(&self, id: &DeviceId, now_ms: u64) -> Result<bool> {
        let id = id.clone();
        self.write(move |conn| {
            let n = conn
                .execute(
                    "UPDATE devices SET revoked_ms = COALESCE(revoked_ms, ?2), online = 0 WHERE id = ?1",
                    params![id.as_str(), now_ms],
                )
                .map_err(backend)?;
            if n > 0 {
                insert_hub_event(conn, &id, now_ms, hub_event::REVOKED, "device revoked by operator")?;
            }
            Ok(n > 0)
        })
        .await
    }

    async fn set_labels(
        &self,
        id: &DeviceId,
        labels: Labels,
        now_ms: u64,
    ) -> Result<Option<AssignOutcome>> {
        let id = id.clone();
        let signer = self.signer.clone();
        self.write(move |conn| {
            let n = conn
                .execute(
                    "UPDATE devices SET labels = ?2 WHERE id = ?1",
                    params![id.as_str(), labels_json(&labels)],
                )
                .map_err(backend)?;
            if n == 0 {
                return Ok(None);
            }
            let assignments = load_assignments(conn)?;
            let mut out = AssignOutcome {
                matched: 1,
                changed: vec![],
            };
            if let Some(rev) = recompute(conn, &signer, &id, &labels, &assignments)? {
                out.changed.push((id.clone(), rev));
            }
            let text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            insert_hub_event(
                conn,
                &id,
                now_ms,
                hub_event::LABELS_CHANGED,
                &format!("labels now {}", text.join(",")),
            )?;
            Ok(Some(out))
        })
        .await
    }

    async fn labels(&self) -> Result<Vec<LabelCount>> {
        self.read(|conn| {
            let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
            for (_, labels) in live_devices(conn)? {
                for (k, v) in labels {
                    *counts.entry((k.to_string(), v.to_string())).or_default() += 1;
                }
            }
            Ok(counts
                .into_iter()
                .map(|((key, value), devices)| LabelCount {
                    key,
                    value,
                    devices,
                })
                .collect())
        })
        .await
    }

    async fn set_online(
        &self,
        id: &DeviceId,
        session: u64,
        online: bool,
        now_ms: u64,
    ) -> Result<()> {
        let id = id.clone();
        self.write(move |conn| {
            let sql = if online {
                "UPDATE devices SET online = 1, online_session = ?2, last_seen_ms = ?3, online_since_ms = ?3 WHERE id = ?1"
            } else {
                "UPDATE devices SET online = 0, last_seen_ms = ?3 WHERE id = ?1 AND online_session = ?2"
            };
            conn.prepare_cached(sql)
                .and_then(|mut s| s.execute(params![id.as_str(), session as i64, now_ms]))
                .map_err(backend)?;
            Ok(())
        })
        .await
    }
}
