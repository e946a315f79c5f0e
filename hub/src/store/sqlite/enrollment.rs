//! Join tokens and enrollment: a token use consumed and the device recorded with its
//! first desired state in one transaction.

use async_trait::async_trait;
use cairn_sync_protocol::DeviceId;
use cairn_sync_protocol::message::Labels;
use rusqlite::{Connection, OptionalExtension, params};

use crate::store::{
    DeviceRecord, EnrollRefusal, Enrollment, NewToken, Result, TokenInfo, hub_event,
};

use super::devices::load_device;
use super::reports::insert_hub_event;
use super::state::{load_assignments, recompute};
use super::{SqliteStore, backend, labels_json, now_err, parse_labels};
use crate::store::Enrollments;

/// A token's expiry, uses left and labels, if it exists and `secret_hash` is its
/// secret's (compared in constant time).
pub(super) fn token(
    conn: &Connection,
    id: &str,
    secret_hash: &[u8; 32],
) -> Result<Result<(u64, u32, String), EnrollRefusal>> {
    let row = conn
        .query_row(
            "SELECT secret_hash, expires_ms, uses_left, labels FROM tokens WHERE id = ?1",
            [id],
            |r| {
                Ok((
                    r.get::<_, Vec<u8>>(0)?,
                    r.get::<_, u64>(1)?,
                    r.get::<_, u32>(2)?,
                    r.get::<_, String>(3)?,
                ))
            },
        )
        .optional()
        .map_err(backend)?;
    match row {
        Some((hash, expires_ms, uses_left, labels))
            if bool::from(subtle::ConstantTimeEq::ct_eq(&hash[..], &secret_hash[..])) =>
        {
            Ok(Ok((expires_ms, uses_left, labels)))
        }
        _ => Ok(Err(EnrollRefusal::UnknownToken)),
    }
}

#[async_trait]
impl Enrollments for SqliteStore {
    async fn create_token(&self, t: NewToken) -> Result<TokenInfo> {
        self.write(move |conn| {
            conn.execute(
                "INSERT INTO tokens (id, secret_hash, created_ms, expires_ms, uses_left, uses_total, labels) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6)",
                params![t.id, &t.secret_hash[..], t.created_ms, t.expires_ms, t.uses, labels_json(&t.labels)],
            )
            .map_err(backend)?;
            Ok(TokenInfo {
                id: t.id,
                created_ms: t.created_ms,
                expires_ms: t.expires_ms,
                uses_left: t.uses,
                uses_total: t.uses,
                labels: t.labels,
            })
        })
        .await
    }

    async fn tokens(&self) -> Result<Vec<TokenInfo>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare(
                    "SELECT id, created_ms, expires_ms, uses_left, uses_total, labels FROM tokens ORDER BY created_ms",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get::<_, String>(5)?,
                    ))
                })
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (id, created_ms, expires_ms, uses_left, uses_total, labels) =
                    row.map_err(backend)?;
                out.push(TokenInfo {
                    id,
                    created_ms,
                    expires_ms,
                    uses_left,
                    uses_total,
                    labels: parse_labels(&labels)?,
                });
            }
            Ok(out)
        })
        .await
    }

    async fn enroll(&self, e: Enrollment) -> Result<Result<DeviceRecord, EnrollRefusal>> {
        let signer = self.signer.clone();
        self.write(move |conn| {
            let (expires_ms, uses_left, labels) = match token(conn, &e.token_id, &e.secret_hash)? {
                Ok(t) => t,
                Err(r) => return Ok(Err(r)),
            };
            let existing: Option<Option<u64>> = conn
                .query_row(
                    "SELECT revoked_ms FROM devices WHERE id = ?1",
                    [e.device.as_str()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            match existing {
                Some(Some(_)) => return Ok(Err(EnrollRefusal::DeviceRevoked)),
                Some(None) => {
                    // The same key again: a retry whose answer was lost. No use consumed.
                    conn.execute(
                        "UPDATE devices SET hostname = ?2, agent_version = ?3 WHERE id = ?1",
                        params![e.device.as_str(), e.hostname, e.agent_version],
                    )
                    .map_err(backend)?;
                    let rec = load_device(conn, &e.device)?
                        .ok_or_else(|| now_err("device vanished inside its own transaction"))?;
                    return Ok(Ok(rec));
                }
                None => {}
            }
            if e.now_ms >= expires_ms {
                return Ok(Err(EnrollRefusal::TokenExpired));
            }
            if uses_left == 0 {
                return Ok(Err(EnrollRefusal::TokenUsedUp));
            }
            if let Some(a) = &e.attestation
                && super::attest::ek_owner(conn, &crate::attest::ek_fingerprint(&a.ek_public))?
                    .is_some()
            {
                return Ok(Err(EnrollRefusal::EkInUse));
            }
            let labels = parse_labels(&labels)?;
            conn.execute(
                "INSERT INTO devices (id, hostname, labels, agent_version, enrolled_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![e.device.as_str(), e.hostname, labels_json(&labels), e.agent_version, e.now_ms],
            )
            .map_err(backend)?;
            conn.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE id = ?1",
                [&e.token_id],
            )
            .map_err(backend)?;
            let assignments = load_assignments(conn)?;
            recompute(conn, &signer, &e.device, &labels, &assignments)?;
            let how = match &e.attestation {
                Some(a) => format!(" ({}-attested)", a.kind),
                None => String::new(),
            };
            insert_hub_event(
                conn,
                &e.device,
                e.now_ms,
                hub_event::ENROLLED,
                &format!("enrolled {} with token {}{how}", e.hostname, e.token_id),
            )?;
            if let Some(a) = &e.attestation {
                super::attest::insert(conn, &e.device, a)?;
            }
            let rec = load_device(conn, &e.device)?
                .ok_or_else(|| now_err("device vanished inside its own transaction"))?;
            Ok(Ok(rec))
        })
        .await
    }

    async fn check_token(
        &self,
        token_id: &str,
        secret_hash: [u8; 32],
        device: &DeviceId,
        now_ms: u64,
    ) -> Result<Result<Labels, EnrollRefusal>> {
        let (token_id, device) = (token_id.to_string(), device.clone());
        self.read(move |conn| {
            let (expires_ms, uses_left, labels) = match token(conn, &token_id, &secret_hash)? {
                Ok(t) => t,
                Err(r) => return Ok(Err(r)),
            };
            let existing: Option<Option<u64>> = conn
                .query_row(
                    "SELECT revoked_ms FROM devices WHERE id = ?1",
                    [device.as_str()],
                    |r| r.get(0),
                )
                .optional()
                .map_err(backend)?;
            match existing {
                Some(Some(_)) => return Ok(Err(EnrollRefusal::DeviceRevoked)),
                // A retry after a lost answer: the token need not have uses left.
                Some(None) => return Ok(Ok(parse_labels(&labels)?)),
                None => {}
            }
            if now_ms >= expires_ms {
                return Ok(Err(EnrollRefusal::TokenExpired));
            }
            if uses_left == 0 {
                return Ok(Err(EnrollRefusal::TokenUsedUp));
            }
            Ok(Ok(parse_labels(&labels)?))
        })
        .await
    }
}
