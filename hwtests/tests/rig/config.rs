//! rig.toml: the example parses; broken descriptions fail naming file, line, box and
//! field; image.json files are checked against the box and the scenario.

use std::path::{Path, PathBuf};

use cairn_hwtests::rig::config::{Board, ConsoleConfig, FlashConfig, PowerConfig, Rig};
use cairn_image::{Arch, BootScheme, Built, Fault, Layout, Payload};

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("rig/rig.example.toml")
}

#[test]
fn the_example_parses_into_a_nuc_and_a_pi() {
    let rig = Rig::load(&example()).unwrap();
    assert_eq!(rig.hub.listen.to_string(), "192.168.50.1:7440");
    assert_eq!(rig.hub.public, "192.168.50.1:7440");
    assert_eq!(rig.hub.ek_ca.len(), 2);
    assert!(rig.hub.ek_ca[0].starts_with(example().parent().unwrap()));
    assert_eq!(rig.timeouts.enroll.as_secs(), 240);
    let [nuc, pi] = &rig.boxes[..] else {
        panic!("{:?}", rig.boxes)
    };
    assert_eq!(
        (nuc.name.as_str(), nuc.arch, nuc.board),
        ("nuc-1", Arch::X86_64, Board::Nuc)
    );
    assert!(matches!(nuc.console, Some(ConsoleConfig::Command { .. })));
    assert!(matches!(
        nuc.power,
        PowerConfig::UsbRelay {
            channel: 1,
            baud: 9600,
            button: None,
            ..
        }
    ));
    assert!(matches!(
        &nuc.flash,
        FlashConfig::UsbMassStorage {
            before: Some(_),
            after: Some(_),
            ..
        }
    ));
    assert_eq!(
        nuc.release_dirs()[2],
        example().parent().unwrap().join("images/nuc/3.0.0")
    );
    assert_eq!((pi.arch, pi.board), (Arch::Aarch64, Board::Rpi4));
    assert!(matches!(
        pi.console,
        Some(ConsoleConfig::Serial { baud: 115_200, .. })
    ));
    let PowerConfig::HttpPdu {
        on,
        auth_env,
        expect_status,
        ..
    } = &pi.power
    else {
        panic!("{:?}", pi.power)
    };
    assert_eq!(on.method, "POST");
    assert_eq!(auth_env.as_deref(), Some("CAIRN_PDU_AUTH"));
    assert_eq!(*expect_status, Some(200));
    assert!(matches!(pi.flash, FlashConfig::SdMux { .. }));
    assert!(pi.release_dirs()[0].ends_with("images/rpi4/1.0.0"));
}

const BASE: &str = r#"
[hub]
listen = "192.168.50.1:7440"
public = "192.168.50.1:7440"

[[box]]
name = "nuc-1"
arch = "x86_64"
board = "nuc"
images = "images/nuc"

[box.power]
kind = "usb-relay"
device = "/dev/ttyUSB1"
channel = 2

[box.flash]
kind = "usb-mass-storage"
device = "/dev/disk/by-id/usb-X"

[[box]]
name = "pi-1"
arch = "aarch64"
board = "rpi4"
images = "images/pi"

[box.power]
kind = "command"
on = "true"
off = "true"

[box.flash]
kind = "command"
command = "true"
"#;

fn parse(text: &str) -> Result<Rig, String> {
    Rig::parse(Path::new("/rigs/lab.toml"), text).map_err(|e| e.to_string())
}

/// `BASE` with `from` replaced by `to` (which must occur).
fn edit(from: &str, to: &str) -> String {
    assert!(BASE.contains(from), "{from}");
    BASE.replacen(from, to, 1)
}

#[test]
fn the_base_of_the_bad_ones_is_good() {
    let rig = parse(BASE).unwrap();
    assert_eq!(rig.boxes.len(), 2);
    assert_eq!(
        rig.boxes[1].release_dirs()[1],
        Path::new("/rigs/images/pi/2.0.0")
    );
}

