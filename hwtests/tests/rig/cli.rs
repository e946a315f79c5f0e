//! `cairn-rig` as a process: help, exit codes, `check --json`, `power`, and `run`
//! refusing descriptions that do not hold together before it touches any box.

use std::process::{Command, Output};

use cairn_image::{Arch, Fault};
use serde_json::Value;

use super::Pty;
use super::config::{fake_build, fake_build_with};

fn rig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cairn-rig"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn help_teaches_with_examples_and_exit_codes() {
    let o = rig(&["--help"]);
    assert!(o.status.success());
    let h = text(&o.stdout);
    for w in [
        "Exit codes:",
        "cairn-rig check --rig rig.toml",
        "cairn-rig run --rig rig.toml",
        "rig.example.toml",
    ] {
        assert!(h.contains(w), "{w:?} not in {h}");
    }
    assert_eq!(rig(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn check_probes_every_part_and_exits_1_on_a_failed_probe() {
    let tmp = tempfile::tempdir().unwrap();
    let console = Pty::open();
    let relay = Pty::open();
    let not_a_disk = tmp.path().join("disk.img");
    std::fs::write(&not_a_disk, b"").unwrap();
    fake_build(
        &tmp.path().join("images/1.0.0"),
        "1.0.0",
        "nuc",
        Arch::X86_64,
        None,
    );
    fake_build(
        &tmp.path().join("images/2.0.0"),
        "2.0.0",
        "nuc",
        Arch::X86_64,
        None,
    );
    fake_build(
        &tmp.path().join("images/3.0.0"),
        "3.0.0",
        "nuc",
        Arch::X86_64,
        Some(Fault::InitPanic),
    );
    let toml = format!(
        r#"
[hub]
listen = "127.0.0.1:0"
public = "127.0.0.1:7440"

[[box]]
name = "nuc-1"
arch = "x86_64"
board = "nuc"
images = "images"
console = {{ kind = "serial", device = "{console}" }}
power = {{ kind = "usb-relay", device = "{relay}", channel = 3 }}
flash = {{ kind = "usb-mass-storage", device = "{disk}" }}
"#,
        console = console.slave.display(),
        relay = relay.slave.display(),
        disk = not_a_disk.display(),
    );
    let path = tmp.path().join("rig.toml");
    std::fs::write(&path, toml).unwrap();
    let o = rig(&["check", "--rig", path.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o.stderr));
    let probes: Value = serde_json::from_slice(&o.stdout).unwrap();
    let get = |target: &str, part: &str| {
        probes
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["target"] == target && p["part"] == part)
            .unwrap_or_else(|| panic!("no {target} {part} in {probes}"))
            .clone()
    };
    assert_eq!(get("hub", "listen")["status"], "ok");
    assert_eq!(get("hub", "public")["status"], "warn");
    assert_eq!(get("hub", "ek-ca")["status"], "warn");
    assert_eq!(get("nuc-1", "images")["status"], "ok", "{probes}");
    let c = get("nuc-1", "console");
    assert_eq!(c["status"], "ok", "{c}");
    assert!(
        c["detail"]
            .as_str()
            .unwrap()
            .contains("opens at 115200 baud")
    );
    let p = get("nuc-1", "power");
    assert_eq!(p["status"], "ok", "{p}");
    assert!(
        p["detail"]
            .as_str()
            .unwrap()
            .contains("channel 3 not switched")
    );
    assert!(
        relay.silent_for(std::time::Duration::from_millis(100)),
        "check switched the relay"
    );
    let f = get("nuc-1", "flash");
    assert_eq!(f["status"], "fail");
    assert!(
        f["detail"]
            .as_str()
            .unwrap()
            .contains("is not a block device but a regular file"),
        "{f}"
    );

    // The table says the same.
    let o = rig(&["check", "--rig", path.to_str().unwrap(), "--box", "nuc-1"]);
    assert_eq!(o.status.code(), Some(1));
    let t = text(&o.stdout);
    let row = t
        .lines()
        .find(|l| l.starts_with("nuc-1") && l.contains(" flash "))
        .unwrap();
    assert!(
        row.contains(" FAIL ") && row.contains("not a block device"),
        "{t}"
    );
    assert!(
        t.contains("probes: 2 failed") || t.contains("probes: 1 failed"),
        "{t}"
    );
}

#[test]
fn bad_descriptions_and_unknown_boxes_exit_2_naming_them() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rig.toml");
    std::fs::write(
        &path,
        "[hub]\nlisten = \"127.0.0.1:0\"\npublic = \"h:1\"\n[[box]]\nname = \"pi-1\"\narch = \"aarch64\"\nboard = \"rpi4\"\nimages = \"i\"\npower = { kind = \"manual\", timeot = \"1m\" }\nflash = { kind = \"command\", command = \"true\" }\n",
    )
    .unwrap();
    let p = path.to_str().unwrap();
    for cmd in ["check", "run"] {
        let o = rig(&[cmd, "--rig", p]);
        assert_eq!(o.status.code(), Some(2));
        let e = text(&o.stderr);
        assert!(
            e.contains(&format!("{p}:9:"))
                && e.contains("box \"pi-1\"")
                && e.contains("unknown field `timeot`"),
            "{e}"
        );
    }
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("timeot", "timeout"),
    )
    .unwrap();
    let o = rig(&["run", "--rig", p, "--box", "pi-2"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o.stderr).contains("no box named \"pi-2\"; the rig has pi-1"));
    // Images that do not exist: refused before any hub starts or box is touched.
    let work = tmp.path().join("work");
    let o = rig(&["run", "--rig", p, "--work", work.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let e = text(&o.stderr);
    assert!(
        e.contains("box \"pi-1\": release v1: reading ") && e.contains("image.json"),
        "{e}"
    );
    assert!(!work.join("report.json").exists());
}

#[test]
fn run_refuses_a_v3_that_is_not_broken() {
    let tmp = tempfile::tempdir().unwrap();
    for v in ["1.0.0", "2.0.0", "3.0.0"] {
        fake_build(
            &tmp.path().join("img").join(v),
            v,
            "rpi5",
            Arch::Aarch64,
            None,
        );
    }
    let path = tmp.path().join("rig.toml");
    std::fs::write(
        &path,
        "[hub]\nlisten = \"127.0.0.1:0\"\npublic = \"h:1\"\n[[box]]\nname = \"pi5\"\narch = \"aarch64\"\nboard = \"rpi5\"\nimages = \"img\"\npower = { kind = \"command\", on = \"false\", off = \"false\" }\nflash = { kind = \"command\", command = \"false\" }\n",
    )
    .unwrap();
    let o = rig(&[
        "run",
        "--rig",
        path.to_str().unwrap(),
        "--work",
        tmp.path().join("w").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(2));
    let e = text(&o.stderr);
    assert!(
        e.contains("release v3") && e.contains("v3 must be built with --fault init-panic"),
        "{e}"
    );
}

#[test]
fn power_switches_a_pdu_with_credentials_from_the_environment() {
    use std::io::{BufRead, BufReader, Write};
    // A one-request HTTP server: what cairn-rig sends, as received.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut head = Vec::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            if line.trim().is_empty() {
                break;
            }
            head.push(line.trim().to_string());
        }
        let mut s = s;
        s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            .unwrap();
        head
    });
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("rig.toml");
    std::fs::write(
        &path,
        format!(
            "[hub]\nlisten = \"127.0.0.1:0\"\npublic = \"h:1\"\n[[box]]\nname = \"pi-1\"\narch = \"aarch64\"\nboard = \"rpi4\"\nimages = \"i\"\nflash = {{ kind = \"command\", command = \"true\" }}\n[box.power]\nkind = \"http-pdu\"\non = {{ method = \"PUT\", url = \"http://{addr}/api/outlets/2/state\", body = \"on\" }}\noff = {{ url = \"http://{addr}/off\" }}\nauth_env = \"TEST_PDU_AUTH\"\n"
        ),
    )
    .unwrap();
    let p = path.to_str().unwrap();
    // Without the variable: a configuration error naming it.
    let o = rig(&["power", "--rig", p, "--box", "pi-1", "on"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o.stderr).contains("environment variable TEST_PDU_AUTH is not set"),
        "{}",
        text(&o.stderr)
    );
    let o = Command::new(env!("CARGO_BIN_EXE_cairn-rig"))
        .args(["power", "--rig", p, "--box", "pi-1", "on"])
        .env("TEST_PDU_AUTH", "operator:hunter2")
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o.stderr));
    let head = server.join().unwrap();
    assert_eq!(head[0], "PUT /api/outlets/2/state HTTP/1.1");
    // base64("operator:hunter2")
    assert!(
        head.iter()
            .any(|h| h.eq_ignore_ascii_case("authorization: Basic b3BlcmF0b3I6aHVudGVyMg==")),
        "{head:?}"
    );
}

