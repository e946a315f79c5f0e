//! The agents' QUIC endpoint: TLS setup, and one task per connection that drives a
//! [`HubSession`] with the store.
//!
//! Every connection carries one bidirectional stream opened by the agent: the session. A
//! connection without a client certificate may only enroll; a sync needs a device
//! certificate issued by this hub's CA, for a known device that is not revoked. Once a
//! sync session is established, further bidirectional streams the agent opens are
//! release fetch streams ([`fetch`]), at most two at a time.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use cairn_sync_protocol::hub::{HubEvent, HubSession};
use cairn_sync_protocol::message::{ALPN, EnrollRequest, EnrollResponse, Refusal, RefusalCode};
use cairn_sync_protocol::token::JoinToken;
use cairn_sync_protocol::{DeviceId, SessionConfig, SessionError, Text};
use quinn::VarInt;
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use tokio::sync::Notify;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::attest::AttestConfig;
use crate::pki::{self, HubKeys};
use crate::store::{DynStore, EnrollRefusal, Enrollment};
use crate::sync::{Action, Gate, SyncCore};

mod attest;
mod fetch;
use crate::evidence::PendingChallenge;
use attest::PendingEnroll;

/// The fetch refusal while a session's evidence is pending: the agent retries it.
static NOT_YET_REFUSAL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    format!(
        "{}; fetch once it has",
        cairn_sync_protocol::release::REFUSED_NOT_YET
    )
});
pub use fetch::MAX_FETCH_STREAMS;

/// Transport knobs of the agent endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    pub listen: SocketAddr,
    /// A connection with no packet for this long is dead (agents send keep-alives).
    pub idle_timeout: Duration,
    pub session: SessionConfig,
}

impl Default for EndpointConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 7440)),
            idle_timeout: Duration::from_secs(30),
            session: SessionConfig::default(),
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Live sessions, one per device.
#[derive(Default)]
pub struct Registry {
    live: Mutex<HashMap<DeviceId, Live>>,
    /// Devices revoked while this process runs, so that a session that was still in
    /// its handshake when the revocation came cannot register afterwards.
    revoked: Mutex<std::collections::HashSet<DeviceId>>,
    next_id: AtomicU64,
    /// What fetch streams served.
    pub fetch: FetchStats,
}

/// Counters of the release fetch streams (for the health endpoint and benchmarks).
#[derive(Default)]
pub struct FetchStats {
    /// Payload and index bytes written to agents.
    pub bytes: AtomicU64,
    /// Requests answered with data.
    pub served: AtomicU64,
    /// Requests refused (bad, unknown, oversized, malformed, busy).
    pub refused: AtomicU64,
}

struct Live {
    session_id: u64,
    conn: quinn::Connection,
    notify: Arc<Notify>,
}

impl Registry {
    /// Registers a session; `None` if the device was revoked meanwhile.
    fn register(
        &self,
        device: &DeviceId,
        conn: quinn::Connection,
        notify: Arc<Notify>,
    ) -> Option<u64> {
        // Ids start at 1: 0 means "no session" in the store.
        let session_id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let mut live = self.live.lock().ok()?;
        if self.revoked.lock().is_ok_and(|r| r.contains(device)) {
            return None;
        }
        let old = live.insert(
            device.clone(),
            Live {
                session_id,
                conn,
                notify,
            },
        );
        drop(live);
        if let Some(old) = old {
            old.conn.close(
                VarInt::from_u32(0),
                b"superseded by a newer connection from the same device",
            );
        }
        Some(session_id)
    }

    /// Removes the session if it is still the registered one; `true` if it was.
    fn unregister(&self, device: &DeviceId, session_id: u64) -> bool {
        let Ok(mut m) = self.live.lock() else {
            return false;
        };
        if m.get(device).is_some_and(|l| l.session_id == session_id) {
            m.remove(device);
            true
        } else {
            false
        }
    }

    /// Wakes a device's session to push its newest desired state.
    pub fn notify(&self, device: &DeviceId) {
        if let Some(l) = self.live.lock().ok().as_ref().and_then(|m| m.get(device)) {
            l.notify.notify_one();
        }
    }

