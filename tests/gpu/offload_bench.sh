#!/usr/bin/env bash
# Decode with only a budget of experts resident on the GPU (the rest in pinned host memory), against every
# expert resident, in the same process (bench-decode --expert-budget): the trained model with prompts from
# its held-out text (its own routing statistics), then the Qwen3-30B-A3B shape (random bf16 weights in
# memory, a few of its layers; random routing is the worst case for a cache).
#   bash tests/gpu/offload_bench.sh BUILD_DIR OUT_DIR      (from tests/gpu/run_gpu_tests.sh offload)
# Knobs: OFFLOAD_LAYERS (default 4) of the 30B shape, OFFLOAD_BUDGETS (default 50%,25%).
set -uo pipefail
build=$1 out=$2
status=0
source tests/gpu/trained_model_dir.sh  # $model
budgets=${OFFLOAD_BUDGETS:-50%,25%}
run() {  # name, then bench-decode flags
  local name=$1; shift
  if ! timeout 240 "$build/epic" bench-decode --backend cuda --json "$out/offload_$name.json" "$@" \
       > "$out/offload_$name.log" 2>&1; then
    echo "offload $name failed: $(grep -m3 -i error "$out/offload_$name.log")"; status=1
  fi
}
for eviction in lru usefulness; do
  run "trained_$eviction" --model "$model" --allow-missing-experts --prompts-from "$model/heldout.txt" \
    --batch 1,8 --prompt-tokens 64 --new-tokens 64 --expert-budget "$budgets" --eviction "$eviction"
done
run "q30b_lru" --random-weights qwen3-30b-a3b --layers "${OFFLOAD_LAYERS:-4}" --batch 1,8 --prompt-tokens 32 \
  --new-tokens 32 --expert-budget "$budgets"
python3 - "$out" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "offload_*.json"))):
    for d in json.load(open(path)):
        if d.get("name") != "decode":
            continue
        r = d.get("residency") or {}
        print(f"offload {os.path.basename(path)[8:-5]:16s} budget {d['expert_budget']:>4s} batch {d['batch']:3d}: "
              f"{d['tokens_per_s']:9.1f} tokens/s" +
              (f", {r['tokens_per_s_vs_all_resident']:.3f} of all resident, hit rate {r['hit_rate']:.3f}, "
               f"{r['bytes_moved'] / 1e6:.1f} MB moved at {r['copy_gb_per_s_while_stalled']:.1f} GB/s while stalled, "
               f"{r['resident_expert_bytes'] / 1e6:.1f} MB of experts resident" if r else ""))
PY
exit $status
