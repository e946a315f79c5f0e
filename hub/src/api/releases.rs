//! Admin API for OS releases: trusted release keys, bundle pushes (streamed to
//! `DATA_DIR/releases/`, every digest checked on the way), listings, deletion, rollout
//! status, and the `os` desired-state resource built from a stored release.

use std::collections::BTreeMap;
use std::path::{Path as FsPath, PathBuf};

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use cairn_sync_protocol::Text;
use cairn_sync_protocol::release::{
    HealthSpec, KeyId, OsResource, ReleaseError, SignedManifest, parse_version,
};
use cairn_sync_protocol::state::Resource;
use ed25519_dalek::VerifyingKey;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use super::{Api, ApiError, ApiResult};
use crate::endpoint::now_ms;
use crate::release::{BundleError, BundleInfo, BundleVerifier};
use crate::store::{
    OS_RESOURCE, PayloadInfo, PutRelease, ReleaseKeyRecord, ReleaseRecord, UpgradeStatus,
};

/// Where the bundle of release `id` (hex) lives.
pub fn bundle_path(dir: &FsPath, id: &str) -> PathBuf {
    dir.join(format!("{id}.cairn"))
}

/// Removes pushes that never completed (a crash mid-push): they were never recorded.
pub fn clean_partial_pushes(dir: &FsPath) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().ends_with(".part") {
            tracing::info!(file = %e.path().display(), "removing an unfinished release push");
            let _ = std::fs::remove_file(e.path());
        }
    }
}

// ------------------------------------------------------------ keys

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AddReleaseKey {
    /// The ed25519 public key, 64 hex digits.
    pub public_key: String,
    /// What it is, e.g. `ci-2025`.
    #[serde(default)]
    pub name: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AddedReleaseKey {
    #[serde(flatten)]
    pub key: ReleaseKeyRecord,
    /// `false` if it was trusted already.
    pub added: bool,
}

fn parse_key(hex_key: &str) -> Result<VerifyingKey, ApiError> {
    let bytes: [u8; 32] = hex::decode(hex_key.trim())
        .ok()
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| {
            ApiError::bad_request("public_key must be 64 hex digits (an ed25519 public key)")
        })?;
    VerifyingKey::from_bytes(&bytes)
        .map_err(|e| ApiError::bad_request(format!("public_key is not an ed25519 key: {e}")))
}

#[utoipa::path(post, path = "/v1/release-keys", request_body = AddReleaseKey,
    responses((status = 200, body = AddedReleaseKey), (status = 400, body = ApiError)))]
pub(super) async fn add_release_key(
    State(api): State<Api>,
    Json(req): Json<AddReleaseKey>,
) -> ApiResult<AddedReleaseKey> {
    let key = parse_key(&req.public_key)?;
    let rec = ReleaseKeyRecord {
        key_id: KeyId::of(&key).to_string(),
        public_key: hex::encode(key.as_bytes()),
        name: req.name,
        added_ms: now_ms(),
    };
    let added = api.store.add_release_key(rec.clone()).await?;
    let key = api
        .store
        .release_keys()
        .await?
        .into_iter()
        .find(|k| k.key_id == rec.key_id)
        .unwrap_or(rec);
    tracing::info!(key_id = %key.key_id, added, "release key trusted");
    Ok(Json(AddedReleaseKey { key, added }))
}

#[utoipa::path(get, path = "/v1/release-keys",
    responses((status = 200, body = Vec<ReleaseKeyRecord>)))]
pub(super) async fn list_release_keys(State(api): State<Api>) -> ApiResult<Vec<ReleaseKeyRecord>> {
    Ok(Json(api.store.release_keys().await?))
}

#[utoipa::path(delete, path = "/v1/release-keys/{key_id}", params(("key_id" = String, Path)),
    responses((status = 200, body = super::Deleted), (status = 404, body = ApiError)))]
pub(super) async fn remove_release_key(
    State(api): State<Api>,
    Path(key_id): Path<String>,
) -> ApiResult<super::Deleted> {
    if api.store.remove_release_key(&key_id).await? {
        tracing::info!(%key_id, "release key no longer trusted");
        Ok(Json(super::Deleted { name: key_id }))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no trusted release key {key_id}; `cairn-hub release key ls` lists them"),
        ))
    }
}

