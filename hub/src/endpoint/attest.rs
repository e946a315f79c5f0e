//! The attestation half of a connection: the credential challenge at enrollment, the
//! challenge at the start of every sync session and periodically after, and what the
//! evidence means for the device (see [`crate::attest`] for the trust model).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use cairn_sync_protocol::DeviceId;
use cairn_sync_protocol::attest::{EXPORTER_LABEL, EXPORTER_LEN, quote_nonce};
use cairn_sync_protocol::message::{AttestIdentity, CredentialChallenge, Evidence, RefusalCode};
use rand::RngCore;
use tracing::{info, warn};

use super::{Connection, End, now_ms};
use crate::attest::{self as policy, AttestPolicy};
use crate::evidence::{self, NO_IMA, PendingChallenge, pcr_list};
use crate::store::{AttestRecord, ImaState, NewAttestation, attest_status};
use crate::sync::Gate;

/// An enrollment between the hello and the evidence.
pub(super) struct PendingEnroll {
    pub agent_version: String,
    pub token_id: String,
    pub secret_hash: [u8; 32],
    pub device: DeviceId,
    pub cert: Vec<u8>,
    pub hostname: String,
    /// Filled once the evidence verified.
    pub identity: Option<NewAttestation>,
    pub claim: Option<Claim>,
}

/// What a device claims at enrollment, checked as far as possible before its evidence.
pub(super) struct Claim {
    identity: AttestIdentity,
    kind: &'static str,
    ek_issuer: Option<String>,
    policy: Option<AttestPolicy>,
}

impl Connection {
    fn exporter(&self) -> Result<[u8; EXPORTER_LEN], String> {
        let mut out = [0u8; EXPORTER_LEN];
        self.conn
            .export_keying_material(&mut out, EXPORTER_LABEL, b"")
            .map_err(|e| format!("exporting TLS keying material: {e:?}"))?;
        Ok(out)
    }

