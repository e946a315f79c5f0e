//! A simulated A/B box for upgrade tests: two file-backed slots, the file boot loader
//! with its firmware model, a data directory, and the loop a machine runs — boot,
//! start the agent, reboot when it asks — with SIGKILLs where a test wants them.
//!
//! A slot whose image starts with `PANIC` plays a kernel that panics: the firmware
//! boots it, nothing comes up, and the machine resets (the agent never starts).

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use cairn_agent::upgrade::boot::Slot;
use cairn_agent::upgrade::boot::file::{FileBoot, firmware_boot};
use cairn_sync_protocol::release::SignedManifest;
use ed25519_dalek::SigningKey;

use crate::bin;

/// Writes a release bundle of one `rootfs` payload with the hub's release builder
/// (the image goes next to it as `OUT.img`).
pub fn build_bundle(
    out: &Path,
    key: &SigningKey,
    version: &str,
    board: &str,
    rootfs: &[u8],
) -> SignedManifest {
    let image = out.with_extension("img");
    std::fs::write(&image, rootfs).unwrap();
    let spec = cairn_hub::release::BuildSpec {
        version: version.into(),
        arch: std::env::consts::ARCH.into(),
        board: board.into(),
        inputs: vec![cairn_hub::release::BuildInput {
            name: "rootfs".into(),
            path: image,
        }],
        expected_pcrs: vec![],
        created_ms: 0,
    };
    cairn_hub::release::build(&spec, key, out, &mut |_| {})
        .unwrap()
        .signed
}

pub use cairn_examples::{mutate_blocks, random_image};

/// How a machine run ended.
#[derive(Debug)]
pub struct Run {
    /// Exit code of the last agent run (None: killed).
    pub code: Option<i32>,
    pub stderr: String,
    pub boots: u32,
    pub panics: u32,
    pub kills: u32,
}

/// The boot loader a simulated box has.
#[derive(Debug, Clone)]
pub enum Firmware {
    /// The file boot loader (state in `boot_dir`).
    File,
    /// GPT attribute bits on a real GPT disk image (partitions named slot-a and
    /// slot-b); the booted slot reaches the agent as `cairn.slot=` in a command-line
    /// file, as a boot loader passes it to the kernel.
    Gpt { disk: PathBuf, cmdline: PathBuf },
}

pub struct SimBox {
    pub dir: PathBuf,
    pub firmware: Firmware,
    pub boot_dir: PathBuf,
    pub slots: [PathBuf; 2],
    pub data_dir: PathBuf,
    pub board: String,
}

