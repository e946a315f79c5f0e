//! A software TPM: keys and PCRs in the agent's own memory, in pure Rust (no libtss2).
//!
//! [`SoftTpm`] is an [`Attester`] for the fleet simulation (thousands of simulated
//! agents in one process) and for boxes without a TPM whose policy allows it. Its
//! outputs are the TPM 2.0 wire structures a real TPM gives, byte for byte, so the hub
//! checks them with the same code as a chip's ([`crate::quote::verify_quote`],
//! [`crate::attest::verify_evidence`], [`crate::credential::make_credential`]):
//!
//! - the endorsement key (EK) is an ECC P-256 key whose `TPM2B_PUBLIC` is the TCG
//!   default ECC EK template (EK Credential Profile, template L-2) filled with its point;
//! - the attestation key (AK) is an ECC P-256 restricted ECDSA-SHA256 signing key shaped
//!   like the one `tpm2_createak -G ecc` and tss-esapi's `create_ak` make, a child of
//!   the EK in the endorsement hierarchy (which fixes its qualified name);
//! - a quote is a `TPMS_ATTEST` of type `TPM_ST_ATTEST_QUOTE` signed by the AK
//!   (deterministic ECDSA, RFC 6979), as a `TPMT_SIGNATURE`;
//! - `activate_credential` is `TPM2_ActivateCredential` for the ECC EK;
//! - "power on" simulates a measured boot: a crypto-agile TCG event log (sha256 only)
//!   whose replay gives the sha256 PCR bank, with the boot image measured into PCR 4.
//!
//! **It proves nothing about the hardware**: whoever can read the process's memory or
//! its state file can impersonate the device. Its identity says so
//! ([`IdentityKind::Software`], no EK certificate), and it cannot seal (the trait's
//! default `seal`/`unseal`: `Ok(None)` / unsupported), since there is nothing to seal to.
//!
//! Keys are derived from two 32-byte seeds (one for the EK, one for the AK), and only
//! on first use, so creating a `SoftTpm` costs a few hashes: the simulation can hold
//! 100k of them. [`SoftTpm::ephemeral`] derives the seeds from a `u64` (deterministic,
//! virtual clock); [`SoftTpm::load_or_create`] keeps them in a file.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Instant;

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use sha2::{Digest, Sha256};

use crate::attest::{AttestError, Attester, Identity, IdentityKind, QuoteBytes, Quoted};
use crate::credential::{kdfa, kdfe};

/// PCRs in the simulated sha256 bank (PC Client: 24).
pub const PCR_COUNT: usize = 24;
/// `TPMS_ATTEST.firmwareVersion` of every quote.
pub const FIRMWARE_VERSION: u64 = 0x4341_4952_0001_0000; // "CAIR", 1.0
/// Largest nonce a quote takes (`TPM2B_DATA` for a sha256-only TPM).
pub const MAX_NONCE: usize = 64;

/// The sha256 digest that the boot of `boot_image` extends into PCR 4 (its
/// `EV_EFI_BOOT_SERVICES_APPLICATION` event), for hub policies naming allowed images.
pub fn boot_image_digest(boot_image: &str) -> [u8; 32] {
    Sha256::digest(boot_image.as_bytes()).into()
}

/// Why a software TPM could not be made, rebooted or extended.
#[derive(Debug, thiserror::Error)]
pub enum SoftTpmError {
    #[error("reading the soft TPM state {path}: {source}")]
    ReadState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the soft TPM state {path} is unreadable ({reason}); remove it to give this device \
         a new identity (the hub will then see a new device)"
    )]
    CorruptState { path: PathBuf, reason: String },
    #[error("writing the soft TPM state {path}: {source}")]
    WriteState {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("drawing the soft TPM's key seeds: the system random generator failed")]
    Random,
    #[error("extending PCR {0}: the bank has PCRs 0 to 23")]
    NoSuchPcr(u32),
}

impl From<SoftTpmError> for AttestError {
    fn from(e: SoftTpmError) -> Self {
        AttestError::Tpm(e.to_string())
    }
}

