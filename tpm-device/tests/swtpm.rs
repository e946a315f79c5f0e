//! The agent-side TPM code against a real TPM emulator: swtpm, provisioned with EK
//! certificates per test by [`cairn_tpm_device::testkit`]. Quotes our code makes are accepted by
//! our hub-side verifier and by `tpm2_checkquote` (tpm2-tools); credentials our hub code
//! makes are activated only by the TPM holding both keys (RSA and ECC EKs); the AK is
//! persistent across restarts and reboots; sealed data comes back only on its own TPM;
//! and a real firmware event log played into a TPM verifies as evidence.
//! Needs the `agent` and `testkit` features (libtss2) and swtpm; `scripts/test.sh`
//! installs both.
#![cfg(feature = "testkit")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use cairn_tpm::attest::{AttestError, Attester, IdentityKind, verify_evidence};
use cairn_tpm::credential::make_credential;
use cairn_tpm::quote::{AkPublic, QuoteError, verify_quote};
use cairn_tpm_device::device::{Device, DeviceConfig, DeviceError, EkAlgorithm, EkChoice};
use cairn_tpm_device::testkit::{EkCert, Swtpm, SwtpmOptions, measure_boot};

const PCRS: [u32; 9] = [0, 1, 2, 3, 4, 5, 6, 7, 16];

fn swtpm(ek_cert: EkCert) -> Swtpm {
    Swtpm::start(SwtpmOptions { ek_cert, ca: None }).unwrap()
}

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/ovmf-swtpm")
}

fn has_tpm2_tools() -> bool {
    Command::new("tpm2_checkquote")
        .arg("--help")
        .output()
        .is_ok()
}

#[test]
fn quotes_from_a_real_tpm_verify_on_the_hub_and_changes_are_caught() {
    let tpm = swtpm(EkCert::Ecc);
    let mut dev = Device::open(&tpm.tcti()).unwrap();
    let ak = AkPublic::from_tpm2b_public(dev.ak_public()).unwrap();
    assert!(matches!(ak, AkPublic::EccP256 { .. }));

    let nonce: Vec<u8> = (0u8..32).collect();
    let q = dev.quote(&nonce, &PCRS).unwrap();
    assert_eq!(
        q.pcrs,
        dev.pcr_values(&PCRS).unwrap(),
        "returned PCRs are current"
    );
    let v = verify_quote(&ak, &q.quote.attest, &q.quote.signature, &nonce, &q.pcrs).unwrap();
    assert_eq!(v.pcrs, PCRS.to_vec());

    // A replay of this quote against a fresh nonce is refused.
    let fresh: Vec<u8> = (100u8..132).collect();
    assert_eq!(
        verify_quote(&ak, &q.quote.attest, &q.quote.signature, &fresh, &q.pcrs),
        Err(QuoteError::NonceMismatch)
    );

    // The box measures something new: the next quote no longer matches the old values,
    // and matches the new ones, which quote() returns.
    dev.extend_debug_pcr([7; 32]).unwrap();
    let q2 = dev.quote(&fresh, &PCRS).unwrap();
    assert_eq!(
        verify_quote(&ak, &q2.quote.attest, &q2.quote.signature, &fresh, &q.pcrs),
        Err(QuoteError::PcrMismatch)
    );
    assert_ne!(q2.pcrs[&16], q.pcrs[&16]);
    verify_quote(&ak, &q2.quote.attest, &q2.quote.signature, &fresh, &q2.pcrs).unwrap();

    // A nonce longer than the TPM takes is an error, not a panic.
    assert!(dev.quote(&[0; 65], &PCRS).is_err());

    // Independent check: tpm2_checkquote accepts our quote (when tpm2-tools is here).
    if has_tpm2_tools() {
        let dir = tempfile::tempdir().unwrap();
        let p = |f: &str| dir.path().join(f);
        std::fs::write(p("ak.pub"), dev.ak_public()).unwrap();
        std::fs::write(p("quote.msg"), &q2.quote.attest).unwrap();
        std::fs::write(p("quote.sig"), &q2.quote.signature).unwrap();
        let mut tampered = q2.quote.attest.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        std::fs::write(p("tampered.msg"), &tampered).unwrap();
        let checkquote_msg = |msg: &str, nonce: &[u8]| {
            Command::new("tpm2_checkquote")
                .arg("-u")
                .arg(p("ak.pub"))
                .arg("-m")
                .arg(p(msg))
                .arg("-s")
                .arg(p("quote.sig"))
                .args(["-g", "sha256", "-q", &hex::encode(nonce)])
                .env("TSS2_LOG", "all+NONE")
                .output()
                .unwrap()
        };
        let checkquote = |nonce: &[u8]| checkquote_msg("quote.msg", nonce);
        let ok = checkquote(&fresh);
        assert!(
            ok.status.success(),
            "tpm2_checkquote refused our quote: {}",
            String::from_utf8_lossy(&ok.stderr)
        );
        let bad = checkquote(&nonce);
        assert!(
            !bad.status.success(),
            "tpm2_checkquote accepted a wrong nonce"
        );
        // A tampered quote: refused by both.
        let bad = checkquote_msg("tampered.msg", &fresh);
        assert!(
            !bad.status.success(),
            "tpm2_checkquote accepted a tampered quote"
        );
        assert_eq!(
            verify_quote(&ak, &tampered, &q2.quote.signature, &fresh, &q2.pcrs),
            Err(QuoteError::BadSignature)
        );
    }
}

