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
# Boot-control backends are cross-checked with the tools that own the formats: GPT
# (sgdisk), FAT (mtools), U-Boot environments (fw_printenv), UEFI variables (efibootmgr).
command -v sgdisk >/dev/null || need_apt+=(gdisk)
command -v mcopy >/dev/null || need_apt+=(mtools)
command -v fw_printenv >/dev/null || need_apt+=(libubootenv-tool)
command -v efibootmgr >/dev/null || need_apt+=(efibootmgr)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
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
  cargo nextest run --workspace --locked --no-fail-fast "${features[@]}"
else
  cargo test --workspace --locked --no-fail-fast "${features[@]}"
fi
# The crates that run on the box again, built for aarch64 (Raspberry Pi) and run under
# qemu-user; Debian's toolchain, its own target directory (target/aarch64).
echo "== aarch64 tests (qemu-user)"
./scripts/test-aarch64.sh
