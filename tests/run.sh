#!/usr/bin/env bash
# The test command (README): installs what the tests need, builds every binary
# the suites spawn, then runs all unit and real-kernel integration tests. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
cargo build --workspace --bins
# The SPIFFE Workload API server of tests/workload_api.rs, on go-spiffe.
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
if command -v go >/dev/null; then
  go -C tests/go/workload-api build -o "$target/debug/spiffe-workload-api-fake" .
else
  echo "go not found: tests/workload_api.rs cannot run (it fails under CI=true)" >&2
fi
cargo test --workspace "$@"
