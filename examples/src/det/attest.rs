//! Attestation in virtual time. Every box has a software TPM ([`SoftTpm`]), measured at
//! power-on, and enrolled with its first evidence verified ([`evidence::first`]); it
//! answers each session's challenge with the agent's own [`answer_with`]. The hub
//! challenges and judges with [`evidence`] and keeps the verdict with
//! [`AttestRecord::apply`], as the endpoint and the store do; the TLS exporter that binds
//! a quote to its connection is a per-connection random value both ends know.

use cairn_agent::attest::answer_with;
use cairn_hub::attest::{AttestPolicy, policy_for};
use cairn_hub::evidence::{self, NO_IMA, pcr_list};
use cairn_hub::store::{AttestRecord, attest_status};
use cairn_sync_protocol::attest::quote_nonce;
use cairn_sync_protocol::message::{Challenge, Evidence};
use cairn_tpm::attest::Attester;
use cairn_tpm::soft::SoftTpm;

use super::*;
use crate::real::pool::{SIM_BOOT_IMAGE, TAMPERED_BOOT_IMAGE};
use crate::scenario::SelectorText;

impl Sim<'_> {
    /// The scenario's attestation policy, if it applies to `dev` (the hub's own choice
    /// among its policies, by labels).
    fn policy(&self, dev: usize) -> Option<&AttestPolicy> {
        let p = self.scenario.attest_policy.as_ref()?;
        policy_for(std::slice::from_ref(p), &self.scenario.labels_of(dev))
    }

    /// Gives every box its TPM and enrolls its root of trust: a challenge, the
    /// agent's answer, the hub's verification and first verdict, the record.
    pub(super) fn enroll_attested(&mut self) -> Result<()> {
        for dev in 0..self.devs.len() {
            let seed = self.scenario.seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ dev as u64;
            let mut tpm = Box::new(SoftTpm::ephemeral(seed, SIM_BOOT_IMAGE));
            let mut nonce = [0u8; 32];
            self.rng.fill(&mut nonce);
            let exporter: [u8; 32] = self.rng.r#gen();
            let pol = self.policy(dev).cloned();
            let (challenge, pending) =
                evidence::challenge(nonce, pcr_list(pol.as_ref()), Vec::new(), NO_IMA, None);
            let ev = answer_with(tpm.as_mut(), &challenge, exporter)
                .with_context(|| format!("{}: first evidence", self.ids[dev]))?;
            let id = tpm.identity().clone();
            let first = evidence::first(
                cairn_hub::attest::kind::SOFTWARE,
                id.ek_public,
                None,
                id.ak_public,
                pol.as_ref(),
                &pending,
                &ev,
                &quote_nonce(&nonce, &exporter),
                0,
            )
            .map_err(|why| anyhow::anyhow!("{}: enrollment refused: {why}", self.ids[dev]))?;
            let d = &mut self.devs[dev];
            d.hub.attest = Some(Box::new(AttestRecord::enrolled(&first)));
            d.tpm = Some(tpm);
        }
        Ok(())
    }

    /// The hub's `Challenge` action: a fresh nonce over what it holds of the device.
    pub(super) fn hub_challenge(&mut self, dev: u32) {
        let inst = self.instant(self.now);
        let mut nonce = [0u8; 32];
        self.rng.fill(&mut nonce);
        let pcrs = pcr_list(self.policy(dev as usize));
        let d = &mut self.devs[dev as usize];
        let (Some(rec), Some(c)) = (d.hub.attest.as_ref(), d.hconn.as_mut()) else {
            return;
        };
        if c.session.challenge_outstanding() {
            return;
        }
        let (held_log, ima_held) = evidence::held(rec);
        let (challenge, pending) = evidence::challenge(nonce, pcrs, held_log, ima_held, None);
        c.challenge = Some(pending);
        c.session
            .challenge(inst, challenge, cairn_hub::attest::DEFAULT_EVIDENCE_TIMEOUT);
    }

    /// The agent answers a challenge with its TPM.
    pub(super) fn agent_answer(&mut self, dev: u32, c: &Challenge) {
        let d = &mut self.devs[dev as usize];
        let (Some(tpm), Some(conn)) = (d.tpm.as_mut(), d.aconn.as_mut()) else {
            return;
        };
        match answer_with(tpm.as_mut(), c, conn.exporter) {
            Ok(e) => conn.session.send_evidence(e),
            Err(e) => {
                let msg = format!("{}: answering a challenge: {e:#}", self.ids[dev as usize]);
                self.problem(msg);
            }
        }
    }

    /// The hub judges evidence against the challenge it sent and records the verdict;
    /// the session's core opens or closes the gate.
    pub(super) fn hub_evidence(&mut self, dev: u32, ev: &Evidence) {
        let now_ms = ms(self.now);
        let inst = self.instant(self.now);
        let pol = self.policy(dev as usize).cloned();
        let d = &mut self.devs[dev as usize];
        let (Some(rec), Some(c)) = (d.hub.attest.as_mut(), d.hconn.as_mut()) else {
            return;
        };
        let Some(pc) = c.challenge.take() else {
            let msg = format!("{}: evidence without a challenge", self.ids[dev as usize]);
            return self.problem(msg);
        };
        let nonce = quote_nonce(pc.nonce(), &c.exporter);
        let outcome = evidence::judge(rec, pol.as_ref(), &pc, ev, &nonce, now_ms);
        if rec.apply(&outcome) && outcome.quarantine.is_some() {
            // The store records a `hub.quarantined` event.
            self.quarantined += 1;
        }
        c.core.evidence_judged(inst, outcome.quarantine.is_some());
    }

    /// The store's answer to the core's `CheckQuarantine`: an attested device's record
    /// says trusted again (an unattested one has no policy here requiring more).
    pub(super) fn quarantine_lifted(&self, dev: u32) -> bool {
        self.devs[dev as usize]
            .hub
            .attest
            .as_ref()
            .is_none_or(|r| r.status == attest_status::TRUSTED)
    }

    /// The box reboots into an image it was not enrolled with: its TPM measures
    /// another boot, and the agent starts again.
    pub(super) fn tamper(&mut self, dev: u32) {
        let Some(tpm) = self.devs[dev as usize].tpm.as_mut() else {
            return;
        };
        if let Err(e) = tpm.reboot(TAMPERED_BOOT_IMAGE) {
            let msg = format!("{}: tampered reboot: {e}", self.ids[dev as usize]);
            return self.problem(msg);
        }
        self.agent_crash(dev);
        self.devs[dev as usize].fault_end = self.now;
        self.agent_start(dev);
    }

    /// The operator accepts the measurements of every quarantined device matching
    /// `selector` ([`AttestRecord::accept`]), and the hub wakes their sessions.
    pub(super) fn accept(&mut self, selector: Option<&SelectorText>) {
        self.last_action = self.now;
        let now_ms = ms(self.now);
        for dev in 0..self.devs.len() {
            let labels = self.scenario.labels_of(dev);
            if selector.is_some_and(|s| !s.0.matches(&labels)) {
                continue;
            }
            let id = self.ids[dev].clone();
            let Some(rec) = self.devs[dev].hub.attest.as_mut() else {
                continue;
            };
            if rec.status != attest_status::QUARANTINED {
                continue;
            }
            if let Err(why) = rec.accept(&id, None, now_ms) {
                self.problem(format!("{id}: accept refused: {why}"));
                continue;
            }
            let dev = dev as u32;
            if self.devs[dev as usize].hconn.is_some() {
                self.hub_core(dev, SyncCore::state_changed);
                self.hub_drive(dev);
                self.hub_pump(dev);
            }
        }
    }

    /// Devices attested, trusted, and verified in a session (for `all-attested`).
    pub(super) fn attested(&self) -> (usize, Vec<String>) {
        let mut ok = 0;
        let mut problems = Vec::new();
        for (i, d) in self.devs.iter().enumerate() {
            match d.hub.attest.as_deref() {
                Some(r) if r.status == attest_status::TRUSTED && r.verified_ms.is_some() => {
                    ok += 1;
                }
                Some(r) => problems.push(format!(
                    "{}: attestation {}, status {}: {}",
                    self.ids[i],
                    r.kind,
                    r.status,
                    r.reason.as_deref().unwrap_or("")
                )),
                None => problems.push(format!("{}: not attested", self.ids[i])),
            }
        }
        (ok, problems)
    }
}