impl SimBox {
    /// A box flashed with `v1` in slot A; both slots are `slot_size` bytes.
    pub fn flash(dir: &Path, v1: &[u8], slot_size: u64) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let slots = [dir.join("slot-a.img"), dir.join("slot-b.img")];
        std::fs::write(&slots[0], v1).unwrap();
        for s in &slots {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(s)
                .unwrap();
            f.set_len(slot_size).unwrap();
        }
        let boot_dir = dir.join("boot");
        FileBoot::open(&boot_dir).unwrap();
        firmware_boot(&boot_dir).unwrap();
        Self {
            dir: dir.to_path_buf(),
            firmware: Firmware::File,
            boot_dir,
            slots,
            data_dir: dir.join("data"),
            board: "sim".into(),
        }
    }

    /// [`flash`](Self::flash), with a GPT disk image (made with `sgdisk`) holding the
    /// boot flags: slot A provisioned as the committed, bootable slot.
    pub fn flash_gpt(dir: &Path, v1: &[u8], slot_size: u64) -> Self {
        use cairn_agent::upgrade::boot::BootControl;
        use cairn_agent::upgrade::boot::gpt::{GptBoot, PartRef};
        let mut b = Self::flash(dir, v1, slot_size);
        let disk = dir.join("disk.img");
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(64 << 20).unwrap();
        let out = Command::new("sgdisk")
            .args(["-n", "1:2048:+8M", "-t", "1:EF00", "-c", "1:esp"])
            .args([
                "-n", "2:0:+16M", "-c", "2:slot-a", "-n", "3:0:+16M", "-c", "3:slot-b",
            ])
            .arg(&disk)
            .output()
            .expect("sgdisk (Debian package gdisk)");
        assert!(
            out.status.success(),
            "sgdisk: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let parts = || {
            (
                PartRef::Name("slot-a".into()),
                PartRef::Name("slot-b".into()),
            )
        };
        let (a, bb) = parts();
        GptBoot::open(&disk, a, bb)
            .unwrap()
            .commit(Slot::A)
            .unwrap();
        b.firmware = Firmware::Gpt {
            disk: disk.clone(),
            cmdline: dir.join("cmdline"),
        };
        b.power_on();
        b
    }

    /// The slot the firmware booted last.
    pub fn booted(&self) -> Slot {
        match &self.firmware {
            Firmware::File => FileBoot::open(&self.boot_dir).unwrap().booted().unwrap(),
            Firmware::Gpt { cmdline, .. } => cairn_agent::upgrade::boot::booted_from_cmdline(
                &std::fs::read_to_string(cmdline).unwrap(),
            )
            .unwrap(),
        }
    }

    pub fn slot_bytes(&self, slot: Slot, len: usize) -> Vec<u8> {
        let mut b = std::fs::read(&self.slots[slot.index()]).unwrap();
        b.truncate(len);
        b
    }

    /// The agent's common slot arguments.
    pub fn slot_args(&self) -> Vec<String> {
        vec![
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--slot-a".into(),
            self.slots[0].display().to_string(),
            "--slot-b".into(),
            self.slots[1].display().to_string(),
            "--board".into(),
            self.board.clone(),
            "--os-version".into(),
            "1.0.0".into(),
            "--reboot".into(),
            "exit".into(),
        ]
        .into_iter()
        .chain(self.boot_args())
        .collect()
    }

    /// The boot-loader arguments.
    pub fn boot_args(&self) -> Vec<String> {
        match &self.firmware {
            Firmware::File => vec!["--boot".into(), format!("file:{}", self.boot_dir.display())],
            Firmware::Gpt { disk, cmdline } => vec![
                "--boot".into(),
                format!("gpt:{}:slot-a,slot-b", disk.display()),
                "--cmdline".into(),
                cmdline.display().to_string(),
            ],
        }
    }

    /// `cairn-agent os-install BUNDLE --release-key KEY` plus the slot arguments.
    pub fn os_install(&self, bundle: &Path, key: &SigningKey, extra: &[&str]) -> Command {
        let mut c = Command::new(bin("cairn-agent"));
        c.arg("os-install")
            .arg(bundle)
            .arg("--release-key")
            .arg(hex::encode(key.verifying_key().as_bytes()))
            .args(self.slot_args())
            .args(extra)
            .env("RUST_LOG", "info");
        c
    }

    /// One firmware boot; returns the slot and whether its kernel "panicked".
    pub fn power_on(&self) -> (Slot, bool) {
        let slot = match &self.firmware {
            Firmware::File => firmware_boot(&self.boot_dir).unwrap(),
            Firmware::Gpt { disk, cmdline } => {
                use cairn_agent::upgrade::boot::gpt::{PartRef, firmware_boot};
                let slot = firmware_boot(
                    disk,
                    &PartRef::Name("slot-a".into()),
                    &PartRef::Name("slot-b".into()),
                )
                .unwrap();
                std::fs::write(
                    cmdline,
                    format!(
                        "root=PARTLABEL=slot-{} ro cairn.slot={}\n",
                        slot.as_str(),
                        slot.as_str()
                    ),
                )
                .unwrap();
                slot
            }
        };
        (
            slot,
            cairn_examples::kernel_panics(&self.slots[slot.index()]).unwrap(),
        )
    }

    /// The machine: boot, run `cmd()` (the agent), reboot on exit code 10, until the
    /// agent exits otherwise. `kill_after(run_number)` may give a delay after which
    /// that run is SIGKILLed; with `power_cut` a killed run is followed by a boot (a
    /// power loss), else the agent is just started again (a crash of the agent while
    /// the system stays up). At most `max_runs` runs.
    pub fn run_machine(
        &self,
        mut cmd: impl FnMut(u32) -> Command,
        mut kill_after: impl FnMut(u32) -> Option<Duration>,
        power_cut: bool,
        max_runs: u32,
    ) -> Run {
        let mut run = Run {
            code: None,
            stderr: String::new(),
            boots: 0,
            panics: 0,
            kills: 0,
        };
        let mut n = 0;
        // The box is on already (flashed and booted).
        let mut need_boot = false;
        while n < max_runs {
            if need_boot {
                let (_, panicked) = self.power_on();
                run.boots += 1;
                if panicked {
                    run.panics += 1;
                    assert!(
                        run.panics < 10,
                        "the firmware keeps booting a panicking slot"
                    );
                    continue;
                }
            }
            need_boot = true;
            let mut c = cmd(n);
            let err_path = self.dir.join(format!("agent-{n}.stderr"));
            c.stderr(std::fs::File::create(&err_path).unwrap())
                .stdout(std::process::Stdio::null());
            let mut child = c.spawn().unwrap();
            let status: Option<ExitStatus> = match kill_after(n) {
                Some(d) => {
                    let deadline = Instant::now() + d;
                    loop {
                        if let Some(s) = child.try_wait().unwrap() {
                            break Some(s);
                        }
                        if Instant::now() >= deadline {
                            let _ = child.kill();
                            let _ = child.wait();
                            break None;
                        }
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
                None => Some(child.wait().unwrap()),
            };
            n += 1;
            run.stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            match status {
                // Killed by us, or by a crash point (SIGKILL from inside).
                None => {
                    run.kills += 1;
                    need_boot = power_cut;
                }
                Some(s) if s.code().is_none() => {
                    run.kills += 1;
                    need_boot = power_cut;
                }
                Some(s) if s.code() == Some(cairn_agent::upgrade::REBOOT_EXIT_CODE) => {}
                Some(s) => {
                    run.code = s.code();
                    return run;
                }
            }
        }
        panic!(
            "the machine did not settle after {max_runs} agent runs; last stderr:\n{}",
            run.stderr
        );
    }
}
