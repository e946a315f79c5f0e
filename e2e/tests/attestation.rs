//! Attestation end to end: a real hub process that trusts a per-test EK CA, agents on
//! real swtpm TPMs (provisioned with EK certificates by that CA, "booted" by playing a
//! real OVMF event log into their PCRs), over QUIC on loopback.
//!
//! - A TPM device enrolls (EK chain, credential activation, first quote), gets state,
//!   is quarantined when it reboots into a different boot chain (state withheld,
//!   reports still flowing), and the operator's accept lets state flow again; a PCR
//!   extended behind the log's back is refused evidence that cannot be accepted.
//! - An EK from a CA the hub does not trust is refused, and so is a software TPM where
//!   policy requires a TPM.
//! - Malicious agents (the real agent library with attesters that cheat): a cloned
//!   identity (another TPM's EK certificate), a replayed quote, an event log that does
//!   not replay to the PCRs.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_agent::AgentConfig;
use cairn_agent::attest::SharedAttester;
use cairn_e2e::{Agent, Hub, wait_for};
use cairn_hub::api::DeviceView;
use cairn_sync_protocol::message::RefusalCode;
use cairn_tpm::attest::{AttestError, Attester, Identity, Quoted};
use cairn_tpm_device::device::Device;
use cairn_tpm_device::testkit::{EkCert, Swtpm, SwtpmOptions, TestCa, measure_boot};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/ovmf-swtpm")
        .join(name)
}

fn fixture_pcrs(name: &str) -> Vec<(u32, String)> {
    std::fs::read_to_string(fixture(&format!("{name}.pcrs-sha256")))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (i, v) = l.split_once(' ')?;
            Some((i.parse().ok()?, v.trim().to_lowercase()))
        })
        .collect()
}

/// A swtpm signed by `ca` that booted `log`.
fn booted_tpm(ca: &TestCa, log: &str) -> Swtpm {
    let tpm = Swtpm::start(SwtpmOptions {
        ek_cert: EkCert::Ecc,
        ca: Some(ca.clone()),
    })
    .unwrap();
    measure_boot(&tpm.tcti(), &std::fs::read(fixture(log)).unwrap()).unwrap();
    tpm
}

fn write_ca(ca: &TestCa, dir: &Path) -> String {
    let path = dir.join("ek-ca.pem");
    std::fs::write(&path, ca.ca_cert_pem().unwrap()).unwrap();
    path.display().to_string()
}

fn tpm_args(tpm: &Swtpm, log: &str) -> Vec<String> {
    vec![
        "--tpm".into(),
        tpm.tcti(),
        "--event-log".into(),
        fixture(log).display().to_string(),
    ]
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Power-cycles the box: the agent dies, the TPM resets, the firmware measures `log`,
/// the agent starts again reading that log.
fn reboot(agent: &mut Agent, tpm: &mut Swtpm, log: &str) {
    agent.kill();
    tpm.restart().unwrap();
    measure_boot(&tpm.tcti(), &std::fs::read(fixture(log)).unwrap()).unwrap();
    agent.set_args(&refs(&tpm_args(tpm, log)));
    agent.start_again();
}

/// Log text without terminal colour codes.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn only_device(hub: &Hub) -> Option<DeviceView> {
    hub.devices().into_iter().next()
}

fn attest_status(hub: &Hub) -> Option<String> {
    only_device(hub)?.record.attest_status
}

/// Why the only device is quarantined, if it is.
fn quarantine(hub: &Hub) -> Option<String> {
    only_device(hub)?.record.quarantine
}

