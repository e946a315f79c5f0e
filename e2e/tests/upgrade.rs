//! A/B upgrades on a simulated box with real files and real `cairn-agent` processes
//! (`os-install` from a bundle, the path without a hub), rebooted by the file boot
//! loader's firmware model, killed with SIGKILL at every durability point and at
//! random times.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use cairn_agent::upgrade::Job;
use cairn_agent::upgrade::boot::file::FileBoot;
use cairn_agent::upgrade::boot::{BootControl, Slot};
use cairn_e2e::abox::{SimBox, build_bundle, mutate_blocks, random_image};
use cairn_sync_protocol::message::UpgradePhase;
use ed25519_dalek::SigningKey;
use rand::{Rng, SeedableRng};

const IMAGE: usize = 4 << 20;
const SLOT: u64 = 6 << 20;

fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

struct Setup {
    _tmp: tempfile::TempDir,
    sim: SimBox,
    v1: Vec<u8>,
    v2: Vec<u8>,
    bundle: std::path::PathBuf,
}

fn setup(seed: u64) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = random_image(seed, IMAGE);
    let v2 = mutate_blocks(&v1, 0.10, seed + 1);
    let sim = SimBox::flash(&tmp.path().join("box"), &v1, SLOT);
    let bundle = tmp.path().join("v2.cairn");
    build_bundle(&bundle, &key(), "2.0.0", "sim", &v2);
    Setup {
        _tmp: tmp,
        sim,
        v1,
        v2,
        bundle,
    }
}

/// The agent's durable upgrade job, as it stored it.
fn job(sim: &SimBox) -> Job {
    let db = rusqlite::Connection::open(cairn_agent::db_path(&sim.data_dir)).unwrap();
    let j: String = db
        .query_row("SELECT job FROM upgrade WHERE id = 1", [], |r| r.get(0))
        .unwrap();
    serde_json::from_str(&j).unwrap()
}

fn committed_version(sim: &SimBox) -> Option<String> {
    let db = rusqlite::Connection::open(cairn_agent::db_path(&sim.data_dir)).unwrap();
    db.query_row("SELECT value FROM meta WHERE key = 'os_version'", [], |r| {
        r.get::<_, Vec<u8>>(0)
    })
    .ok()
    .map(|v| String::from_utf8(v).unwrap())
}

/// The box's invariant after every boot: it runs a slot holding exactly v1 or v2.
fn assert_bootable(s: &Setup) {
    let booted = s.sim.booted();
    let bytes = s.sim.slot_bytes(booted, IMAGE);
    assert!(
        bytes == s.v1 || bytes == s.v2,
        "booted slot {booted} holds neither v1 nor v2 (half-written or corrupt)"
    );
}

#[test]
fn happy_path_commits_v2_and_keeps_v1_as_fallback() {
    let s = setup(1);
    let run = s.sim.run_machine(
        |_| s.sim.os_install(&s.bundle, &key(), &[]),
        |_| None,
        true,
        6,
    );
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(run.boots, 1, "one reboot into the trial");
    assert_eq!(s.sim.booted(), Slot::B);
    assert_eq!(s.sim.slot_bytes(Slot::B, IMAGE), s.v2);
    assert_eq!(
        s.sim.slot_bytes(Slot::A, IMAGE),
        s.v1,
        "the old slot is untouched"
    );
    let st = FileBoot::open(&s.sim.boot_dir).unwrap().state().unwrap();
    assert_eq!(st.default, Slot::B);
    assert_eq!(st.bootable, [true, true], "slot A stays as the fallback");
    assert_eq!(committed_version(&s.sim).as_deref(), Some("2.0.0"));
    let j = job(&s.sim);
    assert_eq!(j.phase, UpgradePhase::Committed);
    // Delta: 10% of the blocks changed; the rest was copied from slot A.
    let downloaded = j.progress[0].downloaded;
    let ratio = downloaded as f64 / IMAGE as f64;
    eprintln!(
        "delta: downloaded {downloaded} of {IMAGE} bytes ({:.1}%)",
        ratio * 100.0
    );
    assert!(
        ratio < 0.15,
        "downloaded {:.1}% of the image",
        ratio * 100.0
    );
    assert!(
        ratio > 0.05,
        "10% of the blocks changed; {:.1}% downloaded is too little to be true",
        ratio * 100.0
    );

    // Running it again changes nothing.
    let again = s.sim.os_install(&s.bundle, &key(), &[]).output().unwrap();
    assert!(again.status.success());
    assert!(String::from_utf8_lossy(&again.stdout).contains("2.0.0 committed on slot B"));
}

