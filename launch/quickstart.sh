#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install dependencies, build, make a tiny random
# Qwen3-MoE checkpoint (with the real Qwen3 tokenizer) and generate from a prompt with `epic run`.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/launch/setup_debian.sh"
bash "$repo_root/launch/build.sh"
model_dir="$repo_root/build/models/tiny"
if [[ ! -f "$model_dir/config.json" ]]; then
  "$repo_root/build/epic" make-model --preset tiny --seed 1 --out "$model_dir"
fi
echo "quickstart: epic run --model $model_dir --prompt 'Mixture-of-Experts models route each token to'"
"$repo_root/build/epic" run --model "$model_dir" --prompt "Mixture-of-Experts models route each token to" \
  --max-new-tokens 24 --logits-out "$repo_root/build/quickstart_logits.npy"