#[test]
fn bad_descriptions_say_where_and_what() {
    let cases: Vec<(String, &[&str])> = vec![
        (
            edit("channel = 2", "chanel = 2"),
            &[
                "/rigs/lab.toml:12:1",
                "box \"nuc-1\"",
                "unknown field `chanel`",
                "`channel`",
            ],
        ),
        (
            edit("[hub]", "[hubb]"),
            &["/rigs/lab.toml:2:", "unknown field `hubb`"],
        ),
        (
            edit("kind = \"command\"\non", "kind = \"comand\"\non"),
            &[
                "/rigs/lab.toml:",
                "box \"pi-1\"",
                "unknown variant `comand`",
                "`usb-relay`",
            ],
        ),
        (
            edit("board = \"rpi4\"", "board = \"rpi3\""),
            &["box \"pi-1\"", "unknown variant `rpi3`", "`rpi5`"],
        ),
        (
            edit("arch = \"aarch64\"", "arch = \"x86_64\""),
            &["/rigs/lab.toml: box \"pi-1\": arch: board rpi4 is aarch64, not x86_64"],
        ),
        (
            edit("name = \"pi-1\"", "name = \"nuc-1\""),
            &["box \"nuc-1\": name: two boxes have this name"],
        ),
        (
            edit("name = \"pi-1\"", "name = \"pi 1\""),
            &["box \"pi 1\": name: \"pi 1\": use 1 to 63 letters"],
        ),
        (
            edit("channel = 2", "channel = 9"),
            &["box \"nuc-1\": power.channel: 9 is not a relay channel (1 to 8)"],
        ),
        (
            edit(
                "images = \"images/pi\"",
                "images = \"a\"\nimage_dirs = { v1 = \"a\", v2 = \"b\", v3 = \"c\" }",
            ),
            &["box \"pi-1\": images and image_dirs: give one of them, not both"],
        ),
        (
            edit("images = \"images/pi\"\n", ""),
            &["box \"pi-1\": images: missing"],
        ),
        (
            edit(
                "images = \"images/pi\"",
                "image_dirs = { v1 = \"a\", v2 = \"b\" }",
            ),
            &["box \"pi-1\"", "missing field `v3`"],
        ),
        (
            edit("device = \"/dev/disk/by-id/usb-X\"", "device = \"sdb\""),
            &["box \"nuc-1\": flash.device: sdb is not an absolute path"],
        ),
        (
            edit("on = \"true\"", "on = \"  \""),
            &["box \"pi-1\": power.on: empty command"],
        ),
        (
            edit("off = \"true\"\n", "off = \"true\"\ntimeout = \"soon\"\n"),
            &["box \"pi-1\"", "\"soon\" is not a duration", "\"90s\""],
        ),
        (
            edit(
                "public = \"192.168.50.1:7440\"",
                "public = \"192.168.50.1\"",
            ),
            &["/rigs/lab.toml: hub.public: \"192.168.50.1\" is not HOST:PORT"],
        ),
        (
            edit(
                "listen = \"192.168.50.1:7440\"",
                "listen = \"192.168.50.1\"",
            ),
            &["/rigs/lab.toml:3:", "invalid socket address"],
        ),
        (
            edit(
                "kind = \"command\"\non = \"true\"\noff = \"true\"",
                "kind = \"http-pdu\"\non = { url = \"http://pdu/on\" }\noff = { url = \"ftp://pdu/off\" }",
            ),
            &["box \"pi-1\": power.off.url: \"ftp://pdu/off\" is not an http:// or https:// URL"],
        ),
        (
            edit(
                "kind = \"command\"\non = \"true\"\noff = \"true\"",
                "kind = \"http-pdu\"\non = { method = \"FETCH\", url = \"http://pdu/on\" }\noff = { url = \"http://pdu/off\" }",
            ),
            &["box \"pi-1\": power.on.method: \"FETCH\" is not one of GET, POST"],
        ),
        (
            edit("[box.flash]\nkind = \"command\"\ncommand = \"true\"\n", ""),
            &["/rigs/lab.toml:", "box \"pi-1\"", "missing field `flash`"],
        ),
        (
            BASE.split("[[box]]").next().unwrap().to_string(),
            &["/rigs/lab.toml: no [[box]]"],
        ),
    ];
    for (text, wants) in cases {
        let err = match parse(&text) {
            Ok(_) => panic!("accepted:\n{text}"),
            Err(e) => e,
        };
        for w in wants {
            assert!(err.contains(w), "error {err:?} lacks {w:?}");
        }
        assert!(!err.contains('\n'), "one line, please: {err:?}");
    }
}

#[test]
fn a_missing_file_is_named() {
    let e = Rig::load(Path::new("/nonexistent/rig.toml"))
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("reading /nonexistent/rig.toml: "), "{e}");
}

#[test]
fn select_names_the_boxes_there_are() {
    let rig = parse(BASE).unwrap();
    assert_eq!(rig.select(&[]).unwrap().len(), 2);
    assert_eq!(rig.select(&["pi-1".into()]).unwrap()[0].name, "pi-1");
    let e = rig.select(&["pi-2".into()]).unwrap_err().to_string();
    assert!(
        e.contains("no box named \"pi-2\"; the rig has nuc-1, pi-1"),
        "{e}"
    );
}

