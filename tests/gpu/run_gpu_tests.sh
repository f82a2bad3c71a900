#!/usr/bin/env bash
# Every GPU test and benchmark of epic in one call on the GPU machine (the device tool runs it in the
# repository root; results come back from $OUT). The CI machine has no GPU: there the CUDA tests
# skip visibly, and this script is how they run.
#
#   bash tests/gpu/run_gpu_tests.sh [golden] [tests] [ctest] [bench] [baselines] [profile] [ab] [ffn]
#                                   [ncu] [ncu-moe] [moe-ab] [nccl] [ep-bench] [ep-decode] [eval] [offload]
#                                   [scoring]
#   (each fits one device call)
#     golden: regenerate the golden fixtures' bf16_reference.json (transformers' own bf16 error, the
#             bar of the cuda bf16 golden mode) with tests/golden/make_golden.py, before the tests
#     tests:  build with CUDA, run the kernel op table, golden, model and checkpoint suites (CUDA
#             rows included), then a residency state per prompt (tests/gpu/residency_state_check.sh);
#             ctest: the whole ctest suite
#     bench:  the expert FFN micro-benchmark, bench-moe and bench-decode; baselines: the
#             torch/transformers figures of the same card (launch/bench/run_gpu_bench.sh)
#     profile: where the time goes: the prefill-size expert FFN paths, per-op device times
#             (EPIC_CUDA_OP_TIMING=1, no graphs) of 8-layer decode steps at batch 1, then ab
#     ffn:    the expert FFN micro-benchmark (every kernel variant, checked first) at decode sizes
#     ncu:    per-kernel device times of 2-layer decode steps at batch 1 and 256 from graphs (Nsight
#             Compute at the card's own clocks with warm caches: each kernel alone, so no overlap)
#     ncu-moe: per-kernel device times of one MoE layer at NCU_MOE_TOKENS (default 16384) tokens,
#             two calls (Nsight Compute, card clocks, warm caches), summed by kernel
#     moe-ab: one MoE layer (bench-moe) at MOE_TOKENS (default 2048 4096 16384) with each switch of
#             AB_SWITCHES (default EPIC_CUDA_BATCHED_FFN) at 0 and at 1
#     nccl:   the NCCL communicator test (tests/comm/nccl_communicator_test.cpp: every collective against
#             MPI, bitwise; a peer that skips a collective) under mpirun -np 2, and -np 4 where 4 GPUs are
#             visible, then the NCCL expert-parallel executor test (tests/cluster/device_expert_parallel_test.cpp:
#             layout kernels against the host plan, executor against one GPU) the same way, then epic run
#             under mpirun with the NCCL executor against one GPU on every golden fixture
#             (tests/gpu/ep_golden_check.sh), WAKE/FOCUS over NCCL (tests/gpu/ep_wake_check.sh), a budget of
#             resident experts over NCCL (tests/gpu/ep_budget_check.sh), and faults
#             under it (tests/gpu/ep_fault_check.sh); alone it
#             builds only those two tests and epic
#     ep-bench: bench-moe with the NCCL executor (qwen3-30b-a3b, bf16, 2 layers) under mpirun -np 2 (and 4
#             where 4 GPUs) at EP_BENCH_TOKENS (default 128 1024 4096 16384) tokens per rank: dispatch /
#             expert / combine device times, off-rank GB/s, NCCL's all_to_all_v of the same bytes and the
#             send/recv link in the same run, self-checked; then one GPU at the same sizes for the weak
#             scaling efficiency t1 / tN of a whole MoE layer (4096 and 16384). Alone it builds only epic
#     ep-decode: whole-model decode tokens/s of the 48-layer Qwen3-30B-A3B shape (bench-decode, random bf16
#             weights in memory) at EP1, EP2, EP4 (EP_DECODE_RANKS) and batches EP_DECODE_BATCHES per GPU
#     eval:   the trained model's quality table: transformers' perplexity against epic eval (fp32, bf16,
#             2 ranks against 1), tests/gpu/eval_quality.sh; carry .device/tokenizer.json in .device.txz
#     offload: decode with 50% / 25% of the experts resident against all (bench-decode --expert-budget),
#             the trained model and the Qwen3-30B-A3B shape, tests/gpu/offload_bench.sh
#     (knobs: NCCL_GOLDEN_RANKS and EP_GOLDEN_VARIANTS pick the golden runs of nccl, NCCL_FAULTS=0 skips
#     its fault runs; EP_BENCH_RANKS, EP_BENCH_ONE_GPU=0 / EP_BENCH_ONE_GPU_TOKENS, EP_OVERLAP_TOKENS and
#     EP_LOW_LATENCY_TOKENS split ep-bench over calls; EP_LL_MODES: eager and/or graph low-latency timing)
#     scoring: epic eval's scoring ops (Backend::log_softmax and score_rows: kernels/cuda/scoring_kernels.cu)
#             against the CPU backend, from the kernel op table, and their argument checks; alone it builds
#             only tests/kernels/epic_kernels_test (tests runs the same rows with the whole table)
#     serve:  epic serve on the GPU (issue 11): bench-scheduler (the scheduler's cost a step at 64 and 256
#             streams, an instant engine), then launch/bench/serve_load.py on the trained model, cuda bf16, 64
#             streaming clients (epic bench-serve) against epic run on the same prompts: in process, and
#             over a worker job of SERVE_WORKERS ranks (default 1; 2 where 2 GPUs; the NCCL exchange), each
#             also checking /metrics' per-expert load of the last window; alone it builds only epic
#     ab:     8-layer decode steps from graphs with each switch in AB_SWITCHES (default: EPIC_CUDA_PDL,
#             programmatic dependent launch) at 0 and at 1, everything else equal
# cereal and ICU's headers are not installed on the GPU machine: carry .device/include (a copy of
# /usr/include/cereal) and .device/icu (ICU 72's headers and libicuuc/libicudata from the CI image), or,
# since the trained model made the tree larger (the device tool sends at most 64 MiB), .device.txz
# (`tar cJf .device.txz .device`, 9 MB instead of 40), unpacked here when .device is not there.
set -uo pipefail
cd "$(dirname "$0")/../.."
if [ ! -d .device ] && [ -f .device.txz ]; then tar xJf .device.txz || { echo "cannot unpack .device.txz"; exit 1; }; fi
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0
# The carried ICU's libicudata is loaded through libicuuc (not found by the binaries' RUNPATH).
export LD_LIBRARY_PATH="$PWD/.device/icu/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
BUILD=build-gpu
modes=("$@")
[ ${#modes[@]} -eq 0 ] && modes=(tests bench)
wants() { [[ " ${modes[*]} " == *" $1 "* ]]; }
status=0
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.log"; }

log "card: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1)"

if wants golden; then
  log "golden: transformers' bf16 error per fixture (make_golden.py into a scratch folder)"
  scratch=$(mktemp -d)
  if timeout 300 python3 tests/golden/make_golden.py --out "$scratch" > "$OUT/make_golden.log" 2>&1; then
    for case_dir in "$scratch"/*/; do
      name=$(basename "$case_dir")
      # The regenerated fixture must be the committed one (same seed, same tools), else the bf16
      # bar would be measured on other weights.
      if cmp -s "$case_dir/logits_0.npy" "tests/golden/fixtures/$name/logits_0.npy"; then
        cp "$case_dir/bf16_reference.json" "tests/golden/fixtures/$name/"
      else
        log "golden: $name regenerated differently from the committed fixture; bf16 reference not taken"
        status=1
      fi
    done
    tar -cf "$OUT/bf16_reference.tar" tests/golden/fixtures/*/bf16_reference.json
    tail -8 "$OUT/make_golden.log" | tee -a "$OUT/summary.log"
  else
    log "golden: make_golden.py failed (see make_golden.log)"
    status=1
  fi
  rm -rf "$scratch"
fi

needs_build=0
for mode in tests ctest bench baselines profile ab ffn ncu moe-ab ncu-moe nccl ep-bench ep-decode eval offload scoring serve; do
  wants "$mode" && needs_build=1
done
# nccl alone needs one test binary, not the whole tree (device time).
only_nccl=1
for mode in tests ctest bench baselines profile ab ffn ncu moe-ab ncu-moe; do wants "$mode" && only_nccl=0; done
build_targets=()
wants nccl && [ "$only_nccl" = 1 ] && build_targets=(--target epic_nccl_comm_test epic_device_ep_test epic)
{ wants ep-bench || wants ep-decode || wants eval || wants offload || wants serve; } && ! wants nccl && [ "$only_nccl" = 1 ] && build_targets=(--target epic)
# scoring alone needs the kernel test only.
if wants scoring && [ ${#modes[@]} -eq 1 ]; then build_targets=(--target epic_kernels_test); fi
if [ "$needs_build" = 1 ]; then
  log "build: CUDA on, $(nproc) cores"
  if ! { cmake -S . -B "$BUILD" -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEPIC_CEREAL_INCLUDE_DIR="$PWD/.device/include" \
           -DICU_ROOT="$PWD/.device/icu" \
           -DCMAKE_CUDA_ARCHITECTURES=90 > "$OUT/build.log" 2>&1 &&
         timeout 420 cmake --build "$BUILD" -j "$(nproc)" "${build_targets[@]}" >> "$OUT/build.log" 2>&1; }; then
    log "build FAILED"; grep -E "error|Error|NCCL communicator OFF" "$OUT/build.log" | head -30 | tee -a "$OUT/summary.log"
    exit 1
  fi
fi

if wants tests; then
  for suite in tests/kernels/epic_kernels_test tests/kernels/epic_count_routed_slots_test tests/golden/golden_test \
               tests/model/model_test tests/checkpoint/epic_weight_loader_tests; do
    log "test: $suite"
    if ! timeout 240 "$BUILD/$suite" --gtest_brief=1 > "$OUT/$(basename "$suite").log" 2>&1; then status=1; fi
    tail -4 "$OUT/$(basename "$suite").log" | tee -a "$OUT/summary.log"
    grep -E "^\[  FAILED|Failure|error" "$OUT/$(basename "$suite").log" | head -20 | tee -a "$OUT/summary.log"
  done
  log "test: a residency state per prompt on one GPU (tests/gpu/residency_state_check.sh)"
  bash tests/gpu/residency_state_check.sh "$BUILD" "$OUT/residency" > "$OUT/residency.log" 2>&1 || status=1
  grep -E "^residency" "$OUT/residency.log" | grep -v " -- ok$" | tee -a "$OUT/summary.log"
  grep -cE " -- ok$" "$OUT/residency.log" | sed 's/^/residency: prompts matching their state: /' | tee -a "$OUT/summary.log"
fi
if wants scoring; then
  log "scoring: log_softmax and score_rows on CUDA against the CPU backend (epic_kernels_test)"
  if ! EPIC_KERNEL_TEST_REPORT=1 timeout 240 "$BUILD/tests/kernels/epic_kernels_test" \
         --gtest_filter='Table/BackendOp.MatchesReference/log_softmax_*:Table/BackendOp.MatchesReference/score_rows_*:Backends/BackendErrors.*' \
         > "$OUT/scoring.log" 2>&1; then
    status=1
  fi
  grep -E "^\[  (PASSED|FAILED|SKIPPED) |^\[==========\]" "$OUT/scoring.log" | tee -a "$OUT/summary.log"
  grep -E "^\[  FAILED|Failure|seed " "$OUT/scoring.log" | head -20 | tee -a "$OUT/summary.log"
fi
if wants ctest; then
  log "test: whole ctest suite"
  (cd "$BUILD" && timeout 300 ctest -j 8 --output-on-failure -LE fuzz > "$OUT/ctest.log" 2>&1) || status=1
  grep -E "tests passed|tests failed|\(Failed\)|\(Timeout\)" "$OUT/ctest.log" | tee -a "$OUT/summary.log"
fi

if wants eval; then
  log "eval: the trained model's quality table (tests/gpu/eval_quality.sh)"
  bash tests/gpu/eval_quality.sh "$BUILD" "$OUT" > "$OUT/eval.log" 2>&1 || status=1
  grep -E "^eval|^top-|^pruned|tokens scored" "$OUT/eval.log" | tee -a "$OUT/summary.log"
fi

if wants offload; then
  log "offload: decode with a budget of experts resident (tests/gpu/offload_bench.sh)"
  bash tests/gpu/offload_bench.sh "$BUILD" "$OUT" > "$OUT/offload.log" 2>&1 || status=1
  grep -E "^offload" "$OUT/offload.log" | tee -a "$OUT/summary.log"
fi

if wants serve; then
  source tests/gpu/trained_model_dir.sh
  log "serve: bench-scheduler, $(nproc) cores"
  "$BUILD/epic" bench-scheduler --tokenizer "$model/tokenizer.json" --streams 64,256 --tokens 400 \
    --json "$OUT/bench_scheduler.json" 2>&1 | tee -a "$OUT/summary.log" || status=1
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  for workers in 0 ${SERVE_WORKERS:-1}; do
    log "serve: 64 streaming clients, ${workers} worker job ranks (0: in process), cuda bf16"
    timeout 300 python3 launch/bench/serve_load.py --epic "$BUILD/epic" --model "$model" --text "$model/heldout.txt" \
      --clients 64 --requests ${SERVE_REQUESTS:-12} --rounds ${SERVE_ROUNDS:-3} --max-tokens 128 --workers "$workers" --json "$OUT/serve_load_w$workers.json" \
      -- --backend cuda --precision bf16 > "$OUT/serve_load_w$workers.log" 2>&1 || status=1
    grep -vE "^serve:" "$OUT/serve_load_w$workers.log" | tail -16 | tee -a "$OUT/summary.log"
  done
fi

if wants nccl; then
  grep -E "NCCL communicator" "$OUT/build.log" | tee -a "$OUT/summary.log"
  num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  for ranks in 2 4; do
    if [ "$ranks" -gt "$num_gpus" ]; then log "nccl: -np $ranks not run: $num_gpus GPUs visible"; continue; fi
    log "nccl: NCCL communicator under mpirun -np $ranks"
    timeout 300 mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE=0 -x NCCL_DEBUG=WARN \
      "$BUILD/tests/comm/epic_nccl_comm_test" > "$OUT/nccl_comm_np$ranks.log" 2>&1 || status=1
    grep -E "^\[ SEED|^\[ MPI|PASSED|FAILED|SKIPPED|skipped on every rank|^\[rank" "$OUT/nccl_comm_np$ranks.log" |
      head -30 | tee -a "$OUT/summary.log"
    log "nccl: NCCL expert-parallel executor under mpirun -np $ranks"
    timeout 300 mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE=0 -x NCCL_DEBUG=WARN \
      "$BUILD/tests/cluster/epic_device_ep_test" > "$OUT/device_ep_np$ranks.log" 2>&1 || status=1
    grep -E "^\[ SEED|^\[ MPI|PASSED|FAILED|SKIPPED|skipped on every rank|^\[rank" "$OUT/device_ep_np$ranks.log" |
      head -30 | tee -a "$OUT/summary.log"
    if [[ " ${NCCL_GOLDEN_RANKS:-2 4} " != *" $ranks "* ]]; then
      log "nccl: golden fixtures at -np $ranks not run (NCCL_GOLDEN_RANKS=${NCCL_GOLDEN_RANKS:-})"
      continue
    fi
    log "nccl: epic run under mpirun -np $ranks (NCCL executor) against one GPU, every golden fixture"
    bash tests/gpu/ep_golden_check.sh "$BUILD" "$ranks" "$OUT/ep_golden" 2>&1 | tee -a "$OUT/summary.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  done
  if [ "$num_gpus" -ge 2 ] && [ "${NCCL_FAULTS:-1}" = 1 ]; then
    log "nccl: residency states (WAKE/FOCUS) over NCCL against one GPU (tests/gpu/ep_wake_check.sh)"
    bash tests/gpu/ep_wake_check.sh "$BUILD" "$OUT/ep_wake" 2>&1 | tee -a "$OUT/summary.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    log "nccl: a budget of resident experts over NCCL, read in place (tests/gpu/ep_budget_check.sh)"
    bash tests/gpu/ep_budget_check.sh "$BUILD" "$OUT/ep_budget" 2>&1 | tee -a "$OUT/summary.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
    log "nccl: faults under the NCCL executor (a rank that throws, stops, dies, or gets NaN logits)"
    bash tests/gpu/ep_fault_check.sh "$BUILD" "$OUT/ep_fault" 2>&1 | tee -a "$OUT/summary.log"
    [ "${PIPESTATUS[0]}" = 0 ] || status=1
  fi
fi

if wants ep-bench; then
  num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  ep_tokens=(${EP_BENCH_TOKENS:-128 1024 4096 16384})
  ep_one_gpu_tokens=(${EP_BENCH_ONE_GPU_TOKENS:-${ep_tokens[*]}})
  # Fewer iterations where one is long: the whole mode stays near 4 minutes on 2 GPUs.
  iterations_for() { if [ "$1" -ge 16384 ]; then echo 5; elif [ "$1" -ge 4096 ]; then echo 10; else echo 20; fi; }
  bench_common=(bench-moe --backend cuda --precision bf16 --preset qwen3-30b-a3b --layers 2 --warmup 2)
  log "ep-bench: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $num_gpus GPU(s), $(nvidia-smi topo -m 2>/dev/null | awk 'NR==2{print $3}') between GPU0 and GPU1"
  [ "${EP_BENCH_ONE_GPU:-1}" = 1 ] || ep_one_gpu_tokens=()
  for tokens in "${ep_one_gpu_tokens[@]}"; do
    log "ep-bench: one GPU, $tokens tokens"
    timeout 120 "$BUILD/epic" "${bench_common[@]}" --tokens-per-worker "$tokens" --iterations "$(iterations_for "$tokens")" \
      --no-check --json "$OUT/ep_bench_np1_$tokens.json" > "$OUT/ep_bench_np1_$tokens.log" 2>&1 || status=1
    grep -E "slowest worker|error" "$OUT/ep_bench_np1_$tokens.log" | tee -a "$OUT/summary.log"
  done
  for ranks in ${EP_BENCH_RANKS:-2 4}; do
    if [ "$ranks" -gt "$num_gpus" ]; then log "ep-bench: -np $ranks not run: $num_gpus GPUs visible"; continue; fi
    for tokens in "${ep_tokens[@]}"; do
      log "ep-bench: mpirun -np $ranks, nccl, $tokens tokens per rank"
      timeout 150 mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE=0 -x NCCL_DEBUG=WARN \
        "$BUILD/epic" "${bench_common[@]}" --ep-transport nccl --tokens-per-worker "$tokens" \
        --iterations "$(iterations_for "$tokens")" --json "$OUT/ep_bench_np${ranks}_$tokens.json" \
        > "$OUT/ep_bench_np${ranks}_$tokens.log" 2>&1 || status=1
      grep -E "^ +max |dispatch \+ combine|vs NCCL|^link|slowest worker|^check|error" "$OUT/ep_bench_np${ranks}_$tokens.log" |
        tee -a "$OUT/summary.log"
    done
    # Two-batch overlap at the weak-scaling sizes, and the low-latency mode at decode sizes (no baselines:
    # the normal runs above measured NCCL's all-to-all and the link already).
    for tokens in ${EP_OVERLAP_TOKENS:-4096 16384}; do
      log "ep-bench: mpirun -np $ranks, nccl, two-batch overlap, $tokens tokens per rank"
      timeout 150 mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE=0 -x NCCL_DEBUG=WARN \
        "$BUILD/epic" "${bench_common[@]}" --ep-transport nccl --ep-overlap --no-baseline --tokens-per-worker "$tokens" \
        --iterations "$(iterations_for "$tokens")" --json "$OUT/ep_bench_np${ranks}_overlap_$tokens.json" \
        > "$OUT/ep_bench_np${ranks}_overlap_$tokens.log" 2>&1 || status=1
      grep -E "^ +max |slowest worker|^check|error" "$OUT/ep_bench_np${ranks}_overlap_$tokens.log" | tee -a "$OUT/summary.log"
    done
    # Each size twice: phases timed with a host wait per layer call (eager), and inside a replayed CUDA
    # graph as decode steps run (graph: no host launch or wait between layers; NCCL's baselines and the
    # send/recv floor then replayed from graphs too). EP_LL_MODES picks them.
    for tokens in ${EP_LOW_LATENCY_TOKENS:-1 32 128}; do
      for ll_mode in ${EP_LL_MODES:-eager graph}; do
        ll_flags=()
        [ "$ll_mode" = graph ] && ll_flags=(--cuda-graphs)
        log "ep-bench: mpirun -np $ranks, nccl, low-latency mode ($ll_mode), $tokens tokens per rank"
        timeout 150 mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE=0 -x NCCL_DEBUG=WARN \
          "$BUILD/epic" "${bench_common[@]}" --ep-transport nccl --ep-mode low-latency --tokens-per-worker "$tokens" \
          "${ll_flags[@]}" --iterations 50 --json "$OUT/ep_bench_np${ranks}_ll_${ll_mode}_$tokens.json" \
          > "$OUT/ep_bench_np${ranks}_ll_${ll_mode}_$tokens.log" 2>&1 || status=1
        grep -E "^ +max |dispatch \+ combine|^link|slowest worker|^check|error" \
          "$OUT/ep_bench_np${ranks}_ll_${ll_mode}_$tokens.log" | tee -a "$OUT/summary.log"
      done
    done
    # Weak scaling: the same tokens per rank on one GPU and on N; a whole MoE layer, slowest rank's wall time.
    python3 - "$OUT" "$ranks" "${ep_tokens[@]}" <<'PY' | tee -a "$OUT/summary.log"
import json, os, sys
out, ranks, sizes = sys.argv[1], sys.argv[2], sys.argv[3:]
def slowest(path):
    with open(path) as f:
        return max(w["total_ms"] for w in json.load(f)["per_worker"])
for tokens in sizes:
    one = f"{out}/ep_bench_np1_{tokens}.json"
    for name, many in (("", f"{out}/ep_bench_np{ranks}_{tokens}.json"),
                       (" overlap on", f"{out}/ep_bench_np{ranks}_overlap_{tokens}.json")):
        if not os.path.exists(many):
            continue
        if not os.path.exists(one):
            print(f"weak scaling EP{ranks}{name} {tokens} tokens/rank: missing the one-GPU run"); continue
        t1, tn = slowest(one), slowest(many)
        print(f"weak scaling EP{ranks}{name} {tokens} tokens/rank: 1 GPU {t1:.3f} ms, {ranks} GPUs {tn:.3f} ms "
              f"per layer, efficiency t1/tN {t1 / tn:.3f}")
PY
  done
fi

if wants ep-decode; then
  # Whole-model decode of the 48-layer Qwen3-30B-A3B shape (random bf16 weights drawn in memory), each rank
  # its own batch: one GPU, then mpirun -np 2 and 4 with the NCCL executor (low-latency decode steps
  # replayed from graphs). tokens/s of the job from the slowest rank.
  num_gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')
  for ranks in ${EP_DECODE_RANKS:-1 2 4}; do
    if [ "$ranks" -gt "$num_gpus" ]; then log "ep-decode: EP$ranks not run: $num_gpus GPUs visible"; continue; fi
    log "ep-decode: EP$ranks, qwen3-30b-a3b 48 layers, batch ${EP_DECODE_BATCHES:-64,256} per GPU"
    decode=("$BUILD/epic" bench-decode --backend cuda --precision bf16 --random-weights qwen3-30b-a3b
            --batch "${EP_DECODE_BATCHES:-64,256}" --prompt-tokens 32 --new-tokens 64 --json "$OUT/ep_decode_np$ranks.json")
    if [ "$ranks" = 1 ]; then
      timeout 400 "${decode[@]}" > "$OUT/ep_decode_np$ranks.log" 2>&1 || status=1
    else
      timeout 400 mpirun --allow-run-as-root -np "$ranks" -x NCCL_NVLS_ENABLE=0 -x NCCL_DEBUG=WARN -x LD_LIBRARY_PATH \
        "${decode[@]}" > "$OUT/ep_decode_np$ranks.log" 2>&1 || status=1
    fi
    grep -m3 "error" "$OUT/ep_decode_np$ranks.log" | tee -a "$OUT/summary.log"
    python3 - "$OUT/ep_decode_np$ranks.json" "$ranks" <<'PY' 2>&1 | tee -a "$OUT/summary.log"
import json, sys
for line in json.load(open(sys.argv[1])):
    if line["name"] == "load":
        print(f"ep-decode EP{sys.argv[2]}: load {line['seconds']:.1f} s, resident GB per rank "
              f"{[round(b / 1e9, 2) for b in line.get('resident_bytes_per_rank', [line['resident_bytes']])]}")
    elif line["name"] == "decode":
        print(f"ep-decode EP{sys.argv[2]} batch {line['batch']}/GPU: {line['ms_per_step']:.2f} ms/step, "
              f"{line['tokens_per_s']:.1f} tokens/s, graph replays {line['graph_replays']}")
PY
  done
fi

if wants bench; then
  log "bench: expert FFN kernels"
  timeout 120 "$BUILD/kernels/cuda/epic_expert_ffn_bench" --quick > "$OUT/expert_ffn_bench.log" 2>&1 || status=1
  tail -12 "$OUT/expert_ffn_bench.log" | tee -a "$OUT/summary.log"
  log "bench: attention kernels"
  timeout 180 "$BUILD/kernels/cuda/epic_attention_bench" > "$OUT/attention_bench.log" 2>&1 || status=1
  tail -16 "$OUT/attention_bench.log" | tee -a "$OUT/summary.log"
  log "bench: epic"
  OUT="$OUT" bash launch/bench/run_gpu_bench.sh "$BUILD" --quick --only epic --budget 420 >> "$OUT/summary.log" 2>&1 ||
    status=1
fi
if wants ffn; then
  log "ffn: expert FFN kernels at decode sizes (checks first)"
  timeout 150 "$BUILD/kernels/cuda/epic_expert_ffn_bench" --tokens 1,8,32,64,128,256,512 \
    > "$OUT/expert_ffn_decode.log" 2>&1 || status=1
  grep -E "^ +[0-9]+ |FAIL|PASS|WRONG|failed" "$OUT/expert_ffn_decode.log" | tee -a "$OUT/summary.log"
fi
if wants profile; then
  log "profile: expert FFN paths at prefill sizes"
  timeout 150 "$BUILD/kernels/cuda/epic_expert_ffn_bench" --tokens 2048,4096,8192,16384 \
    > "$OUT/expert_ffn_prefill.log" 2>&1 || status=1
  grep -E "^ +[0-9]+ |FAIL|PASS" "$OUT/expert_ffn_prefill.log" | tail -40 | tee -a "$OUT/summary.log"
  log "profile: decode batch 1, 8 layers, per op (no graphs)"
  EPIC_CUDA_OP_TIMING=1 timeout 120 "$BUILD/epic" bench-decode --backend cuda --precision bf16 \
    --random-weights qwen3-30b-a3b --layers 8 --batch 1 --prompt-tokens 32 --new-tokens 32 \
    --no-cuda-graphs > "$OUT/profile_decode_1.log" 2>&1 || status=1
  sed -n '/EPIC_CUDA_OP_TIMING/,$p' "$OUT/profile_decode_1.log" | head -30 | tee -a "$OUT/summary.log"
fi
if wants ncu; then
  for batch in 1 256; do
    log "ncu: decode batch $batch, 2 layers, graph nodes, card clocks, warm caches"
    timeout 240 /usr/local/cuda/bin/ncu --graph-profiling node --clock-control none --cache-control none \
      --metrics gpu__time_duration.sum --csv "$BUILD/epic" bench-decode --backend cuda --precision bf16 \
      --random-weights qwen3-30b-a3b --layers 2 --batch "$batch" --prompt-tokens 32 --new-tokens 3 \
      > "$OUT/ncu_decode_$batch.csv" 2> "$OUT/ncu_decode_$batch.err" || status=1
    python3 tests/gpu/ncu_step_table.py "$OUT/ncu_decode_$batch.csv" | tee -a "$OUT/summary.log"
  done
fi
if wants profile || wants ab; then
  # Each switch off and on, all else equal (graphs on): the A/B of one optimisation.
  for switch in ${AB_SWITCHES:-EPIC_CUDA_PDL}; do
    for value in 0 1; do
      log "ab: decode steps, 8 layers, graphs, $switch=$value"
      env "$switch=$value" timeout 150 "$BUILD/epic" bench-decode --backend cuda --precision bf16 \
        --random-weights qwen3-30b-a3b --layers 8 --batch 1,16,64,256 --prompt-tokens 32 --new-tokens 32 \
        > "$OUT/ab_${switch}_$value.jsonl" 2>&1 || status=1
      grep -o '"batch":[0-9]*\|"ms_per_step":[0-9.]*' "$OUT/ab_${switch}_$value.jsonl" | paste - - |
        tee -a "$OUT/summary.log"
    done
  done
fi
if wants ncu-moe; then
  tokens=${NCU_MOE_TOKENS:-16384}
  log "ncu-moe: one MoE layer, $tokens tokens, 2 calls, card clocks, warm caches"
  # --no-check: the self-check's extra forwards would join the per-kernel table.
  timeout 300 /usr/local/cuda/bin/ncu --clock-control none --cache-control none \
    --metrics gpu__time_duration.sum --csv "$BUILD/epic" bench-moe --backend cuda --precision bf16 \
    --preset qwen3-30b-a3b --layers 1 --tokens-per-worker "$tokens" --iterations 1 --warmup 1 --no-check \
    > "$OUT/ncu_moe_$tokens.csv" 2> "$OUT/ncu_moe_$tokens.err" || status=1
  python3 tests/gpu/ncu_kernels.py "$OUT/ncu_moe_$tokens.csv" | tee -a "$OUT/summary.log"
fi
if wants moe-ab; then
  for switch in ${AB_SWITCHES:-EPIC_CUDA_BATCHED_FFN}; do
    for tokens in ${MOE_TOKENS:-2048 4096 16384}; do
      for value in 0 1; do
        log "moe-ab: one MoE layer, $tokens tokens, $switch=$value"
        env "$switch=$value" timeout 120 "$BUILD/epic" bench-moe --backend cuda --precision bf16 \
          --preset qwen3-30b-a3b --layers 4 --tokens-per-worker "$tokens" --iterations 20 --warmup 3 \
          > "$OUT/moe_ab_${switch}_${value}_$tokens.log" 2>&1 || status=1
        grep -E "ms|FAIL|WRONG|error" "$OUT/moe_ab_${switch}_${value}_$tokens.log" | tail -4 | tee -a "$OUT/summary.log"
      done
    done
  done
fi
if wants baselines; then
  log "bench: torch / transformers baselines"
  OUT="$OUT" bash launch/bench/run_gpu_bench.sh "$BUILD" --quick --only baselines --budget 420 >> "$OUT/summary.log" 2>&1 ||
    status=1
fi
log "done, status $status"
exit $status
