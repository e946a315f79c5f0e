//! The virtual rig: a NUC-like box under QEMU (TCG) + OVMF + swtpm, booting real
//! Cairn OS images built by `cairn-image`, managed by a real hub on loopback. Runs the
//! whole hardware scenario (`cairn_hwtests::scenario`): enroll with TPM attestation of
//! the measured boot, upgrade with a power cut mid-write, roll back a broken release.
//!
//! The Raspberry Pi 4 image runs the same scenario on the virtual Pi
//! (`cairn_hwtests::pivm`: QEMU `virt`, the Pi firmware's boot decisions played on
//! the host), without a TPM.
//!
//! Slow (several boots under TCG): its own test target, run by scripts/test.sh.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use cairn_hwtests::hub::{HubProc, bin_dir};
use cairn_hwtests::machine::{Machine, console_tail};
use cairn_hwtests::pivm::PiVm;
use cairn_hwtests::scenario::{self, Env, Releases, Timeouts};
use cairn_hwtests::vm::Vm;
use cairn_image::{Arch, Built, Fault, Layout, Spec};

/// A scratch directory for one rig run, removed afterwards unless `CAIRN_RIG_KEEP` is
/// set (then its path is printed: disk, console, QEMU and hub logs stay for a look).
fn rig_dir(prefix: &str) -> tempfile::TempDir {
    let mut b = tempfile::Builder::new();
    b.prefix(prefix);
    if std::env::var_os("CAIRN_RIG_KEEP").is_some() {
        b.disable_cleanup(true);
    }
    let d = b.tempdir().unwrap();
    eprintln!("rig directory: {}", d.path().display());
    d
}

fn target_dir() -> PathBuf {
    bin_dir().unwrap().parent().unwrap().to_path_buf()
}

fn build(version: &str, fault: Option<Fault>, out: &std::path::Path) -> Built {
    built(&spec_for(
        Arch::X86_64,
        "nuc",
        &bin_dir().unwrap().join("cairn-agent"),
        version,
        fault,
        out,
    ))
}

fn built(spec: &Spec) -> Built {
    cairn_image::build(spec).unwrap_or_else(|e| panic!("building {}: {e:#}", spec.version))
}

fn spec_for(
    arch: Arch,
    board: &str,
    agent: &Path,
    version: &str,
    fault: Option<Fault>,
    out: &Path,
) -> Spec {
    // QEMU's serial ports (a Pi's own UART would be ttyS1).
    let console = match arch {
        Arch::X86_64 => "console=ttyS0,115200",
        Arch::Aarch64 => "console=ttyAMA0,115200",
    };
    Spec {
        arch,
        board: board.into(),
        version: version.into(),
        agent: agent.to_path_buf(),
        out: out.join(version),
        cache: target_dir().join("cairn-image-cache"),
        layout: Layout {
            esp_mib: if board == "rpi4" { 40 } else { 96 },
            slot_mib: 96,
            data_mib: 64,
            boot_mib: 64,
        },
        fault,
        agent_args: vec!["--checkpoint-mib".into(), "4".into()],
        console: Some(console.into()),
        kernel_deb: None,
    }
}

fn sha256(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap();
    hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes))
}

#[test]
fn nuc_image_enrolls_upgrades_through_a_power_cut_and_rolls_back_a_broken_release() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_test_writer()
        .try_init();
    let tmp = rig_dir("cairn-rig-");
    let images = tmp.path().join("images");
    let v1 = build("1.0.0", None, &images);
    let v2 = build("2.0.0", None, &images);
    let v3 = build("3.0.0", Some(Fault::InitPanic), &images);

    rig(
        "nuc-1",
        Arch::X86_64,
        tmp.path(),
        &Releases {
            v1: &v1,
            v2: Some(&v2),
            v3: Some(&v3),
        },
        true,
    );
}

/// The cross-built aarch64 agent: `scripts/test-aarch64.sh` builds it (for its
/// integration tests) with the qemu-test profile; a plain cross build puts it under
/// debug/; or set `CAIRN_AARCH64_AGENT`.
fn aarch64_agent() -> PathBuf {
    let agent = std::env::var_os("CAIRN_AARCH64_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let dir = target_dir().join("aarch64/aarch64-unknown-linux-gnu");
            ["qemu-test", "debug"]
                .iter()
                .map(|p| dir.join(p).join("cairn-agent"))
                .find(|p| p.exists())
                .unwrap_or_else(|| dir.join("qemu-test/cairn-agent"))
        });
    assert!(
        agent.exists(),
        "{} is missing: run scripts/test-aarch64.sh first (it cross-builds the agent), or set CAIRN_AARCH64_AGENT",
        agent.display()
    );
    agent
}

