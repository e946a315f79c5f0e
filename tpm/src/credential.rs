//! MakeCredential on the hub, in pure Rust (TPM 2.0 Part 1, "Credential Protection"):
//! a secret only the TPM holding the endorsement key can recover, and only for the
//! attestation key named in it (`TPM2_ActivateCredential` checks that the AK is loaded
//! in the same TPM). This is how the hub learns that an AK lives in the TPM whose EK it
//! knows, before it trusts the AK's quotes.
//!
//! For an ECC P-256 EK: an ephemeral ECDH key agreement with the EK gives Z; the seed
//! is KDFe(SHA-256, Z, "IDENTITY", ephemeral x, EK x); from the seed KDFa derives an
//! AES-128 key ("STORAGE", bound to the AK's name) that encrypts the credential in CFB
//! mode, and an HMAC key ("INTEGRITY") that seals it with the AK's name.
//!
//! For an RSA-2048 EK the seed is 32 random bytes encrypted to the EK with RSA-OAEP
//! (SHA-256, label `"IDENTITY\0"`, the terminating zero included as the TPM does); the
//! rest is the same.
//!
//! Both are the TCG default EK templates of the low range (RSA-2048 and ECC P-256, name
//! algorithm SHA-256, AES-128-CFB): other EKs are refused, since their seed size and
//! symmetric key differ and a credential made for them would silently not activate.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use ring::rand::SecureRandom;
use ring::{agreement, hmac, rand};
use sha2::{Digest, Sha256};
use tpm2_protocol::TpmUnmarshal;
use tpm2_protocol::data::{TpmAlgId, TpmtPublic, TpmuPublicParms, TpmuSymKeyBits, TpmuSymMode};

use crate::quote::{AkPublic, QuoteError};

/// TPM_ALG_SHA256, the name algorithm of the keys this supports.
const SHA256_ALG: [u8; 2] = [0x00, 0x0b];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("{0}")]
    Key(#[from] QuoteError),
    #[error(
        "only RSA-2048 and ECC P-256 endorsement keys from the TCG default templates \
         (SHA-256, AES-128-CFB) are supported; this EK is {0}"
    )]
    UnsupportedEk(String),
    #[error("the credential must be 1 to 32 bytes")]
    BadSecret,
    #[error("key agreement with the endorsement key failed: {0}")]
    Crypto(&'static str),
}

/// What the agent passes to `TPM2_ActivateCredential`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credential {
    /// `TPM2B_ID_OBJECT`: integrity HMAC and the encrypted credential.
    pub blob: Vec<u8>,
    /// `TPM2B_ENCRYPTED_SECRET`: the ephemeral ECC point (ECC EK) or the OAEP-encrypted
    /// seed (RSA EK).
    pub secret: Vec<u8>,
}

/// The TPM name of a key: name algorithm and SHA-256 of its `TPMT_PUBLIC`, from the
/// `TPM2B_PUBLIC` (assumes SHA-256 as the key's name algorithm, as AKs here use).
pub fn object_name(tpm2b_public: &[u8]) -> Result<Vec<u8>, CredentialError> {
    AkPublic::from_tpm2b_public(tpm2b_public)?;
    let mut name = SHA256_ALG.to_vec();
    name.extend(Sha256::digest(&tpm2b_public[2..]));
    Ok(name)
}

/// SP 800-108 counter-mode KDF with HMAC-SHA256, as the TPM defines KDFa.
pub(crate) fn kdfa(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Vec<u8> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = Vec::new();
    let mut counter = 1u32;
    while out.len() * 8 < bits as usize {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(bits as usize / 8);
    out
}

/// The TPM's KDFe (SP 800-56A concatenation KDF with SHA-256).
pub(crate) fn kdfe(z: &[u8], label: &str, party_u: &[u8], party_v: &[u8], bits: u32) -> Vec<u8> {
    let mut out = Vec::new();
    let mut counter = 1u32;
    while out.len() * 8 < bits as usize {
        let mut h = Sha256::new();
        h.update(counter.to_be_bytes());
        h.update(z);
        h.update(label.as_bytes());
        h.update([0]);
        h.update(party_u);
        h.update(party_v);
        out.extend(h.finalize());
        counter += 1;
    }
    out.truncate(bits as usize / 8);
    out
}

fn tpm2b(data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(data);
    out
}

/// Makes a credential carrying `secret` for the AK `ak_public` in the TPM holding the
/// EK `ek_public` (both `TPM2B_PUBLIC`). The EK is RSA-2048 or ECC P-256 from the TCG
/// default templates.
pub fn make_credential(
    ek_public: &[u8],
    ak_public: &[u8],
    secret: &[u8],
) -> Result<Credential, CredentialError> {
    if secret.is_empty() || secret.len() > 32 {
        return Err(CredentialError::BadSecret);
    }
    check_ek_template(ek_public)?;
    let name = object_name(ak_public)?;
    let (seed, encrypted_seed) = match AkPublic::from_tpm2b_public(ek_public)? {
        AkPublic::EccP256 { point } => ecc_seed(&point)?,
        AkPublic::Rsa { n, e } => rsa_seed(&n, &e)?,
    };

    let sym_key = kdfa(&seed, "STORAGE", &name, &[], 128);
    let mut enc_identity = tpm2b(secret);
    cfb_mode::Encryptor::<aes::Aes128>::new_from_slices(&sym_key, &[0u8; 16])
        .map_err(|_| CredentialError::Crypto("AES key setup"))?
        .encrypt(&mut enc_identity);

    let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
    let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hmac_key));
    mac.update(&enc_identity);
    mac.update(&name);
    let outer = mac.sign();

    let mut id_object = tpm2b(outer.as_ref());
    id_object.extend(enc_identity);
    Ok(Credential {
        blob: tpm2b(&id_object),
        secret: tpm2b(&encrypted_seed),
    })
}