/// Writes a build directory as `cairn-image build` leaves it, with `image.json`
/// naming the files where they were built (not where they are now).
pub fn fake_build(dir: &Path, version: &str, board: &str, arch: Arch, fault: Option<Fault>) {
    fake_build_with(dir, version, board, arch, fault, "6.1.0-test");
}

/// [`fake_build`] with the kernel release `kernel`; a `rpi4` build has the Pi layout's
/// payloads.
pub fn fake_build_with(
    dir: &Path,
    version: &str,
    board: &str,
    arch: Arch,
    fault: Option<Fault>,
    kernel: &str,
) {
    std::fs::create_dir_all(dir).unwrap();
    let scheme = BootScheme::of(arch, board).unwrap_or(BootScheme::Uefi);
    let (payload, file) = match scheme {
        BootScheme::Uefi => ("uki", "cairn.efi"),
        BootScheme::PiTryboot => ("boot", "boot.vfat"),
    };
    let elsewhere = Path::new("/build-host/out").join(version);
    let disk = format!("cairn-{board}-{version}.img");
    for f in [disk.as_str(), "rootfs.squashfs", file] {
        std::fs::write(dir.join(f), b"x").unwrap();
    }
    let b = Built {
        arch,
        board: board.into(),
        version: version.into(),
        disk: elsewhere.join(&disk),
        scheme,
        rootfs: elsewhere.join("rootfs.squashfs"),
        extra: vec![Payload {
            name: payload.into(),
            path: elsewhere.join(file),
        }],
        uki_authenticode: (scheme == BootScheme::Uefi).then(|| "00".repeat(32)),
        kernel: kernel.into(),
        layout: Layout::default(),
        fault,
    };
    std::fs::write(
        dir.join("image.json"),
        serde_json::to_vec_pretty(&b).unwrap(),
    )
    .unwrap();
}

#[test]
fn releases_are_read_from_image_json_and_checked_against_the_box() {
    let tmp = tempfile::tempdir().unwrap();
    let rig_path = tmp.path().join("rig.toml");
    let rig = Rig::parse(&rig_path, BASE).unwrap();
    let nuc = &rig.boxes[0];
    let images = tmp.path().join("images/nuc");
    fake_build(&images.join("1.0.0"), "1.0.0", "nuc", Arch::X86_64, None);
    fake_build(&images.join("2.0.0"), "2.0.0", "nuc", Arch::X86_64, None);
    fake_build(&images.join("3.0.0"), "3.0.0", "nuc", Arch::X86_64, None);
    let e = nuc.load_releases().unwrap_err().to_string();
    assert!(
        e.contains("box \"nuc-1\": release v3: ")
            && e.contains("v3 must be built with --fault init-panic"),
        "{e}"
    );
    fake_build(
        &images.join("3.0.0"),
        "3.0.0",
        "nuc",
        Arch::X86_64,
        Some(Fault::InitPanic),
    );
    let r = nuc.load_releases().unwrap();
    // Found next to image.json, not on the build host.
    assert_eq!(r.v1.disk, images.join("1.0.0/cairn-nuc-1.0.0.img"));
    assert_eq!(
        r.v3.payload("uki"),
        Some(images.join("3.0.0/cairn.efi").as_path())
    );
    assert_eq!(r.as_releases().v2.unwrap().version, "2.0.0");

    fake_build(&images.join("2.0.0"), "2.0.1", "nuc", Arch::X86_64, None);
    let e = nuc.load_releases().unwrap_err().to_string();
    assert!(
        e.contains("release v2: ") && e.contains("is version 2.0.1, the scenario needs 2.0.0"),
        "{e}"
    );
    fake_build(&images.join("2.0.0"), "2.0.0", "rpi4", Arch::Aarch64, None);
    let e = nuc.load_releases().unwrap_err().to_string();
    assert!(
        e.contains("is built for aarch64/rpi4, the box is x86_64/nuc"),
        "{e}"
    );
    fake_build(
        &images.join("2.0.0"),
        "2.0.0",
        "nuc",
        Arch::X86_64,
        Some(Fault::InitPanic),
    );
    let e = nuc.load_releases().unwrap_err().to_string();
    assert!(e.contains("only v3 may be"), "{e}");
    fake_build(&images.join("2.0.0"), "2.0.0", "nuc", Arch::X86_64, None);
    std::fs::remove_file(images.join("2.0.0/rootfs.squashfs")).unwrap();
    let e = nuc.load_releases().unwrap_err().to_string();
    assert!(
        e.contains("names /build-host/out/2.0.0/rootfs.squashfs, which is neither in"),
        "{e}"
    );
    std::fs::write(images.join("2.0.0/image.json"), b"{}").unwrap();
    let e = nuc.load_releases().unwrap_err().to_string();
    assert!(e.contains("not an image.json of this cairn-image"), "{e}");
}
