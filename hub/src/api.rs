//! The admin API: HTTP/JSON over TLS, bearer-token authenticated, described by the
//! OpenAPI document it serves at `/v1/openapi.json`. The operator CLI and (later) the web
//! dashboard are its clients; nothing else changes hub state.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use base64::Engine;
use cairn_sync_protocol::state::{FileResource, MAX_PATH_LEN, Resource};
use cairn_sync_protocol::token::JoinToken;
use cairn_sync_protocol::{DeviceId, ResourceName, Text};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, OpenApi, ToSchema};

mod releases;

pub use releases::{
    AddReleaseKey, AddedReleaseKey, DeviceRollout, OsSpec, Pushed, ReleaseStatus, ReleaseView,
    bundle_path, clean_partial_pushes,
};

use crate::attest::{AttestPolicy, MeasurementSet};
use crate::desired::{Selector, Target, parse_labels};
use crate::endpoint::{Registry, now_ms};
use crate::pki::HubKeys;
use crate::store::{
    AssignOutcome, AttestRecord, Change, DeviceRecord, DynStore, EventFilter, EventRecord,
    LabelCount, NewToken, StoreError, TokenInfo,
};

/// State of the admin API handlers.
#[derive(Clone)]
pub struct Api {
    pub store: DynStore,
    pub registry: Arc<Registry>,
    pub keys: Arc<HubKeys>,
    /// `DATA_DIR/releases`: the stored release bundles.
    pub releases_dir: std::path::PathBuf,
}

/// An error as the API returns it: a status and a message saying what to do.
#[derive(Debug, Serialize, ToSchema)]
pub struct ApiError {
    #[serde(skip)]
    status: StatusCode,
    pub error: String,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>) -> Self {
        Self {
            status,
            error: error.into(),
        }
    }
    fn bad_request(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, e.to_string())
    }
    fn not_found(device: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("no device {device}; `cairn-hub devices` lists them"),
        )
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if let StoreError::Invalid(msg) = e {
            return Self::new(StatusCode::BAD_REQUEST, msg);
        }
        tracing::error!(error = %e, "store error in admin API");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("hub storage: {e}"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

fn parse_device(id: &str) -> Result<DeviceId, ApiError> {
    DeviceId::new(id).map_err(ApiError::bad_request)
}

/// A device as the API shows it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DeviceView {
    #[serde(flatten)]
    pub record: DeviceRecord,
    /// Connected to this hub process right now.
    pub connected: bool,
    /// Applied revision differs from the desired one, or resources fail.
    pub drift: bool,
}

/// One device with everything `cairn-hub device show --json` prints: its attestation,
/// desired state and events (the CLI's composition of several API calls, so that
/// scripts read it as one typed document).
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceDetail {
    pub device: DeviceView,
    pub attestation: Option<AttestRecord>,
    pub desired: DesiredView,
    pub events: Vec<EventRecord>,
}

