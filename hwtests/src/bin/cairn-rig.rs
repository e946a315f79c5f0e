//! `cairn-rig`: the hardware scenario on real boxes (a Raspberry Pi, a NUC, …) on the
//! rig host's LAN, as `rig.toml` describes them.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Instant, SystemTime};

use cairn_hwtests::hub::HubProc;
use cairn_hwtests::machine::Machine;
use cairn_hwtests::rig::config::{BoxConfig, LoadedReleases, Rig};
use cairn_hwtests::rig::report::{BoxReport, RigReport, markdown};
use cairn_hwtests::rig::{RealBox, check};
use cairn_hwtests::scenario::{self, Env, Report, Step};
use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
Exit codes:
  0  check: no probe failed; run: every box passed the scenario; power: switched
  1  check: a probe failed;  run: a box failed a step;           power: switching failed
  2  bad usage, or a rig.toml / image.json that does not hold together

Examples:
  # What the rig looks like to this host: consoles and relays open, flash targets
  # are unused whole disks, images match the boxes. Switches and writes nothing.
  cairn-rig check --rig rig.toml
  cairn-rig check --rig rig.toml --box pi-1 --json

  # Wiring bring-up: switch one box's power.
  cairn-rig power --rig rig.toml --box nuc-1 on

  # The scenario on every box, one after the other (hours on slow media):
  # flash v1, enroll with TPM attestation, v2 through a power cut, commit,
  # broken v3 rolls back. Reports: WORK/report.json and WORK/report.md.
  cairn-rig run --rig rig.toml --work rig-work
  cairn-rig run --rig rig.toml --box nuc-1 --report nuc.json

The rig description is documented in hwtests/rig/rig.example.toml, the rig itself in
hwtests/README.md. cairn-hub must be next to cairn-rig or in CAIRN_BIN_DIR
(cargo build --release --bins). Logs: RUST_LOG=debug.";

/// Runs the Cairn hardware scenario on a rig of real boxes.
#[derive(Parser)]
#[command(name = "cairn-rig", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Validate rig.toml and probe every part without switching or writing anything.
    Check {
        #[command(flatten)]
        sel: Selection,
        /// Print the probes as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the hardware scenario on each selected box in turn, with a fresh hub each.
    Run {
        #[command(flatten)]
        sel: Selection,
        /// Work directory: per box its console log, hub, flash image, bundles.
        #[arg(long, default_value = "rig-work")]
        work: PathBuf,
        /// The JSON report [default: WORK/report.json]; the markdown summary is
        /// always WORK/report.md.
        #[arg(long)]
        report: Option<PathBuf>,
    },
    /// Switch one box's power (to check the wiring).
    Power {
        /// The rig description.
        #[arg(long, env = "CAIRN_RIG", default_value = "rig.toml")]
        rig: PathBuf,
        /// The box.
        #[arg(long = "box")]
        name: String,
        #[arg(value_enum)]
        state: PowerState,
    },
}