/// The hub's MakeCredential against a real TPM with an EK of each kind.
fn credential_round_trip(ek_cert: EkCert, algorithm: EkAlgorithm) {
    let tpm = swtpm(ek_cert);
    let mut dev = Device::open(&tpm.tcti()).unwrap();
    assert_eq!(dev.ek_algorithm(), algorithm);
    let secret = b"hub challenge 0123456789abcdef!!";
    let cred = make_credential(dev.ek_public(), dev.ak_public(), secret).unwrap();
    assert_eq!(
        dev.activate_credential(&cred.blob, &cred.secret).unwrap(),
        secret
    );
    // A fresh credential for the same keys works again (nothing stays loaded).
    let again = make_credential(dev.ek_public(), dev.ak_public(), b"x").unwrap();
    assert_eq!(
        dev.activate_credential(&again.blob, &again.secret).unwrap(),
        b"x"
    );

    // Another TPM (a cloned identity: same AK public, other EK) cannot recover it, and
    // this TPM cannot recover a credential made for another AK.
    let other_tpm = swtpm(ek_cert);
    let mut other = Device::open(&other_tpm.tcti()).unwrap();
    assert!(other.activate_credential(&cred.blob, &cred.secret).is_err());
    let for_other_ak = make_credential(dev.ek_public(), other.ak_public(), secret).unwrap();
    assert!(
        dev.activate_credential(&for_other_ak.blob, &for_other_ak.secret)
            .is_err()
    );

    // A tampered blob fails the TPM's integrity check.
    let mut bad = cred.blob.clone();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert!(dev.activate_credential(&bad, &cred.secret).is_err());
}

#[test]
fn a_credential_for_an_ecc_ek_is_recovered_only_by_the_tpm_holding_both_keys() {
    credential_round_trip(EkCert::Ecc, EkAlgorithm::EccP256);
}

#[test]
fn a_credential_for_an_rsa_ek_is_recovered_only_by_the_tpm_holding_both_keys() {
    credential_round_trip(EkCert::Rsa, EkAlgorithm::Rsa2048);
}

