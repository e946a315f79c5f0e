//! `cairn-hub image configure|show` on real GPT disk images made by `sgdisk` with FAT
//! partitions made by `mformat`, read back with tools that own those formats: `mtype`
//! (mtools) for the file, `fsck.fat -n` (dosfstools) for the filesystem around it,
//! `sgdisk --verify` for the partition table; and every byte outside the ESP compared
//! before and after.
//!
//! Needs the Debian packages `gdisk`, `mtools` and `dosfstools` (scripts/test.sh
//! installs them).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use cairn_sync_protocol::token::JoinToken;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_cairn-hub");
const MIB: u64 = 1 << 20;
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";

/// Runs a tool that must succeed; its stdout.
fn tool(prog: &str, args: &[&str]) -> String {
    let out = Command::new(prog)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| {
            panic!("running {prog}: {e} (install the Debian packages gdisk, mtools, dosfstools)")
        });
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `cairn-hub ARGS` with no hub anywhere: no context file, no hub URL, an empty home.
/// The image commands must not need one.
fn hub_cli(dir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .current_dir(dir)
        .env("HOME", dir.join("nohome"))
        .env("XDG_DATA_HOME", dir.join("nohome"))
        .env("CAIRN_CONFIG", dir.join("no-such-cli.toml"))
        .env("CAIRN_HUB_URL", "https://127.0.0.1:9")
        .env_remove("CAIRN_ADMIN_TOKEN")
        .env_remove("CAIRN_CA_CERT")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(s) = stdin {
        input.write_all(s.as_bytes()).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn ok(dir: &Path, args: &[&str]) -> String {
    let out = hub_cli(dir, args, None);
    assert!(
        out.status.success(),
        "{args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `image configure IMAGE --hub HUB --token TOKEN`, which must succeed.
/// `image configure IMAGE --hub HUB` and the rest (the token, options).
fn configure_args<'a>(image: &'a str, hub: &'a str, rest: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["image", "configure", image, "--hub", hub];
    v.extend_from_slice(rest);
    v
}

fn configure(dir: &Path, image: &str, hub: &str, token: &str) -> String {
    ok(dir, &configure_args(image, hub, &["--token", token]))
}

fn ok_json(dir: &Path, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    serde_json::from_str(&ok(dir, &args)).unwrap()
}

/// A command that must fail: its exit code and stderr.
fn fails(dir: &Path, args: &[&str]) -> (i32, String) {
    let out = hub_cli(dir, args, None);
    assert!(
        !out.status.success(),
        "{args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn token(seed: u8) -> JoinToken {
    JoinToken {
        id: [seed; 8],
        secret: [seed ^ 0x5a; 16],
        ca_fingerprint: [seed.wrapping_add(1); 32],
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Fat {
    /// FAT12 or FAT16, as mformat picks for the size.
    Small,
    Fat32,
    None,
}

/// One partition of a test image: (name, sgdisk type code, MiB, filesystem on it).
type Part = (&'static str, &'static str, u64, Fat);

/// The x86 layout: esp (FAT32), slot-a, slot-b, data.
const X86: &[Part] = &[
    ("esp", "EF00", 40, Fat::Fat32),
    ("slot-a", "8300", 4, Fat::None),
    ("slot-b", "8300", 4, Fat::None),
    ("data", "8300", 2, Fat::None),
];

/// A disk image made by sgdisk, partitions from LBA 2048 in order, each formatted as
/// asked by mformat. Returns the path and each partition's byte offset.
fn disk(dir: &Path, name: &str, parts: &[Part]) -> (PathBuf, Vec<u64>) {
    let path = dir.join(name);
    let total: u64 = parts.iter().map(|p| p.2).sum::<u64>() + 2;
    std::fs::File::create(&path)
        .unwrap()
        .set_len(total * MIB)
        .unwrap();
    let mut args = Vec::new();
    let mut offsets = Vec::new();
    let mut at = MIB;
    for (i, (label, code, mib, _)) in parts.iter().enumerate() {
        let n = i + 1;
        args.extend([
            "-n".to_string(),
            format!("{n}:{}:+{mib}M", at / 512),
            "-t".into(),
            format!("{n}:{code}"),
            "-c".into(),
            format!("{n}:{label}"),
        ]);
        offsets.push(at);
        at += mib * MIB;
    }
    args.push(path.to_str().unwrap().into());
    tool(
        "sgdisk",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    for ((_, _, mib, fat), off) in parts.iter().zip(&offsets) {
        let sectors = (mib * MIB / 512).to_string();
        let target = format!("{}@@{off}", path.display());
        match fat {
            Fat::Fat32 => tool("mformat", &["-i", &target, "-F", "-T", &sectors, "::"]),
            Fat::Small => tool("mformat", &["-i", &target, "-T", &sectors, "::"]),
            Fat::None => String::new(),
        };
    }
    (path, offsets)
}

/// `mtype` of the first-boot file on the FAT at `off`.
fn mtype(img: &Path, off: u64) -> String {
    tool(
        "mtype",
        &[
            "-i",
            &format!("{}@@{off}", img.display()),
            "::cairn/agent.toml",
        ],
    )
}

/// `fsck.fat -n` (check only) on a copy of the partition at `off`.
fn fsck(img: &Path, off: u64, mib: u64) {
    let bytes = std::fs::read(img).unwrap();
    let part = img.with_extension("part");
    std::fs::write(&part, &bytes[off as usize..(off + mib * MIB) as usize]).unwrap();
    // Exit code 1 when it finds anything to repair.
    tool("fsck.fat", &["-n", part.to_str().unwrap()]);
    std::fs::remove_file(part).unwrap();
}

/// Every byte of the image outside `off..off+len`.
fn outside(img: &Path, off: u64, len: u64) -> Vec<u8> {
    let mut b = std::fs::read(img).unwrap();
    b.drain(off as usize..(off + len) as usize);
    b
}

fn write_token(dir: &Path, t: &JoinToken) -> String {
    let p = dir.join(format!("token-{}", t.id_hex()));
    std::fs::write(&p, format!("{}\n", t.encode())).unwrap();
    p.to_str().unwrap().to_string()
}

fn toml_of(text: &str) -> toml::Table {
    toml::from_str(text).unwrap()
}

#[test]
fn configures_an_x86_image_that_mtools_fsck_and_sgdisk_read_back() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (img, offs) = disk(dir, "nuc.img", X86);
    let ims = img.to_str().unwrap();
    let before = outside(&img, offs[0], 40 * MIB);
    let t = token(7);
    let tf = write_token(dir, &t);

    let r = ok_json(
        dir,
        &configure_args(ims, "hub.example.net:7440", &["--token-file", &tf]),
    );
    assert_eq!(r["outcome"], "configured");
    assert_eq!(r["esp"]["partition"], 1);
    assert_eq!(r["esp"]["name"], "esp");
    assert_eq!(r["esp"]["filesystem"], "FAT32");
    assert_eq!(r["token_id"], t.id_hex());
    assert_eq!(r["ca_fingerprint"], hex::encode(t.ca_fingerprint));

    // What the box's agent will read: exactly the keys of its config file.
    let text = mtype(&img, offs[0]);
    let keys = toml_of(&text);
    assert_eq!(keys.len(), 2, "{text}");
    assert_eq!(keys["hub"].as_str(), Some("hub.example.net:7440"));
    assert_eq!(keys["join_token"].as_str(), Some(t.encode().as_str()));
    fsck(&img, offs[0], 40);
    assert!(tool("sgdisk", &["--verify", ims]).contains("No problems found"));
    assert_eq!(
        outside(&img, offs[0], 40 * MIB),
        before,
        "bytes outside the ESP changed"
    );

    // show: the token only by its id and pin, never its secret.
    let out = ok(dir, &["image", "show", ims]);
    assert!(
        out.contains("hub.example.net:7440") && out.contains(&t.id_hex()),
        "{out}"
    );
    assert!(out.contains(&hex::encode(t.ca_fingerprint)), "{out}");
    let s = ok_json(dir, &["image", "show", ims]);
    assert_eq!(s["configured"], true);
    assert_eq!(s["hub"], "hub.example.net:7440");
    assert_eq!(s["join_token"]["id"], t.id_hex());
    assert_eq!(
        s["join_token"]["ca_fingerprint"],
        hex::encode(t.ca_fingerprint)
    );
    for shown in [out, s.to_string()] {
        assert!(!shown.contains(&t.encode()) && !shown.contains(&hex::encode(t.secret)));
    }

    // The human output of configure names the pin and the partition.
    let (img2, _) = disk(dir, "nuc2.img", X86);
    let out = configure(dir, img2.to_str().unwrap(), "10.1.2.3:7440", &t.encode());
    assert!(
        out.contains("partition 1 \"esp\"") && out.contains("FAT32"),
        "{out}"
    );
    assert!(
        out.contains(&format!("sha256:{}", hex::encode(t.ca_fingerprint))),
        "{out}"
    );
}

#[test]
fn a_raspberry_pi_image_gets_it_on_its_first_esp_type_boot_partition() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    // A partition of another type first, then the FAT16 boot partition (ESP type), then
    // a second ESP-type partition, which must be left alone.
    let layout: &[Part] = &[
        ("firmware-blob", "8300", 1, Fat::None),
        ("boot", "EF00", 20, Fat::Small),
        ("spare-esp", "EF00", 20, Fat::Small),
        ("slot-a", "8300", 4, Fat::None),
    ];
    let (img, offs) = disk(dir, "rpi.img", layout);
    let ims = img.to_str().unwrap();
    let t = token(9);
    let before = outside(&img, offs[1], 20 * MIB);
    // The token from standard input, as from `cairn-hub token create | …`.
    let out = hub_cli(
        dir,
        &configure_args(
            ims,
            "hub.example.net:7440",
            &["--token-file", "-", "--json"],
        ),
        Some(&format!("{}\n", t.encode())),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["esp"]["partition"], 2);
    assert_eq!(r["esp"]["name"], "boot");
    assert_eq!(r["esp"]["filesystem"], "FAT16");
    assert_eq!(r["esp"]["offset"], offs[1]);
    assert_eq!(
        toml_of(&mtype(&img, offs[1]))["join_token"].as_str(),
        Some(t.encode().as_str())
    );
    fsck(&img, offs[1], 20);
    assert_eq!(outside(&img, offs[1], 20 * MIB), before);
    let spare = Command::new("mtype")
        .args(["-i", &format!("{ims}@@{}", offs[2]), "::cairn/agent.toml"])
        .output()
        .unwrap();
    assert!(
        !spare.status.success(),
        "the second ESP-type partition was written"
    );
}

#[test]
fn an_unconfigured_image_says_so_with_exit_code_3() {
    let d = tempfile::tempdir().unwrap();
    let (img, _) = disk(d.path(), "fresh.img", X86);
    let ims = img.to_str().unwrap();
    let (code, err) = fails(d.path(), &["image", "show", ims]);
    assert_eq!(code, 3);
    assert!(
        err.contains("is not configured") && err.contains("image configure"),
        "{err}"
    );
    let out = hub_cli(d.path(), &["image", "show", ims, "--json"], None);
    assert_eq!(out.status.code(), Some(3));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["configured"], false);
    assert_eq!(v["esp"]["name"], "esp");
}

#[test]
fn images_without_a_valid_gpt_or_esp_are_refused_and_left_alone() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let t = token(3);
    let tf = write_token(dir, &t);
    let configure = |img: &Path| {
        let (code, err) = fails(
            dir,
            &configure_args(img.to_str().unwrap(), "h.example:1", &["--token-file", &tf]),
        );
        (code, err)
    };

    // No partition table at all, and a bare FAT filesystem image.
    let zeros = dir.join("zeros.img");
    std::fs::File::create(&zeros)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let (code, err) = configure(&zeros);
    assert_eq!(code, 1);
    assert!(
        err.contains("not a Cairn disk image") && err.contains("GPT"),
        "{err}"
    );
    let bare = dir.join("bare-fat.img");
    std::fs::File::create(&bare)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    tool(
        "mformat",
        &["-i", bare.to_str().unwrap(), "-T", "16384", "::"],
    );
    let (code, err) = configure(&bare);
    assert_eq!(code, 1);
    assert!(
        err.contains("a bare FAT filesystem, not a partitioned disk image"),
        "{err}"
    );
    // Compressed: says how to decompress.
    let xz = dir.join("nuc.img.xz");
    std::fs::write(&xz, [0xfd, b'7', b'z', b'X', b'Z', 0, 0, 4, 0, 0]).unwrap();
    let (code, err) = configure(&xz);
    assert_eq!(code, 1);
    assert!(
        err.contains("xz-compressed") && err.contains("xz -dk"),
        "{err}"
    );

    // A GPT without an ESP: the message lists what is there.
    let (noesp, _) = disk(
        dir,
        "noesp.img",
        &[
            ("slot-a", "8300", 4, Fat::None),
            ("data", "8300", 2, Fat::None),
        ],
    );
    let (code, err) = configure(&noesp);
    assert_eq!(code, 1);
    assert!(
        err.contains("no EFI System Partition") && err.contains("1 slot-a, 2 data"),
        "{err}"
    );
    assert!(err.contains(ESP_TYPE), "{err}");

    // An ESP that holds no FAT.
    let (nofat, _) = disk(dir, "nofat.img", &[("esp", "EF00", 4, Fat::None)]);
    let (code, err) = configure(&nofat);
    assert_eq!(code, 1);
    assert!(
        err.contains("partition 1 \"esp\" is not a FAT filesystem"),
        "{err}"
    );
    assert!(err.contains("mkfs.vfat"), "{err}");

    // A damaged primary header (a field covered by its CRC32), then a damaged entry
    // array (a byte of partition 1's name): refused, and the image not touched.
    for (at, what) in [
        (512 + 40, "header CRC32 mismatch"),
        (1024 + 60, "entry array CRC32 mismatch"),
    ] {
        let (img, _) = disk(dir, "crc.img", X86);
        let mut bytes = std::fs::read(&img).unwrap();
        bytes[at] ^= 0x01;
        std::fs::write(&img, &bytes).unwrap();
        let (code, err) = configure(&img);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("the GPT is damaged") && err.contains(what),
            "{err}"
        );
        assert!(err.contains("sgdisk --verify"), "{err}");
        let (code, _) = fails(dir, &["image", "show", img.to_str().unwrap()]);
        assert_eq!(code, 1);
        assert_eq!(
            std::fs::read(&img).unwrap(),
            bytes,
            "a refused image was written"
        );
    }

    // Missing, or a directory: bad usage.
    let (code, err) = configure(&dir.join("missing.img"));
    assert_eq!(code, 2);
    assert!(err.contains("no such file"), "{err}");
    let (code, _) = configure(dir);
    assert_eq!(code, 2);
}

#[test]
fn a_damaged_backup_gpt_is_a_warning_only() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (img, offs) = disk(dir, "backup.img", X86);
    let mut bytes = std::fs::read(&img).unwrap();
    let last = bytes.len() - 512;
    bytes[last + 40] ^= 0x01;
    std::fs::write(&img, &bytes).unwrap();
    let t = token(4);
    let r = ok_json(
        dir,
        &configure_args(
            img.to_str().unwrap(),
            "h.example:1",
            &["--token", &t.encode()],
        ),
    );
    let w = r["warnings"].to_string();
    assert!(
        w.contains("backup GPT") && w.contains("header CRC32 mismatch"),
        "{w}"
    );
    assert_eq!(
        toml_of(&mtype(&img, offs[0]))["hub"].as_str(),
        Some("h.example:1")
    );
}

#[test]
fn invalid_tokens_hubs_and_pins_are_refused_before_the_image_is_touched() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (img, _) = disk(dir, "nuc.img", X86);
    let ims = img.to_str().unwrap();
    let before = std::fs::read(&img).unwrap();
    let t = token(5);
    let good = t.encode();
    let pin = hex::encode(t.ca_fingerprint);
    let cases: &[(&[&str], &str)] = &[
        (
            &["--hub", "h.example:1", "--token", "nope"],
            "must start with \"cairn1_\"",
        ),
        (
            &["--hub", "h.example:1", "--token", &good[..good.len() - 4]],
            "cut off",
        ),
        (&["--hub", "h.example", "--token", &good], "HOST:PORT"),
        (&["--hub", "h.example:0", "--token", &good], "HOST:PORT"),
        (
            &[
                "--hub",
                "h.example:1",
                "--token",
                &good,
                "--ca-pin",
                &"ab".repeat(32),
            ],
            "is not the hub CA this token pins",
        ),
        (
            &["--hub", "h.example:1", "--token", &good, "--ca-pin", "abc"],
            "64 hex digits",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["image", "configure", ims];
        all.extend_from_slice(args);
        let (code, err) = fails(dir, &all);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
    // A token file with something else in it.
    let junk = dir.join("junk");
    std::fs::write(&junk, format!("{good}\ntoken 0505: 1 use(s)\n")).unwrap();
    let (code, err) = fails(
        dir,
        &configure_args(
            ims,
            "h.example:1",
            &["--token-file", junk.to_str().unwrap()],
        ),
    );
    assert_eq!(code, 2);
    assert!(err.contains("more than one word"), "{err}");
    assert_eq!(std::fs::read(&img).unwrap(), before);

    // The right pin, in the forms people paste.
    for p in [pin.clone(), format!("sha256:{}", pin.to_uppercase())] {
        ok(
            dir,
            &configure_args(
                ims,
                "h.example:1",
                &["--token", &good, "--ca-pin", &p, "--force"],
            ),
        );
    }
}

#[test]
fn an_existing_configuration_needs_force_and_force_replaces_it() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (img, offs) = disk(dir, "nuc.img", X86);
    let ims = img.to_str().unwrap();
    let (t1, t2) = (token(1), token(2));
    configure(dir, ims, "one.example:7440", &t1.encode());
    let first = mtype(&img, offs[0]);

    let (code, err) = fails(
        dir,
        &configure_args(ims, "two.example:7440", &["--token", &t2.encode()]),
    );
    assert_eq!(code, 6);
    assert!(
        err.contains("configured already") && err.contains("--force"),
        "{err}"
    );
    assert!(
        err.contains("one.example:7440") && err.contains(&t1.id_hex()),
        "{err}"
    );
    assert_eq!(mtype(&img, offs[0]), first);

    let r = ok_json(
        dir,
        &configure_args(
            ims,
            "two.example:7440",
            &["--token", &t2.encode(), "--force"],
        ),
    );
    assert_eq!(r["outcome"], "replaced");
    assert_eq!(r["previous"]["hub"], "one.example:7440");
    assert_eq!(r["previous"]["join_token"]["id"], t1.id_hex());
    let keys = toml_of(&mtype(&img, offs[0]));
    assert_eq!(keys["hub"].as_str(), Some("two.example:7440"));
    assert_eq!(keys["join_token"].as_str(), Some(t2.encode().as_str()));
    // One file, no leftovers, a clean filesystem.
    let listing = tool(
        "mdir",
        &["-b", "-i", &format!("{ims}@@{}", offs[0]), "::cairn"],
    );
    assert_eq!(listing.lines().count(), 1, "{listing}");
    fsck(&img, offs[0], 40);
    let s = ok_json(dir, &["image", "show", ims]);
    assert_eq!(s["join_token"]["id"], t2.id_hex());
}

/// Bytes free on the FAT at `off`, as mdir counts them.
fn free_bytes(img: &Path, off: u64) -> u64 {
    let out = Command::new("mdir")
        .args(["-i", &format!("{}@@{off}", img.display()), "::"])
        .env("LC_ALL", "C")
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("bytes free")).unwrap();
    line.chars()
        .filter(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

#[test]
fn a_full_esp_is_refused_and_keeps_its_old_configuration() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let layout: &[Part] = &[
        ("esp", "EF00", 1, Fat::Small),
        ("data", "8300", 1, Fat::None),
    ];
    let (img, offs) = disk(dir, "small.img", layout);
    let ims = img.to_str().unwrap();
    let target = format!("{ims}@@{}", offs[0]);
    let (t1, t2) = (token(1), token(2));
    configure(dir, ims, "one.example:7440", &t1.encode());
    let first = mtype(&img, offs[0]);
    // Fill what is left.
    let filler = dir.join("filler");
    std::fs::write(&filler, vec![0xa5u8; free_bytes(&img, offs[0]) as usize]).unwrap();
    tool(
        "mcopy",
        &["-i", &target, filler.to_str().unwrap(), "::filler"],
    );
    assert_eq!(free_bytes(&img, offs[0]), 0);

    let (code, err) = fails(
        dir,
        &configure_args(
            ims,
            "two.example:7440",
            &["--token", &t2.encode(), "--force"],
        ),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("is full") && err.contains("0 bytes free"),
        "{err}"
    );
    assert!(
        err.contains("delete files from it or make it larger"),
        "{err}"
    );
    assert_eq!(mtype(&img, offs[0]), first);
    fsck(&img, offs[0], 1);

    // Without a cairn directory yet, too.
    let (img2, offs2) = disk(dir, "small2.img", layout);
    let target2 = format!("{}@@{}", img2.display(), offs2[0]);
    std::fs::write(&filler, vec![0xa5u8; free_bytes(&img2, offs2[0]) as usize]).unwrap();
    tool(
        "mcopy",
        &["-i", &target2, filler.to_str().unwrap(), "::filler"],
    );
    let (code, err) = fails(
        dir,
        &configure_args(
            img2.to_str().unwrap(),
            "h.example:1",
            &["--token", &t2.encode()],
        ),
    );
    assert_eq!(code, 1);
    assert!(err.contains("is full"), "{err}");
}

/// Undoes `chattr +i` so that the temporary directory can be removed.
struct Immutable(PathBuf);

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

#[test]
fn a_read_only_image_is_refused_with_what_to_do() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path();
    let (img, _) = disk(dir, "ro.img", X86);
    let ims = img.to_str().unwrap();
    let mut perms = std::fs::metadata(&img).unwrap().permissions();
    perms.set_readonly(true);
    std::fs::set_permissions(&img, perms).unwrap();
    let writable = || std::fs::OpenOptions::new().write(true).open(&img).is_ok();
    // Root ignores mode bits; the immutable attribute stops root too (ext4, xfs, btrfs).
    let _guard = if writable() {
        let set = Command::new("chattr").arg("+i").arg(&img).status();
        set.is_ok_and(|s| s.success())
            .then(|| Immutable(img.clone()))
    } else {
        None
    };
    if writable() {
        eprintln!(
            "skipped: cannot make {ims} read-only here (root on a filesystem without chattr)"
        );
        return;
    }
    let before = std::fs::read(&img).unwrap();
    let (code, err) = fails(
        dir,
        &configure_args(ims, "h.example:1", &["--token", &token(1).encode()]),
    );
    assert_eq!(code, 1);
    assert!(
        err.contains("is read-only") && err.contains("writable copy"),
        "{err}"
    );
    assert_eq!(std::fs::read(&img).unwrap(), before);
    // Reading needs no write access.
    let (code, _) = fails(dir, &["image", "show", ims]);
    assert_eq!(code, 3);
}
