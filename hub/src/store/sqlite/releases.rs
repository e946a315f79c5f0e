//! Release keys, releases, and the desired OS of every device.

use async_trait::async_trait;
use cairn_sync_protocol::DeviceId;
use cairn_sync_protocol::state::Resource;
use rusqlite::{Connection, params};

use crate::store::{OS_RESOURCE, PayloadInfo, PutRelease, ReleaseKeyRecord, ReleaseRecord, Result};

use super::state::{load_assignments, os_release};
use super::{SqliteStore, backend, device_id, now_err};
use crate::store::Releases;

pub(super) const RELEASE_COLUMNS: &str = "id, version, arch, board, created_ms, pushed_ms, key_id, bundle_len, payloads, manifest, header_len";

pub(super) fn release_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(ReleaseRecord, String)> {
    Ok((
        ReleaseRecord {
            id: r.get(0)?,
            version: r.get(1)?,
            arch: r.get(2)?,
            board: r.get(3)?,
            created_ms: r.get(4)?,
            pushed_ms: r.get(5)?,
            key_id: r.get(6)?,
            bundle_len: r.get(7)?,
            payloads: Vec::new(),
            manifest: r.get(9)?,
            header_len: r.get(10)?,
        },
        r.get(8)?,
    ))
}

pub(super) fn load_releases(
    conn: &Connection,
    filter: &str,
    arg: &str,
) -> Result<Vec<ReleaseRecord>> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {RELEASE_COLUMNS} FROM releases WHERE {filter}"
        ))
        .map_err(backend)?;
    let rows = stmt.query_map([arg], release_row).map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (mut rec, payloads) = row.map_err(backend)?;
        rec.payloads = serde_json::from_str::<Vec<PayloadInfo>>(&payloads).map_err(now_err)?;
        out.push(rec);
    }
    Ok(out)
}

#[async_trait]
impl Releases for SqliteStore {
    async fn add_release_key(&self, key: ReleaseKeyRecord) -> Result<bool> {
        self.write(move |conn| {
            let n = conn
                .execute(
                    "INSERT OR IGNORE INTO release_keys (key_id, public_key, name, added_ms) VALUES (?1, ?2, ?3, ?4)",
                    params![key.key_id, key.public_key, key.name, key.added_ms],
                )
                .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn release_keys(&self) -> Result<Vec<ReleaseKeyRecord>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT key_id, public_key, name, added_ms FROM release_keys ORDER BY added_ms, key_id",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([], |r| {
                    Ok(ReleaseKeyRecord {
                        key_id: r.get(0)?,
                        public_key: r.get(1)?,
                        name: r.get(2)?,
                        added_ms: r.get(3)?,
                    })
                })
                .map_err(backend)?;
            rows.collect::<rusqlite::Result<Vec<_>>>().map_err(backend)
        })
        .await
    }

    async fn remove_release_key(&self, key_id: &str) -> Result<bool> {
        let key_id = key_id.to_string();
        self.write(move |conn| {
            let n = conn
                .execute("DELETE FROM release_keys WHERE key_id = ?1", [key_id])
                .map_err(backend)?;
            Ok(n > 0)
        })
        .await
    }

    async fn put_release(&self, rec: ReleaseRecord) -> Result<PutRelease> {
        self.write(move |conn| {
            if let Some(existing) = load_releases(conn, "version = ?1", &rec.version)?.pop() {
                return Ok(if existing.id == rec.id {
                    PutRelease::AlreadyPresent
                } else {
                    PutRelease::Conflict(existing)
                });
            }
            if let Some(existing) = load_releases(conn, "id = ?1", &rec.id)?.pop() {
                // Same manifest under another version string cannot happen (the
                // version is inside the manifest); treat it as the same release.
                let _ = existing;
                return Ok(PutRelease::AlreadyPresent);
            }
            let payloads = serde_json::to_string(&rec.payloads).map_err(now_err)?;
            conn.execute(
                &format!("INSERT INTO releases ({RELEASE_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)"),
                params![
                    rec.id,
                    rec.version,
                    rec.arch,
                    rec.board,
                    rec.created_ms,
                    rec.pushed_ms,
                    rec.key_id,
                    rec.bundle_len,
                    payloads,
                    rec.manifest,
                    rec.header_len
                ],
            )
            .map_err(backend)?;
            Ok(PutRelease::Stored)
        })
        .await
    }

    async fn releases(&self) -> Result<Vec<ReleaseRecord>> {
        self.read(|conn| load_releases(conn, "?1 = ?1", "")).await
    }

    async fn release(&self, version: &str) -> Result<Option<ReleaseRecord>> {
        let v = version.to_string();
        self.read(move |conn| Ok(load_releases(conn, "version = ?1", &v)?.pop()))
            .await
    }

    async fn release_by_id(&self, id: &str) -> Result<Option<ReleaseRecord>> {
        let id = id.to_string();
        self.read(move |conn| Ok(load_releases(conn, "id = ?1", &id)?.pop()))
            .await
    }

    async fn delete_release(&self, version: &str) -> Result<Result<Option<ReleaseRecord>, String>> {
        let v = version.to_string();
        self.write(move |conn| {
            let Some(rec) = load_releases(conn, "version = ?1", &v)?.pop() else {
                return Ok(Ok(None));
            };
            let users: Vec<String> = load_assignments(conn)?
                .iter()
                .filter(|a| os_release(&a.resource).is_some_and(|(id, _)| id == rec.id))
                .map(|a| a.target.to_string())
                .collect();
            if !users.is_empty() {
                return Ok(Err(format!(
                    "release {v} is still assigned ({}); assign another release or `cairn-hub os unset` those targets first",
                    users.join(", ")
                )));
            }
            conn.execute("DELETE FROM releases WHERE id = ?1", [&rec.id])
                .map_err(backend)?;
            Ok(Ok(Some(rec)))
        })
        .await
    }

    async fn desired_os(&self) -> Result<Vec<(DeviceId, String, String)>> {
        self.read(|conn| {
            let mut stmt = conn
                .prepare_cached(
                    "SELECT device, body FROM resources WHERE name = ?1 ORDER BY device",
                )
                .map_err(backend)?;
            let rows = stmt
                .query_map([OS_RESOURCE], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
                })
                .map_err(backend)?;
            let mut out = Vec::new();
            for row in rows {
                let (device, body) = row.map_err(backend)?;
                let res: Resource = postcard::from_bytes(&body).map_err(now_err)?;
                if let Some((id, version)) = os_release(&res) {
                    out.push((device_id(device)?, id, version));
                }
            }
            Ok(out)
        })
        .await
    }
}