async fn trusted(api: &Api) -> Result<Vec<VerifyingKey>, ApiError> {
    let mut out = Vec::new();
    for k in api.store.release_keys().await? {
        match hex::decode(&k.public_key)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .and_then(|b| VerifyingKey::from_bytes(&b).ok())
        {
            Some(v) => out.push(v),
            None => tracing::error!(key_id = %k.key_id, "stored release key is unusable"),
        }
    }
    Ok(out)
}

// ------------------------------------------------------------ releases

/// A release as the API shows it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReleaseView {
    #[serde(flatten)]
    pub record: ReleaseRecord,
    /// PCR index → sha256 value (hex) that booting it is expected to measure.
    #[serde(deserialize_with = "pcr_map")]
    pub expected_pcrs: BTreeMap<u32, String>,
    /// Devices whose desired OS it is.
    pub devices: usize,
}

/// PCR maps read back by clients: beside a `#[serde(flatten)]` field serde hands map
/// keys over as strings, which a `u32` key refuses; the index is parsed from them.
fn pcr_map<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<u32, String>, D::Error> {
    let m = <BTreeMap<String, String> as Deserialize>::deserialize(d)?;
    m.into_iter()
        .map(|(k, v)| {
            k.parse()
                .map(|k| (k, v))
                .map_err(|_| serde::de::Error::custom(format!("PCR index {k:?}")))
        })
        .collect()
}

fn release_view(rec: ReleaseRecord, devices: usize) -> ReleaseView {
    let expected_pcrs = SignedManifest::from_bytes(&rec.manifest)
        .and_then(|s| s.decode_unverified())
        .map(|m| {
            m.expected_pcrs
                .iter()
                .map(|(i, v)| (u32::from(*i), hex::encode(v)))
                .collect()
        })
        .unwrap_or_default();
    ReleaseView {
        record: rec,
        expected_pcrs,
        devices,
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Pushed {
    #[serde(flatten)]
    pub release: ReleaseView,
    /// `stored`, or `already-present` (this exact release was pushed before).
    pub outcome: String,
}

fn bundle_error(e: BundleError) -> ApiError {
    let msg = match &e {
        BundleError::Release(ReleaseError::UnknownKey { key_id }) => format!(
            "the bundle is signed with release key {key_id}, which this hub does not trust; add the public key with `cairn-hub release key add FILE.pub` (see `cairn-hub release key ls`)"
        ),
        BundleError::Release(ReleaseError::BadSignature { key_id }) => format!(
            "the bundle's manifest signature does not verify with release key {key_id}: the manifest was altered; rebuild it with `cairn-hub release build`"
        ),
        other => format!("refused the bundle: {other}"),
    };
    ApiError::bad_request(msg)
}

fn conflict(existing: &ReleaseRecord) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "version {} is already stored with different content (release {}, pushed {}); versions are immutable: build this one as a new version, or `cairn-hub release rm {}` first",
            existing.version,
            &existing.id[..16.min(existing.id.len())],
            humantime::format_rfc3339_seconds(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(existing.pushed_ms)
            ),
            existing.version
        ),
    )
}

/// A push being written; removed unless committed.
struct PartFile {
    path: PathBuf,
    file: Option<tokio::fs::File>,
}

impl Drop for PartFile {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

enum Sink {
    /// Header not complete yet: chunks held (at most the header plus one chunk).
    Pending(Vec<axum::body::Bytes>),
    Write(PartFile),
    /// The same release is stored already; the body is only checked.
    Discard(ReleaseRecord),
}

fn record_of(info: &BundleInfo, pushed_ms: u64) -> ReleaseRecord {
    let m = &info.manifest;
    ReleaseRecord {
        id: info.id().to_hex(),
        version: m.version.to_string(),
        arch: m.arch.to_string(),
        board: m.board.to_string(),
        created_ms: m.created_ms,
        pushed_ms,
        key_id: info.signed.key_id.to_string(),
        bundle_len: info.layout.len,
        payloads: m
            .payloads
            .iter()
            .map(|p| PayloadInfo {
                name: p.name.to_string(),
                size: p.size,
                sha256: hex::encode(p.sha256),
            })
            .collect(),
        manifest: info.signed.to_bytes(),
        header_len: info.header_len,
    }
}

fn internal(what: &str, e: impl std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "{what}");
    ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, format!("{what}: {e}"))
}

