//! The GPT boot-control backend on real GPT images made by `sgdisk`, cross-checked
//! with `sgdisk -v` / `sgdisk -i`.
//!
//! Needs the Debian package `gdisk` (for `sgdisk`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_boot::gpt::{GptBoot, Guid, PartRef, SlotAttrs, firmware_boot};
use cairn_boot::{BootControl, Slot};

fn sgdisk(args: &[&str]) -> String {
    let out = Command::new("sgdisk")
        .args(args)
        .output()
        .expect("running sgdisk (Debian package gdisk)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "sgdisk {args:?} failed: {text}");
    text
}

/// A 64 MiB image: 1 esp, 2 slot-a, 3 slot-b, 4 data.
fn image(dir: &Path) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let ps = p.to_str().unwrap();
    sgdisk(&[
        "-n",
        "1:2048:+8M",
        "-t",
        "1:EF00",
        "-c",
        "1:esp",
        "-n",
        "2:0:+16M",
        "-c",
        "2:slot-a",
        "-n",
        "3:0:+16M",
        "-c",
        "3:slot-b",
        "-n",
        "4:0:0",
        "-c",
        "4:data",
        ps,
    ]);
    p
}

/// `sgdisk -v` finds nothing wrong.
fn verify(p: &Path) {
    let out = sgdisk(&["-v", p.to_str().unwrap()]);
    assert!(out.contains("No problems found"), "sgdisk -v: {out}");
}

/// The attribute flags `sgdisk -i N` shows, as a number.
fn sgdisk_attrs(p: &Path, n: u32) -> u64 {
    let out = sgdisk(&["-i", &n.to_string(), p.to_str().unwrap()]);
    let hex = out
        .lines()
        .find_map(|l| l.strip_prefix("Attribute flags: "))
        .unwrap_or_else(|| panic!("no attribute flags in {out}"));
    u64::from_str_radix(hex.trim(), 16).unwrap()
}

fn field(v: u64) -> SlotAttrs {
    SlotAttrs {
        priority: ((v >> 48) & 0xf) as u8,
        tries: ((v >> 52) & 0xf) as u8,
        successful: (v >> 56) & 1 == 1,
    }
}

fn attrs(priority: u8, tries: u8, successful: bool) -> SlotAttrs {
    SlotAttrs {
        priority,
        tries,
        successful,
    }
}

const A: PartRef = PartRef::Number(2);
const B: PartRef = PartRef::Number(3);

fn boot(p: &Path) -> Slot {
    firmware_boot(p, &A, &B).unwrap()
}

/// Both slots as our backend and as sgdisk see them, which must agree.
fn both(g: &GptBoot) -> [SlotAttrs; 2] {
    let ours = g.attrs().unwrap();
    let theirs = [
        field(sgdisk_attrs(g.disk(), 2)),
        field(sgdisk_attrs(g.disk(), 3)),
    ];
    assert_eq!(ours, theirs, "our reading vs sgdisk -i");
    verify(g.disk());
    ours
}

