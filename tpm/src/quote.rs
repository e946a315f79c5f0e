//! Hub-side verification of TPM 2.0 quotes, in pure Rust: the wire structures are read
//! with `tpm2-protocol`, signatures checked with `ring`; no TPM and no libtss2 needed.
//!
//! A quote is a `TPMS_ATTEST` of type `TPM_ST_ATTEST_QUOTE` signed by an attestation
//! key (AK). [`verify_quote`] checks, in this order: the signature over the exact bytes
//! of the attestation with the AK's public key, that it is a quote, that its
//! qualifying data is the nonce the hub sent (freshness: no replay), and that its PCR
//! digest is the SHA-256 of the PCR values the caller expects (for instance those
//! replayed from the event log). Only then are its fields returned.

use std::collections::BTreeMap;

use ring::signature::{self, UnparsedPublicKey};
use sha2::{Digest, Sha256};
use tpm2_protocol::TpmUnmarshal;
use tpm2_protocol::data::{
    TpmAlgId, TpmEccCurve, TpmSt, TpmsAttest, TpmtPublic, TpmtSignature, TpmuAttest, TpmuPublicId,
    TpmuPublicParms, TpmuSignature,
};

/// Why a quote was refused. Each says what was wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuoteError {
    #[error("malformed {what}: {reason}")]
    Malformed { what: &'static str, reason: String },
    #[error("unsupported attestation key: {0}")]
    UnsupportedKey(String),
    #[error("unsupported signature: {0}")]
    UnsupportedSignature(String),
    #[error("the signature does not verify with the device's attestation key")]
    BadSignature,
    #[error("the attestation is a {0:?}, not a quote")]
    NotAQuote(String),
    #[error("the quote answers another nonce: replayed or stale")]
    NonceMismatch,
    #[error("the quote selects PCRs of bank {0}; only sha256 is verified")]
    UnsupportedBank(String),
    #[error("the quote covers PCR {0}, for which no expected value was given")]
    MissingPcr(u32),
    #[error("the quoted PCR digest differs from the digest of the expected PCR values")]
    PcrMismatch,
}

fn malformed(what: &'static str, e: impl std::fmt::Debug) -> QuoteError {
    QuoteError::Malformed {
        what,
        reason: format!("{e:?}"),
    }
}

/// The public part of an attestation key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AkPublic {
    /// NIST P-256, as an uncompressed SEC1 point (`04 || x || y`).
    EccP256 { point: Vec<u8> },
    /// RSA modulus and public exponent, big-endian.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// `TPMA_OBJECT` bits an attestation key must have: the TPM made it (sensitive data
/// origin) and it never leaves it (fixedTPM, fixedParent), and it signs only what the TPM
/// itself produced (restricted + sign), never decrypts.
const FIXED_TPM: u32 = 1 << 1;
const FIXED_PARENT: u32 = 1 << 4;
const SENSITIVE_DATA_ORIGIN: u32 = 1 << 5;
const RESTRICTED: u32 = 1 << 16;
const DECRYPT: u32 = 1 << 17;
const SIGN: u32 = 1 << 18;

/// Checks that a `TPM2B_PUBLIC` is an attestation key: restricted, signing, not
/// decrypting, created in and bound to its TPM. An unrestricted key in the same TPM
/// would pass credential activation but could sign any made-up `TPMS_ATTEST`.
pub fn check_ak_attributes(tpm2b_public: &[u8]) -> Result<(), QuoteError> {
    AkPublic::from_tpm2b_public(tpm2b_public)?;
    // size (2) | type (2) | nameAlg (2) | objectAttributes (4, big-endian)
    let attrs = tpm2b_public
        .get(6..10)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map(u32::from_be_bytes)
        .ok_or_else(|| malformed("TPM2B_PUBLIC", "no object attributes"))?;
    let need = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN;
    if attrs & need != need || attrs & DECRYPT != 0 {
        return Err(QuoteError::UnsupportedKey(format!(
            "attributes {attrs:#010x} are not an attestation key's (restricted, sign, fixedTPM, fixedParent, sensitiveDataOrigin, no decrypt)"
        )));
    }
    Ok(())
}

