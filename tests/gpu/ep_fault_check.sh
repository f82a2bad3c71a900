#!/usr/bin/env bash
# Faults under the NCCL executor (issue 8): `epic run --backend cuda --ep-transport nccl` under
# `mpirun -np 2`, with rank 1 failing at generation step 3 (EPIC_TEST_STEP_FAULT, comm/fault_injection.h):
# throw (an error on one rank), stop (a stuck rank), kill (a dead rank), nan (non-finite logits). Each run
# must end with a non-zero exit, well within the bound (--comm-timeout 10 plus start-up), and its stderr
# must name rank 1. Usage: tests/gpu/ep_fault_check.sh BUILD_DIR OUT_DIR; exit 1 on any miss.
set -uo pipefail
build=$1 out=$2
mkdir -p "$out"
status=0
# Where a job that overstays its bound waits: every epic process's state and, where gdb exists, every
# thread's stack (into OUT_DIR/hang_ACTION.txt), taken once before the job is killed.
dump_stacks() {
  local pid
  for pid in $(pgrep -f "$build/epic run"); do
    echo "== pid $pid: $(grep -E '^State' /proc/"$pid"/status 2>/dev/null)"
    if command -v gdb > /dev/null; then
      timeout 60 gdb -p "$pid" -batch -ex "thread apply all bt 20" 2>&1 | grep -E "^Thread|^#" | head -150
    else
      cat /proc/"$pid"/task/*/wchan 2>/dev/null | tr '\0' '\n' | sort | uniq -c
    fi
  done
}
for action in throw nan stop kill; do
  start=$SECONDS
  timeout 150 mpirun --allow-run-as-root -np 2 -x NCCL_NVLS_ENABLE=0 -x LD_LIBRARY_PATH \
    -x EPIC_TEST_STEP_FAULT="1:3:$action" "$build/epic" run --model tests/golden/fixtures/qwen3_moe_bf16 \
    --prompt-ids-file tests/golden/prompts_ids.txt --max-new-tokens 8 --backend cuda --ep-transport nccl \
    --comm-timeout 10 > "$out/fault_$action.txt" 2> "$out/fault_$action.err" &
  job=$!
  while kill -0 "$job" 2> /dev/null && [ $((SECONDS - start)) -lt 45 ]; do sleep 1; done
  kill -0 "$job" 2> /dev/null && dump_stacks > "$out/hang_$action.txt" 2>&1
  wait "$job"
  rc=$? elapsed=$((SECONDS - start))
  named=no
  grep -q "rank 1" "$out/fault_$action.err" && named=yes
  verdict=ok
  { [ "$rc" = 0 ] || [ "$rc" = 124 ] || [ "$elapsed" -gt 60 ] || [ "$named" = no ]; } && verdict=FAILED && status=1
  echo "ep-fault $action on rank 1 at step 3: exit $rc after ${elapsed}s, rank 1 named: $named -> $verdict"
  grep -m3 -E "epic: error|rank 1" "$out/fault_$action.err" | cut -c1-220 | sed 's/^/    /'
done
exit $status
