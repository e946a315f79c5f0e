//! The agent's root of trust: which [`Attester`] it uses, and answering the hub's
//! challenges with it.
//!
//! A real TPM (feature `tpm`, through tss-esapi) on boxes; the software TPM for the
//! fleet simulation and for boxes without a TPM whose hub policy allows it. TPM
//! commands block for milliseconds to a few hundred; they run on a blocking thread.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow};
use cairn_sync_protocol::attest::{log_delta, quote_nonce};
use cairn_sync_protocol::message::{
    AttestIdentity, Challenge, Evidence, IdentityKind as WireKind, ImaTail,
};
use cairn_tpm::attest::{Attester, IdentityKind};

/// Where the agent's root of trust comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttestSource {
    /// No attestation: the device enrolls unattested (hub policy may refuse it).
    None,
    /// A TPM 2.0 behind a TCTI (`device:/dev/tpmrm0`, `swtpm:host=…,port=…`), with the
    /// firmware event log at `event_log` and the IMA measurement list (sha256 per-bank
    /// format) at `ima_log`, if the box keeps one.
    Tpm {
        tcti: String,
        event_log: PathBuf,
        ima_log: PathBuf,
    },
    /// The software TPM, its keys kept in the data directory; `boot_image` names what
    /// the simulated firmware measures as the booted OS.
    Software { boot_image: String },
}

/// Where the kernel exposes the firmware's event log.
pub const FIRMWARE_LOG: &str = "/sys/kernel/security/tpm0/binary_bios_measurements";
/// Where the kernel exposes IMA's measurement list for the sha256 bank (Linux 6.10+).
pub const IMA_LOG: &str = "/sys/kernel/security/ima/binary_runtime_measurements_sha256";

impl AttestSource {
    /// `auto` (the TPM at /dev/tpmrm0 if there is one, else none), `none`, `software`,
    /// or a TCTI string.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "none" => Self::None,
            "software" => Self::Software {
                boot_image: format!("cairn-agent {}", crate::client::AGENT_VERSION),
            },
            "auto" => {
                if Path::new("/dev/tpmrm0").exists() && cfg!(feature = "tpm") {
                    Self::Tpm {
                        tcti: "device:/dev/tpmrm0".into(),
                        event_log: FIRMWARE_LOG.into(),
                        ima_log: IMA_LOG.into(),
                    }
                } else {
                    Self::None
                }
            }
            tcti if tcti.contains(':') => Self::Tpm {
                tcti: tcti.into(),
                event_log: FIRMWARE_LOG.into(),
                ima_log: IMA_LOG.into(),
            },
            other => {
                return Err(anyhow!(
                    "--tpm {other:?}: use auto, none, software, or a TCTI such as device:/dev/tpmrm0"
                ));
            }
        })
    }
}

/// An attester shared by the link's sessions.
pub type SharedAttester = Arc<Mutex<Box<dyn Attester>>>;

/// Opens the attester `source` names; `None` for [`AttestSource::None`].
pub fn open(source: &AttestSource, data_dir: &Path) -> Result<Option<SharedAttester>> {
    let attester: Box<dyn Attester> = match source {
        AttestSource::None => return Ok(None),
        AttestSource::Software { boot_image } => Box::new(
            cairn_tpm::soft::SoftTpm::load_or_create(&data_dir.join("soft-tpm"), boot_image)
                .map_err(|e| anyhow!("software TPM: {e}"))?,
        ),
        AttestSource::Tpm {
            tcti,
            event_log,
            ima_log,
        } => open_tpm(tcti, event_log, ima_log)?,
    };
    Ok(Some(Arc::new(Mutex::new(attester))))
}

#[cfg(feature = "tpm")]
fn open_tpm(tcti: &str, event_log: &Path, ima_log: &Path) -> Result<Box<dyn Attester>> {
    let device = cairn_tpm_device::device::Device::open(tcti)
        .with_context(|| format!("opening the TPM at {tcti}"))?
        .with_event_log(event_log)
        .with_ima_log(ima_log);
    Ok(Box::new(device))
}

#[cfg(not(feature = "tpm"))]
fn open_tpm(tcti: &str, _event_log: &Path, _ima_log: &Path) -> Result<Box<dyn Attester>> {
    Err(anyhow!(
        "--tpm {tcti}: this agent was built without TPM support (cargo feature `tpm`)"
    ))
}

fn lock(a: &SharedAttester) -> Result<std::sync::MutexGuard<'_, Box<dyn Attester>>> {
    a.lock().map_err(|_| anyhow!("attester lock poisoned"))
}

/// The identity to send at enrollment.
pub fn identity(a: &SharedAttester) -> Result<AttestIdentity> {
    let guard = lock(a)?;
    let id = guard.identity();
    Ok(AttestIdentity {
        kind: match id.kind {
            IdentityKind::Tpm => WireKind::Tpm,
            IdentityKind::Software => WireKind::Software,
        },
        ek_public: id.ek_public.clone(),
        ek_certificate: id.ek_certificate.clone(),
        ak_public: id.ak_public.clone(),
    })
}

/// Answers a challenge on a blocking thread (TPM commands take milliseconds to
/// hundreds): [`answer_with`] on the shared attester.
pub async fn answer(a: &SharedAttester, c: Challenge, exporter: [u8; 32]) -> Result<Evidence> {
    let a = a.clone();
    tokio::task::spawn_blocking(move || {
        let mut guard = lock(&a)?;
        answer_with(guard.as_mut(), &c, exporter)
    })
    .await
    .map_err(|e| anyhow!("attestation task: {e}"))?
}

