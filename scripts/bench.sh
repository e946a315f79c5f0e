#!/usr/bin/env bash
# Runs the benchmark harness and writes its tables into BENCHMARKS.md.
# Installs the peers it compares against (Debian's mender-client, rauc with its service
# and squashfs-tools for its bundles, casync) and e2fsprogs (the upgrade image) if it can.
# Extra arguments go to the harness, e.g. `--sections core` or `--fleet-sizes 1000`.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh build
# The peers: all-or-nothing through the one package list; without them the harness
# still runs and its peer tables say what was missing.
scripts/setup.sh bench ||
  echo "bench: the peers could not be installed (see above): their figures stay empty" >&2
echo "== build"
cargo build --release --locked -p cairn-examples -p cairn-agent
cargo build --locked --profile agent -p cairn-agent
# 10,000 agents need file descriptors: the pools stay below this per process.
ulimit -n 20000 2>/dev/null || true
echo "== bench"
./target/release/bench --write BENCHMARKS.md "$@"