impl AkPublic {
    /// The key material only (ECC point or RSA modulus and exponent), independent of the
    /// public area's attributes and policy: what identifies the key.
    pub fn key_bytes(&self) -> Vec<u8> {
        match self {
            AkPublic::EccP256 { point } => point.to_vec(),
            AkPublic::Rsa { n, e } => {
                let mut v = n.clone();
                v.extend_from_slice(e);
                v
            }
        }
    }

    /// From a `TPM2B_PUBLIC` (a `TPMT_PUBLIC` with a 2-byte size in front), as
    /// `tpm2_createak -u` and `TPM2_ReadPublic` give it.
    pub fn from_tpm2b_public(bytes: &[u8]) -> Result<Self, QuoteError> {
        let Some((size, rest)) = bytes.split_first_chunk::<2>() else {
            return Err(malformed("TPM2B_PUBLIC", "shorter than its size field"));
        };
        let size = usize::from(u16::from_be_bytes(*size));
        if rest.len() != size {
            return Err(malformed(
                "TPM2B_PUBLIC",
                format!("size field says {size} bytes, {} follow", rest.len()),
            ));
        }
        Self::from_tpmt_public(rest)
    }

    /// From a `TPMT_PUBLIC`.
    pub fn from_tpmt_public(bytes: &[u8]) -> Result<Self, QuoteError> {
        let (public, rest) =
            TpmtPublic::unmarshal(bytes).map_err(|e| malformed("TPMT_PUBLIC", e))?;
        if !rest.is_empty() {
            return Err(malformed("TPMT_PUBLIC", "trailing bytes"));
        }
        match (&public.parameters, &public.unique) {
            (TpmuPublicParms::Ecc(p), TpmuPublicId::Ecc(point)) => {
                if p.curve_id != TpmEccCurve::NistP256 {
                    return Err(QuoteError::UnsupportedKey(format!(
                        "ECC curve {:?}",
                        p.curve_id
                    )));
                }
                let (x, y) = (point.x.as_ref(), point.y.as_ref());
                if x.len() > 32 || y.len() > 32 {
                    return Err(malformed(
                        "TPMS_ECC_POINT",
                        "coordinate longer than 32 bytes",
                    ));
                }
                let mut sec1 = vec![0x04];
                sec1.extend(left_pad(x, 32));
                sec1.extend(left_pad(y, 32));
                Ok(AkPublic::EccP256 { point: sec1 })
            }
            (TpmuPublicParms::Rsa(p), TpmuPublicId::Rsa(n)) => {
                // An exponent of 0 means the default, 65537.
                let e = match p.exponent.value() {
                    0 => 65537u32,
                    e => e,
                };
                let e = e.to_be_bytes();
                let first = e.iter().position(|b| *b != 0).unwrap_or(3);
                Ok(AkPublic::Rsa {
                    n: n.as_ref().to_vec(),
                    e: e[first..].to_vec(),
                })
            }
            (other, _) => Err(QuoteError::UnsupportedKey(format!("{other:?}"))),
        }
    }

    /// Verifies `signature` (a `TPMT_SIGNATURE`) over `message`.
    fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), QuoteError> {
        let (sig, rest) =
            TpmtSignature::unmarshal(signature).map_err(|e| malformed("TPMT_SIGNATURE", e))?;
        if !rest.is_empty() {
            return Err(malformed("TPMT_SIGNATURE", "trailing bytes"));
        }
        match (self, &sig.signature) {
            (AkPublic::EccP256 { point }, TpmuSignature::Ecdsa(s)) => {
                if s.hash != TpmAlgId::Sha256 {
                    return Err(QuoteError::UnsupportedSignature(format!(
                        "ECDSA with {:?}",
                        s.hash
                    )));
                }
                let (r, s) = (s.signature_r.as_ref(), s.signature_s.as_ref());
                if r.len() > 32 || s.len() > 32 {
                    return Err(QuoteError::BadSignature);
                }
                let mut fixed = left_pad(r, 32);
                fixed.extend(left_pad(s, 32));
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, &fixed)
                    .map_err(|_| QuoteError::BadSignature)
            }
            (AkPublic::Rsa { n, e }, TpmuSignature::Rsassa(s)) => {
                if s.hash != TpmAlgId::Sha256 {
                    return Err(QuoteError::UnsupportedSignature(format!(
                        "RSASSA with {:?}",
                        s.hash
                    )));
                }
                signature::RsaPublicKeyComponents { n, e }
                    .verify(
                        &signature::RSA_PKCS1_2048_8192_SHA256,
                        message,
                        s.sig.as_ref(),
                    )
                    .map_err(|_| QuoteError::BadSignature)
            }
            (_, other) => Err(QuoteError::UnsupportedSignature(format!(
                "{:?} for this key",
                sig_name(other)
            ))),
        }
    }
}