/// Consumes the rest of a refused upload, so the client reads the answer instead of a
/// reset connection.
async fn drain(stream: &mut axum::body::BodyDataStream) {
    while let Some(Ok(_)) = stream.next().await {}
}

#[utoipa::path(post, path = "/v1/releases",
    request_body(content = Vec<u8>, content_type = "application/octet-stream",
        description = "A release bundle (`*.cairn`, as `cairn-hub release build` writes it), streamed."),
    responses((status = 200, body = Pushed), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub(super) async fn push_release(State(api): State<Api>, body: Body) -> ApiResult<Pushed> {
    let mut stream = body.into_data_stream();
    let keys = trusted(&api).await?;
    if keys.is_empty() {
        drain(&mut stream).await;
        return Err(ApiError::bad_request(
            "this hub trusts no release key yet; add yours first: `cairn-hub release key add FILE.pub`",
        ));
    }
    let mut verifier = BundleVerifier::new(Some(keys));
    let mut sink = Sink::Pending(Vec::new());
    let mut failed: Option<ApiError> = None;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("the upload broke off: {e}; push again")))?;
        if let Err(e) = verifier.update(&chunk) {
            failed = Some(bundle_error(e));
            break;
        }
        match &mut sink {
            Sink::Pending(held) => {
                held.push(chunk);
                let Some(info) = verifier.header() else {
                    continue;
                };
                let id = info.id().to_hex();
                match api.store.release(info.manifest.version.as_str()).await? {
                    Some(e) if e.id == id => sink = Sink::Discard(e),
                    Some(e) => {
                        failed = Some(conflict(&e));
                        break;
                    }
                    None => {
                        let path = api
                            .releases_dir
                            .join(format!(".{id}.{:016x}.part", rand::random::<u64>()));
                        let file = tokio::fs::File::create(&path)
                            .await
                            .map_err(|e| internal("creating the release file", e))?;
                        let mut part = PartFile {
                            path,
                            file: Some(file),
                        };
                        if let Some(f) = part.file.as_mut() {
                            for c in held.iter() {
                                f.write_all(c)
                                    .await
                                    .map_err(|e| internal("writing the release file", e))?;
                            }
                        }
                        sink = Sink::Write(part);
                    }
                }
            }
            Sink::Write(part) => {
                if let Some(f) = part.file.as_mut() {
                    f.write_all(&chunk)
                        .await
                        .map_err(|e| internal("writing the release file", e))?;
                }
            }
            Sink::Discard(_) => {}
        }
    }
    if let Some(e) = failed {
        drop(sink);
        drain(&mut stream).await;
        tracing::warn!(error = %e.error, "release push refused");
        return Err(e);
    }
    let info = verifier.finish().map_err(bundle_error)?;
    let rec = record_of(&info, now_ms());
    let devices = |api: &Api, id: String| {
        let store = api.store.clone();
        async move {
            Ok::<_, ApiError>(
                store
                    .desired_os()
                    .await?
                    .iter()
                    .filter(|(_, i, _)| *i == id)
                    .count(),
            )
        }
    };
    match sink {
        Sink::Pending(_) => Err(ApiError::bad_request(
            "the upload ended inside the bundle header",
        )),
        Sink::Discard(existing) => {
            let n = devices(&api, existing.id.clone()).await?;
            Ok(Json(Pushed {
                release: release_view(existing, n),
                outcome: "already-present".into(),
            }))
        }
        Sink::Write(mut part) => {
            // Durable before it is recorded, recorded before it is acknowledged.
            let Some(f) = part.file.take() else {
                return Err(internal("release file", "missing"));
            };
            let finalize = async {
                f.sync_all().await?;
                drop(f);
                tokio::fs::rename(&part.path, bundle_path(&api.releases_dir, &rec.id)).await?;
                tokio::fs::File::open(&api.releases_dir)
                    .await?
                    .sync_all()
                    .await
            };
            if let Err(e) = finalize.await {
                let _ = std::fs::remove_file(&part.path);
                return Err(internal("storing the release file", e));
            }
            match api.store.put_release(rec.clone()).await? {
                PutRelease::Stored | PutRelease::AlreadyPresent => {}
                PutRelease::Conflict(existing) => {
                    let _ = std::fs::remove_file(bundle_path(&api.releases_dir, &rec.id));
                    return Err(conflict(&existing));
                }
            }
            tracing::info!(version = %rec.version, id = %rec.id, bytes = rec.bundle_len, key = %rec.key_id, "release stored");
            let n = devices(&api, rec.id.clone()).await?;
            Ok(Json(Pushed {
                release: release_view(rec, n),
                outcome: "stored".into(),
            }))
        }
    }
}

