#!/usr/bin/env bash
# Builds the tests of the crates that run on the box (cairn-agent, cairn-boot,
# cairn-disk, cairn-sync-protocol, cairn-tpm, cairn-tpm-device) for aarch64 and runs
# them under qemu-user, installing what it needs first.
# A stage of ./scripts/test.sh; extra arguments go to `cargo test` (e.g. `-- NAME`).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/aarch64-env.sh

aarch64_install test
aarch64_env
# The test binaries run under qemu-user. The arm64 loader and libraries (libc6:arm64,
# tpm2-tss) come from Debian's multiarch packages in /lib and /usr/lib/aarch64-linux-gnu,
# where the binaries look for them, so qemu needs no -L prefix.
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER=qemu-aarch64-static
# The C library logs to stderr unless told not to.
export TSS2_LOG=all+NONE

# The qemu-test profile (Cargo.toml): a debug build, no debug info, dependencies
# unoptimised except the arithmetic the tests spend their emulated time in.
# A hung test under emulation must not hold CI until its limit: the build and the run
# take about 6 minutes cold here, so 30 is a bound, not a budget.
timeout --kill-after=30s 30m \
  "$AARCH64_CARGO" test --target "$AARCH64_TARGET" --profile qemu-test --locked --no-fail-fast \
  -p cairn-agent -p cairn-boot -p cairn-disk -p cairn-sync-protocol -p cairn-tpm -p cairn-tpm-device \
  --features cairn-tpm-device/testkit "$@"
