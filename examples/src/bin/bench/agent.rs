//! The `core` section: bytes on the wire for a one-key change, an offline backlog caught
//! up, and the agent as a process (idle RSS, binary size) beside the Mender client.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_agent::AgentConfig;
use cairn_examples::{AgentTask, create_token, file, selector, set, start_hub};
use cairn_sync_protocol::DeviceId;
use cairn_sync_protocol::frame;
use cairn_sync_protocol::message::{EventKind, HubMessage};

use crate::{Row, row};

async fn wait<F: AsyncFnMut() -> Result<bool>>(
    what: &str,
    timeout: Duration,
    mut f: F,
) -> Result<()> {
    let start = Instant::now();
    while !f().await? {
        if start.elapsed() > timeout {
            bail!("timed out waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Bytes on the wire for a full snapshot of 50 files and for a one-key change.
pub(crate) async fn wire_bytes(dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let hub = start_hub(&dir.join("hub-wire")).await?;
    let tok = create_token(&hub, 1, "site=bench").await?;
    let mut cfg = AgentConfig::new(hub.endpoints.quic.to_string(), dir.join("agent-wire"));
    cfg.join_token = Some(tok);
    let mut agent = AgentTask::new(cfg);
    agent.start();
    wait("enrollment", Duration::from_secs(30), async || {
        Ok(hub.store.devices().await?.len() == 1)
    })
    .await?;
    let id: DeviceId = hub.store.devices().await?[0].id.clone();
    for i in 0..50 {
        let content = format!("key = value {i}\nother = 12345\n");
        let f = file(&format!("etc/app/conf{i:02}.ini"), &content)?;
        set(&hub, selector("site=bench")?, &format!("conf{i:02}"), f).await?;
    }
    let snap = hub.store.state_snapshot(&id).await?.context("no state")?;
    let snap_bytes = frame::encode(&HubMessage::State(snap.clone()), usize::MAX)?.len();
    let changed = file("etc/app/conf07.ini", "key = value 8\nother = 12345\n")?;
    set(&hub, selector("site=bench")?, "conf07", changed).await?;
    let delta = hub
        .store
        .state_update(&id, snap.revision)
        .await?
        .context("no delta")?;
    let delta_bytes = frame::encode(&HubMessage::State(delta), usize::MAX)?.len();
    rows.push(row(
        "one-key change on the wire (frame incl. 64-byte signature)",
        format!("{delta_bytes} B"),
        "< 200 B",
        format!("full snapshot of the same 50-file document: {snap_bytes} B"),
    ));
    agent.stop().await;
    hub.shutdown().await;
    Ok(())
}

/// 10,000 events queued while offline, caught up after reconnecting.
pub(crate) async fn backlog(dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    const N: usize = 10_000;
    let hub = start_hub(&dir.join("hub-backlog")).await?;
    let tok = create_token(&hub, 1, "site=bench").await?;
    let mut cfg = AgentConfig::new(hub.endpoints.quic.to_string(), dir.join("agent-backlog"));
    cfg.join_token = Some(tok);
    let mut agent = AgentTask::new(cfg.clone());
    agent.start();
    wait("enrollment", Duration::from_secs(30), async || {
        Ok(hub.store.devices().await?.iter().any(|d| d.online))
    })
    .await?;
    agent.stop().await;
    // The agent's own store records the offline events, as its reconciler would.
    let last = {
        let mut store = cairn_agent::store::Store::open(&cfg.db_path())?;
        let bodies = (0..N)
            .map(|i| {
                cairn_agent::store::event_body(
                    EventKind::DriftCorrected,
                    None,
                    Some(1),
                    &format!("etc/app/conf{i} was changed locally; restored"),
                )
            })
            .collect();
        store.push_reports(bodies)?
    };
    let start = Instant::now();
    agent.start();
    wait("backlog delivered", Duration::from_secs(120), async || {
        Ok(hub
            .store
            .devices()
            .await?
            .first()
            .is_some_and(|d| d.reports_acked >= last))
    })
    .await?;
    let took = start.elapsed();
    agent.stop().await;
    let stored = hub
        .store
        .events(cairn_hub::store::EventFilter {
            kind: Some("drift-corrected".into()),
            limit: 1_000_000,
            ..Default::default()
        })
        .await?
        .len();
    hub.shutdown().await;
    if stored != N {
        bail!("backlog: {stored} of {N} drift events stored");
    }

    // Baseline: the same number of rows inserted into SQLite in one transaction.
    let conn = rusqlite_baseline(&dir.join("baseline.db"), N)?;
    rows.push(row(
        "10,000 offline events caught up (reconnect to all stored, none lost or doubled)",
        format!("{:.2} s", took.as_secs_f64()),
        "< 2 s",
        format!(
            "plain SQLite insert of 10,000 rows, one transaction: {:.3} s (ratio {:.1}x)",
            conn.as_secs_f64(),
            took.as_secs_f64() / conn.as_secs_f64()
        ),
    ));
    Ok(())
}

fn rusqlite_baseline(path: &Path, n: usize) -> Result<Duration> {
    let c = rusqlite::Connection::open(path)?;
    c.execute_batch(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
         CREATE TABLE e (id INTEGER PRIMARY KEY, seq INTEGER, msg TEXT);",
    )?;
    let start = Instant::now();
    c.execute_batch("BEGIN")?;
    for i in 0..n {
        c.execute(
            "INSERT INTO e (seq, msg) VALUES (?1, ?2)",
            rusqlite::params![
                i as i64,
                format!("etc/app/conf{i} was changed locally; restored")
            ],
        )?;
    }
    c.execute_batch("COMMIT")?;
    Ok(start.elapsed())
}

/// Idle RSS and stripped size of the release agent binary.
pub(crate) async fn agent_process(dir: &Path, idle: Duration, rows: &mut Vec<Row>) -> Result<()> {
    // The shipped agent is built with the size-optimised `agent` profile; fall back to
    // the release build next to this binary.
    let exe_dir = std::env::current_exe()?
        .parent()
        .map(Path::to_path_buf)
        .context("no exe dir")?;
    let shipped = exe_dir.join("../agent/cairn-agent");
    let (bin, profile) = if shipped.exists() {
        (shipped, "agent profile, opt-level s")
    } else {
        (exe_dir.join("cairn-agent"), "release profile")
    };
    if !bin.exists() {
        bail!(
            "{} missing: run `cargo build --profile agent -p cairn-agent` first",
            bin.display()
        );
    }
    let size = std::fs::metadata(&bin)?.len();
    let hub = start_hub(&dir.join("hub-rss")).await?;
    let tok = create_token(&hub, 1, "site=bench").await?;
    let data = dir.join("agent-rss");
    let mut child = tokio::process::Command::new(&bin)
        .args([
            "run",
            "--hub",
            &hub.endpoints.quic.to_string(),
            "--join-token",
            &tok,
            "--data-dir",
        ])
        .arg(&data)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()?;
    wait("agent online", Duration::from_secs(30), async || {
        Ok(hub.registry.online_count() == 1)
    })
    .await?;
    tokio::time::sleep(idle).await;
    let pid = child.id().context("agent exited")?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS")?;
    let (our_libs, our_libs_mb) = cairn_examples::peers::shared_libs_of(pid)?;
    let _ = child.kill().await;
    hub.shutdown().await;
    // The peer, measured now on this machine in the same way.
    let peer = match tokio::task::spawn_blocking(move || cairn_examples::peers::mender(idle))
        .await
        .context("peer measurement task")?
    {
        Ok(Ok(p)) => Some(p),
        Ok(Err(why)) => {
            eprintln!("bench: peer not measured: {why}");
            None
        }
        Err(e) => {
            eprintln!("bench: measuring the peer failed: {e:#}");
            None
        }
    };
    let secs = idle.as_secs();
    rows.push(row(
        &format!("agent idle RSS ({profile}, connected, {secs} s idle, x86_64)"),
        format!("{:.1} MB", rss_kb as f64 / 1024.0),
        "< 6 MB",
        match &peer {
            Some(p) => format!(
                "{} {}: {:.1} MB (ratio {:.2}); {}",
                p.name,
                p.version,
                p.idle_rss_mb,
                (rss_kb as f64 / 1024.0) / p.idle_rss_mb.max(0.001),
                p.how
            ),
            None => "peer not installed in this run (MACHINE.md: Mender client 3.4 38 MB)".into(),
        },
    ));
    rows.push(row(
        &format!("agent binary, stripped ({profile}, x86_64)"),
        format!("{:.1} MB", size as f64 / 1_048_576.0),
        "< 5 MB",
        match &peer {
            Some(p) => format!(
                "{} {}: {:.1} MB binary + {:.1} MB shared libraries; ours: + {our_libs_mb:.1} MB shared libraries ({our_libs} files: libc and the TPM stack tpm2-tss; the rest is static)",
                p.name, p.version, p.binary_mb, p.shared_libs_mb
            ),
            None => "peer not installed in this run (MACHINE.md: Mender client 3.4 10.3 MB)".into(),
        },
    ));
    Ok(())
}