#[test]
fn a_tpm_device_is_quarantined_when_its_boot_changes_until_the_operator_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    let mut tpm = booted_tpm(&ca, "boot-a.eventlog");
    let ca_file = write_ca(&ca, tmp.path());
    let hub = Hub::start_with(
        &tmp.path().join("hub"),
        &["--ek-ca", &ca_file, "--attest-interval", "2s"],
    );
    hub.cli_ok(&[
        "policy",
        "set",
        "kiosks",
        "--selector",
        "site=a",
        "--require",
        "tpm",
        "--tofu",
        "--pcrs",
        "0-9",
    ]);
    let token = hub.token(1, "site=a");
    let mut agent = Agent::start_with(
        &tmp.path().join("agent"),
        &hub.quic,
        Some(&token),
        &refs(&tpm_args(&tpm, "boot-a.eventlog")),
    );
    let timeout = Duration::from_secs(60);
    wait_for("the TPM device enrolls, trusted", timeout, || {
        attest_status(&hub).as_deref() == Some("trusted")
    });
    let id = agent.device_id().unwrap();
    hub.set_file("--selector", "site=a", "motd", "etc/motd", "one");
    wait_for("state reaches the trusted device", timeout, || {
        agent.file("etc/motd").exists()
    });
    let shown = hub.device(&id);
    let a = shown
        .attestation
        .as_ref()
        .expect("the device's attestation");
    assert_eq!(a.kind, "tpm", "{shown:?}");
    assert!(
        a.ek_issuer.as_deref().unwrap().contains("swtpm-localca"),
        "{a:?}"
    );
    assert_eq!(
        a.accepted.first().map(|s| s.source.as_str()),
        Some("first-seen")
    );
    // The hub holds the PCRs of the real boot, replayed from its log and quoted.
    for (i, v) in fixture_pcrs("boot-a").into_iter().filter(|(i, _)| *i <= 9) {
        assert_eq!(a.pcrs.get(&i).unwrap(), &v, "PCR {i}");
    }
    let table = hub.cli_ok(&["devices"]);
    assert!(table.contains("tpm trusted"), "{table}");

    // A planned change: the operator (or a release manifest) says which values the
    // next boot will measure. Rebooting into boot-b (another kernel command line: PCR
    // 9 differs) is then trusted at once, with no quarantine in between. Only the PCR
    // that changes is named; the others keep the device's current values.
    let mut expect = vec!["device", "expect", &id, "--source", "release 2"]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<_>>();
    let boot_a = fixture_pcrs("boot-a");
    for (i, v) in fixture_pcrs("boot-b")
        .into_iter()
        .filter(|(i, v)| *i <= 9 && !boot_a.contains(&(*i, v.clone())))
    {
        expect.push("--pcr".into());
        expect.push(format!("{i}={v}"));
    }
    hub.cli_ok(&refs(&expect));
    reboot(&mut agent, &mut tpm, "boot-b.eventlog");
    let boot_b_pcr9 = fixture_pcrs("boot-b")
        .into_iter()
        .find(|(i, _)| *i == 9)
        .unwrap()
        .1;
    wait_for("the expected boot verifies", timeout, || {
        hub.device(&id)
            .attestation
            .and_then(|a| a.pcrs.get(&9).cloned())
            .as_deref()
            == Some(boot_b_pcr9.as_str())
    });
    assert_eq!(attest_status(&hub).as_deref(), Some("trusted"));
    assert!(hub.events(&id, Some("hub.quarantined")).is_empty());

    // An unplanned change: a unified kernel image (PCR 4 differs). The evidence
    // verifies, but it is not what was accepted: quarantine.
    reboot(&mut agent, &mut tpm, "boot-uki.eventlog");
    wait_for("the rebooted device is quarantined", timeout, || {
        attest_status(&hub).as_deref() == Some("quarantined")
    });
    let d = only_device(&hub).unwrap();
    let why = d.record.quarantine.as_deref().unwrap();
    assert!(why.contains("PCR 4"), "{why}");
    assert!(hub.cli_ok(&["devices"]).contains("QUARANTINED"));
    let events = hub.events(&id, Some("hub.quarantined"));
    assert_eq!(events.len(), 1, "{events:?}");
    // Quarantined: no new state, but reports still arrive.
    let reports_before = d.record.reports_acked;
    hub.set_file("--selector", "site=a", "banner", "etc/banner", "two");
    agent.restart();
    wait_for(
        "reports still arrive from the quarantined device",
        timeout,
        || only_device(&hub).is_some_and(|d| d.record.reports_acked > reports_before),
    );
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        !agent.file("etc/banner").exists(),
        "a quarantined device must get no new state"
    );

    // The operator accepts the new measurements: trusted again, state flows.
    let out = hub.cli_ok(&["device", "accept", &id]);
    assert!(out.contains("accepted"), "{out}");
    wait_for("state flows after the accept", timeout, || {
        agent.file("etc/banner").exists()
    });
    assert_eq!(attest_status(&hub).as_deref(), Some("trusted"));
    let a = hub
        .device(&id)
        .attestation
        .expect("the device's attestation");
    let sources: Vec<&str> = a.accepted.iter().map(|s| s.source.as_str()).collect();
    assert_eq!(sources, ["release 2", "accepted by operator"], "{a:?}");

    // Connected devices are challenged again every --attest-interval (2 s here).
    let verified = |hub: &Hub| {
        hub.device(&id)
            .attestation
            .and_then(|a| a.verified_ms)
            .unwrap_or(0)
    };
    let first = verified(&hub);
    wait_for("a periodic re-attestation", timeout, || {
        verified(&hub) > first
    });

    // A PCR extended behind the log's back: the evidence itself is refused, and there
    // is nothing the operator could accept.
    agent.kill();
    {
        let mut dev = Device::open(&tpm.tcti()).unwrap();
        dev.extend_pcr(9, [7; 32]).unwrap();
    }
    agent.start_again();
    wait_for("unexplained PCRs quarantine the device", timeout, || {
        quarantine(&hub).is_some_and(|w| w.contains("does not replay"))
    });
    let out = hub.cli(&["device", "accept", &id]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no verified measurements"), "{err}");
}

