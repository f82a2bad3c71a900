#!/usr/bin/env bash
# Every test on a fresh Debian 12 machine: install dependencies, build (CUDA compiled where nvcc
# exists), run the whole CTest suite. CUDA tests skip visibly without a GPU. .ci/run calls this.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/launch/setup_debian.sh"
bash "$repo_root/launch/build.sh"
cd "$repo_root/build"
ctest --output-on-failure -j "${EPIC_TEST_JOBS:-2}" --timeout 600
