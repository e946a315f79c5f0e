//! The virtual rig: one box is QEMU (TCG; there is no usable KVM here) with OVMF as
//! its UEFI firmware, a swtpm as its TPM (so the firmware measures the boot into real
//! PCRs and the guest kernel exposes a real event log), the image as its virtio disk,
//! and QEMU user networking, in which the host's loopback is `10.0.2.2`: the guest
//! reaches a hub listening on `127.0.0.1` and nothing else is exposed.
//!
//! Power is the QEMU process: [`Vm::power_off`] is SIGKILL (a power cut, for the
//! disk and the TPM alike); a reboot from the guest resets the machine inside the
//! same process. The serial console goes to `console.log`, appended across boots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use cairn_image::Arch;
use cairn_tpm_device::testkit::{EkCert, Swtpm, SwtpmOptions, TestCa};

use crate::machine::Machine;

/// The UEFI firmware of each architecture, as Debian's `ovmf` and
/// `qemu-efi-aarch64` packages install it: (code, variable store template).
pub fn firmware(arch: Arch) -> (&'static str, &'static str) {
    match arch {
        Arch::X86_64 => (
            "/usr/share/OVMF/OVMF_CODE_4M.fd",
            "/usr/share/OVMF/OVMF_VARS_4M.fd",
        ),
        Arch::Aarch64 => (
            "/usr/share/AAVMF/AAVMF_CODE.fd",
            "/usr/share/AAVMF/AAVMF_VARS.fd",
        ),
    }
}

fn qemu(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86_64",
        Arch::Aarch64 => "qemu-system-aarch64",
    }
}

/// One virtual box.
pub struct Vm {
    name: String,
    arch: Arch,
    dir: PathBuf,
    disk: PathBuf,
    mem_mib: u32,
    uuid: String,
    tpm_dir: tempfile::TempDir,
    ca: Option<TestCa>,
    swtpm: Option<Child>,
    qemu: Option<Child>,
    started: Option<Instant>,
}

impl Vm {
    /// A box in `dir` booting `disk` (used in place: copy the image first), with a
    /// fresh firmware variable store and a TPM provisioned with an ECC EK certificate
    /// signed by its own manufacturer CA ([`Vm::ek_ca_pem`]).
    pub fn create(name: &str, arch: Arch, dir: &Path, disk: &Path) -> Result<Vm> {
        for tool in [qemu(arch), "swtpm"] {
            cairn_image::tools::which(
                tool,
                "`scripts/setup.sh images` installs qemu-system-x86, ovmf and swtpm",
            )?;
        }
        let (code, vars) = firmware(arch);
        if !Path::new(code).exists() {
            bail!(
                "{code} is missing: `scripts/setup.sh images` installs ovmf and qemu-efi-aarch64"
            );
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::copy(vars, dir.join("VARS.fd")).context("copying the UEFI variable store")?;
        let tpm = Swtpm::start(SwtpmOptions {
            ek_cert: EkCert::Ecc,
            ca: None,
        })
        .context("provisioning the TPM")?;
        let (tpm_dir, ca) = tpm
            .into_state()
            .context("stopping the provisioning swtpm")?;
        // A stable SMBIOS UUID: the box's host name comes from it.
        let digest = <sha2::Sha256 as sha2::Digest>::digest(name.as_bytes());
        let h = hex::encode(&digest[..16]);
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            &h[0..8],
            &h[8..12],
            &h[12..16],
            &h[16..20],
            &h[20..32]
        );
        Ok(Vm {
            name: name.to_string(),
            arch,
            dir: dir.to_path_buf(),
            disk: disk.to_path_buf(),
            mem_mib: 512,
            uuid,
            tpm_dir,
            ca,
            swtpm: None,
            qemu: None,
            started: None,
        })
    }

    /// The EK certificate CA (issuing CA and root, PEM): the hub's `--ek-ca`.
    pub fn ek_ca_pem(&self) -> Result<Vec<u8>> {
        match &self.ca {
            Some(ca) => Ok(ca.ca_cert_pem()?),
            None => bail!("this box's TPM has no EK certificate"),
        }
    }

