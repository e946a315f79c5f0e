//! The agent's side: a real TPM 2.0 through tss-esapi (feature `agent`; links the C
//! library tpm2-tss). Opens a TPM from a TCTI string (`device:/dev/tpmrm0` on boxes,
//! `swtpm:host=127.0.0.1,port=P` in tests) and implements [`Attester`] on it.
//!
//! What [`Device::open`] sets up, and why:
//! - **EK** from the TCG default template (low range: ECC P-256 or RSA-2048), with the
//!   manufacturer's EK certificate from NV when there is one. The ECC EK is preferred
//!   when the TPM has an ECC EK certificate (index `0x01c0000a`), else the RSA EK when it
//!   has an RSA one (`0x01c00002`), else the ECC EK without certificate. The certificate
//!   must certify the EK the template gives, or opening fails: a hub would refuse the
//!   pair anyway, and the agent's error says which NV index is wrong.
//! - **AK**: a restricted ECDSA P-256 signing key made persistent at
//!   [`DEFAULT_AK_HANDLE`], so it survives agent restarts and reboots (the hub pins the
//!   AK at enrollment). An object already there is reused if it is a restricted signing
//!   key that cannot leave this TPM; anything else fails rather than being evicted.
//! - Nothing else stays loaded: the EK is created for activation only, and sealing
//!   creates the storage key each time, so a TPM without a resource manager (swtpm,
//!   three object slots) has room for what the caller does.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::aead;
use ring::rand::{SecureRandom, SystemRandom};
use tss_esapi::Context;
use tss_esapi::abstraction::{AsymmetricAlgorithmSelection, DefaultKey, ak, ek, pcr};
use tss_esapi::attributes::{ObjectAttributesBuilder, SessionAttributesBuilder};
use tss_esapi::constants::{CapabilityType, SessionType, Tss2ResponseCodeKind};
use tss_esapi::handles::{
    AuthHandle, KeyHandle, ObjectHandle, PcrHandle, PersistentTpmHandle, SessionHandle, TpmHandle,
};
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, PublicAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::interface_types::dynamic_handles::Persistent;
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::key_bits::RsaKeyBits;
use tss_esapi::interface_types::resource_handles::{Hierarchy, Provision};
use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
use tss_esapi::structures::{
    CapabilityData, Data, Digest, DigestValues, EccParameter, EccPoint, EccScheme, EncryptedSecret,
    IdObject, KeyDerivationFunctionScheme, KeyedHashScheme, PcrSelectionList,
    PcrSelectionListBuilder, PcrSlot, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyedHashParameters, SensitiveData, SignatureScheme, SymmetricDefinition,
    SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};

use cairn_tpm::attest::{AttestError, Attester, Identity, IdentityKind, Quoted};
use cairn_tpm::ekcert;
use cairn_tpm::quote::{AkPublic, verify_quote};

pub use cairn_tpm::attest::QuoteBytes;

/// Where the AK is kept unless [`DeviceConfig::ak_handle`] says otherwise. Note that TCG
/// reserves `0x8101xxxx` for endorsement keys and some provisioning tools persist an ECC
/// EK here; [`Device::open`] then fails clearly (it is not a signing key) and the
/// operator picks another handle.
pub const DEFAULT_AK_HANDLE: u32 = 0x8101_0002;
/// The firmware event log as Linux exposes it (securityfs).
pub const DEFAULT_EVENT_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
/// The IMA measurement list with sha256 template digests (Linux 6.10+; see
/// [`cairn_tpm::ima`]).
pub const DEFAULT_IMA_LOG: &str = "/sys/kernel/security/ima/binary_runtime_measurements_sha256";
/// TCG EK Credential Profile, low range: RSA-2048 and ECC P-256 EK certificates.
pub const RSA_EK_CERT_INDEX: u32 = 0x01c0_0002;
pub const ECC_EK_CERT_INDEX: u32 = 0x01c0_000a;
/// Largest sensitive data a sealed object holds (`MAX_SYM_DATA` in the TPM spec).
pub const MAX_SEALED_DIRECT: usize = 128;
/// Largest data [`Attester::seal`] accepts (sealed as a key plus software AES-GCM).
pub const MAX_SEALED_DATA: usize = 64 * 1024;
/// How often [`Attester::quote`] retries when PCRs change between quote and read.
const QUOTE_ATTEMPTS: usize = 5;

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
    #[error(
        "the EK certificate in NV index {index:#010x} does not belong to this TPM's {algorithm} \
         endorsement key ({source}); the TPM's NV holds a wrong certificate: have it \
         reprovisioned, or pick the other EK algorithm in the agent's configuration"
    )]
    EkCertificate {
        index: u32,
        algorithm: &'static str,
        #[source]
        source: ekcert::EkCertError,
    },
    #[error(
        "persistent handle {handle:#010x} holds a key that is not a usable attestation key \
         ({reason}); it was left alone: free that handle or configure another AK handle"
    )]
    NotAnAk { handle: u32, reason: String },
    #[error(
        "this blob was sealed by another TPM, or this TPM's owner hierarchy was cleared since, \
         or the blob was altered (the TPM refused to load it: {source}); it cannot be unsealed \
         here, so make a new secret and enroll again"
    )]
    SealedElsewhere {
        #[source]
        source: tss_esapi::Error,
    },
    #[error("malformed sealed blob: {0}")]
    BadBlob(String),
}

