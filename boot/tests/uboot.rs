//! The U-Boot environment boot-control backend on real environment files, cross-checked
//! with libubootenv's `fw_printenv` / `fw_setenv`.
//!
//! Needs the Debian package `libubootenv-tool` (for `fw_printenv` and `fw_setenv`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_boot::uboot::{EnvCopy, UbootBoot, firmware_boot};
use cairn_boot::{BootControl, Slot};

const SIZE: usize = 0x2000;

/// A box's environment: `fw_env.config` naming `copies`, the copies created by
/// `fw_setenv` from a default environment (so libubootenv wrote the first bytes).
struct Box_ {
    _dir: tempfile::TempDir,
    conf: PathBuf,
    boot: UbootBoot,
}

fn make(copies: impl Fn(&Path) -> Vec<EnvCopy>) -> Box_ {
    let dir = tempfile::tempdir().unwrap();
    let copies = copies(dir.path());
    let mut conf_text = String::new();
    for c in &copies {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&c.device)
            .unwrap();
        let len = f.metadata().unwrap().len().max(c.offset + c.size as u64);
        f.set_len(len).unwrap();
        conf_text += &format!("{} {:#x} {:#x}\n", c.device.display(), c.offset, c.size);
    }
    let conf = dir.path().join("fw_env.config");
    std::fs::write(&conf, conf_text).unwrap();
    let def = dir.path().join("default.env");
    std::fs::write(&def, "bootcmd=run cairn_ab\nbaudrate=115200\n").unwrap();
    let out = Command::new("fw_setenv")
        .arg("-c")
        .arg(&conf)
        .arg("-f")
        .arg(&def)
        .args(["board", "pi4"])
        .output()
        .expect("running fw_setenv (Debian package libubootenv-tool)");
    assert!(out.status.success(), "fw_setenv: {out:?}");
    let boot = UbootBoot::from_fw_env_config(&conf).unwrap();
    Box_ {
        _dir: dir,
        conf,
        boot,
    }
}

fn one_file_two_offsets(d: &Path) -> Vec<EnvCopy> {
    let device = d.join("mmcblk0.img");
    vec![
        EnvCopy {
            device: device.clone(),
            offset: 0x10000,
            size: SIZE,
        },
        EnvCopy {
            device,
            offset: 0x10000 + SIZE as u64,
            size: SIZE,
        },
    ]
}

fn two_files(d: &Path) -> Vec<EnvCopy> {
    ["uboot.env", "uboot-redund.env"]
        .into_iter()
        .map(|n| EnvCopy {
            device: d.join(n),
            offset: 0,
            size: SIZE,
        })
        .collect()
}

fn single(d: &Path) -> Vec<EnvCopy> {
    vec![EnvCopy {
        device: d.join("uboot.env"),
        offset: 0,
        size: SIZE,
    }]
}

impl Box_ {
    /// NAME's value in the full `fw_printenv` listing, or `None` when it is not there
    /// (this libubootenv prints an empty value for `-n` of an undefined name).
    fn printenv(&self, name: &str) -> Option<String> {
        let prefix = format!("{name}=");
        self.printenv_all()
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
    }

    fn printenv_all(&self) -> String {
        let out = Command::new("fw_printenv")
            .arg("-c")
            .arg(&self.conf)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }

    fn setenv(&self, args: &[&str]) {
        let out = Command::new("fw_setenv")
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "fw_setenv {args:?}: {out:?}");
    }

    /// The four A/B variables as libubootenv reads them.
    fn ab(&self) -> [Option<String>; 4] {
        ["cairn_default", "cairn_trial", "cairn_a_ok", "cairn_b_ok"].map(|n| self.printenv(n))
    }

    fn boot(&self) -> Slot {
        firmware_boot(&self.boot).unwrap()
    }
}

fn s(v: &str) -> Option<String> {
    Some(v.to_string())
}

