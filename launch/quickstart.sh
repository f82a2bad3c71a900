#!/usr/bin/env bash
# The main job on a fresh Debian 12 machine: install dependencies, build, make a tiny random
# Qwen3-MoE checkpoint (with the real Qwen3 tokenizer), and run it as a 2-worker expert-parallel
# cluster under mpirun: each rank reads only its experts, token rows cross ranks by all-to-all.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$repo_root/launch/setup_debian.sh"
bash "$repo_root/launch/build.sh"
model_dir="$repo_root/build/models/tiny"
if [[ ! -f "$model_dir/config.json" ]]; then
  "$repo_root/build/epic" make-model --preset tiny --seed 1 --out "$model_dir"
fi
prompts="$repo_root/build/quickstart_prompts.txt"
printf '%s\n' "Mixture-of-Experts models route each token to" "The capital of France is" \
  "def fibonacci(n):" "你好，世界" >"$prompts"
# Shared-memory transport without cross-memory attach: works in containers and as root.
export OMPI_MCA_btl="${OMPI_MCA_btl:-self,vader}" OMPI_MCA_pml="${OMPI_MCA_pml:-ob1}"
export OMPI_MCA_btl_vader_single_copy_mechanism="${OMPI_MCA_btl_vader_single_copy_mechanism:-none}"
echo "quickstart: launch/epic_mpirun.sh -n 2 run --model $model_dir --prompts-file $prompts --max-new-tokens 16"
"$repo_root/launch/epic_mpirun.sh" -n 2 run --model "$model_dir" --prompts-file "$prompts" --max-new-tokens 16 \
  --report-out "$repo_root/build/quickstart_report.json"
