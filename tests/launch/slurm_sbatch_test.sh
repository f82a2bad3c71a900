#!/usr/bin/env bash
# End to end through Slurm: a private one-node cluster (local_slurm.sh) runs the project's own
# launch/slurm/epic_run.sbatch with sbatch; the job's stdout must equal, byte for byte, the stdout
# of the same `epic run` in one plain process.
# Usage: tests/launch/slurm_sbatch_test.sh [EPIC_BINARY [NUM_TASKS]]   (or the env variables)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
sbatch_template="$repo_root/launch/slurm/epic_run.sbatch"

epic_binary="${1:-${EPIC_BINARY:-}}"
num_tasks="${2:-${EPIC_LAUNCH_TEST_NUM_TASKS:-1}}"
# Bound on the job, from submission to a final state (start to finish is about 5 s here).
job_timeout_s="${EPIC_SLURM_JOB_TIMEOUT:-120}"

log() { echo "slurm_sbatch_test: $*" >&2; }
fail() {
  log "FAIL: $*"
  [[ -z "${LOCAL_SLURM_DIR:-}" ]] || local_slurm_diagnostics
  exit 1
}

[[ -n "$epic_binary" ]] || { log "usage: slurm_sbatch_test.sh EPIC_BINARY [NUM_TASKS]"; exit 2; }
[[ -x "$epic_binary" ]] || fail "epic binary '$epic_binary' is missing or not executable"
epic_binary="$(cd "$(dirname "$epic_binary")" && pwd)/$(basename "$epic_binary")"
[[ "$num_tasks" =~ ^[1-9][0-9]*$ ]] || fail "NUM_TASKS must be a positive integer, got '$num_tasks'"

# shellcheck source=tests/launch/local_slurm.sh
source "$here/local_slurm.sh"
# shellcheck source=tests/launch/reference_run.sh
source "$here/reference_run.sh"
local_slurm_require_installed ||
  fail "Slurm is not installed: run 'bash launch/setup_debian.sh' (it installs slurm-wlm)"
# The OpenMPI settings of a root, 2-core, loopback-only host (ENVIRONMENT.md); srun passes them on.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1
export OMPI_MCA_btl_vader_single_copy_mechanism=none

# More tasks than cores is slow but valid: the node then offers one CPU per task (Slurm refuses
# --ntasks-per-node above the node's CPUs, --overcommit or not).
if ((num_tasks > $(nproc))); then export LOCAL_SLURM_NUM_CPUS="$num_tasks"; fi
local_slurm_start || fail "the local Slurm cluster did not start"
work_dir="$LOCAL_SLURM_DIR/work"
mkdir -p "$work_dir"
make_reference_run "$work_dir" "$epic_binary"

# The template's #SBATCH lines are overridden here; its variables come through the environment.
sbatch_options=(--parsable --job-name=epic-launch-test --chdir="$work_dir"
  --nodes=1 --ntasks-per-node="$num_tasks" --cpus-per-task=1 --time=00:05:00
  --output="$work_dir/job.out" --error="$work_dir/job.err")
# EPIC_ARGS is split like a shell line by the template: quote every word (paths may hold spaces).
epic_args_line=""
for arg in "${epic_run_args[@]}"; do
  [[ "$arg" != *"'"* ]] || fail "cannot quote an argument holding a single quote: $arg"
  epic_args_line+=" '$arg'"
done
submit_output="$(EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" EPIC_ARGS="$epic_args_line" \
  timeout 30 sbatch "${sbatch_options[@]}" "$sbatch_template" 2>&1)" ||
  fail "sbatch failed: $submit_output"
job_id="${submit_output%%;*}"
[[ "$job_id" =~ ^[0-9]+$ ]] || fail "sbatch printed no job id: $submit_output"
log "submitted job $job_id ($num_tasks tasks); waiting up to ${job_timeout_s}s"

deadline=$((SECONDS + job_timeout_s))
job_state=""
while :; do
  job_info="$(timeout 10 scontrol show job -o "$job_id" 2>&1)" || job_info=""
  [[ "$job_info" =~ JobState=([A-Z_]+) ]] && job_state="${BASH_REMATCH[1]}"
  case "$job_state" in
    PENDING | CONFIGURING | RUNNING | COMPLETING | SUSPENDED | "") ;;
    *) break ;;
  esac
  if ((SECONDS >= deadline)); then
    timeout 10 scancel "$job_id" || true
    [[ ! -s "$work_dir/job.err" ]] || { log "job stderr:"; cat "$work_dir/job.err" >&2; }
    fail "job $job_id still '$job_state' after ${job_timeout_s}s (cancelled): $job_info"
  fi
  sleep 0.2
done
[[ "$job_info" =~ ExitCode=([0-9]+:[0-9]+) ]] && exit_code="${BASH_REMATCH[1]}" || exit_code="?"
log "job $job_id ended: JobState=$job_state ExitCode=$exit_code"
if [[ "$job_state" != COMPLETED || "$exit_code" != "0:0" ]]; then
  log "job stderr ($work_dir/job.err):"
  cat "$work_dir/job.err" >&2 2>/dev/null || log "(no job stderr file)"
  fail "job $job_id did not succeed: JobState=$job_state ExitCode=$exit_code"
fi

expect_reference_output "$work_dir" "$work_dir/job.out" "$work_dir/job.err" "$num_tasks-task sbatch job"
