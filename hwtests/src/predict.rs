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