    /// Marks a device revoked and closes its connection at once, telling it why.
    pub fn revoke(&self, device: &DeviceId, reason: &str) -> bool {
        let live = self.live.lock().ok().and_then(|mut m| {
            if let Ok(mut r) = self.revoked.lock() {
                r.insert(device.clone());
            }
            m.remove(device)
        });
        let code = RefusalCode::DeviceRevoked;
        match live {
            Some(l) => {
                l.conn
                    .close(VarInt::from_u32(code.close_code()), reason.as_bytes());
                true
            }
            None => false,
        }
    }

    pub fn is_online(&self, device: &DeviceId) -> bool {
        self.live
            .lock()
            .map(|m| m.contains_key(device))
            .unwrap_or(false)
    }

    pub fn online_count(&self) -> usize {
        self.live.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Closes every connection (hub shutdown).
    pub fn close_all(&self) {
        if let Ok(mut m) = self.live.lock() {
            for (_, l) in m.drain() {
                l.conn.close(
                    VarInt::from_u32(RefusalCode::ShuttingDown.close_code()),
                    b"hub shutting down",
                );
            }
        }
    }
}

/// What a connection task needs.
pub struct Shared {
    pub store: DynStore,
    pub keys: Arc<HubKeys>,
    pub registry: Arc<Registry>,
    pub session: SessionConfig,
    pub attest: AttestConfig,
    /// `DATA_DIR/releases`: where fetch streams read bundles.
    pub releases_dir: std::path::PathBuf,
    /// Fetch streams served at once, hub-wide ([`MAX_FETCH_STREAMS`]).
    pub fetch_slots: Arc<tokio::sync::Semaphore>,
}

/// Builds the QUIC endpoint: TLS 1.3 with the hub certificate, client certificates
/// optional (enrollment has none) and verified against the hub CA when present, and
/// reset/connection-id keys that survive restarts.
pub fn bind(keys: &HubKeys, cfg: &EndpointConfig) -> Result<quinn::Endpoint> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    roots
        .add(keys.ca_cert_der.clone())
        .context("adding the hub CA to the client-certificate roots")?;
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .context("building the client-certificate verifier")?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(keys.tls_chain(), keys.tls_key())
        .context("loading the hub certificate")?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let quic_tls = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(quic_tls));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(cfg.idle_timeout.try_into()?))
        // The session stream, plus up to two release fetch streams.
        .max_concurrent_bidi_streams(3u8.into())
        .max_concurrent_uni_streams(0u8.into())
        // Larger than the biggest report batch (512 reports of at most ~600 bytes), so an
        // agent's write never waits for the hub to read: the hub may be busy writing a
        // large snapshot to that same agent.
        .stream_receive_window(VarInt::from_u32(1024 * 1024))
        .receive_window(VarInt::from_u32(2 * 1024 * 1024))
        .send_window(512 * 1024)
        .datagram_receive_buffer_size(None);
    server.transport_config(Arc::new(transport));

    let mut endpoint_cfg = quinn::EndpointConfig::new(Arc::new(ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &keys.reset_key,
    )));
    let cid_key = keys.cid_key;
    endpoint_cfg
        .cid_generator(move || {
            Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
        })
        .min_reset_interval(Duration::from_millis(1));
    let socket = std::net::UdpSocket::bind(cfg.listen)
        .with_context(|| format!("binding UDP {}", cfg.listen))?;
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = Arc::new(OneSegmentSocket(quinn::Runtime::wrap_udp_socket(
        &*runtime, socket,
    )?));
    let endpoint =
        quinn::Endpoint::new_with_abstract_socket(endpoint_cfg, Some(server), socket, runtime)?;
    Ok(endpoint)
}

/// The UDP socket without GSO batching (one datagram per send).
///
/// quinn keeps a send buffer per connection and, the first time a connection has two
/// datagrams to send at once (every handshake: the hub's certificate flight), grows it
/// to `max_transmit_segments` (10) × MTU and never shrinks it: ~13 KB per connection,
/// the largest single item of an idle connection's memory (measured: idle RSS at 3,000
/// agents 210 -> 194 MB). Hub traffic is small messages; batching sends buys little.
#[derive(Debug)]
struct OneSegmentSocket(Arc<dyn quinn::AsyncUdpSocket>);

