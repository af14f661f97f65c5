#!/usr/bin/env bash
# Runs moera's tests on a fresh machine: installs the software Vulkan driver for the wgpu
# tests and redis-server for the Redis cache tests when missing (Debian/Ubuntu, as root),
# fetches the real models into the model cache, installs the server's client checks (openai,
# chromium, playwright-core), then runs the whole test suite on flex and wgpu, with the Redis
# result cache and the server.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! ls /usr/share/vulkan/icd.d/lvp_icd*.json >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq mesa-vulkan-drivers libvulkan1 >/dev/null
  else
    echo "note: no lavapipe Vulkan driver found; install mesa-vulkan-drivers for the wgpu tests" >&2
  fi
fi
if ! command -v redis-server >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq redis-server >/dev/null
  else
    echo "note: no redis-server found; install redis-server for the Redis result cache tests" >&2
  fi
fi
scripts/fetch-models.sh >&2

# The server's client checks: the official openai Python client, and the web page in Debian's
# chromium driven by playwright-core (server/tests/). Each test skips with a note without them.
python=$(command -v python3 || command -v python || true)
if [ -n "$python" ] && ! "$python" -c "import openai" 2>/dev/null; then
  "$python" -m pip install --quiet openai >&2 || echo "note: could not install openai" >&2
fi
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq chromium >/dev/null || echo "note: could not install chromium" >&2
fi
if [ ! -d server/tests/web/node_modules/playwright-core ] && command -v npm >/dev/null; then
  npm ci --prefix server/tests/web --no-audit --no-fund >&2 || echo "note: npm ci failed" >&2
fi

# Mesa wants a writable runtime dir; autotune only slows lavapipe down.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-0}"
cargo test --workspace --features wgpu,redis,server "$@"
