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
//!
//! One module per section: `agent` (core), `fleet` (fleet and det), `tpm`, `upgrade`;
//! this file holds the arguments, the rows and the tables.
#![forbid(unsafe_code)]

mod agent;
mod fleet;
mod tpm;
mod upgrade;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
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

/// One line of a section's table.
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
                agent::wire_bytes(tmp.path(), &mut rows).await?;
                agent::backlog(tmp.path(), &mut rows).await?;
                agent::agent_process(tmp.path(), args.idle, &mut rows).await
            })?,
            "fleet" => fleet::fleet(&args.fleet_sizes, tmp.path(), &mut rows)?,
            "det" => fleet::det(tmp.path(), &mut rows)?,
            "tpm" => tpm::quotes(&mut rows)?,
            "upgrade" => upgrade::upgrade(tmp.path(), usize::from(args.upgrade_runs), &mut rows)?,
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