#[test]
fn happy_path_on_a_gpt_disk() {
    let tmp = tempfile::tempdir().unwrap();
    let v1 = random_image(30, IMAGE);
    let v2 = mutate_blocks(&v1, 0.10, 31);
    let sim = SimBox::flash_gpt(&tmp.path().join("box"), &v1, SLOT);
    let bundle = tmp.path().join("v2.cairn");
    build_bundle(&bundle, &key(), "2.0.0", "sim", &v2);
    let cairn_e2e::abox::Firmware::Gpt { disk, .. } = sim.firmware.clone() else {
        unreachable!()
    };
    let attrs = |n: &str| {
        let out = std::process::Command::new("sgdisk")
            .args(["-i", n])
            .arg(&disk)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        text.lines()
            .find(|l| l.starts_with("Attribute flags"))
            .unwrap_or_default()
            .to_string()
    };
    let run = sim.run_machine(|_| sim.os_install(&bundle, &key(), &[]), |_| None, true, 6);
    assert_eq!(run.code, Some(0), "{}", run.stderr);
    assert_eq!(sim.booted(), Slot::B);
    assert_eq!(sim.slot_bytes(Slot::B, IMAGE), v2);
    assert_eq!(sim.slot_bytes(Slot::A, IMAGE), v1);
    // B committed: successful (bit 56) with priority 2 (bits 48-51); A stays the
    // successful fallback with priority 1.
    assert_eq!(attrs("3"), "Attribute flags: 0102000000000000", "slot B");
    assert_eq!(attrs("2"), "Attribute flags: 0101000000000000", "slot A");
    let verify = std::process::Command::new("sgdisk")
        .arg("-v")
        .arg(&disk)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&verify.stdout).contains("No problems found"));
}

fn refused(s: &Setup, bundle: &std::path::Path, extra: &[&str], expect: &str) {
    let run = s.sim.run_machine(
        |_| s.sim.os_install(bundle, &key(), extra),
        |_| None,
        true,
        3,
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains(expect),
        "expected {expect:?} in:\n{}",
        run.stderr
    );
    assert_eq!(run.boots, 0, "no reboot");
    assert_eq!(s.sim.booted(), Slot::A);
    assert_eq!(
        s.sim.slot_bytes(Slot::A, IMAGE),
        s.v1,
        "the active slot is untouched"
    );
    let st = FileBoot::open(&s.sim.boot_dir).unwrap().state().unwrap();
    assert_eq!((st.default, st.trial), (Slot::A, None));
    assert!(st.bootable[0]);
}

#[test]
fn bad_releases_are_refused_and_the_active_slot_is_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    // Signed with a key the box does not trust.
    let s = setup(2);
    let other = tmp.path().join("other-key.cairn");
    build_bundle(
        &other,
        &SigningKey::from_bytes(&[9; 32]),
        "2.0.0",
        "sim",
        &s.v2,
    );
    refused(&s, &other, &[], "does not trust");

    // The manifest altered after signing (the version byte).
    let s = setup(3);
    let mut bytes = std::fs::read(&s.bundle).unwrap();
    let at = bytes.windows(5).position(|w| w == b"2.0.0").unwrap();
    bytes[at] = b'9';
    let tampered = tmp.path().join("tampered.cairn");
    std::fs::write(&tampered, &bytes).unwrap();
    refused(&s, &tampered, &[], "signature does not verify");

    // Built for other hardware.
    let s = setup(4);
    let rpi = tmp.path().join("rpi.cairn");
    build_bundle(&rpi, &key(), "2.0.0", "rpi4", &s.v2);
    refused(&s, &rpi, &[], "is for");

    // Larger than the slot.
    let s = setup(5);
    let big = tmp.path().join("big.cairn");
    build_bundle(
        &big,
        &key(),
        "2.0.0",
        "sim",
        &random_image(50, SLOT as usize + 4096),
    );
    refused(&s, &big, &[], "holds 6.0 MiB");

    // Older than the committed version, without --downgrade.
    let s = setup(6);
    let old = tmp.path().join("old.cairn");
    build_bundle(&old, &key(), "0.9.0", "sim", &s.v2);
    refused(&s, &old, &[], "explicit downgrade");

    // A corrupted block in the payload (an image with no block in common with v1, so
    // every block comes from the bundle): caught against the signed index.
    let s = setup(7);
    let corrupt = tmp.path().join("corrupt.cairn");
    build_bundle(&corrupt, &key(), "2.0.0", "sim", &random_image(70, IMAGE));
    let mut bytes = std::fs::read(&corrupt).unwrap();
    let n = bytes.len();
    bytes[n - 4096 * 3] ^= 0xff;
    std::fs::write(&corrupt, &bytes).unwrap();
    refused(&s, &corrupt, &[], "does not match the signed block index");
}

