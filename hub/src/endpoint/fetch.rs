//! Release fetch streams: after a device's sync session is established, every further
//! bidirectional stream it opens carries one [`FetchRequest`] frame; the hub answers
//! with a [`FetchResponse`] frame and, when `Ok`, exactly `len` raw bytes read from the
//! stored bundle at its [`BundleLayout`] offsets, then finishes the stream.
//!
//! Each stream is served by its own task (the sync stream never waits for it), under a
//! hub-wide limit of [`MAX_FETCH_STREAMS`]. Nothing is allocated for a connection that
//! never fetches. Every step has a timeout; anything wrong is refused with a reason.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cairn_sync_protocol::release::{
    BLOCK_SIZE, BundleLayout, FetchRequest, FetchResponse, FetchWhat, MAX_FETCH_BLOCKS,
    SignedManifest,
};
use cairn_sync_protocol::{DeviceId, Text, frame};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tracing::debug;

use super::Shared;

/// Fetch streams served at once by one hub; more are refused as busy.
pub const MAX_FETCH_STREAMS: usize = 256;
/// Largest request frame.
const MAX_REQUEST_LEN: usize = 64 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// One write of data must make progress within this.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const CHUNK: usize = 64 * 1024;

/// What to send: `len` bytes of `path` from `offset`.
struct Plan {
    path: std::path::PathBuf,
    offset: u64,
    len: u64,
}

/// Serves one fetch stream to its end.
pub(super) async fn serve(
    shared: Arc<Shared>,
    device: DeviceId,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    deny: Option<&'static str>,
) {
    let stats = &shared.registry.fetch;
    if let Some(why) = deny {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        debug!(%device, reason = why, "fetch refused");
        let _ = recv.stop(0u32.into());
        refuse(&mut send, why).await;
        return;
    }
    let Ok(_permit) = shared.fetch_slots.clone().try_acquire_owned() else {
        stats.refused.fetch_add(1, Ordering::Relaxed);
        refuse(
            &mut send,
            "the hub is serving too many fetches; retry in a few seconds",
        )
        .await;
        return;
    };
    let req = match tokio::time::timeout(REQUEST_TIMEOUT, read_request(&mut recv)).await {
        Ok(Ok(r)) => r,
        Ok(Err(why)) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            debug!(%device, reason = %why, "fetch refused");
            refuse(&mut send, &why).await;
            return;
        }
        Err(_) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            refuse(
                &mut send,
                &format!(
                    "no complete fetch request within {}s",
                    REQUEST_TIMEOUT.as_secs()
                ),
            )
            .await;
            return;
        }
    };
    // One request per stream: anything more the agent sends is not read.
    let _ = recv.stop(0u32.into());
    let plan = match plan(&shared, &req).await {
        Ok(p) => p,
        Err(why) => {
            stats.refused.fetch_add(1, Ordering::Relaxed);
            debug!(%device, reason = %why, "fetch refused");
            refuse(&mut send, &why).await;
            return;
        }
    };
    match send_plan(&shared, &mut send, &plan).await {
        Ok(()) => {
            stats.served.fetch_add(1, Ordering::Relaxed);
            debug!(%device, release = ?req.release, payload = req.payload, what = ?req.what, bytes = plan.len, "fetch served");
            let _ = send.finish();
        }
        Err(e) => {
            debug!(%device, error = %e, "fetch stream failed");
            // A short stream must not look like a complete one.
            let _ = send.reset(1u32.into());
        }
    }
}

async fn read_request(recv: &mut quinn::RecvStream) -> Result<FetchRequest, String> {
    let mut buf: Vec<u8> = Vec::new();
    loop {
        if buf.len() >= 4 {
            let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
            if len > MAX_REQUEST_LEN {
                return Err(format!(
                    "fetch request frame of {len} bytes exceeds the limit of {MAX_REQUEST_LEN}"
                ));
            }
            if buf.len() >= 4 + len {
                if buf.len() > 4 + len {
                    return Err("bytes after the fetch request: one request per stream".to_string());
                }
                return FetchRequest::decode_payload(&buf[4..])
                    .map_err(|e| format!("malformed fetch request: {e}"));
            }
        }
        match recv
            .read_chunk(MAX_REQUEST_LEN + 4 - buf.len().min(MAX_REQUEST_LEN), true)
            .await
        {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk.bytes),
            Ok(None) => {
                return Err(format!(
                    "stream ended inside the fetch request ({} bytes received)",
                    buf.len()
                ));
            }
            Err(e) => return Err(format!("reading the fetch request: {e}")),
        }
    }
}

