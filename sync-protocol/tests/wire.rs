#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Property tests of the framing and of the two session state machines driven against
//! each other over a lossy, reconnecting "network" in virtual time.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cairn_sync_protocol::agent::{AgentEvent, AgentSession};
use cairn_sync_protocol::frame::{self, FrameDecoder, FrameError};
use cairn_sync_protocol::hub::{HubEvent, HubSession};
use cairn_sync_protocol::message::*;
use cairn_sync_protocol::state::{self, FileResource, Resource, StateDocument, StateUpdate};
use cairn_sync_protocol::{DeviceId, ResourceName, SessionConfig, SessionError, Text};
use ed25519_dalek::SigningKey;
use proptest::prelude::*;
use rand::{Rng, SeedableRng};

fn arb_name() -> impl Strategy<Value = ResourceName> {
    "[a-z][a-z0-9._-]{0,20}".prop_map(|s| ResourceName::new(&s).unwrap())
}

fn arb_resource() -> impl Strategy<Value = Resource> {
    (
        "[a-z/]{1,40}",
        proptest::collection::vec(any::<u8>(), 0..200),
        0u32..0o7777,
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(path, content, mode, uid)| {
            Resource::File(FileResource {
                path: Text::new(path).unwrap(),
                content,
                mode,
                uid,
                gid: uid,
            })
        })
}

fn arb_report() -> impl Strategy<Value = Report> {
    (
        any::<u64>(),
        any::<u64>(),
        proptest::option::of(arb_name()),
        ".{0,100}",
        0u8..3,
    )
        .prop_map(|(seq, at_ms, resource, msg, k)| Report {
            seq,
            at_ms,
            body: if k == 0 {
                ReportBody::Status(Status {
                    desired_revision: seq,
                    applied_revision: at_ms,
                    failing: 3,
                })
            } else {
                ReportBody::Event(Event {
                    kind: if k == 1 {
                        EventKind::DriftCorrected
                    } else {
                        EventKind::Applied
                    },
                    resource,
                    revision: Some(seq),
                    message: Text::truncated(&msg),
                })
            },
        })
}

fn arb_agent_message() -> impl Strategy<Value = AgentMessage> {
    prop_oneof![
        any::<u64>().prop_map(|revision| AgentMessage::StateAck { revision }),
        any::<u64>().prop_map(|state_revision| AgentMessage::ResyncRequest { state_revision }),
        proptest::collection::vec(arb_report(), 0..20).prop_map(AgentMessage::Reports),
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            proptest::collection::vec(any::<[u8; 32]>(), 0..24),
            any::<u64>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40)),
        )
            .prop_map(
                |(bytes, pcrs, off, credential)| AgentMessage::Evidence(Box::new(Evidence {
                    credential,
                    attest: bytes.clone(),
                    signature: bytes.iter().rev().copied().collect(),
                    pcrs: pcrs.into_iter().collect(),
                    log_offset: off,
                    log: bytes.clone(),
                    ima: (off % 2 == 0).then_some(ImaTail { offset: off, bytes }),
                }))
            ),
        (any::<u16>(), any::<u16>(), any::<u64>()).prop_map(|(a, b, r)| AgentMessage::Hello(
            Hello {
                min_version: a,
                max_version: b,
                agent_version: Text::truncated("0.1.0"),
                intent: Intent::Sync { state_revision: r },
            }
        )),
    ]
}

fn arb_hub_message() -> impl Strategy<Value = HubMessage> {
    let key = SigningKey::from_bytes(&[7; 32]);
    prop_oneof![
        any::<u64>().prop_map(|up_to| HubMessage::ReportAck { up_to }),
        (
            proptest::collection::vec((arb_name(), arb_resource()), 0..8),
            proptest::collection::vec(arb_name(), 0..4),
            any::<u64>()
        )
            .prop_map(move |(upserts, removals, revision)| {
                let device = DeviceId::new("dev-x").unwrap();
                let digest = state::document_digest(std::iter::empty());
                HubMessage::State(StateUpdate {
                    signature: state::sign_state(&key, &device, revision, &digest),
                    device,
                    base_revision: Some(revision / 2),
                    revision,
                    upserts,
                    removals,
                })
            }),
        (
            any::<[u8; 32]>(),
            proptest::collection::vec(0u8..24, 0..24),
            any::<u64>(),
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..80)),
        )
            .prop_map(
                |(nonce, pcrs, held, blob)| HubMessage::Challenge(Challenge {
                    nonce,
                    pcrs: pcrs.into_iter().collect(),
                    log_held: held,
                    log_held_sha256: nonce,
                    credential: blob.map(|b| CredentialChallenge {
                        secret: b.clone(),
                        blob: b,
                    }),
                    ima_held: held / 2,
                    ima_held_pcr10: nonce,
                })
            ),
        (any::<u64>(), 1u16..5).prop_map(|(acked, version)| HubMessage::Welcome(Welcome {
            version,
            device: DeviceId::new("d").unwrap(),
            reports_acked: acked,
        })),
    ]
}

