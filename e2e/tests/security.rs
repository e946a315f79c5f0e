//! Bad input gets a clear refusal, on both sides, and never takes the hub down.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use cairn_e2e::{Agent, Hub, converged, wait_for};
use cairn_hub::server::Endpoints;
use cairn_sync_protocol::Text;
use cairn_sync_protocol::frame;
use cairn_sync_protocol::message::{AgentMessage, Hello, Intent, PROTOCOL_VERSION, RefusalCode};
use cairn_sync_protocol::token::JoinToken;

const T: Duration = Duration::from_secs(60);

fn agent_fails(hub: &Hub, dir: &std::path::Path, token: &str) -> (i32, String) {
    let mut agent = Agent::start(dir, &hub.quic, Some(token));
    wait_for("agent exits", T, || agent.exited().is_some());
    (
        agent.exited().unwrap(),
        std::fs::read_to_string(dir.join("agent.log")).unwrap(),
    )
}

#[test]
fn bad_tokens_are_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"));

    // Right hub, wrong secret.
    let mut t = JoinToken::parse(&hub.token(5, "")).unwrap();
    t.secret[0] ^= 0xff;
    let (code, log) = agent_fails(&hub, &tmp.path().join("wrong"), &t.encode());
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("is not known to this hub"), "{log}");

    // A token of another hub: the agent refuses that hub before sending the secret.
    let mut t = JoinToken::parse(&hub.token(5, "")).unwrap();
    t.ca_fingerprint[0] ^= 0xff;
    let (code, log) = agent_fails(&hub, &tmp.path().join("otherhub"), &t.encode());
    assert_eq!(code, 3, "{log}");
    assert!(
        log.contains("does not match the fingerprint in the join token"),
        "{log}"
    );

    // Garbled token text.
    let (code, log) = agent_fails(&hub, &tmp.path().join("garbled"), "cairn1_notbase64!!");
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("cut off"), "{log}");

    // Used up: one use, two agents.
    let once = hub.token(1, "");
    let first = Agent::start(&tmp.path().join("first"), &hub.quic, Some(&once));
    wait_for("first agent enrolls", T, || first.device_id().is_some());
    let (code, log) = agent_fails(&hub, &tmp.path().join("second"), &once);
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("has no uses left"), "{log}");

    // Expired.
    let short = hub
        .cli_ok(&["token", "create", "--ttl", "1s"])
        .trim()
        .to_string();
    let created = std::time::Instant::now();
    wait_for("token expires", T, || {
        created.elapsed() > Duration::from_millis(1500)
    });
    let (code, log) = agent_fails(&hub, &tmp.path().join("late"), &short);
    assert_eq!(code, 3, "{log}");
    assert!(log.contains("has expired"), "{log}");

    // The hub saw them all and logged why.
    let hub_log = std::fs::read_to_string(hub.dir.join("hub.log")).unwrap();
    for reason in [
        "is not known to this hub",
        "has no uses left",
        "has expired",
    ] {
        assert!(
            hub_log.contains(reason),
            "hub log lacks {reason:?}: {}",
            hub.log_tail()
        );
    }
    assert_eq!(hub.devices().len(), 1);
}

#[test]
fn revoked_device_is_cut_off_at_once_and_stays_out() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"));
    let token = hub.token(1, "site=x");
    let mut agent = Agent::start(&tmp.path().join("a"), &hub.quic, Some(&token));
    wait_for("online", T, || converged(&hub, &agent));
    let id = agent.device_id().unwrap();
    let out = hub.cli_ok(&["devices", "revoke", &id]);
    assert!(out.contains("its connection was closed"), "{out}");
    wait_for(
        "agent learns it is revoked",
        Duration::from_secs(10),
        || {
            agent
                .status()
                .and_then(|s| s.revoked)
                .is_some_and(|r| r.contains("revoked by the operator"))
        },
    );
    assert!(hub.device(&id).device.record.revoked_ms.is_some());
    let events = hub.events(&id, Some("hub.revoked"));
    assert_eq!(events.len(), 1);

    // State changes no longer reach it, and a restart does not get it back in.
    hub.set_file("--selector", "site=x", "m", "m", "x");
    agent.restart();
    wait_for("restarted agent is refused again", T, || {
        agent
            .status()
            .is_some_and(|s| s.connection.starts_with("revoked"))
    });
    assert!(!agent.file("m").exists());
    let table = hub.cli_ok(&["devices"]);
    assert!(table.contains("revoked"), "{table}");
}

#[test]
fn certificate_from_another_hub_is_refused_on_both_sides() {
    let tmp = tempfile::tempdir().unwrap();
    let hub_a = Hub::start(&tmp.path().join("hub-a"));
    let hub_b = Hub::start(&tmp.path().join("hub-b"));
    let token = hub_a.token(1, "");
    let mut agent = Agent::start(&tmp.path().join("a"), &hub_a.quic, Some(&token));
    wait_for("enrolled at A", T, || converged(&hub_a, &agent));
    drop(hub_a);
    // Same identity, pointed at hub B: neither side trusts the other.
    agent.kill();
    let mut moved = Agent::start(&tmp.path().join("a"), &hub_b.quic, None);
    wait_for("agent reports the TLS refusal", T, || {
        moved.status().is_some_and(|s| {
            let c = s.connection;
            c.contains("certificate") || c.contains("UnknownIssuer") || c.contains("CA")
        })
    });
    assert!(moved.exited().is_none(), "the agent keeps running offline");
    assert!(hub_b.devices().is_empty());
}