    /// The host name the image gives itself (`cairn-` + the first 8 hex digits of
    /// the SMBIOS UUID).
    pub fn hostname(&self) -> String {
        format!("cairn-{}", &self.uuid[..8])
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("swtpm.sock")
    }

    fn start_swtpm(&mut self) -> Result<()> {
        let sock = self.sock();
        let _ = std::fs::remove_file(&sock);
        let log = std::fs::File::create(self.dir.join("swtpm.log"))?;
        let child = Command::new("swtpm")
            .args(["socket", "--tpm2", "--tpmstate"])
            .arg(format!(
                "dir={}",
                self.tpm_dir.path().join("state").display()
            ))
            .args(["--ctrl", &format!("type=unixio,path={}", sock.display())])
            .args(["--flags", "startup-clear"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting swtpm")?;
        self.swtpm = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !sock.exists() {
            if Instant::now() > deadline {
                bail!("swtpm did not create {} within 10 s", sock.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    fn stop(&mut self) {
        for c in [self.qemu.take(), self.swtpm.take()].into_iter().flatten() {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Seconds since the last power-on.
    pub fn uptime(&self) -> Option<Duration> {
        self.started.map(|s| s.elapsed())
    }
}

impl Machine for Vm {
    fn name(&self) -> &str {
        &self.name
    }

    fn flash(&mut self, image: &Path) -> Result<()> {
        if self.qemu.is_some() {
            bail!("{} is on: power it off before flashing", self.name);
        }
        cairn_image::tools::run(
            Command::new("cp")
                .arg("--sparse=always")
                .arg(image)
                .arg(&self.disk),
        )
    }

    fn power_on(&mut self) -> Result<()> {
        if self.qemu.is_some() {
            bail!("{} is already on", self.name);
        }
        self.start_swtpm()?;
        let console = self.console_log();
        let (code, _) = firmware(self.arch);
        let mut cmd = Command::new(qemu(self.arch));
        match self.arch {
            Arch::X86_64 => cmd.args(["-machine", "q35", "-smp", "1"]),
            Arch::Aarch64 => cmd.args(["-machine", "virt", "-cpu", "cortex-a57", "-smp", "1"]),
        };
        let tpm_device = match self.arch {
            Arch::X86_64 => "tpm-tis,tpmdev=tpm0",
            Arch::Aarch64 => "tpm-tis-device,tpmdev=tpm0",
        };
        let child = cmd
            .args(["-accel", "tcg", "-nodefaults"])
            .args(["-m", &self.mem_mib.to_string(), "-uuid", &self.uuid])
            .args(["-display", "none", "-monitor", "none"])
            .arg("-chardev")
            .arg(format!("file,id=con,path={},append=on", console.display()))
            .args(["-serial", "chardev:con"])
            .arg("-drive")
            .arg(format!("if=pflash,format=raw,readonly=on,file={code}"))
            .arg("-drive")
            .arg(format!(
                "if=pflash,format=raw,file={}",
                self.dir.join("VARS.fd").display()
            ))
            .arg("-chardev")
            .arg(format!("socket,id=chrtpm,path={}", self.sock().display()))
            .args([
                "-tpmdev",
                "emulator,id=tpm0,chardev=chrtpm",
                "-device",
                tpm_device,
            ])
            .arg("-drive")
            .arg(format!(
                "if=none,id=d0,file={},format=raw,cache=writeback",
                self.disk.display()
            ))
            .args(["-device", "virtio-blk-pci,drive=d0,bootindex=0"])
            .args(["-nic", "user,model=virtio-net-pci"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("qemu.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", qemu(self.arch)))?;
        self.qemu = Some(child);
        self.started = Some(Instant::now());
        tracing::info!(vm = %self.name, "power on");
        Ok(())
    }

    fn power_off(&mut self) -> Result<()> {
        tracing::info!(vm = %self.name, "power cut");
        self.stop();
        self.started = None;
        Ok(())
    }

    fn is_on(&mut self) -> bool {
        match self.qemu.as_mut().map(|c| c.try_wait()) {
            Some(Ok(None)) => true,
            Some(_) => {
                self.stop();
                false
            }
            None => false,
        }
    }

    fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}