#[test]
fn check_warns_when_pi_images_cannot_arm_a_tryboot() {
    let tmp = tempfile::tempdir().unwrap();
    let images = tmp.path().join("images");
    let build = |kernel: &str| {
        for (v, f) in [
            ("1.0.0", None),
            ("2.0.0", None),
            ("3.0.0", Some(Fault::InitPanic)),
        ] {
            fake_build_with(&images.join(v), v, "rpi4", Arch::Aarch64, f, kernel);
        }
    };
    let path = tmp.path().join("rig.toml");
    std::fs::write(
        &path,
        "[hub]\nlisten = \"127.0.0.1:0\"\npublic = \"192.0.2.1:7440\"\n[[box]]\nname = \"pi-1\"\narch = \"aarch64\"\nboard = \"rpi4\"\ntpm = false\nimages = \"images\"\npower = { kind = \"manual\" }\nflash = { kind = \"command\", command = \"true\" }\n",
    )
    .unwrap();
    let images_probe = || {
        let o = rig(&["check", "--rig", path.to_str().unwrap(), "--json"]);
        let probes: Value = serde_json::from_slice(&o.stdout).unwrap();
        probes
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["target"] == "pi-1" && p["part"] == "images")
            .unwrap_or_else(|| panic!("no images probe in {probes}"))
            .clone()
    };
    build("6.1.0-57-arm64");
    let p = images_probe();
    assert_eq!(p["status"], "warn", "{p}");
    let d = p["detail"].as_str().unwrap();
    assert!(
        d.contains("1.0.0 (6.1.0-57-arm64), 2.0.0") && d.contains("--kernel-deb"),
        "{d}"
    );
    build("6.6.51+rpt-rpi-v8");
    let p = images_probe();
    assert_eq!(p["status"], "ok", "{p}");
}