fn with_slot_b(sim: &SimBox, slot_b: std::path::PathBuf) -> SimBox {
    SimBox {
        dir: sim.dir.clone(),
        firmware: sim.firmware.clone(),
        boot_dir: sim.boot_dir.clone(),
        slots: [sim.slots[0].clone(), slot_b],
        data_dir: sim.data_dir.clone(),
        board: sim.board.clone(),
    }
}

#[test]
fn disk_full_is_refused_with_a_clear_error() {
    // The device fills up while the slot is written (/dev/full answers every write
    // with ENOSPC): the install stops with a clear error, the active slot untouched.
    let s = setup(8);
    let out = with_slot_b(&s.sim, "/dev/full".into())
        .os_install(&s.bundle, &key(), &[])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("writing /dev/full: no space left on device"),
        "{err}"
    );
    assert_eq!(s.sim.slot_bytes(Slot::A, IMAGE), s.v1);
    let st = FileBoot::open(&s.sim.boot_dir).unwrap().state().unwrap();
    assert_eq!((st.default, st.trial), (Slot::A, None));

    // A file system too small for the image: refused before a byte is written. Needs
    // a tmpfs mount (root); where mounting is not allowed only the case above runs.
    let s = setup(9);
    let mnt = s.sim.dir.join("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "tmpfs"])
        .arg(&mnt)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|st| st.success())
        .unwrap_or(false);
    if !mounted {
        eprintln!("no tmpfs mount allowed here: the free-space check is not exercised");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.clone());
    let out = with_slot_b(&s.sim, mnt.join("slot-b.img"))
        .os_install(&s.bundle, &key(), &[])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("not enough space for slot B"), "{err}");
    assert!(
        !mnt.join("slot-b.img").exists()
            || std::fs::metadata(mnt.join("slot-b.img")).unwrap().len() == 0
    );
    assert_eq!(s.sim.slot_bytes(Slot::A, IMAGE), s.v1);
}

#[test]
fn failed_health_check_rolls_back() {
    let s = setup(10);
    let run = s.sim.run_machine(
        |_| {
            s.sim.os_install(
                &s.bundle,
                &key(),
                &["--health-cmd", "echo no database >&2; exit 3"],
            )
        },
        |_| None,
        true,
        6,
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("rolled back: health check failed"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("no database"),
        "the check's own words: {}",
        run.stderr
    );
    assert_eq!(run.boots, 2, "into the trial, and back");
    assert_eq!(s.sim.booted(), Slot::A);
    assert_eq!(s.sim.slot_bytes(Slot::A, IMAGE), s.v1);
    assert_eq!(job(&s.sim).phase, UpgradePhase::RolledBack);
    assert_eq!(
        committed_version(&s.sim),
        None,
        "still on the flashed 1.0.0"
    );
    let st = FileBoot::open(&s.sim.boot_dir).unwrap().state().unwrap();
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::A, None, [true, false])
    );
}

#[test]
fn crash_loop_on_the_trial_rolls_back() {
    let s = setup(11);
    // The agent on the trial never gets through its (slow) check: it is killed each
    // time, while the system stays up.
    let run = s.sim.run_machine(
        |_| {
            s.sim
                .os_install(&s.bundle, &key(), &["--health-cmd", "sleep 30"])
        },
        |n| (n >= 1).then_some(Duration::from_millis(400)),
        false,
        10,
    );
    assert!(run.kills >= 3, "{run:?}");
    assert!(run.stderr.contains("crash loop"), "{}", run.stderr);
    assert_eq!(s.sim.booted(), Slot::A);
    assert_eq!(job(&s.sim).phase, UpgradePhase::RolledBack);
}

#[test]
fn a_panicking_kernel_ends_back_on_the_old_slot() {
    let s = setup(12);
    let mut broken = s.v2.clone();
    broken[..5].copy_from_slice(b"PANIC");
    build_bundle(&s.bundle, &key(), "2.0.0", "sim", &broken);
    let run = s.sim.run_machine(
        |_| s.sim.os_install(&s.bundle, &key(), &[]),
        |_| None,
        true,
        6,
    );
    assert_eq!(run.panics, 1, "{run:?}");
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("did not come up"), "{}", run.stderr);
    assert_eq!(s.sim.booted(), Slot::A);
    assert_eq!(s.sim.slot_bytes(Slot::A, IMAGE), s.v1);
}

