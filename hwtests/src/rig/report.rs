//! The combined report of `cairn-rig run`: JSON, and a markdown summary with each
//! box's step table and, for a failure, the console's tail.

use std::path::PathBuf;

use cairn_image::Arch;
use serde::Serialize;

use crate::scenario::Report;

use super::config::Board;

/// A whole rig run.
#[derive(Debug, Clone, Serialize)]
pub struct RigReport {
    /// The rig description it ran.
    pub rig: PathBuf,
    /// RFC 3339, UTC.
    pub started: String,
    pub seconds: f64,
    /// Every box passed.
    pub ok: bool,
    /// The hub's QUIC listen address and the one the boxes dial.
    pub hub_listen: String,
    pub hub_public: String,
    pub boxes: Vec<BoxReport>,
}

/// One box's run.
#[derive(Debug, Clone, Serialize)]
pub struct BoxReport {
    pub name: String,
    pub arch: Arch,
    pub board: Board,
    /// The v1, v2 and v3 build directories.
    pub images: Vec<PathBuf>,
    pub power: String,
    pub flash: String,
    pub console_log: PathBuf,
    pub hub_log: PathBuf,
    pub report: Report,
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', "<br>")
}

/// The markdown summary.
pub fn markdown(r: &RigReport) -> String {
    let passed = r.boxes.iter().filter(|b| b.report.ok).count();
    let mut s = format!(
        "# Cairn rig report\n\n{} — {} of {} boxes passed in {:.0} s. Rig: `{}`; hub on `{}`, boxes dial `{}`.\n\n",
        r.started,
        passed,
        r.boxes.len(),
        r.seconds,
        r.rig.display(),
        r.hub_listen,
        r.hub_public
    );
    s.push_str("| box | board | result | device | seconds |\n|---|---|---|---|---:|\n");
    for b in &r.boxes {
        s.push_str(&format!(
            "| {} | {}/{} | {} | {} | {:.0} |\n",
            cell(&b.name),
            b.arch,
            b.board,
            if b.report.ok { "passed" } else { "**FAILED**" },
            cell(b.report.device.as_deref().unwrap_or("-")),
            b.report.seconds
        ));
    }
    for b in &r.boxes {
        s.push_str(&format!(
            "\n## {} — {}\n\nPower: {}. Flash: {}. Console log: `{}`. Hub log: `{}`.\n\n",
            b.name,
            if b.report.ok { "passed" } else { "FAILED" },
            cell(&b.power),
            cell(&b.flash),
            b.console_log.display(),
            b.hub_log.display()
        ));
        s.push_str("| step | result | seconds | detail |\n|---|---|---:|---|\n");
        for st in &b.report.steps {
            s.push_str(&format!(
                "| {} | {} | {:.1} | {} |\n",
                cell(&st.name),
                if st.ok { "ok" } else { "**FAIL**" },
                st.seconds,
                cell(&st.detail)
            ));
        }
        if !b.report.ok {
            let tail = b.report.console_tail.as_deref().unwrap_or("").trim();
            s.push_str("\nConsole (last lines):\n\n```text\n");
            s.push_str(if tail.is_empty() {
                "(nothing captured)"
            } else {
                tail
            });
            s.push_str("\n```\n");
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::Step;

    #[test]
    fn markdown_has_the_step_table_and_a_failures_console() {
        let step = |name: &str, ok: bool, detail: &str| Step {
            name: name.into(),
            seconds: 1.25,
            ok,
            detail: detail.into(),
        };
        let r = RigReport {
            rig: "rig.toml".into(),
            started: "2025-01-01T00:00:00Z".into(),
            seconds: 100.0,
            ok: false,
            hub_listen: "192.168.50.1:7440".into(),
            hub_public: "192.168.50.1:7440".into(),
            boxes: vec![BoxReport {
                name: "pi-1".into(),
                arch: Arch::Aarch64,
                board: Board::Rpi4,
                images: vec![],
                power: "usb-relay /dev/ttyUSB1 channel 1".into(),
                flash: "sd-mux".into(),
                console_log: "w/pi-1/console.log".into(),
                hub_log: "w/pi-1/hub/hub.log".into(),
                report: Report {
                    machine: "pi-1".into(),
                    device: None,
                    steps: vec![
                        step("release key and policy", true, "policy a|b"),
                        step("boot v1, enroll, attest", false, "timed out\nwaiting"),
                    ],
                    seconds: 99.0,
                    ok: false,
                    console_tail: Some("Kernel panic".into()),
                },
            }],
        };
        let md = markdown(&r);
        assert!(md.contains("0 of 1 boxes passed"), "{md}");
        assert!(
            md.contains("| pi-1 | aarch64/rpi4 | **FAILED** | - | 99 |"),
            "{md}"
        );
        assert!(
            md.contains("| release key and policy | ok | 1.2 | policy a\\|b |"),
            "{md}"
        );
        assert!(
            md.contains("| **FAIL** | 1.2 | timed out<br>waiting |"),
            "{md}"
        );
        assert!(md.contains("```text\nKernel panic\n```"), "{md}");
    }
}