async fn plan(shared: &Shared, req: &FetchRequest) -> Result<Plan, String> {
    let id = req.release.to_hex();
    let rec = shared
        .store
        .release_by_id(&id)
        .await
        .map_err(|e| format!("hub storage error, retry later: {e}"))?
        .ok_or_else(|| {
            format!(
                "release {} is not on this hub (deleted, or never pushed)",
                &id[..16]
            )
        })?;
    let manifest = SignedManifest::from_bytes(&rec.manifest)
        .and_then(|s| s.decode_unverified())
        .map_err(|e| {
            format!(
                "stored manifest of release {} is unusable: {e}",
                rec.version
            )
        })?;
    let i = usize::from(req.payload);
    let Some(payload) = manifest.payloads.get(i) else {
        return Err(format!(
            "payload {i} does not exist: release {} has {} payload(s) (0..{})",
            rec.version,
            manifest.payloads.len(),
            manifest.payloads.len()
        ));
    };
    let layout = BundleLayout::new(&manifest, rec.header_len);
    let Some(&(index_at, data_at)) = layout.sections.get(i) else {
        return Err("bundle layout has no such section".into());
    };
    let path = crate::api::bundle_path(&shared.releases_dir, &rec.id);
    match req.what {
        FetchWhat::Index => Ok(Plan {
            path,
            offset: index_at,
            len: payload.index_len(),
        }),
        FetchWhat::Blocks { first, count } => {
            let blocks = payload.blocks();
            if count == 0 || count > MAX_FETCH_BLOCKS {
                return Err(format!(
                    "count {count}: ask for 1 to {MAX_FETCH_BLOCKS} blocks per request"
                ));
            }
            let end = first.checked_add(u64::from(count));
            if first >= blocks || end.is_none_or(|e| e > blocks) {
                return Err(format!(
                    "blocks {first}..{} are out of range: payload {} of release {} has {blocks} blocks",
                    first.saturating_add(u64::from(count)),
                    payload.name,
                    rec.version
                ));
            }
            let bs = u64::from(BLOCK_SIZE);
            let start = first * bs;
            let stop = (first + u64::from(count))
                .saturating_mul(bs)
                .min(payload.size);
            Ok(Plan {
                path,
                offset: data_at + start,
                len: stop - start,
            })
        }
    }
}

async fn send_plan(
    shared: &Shared,
    send: &mut quinn::SendStream,
    plan: &Plan,
) -> Result<(), String> {
    let mut file = tokio::fs::File::open(&plan.path)
        .await
        .map_err(|e| format!("opening {}: {e}", plan.path.display()))?;
    file.seek(std::io::SeekFrom::Start(plan.offset))
        .await
        .map_err(|e| format!("seeking: {e}"))?;
    let head = frame::encode(&FetchResponse::Ok { len: plan.len }, MAX_REQUEST_LEN)
        .map_err(|e| e.to_string())?;
    write(send, &head).await?;
    let mut left = plan.len;
    let mut buf = vec![0u8; CHUNK.min(plan.len as usize).max(1)];
    while left > 0 {
        let want = (left as usize).min(buf.len());
        let n = file
            .read(&mut buf[..want])
            .await
            .map_err(|e| format!("reading {}: {e}", plan.path.display()))?;
        if n == 0 {
            return Err(format!(
                "{} is shorter than its layout ({left} bytes missing)",
                plan.path.display()
            ));
        }
        write(send, &buf[..n]).await?;
        shared
            .registry
            .fetch
            .bytes
            .fetch_add(n as u64, Ordering::Relaxed);
        left -= n as u64;
    }
    Ok(())
}

async fn write(send: &mut quinn::SendStream, bytes: &[u8]) -> Result<(), String> {
    match tokio::time::timeout(WRITE_TIMEOUT, send.write_all(bytes)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!(
            "the agent read nothing for {}s",
            WRITE_TIMEOUT.as_secs()
        )),
    }
}

async fn refuse(send: &mut quinn::SendStream, why: &str) {
    let msg = FetchResponse::Refused(Text::truncated(why));
    if let Ok(bytes) = frame::encode(&msg, MAX_REQUEST_LEN) {
        let _ = tokio::time::timeout(WRITE_TIMEOUT, send.write_all(&bytes)).await;
    }
    let _ = send.finish();
}
