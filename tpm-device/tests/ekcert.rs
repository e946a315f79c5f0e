//! EK certificate verification (hub side, pure Rust) on certificates from real swtpm
//! provisioning: `swtpm_setup` + `swtpm_localca`, a per-test CA ([`TestCa`]). The
//! certificate a TPM holds verifies against its manufacturer's CA and for its own EK
//! only; another CA of the same name, another key, a date past expiry and garbage are
//! refused with errors that say which.
//! Needs the `testkit` feature (libtss2) and swtpm.
#![cfg(feature = "testkit")]
#![allow(clippy::unwrap_used, clippy::expect_used)]

use cairn_tpm::ekcert::{EkCertError, EkTrust, verify_ek_certificate};
use cairn_tpm_device::device::{Device, DeviceConfig, EkChoice};
use cairn_tpm_device::testkit::{EkCert, Swtpm, SwtpmOptions, TestCa};

/// 2030-01-01: within the validity of swtpm_localca's certificates (made now, valid to
/// 9999), whatever the machine's clock says.
const NOW: u64 = 1_893_456_000;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .max(NOW)
}

/// The EK certificate and EK public area `Device::open` reports with `choice`.
fn ek_of(tpm: &Swtpm, choice: EkChoice) -> (Vec<u8>, Vec<u8>) {
    let config = DeviceConfig {
        ek: choice,
        ..DeviceConfig::default()
    };
    let dev = Device::open_with(&tpm.tcti(), &config).unwrap();
    (
        dev.ek_certificate().expect("an EK certificate").to_vec(),
        dev.ek_public().to_vec(),
    )
}

#[test]
fn ek_certificates_of_a_provisioned_tpm_verify_against_its_ca_only() {
    let ca = TestCa::new().unwrap();
    let tpm = Swtpm::start(SwtpmOptions {
        ek_cert: EkCert::Ecc,
        ca: Some(ca.clone()),
    })
    .unwrap();
    let trust = EkTrust::from_pem(&tpm.ca_cert_pem().unwrap()).unwrap();
    assert_eq!(trust.len(), 2, "issuing CA and root");

    for choice in [EkChoice::Ecc, EkChoice::Rsa] {
        let (cert, ek) = ek_of(&tpm, choice);
        let info = verify_ek_certificate(&cert, &ek, &trust, now())
            .unwrap_or_else(|e| panic!("{choice:?}: {e}"));
        assert_eq!(info.issuer, "CN=swtpm-localca", "{choice:?}");
        assert_eq!(
            info.chain,
            vec!["CN=swtpm-localca", "CN=swtpm-localca-rootca"],
            "{choice:?}"
        );
        assert_eq!(info.tpm_manufacturer.as_deref(), Some("id:00001014"));
        assert_eq!(info.tpm_model.as_deref(), Some("swtpm"));
        assert_eq!(info.tpm_version.as_deref(), Some("id:20191023"));
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &cert)
            .as_ref()
            .try_into()
            .unwrap();
        assert_eq!(info.fingerprint_sha256, digest);
        assert!(!info.serial.is_empty());
    }

    // Trust given as DER works the same; the root alone is not enough (the TPM stores
    // only its own certificate, the issuing CA must be known), and naming it helps.
    let (cert, ek) = ek_of(&tpm, EkChoice::Ecc);
    let pem = |path: std::path::PathBuf| std::fs::read(path).unwrap();
    let mut der_trust = EkTrust::new();
    for p in [ca.issuer_cert_path(), ca.root_cert_path()] {
        let block = x509_parser::pem::parse_x509_pem(&pem(p)).unwrap().1;
        der_trust.add_der(&block.contents).unwrap();
    }
    verify_ek_certificate(&cert, &ek, &der_trust, now()).unwrap();
    let root_only = EkTrust::from_pem(&pem(ca.root_cert_path())).unwrap();
    let err = verify_ek_certificate(&cert, &ek, &root_only, now()).unwrap_err();
    assert_eq!(
        err,
        EkCertError::UntrustedIssuer {
            subject: err_subject(&err),
            issuer: "CN=swtpm-localca".into()
        }
    );
    assert!(err.to_string().contains("CN=swtpm-localca"), "{err}");
    // The issuing CA alone is not an anchor: the chain must end at a trusted root.
    let issuer_only = EkTrust::from_pem(&pem(ca.issuer_cert_path())).unwrap();
    let err = verify_ek_certificate(&cert, &ek, &issuer_only, now()).unwrap_err();
    assert!(
        matches!(&err, EkCertError::UntrustedIssuer { issuer, .. } if issuer == "CN=swtpm-localca-rootca"),
        "{err}"
    );
    assert!(
        verify_ek_certificate(&cert, &ek, &EkTrust::new(), now()).is_err(),
        "an empty trust store trusts nothing"
    );
}

fn err_subject(e: &EkCertError) -> String {
    match e {
        EkCertError::UntrustedIssuer { subject, .. } => subject.clone(),
        other => panic!("{other}"),
    }
}

#[test]
fn another_ca_with_the_same_names_is_not_trusted() {
    let tpm = Swtpm::start(SwtpmOptions::default()).unwrap();
    let (cert, ek) = ek_of(&tpm, EkChoice::Auto);
    // Every TestCa has the same subject names; only the keys differ.
    let impostor = TestCa::new().unwrap();
    let err = verify_ek_certificate(&cert, &ek, &impostor.trust().unwrap(), now()).unwrap_err();
    assert!(
        matches!(&err, EkCertError::BadSignature { issuer, .. } if issuer == "CN=swtpm-localca"),
        "{err}"
    );
    // Both CAs trusted: the right one is found.
    let mut both = impostor.trust().unwrap();
    both.add_pem(&tpm.ca_cert_pem().unwrap()).unwrap();
    verify_ek_certificate(&cert, &ek, &both, now()).unwrap();
}