#[test]
fn make_credential_refuses_an_ek_it_cannot_serve() {
    if !has_tpm2_tools() {
        eprintln!("skipped: needs tpm2-tools to read the P-384 EK");
        return;
    }
    // swtpm_setup persists an ECC P-384 EK (high range: SHA-384, AES-256) at 0x81010016;
    // a credential for it would never activate, so the hub refuses to make one.
    let tpm = swtpm(EkCert::Rsa);
    let dir = tempfile::tempdir().unwrap();
    let p384 = dir.path().join("p384.pub");
    let out = Command::new("tpm2_readpublic")
        .args(["-c", "0x81010016", "-o"])
        .arg(&p384)
        .env("TPM2TOOLS_TCTI", tpm.tcti())
        .env("TSS2_LOG", "all+NONE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p384 = std::fs::read(&p384).unwrap();
    let dev = Device::open(&tpm.tcti()).unwrap();
    let err = make_credential(&p384, dev.ak_public(), b"secret").unwrap_err();
    assert!(err.to_string().contains("ECC"), "{err}");
    // An AK is not an EK either (a signing key, no symmetric algorithm for children).
    assert!(make_credential(dev.ak_public(), dev.ak_public(), b"secret").is_err());
}

#[test]
fn the_ek_is_chosen_by_the_certificates_in_nv() {
    for (ek_cert, algorithm, has_cert) in [
        (EkCert::Ecc, EkAlgorithm::EccP256, true),
        (EkCert::Rsa, EkAlgorithm::Rsa2048, true),
        (EkCert::None, EkAlgorithm::EccP256, false),
    ] {
        let tpm = swtpm(ek_cert);
        let dev = Device::open(&tpm.tcti()).unwrap();
        assert_eq!(dev.ek_algorithm(), algorithm, "{ek_cert:?}");
        assert_eq!(dev.ek_certificate().is_some(), has_cert, "{ek_cert:?}");
        let id = dev.identity();
        assert_eq!(id.kind, IdentityKind::Tpm);
        assert_eq!(id.ek_public, dev.ek_public());
        assert_eq!(id.ak_public, dev.ak_public());
        assert_eq!(id.ek_certificate.as_deref(), dev.ek_certificate());
    }

    // Forcing the other algorithm on a TPM with both certificates gives that EK and its
    // certificate.
    let tpm = swtpm(EkCert::Ecc);
    let config = DeviceConfig {
        ek: EkChoice::Rsa,
        ..DeviceConfig::default()
    };
    let dev = Device::open_with(&tpm.tcti(), &config).unwrap();
    assert_eq!(dev.ek_algorithm(), EkAlgorithm::Rsa2048);
    assert!(dev.ek_certificate().is_some());
}

#[test]
fn an_ek_certificate_for_another_key_is_refused_at_open() {
    if !has_tpm2_tools() {
        eprintln!("skipped: needs tpm2-tools to rewrite NV");
        return;
    }
    // Take the ECC EK certificate of one TPM and store it in another's NV, as a wrongly
    // provisioned (or tampered) TPM would have it.
    let donor_tpm = swtpm(EkCert::Ecc);
    let donor_cert = Device::open(&donor_tpm.tcti())
        .unwrap()
        .ek_certificate()
        .unwrap()
        .to_vec();
    let tpm = swtpm(EkCert::Ecc);
    let dir = tempfile::tempdir().unwrap();
    let cert_file = dir.path().join("cert.der");
    std::fs::write(&cert_file, &donor_cert).unwrap();
    let tool = |args: &[&str]| {
        let out = Command::new(args[0])
            .args(&args[1..])
            .env("TPM2TOOLS_TCTI", tpm.tcti())
            .env("TSS2_LOG", "all+NONE")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    tool(&["tpm2_nvundefine", "-C", "p", "0x01c0000a"]);
    let size = donor_cert.len().to_string();
    tool(&[
        "tpm2_nvdefine",
        "-C",
        "p",
        "-s",
        &size,
        "-a",
        "ppwrite|writedefine|ppread|ownerread|authread|no_da|platformcreate",
        "0x01c0000a",
    ]);
    tool(&[
        "tpm2_nvwrite",
        "-C",
        "p",
        "-i",
        cert_file.to_str().unwrap(),
        "0x01c0000a",
    ]);
    let err = Device::open(&tpm.tcti()).unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::EkCertificate {
                index: 0x01c0000a,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("another key"), "{err}");
}

#[test]
fn the_ak_survives_agent_restarts_and_reboots() {
    let mut tpm = swtpm(EkCert::Ecc);
    let (ak, ek) = {
        let mut dev = Device::open(&tpm.tcti()).unwrap();
        dev.extend_debug_pcr([1; 32]).unwrap();
        (dev.ak_public().to_vec(), dev.ek_public().to_vec())
    };
    // Agent restart: same AK.
    let reopened = Device::open(&tpm.tcti()).unwrap();
    assert_eq!(reopened.ak_public(), ak);
    drop(reopened);

    // Reboot: PCRs reset, the AK and EK are the same, quotes with it verify.
    tpm.restart().unwrap();
    let mut dev = Device::open(&tpm.tcti()).unwrap();
    assert_eq!(dev.ak_public(), ak);
    assert_eq!(dev.ek_public(), ek);
    assert_eq!(dev.pcr_values(&[16]).unwrap()[&16], [0; 32], "PCRs reset");
    let q = dev.quote(b"after reboot", &PCRS).unwrap();
    let key = AkPublic::from_tpm2b_public(&ak).unwrap();
    verify_quote(
        &key,
        &q.quote.attest,
        &q.quote.signature,
        b"after reboot",
        &q.pcrs,
    )
    .unwrap();
}

#[test]
fn an_object_that_is_not_an_ak_at_the_ak_handle_is_refused_and_kept() {
    // swtpm_setup persisted its RSA EK (a decryption key) at 0x81010001.
    let tpm = swtpm(EkCert::Rsa);
    let config = DeviceConfig {
        ak_handle: 0x8101_0001,
        ..DeviceConfig::default()
    };
    let err = Device::open_with(&tpm.tcti(), &config).unwrap_err();
    assert!(
        matches!(
            err,
            DeviceError::NotAnAk {
                handle: 0x8101_0001,
                ..
            }
        ),
        "{err}"
    );
    // Still refused (it was not evicted), and the default handle works.
    assert!(Device::open_with(&tpm.tcti(), &config).is_err());
    Device::open(&tpm.tcti()).unwrap();
}

#[test]
fn sealed_data_comes_back_only_on_its_own_tpm() {
    let mut tpm = swtpm(EkCert::None);
    let other_tpm = swtpm(EkCert::None);
    let small = b"0123456789abcdef0123456789abcdef".to_vec();
    let exactly_max = vec![0x5a; 128];
    // A TLS key as the agent would seal it: PKCS#8 is larger than a sealed object holds.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::EcdsaKeyPair::generate_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        &rng,
    )
    .unwrap()
    .as_ref()
    .to_vec();
    assert!(pkcs8.len() > 128);
    let large = vec![7u8; 4000];

    let mut blobs = Vec::new();
    {
        let mut dev = Device::open(&tpm.tcti()).unwrap();
        for data in [&small, &exactly_max, &pkcs8, &large] {
            let blob = dev.seal(data).unwrap().unwrap();
            assert!(
                !blob
                    .windows(data.len().min(16))
                    .any(|w| w == &data[..data.len().min(16)]),
                "the blob does not hold the data in clear"
            );
            assert_eq!(&dev.unseal(&blob).unwrap(), data);
            blobs.push((data.clone(), blob));
        }
        assert!(dev.seal(&vec![0; 64 * 1024 + 1]).is_err());
    }

    // After a reboot, the same TPM unseals them.
    tpm.restart().unwrap();
    let mut dev = Device::open(&tpm.tcti()).unwrap();
    for (data, blob) in &blobs {
        assert_eq!(&dev.unseal(blob).unwrap(), data);
    }

    // Another TPM cannot, and says why.
    let mut other = Device::open(&other_tpm.tcti()).unwrap();
    for (_, blob) in &blobs {
        let err = other.unseal(blob).unwrap_err();
        assert!(matches!(err, AttestError::Tpm(_)), "{err}");
        assert!(err.to_string().contains("sealed by another TPM"), "{err}");
    }

    // Altered blobs fail cleanly.
    let (_, envelope) = &blobs[2];
    let mut tampered = envelope.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(
        dev.unseal(&tampered)
            .unwrap_err()
            .to_string()
            .contains("altered")
    );
    for cut in [0, 3, 5, 40, envelope.len() - 1] {
        assert!(dev.unseal(&envelope[..cut]).is_err(), "cut at {cut}");
    }
    assert!(dev.unseal(b"garbage").is_err());
}

#[test]
fn the_event_log_is_read_from_the_configured_path() {
    let tpm = swtpm(EkCert::None);
    let log = fixtures().join("boot-a.eventlog");
    let open = |path: PathBuf| {
        let config = DeviceConfig {
            event_log_path: path,
            ..DeviceConfig::default()
        };
        Device::open_with(&tpm.tcti(), &config).unwrap()
    };
    let bytes = open(log.clone()).event_log().unwrap();
    assert_eq!(bytes, std::fs::read(&log).unwrap());
    // No log at all: empty, as on a platform that keeps none.
    let missing = open(PathBuf::from("/nonexistent/binary_bios_measurements"));
    let mut missing = missing;
    assert!(missing.event_log().unwrap().is_empty());
    // A log that exists but cannot be read is an error naming the path.
    let dir = tempfile::tempdir().unwrap();
    let err = open(dir.path().to_path_buf()).event_log().unwrap_err();
    assert!(matches!(err, AttestError::Log { .. }), "{err}");
    assert!(err.to_string().contains(&dir.path().display().to_string()));
}

fn expected_pcrs(name: &str) -> BTreeMap<u32, [u8; 32]> {
    std::fs::read_to_string(fixtures().join(format!("{name}.pcrs-sha256")))
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (i, h) = l.split_once(' ').unwrap();
            (
                i.parse().unwrap(),
                hex::decode(h.trim()).unwrap().try_into().unwrap(),
            )
        })
        .collect()
}

