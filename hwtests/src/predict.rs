//! Predicting the PCRs a release will measure.
//!
//! On these images the firmware measures two boot applications into PCR 4: the boot
//! loader (systemd-boot, the same in every release) and the slot's unified kernel
//! image. Everything else in PCRs 0-7 (firmware, its configuration, the GPT, Secure
//! Boot state) belongs to the box, not to the release. So a release's PCR 4 is the
//! reference boot's event log replayed with the old UKI's digest replaced by the new
//! one's: the same calculation `systemd-measure` makes for PCR 11, done for PCR 4.

use std::collections::BTreeMap;

use anyhow::{Result, bail};
use cairn_tpm::eventlog::{self, EventLog};

const EV_EFI_BOOT_SERVICES_APPLICATION: u32 = 0x8000_0003;

/// PCR values (sha256 bank) of `reference` (an event log of a boot of the release
/// whose UKI has Authenticode digest `old_uki`), had it booted the UKI with digest
/// `new_uki` instead. Only the PCRs that change are returned.
pub fn with_uki(
    reference: &[u8],
    old_uki: &[u8; 32],
    new_uki: &[u8; 32],
) -> Result<BTreeMap<u32, [u8; 32]>> {
    let log: EventLog = eventlog::parse(reference)?;
    let before = log.replay(eventlog::alg::SHA256)?;
    let mut patched = log.clone();
    let mut hits = 0;
    for e in &mut patched.events {
        if e.pcr == 4 && e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION {
            for (alg, d) in &mut e.digests {
                if *alg == eventlog::alg::SHA256 && d.as_slice() == old_uki {
                    *d = new_uki.to_vec();
                    hits += 1;
                }
            }
        }
    }
    if hits == 0 {
        bail!(
            "the reference event log loads no boot application with digest {}: it is not a boot of that image's UKI",
            hex::encode(old_uki)
        );
    }
    let after = patched.replay(eventlog::alg::SHA256)?;
    let mut out = BTreeMap::new();
    for (pcr, v) in after {
        if before.get(&pcr) != Some(&v) {
            let arr: [u8; 32] = v
                .as_slice()
                .try_into()
                .map_err(|_| anyhow::anyhow!("PCR {pcr} is not a sha256 value"))?;
            out.insert(pcr, arr);
        }
    }
    Ok(out)
}

/// Every PCR of the sha256 bank that `log` replays to.
pub fn replay(log: &[u8]) -> Result<BTreeMap<u32, [u8; 32]>> {
    let log = eventlog::parse(log)?;
    let mut out = BTreeMap::new();
    for (pcr, v) in log.replay(eventlog::alg::SHA256)? {
        if let Ok(arr) = <[u8; 32]>::try_from(v.as_slice()) {
            out.insert(pcr, arr);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn fixture(name: &str) -> Vec<u8> {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../shared/fixtures/ovmf-swtpm")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    fn pcr_file(name: &str) -> BTreeMap<u32, String> {
        String::from_utf8(fixture(name))
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(i, v)| (i.parse().unwrap(), v.trim().to_lowercase()))
            .collect()
    }

    /// The last boot application in PCR 4 of a real OVMF log: the UKI.
    fn last_app(log: &[u8]) -> [u8; 32] {
        let log = eventlog::parse(log).unwrap();
        let e = log
            .events
            .iter()
            .rfind(|e| e.pcr == 4 && e.event_type == EV_EFI_BOOT_SERVICES_APPLICATION)
            .unwrap();
        e.digest(eventlog::alg::SHA256).unwrap().try_into().unwrap()
    }

    #[test]
    fn a_real_log_replays_to_its_pcrs() {
        let pcrs = replay(&fixture("boot-uki.eventlog")).unwrap();
        for (i, v) in pcr_file("boot-uki.pcrs-sha256") {
            if let Some(ours) = pcrs.get(&i) {
                assert_eq!(hex::encode(ours), v, "PCR {i}");
            }
        }
    }

    #[test]
    fn swapping_the_uki_changes_pcr_4_only_and_as_the_tpm_would() {
        let log = fixture("boot-uki.eventlog");
        let old = last_app(&log);
        let new = [0x5a; 32];
        let p = with_uki(&log, &old, &new).unwrap();
        assert_eq!(p.keys().copied().collect::<Vec<_>>(), vec![4]);
        // Independently: PCR 4 is the extend chain of its events, the last one swapped.
        let parsed = eventlog::parse(&log).unwrap();
        let mut pcr = [0u8; 32];
        for e in parsed
            .events
            .iter()
            .filter(|e| e.pcr == 4 && e.event_type != 3)
        {
            let d = e.digest(eventlog::alg::SHA256).unwrap();
            let d = if d == old { &new[..] } else { d };
            let mut h = Sha256::new();
            h.update(pcr);
            h.update(d);
            pcr = h.finalize().into();
        }
        assert_eq!(p[&4], pcr);
        // Swapping for itself predicts the PCR the log already has.
        assert!(with_uki(&log, &old, &old).unwrap().is_empty());
    }

    #[test]
    fn a_log_of_another_image_is_refused() {
        let e = with_uki(&fixture("boot-uki.eventlog"), &[1; 32], &[2; 32]).unwrap_err();
        assert!(e.to_string().contains("not a boot of that image"), "{e}");
    }
}
