#!/usr/bin/env bash
# Builds cairn-agent for aarch64 (Raspberry Pi) with the `agent` profile, installing the
# cross toolchain first if needed. Prints only the binary's absolute path on stdout
# (what an image builder copies); everything else goes to stderr.
# Extra arguments go to `cargo build` (e.g. `--no-default-features` for no TPM support).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/aarch64-env.sh
exec 3>&1 1>&2

aarch64_install build
aarch64_env
"$AARCH64_CARGO" build --target "$AARCH64_TARGET" --locked --profile agent -p cairn-agent "$@"
bin=$PWD/$CARGO_TARGET_DIR/$AARCH64_TARGET/agent/cairn-agent
[ -x "$bin" ] || { echo "build-aarch64: $bin is missing after the build" >&2; exit 1; }
echo "$bin" >&3
