#!/usr/bin/env bash
# launch/slurm/epic_cluster.sbatch (the template for real GPU clusters) submitted to a real Slurm over emulated
# nodes (tests/multinode/emulated_slurm.sh), each node declaring 2 fake GPUs (gres backed by device nodes that
# are not GPUs), checked end to end:
#   - `epic run` on NODES nodes x 2 tasks (CPU backend) prints exactly the single-process output into the
#     job's epic-JOBID.out, writes epic-JOBID.report.json (ranks on every node) and epic-JOBID.job.json, and
#     leaves nothing else; bench-decode likewise writes its per-job JSON;
#   - a job requeued (`scontrol requeue`) after its first attempt wrote complete-looking partial files restarts
#     from scratch: `epic run` and `epic bench-moe` (whose --csv appends) publish exactly one attempt's results;
#   - the GPU layout: with --gpus-per-task=1 the template's check step sees each task bound to one GPU of its
#     own (Slurm's CUDA_VISIBLE_DEVICES) and refuses to start epic on nodes without an NVIDIA driver (exit 2);
#     the launch line carries the binding; bad layouts and inputs end the job with exit 2 and the fix.
# Exit 77 (skipped, reason printed) without network namespaces; fails, saying how to install it, without
# Slurm. Everything started is stopped and everything made removed on every exit path.
# Usage: tests/multinode/emulated_slurm_templates_test.sh EPIC_BINARY NODES SUBNET
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
template="$repo_root/launch/slurm/epic_cluster.sbatch"
# shellcheck source=tests/multinode/multinode_common.sh
source "$here/multinode_common.sh"
# shellcheck source=tests/multinode/emulated_slurm.sh
source "$here/emulated_slurm.sh"

multinode_setup emulated_slurm_templates_test "$@"
job_timeout_s=120
fake_gpus_per_node=2
num_tasks=$((num_nodes * ranks_per_node))
# Is a real NVIDIA driver on this machine? Then the fake GPUs' ids name real ones and the template's
# no-driver refusal cannot be provoked (the other checks still run).
has_driver=0
[[ ! -e /dev/nvidiactl ]] || has_driver=1

emulated_slurm_scratch epic-slurm-templates
start_seconds=$SECONDS

# Outside Slurm the template refuses at once (no cluster needed).
rc=0
env -u SLURM_JOB_ID bash "$template" > /dev/null 2> "$work_dir/outside.err" || rc=$?
if [[ $rc != 2 ]] || ! grep -q "not inside a Slurm job" "$work_dir/outside.err"; then
  cat "$work_dir/outside.err" >&2
  fail "outside Slurm: exit $rc, want 2 and 'not inside a Slurm job'"
fi
log "PASS: outside a Slurm job the template exits 2: $(tail -1 "$work_dir/outside.err")"

make_reference_run "$work_dir" "$epic_binary"
emulated_slurm_start "$work_dir" "$num_nodes" "$subnet" "$ranks_per_node" "$fake_gpus_per_node"

# OpenMPI between the nodes as the template runs it (srun passes the environment to the tasks).
emulated_slurm_mpi_env "$subnet"
# The template splits EPIC_ARGS like a shell line: quote every word (paths may hold spaces).
quote_words() {
  local line="" word
  for word in "$@"; do line+=" '$word'"; done
  echo "$line"
}
run_args_line="$(quote_words "${epic_run_args[@]}")"

