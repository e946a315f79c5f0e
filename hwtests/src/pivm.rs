//! The virtual rig's Raspberry Pi 4: a Pi image (`cairn-image build --board rpi4`)
//! booted on QEMU `virt` (aarch64, TCG), with the Pi firmware's part played on the
//! host, because nothing here can run the VideoCore firmware (QEMU 7.2 has no
//! `raspi4b`, and no emulator runs `start4.elf`).
//!
//! What the firmware does, and what this box does in its place, at each power-on or
//! reboot:
//!
//! 1. The EEPROM boot loader reads `autoboot.txt` from partition 1 and picks the boot
//!    partition: `[all] boot_partition`, or the `[tryboot]` one if the reboot asked
//!    for tryboot. Here: the same file read from the disk image with mtools, decided
//!    by the agent's own model of the firmware ([`firmware_boot`]).
//! 2. It reads that partition's `config.txt` (`kernel=`, `initramfs`, `cmdline=`;
//!    sections `[all]`, `[pi4]`, `[tryboot]`) and loads the kernel, the initramfs and
//!    `cmdline.txt` from it. Here: the same files, given to QEMU's `-kernel`,
//!    `-initrd` and `-append`.
//! 3. It reports the boot in the device tree: `/chosen/bootloader/partition` and
//!    `tryboot`. Here: QEMU's own `virt` device tree (the Pi's `bcm2711-*.dtb`
//!    describes hardware QEMU does not emulate), with those two properties added by
//!    `fdtput`.
//! 4. The tryboot flag comes with the reboot request (`reboot(2)` with "0 tryboot",
//!    which the Raspberry Pi kernel passes to the firmware) and is gone after one boot
//!    or a power cut. Here: QEMU runs with `-no-reboot`, so a guest reboot ends the
//!    process; the kernel logs the restart command (`reboot: Restarting system with
//!    command '0 tryboot'`) on the console, and the next boot is a tryboot if that
//!    boot's console says so. A kernel panic (`panic=5`) restarts without a command.
//!
//! The firmware's decisions are written to the console log as `pi-firmware:` lines,
//! where a real Pi's boot loader prints its own on the UART. There is no TPM, as on a
//! Pi.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use cairn_boot::gpt::{Partition, partitions};
use cairn_boot::tryboot::{AUTOBOOT, firmware_boot};
use cairn_image::tools::run;

use crate::machine::Machine;

const QEMU: &str = "qemu-system-aarch64";
/// What every kernel prints as it restarts with a command (kernel/reboot.c).
const RESTART_TRYBOOT: &str = "Restarting system with command '0 tryboot'";
/// What it prints as it powers off.
const POWER_DOWN: &str = "reboot: Power down";

/// One virtual Pi.
pub struct PiVm {
    name: String,
    dir: PathBuf,
    disk: PathBuf,
    shared: Arc<Mutex<Power>>,
    thread: Option<JoinHandle<()>>,
}

/// The power state, shared with the thread that plays the firmware.
#[derive(Default)]
struct Power {
    /// Whether the box should be on (false: stop and do not boot again).
    on: bool,
    qemu: Option<Child>,
    boots: u32,
    /// Why the firmware stopped the box by itself, if it did.
    halted: Option<String>,
}

/// What the firmware loads for one boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PiBootFiles {
    pub partition: u8,
    pub tryboot: bool,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
}

