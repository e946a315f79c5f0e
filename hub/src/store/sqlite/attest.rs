//! The attestation tables of [`super::SqliteStore`]: one row per attested device
//! (root of trust, last verified evidence, accepted measurement sets as JSON) and the
//! operators' policies. The device row mirrors kind, status and reason so that device
//! listings need no join.

use cairn_sync_protocol::DeviceId;
use rusqlite::{Connection, OptionalExtension, params};

use async_trait::async_trait;

use super::reports::insert_hub_event;
use super::{SqliteStore, backend};
use crate::attest::{AttestPolicy, MeasurementSet};
use crate::store::{
    AttestOutcome, AttestRecord, Attestations, NewAttestation, Result, StoreError, attest_status,
    hub_event,
};

pub(super) const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS attestations (
    device TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    ek_sha256 TEXT NOT NULL,
    ek_issuer TEXT,
    ak_public BLOB NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    verified_ms INTEGER,
    pcrs TEXT NOT NULL DEFAULT '{}',
    accepted TEXT NOT NULL DEFAULT '[]',
    reset_count INTEGER,
    log BLOB NOT NULL DEFAULT x'',
    ima_len INTEGER NOT NULL DEFAULT 0,
    ima_pcr10 BLOB,
    ima_entries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS attestations_ek ON attestations(ek_sha256);
CREATE TABLE IF NOT EXISTS attest_policies (name TEXT PRIMARY KEY, body TEXT NOT NULL);
"#;

/// Columns added to `devices` after the first schema.
pub(super) const DEVICE_COLUMNS_ADDED: [(&str, &str); 3] = [
    ("attest_kind", "TEXT"),
    ("attest_status", "TEXT"),
    ("attest_reason", "TEXT"),
];

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| StoreError::Backend(e.to_string()))
}

pub(super) fn ek_owner(conn: &Connection, ek: &str) -> Result<Option<DeviceId>> {
    let id: Option<String> = conn
        .query_row(
            "SELECT a.device FROM attestations a JOIN devices d ON d.id = a.device \
             WHERE a.ek_sha256 = ?1 AND d.revoked_ms IS NULL LIMIT 1",
            [ek],
            |r| r.get(0),
        )
        .optional()
        .map_err(backend)?;
    id.map(|i| DeviceId::new(&i).map_err(|e| corrupt("device id", e)))
        .transpose()
}

/// Inserts the attestation row of a device being enrolled.
pub(super) fn insert(conn: &Connection, device: &DeviceId, a: &NewAttestation) -> Result<()> {
    let o = &a.outcome;
    let rec = AttestRecord::enrolled(a);
    conn.execute(
        "INSERT OR REPLACE INTO attestations (device, kind, ek_sha256, ek_issuer, ak_public, status, reason, \
         verified_ms, pcrs, accepted, reset_count, log, ima_len, ima_pcr10, ima_entries) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
        params![
            device.as_str(),
            rec.kind,
            rec.ek_sha256,
            rec.ek_issuer,
            rec.ak_public,
            rec.status,
            rec.reason,
            o.now_ms,
            json(&rec.pcrs)?,
            json(&rec.accepted)?,
            rec.reset_count,
            rec.log,
            rec.ima_len,
            o.ima.map(|i| i.pcr10.to_vec()),
            rec.ima_entries,
        ],
    )
    .map_err(backend)?;
    mirror(
        conn,
        device,
        Some(&rec.kind),
        &rec.status,
        rec.reason.as_deref(),
    )?;
    if let Some(why) = &o.quarantine {
        insert_hub_event(conn, device, o.now_ms, hub_event::QUARANTINED, why)?;
    }
    Ok(())
}

fn mirror(
    conn: &Connection,
    device: &DeviceId,
    kind: Option<&str>,
    status: &str,
    reason: Option<&str>,
) -> Result<()> {
    conn.execute(
        "UPDATE devices SET attest_kind = COALESCE(?2, attest_kind), attest_status = ?3, attest_reason = ?4 WHERE id = ?1",
        params![device.as_str(), kind, status, reason],
    )
    .map_err(backend)?;
    Ok(())
}

