//! What the engine knows about the box: its boot loader ([`BootSpec`]), where each
//! payload goes per slot ([`SlotLayout`]), how it reboots ([`RebootAction`]), all in
//! [`UpgradeConfig`].

use std::path::{Path, PathBuf};

use cairn_sync_protocol::release::Slot;

use super::boot::{self, BootControl, BootError};

/// Which boot loader the box has, with its settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootSpec {
    /// `file:DIR` — the simulation's boot loader (state in `DIR/boot.json`; the slot
    /// booted is read from `DIR/booted`, written by its firmware model).
    File(PathBuf),
    /// `sdboot:ESP[:EFIVARS]` — systemd-boot boot counting on the mounted ESP.
    SdBoot { esp: PathBuf, efivars: PathBuf },
    /// `efi:A,B[:EFIVARS]` — UEFI `BootNext`/`BootOrder` with the `Boot####` numbers
    /// (hex) of the two slots' load options.
    Efi { entries: [u16; 2], efivars: PathBuf },
    /// `tryboot:BOOT_DIR:PA,PB` — Raspberry Pi `autoboot.txt` on the mounted boot
    /// partition, with the boot partition numbers of slot A and B.
    Tryboot { dir: PathBuf, partitions: [u8; 2] },
    /// `gpt:DISK:A,B` — ChromeOS-style priority/tries/successful attribute bits of the
    /// slot partitions (numbers or names) on the GPT disk.
    Gpt { disk: PathBuf, parts: [String; 2] },
    /// `uboot:FW_ENV_CONFIG` — the U-Boot environment as `fw_setenv` sees it.
    Uboot(PathBuf),
}

const EFIVARS: &str = "/sys/firmware/efi/efivars";

fn pair<T: std::str::FromStr>(s: &str, parse: impl Fn(&str) -> Option<T>) -> Option<[T; 2]> {
    let (a, b) = s.split_once(',')?;
    Some([parse(a)?, parse(b)?])
}

impl BootSpec {
    /// Parses `file:DIR`, `sdboot:ESP[:EFIVARS]`, `efi:A,B[:EFIVARS]`,
    /// `tryboot:BOOT_DIR:PA,PB`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        let usage = || {
            format!(
                "boot loader {s:?} not understood; give file:DIR, gpt:DISK:A,B (partition numbers or names), sdboot:ESP[:EFIVARS], efi:A,B[:EFIVARS] (Boot#### numbers in hex), tryboot:BOOT_DIR:PA,PB or uboot:FW_ENV_CONFIG"
            )
        };
        let (first, second) = match rest.split_once(':') {
            Some((a, b)) => (a, Some(b)),
            None => (rest, None),
        };
        if first.is_empty() {
            return Err(usage());
        }
        match kind {
            "file" => Ok(Self::File(rest.into())),
            "uboot" => Ok(Self::Uboot(rest.into())),
            "gpt" => Ok(Self::Gpt {
                disk: first.into(),
                parts: second
                    .and_then(|p| pair(p, |x| Some(x.to_string())))
                    .ok_or_else(usage)?,
            }),
            "sdboot" => Ok(Self::SdBoot {
                esp: first.into(),
                efivars: second.unwrap_or(EFIVARS).into(),
            }),
            "efi" => Ok(Self::Efi {
                entries: pair(first, |x| u16::from_str_radix(x, 16).ok()).ok_or_else(usage)?,
                efivars: second.unwrap_or(EFIVARS).into(),
            }),
            "tryboot" => Ok(Self::Tryboot {
                dir: first.into(),
                partitions: second
                    .and_then(|p| pair(p, |x| x.parse().ok()))
                    .ok_or_else(usage)?,
            }),
            _ => Err(usage()),
        }
    }

    /// Opens the boot loader, with the slot it booted when it can tell.
    pub(super) fn open(&self) -> Result<(Box<dyn BootControl>, Option<Slot>), BootError> {
        match self {
            Self::File(dir) => {
                let b = boot::file::FileBoot::open(dir)?;
                let booted = b.booted().ok();
                Ok((Box::new(b), booted))
            }
            Self::SdBoot { esp, efivars } => {
                Ok((Box::new(boot::sdboot::SdBoot::new(esp, efivars)), None))
            }
            Self::Efi { entries, efivars } => Ok((
                Box::new(boot::efiboot::EfiBoot::new(efivars, *entries)?),
                None,
            )),
            Self::Gpt { disk, parts } => {
                let part = |p: &str| match p.parse::<u32>() {
                    Ok(n) => boot::gpt::PartRef::Number(n),
                    Err(_) => boot::gpt::PartRef::Name(p.to_string()),
                };
                let [a, b] = parts;
                Ok((
                    Box::new(boot::gpt::GptBoot::open(disk, part(a), part(b))?),
                    None,
                ))
            }
            Self::Uboot(conf) => Ok((
                Box::new(boot::uboot::UbootBoot::from_fw_env_config(conf)?),
                None,
            )),
            Self::Tryboot { dir, partitions } => {
                let tb = boot::tryboot::TryBoot::open(dir, *partitions)?;
                // The firmware says which partition it booted; the two slots' boot
                // partitions can then carry the same bytes (no per-slot cmdline.txt).
                let booted = tb.booted_slot(Path::new(boot::tryboot::DT_BOOTLOADER));
                Ok((Box::new(tb), booted))
            }
        }
    }
}