fn full_cycle(bx: &Box_) {
    let mut b = bx.boot.clone();
    // Provisioned without our variables: A, the only bootable slot.
    let st = b.state().unwrap();
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::A, None, [true, false])
    );
    assert_eq!(bx.boot(), Slot::A);

    b.mark_unbootable(Slot::B).unwrap();
    assert_eq!(bx.ab(), [s("a"), None, s("1"), s("0")]);
    b.arm_trial(Slot::B).unwrap();
    b.arm_trial(Slot::B).unwrap();
    assert_eq!(bx.ab(), [s("a"), s("b"), s("1"), s("1")]);
    let st = b.state().unwrap();
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::A, Some(Slot::B), [true, true])
    );
    assert_eq!(bx.boot(), Slot::B);
    assert_eq!(
        bx.ab(),
        [s("a"), None, s("1"), s("1")],
        "the loader cleared the trial"
    );
    // Not committed: A from now on.
    assert_eq!(bx.boot(), Slot::A);
    assert_eq!(bx.boot(), Slot::A);

    b.arm_trial(Slot::B).unwrap();
    assert_eq!(bx.boot(), Slot::B);
    b.commit(Slot::B).unwrap();
    b.commit(Slot::B).unwrap();
    assert_eq!(bx.ab(), [s("b"), None, s("1"), s("1")]);
    let st = b.state().unwrap();
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::B, None, [true, true])
    );
    assert_eq!(bx.boot(), Slot::B);

    b.mark_unbootable(Slot::A).unwrap();
    assert_eq!(bx.ab(), [s("b"), None, s("0"), s("1")]);
    assert_eq!(bx.boot(), Slot::B);
    let e = b.mark_unbootable(Slot::B).unwrap_err().to_string();
    assert!(e.contains("refusing"), "{e}");
    assert!(b.reject(Slot::B).is_err());
    b.arm_trial(Slot::A).unwrap();
    b.reject(Slot::A).unwrap();
    b.reject(Slot::A).unwrap();
    assert_eq!(bx.ab(), [s("b"), None, s("0"), s("1")]);
    assert_eq!(bx.boot(), Slot::B);

    // The board's variables survived every write.
    assert_eq!(bx.printenv("bootcmd"), s("run cairn_ab"));
    assert_eq!(bx.printenv("baudrate"), s("115200"));
    assert_eq!(bx.printenv("board"), s("pi4"));

    // fw_setenv's changes are what we read.
    bx.setenv(&["cairn_trial", "a"]);
    bx.setenv(&["cairn_a_ok", "1"]);
    let st = b.state().unwrap();
    assert_eq!(
        (st.default, st.trial, st.bootable),
        (Slot::B, Some(Slot::A), [true, true])
    );
    assert_eq!(bx.boot(), Slot::A);
    assert_eq!(bx.boot(), Slot::B);
    bx.setenv(&["cairn_default", "a"]);
    assert_eq!(b.state().unwrap().default, Slot::A);
    // Nothing bootable (set by hand): the firmware says so.
    bx.setenv(&["cairn_a_ok", "0"]);
    bx.setenv(&["cairn_b_ok", "0"]);
    let e = firmware_boot(&bx.boot).unwrap_err().to_string();
    assert!(e.contains("no bootable slot"), "{e}");
}

#[test]
fn redundant_in_one_file_full_cycle_with_fw_printenv() {
    full_cycle(&make(one_file_two_offsets));
}

#[test]
fn redundant_in_two_files_full_cycle_with_fw_printenv() {
    full_cycle(&make(two_files));
}

#[test]
fn single_copy_full_cycle_with_fw_printenv() {
    full_cycle(&make(single));
}

#[test]
fn our_values_are_exact_as_fw_printenv_prints_them() {
    let bx = make(two_files);
    bx.boot
        .set_vars(&[
            ("x", Some("a b  c")),
            ("bootargs", Some("console=ttyS0,115200 root=/dev/mmcblk0p2")),
        ])
        .unwrap();
    assert_eq!(bx.printenv("x"), s("a b  c"));
    assert_eq!(
        bx.printenv("bootargs"),
        s("console=ttyS0,115200 root=/dev/mmcblk0p2")
    );
    let all = bx.printenv_all();
    for line in [
        "baudrate=115200",
        "board=pi4",
        "bootcmd=run cairn_ab",
        "x=a b  c",
    ] {
        assert!(all.lines().any(|l| l == line), "{line} missing in {all}");
    }
    bx.boot.set_vars(&[("x", None)]).unwrap();
    assert_eq!(bx.printenv("x"), None);
    assert!(bx.boot.set_vars(&[("a=b", Some("c"))]).is_err());
    let big = "v".repeat(SIZE);
    let e = bx
        .boot
        .set_vars(&[("big", Some(&big))])
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not fit"), "{e}");
    assert_eq!(
        bx.printenv("board"),
        s("pi4"),
        "a failed write changes nothing"
    );
}

#[test]
fn generations_alternate_and_wrap_like_libubootenv() {
    let bx = make(one_file_two_offsets);
    let img = bx.boot.copies()[0].device.clone();
    let flags = || {
        let b = std::fs::read(&img).unwrap();
        (b[0x10000 + 4], b[0x10000 + SIZE + 4])
    };
    // 300 writes: the flags byte goes past 255 and wraps; both tools agree throughout.
    for i in 0..300u32 {
        let v = i.to_string();
        bx.boot.set_vars(&[("counter", Some(&v))]).unwrap();
        let env = bx.boot.read_env().unwrap();
        assert_eq!(env.get("counter"), Some(v.as_bytes()));
        if i % 37 == 0 || (250..262).contains(&i) {
            assert_eq!(
                bx.printenv("counter"),
                Some(v.clone()),
                "write {i}, flags {:?}",
                flags()
            );
        }
    }
    // And libubootenv's writes, past our wrap, are read by us.
    bx.setenv(&["counter", "theirs"]);
    assert_eq!(
        bx.boot.read_env().unwrap().get("counter"),
        Some(&b"theirs"[..])
    );
}

