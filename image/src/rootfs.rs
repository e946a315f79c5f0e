//! A slot's root file system, read-only squashfs (release payload `rootfs`): the
//! agent's shared libraries from Debian packages, busybox, `cairn-agent` (debug info
//! stripped), our init (`files/rootfs-init.sh`: brings the network up and runs the
//! agent under a supervisor loop, exit 10 = reboot) and the agent's configuration for
//! this image. No login, no getty, no shell on the console, no SSH.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::debs::Debs;
use crate::tools::{copy_tree, run, symlink, write_file};
use crate::{BootScheme, MIB, Spec};

/// Busybox applets the root file system links (the initramfs installs all of them).
const APPLETS: &[&str] = &[
    "sh", "ash", "cat", "cp", "cut", "date", "df", "dmesg", "echo", "false", "grep", "head",
    "hostname", "ip", "kill", "ln", "ls", "mkdir", "mount", "mv", "ps", "readlink", "reboot",
    "poweroff", "rm", "sed", "sleep", "stat", "sync", "tail", "test", "[", "tr", "true", "udhcpc",
    "umount", "uname", "uptime", "wc",
];

/// Shared libraries the agent needs (tpm2-tss loads its TCTI with dlopen).
pub(crate) const LIB_PACKAGES: &[&str] = &[
    "libc6",
    "libgcc-s1",
    "libssl3",
    "libtss2-esys-3.0.2-0",
    "libtss2-mu0",
    "libtss2-sys1",
    "libtss2-tctildr0",
    "libtss2-tcti-device0",
];

/// Builds the root in `work/rootfs` (the packages downloaded already) and squashes it
/// into `spec.out/rootfs.squashfs`, which it returns.
pub(crate) fn build(
    spec: &Spec,
    scheme: BootScheme,
    debs: &Debs,
    busybox: &Path,
    osrel: &Path,
    work: &Path,
) -> Result<PathBuf> {
    let root = work.join("rootfs");
    for d in [
        "bin",
        "usr/bin",
        "sbin",
        "etc/cairn",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "var/lib/cairn",
        "boot/efi",
        "usr/share/udhcpc",
    ] {
        std::fs::create_dir_all(root.join(d))?;
    }
    copy_libraries(spec, debs, &root)?;
    install_binaries(spec, busybox, &root)?;
    write_init(spec, scheme, &root)?;
    write_etc(spec, scheme, osrel, &root)?;
    squash(spec, &root)
}

/// The files of [`LIB_PACKAGES`], without what a box never reads.
fn copy_libraries(spec: &Spec, debs: &Debs, root: &Path) -> Result<()> {
    for p in LIB_PACKAGES {
        let tree = debs.unpack(p)?;
        copy_tree(&tree, root)?;
    }
    for junk in [
        "usr/share/doc",
        "usr/share/lintian",
        "usr/share/locale",
        "usr/share/man",
        "etc/ld.so.conf.d",
        ".unpacked",
    ] {
        let _ = std::fs::remove_dir_all(root.join(junk));
        let _ = std::fs::remove_file(root.join(junk));
    }
    let _ = std::fs::remove_dir_all(root.join(format!("usr/lib/{}/gconv", spec.arch.triplet())));
    Ok(())
}

/// Busybox with its [`APPLETS`], and the agent without its debug info.
fn install_binaries(spec: &Spec, busybox: &Path, root: &Path) -> Result<()> {
    std::fs::copy(busybox, root.join("bin/busybox"))?;
    for a in APPLETS {
        symlink("busybox", &root.join("bin").join(a))?;
    }
    let agent = root.join("usr/bin/cairn-agent");
    std::fs::copy(&spec.agent, &agent)
        .with_context(|| format!("copying the agent from {}", spec.agent.display()))?;
    run(Command::new(spec.arch.objcopy())
        .arg("--strip-debug")
        .arg(&agent))
}

/// `/sbin/init`, which runs `cairn-agent run` with [`agent_args`], and udhcpc's script.
fn write_init(spec: &Spec, scheme: BootScheme, root: &Path) -> Result<()> {
    write_file(
        &root.join("sbin/init"),
        include_str!("../files/rootfs-init.sh")
            .replace("@VERSION@", &spec.version)
            .replace("@AGENT_ARGS@", &agent_args(spec, scheme))
            .as_bytes(),
        0o755,
    )?;
    write_file(
        &root.join("usr/share/udhcpc/default.script"),
        include_str!("../files/udhcpc.sh").as_bytes(),
        0o755,
    )
}