#[test]
fn full_cycle_on_a_real_image_agrees_with_sgdisk() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path());
    // Bits outside ours (0 = required, 60 = a type-specific one) must survive.
    sgdisk(&["-A", "2:set:0", "-A", "3:set:60", p.to_str().unwrap()]);
    let mut g = GptBoot::open(&p, A, B).unwrap();
    assert!(g.problems().unwrap().is_empty());
    // A fresh table: nothing bootable, the firmware says so.
    assert_eq!(g.state().unwrap().bootable, [false, false]);
    let e = firmware_boot(&p, &A, &B).unwrap_err().to_string();
    assert!(
        e.contains("no bootable slot") && e.contains("disk.img"),
        "{e}"
    );

    // Provision: A committed.
    g.commit(Slot::A).unwrap();
    assert_eq!(both(&g), [attrs(2, 0, true), attrs(0, 0, false)]);
    assert_eq!(sgdisk_attrs(&p, 2), 0x0102_0000_0000_0001);
    assert_eq!(sgdisk_attrs(&p, 3), 1 << 60);
    let s = g.state().unwrap();
    assert_eq!(
        (s.default, s.trial, s.bootable),
        (Slot::A, None, [true, false])
    );
    assert_eq!(boot(&p), Slot::A);
    assert_eq!(boot(&p), Slot::A);

    // Upgrade B: unbootable first, then one trial.
    g.mark_unbootable(Slot::B).unwrap();
    g.mark_unbootable(Slot::B).unwrap();
    g.arm_trial(Slot::B).unwrap();
    g.arm_trial(Slot::B).unwrap();
    assert_eq!(both(&g), [attrs(2, 0, true), attrs(3, 1, false)]);
    let s = g.state().unwrap();
    assert_eq!(
        (s.default, s.trial, s.bootable),
        (Slot::A, Some(Slot::B), [true, true])
    );
    assert_eq!(boot(&p), Slot::B);
    assert_eq!(both(&g), [attrs(2, 0, true), attrs(3, 0, false)]);
    // Not committed: every later boot is A.
    assert_eq!(boot(&p), Slot::A);
    assert_eq!(boot(&p), Slot::A);
    let s = g.state().unwrap();
    assert_eq!(
        (s.default, s.trial, s.bootable),
        (Slot::A, None, [true, false])
    );

    // Again, and this time the trial is healthy.
    g.arm_trial(Slot::B).unwrap();
    assert_eq!(boot(&p), Slot::B);
    g.commit(Slot::B).unwrap();
    g.commit(Slot::B).unwrap();
    assert_eq!(both(&g), [attrs(1, 0, true), attrs(2, 0, true)]);
    assert_eq!(sgdisk_attrs(&p, 2), 0x0101_0000_0000_0001);
    assert_eq!(sgdisk_attrs(&p, 3), 0x0102_0000_0000_0000 | (1 << 60));
    let s = g.state().unwrap();
    assert_eq!(
        (s.default, s.trial, s.bootable),
        (Slot::B, None, [true, true])
    );
    assert_eq!(boot(&p), Slot::B);
    assert_eq!(boot(&p), Slot::B);

    // Next upgrade writes A: never picked while half-written; B is the last one.
    g.mark_unbootable(Slot::A).unwrap();
    assert_eq!(both(&g)[0], attrs(0, 0, false));
    assert_eq!(boot(&p), Slot::B);
    let e = g.mark_unbootable(Slot::B).unwrap_err().to_string();
    assert!(e.contains("refusing"), "{e}");
    assert!(g.reject(Slot::B).is_err());
    // A fails its trial and is rejected: B boots and A is not tried again.
    g.arm_trial(Slot::A).unwrap();
    assert_eq!(both(&g)[0], attrs(3, 1, false));
    g.reject(Slot::A).unwrap();
    g.reject(Slot::A).unwrap();
    assert_eq!(both(&g), [attrs(0, 0, false), attrs(2, 0, true)]);
    assert_eq!(boot(&p), Slot::B);
    let s = g.state().unwrap();
    assert_eq!(
        (s.default, s.trial, s.bootable),
        (Slot::B, None, [false, true])
    );
    verify(&p);
}

#[test]
fn slots_by_name_and_guid_and_high_priorities() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path());
    let ps = p.to_str().unwrap();
    // Someone else set A to priority 15, successful.
    sgdisk(&[
        "-A", "2:set:48", "-A", "2:set:49", "-A", "2:set:50", "-A", "2:set:51", "-A", "2:set:56",
        ps,
    ]);
    let info = sgdisk(&["-i", "3", ps]);
    let guid = info
        .lines()
        .find_map(|l| l.strip_prefix("Partition unique GUID: "))
        .unwrap();
    let b = PartRef::Guid(Guid::parse(guid.trim()).unwrap());
    let mut g = GptBoot::open(&p, PartRef::Name("slot-a".into()), b.clone()).unwrap();
    assert_eq!(g.attrs().unwrap()[0], attrs(15, 0, true));
    g.arm_trial(Slot::B).unwrap();
    assert_eq!(both(&g), [attrs(14, 0, true), attrs(15, 1, false)]);
    assert_eq!(
        firmware_boot(&p, &PartRef::Name("slot-a".into()), &b).unwrap(),
        Slot::B
    );
    assert_eq!(
        firmware_boot(&p, &PartRef::Name("slot-a".into()), &b).unwrap(),
        Slot::A
    );

    // Unknown and ambiguous references are errors naming the disk.
    let e = GptBoot::open(&p, PartRef::Name("nope".into()), B)
        .unwrap_err()
        .to_string();
    assert!(e.contains("disk.img") && e.contains("nope"), "{e}");
    assert!(GptBoot::open(&p, PartRef::Number(7), B).is_err());
    assert!(
        GptBoot::open(&p, PartRef::Number(3), B).is_err(),
        "same partition twice"
    );
    sgdisk(&["-c", "4:slot-a", ps]);
    assert!(GptBoot::open(&p, PartRef::Name("slot-a".into()), B).is_err());
}

