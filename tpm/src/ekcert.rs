//! EK certificates, checked on the hub in pure Rust (no TPM, no libtss2).
//!
//! A TPM's manufacturer certifies its endorsement key (EK) with an X.509 certificate in
//! the TPM's NV storage. When a device enrolls, the hub checks that certificate against
//! the manufacturer CAs the operator trusts ([`EkTrust`]) and that it certifies the very
//! EK the device uses ([`verify_ek_certificate`]). Together with MakeCredential
//! ([`crate::credential`]) this is what ties an attestation key to genuine TPM hardware:
//! only the TPM holding that EK can activate the credential.
//!
//! The chain is built from the EK certificate up to a **self-signed** CA in the trust
//! store, matching issuer to subject names and verifying each signature (`ring`, through
//! x509-parser). Intermediates added to the store only help to build paths: trusting an
//! intermediate alone does not make it an anchor, so the operator trusts a manufacturer
//! by its root. Every certificate on the path must be within its validity dates at `now`,
//! and every issuer must be a CA (basicConstraints, keyCertSign when keyUsage is present,
//! path length).
//!
//! EK certificates break web-PKI habits, and none of these make one fail here: an empty
//! subject, a critical subjectAltName holding a directoryName with the TPM's
//! manufacturer, model and firmware version (TCG attributes 2.23.133.2.1–3), the TCG EK
//! extended key usage, subject directory attributes, a `notAfter` of 9999-12-31 (no
//! well-defined expiry), and zero padding after the DER in NV storage.

use sha2::{Digest, Sha256};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::oid_registry::{OID_EC_P256, OID_NIST_EC_P384};
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;
use x509_parser::x509::X509Name;

use crate::quote::AkPublic;

/// Longest chain accepted, EK certificate to root (real ones have 2 to 4 certificates).
pub const MAX_CHAIN: usize = 8;

/// TCG attribute OIDs in an EK certificate's subjectAltName directoryName.
const TPM_MANUFACTURER: &str = "2.23.133.2.1";
const TPM_MODEL: &str = "2.23.133.2.2";
const TPM_VERSION: &str = "2.23.133.2.3";

/// Why an EK certificate was refused, worded for the operator who has to act on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EkCertError {
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error(
        "{subject} was issued by \"{issuer}\", which is not among the trusted EK CAs: add that \
         CA's root certificate to the EK trust store if this TPM's manufacturer is trusted"
    )]
    UntrustedIssuer { subject: String, issuer: String },
    #[error(
        "the signature of {subject} does not verify with the trusted CA \"{issuer}\": it was \
         signed by another key (a CA using the same name, or a damaged certificate)"
    )]
    BadSignature { subject: String, issuer: String },
    #[error("{subject} expired at {not_after} (unix {not_after_unix})")]
    Expired {
        subject: String,
        not_after: String,
        not_after_unix: i64,
    },
    #[error(
        "{subject} is not valid before {not_before} (unix {not_before_unix}); check the hub's clock"
    )]
    NotYetValid {
        subject: String,
        not_before: String,
        not_before_unix: i64,
    },
    #[error("\"{subject}\" cannot issue certificates: {reason}")]
    NotACa { subject: String, reason: String },
    #[error(
        "the EK certificate is for another key than the TPM's endorsement key (certificate: \
         {cert_key}; TPM: {ek_key})"
    )]
    KeyMismatch { cert_key: String, ek_key: String },
    #[error("unsupported key: {0}")]
    UnsupportedKey(String),
    #[error("no chain of at most {MAX_CHAIN} certificates reaches a trusted root from {subject}")]
    ChainTooLong { subject: String },
}

fn malformed(what: &'static str, reason: impl std::fmt::Display) -> EkCertError {
    EkCertError::Malformed {
        what,
        reason: reason.to_string(),
    }
}

/// The CA certificates an operator trusts to certify EKs: manufacturer roots, and the
/// intermediates that complete their chains (TPMs store only the EK certificate itself).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EkTrust {
    /// DER, each checked to parse when added.
    certs: Vec<Vec<u8>>,
}

impl EkTrust {
    pub fn new() -> Self {
        Self::default()
    }

    /// From one or more PEM `CERTIFICATE` blocks (other blocks are skipped); fails if
    /// there is none or one does not parse.
    pub fn from_pem(pem: &[u8]) -> Result<Self, EkCertError> {
        let mut trust = Self::new();
        trust.add_pem(pem)?;
        Ok(trust)
    }

