//! Consoles, power kinds and a whole `RealBox` against real stand-ins.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cairn_hwtests::machine::{Machine, console_text};
use cairn_hwtests::rig::RealBox;
use cairn_hwtests::rig::config::{ButtonConfig, HttpRequestConfig, PowerConfig};
use cairn_hwtests::rig::console::{Console, ConsoleSource};
use cairn_hwtests::rig::flash::Flasher;
use cairn_hwtests::rig::power::{CommandPower, HttpPdu, ManualPower, Power, UsbRelay};
use rustix::termios::LocalModes;

use super::{Pty, read, wait_until};

const T: Duration = Duration::from_secs(5);

#[test]
fn serial_console_is_captured_raw_at_its_baud_and_restarts() {
    let pty = Pty::open();
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("box/console.log");
    let mut c = Console::new(
        ConsoleSource::Serial {
            device: pty.slave.clone(),
            baud: 115_200,
        },
        &log,
    );
    c.start().unwrap();
    assert!(c.is_running());
    pty.write(b"U-Boot 2024.01\r\nStarting kernel ...\r\n");
    wait_until("the boot lines in the log", T, || {
        read(&log).contains("Starting kernel ...")
    });
    // The box's bytes, unchanged (a cooked tty would have eaten or doubled the \r).
    assert!(read(&log).contains("U-Boot 2024.01\r\nStarting kernel ...\r\n"));
    let t = pty.attrs();
    assert_eq!(t.output_speed(), 115_200);
    assert!(!t.local_modes.contains(LocalModes::ICANON));
    assert!(!t.local_modes.contains(LocalModes::ECHO));

    // A power cycle: stopped, started again, appending.
    let t0 = Instant::now();
    c.stop();
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "stop took {:?}",
        t0.elapsed()
    );
    assert!(!c.is_running());
    c.mark("power on");
    c.start().unwrap();
    // Reopened: the first console is gone; the line is written until the second one,
    // once it has the device open, captures it.
    wait_until("the second boot in the log", T, || {
        pty.write(b"second boot: cairn-agent 2.0.0\n");
        read(&log).contains("second boot")
    });
    let text = read(&log);
    let (a, m, b) = (
        text.find("Starting kernel").unwrap(),
        text.find("] power on").unwrap(),
        text.find("second boot").unwrap(),
    );
    assert!(a < m && m < b, "{text}");
    drop(c);
}

#[test]
fn serial_console_waits_for_a_device_that_is_not_there_yet() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("console.log");
    let mut c = Console::new(
        ConsoleSource::Serial {
            device: tmp.path().join("ttyUSB9"),
            baud: 115_200,
        },
        &log,
    );
    c.start().unwrap();
    assert!(c.is_running(), "it keeps trying");
    // The adapter is plugged in: its device appears, and the console picks it up.
    let pty = Pty::open();
    std::os::unix::fs::symlink(&pty.slave, tmp.path().join("ttyUSB9")).unwrap();
    wait_until("the late device's lines in the log", T, || {
        pty.write(b"plugged in late\n");
        read(&log).contains("plugged in late")
    });
    assert!(c.is_running());
    let t0 = Instant::now();
    c.stop();
    assert!(t0.elapsed() < Duration::from_secs(1));
}

#[test]
fn console_program_output_is_captured_and_it_is_restarted() {
    let tmp = tempfile::tempdir().unwrap();
    let log = tmp.path().join("console.log");
    let runs = tmp.path().join("runs");
    let mut c = Console::new(
        ConsoleSource::Command {
            command: format!(
                "echo run >> {}; echo SOL: hello; echo oops >&2",
                runs.display()
            ),
        },
        &log,
    );
    c.start().unwrap();
    wait_until("two runs of the console program", T, || {
        read(&runs).lines().count() >= 2
    });
    c.stop();
    let text = read(&log);
    assert!(
        text.contains("SOL: hello\n") && text.contains("oops\n"),
        "{text}"
    );

    // A program that never exits is killed on stop (its whole process group).
    let mut c = Console::new(
        ConsoleSource::Command {
            command: format!("echo started > {}; sleep 30 | cat", runs.display()),
        },
        &log,
    );
    c.start().unwrap();
    wait_until("the console program runs", T, || {
        read(&runs).starts_with("started")
    });
    let t0 = Instant::now();
    c.stop();
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
}