/// The aarch64 image on QEMU `virt` with UEFI (AAVMF): the arm64 kernel, initramfs,
/// root and the cross-built agent, which enrolls over the network. No TPM: Debian's
/// arm64 kernel has no driver for QEMU's memory-mapped TIS device.
#[test]
fn arm64_image_boots_on_uefi_and_enrolls() {
    let agent = aarch64_agent();
    let tmp = rig_dir("cairn-rig-arm64-");
    let v1 = built(&spec_for(
        Arch::Aarch64,
        "virt",
        &agent,
        "1.0.0",
        None,
        &tmp.path().join("images"),
    ));
    // Debian's arm64 kernel has no driver for QEMU's memory-mapped TPM
    // (CONFIG_TCG_TIS is off; a Pi's SPI TPM uses tpm_tis_spi, which it has).
    rig(
        "virt-1",
        Arch::Aarch64,
        tmp.path(),
        &Releases {
            v1: &v1,
            v2: None,
            v3: None,
        },
        false,
    );
}

/// The Raspberry Pi 4 image: the firmware's boot partitions with `autoboot.txt`, a
/// tryboot trial of each upgrade, the agent rebooting with "0 tryboot". Enrolls
/// (no TPM, as on a Pi), upgrades to v2 through a power cut while slot B is written,
/// commits v2 after its trial boot, and falls back to v2 by itself when v3 panics.
#[test]
fn pi4_image_upgrades_by_tryboot_through_a_power_cut_and_rolls_back() {
    let agent = aarch64_agent();
    let tmp = rig_dir("cairn-rig-pi4-");
    let images = tmp.path().join("images");
    let pi = |v: &str, f| built(&spec_for(Arch::Aarch64, "rpi4", &agent, v, f, &images));
    let (v1, v2, v3) = (
        pi("1.0.0", None),
        pi("2.0.0", None),
        pi("3.0.0", Some(Fault::InitPanic)),
    );
    // The same build again, with the kernel given as a .deb (`--kernel-deb`, the way
    // a Raspberry Pi kernel would be): the same boot partition, byte for byte.
    let debs = target_dir().join("cairn-image-cache/debs");
    let kernel_deb = std::fs::read_dir(&debs)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with(&format!("linux-image-{}_", v1.kernel)) && n.ends_with("_arm64.deb")
        })
        .expect("the arm64 kernel .deb in the image cache");
    let mut again = spec_for(
        Arch::Aarch64,
        "rpi4",
        &agent,
        "1.0.0",
        None,
        &tmp.path().join("again"),
    );
    again.kernel_deb = Some(kernel_deb);
    let again = cairn_image::build(&again).unwrap();
    assert_eq!(
        sha256(again.payload("boot").unwrap()),
        sha256(v1.payload("boot").unwrap()),
        "two builds of 1.0.0 gave different boot partitions"
    );
    assert_eq!(sha256(&again.rootfs), sha256(&v1.rootfs));

    let dir = tmp.path();
    let mut vm = PiVm::create("pi4-1", &dir.join("vm"), &dir.join("vm/disk.img")).unwrap();
    let hub = HubProc::start(&dir.join("hub"), "127.0.0.1:0", &[]).unwrap();
    scenario_on(
        &mut vm,
        &hub,
        dir,
        &Releases {
            v1: &v1,
            v2: Some(&v2),
            v3: Some(&v3),
        },
        false,
    );
    // Every trial went through the tryboot flag: the kernel was asked for it, and the
    // firmware model booted the trial partition on it.
    let console = cairn_hwtests::machine::console_text(&vm);
    assert!(
        console.contains("Restarting system with command '0 tryboot'")
            && console.contains("booting partition 3 (tryboot)")
            && console.contains("booting partition 2 (tryboot)"),
        "the console shows no tryboot reboots into both slots:\n{}",
        console_tail(&vm, 80)
    );
}

/// One box in `dir` against a fresh hub that trusts its TPM's EK CA; panics with the
/// report, the console's tail and the hub's log if the scenario fails.
fn rig(name: &str, arch: Arch, dir: &Path, releases: &Releases<'_>, tpm: bool) {
    let mut vm = Vm::create(name, arch, &dir.join("vm"), &dir.join("vm/disk.img")).unwrap();
    let ek_ca = dir.join("ek-ca.pem");
    std::fs::write(&ek_ca, vm.ek_ca_pem().unwrap()).unwrap();
    let hub = HubProc::start(
        &dir.join("hub"),
        "127.0.0.1:0",
        &["--ek-ca", ek_ca.to_str().unwrap()],
    )
    .unwrap();
    scenario_on(&mut vm, &hub, dir, releases, tpm);
}

/// Runs the scenario on `vm` against `hub`; panics with the report, the console's
/// tail and the hub's log if it fails.
fn scenario_on(
    vm: &mut dyn Machine,
    hub: &HubProc,
    dir: &Path,
    releases: &Releases<'_>,
    tpm: bool,
) {
    let name = vm.name().to_string();
    let env = Env {
        hub,
        // QEMU user networking: the host's loopback is 10.0.2.2 inside the guest.
        box_hub: format!("10.0.2.2:{}", hub.port()),
        work: dir.join("work"),
        timeouts: Timeouts::default(),
        tpm,
    };
    let report = scenario::run(vm, &env, releases);
    eprintln!("{}", report.table());
    if !report.ok {
        panic!(
            "the virtual rig scenario failed on {name}:\n{}\n--- console (last lines) ---\n{}\n--- hub log ---\n{}",
            report.table(),
            report
                .console_tail
                .clone()
                .unwrap_or_else(|| console_tail(vm, 60)),
            hub.log_tail(30)
        );
    }
}