pub(super) fn load(conn: &Connection, device: &DeviceId) -> Result<Option<AttestRecord>> {
    let row = conn
        .query_row(
            "SELECT kind, ek_sha256, ek_issuer, ak_public, status, reason, verified_ms, pcrs, accepted, \
             reset_count, log, ima_len, ima_pcr10, ima_entries FROM attestations WHERE device = ?1",
            [device.as_str()],
            |r| {
                Ok((
                    (
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, Option<String>>(5)?,
                    ),
                    (
                        r.get::<_, Option<u64>>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, String>(8)?,
                        r.get::<_, Option<u32>>(9)?,
                        r.get::<_, Vec<u8>>(10)?,
                    ),
                    (
                        r.get::<_, u64>(11)?,
                        r.get::<_, Option<Vec<u8>>>(12)?,
                        r.get::<_, u64>(13)?,
                    ),
                ))
            },
        )
        .optional()
        .map_err(backend)?;
    let Some((
        (kind, ek_sha256, ek_issuer, ak_public, status, reason),
        (verified_ms, pcrs, accepted, reset_count, log),
        (ima_len, ima_pcr10, ima_entries),
    )) = row
    else {
        return Ok(None);
    };
    let ima_pcr10: [u8; 32] = match ima_pcr10 {
        None => [0; 32],
        Some(v) => v
            .try_into()
            .map_err(|_| corrupt("IMA PCR 10", "not 32 bytes"))?,
    };
    Ok(Some(AttestRecord {
        kind,
        ek_sha256,
        ek_issuer,
        status,
        reason,
        verified_ms,
        pcrs: serde_json::from_str(&pcrs).map_err(|e| corrupt("attested PCRs", e))?,
        accepted: serde_json::from_str(&accepted).map_err(|e| corrupt("accepted sets", e))?,
        reset_count,
        log_len: log.len(),
        ima_len,
        ima_entries,
        ima_pcr10,
        ak_public,
        log,
    }))
}

pub(super) fn record(conn: &Connection, device: &DeviceId, o: &AttestOutcome) -> Result<()> {
    let Some(mut rec) = load(conn, device)? else {
        return Err(StoreError::Invalid(format!(
            "device {device} is not attested"
        )));
    };
    let changed = rec.apply(o);
    let status = rec.status.as_str();
    conn.execute(
        "UPDATE attestations SET status = ?2, reason = ?3, verified_ms = ?4, pcrs = ?5, accepted = ?6, \
         reset_count = ?7, log = ?8, ima_len = ?9, ima_pcr10 = ?10, ima_entries = ?11 WHERE device = ?1",
        params![
            device.as_str(),
            status,
            rec.reason,
            rec.verified_ms,
            json(&rec.pcrs)?,
            json(&rec.accepted)?,
            rec.reset_count,
            rec.log,
            rec.ima_len,
            rec.ima_pcr10.to_vec(),
            rec.ima_entries,
        ],
    )
    .map_err(backend)?;
    if changed {
        mirror(conn, device, None, status, o.quarantine.as_deref())?;
        match &o.quarantine {
            Some(why) => insert_hub_event(conn, device, o.now_ms, hub_event::QUARANTINED, why)?,
            None => insert_hub_event(
                conn,
                device,
                o.now_ms,
                hub_event::ATTESTED,
                "evidence verified and matches policy; quarantine lifted",
            )?,
        }
    }
    Ok(())
}

pub(super) fn accept(
    conn: &Connection,
    device: &DeviceId,
    seen_verified_ms: Option<u64>,
    now_ms: u64,
) -> Result<Result<AttestRecord, String>> {
    let Some(mut rec) = load(conn, device)? else {
        return Ok(Err(format!(
            "device {device} is not attested; there are no measurements to accept"
        )));
    };
    let was = rec.reason.clone();
    if let Err(why) = rec.accept(device, seen_verified_ms, now_ms) {
        return Ok(Err(why));
    }
    conn.execute(
        "UPDATE attestations SET status = ?2, reason = NULL, accepted = ?3 WHERE device = ?1",
        params![
            device.as_str(),
            attest_status::TRUSTED,
            json(&rec.accepted)?
        ],
    )
    .map_err(backend)?;
    mirror(conn, device, None, attest_status::TRUSTED, None)?;
    let pcrs: Vec<String> = rec.pcrs.keys().map(u32::to_string).collect();
    insert_hub_event(
        conn,
        device,
        now_ms,
        hub_event::MEASUREMENTS_ACCEPTED,
        &format!(
            "operator accepted the measurements of PCRs {} (quarantine lifted{})",
            pcrs.join(","),
            was.as_deref()
                .map(|r| format!("; was: {r}"))
                .unwrap_or_default()
        ),
    )?;
    Ok(Ok(rec))
}

