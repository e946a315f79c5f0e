//! The software TPM against the hub's own verification code: its quotes, event logs
//! and credential activation must pass exactly the checks a real TPM's pass, and fail
//! them the same way when something is wrong (wrong nonce, altered quote, unlogged
//! extend, credential for another device).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use cairn_tpm::attest::{
    AttestError, Attester, EvidenceError, IdentityKind, Quoted, measured, verify_evidence,
};
use cairn_tpm::credential::{make_credential, object_name};
use cairn_tpm::eventlog::{self, alg};
use cairn_tpm::quote::{AkPublic, QuoteError, verify_quote};
use cairn_tpm::soft::{FIRMWARE_VERSION, SoftTpm, SoftTpmError, boot_image_digest};
use tpm2_protocol::data::{TpmsAttest, TpmtPublic, TpmtSignature};
use tpm2_protocol::{TpmMarshal, TpmUnmarshal, TpmWriter};

const IMAGE: &str = "cairn-os 1.4.2 (slot A)";
const FIRMWARE: [u32; 8] = [0, 1, 2, 3, 4, 5, 6, 7];

fn ak(tpm: &SoftTpm) -> AkPublic {
    AkPublic::from_tpm2b_public(&tpm.identity().ak_public).unwrap()
}

fn quote(tpm: &mut SoftTpm, nonce: &[u8], pcrs: &[u32]) -> Quoted {
    tpm.quote(nonce, pcrs).unwrap()
}

fn evidence(tpm: &mut SoftTpm, nonce: &[u8], pcrs: &[u32]) -> Result<(), EvidenceError> {
    let q = quote(tpm, nonce, pcrs);
    let log = tpm.event_log().unwrap();
    verify_evidence(&ak(tpm), &q.quote, &q.pcrs, nonce, pcrs, &log).map(|_| ())
}

/// Marshals with tpm2-protocol what it unmarshalled: the same bytes if ours are canonical.
fn remarshal<T: TpmUnmarshal + TpmMarshal>(bytes: &[u8]) -> Vec<u8> {
    let (value, rest) = T::unmarshal(bytes).unwrap();
    assert!(rest.is_empty());
    let mut buf = vec![0u8; 4096];
    let mut w = TpmWriter::new(&mut buf);
    value.marshal(&mut w).unwrap();
    let n = w.len();
    buf.truncate(n);
    buf
}

#[test]
fn quotes_verify_with_the_hub_code() {
    let mut tpm = SoftTpm::ephemeral(1, IMAGE);
    tpm.set_clock_ms(123_456);
    let nonce = [0x5a; 32];
    let asked = [0, 1, 2, 3, 4, 5, 6, 7, 16];
    let q = quote(&mut tpm, &nonce, &asked);
    assert_eq!(q.pcrs.keys().copied().collect::<Vec<_>>(), asked);
    let v = verify_quote(
        &ak(&tpm),
        &q.quote.attest,
        &q.quote.signature,
        &nonce,
        &q.pcrs,
    )
    .unwrap();
    assert_eq!(v.pcrs, asked);
    assert_eq!(
        (v.clock, v.reset_count, v.restart_count, v.firmware_version),
        (123_456, 0, 0, FIRMWARE_VERSION)
    );
    let log = tpm.event_log().unwrap();
    let verified = verify_evidence(&ak(&tpm), &q.quote, &q.pcrs, &nonce, &asked, &log).unwrap();
    let log = verified.log.unwrap();
    assert!(
        measured(&log, 4).contains(&(0x8000_0003, boot_image_digest(IMAGE).to_vec())),
        "the boot image is measured into PCR 4"
    );

    // Byte-exact wire structures: tpm2-protocol marshals them back identically.
    assert_eq!(remarshal::<TpmsAttest>(&q.quote.attest), q.quote.attest);
    assert_eq!(
        remarshal::<TpmtSignature>(&q.quote.signature),
        q.quote.signature
    );
    let (attest, _) = TpmsAttest::unmarshal(&q.quote.attest).unwrap();
    assert!(attest.clock_info.safe.0, "safe = YES");
    assert_eq!(
        attest.qualified_signer.as_ref().len(),
        34,
        "sha256 qualified name"
    );

    // Also a quote with no PCRs and with a 64-byte nonce.
    let q = quote(&mut tpm, &[7; 64], &[]);
    verify_quote(
        &ak(&tpm),
        &q.quote.attest,
        &q.quote.signature,
        &[7; 64],
        &q.pcrs,
    )
    .unwrap();
}