    fn send_challenge(
        &mut self,
        pcrs: Vec<u32>,
        held_log: Vec<u8>,
        ima_held: ImaState,
        credential: Option<(CredentialChallenge, [u8; 32])>,
    ) {
        let mut nonce = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut nonce);
        let (challenge, pending) = evidence::challenge(nonce, pcrs, held_log, ima_held, credential);
        self.challenge = Some(pending);
        let timeout = self.shared.attest.evidence_timeout;
        self.session.challenge(Instant::now(), challenge, timeout);
    }

    /// The attestation policy for an enrolling device, from its token's labels: `None`
    /// after refusing the token (the session is over).
    async fn enrollment_policy(
        &mut self,
        p: &PendingEnroll,
    ) -> Result<Option<Option<AttestPolicy>>, End> {
        let store = self.shared.store.clone();
        let labels = match store
            .check_token(&p.token_id, p.secret_hash, &p.device, now_ms())
            .await
            .map_err(|e| End::Store(e.to_string()))?
        {
            Ok(l) => l,
            Err(r) => {
                let (code, msg) = super::enroll_refusal(r, &p.token_id, &p.device, None);
                let _ = self.refuse(code, &msg).await;
                return Ok(None);
            }
        };
        let policies = store
            .policies()
            .await
            .map_err(|e| End::Store(e.to_string()))?;
        Ok(Some(policy::policy_for(&policies, &labels).cloned()))
    }

    /// Checks what an enrolling device claims, then sends it a credential only its TPM
    /// can open, with a quote request.
    pub(super) async fn challenge_enrollment(
        &mut self,
        mut p: PendingEnroll,
        identity: AttestIdentity,
    ) -> Result<(), End> {
        // The token first: strangers get no cryptography done for them.
        let Some(policy) = self.enrollment_policy(&p).await? else {
            return Err(End::Session(None));
        };
        let now_secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (kind, ek_issuer) = match policy::check_identity(
            &self.shared.attest,
            &identity,
            now_secs,
        ) {
            Ok(x) => x,
            Err(e) => {
                let msg = format!(
                    "{e}; this hub accepts only TPMs whose EK certificate chains to a configured manufacturer CA (`cairn-hub serve --ek-ca`)"
                );
                return self.refuse(RefusalCode::AttestationFailed, &msg).await;
            }
        };
        if let Some(pol) = &policy
            && policy::level(Some(kind)) < pol.require
        {
            let msg = format!(
                "identity {kind} does not meet attestation policy {} (requires --require {}); enroll this box with a TPM the hub trusts, or change the policy",
                pol.name, pol.require
            );
            return self.refuse(RefusalCode::AttestationFailed, &msg).await;
        }
        let mut secret = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut secret);
        let credential = match cairn_tpm::credential::make_credential(
            &identity.ek_public,
            &identity.ak_public,
            &secret,
        ) {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("endorsement key: {e}");
                return self.refuse(RefusalCode::AttestationFailed, &msg).await;
            }
        };
        let pcrs = pcr_list(policy.as_ref());
        p.claim = Some(Claim {
            identity,
            kind,
            ek_issuer,
            policy,
        });
        self.pending_enroll = Some(p);
        self.send_challenge(
            pcrs,
            Vec::new(),
            NO_IMA,
            Some((
                CredentialChallenge {
                    blob: credential.blob,
                    secret: credential.secret,
                },
                secret,
            )),
        );
        Ok(())
    }

    /// An enrollment without a root of trust: refused where the token's labels fall
    /// under a policy that requires one.
    pub(super) async fn enroll_unattested(&mut self, p: PendingEnroll) -> Result<(), End> {
        let Some(policy) = self.enrollment_policy(&p).await? else {
            return Err(End::Session(None));
        };
        if let Some(pol) = policy
            && pol.require > policy::Require::None
        {
            // The hub cannot tell `--tpm none` from `--tpm auto` on a box without a TPM.
            let msg = format!(
                "this agent sent no attestation (it found no TPM, or runs with --tpm none), and \
                 attestation policy {} requires --require {}; run it on a box with a TPM (--tpm \
                 auto finds /dev/tpmrm0), or change the policy (cairn-hub policy ls)",
                pol.name, pol.require
            );
            return self.refuse(RefusalCode::AttestationFailed, &msg).await;
        }
        self.complete_enrollment(p).await
    }

    /// The device's attestation record as the store holds it now.
    async fn attest_record(&self, device: &DeviceId) -> Result<Option<AttestRecord>, String> {
        self.shared
            .store
            .attestation(device)
            .await
            .map_err(|e| e.to_string())
    }

    /// The attestation policy that applies to a device now (its labels may have changed
    /// since the session began).
    async fn device_policy(&self, device: &DeviceId) -> Result<Option<AttestPolicy>, String> {
        let store = &self.shared.store;
        let labels = store
            .device(device)
            .await
            .map_err(|e| e.to_string())?
            .map(|d| d.labels)
            .unwrap_or_default();
        let policies = store.policies().await.map_err(|e| e.to_string())?;
        Ok(policy::policy_for(&policies, &labels).cloned())
    }

    /// Challenges the connected, attested device (at session start and periodically).
    pub(super) async fn challenge_sync(&mut self) -> Result<(), String> {
        let Some(device) = self.device.clone() else {
            return Ok(());
        };
        if self.session.challenge_outstanding() {
            return Ok(());
        }
        // Read when needed, not kept per connection: at 10k connections every kilobyte
        // held per session is 10 MB of hub memory.
        let Some(rec) = self.attest_record(&device).await? else {
            return Ok(());
        };
        let (held_log, ima_held) = evidence::held(&rec);
        let pcrs = pcr_list(self.device_policy(&device).await?.as_ref());
        self.send_challenge(pcrs, held_log, ima_held, None);
        Ok(())
    }

    pub(super) async fn evidence(&mut self, ev: Box<Evidence>) -> Result<(), End> {
        let Some(pc) = self.challenge.take() else {
            return self
                .refuse(
                    RefusalCode::ProtocolViolation,
                    "evidence without a challenge",
                )
                .await;
        };
        let exporter = self.exporter().map_err(End::Transport)?;
        let nonce = quote_nonce(&pc.nonce, &exporter);
        if let Some(p) = self.pending_enroll.take() {
            return self.enrollment_evidence(p, pc, *ev, &nonce).await;
        }
        let Some(device) = self.device.clone() else {
            return Ok(());
        };
        // Fresh: accepted sets may have changed since the session began (an expected
        // release, an operator's accept).
        let Some(rec) = self.attest_record(&device).await.map_err(End::Store)? else {
            return Ok(());
        };
        let pol = self.device_policy(&device).await.map_err(End::Store)?;
        let outcome = evidence::judge(&rec, pol.as_ref(), &pc, &ev, &nonce, now_ms());
        let store = self.shared.store.clone();
        let quarantined = outcome.quarantine.clone();
        store
            .record_attestation(&device, outcome)
            .await
            .map_err(|e| End::Store(e.to_string()))?;
        let before = self
            .core
            .evidence_judged(Instant::now(), quarantined.is_some());
        match (quarantined, before) {
            (Some(why), b) if b != Gate::Quarantined => {
                warn!(%device, reason = %why, "device quarantined: it keeps reporting but gets no new desired state");
            }
            (None, Gate::Quarantined) => {
                info!(%device, "evidence matches again; quarantine lifted")
            }
            _ => {}
        }
        Ok(())
    }

    async fn enrollment_evidence(
        &mut self,
        mut p: PendingEnroll,
        pc: PendingChallenge,
        ev: Evidence,
        nonce: &[u8; 32],
    ) -> Result<(), End> {
        let Some(claim) = p.claim.take() else {
            return self
                .refuse(
                    RefusalCode::ProtocolViolation,
                    "evidence for an enrollment without a claim",
                )
                .await;
        };
        let activated = match (&pc.secret, &ev.credential) {
            (Some(s), Some(got)) => bool::from(subtle::ConstantTimeEq::ct_eq(&s[..], &got[..])),
            _ => false,
        };
        if !activated {
            let msg = "credential activation failed: the attestation key is not in the TPM that holds this endorsement key (a copied or forged identity); re-provision the device's TPM keys";
            return self.refuse(RefusalCode::AttestationFailed, msg).await;
        }
        let first = evidence::first(
            claim.kind,
            claim.identity.ek_public,
            claim.ek_issuer,
            claim.identity.ak_public,
            claim.policy.as_ref(),
            &pc,
            &ev,
            nonce,
            now_ms(),
        );
        match first {
            Ok(a) => p.identity = Some(a),
            Err(why) => {
                let msg = format!("evidence refused: {why}");
                return self.refuse(RefusalCode::AttestationFailed, &msg).await;
            }
        }
        self.complete_enrollment(p).await
    }

    /// The gate of a device enrolled without attestation: closed while a policy
    /// requires an identity it cannot have (it has no AK to quote with).
    pub(super) async fn unattested_gate(
        &self,
        rec: &crate::store::DeviceRecord,
    ) -> Result<Gate, String> {
        let policies = self
            .shared
            .store
            .policies()
            .await
            .map_err(|e| e.to_string())?;
        match policy::policy_for(&policies, &rec.labels) {
            Some(p) if p.require > policy::Require::None => {
                warn!(device = %rec.id, policy = %p.name, "device enrolled without attestation, policy requires --require {}: no desired state; re-enroll it with a TPM", p.require);
                Ok(Gate::Quarantined)
            }
            _ => Ok(Gate::Open),
        }
    }

    /// Whether the quarantine of this session's device was lifted: for an unattested
    /// device, no policy requires attestation any more; for an attested one, an operator
    /// accepted it (the store says trusted).
    pub(super) async fn quarantine_lifted(&mut self, device: &DeviceId) -> Result<bool, String> {
        if self.core.gate() != Gate::Quarantined {
            return Ok(true);
        }
        let rec = self
            .shared
            .store
            .device(device)
            .await
            .map_err(|e| e.to_string())?;
        let Some(rec) = rec else {
            return Ok(false);
        };
        if rec.attestation.is_none() {
            return Ok(self.unattested_gate(&rec).await? == Gate::Open);
        }
        if let Some(a) = self.attest_record(device).await?
            && a.status == attest_status::TRUSTED
        {
            info!(%device, "quarantine lifted by the operator");
            return Ok(true);
        }
        Ok(false)
    }
}
