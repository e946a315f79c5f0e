//! The benchmark harness. Prints Markdown tables of figures, each beside its target and,
//! where one exists, a baseline or peer measured in the same run; `--write` puts them
//! into BENCHMARKS.md with the machine and the date.
//!
//! ```text
//! cargo build --release -p cairn-examples -p cairn-agent && cargo build --profile agent -p cairn-agent
//! cargo run --release -p cairn-examples --bin bench -- --write BENCHMARKS.md
//! ```
//! Sections: `core` (wire bytes, offline backlog, agent RSS and size, the Mender client
//! side by side), `fleet` (hub RSS/CPU with 1k/5k/10k real agents, one change to all,
//! reconnect storm; runs `fleet-sim` with `examples/scenarios/bench.toml`), `det`
//! (deterministic simulator throughput at 100,000 devices), `tpm` (quote and evidence
//! verification), `upgrade` (a 256 MiB image installed into a file-backed slot by our
//! installer, `dd` and RAUC 1.8 from a cold page cache, median of `--upgrade-runs`; the
//! share of a 10%-changed image fetched as a delta, beside casync's new chunks; needs
//! root for `drop_caches`, and Debian's rauc, rauc-service, squashfs-tools, casync and
//! e2fsprogs for the peers).
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_agent::AgentConfig;
use cairn_examples::report::Report;
use cairn_examples::{AgentTask, create_token, file, mutate_blocks, selector, set, start_hub};
use cairn_sync_protocol::DeviceId;
use cairn_sync_protocol::frame;
use cairn_sync_protocol::message::{EventKind, HubMessage};
use clap::Parser;

/// Measure Cairn and print (or write) the figures of BENCHMARKS.md.
#[derive(Parser)]
#[command(
    name = "bench",
    after_help = "Build first: cargo build --release -p cairn-examples -p cairn-agent && cargo build --profile agent -p cairn-agent\nThe peer comparison needs Debian's mender-client (scripts/bench.sh installs it)."
)]
struct Args {
    /// Sections to run (core, fleet, det, tpm, upgrade); all by default.
    #[arg(long, value_delimiter = ',', default_values_t = vec!["core".to_string(), "fleet".into(), "det".into(), "tpm".into(), "upgrade".into()])]
    sections: Vec<String>,
    /// Fleet sizes for the fleet section.
    #[arg(long, value_delimiter = ',', default_values_t = vec![1000usize, 5000, 10000])]
    fleet_sizes: Vec<usize>,
    /// How long agents (ours and the peer) idle before their memory is read.
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    idle: Duration,
    /// Replace the generated sections of this Markdown file (between
    /// `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`) with this run's tables.
    #[arg(long, value_name = "BENCHMARKS.md")]
    write: Option<PathBuf>,
    /// Runs of each installer (ours, dd, RAUC) in the upgrade section; the median counts.
    #[arg(long, default_value_t = 7, value_parser = clap::value_parser!(u16).range(1..=50))]
    upgrade_runs: u16,
}

struct Row {
    what: String,
    figure: String,
    target: String,
    baseline: String,
}

