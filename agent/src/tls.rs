//! TLS for the agent's QUIC connections.
//!
//! - Enrollment: the agent has no certificate yet and trusts nothing but the CA
//!   fingerprint in its join token. [`PinnedCaVerifier`] accepts the hub's chain only if
//!   it contains a CA certificate with exactly that SHA-256 fingerprint and the hub
//!   certificate verifies under it — the hub is authenticated from the first packet.
//! - Sync: the CA pinned at enrollment is the only root, and the agent presents its
//!   device certificate (mutual TLS).

use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_sync_protocol::message::ALPN;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// Server name every hub certificate carries.
pub const HUB_SERVER_NAME: &str = "cairn-hub";

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Verifies the hub against a CA fingerprint, before any CA is stored.
#[derive(Debug)]
pub struct PinnedCaVerifier {
    fingerprint: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl PinnedCaVerifier {
    pub fn new(fingerprint: [u8; 32]) -> Self {
        Self {
            fingerprint,
            provider: provider(),
        }
    }
}

/// The CA certificate in a presented chain that matches `fingerprint`.
pub fn find_pinned<'a>(
    chain: &'a [CertificateDer<'a>],
    fingerprint: &[u8; 32],
) -> Option<&'a CertificateDer<'a>> {
    chain
        .iter()
        .find(|c| Sha256::digest(c.as_ref()).as_slice() == fingerprint)
}

impl ServerCertVerifier for PinnedCaVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let ca = find_pinned(intermediates, &self.fingerprint).ok_or_else(|| {
            rustls::Error::General(
                "the hub's CA does not match the fingerprint in the join token: wrong hub, or a token from another hub"
                    .into(),
            )
        })?;
        let mut roots = RootCertStore::empty();
        roots
            .add(ca.clone().into_owned())
            .map_err(|e| rustls::Error::General(format!("hub CA unusable: {e}")))?;
        let inner =
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
                .build()
                .map_err(|e| rustls::Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn quic_client(
    tls: rustls::ClientConfig,
    keep_alive: std::time::Duration,
    idle: std::time::Duration,
) -> Result<quinn::ClientConfig> {
    let mut tls = tls;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut cfg = quinn::ClientConfig::new(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .keep_alive_interval(Some(keep_alive))
        .max_idle_timeout(Some(idle.try_into()?))
        .max_concurrent_bidi_streams(0u8.into())
        .max_concurrent_uni_streams(0u8.into())
        .datagram_receive_buffer_size(None);
    cfg.transport_config(Arc::new(transport));
    Ok(cfg)
}

/// Client config for enrollment: no client certificate, hub pinned by fingerprint.
pub fn enroll_config(
    fingerprint: [u8; 32],
    keep_alive: std::time::Duration,
    idle: std::time::Duration,
) -> Result<quinn::ClientConfig> {
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinnedCaVerifier::new(fingerprint)))
        .with_no_client_auth();
    quic_client(tls, keep_alive, idle)
}

/// Client config for sync: the pinned hub CA as the only root, device certificate.
pub fn sync_config(
    ca_der: &[u8],
    cert_der: &[u8],
    key_der: &[u8],
    keep_alive: std::time::Duration,
    idle: std::time::Duration,
) -> Result<quinn::ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(ca_der.to_vec()))
        .context("the stored hub CA is unusable")?;
    let tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![CertificateDer::from(cert_der.to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key_der.to_vec())),
        )
        .context("the stored device certificate or key is unusable")?;
    quic_client(tls, keep_alive, idle)
}

/// A fresh device key (ECDSA P-256, which TPMs also offer), PKCS#8 DER.
pub fn new_key() -> Result<Vec<u8>> {
    Ok(rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?.serialize_der())
}

/// A certificate signing request for a key.
pub fn csr(key_der: &[u8], hostname: &str) -> Result<Vec<u8>> {
    let key = rcgen::KeyPair::try_from(key_der).context("stored device key is unusable")?;
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, hostname);
    let csr = params.serialize_request(&key)?;
    Ok(csr.der().to_vec())
}
