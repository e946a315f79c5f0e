//! The agent's link to the hub: enrollment, then sync sessions over QUIC, reconnecting
//! with jittered exponential backoff for as long as the agent runs.
//!
//! One task drives an [`AgentSession`] per connection; it touches the store only through
//! short calls (accept a state, read or acknowledge outbox entries) and wakes the
//! reconciler when a new revision is stored.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use cairn_sync_protocol::agent::{AgentEvent, AgentSession};
use cairn_sync_protocol::message::{EnrollRequest, RefusalCode};
use cairn_sync_protocol::token::JoinToken;
use cairn_sync_protocol::{SessionConfig, Text};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use crate::store::{Identity, Store};
use crate::sync::{Backoff, Reply};
use crate::tls;

pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Connection knobs.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// `host:port` of the hub's QUIC endpoint.
    pub hub: String,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub session: SessionConfig,
    pub hostname: String,
}

/// Why the agent stopped talking to the hub for good.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("enrollment refused by the hub ({code:?}): {message}")]
    EnrollRefused { code: RefusalCode, message: String },
    #[error("{0:#}")]
    Other(anyhow::Error),
}

/// How a connection ended.
enum End {
    Refused(RefusalCode, String),
    Lost(String),
    /// Nothing a retry can fix (e.g. a key sealed to another TPM): the agent stops.
    Fatal(String),
}

/// Shared between the link task and the reconciler.
pub struct Shared {
    pub store: Mutex<Store>,
    /// Woken when a new desired revision is stored.
    pub state_changed: Notify,
    /// Highest outbox sequence number, raised by whoever appends.
    pub outbox_tail: watch::Sender<u64>,
    /// The device's root of trust, if it attests.
    pub attester: Option<crate::attest::SharedAttester>,
    /// Woken when a new desired revision is stored (for the upgrade engine; the
    /// reconciler has `state_changed`).
    pub os_changed: Notify,
    /// The connection of the current sync session, once welcomed: release downloads
    /// open their own streams on it.
    pub link: Mutex<Option<quinn::Connection>>,
    /// Woken when a sync session is welcomed.
    pub link_up: Notify,
    /// When a sync session was last welcomed (ms since the epoch; 0: never).
    pub hub_seen_ms: std::sync::atomic::AtomicU64,
}

impl Shared {
    /// Runs `f` on the store under its lock.
    pub fn with_store<T, E: Into<anyhow::Error>>(
        &self,
        f: impl FnOnce(&mut Store) -> Result<T, E>,
    ) -> Result<T> {
        let mut guard = self
            .store
            .lock()
            .map_err(|_| anyhow!("agent store lock poisoned"))?;
        f(&mut guard).map_err(Into::into)
    }

    fn set_link(&self, conn: Option<&quinn::Connection>) {
        if let Ok(mut l) = self.link.lock() {
            *l = conn.cloned();
        }
        if conn.is_some() {
            self.hub_seen_ms
                .store(crate::store::now_ms(), std::sync::atomic::Ordering::Relaxed);
            self.link_up.notify_one();
        }
    }

    fn set_conn_state(&self, state: &str) {
        let at = crate::store::now_ms();
        let r = self.with_store(|s| {
            s.set_meta("conn_state", state.as_bytes())?;
            s.set_meta("conn_since_ms", &at.to_le_bytes())
        });
        if let Err(e) = r {
            warn!(error = %e, "recording connection state");
        }
    }
}

async fn resolve(hub: &str) -> Result<SocketAddr> {
    tokio::net::lookup_host(hub)
        .await
        .with_context(|| format!("resolving hub address {hub}"))?
        .next()
        .ok_or_else(|| anyhow!("hub address {hub} resolves to nothing"))
}

fn endpoint_for(addr: &SocketAddr) -> Result<quinn::Endpoint> {
    let bind: SocketAddr = if addr.is_ipv6() {
        "[::]:0".parse()?
    } else {
        "0.0.0.0:0".parse()?
    };
    Ok(quinn::Endpoint::client(bind)?)
}

