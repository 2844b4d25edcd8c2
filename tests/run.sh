#!/usr/bin/env bash
# The test command (README): installs what the tests need, builds every binary
# the suites spawn, then runs all unit and real-kernel integration tests. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
cargo build --workspace --bins
cargo test --workspace "$@"