/// A software TPM 2.0 (see the module docs). Not `Clone`: two copies would share an
/// identity but not their PCRs.
pub struct SoftTpm {
    ek_seed: [u8; 32],
    ak_seed: [u8; 32],
    /// Derived from the seeds on first use (an EC scalar multiplication each).
    keys: OnceLock<Keys>,
    pcrs: [[u8; 32]; PCR_COUNT],
    /// The event log since the last boot, in its wire form.
    log: Vec<u8>,
    reset_count: u32,
    clock: Clock,
    /// Where the seeds and the reset count live; `None` for an ephemeral TPM.
    state_path: Option<PathBuf>,
}

impl fmt::Debug for SoftTpm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the seeds.
        f.debug_struct("SoftTpm")
            .field("reset_count", &self.reset_count)
            .field("clock_ms", &self.clock_ms())
            .field("state_path", &self.state_path)
            .field("log_bytes", &self.log.len())
            .finish_non_exhaustive()
    }
}

enum Clock {
    /// Milliseconds since this `SoftTpm` was made, from the process's monotonic clock.
    Wall(Instant),
    /// Set by the caller (virtual time of a simulation).
    Virtual(u64),
}

struct Keys {
    ek: p256::SecretKey,
    ek_x: [u8; 32],
    ak: SigningKey,
    /// `TPM2B_NAME` body of the AK: nameAlg || sha256(TPMT_PUBLIC).
    ak_name: Vec<u8>,
    /// The AK's qualified name, which a TPM puts in `TPMS_ATTEST.qualifiedSigner`.
    ak_qualified_name: Vec<u8>,
    identity: Identity,
}

impl SoftTpm {
    /// A deterministic in-memory TPM: the same `seed` gives the same EK and AK, the same
    /// `boot_image` the same PCRs and log. Its clock is virtual, at 0 until
    /// [`SoftTpm::set_clock_ms`]; its reset count starts at 0. Costs a few hashes; the
    /// keys are derived on first use.
    pub fn ephemeral(seed: u64, boot_image: &str) -> Self {
        let derive = |label: &[u8]| -> [u8; 32] {
            let mut h = Sha256::new();
            h.update(b"cairn soft TPM ephemeral seed\0");
            h.update(label);
            h.update(seed.to_be_bytes());
            h.finalize().into()
        };
        let mut tpm = SoftTpm::new(derive(b"EK"), derive(b"AK"), 0, Clock::Virtual(0), None);
        tpm.power_on(boot_image);
        tpm
    }

