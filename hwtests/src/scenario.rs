//! The hardware test scenario, the same on the virtual rig and on real boxes:
//!
//! 1. flash v1 (configured with `cairn-hub image configure`), boot it: the agent
//!    enrolls and attests with the TPM over the real measured boot;
//! 2. push v2, whose PCR 4 is predicted from the box's own event log; cut the power
//!    while slot B is being written; the box boots v1 again, resumes, reboots into
//!    the v2 trial, commits it, and the hub's policy accepts v2's measurements;
//! 3. push a broken v3 (its initramfs stops, the kernel panics): the box falls back
//!    to v2 by itself and the hub says why.
//!
//! Every step is timed into a [`Report`]; a failing step carries the console's tail.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_hub::api::{DeviceDetail, DeviceView};
use cairn_hub::store::UpgradeStatus;
use cairn_image::Built;
use serde::Serialize;

use crate::hub::HubProc;
use crate::machine::{Machine, console_tail, console_text};
use crate::predict;

/// The builds the scenario needs: v1 to flash; for the upgrade steps v2 and a v3
/// built with a fault (`--fault init-panic`). Without v2 and v3 the scenario stops
/// after enrollment and the event-log check.
pub struct Releases<'a> {
    pub v1: &'a Built,
    pub v2: Option<&'a Built>,
    pub v3: Option<&'a Built>,
}

/// Where the scenario runs.
pub struct Env<'a> {
    pub hub: &'a HubProc,
    /// The hub's QUIC address as the box reaches it (`10.0.2.2:PORT` under QEMU).
    pub box_hub: String,
    /// Scratch directory (flash image, bundles, keys, the report).
    pub work: PathBuf,
    /// Limits for the waits, scaled for slow machines.
    pub timeouts: Timeouts,
    /// Whether the box has a TPM the hub can vouch for. Without, the policy asks
    /// for nothing, and the attestation steps are skipped (and reported so).
    pub tpm: bool,
}

/// How long each wait may take.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// Power-on to enrolled and attested.
    pub enroll: Duration,
    /// `os set` to the release committed (download, write, trial boot).
    pub upgrade: Duration,
    /// `os set` of a broken release to the box back on the old one.
    pub rollback: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            enroll: Duration::from_secs(240),
            upgrade: Duration::from_secs(600),
            rollback: Duration::from_secs(600),
        }
    }
}

/// One step's outcome.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: String,
    pub seconds: f64,
    pub ok: bool,
    pub detail: String,
}

/// What happened, step by step.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Report {
    pub machine: String,
    pub device: Option<String>,
    pub steps: Vec<Step>,
    pub seconds: f64,
    pub ok: bool,
    /// The console's tail when a step failed.
    pub console_tail: Option<String>,
}

impl Report {
    /// A plain-text table.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{} ({}): {} in {:.0} s\n",
            self.machine,
            self.device.as_deref().unwrap_or("-"),
            if self.ok { "PASSED" } else { "FAILED" },
            self.seconds
        );
        for st in &self.steps {
            s.push_str(&format!(
                "  {:<4} {:>6.1} s  {:<34} {}\n",
                if st.ok { "ok" } else { "FAIL" },
                st.seconds,
                st.name,
                st.detail
            ));
        }
        s
    }
}

struct Run<'a> {
    m: &'a mut dyn Machine,
    env: &'a Env<'a>,
    report: Report,
    started: Instant,
}