/// The arguments of `cairn-agent run`, quoted for the shell: where the scheme's slot
/// payload goes, then `spec.agent_args`.
fn agent_args(spec: &Spec, scheme: BootScheme) -> String {
    let slot_payload = match scheme {
        BootScheme::Uefi => "--slot-payload uki=/boot/efi/cairn/a.efi,/boot/efi/cairn/b.efi",
        BootScheme::PiTryboot => {
            "--slot-payload boot=/dev/disk/by-partlabel/cairn-boot-a,/dev/disk/by-partlabel/cairn-boot-b"
        }
    };
    std::iter::once(slot_payload.to_string())
        .chain(spec.agent_args.iter().map(|a| shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ")
}

/// `/etc`: os-release, resolv.conf (a link to what udhcpc writes), passwd and group
/// with root alone, and the agent's configuration of this image.
fn write_etc(spec: &Spec, scheme: BootScheme, osrel: &Path, root: &Path) -> Result<()> {
    std::fs::copy(osrel, root.join("etc/os-release"))?;
    symlink("/run/resolv.conf", &root.join("etc/resolv.conf"))?;
    write_file(
        &root.join("etc/passwd"),
        b"root:x:0:0:root:/:/bin/false\n",
        0o644,
    )?;
    write_file(&root.join("etc/group"), b"root:x:0:\n", 0o644)?;
    // The agent stops with exit code 10 and init unmounts and reboots; for a Pi's
    // trial with 11, and init reboots with `cairn-agent reboot "0 tryboot"`.
    let boot = match scheme {
        BootScheme::Uefi => "sdboot:/boot/efi",
        BootScheme::PiTryboot => "tryboot:/boot/efi:2,3",
    };
    let reboot = "exit";
    let config = format!(
        "# Cairn OS {v}: how this image runs the agent. The first-boot configuration\n\
         # (hub, join token) is on the first FAT partition: /boot/efi/cairn/agent.toml.\n\
         data_dir = \"/var/lib/cairn\"\n\
         tpm = \"auto\"\n\
         boot = \"{boot}\"\n\
         slot_a = \"/dev/disk/by-partlabel/cairn-a\"\n\
         slot_b = \"/dev/disk/by-partlabel/cairn-b\"\n\
         board = \"{b}\"\n\
         os_version = \"{v}\"\n\
         reboot = \"{reboot}\"\n",
        v = spec.version,
        b = spec.board
    );
    write_file(&root.join("etc/cairn/agent.toml"), config.as_bytes(), 0o644)?;
    Ok(())
}

fn shell_quote(s: &str) -> String {
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// `spec.out/rootfs.squashfs`: `root` as a squashfs owned by root, every time stamp at
/// the epoch (the same inputs give the same bytes); it must fit a slot.
fn squash(spec: &Spec, root: &Path) -> Result<PathBuf> {
    let img = spec.out.join("rootfs.squashfs");
    let _ = std::fs::remove_file(&img);
    run(Command::new("mksquashfs")
        .arg(root)
        .arg(&img)
        .args([
            "-noappend",
            "-no-progress",
            "-quiet",
            "-all-root",
            "-comp",
            "zstd",
        ])
        .args(["-mkfs-time", "0", "-all-time", "0"]))?;
    let len = std::fs::metadata(&img)?.len();
    if len > spec.layout.slot_mib * MIB {
        bail!(
            "the root file system is {} MiB, the slots {} MiB: give --slot-mib more",
            len.div_ceil(MIB),
            spec.layout.slot_mib
        );
    }
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `/sbin/init` passes to `cairn-agent run`, as the shell will split it.
    #[test]
    fn agent_arguments_reach_the_agent_as_given() {
        let spec = Spec {
            arch: crate::Arch::X86_64,
            board: "nuc".into(),
            version: "1.0.0".into(),
            agent: "cairn-agent".into(),
            out: "out".into(),
            cache: "cache".into(),
            layout: crate::Layout::default(),
            fault: None,
            agent_args: ["--keep-alive", "2s", "--label", "site=it's here", "$HOME"]
                .map(String::from)
                .to_vec(),
            console: None,
            kernel_deb: None,
        };
        let line = agent_args(&spec, BootScheme::PiTryboot);
        assert!(
            line.starts_with("--slot-payload boot=/dev/disk/by-partlabel/cairn-boot-a,"),
            "{line}"
        );
        let out = Command::new("sh")
            .args(["-c", &format!("printf '%s\\n' {line}")])
            .output()
            .unwrap();
        let words: Vec<String> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .skip(2)
            .map(String::from)
            .collect();
        assert_eq!(words, spec.agent_args);
    }
}
