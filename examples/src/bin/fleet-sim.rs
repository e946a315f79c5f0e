//! Fleet simulation: runs a scenario (`examples/scenarios/*.toml`, the embedded default
//! without `--scenario`) against a real hub and real agents on this machine, or, with
//! `--deterministic`, against the protocol's sans-IO cores in virtual time. Shows live
//! progress, prints a report, and exits non-zero if an invariant fails.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use cairn_examples::real::{self, RealOptions};
use cairn_examples::report::Report;
use cairn_examples::scenario::{self, Scenario};
use clap::{Parser, Subcommand};

/// Run a fleet of edge boxes on this machine and watch a hub manage them.
///
/// Real mode (default) starts a hub process and pools of real agents — the same library
/// code as `cairn-hub serve` and `cairn-agent run`, QUIC over loopback, one SQLite file
/// per agent — and plays the scenario's timeline: operator actions through the hub's
/// admin API, links cut or flapping, agents killed, the hub SIGKILLed and restarted.
///
/// Deterministic mode (`--deterministic`) plays the same scenario through the sync
/// protocol's state machines with a virtual clock and a simulated network: no sockets,
/// much faster than real time, up to 100,000 devices, reproducible from `--seed`.
#[derive(Parser)]
#[command(
    name = "fleet-sim",
    after_help = "Examples:\n  fleet-sim                                   # default scenario, 2000 real agents\n  fleet-sim --devices 200 --plot fleet.svg\n  fleet-sim --scenario examples/scenarios/ci-small.toml --json\n  fleet-sim --deterministic --scenario examples/scenarios/100k.toml\n  fleet-sim --deterministic --seed 17          # replay one seed\n\nExit codes: 0 every invariant held; 1 an invariant failed or a converge step timed out; 2 bad usage or scenario; 3 the run could not complete.\nLogs: RUST_LOG=info (default: warn) for the hub's, agents' and simulator's log lines."
)]
struct Args {
    /// Scenario file (TOML); the embedded default scenario without it.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Number of devices (overrides the scenario's).
    #[arg(long)]
    devices: Option<usize>,
    /// Seed for every random choice (overrides the scenario's).
    #[arg(long)]
    seed: Option<u64>,
    /// Run in virtual time through the sans-IO cores instead of real processes.
    #[arg(long)]
    deterministic: bool,
    /// Print the report as JSON (no progress display).
    #[arg(long)]
    json: bool,
    /// Also write a plot of online/converged devices and queued reports over time (SVG).
    #[arg(long, value_name = "FILE.svg")]
    plot: Option<PathBuf>,
    /// Keep the hub's and agents' data here instead of a temporary directory (real mode).
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
    /// Put the agents' data here instead (real mode), e.g. a directory on a tmpfs such as
    /// /dev/shm: on a real fleet every agent fsyncs its own disk, here thousands share
    /// one. The hub's database stays in the run directory.
    #[arg(long, value_name = "DIR")]
    agents_dir: Option<PathBuf>,
    /// Agents per pool process (real mode).
    #[arg(long, default_value_t = 500)]
    pool_size: usize,
    /// How long enrollment of the whole fleet may take (real mode).
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    enroll_timeout: Duration,
    /// Hide the live progress display.
    #[arg(long)]
    no_progress: bool,
    #[command(subcommand)]
    internal: Option<Internal>,
}

/// The processes a real-mode run starts (this same executable).
#[derive(Subcommand)]
enum Internal {
    #[command(name = "__hub", hide = true)]
    Hub { setup: String },
    #[command(name = "__agents", hide = true)]
    Agents { setup: String },
}

mod exit {
    pub const INVARIANT: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const FAILED: u8 = 3;
}

fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        // Rollbacks are what upgrade scenarios provoke; the report counts them.
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,cairn_agent::upgrade=error"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?)
}

fn internal(cmd: Internal) -> Result<()> {
    match cmd {
        Internal::Hub { setup } => {
            let setup = serde_json::from_str(&setup).context("hub setup")?;
            runtime(2)?.block_on(real::hub::main(setup))
        }
        Internal::Agents { setup } => {
            let setup = serde_json::from_str(&setup).context("pool setup")?;
            // Agents fsync their SQLite files on runtime threads; more threads let those
            // waits overlap (on a box, each agent is its own process).
            runtime(16)?.block_on(real::pool::main(setup))
        }
    }
}

fn load(args: &Args) -> Result<Scenario> {
    let mut s = match &args.scenario {
        Some(p) => Scenario::load(p)?,
        None => Scenario::parse(scenario::DEFAULT).context("embedded default scenario")?,
    };
    if let Some(n) = args.devices {
        anyhow::ensure!(n > 0, "--devices must be at least 1");
        s.devices = n;
    }
    if let Some(seed) = args.seed {
        s.seed = seed;
    }
    Ok(s)
}

fn simulate(args: &Args, scenario: &Scenario) -> Result<Report> {
    if args.deterministic {
        let mut opts = cairn_examples::det::DetOptions::default();
        let shown = indicatif::ProgressBar::new(scenario.devices as u64);
        if !args.json && !args.no_progress {
            let bar = shown.clone();
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:30.cyan/blue} {pos}/{len} converged · {wide_msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            let steps = scenario.steps.len();
            opts.progress = Some(Box::new(move |s, step, what| {
                bar.set_position(s.converged as u64);
                bar.set_message(format!(
                    "t={:.0}s · online {} · queued reports {} · step {}/{steps}: {what}",
                    s.t_ms as f64 / 1000.0,
                    s.online,
                    s.queued,
                    step + 1
                ));
            }));
        }
        let report = cairn_examples::det::run(scenario, opts);
        shown.finish_and_clear();
        return report;
    }
    let tmp;
    let root = match &args.keep {
        Some(p) => {
            std::fs::create_dir_all(p).context("creating --keep directory")?;
            p.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("fleet-sim-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let agents_tmp;
    let agents_root = match &args.agents_dir {
        Some(p) => {
            std::fs::create_dir_all(p).context("creating --agents-dir")?;
            agents_tmp = tempfile::Builder::new()
                .prefix("fleet-sim-agents-")
                .tempdir_in(p)?;
            Some(agents_tmp.path().to_path_buf())
        }
        None => None,
    };
    let opts = RealOptions {
        root,
        agents_root,
        pool_size: args.pool_size,
        progress: !args.json && !args.no_progress,
        enroll_timeout: args.enroll_timeout,
    };
    runtime(2)?.block_on(real::run(scenario, &opts))
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logs();
    if let Some(cmd) = args.internal {
        return match internal(cmd) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("fleet-sim internal process: {e:#}");
                ExitCode::from(exit::FAILED)
            }
        };
    }
    let scenario = match load(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::USAGE);
        }
    };
    let report = match simulate(&args, &scenario) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("fleet-sim could not complete the run: {e:#}");
            return ExitCode::from(exit::FAILED);
        }
    };
    if let Some(p) = &args.plot
        && let Err(e) = cairn_examples::plot::write_svg(&report, p)
    {
        eprintln!("error: writing the plot: {e:#}");
    }
    if args.json {
        match serde_json::to_string_pretty(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("error: {e}"),
        }
    } else {
        print!("{}", report.render());
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        if args.deterministic {
            eprintln!(
                "reproduce with: fleet-sim --deterministic{} --devices {} --seed {}",
                args.scenario
                    .as_ref()
                    .map(|p| format!(" --scenario {}", p.display()))
                    .unwrap_or_default(),
                scenario.devices,
                scenario.seed
            );
        }
        ExitCode::from(exit::INVARIANT)
    }
}