fn at(step: &'static str) -> impl FnOnce(tss_esapi::Error) -> DeviceError {
    move |source| DeviceError::Tpm { step, source }
}

impl From<DeviceError> for AttestError {
    fn from(e: DeviceError) -> Self {
        AttestError::Tpm(e.to_string())
    }
}

/// Which endorsement key to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EkChoice {
    /// ECC if the TPM has an ECC EK certificate, else RSA if it has an RSA one, else ECC.
    #[default]
    Auto,
    Ecc,
    Rsa,
}

/// The endorsement key algorithm a [`Device`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EkAlgorithm {
    /// ECC NIST P-256, TCG template L-2.
    EccP256,
    /// RSA-2048, TCG template L-1.
    Rsa2048,
}

impl EkAlgorithm {
    fn name(self) -> &'static str {
        match self {
            EkAlgorithm::EccP256 => "ECC P-256",
            EkAlgorithm::Rsa2048 => "RSA-2048",
        }
    }

    fn cert_index(self) -> u32 {
        match self {
            EkAlgorithm::EccP256 => ECC_EK_CERT_INDEX,
            EkAlgorithm::Rsa2048 => RSA_EK_CERT_INDEX,
        }
    }

    fn selection(self) -> AsymmetricAlgorithmSelection {
        match self {
            EkAlgorithm::EccP256 => AsymmetricAlgorithmSelection::Ecc(EccCurve::NistP256),
            EkAlgorithm::Rsa2048 => AsymmetricAlgorithmSelection::Rsa(RsaKeyBits::Rsa2048),
        }
    }

    fn asymmetric(self) -> AsymmetricAlgorithm {
        match self {
            EkAlgorithm::EccP256 => AsymmetricAlgorithm::Ecc,
            EkAlgorithm::Rsa2048 => AsymmetricAlgorithm::Rsa,
        }
    }
}

/// How to open a [`Device`]; `Default` is what a box uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceConfig {
    /// The firmware event log [`Attester::event_log`] reads ([`DEFAULT_EVENT_LOG`]).
    pub event_log_path: PathBuf,
    /// The IMA list (sha256 per-bank format) [`Attester::ima_log`] reads
    /// ([`DEFAULT_IMA_LOG`]); `None`: never report one.
    pub ima_log_path: Option<PathBuf>,
    /// Persistent handle of the AK ([`DEFAULT_AK_HANDLE`]).
    pub ak_handle: u32,
    pub ek: EkChoice,
}

impl Default for DeviceConfig {
    fn default() -> Self {
        Self {
            event_log_path: PathBuf::from(DEFAULT_EVENT_LOG),
            ima_log_path: Some(PathBuf::from(DEFAULT_IMA_LOG)),
            ak_handle: DEFAULT_AK_HANDLE,
            ek: EkChoice::Auto,
        }
    }
}

/// An open TPM with its persistent attestation key.
pub struct Device {
    ctx: Context,
    ek_algorithm: EkAlgorithm,
    /// The persistent AK (an ESYS handle for the persistent object; nothing to flush).
    ak: KeyHandle,
    ak_key: AkPublic,
    identity: Identity,
    event_log_path: PathBuf,
    ima_log_path: Option<PathBuf>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("ek_algorithm", &self.ek_algorithm)
            .field("ek_certificate", &self.identity.ek_certificate.is_some())
            .field("event_log_path", &self.event_log_path)
            .finish_non_exhaustive()
    }
}