/// Answers a challenge: activates the credential (at enrollment), quotes the asked
/// PCRs over the nonce bound to this connection (`exporter`), and sends the part of
/// the event log the hub does not hold. The fleet simulator's agents answer with this
/// too, on their software TPMs.
pub fn answer_with(
    attester: &mut dyn Attester,
    c: &Challenge,
    exporter: [u8; 32],
) -> Result<Evidence> {
    // A credential this TPM cannot open is answered without the secret: the hub then
    // refuses with its reason instead of waiting for an answer that never comes.
    let credential = match &c.credential {
        Some(cc) => match attester.activate_credential(&cc.blob, &cc.secret) {
            Ok(secret) => Some(secret),
            Err(e) => {
                tracing::warn!(error = %e, "this TPM cannot activate the hub's credential");
                None
            }
        },
        None => None,
    };
    let pcrs: Vec<u32> = c.pcrs.iter().map(|p| u32::from(*p)).collect();
    let nonce = quote_nonce(&c.nonce, &exporter);
    let quoted = attester.quote(&nonce, &pcrs).context("quoting PCRs")?;
    let log = attester.event_log().context("reading the event log")?;
    // After the quote: IMA lists an entry before extending PCR 10, so a list read now
    // covers the quoted value (the hub ignores entries past it).
    let ima = attester
        .ima_log()
        .context("reading the IMA measurement list")?;
    let (offset, delta) = log_delta(&log, c.log_held, &c.log_held_sha256);
    let ima = ima.map(|list| ima_tail(list, c.ima_held, &c.ima_held_pcr10));
    let values = pcrs
        .iter()
        .map(|p| {
            quoted
                .pcrs
                .get(p)
                .copied()
                .ok_or_else(|| anyhow!("the TPM did not return PCR {p}"))
        })
        .collect::<Result<heapless::Vec<[u8; 32], 24>>>()?;
    Ok(Evidence {
        credential,
        attest: quoted.quote.attest,
        signature: quoted.quote.signature,
        pcrs: values,
        log_offset: offset,
        log: delta.to_vec(),
        ima,
    })
}

/// What of the IMA list to send: the part after `held` bytes if the list's head
/// replays to the PCR 10 value the hub verified (a hash chain, so the same head), else
/// all of it (a new boot).
fn ima_tail(list: Vec<u8>, held: u64, held_pcr10: &[u8; 32]) -> ImaTail {
    use cairn_tpm::ima::{Bank, IMA_PCR, parse};
    let n = usize::try_from(held).unwrap_or(usize::MAX);
    let continues = n > 0
        && n <= list.len()
        && parse(&list[..n], Bank::Sha256)
            .ok()
            .and_then(|head| head.replay_pcr(Bank::Sha256, IMA_PCR).ok().flatten())
            .is_some_and(|v| v.as_slice() == held_pcr10);
    if continues {
        ImaTail {
            offset: held,
            bytes: list[n..].to_vec(),
        }
    } else {
        ImaTail {
            offset: 0,
            bytes: list,
        }
    }
}

/// How a sealed key starts (the TPM backend's blob format); a PKCS#8 key starts with
/// a DER SEQUENCE (0x30), so the two cannot be confused.
const SEALED_PREFIX: &[u8] = b"CSL";

/// The bytes to store for the device's TLS private key: sealed to the TPM when the
/// attester can seal (a copied disk then holds a key no other TPM can open), else the
/// key itself.
///
/// Why sealed rather than created in the TPM: every TLS handshake signs with this key,
/// and a TPM signs a few to a few tens of times per second, serialised with quotes;
/// a key that only the TPM can unseal, kept in the agent's memory while it runs, costs
/// one TPM command per agent start and none per connection. The key is bound to the
/// TPM, not to PCR values, so an upgrade (new PCRs) does not lock the device out; what
/// it booted is the quotes' business. The cost: root on a running box can read the key
/// from memory. It still cannot answer a challenge without the TPM's AK, so a stolen
/// key gets a quarantined session, never desired state.
pub async fn protect_key(a: Option<&SharedAttester>, key_der: Vec<u8>) -> Result<Vec<u8>> {
    let Some(a) = a.cloned() else {
        return Ok(key_der);
    };
    tokio::task::spawn_blocking(move || {
        let sealed = lock(&a)?
            .seal(&key_der)
            .context("sealing the TLS key to the TPM")?;
        Ok(sealed.unwrap_or(key_der))
    })
    .await
    .map_err(|e| anyhow!("sealing task: {e}"))?
}

/// The TLS private key from what [`protect_key`] stored.
pub async fn recover_key(a: Option<&SharedAttester>, stored: Vec<u8>) -> Result<Vec<u8>> {
    if !stored.starts_with(SEALED_PREFIX) {
        return Ok(stored);
    }
    let Some(a) = a.cloned() else {
        return Err(anyhow!(
            "the device key is sealed to a TPM, but the agent runs without one (--tpm none); start it with the TPM it enrolled with"
        ));
    };
    tokio::task::spawn_blocking(move || {
        lock(&a)?.unseal(&stored).context(
            "unsealing the device key (a data directory copied from another box cannot be used: its key is sealed to that box's TPM)",
        )
    })
    .await
    .map_err(|e| anyhow!("unsealing task: {e}"))?
}