fn view(api: &Api, record: DeviceRecord) -> DeviceView {
    DeviceView {
        connected: api.registry.is_online(&record.id),
        drift: record.drift(),
        record,
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreateToken {
    /// Seconds until the token expires.
    pub ttl_secs: u64,
    /// How many devices may enroll with it.
    pub uses: u32,
    /// Labels every device enrolled with it gets, as `k=v,k2=v2`.
    #[serde(default)]
    pub labels: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CreatedToken {
    /// The join token to give to `cairn-agent run --join-token`. Shown once.
    pub token: String,
    #[serde(flatten)]
    pub info: TokenInfo,
}

#[utoipa::path(post, path = "/v1/tokens", request_body = CreateToken,
    responses((status = 200, body = CreatedToken), (status = 400, body = ApiError)))]
async fn create_token(
    State(api): State<Api>,
    Json(req): Json<CreateToken>,
) -> ApiResult<CreatedToken> {
    if req.uses == 0 || req.ttl_secs == 0 {
        return Err(ApiError::bad_request(
            "a token needs at least one use and a ttl above zero",
        ));
    }
    const MAX_TTL_SECS: u64 = 10 * 366 * 24 * 3600;
    if req.ttl_secs > MAX_TTL_SECS {
        return Err(ApiError::bad_request(
            "a join token may live at most 10 years; prefer hours: tokens are for enrolling, not for keeping",
        ));
    }
    let labels = parse_labels(&req.labels).map_err(ApiError::bad_request)?;
    let mut token = JoinToken {
        id: [0; 8],
        secret: [0; 16],
        ca_fingerprint: api.keys.ca_fingerprint(),
    };
    rand::rngs::OsRng.fill_bytes(&mut token.id);
    rand::rngs::OsRng.fill_bytes(&mut token.secret);
    let now = now_ms();
    let info = api
        .store
        .create_token(NewToken {
            id: token.id_hex(),
            secret_hash: token.secret_hash(),
            created_ms: now,
            expires_ms: now.saturating_add(req.ttl_secs.saturating_mul(1000)),
            uses: req.uses,
            labels,
        })
        .await?;
    Ok(Json(CreatedToken {
        token: token.encode(),
        info,
    }))
}

#[utoipa::path(get, path = "/v1/tokens", responses((status = 200, body = Vec<TokenInfo>)))]
async fn list_tokens(State(api): State<Api>) -> ApiResult<Vec<TokenInfo>> {
    Ok(Json(api.store.tokens().await?))
}

#[utoipa::path(get, path = "/v1/devices", responses((status = 200, body = Vec<DeviceView>)))]
async fn list_devices(State(api): State<Api>) -> ApiResult<Vec<DeviceView>> {
    let devices = api.store.devices().await?;
    Ok(Json(devices.into_iter().map(|d| view(&api, d)).collect()))
}

#[utoipa::path(get, path = "/v1/devices/{id}", params(("id" = String, Path)),
    responses((status = 200, body = DeviceView), (status = 404, body = ApiError)))]
async fn show_device(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<DeviceView> {
    let d = parse_device(&id)?;
    match api.store.device(&d).await? {
        Some(rec) => Ok(Json(view(&api, rec))),
        None => Err(ApiError::not_found(&id)),
    }
}

/// One resource of a device's desired state, without its content.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ResourceView {
    pub name: String,
    pub kind: String,
    pub path: String,
    pub size: usize,
    /// SHA-256 of the content, hex.
    pub content_sha256: String,
    pub mode: u32,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    /// For `os`: the release's version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// For `os`: whether an older release may be installed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_downgrade: Option<bool>,
    /// For `os`: seconds the trial boot has to become healthy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_timeout_s: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DesiredView {
    pub device: String,
    pub revision: u64,
    pub resources: Vec<ResourceView>,
}

#[utoipa::path(get, path = "/v1/devices/{id}/state", params(("id" = String, Path)),
    responses((status = 200, body = DesiredView), (status = 404, body = ApiError)))]
async fn show_state(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<DesiredView> {
    let d = parse_device(&id)?;
    if api.store.device(&d).await?.is_none() {
        return Err(ApiError::not_found(&id));
    }
    let snapshot = api.store.state_snapshot(&d).await?;
    let (revision, upserts) = snapshot.map_or((0, Vec::new()), |u| (u.revision, u.upserts));
    let resources = upserts
        .into_iter()
        .map(|(name, res)| match res {
            Resource::File(f) => ResourceView {
                name: name.to_string(),
                kind: "file".into(),
                path: f.path.to_string(),
                size: f.content.len(),
                content_sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&f.content)),
                mode: f.mode,
                uid: f.uid,
                gid: f.gid,
                version: None,
                allow_downgrade: None,
                health_timeout_s: None,
            },
            // A release: the manifest's version and id (what the device installs).
            Resource::Os(o) => ResourceView {
                name: name.to_string(),
                kind: "os".into(),
                path: String::new(),
                size: o.manifest.body.len(),
                content_sha256: o.manifest.id().to_hex(),
                mode: 0,
                uid: None,
                gid: None,
                version: o
                    .manifest
                    .decode_unverified()
                    .ok()
                    .map(|m| m.version.to_string()),
                allow_downgrade: Some(o.allow_downgrade),
                health_timeout_s: Some(o.health.timeout_s),
            },
        })
        .collect();
    Ok(Json(DesiredView {
        device: id,
        revision,
        resources,
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Revoked {
    pub device: String,
    /// Whether a live connection was closed.
    pub disconnected: bool,
}

#[utoipa::path(post, path = "/v1/devices/{id}/revoke", params(("id" = String, Path)),
    responses((status = 200, body = Revoked), (status = 404, body = ApiError)))]
async fn revoke_device(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<Revoked> {
    let d = parse_device(&id)?;
    if !api.store.revoke(&d, now_ms()).await? {
        return Err(ApiError::not_found(&id));
    }
    let disconnected = api
        .registry
        .revoke(&d, &format!("device {d} was revoked by the operator"));
    tracing::info!(device = %d, disconnected, "device revoked");
    Ok(Json(Revoked {
        device: id,
        disconnected,
    }))
}

#[utoipa::path(get, path = "/v1/devices/{id}/attestation", params(("id" = String, Path)),
    responses((status = 200, body = AttestRecord), (status = 404, body = ApiError),
        (status = 409, body = ApiError, description = "the device exists but enrolled without attestation")))]