/// Where each payload of a release goes, per slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotLayout {
    /// The slots themselves (partitions or files): the `rootfs` payload.
    pub rootfs: [PathBuf; 2],
    /// Other payloads by name (`kernel`, `uki`): a file per slot, on a file system
    /// (the ESP). A file payload is resized to what the release holds; the rootfs
    /// target keeps its size (a partition, or a file standing in for one).
    pub extra: Vec<(String, [PathBuf; 2])>,
}

impl SlotLayout {
    pub fn target(&self, payload: &str, slot: Slot) -> Option<&Path> {
        if payload == "rootfs" {
            return Some(&self.rootfs[slot.index()]);
        }
        self.extra
            .iter()
            .find(|(n, _)| n == payload)
            .map(|(_, p)| p[slot.index()].as_path())
    }

    /// Whether `payload` goes into a file on a file system, sized to the payload (an
    /// extra payload whose target is not a block device, such as a UKI on the ESP),
    /// rather than into a partition that keeps its size (a Pi's boot partition).
    pub fn is_file(&self, payload: &str, slot: Slot) -> bool {
        use std::os::unix::fs::FileTypeExt;
        payload != "rootfs"
            && self.target(payload, slot).is_some_and(|t| {
                // A device node, or a /dev path (a missing link must not become a
                // file on /dev's RAM file system).
                !t.starts_with("/dev")
                    && !std::fs::metadata(t).is_ok_and(|m| m.file_type().is_block_device())
            })
    }
}

/// How the agent reboots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebootAction {
    /// Run this command (`systemctl reboot`; with `"0 tryboot"` appended for a Pi trial).
    Command(Vec<String>),
    /// Stop the agent and exit with [`REBOOT_EXIT_CODE`] (or, for a Pi trial,
    /// [`TRYBOOT_EXIT_CODE`]): the box's init, or the simulation's and tests' "machine",
    /// then reboots (or runs its firmware model) and starts the agent again.
    Exit,
}

/// Exit status of `cairn-agent` when it stopped to be rebooted (`--reboot exit`).
pub const REBOOT_EXIT_CODE: i32 = 10;
/// Exit status when the reboot must carry the tryboot flag (`--reboot exit` with the
/// `tryboot` boot loader): `cairn-agent reboot "0 tryboot"` does that.
pub const TRYBOOT_EXIT_CODE: i32 = 11;

/// Everything the engine needs to know about the box.
#[derive(Debug, Clone)]
pub struct UpgradeConfig {
    pub boot: BootSpec,
    pub slots: SlotLayout,
    /// `x86_64`, `aarch64` (default: this build's).
    pub arch: String,
    /// Board family releases must name (`nuc`, `rpi4`, `sim`).
    pub board: String,
    /// The version of the image the box was flashed with (committed until the first
    /// upgrade commits).
    pub os_version: String,
    /// Where the engine keeps block indexes of the slots.
    pub state_dir: PathBuf,
    /// The kernel command line, to learn the booted slot (`cairn.slot=a|b`).
    pub cmdline: PathBuf,
    /// Flush and record progress after this many bytes.
    pub checkpoint_bytes: u64,
    pub reboot: RebootAction,
}

impl UpgradeConfig {
    pub fn new(boot: BootSpec, slots: SlotLayout, board: &str, data_dir: &Path) -> Self {
        Self {
            boot,
            slots,
            arch: std::env::consts::ARCH.into(),
            board: board.into(),
            os_version: "0.0.0".into(),
            state_dir: data_dir.join("upgrade"),
            cmdline: "/proc/cmdline".into(),
            checkpoint_bytes: 32 << 20,
            reboot: RebootAction::Command(vec!["systemctl".into(), "reboot".into()]),
        }
    }
}
