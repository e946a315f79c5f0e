//! Debian packages as image inputs: downloaded with `apt-get download` into a cache,
//! unpacked with `dpkg-deb -x`. Nothing is installed on the build machine and nothing
//! needs root mounts; the image is made of exactly the files these packages ship plus
//! our own binaries.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::Arch;
use crate::tools::run;

/// A download cache and unpack area for one architecture.
#[derive(Debug, Clone)]
pub struct Debs {
    cache: PathBuf,
    arch: Arch,
}

impl Debs {
    /// Packages land in `cache/debs/`, unpacked trees in `cache/pkgs/ARCH/`.
    pub fn new(cache: &Path, arch: Arch) -> Self {
        Self {
            cache: cache.to_path_buf(),
            arch,
        }
    }

    fn debs_dir(&self) -> PathBuf {
        self.cache.join("debs")
    }

    /// The newest `linux-image-*` the distribution's meta package points at, e.g.
    /// `linux-image-6.1.0-57-amd64`.
    pub fn kernel_package(&self) -> Result<String> {
        let meta = format!(
            "linux-image-{}:{}",
            self.arch.kernel_flavour(),
            self.arch.deb()
        );
        let out = Command::new("apt-cache")
            .args(["depends", &meta])
            .output()
            .context("running apt-cache (is this a Debian machine?)")?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: "))
            .map(|p| p.split(':').next().unwrap_or(p).trim().to_string())
            .find(|p| p.starts_with("linux-image-") && p != "linux-image-amd64")
            .with_context(|| {
                format!(
                    "apt-cache knows no kernel for {meta}: {}",
                    self.update_hint()
                )
            })
    }

    /// What to run when the package lists do not know a package.
    fn update_hint(&self) -> &'static str {
        match self.arch {
            Arch::Aarch64 => "run `apt-get update` after `dpkg --add-architecture arm64`",
            Arch::X86_64 => "run `apt-get update`",
        }
    }

    /// The `.deb` of `package` for this architecture, downloaded unless cached.
    pub fn fetch(&self, package: &str) -> Result<PathBuf> {
        self.fetch_all(&[package])?;
        self.cached(package)?.with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                self.debs_dir().display()
            )
        })
    }

    /// A cached `.deb` of `package` (`NAME_VERSION_ARCH.deb`, arch or `all`).
    fn cached(&self, package: &str) -> Result<Option<PathBuf>> {
        let dir = self.debs_dir();
        let prefix = format!("{package}_");
        let mut hits = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let name = e?.file_name().to_string_lossy().into_owned();
            let ok_arch =
                name.ends_with(&format!("_{}.deb", self.arch.deb())) || name.ends_with("_all.deb");
            if name.starts_with(&prefix) && ok_arch {
                hits.push(dir.join(name));
            }
        }
        hits.sort();
        Ok(hits.pop())
    }

    /// Downloads every package of `packages` not cached yet, in one `apt-get` call.
    pub fn fetch_all(&self, packages: &[&str]) -> Result<()> {
        let dir = self.debs_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut missing = Vec::new();
        for p in packages {
            if self.cached(p)?.is_none() {
                missing.push(format!("{p}:{}", self.arch.deb()));
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        tracing::info!(packages = %missing.join(" "), "downloading");
        let mut args = vec!["download", "-q"];
        args.extend(missing.iter().map(String::as_str));
        apt_get(&args, &dir)
            .with_context(|| format!("the package lists must know them: {}", self.update_hint()))
    }

    /// The `.deb` of `package` from Debian's `non-free-firmware` component (the
    /// Raspberry Pi boot firmware is only there), downloaded unless cached. The
    /// build machine's own sources may not list that component, so this uses a source
    /// list and package lists of its own under the cache; nothing of the machine's
    /// apt configuration changes.
    pub fn fetch_firmware(&self, package: &str) -> Result<PathBuf> {
        let dir = self.debs_dir();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        if let Some(p) = self.cached(package)? {
            return Ok(p);
        }
        // apt reads relative Dir:: paths as relative to /etc/apt.
        let apt = std::path::absolute(self.cache.join("apt-non-free-firmware"))?;
        let parts = apt.join("sources");
        let lists = apt.join("lists");
        std::fs::create_dir_all(&parts)?;
        std::fs::create_dir_all(lists.join("partial"))?;
        std::fs::create_dir_all(apt.join("cache/archives/partial"))?;
        let list = apt.join("sources.list");
        std::fs::write(&list, "")?;
        let suite = debian_suite()?;
        std::fs::write(
            parts.join("debian.sources"),
            format!(
                "Types: deb\nURIs: http://deb.debian.org/debian\nSuites: {suite}\n\
                 Components: non-free-firmware\n\
                 Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
            ),
        )?;
        let opts = [
            "-o".to_string(),
            format!("Dir::Etc::SourceList={}", list.display()),
            "-o".to_string(),
            format!("Dir::Etc::SourceParts={}", parts.display()),
            "-o".to_string(),
            format!("Dir::State::Lists={}", lists.display()),
            "-o".to_string(),
            format!("Dir::Cache={}", apt.join("cache").display()),
        ];
        tracing::info!(package, suite = %suite, "downloading from non-free-firmware");
        let mut args: Vec<&str> = opts.iter().map(String::as_str).collect();
        let n = args.len();
        args.extend(["-q", "update"]);
        apt_get(&args, &dir)
            .with_context(|| format!("reading Debian {suite}'s non-free-firmware lists"))?;
        args.truncate(n);
        args.extend(["-q", "download", package]);
        apt_get(&args, &dir).context("from non-free-firmware")?;
        self.cached(package)?.with_context(|| {
            format!(
                "apt-get download {package} left no .deb in {}",
                dir.display()
            )
        })
    }

    /// The unpacked tree of `package` (downloaded and unpacked once, then cached).
    pub fn unpack(&self, package: &str) -> Result<PathBuf> {
        let deb = self.fetch(package)?;
        self.unpack_deb(package, &deb)
    }

    /// The unpacked tree of the `.deb` file `deb` (once, then cached).
    pub fn unpack_deb(&self, package: &str, deb: &Path) -> Result<PathBuf> {
        let stem = deb
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| package.to_string());
        let root = self.cache.join("pkgs").join(stem);
        if root.join(".unpacked").exists() {
            return Ok(root);
        }
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        run(Command::new("dpkg-deb").arg("-x").arg(deb).arg(&root))?;
        std::fs::write(root.join(".unpacked"), b"")?;
        Ok(root)
    }
}

/// Runs `apt-get ARGS` in `dir`; a failure shows the command and apt's stderr.
fn apt_get(args: &[&str], dir: &Path) -> Result<()> {
    let out = Command::new("apt-get")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running apt-get (is this a Debian machine?)")?;
    if !out.status.success() {
        bail!(
            "apt-get {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The Debian release this machine's apt uses (`bookworm`), from `/etc/os-release`.
fn debian_suite() -> Result<String> {
    let text = std::fs::read_to_string("/etc/os-release").context("reading /etc/os-release")?;
    text.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|v| v.trim_matches('"').to_string())
        .filter(|v| !v.is_empty())
        .context("/etc/os-release names no VERSION_CODENAME: is this Debian?")
}