fn row(what: &str, figure: String, target: &str, baseline: String) -> Row {
    Row {
        what: what.into(),
        figure,
        target: target.into(),
        baseline,
    }
}

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
async fn wire_bytes(dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
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
async fn backlog(dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
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
async fn agent_process(dir: &Path, idle: Duration, rows: &mut Vec<Row>) -> Result<()> {
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

/// Runs `fleet-sim` (next to this binary) on a scenario and returns its report.
fn fleet_sim(args: &[&str], scenario: &str, dir: &Path) -> Result<Report> {
    let exe = std::env::current_exe()?
        .parent()
        .map(|d| d.join("fleet-sim"))
        .context("no exe dir")?;
    if !exe.exists() {
        bail!(
            "{} missing: cargo build --release -p cairn-examples",
            exe.display()
        );
    }
    let path = dir.join("scenario.toml");
    std::fs::write(&path, scenario)?;
    let out = std::process::Command::new(&exe)
        .arg("--scenario")
        .arg(&path)
        .args(["--json", "--no-progress"])
        .args(args)
        .output()
        .context("running fleet-sim")?;
    if !out.status.success() && out.status.code() != Some(1) {
        bail!(
            "fleet-sim {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let report: Report = serde_json::from_slice(&out.stdout).context("fleet-sim's report")?;
    if !report.passed() {
        bail!(
            "fleet-sim {args:?}: invariants failed, figures not usable:\n{}",
            report.render()
        );
    }
    Ok(report)
}

/// Hub RSS and CPU with N connected real agents, one change to all, reconnect storm.
fn fleet(sizes: &[usize], dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let scenario = include_str!("../../scenarios/bench.toml");
    for &n in sizes {
        eprintln!("bench: fleet of {n} real agents…");
        let started = Instant::now();
        // Agents' data on a tmpfs when there is one: on a real fleet each agent fsyncs
        // its own disk; here 10,000 would queue on one. The hub's database stays on disk.
        let shm = Path::new("/dev/shm");
        let mut fs_args = vec!["--devices".to_string(), n.to_string()];
        if shm.is_dir() {
            fs_args.extend(["--agents-dir".to_string(), shm.display().to_string()]);
        }
        let refs: Vec<&str> = fs_args.iter().map(String::as_str).collect();
        let r = fleet_sim(&refs, scenario, dir)?;
        let hub = r.hub.clone().unwrap_or_default();
        // Idle: the first step sleeps 20 s with every agent connected.
        let idle: Vec<_> = r
            .timeline
            .iter()
            .filter(|s| s.t_ms <= 20_000 && s.hub_cpu_secs.is_some())
            .collect();
        let (cpu_idle, rss_idle) = match (idle.first(), idle.last()) {
            (Some(a), Some(b)) if b.t_ms > a.t_ms => (
                100.0 * (b.hub_cpu_secs.unwrap_or(0.0) - a.hub_cpu_secs.unwrap_or(0.0))
                    / ((b.t_ms - a.t_ms) as f64 / 1000.0),
                b.hub_rss_mb.unwrap_or(0.0),
            ),
            _ => (0.0, 0.0),
        };
        let change = r.phases.first().cloned().unwrap_or_default();
        let storm = r.phases.get(1).cloned().unwrap_or_default();
        rows.push(row(
            &format!("hub with {n} connected agents, idle: RSS / CPU"),
            format!("{rss_idle:.0} MB / {cpu_idle:.1}% of a core"),
            if n == 10_000 { "< 350 MB" } else { "—" },
            format!(
                "peak RSS over the run {:.0} MB; quinn alone ~28 KB per connection here (MACHINE.md): {:.0} MB",
                hub.rss_peak_mb,
                n as f64 * 28.0 / 1024.0
            ),
        ));
        rows.push(row(
            &format!("one desired-state change applied by {n} agents: p50 / p99 / max"),
            format!(
                "{} / {} / {} ms",
                change.p50_ms, change.p99_ms, change.max_ms
            ),
            if n == 10_000 { "< 2 s" } else { "—" },
            format!(
                "the hub: admin API call {} ms (signs and stores {n} revisions), {:.1} CPU-s until all applied; bare quinn broadcast + ack to 10k: ~0.4 s (MACHINE.md)",
                r.actions.first().map_or(0, |a| a.ms),
                change.hub_cpu_secs.unwrap_or(0.0)
            ),
        ));
        rows.push(row(
            &format!(
                "reconnect storm: {n} agents after a hub SIGKILL + restart, until all resynced"
            ),
            format!(
                "{:.1} s (p50 {:.1} s)",
                storm.max_ms as f64 / 1000.0,
                storm.p50_ms as f64 / 1000.0
            ),
            if n == 10_000 { "< 30 s" } else { "—" },
            format!(
                "hub CPU {:.1} s for the storm; whole run {:.0} s incl. enrollment",
                storm.hub_cpu_secs.unwrap_or(0.0),
                started.elapsed().as_secs_f64()
            ),
        ));
    }
    Ok(())
}

/// Quote verifications per second on one core, with real quotes from swtpm (the
/// fixtures of `tpm/tests/quotes.rs`): signature, nonce and PCR digest each time.
fn quotes(rows: &mut Vec<Row>) -> Result<()> {
    use cairn_tpm::quote::{AkPublic, verify_quote};
    macro_rules! fixture {
        ($kind:literal, $file:literal) => {
            include_bytes!(concat!(
                "../../../tpm/tests/fixtures/quotes/",
                $kind,
                "/",
                $file
            ))
        };
    }
    struct Case {
        name: &'static str,
        ak: &'static [u8],
        msg: &'static [u8],
        sig: &'static [u8],
        nonce: &'static str,
        pcrs: &'static str,
    }
    let cases = [
        Case {
            name: "ECDSA P-256",
            ak: fixture!("ecc", "ak.pub"),
            msg: fixture!("ecc", "quote.msg"),
            sig: fixture!("ecc", "quote.sig"),
            nonce: include_str!("../../../tpm/tests/fixtures/quotes/ecc/nonce.hex"),
            pcrs: include_str!("../../../tpm/tests/fixtures/quotes/ecc/pcrs.txt"),
        },
        Case {
            name: "RSA-2048",
            ak: fixture!("rsa", "ak.pub"),
            msg: fixture!("rsa", "quote.msg"),
            sig: fixture!("rsa", "quote.sig"),
            nonce: include_str!("../../../tpm/tests/fixtures/quotes/rsa/nonce.hex"),
            pcrs: include_str!("../../../tpm/tests/fixtures/quotes/rsa/pcrs.txt"),
        },
    ];
    for Case {
        name,
        ak,
        msg,
        sig,
        nonce,
        pcrs,
    } in cases
    {
        let ak = AkPublic::from_tpm2b_public(ak)?;
        let nonce = hex::decode(nonce.trim())?;
        let mut expected = std::collections::BTreeMap::new();
        for line in pcrs.lines() {
            let (i, v) = line.split_once(':').context("pcrs.txt line")?;
            let v: [u8; 32] = hex::decode(v.trim())?
                .try_into()
                .map_err(|_| anyhow::anyhow!("PCR value is not 32 bytes"))?;
            expected.insert(i.trim().parse::<u32>()?, v);
        }
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(2) {
            verify_quote(&ak, msg, sig, &nonce, &expected)?;
            n += 1;
        }
        let rate = n as f64 / start.elapsed().as_secs_f64();
        rows.push(row(
            &format!("hub quote verification, {name} AK (one thread)"),
            format!("{rate:.0} quotes/s"),
            ">= 2,000 quotes/s per core",
            "real swtpm quotes; signature + nonce + PCR digest per verification".into(),
        ));
    }
    evidence(rows)
}

/// What a session's attestation costs the hub beyond the quote: parsing and replaying
/// a real firmware event log, and the whole `verify_evidence` (quote, PCR values, log)
/// as the hub runs it for every session.
fn evidence(rows: &mut Vec<Row>) -> Result<()> {
    use cairn_tpm::attest::{Attester, verify_evidence};
    use cairn_tpm::eventlog::{alg, parse};
    use cairn_tpm::quote::AkPublic;
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/fixtures/ovmf-swtpm/boot-a.eventlog");
    let log = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
    let events = parse(&log)?.events.len();
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        parse(&log)?.replay(alg::SHA256)?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    rows.push(row(
        "hub event-log parse + replay, real OVMF boot (one thread)",
        format!("{rate:.0} logs/s"),
        "",
        format!(
            "boot-a of ../shared/fixtures/ovmf-swtpm: {} KB, {events} events",
            log.len() / 1024
        ),
    ));

    let mut tpm = cairn_tpm::soft::SoftTpm::ephemeral(1, "bench");
    let pcrs: Vec<u32> = (0..=15).collect();
    let nonce = [7u8; 32];
    let quoted = tpm.quote(&nonce, &pcrs)?;
    let log = tpm.event_log()?;
    let ak = AkPublic::from_tpm2b_public(&tpm.identity().ak_public)?;
    let start = Instant::now();
    let mut n = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        verify_evidence(&ak, &quoted.quote, &quoted.pcrs, &nonce, &pcrs, &log)?;
        n += 1;
    }
    let rate = n as f64 / start.elapsed().as_secs_f64();
    rows.push(row(
        "hub evidence verification, ECDSA P-256 AK (one thread)",
        format!("{rate:.0} sessions/s"),
        ">= 2,000 quotes/s per core",
        format!(
            "software-TPM quote over PCRs 0-15 + its {}-event log replayed and compared, as per session",
            parse(&log)?.events.len()
        ),
    ));
    Ok(())
}

/// Deterministic simulator throughput at 100,000 devices.
fn det(dir: &Path, rows: &mut Vec<Row>) -> Result<()> {
    let scenario = include_str!("../../scenarios/100k.toml");
    eprintln!("bench: deterministic simulator, 100,000 devices…");
    let r = fleet_sim(&["--deterministic"], scenario, dir)?;
    rows.push(row(
        "deterministic simulator: 100,000 devices, scenario 100k",
        format!(
            "{:.0} device-s per wall-s ({:.1} s simulated in {:.1} s)",
            r.devices as f64 * r.simulated_secs / r.wall_secs.max(0.001),
            r.simulated_secs,
            r.wall_secs
        ),
        "100,000 devices on 2 cores",
        format!(
            "real time: {} device-s per wall-s; {} reports delivered, {} sessions",
            r.devices, r.events.delivered, r.faults.sessions
        ),
    ));
    Ok(())
}

/// Empties the page cache (we run as root); false when that is not allowed here.
fn drop_caches() -> bool {
    let synced = std::process::Command::new("sync")
        .status()
        .is_ok_and(|s| s.success());
    synced && std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_ok()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A 256 MiB ext4 image of random files (`mke2fs -d`), or random bytes when e2fsprogs
/// is missing; says which.
fn upgrade_image(dir: &Path, size: u64) -> Result<(Vec<u8>, String)> {
    use rand::{Rng, RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(256);
    let tree = dir.join("image-tree");
    let mut filled = 0u64;
    let budget = size * 3 / 4;
    let mut files = 0usize;
    while filled < budget && files < 10_000 {
        let sub = tree.join(format!("d{:02}", files % 16));
        std::fs::create_dir_all(&sub)?;
        let len = rng.gen_range(1u64..=4 << 20).min(budget - filled);
        let mut bytes = vec![0u8; len as usize];
        rng.fill_bytes(&mut bytes);
        std::fs::write(sub.join(format!("f{files:05}.bin")), &bytes)?;
        filled += len;
        files += 1;
    }
    let img = dir.join("image-ext4.img");
    let made = std::process::Command::new("mke2fs")
        .args([
            "-q",
            "-F",
            "-t",
            "ext4",
            "-b",
            "4096",
            "-E",
            "root_owner=0:0",
            "-d",
        ])
        .arg(&tree)
        .arg(&img)
        .arg(format!("{}k", size / 1024))
        .stdin(std::process::Stdio::null())
        .output();
    std::fs::remove_dir_all(&tree)?;
    match made {
        Ok(o) if o.status.success() => {
            let bytes = std::fs::read(&img)?;
            std::fs::remove_file(&img)?;
            if bytes.len() as u64 != size {
                bail!("mke2fs made {} bytes, not {size}", bytes.len());
            }
            let zero = bytes
                .chunks(4096)
                .filter(|c| c.iter().all(|&b| b == 0))
                .count();
            Ok((
                bytes,
                format!(
                    "ext4 image of {files} random files ({} MiB) made with `mke2fs -d -t ext4`; {:.0}% of its 4 KiB blocks are zero",
                    filled >> 20,
                    100.0 * zero as f64 / (size / 4096) as f64
                ),
            ))
        }
        other => {
            eprintln!("bench: mke2fs failed ({other:?}); using random bytes");
            let mut bytes = vec![0u8; size as usize];
            rng.fill_bytes(&mut bytes);
            Ok((bytes, "random bytes (mke2fs not available)".into()))
        }
    }
}

/// A release bundle of one `rootfs` payload, built by the hub's release builder (the
/// image is written next to it).
fn write_bundle(
    out: &Path,
    key: &ed25519_dalek::SigningKey,
    version: &str,
    rootfs: &[u8],
) -> Result<()> {
    let image = out.with_extension("payload");
    std::fs::write(&image, rootfs)?;
    let spec = cairn_hub::release::BuildSpec {
        version: version.into(),
        arch: std::env::consts::ARCH.into(),
        board: "bench".into(),
        inputs: vec![cairn_hub::release::BuildInput {
            name: "rootfs".into(),
            path: image.clone(),
        }],
        expected_pcrs: vec![],
        created_ms: 0,
    };
    cairn_hub::release::build(&spec, key, out, &mut |_| {})?;
    std::fs::remove_file(&image)?;
    Ok(())
}

/// What one install by our library took.
struct Ours {
    write: Duration,
    total: Duration,
    progress: cairn_agent::upgrade::install::Progress,
}

/// Installs payload 0 of `bundle` into `slot` as the agent does: manifest checked
/// against the release key, block index checked against the manifest, blocks checked
/// and written with a flush every `checkpoint_bytes`, then read back and verified.
fn install_ours(
    bundle: &Path,
    key: &ed25519_dalek::VerifyingKey,
    slot: &Path,
    local: Option<&cairn_agent::upgrade::install::LocalBlocks>,
    checkpoint_bytes: u64,
) -> Result<Ours> {
    use cairn_agent::upgrade::install::{
        BlockSource, BundleSource, PayloadJob, Progress, install_payload, verify_payload,
    };
    use cairn_sync_protocol::release::BlockIndex;
    let start = Instant::now();
    let mut source = BundleSource::open(bundle)?;
    let m = source.manifest().verify(&[*key])?;
    let payload = m.payloads.first().context("bundle has no payload")?;
    let index = BlockIndex::verified(payload, &source.index(0)?)?;
    let job = PayloadJob {
        payload,
        number: 0,
        index: &index,
        target: slot,
        local,
        checkpoint_bytes,
    };
    let progress = install_payload(&job, &mut source, Progress::default(), &mut |_| Ok(()))?;
    let write = start.elapsed();
    verify_payload(payload, &index, slot)?;
    Ok(Ours {
        write,
        total: start.elapsed(),
        progress,
    })
}

fn dd(image: &Path, slot: &Path) -> Result<Duration> {
    let start = Instant::now();
    let out = std::process::Command::new("dd")
        .arg(format!("if={}", image.display()))
        .arg(format!("of={}", slot.display()))
        .args(["bs=4M", "conv=fsync,notrunc", "status=none"])
        .output()
        .context("running dd")?;
    let took = start.elapsed();
    if !out.status.success() {
        bail!("dd failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(took)
}

/// A preallocated slot file of `len` bytes, written once (zeros) like a partition.
fn make_slot(path: &Path, len: u64) -> Result<()> {
    let f = std::fs::File::create(path)?;
    let zeros = vec![0u8; 4 << 20];
    let mut at = 0;
    while at < len {
        let n = (len - at).min(zeros.len() as u64) as usize;
        std::os::unix::fs::FileExt::write_all_at(&f, &zeros[..n], at)?;
        at += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

/// Whether the slot starts with exactly `want`.
fn slot_holds(slot: &Path, want: &[u8]) -> Result<bool> {
    let mut got = std::fs::read(slot)?;
    got.truncate(want.len());
    Ok(got == want)
}

/// The `upgrade` section: installing a 256 MiB image into a file-backed slot by our
/// installer, `dd` and RAUC; delta downloads against casync.
fn upgrade(dir: &Path, runs: usize, rows: &mut Vec<Row>) -> Result<()> {
    const SIZE: u64 = 256 << 20;
    const CHECKPOINT: u64 = 32 << 20;
    let work = dir.join("upgrade");
    std::fs::create_dir_all(&work)?;
    eprintln!("bench: upgrade: making the image…");
    let (v1, what_image) = upgrade_image(&work, SIZE)?;
    let image = work.join("v1.img");
    std::fs::write(&image, &v1)?;
    let key = ed25519_dalek::SigningKey::from_bytes(&[42u8; 32]);
    let vk = key.verifying_key();
    let bundle = work.join("v1.cairn");
    write_bundle(&bundle, &key, "1.0.0", &v1)?;
    let slot_a = work.join("slot-a.img");
    let slot_b = work.join("slot-b.img");
    std::fs::write(&slot_a, &v1)?;
    make_slot(&slot_b, SIZE)?;

    let rauc = match cairn_examples::peers_rauc::Rauc::start(&image, &slot_a, &slot_b) {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(why)) => Err(why),
        Err(e) => Err(format!("{e:#}")),
    };
    if let Err(why) = &rauc {
        eprintln!("bench: RAUC not measured: {why}");
    }
    let (mut ours_w, mut ours_t, mut dds, mut raucs) = (vec![], vec![], vec![], vec![]);
    let mut rauc_err: Option<String> = None;
    let mut cold = true;
    for run in 0..runs {
        eprintln!("bench: upgrade: install run {} of {runs}…", run + 1);
        for k in 0..3 {
            cold &= drop_caches();
            match (run + k) % 3 {
                0 => {
                    let o = install_ours(&bundle, &vk, &slot_b, None, CHECKPOINT)?;
                    ours_w.push(o.write.as_secs_f64());
                    ours_t.push(o.total.as_secs_f64());
                }
                1 => {
                    dds.push(dd(&image, &slot_b)?.as_secs_f64());
                    if run == 0 && !slot_holds(&slot_b, &v1)? {
                        bail!("dd left other bytes in the slot");
                    }
                }
                _ => {
                    if let (Ok(r), None) = (&rauc, &rauc_err) {
                        match r.install() {
                            Ok(t) => {
                                raucs.push(t.as_secs_f64());
                                if run == 0 && !slot_holds(&slot_b, &v1)? {
                                    rauc_err = Some("RAUC left other bytes in the slot".into());
                                }
                            }
                            Err(e) => rauc_err = Some(format!("{e:#}")),
                        }
                    }
                }
            }
        }
    }
    let rauc_version = rauc.as_ref().map(|r| r.version.clone()).ok();
    let rauc_unavailable = rauc.as_ref().err().cloned();
    drop(rauc);
    let (w, t, d) = (median(&mut ours_w), median(&mut ours_t), median(&mut dds));
    let cache = if cold {
        "cold page cache (sync; drop_caches=3 before each run)"
    } else {
        "**warm cache** (drop_caches not allowed here)"
    };
    let method = format!(
        "{what_image}; into a preallocated 256 MiB slot file on the same ext4 disk, written in place; {cache}; median of {runs}, order rotated run to run"
    );
    rows.push(row(
        "install 256 MiB into a raw file-backed slot: ours, write only (bundle open, manifest + index checked, every block checked then written, fdatasync every 32 MiB checkpoint as the agent's default)",
        format!("{w:.3} s ({:.0} MB/s)", SIZE as f64 / w / 1e6),
        ">= 0.95 of dd's throughput",
        format!(
            "`dd bs=4M conv=fsync,notrunc` of the same image bytes: {d:.3} s; ratio dd/ours {:.2}. {method}",
            d / w
        ),
    ));
    rows.push(row(
        "the same, write + verify (slot read back, every block hash checked against the signed index)",
        format!("{t:.3} s ({:.0} MB/s)", SIZE as f64 / t / 1e6),
        "—",
        format!("ratio dd/ours {:.2} (dd writes without any check)", d / t),
    ));
    let rauc_row = match (rauc_unavailable, rauc_err) {
        (Some(why), _) => (
            "not measured".to_string(),
            format!("RAUC could not run: {why}"),
        ),
        (None, Some(why)) => ("failed".to_string(), format!("RAUC install failed: {why}")),
        (None, None) => {
            let r = median(&mut raucs);
            (
                format!("{r:.3} s"),
                format!(
                    "ratio dd/RAUC {:.2}; ours write+verify vs RAUC {:.2}. RAUC {} `rauc install` wall time on the client (service on a private D-Bus): plain bundle (squashfs of the same image) whose CMS signature over the whole bundle is checked before writing, loop-mounted, image copied into a `type=raw` slot (same slot file), slot marked primary by a `bootloader=custom` script; no read-back",
                    d / r,
                    r / t,
                    rauc_version.unwrap_or_default()
                ),
            )
        }
    };
    rows.push(row(
        "RAUC: the same image into the same slot",
        rauc_row.0,
        "—",
        rauc_row.1,
    ));

    // Delta: v2 = v1 with 10% of its blocks rewritten; slot A holds v1.
    eprintln!("bench: upgrade: delta…");
    let v2 = mutate_blocks(&v1, 0.10, 2);
    drop(v1);
    let image2 = work.join("v2.img");
    std::fs::write(&image2, &v2)?;
    drop(v2);
    let bundle2 = work.join("v2.cairn");
    {
        let v2 = std::fs::read(&image2)?;
        write_bundle(&bundle2, &key, "2.0.0", &v2)?;
    }
    drop_caches();
    let scan_start = Instant::now();
    let local = cairn_agent::upgrade::install::LocalBlocks::scan(&slot_a, Some(SIZE))?;
    let scan = scan_start.elapsed();
    let o = install_ours(&bundle2, &vk, &slot_b, Some(&local), CHECKPOINT)?;
    let pct = |b: u64| 100.0 * b as f64 / SIZE as f64;
    rows.push(row(
        "delta v1 -> v2 (10% of 4 KiB blocks rewritten at random): fetched from the source by ours, slot A holding v1",
        format!("{:.1}% of the image", pct(o.progress.downloaded)),
        "< 15%",
        format!(
            "copied from slot A {:.1}%; slot A scanned (LocalBlocks::scan) in {:.2} s, install + verify {:.2} s",
            pct(o.progress.copied),
            scan.as_secs_f64(),
            o.total.as_secs_f64()
        ),
    ));
    for (cs, label) in [
        (None, "default chunking (64 KiB average)"),
        (Some(4096), "`--chunk-size=4096`"),
    ] {
        let (fig, base) = match cairn_examples::peers_rauc::casync_new_bytes(
            &image, &image2, cs, &work,
        ) {
            Ok(Ok((bytes, chunks))) => (
                format!("{:.1}% of the image", pct(bytes)),
                format!(
                    "new chunks' uncompressed bytes, each counted once, from the two .caibx indexes; v2 has {chunks} chunks"
                ),
            ),
            Ok(Err(why)) => ("not measured".into(), why),
            Err(e) => ("failed".into(), format!("{e:#}")),
        };
        rows.push(row(
            &format!("casync, same change, {label}: new chunks v2 needs given v1's store"),
            fig,
            "—",
            base,
        ));
    }
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

fn table(rows: &[Row]) -> String {
    let mut s = String::from("| what | figure | target | baseline / peer |\n|---|---|---|---|\n");
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            r.what, r.figure, r.target, r.baseline
        ));
    }
    s
}

/// The machine, for the record.
fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1_048_576.0);
    let date = std::process::Command::new("date")
        .arg("+%Y-%m-%d")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("Measured on {date}: {cores} cores ({cpu}), {mem_gib:.0} GiB, release profile.")
}

/// Replaces the text between `<!-- bench:NAME -->` and `<!-- /bench:NAME -->`.
fn splice(doc: &str, name: &str, body: &str) -> Result<String> {
    let open = format!("<!-- bench:{name} -->");
    let close = format!("<!-- /bench:{name} -->");
    let (Some(a), Some(b)) = (doc.find(&open), doc.find(&close)) else {
        bail!("markers {open} … {close} not found");
    };
    if b < a {
        bail!("{close} comes before {open}");
    }
    Ok(format!("{}{open}\n{body}{}", &doc[..a], &doc[b..]))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()?;
    let tmp = tempfile::tempdir()?;
    let header = machine();
    let mut sections: Vec<(&str, Vec<Row>)> = Vec::new();
    for name in &args.sections {
        let mut rows = Vec::new();
        match name.as_str() {
            "core" => rt.block_on(async {
                wire_bytes(tmp.path(), &mut rows).await?;
                backlog(tmp.path(), &mut rows).await?;
                agent_process(tmp.path(), args.idle, &mut rows).await
            })?,
            "fleet" => fleet(&args.fleet_sizes, tmp.path(), &mut rows)?,
            "det" => det(tmp.path(), &mut rows)?,
            "tpm" => quotes(&mut rows)?,
            "upgrade" => upgrade(tmp.path(), usize::from(args.upgrade_runs), &mut rows)?,
            other => bail!("unknown section {other:?}: use core, fleet, det, tpm or upgrade"),
        }
        sections.push((
            match name.as_str() {
                "core" => "core",
                "fleet" => "fleet",
                "tpm" => "tpm",
                "upgrade" => "upgrade",
                _ => "det",
            },
            rows,
        ));
    }
    println!("{header}\n");
    for (name, rows) in &sections {
        println!("### {name}\n\n{}", table(rows));
    }
    if let Some(path) = &args.write {
        let mut doc =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        for (name, rows) in &sections {
            doc = splice(&doc, name, &format!("{header}\n\n{}", table(rows)))?;
        }
        std::fs::write(path, doc).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("bench: wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splice_replaces_only_between_markers() {
        let doc = "a\n<!-- bench:x -->\nold\n<!-- /bench:x -->\nb\n";
        assert_eq!(
            splice(doc, "x", "new\n").unwrap(),
            "a\n<!-- bench:x -->\nnew\n<!-- /bench:x -->\nb\n"
        );
        assert!(splice(doc, "y", "z").is_err());
    }
}
