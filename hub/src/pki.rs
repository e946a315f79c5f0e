//! The hub's keys and certificates, created on first start in the data directory.
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | the hub CA (ed25519): issues the hub's TLS certificate and device certificates |
//! | `hub.pem`, `hub.key` | the hub's TLS certificate for QUIC and the admin API |
//! | `state-signing.key` | ed25519 key that signs every desired-state revision |
//! | `quic.secret` | stateless-reset and connection-id keys, kept across restarts so agents notice a restart at once |
//! | `admin-token` | bearer token of the admin API |
//!
//! Private keys are written with mode 0600. The CA's SHA-256 fingerprint goes into join
//! tokens so that agents authenticate the hub before they trust anything it says.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use ed25519_dalek::SigningKey;
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use sha2::{Digest, Sha256};

use cairn_sync_protocol::DeviceId;

/// Name every hub certificate carries; agents connect with this server name, so the
/// hub's IP address or DNS name may change without re-issuing anything.
pub const HUB_SERVER_NAME: &str = "cairn-hub";

/// The hub's key material, loaded or created.
pub struct HubKeys {
    pub ca_cert_der: CertificateDer<'static>,
    pub ca_pem: String,
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    pub hub_cert_der: CertificateDer<'static>,
    hub_key_der: Vec<u8>,
    pub state_key: SigningKey,
    pub reset_key: [u8; 64],
    pub cid_key: u64,
    pub admin_token: String,
}

/// SHA-256 of a DER certificate: what join tokens pin.
pub fn fingerprint(der: &[u8]) -> [u8; 32] {
    Sha256::digest(der).into()
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    write_secret(path, bytes)?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o644))
        .with_context(|| format!("chmod {}", path.display()))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

fn ca_params() -> Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "Cairn hub CA");
    dn.push(DnType::OrganizationName, "Cairn");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = rcgen::date_time_ymd(2024, 1, 1);
    p.not_after = rcgen::date_time_ymd(2099, 12, 31);
    Ok(p)
}

impl HubKeys {
    /// Loads the key material from `dir`, creating whatever is missing. `extra_names` are
    /// added to the hub certificate (DNS names or IP addresses operators use for the
    /// admin API), besides `cairn-hub`, `localhost`, `127.0.0.1` and `::1`.
    pub fn load_or_create(dir: &Path, extra_names: &[String]) -> Result<Self> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let p = |name: &str| -> PathBuf { dir.join(name) };

        // CA
        if !p("ca.key").exists() {
            let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
            let cert = ca_params()?.self_signed(&key)?;
            write_secret(&p("ca.key"), key.serialize_pem().as_bytes())?;
            write_public(&p("ca.pem"), cert.pem().as_bytes())?;
            tracing::info!(dir = %dir.display(), "created hub CA");
        }
        let ca_key = KeyPair::from_pem(&String::from_utf8(read(&p("ca.key"))?)?)
            .context("parsing ca.key")?;
        let ca_pem = String::from_utf8(read(&p("ca.pem"))?)?;
        let ca_cert_der: CertificateDer<'static> =
            pem_cert_der(&ca_pem).context("parsing ca.pem")?;
        // rcgen needs an issuer object; rebuilding it from the stored certificate's
        // parameters and key yields the same subject and key, which is what signing uses.
        let ca_cert = CertificateParams::from_ca_cert_pem(&ca_pem)?.self_signed(&ca_key)?;

