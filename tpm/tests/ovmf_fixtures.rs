//! Real event logs from OVMF + swtpm boots (`../shared/fixtures/ovmf-swtpm/`, made with
//! QEMU 7.2, OVMF 2022.11, swtpm 0.7.1; see its README): replaying each must give
//! exactly the PCR values the guest read from its TPM in the same boot.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use cairn_tpm::eventlog::{self, EventLogError, alg};
use proptest::prelude::*;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/fixtures/ovmf-swtpm")
}

fn expected(name: &str) -> Vec<(u32, Vec<u8>)> {
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.pcrs-sha256")))
        .unwrap_or_else(|e| panic!("fixture {name}: {e} (is ../shared beside the repo?)"));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let (i, h) = l.split_once(' ').unwrap();
            (i.parse().unwrap(), hex::decode(h.trim()).unwrap())
        })
        .collect()
}

#[test]
fn every_fixture_replays_to_its_pcrs() {
    for name in ["boot-a", "boot-b", "boot-uki", "boot-direct"] {
        let bytes = std::fs::read(fixtures().join(format!("{name}.eventlog"))).unwrap();
        let log = eventlog::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(log.algorithms, vec![(alg::SHA256, 32)], "{name}");
        let pcrs = log.replay(alg::SHA256).unwrap();
        for (i, want) in expected(name) {
            let got = pcrs.get(&i).cloned().unwrap_or_else(|| vec![0; 32]);
            assert_eq!(
                hex::encode(&got),
                hex::encode(&want),
                "{name}: PCR {i} does not replay"
            );
        }
    }
}

#[test]
fn boots_differ_where_the_readme_says() {
    let replay = |name: &str| {
        let bytes = std::fs::read(fixtures().join(format!("{name}.eventlog"))).unwrap();
        eventlog::parse(&bytes)
            .unwrap()
            .replay(alg::SHA256)
            .unwrap()
    };
    let (a, b) = (replay("boot-a"), replay("boot-b"));
    let differing: Vec<u32> = (0..24).filter(|i| a.get(i) != b.get(i)).collect();
    assert_eq!(
        differing,
        vec![9, 12],
        "only the kernel command line changed"
    );
}

#[test]
fn truncated_and_tampered_logs_are_errors() {
    let bytes = std::fs::read(fixtures().join("boot-a.eventlog")).unwrap();
    for cut in [0, 10, 40, 100, bytes.len() - 1] {
        assert!(
            matches!(
                eventlog::parse(&bytes[..cut]),
                Err(EventLogError::Truncated { .. } | EventLogError::NotCryptoAgile)
            ),
            "cut at {cut}"
        );
    }
    let mut not_agile = bytes.clone();
    not_agile[32] ^= 0xff; // inside "Spec ID Event03"
    assert_eq!(
        eventlog::parse(&not_agile),
        Err(EventLogError::NotCryptoAgile)
    );
    // A flipped digest byte still parses but no longer replays to the quoted PCRs.
    let log = eventlog::parse(&bytes).unwrap();
    let mut tampered = log.clone();
    let ev = tampered
        .events
        .iter_mut()
        .find(|e| e.pcr == 4 && e.event_type != eventlog::event_type::EV_NO_ACTION)
        .unwrap();
    ev.digests[0].1[0] ^= 1;
    assert_ne!(
        tampered.replay(alg::SHA256).unwrap()[&4],
        log.replay(alg::SHA256).unwrap()[&4]
    );
    assert!(matches!(
        log.replay(alg::SHA1),
        Err(EventLogError::UnknownAlgorithm { .. })
    ));
}

proptest! {
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        if let Ok(log) = eventlog::parse(&bytes) {
            let _ = log.replay(alg::SHA256);
        }
    }

    #[test]
    fn mutated_real_logs_never_panic(pos in any::<usize>(), val in any::<u8>()) {
        let mut bytes = std::fs::read(fixtures().join("boot-uki.eventlog")).unwrap();
        let i = pos % bytes.len();
        bytes[i] = val;
        if let Ok(log) = eventlog::parse(&bytes) {
            let _ = log.replay(alg::SHA256);
        }
    }
}