/// Flips one byte of the disk at `at`.
fn flip(p: &Path, at: usize) {
    let mut bytes = std::fs::read(p).unwrap();
    bytes[at] ^= 0x5a;
    std::fs::write(p, bytes).unwrap();
}

#[test]
fn a_damaged_primary_is_read_from_the_backup_and_repaired_by_the_next_write() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path());
    let mut g = GptBoot::open(&p, A, B).unwrap();
    g.commit(Slot::A).unwrap();
    g.arm_trial(Slot::B).unwrap();
    // A byte of the primary header's disk GUID: the header CRC no longer matches.
    flip(&p, 512 + 60);
    let problems = g.problems().unwrap();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("primary GPT header at LBA 1 is invalid")
            && problems[0].contains("CRC32")
            && problems[0].contains("using the backup"),
        "{problems:?}"
    );
    let s = g.state().unwrap();
    assert_eq!((s.default, s.trial), (Slot::A, Some(Slot::B)));
    // The firmware boots from the backup too, and its write repairs the primary.
    assert_eq!(boot(&p), Slot::B);
    assert!(g.problems().unwrap().is_empty());
    verify(&p);
    assert_eq!(both(&g), [attrs(2, 0, true), attrs(3, 0, false)]);

    // A damaged primary entry array (inside slot B's name): the same.
    flip(&p, 1024 + 2 * 128 + 60);
    let problems = g.problems().unwrap();
    assert!(
        problems[0].contains("entry array CRC32 mismatch"),
        "{problems:?}"
    );
    assert_eq!(g.attrs().unwrap()[1], attrs(3, 0, false));
    g.commit(Slot::A).unwrap();
    assert!(g.problems().unwrap().is_empty());
    assert_eq!(both(&g), [attrs(2, 0, true), attrs(0, 0, false)]);

    // A damaged backup header: the primary is used, the backup repaired.
    let len = std::fs::metadata(&p).unwrap().len() as usize;
    flip(&p, len - 512 + 60);
    let problems = g.problems().unwrap();
    assert!(problems[0].contains("backup GPT header"), "{problems:?}");
    assert!(sgdisk(&["-v", p.to_str().unwrap()]).contains("backup"));
    g.mark_unbootable(Slot::B).unwrap();
    assert!(g.problems().unwrap().is_empty());
    verify(&p);

    // Both damaged: a clear error, no panic.
    flip(&p, 512 + 60);
    flip(&p, len - 512 + 60);
    let e = g.state().unwrap_err().to_string();
    assert!(e.contains("disk.img") && e.contains("no valid GPT"), "{e}");
    assert!(firmware_boot(&p, &A, &B).is_err());
}

