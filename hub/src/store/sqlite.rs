//! The embedded store: one SQLite file in WAL mode.
//!
//! Writes go through a single writer thread that takes every job queued at that moment
//! and runs them in one transaction (group commit), each job inside its own savepoint so
//! that one failing job does not undo the others. A job's caller gets its result only
//! after the `COMMIT` returned, with `synchronous=FULL`: acknowledged means on disk.
//! Reads run on a small pool of read-only connections, which WAL lets proceed while the
//! writer works.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use cairn_sync_protocol::frame;
use cairn_sync_protocol::message::{Labels, Report, ReportBody};
use cairn_sync_protocol::state::{
    MAX_RESOURCES, Resource, ResourceHash, StateUpdate, document_digest,
};
use cairn_sync_protocol::{DeviceId, ResourceName};
use ed25519_dalek::Signature;
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    AssignOutcome, AttestOutcome, AttestRecord, Change, DeviceRecord, EnrollRefusal, Enrollment,
    EventFilter, EventRecord, LabelCount, NewToken, OS_RESOURCE, PayloadInfo, PutRelease,
    ReleaseKeyRecord, ReleaseRecord, Result, StateSigner, Store, StoreError, TokenInfo,
    UPGRADE_EVENT_PREFIX, UpgradeStatus, hub_event,
};
use crate::attest::{AttestPolicy, MeasurementSet};
use crate::desired::{self, Assignment, Target};

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 1024;
/// Tombstones of removed resources are kept for this many revisions; an agent further
/// behind gets a full snapshot.
const TOMBSTONE_REVISIONS: u64 = 128;
/// Reader threads, each with its own read-only connection.
const READ_POOL: usize = 4;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    secret_hash BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    uses_left INTEGER NOT NULL,
    uses_total INTEGER NOT NULL,
    labels TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS devices (
    id TEXT PRIMARY KEY,
    hostname TEXT NOT NULL,
    labels TEXT NOT NULL,
    agent_version TEXT NOT NULL,
    enrolled_ms INTEGER NOT NULL,
    revoked_ms INTEGER,
    online INTEGER NOT NULL DEFAULT 0,
    online_session INTEGER NOT NULL DEFAULT 0,
    last_seen_ms INTEGER,
    revision INTEGER NOT NULL DEFAULT 0,
    signature BLOB,
    tomb_floor INTEGER NOT NULL DEFAULT 0,
    stored_revision INTEGER NOT NULL DEFAULT 0,
    applied_revision INTEGER NOT NULL DEFAULT 0,
    failing INTEGER NOT NULL DEFAULT 0,
    reports_acked INTEGER NOT NULL DEFAULT 0,
    applied_ms INTEGER,
    online_since_ms INTEGER
);
CREATE TABLE IF NOT EXISTS resources (
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    hash BLOB NOT NULL,
    body BLOB NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (device, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tombstones (
    device TEXT NOT NULL,
    name TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (device, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS assignments (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    target_kind TEXT NOT NULL,
    target TEXT NOT NULL,
    name TEXT NOT NULL,
    body BLOB NOT NULL,
    created_ms INTEGER NOT NULL,
    UNIQUE (target_kind, target, name)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    device TEXT NOT NULL,
    seq INTEGER,
    at_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    resource TEXT,
    revision INTEGER,
    message TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_by_device ON events (device, id);
CREATE UNIQUE INDEX IF NOT EXISTS events_once ON events (device, seq) WHERE seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS release_keys (
    key_id TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    name TEXT NOT NULL,
    added_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS releases (
    id TEXT PRIMARY KEY,
    version TEXT NOT NULL UNIQUE,
    arch TEXT NOT NULL,
    board TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    pushed_ms INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    bundle_len INTEGER NOT NULL,
    payloads TEXT NOT NULL,
    manifest BLOB NOT NULL,
    header_len INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS upgrades (
    device TEXT PRIMARY KEY,
    version TEXT NOT NULL,
    phase TEXT NOT NULL,
    target_slot TEXT NOT NULL,
    booted_slot TEXT NOT NULL,
    committed_version TEXT NOT NULL,
    bytes_done INTEGER NOT NULL,
    bytes_total INTEGER NOT NULL,
    bytes_downloaded INTEGER NOT NULL,
    error TEXT,
    at_ms INTEGER NOT NULL,
    received_ms INTEGER NOT NULL
) WITHOUT ROWID;
"#;

type Completion = Box<dyn FnOnce(std::result::Result<(), String>) + Send>;
/// A write job: runs on the writer's connection inside a transaction, or is told (with
/// `None`) that no transaction could be opened.
type Job = Box<dyn FnOnce(Option<&Connection>) -> (bool, Completion) + Send>;
/// A read job: runs on a reader thread's connection, or is told why there is none.
type ReadJob = Box<dyn FnOnce(Result<&Connection>) + Send>;

/// SQLite-backed [`Store`].
pub struct SqliteStore {
    jobs: mpsc::Sender<Job>,
    /// Reads for the reader threads. Dedicated threads, not `spawn_blocking`: a burst of
    /// reads (a change pushed to every device) spawned up to 512 blocking threads, each
    /// opening a connection, and every thread that allocated left a glibc arena of
    /// freed memory behind (10 arenas of ~6.5 MB each at 3,000 agents: idle RSS 194 -> 151 MB).
    reads: std::sync::mpsc::Sender<ReadJob>,
    signer: StateSigner,
    events: watch::Receiver<u64>,
}

pub(super) fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

fn open_conn(path: &Path, read_only: bool) -> Result<Connection> {
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let open_err = |e: rusqlite::Error| StoreError::Open {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    let conn = Connection::open_with_flags(path, flags).map_err(open_err)?;
    conn.busy_timeout(Duration::from_secs(10))
        .map_err(open_err)?;
    if !read_only {
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA foreign_keys=ON;",
        )
        .map_err(open_err)?;
    }
    Ok(conn)
}

/// Brings a database made by an older hub up to [`SCHEMA`]: columns added since are
/// added here (`CREATE TABLE IF NOT EXISTS` leaves existing tables alone).
fn migrate(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(super::attest_sql::SCHEMA)?;
    for (column, decl) in [("applied_ms", "INTEGER"), ("online_since_ms", "INTEGER")]
        .into_iter()
        .chain(super::attest_sql::DEVICE_COLUMNS_ADDED)
    {
        let present: bool = conn.query_row(
            "SELECT COUNT(*) FROM pragma_table_info('devices') WHERE name = ?1",
            [column],
            |r| r.get(0),
        )?;
        if !present {
            conn.execute(
                &format!("ALTER TABLE devices ADD COLUMN {column} {decl}"),
                [],
            )?;
        }
    }
    Ok(())
}

fn now_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`. Devices recorded as online
    /// are marked offline: no session survives a hub restart.
    pub fn open(path: &Path, signer: StateSigner) -> Result<Self> {
        let writer = open_conn(path, false)?;
        writer.execute_batch(SCHEMA).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: format!("creating schema: {e}"),
        })?;
        migrate(&writer).map_err(|e| StoreError::Open {
            path: path.display().to_string(),
            reason: format!("upgrading schema: {e}"),
        })?;
        writer
            .execute("UPDATE devices SET online = 0 WHERE online = 1", [])
            .map_err(backend)?;
        let last_event: u64 = writer
            .query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| r.get(0))
            .map_err(backend)?;
        let (events_tx, events_rx) = watch::channel(last_event);
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(8192);
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer_loop(writer, jobs_rx, events_tx))
            .map_err(|e| StoreError::Backend(format!("starting writer thread: {e}")))?;
        let (reads_tx, reads_rx) = std::sync::mpsc::channel::<ReadJob>();
        let reads_rx = Arc::new(Mutex::new(reads_rx));
        for i in 0..READ_POOL {
            let (rx, path) = (reads_rx.clone(), path.to_path_buf());
            std::thread::Builder::new()
                .name(format!("store-reader-{i}"))
                .spawn(move || reader_loop(&path, &rx))
                .map_err(|e| StoreError::Backend(format!("starting reader thread: {e}")))?;
        }
        Ok(Self {
            jobs: jobs_tx,
            reads: reads_tx,
            signer,
            events: events_rx,
        })
    }

    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn: Option<&Connection>| {
            let result = match conn {
                Some(c) => f(c),
                None => Err(StoreError::Backend("could not open a transaction".into())),
            };
            let ok = result.is_ok();
            let completion: Completion = Box::new(move |commit| {
                let out = match commit {
                    Ok(()) => result,
                    Err(e) => Err(StoreError::Backend(format!("commit failed: {e}"))),
                };
                let _ = tx.send(out);
            });
            (ok, completion)
        });
        self.jobs.send(job).await.map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: ReadJob = Box::new(move |conn: Result<&Connection>| {
            let _ = tx.send(conn.and_then(f));
        });
        self.reads.send(job).map_err(|_| StoreError::Closed)?;
        rx.await.map_err(|_| StoreError::Closed)?
    }
}

/// A reader thread: runs read jobs on its own connection, opened at the first job (and
/// again after a failed open), until the store is dropped.
fn reader_loop(path: &Path, jobs: &Mutex<std::sync::mpsc::Receiver<ReadJob>>) {
    let mut conn: Option<Connection> = None;
    loop {
        let job = match jobs.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let c = match conn.take() {
            Some(c) => Ok(c),
            None => open_conn(path, true),
        };
        match c {
            Ok(c) => {
                job(Ok(&c));
                conn = Some(c);
            }
            Err(e) => job(Err(e)),
        }
    }
}

fn writer_loop(conn: Connection, mut jobs: mpsc::Receiver<Job>, events: watch::Sender<u64>) {
    while let Some(first) = jobs.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let msg = e.to_string();
            for job in batch {
                let (_, done) = job(None);
                done(Err(msg.clone()));
            }
            continue;
        }
        let mut completions = Vec::with_capacity(batch.len());
        for job in batch {
            let sp = conn.execute_batch("SAVEPOINT job");
            let (ok, done) = job(sp.is_ok().then_some(&conn));
            let end = if ok && sp.is_ok() {
                conn.execute_batch("RELEASE job")
            } else {
                conn.execute_batch("ROLLBACK TO job; RELEASE job")
            };
            if let Err(e) = end {
                tracing::error!(error = %e, "ending savepoint");
            }
            completions.push(done);
        }
        let commit = conn.execute_batch("COMMIT").map_err(|e| {
            let _ = conn.execute_batch("ROLLBACK");
            e.to_string()
        });
        if let Err(e) = &commit {
            tracing::error!(error = %e, "store commit failed");
        }
        for done in completions {
            done(commit.clone());
        }
        if let Ok(max) = conn.query_row("SELECT COALESCE(MAX(id), 0) FROM events", [], |r| {
            r.get::<_, u64>(0)
        }) {
            events.send_if_modified(|v| {
                let changed = *v != max;
                *v = max;
                changed
            });
        }
    }
}

fn labels_json(labels: &Labels) -> String {
    serde_json::to_string(labels).unwrap_or_else(|_| "{}".into())
}

fn parse_labels(s: &str) -> Result<Labels> {
    serde_json::from_str(s).map_err(now_err)
}

fn device_id(s: String) -> Result<DeviceId> {
    DeviceId::new(&s).map_err(now_err)
}

const DEVICE_COLUMNS: &str = "id, hostname, labels, agent_version, enrolled_ms, revoked_ms, online, \
     last_seen_ms, revision, stored_revision, applied_revision, failing, reports_acked, applied_ms, online_since_ms, \
     attest_kind, attest_status, attest_reason, \
     u.version, u.phase, u.target_slot, u.booted_slot, u.committed_version, u.bytes_done, u.bytes_total, \
     u.bytes_downloaded, u.error, u.at_ms";

/// The device table with each device's latest upgrade status (tables releases and
/// upgrades came with OS upgrades; older databases get them at open).
const DEVICE_FROM: &str = "devices LEFT JOIN upgrades u ON u.device = devices.id";

fn device_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawDevice> {
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
            Some(version) => Some(super::UpgradeStatus {
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

struct RawDevice {
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
    upgrade: Option<super::UpgradeStatus>,
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

fn load_device(conn: &Connection, id: &DeviceId) -> Result<Option<DeviceRecord>> {
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

fn load_assignments(conn: &Connection) -> Result<Vec<Assignment>> {
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
fn recompute(
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
    let mut current: HashMap<String, Vec<u8>> = HashMap::new();
    {
        let mut stmt = conn
            .prepare_cached("SELECT name, hash FROM resources WHERE device = ?1")
            .map_err(backend)?;
        let rows = stmt
            .query_map([device.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(backend)?;
        for row in rows {
            let (n, h) = row.map_err(backend)?;
            current.insert(n, h);
        }
    }
    let changed: Vec<(&ResourceName, &Resource, ResourceHash)> = desired
        .iter()
        .filter(|(n, _)| current.get(n.as_str()).map(Vec::as_slice) != Some(&hashes[n].0[..]))
        .map(|(n, r)| (n, r, hashes[n]))
        .collect();
    let removed: Vec<String> = current
        .keys()
        .filter(|n| !desired.keys().any(|d| d.as_str() == n.as_str()))
        .cloned()
        .collect();
    if changed.is_empty() && removed.is_empty() {
        return Ok(None);
    }
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
    if new_rev > TOMBSTONE_REVISIONS {
        let cutoff = new_rev - TOMBSTONE_REVISIONS;
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

/// Most bytes of resources in one device's document, leaving room in a frame for the
/// names, the signature and the framing.
const MAX_DOCUMENT_BYTES: usize = frame::DEFAULT_MAX_FRAME_LEN - 256 * 1024;

/// Refuses documents the protocol could not carry or the agent would refuse.
fn check_limits(device: &DeviceId, doc: &BTreeMap<ResourceName, Resource>) -> Result<()> {
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

/// A token's expiry, uses left and labels, if it exists and `secret_hash` is its
/// secret's (compared in constant time).
fn token(
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

/// All devices (not revoked) with their labels.
fn live_devices(conn: &Connection) -> Result<Vec<(DeviceId, Labels)>> {
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

fn read_update(conn: &Connection, id: &DeviceId, held: Option<u64>) -> Result<Option<StateUpdate>> {
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
    if let Some(h) = held
        && h >= revision
    {
        return Ok(None);
    }
    let signature = Signature::from_slice(&sig).map_err(now_err)?;
    let delta_base = held.filter(|&h| h > 0 && h >= floor);
    let mut upserts = Vec::new();
    {
        let mut stmt = conn
            .prepare_cached(
                "SELECT name, body FROM resources WHERE device = ?1 AND revision > ?2 ORDER BY name",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![id.as_str(), delta_base.unwrap_or(0)], |r| {
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

/// Keeps a device's latest upgrade status and records the report as an event
/// (`upgrade.<phase>`), under the report's sequence number.
fn record_upgrade(
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

const RELEASE_COLUMNS: &str = "id, version, arch, board, created_ms, pushed_ms, key_id, bundle_len, payloads, manifest, header_len";

fn release_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(ReleaseRecord, String)> {
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

fn load_releases(conn: &Connection, filter: &str, arg: &str) -> Result<Vec<ReleaseRecord>> {
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

/// The release id and version of an OS resource.
fn os_release(res: &Resource) -> Option<(String, String)> {
    let Resource::Os(o) = res else { return None };
    let version = o
        .manifest
        .decode_unverified()
        .map(|m| m.version.to_string())
        .unwrap_or_default();
    Some((o.manifest.id().to_hex(), version))
}

#[async_trait]
impl Store for SqliteStore {
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
                && super::attest_sql::ek_owner(conn, &crate::attest::ek_fingerprint(&a.ek_public))?
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
                super::attest_sql::insert(conn, &e.device, a)?;
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

    async fn ek_owner(&self, ek_sha256: &str) -> Result<Option<DeviceId>> {
        let ek = ek_sha256.to_string();
        self.read(move |conn| super::attest_sql::ek_owner(conn, &ek))
            .await
    }

    async fn attestation(&self, id: &DeviceId) -> Result<Option<AttestRecord>> {
        let id = id.clone();
        self.read(move |conn| super::attest_sql::load(conn, &id))
            .await
    }

    async fn record_attestation(&self, id: &DeviceId, outcome: AttestOutcome) -> Result<()> {
        let id = id.clone();
        self.write(move |conn| super::attest_sql::record(conn, &id, &outcome))
            .await
    }

    async fn accept_measurements(
        &self,
        id: &DeviceId,
        seen_verified_ms: Option<u64>,
        now_ms: u64,
    ) -> Result<Result<AttestRecord, String>> {
        let id = id.clone();
        self.write(move |conn| super::attest_sql::accept(conn, &id, seen_verified_ms, now_ms))
            .await
    }

    async fn expect_measurements(&self, id: &DeviceId, set: MeasurementSet) -> Result<bool> {
        let id = id.clone();
        self.write(move |conn| super::attest_sql::expect(conn, &id, set))
            .await
    }

    async fn retire_measurements(&self, id: &DeviceId, source: &str) -> Result<usize> {
        let (id, source) = (id.clone(), source.to_string());
        self.write(move |conn| super::attest_sql::retire(conn, &id, &source))
            .await
    }

    async fn put_policy(&self, policy: AttestPolicy) -> Result<()> {
        self.write(move |conn| super::attest_sql::put_policy(conn, &policy))
            .await
    }

    async fn delete_policy(&self, name: &str) -> Result<bool> {
        let name = name.to_string();
        self.write(move |conn| super::attest_sql::delete_policy(conn, &name))
            .await
    }

    async fn policies(&self) -> Result<Vec<AttestPolicy>> {
        self.read(super::attest_sql::policies).await
    }

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

    async fn record_reports(
        &self,
        id: &DeviceId,
        reports: Vec<Report>,
        now_ms: u64,
    ) -> Result<u64> {
        let id = id.clone();
        self.write(move |conn| {
            let mut acked: u64 = conn
                .query_row(
                    "SELECT reports_acked FROM devices WHERE id = ?1",
                    [id.as_str()],
                    |r| r.get(0),
                )
                .map_err(backend)?;
            for r in reports {
                if r.seq <= acked {
                    continue;
                }
                if r.seq != acked + 1 {
                    break;
                }
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
                acked = r.seq;
            }
            conn.prepare_cached(
                "UPDATE devices SET reports_acked = ?2, last_seen_ms = ?3 WHERE id = ?1",
            )
            .and_then(|mut s| s.execute(params![id.as_str(), acked, now_ms]))
            .map_err(backend)?;
            Ok(acked)
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
            if to <= acked {
                return Ok(acked);
            }
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

    fn event_watch(&self) -> watch::Receiver<u64> {
        self.events.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_sync_protocol::Text;
    use cairn_sync_protocol::message::{Event, EventKind, Status};
    use cairn_sync_protocol::state::FileResource;
    use ed25519_dalek::SigningKey;

    fn store(dir: &Path) -> (SqliteStore, SigningKey) {
        let key = SigningKey::from_bytes(&[9; 32]);
        (
            SqliteStore::open(&dir.join("hub.db"), StateSigner::new(key.clone())).unwrap(),
            key,
        )
    }

    fn file(c: &str) -> Resource {
        Resource::File(FileResource {
            path: Text::new(format!("etc/{c}")).unwrap(),
            content: c.into(),
            mode: 0o644,
            uid: None,
            gid: None,
        })
    }

    async fn enrolled(s: &SqliteStore, id: &str, labels: &str) -> DeviceId {
        let t = NewToken {
            id: format!("t-{id}"),
            secret_hash: [1; 32],
            created_ms: 0,
            expires_ms: 1000,
            uses: 1,
            labels: desired::parse_labels(labels).unwrap(),
        };
        s.create_token(t).await.unwrap();
        let d = DeviceId::new(id).unwrap();
        s.enroll(Enrollment {
            token_id: format!("t-{id}"),
            secret_hash: [1; 32],
            device: d.clone(),
            hostname: "h".into(),
            agent_version: "v".into(),
            now_ms: 5,
            attestation: None,
        })
        .await
        .unwrap()
        .unwrap();
        d
    }

    #[tokio::test]
    async fn tokens_are_checked_and_consumed() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = store(dir.path());
        let d = enrolled(&s, "dev-a", "site=paris").await;
        let again = Enrollment {
            token_id: "t-dev-a".into(),
            secret_hash: [1; 32],
            device: DeviceId::new("dev-b").unwrap(),
            hostname: "h".into(),
            agent_version: "v".into(),
            now_ms: 6,
            attestation: None,
        };
        assert_eq!(
            s.enroll(again.clone()).await.unwrap().unwrap_err(),
            EnrollRefusal::TokenUsedUp
        );
        let wrong = Enrollment {
            secret_hash: [2; 32],
            ..again.clone()
        };
        assert_eq!(
            s.enroll(wrong).await.unwrap().unwrap_err(),
            EnrollRefusal::UnknownToken
        );
        assert_eq!(s.device(&d).await.unwrap().unwrap().labels.len(), 1);
        // The same key again (a retry after a lost answer) succeeds without a use.
        let retry = Enrollment {
            device: d.clone(),
            ..again
        };
        assert_eq!(s.enroll(retry).await.unwrap().unwrap().id, d);
        assert_eq!(s.tokens().await.unwrap()[0].uses_left, 0);
    }

    #[tokio::test]
    async fn assignments_produce_signed_deltas_and_snapshots() {
        let dir = tempfile::tempdir().unwrap();
        let (s, key) = store(dir.path());
        let a = enrolled(&s, "dev-a", "site=paris").await;
        let b = enrolled(&s, "dev-b", "site=rome").await;
        let sel = Target::Selector("site=paris".parse().unwrap());
        let n1 = ResourceName::new("one").unwrap();
        let n2 = ResourceName::new("two").unwrap();
        let out = s
            .assign(sel.clone(), Change::Set(n1.clone(), file("1")), 1)
            .await
            .unwrap();
        assert_eq!(out.matched, 1);
        assert_eq!(out.changed, vec![(a.clone(), 1)]);
        assert!(s.state_update(&b, 0).await.unwrap().is_none());

        let u1 = s.state_update(&a, 0).await.unwrap().unwrap();
        assert_eq!(u1.base_revision, None);
        let d1 = u1.apply_to(&a, None, &key.verifying_key()).unwrap();

        s.assign(sel.clone(), Change::Set(n2.clone(), file("2")), 2)
            .await
            .unwrap();
        s.assign(sel.clone(), Change::Unset(n1.clone()), 3)
            .await
            .unwrap();
        // Setting the same value again changes nothing.
        let same = s
            .assign(sel.clone(), Change::Set(n2.clone(), file("2")), 4)
            .await
            .unwrap();
        assert!(same.changed.is_empty());

        let u3 = s.state_update(&a, 1).await.unwrap().unwrap();
        assert_eq!(u3.base_revision, Some(1));
        assert_eq!(u3.revision, 3);
        assert_eq!(u3.upserts.len(), 1);
        assert_eq!(u3.removals, vec![n1.clone()]);
        let d3 = u3.apply_to(&a, Some(&d1), &key.verifying_key()).unwrap();
        assert_eq!(d3.resources.keys().collect::<Vec<_>>(), vec![&n2]);
        assert!(s.state_update(&a, 3).await.unwrap().is_none());

        // A device-level override and a label change re-sign only that device.
        let out = s
            .assign(
                Target::Device(b.clone()),
                Change::Set(n1.clone(), file("b")),
                5,
            )
            .await
            .unwrap();
        assert_eq!(out.changed, vec![(b.clone(), 1)]);
        let out = s
            .set_labels(&b, desired::parse_labels("site=paris").unwrap(), 6)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(out.changed, vec![(b.clone(), 2)]);
        // Two resources for one file, or a document over the limits, are refused whole.
        let clash = s
            .assign(
                Target::Device(b.clone()),
                Change::Set(ResourceName::new("three").unwrap(), file("b")),
                7,
            )
            .await;
        assert!(
            matches!(&clash, Err(StoreError::Invalid(m)) if m.contains("same file")),
            "{clash:?}"
        );
        let huge = Resource::File(FileResource {
            path: Text::new("big").unwrap(),
            content: vec![0; MAX_DOCUMENT_BYTES + 1],
            mode: 0o644,
            uid: None,
            gid: None,
        });
        let big = s
            .assign(
                Target::Device(b.clone()),
                Change::Set(ResourceName::new("big").unwrap(), huge),
                8,
            )
            .await;
        assert!(matches!(big, Err(StoreError::Invalid(_))), "{big:?}");
        let snap = s.state_snapshot(&b).await.unwrap().unwrap();
        let doc = snap.apply_to(&b, None, &key.verifying_key()).unwrap();
        assert_eq!(doc.resources.len(), 2);
        assert_eq!(doc.resources[&n1], file("b"));
    }

    #[tokio::test]
    async fn reports_are_stored_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = store(dir.path());
        let d = enrolled(&s, "dev-a", "").await;
        let ev = |seq| Report {
            seq,
            at_ms: seq,
            body: ReportBody::Event(Event {
                kind: EventKind::DriftCorrected,
                resource: None,
                revision: None,
                message: Text::truncated("x"),
            }),
        };
        let status = Report {
            seq: 3,
            at_ms: 3,
            body: ReportBody::Status(Status {
                desired_revision: 4,
                applied_revision: 4,
                failing: 1,
            }),
        };
        assert_eq!(
            s.record_reports(&d, vec![ev(1), ev(2)], 1).await.unwrap(),
            2
        );
        // Resend of 2, then 3, then a gap at 5: stops at 4.
        assert_eq!(
            s.record_reports(&d, vec![ev(2), status, ev(4), ev(6)], 2)
                .await
                .unwrap(),
            4
        );
        let evs = s
            .events(EventFilter {
                device: Some(d.clone()),
                kind: Some("drift-corrected".into()),
                after_id: 0,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(
            evs.iter().map(|e| e.seq.unwrap()).collect::<Vec<_>>(),
            vec![1, 2, 4]
        );
        let rec = s.device(&d).await.unwrap().unwrap();
        assert_eq!(
            (rec.applied_revision, rec.failing, rec.reports_acked),
            (4, 1, 4)
        );
        assert!(*s.event_watch().borrow() >= 3);
    }

    #[tokio::test]
    async fn revoked_devices_cannot_re_enroll() {
        let dir = tempfile::tempdir().unwrap();
        let (s, _) = store(dir.path());
        let d = enrolled(&s, "dev-a", "").await;
        assert!(s.revoke(&d, 9).await.unwrap());
        s.create_token(NewToken {
            id: "t2".into(),
            secret_hash: [3; 32],
            created_ms: 0,
            expires_ms: 100,
            uses: 5,
            labels: Labels::new(),
        })
        .await
        .unwrap();
        let e = Enrollment {
            token_id: "t2".into(),
            secret_hash: [3; 32],
            device: d.clone(),
            hostname: "h".into(),
            agent_version: "v".into(),
            now_ms: 10,
            attestation: None,
        };
        assert_eq!(
            s.enroll(e.clone()).await.unwrap().unwrap_err(),
            EnrollRefusal::DeviceRevoked
        );
        let late = Enrollment {
            now_ms: 100,
            device: DeviceId::new("dev-new").unwrap(),
            ..e
        };
        assert_eq!(
            s.enroll(late).await.unwrap().unwrap_err(),
            EnrollRefusal::TokenExpired
        );
    }
}