# submit NAME VAR=VALUE... -- SBATCH_OPTIONS...: the template submitted as a user would, from its own folder
# $work_dir/NAME (the job's working directory: its log and results land there); prints the job id.
submit() {
  local name=$1 variables=() output
  shift
  while [[ $# -gt 0 && "$1" != -- ]]; do variables+=("$1"); shift; done
  shift
  mkdir -p "$work_dir/$name"
  output="$(cd "$work_dir/$name" && env "${variables[@]}" timeout 30 sbatch --parsable --time=00:05:00 "$@" \
    "$template" 2>&1)" || fail "sbatch for $name failed: $output"
  [[ "${output%%;*}" =~ ^[0-9]+$ ]] || fail "sbatch for $name printed no job id: $output"
  echo "${output%%;*}"
}
# expect_job NAME JOB_ID STATE EXIT_CODE: waits for the job, fails (its log shown) unless it ended so.
expect_job() {
  local name=$1 job_id=$2 want_state=$3 want_exit=$4
  emulated_slurm_wait_job "$job_id" "$job_timeout_s"
  if [[ "$job_state" != "$want_state" || "$job_exit_code" != "$want_exit" ]]; then
    cat "$work_dir/$name/epic-$job_id.log" >&2 2> /dev/null || log "(no log $work_dir/$name/epic-$job_id.log)"
    fail "$name: job $job_id ended $job_state $job_exit_code, want $want_state $want_exit (its log above)"
  fi
}
# expect_log NAME JOB_ID PATTERN...: every extended regular expression matches a line of the job's log.
expect_log() {
  local name=$1 job_id=$2 pattern
  shift 2
  for pattern in "$@"; do
    grep -Eq -- "$pattern" "$work_dir/$name/epic-$job_id.log" ||
      { cat "$work_dir/$name/epic-$job_id.log" >&2; fail "$name: job $job_id's log has no line matching '$pattern'"; }
  done
}
# expect_files NAME FILE...: the job's folder holds exactly these files (no partial folder, nothing else).
expect_files() {
  local name=$1 listing want
  shift
  listing="$(cd "$work_dir/$name" && find . -mindepth 1 -printf '%P\n' | sort | paste -sd ' ')"
  want="$(printf '%s\n' "$@" | sort | paste -sd ' ')"
  [[ "$listing" == "$want" ]] || fail "$name: the folder holds '$listing', want exactly '$want'"
}
json_field() {  # json_field FILE PYTHON_EXPRESSION_OF_d
  python3 -c "import json, sys; d = json.load(open(sys.argv[1])); print($2)" "$1"
}
expected_hosts="$(seq -f 'node%g' 1 "$num_nodes" | paste -sd ' ')"
layout=(--nodes="$num_nodes" --ntasks-per-node="$ranks_per_node" --cpus-per-task=1)

# ---- 1. epic run on NODES x 2 tasks, CPU backend: the single-process output, per-job report. ----
job=$(submit run EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" EPIC_BACKEND=cpu EPIC_ARGS="$run_args_line" \
  -- "${layout[@]}" --gpus-per-task=0)
expect_job run "$job" COMPLETED 0:0
expect_reference_output "$work_dir" "$work_dir/run/epic-$job.out" "$work_dir/run/epic-$job.log" \
  "epic_cluster.sbatch run, $num_nodes nodes x $ranks_per_node tasks"
expect_files run "epic-$job.log" "epic-$job.out" "epic-$job.report.json" "epic-$job.job.json"
hosts=$(json_field "$work_dir/run/epic-$job.report.json" "' '.join(sorted({w['host'] for w in d['workers']}))")
[[ "$hosts" == "$expected_hosts" ]] || fail "run: the report's ranks ran on '$hosts', want '$expected_hosts'"
workers=$(json_field "$work_dir/run/epic-$job.report.json" "len(d['workers'])")
[[ "$workers" == "$num_tasks" ]] || fail "run: the report has $workers workers, want $num_tasks"
summary=$(json_field "$work_dir/run/epic-$job.job.json" "d['nodes'], d['tasks'], d['attempt'], d['command']")
[[ "$summary" == "$num_nodes $num_tasks 1 run" ]] || fail "run: job.json says '$summary'"
expect_log run "$job" "attempt 1 \(SLURM_RESTART_COUNT=0\)" "launch: srun --mpi=pmix --cpus-per-task=1 .* run --model"
log "PASS: run: $num_tasks ranks on $hosts, epic-$job.out equal to one process, report and job.json written"

# ---- 2. Requeued mid-job: the restart starts clean (run, and bench-moe whose CSV appends). ----
# The first attempt's tasks run epic to the end (its files are in the partial folder), mark it, then stop
# themselves so the job is still running; the second attempt (SLURM_RESTART_COUNT=1) just runs epic.
marks_dir="$work_dir/marks"
mkdir -p "$marks_dir"
cat > "$work_dir/epic_first_attempt_stops.sh" << WRAPPER
#!/usr/bin/env bash
set -euo pipefail
if [[ "\${SLURM_RESTART_COUNT:-0}" == 0 ]]; then
  "$epic_binary" "\$@"
  touch "$marks_dir/\$SLURM_JOB_ID.rank\$SLURM_PROCID"
  kill -STOP \$\$
  exit 0
fi
exec "$epic_binary" "\$@"
WRAPPER
chmod +x "$work_dir/epic_first_attempt_stops.sh"

# requeue_after_first_attempt NAME JOB_ID PARTIAL_FILE: waits for every task's mark (and the partial file),
# requeues the job, and starts it again soon (Slurm holds a requeued job back some 2 minutes otherwise).
requeue_after_first_attempt() {
  local name=$1 job_id=$2 partial_file=$3 deadline=$((SECONDS + job_timeout_s))
  until (($(find "$marks_dir" -name "$job_id.rank*" | wc -l) == num_tasks)); do
    if ((SECONDS >= deadline)) ||
      ! [[ "$(timeout 10 scontrol show job -o "$job_id")" =~ JobState=(PENDING|RUNNING) ]]; then
      cat "$work_dir/$name/epic-$job_id.log" >&2
      fail "$name: the first attempt of job $job_id ended or hung before every task ran epic to the end (log above)"
    fi
    sleep 0.2
  done
  [[ -s "$work_dir/$name/epic-$job_id.partial/$partial_file" ]] ||
    fail "$name: the first attempt left no $partial_file in the partial folder: nothing stale to test against"
  timeout 10 scontrol requeue "$job_id" || fail "$name: scontrol requeue $job_id failed"
  # Started again within the second its nodes revoked the old credential, Slurm kills it ("Job credential
  # revoked"): that is what its hold-back is for. Wait for the nodes to be idle, then past that second.
  until [[ "$(timeout 10 scontrol show job -o "$job_id")" =~ JobState=PENDING &&
    "$(timeout 10 sinfo -h -o '%T %D')" == "idle $num_nodes" ]]; do
    ((SECONDS < deadline)) || fail "$name: job $job_id not pending on idle nodes after the requeue"
    sleep 0.2
  done
  sleep 2
  timeout 10 scontrol update jobid="$job_id" starttime=now || fail "$name: could not start job $job_id again"
}

job=$(submit requeue_run EPIC_BINARY="$work_dir/epic_first_attempt_stops.sh" MODEL_DIR="$model_dir" \
  EPIC_BACKEND=cpu EPIC_ARGS="$run_args_line" -- "${layout[@]}" --gpus-per-task=0)
requeue_after_first_attempt requeue_run "$job" report.json
expect_job requeue_run "$job" COMPLETED 0:0
expect_reference_output "$work_dir" "$work_dir/requeue_run/epic-$job.out" "$work_dir/requeue_run/epic-$job.log" \
  "requeued run"
expect_files requeue_run "epic-$job.log" "epic-$job.out" "epic-$job.report.json" "epic-$job.job.json"
expect_log requeue_run "$job" "attempt 1 \(SLURM_RESTART_COUNT=0\)" "attempt 2 \(SLURM_RESTART_COUNT=1\)" \
  "attempt 2 starts clean: removing what an earlier attempt left: .*epic-$job\.partial"
attempt=$(json_field "$work_dir/requeue_run/epic-$job.job.json" "d['attempt'], d['restart_count']")
[[ "$attempt" == "2 1" ]] || fail "requeue_run: job.json says attempt/restart_count '$attempt', want '2 1'"
log "PASS: run requeued after its first attempt: attempt 2 removed the partial files, output equal to one process"

bench_args_line="$(quote_words --preset tiny --tokens-per-worker 16 --iterations 3)"
job=$(submit requeue_bench EPIC_BINARY="$work_dir/epic_first_attempt_stops.sh" EPIC_COMMAND=bench-moe \
  EPIC_BACKEND=cpu EPIC_ARGS="$bench_args_line" -- "${layout[@]}" --gpus-per-task=0)
requeue_after_first_attempt requeue_bench "$job" csv
expect_job requeue_bench "$job" COMPLETED 0:0
expect_files requeue_bench "epic-$job.log" "epic-$job.out" "epic-$job.json" "epic-$job.csv" "epic-$job.job.json"
csv="$work_dir/requeue_bench/epic-$job.csv"
# One header and one line per rank: the first attempt's lines, appended to, would make 1 + 2 x tasks.
ranks=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; ++i) if ($i == "rank") column = i; next } { print $column }' "$csv" |
  sort -n | paste -sd ' ')
