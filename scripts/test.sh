#!/usr/bin/env bash
# Runs every check and test of the workspace, installing what it needs first.
# This is the README's test command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v cc >/dev/null || need_apt+=(build-essential)
command -v pkg-config >/dev/null || need_apt+=(pkg-config)
# The agent's TPM backend links tpm2-tss; its tests run a real TPM emulator (swtpm) and
# cross-check quotes with tpm2-tools.
pkg-config --exists tss2-esys 2>/dev/null || need_apt+=(libtss2-dev)
command -v swtpm >/dev/null || need_apt+=(swtpm swtpm-tools)
command -v tpm2_checkquote >/dev/null || need_apt+=(tpm2-tools)
# Boot-control backends and `cairn-hub image` are cross-checked with the tools that own
# the formats: GPT (sgdisk), FAT (mtools, fsck.fat), U-Boot environments (fw_printenv),
# UEFI variables (efibootmgr).
command -v sgdisk >/dev/null || need_apt+=(gdisk)
command -v mcopy >/dev/null || need_apt+=(mtools)
command -v fsck.fat >/dev/null || need_apt+=(dosfstools)
command -v fw_printenv >/dev/null || need_apt+=(libubootenv-tool)
command -v efibootmgr >/dev/null || need_apt+=(efibootmgr)
# The hardware tests build Cairn OS images (squashfs, ext4, cpio, objcopy; Debian
# packages are downloaded with apt-get, not installed) and boot them under QEMU with
# OVMF and swtpm; the Raspberry Pi image's firmware comes from Debian's
# non-free-firmware component, fetched through a source list of the builder's own.
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
[ -e /usr/share/OVMF/OVMF_CODE_4M.fd ] || need_apt+=(ovmf)
command -v qemu-system-aarch64 >/dev/null || need_apt+=(qemu-system-arm)
[ -e /usr/share/AAVMF/AAVMF_CODE.fd ] || need_apt+=(qemu-efi-aarch64)
command -v mksquashfs >/dev/null || need_apt+=(squashfs-tools)
command -v mke2fs >/dev/null || need_apt+=(e2fsprogs)
command -v cpio >/dev/null || need_apt+=(cpio)
command -v zstd >/dev/null || need_apt+=(zstd)
command -v objcopy >/dev/null || need_apt+=(binutils)
# The virtual Pi: its firmware model adds /chosen/bootloader to the device tree.
command -v fdtput >/dev/null || need_apt+=(device-tree-compiler)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
elif ! apt-cache show linux-image-amd64 >/dev/null 2>&1; then
  # The image builder downloads Debian packages: it needs the package lists.
  apt-get update -qq
fi
# The C library logs to stderr unless told not to.
export TSS2_LOG=all+NONE
# Features beyond the defaults that the tests cover (the fleet simulation and the hub
# build without them).
features=(--features cairn-tpm/testkit)
command -v cargo >/dev/null || { echo "cargo not found: install Rust (rustup) first" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt || true

echo "== format"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings
echo "== build binaries (the end-to-end tests run them as processes)"
cargo build --workspace --bins --locked
echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "${features[@]}" -E 'not binary(virtual_rig)'
else
  cargo test --workspace --locked --no-fail-fast "${features[@]}" --exclude cairn-hwtests
  cargo test -p cairn-hwtests --locked --no-fail-fast --lib --bins --test rig
fi
# The crates that run on the box again, built for aarch64 (Raspberry Pi) and run under
# qemu-user; Debian's toolchain, its own target directory (target/aarch64). It also
# cross-builds the agent the aarch64 image of the virtual rig carries.
echo "== aarch64 tests (qemu-user)"
./scripts/test-aarch64.sh
# Alone, so that the boots under TCG do not compete with the other tests for the cores.
echo "== hardware tests: virtual rig (QEMU + OVMF/AAVMF + swtpm)"
cargo test -p cairn-hwtests --locked --test virtual_rig -- --nocapture