async fn show_attestation(
    State(api): State<Api>,
    Path(id): Path<String>,
) -> ApiResult<AttestRecord> {
    let d = parse_device(&id)?;
    match api.store.attestation(&d).await? {
        Some(rec) => Ok(Json(rec)),
        // The device is there (not a 404: `device accept` must not say "no such
        // device"); what is asked of it does not apply.
        None if api.store.device(&d).await?.is_some() => Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "device {id} enrolled without a TPM or software attester; it has no attestation"
            ),
        )),
        None => Err(ApiError::not_found(&id)),
    }
}

/// The boot event log a device's last verified evidence replayed to.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventLogView {
    pub device: String,
    /// When that evidence verified.
    pub verified_ms: Option<u64>,
    /// The PCR values (hex) it replays to.
    pub pcrs: BTreeMap<u32, String>,
    /// The TCG PC Client log (crypto-agile), base64.
    pub log_base64: String,
    pub len: usize,
}

#[utoipa::path(get, path = "/v1/devices/{id}/attestation/log", params(("id" = String, Path)),
    responses((status = 200, body = EventLogView), (status = 404, body = ApiError)))]
async fn show_event_log(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<EventLogView> {
    use base64::Engine as _;
    let d = parse_device(&id)?;
    let Some(rec) = api.store.attestation(&d).await? else {
        return Err(ApiError::not_found(&id));
    };
    if rec.log.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "device {id} has sent no boot event log (no measured boot, or not attested yet)"
            ),
        ));
    }
    Ok(Json(EventLogView {
        device: id,
        verified_ms: rec.verified_ms,
        pcrs: rec.pcrs.clone(),
        log_base64: base64::engine::general_purpose::STANDARD.encode(&rec.log),
        len: rec.log.len(),
    }))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AcceptRequest {
    /// `verified_ms` of the measurements you reviewed: refused if newer ones arrived.
    pub verified_ms: Option<u64>,
}