#[test]
fn an_ek_from_an_untrusted_ca_and_a_software_tpm_are_refused_where_policy_requires_a_tpm() {
    let tmp = tempfile::tempdir().unwrap();
    let trusted = TestCa::new().unwrap();
    let ca_file = write_ca(&trusted, tmp.path());
    let hub = Hub::start_with(&tmp.path().join("hub"), &["--ek-ca", &ca_file]);
    hub.cli_ok(&[
        "policy",
        "set",
        "all",
        "--selector",
        "site",
        "--require",
        "tpm",
    ]);
    let token = hub.token(5, "site=a");

    // A TPM whose EK certificate comes from another CA (same names, other key).
    let impostor = booted_tpm(&TestCa::new().unwrap(), "boot-a.eventlog");
    let mut agent = Agent::start_with(
        &tmp.path().join("a1"),
        &hub.quic,
        Some(&token),
        &refs(&tpm_args(&impostor, "boot-a.eventlog")),
    );
    wait_for("the agent gives up", Duration::from_secs(60), || {
        agent.exited().is_some()
    });
    assert_eq!(agent.exited(), Some(3), "{}", agent.log_tail());
    assert!(
        agent.log_tail().contains("EK certificate"),
        "{}",
        agent.log_tail()
    );

    // A software TPM where policy requires a real one, and an agent without any.
    let refused_with = |dir: &str, tpm: &str, why: &str| -> Agent {
        let mut a = Agent::start_with(
            &tmp.path().join(dir),
            &hub.quic,
            Some(&token),
            &["--tpm", tpm],
        );
        wait_for("the agent gives up", Duration::from_secs(60), || {
            a.exited().is_some()
        });
        assert_eq!(a.exited(), Some(3), "{}", a.log_tail());
        assert!(a.log_tail().contains(why), "{}", a.log_tail());
        a
    };
    let mut soft = refused_with("a2", "software", "does not meet");
    refused_with("a3", "none", "sent no attestation");
    assert!(hub.devices().is_empty(), "{:?}", hub.devices());

    // Policy relaxed to software: it enrolls and is listed as software-attested.
    hub.cli_ok(&[
        "policy",
        "set",
        "all",
        "--selector",
        "site",
        "--require",
        "software",
    ]);
    soft.start_again();
    wait_for(
        "the software agent enrolls",
        Duration::from_secs(60),
        || only_device(&hub).is_some_and(|d| d.record.attestation.as_deref() == Some("software")),
    );
    assert_eq!(attest_status(&hub).as_deref(), Some("trusted"));
}

/// An attester that lies: identity from one place, work done by another TPM, quotes
/// replayed, logs swapped.
struct Cheat {
    identity: Identity,
    tpm: Device,
    replay: bool,
    first_quote: Option<Quoted>,
    log: Option<Vec<u8>>,
}