/// Adds (or replaces, by source) an expected set. A set names the PCRs that are
/// about to change (a release predicts PCR 4, a firmware update PCR 0); the PCRs it
/// does not name keep the values the device has now: its last trusted measurements,
/// else its newest accepted set.
pub(super) fn expect(
    conn: &Connection,
    device: &DeviceId,
    mut set: MeasurementSet,
) -> Result<bool> {
    let Some(mut rec) = load(conn, device)? else {
        return Ok(false);
    };
    let base = if rec.status == attest_status::TRUSTED && !rec.pcrs.is_empty() {
        Some(&rec.pcrs)
    } else {
        rec.accepted
            .iter()
            .filter(|s| s.source != set.source)
            .max_by_key(|s| s.added_ms)
            .map(|s| &s.pcrs)
    };
    if let Some(base) = base {
        for (pcr, v) in base {
            set.pcrs.entry(*pcr).or_insert_with(|| v.clone());
        }
    }
    rec.accepted.retain(|s| s.source != set.source);
    rec.accepted.push(set);
    conn.execute(
        "UPDATE attestations SET accepted = ?2 WHERE device = ?1",
        params![device.as_str(), json(&rec.accepted)?],
    )
    .map_err(backend)?;
    Ok(true)
}

pub(super) fn retire(conn: &Connection, device: &DeviceId, source: &str) -> Result<usize> {
    let Some(mut rec) = load(conn, device)? else {
        return Ok(0);
    };
    let before = rec.accepted.len();
    rec.accepted.retain(|s| s.source != source);
    conn.execute(
        "UPDATE attestations SET accepted = ?2 WHERE device = ?1",
        params![device.as_str(), json(&rec.accepted)?],
    )
    .map_err(backend)?;
    Ok(before - rec.accepted.len())
}

pub(super) fn put_policy(conn: &Connection, p: &AttestPolicy) -> Result<()> {
    p.validate().map_err(StoreError::Invalid)?;
    conn.execute(
        "INSERT OR REPLACE INTO attest_policies (name, body) VALUES (?1, ?2)",
        params![p.name, json(p)?],
    )
    .map_err(backend)?;
    Ok(())
}

pub(super) fn delete_policy(conn: &Connection, name: &str) -> Result<bool> {
    Ok(conn
        .execute("DELETE FROM attest_policies WHERE name = ?1", [name])
        .map_err(backend)?
        > 0)
}

pub(super) fn policies(conn: &Connection) -> Result<Vec<AttestPolicy>> {
    let mut stmt = conn
        .prepare_cached("SELECT body FROM attest_policies ORDER BY name")
        .map_err(backend)?;
    let rows = stmt
        .query_map([], |r| r.get::<_, String>(0))
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let body = row.map_err(backend)?;
        out.push(serde_json::from_str(&body).map_err(|e| corrupt("policy", e))?);
    }
    Ok(out)
}

#[async_trait]
impl Attestations for SqliteStore {
    async fn ek_owner(&self, ek_sha256: &str) -> Result<Option<DeviceId>> {
        let ek = ek_sha256.to_string();
        self.read(move |conn| super::attest::ek_owner(conn, &ek))
            .await
    }

    async fn attestation(&self, id: &DeviceId) -> Result<Option<AttestRecord>> {
        let id = id.clone();
        self.read(move |conn| super::attest::load(conn, &id)).await
    }

    async fn record_attestation(&self, id: &DeviceId, outcome: AttestOutcome) -> Result<()> {
        let id = id.clone();
        self.write(move |conn| super::attest::record(conn, &id, &outcome))
            .await
    }

    async fn accept_measurements(
        &self,
        id: &DeviceId,
        seen_verified_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Result<AttestRecord, String>> {
        let id = id.clone();
        self.write(move |conn| super::attest::accept(conn, &id, seen_verified_ms, now_ms))
            .await
    }

    async fn expect_measurements(&self, id: &DeviceId, set: MeasurementSet) -> Result<bool> {
        let id = id.clone();
        self.write(move |conn| super::attest::expect(conn, &id, set))
            .await
    }

    async fn retire_measurements(&self, id: &DeviceId, source: &str) -> Result<usize> {
        let (id, source) = (id.clone(), source.to_string());
        self.write(move |conn| super::attest::retire(conn, &id, &source))
            .await
    }

    async fn put_policy(&self, policy: AttestPolicy) -> Result<()> {
        self.write(move |conn| super::attest::put_policy(conn, &policy))
            .await
    }

    async fn delete_policy(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.write(move |conn| super::attest::delete_policy(conn, &name))
            .await
    }

    async fn policies(&self) -> Result<Vec<AttestPolicy>> {
        self.read(super::attest::policies).await
    }
}