/// Maps a connection or stream error to how the connection ended, decoding a hub's
/// refusal from the QUIC close code and reason.
fn end_from_conn_error(e: &quinn::ConnectionError) -> End {
    if let quinn::ConnectionError::ApplicationClosed(close) = e {
        let reason = String::from_utf8_lossy(&close.reason).into_owned();
        if let Some(code) = RefusalCode::from_close_code(close.error_code.into_inner()) {
            return End::Refused(code, reason);
        }
        return End::Lost(format!("hub closed the connection: {reason}"));
    }
    if let quinn::ConnectionError::ConnectionClosed(c) = e
        && let Some(hint) = tls_hint(&c.reason)
    {
        return End::Lost(format!("{e}; {hint}"));
    }
    End::Lost(e.to_string())
}

fn tls_hint(reason: &[u8]) -> Option<&'static str> {
    let r = String::from_utf8_lossy(reason).to_ascii_lowercase();
    (r.contains("certificate") || r.contains("unknownca") || r.contains("unknown ca"))
        .then_some("this device's certificate is not trusted by this hub (was the hub's data directory replaced?); re-enroll with a new join token")
}

async fn connect(
    endpoint: &quinn::Endpoint,
    cfg: quinn::ClientConfig,
    addr: SocketAddr,
) -> Result<quinn::Connection, End> {
    let connecting = endpoint
        .connect_with(cfg, addr, tls::HUB_SERVER_NAME)
        .map_err(|e| End::Lost(format!("connecting to {addr}: {e}")))?;
    match tokio::time::timeout(Duration::from_secs(15), connecting).await {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(match end_from_conn_error(&e) {
            End::Lost(m) => End::Lost(format!("connecting to {addr}: {m}")),
            other => other,
        }),
        Err(_) => Err(End::Lost(format!("connecting to {addr}: timed out"))),
    }
}

