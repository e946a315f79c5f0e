#!/usr/bin/env bash
# Runs the benchmark harness and writes its tables into BENCHMARKS.md.
# Installs the peers it compares against (Debian's mender-client, rauc with its service
# and squashfs-tools for its bundles, casync) and e2fsprogs (the upgrade image) if it can.
# Extra arguments go to the harness, e.g. `--sections core` or `--fleet-sizes 1000`.
set -euo pipefail
cd "$(dirname "$0")/.."

apt_updated=

if ! command -v mender >/dev/null; then
  echo "== installing mender-client (the peer measured side by side)"
  { apt-get update -qq && apt_updated=1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mender-client; } \
    || echo "mender-client could not be installed: the peer figures stay empty"
fi
need_pkg() { # need_pkg COMMAND-OR-FILE PACKAGE...: install PACKAGE... if the first is missing
  local what=$1; shift
  if command -v "$what" >/dev/null || [ -e "$what" ]; then return 0; fi
  echo "== installing $* (upgrade section)"
  if [ -z "$apt_updated" ]; then apt-get update -qq || true; apt_updated=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" \
    || echo "$* could not be installed: the bench says so in its upgrade table"
}
need_pkg rauc rauc
need_pkg /usr/share/dbus-1/system.d/de.pengutronix.rauc.conf rauc-service
need_pkg mksquashfs squashfs-tools
need_pkg casync casync
need_pkg mke2fs e2fsprogs
echo "== build"
cargo build --release --locked -p cairn-examples -p cairn-agent
cargo build --locked --profile agent -p cairn-agent
# 10,000 agents need file descriptors: the pools stay below this per process.
ulimit -n 20000 2>/dev/null || true
echo "== bench"
./target/release/bench --write BENCHMARKS.md "$@"
