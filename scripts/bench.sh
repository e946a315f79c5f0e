#!/usr/bin/env bash
# Runs the benchmark harness and writes its tables into BENCHMARKS.md.
# Installs the peer it compares against (Debian's mender-client) if it can.
# Extra arguments go to the harness, e.g. `--sections core` or `--fleet-sizes 1000`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v mender >/dev/null; then
  echo "== installing mender-client (the peer measured side by side)"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mender-client; } \
    || echo "mender-client could not be installed: the peer figures stay empty"
fi
echo "== build"
cargo build --release --locked -p cairn-examples -p cairn-agent
cargo build --locked --profile agent -p cairn-agent
# 10,000 agents need file descriptors: the pools stay below this per process.
ulimit -n 20000 2>/dev/null || true
echo "== bench"
./target/release/bench --write BENCHMARKS.md "$@"