fn by_semver(a: &ReleaseRecord, b: &ReleaseRecord) -> std::cmp::Ordering {
    match (parse_version(&a.version), parse_version(&b.version)) {
        (Ok(x), Ok(y)) => x.cmp(&y),
        _ => a.version.cmp(&b.version),
    }
}

#[utoipa::path(get, path = "/v1/releases", responses((status = 200, body = Vec<ReleaseView>)))]
pub(super) async fn list_releases(State(api): State<Api>) -> ApiResult<Vec<ReleaseView>> {
    let mut rs = api.store.releases().await?;
    rs.sort_by(by_semver);
    let os = api.store.desired_os().await?;
    Ok(Json(
        rs.into_iter()
            .map(|r| {
                let n = os.iter().filter(|(_, id, _)| *id == r.id).count();
                release_view(r, n)
            })
            .collect(),
    ))
}

fn no_release(version: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        format!(
            "no release {version} on this hub; `cairn-hub release ls` lists them, `cairn-hub release push FILE.cairn` adds one"
        ),
    )
}

#[utoipa::path(get, path = "/v1/releases/{version}", params(("version" = String, Path)),
    responses((status = 200, body = ReleaseView), (status = 404, body = ApiError)))]
pub(super) async fn show_release(
    State(api): State<Api>,
    Path(version): Path<String>,
) -> ApiResult<ReleaseView> {
    let rec = api
        .store
        .release(&version)
        .await?
        .ok_or_else(|| no_release(&version))?;
    let n = api
        .store
        .desired_os()
        .await?
        .iter()
        .filter(|(_, id, _)| *id == rec.id)
        .count();
    Ok(Json(release_view(rec, n)))
}

#[utoipa::path(delete, path = "/v1/releases/{version}", params(("version" = String, Path)),
    responses((status = 200, body = super::Deleted), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub(super) async fn delete_release(
    State(api): State<Api>,
    Path(version): Path<String>,
) -> ApiResult<super::Deleted> {
    match api.store.delete_release(&version).await? {
        Ok(Some(rec)) => {
            // The record is gone first: a crash now leaves an unreferenced file only.
            let path = bundle_path(&api.releases_dir, &rec.id);
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "removing a deleted release's bundle");
            }
            tracing::info!(%version, "release deleted");
            Ok(Json(super::Deleted { name: version }))
        }
        Ok(None) => Err(no_release(&version)),
        Err(why) => Err(ApiError::new(StatusCode::CONFLICT, why)),
    }
}

/// One device a release is assigned to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceRollout {
    pub device: String,
    pub hostname: String,
    pub connected: bool,
    /// `pending` (no report for this version yet), an upgrade phase, or `committed`.
    pub state: String,
    pub upgrade: Option<UpgradeStatus>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ReleaseStatus {
    pub release: ReleaseView,
    pub devices: Vec<DeviceRollout>,
}

#[utoipa::path(get, path = "/v1/releases/{version}/status", params(("version" = String, Path)),
    responses((status = 200, body = ReleaseStatus), (status = 404, body = ApiError)))]