#[test]
fn usb_relay_writes_the_lcus_commands_at_9600_baud() {
    let pty = Pty::open();
    let mut r = UsbRelay::new(&pty.slave, 2, 9600, None);
    r.probe().unwrap();
    assert!(
        pty.silent_for(Duration::from_millis(100)),
        "probing switches nothing"
    );
    r.set(true).unwrap();
    assert_eq!(pty.read_exact(4, T), [0xA0, 0x02, 0x01, 0xA3]);
    r.set(false).unwrap();
    assert_eq!(pty.read_exact(4, T), [0xA0, 0x02, 0x00, 0xA2]);
    let t = pty.attrs();
    assert_eq!(t.output_speed(), 9600);

    // Wired to a power button: a press is close, wait, open.
    let mut b = UsbRelay::new(
        &pty.slave,
        1,
        9600,
        Some(ButtonConfig {
            press: Duration::from_millis(50),
            hold: Duration::from_millis(300),
        }),
    );
    let t0 = Instant::now();
    b.set(true).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(50));
    assert_eq!(
        pty.read_exact(8, T),
        [0xA0, 0x01, 0x01, 0xA2, 0xA0, 0x01, 0x00, 0xA1]
    );
    // On already: pressing again would switch it off.
    b.set(true).unwrap();
    assert!(pty.silent_for(Duration::from_millis(100)));
    let t0 = Instant::now();
    b.set(false).unwrap();
    assert!(t0.elapsed() >= Duration::from_millis(300), "a long hold");
    assert_eq!(
        pty.read_exact(8, T),
        [0xA0, 0x01, 0x01, 0xA2, 0xA0, 0x01, 0x00, 0xA1]
    );
}

#[test]
fn usb_relay_that_is_not_plugged_in_says_so() {
    let mut r = UsbRelay::new(
        Path::new("/dev/serial/by-id/usb-no-such-relay"),
        1,
        9600,
        None,
    );
    let e = format!("{:#}", r.set(true).unwrap_err());
    assert!(
        e.contains("does not exist (is the adapter plugged in?"),
        "{e}"
    );
    let f = tempfile::NamedTempFile::new().unwrap();
    let e = format!(
        "{:#}",
        UsbRelay::new(f.path(), 1, 9600, None).probe().unwrap_err()
    );
    assert!(e.contains("not a serial device"), "{e}");
}

#[test]
fn manual_power_asks_on_the_terminal_and_waits_for_enter() {
    let pty = Pty::open();
    let slave = pty.slave.clone();
    let asked = std::thread::spawn(move || {
        ManualPower::new("pi-1", &slave, Duration::from_secs(5)).set(false)
    });
    let prompt = pty.read_until(T, |t| t.contains("press Enter"));
    assert!(
        prompt.contains("box pi-1: CUT the power (pull the plug) now"),
        "{prompt}"
    );
    pty.write(b"\n");
    asked.join().unwrap().unwrap();

    let t0 = Instant::now();
    let e = ManualPower::new("pi-1", &pty.slave, Duration::from_millis(300))
        .set(true)
        .unwrap_err();
    assert!(t0.elapsed() < Duration::from_secs(2));
    let e = format!("{e:#}");
    assert!(
        e.contains("nobody answered the power prompt") && e.contains("no answer within 300ms"),
        "{e}"
    );
    let e = format!(
        "{:#}",
        ManualPower::new("pi-1", Path::new("/nonexistent/tty"), T)
            .set(true)
            .unwrap_err()
    );
    assert!(e.contains("manual power needs a terminal"), "{e}");
}

#[test]
fn command_power_runs_the_operators_commands() {
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let s = state.display();
    let mut p = CommandPower::new(
        "nuc-1",
        &format!("echo \"$CAIRN_BOX $CAIRN_POWER\" >> {s}"),
        &format!("echo \"$CAIRN_BOX $CAIRN_POWER\" >> {s}"),
        T,
    );
    p.set(true).unwrap();
    p.set(false).unwrap();
    assert_eq!(read(&state), "nuc-1 on\nnuc-1 off\n");

    let mut p = CommandPower::new("nuc-1", "echo relay busy >&2; exit 3", "true", T);
    let e = format!("{:#}", p.set(true).unwrap_err());
    assert!(
        e.contains("power on nuc-1") && e.contains("exit status: 3") && e.contains("relay busy"),
        "{e}"
    );

    let mut p = CommandPower::new(
        "nuc-1",
        "sleep 20; echo never",
        "true",
        Duration::from_millis(200),
    );
    let t0 = Instant::now();
    let e = format!("{:#}", p.set(true).unwrap_err());
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    assert!(e.contains("did not finish within 200ms (killed)"), "{e}");
}

/// One request the PDU saw.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    auth: Option<String>,
    body: String,
}

/// A PDU on 127.0.0.1: records requests, answers `/outlet/*` with 200 and anything
/// else with 401.
struct Pdu {
    url: String,
    seen: Arc<Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
}

impl Pdu {
    fn start() -> Pdu {
        use axum::http::{HeaderMap, Method, StatusCode, Uri};
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let s = seen.clone();
        let app = axum::Router::new().fallback(
            move |method: Method, uri: Uri, headers: HeaderMap, body: String| {
                let s = s.clone();
                async move {
                    s.lock().unwrap().push(Seen {
                        method: method.to_string(),
                        path: uri.to_string(),
                        auth: headers
                            .get("authorization")
                            .map(|v| v.to_str().unwrap().to_string()),
                        body,
                    });
                    if uri.path().starts_with("/outlet/") {
                        (StatusCode::OK, "done")
                    } else {
                        (StatusCode::UNAUTHORIZED, "login required")
                    }
                }
            },
        );
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        rt.spawn(async move { axum::serve(listener, app).await });
        Pdu { url, seen, _rt: rt }
    }