    /// Boots the TPM whose seeds and reset count are kept in the file `path`, or makes a
    /// new one (random seeds) if there is none. Every call is a boot: the reset count
    /// goes up by one (0 on the first), PCRs and log start afresh from the measurements
    /// of `boot_image`; the EK and AK stay the same. The file (secret: it is the
    /// device's identity) is replaced atomically (temporary file, fsync, rename).
    pub fn load_or_create(path: &Path, boot_image: &str) -> Result<Self, SoftTpmError> {
        let (ek_seed, ak_seed, reset_count) = match std::fs::read_to_string(path) {
            Ok(text) => {
                let s = State::parse(&text).map_err(|reason| SoftTpmError::CorruptState {
                    path: path.to_path_buf(),
                    reason,
                })?;
                (s.ek_seed, s.ak_seed, s.reset_count.saturating_add(1))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let rng = SystemRandom::new();
                let mut seeds = [[0u8; 32]; 2];
                for s in &mut seeds {
                    rng.fill(s).map_err(|_| SoftTpmError::Random)?;
                }
                (seeds[0], seeds[1], 0)
            }
            Err(source) => {
                return Err(SoftTpmError::ReadState {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let mut tpm = SoftTpm::new(
            ek_seed,
            ak_seed,
            reset_count,
            Clock::Wall(Instant::now()),
            Some(path.to_path_buf()),
        );
        tpm.save()?;
        tpm.power_on(boot_image);
        Ok(tpm)
    }

    fn new(
        ek_seed: [u8; 32],
        ak_seed: [u8; 32],
        reset_count: u32,
        clock: Clock,
        state_path: Option<PathBuf>,
    ) -> Self {
        SoftTpm {
            ek_seed,
            ak_seed,
            keys: OnceLock::new(),
            pcrs: [[0; 32]; PCR_COUNT],
            log: Vec::new(),
            reset_count,
            clock,
            state_path,
        }
    }

    /// Reboots the simulated box into `boot_image` (a TPM Reset): reset count + 1 (saved
    /// first, for a persistent TPM), PCRs and log from a fresh measured boot. The clock
    /// keeps running, as a TPM's does.
    pub fn reboot(&mut self, boot_image: &str) -> Result<(), SoftTpmError> {
        self.reset_count = self.reset_count.saturating_add(1);
        self.save()?;
        self.power_on(boot_image);
        Ok(())
    }

    /// Extends sha256 PCR `pcr` with `digest`, recording an event in the log if
    /// `log_it`. Extending without logging is what tampering looks like to the hub: the
    /// log no longer replays to the quoted PCR.
    pub fn extend(&mut self, pcr: u32, digest: [u8; 32], log_it: bool) -> Result<(), SoftTpmError> {
        let index = usize::try_from(pcr)
            .ok()
            .filter(|i| *i < PCR_COUNT)
            .ok_or(SoftTpmError::NoSuchPcr(pcr))?;
        if log_it {
            self.measure(pcr, EV_IPL, digest, b"cairn soft TPM extend");
        } else {
            self.pcrs[index] = extend(&self.pcrs[index], &digest);
        }
        Ok(())
    }

    /// The sha256 bank, PCR 0 first.
    pub fn pcrs(&self) -> &[[u8; 32]; PCR_COUNT] {
        &self.pcrs
    }

    /// TPM resets (boots) since the TPM was made: `clockInfo.resetCount` of quotes.
    pub fn reset_count(&self) -> u32 {
        self.reset_count
    }

    /// Sets the clock (ms) quotes carry and switches it to virtual time; like
    /// `TPM2_ClockSet`, it never goes back (an earlier time is ignored).
    pub fn set_clock_ms(&mut self, ms: u64) {
        self.clock = Clock::Virtual(ms.max(self.clock_ms()));
    }

    /// `TPMS_ATTEST.clockInfo.clock` now.
    pub fn clock_ms(&self) -> u64 {
        match self.clock {
            Clock::Wall(start) => u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX),
            Clock::Virtual(ms) => ms,
        }
    }

    fn keys(&self) -> &Keys {
        self.keys
            .get_or_init(|| Keys::derive(&self.ek_seed, &self.ak_seed))
    }

    fn save(&self) -> Result<(), SoftTpmError> {
        let Some(path) = &self.state_path else {
            return Ok(());
        };
        let state = State {
            ek_seed: self.ek_seed,
            ak_seed: self.ak_seed,
            reset_count: self.reset_count,
        };
        write_atomically(path, state.render().as_bytes()).map_err(|source| {
            SoftTpmError::WriteState {
                path: path.clone(),
                source,
            }
        })
    }

    /// Power on: PCRs at their reset value, then the firmware measures the boot.
    fn power_on(&mut self, boot_image: &str) {
        self.pcrs = [[0; 32]; PCR_COUNT];
        self.log = spec_id_event();
        let crtm = utf16z(CRTM_VERSION);
        self.measure(0, EV_S_CRTM_VERSION, sha256(&crtm), &crtm);
        self.measure(0, EV_POST_CODE, sha256(FIRMWARE_BLOB), b"POST CODE");
        self.separator(7);
        let action = b"Calling EFI Application from Boot Option";
        self.measure(4, EV_EFI_ACTION, sha256(action), action);
        for pcr in 0..7 {
            self.separator(pcr);
        }
        self.measure(
            4,
            EV_EFI_BOOT_SERVICES_APPLICATION,
            boot_image_digest(boot_image),
            &image_load_event(boot_image),
        );
        for action in [
            &b"Exit Boot Services Invocation"[..],
            b"Exit Boot Services Returned with Success",
        ] {
            self.measure(5, EV_EFI_ACTION, sha256(action), action);
        }
    }

    fn separator(&mut self, pcr: u32) {
        let data = [0u8; 4];
        self.measure(pcr, EV_SEPARATOR, sha256(&data), &data);
    }

    /// Extends `pcr` (< 24) and appends a `TCG_PCR_EVENT2` with the sha256 digest.
    fn measure(&mut self, pcr: u32, event_type: u32, digest: [u8; 32], data: &[u8]) {
        if let Some(value) = self.pcrs.get_mut(pcr as usize) {
            *value = extend(value, &digest);
        }
        let log = &mut self.log;
        log.extend(pcr.to_le_bytes());
        log.extend(event_type.to_le_bytes());
        log.extend(1u32.to_le_bytes()); // digests: sha256 only
        log.extend(ALG_SHA256.to_le_bytes());
        log.extend(digest);
        log.extend((data.len() as u32).to_le_bytes());
        log.extend_from_slice(data);
    }
}

impl Attester for SoftTpm {
    fn identity(&self) -> &Identity {
        &self.keys().identity
    }

    fn activate_credential(&mut self, blob: &[u8], secret: &[u8]) -> Result<Vec<u8>, AttestError> {
        self.keys().activate(blob, secret)
    }

    fn quote(&mut self, nonce: &[u8], pcrs: &[u32]) -> Result<Quoted, AttestError> {
        if nonce.len() > MAX_NONCE {
            return Err(AttestError::Tpm(format!(
                "quoting: a nonce of {} bytes, at most {MAX_NONCE} fit (TPM_RC_SIZE)",
                nonce.len()
            )));
        }
        let mut select = [0u8; PCR_COUNT / 8];
        for &pcr in pcrs {
            if pcr as usize >= PCR_COUNT {
                return Err(AttestError::Tpm(format!(
                    "quoting: no PCR {pcr}, the bank has 0 to 23 (TPM_RC_VALUE)"
                )));
            }
            select[pcr as usize / 8] |= 1 << (pcr % 8);
        }
        let mut values = BTreeMap::new();
        let mut pcr_digest = Sha256::new();
        for (i, value) in self.pcrs.iter().enumerate() {
            if select[i / 8] & (1 << (i % 8)) != 0 {
                pcr_digest.update(value);
                values.insert(i as u32, *value);
            }
        }
        let keys = self.keys();

        // TPMS_ATTEST (Part 2, 10.12.12).
        let mut attest = Vec::with_capacity(160);
        attest.extend(TPM_GENERATED_VALUE.to_be_bytes());
        attest.extend(TPM_ST_ATTEST_QUOTE.to_be_bytes());
        put_tpm2b(&mut attest, &keys.ak_qualified_name);
        put_tpm2b(&mut attest, nonce);
        // TPMS_CLOCK_INFO: clock, resetCount, restartCount, safe.
        attest.extend(self.clock_ms().to_be_bytes());
        attest.extend(self.reset_count.to_be_bytes());
        attest.extend(0u32.to_be_bytes());
        attest.push(1);
        attest.extend(FIRMWARE_VERSION.to_be_bytes());
        // TPMS_QUOTE_INFO: TPML_PCR_SELECTION with one sha256 selection, pcrDigest.
        attest.extend(1u32.to_be_bytes());
        attest.extend(ALG_SHA256.to_be_bytes());
        attest.push(select.len() as u8);
        attest.extend(select);
        put_tpm2b(&mut attest, &pcr_digest.finalize());

        // TPMT_SIGNATURE: sigAlg ECDSA, TPMS_SIGNATURE_ECDSA { hash, r, s }.
        let sig: Signature = keys.ak.sign(&attest);
        let (r, s) = sig.split_bytes();
        let mut signature = Vec::with_capacity(72);
        signature.extend(ALG_ECDSA.to_be_bytes());
        signature.extend(ALG_SHA256.to_be_bytes());
        put_tpm2b(&mut signature, &r);
        put_tpm2b(&mut signature, &s);

        Ok(Quoted {
            quote: QuoteBytes { attest, signature },
            pcrs: values,
        })
    }

    fn event_log(&mut self) -> Result<Vec<u8>, AttestError> {
        Ok(self.log.clone())
    }
}

// TPM 2.0 constants (Part 2).
const ALG_SHA256: u16 = 0x000b;
const ALG_AES: u16 = 0x0006;
const ALG_CFB: u16 = 0x0043;
const ALG_ECDSA: u16 = 0x0018;
const ALG_NULL: u16 = 0x0010;
const ALG_ECC: u16 = 0x0023;
const ECC_NIST_P256: u16 = 0x0003;
const TPM_GENERATED_VALUE: u32 = 0xff54_4347;
const TPM_ST_ATTEST_QUOTE: u16 = 0x8018;
const TPM_RH_ENDORSEMENT: u32 = 0x4000_000b;

/// TPMA_OBJECT of the TCG default EK: fixedTPM, fixedParent, sensitiveDataOrigin,
/// adminWithPolicy, restricted, decrypt.
const EK_ATTRIBUTES: u32 = 0x0003_00b2;
/// The default EK's authPolicy: PolicySecret(TPM_RH_ENDORSEMENT).
const EK_AUTH_POLICY: [u8; 32] = [
    0x83, 0x71, 0x97, 0x67, 0x44, 0x84, 0xb3, 0xf8, 0x1a, 0x90, 0xcc, 0x8d, 0x46, 0xa5, 0xd7, 0x24,
    0xfd, 0x52, 0xd7, 0x6e, 0x06, 0x52, 0x0b, 0x64, 0xf2, 0xa1, 0xda, 0x1b, 0x33, 0x14, 0x69, 0xaa,
];
/// TPMA_OBJECT of the AK: fixedTPM, fixedParent, sensitiveDataOrigin, userWithAuth,
/// restricted, sign.
const AK_ATTRIBUTES: u32 = 0x0005_0072;

// TCG PC Client event types.
const EV_POST_CODE: u32 = 0x0000_0001;
const EV_NO_ACTION: u32 = 0x0000_0003;
const EV_SEPARATOR: u32 = 0x0000_0004;
const EV_S_CRTM_VERSION: u32 = 0x0000_0008;
const EV_IPL: u32 = 0x0000_000d;
const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;
const EV_EFI_ACTION: u32 = 0x8000_0007;

const CRTM_VERSION: &str = "Cairn soft TPM firmware 1.0";
const FIRMWARE_BLOB: &[u8] = b"Cairn soft TPM firmware 1.0 image";

impl Keys {
    fn derive(ek_seed: &[u8; 32], ak_seed: &[u8; 32]) -> Self {
        let ek = secret_key(b"EK", ek_seed);
        // One scalar multiplication each: the signing key computes its public key.
        let ak = SigningKey::from(secret_key(b"AK", ak_seed));
        let ek_point = ek.public_key().to_encoded_point(false);
        let ak_point = ak.verifying_key().to_encoded_point(false);
        let (ek_x, ek_y) = coordinates(&ek_point);
        let (ak_x, ak_y) = coordinates(&ak_point);

        // TPMT_PUBLIC of the EK: TCG default ECC template (L-2) with its point.
        let mut ek_public = Vec::with_capacity(122);
        ek_public.extend(ALG_ECC.to_be_bytes());
        ek_public.extend(ALG_SHA256.to_be_bytes());
        ek_public.extend(EK_ATTRIBUTES.to_be_bytes());
        put_tpm2b(&mut ek_public, &EK_AUTH_POLICY);
        for field in [ALG_AES, 128, ALG_CFB, ALG_NULL, ECC_NIST_P256, ALG_NULL] {
            ek_public.extend(field.to_be_bytes()); // symmetric, scheme, curve, kdf
        }
        put_tpm2b(&mut ek_public, &ek_x);
        put_tpm2b(&mut ek_public, &ek_y);

        // TPMT_PUBLIC of the AK: restricted signing key, ECDSA-SHA256, no policy.
        let mut ak_public = Vec::with_capacity(88);
        ak_public.extend(ALG_ECC.to_be_bytes());
        ak_public.extend(ALG_SHA256.to_be_bytes());
        ak_public.extend(AK_ATTRIBUTES.to_be_bytes());
        put_tpm2b(&mut ak_public, &[]);
        for field in [ALG_NULL, ALG_ECDSA, ALG_SHA256, ECC_NIST_P256, ALG_NULL] {
            ak_public.extend(field.to_be_bytes()); // symmetric, scheme+hash, curve, kdf
        }
        put_tpm2b(&mut ak_public, &ak_x);
        put_tpm2b(&mut ak_public, &ak_y);

        // Names (Part 1, 16): nameAlg || H(TPMT_PUBLIC). Qualified names: the EK is a
        // primary of the endorsement hierarchy, whose qualified name is its handle;
        // QN(child) = nameAlg || H(QN(parent) || Name(child)).
        let ek_name = name(&ek_public);
        let ak_name = name(&ak_public);
        let mut ek_qn = ALG_SHA256.to_be_bytes().to_vec();
        ek_qn.extend(sha256_parts(&[&TPM_RH_ENDORSEMENT.to_be_bytes(), &ek_name]));
        let mut ak_qualified_name = ALG_SHA256.to_be_bytes().to_vec();
        ak_qualified_name.extend(sha256_parts(&[&ek_qn, &ak_name]));

        let mut tpm2b_ek = Vec::with_capacity(ek_public.len() + 2);
        put_tpm2b(&mut tpm2b_ek, &ek_public);
        let mut tpm2b_ak = Vec::with_capacity(ak_public.len() + 2);
        put_tpm2b(&mut tpm2b_ak, &ak_public);
        Keys {
            ek,
            ek_x,
            ak,
            ak_name,
            ak_qualified_name,
            identity: Identity {
                kind: IdentityKind::Software,
                ek_public: tpm2b_ek,
                ek_certificate: None,
                ak_public: tpm2b_ak,
            },
        }
    }

    /// `TPM2_ActivateCredential` with this EK and AK (Part 1, 24: credential
    /// protection; the inverse of [`crate::credential::make_credential`]).
    fn activate(&self, blob: &[u8], secret: &[u8]) -> Result<Vec<u8>, AttestError> {
        let malformed = |what: &str| {
            AttestError::Tpm(format!(
                "activating the credential: malformed {what} (TPM_RC_SIZE)"
            ))
        };
        // TPM2B_ENCRYPTED_SECRET holding a TPMS_ECC_POINT: the ephemeral key.
        let point = tpm2b_body(secret).ok_or_else(|| malformed("encrypted secret"))?;
        let (x, rest) = split_tpm2b(point).ok_or_else(|| malformed("ephemeral point"))?;
        let (y, rest) = split_tpm2b(rest).ok_or_else(|| malformed("ephemeral point"))?;
        if !rest.is_empty() || x.len() > 32 || y.len() > 32 {
            return Err(malformed("ephemeral point"));
        }
        let mut sec1 = [0u8; 65];
        sec1[0] = 0x04;
        sec1[33 - x.len()..33].copy_from_slice(x);
        sec1[65 - y.len()..].copy_from_slice(y);
        let ephemeral = p256::PublicKey::from_sec1_bytes(&sec1).map_err(|_| {
            AttestError::Tpm(
                "activating the credential: the ephemeral key is not a P-256 point \
                 (TPM_RC_ECC_POINT)"
                    .into(),
            )
        })?;
        let z = p256::ecdh::diffie_hellman(self.ek.to_nonzero_scalar(), ephemeral.as_affine());
        let seed = kdfe(
            z.raw_secret_bytes(),
            "IDENTITY",
            &sec1[1..33],
            &self.ek_x,
            256,
        );

        // TPM2B_ID_OBJECT: TPM2B integrityHMAC, then encIdentity (rest).
        let id_object = tpm2b_body(blob).ok_or_else(|| malformed("credential blob"))?;
        let (outer_hmac, enc_identity) =
            split_tpm2b(id_object).ok_or_else(|| malformed("credential blob"))?;
        let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
        let mut signed = enc_identity.to_vec();
        signed.extend_from_slice(&self.ak_name);
        hmac::verify(
            &hmac::Key::new(hmac::HMAC_SHA256, &hmac_key),
            &signed,
            outer_hmac,
        )
        .map_err(|_| {
            AttestError::Tpm(
                "activating the credential: integrity check failed (TPM_RC_INTEGRITY): it \
                 was made for another EK or AK, or altered"
                    .into(),
            )
        })?;

        let sym_key = kdfa(&seed, "STORAGE", &self.ak_name, &[], 128);
        let mut plain = enc_identity.to_vec();
        cfb_mode::Decryptor::<aes::Aes128>::new_from_slices(&sym_key, &[0u8; 16])
            .map_err(|_| AttestError::Tpm("activating the credential: AES key setup".into()))?
            .decrypt(&mut plain);
        // The credential is a TPM2B_DIGEST.
        match tpm2b_body(&plain) {
            Some(credential) if credential.len() <= 64 => Ok(credential.to_vec()),
            _ => Err(malformed("credential")),
        }
    }
}

/// A P-256 private key from a seed: SHA-256 of a label, the seed and a counter, the
/// first value that is a valid scalar (all but a 2^-32 fraction are).
fn secret_key(label: &[u8], seed: &[u8; 32]) -> p256::SecretKey {
    let mut counter = 0u32;
    loop {
        let candidate =
            sha256_parts(&[b"cairn soft TPM key\0", label, seed, &counter.to_be_bytes()]);
        if let Ok(key) = p256::SecretKey::from_slice(&candidate) {
            return key;
        }
        counter = counter.wrapping_add(1);
    }
}

fn coordinates(point: &p256::EncodedPoint) -> ([u8; 32], [u8; 32]) {
    // An uncompressed encoding of a public key (never the identity): 04 || x || y.
    let mut x = [0u8; 32];
    let mut y = [0u8; 32];
    let bytes = point.as_bytes();
    if bytes.len() == 65 {
        x.copy_from_slice(&bytes[1..33]);
        y.copy_from_slice(&bytes[33..65]);
    }
    (x, y)
}

fn name(tpmt_public: &[u8]) -> Vec<u8> {
    let mut name = ALG_SHA256.to_be_bytes().to_vec();
    name.extend(Sha256::digest(tpmt_public));
    name
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn sha256_parts(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

fn extend(pcr: &[u8; 32], digest: &[u8; 32]) -> [u8; 32] {
    sha256_parts(&[pcr, digest])
}

fn put_tpm2b(out: &mut Vec<u8>, data: &[u8]) {
    // Every buffer here is a digest, name, nonce (<= 64) or public area: fits a u16.
    out.extend((data.len() as u16).to_be_bytes());
    out.extend_from_slice(data);
}

/// The body of a TPM2B that spans all of `bytes`.
fn tpm2b_body(bytes: &[u8]) -> Option<&[u8]> {
    let (body, rest) = split_tpm2b(bytes)?;
    rest.is_empty().then_some(body)
}

/// A TPM2B at the start of `bytes`: its body and what follows.
fn split_tpm2b(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (size, rest) = bytes.split_first_chunk::<2>()?;
    let size = usize::from(u16::from_be_bytes(*size));
    (size <= rest.len()).then(|| rest.split_at(size))
}

/// The log's first event: a legacy `TCG_PCR_EVENT` (EV_NO_ACTION, PCR 0, zero SHA-1)
/// carrying the "Spec ID Event03" structure with one algorithm, sha256.
fn spec_id_event() -> Vec<u8> {
    let mut spec = Vec::with_capacity(33);
    spec.extend_from_slice(b"Spec ID Event03\0");
    spec.extend(0u32.to_le_bytes()); // platformClass: client
    spec.extend([0, 2, 0, 2]); // spec version 2.0, errata 0, uintnSize 2 (UINT64)
    spec.extend(1u32.to_le_bytes()); // numberOfAlgorithms
    spec.extend(ALG_SHA256.to_le_bytes());
    spec.extend(32u16.to_le_bytes());
    spec.push(0); // vendorInfoSize
    let mut log = Vec::with_capacity(1024);
    log.extend(0u32.to_le_bytes());
    log.extend(EV_NO_ACTION.to_le_bytes());
    log.extend([0u8; 20]);
    log.extend((spec.len() as u32).to_le_bytes());
    log.extend(spec);
    log
}

/// `UEFI_IMAGE_LOAD_EVENT` for the boot image: location, length, link-time address,
/// then a device path of one media file-path node `\EFI\cairn\<image>` and the end node.
fn image_load_event(boot_image: &str) -> Vec<u8> {
    let path = utf16z(&format!("\\EFI\\cairn\\{boot_image}"));
    let node_len = u16::try_from(4 + path.len()).unwrap_or(u16::MAX);
    let mut device_path = vec![0x04, 0x04];
    device_path.extend(node_len.to_le_bytes());
    device_path.extend(path);
    device_path.extend([0x7f, 0xff, 0x04, 0x00]);
    let mut data = Vec::with_capacity(32 + device_path.len());
    data.extend(0x7e00_0000u64.to_le_bytes());
    data.extend((boot_image.len() as u64).to_le_bytes());
    data.extend(0u64.to_le_bytes());
    data.extend((device_path.len() as u64).to_le_bytes());
    data.extend(device_path);
    data
}

/// UTF-16LE with a terminating NUL, as UEFI strings are logged.
fn utf16z(s: &str) -> Vec<u8> {
    s.encode_utf16()
        .chain([0])
        .flat_map(u16::to_le_bytes)
        .collect()
}

/// What the state file holds.
struct State {
    ek_seed: [u8; 32],
    ak_seed: [u8; 32],
    reset_count: u32,
}

const STATE_HEADER: &str = "cairn-soft-tpm 1";

impl State {
    fn render(&self) -> String {
        format!(
            "{STATE_HEADER}\n\
             # Secret: whoever has this file can impersonate the device.\n\
             ek_seed {}\nak_seed {}\nreset_count {}\n",
            hex(&self.ek_seed),
            hex(&self.ak_seed),
            self.reset_count
        )
    }

    fn parse(text: &str) -> Result<Self, String> {
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        if lines.next() != Some(STATE_HEADER) {
            return Err(format!("it does not start with {STATE_HEADER:?}"));
        }
        let (mut ek_seed, mut ak_seed, mut reset_count) = (None, None, None);
        for line in lines {
            let (key, value) = line
                .split_once(' ')
                .ok_or_else(|| format!("line {line:?}"))?;
            match key {
                "ek_seed" => ek_seed = Some(unhex32(value).ok_or("a bad ek_seed")?),
                "ak_seed" => ak_seed = Some(unhex32(value).ok_or("a bad ak_seed")?),
                "reset_count" => {
                    reset_count = Some(value.parse().map_err(|_| "a bad reset_count")?)
                }
                other => return Err(format!("an unknown field {other:?}")),
            }
        }
        Ok(State {
            ek_seed: ek_seed.ok_or("no ek_seed")?,
            ak_seed: ak_seed.ok_or("no ak_seed")?,
            reset_count: reset_count.ok_or("no reset_count")?,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> Option<[u8; 32]> {
    let s = s.as_bytes();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        let digit = |c: u8| char::from(c).to_digit(16);
        *o = u8::try_from(digit(pair[0])? * 16 + digit(pair[1])?).ok()?;
    }
    Some(out)
}

/// Replaces `path` with `data`: a temporary file beside it (mode 0600), fsync, rename,
/// fsync of the directory; a crash leaves the old file or the new one.
fn write_atomically(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&tmp)?;
    file.write_all(data)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn state_file_round_trips() {
        let s = State {
            ek_seed: [1; 32],
            ak_seed: [0xab; 32],
            reset_count: 7,
        };
        let back = State::parse(&s.render()).unwrap();
        assert_eq!(
            (back.ek_seed, back.ak_seed, back.reset_count),
            (s.ek_seed, s.ak_seed, 7)
        );
        assert!(State::parse("cairn-soft-tpm 1\nek_seed 00\n").is_err());
        assert!(State::parse("").is_err());
    }

    #[test]
    fn kdfe_and_kdfa_truncate_to_the_asked_bits() {
        assert_eq!(kdfa(b"k", "STORAGE", b"n", &[], 128).len(), 16);
        assert_eq!(kdfe(b"z", "IDENTITY", b"u", b"v", 256).len(), 32);
    }
}