        // Hub TLS certificate: re-issued on every start, so added names take effect.
        let mut names = vec![
            HUB_SERVER_NAME.to_string(),
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ];
        names.extend(extra_names.iter().cloned());
        if !p("hub.key").exists() {
            let key = KeyPair::generate_for(&rcgen::PKCS_ED25519)?;
            write_secret(&p("hub.key"), key.serialize_pem().as_bytes())?;
        }
        let hub_key = KeyPair::from_pem(&String::from_utf8(read(&p("hub.key"))?)?)
            .context("parsing hub.key")?;
        let mut hp = CertificateParams::new(Vec::<String>::new())?;
        hp.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.as_str().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, HUB_SERVER_NAME);
        hp.distinguished_name = dn;
        hp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        hp.not_before = rcgen::date_time_ymd(2024, 1, 1);
        hp.not_after = rcgen::date_time_ymd(2099, 12, 31);
        let hub_cert = hp.signed_by(&hub_key, &ca_cert, &ca_key)?;
        write_public(&p("hub.pem"), hub_cert.pem().as_bytes())?;

        // State-signing key.
        if !p("state-signing.key").exists() {
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            write_secret(
                &p("state-signing.key"),
                hex::encode(key.to_bytes()).as_bytes(),
            )?;
        }
        let state_key = {
            let hexed = read(&p("state-signing.key"))?;
            let bytes: [u8; 32] = hex::decode(hexed.trim_ascii())
                .ok()
                .and_then(|b| b.try_into().ok())
                .context("state-signing.key must hold 64 hex digits")?;
            SigningKey::from_bytes(&bytes)
        };

        // QUIC secrets.
        if !p("quic.secret").exists() {
            let mut buf = [0u8; 72];
            rand::rngs::OsRng.fill_bytes(&mut buf);
            write_secret(&p("quic.secret"), &buf)?;
        }
        let secret = read(&p("quic.secret"))?;
        if secret.len() != 72 {
            bail!("quic.secret must hold 72 bytes; delete it to make a new one");
        }
        let mut reset_key = [0u8; 64];
        reset_key.copy_from_slice(&secret[..64]);
        let mut cid = [0u8; 8];
        cid.copy_from_slice(&secret[64..]);

        // Admin token.
        if !p("admin-token").exists() {
            let mut buf = [0u8; 24];
            rand::rngs::OsRng.fill_bytes(&mut buf);
            write_secret(&p("admin-token"), hex::encode(buf).as_bytes())?;
        }
        let admin_token = String::from_utf8(read(&p("admin-token"))?)?
            .trim()
            .to_string();

        Ok(Self {
            ca_cert_der,
            ca_pem,
            ca_cert,
            ca_key,
            hub_cert_der: hub_cert.der().clone(),
            hub_key_der: hub_key.serialize_der(),
            state_key,
            reset_key,
            cid_key: u64::from_le_bytes(cid),
            admin_token,
        })
    }

    pub fn ca_fingerprint(&self) -> [u8; 32] {
        fingerprint(&self.ca_cert_der)
    }

    /// The hub's TLS chain: its certificate, then the CA.
    pub fn tls_chain(&self) -> Vec<CertificateDer<'static>> {
        vec![self.hub_cert_der.clone(), self.ca_cert_der.clone()]
    }

    pub fn tls_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.hub_key_der.clone()))
    }

    /// Checks a CSR's self-signature and issues a client certificate for the key in it.
    /// The device id is derived from the public key, so one key always gets one id.
    pub fn issue_device_cert(&self, csr_der: &[u8]) -> Result<(DeviceId, Vec<u8>)> {
        let csr = CertificateSigningRequestParams::from_der(&csr_der.to_vec().into())
            .map_err(|e| anyhow::anyhow!("certificate request does not parse or verify: {e}"))?;
        let key_hash = Sha256::digest(rcgen::PublicKeyData::der_bytes(&csr.public_key));
        let device = DeviceId::new(&format!("dev-{}", hex::encode(&key_hash[..6])))?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, device.as_str());
        dn.push(DnType::OrganizationName, "Cairn device");
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = rcgen::date_time_ymd(2024, 1, 1);
        params.not_after = rcgen::date_time_ymd(2099, 12, 31);
        let mut serial = [0u8; 16];
        rand::rngs::OsRng.fill_bytes(&mut serial);
        serial[0] &= 0x7f;
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let req = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        };
        let cert = req.signed_by(&self.ca_cert, &self.ca_key)?;
        Ok((device, cert.der().to_vec()))
    }
}

fn pem_cert_der(pem: &str) -> Result<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("no certificate in PEM: {e}"))
}

/// The device id in a device certificate (its subject common name).
pub fn device_id_from_cert(der: &[u8]) -> Result<DeviceId> {
    let (_, cert) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| anyhow::anyhow!("client certificate does not parse: {e}"))?;
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .context("client certificate has no common name")?;
    Ok(DeviceId::new(cn)?)
}