#[utoipa::path(post, path = "/v1/devices/{id}/attestation/accept", params(("id" = String, Path)),
    request_body = Option<AcceptRequest>,
    responses((status = 200, body = AttestRecord), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
async fn accept_measurements(
    State(api): State<Api>,
    Path(id): Path<String>,
    body: Option<Json<AcceptRequest>>,
) -> ApiResult<AttestRecord> {
    let d = parse_device(&id)?;
    if api.store.device(&d).await?.is_none() {
        return Err(ApiError::not_found(&id));
    }
    let seen = body.and_then(|Json(b)| b.verified_ms);
    match api.store.accept_measurements(&d, seen, now_ms()).await? {
        Ok(rec) => {
            tracing::info!(device = %d, "operator accepted the device's measurements");
            // A quarantined session re-reads its status when notified.
            api.registry.notify(&d);
            Ok(Json(rec))
        }
        Err(why) => Err(ApiError::new(StatusCode::CONFLICT, why)),
    }
}

#[utoipa::path(post, path = "/v1/devices/{id}/attestation/expected", params(("id" = String, Path)),
    request_body = MeasurementSet,
    responses((status = 200, body = AttestRecord), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
async fn expect_measurements(
    State(api): State<Api>,
    Path(id): Path<String>,
    Json(mut set): Json<MeasurementSet>,
) -> ApiResult<AttestRecord> {
    let d = parse_device(&id)?;
    if set.source.trim().is_empty() || set.pcrs.is_empty() {
        return Err(ApiError::bad_request(
            "an expected measurement set needs a source (what it is, e.g. `release 2.0`) and PCR values",
        ));
    }
    for (pcr, v) in &mut set.pcrs {
        *v = v.to_lowercase();
        if *pcr > 23 || crate::attest::parse_pcr(v).is_none() {
            return Err(ApiError::bad_request(format!(
                "PCR {pcr} = {v:?}: PCRs are 0-23 with 64 hex digits (sha256)"
            )));
        }
    }
    set.added_ms = now_ms();
    if !api.store.expect_measurements(&d, set).await? {
        return Err(ApiError::not_found(&id));
    }
    match api.store.attestation(&d).await? {
        Some(rec) => Ok(Json(rec)),
        None => Err(ApiError::not_found(&id)),
    }
}

#[derive(Debug, Deserialize, ToSchema, IntoParams)]
pub struct SourceQuery {
    /// The source of the sets to remove.
    pub source: String,
}

#[utoipa::path(delete, path = "/v1/devices/{id}/attestation/expected", params(("id" = String, Path), SourceQuery),
    responses((status = 200, body = AttestRecord), (status = 404, body = ApiError)))]
async fn retire_measurements(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(q): Query<SourceQuery>,
) -> ApiResult<AttestRecord> {
    let d = parse_device(&id)?;
    if api.store.retire_measurements(&d, &q.source).await? == 0 {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "device {id} has no expected measurements from {:?}",
                q.source
            ),
        ));
    }
    match api.store.attestation(&d).await? {
        Some(rec) => Ok(Json(rec)),
        None => Err(ApiError::not_found(&id)),
    }
}

#[utoipa::path(get, path = "/v1/attestation/policies",
    responses((status = 200, body = Vec<AttestPolicy>)))]
async fn list_policies(State(api): State<Api>) -> ApiResult<Vec<AttestPolicy>> {
    Ok(Json(api.store.policies().await?))
}

#[utoipa::path(put, path = "/v1/attestation/policies", request_body = AttestPolicy,
    responses((status = 200, body = AttestPolicy), (status = 400, body = ApiError)))]
async fn put_policy(
    State(api): State<Api>,
    Json(policy): Json<AttestPolicy>,
) -> ApiResult<AttestPolicy> {
    policy.validate().map_err(ApiError::bad_request)?;
    api.store.put_policy(policy.clone()).await?;
    tracing::info!(policy = %policy.name, selector = %policy.selector, "attestation policy set");
    Ok(Json(policy))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Deleted {
    pub name: String,
}

#[utoipa::path(delete, path = "/v1/attestation/policies/{name}", params(("name" = String, Path)),
    responses((status = 200, body = Deleted), (status = 404, body = ApiError)))]
async fn delete_policy(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<Deleted> {
    if api.store.delete_policy(&name).await? {
        Ok(Json(Deleted { name }))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no attestation policy named {name}; list them with `cairn-hub policy ls`"),
        ))
    }
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct SetLabels {
    /// The complete new label set, `k=v,k2=v2`.
    pub labels: String,
}

#[utoipa::path(put, path = "/v1/devices/{id}/labels", params(("id" = String, Path)), request_body = SetLabels,
    responses((status = 200, body = AssignOutcome), (status = 404, body = ApiError)))]
async fn set_labels(
    State(api): State<Api>,
    Path(id): Path<String>,
    Json(req): Json<SetLabels>,
) -> ApiResult<AssignOutcome> {
    let d = parse_device(&id)?;
    let labels = parse_labels(&req.labels).map_err(ApiError::bad_request)?;
    let out = api
        .store
        .set_labels(&d, labels, now_ms())
        .await?
        .ok_or_else(|| ApiError::not_found(&id))?;
    notify_changed(&api, &out);
    Ok(Json(out))
}

