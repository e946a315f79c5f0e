//! OS releases end to end on real parts: the real `cairn-hub` binary for keygen, build,
//! verify, push, ls, os set and status; a hub started in-process on loopback with its
//! real SQLite store and admin API; a device enrolled in that store with a certificate
//! the hub issued, connected over real QUIC with mutual TLS, fetching index and block
//! bytes on fetch streams and sending upgrade reports on its session stream.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_hub::cli::{Client, Connect};
use cairn_hub::server::{self, HubConfig, RunningHub};
use cairn_hub::store::{Enrollment, NewToken};
use cairn_sync_protocol::agent::{AgentEvent, AgentSession};
use cairn_sync_protocol::message::{Report, ReportBody, UpgradePhase, UpgradeReport};
use cairn_sync_protocol::release::{
    FetchRequest, FetchResponse, FetchWhat, MAX_FETCH_BLOCKS, ReleaseId, Slot,
};
use cairn_sync_protocol::{DeviceId, SessionConfig, Text, frame};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cairn-hub");

fn cli(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("CAIRN_CONFIG", dir.join("hub/cli.toml"))
        .env_remove("CAIRN_HUB_URL")
        .env_remove("CAIRN_ADMIN_TOKEN")
        .env_remove("CAIRN_CA_CERT")
        .output()
        .unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = cli(dir, args);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; its exit code and stderr.
fn fails(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = cli(dir, args);
    assert!(!out.status.success(), "{args:?} succeeded");
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn image(path: &Path, len: usize, seed: u8) -> Vec<u8> {
    let bytes: Vec<u8> = (0..len)
        .map(|i| ((i as u64 * 2654435761 + u64::from(seed)) >> 13) as u8)
        .collect();
    std::fs::write(path, &bytes).unwrap();
    bytes
}

async fn start_hub(dir: &Path) -> RunningHub {
    let mut cfg = HubConfig::new(dir.join("hub"));
    cfg.listen = "127.0.0.1:0".parse().unwrap();
    cfg.admin_listen = "127.0.0.1:0".parse().unwrap();
    server::start(cfg).await.unwrap()
}

fn client(dir: &Path) -> Client {
    Client::from_connect(&Connect {
        config: Some(dir.join("hub/cli.toml")),
        ..Connect::default()
    })
    .unwrap()
}

/// POSTs bundle bytes straight to the API (no CLI pre-checks): status and body.
async fn raw_push(dir: &Path, bytes: Vec<u8>) -> Result<Value, String> {
    let len = bytes.len() as u64;
    client(dir)
        .post_stream::<Value>("/v1/releases", reqwest::Body::from(bytes), len)
        .await
        .map_err(|e| format!("{:#}", e.error))
}

fn keygen(dir: &Path, name: &str) -> String {
    let out = ok(dir, &["release", "keygen", "--out", name, "--json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["public_key"].as_str().unwrap().to_string()
}

#[test]
fn keygen_makes_a_private_key_directory_when_there_is_none() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    keygen(dir, "keys/2025/release.pem");
    let mode = |p: &str| std::fs::metadata(dir.join(p)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode("keys"), 0o700);
    assert_eq!(mode("keys/2025"), 0o700);
    assert_eq!(mode("keys/2025/release.pem"), 0o600);
    assert!(dir.join("keys/2025/release.pem.pub").exists());
}

fn build(dir: &Path, version: &str, key: &str, out: &str, kernel: bool) -> Value {
    let mut args = vec![
        "release",
        "build",
        "rootfs.img",
        "--version",
        version,
        "--arch",
        "x86_64",
        "--board",
        "sim",
        "--key",
        key,
        "--out",
        out,
        "--json",
        "--expect-pcr",
        "4=0404040404040404040404040404040404040404040404040404040404040404",
    ];
    if kernel {
        args.extend(["--payload", "kernel=kernel.img"]);
    }
    serde_json::from_str(&ok(dir, &args)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_verify_push_ls_round_trip() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    image(&dir.join("rootfs.img"), 5 * 4096 + 77, 1);
    image(&dir.join("kernel.img"), 9000, 2);
    let pub_a = keygen(dir, "a.pem");
    keygen(dir, "b.pem");
    let built = build(dir, "1.2.0", "a.pem", "r.cairn", true);
    assert_eq!(built["version"], "1.2.0");
    assert_eq!(built["payloads"].as_array().unwrap().len(), 2);
    let bundle = std::fs::read(dir.join("r.cairn")).unwrap();
    assert_eq!(bundle.len() as u64, built["bundle_len"].as_u64().unwrap());

    // Offline verification: with the key, without (says so), with the wrong key.
    let out = ok(
        dir,
        &["release", "verify", "r.cairn", "--key-pub", "a.pem.pub"],
    );
    assert!(out.contains("signature by trusted release key"), "{out}");
    let out = ok(dir, &["release", "verify", "r.cairn"]);
    assert!(out.contains("signature NOT checked"), "{out}");
    let (code, err) = fails(
        dir,
        &["release", "verify", "r.cairn", "--key-pub", "b.pem.pub"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("does not trust"), "{err}");

    // Tampered copies: a payload byte, an index byte, a manifest byte.
    let l: Value = built.clone();
    let hlen = 20 + u32::from_le_bytes(bundle[16..20].try_into().unwrap()) as usize;
    let index_at = hlen.div_ceil(4096) * 4096;
    let rootfs_index_len = 6 * 32;
    let data_at = (index_at + rootfs_index_len).div_ceil(4096) * 4096;
    let tamper = |name: &str, at: usize| {
        let mut b = bundle.clone();
        b[at] ^= 0x40;
        std::fs::write(dir.join(name), &b).unwrap();
        b
    };
    let bad_payload = tamper("bad-payload.cairn", data_at + 4096 + 5);
    let bad_index = tamper("bad-index.cairn", index_at + 40);
    let bad_manifest = tamper("bad-manifest.cairn", hlen - 90);
    for (file, want) in [
        ("bad-payload.cairn", "payload rootfs"),
        ("bad-index.cairn", "block index of payload rootfs"),
        ("bad-manifest.cairn", "signature does not verify"),
    ] {
        let (code, err) = fails(dir, &["release", "verify", file, "--key-pub", "a.pem"]);
        assert_eq!(code, 1, "{file}");
        assert!(err.contains(want), "{file}: {err}");
    }
    let _ = l;

    let hub = start_hub(dir).await;
    // Unknown key: the CLI refuses before uploading, the API when it reads the header.
    let (code, err) = fails(dir, &["release", "push", "r.cairn"]);
    assert_eq!(code, 1);
    assert!(err.contains("does not trust"), "{err}");
    let e = raw_push(dir, bundle.clone()).await.unwrap_err();
    assert!(e.contains("trusts no release key"), "{e}");

    let out = ok(dir, &["release", "key", "add", "a.pem.pub", "--name", "ci"]);
    assert!(out.contains("now trusts"), "{out}");
    let keys: Value = serde_json::from_str(&ok(dir, &["release", "key", "ls", "--json"])).unwrap();
    assert_eq!(keys[0]["public_key"], pub_a.as_str());
    assert_eq!(keys[0]["name"], "ci");

    // Refused by the hub, each with its reason, nothing stored.
    for (bytes, want) in [
        (bad_payload.clone(), "payload rootfs"),
        (bad_index.clone(), "block index of payload rootfs"),
        (bad_manifest.clone(), "signature does not verify"),
        (bundle[..bundle.len() - 100].to_vec(), "truncated"),
        (
            b"not a bundle at all, just some bytes".to_vec(),
            "bad magic",
        ),
    ] {
        let e = raw_push(dir, bytes).await.unwrap_err();
        assert!(e.contains(want), "want {want:?}: {e}");
    }
    // A bundle signed with a key the hub does not trust.
    build(dir, "1.2.0", "b.pem", "other-key.cairn", true);
    let e = raw_push(dir, std::fs::read(dir.join("other-key.cairn")).unwrap())
        .await
        .unwrap_err();
    assert!(e.contains("does not trust"), "{e}");
    let rs: Value = serde_json::from_str(&ok(dir, &["release", "ls", "--json"])).unwrap();
    assert_eq!(rs.as_array().unwrap().len(), 0);

    let out = ok(dir, &["release", "push", "r.cairn"]);
    assert!(out.contains("pushed release 1.2.0"), "{out}");
    let stored = dir
        .join("hub/releases")
        .join(format!("{}.cairn", built["id"].as_str().unwrap()));
    assert_eq!(std::fs::read(&stored).unwrap(), bundle);
    // Same again: idempotent, through the CLI and the API.
    let out = ok(dir, &["release", "push", "r.cairn"]);
    assert!(out.contains("already on the hub"), "{out}");
    let again = raw_push(dir, bundle.clone()).await.unwrap();
    assert_eq!(again["outcome"], "already-present");
    // Same version, different bytes: refused (409) by CLI and API.
    image(&dir.join("rootfs.img"), 5 * 4096 + 78, 3);
    build(dir, "1.2.0", "a.pem", "r2.cairn", true);
    let (code, err) = fails(dir, &["release", "push", "r2.cairn"]);
    assert_eq!(code, 1);
    assert!(err.contains("different content"), "{err}");
    let e = raw_push(dir, std::fs::read(dir.join("r2.cairn")).unwrap())
        .await
        .unwrap_err();
    assert!(e.contains("already stored with different content"), "{e}");
    // A second version, without a kernel.
    build(dir, "1.10.0", "a.pem", "r3.cairn", false);
    ok(dir, &["release", "push", "r3.cairn"]);

    let rs: Value = serde_json::from_str(&ok(dir, &["release", "ls", "--json"])).unwrap();
    let versions: Vec<&str> = rs
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["1.2.0", "1.10.0"], "semver order");
    assert_eq!(rs[0]["key_id"], built["key_id"]);
    assert_eq!(rs[0]["payloads"][1]["name"], "kernel");
    assert_eq!(rs[0]["payloads"][1]["size"], 9000);
    let table = ok(dir, &["release", "ls"]);
    assert!(table.starts_with("VERSION  ARCH"), "{table}");
    assert!(
        table.contains("PUSHED") && table.contains("DEVICES"),
        "{table}"
    );
    // No half pushes left behind by the refused ones.
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.join("hub/releases"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(
        std::fs::read_dir(dir.join("hub/releases")).unwrap().count(),
        2
    );

    // rm: gone from ls and disk.
    ok(dir, &["release", "rm", "1.10.0"]);
    let (code, err) = fails(dir, &["release", "rm", "1.10.0"]);
    assert_eq!(code, 3, "{err}");
    hub.shutdown().await;
}

/// A device enrolled in the hub's store with a certificate the hub issued, its key.
async fn enroll_device(hub: &RunningHub) -> (DeviceId, Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    let csr = params.serialize_request(&key).unwrap();
    let (device, cert) = hub.keys.issue_device_cert(csr.der().as_ref()).unwrap();
    hub.store
        .create_token(NewToken {
            id: "tok".into(),
            secret_hash: [7; 32],
            created_ms: 0,
            expires_ms: u64::MAX / 2,
            uses: 1,
            labels: cairn_hub::desired::parse_labels("site=lab").unwrap(),
        })
        .await
        .unwrap();
    hub.store
        .enroll(Enrollment {
            token_id: "tok".into(),
            secret_hash: [7; 32],
            device: device.clone(),
            hostname: "box-1".into(),
            agent_version: "test".into(),
            now_ms: cairn_hub::endpoint::now_ms(),
            attestation: None,
        })
        .await
        .unwrap()
        .unwrap();
    (device, cert, key.serialize_der())
}

struct Device {
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    session: AgentSession,
    _endpoint: quinn::Endpoint,
}

impl Device {
    async fn connect(hub: &RunningHub, cert: &[u8], key: &[u8]) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(hub.keys.ca_cert_der.clone()).unwrap();
        let mut tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(
                vec![rustls::pki_types::CertificateDer::from(cert.to_vec())],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.to_vec().into()),
            )
            .unwrap();
        tls.alpn_protocols = vec![cairn_sync_protocol::message::ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        let conn = endpoint
            .connect(hub.endpoints.quic, cairn_hub::pki::HUB_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let session = AgentSession::sync(Instant::now(), SessionConfig::default(), 0, "test");
        let mut d = Self {
            conn,
            send,
            recv,
            session,
            _endpoint: endpoint,
        };
        d.until(|e| matches!(e, AgentEvent::Welcomed { .. })).await;
        d
    }

    /// Drives the session until an event matching `want` (other events are ignored).
    async fn until(&mut self, want: impl Fn(&AgentEvent) -> bool) -> AgentEvent {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            while let Some(b) = self.session.poll_transmit() {
                self.send.write_all(&b).await.unwrap();
            }
            while let Some(ev) = self.session.poll_event() {
                assert!(
                    !matches!(ev, AgentEvent::Failed(_) | AgentEvent::Refused(_)),
                    "{ev:?}"
                );
                if want(&ev) {
                    return ev;
                }
            }
            let chunk = tokio::time::timeout_at(deadline, self.recv.read_chunk(65536, true))
                .await
                .expect("session event in time")
                .unwrap()
                .expect("session stream open");
            self.session.handle_input(Instant::now(), &chunk.bytes);
        }
    }

    /// Sends raw bytes on a new fetch stream; the response and the data after it.
    async fn fetch_raw(&self, bytes: &[u8]) -> (FetchResponse, Vec<u8>) {
        let (mut send, mut recv) = self.conn.open_bi().await.unwrap();
        send.write_all(bytes).await.unwrap();
        let _ = send.finish();
        let all = tokio::time::timeout(Duration::from_secs(20), recv.read_to_end(16 << 20))
            .await
            .expect("fetch answered in time")
            .unwrap();
        let len = u32::from_be_bytes(all[..4].try_into().unwrap()) as usize;
        let resp: FetchResponse = frame::decode_payload(&all[4..4 + len]).unwrap();
        (resp, all[4 + len..].to_vec())
    }

    async fn fetch(&self, req: &FetchRequest) -> (FetchResponse, Vec<u8>) {
        self.fetch_raw(&frame::encode(req, 65536).unwrap()).await
    }
}

fn refused(r: &(FetchResponse, Vec<u8>), want: &str) {
    match &r.0 {
        FetchResponse::Refused(why) => {
            assert!(why.as_str().contains(want), "want {want:?}: {why}");
            assert!(r.1.is_empty());
        }
        other => panic!("want a refusal ({want}), got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_streams_serve_exact_bytes_and_refuse_bad_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let rootfs = image(&dir.join("rootfs.img"), 40 * 4096 + 1234, 9);
    let kernel = image(&dir.join("kernel.img"), 4096, 8);
    keygen(dir, "a.pem");
    let built = build(dir, "2.0.0", "a.pem", "r.cairn", true);
    let id_hex = built["id"].as_str().unwrap().to_string();
    let mut id = [0u8; 32];
    id.copy_from_slice(&hex::decode(&id_hex).unwrap());
    let release = ReleaseId(id);

    let hub = start_hub(dir).await;
    ok(dir, &["release", "key", "add", "a.pem"]);
    ok(dir, &["release", "push", "r.cairn"]);
    let (device, cert, key) = enroll_device(&hub).await;
    let out = ok(dir, &["os", "set", "--device", device.as_str(), "2.0.0"]);
    assert!(out.contains("1 got a new signed revision"), "{out}");
    let d = Device::connect(&hub, &cert, &key).await;

    // The index of each payload, exactly.
    let index = |bytes: &[u8]| -> Vec<u8> {
        bytes
            .chunks(4096)
            .flat_map(|c| <sha2::Sha256 as sha2::Digest>::digest(c).to_vec())
            .collect()
    };
    let req = |payload, what| FetchRequest {
        release,
        payload,
        what,
    };
    let (r, bytes) = d.fetch(&req(0, FetchWhat::Index)).await;
    assert_eq!(r, FetchResponse::Ok { len: 41 * 32 });
    assert_eq!(bytes, index(&rootfs));
    let (_, bytes) = d.fetch(&req(1, FetchWhat::Index)).await;
    assert_eq!(bytes, index(&kernel));
    // Blocks, including the short last one; two streams at once.
    let (ra, rb) = (
        req(0, FetchWhat::Blocks { first: 3, count: 5 }),
        req(
            0,
            FetchWhat::Blocks {
                first: 39,
                count: 2,
            },
        ),
    );
    let (a, b) = tokio::join!(d.fetch(&ra), d.fetch(&rb));
    assert_eq!(a.0, FetchResponse::Ok { len: 5 * 4096 });
    assert_eq!(a.1, rootfs[3 * 4096..8 * 4096]);
    assert_eq!(b.0, FetchResponse::Ok { len: 4096 + 1234 });
    assert_eq!(b.1, rootfs[39 * 4096..]);
    let (_, bytes) = d
        .fetch(&req(1, FetchWhat::Blocks { first: 0, count: 1 }))
        .await;
    assert_eq!(bytes, kernel);

    // Refusals, each saying what was wrong; the connection stays usable.
    refused(
        &d.fetch(&FetchRequest {
            release: ReleaseId([1; 32]),
            payload: 0,
            what: FetchWhat::Index,
        })
        .await,
        "not on this hub",
    );
    refused(
        &d.fetch(&req(2, FetchWhat::Index)).await,
        "payload 2 does not exist",
    );
    refused(
        &d.fetch(&req(
            0,
            FetchWhat::Blocks {
                first: 40,
                count: 2,
            },
        ))
        .await,
        "out of range",
    );
    refused(
        &d.fetch(&req(
            0,
            FetchWhat::Blocks {
                first: u64::MAX,
                count: 1,
            },
        ))
        .await,
        "out of range",
    );
    refused(
        &d.fetch(&req(0, FetchWhat::Blocks { first: 0, count: 0 }))
            .await,
        "count 0",
    );
    refused(
        &d.fetch(&req(
            0,
            FetchWhat::Blocks {
                first: 0,
                count: MAX_FETCH_BLOCKS + 1,
            },
        ))
        .await,
        "1 to 1024 blocks",
    );
    refused(
        &d.fetch_raw(&[0, 0, 0, 3, 0xff, 0xff, 0xff]).await,
        "malformed",
    );
    refused(&d.fetch_raw(&[0, 16, 0, 0]).await, "exceeds the limit");
    refused(&d.fetch_raw(&[0, 0, 1]).await, "stream ended inside");
    let mut two = frame::encode(&req(0, FetchWhat::Index), 65536).unwrap();
    two.extend(two.clone());
    refused(&d.fetch_raw(&two).await, "one request per stream");

    // The session still works: upgrade reports go through and are stored.
    let report = |seq, phase, done, down, error: Option<&str>| Report {
        seq,
        at_ms: cairn_hub::endpoint::now_ms(),
        body: ReportBody::Upgrade(UpgradeReport {
            version: Text::new("2.0.0").unwrap(),
            phase,
            target_slot: Slot::B,
            booted_slot: Slot::A,
            committed_version: Text::new("1.0.0").unwrap(),
            bytes_done: done,
            bytes_total: 1000,
            bytes_downloaded: down,
            error: error.map(Text::truncated),
        }),
    };
    let mut d = d;
    d.session.send_reports(
        Instant::now(),
        vec![
            report(1, UpgradePhase::Downloading, 450, 120, None),
            report(2, UpgradePhase::TrialRunning, 1000, 300, None),
        ],
    );
    d.until(|e| matches!(e, AgentEvent::ReportsAcked { up_to: 2 }))
        .await;
    let devices: Value = serde_json::from_str(&ok(dir, &["devices", "--json"])).unwrap();
    assert_eq!(devices[0]["upgrade"]["phase"], "trial-running");
    assert_eq!(devices[0]["upgrade"]["bytes_downloaded"], 300);
    let st: Value =
        serde_json::from_str(&ok(dir, &["release", "status", "2.0.0", "--json"])).unwrap();
    assert_eq!(st["devices"][0]["device"], device.as_str());
    assert_eq!(st["devices"][0]["state"], "trial-running");
    d.session.send_reports(
        Instant::now(),
        vec![report(
            3,
            UpgradePhase::RolledBack,
            1000,
            300,
            Some("health check `systemctl is-active app` failed"),
        )],
    );
    d.until(|e| matches!(e, AgentEvent::ReportsAcked { up_to: 3 }))
        .await;

    let table = ok(dir, &["devices"]);
    assert!(table.lines().next().unwrap().ends_with("OS"), "{table}");
    assert!(table.contains("1.0.0 (2.0.0 rolled-back)"), "{table}");
    let show = ok(dir, &["device", "show", device.as_str()]);
    assert!(
        show.contains("upgrade:      2.0.0 rolled-back into slot B"),
        "{show}"
    );
    assert!(show.contains("error:        health check"), "{show}");
    assert!(show.contains("release 2.0.0"), "{show}");
    let evs: Value =
        serde_json::from_str(&ok(dir, &["events", "--device", device.as_str(), "--json"])).unwrap();
    let ups: Vec<(&str, &str)> = evs
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"].as_str().unwrap().starts_with("upgrade."))
        .map(|e| (e["kind"].as_str().unwrap(), e["message"].as_str().unwrap()))
        .collect();
    assert_eq!(
        ups,
        [
            (
                "upgrade.downloading",
                "2.0.0 downloading 45% (12% downloaded)"
            ),
            (
                "upgrade.trial-running",
                "2.0.0 trial-running (slot B, booted A)"
            ),
            (
                "upgrade.rolled-back",
                "2.0.0 rolled back: health check `systemctl is-active app` failed"
            ),
        ]
    );
    let table = ok(dir, &["release", "status", "2.0.0"]);
    assert!(
        table.contains("rolled-back") && table.contains("health check"),
        "{table}"
    );
    let (code, err) = fails(dir, &["release", "rm", "2.0.0"]);
    assert_eq!(code, 1);
    assert!(err.contains("still assigned"), "{err}");

    let health: Value = client(dir).get("/v1/health").await.unwrap();
    let served = (41 * 32 + 32 + 5 * 4096 + 4096 + 1234 + 4096) as u64;
    assert_eq!(health["fetch_bytes_served"].as_u64().unwrap(), served);
    assert_eq!(health["fetch_refused"].as_u64().unwrap(), 10);

    d.conn.close(0u32.into(), b"done");
    hub.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assigned_release_pcrs_become_expected_measurements() {
    use cairn_hub::store::{AttestOutcome, NewAttestation};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    image(&dir.join("rootfs.img"), 3 * 4096, 4);
    keygen(dir, "a.pem");
    build(dir, "3.0.0", "a.pem", "r.cairn", false);
    let hub = start_hub(dir).await;
    ok(dir, &["release", "key", "add", "a.pem.pub"]);
    ok(dir, &["release", "push", "r.cairn"]);
    hub.store
        .create_token(NewToken {
            id: "tok".into(),
            secret_hash: [7; 32],
            created_ms: 0,
            expires_ms: u64::MAX / 2,
            uses: 1,
            labels: cairn_hub::desired::parse_labels("role=kiosk").unwrap(),
        })
        .await
        .unwrap();
    let device = DeviceId::new("dev-attested").unwrap();
    hub.store
        .enroll(Enrollment {
            token_id: "tok".into(),
            secret_hash: [7; 32],
            device: device.clone(),
            hostname: "kiosk".into(),
            agent_version: "test".into(),
            now_ms: 1,
            attestation: Some(NewAttestation {
                kind: "software".into(),
                ek_public: vec![1, 2, 3],
                ek_issuer: None,
                ak_public: vec![4, 5, 6],
                outcome: AttestOutcome {
                    quarantine: None,
                    pcrs: None,
                    log: None,
                    reset_count: None,
                    record: None,
                    ima: None,
                    now_ms: 1,
                },
            }),
        })
        .await
        .unwrap()
        .unwrap();
    ok(dir, &["os", "set", "--selector", "role=kiosk", "3.0.0"]);
    let a: Value = client(dir)
        .get(&format!("/v1/devices/{device}/attestation"))
        .await
        .unwrap();
    let sets = a["accepted"].as_array().unwrap();
    let release = sets
        .iter()
        .find(|s| s["source"] == "release 3.0.0")
        .unwrap_or_else(|| panic!("{a}"));
    assert_eq!(
        release["pcrs"]["4"],
        "0404040404040404040404040404040404040404040404040404040404040404"
    );
    let state: Value = client(dir)
        .get(&format!("/v1/devices/{device}/state"))
        .await
        .unwrap();
    assert_eq!(state["resources"][0]["kind"], "os");
    assert_eq!(state["resources"][0]["version"], "3.0.0");
    // The name `os` is the OS's; a file may not take it, an OS no other name.
    let (_, err) = fails(
        dir,
        &[
            "set",
            "--device",
            device.as_str(),
            "os",
            "--path",
            "etc/os",
            "--content",
            "x",
        ],
    );
    assert!(err.contains("reserved for the desired OS"), "{err}");
    hub.shutdown().await;
}
