//! The flash writer: sparse images written with their holes zeroed and verified; the
//! refusals of everything that is not an unused whole disk. Loop devices (when the
//! tests run as root) are real block devices.

use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_hwtests::rig::config::FlashConfig;
use cairn_hwtests::rig::flash::{Flasher, Target, check_target, parse_mountinfo, write_image};

use super::read;

const MIB: u64 = 1 << 20;

/// An 8 MiB sparse image: data at 0, at 3 MiB + 4 KiB and in the last 64 KiB; the
/// rest holes.
fn sparse_image(path: &Path) -> Vec<u8> {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(8 * MIB).unwrap();
    let mut want = vec![0u8; 8 * MIB as usize];
    for (at, len, byte) in [
        (0, 70_000, 0x11u8),
        (3 * MIB + 4096, 5000, 0x22),
        (8 * MIB - 65536, 65536, 0x33),
    ] {
        f.seek(SeekFrom::Start(at)).unwrap();
        f.write_all(&vec![byte; len]).unwrap();
        want[at as usize..at as usize + len].fill(byte);
    }
    f.sync_all().unwrap();
    want
}

/// A stand-in "disk" of `mib` MiB full of 0xFF (old contents that must not survive).
fn dirty_disk(path: &Path, mib: u64) {
    std::fs::write(path, vec![0xFFu8; (mib * MIB) as usize]).unwrap();
}

#[test]
fn a_sparse_image_is_written_with_its_holes_zeroed_and_verified() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("flash.img");
    let want = sparse_image(&img);
    let disk = tmp.path().join("disk");
    dirty_disk(&disk, 12);
    let w = write_image(
        &img,
        &Target::regular_file_standing_in_for_a_disk(&disk),
        "nuc-1",
    )
    .unwrap();
    assert_eq!(w.bytes, 8 * MIB);
    assert!(w.data_bytes < 2 * MIB, "holes are not copied: {w:?}");
    let got = std::fs::read(&disk).unwrap();
    assert_eq!(got.len(), 12 * MIB as usize, "the disk keeps its size");
    assert!(
        got[..8 * MIB as usize] == want[..],
        "the image, holes as zeros"
    );
    // Between the image and the last MiB: untouched. The last MiB (where an older,
    // larger image's backup GPT would be): zeroed.
    assert!(
        got[8 * MIB as usize..11 * MIB as usize]
            .iter()
            .all(|b| *b == 0xFF)
    );
    assert!(got[11 * MIB as usize..].iter().all(|b| *b == 0));
    use sha2::Digest;
    assert_eq!(w.sha256, hex::encode(sha2::Sha256::digest(&want)));
}

#[test]
fn an_image_larger_than_the_disk_is_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let img = tmp.path().join("flash.img");
    sparse_image(&img);
    let disk = tmp.path().join("disk");
    dirty_disk(&disk, 4);
    let e = write_image(
        &img,
        &Target::regular_file_standing_in_for_a_disk(&disk),
        "x",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("is 8 MiB") && e.contains("only 4 MiB"), "{e}");
    assert!(std::fs::read(&disk).unwrap().iter().all(|b| *b == 0xFF));
}

#[test]
fn what_is_not_a_whole_unused_disk_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("disk.img");
    std::fs::write(&file, b"x").unwrap();
    let link = tmp.path().join("usb-Fake_Disk-0:0");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (file.clone(), "is not a block device but a regular file"),
        (link, "(→ "),
        (
            tmp.path().to_path_buf(),
            "is not a block device but a directory",
        ),
        (
            "/dev/null".into(),
            "is not a block device but a character device",
        ),
        (
            "/dev/disk/by-id/usb-not-plugged-in".into(),
            "does not exist: is the adapter (or SD mux, or the box in mass-storage mode) plugged in?",
        ),
    ];
    for (p, want) in cases {
        let e = format!("{:#}", check_target(&p).unwrap_err());
        assert!(e.contains(want), "{}: {e}", p.display());
        // The writer refuses the same way, writing nothing.
        let img = tmp.path().join("i");
        std::fs::write(&img, b"image").unwrap();
        let e = format!(
            "{:#}",
            write_image(&img, &Target::block_device(&p), "x").unwrap_err()
        );
        assert!(e.contains(want), "{e}");
    }
    assert_eq!(read(&file), "x");
}

