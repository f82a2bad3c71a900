#!/usr/bin/env bash
# Issue 7's GPU benchmark in one call on the GPU machine: the card, the baselines (bf16 GEMM, read and
# copy bandwidth, transformers MoE block and generate) and epic's own figures, same card, same run.
#
#   bash launch/bench/run_gpu_bench.sh [BUILD_DIR] [--quick] [--budget SECONDS]
#
# Run from the repository root (the device tool does). BUILD_DIR (default build-gpu) holds the epic
# binary for the "# epic:" steps. Results go to $OUT (default out/bench): bench.log (everything),
# baselines.jsonl, roofline.jsonl; the device tool returns at most 8 files, so epic's steps should
# add at most 4. Every step runs under a timeout cut to what is left of the budget (default 470 s,
# --quick 300 s): the device tool kills a command at 600 s, and a killed step keeps the lines it
# printed. A failed step is logged and the next one still runs; the exit status is the first failure.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2  # the paths below are from the repository root

build_dir=build-gpu
quick=0
budget=""
parts="baselines epic"  # --only baselines|epic: one of the two halves (each fits one device call)
while (($#)); do
  case "$1" in
    --quick) quick=1 ;;
    --only) parts="$2"; shift ;;
    --budget) budget="$2"; shift ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "run_gpu_bench: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) build_dir="$1" ;;
  esac
  shift
done
budget="${budget:-$((quick ? 300 : 470))}"

# NVLink multicast stays off on these shared machines (it can take the host's GPUs out of service).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
out="${OUT:-out/bench}"
mkdir -p "$out"
first_failure=0

# step [--tee FILE] NAME SECONDS COMMAND...: runs COMMAND under min(SECONDS, what is left of the
# budget); with --tee its stdout is also appended to FILE (stderr only in the log).
step() {
  local tee_file=""
  if [[ "$1" == --tee ]]; then
    tee_file="$2"
    shift 2
  fi
  local name="$1" limit="$2"
  shift 2
  local left=$((budget - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    echo "=== $name: skipped, the ${budget}s budget is spent"
    ((first_failure)) || first_failure=124
    return 124
  fi
  echo "=== $name (limit ${limit}s, t=${SECONDS}s): $*"
  local start=$SECONDS rc
  if [[ -n "$tee_file" ]]; then
    timeout --kill-after=10 "$limit" "$@" | tee -a "$tee_file"
    rc=${PIPESTATUS[0]}
  else
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
  fi
  echo "=== $name: rc=$rc$( ((rc == 124 || rc == 137)) && echo ' (timed out)') in $((SECONDS - start))s"
  ((rc == 0 || first_failure)) || first_failure=$rc
  return "$rc"
}

main() {
  local quick_flag=()
  ((quick)) && quick_flag=(--quick)
  echo "=== run_gpu_bench: $(date -u +%Y-%m-%dT%H:%M:%SZ) build_dir=$build_dir quick=$quick budget=${budget}s" \
    "commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD 2>/dev/null || echo +dirty)"
  step card 20 nvidia-smi -L
  step card_details 20 nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem \
    --format=csv

  # The 57 GB transformers model and epic's own model do not share the card: one step at a time.
  if [[ " $parts " == *" baselines "* ]]; then
    step --tee "$out/baselines.jsonl" baselines "$((quick ? 200 : 300))" \
      python3 launch/bench/baselines.py "${quick_flag[@]}"
  fi

  # epic's own figures, same card, same run: one MoE layer at every token count (bf16, device path),
  # whole-model decode of the 48-layer Qwen3-30B-A3B shape (random weights drawn in memory) at
  # batch 1/16/64/256 from CUDA graphs, and a 4096-token prefill.
  local epic="$build_dir/epic"
  local tokens
  [[ " $parts " == *" epic "* ]] && for tokens in 1 8 32 128 512 2048 4096 16384; do
    step --tee "$out/epic_moe.log" "epic_moe_$tokens" 60 "$epic" bench-moe --backend cuda --precision bf16 \
      --preset qwen3-30b-a3b --layers 4 --tokens-per-worker "$tokens" --iterations 20 --warmup 3
  done
  # The same layers replayed from a CUDA graph, as a decode step runs them (sizes below the 8192 expert
  # rows where the FFN would read the group sizes back to the host): without the host's launch cost.
  [[ " $parts " == *" epic "* ]] && for tokens in 1 8 32 128 512; do
    step --tee "$out/epic_moe.log" "epic_moe_graph_$tokens" 60 "$epic" bench-moe --backend cuda --precision bf16 \
      --preset qwen3-30b-a3b --layers 4 --tokens-per-worker "$tokens" --iterations 20 --warmup 3 --cuda-graphs
  done
  # Loading: a 2-layer Qwen3-30B-A3B checkpoint (3.7 GB bf16, the issue's case) read like `cat` and loaded
  # onto the CPU (kept bf16) and onto the GPU (pinned staging, asynchronous copies).
  if [[ " $parts " == *" epic "* ]]; then
    step epic_make_model 120 "$epic" make-model --preset qwen3-30b-a3b --layers 2 --out /tmp/epic-q2 --force
    step --tee "$out/epic_load.log" epic_load_cpu 60 "$epic" bench-load --model /tmp/epic-q2
    step --tee "$out/epic_load.log" epic_load_cuda 60 "$epic" bench-load --model /tmp/epic-q2 --backend cuda
  fi
  [[ " $parts " == *" epic "* ]] && step --tee "$out/epic_decode.jsonl" epic_decode "$((quick ? 240 : 300))" "$epic" bench-decode --backend cuda \
    --precision bf16 --random-weights qwen3-30b-a3b --batch 1,16,64,256 --prompt-tokens 32 --new-tokens 64 \
    --prefill-tokens 4096

  # The roofline at the rates measured above (decode context = prompt 32 + half of 64 new tokens).
  [[ -s "$out/baselines.jsonl" ]] && step --tee "$out/roofline.jsonl" roofline 20 python3 launch/bench/roofline.py \
    --preset configs/presets/qwen3-30b-a3b.json --from-baselines "$out/baselines.jsonl" \
    --batch 1 16 64 256 --context 64 --prefill-tokens 4096
  echo "=== run_gpu_bench: done in ${SECONDS}s, first failure rc=$first_failure"
  return "$first_failure"
}

main 2>&1 | tee "$out/bench.log"
exit "${PIPESTATUS[0]}"
