//! Desired state: assignments by device or selector, each device's document recomputed
//! and re-signed when it changes, and the update (delta or snapshot) an agent needs.

use std::collections::BTreeMap;

use async_trait::async_trait;
use cairn_sync_protocol::message::Labels;
use cairn_sync_protocol::state::{
    MAX_RESOURCES, Resource, ResourceHash, StateUpdate, document_digest,
};
use cairn_sync_protocol::{DeviceId, ResourceName};
use ed25519_dalek::Signature;
use rusqlite::{Connection, OptionalExtension, params};

use crate::desired::{self, Assignment, Target};
use crate::store::{AssignOutcome, Change, Result, StateSigner, StoreError};

use super::{SqliteStore, backend, device_id, now_err, parse_labels};
use crate::store::revisions::{self, UpdatePlan, tombstone_cutoff};
use crate::store::{DesiredState, MAX_DOCUMENT_BYTES};

pub(super) fn load_assignments(conn: &Connection) -> Result<Vec<Assignment>> {
    let mut stmt = conn
        .prepare_cached("SELECT id, target_kind, target, name, body FROM assignments")
        .map_err(backend)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Vec<u8>>(4)?,
            ))
        })
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (order, kind, key, name, body) = row.map_err(backend)?;
        out.push(Assignment {
            order,
            target: Target::from_kind_and_key(&kind, &key)
                .ok_or_else(|| now_err(format!("assignment {order}: bad target {kind} {key}")))?,
            name: ResourceName::new(&name).map_err(now_err)?,
            resource: postcard::from_bytes(&body).map_err(now_err)?,
        });
    }
    Ok(out)
}

