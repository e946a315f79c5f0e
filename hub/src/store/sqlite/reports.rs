//! Reports and events: stored once per `(device, seq)` in sequence order; the hub's own
//! events; the latest upgrade status per device.

use async_trait::async_trait;
use cairn_sync_protocol::DeviceId;
use cairn_sync_protocol::message::{Report, ReportBody};
use rusqlite::{Connection, params};
use tokio::sync::watch;

use crate::store::{
    EventFilter, EventRecord, OS_RESOURCE, Result, UPGRADE_EVENT_PREFIX, UpgradeStatus, hub_event,
};

use super::{SqliteStore, backend, device_id};
use crate::store::Reports;

pub(super) fn insert_hub_event(
    conn: &Connection,
    device: &DeviceId,
    now_ms: u64,
    kind: &str,
    message: &str,
) -> Result<()> {
    conn.execute(
        "INSERT INTO events (device, seq, at_ms, received_ms, kind, resource, revision, message) \
         VALUES (?1, NULL, ?2, ?2, ?3, NULL, NULL, ?4)",
        params![device.as_str(), now_ms, kind, message],
    )
    .map_err(backend)?;
    Ok(())
}

/// Keeps a device's latest upgrade status and records the report as an event
/// (`upgrade.<phase>`), under the report's sequence number.
pub(super) fn record_upgrade(
    conn: &Connection,
    device: &DeviceId,
    seq: u64,
    at_ms: u64,
    now_ms: u64,
    u: &cairn_sync_protocol::message::UpgradeReport,
) -> Result<()> {
    let status = UpgradeStatus {
        version: u.version.to_string(),
        phase: u.phase.as_str().to_string(),
        target_slot: u.target_slot.as_str().to_string(),
        booted_slot: u.booted_slot.as_str().to_string(),
        committed_version: u.committed_version.to_string(),
        bytes_done: u.bytes_done,
        bytes_total: u.bytes_total,
        bytes_downloaded: u.bytes_downloaded,
        error: u.error.as_ref().map(|e| e.to_string()),
        at_ms,
    };
    conn.prepare_cached(
        "INSERT OR REPLACE INTO upgrades (device, version, phase, target_slot, booted_slot, \
         committed_version, bytes_done, bytes_total, bytes_downloaded, error, at_ms, received_ms) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )
    .and_then(|mut s| {
        s.execute(params![
            device.as_str(),
            status.version,
            status.phase,
            status.target_slot,
            status.booted_slot,
            status.committed_version,
            status.bytes_done,
            status.bytes_total,
            status.bytes_downloaded,
            status.error,
            at_ms,
            now_ms
        ])
    })
    .map_err(backend)?;
    conn.prepare_cached(
        "INSERT INTO events (device, seq, at_ms, received_ms, kind, resource, revision, message) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, NULL, ?7)",
    )
    .and_then(|mut s| {
        s.execute(params![
            device.as_str(),
            seq,
            at_ms,
            now_ms,
            format!("{UPGRADE_EVENT_PREFIX}{}", status.phase),
            OS_RESOURCE,
            status.summary()
        ])
    })
    .map_err(backend)?;
    Ok(())
}

#[async_trait]
impl Reports for SqliteStore {
    async fn record_reports(
        &self,
        id: &DeviceId,
        reports: Vec<Report>,
        now_ms: u64,
    ) -> Result<u64> {
        let id = id.clone();
        self.write(move |conn| {
            let acked: u64 = conn
                .query_row(
                    "SELECT reports_acked FROM devices WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            let (reports, mark) = crate::store::stream::accept(acked, reports);
            for r in reports {
                match r.body {
                    ReportBody::Event(e) => {
                        conn.prepare_cached(
                            "INSERT INTO events (device, seq, at_ms, received_ms, kind, resource, revision, message) \
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        )
                        .and_then(|mut s| {
                            s.execute(params![
                                id.as_str(),
                                r.seq,
                                r.at_ms,
                                now_ms,
                                e.kind.as_str(),
                                e.resource.as_ref().map(|n| n.as_str()),
                                e.revision,
                                e.message.as_str()
                            ])
                        })
                        .map_err(backend)?;
                    }
                    ReportBody::Upgrade(u) => record_upgrade(conn, &id, r.seq, r.at_ms, now_ms, &u)?,
                    ReportBody::Status(s) => {
                        conn.prepare_cached(
                            "UPDATE devices SET \
                             applied_ms = CASE WHEN applied_revision = ?2 THEN applied_ms ELSE ?5 END, \
                             applied_revision = ?2, failing = ?3, \
                             stored_revision = MAX(stored_revision, ?4) WHERE id = ?1",
                        )
                        .and_then(|mut st| {
                            st.execute(params![
                                id.as_str(),
                                s.applied_revision,
                                s.failing,
                                s.desired_revision,
                                now_ms
                            ])
                        })
                        .map_err(backend)?;
                    }
                }
            }
            conn.prepare_cached(
                "UPDATE devices SET reports_acked = ?2, last_seen_ms = ?3 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id.as_str(), mark, now_ms]))
            .map_err(backend)?;
            Ok(mark)
        })
        .await
    }

    async fn skip_reports(&self, id: &DeviceId, from: u64, to: u64, now_ms: u64) -> Result<u64> {
        let id = id.clone();
        self.write(move |conn| {
            let acked: u64 = conn
                .query_row(
                    "SELECT reports_acked FROM devices WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            let Some(to) = crate::store::stream::skip(acked, from, to) else {
                return Ok(acked);
            };
            conn.execute(
                "UPDATE devices SET reports_acked = ?2 WHERE id = ?1",
                params![id.as_str(), to],
            )
            .map_err(backend)?;
            insert_hub_event(
                conn,
                &id,
                now_ms,
                hub_event::REPORTS_LOST,
                &format!(
                    "reports {from}..={to} are lost: the agent had them acknowledged by this hub before its database was restored"
                ),
            )?;
            Ok(to)
        })
        .await
    }

    async fn events(&self, f: EventFilter) -> Result<Vec<EventRecord>> {
        self.read(move |conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT id, device, seq, at_ms, kind, resource, revision, message FROM events \
                     WHERE id > ?1 AND (?2 IS NULL OR device = ?2) AND (?3 IS NULL OR kind = ?3) \
                     ORDER BY id LIMIT ?4",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map(
                    params![
                        f.after_id,
                        f.device.as_ref().map(|d| d.as_str()),
                        f.kind,
                        f.limit.clamp(1, 100_000) as i64
                    ],
                    |r| {
                        Ok((
                            r.get::<_, u64>(0)?,
                            r.get::<_, String>(1)?,
                            r.get::<_, Option<u64>>(2)?,
                            r.get::<_, u64>(3)?,
                            r.get::<_, String>(4)?,
                            r.get::<_, Option<String>>(5)?,
                            r.get::<_, Option<u64>>(6)?,
                            r.get::<_, String>(7)?,
                        ))
                    },
                )
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, device, seq, at_ms, kind, resource, revision, message) =
                    row.map_err(backend)?;
                out.push(EventRecord {
                    id,
                    device: device_id(device)?,
                    seq,
                    at_ms,
                    kind,
                    resource,
                    revision,
                    message,
                });
            }
            Ok(out)
        })
        .await
    }

    fn event_watch(&self) -> watch::Receiver<u64> {
        self.events.clone()
    }
}