/// Enrolls with a join token; returns the identity to store.
async fn enroll(
    cfg: &LinkConfig,
    shared: &Shared,
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    token: &JoinToken,
) -> Result<Identity, End> {
    // The key is stored before it is used: a retry after a lost answer (or a crash)
    // presents the same key, which the hub recognises without using up the token.
    // With a TPM, what is stored is the key sealed to it.
    let stored = shared
        .with_store(|s| s.meta("pending_key_der"))
        .map_err(|e| End::Lost(format!("reading the pending key: {e:#}")))?;
    let attester = shared.attester.as_ref();
    let key_der = match stored {
        Some(k) => crate::attest::recover_key(attester, k)
            .await
            .map_err(|e| End::Lost(format!("{e:#}")))?,
        None => {
            let k = tls::new_key().map_err(|e| End::Lost(format!("making a key: {e:#}")))?;
            let stored = crate::attest::protect_key(attester, k.clone())
                .await
                .map_err(|e| End::Lost(format!("{e:#}")))?;
            shared
                .with_store(|s| s.set_meta("pending_key_der", &stored))
                .map_err(|e| End::Lost(format!("storing the new key: {e:#}")))?;
            k
        }
    };
    let csr_der = tls::csr(&key_der, &cfg.hostname).map_err(|e| End::Lost(format!("{e:#}")))?;
    let client = tls::enroll_config(token.ca_fingerprint, cfg.keep_alive, cfg.idle_timeout)
        .map_err(|e| End::Lost(e.to_string()))?;
    let conn = connect(endpoint, client, addr).await.map_err(|e| match e {
        // A hub whose CA does not match the token will never become the right hub.
        End::Lost(m) if m.contains("does not match the fingerprint") => {
            End::Refused(RefusalCode::UnknownToken, m)
        }
        other => other,
    })?;
    let ca_der = conn
        .peer_identity()
        .and_then(|id| {
            id.downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .and_then(|chain| tls::find_pinned(&chain, &token.ca_fingerprint).map(|c| c.to_vec()))
        .ok_or_else(|| End::Lost("hub presented no CA matching the join token".into()))?;
    let identity = match &shared.attester {
        Some(a) => {
            Some(crate::attest::identity(a).map_err(|e| End::Lost(format!("attester: {e:#}")))?)
        }
        None => None,
    };
    let request = EnrollRequest {
        token: Text::truncated(&token.credential()),
        csr_der,
        hostname: Text::truncated(&cfg.hostname),
        identity,
    };
    let session = AgentSession::enroll(Instant::now(), cfg.session.clone(), request, AGENT_VERSION);
    let mut driver = Driver::open(&conn, session).await?;
    loop {
        while let Some(ev) = driver.session.poll_event() {
            match ev {
                AgentEvent::Enrolled(resp) => {
                    conn.close(0u32.into(), b"enrolled");
                    return Ok(Identity {
                        device: resp.device,
                        key_der,
                        cert_der: resp.certificate_der,
                        ca_der,
                        state_key: resp.state_key,
                    });
                }
                AgentEvent::Refused(r) => {
                    return Err(End::Refused(r.code, r.message.to_string()));
                }
                AgentEvent::Failed(e) => return Err(End::Lost(e.to_string())),
                AgentEvent::Challenged(c) => {
                    let evidence = answer_challenge(shared, &conn, c).await?;
                    driver.session.send_evidence(evidence);
                    driver.flush(&conn).await?;
                }
                other => debug!(?other, "ignored during enrollment"),
            }
        }
        driver.step(&conn).await?;
    }
}

/// Answers the hub's attestation challenge on `conn`.
async fn answer_challenge(
    shared: &Shared,
    conn: &quinn::Connection,
    c: cairn_sync_protocol::message::Challenge,
) -> Result<cairn_sync_protocol::message::Evidence, End> {
    let Some(attester) = &shared.attester else {
        return Err(End::Lost(
            "the hub asks for attestation, but this agent runs without a TPM (--tpm none)".into(),
        ));
    };
    let mut exporter = [0u8; cairn_sync_protocol::attest::EXPORTER_LEN];
    conn.export_keying_material(
        &mut exporter,
        cairn_sync_protocol::attest::EXPORTER_LABEL,
        b"",
    )
    .map_err(|e| End::Lost(format!("exporting TLS keying material: {e:?}")))?;
    let started = Instant::now();
    let evidence = crate::attest::answer(attester, c, exporter)
        .await
        .map_err(|e| End::Lost(format!("attestation: {e:#}")))?;
    debug!(
        ms = started.elapsed().as_millis() as u64,
        log_bytes = evidence.log.len(),
        ima_offset = evidence.ima.as_ref().map(|i| i.offset),
        ima_bytes = evidence.ima.as_ref().map(|i| i.bytes.len()),
        "answered the hub's attestation challenge"
    );
    Ok(evidence)
}

/// Frames in and out of one stream.
struct Driver {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    session: AgentSession,
}

impl Driver {
    async fn open(conn: &quinn::Connection, session: AgentSession) -> Result<Self, End> {
        let (send, recv) = conn.open_bi().await.map_err(|e| end_from_conn_error(&e))?;
        let mut d = Self {
            send,
            recv,
            session,
        };
        d.flush(conn).await?;
        Ok(d)
    }

    async fn flush(&mut self, conn: &quinn::Connection) -> Result<(), End> {
        while let Some(bytes) = self.session.poll_transmit() {
            if let Err(e) = self.send.write_all(&bytes).await {
                return Err(match conn.close_reason() {
                    Some(ce) => end_from_conn_error(&ce),
                    None => End::Lost(e.to_string()),
                });
            }
        }
        Ok(())
    }

    /// Waits for input or the session's deadline.
    async fn step(&mut self, conn: &quinn::Connection) -> Result<(), End> {
        let deadline = self.session.poll_timeout();
        tokio::select! {
            r = self.recv.read_chunk(64 * 1024, true) => self.on_read(conn, r)?,
            () = sleep_until_opt(deadline) => self.session.handle_timeout(Instant::now()),
        }
        self.flush(conn).await
    }

    fn on_read(
        &mut self,
        conn: &quinn::Connection,
        r: Result<Option<quinn::Chunk>, quinn::ReadError>,
    ) -> Result<(), End> {
        match r {
            Ok(Some(chunk)) => self.session.handle_input(Instant::now(), &chunk.bytes),
            Ok(None) => self.session.handle_end_of_stream(),
            Err(e) => {
                return Err(match conn.close_reason() {
                    Some(ce) => end_from_conn_error(&ce),
                    None => End::Lost(e.to_string()),
                });
            }
        }
        Ok(())
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

/// One sync session until the connection ends.
async fn sync_session(
    cfg: &LinkConfig,
    shared: &Shared,
    identity: &Identity,
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    backoff: &mut Backoff,
) -> End {
    let client = match tls::sync_config(
        &identity.ca_der,
        &identity.cert_der,
        &identity.key_der,
        cfg.keep_alive,
        cfg.idle_timeout,
    ) {
        Ok(c) => c,
        Err(e) => return End::Lost(e.to_string()),
    };
    let conn = match connect(endpoint, client, addr).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let (held, tail) = match shared
        .with_store(|s| Ok::<_, crate::store::StoreError>((s.desired_revision()?, s.last_seq()?)))
    {
        Ok(x) => x,
        Err(e) => return End::Lost(format!("agent store: {e:#}")),
    };
    let session = AgentSession::sync(Instant::now(), cfg.session.clone(), held, AGENT_VERSION);
    let mut driver = match Driver::open(&conn, session).await {
        Ok(d) => d,
        Err(e) => return e,
    };
    let mut tail_rx = shared.outbox_tail.subscribe();
    let tail = tail.max(*tail_rx.borrow_and_update());
    driver.session.outbox_tail(Instant::now(), tail);
    let end = 'session: loop {
        while let Some(ev) = driver.session.poll_event() {
            if let AgentEvent::Challenged(c) = ev {
                match answer_challenge(shared, &conn, c).await {
                    Ok(e) => driver.session.send_evidence(e),
                    Err(end) => break 'session end,
                }
                continue;
            }
            let welcomed = matches!(ev, AgentEvent::Welcomed { .. });
            if let Err(end) = handle_event(shared, identity, &mut driver.session, ev, backoff) {
                break 'session end;
            }
            if welcomed {
                shared.set_link(Some(&conn));
            }
        }
        if let Err(e) = driver.flush(&conn).await {
            break e;
        }
        if driver.session.is_done() {
            break End::Lost("session ended".into());
        }
        let deadline = driver.session.poll_timeout();
        tokio::select! {
            r = driver.recv.read_chunk(64 * 1024, true) => {
                if let Err(e) = driver.on_read(&conn, r) { break e; }
            }
            Ok(()) = tail_rx.changed() => {
                let tail = *tail_rx.borrow_and_update();
                driver.session.outbox_tail(Instant::now(), tail);
            }
            () = sleep_until_opt(deadline) => driver.session.handle_timeout(Instant::now()),
        }
        if let Err(e) = driver.flush(&conn).await {
            break e;
        }
    };
    shared.set_link(None);
    conn.close(0u32.into(), b"agent closing");
    end
}

/// Acts on one session event. `Err` ends the session with that reason.
fn handle_event(
    shared: &Shared,
    identity: &Identity,
    session: &mut AgentSession,
    ev: AgentEvent,
    backoff: &mut Backoff,
) -> Result<(), End> {
    let store_err = |e: anyhow::Error| End::Lost(format!("agent store: {e:#}"));
    match ev {
        AgentEvent::Welcomed {
            device,
            version,
            reports_acked,
        } => {
            info!(%device, version, reports_acked, "connected to hub");
            backoff.reset();
            if let Some(tail) = shared
                .with_store(|s| s.rebase_outbox(reports_acked))
                .map_err(store_err)?
            {
                warn!(
                    reports_acked,
                    tail,
                    "the hub holds more reports than this database numbered (restored from a backup?); queued reports renumbered after the hub's"
                );
                shared.outbox_tail.send_replace(tail);
                session.outbox_tail(Instant::now(), tail);
            }
            shared.set_conn_state("connected");
        }
        AgentEvent::ReportsAcked { up_to } => {
            let n = shared
                .with_store(|s| s.ack_reports(up_to))
                .map_err(store_err)?;
            debug!(up_to, n, "reports acknowledged");
        }
        AgentEvent::ReportsWanted { after, limit } => {
            let reports = shared
                .with_store(|s| s.outbox_after(after, limit))
                .map_err(store_err)?;
            session.send_reports(Instant::now(), reports);
        }
        AgentEvent::StateOffered(update) => {
            let outcome = shared
                .with_store(|s| {
                    let r = s.accept_state(identity, &update)?;
                    Ok::<_, crate::store::StoreError>((r, s.desired_revision()?, s.last_seq()?))
                })
                .map_err(store_err)?;
            let (offer, held, tail) = outcome;
            shared.outbox_tail.send_replace(tail);
            match (offer.reply, offer.refused) {
                (Reply::Holds(rev), None) => {
                    info!(revision = rev, "desired state stored");
                    session.state_stored(rev);
                    shared.state_changed.notify_one();
                    shared.os_changed.notify_one();
                }
                (Reply::Holds(rev), Some(e)) => {
                    warn!(error = %e, "state update refused");
                    session.state_stored(rev);
                }
                (Reply::Unusable { held: h }, why) => {
                    match why {
                        Some(e @ cairn_sync_protocol::state::StateError::BadSignature { .. }) => {
                            // Possibly a delta built from an inconsistent read.
                            warn!(error = %e, "delta refused; asking for a full snapshot");
                        }
                        _ => info!(
                            held,
                            "delta does not apply to the held revision; asking for a snapshot"
                        ),
                    }
                    session.state_unusable(h);
                }
            }
        }
        AgentEvent::Refused(r) => return Err(End::Refused(r.code, r.message.to_string())),
        AgentEvent::Failed(e) => return Err(End::Lost(e.to_string())),
        AgentEvent::Enrolled(_) => return Err(End::Lost("unexpected enrollment answer".into())),
        AgentEvent::Challenged(_) => {
            return Err(End::Lost(
                "challenge not answered by the session loop".into(),
            ));
        }
    }
    Ok(())
}

/// Runs the link until `shutdown` resolves or enrollment is refused for good.
pub async fn run_link(
    cfg: LinkConfig,
    shared: Arc<Shared>,
    join_token: Option<String>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), LinkError> {
    tokio::pin!(shutdown);
    let mut backoff = Backoff::new(cfg.backoff_min, cfg.backoff_max);
    let mut endpoint: Option<(SocketAddr, quinn::Endpoint)> = None;
    // The identity with its key unsealed, once loaded.
    let mut cached: Option<Identity> = None;
    loop {
        let attempt = async {
            let addr = resolve(&cfg.hub)
                .await
                .map_err(|e| End::Lost(format!("{e:#}")))?;
            if endpoint
                .as_ref()
                .is_none_or(|(a, _)| a.is_ipv6() != addr.is_ipv6())
            {
                endpoint = Some((
                    addr,
                    endpoint_for(&addr).map_err(|e| End::Lost(e.to_string()))?,
                ));
            }
            let Some((_, ep)) = endpoint.as_ref() else {
                return Err(End::Lost("no endpoint".into()));
            };
            let identity = match &cached {
                Some(id) => Some(id.clone()),
                None => shared
                    .with_store(|s| s.identity())
                    .map_err(|e| End::Lost(format!("{e:#}")))?,
            };
            let identity = match identity {
                Some(mut id) => {
                    if cached.is_none() {
                        id.key_der =
                            crate::attest::recover_key(shared.attester.as_ref(), id.key_der)
                                .await
                                .map_err(|e| End::Fatal(format!("{e:#}")))?;
                        cached = Some(id.clone());
                    }
                    id
                }
                None => {
                    let Some(token) = join_token.as_deref() else {
                        return Err(End::Refused(
                            RefusalCode::NotEnrolled,
                            "this agent is not enrolled; start it once with --join-token".into(),
                        ));
                    };
                    let token = JoinToken::parse(token)
                        .map_err(|e| End::Refused(RefusalCode::UnknownToken, e.to_string()))?;
                    info!(token = %token.id_hex(), hub = %addr, "enrolling");
                    let id = enroll(&cfg, &shared, ep, addr, &token).await?;
                    shared
                        .with_store(|s| {
                            // The key as stored at enrollment (sealed, with a TPM).
                            let mut stored = id.clone();
                            if let Some(k) = s.meta("pending_key_der")? {
                                stored.key_der = k;
                            }
                            s.save_identity(&stored)?;
                            s.set_meta("hub", cfg.hub.as_bytes())
                        })
                        .map_err(|e| End::Lost(format!("{e:#}")))?;
                    cached = Some(id.clone());
                    info!(device = %id.device, "enrolled");
                    id
                }
            };
            Ok(sync_session(&cfg, &shared, &identity, ep, addr, &mut backoff).await)
        };
        let outcome = tokio::select! {
            r = attempt => Some(match r { Ok(end) | Err(end) => end }),
            () = &mut shutdown => None,
        };
        let Some(end) = outcome else {
            // Tell the hub we are going, so it need not wait for an idle timeout.
            if let Some((_, ep)) = &endpoint {
                ep.close(0u32.into(), b"agent shutting down");
                let _ = tokio::time::timeout(Duration::from_secs(1), ep.wait_idle()).await;
            }
            return Ok(());
        };
        match end {
            End::Refused(code, message) => {
                let enrolled = shared
                    .with_store(|s| s.identity().map(|i| i.is_some()))
                    .unwrap_or(false);
                // A hub that is busy or restarting gets the enrollment again later; a
                // refusal of the token or the request itself is final.
                if !enrolled && !code.is_retryable() {
                    shared.set_conn_state(&format!("enrollment refused: {message}"));
                    return Err(LinkError::EnrollRefused { code, message });
                }
                if code == RefusalCode::DeviceRevoked {
                    warn!(reason = %message, "device revoked: no more syncing; local state stays enforced");
                    shared.set_conn_state(&format!("revoked: {message}"));
                    let _ = shared.with_store(|s| s.set_meta("revoked", message.as_bytes()));
                    shutdown.await;
                    return Ok(());
                }
                if code.is_retryable() {
                    info!(?code, %message, "hub ended the session; reconnecting");
                } else {
                    warn!(?code, %message, "hub refused the session");
                }
                shared.set_conn_state(&format!("refused: {message}"));
            }
            End::Lost(reason) => {
                debug!(%reason, "link down");
                shared.set_conn_state(&format!("disconnected: {reason}"));
            }
            End::Fatal(reason) => {
                shared.set_conn_state(&format!("stopped: {reason}"));
                return Err(LinkError::Other(anyhow!(reason)));
            }
        }
        let delay = backoff.next_delay();
        debug!(?delay, "reconnecting later");
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = &mut shutdown => return Ok(()),
        }
    }
}

/// Whether the stored identity says this device was revoked.
pub fn revoked(store: &Store) -> Result<Option<String>> {
    Ok(store.meta_text("revoked")?)
}