/// Brings one device's stored document in line with the assignments; signs and returns
/// the new revision if anything changed.
pub(super) fn recompute(
    conn: &Connection,
    signer: &StateSigner,
    device: &DeviceId,
    labels: &Labels,
    assignments: &[Assignment],
) -> Result<Option<u64>> {
    let desired = desired::effective(device, labels, assignments);
    check_limits(device, &desired)?;
    let hashes: BTreeMap<&ResourceName, ResourceHash> =
        desired.iter().map(|(n, r)| (n, r.hash())).collect();
    let mut current: BTreeMap<String, [u8; 32]> = BTreeMap::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT name, hash FROM resources WHERE device = ?1")
            .map_err(backend)?;
        let rows = stmt
            .query_map([device.as_str()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(backend)?;
        for row in rows {
            let (n, h) = row.map_err(backend)?;
            // A hash of another length never equals a spec's: the resource is rewritten.
            current.insert(n, h.try_into().unwrap_or([0; 32]));
        }
    }
    let wanted: BTreeMap<String, [u8; 32]> = hashes
        .iter()
        .map(|(n, h)| (n.as_str().to_string(), h.0))
        .collect();
    let Some(diff) = revisions::diff(&current, &wanted) else {
        return Ok(None);
    };
    let changed: Vec<(&ResourceName, &Resource, ResourceHash)> = desired
        .iter()
        .filter(|(n, _)| diff.changed.iter().any(|c| c == n.as_str()))
        .map(|(n, r)| (n, r, hashes[n]))
        .collect();
    let removed = diff.removed;
    let (revision, floor): (u64, u64) = conn
        .query_row(
            "SELECT revision, tomb_floor FROM devices WHERE id = ?1",
            [device.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .map_err(backend)?;
    let new_rev = revision + 1;
    for (n, r, h) in &changed {
        let body = postcard::to_allocvec(r).map_err(now_err)?;
        conn.prepare_cached(
            "INSERT OR REPLACE INTO resources (device, name, hash, body, revision) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .and_then(|mut s| s.execute(params![device.as_str(), n.as_str(), &h.0[..], body, new_rev]))
        .map_err(backend)?;
        conn.prepare_cached("DELETE FROM tombstones WHERE device = ?1 AND name = ?2")
            .and_then(|mut s| s.execute(params![device.as_str(), n.as_str()]))
            .map_err(backend)?;
    }
    for n in &removed {
        conn.prepare_cached("DELETE FROM resources WHERE device = ?1 AND name = ?2")
            .and_then(|mut s| s.execute(params![device.as_str(), n]))
            .map_err(backend)?;
        conn.prepare_cached(
            "INSERT OR REPLACE INTO tombstones (device, name, revision) VALUES (?1, ?2, ?3)",
        )
        .and_then(|mut s| s.execute(params![device.as_str(), n, new_rev]))
        .map_err(backend)?;
    }
    let mut new_floor = floor;
    if let Some(cutoff) = tombstone_cutoff(new_rev) {
        let dropped = conn
            .execute(
                "DELETE FROM tombstones WHERE device = ?1 AND revision <= ?2",
                params![device.as_str(), cutoff],
            )
            .map_err(backend)?;
        if dropped > 0 {
            new_floor = new_floor.max(cutoff);
        }
    }
    let digest = document_digest(hashes.iter().map(|(n, h)| (*n, *h)));
    let sig = signer.sign(device, new_rev, &digest);
    conn.execute(
        "UPDATE devices SET revision = ?2, signature = ?3, tomb_floor = ?4 WHERE id = ?1",
        params![device.as_str(), new_rev, &sig.to_bytes()[..], new_floor],
    )
    .map_err(backend)?;
    Ok(Some(new_rev))
}

/// Refuses documents the protocol could not carry or the agent would refuse.
pub(super) fn check_limits(
    device: &DeviceId,
    doc: &BTreeMap<ResourceName, Resource>,
) -> Result<()> {
    if doc.len() > MAX_RESOURCES {
        return Err(StoreError::Invalid(format!(
            "device {device} would have {} resources; the limit is {MAX_RESOURCES}",
            doc.len()
        )));
    }
    let mut bytes = 0usize;
    let mut paths: BTreeMap<String, &ResourceName> = BTreeMap::new();
    for (name, res) in doc {
        let Resource::File(f) = res else {
            bytes += postcard::to_allocvec(res).map_or(0, |b| b.len()) + name.as_str().len();
            continue;
        };
        bytes += f.content.len() + f.path.as_str().len() + name.as_str().len() + 16;
        let path = f.path.as_str().trim_start_matches('/').to_string();
        if let Some(other) = paths.insert(path.clone(), name) {
            return Err(StoreError::Invalid(format!(
                "device {device} would get resources {other} and {name} for the same file {path}; unset one of them"
            )));
        }
    }
    if bytes > MAX_DOCUMENT_BYTES {
        return Err(StoreError::Invalid(format!(
            "device {device}'s desired state would be {bytes} bytes; the limit is {MAX_DOCUMENT_BYTES}"
        )));
    }
    Ok(())
}

/// All devices (not revoked) with their labels.
pub(super) fn live_devices(conn: &Connection) -> Result<Vec<(DeviceId, Labels)>> {
    let mut stmt = conn
        .prepare_cached("SELECT id, labels FROM devices WHERE revoked_ms IS NULL")
        .map_err(backend)?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
        .map_err(backend)?;
    let mut out = Vec::new();
    for row in rows {
        let (id, labels) = row.map_err(backend)?;
        out.push((device_id(id)?, parse_labels(&labels)?));
    }
    Ok(out)
}

pub(super) fn read_update(
    conn: &Connection,
    id: &DeviceId,
    held: Option<u64>,
) -> Result<Option<StateUpdate>> {
    let Some((revision, sig, floor)) = conn
        .query_row(
            "SELECT revision, signature, tomb_floor FROM devices WHERE id = ?1",
            [id.as_str()],
            |r| {
                Ok((
                    r.get::<_, u64>(0)?,
                    r.get::<_, Option<Vec<u8>>>(1)?,
                    r.get::<_, u64>(2)?,
                ))
            },
        )
        .optional()
        .map_err(backend)?
    else {
        return Ok(None);
    };
    let Some(sig) = sig else {
        return Ok(None); // no revision yet
    };
    let plan = UpdatePlan::for_agent(held, revision, floor);
    if plan == UpdatePlan::UpToDate {
        return Ok(None);
    }
    let signature = Signature::from_slice(&sig).map_err(now_err)?;
    let delta_base = plan.base();
    let mut upserts = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, body FROM resources WHERE device = ?1 AND revision > ?2 ORDER BY name",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![id.as_str(), plan.since()], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
            })
            .map_err(backend)?;
        for row in rows {
            let (n, body) = row.map_err(backend)?;
            upserts.push((
                ResourceName::new(&n).map_err(now_err)?,
                postcard::from_bytes(&body).map_err(now_err)?,
            ));
        }
    }
    let mut removals = Vec::new();
    if let Some(base) = delta_base {
        let mut stmt = conn
            .prepare_cached(
                "SELECT name FROM tombstones WHERE device = ?1 AND revision > ?2 ORDER BY name",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![id.as_str(), base], |r| r.get::<_, String>(0))
            .map_err(backend)?;
        for row in rows {
            removals.push(ResourceName::new(&row.map_err(backend)?).map_err(now_err)?);
        }
    }
    Ok(Some(StateUpdate {
        device: id.clone(),
        base_revision: delta_base,
        revision,
        upserts,
        removals,
        signature,
    }))
}

/// The release id and version of an OS resource.
pub(super) fn os_release(res: &Resource) -> Option<(String, String)> {
    let Resource::Os(o) = res else { return None };
    let version = o
        .manifest
        .decode_unverified()
        .map(|m| m.version.to_string())
        .unwrap_or_default();
    Some((o.manifest.id().to_hex(), version))
}

#[async_trait]
impl DesiredState for SqliteStore {
    async fn assign(&self, target: Target, change: Change, now_ms: u64) -> Result<AssignOutcome> {
        let signer = self.signer.clone();
        self.write(move |conn| {
            let (kind, key) = target.kind_and_key();
            match &change {
                Change::Set(name, resource) => {
                    let body = postcard::to_allocvec(resource).map_err(now_err)?;
                    conn.execute(
                        "DELETE FROM assignments WHERE target_kind = ?1 AND target = ?2 AND name = ?3",
                        params![kind, key, name.as_str()],
                    )
                    .map_err(backend)?;
                    conn.execute(
                        "INSERT INTO assignments (target_kind, target, name, body, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
                        params![kind, key, name.as_str(), body, now_ms],
                    )
                    .map_err(backend)?;
                }
                Change::Unset(name) => {
                    conn.execute(
                        "DELETE FROM assignments WHERE target_kind = ?1 AND target = ?2 AND name = ?3",
                        params![kind, key, name.as_str()],
                    )
                    .map_err(backend)?;
                }
            }
            let assignments = load_assignments(conn)?;
            let mut out = AssignOutcome::default();
            for (id, labels) in live_devices(conn)? {
                if !target.matches(&id, &labels) {
                    continue;
                }
                out.matched += 1;
                if let Some(rev) = recompute(conn, &signer, &id, &labels, &assignments)? {
                    out.changed.push((id, rev));
                }
            }
            Ok(out)
        })
        .await
    }

    async fn state_update(&self, id: &DeviceId, held: u64) -> Result<Option<StateUpdate>> {
        let id = id.clone();
        self.read(move |conn| read_update(conn, &id, Some(held)))
            .await
    }

    async fn state_snapshot(&self, id: &DeviceId) -> Result<Option<StateUpdate>> {
        let id = id.clone();
        self.read(move |conn| read_update(conn, &id, None)).await
    }

    async fn state_stored(&self, id: &DeviceId, revision: u64) -> Result<()> {
        let id = id.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE devices SET stored_revision = MAX(stored_revision, ?2) WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id.as_str(), revision]))
            .map_err(backend)?;
            Ok(())
        })
        .await
    }
}
