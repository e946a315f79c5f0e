//! A/B upgrades through a real hub, as an operator runs them: `cairn-hub release
//! keygen/key add/build/push`, `os set`; a real `cairn-agent run` on a simulated box
//! (file-backed slots) downloads over its QUIC connection, reboots (the machine loop
//! plays the firmware), and the hub shows committed — or, for a broken release,
//! "rolled back: <reason>". An agent SIGKILLed during the upgrade goes on.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::time::Duration;

use cairn_agent::upgrade::REBOOT_EXIT_CODE;
use cairn_agent::upgrade::boot::Slot;
use cairn_e2e::abox::{SimBox, mutate_blocks, random_image};
use cairn_e2e::{Agent, Hub, wait_for};
use cairn_hub::api::ReleaseStatus;
use cairn_hub::store::UpgradeStatus;

const IMAGE: usize = 8 << 20;

/// The device's latest upgrade report, as the hub shows it.
fn upgrade(hub: &Hub, id: &str) -> Option<UpgradeStatus> {
    hub.device(id).device.record.upgrade
}

/// Waits for the agent to stop for a reboot, then boots the box and starts it again.
fn reboot_when_asked(agent: &mut Agent, sim: &SimBox, what: &str) -> Slot {
    wait_for(what, Duration::from_secs(90), || agent.exited().is_some());
    assert_eq!(
        agent.exited(),
        Some(REBOOT_EXIT_CODE),
        "{what}: the agent stopped without asking for a reboot:\n{}",
        agent.log_tail()
    );
    let (slot, panicked) = sim.power_on();
    let slot = if panicked { sim.power_on().0 } else { slot };
    agent.start_again();
    slot
}

fn build(hub: &Hub, dir: &Path, key: &Path, version: &str, image: &[u8]) -> String {
    let img = dir.join(format!("os-{version}.img"));
    std::fs::write(&img, image).unwrap();
    let bundle = dir.join(format!("os-{version}.cairn"));
    hub.cli_ok(&[
        "release",
        "build",
        img.to_str().unwrap(),
        "--version",
        version,
        "--arch",
        std::env::consts::ARCH,
        "--board",
        "sim",
        "--key",
        key.to_str().unwrap(),
        "--out",
        bundle.to_str().unwrap(),
    ]);
    hub.cli_ok(&["release", "push", bundle.to_str().unwrap()]);
    bundle.display().to_string()
}

#[test]
fn operator_upgrades_a_box_through_the_hub_and_a_broken_release_rolls_back() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"));
    let key = tmp.path().join("release.pem");
    hub.cli_ok(&["release", "keygen", "--out", key.to_str().unwrap()]);
    let pubkey = format!("{}.pub", key.display());
    hub.cli_ok(&["release", "key", "add", &pubkey, "--name", "e2e"]);

    let v1 = random_image(1, IMAGE);
    let v2 = mutate_blocks(&v1, 0.10, 2);
    let sim = SimBox::flash(&tmp.path().join("box"), &v1, IMAGE as u64 + (1 << 20));
    build(&hub, tmp.path(), &key, "2.0.0", &v2);

    let token = hub.token(1, "site=lab");
    let boot: Vec<String> = sim
        .slot_args()
        .into_iter()
        .skip(2) // --data-dir: the harness gives it
        .collect();
    let mut args: Vec<&str> = boot.iter().map(String::as_str).collect();
    args.extend(["--tpm", "none", "--checkpoint-mib", "1"]);
    let mut agent = Agent::start_with(&sim.data_dir, &hub.quic, Some(&token), &args);
    wait_for("agent enrolled", Duration::from_secs(60), || {
        agent.device_id().is_some()
    });
    let id = agent.device_id().unwrap();

    // v2 to the site; the agent is killed once while it upgrades.
    hub.cli_ok(&[
        "os",
        "set",
        "--selector",
        "site=lab",
        "2.0.0",
        "--health-timeout",
        "60s",
    ]);
    wait_for("upgrade started", Duration::from_secs(60), || {
        upgrade(&hub, &id).is_some()
    });
    agent.kill();
    agent.start_again();
    let slot = reboot_when_asked(&mut agent, &sim, "reboot into the 2.0.0 trial");
    assert_eq!(slot, Slot::B);
    wait_for("2.0.0 committed", Duration::from_secs(60), || {
        upgrade(&hub, &id).is_some_and(|u| u.phase == "committed")
    });
    let u = upgrade(&hub, &id).expect("an upgrade report");
    assert_eq!(u.version, "2.0.0");
    assert_eq!(u.committed_version, "2.0.0");
    assert_eq!(u.booted_slot, "b");
    let downloaded = u.bytes_downloaded;
    eprintln!(
        "2.0.0 over QUIC: {downloaded} of {IMAGE} bytes downloaded ({:.1}%)",
        100.0 * downloaded as f64 / IMAGE as f64
    );
    assert!(
        (downloaded as f64) < 0.15 * IMAGE as f64,
        "delta over QUIC downloaded {downloaded} bytes"
    );
    assert_eq!(sim.slot_bytes(Slot::B, IMAGE), v2);
    assert_eq!(sim.slot_bytes(Slot::A, IMAGE), v1);
    let status: ReleaseStatus = hub.json_as(&["release", "status", "2.0.0"]);
    assert!(
        status
            .devices
            .iter()
            .any(|d| d.device == id && d.state == "committed"),
        "{status:?}"
    );

    // A broken 3.0.0: its health check fails on the trial; the box ends back on 2.0.0
    // by itself and the hub says why.
    let v3 = mutate_blocks(&v2, 0.05, 3);
    build(&hub, tmp.path(), &key, "3.0.0", &v3);
    hub.cli_ok(&[
        "os",
        "set",
        "--selector",
        "site=lab",
        "3.0.0",
        "--health-cmd",
        "echo service kiosk failed >&2; exit 1",
    ]);
    let slot = reboot_when_asked(&mut agent, &sim, "reboot into the 3.0.0 trial");
    assert_eq!(slot, Slot::A, "3.0.0 goes into the slot not running");
    let slot = reboot_when_asked(&mut agent, &sim, "reboot back after the failed trial");
    assert_eq!(slot, Slot::B);
    wait_for("3.0.0 rolled back", Duration::from_secs(60), || {
        upgrade(&hub, &id).is_some_and(|u| u.phase == "rolled-back")
    });
    let u = upgrade(&hub, &id).expect("an upgrade report");
    let err = u.error.clone().unwrap_or_default();
    assert!(err.contains("rolled back: health check failed"), "{u:?}");
    assert!(err.contains("service kiosk failed"), "{u:?}");
    assert_eq!(u.committed_version, "2.0.0");
    assert_eq!(sim.slot_bytes(Slot::B, IMAGE), v2, "2.0.0 still runs");
    let events = hub.events(&id, Some("upgrade.rolled-back"));
    assert_eq!(events.len(), 1, "{events:?}");
    // Back online on 2.0.0, every report delivered; it did not stop again.
    wait_for(
        "the agent back online with its reports delivered",
        Duration::from_secs(60),
        || hub.device(&id).device.connected && agent.status().is_some_and(|s| s.outbox_depth == 0),
    );
    assert_eq!(agent.exited(), None, "the agent keeps running on 2.0.0");
}
