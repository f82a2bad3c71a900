#!/usr/bin/env bash
# A budget of resident experts over NCCL (worker/device_expert_parallel_store.cpp): `epic run` on the trained
# model under mpirun -np 2 with the NCCL executor, each worker's shard in its expert store with 25% resident
# and the rest read in place from pinned host memory (--expert-budget 25% --on-miss read), normal and
# low-latency modes (the latter replays decode graphs holding the expert log's copies), fp32 and bf16, a
# residency state per prompt too: prompt logits and text against the same NCCL run with every expert
# resident (fp32 within 1e-5, bf16 bitwise; LRU in the normal mode, usefulness from the device log's routing
# weights in the low-latency one); experts must have been read in place; --on-miss wait is
# refused with a message naming --on-miss read.
#   bash tests/gpu/ep_budget_check.sh BUILD_DIR OUT_DIR      (from tests/gpu/run_gpu_tests.sh nccl, 2+ GPUs)
set -uo pipefail
build=$1 out=$2
mkdir -p "$out"
status=0
source tests/gpu/trained_model_dir.sh  # $model
head -c 3000 "$model/heldout.txt" | grep -v '^\s*$' | head -6 > "$out/prompts.txt"
states=$(awk '{ printf "%s%s", (NR > 1 ? "," : ""), (NR % 2 == 1 ? "wake" : "focus") }' "$out/prompts.txt")
base=(timeout 150 mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x LD_LIBRARY_PATH "$build/epic" run
      --model "$model" --allow-missing-experts --prompts-file "$out/prompts.txt" --max-new-tokens 12)
mpi=("${base[@]}" --ep-transport nccl)
for precision in fp32 bf16; do
  bound=$([ "$precision" = fp32 ] && echo 1e-5 || echo 0)
  for mode in normal low-latency; do
    for state in focus "$states"; do
      name="${precision}_${mode}_$([ "$state" = focus ] && echo focus || echo per_prompt)"
      ok=1
      for budget in all 25; do
        flags=()
        # The low-latency runs evict by usefulness: the routing weights the device log sums.
        [ "$budget" = all ] || flags=(--expert-budget 25% --on-miss read
                                      --eviction "$([ "$mode" = normal ] && echo lru || echo usefulness)")
        if ! "${mpi[@]}" --precision "$precision" --ep-mode "$mode" --residency-state "$state" "${flags[@]}" \
             --logits-out "$out/${name}_$budget.npy" > "$out/${name}_$budget.txt" 2> "$out/${name}_$budget.err"; then
          echo "ep-budget $name ($budget): failed: $(grep -m2 -i error "$out/${name}_$budget.err")"; status=1; ok=0
        fi
      done
      [ $ok = 1 ] || continue
      python3 tests/support/npy_relative_l2.py "$out/${name}_all.npy" "$out/${name}_25.npy" "$bound" \
        "ep-budget $name: 25% resident, read in place, against all resident" || status=1
      if cmp -s "$out/${name}_all.txt" "$out/${name}_25.txt"; then
        echo "ep-budget $name: the same generated text"
      else
        echo "ep-budget $name: generated text DIFFERENT"; status=1
      fi
      # Every rank reports its store; some expert must have been computed from host memory.
      if grep -q "experts: budget" "$out/${name}_25.err" && ! grep "experts: budget" "$out/${name}_25.err" |
           grep -q " 0.00 MB read in place"; then
        grep -m1 "experts: budget" "$out/${name}_25.err" | sed "s/^/ep-budget $name: /"
      else
        echo "ep-budget $name: no expert read in place, or no store report"; status=1
      fi
    done
  done
done
"${mpi[@]}" --expert-budget 25% --on-miss wait > "$out/wait.txt" 2> "$out/wait.err"
if grep -q "NCCL exchange needs --on-miss read" "$out/wait.err"; then
  echo "ep-budget: --on-miss wait over NCCL refused: $(grep -m1 "NCCL exchange needs" "$out/wait.err")"
else
  echo "ep-budget: --on-miss wait over NCCL was not refused with the expected message"; status=1
fi
# bench-decode under mpirun over NCCL: decode with half and a quarter of each worker's shard resident against all
# resident, in the same run (tokens/s of the job, the pick hit rate of rank 0's store).
if timeout 200 mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x LD_LIBRARY_PATH "$build/epic" bench-decode \
     --model "$model" --allow-missing-experts --prompts-from "$model/heldout.txt" --batch 1,8 --prompt-tokens 64 \
     --new-tokens 64 --expert-budget 50%,25% --on-miss read > "$out/bench.jsonl" 2> "$out/bench.err"; then
  python3 - "$out/bench.jsonl" << 'PY'
import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d.get("name") != "decode":
        continue
    r = d.get("residency") or {}
    print(f"ep-budget bench-decode np2 {d['ep_transport']} batch {d['batch']} budget {d['expert_budget']}: "
          f"{d['tokens_per_s']:.0f} tokens/s"
          + (f", {r['tokens_per_s_vs_all_resident']:.2f} of all resident, pick hit rate {r['pick_hit_rate']:.2f}"
             if r else ""))
PY
else
  echo "ep-budget bench-decode failed: $(grep -m2 -i error "$out/bench.err")"; status=1
fi
# With --ep-transport auto the same budget waits on a miss through the host exchange instead.
if "${base[@]}" --expert-budget 25% --on-miss wait > "$out/auto_wait.txt" 2> "$out/auto_wait.err" &&
   grep -q "on miss wait" "$out/auto_wait.err"; then
  echo "ep-budget: --ep-transport auto with --on-miss wait ran on the host exchange"
else
  echo "ep-budget: --ep-transport auto with --on-miss wait failed: $(grep -m2 -i error "$out/auto_wait.err")"; status=1
fi
exit $status