    fn config(&self, on: &str, off: &str, expect_status: Option<u16>) -> PowerConfig {
        let req = |p: &str| HttpRequestConfig {
            method: "POST".into(),
            url: format!("{}{p}", self.url),
            body: Some("outlet=3".into()),
            content_type: Some("application/x-www-form-urlencoded".into()),
        };
        PowerConfig::HttpPdu {
            on: req(on),
            off: req(off),
            auth_env: None,
            expect_status,
            timeout: T,
            ca_cert: None,
        }
    }
}

#[test]
fn http_pdu_sends_the_configured_requests_with_basic_auth() {
    let pdu = Pdu::start();
    let mut p = HttpPdu::new(
        &pdu.config("/outlet/3/on", "/outlet/3/off?now=1", None),
        Some(("admin".into(), "s3cret".into())),
    )
    .unwrap();
    p.set(true).unwrap();
    p.set(false).unwrap();
    let seen = pdu.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path, "/outlet/3/on");
    assert_eq!(seen[1].path, "/outlet/3/off?now=1");
    // base64("admin:s3cret")
    assert_eq!(seen[0].auth.as_deref(), Some("Basic YWRtaW46czNjcmV0"));
    assert_eq!(seen[1].body, "outlet=3");

    // A status other than the expected one is an error naming request and answer.
    let mut p = HttpPdu::new(&pdu.config("/outlet/3/on", "/login", Some(204)), None).unwrap();
    let e = format!("{:#}", p.set(true).unwrap_err());
    assert!(
        e.contains("/outlet/3/on answered 200 OK (expected 204): done"),
        "{e}"
    );
    let e = format!("{:#}", p.set(false).unwrap_err());
    assert!(
        e.contains("/login answered 401 Unauthorized (expected 204): login required"),
        "{e}"
    );
    assert!(seen[2..].iter().all(|s| s.auth.is_none()));

    // Nothing listening: an error, within the timeout.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/outlet/1/on", dead.local_addr().unwrap());
    drop(dead);
    let mut cfg = pdu.config("/x", "/y", None);
    if let PowerConfig::HttpPdu { on, .. } = &mut cfg {
        on.url = url.clone();
    }
    let e = format!(
        "{:#}",
        HttpPdu::new(&cfg, None).unwrap().set(true).unwrap_err()
    );
    assert!(e.contains(&format!("PDU POST {url}")), "{e}");
}

#[test]
fn a_real_box_from_its_parts_flashes_switches_and_captures() {
    let pty = Pty::open();
    let tmp = tempfile::tempdir().unwrap();
    let events = tmp.path().join("events");
    let ev = events.display();
    let power = Power::Command(CommandPower::new(
        "pi-1",
        &format!("echo power-$CAIRN_POWER >> {ev}"),
        &format!("echo power-$CAIRN_POWER >> {ev}"),
        T,
    ));
    let flasher = Flasher::with_target(
        &cairn_hwtests::rig::config::FlashConfig::Command {
            command: format!("echo \"flash $CAIRN_BOX $(cat \"$1\")\" >> {ev}"),
            timeout: T,
        },
        cairn_hwtests::rig::flash::Target::block_device,
    );
    let mut m = RealBox::new(
        "pi-1",
        &tmp.path().join("pi-1"),
        Some(ConsoleSource::Serial {
            device: pty.slave.clone(),
            baud: 115_200,
        }),
        power,
        flasher,
    )
    .unwrap();
    assert!(!m.is_on());
    let image = tmp.path().join("flash.img");
    std::fs::write(&image, "IMAGE-1").unwrap();
    // Not known to be off: switched off before it is written.
    m.flash(&image).unwrap();
    assert_eq!(read(&events), "power-off\nflash pi-1 IMAGE-1\n");
    m.power_on().unwrap();
    assert!(m.is_on());
    pty.write(b"cairn: agent started\r\n");
    wait_until("the console in the log", T, || {
        console_text(&m).contains("cairn: agent started")
    });
    m.power_off().unwrap();
    assert!(!m.is_on());
    // Switched off already: flashing switches nothing.
    m.flash(&image).unwrap();
    assert_eq!(
        read(&events),
        "power-off\nflash pi-1 IMAGE-1\npower-on\npower-off\nflash pi-1 IMAGE-1\n"
    );
    let log = console_text(&m);
    for w in [
        "console of pi-1: ",
        "power on (command)",
        "] flashed\n",
        "power off (command)",
    ] {
        assert!(log.contains(w), "{w:?} not in {log}");
    }
    assert_eq!(m.console_log(), tmp.path().join("pi-1/console.log"));
}
