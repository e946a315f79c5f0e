//! Quote verification against real quotes: made by swtpm with tpm2-tools
//! (`tests/fixtures/quotes/make.sh`, see the README there) and accepted by
//! `tpm2_checkquote`. Tampered quotes, wrong nonces, wrong PCR values and the wrong key
//! are refused, each with its own error.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use cairn_tpm::quote::{AkPublic, QuoteError, verify_quote};

struct Fixture {
    ak: AkPublic,
    msg: Vec<u8>,
    sig: Vec<u8>,
    nonce: Vec<u8>,
    pcrs: BTreeMap<u32, [u8; 32]>,
}

fn fixture(kind: &str) -> Fixture {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/quotes")
        .join(kind);
    let read = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let text = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let pcrs = text("pcrs.txt")
        .lines()
        .map(|l| {
            let (i, v) = l.split_once(':').unwrap();
            let v: [u8; 32] = hex::decode(v.trim()).unwrap().try_into().unwrap();
            (i.trim().parse().unwrap(), v)
        })
        .collect();
    Fixture {
        ak: AkPublic::from_tpm2b_public(&read("ak.pub")).unwrap(),
        msg: read("quote.msg"),
        sig: read("quote.sig"),
        nonce: hex::decode(text("nonce.hex").trim()).unwrap(),
        pcrs,
    }
}

#[test]
fn real_quotes_verify() {
    for kind in ["ecc", "rsa"] {
        let f = fixture(kind);
        let q = verify_quote(&f.ak, &f.msg, &f.sig, &f.nonce, &f.pcrs)
            .unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!(q.pcrs, vec![0, 1, 2, 3, 4, 5, 6, 7, 16], "{kind}");
        assert!(q.clock > 0, "{kind}");
    }
    assert!(matches!(fixture("ecc").ak, AkPublic::EccP256 { .. }));
    assert!(matches!(fixture("rsa").ak, AkPublic::Rsa { .. }));
}

#[test]
fn a_replayed_quote_answers_the_wrong_nonce() {
    for kind in ["ecc", "rsa"] {
        let f = fixture(kind);
        let mut fresh = f.nonce.clone();
        fresh[0] ^= 1;
        assert_eq!(
            verify_quote(&f.ak, &f.msg, &f.sig, &fresh, &f.pcrs),
            Err(QuoteError::NonceMismatch),
            "{kind}"
        );
    }
}

#[test]
fn unexpected_pcr_values_are_refused() {
    for kind in ["ecc", "rsa"] {
        let f = fixture(kind);
        let mut pcrs = f.pcrs.clone();
        pcrs.get_mut(&16).unwrap()[31] ^= 1;
        assert_eq!(
            verify_quote(&f.ak, &f.msg, &f.sig, &f.nonce, &pcrs),
            Err(QuoteError::PcrMismatch),
            "{kind}"
        );
        pcrs.remove(&7);
        assert_eq!(
            verify_quote(&f.ak, &f.msg, &f.sig, &f.nonce, &pcrs),
            Err(QuoteError::MissingPcr(7)),
            "{kind}"
        );
    }
}

#[test]
fn every_flipped_byte_of_the_quote_breaks_the_signature() {
    for kind in ["ecc", "rsa"] {
        let f = fixture(kind);
        for i in 0..f.msg.len() {
            let mut msg = f.msg.clone();
            msg[i] ^= 0x40;
            assert_eq!(
                verify_quote(&f.ak, &msg, &f.sig, &f.nonce, &f.pcrs),
                Err(QuoteError::BadSignature),
                "{kind}: byte {i}"
            );
        }
    }
}

#[test]
fn another_key_or_a_broken_signature_is_refused() {
    let ecc = fixture("ecc");
    let rsa = fixture("rsa");
    // The other key's signature type does not fit this key.
    assert!(matches!(
        verify_quote(&rsa.ak, &ecc.msg, &ecc.sig, &ecc.nonce, &ecc.pcrs),
        Err(QuoteError::UnsupportedSignature(_))
    ));
    // Truncated or garbage signatures and keys are malformed, not panics.
    for cut in 0..ecc.sig.len() {
        assert!(verify_quote(&ecc.ak, &ecc.msg, &ecc.sig[..cut], &ecc.nonce, &ecc.pcrs).is_err());
    }
    let pub_bytes = std::fs::read(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/quotes/ecc/ak.pub"),
    )
    .unwrap();
    for cut in 0..pub_bytes.len() {
        assert!(
            AkPublic::from_tpm2b_public(&pub_bytes[..cut]).is_err(),
            "cut {cut}"
        );
    }
    let mut sig = ecc.sig.clone();
    let last = sig.len() - 1;
    sig[last] ^= 1;
    assert_eq!(
        verify_quote(&ecc.ak, &ecc.msg, &sig, &ecc.nonce, &ecc.pcrs),
        Err(QuoteError::BadSignature)
    );
}
