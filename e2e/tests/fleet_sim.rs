//! The fleet simulation in real mode, at CI size: `examples/scenarios/ci-small.toml` — a
//! hub process and 200 real agents in pool processes, QUIC over loopback through relays
//! with 1% packet loss, a partition, flapping links, local drift and a hub SIGKILL. The
//! run checks its own invariants; this test also reads the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

use cairn_examples::report::Report;
use cairn_examples::scenario::Invariant;

/// Runs `examples/scenarios/NAME.toml` in real mode; its report (`fleet-sim --json`).
fn run_scenario(name: &str) -> Report {
    let scenario = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../examples/scenarios")
        .join(format!("{name}.toml"));
    let out = Command::new(cairn_e2e::bin("fleet-sim"))
        .arg("--scenario")
        .arg(&scenario)
        .args(["--json", "--pool-size", "100", "--enroll-timeout", "3m"])
        .output()
        .expect("run fleet-sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fleet-sim failed ({}): {stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("fleet-sim --json printed no report: {e}\n{stdout}"))
}

#[test]
fn ci_scenario_with_200_real_agents_holds_every_invariant() {
    let report = run_scenario("ci-small");
    let text = report.render();
    assert_eq!(report.mode, "real");
    assert_eq!(report.devices, 200);
    let invariants = &report.invariants;
    assert_eq!(invariants.len(), 4, "{text}");
    assert!(invariants.iter().all(|i| i.ok), "{text}");
    for p in &report.phases {
        assert_eq!(p.converged, p.devices, "{p:?}");
    }
    // Something really happened: the partition and the drift left their traces.
    assert_eq!(report.faults.hub_restarts, 1);
    assert_eq!(report.faults.partitions, 50);
    assert_eq!(report.events.drift_corrected, 40, "{text}");
    // The tampered boots were quarantined (then accepted: every device ends trusted).
    assert_eq!(report.faults.tampered, 5, "{text}");
    assert_eq!(report.events.quarantined, 5, "{text}");
    assert_eq!(report.events.lost, 0);
    assert_eq!(report.events.duplicated, 0);
    assert!(report.wire.to_hub > 0);
    let hub = report
        .hub
        .as_ref()
        .expect("real mode reports the hub's usage");
    assert!(hub.rss_peak_mb > 0.0);
    assert!(!report.timeline.is_empty());
}

/// `examples/scenarios/upgrade.toml` with 200 real agents on file-backed A/B slots:
/// release 2.0.0 to the fleet while 10% of the agents crash mid-install and one app
/// group's health check fails, then a panicking 2.1.0 to the canary ring. Every box
/// must end on the release it committed, none on an unverified one.
#[test]
fn upgrade_scenario_ends_with_every_box_committed_or_rolled_back() {
    let report = run_scenario("upgrade");
    let text = report.render();
    let invariants = &report.invariants;
    assert_eq!(invariants.len(), 5, "{text}");
    assert!(invariants.iter().all(|i| i.ok), "{text}");
    let os = invariants
        .iter()
        .find(|i| i.invariant == Invariant::OsCommittedOrRolledBack)
        .unwrap();
    let detail = os.detail.as_str();
    // 20 kiosks roll 2.0.0 back (failing check); the 50 canaries roll 2.1.0 back
    // (kernel panic); everyone else commits 2.0.0.
    assert!(detail.contains("2.0.0 rolled-back"), "{detail}");
    assert!(detail.contains("2.1.0 rolled-back"), "{detail}");
    assert!(detail.contains("2.0.0 committed"), "{detail}");
    assert_eq!(report.faults.agent_crashes, 20);
    assert_eq!(report.events.lost, 0);
    assert_eq!(report.events.duplicated, 0);
}