#[test]
fn a_wrong_nonce_is_refused() {
    let mut tpm = SoftTpm::ephemeral(2, IMAGE);
    let q = quote(&mut tpm, b"fresh nonce", &FIRMWARE);
    assert_eq!(
        verify_quote(
            &ak(&tpm),
            &q.quote.attest,
            &q.quote.signature,
            b"other nonce",
            &q.pcrs
        ),
        Err(QuoteError::NonceMismatch)
    );
    let log = tpm.event_log().unwrap();
    assert!(matches!(
        verify_evidence(&ak(&tpm), &q.quote, &q.pcrs, b"other", &FIRMWARE, &log),
        Err(EvidenceError::Quote(QuoteError::NonceMismatch))
    ));
}

#[test]
fn a_tampered_quote_is_refused() {
    let mut tpm = SoftTpm::ephemeral(3, IMAGE);
    let nonce = [1u8; 20];
    let q = quote(&mut tpm, &nonce, &FIRMWARE);
    let key = ak(&tpm);
    for i in 0..q.quote.attest.len() {
        let mut attest = q.quote.attest.clone();
        attest[i] ^= 0x01;
        assert_eq!(
            verify_quote(&key, &attest, &q.quote.signature, &nonce, &q.pcrs),
            Err(QuoteError::BadSignature),
            "attest byte {i} flipped"
        );
    }
    let mut signature = q.quote.signature.clone();
    let last = signature.len() - 1;
    signature[last] ^= 0x01;
    assert_eq!(
        verify_quote(&key, &q.quote.attest, &signature, &nonce, &q.pcrs),
        Err(QuoteError::BadSignature)
    );
    // Another device's AK does not verify it either.
    let other = ak(&SoftTpm::ephemeral(4, IMAGE));
    assert_eq!(
        verify_quote(&other, &q.quote.attest, &q.quote.signature, &nonce, &q.pcrs),
        Err(QuoteError::BadSignature)
    );
}

#[test]
fn an_unlogged_extend_is_a_log_mismatch() {
    let digest = boot_image_digest("rootkit");
    // Logged extends of a firmware PCR and of PCR 16 still verify.
    let mut tpm = SoftTpm::ephemeral(5, IMAGE);
    tpm.extend(16, digest, true).unwrap();
    tpm.extend(4, digest, true).unwrap();
    let asked = [0, 1, 2, 3, 4, 5, 6, 7, 16];
    evidence(&mut tpm, b"n", &asked).unwrap();

    // An unlogged extend of a firmware PCR: the log no longer explains the quote.
    let mut tpm = SoftTpm::ephemeral(5, IMAGE);
    tpm.extend(4, digest, false).unwrap();
    match evidence(&mut tpm, b"n", &FIRMWARE) {
        Err(EvidenceError::LogMismatch { pcr: 4, .. }) => {}
        other => panic!("expected a PCR 4 mismatch, got {other:?}"),
    }
    // Same for a PCR the log has events for.
    let mut tpm = SoftTpm::ephemeral(5, IMAGE);
    tpm.extend(16, digest, true).unwrap();
    tpm.extend(16, digest, false).unwrap();
    match evidence(&mut tpm, b"n", &asked) {
        Err(EvidenceError::LogMismatch { pcr: 16, .. }) => {}
        other => panic!("expected a PCR 16 mismatch, got {other:?}"),
    }
    // Lying about PCR values to match the log breaks the quote instead.
    let mut tpm = SoftTpm::ephemeral(5, IMAGE);
    let clean = SoftTpm::ephemeral(6, IMAGE).pcrs()[4];
    tpm.extend(4, digest, false).unwrap();
    let mut q = quote(&mut tpm, b"n", &FIRMWARE);
    q.pcrs.insert(4, clean);
    let log = tpm.event_log().unwrap();
    assert!(matches!(
        verify_evidence(&ak(&tpm), &q.quote, &q.pcrs, b"n", &FIRMWARE, &log),
        Err(EvidenceError::Quote(QuoteError::PcrMismatch))
    ));
    assert!(matches!(
        tpm.extend(24, digest, true),
        Err(SoftTpmError::NoSuchPcr(24))
    ));
}

#[test]
fn the_event_log_replays_to_the_pcrs() {
    let mut tpm = SoftTpm::ephemeral(7, IMAGE);
    let log = eventlog::parse(&tpm.event_log().unwrap()).unwrap();
    assert_eq!(log.algorithms, vec![(alg::SHA256, 32)]);
    let replayed = log.replay(alg::SHA256).unwrap();
    assert_eq!(replayed.keys().copied().collect::<Vec<_>>(), FIRMWARE);
    for (pcr, value) in tpm.pcrs().iter().enumerate() {
        match replayed.get(&(pcr as u32)) {
            Some(v) => assert_eq!(v.as_slice(), value, "PCR {pcr}"),
            None => assert_eq!(value, &[0; 32], "PCR {pcr}"),
        }
    }
    // Another boot image changes PCR 4 only.
    let other = SoftTpm::ephemeral(7, "cairn-os 1.5.0 (slot B)");
    for pcr in 0..24 {
        assert_eq!(tpm.pcrs()[pcr] == other.pcrs()[pcr], pcr != 4, "PCR {pcr}");
    }
    // A reboot into the other image gives that boot's PCRs and log.
    tpm.extend(9, [1; 32], true).unwrap();
    tpm.reboot("cairn-os 1.5.0 (slot B)").unwrap();
    assert_eq!(tpm.pcrs(), other.pcrs());
    assert_eq!(tpm.reset_count(), 1);
    let mut other = other;
    assert_eq!(tpm.event_log().unwrap(), other.event_log().unwrap());
    let q = quote(&mut tpm, b"n", &FIRMWARE);
    let v = verify_quote(
        &ak(&tpm),
        &q.quote.attest,
        &q.quote.signature,
        b"n",
        &q.pcrs,
    )
    .unwrap();
    assert_eq!(v.reset_count, 1);
}