/// Kill the agent at its `n`th crash point in run `k` (0: the install, 1: the trial)
/// for every `n` the run passes; every other run is left alone. `power_cut`: the kill
/// is a power loss (the box boots again) rather than an agent crash.
fn kill_at_every_point(
    k: u32,
    power_cut: bool,
    check: impl Fn(&Setup, &cairn_e2e::abox::Run, u64),
) -> u64 {
    let mut n = 1;
    loop {
        let s = setup(20);
        let run = s.sim.run_machine(
            |i| {
                let mut c = s
                    .sim
                    .os_install(&s.bundle, &key(), &["--checkpoint-mib", "1"]);
                if i == k {
                    c.env("CAIRN_CRASH_AT", n.to_string());
                }
                c
            },
            |_| None,
            power_cut,
            8,
        );
        assert_bootable(&s);
        if run.kills == 0 {
            return n - 1;
        }
        check(&s, &run, n);
        n += 1;
        assert!(n < 200, "too many crash points");
    }
}

fn assert_committed(s: &Setup, run: &cairn_e2e::abox::Run, what: &str) {
    assert_eq!(
        run.code,
        Some(0),
        "{what}: the box did not end committed:\n{}",
        run.stderr
    );
    assert_eq!(s.sim.booted(), Slot::B, "{what}");
    assert_eq!(s.sim.slot_bytes(Slot::B, IMAGE), s.v2, "{what}");
    assert_eq!(s.sim.slot_bytes(Slot::A, IMAGE), s.v1, "{what}");
    assert_eq!(
        committed_version(&s.sim).as_deref(),
        Some("2.0.0"),
        "{what}"
    );
}

/// Committed on B, or cleanly rolled back to A: nothing else.
fn assert_committed_or_rolled_back(s: &Setup, run: &cairn_e2e::abox::Run, what: &str) {
    if run.code == Some(0) {
        return assert_committed(s, run, what);
    }
    assert_eq!(run.code, Some(1), "{what}: {}", run.stderr);
    assert!(run.stderr.contains("rolled back"), "{what}: {}", run.stderr);
    assert_eq!(s.sim.booted(), Slot::A, "{what}");
    assert_eq!(s.sim.slot_bytes(Slot::A, IMAGE), s.v1, "{what}");
    assert_eq!(job(&s.sim).phase, UpgradePhase::RolledBack, "{what}");
    assert_eq!(committed_version(&s.sim), None, "{what}");
}

#[test]
fn sigkill_at_every_durability_point() {
    // Power lost at any point of the install: it resumes and commits.
    let install = kill_at_every_point(0, true, |s, run, n| {
        assert_committed(
            s,
            run,
            &format!("power cut at crash point {n} of the install"),
        )
    });
    // The agent killed at any point of the trial (the system stays up): it commits.
    let trial = kill_at_every_point(1, false, |s, run, n| {
        assert_committed(
            s,
            run,
            &format!("agent killed at crash point {n} of the trial"),
        )
    });
    // Power lost at any point of the trial: committed if the commit was durable,
    // else back on the old slot.
    kill_at_every_point(1, true, |s, run, n| {
        assert_committed_or_rolled_back(
            s,
            run,
            &format!("power cut at crash point {n} of the trial"),
        )
    });
    eprintln!("killed at each of {install} crash points of the install and {trial} of the trial");
    assert!(
        install >= 10,
        "the install passes through its durability points"
    );
    assert!(trial >= 2, "the trial commits durably");
}

/// Seeded power cuts at random times; after each boot the box runs v1 or v2, never a
/// half-written slot, and in the end it commits v2. `CAIRN_CRASH_SEED=N` replays.
#[test]
fn random_power_cuts_always_leave_a_bootable_box() {
    let seed: u64 = std::env::var("CAIRN_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().r#gen::<u16>() as u64);
    eprintln!("power-cut test seed {seed}; replay with CAIRN_CRASH_SEED={seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for iteration in 0..6 {
        let s = setup(seed * 100 + iteration);
        let mut cuts = 0;
        let run = s.sim.run_machine(
            |_| {
                assert_bootable(&s);
                s.sim
                    .os_install(&s.bundle, &key(), &["--checkpoint-mib", "1"])
            },
            |_| {
                (cuts < 4 && rng.gen_bool(0.7)).then(|| {
                    cuts += 1;
                    Duration::from_millis(rng.gen_range(0..120))
                })
            },
            true,
            20,
        );
        assert_bootable(&s);
        assert_committed_or_rolled_back(&s, &run, &format!("seed {seed} iteration {iteration}"));
    }
}