fn sig_name(s: &TpmuSignature) -> &'static str {
    match s {
        TpmuSignature::Rsassa(_) => "RSASSA",
        TpmuSignature::Rsapss(_) => "RSAPSS",
        TpmuSignature::Ecdsa(_) => "ECDSA",
        TpmuSignature::Ecdaa(_) => "ECDAA",
        TpmuSignature::Sm2(_) => "SM2",
        TpmuSignature::Ecschnorr(_) => "EC-Schnorr",
        TpmuSignature::Hmac(_) => "HMAC",
        TpmuSignature::Null => "no signature",
    }
}

fn left_pad(v: &[u8], len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len.saturating_sub(v.len())];
    out.extend_from_slice(v);
    out
}

/// What a verified quote says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedQuote {
    /// PCR indices covered (sha256 bank), ascending.
    pub pcrs: Vec<u32>,
    /// The TPM's clock (ms) and its reset and restart counters: a lower reset count
    /// than seen before means the TPM was cleared or swapped.
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
}

/// Verifies a quote: `attest` (the `TPMS_ATTEST` bytes as signed), `signature` (a
/// `TPMT_SIGNATURE`), made by `ak`, answering `nonce`, over PCR values that must equal
/// `expected` (sha256 bank: index → value).
pub fn verify_quote(
    ak: &AkPublic,
    attest: &[u8],
    signature: &[u8],
    nonce: &[u8],
    expected: &BTreeMap<u32, [u8; 32]>,
) -> Result<VerifiedQuote, QuoteError> {
    ak.verify(attest, signature)?;
    let (a, rest) = TpmsAttest::unmarshal(attest).map_err(|e| malformed("TPMS_ATTEST", e))?;
    if !rest.is_empty() {
        return Err(malformed("TPMS_ATTEST", "trailing bytes"));
    }
    let TpmuAttest::Quote(info) = &a.attested else {
        return Err(QuoteError::NotAQuote(format!("{:?}", a.attest_type)));
    };
    if a.attest_type != TpmSt::AttestQuote {
        return Err(QuoteError::NotAQuote(format!("{:?}", a.attest_type)));
    }
    if a.extra_data.as_ref() != nonce {
        return Err(QuoteError::NonceMismatch);
    }
    let mut hasher = Sha256::new();
    let mut pcrs = Vec::new();
    for sel in info.pcr_select.iter() {
        if sel.hash != TpmAlgId::Sha256 {
            return Err(QuoteError::UnsupportedBank(format!("{:?}", sel.hash)));
        }
        for (byte, bits) in sel.pcr_select.iter().enumerate() {
            for bit in 0..8 {
                if bits & (1 << bit) != 0 {
                    let index = (byte * 8 + bit) as u32;
                    let value = expected.get(&index).ok_or(QuoteError::MissingPcr(index))?;
                    hasher.update(value);
                    pcrs.push(index);
                }
            }
        }
    }
    if hasher.finalize().as_slice() != info.pcr_digest.as_ref() {
        return Err(QuoteError::PcrMismatch);
    }
    Ok(VerifiedQuote {
        pcrs,
        clock: a.clock_info.clock.value(),
        reset_count: a.clock_info.reset_count.value(),
        restart_count: a.clock_info.restart_count.value(),
        firmware_version: a.firmware_version.value(),
    })
}
