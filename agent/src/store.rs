//! The agent's durable state: one SQLite file (WAL, `synchronous=FULL`).
//!
//! | table | holds |
//! |---|---|
//! | `meta` | identity (device id, key, certificate, hub CA, pinned state key), report sequence counter, connection facts |
//! | `desired` | the newest verified desired-state document, with its signature |
//! | `outbox` | reports not yet acknowledged by the hub, by sequence number |
//! | `applied` | per resource: the hash and revision last applied, and whether it failed |
//! | `upgrade` | the A/B upgrade job (JSON of `upgrade::Job`): phase, release, progress, trial facts |
//!
//! Invariants: a desired document is stored only after its signature verified against
//! the pinned key and its revision is newer than the stored one; a report gets its
//! sequence number in the same transaction that stores it; sequence numbers are never
//! reused, even after the outbox is emptied.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_sync_protocol::message::{Event, EventKind, Report, ReportBody, Status};
use cairn_sync_protocol::state::{StateDocument, StateUpdate};

use crate::sync::Offer;
use cairn_sync_protocol::{DeviceId, ResourceName, Text};
use ed25519_dalek::VerifyingKey;
use rusqlite::{Connection, OptionalExtension, params};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS desired (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL,
    doc BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS outbox (
    seq INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS applied (
    name TEXT PRIMARY KEY,
    hash BLOB NOT NULL,
    revision INTEGER NOT NULL,
    path TEXT NOT NULL,
    error TEXT
);
CREATE TABLE IF NOT EXISTS upgrade (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    job TEXT NOT NULL
);
"#;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("agent database {path}: {source}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("agent database {path} holds corrupt {what}: {detail}")]
    Corrupt {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The identity an enrolled agent keeps.
#[derive(Clone)]
pub struct Identity {
    pub device: DeviceId,
    /// PKCS#8 DER of the device's TLS key.
    pub key_der: Vec<u8>,
    pub cert_der: Vec<u8>,
    /// The hub CA certificate (DER), pinned at enrollment.
    pub ca_der: Vec<u8>,
    /// The hub's state-signing key, pinned at enrollment.
    pub state_key: VerifyingKey,
}

/// One resource's last apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedRecord {
    pub hash: [u8; 32],
    pub revision: u64,
    pub path: String,
    pub error: Option<String>,
}

/// The agent's store.
pub struct Store {
    conn: Connection,
    path: PathBuf,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Store {
    pub fn open(path: &Path) -> Result<Self> {
        let db = |source| StoreError::Db {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
        // A small page cache: the agent's database is small and RSS matters on a Pi.
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA cache_size=-256;",
        )
        .map_err(db)?;
        conn.execute_batch(SCHEMA).map_err(db)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    /// Opens read-only, for `cairn-agent status` while the agent runs.
    pub fn open_read_only(path: &Path) -> Result<Self> {
        let db = |source| StoreError::Db {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(db)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db)?;
        Ok(Self {
            conn,
            path: path.to_path_buf(),
        })
    }

    fn db(&self, source: rusqlite::Error) -> StoreError {
        StoreError::Db {
            path: self.path.clone(),
            source,
        }
    }

    fn corrupt(&self, what: &'static str, detail: impl ToString) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            what,
            detail: detail.to_string(),
        }
    }

    pub fn meta(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
            .map_err(|e| self.db(e))
    }

    pub fn meta_text(&self, key: &str) -> Result<Option<String>> {
        Ok(self
            .meta(key)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set_meta(&self, key: &str, value: &[u8]) -> Result<()> {
        self.conn
            .execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![key, value],
            )
            .map_err(|e| self.db(e))?;
        Ok(())
    }

    pub fn identity(&self) -> Result<Option<Identity>> {
        let Some(device) = self.meta_text("device")? else {
            return Ok(None);
        };
        let get = |k: &'static str| -> Result<Vec<u8>> {
            self.meta(k)?
                .ok_or_else(|| self.corrupt("identity", format!("{k} missing")))
        };
        let key_bytes: [u8; 32] = get("state_key")?
            .try_into()
            .map_err(|_| self.corrupt("identity", "state_key is not 32 bytes"))?;
        Ok(Some(Identity {
            device: DeviceId::new(&device).map_err(|e| self.corrupt("identity", e))?,
            key_der: get("key_der")?,
            cert_der: get("cert_der")?,
            ca_der: get("ca_der")?,
            state_key: VerifyingKey::from_bytes(&key_bytes)
                .map_err(|e| self.corrupt("identity", e))?,
        }))
    }

    /// Stores the identity from a successful enrollment, atomically.
    pub fn save_identity(&mut self, id: &Identity) -> Result<()> {
        let tx = self.conn.transaction().map_err(|e| StoreError::Db {
            path: self.path.clone(),
            source: e,
        })?;
        for (k, v) in [
            ("device", id.device.as_str().as_bytes()),
            ("key_der", &id.key_der[..]),
            ("cert_der", &id.cert_der[..]),
            ("ca_der", &id.ca_der[..]),
            ("state_key", &id.state_key.to_bytes()[..]),
        ] {
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v],
            )
            .map_err(|e| StoreError::Db {
                path: self.path.clone(),
                source: e,
            })?;
        }
        tx.commit().map_err(|e| StoreError::Db {
            path: self.path.clone(),
            source: e,
        })
    }

    pub fn desired(&self) -> Result<Option<StateDocument>> {
        let blob: Option<Vec<u8>> = self
            .conn
            .query_row("SELECT doc FROM desired WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.db(e))?;
        blob.map(|b| postcard::from_bytes(&b).map_err(|e| self.corrupt("desired state", e)))
            .transpose()
    }

    pub fn desired_revision(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT revision FROM desired WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(|e| self.db(e))
            .map(|r| r.unwrap_or(0))
    }

    /// Judges an update against the held document and the pinned key
    /// ([`crate::sync::offer`]) and stores the outcome: the new document and its
    /// `state-accepted` event, or the `state-rejected` event, in one transaction. The
    /// returned offer's `doc` is the stored document.
    pub fn accept_state(&mut self, identity: &Identity, update: &StateUpdate) -> Result<Offer> {
        let held = self.desired()?;
        let offer =
            crate::sync::offer(update, &identity.device, held.as_ref(), &identity.state_key);
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        if let Some(doc) = &offer.doc {
            let blob = postcard::to_allocvec(doc).map_err(|e| StoreError::Corrupt {
                path: path.clone(),
                what: "desired state",
                detail: e.to_string(),
            })?;
            tx.execute(
                "INSERT OR REPLACE INTO desired (id, revision, doc) VALUES (1, ?1, ?2)",
                params![doc.revision, blob],
            )
            .map_err(db)?;
        }
        if let Some(event) = &offer.event {
            push_report(&tx, event.clone()).map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(offer)
    }

    /// Highest sequence number ever allocated.
    pub fn last_seq(&self) -> Result<u64> {
        Ok(self
            .meta("last_seq")?
            .and_then(|v| v.try_into().ok())
            .map(u64::from_le_bytes)
            .unwrap_or(0))
    }

    /// The hub says it holds reports up to `hub_acked`. Normally that is at most the last
    /// number this database allocated. If it is more, this database went back in time
    /// (restored from a backup): the queued reports were never stored under their
    /// numbers, so they are moved above the hub's mark, in order, and numbering
    /// continues after them. Returns the new last sequence number if anything moved.
    pub fn rebase_outbox(&mut self, hub_acked: u64) -> Result<Option<u64>> {
        let last = self.last_seq()?;
        // The normal case, at every session start: the hub is not ahead, nothing to read.
        if crate::sync::rebase(hub_acked, last, None).is_none() {
            return Ok(None);
        }
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        let queued: (Option<u64>, Option<u64>) = tx
            .query_row("SELECT MIN(seq), MAX(seq) FROM outbox", [], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(db)?;
        let queued = queued.0.zip(queued.1);
        let Some(plan) = crate::sync::rebase(hub_acked, last, queued) else {
            return Ok(None);
        };
        if plan.shift > 0 {
            // Through negative keys, so that no row lands on another mid-update.
            tx.execute("UPDATE outbox SET seq = -seq", []).map_err(db)?;
            tx.execute("UPDATE outbox SET seq = ?1 - seq", [plan.shift as i64])
                .map_err(db)?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_seq', ?1)",
            [&plan.last_seq.to_le_bytes()[..]],
        )
        .map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(queued.map(|_| plan.last_seq))
    }

    /// The stored upgrade job (JSON), if any.
    pub fn upgrade_job(&self) -> Result<Option<String>> {
        self.conn
            .query_row("SELECT job FROM upgrade WHERE id = 1", [], |r| r.get(0))
            .optional()
            .map_err(|e| self.db(e))
    }

    /// Stores the upgrade job and queues `reports` in one transaction: a phase is never
    /// durable without its report, nor reported without being durable. Returns the last
    /// sequence number written (0: no reports).
    pub fn save_upgrade_job(&mut self, job: &str, reports: Vec<ReportBody>) -> Result<u64> {
        self.save_upgrade_job_with_meta(job, &[], reports)
    }

    /// [`save_upgrade_job`](Self::save_upgrade_job) that also sets `meta` keys in the
    /// same transaction (the committed OS version moves with the job's phase).
    pub fn save_upgrade_job_with_meta(
        &mut self,
        job: &str,
        meta: &[(&str, &str)],
        reports: Vec<ReportBody>,
    ) -> Result<u64> {
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        tx.execute(
            "INSERT OR REPLACE INTO upgrade (id, job) VALUES (1, ?1)",
            [job],
        )
        .map_err(db)?;
        for (k, v) in meta {
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES (?1, ?2)",
                params![k, v.as_bytes()],
            )
            .map_err(db)?;
        }
        let last = push_all(&tx, reports).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(last)
    }

    /// Appends reports to the outbox in one transaction; returns the last sequence number.
    pub fn push_reports(&mut self, bodies: Vec<ReportBody>) -> Result<u64> {
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        let last = push_all(&tx, bodies).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(last)
    }

    /// Reports after `after`, at most `limit`, in order.
    pub fn outbox_after(&self, after: u64, limit: usize) -> Result<Vec<Report>> {
        let mut stmt = self
            .conn
            .prepare_cached(
                "SELECT seq, at_ms, body FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
            )
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map(params![after, limit as i64], |r| {
                Ok((
                    r.get::<_, u64>(0)?,
                    r.get::<_, u64>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .map_err(|e| self.db(e))?;
        let mut out = Vec::new();
        for row in rows {
            let (seq, at_ms, body) = row.map_err(|e| self.db(e))?;
            out.push(Report {
                seq,
                at_ms,
                body: postcard::from_bytes(&body).map_err(|e| self.corrupt("outbox", e))?,
            });
        }
        Ok(out)
    }

    /// Deletes reports the hub acknowledged.
    pub fn ack_reports(&self, up_to: u64) -> Result<usize> {
        self.conn
            .execute("DELETE FROM outbox WHERE seq <= ?1", [up_to])
            .map_err(|e| self.db(e))
    }

    pub fn outbox_depth(&self) -> Result<u64> {
        self.conn
            .query_row("SELECT COUNT(*) FROM outbox", [], |r| r.get(0))
            .map_err(|e| self.db(e))
    }

    pub fn applied(&self) -> Result<BTreeMap<String, AppliedRecord>> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT name, hash, revision, path, error FROM applied")
            .map_err(|e| self.db(e))?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Vec<u8>>(1)?,
                    r.get::<_, u64>(2)?,
                    r.get::<_, String>(3)?,
                    r.get::<_, Option<String>>(4)?,
                ))
            })
            .map_err(|e| self.db(e))?;
        let mut out = BTreeMap::new();
        for row in rows {
            let (name, hash, revision, path, error) = row.map_err(|e| self.db(e))?;
            let hash: [u8; 32] = hash
                .try_into()
                .map_err(|_| self.corrupt("applied", "hash is not 32 bytes"))?;
            out.insert(
                name,
                AppliedRecord {
                    hash,
                    revision,
                    path,
                    error,
                },
            );
        }
        Ok(out)
    }

    /// Records one reconcile pass: applied rows changed or removed, and the reports it
    /// produced, in one transaction. Returns the last sequence number (0 if none).
    pub fn commit_pass(
        &mut self,
        upserts: Vec<(ResourceName, AppliedRecord)>,
        removals: Vec<String>,
        mut reports: Vec<ReportBody>,
        status: Option<(u64, u64, u32)>,
    ) -> Result<u64> {
        let path = self.path.clone();
        let db = |source| StoreError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        for (name, rec) in upserts {
            tx.execute(
                "INSERT OR REPLACE INTO applied (name, hash, revision, path, error) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![name.as_str(), &rec.hash[..], rec.revision, rec.path, rec.error],
            )
            .map_err(db)?;
        }
        for name in removals {
            tx.execute("DELETE FROM applied WHERE name = ?1", [name])
                .map_err(db)?;
        }
        if let Some((desired, applied, failing)) = status {
            reports.push(status_body(desired, applied, failing));
            let mut v = Vec::with_capacity(20);
            v.extend_from_slice(&desired.to_le_bytes());
            v.extend_from_slice(&applied.to_le_bytes());
            v.extend_from_slice(&failing.to_le_bytes());
            tx.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('status', ?1)",
                [v],
            )
            .map_err(db)?;
        }
        let last = push_all(&tx, reports).map_err(db)?;
        tx.commit().map_err(db)?;
        Ok(last)
    }

    /// The last status reported: (desired revision, applied revision, failing).
    pub fn last_status(&self) -> Result<(u64, u64, u32)> {
        let Some(v) = self.meta("status")? else {
            return Ok((0, 0, 0));
        };
        if v.len() != 20 {
            return Err(self.corrupt("status", "wrong length"));
        }
        let u = |r: std::ops::Range<usize>| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&v[r]);
            u64::from_le_bytes(b)
        };
        let mut f = [0u8; 4];
        f.copy_from_slice(&v[16..20]);
        Ok((u(0..8), u(8..16), u32::from_le_bytes(f)))
    }
}

