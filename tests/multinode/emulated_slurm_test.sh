#!/usr/bin/env bash
# A real Slurm over emulated nodes (issue 9): slurmctld on this machine, one slurmd per emulated node
# (tests/multinode/emulated_slurm.sh: each slurmd in its node's network namespace under the node's host
# name, with a /tmp of its own for PMIx), then launch/slurm/epic_run.sbatch submitted with
# `sbatch --nodes NODES --ntasks-per-node 2`: the template's `srun --mpi=pmix` must print exactly the
# single-process output, with the ranks on distinct nodes. Exit 77 (skipped, reason printed) without
# network namespaces; fails, saying how to install it, without Slurm. Everything started is stopped and
# everything made removed on every exit path.
# Usage: tests/multinode/emulated_slurm_test.sh EPIC_BINARY NODES SUBNET
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
# shellcheck source=tests/multinode/multinode_common.sh
source "$here/multinode_common.sh"
# shellcheck source=tests/multinode/emulated_slurm.sh
source "$here/emulated_slurm.sh"

multinode_setup emulated_slurm_test "$@"
job_timeout_s=120

emulated_slurm_scratch epic-slurm-nodes

make_reference_run "$work_dir" "$epic_binary"
emulated_slurm_start "$work_dir" "$num_nodes" "$subnet" "$ranks_per_node"

# The template, as a user would submit it: OpenMPI over TCP between the nodes (the test network only).
emulated_slurm_mpi_env "$subnet"
epic_args_line=""
for arg in "${epic_run_args[@]}" --report-out "$work_dir/report.json"; do epic_args_line+=" '$arg'"; done
submit_output="$(cd "$work_dir" && EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" EPIC_ARGS="$epic_args_line" \
  timeout 30 sbatch --parsable --nodes="$num_nodes" --ntasks-per-node="$ranks_per_node" --cpus-per-task=1 \
  --output="$work_dir/job.out" --error="$work_dir/job.err" "$repo_root/launch/slurm/epic_run.sbatch" 2>&1)" ||
  fail "sbatch failed: $submit_output"
job_id="${submit_output%%;*}"
[[ "$job_id" =~ ^[0-9]+$ ]] || fail "sbatch printed no job id: $submit_output"
emulated_slurm_wait_job "$job_id" "$job_timeout_s"
if [[ "$job_state" != COMPLETED || "$job_exit_code" != "0:0" ]]; then
  cat "$work_dir/job.err" >&2 2> /dev/null
  fail "job $job_id did not succeed: JobState=$job_state ExitCode=$job_exit_code"
fi
expect_reference_output "$work_dir" "$work_dir/job.out" "$work_dir/job.err" "sbatch -N $num_nodes job"
hosts=$(python3 -c "import json,sys; print(' '.join(sorted({w['host'] for w in json.load(open(sys.argv[1]))['workers']})))" \
  "$work_dir/report.json")
[[ "$hosts" == "$(seq -f 'node%g' 1 "$num_nodes" | paste -sd ' ')" ]] || fail "the ranks ran on '$hosts'"
log "PASS: sbatch --nodes $num_nodes --ntasks-per-node $ranks_per_node (srun --mpi=pmix) on $hosts"