#[test]
fn two_tpms_of_one_manufacturer_share_a_ca_and_keep_their_own_keys() {
    let ca = TestCa::new().unwrap();
    let start = |ek_cert| {
        Swtpm::start(SwtpmOptions {
            ek_cert,
            ca: Some(ca.clone()),
        })
        .unwrap()
    };
    let (a, b) = (start(EkCert::Ecc), start(EkCert::Rsa));
    let trust = ca.trust().unwrap();
    let (cert_a, ek_a) = ek_of(&a, EkChoice::Auto);
    let (cert_b, ek_b) = ek_of(&b, EkChoice::Auto);
    verify_ek_certificate(&cert_a, &ek_a, &trust, now()).unwrap();
    verify_ek_certificate(&cert_b, &ek_b, &trust, now()).unwrap();
    // A's certificate presented with B's EK (a genuine certificate, the wrong TPM).
    let err = verify_ek_certificate(&cert_a, &ek_b, &trust, now()).unwrap_err();
    assert!(matches!(err, EkCertError::KeyMismatch { .. }), "{err}");
}

#[test]
fn the_ecc_certificate_with_the_rsa_ek_public_is_a_key_mismatch() {
    let tpm = Swtpm::start(SwtpmOptions::default()).unwrap();
    let trust = EkTrust::from_pem(&tpm.ca_cert_pem().unwrap()).unwrap();
    let (ecc_cert, ecc_ek) = ek_of(&tpm, EkChoice::Ecc);
    let (rsa_cert, rsa_ek) = ek_of(&tpm, EkChoice::Rsa);
    let err = verify_ek_certificate(&ecc_cert, &rsa_ek, &trust, now()).unwrap_err();
    let EkCertError::KeyMismatch { cert_key, ek_key } = &err else {
        panic!("{err}");
    };
    assert!(cert_key.starts_with("ECC P-256"), "{cert_key}");
    assert!(ek_key.starts_with("RSA-2048"), "{ek_key}");
    assert!(err.to_string().contains("another key"), "{err}");
    let err = verify_ek_certificate(&rsa_cert, &ecc_ek, &trust, now()).unwrap_err();
    assert!(matches!(err, EkCertError::KeyMismatch { .. }), "{err}");
}

#[test]
fn an_expired_or_not_yet_valid_certificate_is_refused() {
    let tpm = Swtpm::start(SwtpmOptions::default()).unwrap();
    let trust = EkTrust::from_pem(&tpm.ca_cert_pem().unwrap()).unwrap();
    let (cert, ek) = ek_of(&tpm, EkChoice::Auto);
    // swtpm_localca's certificates end at 9999-12-31T23:59:59Z.
    let far_future = 253_402_300_800 + 86_400;
    let err = verify_ek_certificate(&cert, &ek, &trust, far_future).unwrap_err();
    assert!(
        matches!(&err, EkCertError::Expired { not_after_unix, .. } if *not_after_unix == 253_402_300_799),
        "{err}"
    );
    assert!(err.to_string().contains("expired"), "{err}");
    let err = verify_ek_certificate(&cert, &ek, &trust, 0).unwrap_err();
    assert!(matches!(err, EkCertError::NotYetValid { .. }), "{err}");
    assert!(
        verify_ek_certificate(&cert, &ek, &trust, u64::MAX).is_err(),
        "no overflow at the end of time"
    );
}

#[test]
fn garbage_and_damaged_certificates_fail_cleanly() {
    let tpm = Swtpm::start(SwtpmOptions::default()).unwrap();
    let trust = EkTrust::from_pem(&tpm.ca_cert_pem().unwrap()).unwrap();
    let (cert, ek) = ek_of(&tpm, EkChoice::Auto);

    for garbage in [
        Vec::new(),
        b"garbage".to_vec(),
        vec![0x30, 0x82, 0xff],
        vec![0xff; 700],
        cert[..cert.len() / 2].to_vec(),
    ] {
        let err = verify_ek_certificate(&garbage, &ek, &trust, now()).unwrap_err();
        assert!(matches!(err, EkCertError::Malformed { .. }), "{err}");
    }
    // Every truncation, and a flipped bit anywhere in the signed part: an error, never
    // a panic, never a success.
    for cut in 0..cert.len() {
        assert!(verify_ek_certificate(&cert[..cut], &ek, &trust, now()).is_err());
    }
    assert_eq!(
        &cert[4..6],
        &[0x30, 0x82],
        "TBSCertificate with a two-byte length"
    );
    let tbs_end = 8 + usize::from(u16::from_be_bytes([cert[6], cert[7]]));
    for i in (4..tbs_end).step_by(3) {
        let mut bad = cert.clone();
        bad[i] ^= 0x01;
        if let Ok(info) = verify_ek_certificate(&bad, &ek, &trust, now()) {
            panic!("a certificate with byte {i} altered verified: {info:?}");
        }
    }
    // NV padding after the DER is fine.
    let mut padded = cert.clone();
    padded.extend([0u8; 64]);
    verify_ek_certificate(&padded, &ek, &trust, now()).unwrap();
    // A garbage EK public area is malformed, not a mismatch.
    let err = verify_ek_certificate(&cert, b"\x00\x04abcd", &trust, now()).unwrap_err();
    assert!(matches!(err, EkCertError::Malformed { .. }), "{err}");
    // Trust stores refuse what is not a certificate.
    assert!(
        EkTrust::from_pem(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
            .is_err()
    );
    assert!(EkTrust::new().add_der(b"junk").is_err());
}