    /// Adds the certificates of PEM `CERTIFICATE` blocks; returns how many.
    pub fn add_pem(&mut self, pem: &[u8]) -> Result<usize, EkCertError> {
        let mut added = 0;
        for block in Pem::iter_from_buffer(pem) {
            let block = block.map_err(|e| malformed("PEM CA bundle", e))?;
            if block.label != "CERTIFICATE" {
                continue;
            }
            self.add_der(&block.contents)?;
            added += 1;
        }
        if added == 0 {
            return Err(malformed("PEM CA bundle", "no CERTIFICATE block"));
        }
        Ok(added)
    }

    /// Adds one DER certificate (a root or an intermediate).
    pub fn add_der(&mut self, der: &[u8]) -> Result<(), EkCertError> {
        let (rest, _) =
            X509Certificate::from_der(der).map_err(|e| malformed("CA certificate", e))?;
        if !rest.is_empty() {
            return Err(malformed("CA certificate", "trailing bytes after the DER"));
        }
        if !self.certs.iter().any(|c| c == der) {
            self.certs.push(der.to_vec());
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }

    fn parsed(&self) -> Result<Vec<X509Certificate<'_>>, EkCertError> {
        self.certs
            .iter()
            .map(|der| {
                X509Certificate::from_der(der)
                    .map(|(_, c)| c)
                    .map_err(|e| malformed("CA certificate", e))
            })
            .collect()
    }
}

/// What a verified EK certificate says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EkInfo {
    /// Often empty for EK certificates.
    pub subject: String,
    pub issuer: String,
    /// Serial number, hex.
    pub serial: String,
    /// SHA-256 of the certificate's DER: what to pin or show an operator.
    pub fingerprint_sha256: [u8; 32],
    pub not_after_unix: i64,
    /// Subjects of the CAs above the EK certificate, its issuer first, the root last.
    pub chain: Vec<String>,
    /// From the subjectAltName directoryName (TCG attributes), as written there: e.g.
    /// `id:49465800` (Infineon's vendor id "IFX"), a model name and `id:` firmware version.
    pub tpm_manufacturer: Option<String>,
    pub tpm_model: Option<String>,
    pub tpm_version: Option<String>,
}

/// Verifies that `cert_der` is an EK certificate for the EK `ek_public` (`TPM2B_PUBLIC`
/// as the TPM reports it) issued under a root in `trust`, valid at `now_unix_secs`.
///
/// Checks, in this order: the certificate parses; its public key is the EK's (RSA
/// modulus and exponent, or the ECC P-256 point); it is within its validity dates; and a
/// chain of valid CA certificates whose signatures verify leads from it to a
/// self-signed certificate in `trust`.
pub fn verify_ek_certificate(
    cert_der: &[u8],
    ek_public: &[u8],
    trust: &EkTrust,
    now_unix_secs: u64,
) -> Result<EkInfo, EkCertError> {
    let cert_der = trim_der(cert_der)?;
    let (_, leaf) =
        X509Certificate::from_der(cert_der).map_err(|e| malformed("EK certificate", e))?;
    check_key(&leaf, ek_public)?;
    let now = i64::try_from(now_unix_secs).unwrap_or(i64::MAX);
    check_validity(&leaf, now)?;
    let cas = trust.parsed()?;
    let path = find_chain(&leaf, &cas, now, 0)?;

    let mut info = EkInfo {
        subject: leaf.subject().to_string(),
        issuer: leaf.issuer().to_string(),
        serial: hex(leaf.raw_serial()),
        fingerprint_sha256: Sha256::digest(cert_der).into(),
        not_after_unix: leaf.validity().not_after.timestamp(),
        chain: path.iter().map(|&i| cas[i].subject().to_string()).collect(),
        tpm_manufacturer: None,
        tpm_model: None,
        tpm_version: None,
    };
    if let Ok(Some(san)) = leaf.subject_alternative_name() {
        for name in &san.value.general_names {
            let GeneralName::DirectoryName(dn) = name else {
                continue;
            };
            for attr in dn.iter_attributes() {
                let value = attr
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|_| hex(attr.as_slice()));
                match attr.attr_type().to_id_string().as_str() {
                    TPM_MANUFACTURER => info.tpm_manufacturer = Some(value),
                    TPM_MODEL => info.tpm_model = Some(value),
                    TPM_VERSION => info.tpm_version = Some(value),
                    _ => {}
                }
            }
        }
    }
    Ok(info)
}

/// Checks only that `cert_der` certifies the EK `ek_public` (`TPM2B_PUBLIC`): what the
/// agent checks before it presents a certificate with its EK, so a TPM whose NV holds a
/// certificate for another key fails at the agent with a clear message.
pub fn check_ek_key(cert_der: &[u8], ek_public: &[u8]) -> Result<(), EkCertError> {
    let (_, cert) = X509Certificate::from_der(trim_der(cert_der)?)
        .map_err(|e| malformed("EK certificate", e))?;
    check_key(&cert, ek_public)
}