/// Opens a QUIC connection the way an enrolling agent does, then sends `bytes` on the
/// session stream and returns how the hub closed the connection.
async fn send_raw(hub: &Hub, bytes: Vec<u8>) -> (u64, String) {
    let endpoints: Endpoints =
        serde_json::from_str(&std::fs::read_to_string(hub.dir.join("endpoints.json")).unwrap())
            .unwrap();
    let fp: [u8; 32] = hex_decode(&endpoints.ca_fingerprint);
    let cfg = cairn_agent::tls::enroll_config(fp, Duration::from_secs(1), Duration::from_secs(10))
        .unwrap();
    let ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let conn = ep
        .connect_with(cfg, hub.quic.parse().unwrap(), "cairn-hub")
        .unwrap()
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&bytes).await.unwrap();
    let _ = send.finish();
    let _ = tokio::time::timeout(T, recv.read_to_end(1 << 20)).await;
    let reason = tokio::time::timeout(T, conn.closed()).await.unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => (
            c.error_code.into_inner(),
            String::from_utf8_lossy(&c.reason).into_owned(),
        ),
        other => panic!("expected an application close, got {other}"),
    }
}

fn hex_decode(s: &str) -> [u8; 32] {
    let v: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_frames_are_refused_and_the_hub_keeps_serving() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tmp = tempfile::tempdir().unwrap();
    let hub = tokio::task::block_in_place(|| Hub::start(&tmp.path().join("hub")));
    let violation = u64::from(RefusalCode::ProtocolViolation.close_code());

    let mut rng_bytes = vec![0u8; 300];
    for (i, b) in rng_bytes.iter_mut().enumerate() {
        *b = (i as u8).wrapping_mul(151).wrapping_add(7);
    }
    let reports_first = frame::encode(&AgentMessage::Reports(vec![]), 1024).unwrap();
    let mut unknown = vec![0, 0, 0, 1, 42];
    unknown.extend([0; 3]);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("random bytes", rng_bytes, "bad frame"),
        (
            "oversized length",
            vec![0xff, 0xff, 0xff, 0xff, 1, 2, 3],
            "exceeds the limit",
        ),
        ("unknown message type", unknown, "unknown message type"),
        ("reports before hello", reports_first, "unexpected Reports"),
        (
            "truncated frame",
            vec![0, 0, 0, 50, 1, 2],
            "stream ended inside a frame",
        ),
    ];
    for (what, bytes, expect) in cases {
        let (code, reason) = send_raw(&hub, bytes).await;
        assert_eq!(code, violation, "{what}: {reason}");
        assert!(
            reason.contains(expect),
            "{what}: {reason:?} should mention {expect:?}"
        );
    }

    // Sync without a certificate: told to enroll.
    let hello = AgentMessage::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent_version: Text::truncated("test"),
        intent: Intent::Sync { state_revision: 0 },
    });
    let (code, reason) = send_raw(&hub, frame::encode(&hello, 1024).unwrap()).await;
    assert_eq!(code, u64::from(RefusalCode::NotEnrolled.close_code()));
    assert!(reason.contains("enroll first"), "{reason}");

    // Raw UDP junk at the QUIC port.
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..200u32 {
        let _ = sock.send_to(&i.to_le_bytes().repeat(50), &hub.quic);
    }

    // Still alive: a real agent enrolls and converges.
    let hub = Arc::new(hub);
    let h = hub.clone();
    let dir = tmp.path().join("a");
    tokio::task::spawn_blocking(move || {
        let token = h.token(1, "ok=yes");
        let agent = Agent::start(&dir, &h.quic, Some(&token));
        h.set_file("--selector", "ok=yes", "m", "m", "fine");
        wait_for("agent converges after the garbage", T, || {
            converged(&h, &agent)
        });
    })
    .await
    .unwrap();
}

/// A hub database tampered with (or a relay forging state) cannot make an agent apply
/// state the hub's key did not sign: the agent refuses the delta, asks for a snapshot,
/// refuses that too, keeps its verified state, and tells the hub why.
#[test]
fn forged_state_from_the_wire_is_refused_and_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = Hub::start(&tmp.path().join("hub"));
    let token = hub.token(1, "site=x");
    let mut agent = Agent::start(&tmp.path().join("a"), &hub.quic, Some(&token));
    hub.set_file("--selector", "site=x", "motd", "motd", "one");
    wait_for("converged on revision 1", T, || converged(&hub, &agent));
    let id = agent.device_id().unwrap();
    let held = agent.status().expect("agent status").desired_revision;

    agent.kill();
    hub.set_file("--selector", "site=x", "motd", "motd", "two");
    // Replace the new revision's signature in the hub's database.
    let db = rusqlite::Connection::open(hub.dir.join("hub.db")).unwrap();
    db.busy_timeout(Duration::from_secs(10)).unwrap();
    let n = db
        .execute(
            "UPDATE devices SET signature = ?1 WHERE id = ?2",
            rusqlite::params![vec![7u8; 64], id],
        )
        .unwrap();
    assert_eq!(n, 1);
    drop(db);

    agent.restart();
    wait_for("the hub receives the agent's refusal", T, || {
        hub.events(&id, Some("state-rejected"))
            .iter()
            .any(|e| e.message.contains("not signed by this hub"))
    });
    assert_eq!(std::fs::read_to_string(agent.file("motd")).unwrap(), "one");
    assert_eq!(agent.status().expect("agent status").desired_revision, held);
    assert!(
        agent.exited().is_none(),
        "the agent keeps running on its verified state"
    );
}