proptest! {
    #[test]
    fn agent_messages_round_trip_through_split_frames(
        msgs in proptest::collection::vec(arb_agent_message(), 1..6),
        split in 1usize..64,
    ) {
        let mut bytes = Vec::new();
        for m in &msgs {
            bytes.extend(frame::encode(m, frame::DEFAULT_MAX_FRAME_LEN).unwrap());
        }
        let mut dec = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_LEN);
        let mut out = Vec::new();
        for chunk in bytes.chunks(split) {
            dec.push(chunk);
            while let Some(m) = dec.next_message::<AgentMessage>().unwrap() {
                out.push(m);
            }
        }
        dec.finish().unwrap();
        prop_assert_eq!(out, msgs);
    }

    #[test]
    fn hub_messages_round_trip(msg in arb_hub_message()) {
        let bytes = frame::encode(&msg, frame::DEFAULT_MAX_FRAME_LEN).unwrap();
        let mut dec = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_LEN);
        dec.push(&bytes);
        prop_assert_eq!(dec.next_message::<HubMessage>().unwrap(), Some(msg));
    }

    /// Random bytes never panic the decoder or a session; they give a typed error or
    /// wait for more input.
    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&bytes);
        for _ in 0..8 {
            match dec.next_message::<AgentMessage>() {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => break,
            }
        }
        let now = Instant::now();
        let mut hub = HubSession::new(now, &SessionConfig::default());
        hub.handle_input(now, &bytes);
        hub.handle_end_of_stream();
        while hub.poll_event().is_some() {}
        while hub.poll_transmit().is_some() {}
        let mut agent = AgentSession::sync(now, SessionConfig::default(), 0, "t");
        agent.handle_input(now, &bytes);
        while agent.poll_event().is_some() {}
    }

    /// A well-formed frame with a payload mutated at random decodes or fails cleanly.
    #[test]
    fn mutated_frames_never_panic(msg in arb_hub_message(), pos in any::<usize>(), val in any::<u8>()) {
        let mut bytes = frame::encode(&msg, frame::DEFAULT_MAX_FRAME_LEN).unwrap();
        let i = 4 + pos % (bytes.len() - 4).max(1);
        if i < bytes.len() { bytes[i] = val; }
        let mut dec = FrameDecoder::new(frame::DEFAULT_MAX_FRAME_LEN);
        dec.push(&bytes);
        let _ = dec.next_message::<HubMessage>();
    }
}

#[test]
fn decoder_errors_are_typed() {
    let mut dec = FrameDecoder::new(16);
    dec.push(&[0, 0, 1, 0]);
    assert_eq!(
        dec.next_message::<AgentMessage>(),
        Err(FrameError::Oversized { len: 256, max: 16 })
    );

    let mut dec = FrameDecoder::new(1024);
    dec.push(&[0, 0, 0, 9, 1, 2]);
    assert_eq!(dec.next_message::<AgentMessage>(), Ok(None));
    assert_eq!(
        dec.finish(),
        Err(FrameError::Truncated { have: 6, need: 13 })
    );

    let mut dec = FrameDecoder::new(1024);
    dec.push(&[0, 0, 0, 1, 42]);
    assert!(matches!(
        dec.next_message::<AgentMessage>(),
        Err(FrameError::UnknownMessage(_))
    ));

    let mut dec = FrameDecoder::new(1024);
    let mut f = frame::encode(&AgentMessage::StateAck { revision: 1 }, 1024).unwrap();
    f[3] += 2;
    f.extend([0, 0]);
    dec.push(&f);
    assert_eq!(
        dec.next_message::<AgentMessage>(),
        Err(FrameError::TrailingBytes(2))
    );

    let mut dec = FrameDecoder::new(1024);
    dec.push(&[0, 0, 0, 0]);
    assert_eq!(dec.next_message::<AgentMessage>(), Err(FrameError::Empty));
}