#[test]
fn a_real_boot_played_into_swtpm_gives_its_pcrs_and_verifies_as_evidence() {
    let mut tpm = swtpm(EkCert::Ecc);
    let log = std::fs::read(fixtures().join("boot-a.eventlog")).unwrap();
    measure_boot(&tpm.tcti(), &log).unwrap();

    let expected = expected_pcrs("boot-a");
    let pcrs: Vec<u32> = expected.keys().copied().collect();
    let config = DeviceConfig {
        event_log_path: fixtures().join("boot-a.eventlog"),
        ..DeviceConfig::default()
    };
    let mut dev = Device::open_with(&tpm.tcti(), &config).unwrap();
    let nonce = b"boot-a nonce";
    let q = dev.quote(nonce, &pcrs).unwrap();
    assert_eq!(
        q.pcrs, expected,
        "the TPM holds the PCRs of the recorded boot"
    );

    // The hub's whole check: quote, PCRs and log agree.
    let ak = AkPublic::from_tpm2b_public(dev.ak_public()).unwrap();
    let event_log = dev.event_log().unwrap();
    verify_evidence(&ak, &q.quote, &q.pcrs, nonce, &pcrs, &event_log).unwrap();

    // After a reboot without that firmware, the same log no longer explains the PCRs.
    drop(dev);
    tpm.restart().unwrap();
    let mut dev = Device::open_with(&tpm.tcti(), &config).unwrap();
    let q = dev.quote(nonce, &pcrs).unwrap();
    assert!(verify_evidence(&ak, &q.quote, &q.pcrs, nonce, &pcrs, &event_log).is_err());
}
