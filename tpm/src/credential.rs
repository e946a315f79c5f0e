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

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use ring::{agreement, hmac, rand};
use sha2::{Digest, Sha256};

use crate::quote::{AkPublic, QuoteError};

/// TPM_ALG_SHA256, the name algorithm of the keys this supports.
const SHA256_ALG: [u8; 2] = [0x00, 0x0b];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("{0}")]
    Key(#[from] QuoteError),
    #[error("only ECC P-256 endorsement keys are supported")]
    UnsupportedEk,
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
    /// `TPM2B_ENCRYPTED_SECRET`: the ephemeral ECC point.
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
fn kdfa(key: &[u8], label: &str, context_u: &[u8], context_v: &[u8], bits: u32) -> Vec<u8> {
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
fn kdfe(z: &[u8], label: &str, party_u: &[u8], party_v: &[u8], bits: u32) -> Vec<u8> {
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
/// EK `ek_public` (both `TPM2B_PUBLIC`).
pub fn make_credential(
    ek_public: &[u8],
    ak_public: &[u8],
    secret: &[u8],
) -> Result<Credential, CredentialError> {
    if secret.is_empty() || secret.len() > 32 {
        return Err(CredentialError::BadSecret);
    }
    let AkPublic::EccP256 { point: ek_point } = AkPublic::from_tpm2b_public(ek_public)? else {
        return Err(CredentialError::UnsupportedEk);
    };
    let name = object_name(ak_public)?;

    let rng = rand::SystemRandom::new();
    let ephemeral = agreement::EphemeralPrivateKey::generate(&agreement::ECDH_P256, &rng)
        .map_err(|_| CredentialError::Crypto("generating the ephemeral key"))?;
    let eph_point = ephemeral
        .compute_public_key()
        .map_err(|_| CredentialError::Crypto("computing the ephemeral public key"))?;
    let eph_point = eph_point.as_ref().to_vec();
    let z = agreement::agree_ephemeral(
        ephemeral,
        &agreement::UnparsedPublicKey::new(&agreement::ECDH_P256, &ek_point),
        |z| z.to_vec(),
    )
    .map_err(|_| CredentialError::Crypto("ECDH with the endorsement key"))?;
    // Uncompressed points: 04 || x (32) || y (32).
    let (eph_x, eph_y) = (&eph_point[1..33], &eph_point[33..65]);
    let ek_x = &ek_point[1..33];
    let seed = kdfe(&z, "IDENTITY", eph_x, ek_x, 256);

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
    let mut point = tpm2b(eph_x);
    point.extend(tpm2b(eph_y));
    Ok(Credential {
        blob: tpm2b(&id_object),
        secret: tpm2b(&point),
    })
}
