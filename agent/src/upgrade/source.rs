//! The engine's contact with the box and the hub: room in a slot, health-check
//! commands, and release bytes fetched over the agent's QUIC connection.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_sync_protocol::frame;
use cairn_sync_protocol::release::{BLOCK_SIZE, HealthSpec};
use cairn_sync_protocol::release::{FetchRequest, FetchResponse, FetchWhat, ReleaseId, Slot};

use super::install::{BlockSource, SourceError};

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// Checks that `size` bytes fit into `target` (slot `slot`): a block device by its
/// size; a file by its length when it has one (a preallocated slot) and by the free
/// space its file system has for the bytes not yet allocated.
///
/// A `file` target is a file on a file system that takes the payload's size (a UKI
/// on the ESP): only free space counts. Otherwise a regular file stands in for a
/// partition and keeps its size.
pub fn check_capacity(target: &Path, size: u64, slot: Slot, file: bool) -> Result<(), String> {
    let meta = std::fs::metadata(target).ok();
    if meta.is_none() && !file && target.starts_with("/dev") {
        return Err(format!(
            "slot {slot}: {} does not exist: the partition is missing, or nothing linked its name (is this the disk the image was flashed to?)",
            target.display()
        ));
    }
    if let Some(m) = meta.as_ref().filter(|_| !file) {
        if m.file_type().is_block_device() {
            let cap = std::fs::File::open(target)
                .and_then(|mut f| std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0)))
                .map_err(|e| format!("sizing slot {slot} at {}: {e}", target.display()))?;
            if cap < size {
                return Err(format!(
                    "slot {slot} ({}) holds {}; the image is {}: use a release built for this partition layout",
                    target.display(),
                    mib(cap),
                    mib(size)
                ));
            }
            return Ok(());
        }
        if m.len() > 0 && m.len() < size {
            return Err(format!(
                "slot {slot} ({}) holds {}; the image is {}: use a release built for this partition layout",
                target.display(),
                mib(m.len()),
                mib(size)
            ));
        }
    }
    let allocated = meta.as_ref().map_or(0, |m| m.blocks() * 512);
    let need = size.saturating_sub(allocated);
    let dir = target.parent().unwrap_or(Path::new("/"));
    let st =
        rustix::fs::statvfs(dir).map_err(|e| format!("free space of {}: {e}", dir.display()))?;
    let free = st.f_bavail.saturating_mul(st.f_frsize);
    // Keep a little room: the block index and the database live beside slots in
    // the simulation.
    let margin = 64 * u64::from(BLOCK_SIZE);
    if free < need.saturating_add(margin) {
        return Err(format!(
            "not enough space for slot {slot} at {}: {} free, {} needed; free space or give the slot a partition",
            target.display(),
            mib(free),
            mib(need + margin)
        ));
    }
    Ok(())
}

/// Runs the custom health checks: each command with `sh -c`, bounded by the spec's
/// timeout; the first failure is the result.
pub fn run_checks(spec: &HealthSpec) -> Result<(), String> {
    let limit = Duration::from_secs(u64::from(spec.timeout_s.clamp(1, 600)));
    for cmd in &spec.commands {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(cmd.as_str())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("`{cmd}` could not start: {e}"))?;
        let started = Instant::now();
        let status = loop {
            match child.try_wait() {
                Ok(Some(s)) => break s,
                Ok(None) if started.elapsed() >= limit => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(format!(
                        "`{cmd}` did not finish within {} s",
                        limit.as_secs()
                    ));
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("`{cmd}`: {e}")),
            }
        };
        if !status.success() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = std::io::Read::read_to_string(&mut e, &mut err);
            }
            let tail: String = err
                .trim()
                .chars()
                .rev()
                .take(200)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            return Err(format!(
                "`{cmd}` exited with {status}{}{tail}",
                if tail.is_empty() { "" } else { ": " }
            ));
        }
    }
    Ok(())
}

/// Release bytes over the agent's QUIC connection: one bidirectional stream per
/// request, beside the sync stream (QUIC flow-controls each stream on its own, so a
/// download never holds up state sync).
pub struct QuicSource {
    rt: tokio::runtime::Handle,
    conn: quinn::Connection,
    release: ReleaseId,
    timeout: Duration,
}

impl QuicSource {
    pub fn new(rt: tokio::runtime::Handle, conn: quinn::Connection, release: ReleaseId) -> Self {
        Self {
            rt,
            conn,
            release,
            timeout: Duration::from_secs(60),
        }
    }

