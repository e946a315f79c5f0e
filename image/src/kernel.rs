//! The kernel an image boots: Debian's newest for the architecture, or one given as a
//! `.deb` of Debian's layout (the Raspberry Pi kernel); and what follows from which one
//! it is: the default console, and whether it can pass the Pi firmware's tryboot flag.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::BootScheme;
use crate::debs::Debs;

/// Where the kernel comes from.
pub(crate) enum KernelSource {
    /// A Debian package, downloaded with the image's other packages.
    Package(String),
    /// A `.deb` file (`--kernel-deb`).
    Deb(PathBuf),
}

impl KernelSource {
    /// `deb` if given, else the newest `linux-image-*` Debian's meta package points at
    /// (asks apt-cache; downloads nothing).
    pub(crate) fn of(deb: Option<&Path>, debs: &Debs) -> Result<Self> {
        match deb {
            Some(deb) => Ok(Self::Deb(deb.to_path_buf())),
            None => Ok(Self::Package(debs.kernel_package()?)),
        }
    }

    /// The package to download with the others; none for a `.deb` file.
    pub(crate) fn package(&self) -> Option<&str> {
        match self {
            Self::Package(p) => Some(p),
            Self::Deb(_) => None,
        }
    }

    /// Unpacks the kernel (a package must have been downloaded already) and finds its
    /// files.
    pub(crate) fn unpack(&self, debs: &Debs) -> Result<Kernel> {
        let root = match self {
            Self::Package(p) => debs.unpack(p)?,
            Self::Deb(deb) => debs.unpack_deb("kernel", deb)?,
        };
        Kernel::find(root)
    }
}

/// An unpacked kernel package.
pub(crate) struct Kernel {
    /// The release (`uname -r`), e.g. `6.1.0-57-amd64`.
    pub release: String,
    /// The kernel itself: `boot/vmlinuz-RELEASE`.
    pub vmlinuz: PathBuf,
    /// `lib/modules/RELEASE`.
    pub modules: PathBuf,
    /// The unpacked tree (device trees under `usr/lib/*/broadcom/`).
    pub root: PathBuf,
}

impl Kernel {
    /// The kernel of the unpacked package at `root`.
    fn find(root: PathBuf) -> Result<Self> {
        let boot = root.join("boot");
        for e in std::fs::read_dir(&boot).with_context(|| format!("listing {}", boot.display()))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            if let Some(rel) = name.strip_prefix("vmlinuz-") {
                let modules = root.join("lib/modules").join(rel);
                if !modules.is_dir() {
                    bail!("kernel {rel} ships no {}", modules.display());
                }
                return Ok(Self {
                    release: rel.to_string(),
                    vmlinuz: boot.join(&name),
                    modules,
                    root,
                });
            }
        }
        bail!("no vmlinuz-* in {}", boot.display())
    }

    /// Whether this is the Raspberry Pi kernel ([`downstream_pi_kernel`]).
    pub(crate) fn downstream_pi(&self) -> bool {
        downstream_pi_kernel(&self.release)
    }

    /// The console arguments: `console` if given, else [`default_console`].
    pub(crate) fn console(&self, scheme: BootScheme, console: Option<&str>) -> String {
        console
            .unwrap_or_else(|| default_console(scheme, self.downstream_pi()))
            .to_string()
    }

    /// Warns when this kernel cannot take a Pi through a trial boot.
    pub(crate) fn warn_if_no_tryboot(&self, scheme: BootScheme) {
        if scheme == BootScheme::PiTryboot && !self.downstream_pi() {
            tracing::warn!(
                kernel = %self.release,
                "this kernel cannot pass the tryboot flag to the Pi firmware: on a real Pi every upgrade will boot the old slot and be rolled back; give --kernel-deb with the Raspberry Pi kernel (linux-image-*-rpi-v8)"
            );
        }
    }
}

/// The kernel console when none is given: the first serial port of a PC or QEMU; on a
/// Pi the GPIO 14/15 UART (`enable_uart=1`), which Debian's kernel calls `ttyS1` and
/// the Raspberry Pi kernel `ttyS0`.
pub fn default_console(scheme: BootScheme, downstream: bool) -> &'static str {
    match (scheme, downstream) {
        (BootScheme::PiTryboot, false) => "console=tty0 console=ttyS1,115200",
        _ => "console=tty0 console=ttyS0,115200",
    }
}

/// Whether `release` is the Raspberry Pi kernel (`6.6.51+rpt-rpi-v8`), whose firmware
/// driver passes `reboot "0 tryboot"` on to the firmware; Debian's does not.
pub fn downstream_pi_kernel(release: &str) -> bool {
    release.contains("rpi")
}