/// The disk `/` is on, when it is a block device here (not in every container).
fn root_disk() -> Option<PathBuf> {
    let mi = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let root = parse_mountinfo(&mi)
        .into_iter()
        .find(|m| m.mount_point == "/")?;
    let d = root.dev?;
    let sys = std::fs::canonicalize(format!("/sys/dev/block/{}:{}", d.major, d.minor)).ok()?;
    let disk = if sys.join("partition").exists() {
        sys.parent()?.to_path_buf()
    } else {
        sys
    };
    let node = Path::new("/dev").join(disk.file_name()?);
    node.exists().then_some(node)
}

#[test]
fn the_rig_hosts_own_root_disk_is_refused() {
    let Some(disk) = root_disk() else {
        eprintln!("skipped: / is not on a block device with a node in /dev here");
        return;
    };
    let e = format!("{:#}", check_target(&disk).unwrap_err());
    assert!(
        e.contains("is the rig host's own root disk") || e.contains("is in use"),
        "{}: {e}",
        disk.display()
    );
}

/// A loop device over a file, detached (and unmounted) on drop.
struct Loop {
    dev: PathBuf,
    mounted: Option<PathBuf>,
}

impl Loop {
    /// `None` when loop devices cannot be set up here (not root).
    fn attach(file: &Path, partitions: bool) -> Option<Loop> {
        let mut c = Command::new("losetup");
        if partitions {
            c.arg("-P");
        }
        let out = c.args(["-f", "--show"]).arg(file).output().ok()?;
        if !out.status.success() {
            eprintln!(
                "skipped: losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
            mounted: None,
        })
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if let Some(m) = &self.mounted {
            let _ = Command::new("umount").arg(m).status();
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

fn run(cmd: &mut Command) -> bool {
    cmd.output().map(|o| o.status.success()).unwrap_or(false)
}

#[test]
fn loop_devices_are_written_when_unused_and_refused_when_mounted_or_partitions() {
    let tmp = tempfile::tempdir().unwrap();
    let backing = tmp.path().join("disk");
    dirty_disk(&backing, 12);
    let Some(lo) = Loop::attach(&backing, false) else {
        return;
    };
    // A real block device: checked, opened O_EXCL, holes zeroed with fallocate.
    let info = check_target(&lo.dev).unwrap();
    assert_eq!(info.size, 12 * MIB);
    assert!(info.block);
    let img = tmp.path().join("flash.img");
    let want = sparse_image(&img);
    write_image(&img, &Target::block_device(&lo.dev), "loop").unwrap();
    let got = std::fs::read(&backing).unwrap();
    assert!(got[..8 * MIB as usize] == want[..]);

    // Mounted: refused, naming the mount point.
    let fs = tmp.path().join("fs.img");
    std::fs::write(&fs, vec![0u8; 16 * MIB as usize]).unwrap();
    let Some(mut lo2) = Loop::attach(&fs, false) else {
        return;
    };
    let mnt = tmp.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    if !run(Command::new("mkfs.ext4").arg("-q").arg(&lo2.dev))
        || !run(Command::new("mount").arg(&lo2.dev).arg(&mnt))
    {
        eprintln!("skipped the mounted case: mkfs.ext4 or mount failed");
        return;
    }
    lo2.mounted = Some(mnt.clone());
    let e = format!("{:#}", check_target(&lo2.dev).unwrap_err());
    assert!(
        e.contains(&format!(
            "is in use: {} is mounted on {}",
            lo2.dev.display(),
            mnt.display()
        )),
        "{e}"
    );
    assert!(e.contains("unmount it first"), "{e}");
    let e = format!(
        "{:#}",
        write_image(&img, &Target::block_device(&lo2.dev), "x").unwrap_err()
    );
    assert!(e.contains("is mounted on"), "{e}");

    // A partition (of a GPT disk): refused, naming the whole disk.
    let gpt = tmp.path().join("gpt.img");
    std::fs::write(&gpt, vec![0u8; 8 * MIB as usize]).unwrap();
    if !run(Command::new("sgdisk").arg("--new=1:2048:8191").arg(&gpt)) {
        eprintln!("skipped the partition case: no sgdisk");
        return;
    }
    let Some(lo3) = Loop::attach(&gpt, true) else {
        return;
    };
    let part = PathBuf::from(format!("{}p1", lo3.dev.display()));
    // The kernel scans the table in `losetup -P` itself; udev only adds links.
    if !super::poll_until(std::time::Duration::from_millis(500), || part.exists()) {
        eprintln!(
            "skipped the partition case: the kernel made no {}",
            part.display()
        );
        return;
    }
    let e = format!("{:#}", check_target(&part).unwrap_err());
    assert!(
        e.contains(&format!("is a partition of {}", lo3.dev.display())),
        "{e}"
    );
}

#[test]
fn sd_mux_switches_to_the_host_writes_and_switches_back_also_after_a_failure() {
    let tmp = tempfile::tempdir().unwrap();
    let calls = tmp.path().join("calls");
    // The usbsdmux CLI's stand-in: records how it is called.
    let tool = tmp.path().join("usbsdmux");
    std::fs::write(
        &tool,
        format!("#!/bin/sh\necho \"$@\" >> {}\n", calls.display()),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
    let disk = tmp.path().join("sd");
    dirty_disk(&disk, 10);
    let cfg = FlashConfig::SdMux {
        control: "/dev/usb-sd-mux/id-000000001234".into(),
        device: disk.clone(),
        tool: tool.display().to_string(),
        appear_timeout: std::time::Duration::from_secs(2),
    };
    let f = Flasher::with_target(&cfg, Target::regular_file_standing_in_for_a_disk);
    let img = tmp.path().join("flash.img");
    let want = sparse_image(&img);
    f.flash(&img, "pi-1").unwrap();
    assert_eq!(
        read(&calls),
        "/dev/usb-sd-mux/id-000000001234 host\n/dev/usb-sd-mux/id-000000001234 dut\n"
    );
    assert!(std::fs::read(&disk).unwrap()[..8 * MIB as usize] == want[..]);

    // Too small a card: the write fails, and the card still goes back to the box.
    std::fs::write(&calls, "").unwrap();
    dirty_disk(&disk, 2);
    let e = format!("{:#}", f.flash(&img, "pi-1").unwrap_err());
    assert!(e.contains("only 2 MiB"), "{e}");
    assert!(
        read(&calls).ends_with("id-000000001234 dut\n"),
        "{}",
        read(&calls)
    );
}

#[test]
fn mass_storage_runs_its_hooks_around_the_write() {
    let tmp = tempfile::tempdir().unwrap();
    let calls = tmp.path().join("calls");
    let disk = tmp.path().join("ssd");
    dirty_disk(&disk, 10);
    let cfg = FlashConfig::UsbMassStorage {
        device: disk.clone(),
        before: Some(format!(
            "echo \"before $CAIRN_BOX $CAIRN_DEVICE\" >> {}",
            calls.display()
        )),
        after: Some(format!("echo after >> {}", calls.display())),
        appear_timeout: std::time::Duration::from_secs(2),
    };
    let f = Flasher::with_target(&cfg, Target::regular_file_standing_in_for_a_disk);
    let img = tmp.path().join("flash.img");
    sparse_image(&img);
    f.flash(&img, "nuc-1").unwrap();
    assert_eq!(
        read(&calls),
        format!("before nuc-1 {}\nafter\n", disk.display())
    );

    // The real configuration path makes block-device targets: a file is refused.
    let e = format!(
        "{:#}",
        Flasher::from_config(&cfg).flash(&img, "nuc-1").unwrap_err()
    );
    assert!(
        e.contains("is not a block device but a regular file"),
        "{e}"
    );
    assert_eq!(
        read(&calls).matches("after\n").count(),
        2,
        "after runs also after a failure"
    );
}

#[test]
fn command_flashing_gets_the_image_path() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let img = tmp.path().join("my image.img");
    std::fs::write(&img, "IMG").unwrap();
    let cfg = FlashConfig::Command {
        command: format!(
            "cp \"$1\" {o}; echo \"$CAIRN_BOX $CAIRN_IMAGE\" >> {o}.env",
            o = out.display()
        ),
        timeout: std::time::Duration::from_secs(5),
    };
    Flasher::from_config(&cfg).flash(&img, "nuc-1").unwrap();
    assert_eq!(read(&out), "IMG");
    assert_eq!(
        read(&out.with_extension("env")),
        format!("nuc-1 {}\n", img.display())
    );
    let cfg = FlashConfig::Command {
        command: "echo 'no pxe server' >&2; false".into(),
        timeout: std::time::Duration::from_secs(5),
    };
    let e = format!(
        "{:#}",
        Flasher::from_config(&cfg).flash(&img, "nuc-1").unwrap_err()
    );
    assert!(
        e.contains("flash command") && e.contains("no pxe server"),
        "{e}"
    );
}
