#!/usr/bin/env bash
# Runs moera's tests on a fresh machine: installs the software Vulkan driver for the wgpu
# tests and redis-server for the Redis cache tests when missing (Debian/Ubuntu, as root),
# fetches the real models into the model cache, then runs the whole test suite on flex and
# wgpu, with the Redis result cache.
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

# Mesa wants a writable runtime dir; autotune only slows lavapipe down.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-$(mktemp -d)}"
export CUBECL_AUTOTUNE_LEVEL="${CUBECL_AUTOTUNE_LEVEL:-0}"
cargo test --workspace --features wgpu,redis "$@"