impl Attester for Cheat {
    fn identity(&self) -> &Identity {
        &self.identity
    }
    fn activate_credential(&mut self, blob: &[u8], secret: &[u8]) -> Result<Vec<u8>, AttestError> {
        self.tpm.activate_credential(blob, secret)
    }
    fn quote(&mut self, nonce: &[u8], pcrs: &[u32]) -> Result<Quoted, AttestError> {
        if self.replay
            && let Some(q) = &self.first_quote
        {
            return Ok(q.clone());
        }
        let q = self.tpm.quote(nonce, pcrs)?;
        self.first_quote.get_or_insert(q.clone());
        Ok(q)
    }
    fn event_log(&mut self) -> Result<Vec<u8>, AttestError> {
        match &self.log {
            Some(l) => Ok(l.clone()),
            None => self.tpm.event_log(),
        }
    }
}

impl Cheat {
    /// Claims `identity`, works with `tpm`.
    fn new(identity: Identity, tpm: Device) -> Self {
        Self {
            identity,
            tpm,
            replay: false,
            first_quote: None,
            log: None,
        }
    }
}

fn open(tpm: &Swtpm, log: &str) -> Device {
    Device::open(&tpm.tcti())
        .unwrap()
        .with_event_log(fixture(log))
}

/// Runs the agent library with `attester` until `stop` says so; the result if it ended.
fn run_agent(
    hub: &Hub,
    dir: &Path,
    token: &str,
    attester: Cheat,
    until: impl FnMut() -> bool,
) -> Option<Result<cairn_agent::Stopped, cairn_agent::RunError>> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut cfg = AgentConfig::new(hub.quic.clone(), dir);
    cfg.join_token = Some(token.to_string());
    cfg.backoff_max = Duration::from_secs(1);
    let shared: SharedAttester = Arc::new(Mutex::new(Box::new(attester)));
    let until = Arc::new(Mutex::new(until));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    rt.block_on(async move {
        let stop = async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                assert!(
                    std::time::Instant::now() < deadline,
                    "the agent neither stopped nor reached the expected state in 60 s; hub log:\n{}",
                    hub.log_tail()
                );
                let done = tokio::task::block_in_place(|| (until.lock().unwrap())());
                if done {
                    return;
                }
            }
        };
        let run = cairn_agent::run_with_attester(cfg, Some(shared), std::future::pending());
        tokio::select! {
            r = run => Some(r),
            () = stop => None,
        }
    })
}

#[test]
fn cloned_identities_replayed_quotes_and_logs_that_do_not_replay_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    let ca_file = write_ca(&ca, tmp.path());
    let hub = Hub::start_with(
        &tmp.path().join("hub"),
        &["--ek-ca", &ca_file, "--attest-interval", "1s"],
    );
    let token = hub.token(10, "site=a");
    let a = booted_tpm(&ca, "boot-a.eventlog");
    let b = booted_tpm(&ca, "boot-a.eventlog");
    let refused =
        |r: Option<Result<cairn_agent::Stopped, cairn_agent::RunError>>, what: &str| -> String {
            match r {
                Some(Err(cairn_agent::RunError::EnrollRefused { code, message })) => {
                    assert_eq!(code, RefusalCode::AttestationFailed, "{what}: {message}");
                    message
                }
                other => panic!("{what}: expected a refused enrollment, got {other:?}"),
            }
        };

    // TPM A's EK certificate and EK, but the AK (and the work) of TPM B: B cannot open
    // a credential made for A's EK.
    let dev_a = open(&a, "boot-a.eventlog");
    let dev_b = open(&b, "boot-a.eventlog");
    let mut cloned = dev_b.identity().clone();
    cloned.ek_public = dev_a.identity().ek_public.clone();
    cloned.ek_certificate = dev_a.identity().ek_certificate.clone();
    drop(dev_a);
    let cheat = Cheat::new(cloned, dev_b);
    let msg = refused(
        run_agent(&hub, &tmp.path().join("c1"), &token, cheat, || false),
        "cloned EK",
    );
    assert!(msg.contains("credential activation failed"), "{msg}");

    // A's certificate with B's own EK: the certificate is not for this key.
    let dev_a = open(&a, "boot-a.eventlog");
    let dev_b = open(&b, "boot-a.eventlog");
    let mut cloned = dev_b.identity().clone();
    cloned.ek_certificate = dev_a.identity().ek_certificate.clone();
    drop(dev_a);
    let cheat = Cheat::new(cloned, dev_b);
    let msg = refused(
        run_agent(&hub, &tmp.path().join("c2"), &token, cheat, || false),
        "copied certificate",
    );
    assert!(msg.contains("EK certificate"), "{msg}");

    // A log that does not replay to the TPM's PCRs (boot-b's log on a boot-a TPM).
    let dev_b = open(&b, "boot-a.eventlog");
    let cheat = Cheat {
        log: Some(std::fs::read(fixture("boot-b.eventlog")).unwrap()),
        ..Cheat::new(dev_b.identity().clone(), dev_b)
    };
    let msg = refused(
        run_agent(&hub, &tmp.path().join("c3"), &token, cheat, || false),
        "foreign log",
    );
    assert!(msg.contains("does not replay to the quoted PCR"), "{msg}");
    assert!(hub.devices().is_empty());

    // An honest enrollment, then quotes replayed from it: the next challenge's nonce
    // (bound to a new TLS session) does not match, and the device is quarantined.
    let dev_a = open(&a, "boot-a.eventlog");
    let cheat = Cheat {
        replay: true,
        ..Cheat::new(dev_a.identity().clone(), dev_a)
    };
    let r = run_agent(&hub, &tmp.path().join("c4"), &token, cheat, || {
        attest_status(&hub).as_deref() == Some("quarantined")
    });
    assert!(r.is_none(), "the agent stopped: {r:?}");
    let why = quarantine(&hub).unwrap();
    assert!(why.contains("nonce"), "{why}");
}