/// The DER certificate at the start of `bytes`, without what follows it: TPMs may store
/// EK certificates in NV indices larger than the certificate, padded with zeros or 0xFF.
pub fn trim_der(bytes: &[u8]) -> Result<&[u8], EkCertError> {
    let bad = |reason: &str| malformed("EK certificate", reason);
    let [tag, first, rest @ ..] = bytes else {
        return Err(bad("shorter than a DER header"));
    };
    if *tag != 0x30 {
        return Err(bad("does not start with a DER SEQUENCE"));
    }
    let (header, len) = match *first {
        n if n < 0x80 => (2, usize::from(n)),
        0x81..=0x84 => {
            let n = usize::from(first & 0x7f);
            let len_bytes = rest.get(..n).ok_or_else(|| bad("truncated DER length"))?;
            let len = len_bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (2 + n, len)
        }
        _ => return Err(bad("unsupported DER length encoding")),
    };
    let end = header
        .checked_add(len)
        .filter(|end| *end <= bytes.len())
        .ok_or_else(|| bad("truncated: the DER length runs past the data"))?;
    let (cert, padding) = bytes.split_at(end);
    if !(padding.iter().all(|b| *b == 0) || padding.iter().all(|b| *b == 0xff)) {
        return Err(bad("trailing bytes after the DER certificate"));
    }
    Ok(cert)
}

/// How a certificate is named in errors: its subject, or its issuer and serial when the
/// subject is empty (usual for EK certificates).
fn describe(cert: &X509Certificate<'_>) -> String {
    let subject = cert.subject().to_string();
    if subject.is_empty() {
        format!(
            "the certificate with serial {} from \"{}\"",
            hex(cert.raw_serial()),
            cert.issuer()
        )
    } else {
        format!("\"{subject}\"")
    }
}

fn check_validity(cert: &X509Certificate<'_>, now: i64) -> Result<(), EkCertError> {
    let v = cert.validity();
    if now < v.not_before.timestamp() {
        return Err(EkCertError::NotYetValid {
            subject: describe(cert),
            not_before: v.not_before.to_string(),
            not_before_unix: v.not_before.timestamp(),
        });
    }
    if now > v.not_after.timestamp() {
        return Err(EkCertError::Expired {
            subject: describe(cert),
            not_after: v.not_after.to_string(),
            not_after_unix: v.not_after.timestamp(),
        });
    }
    Ok(())
}

/// Issuer/subject match: the exact DER, or failing that the same text (CAs are not
/// always consistent in string types); signatures decide in the end.
fn names_match(a: &X509Name<'_>, b: &X509Name<'_>) -> bool {
    a.as_raw() == b.as_raw() || a.to_string().eq_ignore_ascii_case(&b.to_string())
}

fn is_self_signed(cert: &X509Certificate<'_>) -> bool {
    names_match(cert.subject(), cert.issuer()) && cert.verify_signature(None).is_ok()
}

/// Checks that `ca` may issue certificates with `below` CA certificates under it.
fn check_ca(ca: &X509Certificate<'_>, below: usize) -> Result<(), EkCertError> {
    let not_ca = |reason: String| EkCertError::NotACa {
        subject: ca.subject().to_string(),
        reason,
    };
    match ca.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => {
            if let Some(max) = bc.value.path_len_constraint
                && usize::try_from(max).is_ok_and(|max| below > max)
            {
                return Err(not_ca(format!(
                    "its path length constraint allows {max} CA certificates below it, \
                     the chain has {below}"
                )));
            }
        }
        Ok(_) => return Err(not_ca("it is not marked as a CA (basicConstraints)".into())),
        Err(e) => return Err(not_ca(format!("unreadable basicConstraints: {e}"))),
    }
    match ca.key_usage() {
        Ok(Some(ku)) if !ku.value.key_cert_sign() => {
            Err(not_ca("its key usage does not include keyCertSign".into()))
        }
        Ok(_) => Ok(()),
        Err(e) => Err(not_ca(format!("unreadable keyUsage: {e}"))),
    }
}

