//! The embedded store: one SQLite file in WAL mode.
//!
//! Writes go through a single writer thread that takes every job queued at that moment
//! and runs them in one transaction (group commit), each job inside its own savepoint so
//! that one failing job does not undo the others. A job's caller gets its result only
//! after the `COMMIT` returned, with `synchronous=FULL`: acknowledged means on disk.
//! Reads run on a small pool of read-only connections, which WAL lets proceed while the
//! writer works.
//!
//! One file per aggregate of the [`Store`](crate::store::Store) contract, each with its
//! SQL and its trait impl: `enrollment`, `devices`, `state` (desired state), `reports`
//! (and events), `releases`, `attest`. The behaviour every backend must show is checked
//! by `hub/tests/store_conformance.rs`.

mod attest;
mod devices;
mod enrollment;
mod releases;
mod reports;
mod state;

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_sync_protocol::DeviceId;
use cairn_sync_protocol::message::Labels;
use rusqlite::{Connection, OpenFlags};
use tokio::sync::{mpsc, oneshot, watch};

use super::{Result, StateSigner, StoreError};

/// Most jobs committed in one transaction.
const MAX_BATCH: usize = 1024;
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
    conn.execute_batch(attest::SCHEMA)?;
    for (column, decl) in [("applied_ms", "INTEGER"), ("online_since_ms", "INTEGER")]
        .into_iter()
        .chain(attest::DEVICE_COLUMNS_ADDED)
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