#[test]
fn credentials_activate_only_on_their_device() {
    let mut tpm = SoftTpm::ephemeral(8, IMAGE);
    let other = SoftTpm::ephemeral(9, IMAGE);
    let id = tpm.identity().clone();
    let secret = b"0123456789abcdef0123456789abcdef";

    let c = make_credential(&id.ek_public, &id.ak_public, secret).unwrap();
    assert_eq!(tpm.activate_credential(&c.blob, &c.secret).unwrap(), secret);
    let c1 = make_credential(&id.ek_public, &id.ak_public, b"x").unwrap();
    assert_eq!(tpm.activate_credential(&c1.blob, &c1.secret).unwrap(), b"x");

    let integrity = |r: Result<Vec<u8>, AttestError>| match r {
        Err(AttestError::Tpm(m)) => assert!(m.contains("TPM_RC_INTEGRITY"), "{m}"),
        other => panic!("expected an integrity failure, got {other:?}"),
    };
    // Made for another device's EK, or for another AK.
    let c2 = make_credential(&other.identity().ek_public, &id.ak_public, secret).unwrap();
    integrity(tpm.activate_credential(&c2.blob, &c2.secret));
    let c3 = make_credential(&id.ek_public, &other.identity().ak_public, secret).unwrap();
    integrity(tpm.activate_credential(&c3.blob, &c3.secret));

    // Any flipped byte of the blob after its size, or of the ephemeral point, fails.
    for i in 2..c.blob.len() {
        let mut blob = c.blob.clone();
        blob[i] ^= 0x80;
        assert!(
            tpm.activate_credential(&blob, &c.secret).is_err(),
            "blob byte {i}"
        );
    }
    for i in 0..c.secret.len() {
        let mut s = c.secret.clone();
        s[i] ^= 0x01;
        assert!(
            tpm.activate_credential(&c.blob, &s).is_err(),
            "secret byte {i}"
        );
    }
    assert!(tpm.activate_credential(&[], &[]).is_err());
}

#[test]
fn public_areas_are_shaped_like_a_real_tpm_s() {
    let tpm = SoftTpm::ephemeral(10, IMAGE);
    let id = tpm.identity();
    assert_eq!(id.kind, IdentityKind::Software);
    assert_eq!(id.ek_certificate, None);

    // The AK has the layout of tpm2_createak -G ecc -g sha256 -s ecdsa on swtpm
    // (the fixture), only the point differs.
    let fixture = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quotes/ecc/ak.pub"),
    )
    .unwrap();
    assert_eq!(id.ak_public.len(), fixture.len());
    assert_eq!(id.ak_public[..24], fixture[..24]);
    assert_eq!(id.ak_public[56..58], fixture[56..58]);

    // The EK is the TCG default ECC EK template (EK Credential Profile, L-2) with its
    // point in `unique`.
    let template = concat!(
        "0023000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b33",
        "1469aa0006008000430010000300100020"
    );
    let ek = &id.ek_public;
    assert_eq!(u16::from_be_bytes([ek[0], ek[1]]) as usize, ek.len() - 2);
    assert_eq!(hex::encode(&ek[2..2 + template.len() / 2]), template);
    assert_eq!(ek.len(), 2 + template.len() / 2 + 32 + 2 + 32);
    assert!(matches!(
        AkPublic::from_tpm2b_public(ek).unwrap(),
        AkPublic::EccP256 { .. }
    ));
    for public in [&id.ek_public, &id.ak_public] {
        assert_eq!(remarshal::<TpmtPublic>(&public[2..]), public[2..]);
        assert_eq!(object_name(public).unwrap().len(), 34);
    }
}