/// A managed file as the API accepts it.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct FileSpec {
    /// Path below the agent's files root, e.g. `etc/motd`.
    pub path: String,
    /// UTF-8 content (or use `content_base64`).
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub content_base64: Option<String>,
    /// Permission bits, e.g. 420 (0644).
    #[serde(default = "default_mode")]
    pub mode: u32,
    #[serde(default)]
    pub uid: Option<u32>,
    #[serde(default)]
    pub gid: Option<u32>,
}

fn default_mode() -> u32 {
    0o644
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct StateChange {
    /// One device id, or…
    #[serde(default)]
    pub device: Option<String>,
    /// …a label selector such as `site=paris,role=kiosk`.
    #[serde(default)]
    pub selector: Option<String>,
    /// Resource name, e.g. `motd`.
    pub name: String,
    /// Set this file; absent (and no `os`) means remove the resource from the target.
    #[serde(default)]
    pub file: Option<FileSpec>,
    /// Set the desired OS release (resource name `os`).
    #[serde(default)]
    pub os: Option<releases::OsSpec>,
}

pub fn validate_path(path: &str) -> Result<(), String> {
    let trimmed = path.trim_start_matches('/');
    if trimmed.is_empty() {
        return Err("file path is empty".into());
    }
    if path.contains('\0') {
        return Err("file path contains a NUL byte".into());
    }
    if trimmed
        .split('/')
        .any(|c| c == ".." || c == "." || c.is_empty())
    {
        return Err(format!(
            "file path {path:?} has an empty, '.' or '..' component; give a plain path below the agent's files root"
        ));
    }
    Ok(())
}

fn to_resource(spec: FileSpec) -> Result<Resource, ApiError> {
    validate_path(&spec.path).map_err(ApiError::bad_request)?;
    let content = match (spec.content, spec.content_base64) {
        (Some(s), None) => s.into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .map_err(|e| ApiError::bad_request(format!("content_base64: {e}")))?,
        (None, None) => Vec::new(),
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give content or content_base64, not both",
            ));
        }
    };
    if spec.mode > 0o7777 {
        return Err(ApiError::bad_request(format!(
            "mode {:o} has bits above 07777",
            spec.mode
        )));
    }
    Ok(Resource::File(FileResource {
        path: Text::<MAX_PATH_LEN>::new(spec.path).map_err(ApiError::bad_request)?,
        content,
        mode: spec.mode,
        uid: spec.uid,
        gid: spec.gid,
    }))
}

#[utoipa::path(post, path = "/v1/state", request_body = StateChange,
    responses((status = 200, body = AssignOutcome), (status = 400, body = ApiError)))]
async fn change_state(
    State(api): State<Api>,
    Json(req): Json<StateChange>,
) -> ApiResult<AssignOutcome> {
    let target = match (req.device, req.selector) {
        (Some(d), None) => {
            let d = parse_device(&d)?;
            if api.store.device(&d).await?.is_none() {
                return Err(ApiError::not_found(d.as_str()));
            }
            Target::Device(d)
        }
        (None, Some(s)) => Target::Selector(s.parse::<Selector>().map_err(ApiError::bad_request)?),
        _ => {
            return Err(ApiError::bad_request(
                "give exactly one of device or selector",
            ));
        }
    };
    let name = ResourceName::new(&req.name).map_err(ApiError::bad_request)?;
    let mut expected = None;
    let change = match (req.file, req.os) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request("give file or os, not both"));
        }
        (Some(spec), None) => {
            releases::check_name(name.as_str(), false)?;
            Change::Set(name, to_resource(spec)?)
        }
        (None, Some(os)) => {
            releases::check_name(name.as_str(), true)?;
            let version = os.version.clone();
            let (res, pcrs) = releases::os_resource(&api, os).await?;
            if !pcrs.is_empty() {
                expected = Some(MeasurementSet {
                    source: format!("{}{version}", crate::attest::SOURCE_RELEASE),
                    added_ms: now_ms(),
                    pcrs,
                });
            }
            Change::Set(name, res)
        }
        (None, None) => Change::Unset(name),
    };
    let out = api.store.assign(target.clone(), change, now_ms()).await?;
    tracing::info!(%target, matched = out.matched, changed = out.changed.len(), "desired state changed");
    // A release that predicts its measurements: its devices may boot them without
    // quarantine (attested devices only; the others have nothing to compare).
    if let Some(set) = expected {
        for (device, _) in &out.changed {
            if api.store.expect_measurements(device, set.clone()).await? {
                tracing::info!(%device, source = %set.source, "expected measurements registered");
            }
        }
    }
    notify_changed(&api, &out);
    Ok(Json(out))
}