impl Device {
    /// Opens the TPM behind `tcti` with the default configuration.
    pub fn open(tcti: &str) -> Result<Self, DeviceError> {
        Self::open_with(tcti, &DeviceConfig::default())
    }

    /// Opens the TPM behind `tcti`: picks the EK and reads its certificate, checks that
    /// they match, and loads (or creates and persists) the AK. See the module docs.
    pub fn open_with(tcti: &str, config: &DeviceConfig) -> Result<Self, DeviceError> {
        let conf = TctiNameConf::from_str(tcti).map_err(at("parsing the TCTI string"))?;
        let mut ctx = Context::new(conf).map_err(at("opening"))?;

        let nv = handles(&mut ctx, 0x0100_0000)?;
        let has = |index: u32| nv.contains(&index);
        let ek_algorithm = match config.ek {
            EkChoice::Ecc => EkAlgorithm::EccP256,
            EkChoice::Rsa => EkAlgorithm::Rsa2048,
            EkChoice::Auto if has(ECC_EK_CERT_INDEX) => EkAlgorithm::EccP256,
            EkChoice::Auto if has(RSA_EK_CERT_INDEX) => EkAlgorithm::Rsa2048,
            EkChoice::Auto => EkAlgorithm::EccP256,
        };
        let ek_certificate = if has(ek_algorithm.cert_index()) {
            let raw = ek::retrieve_ek_pubcert(&mut ctx, ek_algorithm.selection())
                .map_err(at("reading the EK certificate from NV"))?;
            let der = ekcert::trim_der(&raw).map_err(|source| DeviceError::EkCertificate {
                index: ek_algorithm.cert_index(),
                algorithm: ek_algorithm.name(),
                source,
            })?;
            Some(der.to_vec())
        } else {
            None
        };

        let ek = ek::create_ek_object(&mut ctx, ek_algorithm.asymmetric(), DefaultKey)
            .map_err(at("creating the endorsement key"))?;
        let ek_public = public_tpm2b(&mut ctx, ek, "reading the endorsement key");
        ctx.flush_context(ek.into())
            .map_err(at("flushing the endorsement key"))?;
        let ek_public = ek_public?;
        if let Some(cert) = &ek_certificate {
            ekcert::check_ek_key(cert, &ek_public).map_err(|source| {
                DeviceError::EkCertificate {
                    index: ek_algorithm.cert_index(),
                    algorithm: ek_algorithm.name(),
                    source,
                }
            })?;
        }

        let ak = persistent_ak(&mut ctx, ek_algorithm, config.ak_handle)?;
        let ak_public = public_tpm2b(&mut ctx, ak, "reading the attestation key")?;
        check_ak(&mut ctx, ak, config.ak_handle)?;
        let ak_key = AkPublic::from_tpm2b_public(&ak_public).map_err(|e| DeviceError::NotAnAk {
            handle: config.ak_handle,
            reason: e.to_string(),
        })?;
        Ok(Self {
            ctx,
            ek_algorithm,
            ak,
            ak_key,
            identity: Identity {
                kind: IdentityKind::Tpm,
                ek_public,
                ek_certificate,
                ak_public,
            },
            event_log_path: config.event_log_path.clone(),
            ima_log_path: config.ima_log_path.clone(),
        })
    }