[[ "$(head -1 "$csv")" == preset,workers,* && "$ranks" == "$(seq 0 $((num_tasks - 1)) | paste -sd ' ')" ]] ||
  { cat "$csv" >&2; fail "requeue_bench: the CSV (above) should hold a header and ranks 0..$((num_tasks - 1)) once"; }
workers=$(json_field "$work_dir/requeue_bench/epic-$job.json" "len(d['per_worker'])")
[[ "$workers" == "$num_tasks" ]] || fail "requeue_bench: the JSON has $workers workers, want $num_tasks"
grep -q "check: passed" "$work_dir/requeue_bench/epic-$job.out" ||
  fail "requeue_bench: no 'check: passed' in epic-$job.out"
expect_log requeue_bench "$job" "attempt 2 starts clean: removing what an earlier attempt left: .*epic-$job\.partial"
log "PASS: bench-moe requeued after its first attempt: one CSV line per rank ($num_tasks), JSON of $workers workers"

# bench-decode expert parallel over the nodes: its JSON per job.
job=$(submit decode EPIC_BINARY="$epic_binary" EPIC_COMMAND=bench-decode MODEL_DIR="$model_dir" EPIC_BACKEND=cpu \
  EPIC_ARGS="$(quote_words --batch 1,4 --new-tokens 4)" -- "${layout[@]}" --gpus-per-task=0)
