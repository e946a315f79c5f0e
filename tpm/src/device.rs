//! The agent's side: a real TPM 2.0 through tss-esapi (feature `agent`; links the C
//! library tpm2-tss). Opens a TPM from a TCTI string (`device:/dev/tpmrm0` on boxes,
//! `swtpm:host=127.0.0.1,port=P` in tests), creates the endorsement key from the
//! standard template and an attestation key under it, and quotes PCRs over a nonce. The
//! outputs are the wire structures [`crate::quote`] verifies on the hub.
//!
//! Still to come with the attestation issue: a persistent AK, the EK certificate from
//! NV, reading the firmware and IMA logs.

use std::collections::BTreeMap;
use std::str::FromStr;

use tss_esapi::Context;
use tss_esapi::abstraction::{DefaultKey, ak, ek, pcr};
use tss_esapi::constants::SessionType;
use tss_esapi::handles::{AuthHandle, KeyHandle, PcrHandle, SessionHandle};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    Data, Digest, DigestValues, EncryptedSecret, IdObject, PcrSelectionList,
    PcrSelectionListBuilder, PcrSlot, SignatureScheme, SymmetricDefinition,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;

/// What went wrong talking to the TPM; each says which step.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("TPM {step}: {source}")]
    Tpm {
        step: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn at(step: &'static str) -> impl FnOnce(tss_esapi::Error) -> DeviceError {
    move |source| DeviceError::Tpm { step, source }
}

pub use crate::attest::QuoteBytes;

/// An open TPM with an attestation key loaded.
pub struct Device {
    ctx: Context,
    ek: KeyHandle,
    /// The EK's public area as `TPM2B_PUBLIC`.
    ek_public: Vec<u8>,
    ak: KeyHandle,
    /// The AK's public area as `TPM2B_PUBLIC`.
    ak_public: Vec<u8>,
}

impl Device {
    /// Opens the TPM behind `tcti`, creates the ECC P-256 endorsement key from the TCG
    /// default template and an ECDSA P-256 attestation key under it.
    pub fn open(tcti: &str) -> Result<Self, DeviceError> {
        let conf = TctiNameConf::from_str(tcti).map_err(at("parsing the TCTI string"))?;
        let mut ctx = Context::new(conf).map_err(at("opening"))?;
        let ek = ek::create_ek_object(&mut ctx, AsymmetricAlgorithm::Ecc, DefaultKey)
            .map_err(at("creating the endorsement key"))?;
        let created = ak::create_ak(
            &mut ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::EcDsa,
            None,
            DefaultKey,
        )
        .map_err(at("creating the attestation key"))?;
        let ak_public = tpm2b(
            &created
                .out_public
                .marshall()
                .map_err(at("encoding the attestation key"))?,
        )?;
        let ak = ak::load_ak(&mut ctx, ek, None, created.out_private, created.out_public)
            .map_err(at("loading the attestation key"))?;
        let (ek_pub, _, _) = ctx
            .read_public(ek)
            .map_err(at("reading the endorsement key"))?;
        let ek_public = tpm2b(
            &ek_pub
                .marshall()
                .map_err(at("encoding the endorsement key"))?,
        )?;
        Ok(Self {
            ctx,
            ek,
            ek_public,
            ak,
            ak_public,
        })
    }

    /// The EK's public area (`TPM2B_PUBLIC`), for the hub's MakeCredential.
    pub fn ek_public(&self) -> &[u8] {
        &self.ek_public
    }

    /// Recovers the secret in a credential the hub made for this TPM's EK and AK
    /// (`blob`: `TPM2B_ID_OBJECT`, `secret`: `TPM2B_ENCRYPTED_SECRET`). Fails unless
    /// both keys are this TPM's.
    pub fn activate_credential(
        &mut self,
        blob: &[u8],
        secret: &[u8],
    ) -> Result<Vec<u8>, DeviceError> {
        let body = |b: &[u8], what: &str| -> Result<Vec<u8>, DeviceError> {
            match b.split_first_chunk::<2>() {
                Some((n, rest)) if usize::from(u16::from_be_bytes(*n)) == rest.len() => {
                    Ok(rest.to_vec())
                }
                _ => Err(DeviceError::Invalid(format!("malformed {what}"))),
            }
        };
        let blob = IdObject::try_from(body(blob, "credential blob")?)
            .map_err(at("reading the credential blob"))?;
        let secret = EncryptedSecret::try_from(body(secret, "credential secret")?)
            .map_err(at("reading the credential secret"))?;
        // The EK may only be used under a policy: PolicySecret with the endorsement
        // hierarchy (the TCG default EK policy).
        let policy = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(at("starting the EK policy session"))?
            .ok_or_else(|| DeviceError::Invalid("the TPM returned no session".into()))?;
        let (ak, ek) = (self.ak, self.ek);
        let result =
            self.ctx
                .execute_with_temporary_object(SessionHandle::from(policy).into(), |ctx, _| {
                    ctx.execute_with_nullauth_session(|ctx| {
                        ctx.policy_secret(
                            PolicySession::try_from(policy)?,
                            AuthHandle::Endorsement,
                            Default::default(),
                            Default::default(),
                            Default::default(),
                            None,
                        )
                    })?;
                    ctx.execute_with_sessions(
                        (Some(AuthSession::Password), Some(policy), None),
                        |ctx| ctx.activate_credential(ak, ek, blob, secret),
                    )
                });
        Ok(result
            .map_err(at("activating the credential"))?
            .value()
            .to_vec())
    }

    /// The AK's public area (`TPM2B_PUBLIC`), for [`crate::quote::AkPublic`].
    pub fn ak_public(&self) -> &[u8] {
        &self.ak_public
    }

    /// Quotes the sha256 bank's `pcrs` over `nonce`.
    pub fn quote(&mut self, nonce: &[u8], pcrs: &[u32]) -> Result<QuoteBytes, DeviceError> {
        let selection = selection(pcrs)?;
        let nonce = Data::try_from(nonce.to_vec())
            .map_err(|_| DeviceError::Invalid("nonce longer than 64 bytes".into()))?;
        let ak = self.ak;
        let (attest, signature) = self
            .ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.quote(ak, nonce, SignatureScheme::Null, selection)
            })
            .map_err(at("quoting"))?;
        Ok(QuoteBytes {
            attest: attest.marshall().map_err(at("encoding the quote"))?,
            signature: signature.marshall().map_err(at("encoding the signature"))?,
        })
    }

    /// The current values of the sha256 bank's `pcrs`.
    pub fn pcr_values(&mut self, pcrs: &[u32]) -> Result<BTreeMap<u32, [u8; 32]>, DeviceError> {
        let data = pcr::read_all(&mut self.ctx, selection(pcrs)?).map_err(at("reading PCRs"))?;
        let bank = data
            .pcr_bank(HashingAlgorithm::Sha256)
            .ok_or_else(|| DeviceError::Invalid("the TPM has no sha256 PCR bank".into()))?;
        let mut out = BTreeMap::new();
        for &i in pcrs {
            let digest = bank
                .get_digest(slot(i)?)
                .ok_or_else(|| DeviceError::Invalid(format!("PCR {i} was not read")))?;
            let value: [u8; 32] = digest
                .value()
                .try_into()
                .map_err(|_| DeviceError::Invalid(format!("PCR {i} is not 32 bytes")))?;
            out.insert(i, value);
        }
        Ok(out)
    }

    /// Extends PCR 16 (the debug PCR) with `digest` (sha256 bank).
    pub fn extend_debug_pcr(&mut self, digest: [u8; 32]) -> Result<(), DeviceError> {
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(digest.to_vec()).map_err(at("building the digest"))?,
        );
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(PcrHandle::Pcr16, values))
            .map_err(at("extending PCR 16"))
    }
}

fn tpm2b(body: &[u8]) -> Result<Vec<u8>, DeviceError> {
    let size = u16::try_from(body.len())
        .map_err(|_| DeviceError::Invalid("public area too large".into()))?;
    let mut out = size.to_be_bytes().to_vec();
    out.extend_from_slice(body);
    Ok(out)
}

fn slot(index: u32) -> Result<PcrSlot, DeviceError> {
    1u32.checked_shl(index)
        .and_then(|bit| PcrSlot::try_from(bit).ok())
        .ok_or_else(|| DeviceError::Invalid(format!("no PCR {index}")))
}

fn selection(pcrs: &[u32]) -> Result<PcrSelectionList, DeviceError> {
    let slots = pcrs
        .iter()
        .map(|i| slot(*i))
        .collect::<Result<Vec<_>, _>>()?;
    PcrSelectionListBuilder::new()
        .with_selection(HashingAlgorithm::Sha256, &slots)
        .build()
        .map_err(at("selecting PCRs"))
}