impl PiVm {
    /// A Pi in `dir` booting `disk` (flashed with [`Machine::flash`]).
    pub fn create(name: &str, dir: &Path, disk: &Path) -> Result<PiVm> {
        for tool in [QEMU, "fdtput", "mcopy"] {
            cairn_image::tools::which(
                tool,
                "`scripts/setup.sh images` installs qemu-system-arm, device-tree-compiler and mtools",
            )?;
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(PiVm {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            disk: disk.to_path_buf(),
            shared: Arc::new(Mutex::new(Power::default())),
            thread: None,
        })
    }

    /// How many times the firmware started a kernel since [`PiVm::create`].
    pub fn boots(&self) -> u32 {
        lock(&self.shared).boots
    }

    fn stop(&mut self) {
        {
            let mut p = lock(&self.shared);
            p.on = false;
            if let Some(c) = p.qemu.as_mut() {
                let _ = c.kill();
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let mut p = lock(&self.shared);
        if let Some(mut c) = p.qemu.take() {
            let _ = c.wait();
        }
    }
}

impl Power {
    /// The firmware stops the box by itself: says why on the console, ends QEMU if it
    /// still runs, and stays off.
    fn halt(&mut self, console: &Path, why: String) {
        console_note(console, &format!("halted: {why}"));
        if let Some(mut c) = self.qemu.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.halted = Some(why);
        self.on = false;
    }
}

fn lock(m: &Mutex<Power>) -> MutexGuard<'_, Power> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The QEMU machine, the same for the device-tree dump and the boots (the tree
/// depends on memory size and CPUs).
fn machine_args(cmd: &mut Command) -> &mut Command {
    cmd.args(["-machine", "virt", "-cpu", "cortex-a57", "-smp", "1"])
        .args(["-m", "512", "-accel", "tcg", "-nodefaults"])
        .args(["-display", "none", "-monitor", "none"])
}

/// Plays steps 1-2 of the firmware on the powered-off `disk`: which partition boots,
/// and the kernel, initramfs and command line it loads (copied into `dir`).
pub fn firmware_load(disk: &Path, tryboot: bool, dir: &Path) -> Result<PiBootFiles> {
    let parts = partitions(disk).map_err(|e| anyhow::anyhow!("{e}"))?;
    let first = parts
        .iter()
        .find(|p| p.number == 1)
        .context("the disk has no partition 1: the firmware finds no boot partition")?;
    let fw = dir.join("fw");
    let _ = std::fs::remove_dir_all(&fw);
    std::fs::create_dir_all(&fw)?;
    mcopy(disk, first, AUTOBOOT, &fw.join(AUTOBOOT))
        .context("partition 1 has no autoboot.txt (the firmware would boot partition 1 itself, which holds no kernel)")?;
    let boot = firmware_boot(&fw, tryboot).map_err(|e| anyhow::anyhow!("{e}"))?;
    let part = parts
        .iter()
        .find(|p| p.number == u32::from(boot.partition))
        .with_context(|| {
            format!(
                "autoboot.txt names boot partition {}, which the disk does not have",
                boot.partition
            )
        })?;
    mcopy(disk, part, "config.txt", &fw.join("config.txt")).with_context(|| {
        format!(
            "boot partition {} ({}) has no config.txt: is the slot written?",
            part.number, part.name
        )
    })?;
    let read = |name: &str| {
        std::fs::read_to_string(fw.join(name))
            .with_context(|| format!("partition {}: {name} is not text", part.number))
    };
    let config = PiConfig::parse(&read("config.txt")?, tryboot);
    let kernel = fw.join("kernel");
    mcopy(disk, part, &config.kernel, &kernel)
        .with_context(|| format!("partition {}: no kernel {}", part.number, config.kernel))?;
    let initrd = match &config.initramfs {
        Some(name) => {
            let p = fw.join("initrd");
            mcopy(disk, part, name, &p)
                .with_context(|| format!("partition {}: no initramfs {name}", part.number))?;
            Some(p)
        }
        None => None,
    };
    let cmdline_file = fw.join("cmdline");
    mcopy(disk, part, &config.cmdline, &cmdline_file)
        .with_context(|| format!("partition {}: no {}", part.number, config.cmdline))?;
    let cmdline = read("cmdline")?
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_string();
    Ok(PiBootFiles {
        partition: boot.partition,
        tryboot,
        kernel,
        initrd,
        cmdline,
    })
}

/// The `config.txt` settings the firmware needs to start Linux, as a Pi 4 reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PiConfig {
    pub kernel: String,
    pub initramfs: Option<String>,
    pub cmdline: String,
}

impl PiConfig {
    /// Lines in `[all]`, `[pi4]` and, on a tryboot, `[tryboot]` apply; a later value
    /// wins; other sections are for other boards.
    pub fn parse(text: &str, tryboot: bool) -> PiConfig {
        let mut c = PiConfig {
            kernel: "kernel8.img".into(),
            initramfs: None,
            cmdline: "cmdline.txt".into(),
        };
        let mut applies = true;
        for line in text.lines() {
            let l = line.trim();
            if l.is_empty() || l.starts_with('#') {
                continue;
            }
            if let Some(section) = l.strip_prefix('[').and_then(|s| s.strip_suffix(']')) {
                applies = match section.to_ascii_lowercase().as_str() {
                    "all" | "pi4" => true,
                    "tryboot" => tryboot,
                    _ => false,
                };
                continue;
            }
            if !applies {
                continue;
            }
            if let Some(rest) = l.strip_prefix("initramfs ") {
                c.initramfs = rest.split_whitespace().next().map(str::to_string);
            } else if let Some((k, v)) = l.split_once('=') {
                match k.trim() {
                    "kernel" => c.kernel = v.trim().to_string(),
                    "cmdline" => c.cmdline = v.trim().to_string(),
                    _ => {}
                }
            }
        }
        c
    }
}

fn mcopy(disk: &Path, part: &Partition, name: &str, out: &Path) -> Result<()> {
    let _ = std::fs::remove_file(out);
    run(Command::new("mcopy")
        .args(["-n", "-i"])
        .arg(format!("{}@@{}", disk.display(), part.offset))
        .arg(format!("::/{name}"))
        .arg(out))
}

/// QEMU's `virt` device tree with the properties the Pi firmware adds under
/// `/chosen/bootloader`.
fn device_tree(dir: &Path, boot: &PiBootFiles) -> Result<PathBuf> {
    let base = dir.join("virt.dtb");
    if !base.exists() {
        run(machine_args(&mut Command::new(QEMU))
            .arg("-machine")
            .arg(format!("dumpdtb={}", base.display()))
            .args(["-nic", "user,model=virtio-net-pci"]))?;
    }
    let dtb = dir.join("boot.dtb");
    std::fs::copy(&base, &dtb)?;
    let d = dtb.to_string_lossy().into_owned();
    run(Command::new("fdtput").args(["-c", &d, "/chosen/bootloader"]))?;
    let partition = boot.partition.to_string();
    let tryboot = u8::from(boot.tryboot).to_string();
    for (prop, v) in [
        ("partition", partition.as_str()),
        ("tryboot", tryboot.as_str()),
    ] {
        run(Command::new("fdtput").args(["-t", "u", &d, "/chosen/bootloader", prop, v]))?;
    }
    Ok(dtb)
}

fn console_note(console: &Path, line: &str) {
    tracing::info!("{line}");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(console)
    {
        let _ = writeln!(f, "\npi-firmware: {line}");
    }
}

/// The firmware's loop: boot, wait for the guest to reboot (QEMU exits), look at how
/// it rebooted, boot again; until the power goes off.
fn firmware_loop(shared: Arc<Mutex<Power>>, dir: PathBuf, disk: PathBuf, console: PathBuf) {
    let mut tryboot = false;
    loop {
        if !lock(&shared).on {
            return;
        }
        let started = match boot_once(&dir, &disk, &console, tryboot) {
            Ok(c) => c,
            Err(e) => {
                lock(&shared).halt(&console, format!("{e:#}"));
                return;
            }
        };
        let console_at = started.1;
        {
            let mut p = lock(&shared);
            if !p.on {
                let mut c = started.0;
                let _ = c.kill();
                let _ = c.wait();
                return;
            }
            p.qemu = Some(started.0);
            p.boots += 1;
        }
        // Wait for QEMU to end: a reboot or panic of the guest (-no-reboot), or the
        // power being cut (`stop` kills it).
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let mut p = lock(&shared);
            if !p.on {
                return;
            }
            match p.qemu.as_mut().map(|c| c.try_wait()) {
                Some(Ok(None)) => continue,
                Some(Err(e)) => {
                    p.halt(&console, format!("cannot watch {QEMU}: {e}"));
                    return;
                }
                Some(Ok(Some(status))) if !status.success() => {
                    let why = format!(
                        "{QEMU} exited with {status} (see qemu.log in {})",
                        dir.display()
                    );
                    p.halt(&console, why);
                    return;
                }
                _ => {
                    p.qemu = None;
                    break;
                }
            }
        }
        let text = std::fs::read(&console).unwrap_or_default();
        let this_boot = String::from_utf8_lossy(text.get(console_at..).unwrap_or_default());
        if this_boot.contains(POWER_DOWN) {
            // `-no-reboot` ends QEMU for a power-off as for a reboot: stay off.
            lock(&shared).halt(&console, "the system powered itself off".into());
            return;
        }
        tryboot = this_boot.contains(RESTART_TRYBOOT);
    }
}

/// Starts one boot; returns QEMU and the console's length before it.
fn boot_once(dir: &Path, disk: &Path, console: &Path, tryboot: bool) -> Result<(Child, usize)> {
    let files = firmware_load(disk, tryboot, dir)?;
    console_note(
        console,
        &format!(
            "booting partition {}{} ({})",
            files.partition,
            if tryboot { " (tryboot)" } else { "" },
            files.cmdline
        ),
    );
    let dtb = device_tree(dir, &files)?;
    let at = std::fs::metadata(console).map_or(0, |m| m.len() as usize);
    let mut cmd = Command::new(QEMU);
    machine_args(&mut cmd)
        .arg("-no-reboot")
        .arg("-chardev")
        .arg(format!("file,id=con,path={},append=on", console.display()))
        .args(["-serial", "chardev:con"])
        .arg("-kernel")
        .arg(&files.kernel)
        .arg("-dtb")
        .arg(&dtb)
        .args(["-append", &files.cmdline]);
    if let Some(i) = &files.initrd {
        cmd.arg("-initrd").arg(i);
    }
    let child = cmd
        .arg("-drive")
        .arg(format!(
            "if=none,id=d0,file={},format=raw,cache=writeback",
            disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=d0"])
        .args(["-nic", "user,model=virtio-net-pci"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("qemu.log"))?)
        .spawn()
        .with_context(|| format!("starting {QEMU}"))?;
    Ok((child, at))
}

impl Machine for PiVm {
    fn name(&self) -> &str {
        &self.name
    }

    fn flash(&mut self, image: &Path) -> Result<()> {
        if lock(&self.shared).on {
            bail!("{} is on: power it off before flashing", self.name);
        }
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(image)
            .arg(&self.disk))
    }

    fn power_on(&mut self) -> Result<()> {
        if lock(&self.shared).on {
            bail!("{} is already on", self.name);
        }
        self.stop();
        {
            let mut p = lock(&self.shared);
            p.on = true;
            p.halted = None;
        }
        let (shared, dir, disk, console) = (
            self.shared.clone(),
            self.dir.clone(),
            self.disk.clone(),
            self.console_log(),
        );
        self.thread = Some(
            std::thread::Builder::new()
                .name(format!("pi-firmware-{}", self.name))
                .spawn(move || firmware_loop(shared, dir, disk, console))?,
        );
        tracing::info!(vm = %self.name, "power on");
        Ok(())
    }

    fn power_off(&mut self) -> Result<()> {
        tracing::info!(vm = %self.name, "power cut");
        self.stop();
        Ok(())
    }

    fn is_on(&mut self) -> bool {
        let p = lock(&self.shared);
        if let Some(why) = &p.halted {
            tracing::warn!(vm = %self.name, %why, "the firmware stopped the box");
        }
        p.on
    }

    fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

impl Drop for PiVm {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_txt_is_read_as_a_pi_4_reads_it() {
        let text = "# c\narm_64bit=1\nkernel=vmlinuz\ninitramfs initrd.img followkernel\n\
                    [pi5]\nkernel=kernel_2712.img\n[tryboot]\ncmdline=try.txt\n[all]\n";
        let c = PiConfig::parse(text, false);
        assert_eq!(
            c,
            PiConfig {
                kernel: "vmlinuz".into(),
                initramfs: Some("initrd.img".into()),
                cmdline: "cmdline.txt".into()
            }
        );
        assert_eq!(PiConfig::parse(text, true).cmdline, "try.txt");
        assert_eq!(PiConfig::parse("", false).kernel, "kernel8.img");
    }
}
