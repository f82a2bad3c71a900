#!/usr/bin/env bash
# Expert parallelism across GPUs against one GPU (issue 8): every golden fixture is run by `epic run`
# on one GPU and under `mpirun -np N` with the NCCL executor (--ep-transport nccl, one GPU per rank),
# in fp32 and bf16. The greedy tokens must be identical and the logits within a stated relative L2 of
# the one-GPU run: fp32 1e-5 (only the order of fp32 sums differs: a token's partial sums are added
# rank by rank), bf16 1e-2 (the same, but a sum order difference can flip a bf16 rounding that later
# layers carry). Each mpirun run is made twice: --ep-mode normal (counts read on the host each layer) and
# --ep-mode low-latency (fixed-size blocks for every step, prefill included: the 19 prompt tokens fit the
# default bound of 256 rows per rank; decode steps captured in CUDA graphs on every rank), same checks;
# and a third time as normal --ep-overlap (two micro-batches per MoE layer, exchanges on their own stream).
# Usage: tests/gpu/ep_golden_check.sh BUILD_DIR RANKS OUT_DIR; exit 1 on any mismatch. EP_GOLDEN_VARIANTS
# picks some of the three (default all).
set -uo pipefail
build=$1 ranks=$2 out=$3
mkdir -p "$out"
fixtures=tests/golden/fixtures
prompts=tests/golden/prompts_ids.txt
status=0
for fixture in qwen3_moe_f32 qwen3_moe_bf16 qwen3_moe_hub_config_bf16 qwen3_omni_thinker_f16 pruned_router missing_experts; do
  extra=""
  [ "$fixture" = missing_experts ] && extra="--allow-missing-experts"
  for precision in fp32 bf16; do
    one="${fixture}_${precision}"
    args=(run --model "$fixtures/$fixture" --prompt-ids-file "$prompts" --max-new-tokens 6 --backend cuda
          --precision "$precision" $extra)
    timeout 120 "$build/epic" "${args[@]}" --logits-out "$out/${one}_one.npy" > "$out/${one}_one.txt" \
      2> "$out/${one}_one.err" || { echo "ep-golden $one: one-GPU run failed"; status=1; continue; }
    for variant in ${EP_GOLDEN_VARIANTS:-normal low-latency overlap}; do
      mode=$variant overlap=()
      [ "$variant" = overlap ] && mode=normal overlap=(--ep-overlap)
      tag="${fixture}_${precision}_np${ranks}_${variant}"
      cp "$out/${one}_one.npy" "$out/${tag}_one.npy"
      cp "$out/${one}_one.txt" "$out/${tag}_one.txt"
      timeout 180 mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE=0 -x LD_LIBRARY_PATH \
        "$build/epic" "${args[@]}" --ep-transport nccl --ep-mode "$mode" "${overlap[@]}" --logits-out "$out/${tag}_many.npy" \
        > "$out/${tag}_many.txt" 2> "$out/${tag}_many.err" ||
        { echo "ep-golden $tag: mpirun -np $ranks failed: $(grep -m2 -i error "$out/${tag}_many.err")"; status=1; continue; }
      if ! cmp -s "$out/${tag}_one.txt" "$out/${tag}_many.txt"; then
        echo "ep-golden $tag: greedy tokens differ"; diff "$out/${tag}_one.txt" "$out/${tag}_many.txt" | head -6
        status=1
      fi
      bound=1e-5
      [ "$precision" = bf16 ] && bound=1e-2
      python3 - "$out/${tag}_one.npy" "$out/${tag}_many.npy" "$bound" "$tag" <<'PY' || status=1
import sys
import numpy as np
one, many = np.load(sys.argv[1]).astype(np.float64), np.load(sys.argv[2]).astype(np.float64)
bound, tag = float(sys.argv[3]), sys.argv[4]
if one.shape != many.shape:
    print(f"ep-golden {tag}: logits shapes differ {one.shape} vs {many.shape}"); sys.exit(1)
rel = np.linalg.norm(many - one) / max(np.linalg.norm(one), 1e-30)
bitwise = np.array_equal(one, many)
print(f"ep-golden {tag}: relative L2 {rel:.3e} (bound {bound:g}){' bitwise equal' if bitwise else ''}, "
      f"tokens {'same' if True else ''}")
sys.exit(0 if rel <= bound else 1)
PY
    done
  done
done
exit $status