/// The TLS key is stored sealed to the TPM: a data directory copied to another box (or
/// restored onto another TPM) cannot be used to impersonate the device.
#[test]
fn a_data_directory_copied_to_another_box_is_useless() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    let ca_file = write_ca(&ca, tmp.path());
    let hub = Hub::start_with(&tmp.path().join("hub"), &["--ek-ca", &ca_file]);
    let token = hub.token(1, "site=a");
    let tpm = booted_tpm(&ca, "boot-a.eventlog");
    let mut agent = Agent::start_with(
        &tmp.path().join("agent"),
        &hub.quic,
        Some(&token),
        &refs(&tpm_args(&tpm, "boot-a.eventlog")),
    );
    wait_for("the device enrolls", Duration::from_secs(60), || {
        attest_status(&hub).as_deref() == Some("trusted")
    });
    agent.kill();
    let db = rusqlite::Connection::open(agent.dir.join("agent.db")).unwrap();
    let key: Vec<u8> = db
        .query_row("SELECT value FROM meta WHERE key = 'key_der'", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert!(key.starts_with(b"CSL"), "the stored key must be sealed");
    drop(db);

    let other = booted_tpm(&ca, "boot-a.eventlog");
    let copy = tmp.path().join("copy");
    cairn_e2e::copy_dir(&agent.dir, &copy);
    let mut thief = Agent::start_with(
        &copy,
        &hub.quic,
        None,
        &refs(&tpm_args(&other, "boot-a.eventlog")),
    );
    wait_for("the copy gives up", Duration::from_secs(60), || {
        thief.exited().is_some()
    });
    assert_eq!(thief.exited(), Some(1), "{}", thief.log_tail());
    assert!(thief.log_tail().contains("sealed"), "{}", thief.log_tail());
    // The original, on its own TPM, still works.
    agent.start_again();
    wait_for("the original reconnects", Duration::from_secs(60), || {
        only_device(&hub).is_some_and(|d| d.connected)
    });
}

