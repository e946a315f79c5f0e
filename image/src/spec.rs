//! What to build ([`Spec`]: architecture, board, version, agent, [`Layout`], an
//! optional [`Fault`]) and what a build made ([`Built`]: the disk and the release
//! payloads, written as `image.json` next to them and read back by the real rig).

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

use crate::Arch;

/// Partition sizes in MiB.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Layout {
    /// The ESP (UEFI) or the Pi's firmware partition.
    pub esp_mib: u64,
    /// Each slot's root partition.
    pub slot_mib: u64,
    pub data_mib: u64,
    /// Each slot's boot partition (Raspberry Pi only).
    #[serde(default = "default_boot_mib")]
    pub boot_mib: u64,
}

fn default_boot_mib() -> u64 {
    128
}

impl Default for Layout {
    fn default() -> Self {
        Self {
            esp_mib: 128,
            slot_mib: 512,
            data_mib: 256,
            boot_mib: default_boot_mib(),
        }
    }
}

/// How a board boots its slots; each scheme has its own disk layout (see the crate's
/// `uefi` and `pi` modules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootScheme {
    /// UEFI firmware and systemd-boot with boot counting; a slot's kernel is a UKI on
    /// the ESP. Disk: `esp`, `cairn-a`, `cairn-b`, `cairn-data`.
    Uefi,
    /// The Raspberry Pi 4 firmware: `autoboot.txt` with `tryboot_a_b`; a slot's kernel
    /// is on its own FAT boot partition. Disk: `boot`, `cairn-boot-a`, `cairn-boot-b`,
    /// `cairn-a`, `cairn-b`, `cairn-data`.
    PiTryboot,
}

impl BootScheme {
    /// The scheme of `board`: `rpi4` boots the Pi way (aarch64 only), every other
    /// board with UEFI.
    pub fn of(arch: Arch, board: &str) -> Result<Self> {
        match (board, arch) {
            ("rpi4", Arch::Aarch64) => Ok(Self::PiTryboot),
            ("rpi4", _) => bail!("board rpi4 is aarch64: give --arch aarch64"),
            ("rpi5", _) => bail!(
                "board rpi5 is not supported yet: Debian's 6.1 kernel has no BCM2712/RP1 support (no device tree, no Ethernet); use rpi4"
            ),
            _ => Ok(Self::Uefi),
        }
    }
}

/// One slot payload besides the root: `uki` or `boot`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Payload {
    pub name: String,
    pub path: PathBuf,
}

/// A deliberate defect, for testing that broken releases roll back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// The initramfs exits before mounting anything: the kernel panics, `panic=5`
    /// reboots, and the boot loader has to fall back.
    InitPanic,
}

impl std::str::FromStr for Fault {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "init-panic" => Ok(Fault::InitPanic),
            other => Err(format!(
                "unknown fault {other:?}; the one known is init-panic"
            )),
        }
    }
}

/// What to build.
#[derive(Debug, Clone)]
pub struct Spec {
    pub arch: Arch,
    /// Board family releases are built for (`nuc`, `rpi4`).
    pub board: String,
    /// The OS version (semver).
    pub version: String,
    /// The `cairn-agent` binary for `arch`.
    pub agent: PathBuf,
    /// Output directory.
    pub out: PathBuf,
    /// Download cache for Debian packages.
    pub cache: PathBuf,
    pub layout: Layout,
    pub fault: Option<Fault>,
    /// Extra arguments for `cairn-agent run` (e.g. `--keep-alive 2s`).
    pub agent_args: Vec<String>,
    /// Kernel console arguments; default: the board's serial console
    /// ([`crate::default_console`]).
    pub console: Option<String>,
    /// The kernel as a `.deb` of Debian's layout (`boot/vmlinuz-*`, `lib/modules/*`,
    /// `usr/lib/linux-image-*/`), e.g. the Raspberry Pi kernel; default: Debian's.
    pub kernel_deb: Option<PathBuf>,
}

/// What a build made; also written as `image.json` in the output directory (and read
/// back from there by the real rig).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Built {
    pub arch: Arch,
    pub board: String,
    pub version: String,
    /// The whole disk, to flash.
    pub disk: PathBuf,
    pub scheme: BootScheme,
    /// Slot contents, the release payloads: the root and the rest (`uki`, `boot`).
    pub rootfs: PathBuf,
    pub extra: Vec<Payload>,
    /// SHA-256 Authenticode digest of the UKI (what UEFI measures into PCR 4); none on
    /// a Pi.
    pub uki_authenticode: Option<String>,
    pub kernel: String,
    pub layout: Layout,
    pub fault: Option<Fault>,
}

impl Built {
    /// Every payload as `(name, file)`, the root first.
    pub fn payloads(&self) -> Vec<(&str, &Path)> {
        std::iter::once(("rootfs", self.rootfs.as_path()))
            .chain(
                self.extra
                    .iter()
                    .map(|p| (p.name.as_str(), p.path.as_path())),
            )
            .collect()
    }

    /// The file of payload `name`.
    pub fn payload(&self, name: &str) -> Option<&Path> {
        self.payloads()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_board_picks_its_boot_scheme_or_says_what_to_give() {
        use Arch::{Aarch64, X86_64};
        let cases: [(Arch, &str, Result<BootScheme, &str>); 5] = [
            (X86_64, "nuc", Ok(BootScheme::Uefi)),
            (Aarch64, "virt", Ok(BootScheme::Uefi)),
            (Aarch64, "rpi4", Ok(BootScheme::PiTryboot)),
            (X86_64, "rpi4", Err("give --arch aarch64")),
            (Aarch64, "rpi5", Err("use rpi4")),
        ];
        for (arch, board, want) in cases {
            match (BootScheme::of(arch, board), want) {
                (Ok(got), Ok(want)) => assert_eq!(got, want, "{arch} {board}"),
                (Err(e), Err(hint)) => assert!(e.to_string().contains(hint), "{e}"),
                (got, want) => panic!("{arch} {board}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn payloads_list_the_root_first() {
        let built = Built {
            arch: Arch::X86_64,
            board: "nuc".into(),
            version: "1.0.0".into(),
            disk: "out/cairn-nuc-1.0.0.img".into(),
            scheme: BootScheme::Uefi,
            rootfs: "out/rootfs.squashfs".into(),
            extra: vec![Payload {
                name: "uki".into(),
                path: "out/cairn.efi".into(),
            }],
            uki_authenticode: None,
            kernel: "6.1.0-57-amd64".into(),
            layout: Layout::default(),
            fault: None,
        };
        let names: Vec<_> = built.payloads().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["rootfs", "uki"]);
        assert_eq!(built.payload("uki"), Some(Path::new("out/cairn.efi")));
        assert_eq!(built.payload("boot"), None);
    }
}