#[test]
fn hub_refuses_incompatible_versions_and_out_of_order_messages() {
    let now = Instant::now();
    let cfg = SessionConfig::default();
    let mut hub = HubSession::new(now, &cfg);
    let hello = AgentMessage::Hello(Hello {
        min_version: 7,
        max_version: 9,
        agent_version: Text::truncated("future"),
        intent: Intent::Sync { state_revision: 0 },
    });
    hub.handle_input(now, &frame::encode(&hello, 1024).unwrap());
    let mut dec = FrameDecoder::new(1024);
    dec.push(&hub.poll_transmit().unwrap());
    match dec.next_message::<HubMessage>().unwrap() {
        Some(HubMessage::Refused(r)) => assert_eq!(r.code, RefusalCode::UnsupportedVersion),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(hub.is_done());

    let mut hub = HubSession::new(now, &cfg);
    let early = AgentMessage::Reports(vec![]);
    hub.handle_input(now, &frame::encode(&early, 1024).unwrap());
    assert!(matches!(
        hub.poll_event(),
        Some(HubEvent::Failed(SessionError::Protocol(_)))
    ));

    let mut hub = HubSession::new(now, &cfg);
    hub.handle_timeout(now + Duration::from_secs(60));
    assert_eq!(
        hub.poll_event(),
        Some(HubEvent::Failed(SessionError::HandshakeTimeout))
    );
}

fn deliver_to_hub(agent: &mut AgentSession, hub: &mut HubSession, now: Instant) {
    while let Some(b) = agent.poll_transmit() {
        hub.handle_input(now, &b);
    }
}

fn deliver_to_agent(hub: &mut HubSession, agent: &mut AgentSession, now: Instant) {
    while let Some(b) = hub.poll_transmit() {
        agent.handle_input(now, &b);
    }
}

fn challenge(credential: bool) -> Challenge {
    Challenge {
        nonce: [9; 32],
        pcrs: [0u8, 4, 7].into_iter().collect(),
        log_held: 0,
        log_held_sha256: [0; 32],
        credential: credential.then(|| CredentialChallenge {
            blob: vec![1, 2],
            secret: vec![3],
        }),
        ima_held: 0,
        ima_held_pcr10: [0; 32],
    }
}

fn evidence() -> Evidence {
    Evidence {
        credential: Some(vec![5; 32]),
        attest: vec![1],
        signature: vec![2],
        pcrs: [[0u8; 32]; 3].into_iter().collect(),
        log_offset: 0,
        log: vec![0; 100 * 1024],
        ima: None,
    }
}

/// Enrollment with attestation: hello, challenge (with the credential), evidence
/// larger than a handshake frame (allowed once the hub challenged), then the answer.
/// In a sync session a challenge may come at any time; unanswered, it fails the
/// session; unasked-for evidence is a violation.
#[test]
fn challenges_and_evidence_flow_in_enrollment_and_sync() {
    let now = Instant::now();
    let cfg = SessionConfig::default();
    let request = EnrollRequest {
        token: Text::truncated("t"),
        csr_der: vec![1],
        hostname: Text::truncated("h"),
        identity: None,
    };
    let mut agent = AgentSession::enroll(now, cfg.clone(), request, "test");
    let mut hub = HubSession::new(now, &cfg);
    deliver_to_hub(&mut agent, &mut hub, now);
    assert!(matches!(
        hub.poll_event(),
        Some(HubEvent::EnrollRequested { .. })
    ));
    hub.challenge(now, challenge(true), Duration::from_secs(5));
    assert!(hub.challenge_outstanding());
    deliver_to_agent(&mut hub, &mut agent, now);
    let Some(AgentEvent::Challenged(c)) = agent.poll_event() else {
        panic!("the agent must be challenged");
    };
    assert_eq!(c, challenge(true));
    agent.send_evidence(evidence());
    deliver_to_hub(&mut agent, &mut hub, now);
    assert_eq!(
        hub.poll_event(),
        Some(HubEvent::Evidence(Box::new(evidence())))
    );
    assert!(!hub.is_done());

    // Sync: welcome, then a challenge; evidence comes back as an event.
    let mut agent = AgentSession::sync(now, cfg.clone(), 0, "test");
    let mut hub = HubSession::new(now, &cfg);
    deliver_to_hub(&mut agent, &mut hub, now);
    assert!(matches!(
        hub.poll_event(),
        Some(HubEvent::SyncRequested { .. })
    ));
    hub.accept_sync(DeviceId::new("d").unwrap(), 0);
    hub.challenge(now, challenge(false), Duration::from_secs(5));
    assert_eq!(hub.poll_timeout(), Some(now + Duration::from_secs(5)));
    deliver_to_agent(&mut hub, &mut agent, now);
    assert!(matches!(
        agent.poll_event(),
        Some(AgentEvent::Welcomed { .. })
    ));
    let _ = agent.poll_event(); // ReportsAcked
    assert!(matches!(
        agent.poll_event(),
        Some(AgentEvent::Challenged(_))
    ));
    agent.send_evidence(evidence());
    deliver_to_hub(&mut agent, &mut hub, now);
    assert!(matches!(hub.poll_event(), Some(HubEvent::Evidence(_))));
    assert_eq!(hub.poll_timeout(), None);
    // Evidence nobody asked for.
    agent.send_evidence(evidence());
    deliver_to_hub(&mut agent, &mut hub, now);
    assert!(matches!(
        hub.poll_event(),
        Some(HubEvent::Failed(SessionError::Protocol(_)))
    ));

    // A challenge left unanswered fails the session.
    let mut agent = AgentSession::sync(now, cfg.clone(), 0, "test");
    let mut hub = HubSession::new(now, &cfg);
    deliver_to_hub(&mut agent, &mut hub, now);
    let _ = hub.poll_event();
    hub.accept_sync(DeviceId::new("d").unwrap(), 0);
    hub.challenge(now, challenge(false), Duration::from_secs(5));
    hub.handle_timeout(now + Duration::from_secs(6));
    assert_eq!(
        hub.poll_event(),
        Some(HubEvent::Failed(SessionError::EvidenceTimeout))
    );
}

/// What a device and a hub hold durably in this model.
#[derive(Default)]
struct Durable {
    /// Agent outbox: every report ever created, with the acked prefix deleted.
    outbox: Vec<Report>,
    next_seq: u64,
    /// Hub: reports stored, in order.
    hub_reports: Vec<Report>,
    agent_doc: Option<StateDocument>,
}

/// Drives an agent and a hub session against each other through many connections that
/// break at random points, with reports created all the time and the hub's durable write
/// lagging behind. Afterwards the hub holds every report exactly once, in order.
#[test]
fn reports_survive_random_disconnects_exactly_once() {
    for seed in 0..200u64 {
        run_disconnect_model(seed);
    }
}

fn run_disconnect_model(seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let key = SigningKey::from_bytes(&[3; 32]);
    let device = DeviceId::new("dev-sim").unwrap();
    let mut d = Durable {
        next_seq: 1,
        ..Default::default()
    };
    let mut now = Instant::now();
    let cfg = SessionConfig {
        max_batch: 7,
        ..SessionConfig::default()
    };
    let mut hub_rev = 0u64;
    let mut hub_doc: BTreeMap<ResourceName, Resource> = BTreeMap::new();
    for _conn in 0..20 {
        let held = d.agent_doc.as_ref().map_or(0, |doc| doc.revision);
        let mut agent = AgentSession::sync(now, cfg.clone(), held, "t");
        let mut hub = HubSession::new(now, &cfg);
        let mut pending_durable: Vec<Report> = Vec::new();
        let steps = rng.gen_range(0..60);
        for _ in 0..steps {
            now += Duration::from_millis(rng.gen_range(1..50));
            // The device creates reports now and then.
            if rng.gen_bool(0.3) {
                for _ in 0..rng.gen_range(1..5) {
                    d.outbox.push(Report {
                        seq: d.next_seq,
                        at_ms: 0,
                        body: ReportBody::Status(Status {
                            desired_revision: 0,
                            applied_revision: 0,
                            failing: 0,
                        }),
                    });
                    d.next_seq += 1;
                }
                agent.outbox_tail(now, d.next_seq - 1);
            }
            // The operator changes desired state now and then.
            if rng.gen_bool(0.1) {
                hub_rev += 1;
                let name = ResourceName::new(&format!("r{}", rng.gen_range(0..4))).unwrap();
                let res = Resource::File(FileResource {
                    path: Text::new(format!("f{hub_rev}")).unwrap(),
                    content: vec![],
                    mode: 0o600,
                    uid: None,
                    gid: None,
                });
                hub_doc.insert(name.clone(), res.clone());
                let digest = state::document_digest(hub_doc.iter().map(|(n, r)| (n, r.hash())));
                hub.send_state(StateUpdate {
                    device: device.clone(),
                    base_revision: None,
                    revision: hub_rev,
                    upserts: hub_doc.clone().into_iter().collect(),
                    removals: vec![],
                    signature: state::sign_state(&key, &device, hub_rev, &digest),
                });
            }
            // Move bytes both ways; sometimes only part of them.
            while let Some(bytes) = agent.poll_transmit() {
                hub.handle_input(now, &bytes);
            }
            while let Some(ev) = hub.poll_event() {
                match ev {
                    HubEvent::SyncRequested { .. } => {
                        let acked = d.hub_reports.last().map_or(0, |r| r.seq);
                        hub.accept_sync(device.clone(), acked);
                    }
                    HubEvent::Reports(rs) => pending_durable.extend(rs),
                    HubEvent::StateAcked { .. } | HubEvent::ResyncRequested { .. } => {}
                    HubEvent::EnrollRequested { .. } | HubEvent::Evidence(_) => {
                        panic!("no enrollment or attestation here")
                    }
                    HubEvent::ReportsLost { from, to } => {
                        panic!("seed {seed}: nothing is lost here, yet {from}..={to} declared lost")
                    }
                    HubEvent::Failed(e) => panic!("seed {seed}: hub failed: {e}"),
                }
            }
            // The hub's batched write commits at random moments.
            if !pending_durable.is_empty() && rng.gen_bool(0.5) {
                let last = pending_durable.last().map(|r| r.seq).unwrap();
                d.hub_reports.append(&mut pending_durable);
                hub.reports_durable(last);
            }
            let mut dropped = false;
            while let Some(bytes) = hub.poll_transmit() {
                if rng.gen_bool(0.05) {
                    dropped = true; // the connection drops with frames in flight
                    break;
                }
                agent.handle_input(now, &bytes);
            }
            while let Some(ev) = agent.poll_event() {
                match ev {
                    AgentEvent::Welcomed { reports_acked, .. } => {
                        assert!(reports_acked < d.next_seq, "seed {seed}");
                    }
                    AgentEvent::ReportsWanted { after, limit } => {
                        let batch: Vec<Report> = d
                            .outbox
                            .iter()
                            .filter(|r| r.seq > after)
                            .take(limit)
                            .cloned()
                            .collect();
                        agent.send_reports(now, batch);
                    }
                    AgentEvent::ReportsAcked { up_to } => d.outbox.retain(|r| r.seq > up_to),
                    AgentEvent::StateOffered(u) => {
                        match u.apply_to(&device, d.agent_doc.as_ref(), &key.verifying_key()) {
                            Ok(doc) => {
                                d.agent_doc = Some(doc);
                                agent.state_stored(u.revision);
                            }
                            Err(state::StateError::Stale { .. }) => {}
                            Err(e) => panic!("seed {seed}: {e}"),
                        }
                    }
                    AgentEvent::Failed(e) => panic!("seed {seed}: agent failed: {e}"),
                    AgentEvent::Enrolled(_)
                    | AgentEvent::Refused(_)
                    | AgentEvent::Challenged(_) => unreachable!(),
                }
            }
            if dropped || rng.gen_bool(0.05) {
                break; // connection lost; durable state survives, sessions do not
            }
        }
    }
    // Final clean connection drains everything.
    let held = d.agent_doc.as_ref().map_or(0, |doc| doc.revision);
    let mut agent = AgentSession::sync(now, cfg.clone(), held, "t");
    let mut hub = HubSession::new(now, &cfg);
    agent.outbox_tail(now, d.next_seq - 1);
    for _ in 0..10_000 {
        let mut progressed = false;
        while let Some(bytes) = agent.poll_transmit() {
            hub.handle_input(now, &bytes);
            progressed = true;
        }
        while let Some(ev) = hub.poll_event() {
            progressed = true;
            match ev {
                HubEvent::SyncRequested { .. } => {
                    hub.accept_sync(device.clone(), d.hub_reports.last().map_or(0, |r| r.seq))
                }
                HubEvent::Reports(rs) => {
                    let last = rs.last().unwrap().seq;
                    d.hub_reports.extend(rs);
                    hub.reports_durable(last);
                }
                _ => {}
            }
        }
        while let Some(bytes) = hub.poll_transmit() {
            agent.handle_input(now, &bytes);
            progressed = true;
        }
        while let Some(ev) = agent.poll_event() {
            progressed = true;
            match ev {
                AgentEvent::ReportsWanted { after, limit } => {
                    let batch = d
                        .outbox
                        .iter()
                        .filter(|r| r.seq > after)
                        .take(limit)
                        .cloned()
                        .collect();
                    agent.send_reports(now, batch);
                }
                AgentEvent::ReportsAcked { up_to } => d.outbox.retain(|r| r.seq > up_to),
                AgentEvent::Failed(e) => panic!("seed {seed}: {e}"),
                _ => {}
            }
        }
        if !progressed {
            break;
        }
    }
    let seqs: Vec<u64> = d.hub_reports.iter().map(|r| r.seq).collect();
    let expected: Vec<u64> = (1..d.next_seq).collect();
    assert_eq!(
        seqs, expected,
        "seed {seed}: hub holds each report once, in order"
    );
    assert!(d.outbox.is_empty(), "seed {seed}: outbox drained");
}

/// A hub whose database went back in time acknowledges less than the agent already
/// deleted: the agent declares the gap, the hub passes it on and continues after it.
#[test]
fn a_gap_the_agent_cannot_fill_is_declared_not_stalled_on() {
    let now = Instant::now();
    let cfg = SessionConfig::default();
    let device = DeviceId::new("dev-gap").unwrap();
    let mut agent = AgentSession::sync(now, cfg.clone(), 0, "t");
    let mut hub = HubSession::new(now, &cfg);
    let pump_to_hub = |agent: &mut AgentSession, hub: &mut HubSession| {
        while let Some(b) = agent.poll_transmit() {
            hub.handle_input(now, &b);
        }
    };
    pump_to_hub(&mut agent, &mut hub);
    assert!(matches!(
        hub.poll_event(),
        Some(HubEvent::SyncRequested { .. })
    ));
    hub.accept_sync(device, 5); // the restored hub holds reports up to 5
    while let Some(b) = hub.poll_transmit() {
        agent.handle_input(now, &b);
    }
    // The agent's outbox starts at 9: 6..=8 were acknowledged by the hub before its
    // restore and deleted.
    agent.outbox_tail(now, 10);
    let mut wanted = None;
    while let Some(ev) = agent.poll_event() {
        if let AgentEvent::ReportsWanted { after, .. } = ev {
            wanted = Some(after);
        }
    }
    assert_eq!(wanted, Some(5));
    let report = |seq| Report {
        seq,
        at_ms: 0,
        body: ReportBody::Status(Status {
            desired_revision: 0,
            applied_revision: 0,
            failing: 0,
        }),
    };
    agent.send_reports(now, vec![report(9), report(10)]);
    pump_to_hub(&mut agent, &mut hub);
    assert_eq!(
        hub.poll_event(),
        Some(HubEvent::ReportsLost { from: 6, to: 8 })
    );
    match hub.poll_event() {
        Some(HubEvent::Reports(rs)) => {
            assert_eq!(rs.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![9, 10])
        }
        other => panic!("expected the reports after the gap, got {other:?}"),
    }
    // A declared gap that does not start where the hub stands is a violation.
    let mut hub2 = HubSession::new(now, &cfg);
    let hello = AgentMessage::Hello(Hello {
        min_version: PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        agent_version: Text::truncated("t"),
        intent: Intent::Sync { state_revision: 0 },
    });
    hub2.handle_input(now, &frame::encode(&hello, 1024).unwrap());
    let _ = hub2.poll_event();
    hub2.accept_sync(DeviceId::new("d").unwrap(), 5);
    let bad = AgentMessage::ReportsLost { after: 2, up_to: 8 };
    hub2.handle_input(now, &frame::encode(&bad, 1024).unwrap());
    assert!(matches!(
        hub2.poll_event(),
        Some(HubEvent::Failed(SessionError::Protocol(_)))
    ));
}
