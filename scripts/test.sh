#!/usr/bin/env bash
# Runs every check and test of the workspace, installing what it needs first.
# This is the README's test command and what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo >/dev/null || {
  echo "test.sh: cargo not found: install Rust with rustup first (https://rustup.rs)" >&2
  exit 1
}
# Every Debian package the stages below need (the one list is in scripts/setup.sh):
# the C toolchain and tpm2-tss, swtpm and tpm2-tools, the boot-format tools, QEMU with
# UEFI firmware for the virtual rig, and the aarch64 cross toolchain with qemu-user.
./scripts/setup.sh all || {
  echo "test.sh: scripts/setup.sh could not install what the tests need (see above)" >&2
  exit 1
}
# The C library logs to stderr unless told not to.
export TSS2_LOG=all+NONE
# Features beyond the defaults that the tests cover (the fleet simulation and the hub
# build without them).
features=(--features cairn-tpm-device/testkit)

echo "== format"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets --locked "${features[@]}" -- -D warnings
echo "== build binaries (the end-to-end tests run them as processes)"
cargo build --workspace --bins --locked
echo "== the hub, the simulator and the image builder neither compile nor link tpm2-tss"
# Only cairn-tpm-device links it (ARCHITECTURE.md, invariants); a dependency that pulls
# it back under the hub, the simulator or the image builder (which copies the agent's
# tpm2-tss libraries into images as files) fails here, as does a hub binary from this
# workspace build (all features unified) that carries any of it.
for pkg in cairn-hub cairn-examples cairn-image; do
  if cargo tree --locked -e normal -p "$pkg" --prefix none | grep -Eq '^(tss-esapi|cairn-tpm-device) '; then
    echo "test.sh: $pkg depends on tss-esapi (cargo tree -e normal -p $pkg -i tss-esapi)" >&2
    exit 1
  fi
done
if ldd target/debug/cairn-hub | grep -q libtss2 || grep -qa 'tss-esapi\|tss_esapi' target/debug/cairn-hub; then
  echo "test.sh: target/debug/cairn-hub links tpm2-tss or carries tss-esapi code" >&2
  exit 1
fi
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