#[derive(clap::Args)]
struct Selection {
    /// The rig description.
    #[arg(long, env = "CAIRN_RIG", default_value = "rig.toml")]
    rig: PathBuf,
    /// Only this box (repeatable); all boxes without it.
    #[arg(long = "box", value_name = "NAME")]
    boxes: Vec<String>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum PowerState {
    On,
    Off,
    /// Off, 2 s, on.
    Cycle,
}

const USAGE: u8 = 2;

fn main() -> ExitCode {
    cairn_hwtests::init_logging();
    match Cli::parse().cmd {
        Cmd::Check { sel, json } => cmd_check(&sel, json),
        Cmd::Run { sel, work, report } => cmd_run(&sel, &work, report),
        Cmd::Power { rig, name, state } => cmd_power(&rig, &name, state),
    }
}

fn load(rig: &Path, boxes: &[String]) -> Result<(Rig, Vec<BoxConfig>), ExitCode> {
    let r = Rig::load(rig).map_err(|e| usage(&e))?;
    let sel = r
        .select(boxes)
        .map_err(|e| usage(&e))?
        .into_iter()
        .cloned()
        .collect();
    Ok((r, sel))
}

fn usage(e: &dyn std::fmt::Display) -> ExitCode {
    eprintln!("error: {e}");
    ExitCode::from(USAGE)
}

fn cmd_check(sel: &Selection, json: bool) -> ExitCode {
    let (rig, boxes) = match load(&sel.rig, &sel.boxes) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let probes = check::check(&rig, &boxes.iter().collect::<Vec<_>>());
    if json {
        match serde_json::to_string_pretty(&probes) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(1);
            }
        }
    } else {
        print!("{}", check::table(&probes));
    }
    if check::passed(&probes) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn cmd_power(rig: &Path, name: &str, state: PowerState) -> ExitCode {
    let (_, boxes) = match load(rig, &[name.to_string()]) {
        Ok(x) => x,
        Err(c) => return c,
    };
    let Some(b) = boxes.first() else {
        return usage(&"no box selected");
    };
    let mut power = match cairn_hwtests::rig::power::Power::from_config(&b.name, &b.power) {
        Ok(p) => p,
        Err(e) => return usage(&format!("{e:#}")),
    };
    let r = match state {
        PowerState::On => power.set(true),
        PowerState::Off => power.set(false),
        PowerState::Cycle => power.set(false).and_then(|()| {
            std::thread::sleep(std::time::Duration::from_secs(2));
            power.set(true)
        }),
    };
    match r {
        Ok(()) => {
            println!("{}: {}", b.name, power.describe());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A box ready to run: its description, images and machine.
struct Prepared {
    cfg: BoxConfig,
    releases: LoadedReleases,
    machine: RealBox,
    dir: PathBuf,
}

fn cmd_run(sel: &Selection, work: &Path, report: Option<PathBuf>) -> ExitCode {
    let (rig, boxes) = match load(&sel.rig, &sel.boxes) {
        Ok(x) => x,
        Err(c) => return c,
    };
    // Everything that can be wrong with the description is found before any box is
    // switched or written.
    let mut prepared = Vec::new();
    for b in boxes {
        let releases = match b.load_releases() {
            Ok(r) => r,
            Err(e) => return usage(&format!("{}: {e}", rig.path.display())),
        };
        let dir = work.join(&b.name);
        let machine = match RealBox::from_config(&b, &dir) {
            Ok(m) => m,
            Err(e) => return usage(&format!("{}: {e:#}", rig.path.display())),
        };
        prepared.push(Prepared {
            cfg: b,
            releases,
            machine,
            dir,
        });
    }
    for ca in &rig.hub.ek_ca {
        if !ca.exists() {
            return usage(&format!(
                "{}: hub.ek_ca: {} does not exist",
                rig.path.display(),
                ca.display()
            ));
        }
    }
    let json_path = report.unwrap_or_else(|| work.join("report.json"));
    let md_path = work.join("report.md");
    let started = Instant::now();
    let mut out = RigReport {
        rig: rig.path.clone(),
        started: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        seconds: 0.0,
        ok: false,
        hub_listen: rig.hub.listen.to_string(),
        hub_public: rig.hub.public.clone(),
        boxes: vec![],
    };
    let mut ek_args: Vec<String> = Vec::new();
    for ca in &rig.hub.ek_ca {
        ek_args.push("--ek-ca".into());
        ek_args.push(ca.display().to_string());
    }
    let ek_args: Vec<&str> = ek_args.iter().map(String::as_str).collect();
    for mut p in prepared {
        tracing::info!(r#box = %p.cfg.name, "scenario starts");
        let hub_dir = p.dir.join("hub");
        // A fresh hub per box: release versions are immutable on a hub, and every
        // box's scenario pushes its own 2.0.0 and 3.0.0.
        let _ = std::fs::remove_dir_all(&hub_dir);
        let r = match HubProc::start(&hub_dir, &rig.hub.listen.to_string(), &ek_args) {
            Ok(hub) => {
                let env = Env {
                    hub: &hub,
                    box_hub: rig.hub.public.clone(),
                    work: p.dir.clone(),
                    timeouts: rig.timeouts.into(),
                    tpm: p.cfg.tpm,
                };
                let r = scenario::run(&mut p.machine, &env, &p.releases.as_releases());
                if !r.ok {
                    tracing::warn!(hub_log = %hub.log_tail(20), "hub log (last lines)");
                }
                r
            }
            Err(e) => Report {
                machine: p.cfg.name.clone(),
                steps: vec![Step {
                    name: "start the hub".into(),
                    seconds: 0.0,
                    ok: false,
                    detail: format!("{e:#}"),
                }],
                ..Report::default()
            },
        };
        p.machine.stop_console();
        println!("{}", r.table());
        out.boxes.push(BoxReport {
            name: p.cfg.name.clone(),
            arch: p.cfg.arch,
            board: p.cfg.board,
            images: p.cfg.release_dirs().to_vec(),
            power: p.machine.power_control().describe(),
            flash: p.machine.flasher().describe(),
            console_log: p.machine.console_log(),
            hub_log: hub_dir.join("hub.log"),
            report: r,
        });
        out.ok = out.boxes.iter().all(|b| b.report.ok);
        out.seconds = started.elapsed().as_secs_f64();
        // Written after every box: a run cut short keeps what it did.
        if let Err(e) = write_reports(&out, &json_path, &md_path) {
            eprintln!("error: writing the report: {e:#}");
            return ExitCode::from(1);
        }
    }
    let passed = out.boxes.iter().filter(|b| b.report.ok).count();
    println!(
        "{passed} of {} boxes passed; report: {} and {}",
        out.boxes.len(),
        json_path.display(),
        md_path.display()
    );
    if out.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn write_reports(r: &RigReport, json: &Path, md: &Path) -> anyhow::Result<()> {
    for p in [json, md] {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(d)?;
        }
    }
    std::fs::write(json, serde_json::to_vec_pretty(r)?)?;
    std::fs::write(md, markdown(r))?;
    Ok(())
}