impl Run<'_> {
    fn step(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Result<String>) -> Result<()> {
        let t = Instant::now();
        tracing::info!(step = name, "step");
        let r = f(self);
        let (ok, detail) = match &r {
            Ok(d) => (true, d.clone()),
            Err(e) => (false, format!("{e:#}")),
        };
        tracing::info!(step = name, ok, secs = t.elapsed().as_secs_f64(), %detail, "step done");
        self.report.steps.push(Step {
            name: name.into(),
            seconds: t.elapsed().as_secs_f64(),
            ok,
            detail,
        });
        r.map(|_| ())
    }

    fn hub(&self) -> &HubProc {
        self.env.hub
    }

    /// Polls `cond` every 250 ms; on timeout, says what did not happen.
    fn wait(
        &mut self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut(&mut Self) -> Result<bool>,
    ) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if cond(self)? {
                return Ok(());
            }
            if !self.m.is_on() {
                bail!("{what}: the box powered off");
            }
            if Instant::now() > deadline {
                bail!("timed out after {limit:?} waiting for: {what}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `os set` of `version` for this box, with room for a trial boot under emulation.
    fn os_set(&self, version: &str) -> Result<()> {
        let id = self.report.device.clone().context("no device")?;
        self.hub().cli(&[
            "os",
            "set",
            "--device",
            &id,
            version,
            "--health-timeout",
            "5m",
        ])?;
        Ok(())
    }

    fn device(&self) -> Result<DeviceDetail> {
        let id = self.report.device.clone().context("no device yet")?;
        self.hub().json_as(&["device", "show", &id])
    }

    /// The device's upgrade report (none yet: an error, so that waits keep waiting).
    fn upgrade(&self) -> Result<UpgradeStatus> {
        self.device()?
            .device
            .record
            .upgrade
            .context("the device has reported no upgrade yet")
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Runs the scenario on `m`. The report is also written to `env.work/report.json`.
pub fn run(m: &mut dyn Machine, env: &Env<'_>, rel: &Releases<'_>) -> Report {
    std::fs::create_dir_all(&env.work).ok();
    let mut run = Run {
        report: Report {
            machine: m.name().to_string(),
            ..Report::default()
        },
        m,
        env,
        started: Instant::now(),
    };
    let result = steps(&mut run, rel);
    if let Err(e) = &result {
        tracing::error!(error = %format!("{e:#}"), "scenario failed");
        run.report.console_tail = Some(console_tail(run.m, 60));
    }
    let _ = run.m.power_off();
    run.report.ok = result.is_ok();
    run.report.seconds = run.started.elapsed().as_secs_f64();
    if let Ok(j) = serde_json::to_vec_pretty(&run.report) {
        let _ = std::fs::write(env.work.join("report.json"), j);
    }
    run.report
}

fn steps(run: &mut Run<'_>, rel: &Releases<'_>) -> Result<()> {
    let work = run.env.work.clone();
    let label = format!("rig={}", run.m.name());
    let key = work.join("release.pem");

    run.step("release key and policy", |r| {
        let _ = std::fs::remove_file(&key);
        r.hub().cli(&["release", "keygen", "--out", s(&key)])?;
        r.hub().cli(&[
            "release",
            "key",
            "add",
            &format!("{}.pub", key.display()),
            "--name",
            "rig",
        ])?;
        if !r.env.tpm {
            return Ok("no TPM on this box: no attestation policy".into());
        }
        let name = format!("rig-{}", r.m.name());
        r.hub().cli(&[
            "policy",
            "set",
            &name,
            "--selector",
            &label,
            "--require",
            "tpm",
            "--tofu",
        ])?;
        Ok(format!(
            "policy {name}: TPM identity, PCRs 0-7, first boot trusted"
        ))
    })?;

    run.step("configure and flash v1", |r| {
        let token = r
            .hub()
            .cli(&[
                "token", "create", "--uses", "1", "--ttl", "1h", "--labels", &label,
            ])?
            .split_whitespace()
            .find(|w| w.starts_with("cairn1_"))
            .context("token create printed no token")?
            .to_string();
        let img = work.join("flash.img");
        cairn_image::tools::run(
            std::process::Command::new("cp")
                .arg("--sparse=always")
                .arg(&rel.v1.disk)
                .arg(&img),
        )?;
        r.hub().cli(&[
            "image",
            "configure",
            s(&img),
            "--hub",
            &r.env.box_hub,
            "--token",
            &token,
        ])?;
        r.m.flash(&img)?;
        Ok(format!(
            "{} configured for {}",
            rel.v1.disk.display(),
            r.env.box_hub
        ))
    })?;

    run.step("boot v1, enroll, attest", |r| {
        r.m.power_on()?;
        let limit = r.env.timeouts.enroll;
        r.wait("the box enrolls and attests", limit, |r| {
            let devs: Vec<DeviceView> = r.hub().json_as(&["devices"])?;
            let found = devs.iter().find(|d| {
                d.record
                    .labels
                    .iter()
                    .any(|(k, v)| k.as_str() == "rig" && v.as_str() == run_label_value(&label))
            });
            if let Some(d) = found {
                r.report.device = Some(d.record.id.to_string());
                return Ok(if r.env.tpm {
                    d.record.attest_status.as_deref() == Some("trusted")
                } else {
                    d.connected
                });
            }
            Ok(false)
        })?;
        let d = r.device()?;
        let id = &d.device.record.id;
        if !r.env.tpm {
            return Ok(format!("{id} enrolled and connected (no TPM)"));
        }
        let a = d.attestation.context("the device has no attestation")?;
        if a.kind != "tpm" {
            bail!(
                "attested as {} (expected a TPM whose EK certificate chains to the --ek-ca): {a:?}",
                a.kind
            );
        }
        Ok(format!(
            "{id} attested: TPM, PCR 4 {}",
            short(a.pcrs.get(&4).map_or("-", String::as_str))
        ))
    })?;

    let reference = work.join("v1.eventlog");
    let measured = run.env.tpm;
    if measured {
        event_log_step(run, rel, &reference)?;
    }
    let (Some(v2), Some(v3)) = (rel.v2, rel.v3) else {
        return Ok(());
    };

    let mut predicted_pcr4 = String::new();
    if measured {
        run.step("predict v2's PCR 4", |_| {
            let log = std::fs::read(&reference)?;
            let old = uki_digest(rel.v1)?;
            let new = uki_digest(v2)?;
            let p = predict::with_uki(&log, &old, &new)?;
            let v = p.get(&4).context("v2's UKI does not change PCR 4")?;
            predicted_pcr4 = hex::encode(v);
            Ok(format!("{} (v1's log, v2's UKI)", short(&predicted_pcr4)))
        })?;
    }
    let expect_pcr4 = Some(predicted_pcr4.as_str()).filter(|p| !p.is_empty());

    let v2_bundle = work.join("os-2.0.0.cairn");
    run.step("build and push v2", |r| {
        build_release(r.hub(), v2, &key, &v2_bundle, expect_pcr4)?;
        Ok(format!(
            "{} ({})",
            v2_bundle.display(),
            human(std::fs::metadata(&v2_bundle)?.len())
        ))
    })?;
    upgrade_steps(run, v3, &key, expect_pcr4)
}

/// Checks the box's boot log (as the hub verified it) against its quote and v1's UKI.
fn event_log_step(run: &mut Run<'_>, rel: &Releases<'_>, reference: &Path) -> Result<()> {
    run.step("the event log replays to the quote", |r| {
        let id = r.report.device.clone().context("no device")?;
        r.hub()
            .cli(&["device", "eventlog", &id, "--out", s(reference)])?;
        let log = std::fs::read(reference)?;
        let replayed = predict::replay(&log)?;
        let d = r.device()?;
        let a = d.attestation.context("the device has no attestation")?;
        for pcr in 0..8u32 {
            let quoted = a.pcrs.get(&pcr).map_or("", String::as_str);
            let ours = replayed.get(&pcr).map(hex::encode).unwrap_or_default();
            if quoted != ours {
                bail!("PCR {pcr}: the event log replays to {ours}, the quote says {quoted}");
            }
        }
        let uki = uki_digest(rel.v1)?;
        if predict::with_uki(&log, &uki, &uki).is_err() {
            bail!(
                "the firmware never measured v1's UKI ({}) into PCR 4",
                hex::encode(uki)
            );
        }
        Ok(format!(
            "{} bytes; PCRs 0-7 match the quote; v1's UKI is in PCR 4",
            log.len()
        ))
    })
}

/// v2 through a power cut (and, measured, its predicted PCR 4), then the broken v3.
fn upgrade_steps(
    run: &mut Run<'_>,
    v3: &Built,
    key: &Path,
    expect_pcr4: Option<&str>,
) -> Result<()> {
    let work = run.env.work.clone();
    run.step("v2: power cut while slot B is written", |r| {
        r.os_set("2.0.0")?;
        let console_before = console_text(r.m).len();
        let mut at = String::new();
        r.wait(
            "the box starts writing slot B",
            r.env.timeouts.upgrade,
            |r| {
                let Some(u) = r.device()?.device.record.upgrade else {
                    return Ok(false);
                };
                let written_one = console_text(r.m)
                    .get(console_before..)
                    .is_some_and(|t| t.contains("payload written"));
                let mid = u.phase == "downloading"
                    && u.version == "2.0.0"
                    && (u.bytes_done > 0 || written_one);
                if mid {
                    at = format!("{} of {} bytes", u.bytes_done, u.bytes_total);
                }
                Ok(mid)
            },
        )?;
        r.m.power_off()?;
        std::thread::sleep(Duration::from_secs(1));
        r.m.power_on()?;
        Ok(format!("power cut at {at}"))
    })?;

    run.step("v2: resume, trial boot, commit", |r| {
        let limit = r.env.timeouts.upgrade;
        r.wait("2.0.0 committed", limit, |r| {
            let Some(u) = r.device()?.device.record.upgrade else {
                return Ok(false);
            };
            Ok(u.phase == "committed" && u.committed_version == "2.0.0")
        })?;
        let u = r.upgrade()?;
        if u.booted_slot != "b" {
            bail!("committed 2.0.0 but booted slot {}", u.booted_slot);
        }
        let Some(predicted) = expect_pcr4 else {
            return Ok("slot B, committed (no TPM: nothing measured)".into());
        };
        let limit = r.env.timeouts.enroll;
        r.wait("the v2 boot attested", limit, |r| {
            let a = r.device()?.attestation;
            Ok(a.and_then(|a| a.pcrs.get(&4).cloned()).as_deref() == Some(predicted))
        })?;
        let a = r
            .device()?
            .attestation
            .context("the device has no attestation")?;
        if a.status != "trusted" {
            bail!(
                "v2 booted but the hub's attestation says {}: {}",
                a.status,
                a.reason.as_deref().unwrap_or("-")
            );
        }
        Ok(format!(
            "slot B, PCR 4 as predicted, attestation {}",
            a.status
        ))
    })?;

    let v3_bundle = work.join("os-3.0.0.cairn");
    run.step("v3 (broken): falls back to v2", |r| {
        build_release(r.hub(), v3, key, &v3_bundle, None)?;
        r.os_set("3.0.0")?;
        let limit = r.env.timeouts.rollback;
        r.wait("3.0.0 rolled back", limit, |r| {
            let d = r.device()?.device;
            Ok(d.connected
                && d.record
                    .upgrade
                    .is_some_and(|u| u.version == "3.0.0" && u.phase == "rolled-back"))
        })?;
        let u = r.upgrade()?;
        if u.committed_version != "2.0.0" || u.booted_slot != "b" {
            bail!(
                "after the rollback: committed {} on slot {}",
                u.committed_version,
                u.booted_slot
            );
        }
        if r.m.has_console() && !console_text(r.m).contains("built with --fault init-panic") {
            bail!("the console never showed v3's initramfs failing: did it boot at all?");
        }
        Ok(format!(
            "back on 2.0.0 (slot B); hub says: {}",
            u.error.as_deref().unwrap_or("-")
        ))
    })?;
    Ok(())
}

/// `rig=NAME` → `NAME`.
fn run_label_value(label: &str) -> &str {
    label.split_once('=').map_or(label, |(_, v)| v)
}

fn build_release(
    hub: &HubProc,
    b: &Built,
    key: &Path,
    out: &Path,
    pcr4: Option<&str>,
) -> Result<()> {
    let extra: Vec<String> = b
        .extra
        .iter()
        .map(|p| format!("{}={}", p.name, p.path.display()))
        .collect();
    let arch = b.arch.to_string();
    let mut args = vec![
        "release",
        "build",
        s(&b.rootfs),
        "--version",
        &b.version,
        "--arch",
        &arch,
        "--board",
        &b.board,
        "--key",
        s(key),
        "--out",
        s(out),
    ];
    for p in &extra {
        args.extend(["--payload", p]);
    }
    let pcr = pcr4.map(|p| format!("4={p}"));
    if let Some(p) = &pcr {
        args.extend(["--expect-pcr", p]);
    }
    hub.cli(&args)?;
    hub.cli(&["release", "push", s(out)])?;
    Ok(())
}

/// The Authenticode digest of a build's UKI (what UEFI measures into PCR 4).
fn uki_digest(b: &Built) -> Result<[u8; 32]> {
    let d = b.uki_authenticode.as_deref().with_context(|| {
        format!(
            "{} {} has no UKI: its boot is not measured by UEFI",
            b.board, b.version
        )
    })?;
    hex_32(d)
}

fn hex_32(s: &str) -> Result<[u8; 32]> {
    let v = hex::decode(s).context("not hex")?;
    v.try_into().map_err(|_| anyhow::anyhow!("not 32 bytes"))
}

fn short(s: &str) -> String {
    if s.len() > 16 {
        format!("{}…", &s[..16])
    } else {
        s.to_string()
    }
}

fn human(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / 1048576.0)
}