/// IMA: the hub verifies the measurement list against the quoted PCR 10, then only
/// the entries added since; an entry whose data does not match its digest quarantines.
#[test]
fn the_ima_list_is_verified_incrementally_and_a_forged_entry_quarantines() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new().unwrap();
    let ca_file = write_ca(&ca, tmp.path());
    let hub = Hub::start_with(&tmp.path().join("hub"), &["--ek-ca", &ca_file]);
    let token = hub.token(1, "site=a");
    let tpm = booted_tpm(&ca, "boot-a.eventlog");
    let list = tmp.path().join("ima.bin");
    cairn_tpm_device::testkit::measure_files(
        &tpm.tcti(),
        &list,
        &[
            ("/usr/bin/init", b"init"),
            ("/usr/bin/cairn-agent", b"agent"),
        ],
    )
    .unwrap();
    let mut args = tpm_args(&tpm, "boot-a.eventlog");
    args.extend(["--ima-log".to_string(), list.display().to_string()]);
    let mut agent = Agent::start_with(
        &tmp.path().join("agent"),
        &hub.quic,
        Some(&token),
        &refs(&args),
    );
    let ima_entries = |hub: &Hub| -> u64 {
        only_device(hub)
            .and_then(|d| hub.device(d.record.id.as_str()).attestation)
            .map_or(0, |a| a.ima_entries)
    };
    wait_for(
        "the first two entries verify",
        Duration::from_secs(60),
        || ima_entries(&hub) == 2,
    );
    let held = std::fs::metadata(&list).unwrap().len();

    // Three more files measured; the next session sends only them.
    agent.kill();
    cairn_tpm_device::testkit::measure_files(
        &tpm.tcti(),
        &list,
        &[("/etc/a", b"1"), ("/etc/b", b"2"), ("/etc/c", b"3")],
    )
    .unwrap();
    agent.start_again();
    wait_for("the new entries verify", Duration::from_secs(60), || {
        ima_entries(&hub) == 5
    });
    let tail = std::fs::metadata(&list).unwrap().len() - held;
    let log = strip_ansi(&agent.log_tail());
    assert!(
        log.contains(&format!("ima_offset={held} ima_bytes={tail}")),
        "the agent should have sent only the {tail} bytes after byte {held}:\n{log}"
    );
    assert_eq!(attest_status(&hub).as_deref(), Some("trusted"));

    // One more measured file whose listed path is then altered.
    agent.kill();
    cairn_tpm_device::testkit::measure_files(&tpm.tcti(), &list, &[("/etc/shadow", b"x")]).unwrap();
    let mut bytes = std::fs::read(&list).unwrap();
    let at = bytes.len() - 3; // inside "/etc/shadow\0"
    bytes[at] ^= 0x20;
    std::fs::write(&list, bytes).unwrap();
    agent.start_again();
    wait_for(
        "the forged entry quarantines",
        Duration::from_secs(60),
        || quarantine(&hub).is_some_and(|w| w.contains("IMA measurement list")),
    );
}

/// A device enrolled without attestation gets no desired state while a policy requires
/// an identity it cannot prove, and gets it again once no policy does.
#[test]
fn an_unattested_device_gets_no_state_while_policy_requires_attestation() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"));
    let token = hub.token(1, "site=a");
    let agent = Agent::start_with(
        &tmp.path().join("agent"),
        &hub.quic,
        Some(&token),
        &["--tpm", "none"],
    );
    let timeout = Duration::from_secs(60);
    hub.set_file("--selector", "site=a", "one", "etc/one", "1");
    wait_for("state reaches the unattested device", timeout, || {
        agent.file("etc/one").exists()
    });
    assert_eq!(only_device(&hub).unwrap().record.attestation, None);
    // Nothing to accept on it: refused as a conflict (exit 1), not "no such device" (3).
    let id = only_device(&hub).unwrap().record.id.to_string();
    let out = hub.cli(&["device", "accept", &id]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("has no attestation"), "{err}");
    hub.cli_ok(&[
        "policy",
        "set",
        "a",
        "--selector",
        "site=a",
        "--require",
        "software",
    ]);
    // The policy applies from the next connection: make one.
    let mut agent = agent;
    agent.restart();
    wait_for("the agent reconnects", timeout, || {
        only_device(&hub).is_some_and(|d| d.connected)
    });
    hub.set_file("--selector", "site=a", "two", "etc/two", "2");
    std::thread::sleep(Duration::from_secs(3));
    assert!(!agent.file("etc/two").exists(), "state must be withheld");
    hub.cli_ok(&["policy", "rm", "a"]);
    hub.set_file("--selector", "site=a", "three", "etc/three", "3");
    wait_for(
        "state flows once no policy requires attestation",
        timeout,
        || agent.file("etc/two").exists() && agent.file("etc/three").exists(),
    );
}
