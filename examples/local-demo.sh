#!/usr/bin/env bash
# The local demo (README): installs what it needs, builds, then runs it.
# Run as root on a Debian machine with Rust. Options go to local-demo
# (e.g. --proxy builtin); see examples/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
if [ ! -x "${CARGO_TARGET_DIR:-target}/release/local-demo" ]; then
  echo "local-demo: building the workspace in release mode first (a first build takes about 11 minutes on 2 cores)" >&2
fi
cargo build --release --workspace --bins
exec "${CARGO_TARGET_DIR:-target}/release/local-demo" "$@"