#[test]
fn garbage_in_every_header_field_is_an_error_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path());
    let orig = std::fs::read(&p).unwrap();
    let len = orig.len();
    // Corrupt each byte of both headers in turn, with the CRC fixed up so the
    // fields themselves are parsed.
    for (hdr, at) in [
        (512usize, 12usize),
        (512, 24),
        (512, 32),
        (512, 40),
        (512, 48),
        (512, 72),
        (512, 80),
        (512, 84),
    ]
    .into_iter()
    .chain([
        (len - 512, 72),
        (len - 512, 80),
        (len - 512, 84),
        (len - 512, 24),
    ]) {
        for v in [0u8, 0x7f, 0xff] {
            let mut bytes = orig.clone();
            bytes[hdr + at] = v;
            bytes[hdr + at + 3] = v;
            let size = u32::from_le_bytes(bytes[hdr + 12..hdr + 16].try_into().unwrap()) as usize;
            let size = size.clamp(92, 512);
            bytes[hdr + 16..hdr + 20].fill(0);
            let crc = crc32fast::hash(&bytes[hdr..hdr + size]);
            bytes[hdr + 16..hdr + 20].copy_from_slice(&crc.to_le_bytes());
            std::fs::write(&p, &bytes).unwrap();
            // Either the other copy is used or a clear error: never a panic.
            match GptBoot::open(&p, A, B) {
                Ok(g) => {
                    let _ = g.state().unwrap();
                }
                Err(e) => assert!(e.to_string().contains("disk.img"), "{e}"),
            }
        }
    }
}

#[test]
fn a_power_cut_between_the_two_copies_leaves_a_valid_table_and_is_healed() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path());
    let mut g = GptBoot::open(&p, A, B).unwrap();
    g.commit(Slot::A).unwrap();
    let before = std::fs::read(&p).unwrap();
    g.arm_trial(Slot::B).unwrap();
    let after = std::fs::read(&p).unwrap();
    let len = before.len();
    // The primary table is LBAs 0..34, the backup the last 33 LBAs.
    let primary = 0..34 * 512;
    let backup = len - 33 * 512..len;
    assert_eq!(
        before[34 * 512..len - 33 * 512],
        after[34 * 512..len - 33 * 512]
    );

    // Cut after the backup was written, before the primary: the old state, still
    // valid; the engine repeats arm_trial, which completes the write.
    let mut cut = after.clone();
    cut[primary.clone()].copy_from_slice(&before[primary.clone()]);
    std::fs::write(&p, &cut).unwrap();
    assert!(g.problems().unwrap()[0].contains("differs from the primary"));
    assert_eq!(g.state().unwrap().trial, None);
    g.arm_trial(Slot::B).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), after);

    // Cut in the middle of the primary (new entries, old header): the backup holds
    // the new state and is used.
    let mut cut = after.clone();
    cut[512..1024].copy_from_slice(&before[512..1024]);
    std::fs::write(&p, &cut).unwrap();
    assert!(g.problems().unwrap()[0].contains("using the backup"));
    assert_eq!(g.state().unwrap().trial, Some(Slot::B));

    // Cut in the middle of the backup (primary untouched yet): the old state.
    let mut cut = before.clone();
    cut[backup.start..backup.end - 512].copy_from_slice(&after[backup.start..backup.end - 512]);
    std::fs::write(&p, &cut).unwrap();
    assert!(g.problems().unwrap()[0].contains("backup GPT header"));
    assert_eq!(g.state().unwrap().trial, None);
    g.arm_trial(Slot::B).unwrap();
    assert_eq!(std::fs::read(&p).unwrap(), after);
    verify(&p);
}

#[test]
fn partitions_are_listed_as_sgdisk_made_them() {
    let d = tempfile::tempdir().unwrap();
    let p = image(d.path());
    let parts = cairn_boot::gpt::partitions(&p).unwrap();
    let names: Vec<(u32, &str)> = parts.iter().map(|x| (x.number, x.name.as_str())).collect();
    assert_eq!(
        names,
        [(1, "esp"), (2, "slot-a"), (3, "slot-b"), (4, "data")]
    );
    assert_eq!((parts[0].offset, parts[0].len), (2048 * 512, 8 << 20));
    assert_eq!(parts[1].offset, parts[0].offset + parts[0].len);
    for x in &parts {
        let out = sgdisk(&["-i", &x.number.to_string(), p.to_str().unwrap()]);
        let first: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("First sector: "))
            .and_then(|v| v.split_whitespace().next())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(first * 512, x.offset, "partition {}", x.number);
    }
    // A damaged table is an error that names the file, not a guess.
    let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 512], 512).unwrap();
    let len = f.metadata().unwrap().len();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 512], len - 512).unwrap();
    let e = cairn_boot::gpt::partitions(&p).unwrap_err().to_string();
    assert!(e.contains("no valid GPT") && e.contains("disk.img"), "{e}");
}