impl quinn::AsyncUdpSocket for OneSegmentSocket {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        self.0.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        1
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

/// Accepts connections until the endpoint closes. Connection tasks live in a `JoinSet`
/// owned by this loop, so aborting the loop (hub shutdown) ends every one of them and
/// releases the endpoint.
pub async fn accept_loop(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let shared = shared.clone();
                let remote = incoming.remote_address();
                tasks.spawn(
                    async move {
                        match incoming.await {
                            Ok(conn) => handle_connection(shared, conn).await,
                            // Unknown client certificates, wrong CA pins, scanners: say why.
                    Err(e) => info!(error = %e, "connection refused during the TLS handshake"),
                        }
                    }
                    .instrument(info_span!("conn", %remote)),
                );
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
}

fn close_with(conn: &quinn::Connection, code: RefusalCode, message: &str) {
    conn.close(VarInt::from_u32(code.close_code()), message.as_bytes());
}

fn refusal(code: RefusalCode, message: &str) -> Refusal {
    Refusal {
        code,
        message: Text::truncated(message),
    }
}

async fn handle_connection(shared: Arc<Shared>, conn: quinn::Connection) {
    let cert_device = match peer_device(&conn) {
        Ok(d) => d,
        Err(e) => {
            close_with(&conn, RefusalCode::UnknownDevice, &e.to_string());
            return;
        }
    };
    let stream = tokio::time::timeout(shared.session.handshake_timeout, conn.accept_bi()).await;
    let (send, recv) = match stream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            debug!(error = %e, "connection ended before a stream opened");
            return;
        }
        Err(_) => {
            close_with(
                &conn,
                RefusalCode::Timeout,
                "no stream opened in time; try again",
            );
            return;
        }
    };
    let shared_interval = shared.attest.interval;
    let mut conn_task = Connection {
        session: HubSession::new(Instant::now(), &shared.session),
        shared,
        conn: conn.clone(),
        send,
        recv,
        cert_device,
        device: None,
        notify: Arc::new(Notify::new()),
        session_id: 0,
        core: SyncCore::new(shared_interval),
        challenge: None,
        pending_enroll: None,
        fetches: None,
    };
    let result = conn_task.run().await;
    conn_task.finish(result).await;
}

fn peer_device(conn: &quinn::Connection) -> Result<Option<DeviceId>> {
    let Some(identity) = conn.peer_identity() else {
        return Ok(None);
    };
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| anyhow::anyhow!("unexpected peer identity type"))?;
    match certs.first() {
        Some(c) => Ok(Some(pki::device_id_from_cert(c)?)),
        None => Ok(None),
    }
}

/// Why a connection task ended.
enum End {
    /// The session said so (refusal sent, enrollment done, peer closed, protocol error).
    Session(Option<SessionError>),
    /// The transport failed.
    Transport(String),
    /// The store failed; the agent retries later.
    Store(String),
}

struct Connection {
    shared: Arc<Shared>,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    session: HubSession,
    cert_device: Option<DeviceId>,
    device: Option<DeviceId>,
    /// Woken by the registry when this device's desired state changed.
    notify: Arc<Notify>,
    session_id: u64,
    /// What to send, when to acknowledge and challenge, whether the gate is open: the
    /// decisions, which this task carries out.
    core: SyncCore,
    /// The challenge waiting for evidence.
    challenge: Option<PendingChallenge>,
    /// An enrollment waiting for its evidence.
    pending_enroll: Option<PendingEnroll>,
    /// Fetch streams being served; created at the first one (idle connections hold
    /// nothing), ended with the connection.
    fetches: Option<tokio::task::JoinSet<()>>,
}

