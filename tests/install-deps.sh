#!/usr/bin/env bash
# Installs the Debian packages the build, the tests and the demo need, if missing.
# Idempotent; needs root. Used by tests/run.sh, examples/local-demo.sh and .ci/run.
set -euo pipefail
pkgs=(iproute2 iptables nftables libnftnl-dev libmnl-dev pkg-config haproxy procps iputils-ping)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
