//! The fleet simulation in real mode, at CI size: `examples/scenarios/ci-small.toml` — a
//! hub process and 200 real agents in pool processes, QUIC over loopback through relays
//! with 1% packet loss, a partition, flapping links, local drift and a hub SIGKILL. The
//! run checks its own invariants; this test also reads the report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::Command;

/// Runs `examples/scenarios/NAME.toml` in real mode; its JSON report.
fn run_scenario(name: &str) -> serde_json::Value {
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
    serde_json::from_str(&stdout).unwrap()
}

#[test]
fn ci_scenario_with_200_real_agents_holds_every_invariant() {
    let report = run_scenario("ci-small");
    assert_eq!(report["mode"], "real");
    assert_eq!(report["devices"], 200);
    let invariants = report["invariants"].as_array().unwrap();
    assert_eq!(invariants.len(), 4, "{report}");
    assert!(invariants.iter().all(|i| i["ok"] == true), "{report}");
    for p in report["phases"].as_array().unwrap() {
        assert_eq!(p["converged"], p["devices"], "{p}");
    }
    // Something really happened: the partition and the drift left their traces.
    assert_eq!(report["faults"]["hub_restarts"], 1);
    assert_eq!(report["faults"]["partitions"], 50);
    assert_eq!(report["events"]["drift_corrected"], 40, "{report}");
    assert_eq!(report["events"]["lost"], 0);
    assert_eq!(report["events"]["duplicated"], 0);
    assert!(report["wire"]["to_hub"].as_u64().unwrap() > 0);
    assert!(report["hub"]["rss_peak_mb"].as_f64().unwrap() > 0.0);
    assert!(!report["timeline"].as_array().unwrap().is_empty());
}

/// `examples/scenarios/upgrade.toml` with 200 real agents on file-backed A/B slots:
/// release 2.0.0 to the fleet while 10% of the agents crash mid-install and one app
/// group's health check fails, then a panicking 2.1.0 to the canary ring. Every box
/// must end on the release it committed, none on an unverified one.
#[test]
fn upgrade_scenario_ends_with_every_box_committed_or_rolled_back() {
    let report = run_scenario("upgrade");
    let invariants = report["invariants"].as_array().unwrap();
    assert_eq!(invariants.len(), 5, "{report}");
    assert!(invariants.iter().all(|i| i["ok"] == true), "{report}");
    let os = invariants
        .iter()
        .find(|i| i["invariant"] == "os-committed-or-rolled-back")
        .unwrap();
    let detail = os["detail"].as_str().unwrap_or_default();
    // 20 kiosks roll 2.0.0 back (failing check); the 50 canaries roll 2.1.0 back
    // (kernel panic); everyone else commits 2.0.0.
    assert!(detail.contains("2.0.0 rolled-back"), "{detail}");
    assert!(detail.contains("2.1.0 rolled-back"), "{detail}");
    assert!(detail.contains("2.0.0 committed"), "{detail}");
    assert_eq!(report["faults"]["agent_crashes"], 20);
    assert_eq!(report["events"]["lost"], 0);
    assert_eq!(report["events"]["duplicated"], 0);
}
