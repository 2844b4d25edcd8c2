#!/usr/bin/env bash
# The test command (README): installs what the tests need, builds every binary
# the suites spawn, then runs all unit and real-kernel integration tests. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tests/install-deps.sh
cargo build --workspace --bins
# Go programs the suites run: the SPIFFE Workload API server of
# tests/workload_api.rs (go-spiffe) and NSM's control plane of
# tests/nsm_interop.rs (NSM's sdk), the manifests' renderer of
# tests/deploy_manifests.rs (kustomize's library); Go's module and build caches make
# later builds fast.
target="${CARGO_TARGET_DIR:-target}"
case "$target" in /*) ;; *) target="$PWD/$target" ;; esac
if command -v go >/dev/null; then
  go -C tests/go/workload-api build -o "$target/debug/spiffe-workload-api-fake" .
  go -C tests/go/nsm-domain build -o "$target/debug/nsm-domain" .
  go -C tests/go/kustomize-render build -o "$target/debug/kustomize-render" .
else
  echo "go not found: tests/workload_api.rs, tests/nsm_interop.rs and tests/deploy_manifests.rs cannot run (they fail under CI=true)" >&2
fi
cargo test --workspace "$@"