/// Indices into `cas` of the chain above `cert`, its issuer first, ending at a
/// self-signed CA. `depth`: CA certificates already between the EK certificate and `cert`.
fn find_chain(
    cert: &X509Certificate<'_>,
    cas: &[X509Certificate<'_>],
    now: i64,
    depth: usize,
) -> Result<Vec<usize>, EkCertError> {
    let mut error = None;
    for (i, ca) in cas.iter().enumerate() {
        if !names_match(ca.subject(), cert.issuer()) {
            continue;
        }
        // Signature first: an error about a CA that did not sign this is noise.
        if cert.verify_signature(Some(ca.public_key())).is_err() {
            error.get_or_insert(EkCertError::BadSignature {
                subject: describe(cert),
                issuer: ca.subject().to_string(),
            });
            continue;
        }
        let checked = check_ca(ca, depth).and_then(|()| check_validity(ca, now));
        if let Err(e) = checked {
            // A real problem with a CA that did sign: more useful than a bad signature.
            error = Some(e);
            continue;
        }
        if is_self_signed(ca) {
            return Ok(vec![i]);
        }
        if depth + 2 >= MAX_CHAIN {
            error = Some(EkCertError::ChainTooLong {
                subject: describe(cert),
            });
            continue;
        }
        match find_chain(ca, cas, now, depth + 1) {
            Ok(mut above) => {
                above.insert(0, i);
                return Ok(above);
            }
            Err(e) => error = Some(e),
        }
    }
    Err(error.unwrap_or_else(|| EkCertError::UntrustedIssuer {
        subject: describe(cert),
        issuer: cert.issuer().to_string(),
    }))
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let first = b.iter().position(|x| *x != 0).unwrap_or(b.len());
    &b[first..]
}

/// A short, readable name for a key in errors: its type and a fingerprint.
fn key_label(kind: &str, material: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for m in material {
        h.update(m);
    }
    format!("{kind}, SHA-256 {}…", &hex(&h.finalize())[..16])
}

fn check_key(cert: &X509Certificate<'_>, ek_public: &[u8]) -> Result<(), EkCertError> {
    let ek = AkPublic::from_tpm2b_public(ek_public).map_err(|e| match e {
        crate::quote::QuoteError::UnsupportedKey(k) => {
            EkCertError::UnsupportedKey(format!("endorsement key {k}"))
        }
        other => malformed("EK public area", other),
    })?;
    let spki = cert.public_key();
    let parsed = spki
        .parsed()
        .map_err(|e| malformed("EK certificate public key", e))?;
    let (cert_key, same) = match (&parsed, &ek) {
        (PublicKey::RSA(k), _) => {
            let (n, e) = (strip_zeros(k.modulus), strip_zeros(k.exponent));
            let same = matches!(&ek, AkPublic::Rsa { n: en, e: ee }
                if strip_zeros(en) == n && strip_zeros(ee) == e);
            (key_label(&format!("RSA-{}", n.len() * 8), &[n, e]), same)
        }
        (PublicKey::EC(point), _) => {
            let curve = spki
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.as_oid().ok());
            let (name, p256) = match curve {
                Some(c) if c == OID_EC_P256 => ("ECC P-256".to_owned(), true),
                Some(c) if c == OID_NIST_EC_P384 => ("ECC P-384".to_owned(), false),
                Some(c) => (format!("ECC curve {c}"), false),
                None => ("ECC, no curve".to_owned(), false),
            };
            let same = p256 && matches!(&ek, AkPublic::EccP256 { point: ep } if ep == point.data());
            (key_label(&name, &[point.data()]), same)
        }
        (other, _) => (format!("{} key", key_kind(other)), false),
    };
    if same {
        return Ok(());
    }
    let ek_key = match &ek {
        AkPublic::Rsa { n, e } => {
            let (n, e) = (strip_zeros(n), strip_zeros(e));
            key_label(&format!("RSA-{}", n.len() * 8), &[n, e])
        }
        AkPublic::EccP256 { point } => key_label("ECC P-256", &[point]),
    };
    Err(EkCertError::KeyMismatch { cert_key, ek_key })
}

fn key_kind(k: &PublicKey<'_>) -> &'static str {
    match k {
        PublicKey::RSA(_) => "RSA",
        PublicKey::EC(_) => "EC",
        PublicKey::DSA(_) => "DSA",
        PublicKey::GostR3410(_) | PublicKey::GostR3410_2012(_) => "GOST",
        PublicKey::Unknown(_) => "unknown",
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        let trust = EkTrust::new();
        for bytes in [
            &b""[..],
            b"\x30",
            b"\x30\x82\xff\xff",
            b"\x30\x03\x02\x01\x01",
            b"not a certificate at all",
        ] {
            assert!(matches!(
                verify_ek_certificate(bytes, &[0, 0], &trust, 0),
                Err(EkCertError::Malformed { .. })
            ));
        }
        assert!(EkTrust::from_pem(b"nothing here").is_err());
    }

    #[test]
    fn trim_der_drops_padding_only() {
        let mut padded = vec![0x30, 0x03, 1, 2, 3];
        assert_eq!(trim_der(&padded).unwrap(), &padded[..]);
        padded.extend([0, 0, 0]);
        assert_eq!(trim_der(&padded).unwrap(), &padded[..5]);
        padded.push(7);
        assert!(trim_der(&padded).is_err());
    }
}