fn notify_changed(api: &Api, out: &AssignOutcome) {
    for (device, _) in &out.changed {
        api.registry.notify(device);
    }
}

#[derive(Debug, Deserialize, IntoParams)]
pub struct EventQuery {
    pub device: Option<String>,
    pub kind: Option<String>,
    /// Only events with a larger id.
    #[serde(default)]
    pub after: u64,
    #[serde(default = "default_limit")]
    pub limit: usize,
    /// If no event matches, wait up to this many milliseconds for one (long poll).
    #[serde(default)]
    pub wait_ms: u64,
}

fn default_limit() -> usize {
    1000
}

#[utoipa::path(get, path = "/v1/events", params(EventQuery),
    responses((status = 200, body = Vec<EventRecord>)))]
async fn list_events(
    State(api): State<Api>,
    Query(q): Query<EventQuery>,
) -> ApiResult<Vec<EventRecord>> {
    let filter = EventFilter {
        device: q.device.as_deref().map(parse_device).transpose()?,
        kind: q.kind,
        after_id: q.after,
        limit: q.limit.min(100_000),
    };
    let mut watch = api.store.event_watch();
    let deadline = tokio::time::Instant::now() + Duration::from_millis(q.wait_ms.min(60_000));
    loop {
        let events = api.store.events(filter.clone()).await?;
        if !events.is_empty() || q.wait_ms == 0 {
            return Ok(Json(events));
        }
        match tokio::time::timeout_at(deadline, watch.changed()).await {
            Ok(Ok(())) => continue,
            _ => return Ok(Json(events)),
        }
    }
}

#[utoipa::path(get, path = "/v1/labels", responses((status = 200, body = Vec<LabelCount>)))]
async fn list_labels(State(api): State<Api>) -> ApiResult<Vec<LabelCount>> {
    Ok(Json(api.store.labels().await?))
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub connected_devices: usize,
    /// SHA-256 fingerprint of the hub CA (what join tokens pin), hex.
    pub ca_fingerprint: String,
    /// Release bytes served to agents on fetch streams since the hub started.
    pub fetch_bytes_served: u64,
    /// Fetch requests answered with data / refused since the hub started.
    pub fetch_served: u64,
    pub fetch_refused: u64,
}

