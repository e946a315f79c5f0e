//! The README's fleet demo, small: a real hub and 20 real agents in one process through
//! enrollment, a selector change, a partition and a hub restart; it checks its own
//! invariants and exits non-zero if one fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn small_fleet_demo_passes_its_invariants() {
    let out = Command::new(cairn_e2e::bin("fleet-sim"))
        .args(["--devices", "20", "--json", "--timeout", "90s"])
        .output()
        .expect("run fleet-sim");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "fleet-sim failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["devices"], 20);
    let invariants = report["invariants"].as_object().unwrap();
    assert_eq!(invariants.len(), 4);
    assert!(invariants.values().all(|v| v == true), "{report}");
    for p in report["phases"].as_array().unwrap() {
        assert_eq!(p["converged"], 20, "{p}");
    }
}
