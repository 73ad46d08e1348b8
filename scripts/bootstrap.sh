#!/usr/bin/env bash
# Everything a fresh Debian 12 machine needs for tracer, its testbed and its tests.
# Idempotent: a second run does nothing that takes time. Run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg in bpftrace nlohmann-json3-dev libstb-dev binutils curl util-linux chromium cmake ninja-build git; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$pkg")
done
if ((${#need_apt[@]})); then
  echo "bootstrap: installing Debian packages: ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

# uprobes need tracefs; a fresh machine may not have it mounted.
if ! [ -e /sys/kernel/tracing/uprobe_events ]; then
  mount -t tracefs nodev /sys/kernel/tracing 2>/dev/null || echo "bootstrap: warning: could not mount tracefs" >&2
fi

python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore -e '.[dev]'
command -v go >/dev/null || { echo "bootstrap: Go >= 1.24 is required to build the testbed" >&2; exit 1; }
# The Node.js client the integration tests trace (the official `ollama` npm package, pinned by
# tests/targets/node/package-lock.json). Only the tests need it: skipped without npm.
if command -v npm >/dev/null; then
  npm ci --prefix tests/targets/node --no-audit --no-fund --loglevel=error >/dev/null
else
  echo "bootstrap: npm not found; the Node.js client tests will be skipped" >&2
fi
echo "bootstrap: ready ($(python3 -m ollama_tracer --version))"
