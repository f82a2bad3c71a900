#!/usr/bin/env bash
# The residency states over NCCL: `epic run --residency-state wake|focus|<one per prompt>` on the trained model
# (WAKE = 4 of its 8 experts per token, worker/routing_policy.h) under mpirun -np 2 with the NCCL executor, normal and
# low-latency modes, against one GPU: fp32, prompt logits within 1e-5 relative L2 and the same generated
# text; and WAKE must differ from FOCUS (the policy reached the routers).
#   bash tests/gpu/ep_wake_check.sh BUILD_DIR OUT_DIR      (from tests/gpu/run_gpu_tests.sh nccl, 2+ GPUs)
set -uo pipefail
build=$1 out=$2
mkdir -p "$out"
status=0
source tests/gpu/trained_model_dir.sh  # $model
head -c 3000 "$model/heldout.txt" | grep -v '^\s*$' | head -6 > "$out/prompts.txt"
common=(--model "$model" --allow-missing-experts --prompts-file "$out/prompts.txt" --max-new-tokens 12 --precision fp32)
# wake, focus, and a state per prompt (the ranks agree on 8 slots per row; a WAKE row's last 4 are padding).
per_prompt=$(awk '{ printf "%s%s", (NR > 1 ? "," : ""), (NR % 3 == 1 ? "focus" : "wake") }' "$out/prompts.txt")
for state in wake focus "$per_prompt"; do
  timeout 120 "$build/epic" run "${common[@]}" --residency-state "$state" --logits-out "$out/one_$state.npy" \
    > "$out/one_$state.txt" 2> "$out/one_$state.err" || { echo "ep-wake: one GPU $state failed"; status=1; continue; }
  for mode in normal low-latency; do
    if ! timeout 150 mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x LD_LIBRARY_PATH "$build/epic" run \
         "${common[@]}" --residency-state "$state" --ep-transport nccl --ep-mode "$mode" \
         --logits-out "$out/nccl_${state}_$mode.npy" > "$out/nccl_${state}_$mode.txt" 2> "$out/nccl_${state}_$mode.err"; then
      echo "ep-wake: $state $mode failed: $(grep -m2 -i error "$out/nccl_${state}_$mode.err")"; status=1; continue
    fi
    python3 tests/support/npy_relative_l2.py "$out/one_$state.npy" "$out/nccl_${state}_$mode.npy" 1e-5 \
      "ep-wake: $state over NCCL ($mode) against one GPU, prompt logits" || status=1
    if cmp -s "$out/one_$state.txt" "$out/nccl_${state}_$mode.txt"; then
      echo "ep-wake: $state over NCCL ($mode): the same generated text"
    else
      echo "ep-wake: $state over NCCL ($mode): generated text DIFFERENT"; status=1
    fi
  done
done
# WAKE must differ from FOCUS: the policy reached the routers (the bound inverted: a relative L2 below 1e-3
# would mean the two runs are the same).
if python3 tests/support/npy_relative_l2.py "$out/one_focus.npy" "$out/one_wake.npy" 1e-3 "ep-wake: wake against focus" \
     > "$out/wake_vs_focus.txt"; then
  echo "ep-wake: wake gave focus's logits: the policy did not reach the routers"; status=1
else
  echo "$(cat "$out/wake_vs_focus.txt") -- differ, as they must"
fi
exit $status