impl Connection {
    async fn run(&mut self) -> End {
        loop {
            if let Err(end) = self.drive().await {
                let _ = self.flush().await;
                return end;
            }
            if let Err(e) = self.flush().await {
                return End::Transport(e);
            }
            while let Some(ev) = self.session.poll_event() {
                if let Err(end) = self.handle_event(ev).await {
                    let _ = self.flush().await;
                    return end;
                }
                if let Err(end) = self.drive().await {
                    let _ = self.flush().await;
                    return end;
                }
            }
            if let Err(e) = self.flush().await {
                return End::Transport(e);
            }
            if self.session.is_done() {
                return End::Session(None);
            }
            let deadline = self.session.poll_timeout();
            let challenge_at = self.core.poll_timeout();
            let notify = self.notify.clone();
            tokio::select! {
                biased;
                // read_chunk hands over quinn's own buffer: no per-connection read buffer.
                r = self.recv.read_chunk(64 * 1024, true) => match r {
                    Ok(Some(chunk)) => self.session.handle_input(Instant::now(), &chunk.bytes),
                    Ok(None) => self.session.handle_end_of_stream(),
                    Err(e) => return End::Transport(e.to_string()),
                },
                () = notify.notified() => self.core.state_changed(),
                () = sleep_until_opt(deadline) => self.session.handle_timeout(Instant::now()),
                // Fetch streams, once the session is established for a known device.
                r = self.conn.accept_bi(), if self.device.is_some() => match r {
                    Ok((send, recv)) => {
                        if let Some(device) = self.device.clone() {
                            let shared = self.shared.clone();
                            // Release bytes flow only where desired state may: not
                            // before this session's evidence verified, nor in quarantine.
                            let deny = match self.core.gate() {
                                Gate::Open => None,
                                Gate::Evidence => Some(NOT_YET_REFUSAL.as_str()),
                                Gate::Quarantined => Some("the device is quarantined; nothing is served until it is trusted again"),
                            };
                            self.fetches
                                .get_or_insert_with(tokio::task::JoinSet::new)
                                .spawn(fetch::serve(shared, device, send, recv, deny).in_current_span());
                        }
                    }
                    Err(e) => return End::Transport(e.to_string()),
                },
                Some(_) = join_opt(&mut self.fetches) => {}
                () = sleep_until_opt(challenge_at) => self.core.handle_timeout(Instant::now()),
            }
        }
    }

