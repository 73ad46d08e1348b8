#!/usr/bin/env bash
# Everything a fresh Debian 12 machine needs for tracer, its testbed and its tests.
# Idempotent: a second run does nothing that takes time. Run as root (or with sudo).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# systemd-journal-remote, socat: the testbed's system-service layout (a journal) and a forwarder for the tests.
for pkg in bpftrace nlohmann-json3-dev libstb-dev binutils curl util-linux chromium cmake ninja-build git \
           systemd systemd-journal-remote socat passwd; do
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
# llama-cpp-python, one of `tracer bench interrupt`'s engines. Its sdist is the one whose vendored
# llama.cpp the v0.34 testbed builds (tracer/testbed/llama_server_build.py), so it is downloaded
# once into that cache, and installed WITHOUT compiling llama.cpp (-DLLAMA_BUILD=OFF): at run time
# it loads the testbed's build of the same sources (LLAMA_CPP_LIB_PATH; tracer sets it).
lcp_version=0.3.36
if ! python3 -c "import importlib.metadata as m, sys; sys.exit(m.version('llama_cpp_python') != '$lcp_version')" 2>/dev/null; then
  downloads="${TRACER_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/ollama-tracer}/downloads"
  sdist="$downloads/llama_cpp_python-$lcp_version.tar.gz"
  mkdir -p "$downloads"
  [ -s "$sdist" ] || python3 -m pip download --quiet --disable-pip-version-check --no-deps --no-binary :all: \
      "llama-cpp-python==$lcp_version" -d "$downloads"
  echo "bootstrap: installing llama-cpp-python $lcp_version (no llama.cpp build: it loads the testbed's)"
  CMAKE_ARGS="-DLLAMA_BUILD=OFF" python3 -m pip install --quiet --disable-pip-version-check \
      --root-user-action=ignore "$sdist"
fi
# The Node.js client the integration tests trace (the official `ollama` npm package, pinned by
# tests/targets/node/package-lock.json). Only the tests need it: skipped without npm.
if command -v npm >/dev/null; then
  npm ci --prefix tests/targets/node --no-audit --no-fund --loglevel=error >/dev/null
else
  echo "bootstrap: npm not found; the Node.js client tests will be skipped" >&2
fi
echo "bootstrap: ready ($(python3 -m ollama_tracer --version))"
