#!/usr/bin/env bash
# A residency state per prompt on one GPU (epic run --residency-state wake,focus,...: each sequence routes its
# own experts per token in shared steps, worker/model_runner.h SequenceChunk::top_k) on the trained model:
# each prompt's logits and generated text against the runs where every prompt is in its state, in fp32 and in
# bf16 (decode steps replayed from CUDA graphs that hold the per-row table), and with half the experts
# resident and read in place (--expert-budget 50% --on-miss read) against the same list with all resident,
# and with a quarter resident behind a pinned host cache of half (--expert-tier disk --host-budget 50%).
#   bash tests/gpu/residency_state_check.sh BUILD_DIR OUT_DIR      (from tests/gpu/run_gpu_tests.sh tests)
set -uo pipefail
build=$1 out=$2
mkdir -p "$out"
status=0
source tests/gpu/trained_model_dir.sh  # $model
# Six prompts of known lengths (their rows of the logits file), in states that alternate unevenly.
printf '%s\n' 785,6171,1483,553,279 2747,4688,13,198 1483,553,279,2747,4688,13,785 \
  13,198,2747 553,279,2747,4688,13,198,785,6171 6171,1483 > "$out/prompts.txt"
lengths=5,4,7,3,8,2
states=wake,focus,wake,focus,focus,wake
common=(--model "$model" --allow-missing-experts --prompt-ids-file "$out/prompts.txt" --max-new-tokens 12)
run() {  # NAME FLAGS...: one GPU run, its text in NAME.txt and prompt logits in NAME.npy
  local name=$1; shift
  timeout 120 "$build/epic" run "${common[@]}" "$@" --logits-out "$out/$name.npy" > "$out/$name.txt" \
    2> "$out/$name.err" || { echo "residency: $name failed: $(grep -m2 -i error "$out/$name.err")"; return 1; }
}
# Line p of the mixed run's text against line p of its state's run.
same_lines() {  # MIXED_TXT WAKE_TXT FOCUS_TXT LABEL
  local p=0 line expected
  while IFS= read -r line; do
    state=$(cut -d, -f$((p + 1)) <<< "$states")
    expected=$(sed -n "$((p + 1))p" "$([ "$state" = wake ] && echo "$2" || echo "$3")")
    [ "$line" = "$expected" ] || { echo "$4: prompt $p ($state): generated text DIFFERENT"; return 1; }
    p=$((p + 1))
  done < "$1"
  [ "$p" = 6 ] || { echo "$4: $p lines of text, not 6"; return 1; }
  echo "$4: every prompt's generated text is its state's"
}
for precision in fp32 bf16; do
  run "wake_$precision" --precision "$precision" --residency-state wake || { status=1; continue; }
  run "focus_$precision" --precision "$precision" --residency-state focus || { status=1; continue; }
  run "mixed_$precision" --precision "$precision" --residency-state "$states" || { status=1; continue; }
  python3 tests/support/npy_rows_by_state.py "$out/mixed_$precision.npy" "$states" "$lengths" 0 \
    "wake=$out/wake_$precision.npy" "focus=$out/focus_$precision.npy" "residency $precision" || status=1
  same_lines "$out/mixed_$precision.txt" "$out/wake_$precision.txt" "$out/focus_$precision.txt" \
    "residency $precision" || status=1
done
# A budget variant of the bf16 mixed run: prompt logits bitwise and the same text as everything resident.
same_as_all_resident() {  # NAME LABEL FLAGS...
  local name=$1 label=$2; shift 2
  run "$name" --precision bf16 --residency-state "$states" "$@" || return 1
  python3 tests/support/npy_relative_l2.py "$out/mixed_bf16.npy" "$out/$name.npy" 0 \
    "residency bf16, $label, against all resident" || return 1
  if ! cmp -s "$out/mixed_bf16.txt" "$out/$name.txt"; then
    echo "residency bf16, $label: generated text DIFFERENT"; return 1
  fi
  echo "residency bf16, $label: the same generated text"
  grep -m1 "experts: budget" "$out/$name.err"
}
# Half the experts resident, the rest read in place over PCIe.
same_as_all_resident budget_read "50% resident read in place" --expert-budget 50% --on-miss read || status=1
# A quarter resident, the checkpoint on disk behind a pinned host cache of half the experts
# (--host-budget): misses wait for a copy from the cache or a read from disk into it.
same_as_all_resident budget_host_cache "25% resident, disk behind a 50% host cache" --expert-budget 25% \
  --expert-tier disk --host-budget 50% || status=1
grep -m1 "experts: host cache" "$out/budget_host_cache.err" || { echo "no host cache line"; status=1; }
exit $status
