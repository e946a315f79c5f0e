//! `cairn-image`: builds flashable Cairn OS disk images and the slot contents of the
//! matching A/B release, from Debian packages and our own binaries, without root.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use cairn_image::{Arch, Fault, Layout, Spec};
use clap::{Parser, Subcommand};

const AFTER_HELP: &str = "\
Exit codes: 0 built, 1 the build failed (the error says which step), 2 bad usage.

Example (a NUC image of version 1.0.0, then its release):
  cargo build --profile agent -p cairn-agent          # target/agent/cairn-agent
  cairn-image build --arch x86_64 --board nuc --version 1.0.0 \\
    --agent target/agent/cairn-agent --out out/1.0.0
  cairn-hub image configure out/1.0.0/cairn-nuc-1.0.0.img --hub hub.example.net:7440 --token cairn1_...
  cairn-hub release build out/1.0.0/rootfs.squashfs --version 1.0.0 --arch x86_64 --board nuc \\
    --payload uki=out/1.0.0/cairn.efi --key release.pem --out os-1.0.0.cairn

A Raspberry Pi 4 image (the firmware's tryboot A/B layout; its release carries the
slot's boot partition instead of a UKI):
  ./scripts/build-aarch64.sh                          # the aarch64 agent; prints its path
  cairn-image build --arch aarch64 --board rpi4 --version 1.0.0 \\
    --agent target/aarch64/aarch64-unknown-linux-gnu/agent/cairn-agent --out out/rpi4-1.0.0
  cairn-hub release build out/rpi4-1.0.0/rootfs.squashfs --version 1.0.0 --arch aarch64 \\
    --board rpi4 --payload boot=out/rpi4-1.0.0/boot.vfat --key release.pem --out os.cairn

From the workspace, run it as `cargo run -p cairn-image -- build ...`.

Needs: apt-get (packages are downloaded, not installed), dpkg-deb, sgdisk, mtools,
mksquashfs, mke2fs, cpio, zstd, objcopy (`scripts/setup.sh images`; for aarch64
aarch64-linux-gnu-objcopy, `scripts/setup.sh aarch64`). Logs: RUST_LOG=debug.";

/// Builds flashable Cairn OS disk images, and the slot contents of the matching A/B
/// release, from Debian packages and a cairn-agent binary, without root.
#[derive(Parser)]
#[command(name = "cairn-image", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build a disk image (GPT: ESP or Pi boot partitions, slot A, slot B, data) and
    /// its slot contents.
    Build(Build),
}

#[derive(clap::Args)]
struct Build {
    /// x86_64 (NUC, UEFI + systemd-boot) or aarch64 (UEFI, or a Pi with --board rpi4).
    #[arg(long, default_value = "x86_64")]
    arch: Arch,
    /// Board family releases for this image must name: rpi4 builds the Raspberry Pi 4
    /// layout (firmware, autoboot.txt and tryboot); any other (nuc, virt, …) the UEFI one.
    #[arg(long, default_value = "nuc")]
    board: String,
    /// OS version (semver).
    #[arg(long)]
    version: String,
    /// The cairn-agent binary built for --arch.
    #[arg(long)]
    agent: PathBuf,
    /// Output directory: cairn-BOARD-VERSION.img, rootfs.squashfs, cairn.efi (UEFI) or
    /// boot.vfat (Pi), image.json.
    #[arg(long)]
    out: PathBuf,
    /// Where downloaded Debian packages are kept.
    #[arg(long, default_value = "target/cairn-image-cache")]
    cache: PathBuf,
    /// ESP size (the Pi's partition 1, holding autoboot.txt).
    #[arg(long, default_value_t = Layout::default().esp_mib)]
    esp_mib: u64,
    /// Size of each slot.
    #[arg(long, default_value_t = Layout::default().slot_mib)]
    slot_mib: u64,
    /// Data partition size.
    #[arg(long, default_value_t = Layout::default().data_mib)]
    data_mib: u64,
    /// Size of each slot's boot partition (Pi only: firmware, kernel, initramfs).
    #[arg(long, default_value_t = Layout::default().boot_mib)]
    boot_mib: u64,
    /// Kernel console arguments [default: console=tty0 console=ttyS0,115200; on a Pi
    /// the GPIO 14/15 UART: console=ttyS1,115200 with Debian's kernel, ttyS0 with the
    /// Raspberry Pi kernel].
    #[arg(long)]
    console: Option<String>,
    /// Extra argument for `cairn-agent run` in the image; repeat.
    #[arg(long = "agent-arg", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// The kernel as a .deb in Debian's layout instead of Debian's own kernel: on a
    /// Pi, the Raspberry Pi kernel (linux-image-*-rpi-v8 from archive.raspberrypi.com),
    /// whose firmware driver passes the tryboot flag; Debian's kernel does not.
    #[arg(long)]
    kernel_deb: Option<PathBuf>,
    /// Build a deliberately broken image (for rollback tests): init-panic.
    #[arg(long)]
    fault: Option<Fault>,
    /// Print what was built as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let Cmd::Build(b) = Cli::parse().cmd;
    let spec = Spec {
        arch: b.arch,
        board: b.board,
        version: b.version,
        agent: b.agent,
        out: b.out,
        cache: b.cache,
        layout: Layout {
            esp_mib: b.esp_mib,
            slot_mib: b.slot_mib,
            data_mib: b.data_mib,
            boot_mib: b.boot_mib,
        },
        fault: b.fault,
        kernel_deb: b.kernel_deb,
        agent_args: b.agent_args,
        console: b.console,
    };
    match cairn_image::build(&spec) {
        Ok(built) if b.json => match serde_json::to_string_pretty(&built) {
            Ok(t) => {
                println!("{t}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(1)
            }
        },
        Ok(built) => {
            println!("disk:    {}", built.disk.display());
            println!("rootfs:  {}", built.rootfs.display());
            for p in &built.extra {
                println!("{:<8} {}", format!("{}:", p.name), p.path.display());
            }
            if let Some(d) = &built.uki_authenticode {
                println!("uki authenticode sha256: {d}");
            }
            println!("kernel:  {}", built.kernel);
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}
