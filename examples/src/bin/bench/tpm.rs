//! The `tpm` section: quote verifications per second on one core with real swtpm quotes,
//! and the whole evidence check (quote, PCR values, event-log replay) per session.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::{Row, row};

/// Quote verifications per second on one core, with real quotes from swtpm (the
/// fixtures of `tpm/tests/quotes.rs`): signature, nonce and PCR digest each time.
pub(crate) fn quotes(rows: &mut Vec<Row>) -> Result<()> {
    use cairn_tpm::quote::{AkPublic, verify_quote};
    macro_rules! fixture {
        ($kind:literal, $file:literal) => {
            include_bytes!(concat!(
                "../../../../tpm/tests/fixtures/quotes/",
                $kind,
                "/",
                $file
            ))
        };
    }
    struct Case {
        name: &'static str,
        ak: &'static [u8],
        msg: &'static [u8],
        sig: &'static [u8],
        nonce: &'static str,
        pcrs: &'static str,
    }
    let cases = [
        Case {
            name: "ECDSA P-256",
            ak: fixture!("ecc", "ak.pub"),
            msg: fixture!("ecc", "quote.msg"),
            sig: fixture!("ecc", "quote.sig"),
            nonce: include_str!("../../../../tpm/tests/fixtures/quotes/ecc/nonce.hex"),
            pcrs: include_str!("../../../../tpm/tests/fixtures/quotes/ecc/pcrs.txt"),
        },
        Case {
            name: "RSA-2048",
            ak: fixture!("rsa", "ak.pub"),
            msg: fixture!("rsa", "quote.msg"),
            sig: fixture!("rsa", "quote.sig"),
            nonce: include_str!("../../../../tpm/tests/fixtures/quotes/rsa/nonce.hex"),
            pcrs: include_str!("../../../../tpm/tests/fixtures/quotes/rsa/pcrs.txt"),
        },
    ];
    for Case {
        name,
        ak,
        msg,
        sig,
        nonce,
        pcrs,
    } in cases
    {
        let ak = AkPublic::from_tpm2b_public(ak)?;
        let nonce = hex::decode(nonce.trim())?;
        let mut expected = std::collections::BTreeMap::new();
        for line in pcrs.lines() {
            let (i, v) = line.split_once(':').context("pcrs.txt line")?;
            let v: [u8; 32] = hex::decode(v.trim())?
                .try_into()
                .map_err(|_| anyhow::anyhow!("PCR value is not 32 bytes"))?;
            expected.insert(i.trim().parse::<u32>()?, v);
        }
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(2) {
            verify_quote(&ak, msg, sig, &nonce, &expected)?;
            n += 1;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        rows.push(row(
            &format!("hub quote verification, {name} AK (one thread)"),
            format!("{rate:.0} quotes/s"),
            ">= 2,000 quotes/s per core",
            "real swtpm quotes; signature + nonce + PCR digest per verification".into(),
        ));
    }
    evidence(rows)
}

/// What a session's attestation costs the hub beyond the quote: parsing and replaying
/// a real firmware event log, and the whole `verify_evidence` (quote, PCR values, log)
/// as the hub runs it for every session.
fn evidence(rows: &mut Vec<Row>) -> Result<()> {
    use cairn_tpm::attest::{Attester, verify_evidence};
    use cairn_tpm::eventlog::{alg, parse};
    use cairn_tpm::quote::AkPublic;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/ovmf-swtpm/boot-a.eventlog");
    let log = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let events = parse(&log)?.events.len();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        parse(&log)?.replay(alg::SHA256)?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    rows.push(row(
        "hub event-log parse + replay, real OVMF boot (one thread)",
        format!("{rate:.0} logs/s"),
        "",
        format!(
            "boot-a of ../shared/fixtures/ovmf-swtpm: {} KB, {events} events",
            log.len() / 1024
        ),
    ));

    let mut tpm = cairn_tpm::soft::SoftTpm::ephemeral(1, "bench");
    let pcrs: Vec<u32> = (0..=15).collect();
    let nonce = [7u8; 32];
    let quoted = tpm.quote(&nonce, &pcrs)?;
    let log = tpm.event_log()?;
    let ak = AkPublic::from_tpm2b_public(&tpm.identity().ak_public)?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        verify_evidence(&ak, &quoted.quote, &quoted.pcrs, &nonce, &pcrs, &log)?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    rows.push(row(
        "hub evidence verification, ECDSA P-256 AK (one thread)",
        format!("{rate:.0} sessions/s"),
        ">= 2,000 quotes/s per core",
        format!(
            "software-TPM quote over PCRs 0-15 + its {}-event log replayed and compared, as per session",
            parse(&log)?.events.len()
        ),
    ));
    Ok(())
}
