//! The core loop end to end: real hub and agent processes, QUIC on loopback, SQLite
//! files, the operator CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cairn_e2e::{Agent, Hub, converged, file_mismatches, wait_for};

const T: Duration = Duration::from_secs(60);

#[test]
fn three_agents_enroll_and_converge_by_selector() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"));
    let paris = hub.token(2, "site=paris,role=kiosk");
    let rome = hub.token(1, "site=rome");
    let agents = [
        Agent::start(&tmp.path().join("a1"), &hub.quic, Some(&paris)),
        Agent::start(&tmp.path().join("a2"), &hub.quic, Some(&paris)),
        Agent::start(&tmp.path().join("a3"), &hub.quic, Some(&rome)),
    ];
    wait_for("three devices online", T, || {
        let ds = hub.devices();
        ds.len() == 3 && ds.iter().all(|d| d.connected)
    });

    let out = hub.cli_ok(&[
        "set",
        "--selector",
        "site=paris",
        "motd",
        "--path",
        "etc/motd",
        "--content",
        "bonjour\n",
        "--mode",
        "640",
    ]);
    assert!(out.contains("2 devices match"), "{out}");
    for a in &agents[..2] {
        wait_for("paris agents write motd", T, || {
            std::fs::read_to_string(a.file("etc/motd")).is_ok_and(|c| c == "bonjour\n")
        });
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(a.file("etc/motd")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o7777, 0o640);
    }
    assert!(
        !agents[2].file("etc/motd").exists(),
        "rome must not get paris state"
    );

    // A device-level assignment on top, and a selector that also matches rome.
    let rome_id = agents[2].device_id().unwrap();
    hub.set_file("--device", &rome_id, "motd", "etc/motd", "ciao\n");
    hub.set_file(
        "--selector",
        "site",
        "ntp",
        "etc/ntp.conf",
        "server 127.0.0.1\n",
    );
    for a in &agents {
        wait_for("all converge", T, || converged(&hub, a));
        assert_eq!(file_mismatches(&hub, a), Vec::<String>::new());
    }
    assert_eq!(
        std::fs::read_to_string(agents[2].file("etc/motd")).unwrap(),
        "ciao\n"
    );
    assert!(agents[0].file("etc/ntp.conf").exists());

    // Removing a resource removes the file.
    hub.cli_ok(&["unset", "--selector", "site", "ntp"]);
    for a in &agents {
        wait_for("ntp.conf removed", T, || !a.file("etc/ntp.conf").exists());
        wait_for("converged after unset", T, || converged(&hub, a));
    }

    // The table and the JSON agree: three online devices without drift.
    let table = hub.cli_ok(&["devices"]);
    assert_eq!(
        table.lines().filter(|l| l.contains(" online ")).count(),
        3,
        "{table}"
    );
    for d in hub.devices() {
        assert!(!d.drift, "{d:?}");
        assert!(d.record.desired_revision >= 2);
    }
    let labels = hub.cli_ok(&["labels"]);
    assert!(
        labels.contains("paris") && labels.contains("rome"),
        "{labels}"
    );
}

#[test]
fn offline_agent_records_events_and_delivers_each_exactly_once() {
    let tmp = tempfile::tempdir().unwrap();
    let mut hub = Hub::start(&tmp.path().join("hub"));
    let token = hub.token(1, "site=depot");
    let agent = Agent::start(&tmp.path().join("a"), &hub.quic, Some(&token));
    const FILES: usize = 50;
    const ROUNDS: usize = 20;
    for i in 0..FILES {
        hub.set_file(
            "--selector",
            "site=depot",
            &format!("f{i}"),
            &format!("data/f{i}"),
            &format!("content {i}\n"),
        );
    }
    wait_for("agent converged on 50 files", T, || converged(&hub, &agent));
    let id = agent.device_id().unwrap();
    let before = hub.events(&id, Some("drift-corrected")).len();
    assert_eq!(before, 0);

    // The hub goes away; the agent keeps enforcing state and queues what it sees.
    hub.kill();
    for round in 0..ROUNDS {
        let seq_before = agent.last_seq();
        for i in 0..FILES {
            std::fs::write(
                agent.file(&format!("data/f{i}")),
                format!("tampered {round}"),
            )
            .unwrap();
        }
        wait_for("agent restores all files", T, || {
            (0..FILES).all(|i| {
                std::fs::read_to_string(agent.file(&format!("data/f{i}")))
                    .is_ok_and(|c| c == format!("content {i}\n"))
            }) && agent.last_seq() >= seq_before + FILES as u64
        });
    }
    let st = agent.status();
    assert!(
        st.as_ref().map_or(0, |s| s.outbox_depth) >= (FILES * ROUNDS) as u64,
        "{st:?}"
    );

    // Back online: every event arrives, once, in order.
    hub.restart();
    wait_for("backlog delivered", T, || converged(&hub, &agent));
    let drift = hub.events(&id, Some("drift-corrected"));
    assert_eq!(
        drift.len(),
        FILES * ROUNDS,
        "each drift correction exactly once"
    );
    let seqs: Vec<u64> = hub.events(&id, None).iter().filter_map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[0] < w[1]),
        "agent events stored in sequence order"
    );
    let dev = hub.device(&id).device;
    assert_eq!(dev.record.reports_acked, agent.last_seq());
}