/// Flips one byte of `path` at `at`.
fn flip(path: &Path, at: usize) {
    let mut b = std::fs::read(path).unwrap();
    b[at] ^= 0x20;
    std::fs::write(path, b).unwrap();
}

#[test]
fn a_corrupt_copy_falls_back_to_the_other_and_both_corrupt_is_a_clear_error() {
    let bx = make(two_files);
    let mut b = bx.boot.clone();
    b.commit(Slot::A).unwrap(); // older copy: default a
    b.arm_trial(Slot::B).unwrap(); // newer copy: trial b
    let current = b.read_env().unwrap().current;
    let newer = &bx.boot.copies()[current].device;
    let older = &bx.boot.copies()[1 - current].device;
    assert_eq!(b.state().unwrap().trial, Some(Slot::B));

    // The newer copy damaged inside its data: the older one is in force, for us and
    // for libubootenv alike.
    flip(newer, 40);
    let env = b.read_env().unwrap();
    assert_eq!(env.current, 1 - current);
    assert!(
        env.problems.len() == 1 && env.problems[0].contains("CRC32 mismatch"),
        "{:?}",
        env.problems
    );
    assert_eq!(b.state().unwrap().trial, None);
    assert_eq!(bx.printenv("cairn_trial"), None);
    assert_eq!(bx.printenv("cairn_default"), s("a"));
    // The next write goes over the damaged copy and repairs it.
    b.arm_trial(Slot::B).unwrap();
    assert!(b.read_env().unwrap().problems.is_empty());
    assert_eq!(bx.printenv("cairn_trial"), s("b"));

    // Both damaged: a clear error naming both, and no boot.
    flip(newer, 40);
    flip(older, 40);
    let e = b.state().unwrap_err().to_string();
    assert!(e.contains("no valid U-Boot environment"), "{e}");
    assert!(
        e.contains("uboot.env") && e.contains("uboot-redund.env"),
        "{e}"
    );
    assert!(firmware_boot(&bx.boot).is_err());
    assert!(b.commit(Slot::A).is_err());

    // Malformed but CRC-valid data is an error, not a panic.
    let mut raw = vec![0u8; SIZE];
    raw[5..9].copy_from_slice(b"oops");
    raw[9..SIZE].fill(b'x'); // no terminating NUL at all
    let crc = crc32fast::hash(&raw[5..]);
    raw[..4].copy_from_slice(&crc.to_le_bytes());
    std::fs::write(newer, &raw).unwrap();
    std::fs::write(older, &raw).unwrap();
    let e = b.state().unwrap_err().to_string();
    assert!(e.contains("no terminating NUL"), "{e}");
}

#[test]
fn a_missing_or_short_device_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let b = UbootBoot::new(single(d.path())).unwrap();
    let e = b.state().unwrap_err().to_string();
    assert!(e.contains("uboot.env") && e.contains("opening"), "{e}");
    std::fs::write(d.path().join("uboot.env"), b"short").unwrap();
    let e = b.state().unwrap_err().to_string();
    assert!(e.contains("uboot.env") && e.contains("reading"), "{e}");
}

#[test]
fn a_power_cut_mid_write_leaves_the_previous_environment() {
    let bx = make(one_file_two_offsets);
    let mut b = bx.boot.clone();
    b.commit(Slot::A).unwrap();
    let img = bx.boot.copies()[0].device.clone();
    let before = std::fs::read(&img).unwrap();
    b.arm_trial(Slot::B).unwrap();
    let after = std::fs::read(&img).unwrap();
    let changed: Vec<usize> = (0..before.len())
        .filter(|&i| before[i] != after[i])
        .collect();
    let (first, last) = (changed[0], *changed.last().unwrap());
    // One copy only was written.
    assert!(last - first < SIZE, "{first:#x}..{last:#x}");
    // Half of it reached the disk: the old environment is in force for both tools.
    let mut cut = before.clone();
    let mid = first + (last - first) / 2;
    cut[first..mid].copy_from_slice(&after[first..mid]);
    std::fs::write(&img, &cut).unwrap();
    assert_eq!(b.state().unwrap().trial, None);
    assert_eq!(bx.printenv("cairn_trial"), None);
    assert_eq!(bx.printenv("cairn_default"), s("a"));
    // The engine repeats the step.
    b.arm_trial(Slot::B).unwrap();
    assert_eq!(bx.printenv("cairn_trial"), s("b"));
    assert!(b.read_env().unwrap().problems.is_empty());
}