    /// Reads the firmware event log from `path` instead (same as
    /// [`DeviceConfig::event_log_path`]).
    pub fn with_event_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.event_log_path = path.into();
        self
    }

    /// Reads the IMA measurement list (sha256 per-bank format) from `path` instead
    /// (same as [`DeviceConfig::ima_log_path`]).
    pub fn with_ima_log(mut self, path: impl Into<PathBuf>) -> Self {
        self.ima_log_path = Some(path.into());
        self
    }

    /// The EK's public area (`TPM2B_PUBLIC`), for the hub's MakeCredential.
    pub fn ek_public(&self) -> &[u8] {
        &self.identity.ek_public
    }

    /// The AK's public area (`TPM2B_PUBLIC`), for [`cairn_tpm::quote::AkPublic`].
    pub fn ak_public(&self) -> &[u8] {
        &self.identity.ak_public
    }

    /// The EK certificate (DER) read from NV, if the TPM has one for the chosen EK.
    pub fn ek_certificate(&self) -> Option<&[u8]> {
        self.identity.ek_certificate.as_deref()
    }

    pub fn ek_algorithm(&self) -> EkAlgorithm {
        self.ek_algorithm
    }

    /// The current values of the sha256 bank's `pcrs`.
    pub fn pcr_values(&mut self, pcrs: &[u32]) -> Result<BTreeMap<u32, [u8; 32]>, DeviceError> {
        read_pcrs(&mut self.ctx, pcrs)
    }

    /// Extends PCR 16 (the debug PCR) with `digest` (sha256 bank).
    pub fn extend_debug_pcr(&mut self, digest: [u8; 32]) -> Result<(), DeviceError> {
        self.extend_pcr(16, digest)
    }

    /// Extends PCR `index` with `digest` (sha256 bank), as firmware or a test would.
    pub fn extend_pcr(&mut self, index: u32, digest: [u8; 32]) -> Result<(), DeviceError> {
        extend_pcr(&mut self.ctx, index, digest)
    }

    fn quote_once(
        &mut self,
        nonce: &Data,
        selection: PcrSelectionList,
    ) -> Result<QuoteBytes, DeviceError> {
        let ak = self.ak;
        let nonce = nonce.clone();
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

    fn activate(&mut self, blob: &[u8], secret: &[u8]) -> Result<Vec<u8>, DeviceError> {
        let blob = IdObject::try_from(tpm2b_body(blob, "credential blob")?)
            .map_err(at("reading the credential blob"))?;
        let secret = EncryptedSecret::try_from(tpm2b_body(secret, "credential secret")?)
            .map_err(at("reading the credential secret"))?;
        let ek = ek::create_ek_object(&mut self.ctx, self.ek_algorithm.asymmetric(), DefaultKey)
            .map_err(at("creating the endorsement key"))?;
        let result = self.activate_with(ek, blob, secret);
        let flushed = self
            .ctx
            .flush_context(ek.into())
            .map_err(at("flushing the endorsement key"));
        let value = result?;
        flushed?;
        Ok(value)
    }

    fn activate_with(
        &mut self,
        ek: KeyHandle,
        blob: IdObject,
        secret: EncryptedSecret,
    ) -> Result<Vec<u8>, DeviceError> {
        // The EK may only be used under a policy: PolicySecret with the endorsement
        // hierarchy (the TCG default EK policy, for both low-range templates).
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
        let ak = self.ak;
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

    /// Runs `f` with the storage root key (TCG Provisioning Guidance template, ECC P-256,
    /// owner hierarchy) and a session salted to it that encrypts the first parameter
    /// both ways, so sealed data never crosses the bus in clear; flushes both after.
    fn with_srk<T>(
        &mut self,
        f: impl FnOnce(&mut Context, KeyHandle, AuthSession) -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let srk = self
            .ctx
            .execute_with_nullauth_session(|ctx| {
                ctx.create_primary(Hierarchy::Owner, srk_template()?, None, None, None, None)
            })
            .map_err(at("creating the storage root key"))?
            .key_handle;
        let result = self.with_salted_session(srk, f);
        let flushed = self
            .ctx
            .flush_context(srk.into())
            .map_err(at("flushing the storage root key"));
        let value = result?;
        flushed?;
        Ok(value)
    }

    fn with_salted_session<T>(
        &mut self,
        srk: KeyHandle,
        f: impl FnOnce(&mut Context, KeyHandle, AuthSession) -> Result<T, DeviceError>,
    ) -> Result<T, DeviceError> {
        let session = self
            .ctx
            .start_auth_session(
                Some(srk),
                None,
                None,
                SessionType::Hmac,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(at("starting the sealing session"))?
            .ok_or_else(|| DeviceError::Invalid("the TPM returned no session".into()))?;
        let (attributes, mask) = SessionAttributesBuilder::new()
            .with_decrypt(true)
            .with_encrypt(true)
            .with_continue_session(true)
            .build();
        let mut out = None;
        let done = self.ctx.execute_with_temporary_object(
            SessionHandle::from(session).into(),
            |ctx, _| {
                ctx.tr_sess_set_attributes(session, attributes, mask)?;
                out = Some(f(ctx, srk, session));
                Ok(())
            },
        );
        done.map_err(at("with the sealing session"))?;
        out.unwrap_or_else(|| Err(DeviceError::Invalid("sealing did not run".into())))
    }

    fn seal_bytes(&mut self, data: &[u8]) -> Result<Vec<u8>, DeviceError> {
        if data.len() > MAX_SEALED_DATA {
            return Err(DeviceError::Invalid(format!(
                "{} bytes is more than the {MAX_SEALED_DATA} bytes this seals",
                data.len()
            )));
        }
        let rng = SystemRandom::new();
        let (mode, sealed, key) = if data.len() <= MAX_SEALED_DIRECT {
            (MODE_DIRECT, data.to_vec(), None)
        } else {
            let mut key = [0u8; 32];
            rng.fill(&mut key)
                .map_err(|_| DeviceError::Invalid("no randomness for the sealing key".into()))?;
            (MODE_ENVELOPE, key.to_vec(), Some(key))
        };
        let sensitive =
            SensitiveData::try_from(sealed).map_err(at("preparing the data to seal"))?;
        let created = self.with_srk(|ctx, srk, session| {
            ctx.execute_with_session(Some(session), |ctx| {
                ctx.create(srk, sealed_template()?, None, Some(sensitive), None, None)
            })
            .map_err(at("sealing"))
        })?;
        let mut blob = SEAL_MAGIC.to_vec();
        blob.push(mode);
        let public = created
            .out_public
            .marshall()
            .map_err(at("encoding the sealed object"))?;
        blob.extend(tpm2b(&public)?);
        blob.extend(tpm2b(created.out_private.value())?);
        if let Some(key) = key {
            let mut nonce = [0u8; 12];
            rng.fill(&mut nonce)
                .map_err(|_| DeviceError::Invalid("no randomness for the nonce".into()))?;
            let mut ciphertext = data.to_vec();
            gcm_key(&key)?
                .seal_in_place_append_tag(
                    aead::Nonce::assume_unique_for_key(nonce),
                    aead::Aad::from(blob.clone()),
                    &mut ciphertext,
                )
                .map_err(|_| DeviceError::Invalid("AES-GCM encryption failed".into()))?;
            blob.extend(nonce);
            blob.extend(ciphertext);
        }
        Ok(blob)
    }

    fn unseal_bytes(&mut self, blob: &[u8]) -> Result<Vec<u8>, DeviceError> {
        let parsed = SealedBlob::parse(blob)?;
        let public = Public::unmarshall(parsed.public)
            .map_err(|e| DeviceError::BadBlob(format!("sealed object public area: {e}")))?;
        let private = Private::try_from(parsed.private.to_vec())
            .map_err(|e| DeviceError::BadBlob(format!("sealed object private area: {e}")))?;
        let unsealed = self.with_srk(|ctx, srk, session| {
            let object = ctx
                .execute_with_nullauth_session(|ctx| ctx.load(srk, private, public))
                .map_err(|source| match &source {
                    tss_esapi::Error::Tss2Error(rc)
                        if matches!(
                            rc.kind(),
                            Some(Tss2ResponseCodeKind::Integrity | Tss2ResponseCodeKind::Size)
                        ) =>
                    {
                        DeviceError::SealedElsewhere { source }
                    }
                    _ => DeviceError::Tpm {
                        step: "loading the sealed object",
                        source,
                    },
                })?;
            let result = ctx
                .execute_with_session(Some(session), |ctx| ctx.unseal(object.into()))
                .map_err(at("unsealing"));
            let flushed = ctx
                .flush_context(object.into())
                .map_err(at("flushing the sealed object"));
            let value = result?;
            flushed?;
            Ok(value.value().to_vec())
        })?;
        match parsed.envelope {
            None => Ok(unsealed),
            Some((nonce, ciphertext)) => {
                let key: [u8; 32] = unsealed
                    .as_slice()
                    .try_into()
                    .map_err(|_| DeviceError::BadBlob("the sealed key is not 32 bytes".into()))?;
                let mut buf = ciphertext.to_vec();
                let plain = gcm_key(&key)?
                    .open_in_place(
                        aead::Nonce::assume_unique_for_key(nonce),
                        aead::Aad::from(parsed.header),
                        &mut buf,
                    )
                    .map_err(|_| {
                        DeviceError::BadBlob(
                            "the encrypted data does not decrypt with the sealed key (altered)"
                                .into(),
                        )
                    })?;
                Ok(plain.to_vec())
            }
        }
    }
}

/// `seal` blobs, version 1:
/// `"CSL" 0x01 | mode (0: data sealed in the TPM object; 1: a 32-byte AES-256-GCM key
/// sealed, data encrypted in software) | TPM2B_PUBLIC | TPM2B_PRIVATE`, then for mode 1
/// a 12-byte nonce and the ciphertext with its 16-byte tag; the GCM additional data is
/// everything before the nonce, so the ciphertext is bound to its sealed key.
const SEAL_MAGIC: &[u8; 4] = b"CSL\x01";
const MODE_DIRECT: u8 = 0;
const MODE_ENVELOPE: u8 = 1;

struct SealedBlob<'a> {
    header: &'a [u8],
    public: &'a [u8],
    private: &'a [u8],
    envelope: Option<([u8; 12], &'a [u8])>,
}

impl<'a> SealedBlob<'a> {
    fn parse(blob: &'a [u8]) -> Result<Self, DeviceError> {
        let bad = |what: &str| DeviceError::BadBlob(what.to_owned());
        let rest = blob
            .strip_prefix(SEAL_MAGIC)
            .ok_or_else(|| bad("not a Cairn sealed blob (version 1)"))?;
        let (&mode, rest) = rest.split_first().ok_or_else(|| bad("no mode byte"))?;
        let (public, rest) = take_tpm2b(rest).ok_or_else(|| bad("truncated public area"))?;
        let (private, rest) = take_tpm2b(rest).ok_or_else(|| bad("truncated private area"))?;
        let header = &blob[..blob.len() - rest.len()];
        let envelope = match mode {
            MODE_DIRECT if rest.is_empty() => None,
            MODE_DIRECT => return Err(bad("trailing bytes")),
            MODE_ENVELOPE => {
                let (nonce, ciphertext) = rest
                    .split_first_chunk::<12>()
                    .ok_or_else(|| bad("truncated nonce"))?;
                if ciphertext.len() < aead::AES_256_GCM.tag_len() {
                    return Err(bad("truncated ciphertext"));
                }
                Some((*nonce, ciphertext))
            }
            other => return Err(DeviceError::BadBlob(format!("unknown mode {other}"))),
        };
        Ok(Self {
            header,
            public,
            private,
            envelope,
        })
    }
}

fn take_tpm2b(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let (size, rest) = b.split_first_chunk::<2>()?;
    let size = usize::from(u16::from_be_bytes(*size));
    (rest.len() >= size).then(|| rest.split_at(size))
}

fn gcm_key(key: &[u8; 32]) -> Result<aead::LessSafeKey, DeviceError> {
    aead::UnboundKey::new(&aead::AES_256_GCM, key)
        .map(aead::LessSafeKey::new)
        .map_err(|_| DeviceError::Invalid("AES-GCM key setup failed".into()))
}

impl Attester for Device {
    fn identity(&self) -> &Identity {
        &self.identity
    }

    fn activate_credential(&mut self, blob: &[u8], secret: &[u8]) -> Result<Vec<u8>, AttestError> {
        Ok(self.activate(blob, secret)?)
    }

    /// Quotes, then reads the PCRs and checks them against the quote's digest (with the
    /// hub's own verifier), retrying if a PCR was extended in between: the values
    /// returned are exactly the quoted ones.
    fn quote(&mut self, nonce: &[u8], pcrs: &[u32]) -> Result<Quoted, AttestError> {
        let data = Data::try_from(nonce.to_vec())
            .map_err(|_| DeviceError::Invalid("nonce longer than 64 bytes".into()))?;
        for _ in 0..QUOTE_ATTEMPTS {
            let quote = self.quote_once(&data, selection(pcrs)?)?;
            let values = self.pcr_values(pcrs)?;
            match verify_quote(
                &self.ak_key,
                &quote.attest,
                &quote.signature,
                nonce,
                &values,
            ) {
                Ok(_) => {
                    return Ok(Quoted {
                        quote,
                        pcrs: values,
                    });
                }
                Err(cairn_tpm::quote::QuoteError::PcrMismatch) => continue,
                Err(e) => {
                    return Err(AttestError::Tpm(format!(
                        "the TPM's own quote does not verify: {e}"
                    )));
                }
            }
        }
        Err(AttestError::Tpm(format!(
            "PCRs changed between quote and read {QUOTE_ATTEMPTS} times in a row"
        )))
    }

    /// Reads [`DeviceConfig::event_log_path`]; a missing file means the platform keeps
    /// no log (empty), any other failure is an error.
    fn event_log(&mut self) -> Result<Vec<u8>, AttestError> {
        read_event_log(&self.event_log_path)
    }

    /// Reads [`DeviceConfig::ima_log_path`]; a missing file (IMA off, or a kernel
    /// without per-bank lists) means none, any other failure is an error.
    fn ima_log(&mut self) -> Result<Option<Vec<u8>>, AttestError> {
        let Some(path) = &self.ima_log_path else {
            return Ok(None);
        };
        match std::fs::read(path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(AttestError::Log {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Seals `data` (at most [`MAX_SEALED_DATA`] bytes) under the storage root key:
    /// only this TPM, with its owner hierarchy not cleared, can unseal it. Up to
    /// [`MAX_SEALED_DIRECT`] bytes go into the TPM object itself; larger data (a PKCS#8
    /// key is bigger) is encrypted with AES-256-GCM in software under a random key, and
    /// that key is sealed. There is deliberately **no PCR policy**: an upgrade changes
    /// the PCRs and must not lock the device out of its own key; what the PCRs say is
    /// the hub's business, through quotes.
    fn seal(&mut self, data: &[u8]) -> Result<Option<Vec<u8>>, AttestError> {
        Ok(Some(self.seal_bytes(data)?))
    }

    /// Unseals a [`Attester::seal`] blob; a blob from another TPM fails with a message
    /// saying so.
    fn unseal(&mut self, blob: &[u8]) -> Result<Vec<u8>, AttestError> {
        Ok(self.unseal_bytes(blob)?)
    }
}

fn read_event_log(path: &Path) -> Result<Vec<u8>, AttestError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(source) => Err(AttestError::Log {
            path: path.display().to_string(),
            source,
        }),
    }
}

/// The handles of the TPM's `first >> 24` range (NV indices, persistent objects).
fn handles(ctx: &mut Context, first: u32) -> Result<Vec<u32>, DeviceError> {
    let mut out = Vec::new();
    let mut next = first;
    loop {
        let (data, more) = ctx
            .execute_without_session(|ctx| ctx.get_capability(CapabilityType::Handles, next, 64))
            .map_err(at("listing handles"))?;
        let CapabilityData::Handles(list) = data else {
            return Err(DeviceError::Invalid(
                "the TPM answered another capability".into(),
            ));
        };
        let page: Vec<u32> = list
            .into_inner()
            .into_iter()
            .map(u32::from)
            .filter(|h| h >> 24 == first >> 24)
            .collect();
        let last = page.last().copied();
        out.extend(page);
        match last {
            Some(last) if more => next = last + 1,
            _ => return Ok(out),
        }
    }
}

/// The AK at `handle`: the object already there, or a new one created under the EK and
/// made persistent.
fn persistent_ak(
    ctx: &mut Context,
    ek_algorithm: EkAlgorithm,
    handle: u32,
) -> Result<KeyHandle, DeviceError> {
    let tpm_handle = PersistentTpmHandle::new(handle)
        .map_err(|_| DeviceError::Invalid(format!("{handle:#010x} is not a persistent handle")))?;
    if handles(ctx, 0x8100_0000)?.contains(&handle) {
        let object = ctx
            .execute_without_session(|ctx| {
                ctx.tr_from_tpm_public(TpmHandle::Persistent(tpm_handle))
            })
            .map_err(at("opening the persistent attestation key"))?;
        return Ok(object.into());
    }
    let ek = ek::create_ek_object(ctx, ek_algorithm.asymmetric(), DefaultKey)
        .map_err(at("creating the endorsement key"))?;
    let made = make_ak(ctx, ek, tpm_handle);
    let flushed = ctx
        .flush_context(ek.into())
        .map_err(at("flushing the endorsement key"));
    let ak = made?;
    flushed?;
    Ok(ak)
}

fn make_ak(
    ctx: &mut Context,
    ek: KeyHandle,
    handle: PersistentTpmHandle,
) -> Result<KeyHandle, DeviceError> {
    let created = ak::create_ak(
        ctx,
        ek,
        HashingAlgorithm::Sha256,
        SignatureSchemeAlgorithm::EcDsa,
        None,
        DefaultKey,
    )
    .map_err(at("creating the attestation key"))?;
    let transient = ak::load_ak(ctx, ek, None, created.out_private, created.out_public)
        .map_err(at("loading the attestation key"))?;
    let persisted = ctx
        .execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.evict_control(
                Provision::Owner,
                transient.into(),
                Persistent::Persistent(handle),
            )
        })
        .map_err(at(
            "making the attestation key persistent (needs the owner hierarchy's authorization)",
        ));
    let flushed = ctx
        .flush_context(transient.into())
        .map_err(at("flushing the transient attestation key"));
    let persisted: ObjectHandle = persisted?;
    flushed?;
    Ok(persisted.into())
}

/// An AK must be a restricted signing key that cannot leave this TPM: restricted, so it
/// signs only TPM-generated structures (a quote cannot be forged with it); fixedTPM, so
/// it is not a copy of a key that also lives elsewhere.
fn check_ak(ctx: &mut Context, ak: KeyHandle, handle: u32) -> Result<(), DeviceError> {
    let (public, _, _) = ctx
        .read_public(ak)
        .map_err(at("reading the attestation key"))?;
    let a = public.object_attributes();
    let problem = if !matches!(public, Public::Ecc { .. } | Public::Rsa { .. }) {
        Some("it is not an asymmetric key")
    } else if !a.sign_encrypt() || a.decrypt() {
        Some("it is not a signing-only key")
    } else if !a.restricted() {
        Some("it is not restricted, so it could sign forged quotes")
    } else if !a.fixed_tpm() {
        Some("it is not fixedTPM, so copies may exist outside this TPM")
    } else {
        None
    };
    match problem {
        Some(reason) => Err(DeviceError::NotAnAk {
            handle,
            reason: reason.into(),
        }),
        None => Ok(()),
    }
}

/// TCG TPM v2.0 Provisioning Guidance, storage root key, ECC NIST P-256 template:
/// restricted decryption key, AES-128-CFB for children, SHA-256, no policy, empty auth,
/// all-zero unique. Deterministic: the same key every time until the owner hierarchy
/// is cleared, which is what makes sealed blobs portable across agent restarts.
fn srk_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new()
                .with_symmetric(SymmetricDefinitionObject::AES_128_CFB)
                .with_ecc_scheme(EccScheme::Null)
                .with_curve(EccCurve::NistP256)
                .with_key_derivation_function_scheme(KeyDerivationFunctionScheme::Null)
                .with_is_signing_key(false)
                .with_is_decryption_key(true)
                .with_restricted(true)
                .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::new(
            EccParameter::try_from(vec![0u8; 32])?,
            EccParameter::try_from(vec![0u8; 32])?,
        ))
        .build()
}