    fn fetch(&self, payload: u8, what: FetchWhat, out: &mut Vec<u8>) -> Result<(), SourceError> {
        let req = FetchRequest {
            release: self.release,
            payload,
            what,
        };
        let conn = self.conn.clone();
        let timeout = self.timeout;
        let fut = async move {
            // Not yet attested in this session (just after a reboot): the hub verifies
            // the evidence within a moment, so ask again shortly; after that, it counts
            // as offline (retried by the engine), not as a failure.
            let mut waits = 0;
            loop {
                match request(&conn, &req, what, out).await {
                    Err(Fetch::NotYet(_)) if waits < NOT_YET_WAITS => {
                        waits += 1;
                        tokio::time::sleep(NOT_YET_PAUSE).await;
                    }
                    Err(Fetch::NotYet(why)) => return Err(SourceError::Offline(why)),
                    Err(Fetch::Failed(e)) => return Err(e),
                    Ok(()) => return Ok(()),
                }
            }
        };
        self.rt.block_on(async move {
            match tokio::time::timeout(timeout, fut).await {
                Ok(r) => r,
                Err(_) => Err(SourceError::Offline(format!(
                    "no answer from the hub within {} s",
                    timeout.as_secs()
                ))),
            }
        })
    }
}

/// How often, and how far apart, a fetch refused "not attested yet" is asked again
/// before the engine is told the source is offline (about 6 s in all).
const NOT_YET_WAITS: u32 = 12;
const NOT_YET_PAUSE: Duration = Duration::from_millis(500);

enum Fetch {
    /// Refused until this session's attestation has verified.
    NotYet(String),
    Failed(SourceError),
}

/// One fetch request on its own stream; the answer's bytes are appended to `out`.
async fn request(
    conn: &quinn::Connection,
    req: &FetchRequest,
    what: FetchWhat,
    out: &mut Vec<u8>,
) -> Result<(), Fetch> {
    let offline = |e: &dyn std::fmt::Display| Fetch::Failed(SourceError::Offline(e.to_string()));
    let refused = |e: String| Fetch::Failed(SourceError::Refused(e));
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| offline(&e))?;
    let bytes = frame::encode(req, 64 * 1024).map_err(|e| refused(e.to_string()))?;
    send.write_all(&bytes).await.map_err(|e| offline(&e))?;
    let _ = send.finish();
    let mut prefix = [0u8; 4];
    recv.read_exact(&mut prefix)
        .await
        .map_err(|e| offline(&e))?;
    let len = u32::from_be_bytes(prefix) as usize;
    if len > 4096 {
        return Err(refused(format!(
            "hub sent a {len}-byte fetch answer; the limit is 4096"
        )));
    }
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(|e| offline(&e))?;
    let resp: FetchResponse =
        frame::decode_payload(&body).map_err(|e| refused(format!("hub's fetch answer: {e}")))?;
    match resp {
        FetchResponse::Refused(why)
            if why
                .as_str()
                .starts_with(cairn_sync_protocol::release::REFUSED_NOT_YET) =>
        {
            Err(Fetch::NotYet(why.to_string()))
        }
        FetchResponse::Refused(why) => Err(refused(why.to_string())),
        FetchResponse::Ok { len } => {
            let max =
                u64::from(cairn_sync_protocol::release::MAX_FETCH_BLOCKS) * u64::from(BLOCK_SIZE);
            // An index may be larger than a block run (32 bytes per block).
            if matches!(what, FetchWhat::Blocks { .. }) && len > max {
                return Err(refused(format!(
                    "hub announced {len} bytes for a block run; at most {max}"
                )));
            }
            let old = out.len();
            out.resize(old + len as usize, 0);
            recv.read_exact(&mut out[old..])
                .await
                .map_err(|e| offline(&e))?;
            Ok(())
        }
    }
}

impl BlockSource for QuicSource {
    fn read(&mut self, payload: u8, what: FetchWhat, out: &mut Vec<u8>) -> Result<(), SourceError> {
        self.fetch(payload, what, out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_file_keeps_its_size_and_a_file_payload_grows() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot-b");
        std::fs::write(&slot, vec![1u8; 8192]).unwrap();
        // As a stand-in for a partition, 8 KiB cannot take 64 KiB.
        let e = check_capacity(&slot, 65536, Slot::B, false).unwrap_err();
        assert!(e.contains("holds"), "{e}");
        // As a UKI on the ESP, it is rewritten at the payload's size.
        check_capacity(&slot, 65536, Slot::B, true).unwrap();
        // A file system too small for either is refused with the free space.
        let e = check_capacity(&slot, u64::MAX / 2, Slot::B, true).unwrap_err();
        assert!(e.contains("not enough space"), "{e}");
    }
}
