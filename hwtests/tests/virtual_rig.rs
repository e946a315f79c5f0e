//! The virtual rig: a NUC-like box under QEMU (TCG) + OVMF + swtpm, booting real
//! Cairn OS images built by `cairn-image`, managed by a real hub on loopback. Runs the
//! whole hardware scenario (`cairn_hwtests::scenario`): enroll with TPM attestation of
//! the measured boot, upgrade with a power cut mid-write, roll back a broken release.
//!
//! Slow (several boots under TCG): its own test target, run by scripts/test.sh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;

use cairn_hwtests::Arch;
use cairn_hwtests::hub::{HubProc, bin_dir};
use cairn_hwtests::image::{self, Fault, Layout};
use cairn_hwtests::machine::console_tail;
use cairn_hwtests::scenario::{self, Env, Releases, Timeouts};
use cairn_hwtests::vm::Vm;

fn target_dir() -> PathBuf {
    bin_dir().unwrap().parent().unwrap().to_path_buf()
}

fn build(version: &str, fault: Option<Fault>, out: &std::path::Path) -> image::Built {
    image::build(&image::Spec {
        arch: Arch::X86_64,
        board: "nuc".into(),
        version: version.into(),
        agent: bin_dir().unwrap().join("cairn-agent"),
        out: out.join(version),
        cache: target_dir().join("cairn-image-cache"),
        layout: Layout {
            esp_mib: 96,
            slot_mib: 96,
            data_mib: 64,
        },
        fault,
        agent_args: vec!["--checkpoint-mib".into(), "4".into()],
        console: "console=ttyS0,115200".into(),
    })
    .unwrap_or_else(|e| panic!("building {version}: {e:#}"))
}

#[test]
fn nuc_image_enrolls_upgrades_through_a_power_cut_and_rolls_back_a_broken_release() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
    let tmp = tempfile::Builder::new()
        .prefix("cairn-rig-")
        .tempdir()
        .unwrap();
    let images = tmp.path().join("images");
    let v1 = build("1.0.0", None, &images);
    let v2 = build("2.0.0", None, &images);
    let v3 = build("3.0.0", Some(Fault::InitPanic), &images);

    let mut vm = Vm::create(
        "nuc-1",
        &tmp.path().join("vm"),
        &tmp.path().join("vm/disk.img"),
    )
    .unwrap();
    let ek_ca = tmp.path().join("ek-ca.pem");
    std::fs::write(&ek_ca, vm.ek_ca_pem().unwrap()).unwrap();
    let hub = HubProc::start(
        &tmp.path().join("hub"),
        "127.0.0.1:0",
        &["--ek-ca", ek_ca.to_str().unwrap()],
    )
    .unwrap();
    let env = Env {
        hub: &hub,
        // QEMU user networking: the host's loopback is 10.0.2.2 inside the guest.
        box_hub: format!("10.0.2.2:{}", hub.port()),
        work: tmp.path().join("work"),
        timeouts: Timeouts::default(),
    };
    let report = scenario::run(
        &mut vm,
        &env,
        &Releases {
            v1: &v1,
            v2: &v2,
            v3: &v3,
        },
    );
    eprintln!("{}", report.table());
    if !report.ok {
        panic!(
            "the virtual rig scenario failed:\n{}\n--- console (last lines) ---\n{}\n--- hub log ---\n{}",
            report.table(),
            report
                .console_tail
                .clone()
                .unwrap_or_else(|| console_tail(&vm, 60)),
            hub.log_tail(30)
        );
    }
}