pub(super) async fn release_status(
    State(api): State<Api>,
    Path(version): Path<String>,
) -> ApiResult<ReleaseStatus> {
    let rec = api
        .store
        .release(&version)
        .await?
        .ok_or_else(|| no_release(&version))?;
    let assigned: std::collections::BTreeSet<String> = api
        .store
        .desired_os()
        .await?
        .into_iter()
        .filter(|(_, id, _)| *id == rec.id)
        .map(|(d, _, _)| d.to_string())
        .collect();
    let mut devices = Vec::new();
    for d in api.store.devices().await? {
        if !assigned.contains(d.id.as_str()) {
            continue;
        }
        let state = match &d.upgrade {
            Some(u) if u.version == version => u.phase.clone(),
            Some(u) if u.committed_version == version => "committed".into(),
            _ => "pending".into(),
        };
        devices.push(DeviceRollout {
            device: d.id.to_string(),
            hostname: d.hostname.clone(),
            connected: api.registry.is_online(&d.id),
            state,
            upgrade: d.upgrade,
        });
    }
    Ok(Json(ReleaseStatus {
        release: release_view(rec, devices.len()),
        devices,
    }))
}

// ------------------------------------------------------------ os resource

/// The desired OS of a target, as the API accepts it (in `POST /v1/state`, field `os`).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OsSpec {
    /// A stored release's version.
    pub version: String,
    /// Install it even if older than what the device committed.
    #[serde(default)]
    pub allow_downgrade: bool,
    /// Seconds the trial boot has to become healthy.
    #[serde(default = "default_health_timeout")]
    pub health_timeout_s: u32,
    /// `false`: a trial boot needs no hub contact to be judged healthy (offline boxes).
    #[serde(default = "default_true")]
    pub require_hub: bool,
    /// Shell commands that must exit 0 on the trial boot.
    #[serde(default)]
    pub health_commands: Vec<String>,
}

fn default_health_timeout() -> u32 {
    HealthSpec::default().timeout_s
}

fn default_true() -> bool {
    true
}

/// Builds the `os` resource for a stored release, with every currently trusted key.
/// Also returns the release's expected PCRs and its version.
pub(super) async fn os_resource(
    api: &Api,
    spec: OsSpec,
) -> Result<(Resource, BTreeMap<u32, String>), ApiError> {
    let rec = api
        .store
        .release(&spec.version)
        .await?
        .ok_or_else(|| no_release(&spec.version))?;
    let manifest = SignedManifest::from_bytes(&rec.manifest)
        .map_err(|e| internal("stored manifest does not decode", e))?;
    let keys = api.store.release_keys().await?;
    if !keys.iter().any(|k| k.key_id == rec.key_id) {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "release {} is signed with release key {}, which this hub no longer trusts, so devices would refuse it; add the key back (`cairn-hub release key add`) or push a release signed with a trusted key",
                rec.version, rec.key_id
            ),
        ));
    }
    let mut release_keys = Vec::new();
    for k in &keys {
        if let Some(b) = hex::decode(&k.public_key)
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
        {
            release_keys.push(b);
        }
    }
    if spec.health_timeout_s == 0 {
        return Err(ApiError::bad_request(
            "health_timeout_s must be above zero (the trial boot needs time to prove itself)",
        ));
    }
    let mut commands = Vec::new();
    for c in spec.health_commands {
        commands.push(Text::<512>::new(c).map_err(|e| {
            ApiError::bad_request(format!("health command: {e} (at most 512 bytes)"))
        })?);
    }
    let pcrs = release_view(rec, 0).expected_pcrs;
    Ok((
        Resource::Os(OsResource {
            manifest,
            release_keys,
            allow_downgrade: spec.allow_downgrade,
            health: HealthSpec {
                require_hub: spec.require_hub,
                timeout_s: spec.health_timeout_s,
                commands,
            },
        }),
        pcrs,
    ))
}

/// The name an OS resource must have (and that files may not take).
pub(super) fn check_name(name: &str, is_os: bool) -> Result<(), ApiError> {
    match (name == OS_RESOURCE, is_os) {
        (true, true) | (false, false) => Ok(()),
        (false, true) => Err(ApiError::bad_request(format!(
            "the desired OS is assigned under the resource name {OS_RESOURCE:?}, not {name:?}"
        ))),
        (true, false) => Err(ApiError::bad_request(format!(
            "the resource name {OS_RESOURCE:?} is reserved for the desired OS; name the file otherwise"
        ))),
    }
}