expect_job decode "$job" COMPLETED 0:0
expect_files decode "epic-$job.log" "epic-$job.out" "epic-$job.json" "epic-$job.job.json"
decode_ranks=$(json_field "$work_dir/decode/epic-$job.json" "sorted({r['ranks'] for r in d if r['name'] == 'decode'})")
[[ "$decode_ranks" == "[$num_tasks]" ]] ||
  fail "decode: the JSON's decode rows ran on $decode_ranks ranks, want [$num_tasks]"
log "PASS: bench-decode over $num_tasks ranks wrote epic-$job.json"

# ---- 3. GPU layout with Slurm's gres (fake GPUs: no NVIDIA driver behind them). ----
# The check step: every task bound to one GPU of its node, a different one per local rank; then the refusal.
job=$(submit gpu_check EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" EPIC_ARGS="$run_args_line" \
  -- "${layout[@]}" --gpus-per-task=1)
if ((has_driver)); then
  emulated_slurm_wait_job "$job" "$job_timeout_s"
  log "note: this machine has an NVIDIA driver: the no-driver refusal is not provoked (job ended $job_state)"
else
  expect_job gpu_check "$job" FAILED 2:0
  for node in $expected_hosts; do
    expect_log gpu_check "$job" "GPU layout: $node: no NVIDIA driver there \(/dev/nvidiactl is missing\)"
  done
  expect_log gpu_check "$job" \
    "error: the GPU check failed \(above\); epic was not started"
  ! grep -q "launch: " "$work_dir/gpu_check/epic-$job.log" || fail "gpu_check: epic was launched after a failed check"
  expect_files gpu_check "epic-$job.log"
fi
for rank in $(seq 0 $((num_tasks - 1))); do
  node=$((rank / ranks_per_node + 1)) local_rank=$((rank % ranks_per_node))
  # per_task:1 gives a node's i-th task its i-th GPU: CUDA_VISIBLE_DEVICES holds that one id.
  expect_log gpu_check "$job" "rank $rank: node node$node, local rank $local_rank, CUDA_VISIBLE_DEVICES=$local_rank\$"
done
log "PASS: --gpus-per-task=1: each task bound to its own GPU (CUDA_VISIBLE_DEVICES = its local rank on its node)"

# Without the check step: the launch line carries the binding, and epic itself refuses (no CUDA device,
# or, in a build without CUDA such as the sanitizer build, no CUDA backend).
job=$(submit gpu_unchecked EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" EPIC_ARGS="$run_args_line" \
  EPIC_CHECK_GPUS=0 -- "${layout[@]}" --gpus-per-task=1)
emulated_slurm_wait_job "$job" "$job_timeout_s"
expect_log gpu_unchecked "$job" \
  "launch: srun --mpi=pmix --cpus-per-task=1 --gpus-per-task=1 --gpu-bind=per_task:1 .* run .*--backend cuda"
if ! ((has_driver)); then
  [[ "$job_state $job_exit_code" == "FAILED 2:0" ]] ||
    fail "gpu_unchecked: job ended $job_state $job_exit_code, want FAILED 2:0"
  expect_log gpu_unchecked "$job" \
    "epic: error \[invalid-argument\]: (rank [0-9]+: )?--backend cuda: (no CUDA device is visible|this epic was built without the CUDA backend)" \
    "epic run failed \(exit 2\): nothing published"
  [[ ! -e "$work_dir/gpu_unchecked/epic-$job.out" ]] || fail "gpu_unchecked: a failed run published epic-$job.out"
fi
log "PASS: EPIC_CHECK_GPUS=0: srun binds one GPU per task (--gpus-per-task=1 --gpu-bind=per_task:1); epic's own error"

# ---- 4. Layouts and inputs that cannot work: exit 2 with the fix, before epic starts. Run side by side. ----
declare -A refusal_job=() refusal_pattern=()
refuse() {  # refuse NAME PATTERN VAR=VALUE... -- SBATCH_OPTIONS...
  local name=$1 pattern=$2
  shift 2
  refusal_job[$name]=$(submit "$name" "$@")
  refusal_pattern[$name]=$pattern
}
one_task=(--nodes=1 --ntasks-per-node=1 --cpus-per-task=1)
refuse no_gpus "EPIC_BACKEND=cuda but Slurm gave this job no GPU on node[0-9]+: submit with --gpus-per-task=1" \
  EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" -- "${one_task[@]}" --gpus-per-task=0
refuse two_gpus_per_task "--gpus-per-task=2: epic drives one GPU per rank" \
  EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" -- "${one_task[@]}" --gpus-per-task=2
refuse shared_gpu "2 tasks on node[0-9]+ but 1 GPU\(s\) there: ranks would share a GPU; ask --ntasks-per-node=1" \
  EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" -- --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 \
  --gpus-per-task=0 --gpus-per-node=1
refuse no_binary "EPIC_BINARY '$work_dir/no-such-epic' is missing or not executable" \
  EPIC_BINARY="$work_dir/no-such-epic" MODEL_DIR="$model_dir" EPIC_BACKEND=cpu -- "${one_task[@]}" --gpus-per-task=0
refuse no_model "MODEL_DIR '$work_dir/no-such-model' has no config.json" \
  EPIC_BINARY="$epic_binary" MODEL_DIR="$work_dir/no-such-model" EPIC_BACKEND=cpu -- "${one_task[@]}" --gpus-per-task=0
refuse owned_flag "EPIC_ARGS holds --report-out, which this template sets itself" \
  EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" EPIC_BACKEND=cpu EPIC_ARGS="$run_args_line --report-out r.json" \
  -- "${one_task[@]}" --gpus-per-task=0
refuse bad_command "EPIC_COMMAND must be run, bench-moe or bench-decode, got 'serve'" \
  EPIC_BINARY="$epic_binary" EPIC_COMMAND=serve EPIC_BACKEND=cpu -- "${one_task[@]}" --gpus-per-task=0
# Results of another job under this job's id (a cluster whose ids started over): held until they are planted.
refuse foreign_results "RESULTS_DIR already holds ./epic-[0-9]+\.out though this is the first attempt" \
  EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" EPIC_BACKEND=cpu -- "${one_task[@]}" --gpus-per-task=0 --hold
echo "results of another job" > "$work_dir/foreign_results/epic-${refusal_job[foreign_results]}.out"
timeout 10 scontrol release "${refusal_job[foreign_results]}" || fail "scontrol release failed"
for name in "${!refusal_job[@]}"; do
  expect_job "$name" "${refusal_job[$name]}" FAILED 2:0
  expect_log "$name" "${refusal_job[$name]}" "epic_cluster.sbatch: error: ${refusal_pattern[$name]}"
  ! grep -q "launch: " "$work_dir/$name/epic-${refusal_job[$name]}.log" || fail "$name: epic was launched"
done
[[ "$(cat "$work_dir/foreign_results/epic-${refusal_job[foreign_results]}.out")" == "results of another job" ]] ||
  fail "foreign_results: the other job's file was touched"
log "PASS: ${#refusal_job[@]} bad layouts or inputs refused with exit 2: ${!refusal_job[*]}"
log "PASS: all in $((SECONDS - start_seconds)) s"