#[utoipa::path(get, path = "/v1/health", responses((status = 200, body = Health)))]
async fn health(State(api): State<Api>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        connected_devices: api.registry.online_count(),
        ca_fingerprint: hex::encode(api.keys.ca_fingerprint()),
        fetch_bytes_served: api.registry.fetch.bytes.load(Ordering::Relaxed),
        fetch_served: api.registry.fetch.served.load(Ordering::Relaxed),
        fetch_refused: api.registry.fetch.refused.load(Ordering::Relaxed),
    })
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Cairn hub admin API",
        description = "Operate a Cairn fleet: enrollment tokens, devices, desired state, events. Authenticate with `Authorization: Bearer <admin token>` (the hub writes it to DATA_DIR/admin-token)."
    ),
    paths(
        create_token,
        list_tokens,
        list_devices,
        show_device,
        revoke_device,
        show_attestation,
        show_event_log,
        accept_measurements,
        expect_measurements,
        retire_measurements,
        list_policies,
        put_policy,
        delete_policy,
        set_labels,
        change_state,
        list_events,
        list_labels,
        health,
        releases::add_release_key,
        releases::list_release_keys,
        releases::remove_release_key,
        releases::push_release,
        releases::list_releases,
        releases::show_release,
        releases::delete_release,
        releases::release_status
    ),
    components(schemas(
        ApiError,
        CreateToken,
        CreatedToken,
        TokenInfo,
        DeviceView,
        DeviceRecord,
        Revoked,
        AttestRecord,
        EventLogView,
        AcceptRequest,
        AttestPolicy,
        MeasurementSet,
        Deleted,
        SetLabels,
        FileSpec,
        StateChange,
        AssignOutcome,
        EventRecord,
        LabelCount,
        Health,
        crate::store::ReleaseKeyRecord,
        crate::store::ReleaseRecord,
        crate::store::PayloadInfo,
        crate::store::UpgradeStatus,
        releases::AddReleaseKey,
        releases::AddedReleaseKey,
        releases::ReleaseView,
        releases::Pushed,
        releases::ReleaseStatus,
        releases::DeviceRollout,
        releases::OsSpec
    ))
)]
pub struct ApiDoc;

async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

async fn require_token(
    State(api): State<Api>,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let ok: bool =
        subtle::ConstantTimeEq::ct_eq(presented.as_bytes(), api.keys.admin_token.as_bytes()).into();
    if ok {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "missing or wrong admin token: send `Authorization: Bearer <token>` with the token from the hub's DATA_DIR/admin-token",
        )
        .into_response()
    }
}

/// The admin API's routes.
pub fn router(api: Api) -> Router {
    let protected = Router::new()
        .route("/v1/tokens", post(create_token).get(list_tokens))
        .route("/v1/devices", get(list_devices))
        .route("/v1/devices/{id}", get(show_device))
        .route("/v1/devices/{id}/state", get(show_state))
        .route("/v1/devices/{id}/revoke", post(revoke_device))
        .route("/v1/devices/{id}/labels", put(set_labels))
        .route("/v1/devices/{id}/attestation", get(show_attestation))
        .route("/v1/devices/{id}/attestation/log", get(show_event_log))
        .route(
            "/v1/devices/{id}/attestation/accept",
            post(accept_measurements),
        )
        .route(
            "/v1/attestation/policies",
            get(list_policies).put(put_policy),
        )
        .route(
            "/v1/devices/{id}/attestation/expected",
            post(expect_measurements).delete(retire_measurements),
        )
        .route("/v1/attestation/policies/{name}", delete(delete_policy))
        .route("/v1/state", post(change_state))
        .route("/v1/events", get(list_events))
        .route("/v1/labels", get(list_labels))
        .route(
            "/v1/release-keys",
            get(releases::list_release_keys).post(releases::add_release_key),
        )
        .route(
            "/v1/release-keys/{key_id}",
            delete(releases::remove_release_key),
        )
        .route(
            "/v1/releases",
            get(releases::list_releases)
                .post(releases::push_release)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/releases/{version}",
            get(releases::show_release).delete(releases::delete_release),
        )
        .route(
            "/v1/releases/{version}/status",
            get(releases::release_status),
        )
        .route_layer(middleware::from_fn_with_state(api.clone(), require_token));
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/openapi.json", get(openapi))
        .merge(protected)
        .with_state(api)
}

/// Serves the admin API over TLS until the task is dropped.
pub async fn serve(listener: tokio::net::TcpListener, api: Api) -> Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(api.keys.tls_chain(), api.keys.tls_key())
        .context("admin API certificate")?;
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let app = router(api);
    loop {
        let (tcp, peer): (_, SocketAddr) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "admin API accept");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let app = app.clone();
        tokio::spawn(async move {
            let tls = match acceptor.accept(tcp).await {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "admin TLS handshake failed");
                    return;
                }
            };
            let svc = hyper_util::service::TowerToHyperService::new(app);
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            if let Err(e) = builder
                .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                .await
            {
                tracing::debug!(%peer, error = %e, "admin connection");
            }
        });
    }
}
