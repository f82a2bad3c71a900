#!/usr/bin/env bash
# Decode with only a budget of experts resident on the GPU (the rest in pinned host memory), against every
# expert resident, in the same process (bench-decode --expert-budget): the trained model with prompts from
# its held-out text (its own routing statistics), then the Qwen3-30B-A3B shape (random bf16 weights in
# memory, a few of its layers; random routing is the worst case for a cache).
#   bash tests/gpu/offload_bench.sh BUILD_DIR OUT_DIR      (from tests/gpu/run_gpu_tests.sh offload)
# Knobs: OFFLOAD_LAYERS (default 4) of the 30B shape, OFFLOAD_BUDGETS (default 50%,25%), OFFLOAD_ADMIT (default
# "1 2": the --admit-per-step values of the read runs with admission control).
set -uo pipefail
build=$1 out=$2
status=0
source tests/gpu/trained_model_dir.sh  # $model
budgets=${OFFLOAD_BUDGETS:-50%,25%}
# First the output: with --on-miss read every expert is computed from the address the store gives it (its
# slot or its pinned host bytes), so a budget must give the full model's prompt logits (relative L2 <= 1e-6,
# bitwise expected: the same kernels read the same bytes) and the same generated text (decode graphs).
head -c 3000 "$model/heldout.txt" | grep -v '^\s*$' | head -6 > "$out/offload_prompts.txt"
check=(--backend cuda --model "$model" --allow-missing-experts --prompts-file "$out/offload_prompts.txt"
       --max-new-tokens 24)
if timeout 120 "$build/epic" run "${check[@]}" --logits-out "$out/offload_all.npy" > "$out/offload_all.txt" \
     2> "$out/offload_all.err"; then
  for variant in "25% lru" "50% usefulness"; do
    set -- $variant
    name="read_${1%\%}_$2"
    if ! timeout 120 "$build/epic" run "${check[@]}" --expert-budget "$1" --eviction "$2" --on-miss read \
         --logits-out "$out/offload_$name.npy" > "$out/offload_$name.txt" 2> "$out/offload_$name.err"; then
      echo "offload check $name failed: $(grep -m3 -i error "$out/offload_$name.err")"; status=1; continue
    fi
    python3 tests/support/npy_relative_l2.py "$out/offload_all.npy" "$out/offload_$name.npy" 1e-6 \
      "offload check: --expert-budget $1 --eviction $2 --on-miss read against every expert resident, prompt logits" \
      || status=1
    if cmp -s "$out/offload_all.txt" "$out/offload_$name.txt"; then
      echo "offload check: --expert-budget $1 --on-miss read: the same generated text"
    else
      echo "offload check: --expert-budget $1 --on-miss read: generated text DIFFERENT"; status=1
    fi
    grep -m1 "experts: budget" "$out/offload_$name.err" | sed "s/^/offload check $name: /"
  done
else
  echo "offload check: the all-resident run failed: $(grep -m3 -i error "$out/offload_all.err")"; status=1
fi
run() {  # name, then bench-decode flags
  local name=$1; shift
  if ! timeout 240 "$build/epic" bench-decode --backend cuda --json "$out/offload_$name.json" "$@" \
       > "$out/offload_$name.log" 2>&1; then
    echo "offload $name failed: $(grep -m3 -i error "$out/offload_$name.log")"; status=1
  fi
}
# wait: a miss is copied in before the step goes on (the routing read back every layer, no graphs);
# read: computed from pinned host memory in place and copied in behind the step (graphs kept).
for on_miss in wait read; do
  for eviction in lru usefulness; do
    run "trained_${on_miss}_$eviction" --model "$model" --allow-missing-experts --prompts-from "$model/heldout.txt" \
      --batch 1,8 --prompt-tokens 64 --new-tokens 64 --expert-budget "$budgets" --eviction "$eviction" \
      --on-miss "$on_miss"
  done
  run "q30b_${on_miss}_lru" --random-weights qwen3-30b-a3b --layers "${OFFLOAD_LAYERS:-4}" --batch 1,8 \
    --prompt-tokens 32 --new-tokens 32 --expert-budget "$budgets" --on-miss "$on_miss"
done
# read with admission control: at most N of a layer's misses copied in behind each step (--admit-per-step), so
# fewer experts cross the bus twice in their step where the bus is the limit.
for admit in ${OFFLOAD_ADMIT:-1 2}; do
  run "trained_read_admit$admit" --model "$model" --allow-missing-experts --prompts-from "$model/heldout.txt" \
    --batch 1,8 --prompt-tokens 64 --new-tokens 64 --expert-budget "$budgets" --on-miss read --admit-per-step "$admit"
  run "q30b_read_admit$admit" --random-weights qwen3-30b-a3b --layers "${OFFLOAD_LAYERS:-4}" --batch 1,8 \
    --prompt-tokens 32 --new-tokens 32 --expert-budget "$budgets" --on-miss read --admit-per-step "$admit"
done
python3 - "$out" <<'PY'
import glob, json, os, sys
for path in sorted(glob.glob(os.path.join(sys.argv[1], "offload_*.json"))):
    for d in json.load(open(path)):
        if d.get("name") != "decode":
            continue
        r = d.get("residency") or {}
        print(f"offload {os.path.basename(path)[8:-5]:22s} budget {d['expert_budget']:>4s} batch {d['batch']:3d}: "
              f"{d['tokens_per_s']:9.1f} tokens/s, {d['graph_replays']} graph replays" +
              (f", {r['tokens_per_s_vs_all_resident']:.3f} of all resident, decode picks resident {r['pick_hit_rate']:.3f}, "
               f"{r['bytes_moved'] / 1e6:.1f} MB copied ({r['copy_gb_per_s_while_stalled']:.1f} GB/s while stalled), "
               f"{r['bytes_read_in_place_decode'] / 1e6:.1f} MB read in place in decode, copies {r['bus_gb_per_s']:.2f} GB/s, "
               f"{r['resident_expert_bytes'] / 1e6:.1f} MB of experts resident, "
               f"link {r.get('link_gb_per_s', 0):.1f} GB/s: copies {r.get('copy_share_of_link', 0):.2f} and decode reads "
               f"in place {r.get('read_share_of_link', 0):.2f} of it" if r else ""))
PY
exit $status