    async fn flush(&mut self) -> Result<(), String> {
        while let Some(bytes) = self.session.poll_transmit() {
            self.send
                .write_all(&bytes)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    async fn handle_event(&mut self, ev: HubEvent) -> Result<(), End> {
        match ev {
            HubEvent::EnrollRequested {
                agent_version,
                request,
            } => self.enroll(agent_version, request).await,
            HubEvent::SyncRequested {
                agent_version,
                state_revision,
            } => {
                let _ = agent_version;
                self.start_sync(state_revision).await
            }
            HubEvent::Reports(reports) => {
                self.core.reports(reports);
                Ok(())
            }
            HubEvent::ReportsLost { from, to } => {
                warn!(device = ?self.device, from, to, "agent declares reports lost (this hub's database went back in time)");
                self.core.reports_lost(from, to);
                Ok(())
            }
            HubEvent::StateAcked { revision } => {
                self.core.acked(revision);
                Ok(())
            }
            HubEvent::ResyncRequested { state_revision } => {
                info!(device = ?self.device, state_revision, "agent asked for a full snapshot");
                self.core.resync(state_revision);
                Ok(())
            }
            HubEvent::Evidence(e) => self.evidence(e).await,
            HubEvent::Failed(e) => Err(End::Session(Some(e))),
        }
    }

    async fn refuse(&mut self, code: RefusalCode, message: &str) -> Result<(), End> {
        warn!(device = ?self.cert_device, ?code, reason = message, "refused");
        self.session.refuse(refusal(code, message));
        let _ = self.flush().await;
        close_with(&self.conn, code, message);
        Err(End::Session(None))
    }

    async fn enroll(&mut self, agent_version: String, req: EnrollRequest) -> Result<(), End> {
        if let Some(d) = &self.cert_device {
            let msg =
                format!("this connection already carries the certificate of {d}; it is enrolled");
            return self.refuse(RefusalCode::ProtocolViolation, &msg).await;
        }
        let Ok((token_id, secret_hash)) = JoinToken::parse_credential(req.token.as_str()) else {
            return self
                .refuse(
                    RefusalCode::UnknownToken,
                    "join token is malformed; create a new one with `cairn-hub token create`",
                )
                .await;
        };
        let (device, cert) = match self.shared.keys.issue_device_cert(&req.csr_der) {
            Ok(x) => x,
            Err(e) => {
                return self.refuse(RefusalCode::BadCsr, &e.to_string()).await;
            }
        };
        let pending = PendingEnroll {
            agent_version,
            token_id,
            secret_hash,
            device,
            cert,
            hostname: req.hostname.as_str().to_string(),
            identity: None,
            claim: None,
        };
        match req.identity {
            Some(identity) => self.challenge_enrollment(pending, identity).await,
            None => self.enroll_unattested(pending).await,
        }
    }

    /// Records the enrollment and answers with the certificate.
    async fn complete_enrollment(&mut self, p: PendingEnroll) -> Result<(), End> {
        let ek = p
            .identity
            .as_ref()
            .map(|a| crate::attest::ek_fingerprint(&a.ek_public));
        let outcome = self
            .shared
            .store
            .enroll(Enrollment {
                token_id: p.token_id.clone(),
                secret_hash: p.secret_hash,
                device: p.device.clone(),
                hostname: p.hostname,
                agent_version: p.agent_version,
                now_ms: now_ms(),
                attestation: p.identity,
            })
            .await
            .map_err(|e| End::Store(e.to_string()))?;
        match outcome {
            Ok(rec) => {
                let device = p.device;
                info!(%device, token = %p.token_id, hostname = %rec.hostname, attestation = ?rec.attestation, "device enrolled");
                let state_key = self.shared.keys.state_key.verifying_key();
                self.session.accept_enroll(EnrollResponse {
                    device,
                    certificate_der: p.cert,
                    state_key,
                    labels: rec.labels,
                });
                let _ = self.flush().await;
                let _ = self.send.finish();
                Ok(())
            }
            Err(r) => {
                let owner = match (&r, &ek) {
                    (EnrollRefusal::EkInUse, Some(ek)) => {
                        self.shared.store.ek_owner(ek).await.ok().flatten()
                    }
                    _ => None,
                };
                let (code, msg) = enroll_refusal(r, &p.token_id, &p.device, owner.as_ref());
                self.refuse(code, &msg).await
            }
        }
    }
}

fn enroll_refusal(
    r: EnrollRefusal,
    token_id: &str,
    device: &DeviceId,
    ek_owner: Option<&DeviceId>,
) -> (RefusalCode, String) {
    {
        match r {
            EnrollRefusal::UnknownToken => (
                RefusalCode::UnknownToken,
                format!(
                    "join token {token_id} is not known to this hub (wrong hub, or deleted); ask the operator for a new one"
                ),
            ),
            EnrollRefusal::TokenExpired => (
                RefusalCode::TokenExpired,
                format!(
                    "join token {token_id} has expired; create a new one with `cairn-hub token create`"
                ),
            ),
            EnrollRefusal::TokenUsedUp => (
                RefusalCode::TokenUsedUp,
                format!(
                    "join token {token_id} has no uses left; create a new one with `cairn-hub token create --uses N`"
                ),
            ),
            EnrollRefusal::DeviceRevoked => (
                RefusalCode::DeviceRevoked,
                format!("device {device} was revoked; it cannot re-enroll with the same key"),
            ),
            EnrollRefusal::EkInUse => (
                RefusalCode::AttestationFailed,
                format!(
                    "this TPM's endorsement key already identifies an enrolled device{}; revoke that device first (`cairn-hub device revoke`) if the box was reinstalled",
                    match ek_owner {
                        Some(d) => format!(" ({d})"),
                        None => String::new(),
                    }
                ),
            ),
        }
    }
}

impl Connection {
    async fn start_sync(&mut self, state_revision: u64) -> Result<(), End> {
        let Some(device) = self.cert_device.clone() else {
            return self
                .refuse(
                    RefusalCode::NotEnrolled,
                    "this connection has no device certificate; enroll first with a join token",
                )
                .await;
        };
        let rec = self
            .shared
            .store
            .device(&device)
            .await
            .map_err(|e| End::Store(e.to_string()))?;
        let Some(rec) = rec else {
            let msg = format!(
                "device {device} is not known to this hub (was its data directory replaced?); re-enroll with a new join token"
            );
            return self.refuse(RefusalCode::UnknownDevice, &msg).await;
        };
        if rec.revoked_ms.is_some() {
            let msg = format!("device {device} is revoked by the operator");
            return self.refuse(RefusalCode::DeviceRevoked, &msg).await;
        }
        let Some(session_id) =
            self.shared
                .registry
                .register(&device, self.conn.clone(), self.notify.clone())
        else {
            let msg = format!("device {device} is revoked by the operator");
            return self.refuse(RefusalCode::DeviceRevoked, &msg).await;
        };
        self.session_id = session_id;
        self.device = Some(device.clone());
        self.shared
            .store
            .set_online(&device, self.session_id, true, now_ms())
            .await
            .map_err(|e| End::Store(e.to_string()))?;
        info!(%device, state_revision, reports_acked = rec.reports_acked, "agent online");
        self.session.accept_sync(device.clone(), rec.reports_acked);
        let attested = rec.attestation.is_some();
        let gate = if attested {
            Gate::Evidence
        } else {
            self.unattested_gate(&rec).await.map_err(End::Store)?
        };
        self.core.start(state_revision, attested, gate);
        Ok(())
    }

    /// Carries out the core's actions against the store and the session.
    async fn drive(&mut self) -> Result<(), End> {
        let store = self.shared.store.clone();
        let storage = |e: crate::store::StoreError| End::Store(e.to_string());
        while let Some(action) = self.core.poll_action() {
            let device = self.device.clone().ok_or(End::Session(None))?;
            match action {
                Action::ReadUpdate { holds } => {
                    let u = store.state_update(&device, holds).await.map_err(storage)?;
                    self.core.update_read(u);
                }
                Action::ReadSnapshot => {
                    let u = store.state_snapshot(&device).await.map_err(storage)?;
                    self.core.update_read(u);
                }
                Action::Send(u) => {
                    debug!(%device, from = ?u.base_revision, to = u.revision, upserts = u.upserts.len(), removals = u.removals.len(), "pushing state");
                    self.session.send_state(u);
                }
                Action::RecordHeld(revision) => {
                    store
                        .state_stored(&device, revision)
                        .await
                        .map_err(storage)?;
                }
                Action::StoreReports(reports) => {
                    let n = reports.len();
                    let acked = store
                        .record_reports(&device, reports, now_ms())
                        .await
                        .map_err(storage)?;
                    debug!(%device, n, acked, "reports stored");
                    self.core.reports_stored(acked);
                }
                Action::SkipReports { from, to } => {
                    let acked = store
                        .skip_reports(&device, from, to, now_ms())
                        .await
                        .map_err(storage)?;
                    self.core.reports_stored(acked);
                }
                Action::AckReports(acked) => self.session.reports_durable(acked),
                Action::Challenge => self.challenge_sync().await.map_err(End::Store)?,
                Action::CheckQuarantine => {
                    let lifted = self.quarantine_lifted(&device).await.map_err(End::Store)?;
                    self.core.quarantine_checked(lifted);
                }
            }
        }
        Ok(())
    }

    async fn finish(&mut self, end: End) {
        match &end {
            End::Session(None) => {}
            End::Session(Some(SessionError::Closed)) => debug!("agent closed the session"),
            End::Session(Some(e)) => {
                warn!(device = ?self.device, error = %e, "session failed");
                close_with(&self.conn, RefusalCode::ProtocolViolation, &e.to_string());
            }
            End::Transport(e) => debug!(device = ?self.device, error = %e, "connection lost"),
            End::Store(e) => {
                warn!(device = ?self.device, error = %e, "store failed; closing the session");
                close_with(
                    &self.conn,
                    RefusalCode::Internal,
                    "hub storage error; retry later",
                );
            }
        }
        if let Some(device) = self.device.take()
            && self.shared.registry.unregister(&device, self.session_id)
        {
            if let Err(e) = self
                .shared
                .store
                .set_online(&device, self.session_id, false, now_ms())
                .await
            {
                warn!(%device, error = %e, "recording offline");
            }
            info!(%device, "agent offline");
        }
        // Let a final frame (refusal, enrollment) reach the agent before the close.
        let _ = self.send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), self.conn.closed()).await;
    }
}

/// The next finished fetch task, or never if there are none.
async fn join_opt(
    set: &mut Option<tokio::task::JoinSet<()>>,
) -> Option<Result<(), tokio::task::JoinError>> {
    match set {
        Some(s) if !s.is_empty() => s.join_next().await,
        _ => std::future::pending().await,
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