/// Refuses EKs whose name algorithm or symmetric key is not the low-range default's
/// (SHA-256, AES-128-CFB): the seed and the storage key depend on them.
fn check_ek_template(ek_public: &[u8]) -> Result<(), CredentialError> {
    let body = ek_public.get(2..).unwrap_or_default();
    let (public, _) = TpmtPublic::unmarshal(body)
        .map_err(|e| CredentialError::UnsupportedEk(format!("unreadable ({e:?})")))?;
    let symmetric = match &public.parameters {
        TpmuPublicParms::Rsa(p) => {
            let bits = p.key_bits.value();
            if bits != 2048 {
                return Err(CredentialError::UnsupportedEk(format!("RSA-{bits}")));
            }
            p.symmetric
        }
        TpmuPublicParms::Ecc(p) => p.symmetric,
        other => return Err(CredentialError::UnsupportedEk(format!("{other:?}"))),
    };
    if public.name_alg != TpmAlgId::Sha256 {
        return Err(CredentialError::UnsupportedEk(format!(
            "a key with name algorithm {:?}",
            public.name_alg
        )));
    }
    let aes128_cfb = symmetric.algorithm == TpmAlgId::Aes
        && matches!(symmetric.key_bits, TpmuSymKeyBits::Aes(b) if b.value() == 128)
        && matches!(symmetric.mode, TpmuSymMode::Aes(TpmAlgId::Cfb));
    if !aes128_cfb {
        return Err(CredentialError::UnsupportedEk(format!(
            "a key protecting its children with {symmetric:?}"
        )));
    }
    Ok(())
}

/// ECC EK: an ephemeral ECDH with the EK; the seed is KDFe of the shared secret, the
/// encrypted seed is the ephemeral point (`TPMS_ECC_POINT`).
fn ecc_seed(ek_point: &[u8]) -> Result<(Vec<u8>, Vec<u8>), CredentialError> {
    let rng = rand::SystemRandom::new();
    let ephemeral = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)
        .map_err(|_| CredentialError::Crypto("generating the ephemeral key"))?;
    let eph_point = ephemeral
        .compute_public_key()
        .map_err(|_| CredentialError::Crypto("computing the ephemeral public key"))?;
    let eph_point = eph_point.as_ref().to_vec();
    let z = agreement::agree_ephemeral(
        ephemeral,
        &agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, ek_point),
        |z| z.to_vec(),
    )
    .map_err(|_| CredentialError::Crypto("ECDH with the endorsement key"))?;
    // Uncompressed points: 04 || x (32) || y (32).
    let (eph_x, eph_y) = (&eph_point[1..33], &eph_point[33..65]);
    let ek_x = ek_point
        .get(1..33)
        .ok_or(CredentialError::Crypto("EK point too short"))?;
    let seed = kdfe(&z, "IDENTITY", eph_x, ek_x, 256);
    let mut point = tpm2b(eph_x);
    point.extend(tpm2b(eph_y));
    Ok((seed, point))
}

/// RSA EK: 32 random bytes (the size of a SHA-256 digest, the EK's name algorithm),
/// encrypted with RSA-OAEP SHA-256 and the label "IDENTITY\0".
fn rsa_seed(n: &[u8], e: &[u8]) -> Result<(Vec<u8>, Vec<u8>), CredentialError> {
    use rsa::traits::PublicKeyParts;
    let key = rsa::RsaPublicKey::new(
        rsa::BigUint::from_bytes_be(n),
        rsa::BigUint::from_bytes_be(e),
    )
    .map_err(|_| CredentialError::Crypto("the RSA endorsement key is not a valid key"))?;
    if key.size() != 256 {
        return Err(CredentialError::UnsupportedEk(format!(
            "RSA-{}",
            key.size() * 8
        )));
    }
    let mut seed = vec![0u8; 32];
    rand::SystemRandom::new()
        .fill(&mut seed)
        .map_err(|_| CredentialError::Crypto("generating the seed"))?;
    let encrypted = key
        .encrypt(
            &mut rsa::rand_core::OsRng,
            rsa::Oaep::new_with_label::<Sha256, _>("IDENTITY\0"),
            &seed,
        )
        .map_err(|_| CredentialError::Crypto("RSA-OAEP encryption of the seed"))?;
    Ok((seed, encrypted))
}
