//! The Cairn OS image builder: flashable disk images for the boxes Cairn manages — NUCs
//! and other UEFI machines (x86_64, aarch64; systemd-boot with boot counting) and the
//! Raspberry Pi 4 (aarch64; the firmware's tryboot) — and, from the same build, the
//! slot contents an A/B release is made of ([`build()`], [`Built`]).
//!
//! An image is a GPT disk: the boot partition(s) of its [`BootScheme`], slot A (a
//! squashfs root), slot B (empty) and an ext4 data partition. It is made of Debian
//! packages (the kernel, busybox, systemd-boot or the Pi firmware, the agent's shared
//! libraries) and our `cairn-agent`. The `cairn-image` binary is its command line;
//! the hardware tests (`cairn-hwtests`) build the images they boot with the same
//! [`build()`].
//!
//! Invariants:
//! - What is flashed and what is upgraded are the same bytes: the disk's slot A holds
//!   exactly the payloads written next to it ([`Built::payloads`]).
//! - Reproducible payloads: the same inputs give the same root, UKI and Pi boot
//!   partition, byte for byte (time stamps, the PE header and the FAT serial numbers
//!   fixed), so a release's PCR 4 can be predicted.
//! - No root and no mounts: every file system is made by its tool (mksquashfs, mke2fs,
//!   mtools, cpio) from a directory; packages are downloaded and unpacked, never
//!   installed.
//! - The images run no login, no getty and no SSH: a box is managed through its hub.
//! - This crate does not link tpm2-tss: the agent's TPM libraries are files it copies
//!   into the image.
#![forbid(unsafe_code)]

mod arch;
mod build;
mod debs;
mod fat;
mod gpt;
mod initramfs;
mod kernel;
mod kmod;
mod pi;
mod rootfs;
mod spec;
pub mod tools;
mod uefi;
mod uki;

pub use arch::Arch;
pub use build::build;
pub use kernel::{default_console, downstream_pi_kernel};
pub use spec::{BootScheme, Built, Fault, Layout, Payload, Spec};

const MIB: u64 = 1 << 20;