/// Appends `reports` in order; the last sequence number given (0: none).
fn push_all(tx: &rusqlite::Transaction<'_>, reports: Vec<ReportBody>) -> rusqlite::Result<u64> {
    let mut last = 0;
    for body in reports {
        last = push_report(tx, body)?;
    }
    Ok(last)
}

fn push_report(tx: &rusqlite::Transaction<'_>, body: ReportBody) -> rusqlite::Result<u64> {
    let last: u64 = tx
        .query_row("SELECT value FROM meta WHERE key = 'last_seq'", [], |r| {
            r.get::<_, Vec<u8>>(0)
        })
        .optional()?
        .and_then(|v| v.try_into().ok())
        .map(u64::from_le_bytes)
        .unwrap_or(0);
    let seq = last + 1;
    let blob = postcard::to_allocvec(&body)
        .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?;
    tx.execute(
        "INSERT INTO outbox (seq, at_ms, body) VALUES (?1, ?2, ?3)",
        params![seq, now_ms(), blob],
    )?;
    tx.execute(
        "INSERT OR REPLACE INTO meta (key, value) VALUES ('last_seq', ?1)",
        [&seq.to_le_bytes()[..]],
    )?;
    Ok(seq)
}

/// A status report body.
pub fn status_body(desired: u64, applied: u64, failing: u32) -> ReportBody {
    ReportBody::Status(Status {
        desired_revision: desired,
        applied_revision: applied,
        failing,
    })
}

/// An event report body.
pub fn event_body(
    kind: EventKind,
    resource: Option<&ResourceName>,
    revision: Option<u64>,
    message: &str,
) -> ReportBody {
    ReportBody::Event(Event {
        kind,
        resource: resource.cloned(),
        revision,
        message: Text::truncated(message),
    })
}