#[test]
fn ephemeral_tpms_are_deterministic() {
    let (mut a, mut b) = (SoftTpm::ephemeral(11, IMAGE), SoftTpm::ephemeral(11, IMAGE));
    assert_eq!(a.identity(), b.identity());
    a.set_clock_ms(5_000);
    b.set_clock_ms(5_000);
    assert_eq!(
        quote(&mut a, b"n", &FIRMWARE),
        quote(&mut b, b"n", &FIRMWARE)
    );
    let c = SoftTpm::ephemeral(12, IMAGE);
    assert_ne!(a.identity().ek_public, c.identity().ek_public);
    assert_ne!(a.identity().ak_public, c.identity().ak_public);
    // The clock never goes back.
    a.set_clock_ms(1_000);
    assert_eq!(a.clock_ms(), 5_000);
}

#[test]
fn load_or_create_keeps_the_identity_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("soft-tpm");
    let first = SoftTpm::load_or_create(&path, IMAGE).unwrap();
    assert_eq!(first.reset_count(), 0);
    let identity = first.identity().clone();
    drop(first);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    let mut second = SoftTpm::load_or_create(&path, IMAGE).unwrap();
    assert_eq!(second.identity(), &identity);
    assert_eq!(second.reset_count(), 1);
    let q = quote(&mut second, b"n", &FIRMWARE);
    let v = verify_quote(
        &ak(&second),
        &q.quote.attest,
        &q.quote.signature,
        b"n",
        &q.pcrs,
    )
    .unwrap();
    assert_eq!(v.reset_count, 1);
    // A credential made for the first run's keys activates after the restart.
    let c = make_credential(&identity.ek_public, &identity.ak_public, b"s").unwrap();
    assert_eq!(
        second.activate_credential(&c.blob, &c.secret).unwrap(),
        b"s"
    );
    second.reboot(IMAGE).unwrap();
    drop(second);
    let third = SoftTpm::load_or_create(&path, "cairn-os 2.0").unwrap();
    assert_eq!(third.reset_count(), 3);
    assert_eq!(third.identity(), &identity);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(leftovers.len(), 1, "no temporary file left behind");

    // Another file, another device.
    let elsewhere = SoftTpm::load_or_create(&dir.path().join("other"), IMAGE).unwrap();
    assert_ne!(elsewhere.identity().ek_public, identity.ek_public);

    // A damaged state file is an error, not a silent new identity.
    std::fs::write(&path, "cairn-soft-tpm 1\nek_seed zz\n").unwrap();
    let err = SoftTpm::load_or_create(&path, IMAGE).unwrap_err();
    assert!(matches!(err, SoftTpmError::CorruptState { .. }), "{err}");
    assert!(err.to_string().contains("remove it"), "{err}");
}

#[test]
fn bad_requests_fail_like_a_tpm() {
    let mut tpm = SoftTpm::ephemeral(13, IMAGE);
    assert!(matches!(
        tpm.quote(&[0; 65], &FIRMWARE),
        Err(AttestError::Tpm(_))
    ));
    assert!(matches!(tpm.quote(b"n", &[24]), Err(AttestError::Tpm(_))));
    assert_eq!(tpm.seal(b"secret").unwrap(), None);
    assert!(matches!(
        tpm.unseal(b"blob"),
        Err(AttestError::Unsupported(_))
    ));
    // Duplicates in the selection are one PCR, as in a TPM's bitmap.
    let q = quote(&mut tpm, b"n", &[3, 1, 3]);
    assert_eq!(q.pcrs.keys().copied().collect::<Vec<_>>(), vec![1, 3]);
}

#[test]
fn cost_of_creating_and_quoting() {
    const N: u32 = 2_000;
    let t = Instant::now();
    let mut fleet: Vec<SoftTpm> = (0..N)
        .map(|i| SoftTpm::ephemeral(u64::from(i), IMAGE))
        .collect();
    let create = t.elapsed() / N;
    let t = Instant::now();
    for tpm in &fleet[..200] {
        std::hint::black_box(tpm.identity());
    }
    let keys = t.elapsed() / 200;
    let t = Instant::now();
    for tpm in &mut fleet[..200] {
        std::hint::black_box(tpm.quote(&[0; 32], &FIRMWARE).unwrap());
    }
    let quote = t.elapsed() / 200;
    let tpm = &mut fleet[0];
    let id = tpm.identity().clone();
    let c = make_credential(&id.ek_public, &id.ak_public, &[9; 32]).unwrap();
    let t = Instant::now();
    for _ in 0..50 {
        std::hint::black_box(tpm.activate_credential(&c.blob, &c.secret).unwrap());
    }
    let activate = t.elapsed() / 50;
    let dir = tempfile::tempdir().unwrap();
    let t = Instant::now();
    let _ = SoftTpm::load_or_create(&dir.path().join("s"), IMAGE).unwrap();
    let persistent = t.elapsed();
    println!(
        "soft TPM costs: create {create:?}, first identity (key derivation) {keys:?}, \
         quote {quote:?}, activate_credential {activate:?}, load_or_create (new file) {persistent:?}"
    );
}
