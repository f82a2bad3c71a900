#!/usr/bin/env bash
# Configures and builds epic into build/ (Release-with-debug-info, Ninja). CUDA code is compiled
# when nvcc is found (/usr/local/cuda/bin/nvcc or on PATH), even on a machine without a GPU.
# Extra arguments go to cmake's configure step, e.g. -DEPIC_ENABLE_CUDA=OFF.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${EPIC_BUILD_DIR:-$repo_root/build}"
jobs="${EPIC_BUILD_JOBS:-$(nproc)}"
mkdir -p "$build_dir"
cmake -S "$repo_root" -B "$build_dir" -G Ninja "$@" >"$build_dir/configure.log" 2>&1 || {
  cat "$build_dir/configure.log"; echo "build: cmake configure failed (log above)"; exit 1; }
grep -E "^-- epic:" "$build_dir/configure.log" || true
cmake --build "$build_dir" -j "$jobs"