/// A sealed data object: keyed-hash, data supplied by us, usable with an empty
/// authorization and no policy (see [`Attester::seal`] on why no PCR policy), bound to
/// this TPM and this parent.
fn sealed_template() -> tss_esapi::Result<Public> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(true)
        .with_no_da(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

fn public_tpm2b(
    ctx: &mut Context,
    key: KeyHandle,
    step: &'static str,
) -> Result<Vec<u8>, DeviceError> {
    let (public, _, _) = ctx.read_public(key).map_err(at(step))?;
    tpm2b(&public.marshall().map_err(at(step))?)
}

fn read_pcrs(ctx: &mut Context, pcrs: &[u32]) -> Result<BTreeMap<u32, [u8; 32]>, DeviceError> {
    let data = pcr::read_all(ctx, selection(pcrs)?).map_err(at("reading PCRs"))?;
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

/// Extends PCR `index`'s sha256 bank with `digest` on an open context (shared with the
/// testkit's firmware stand-in).
pub(crate) fn extend_pcr(
    ctx: &mut Context,
    index: u32,
    digest: [u8; 32],
) -> Result<(), DeviceError> {
    let handle =
        PcrHandle::try_from(index).map_err(|_| DeviceError::Invalid(format!("no PCR {index}")))?;
    let mut values = DigestValues::new();
    values.set(
        HashingAlgorithm::Sha256,
        Digest::try_from(digest.to_vec()).map_err(at("building the digest"))?,
    );
    ctx.execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
        .map_err(at("extending a PCR"))
}

fn tpm2b_body(b: &[u8], what: &str) -> Result<Vec<u8>, DeviceError> {
    match b.split_first_chunk::<2>() {
        Some((n, rest)) if usize::from(u16::from_be_bytes(*n)) == rest.len() => Ok(rest.to_vec()),
        _ => Err(DeviceError::Invalid(format!("malformed {what}"))),
    }
}

fn tpm2b(body: &[u8]) -> Result<Vec<u8>, DeviceError> {
    let size = u16::try_from(body.len())
        .map_err(|_| DeviceError::Invalid("TPM structure too large".into()))?;
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
