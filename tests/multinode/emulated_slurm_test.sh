#!/usr/bin/env bash
# A real Slurm over emulated nodes (issue 9): slurmctld on this machine, one slurmd per emulated node
# (tests/multinode/emulated_nodes.sh; each slurmd in its node's network namespace under the node's host
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
# shellcheck source=tests/launch/local_slurm.sh
source "$here/../launch/local_slurm.sh"  # its common slurm.conf settings

multinode_setup emulated_slurm_test "$@"
job_timeout_s=120
for tool in slurmctld slurmd sbatch scontrol sinfo nsenter; do
  command -v "$tool" > /dev/null || fail "$tool not found: run 'bash launch/setup_debian.sh' (slurm-wlm, util-linux)"
done
for name in $(compgen -e); do  # a test run inside a Slurm job must not inherit that job's settings
  [[ "$name" =~ ^(SLURM_|SBATCH_|SRUN_|SALLOC_) ]] && unset "$name"
done

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/epic-slurm-nodes.XXXXXX")"
chmod 755 "$work_dir"
nodes_dir="$work_dir/nodes"
slurm_dir="$work_dir/slurm"
ctld_pid=""
cleanup() {
  set +e
  [[ -n "$ctld_pid" ]] && kill "$ctld_pid" 2> /dev/null && sleep 0.5 && kill -9 "$ctld_pid" 2> /dev/null
  bash "$nodes_script" down "$nodes_dir"  # kills what runs in the nodes: slurmd, step daemons, tasks
  [[ "${EPIC_KEEP_SLURM_DIR:-0}" == 1 ]] && log "kept $work_dir" || rm -rf "$work_dir"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

make_reference_run "$work_dir" "$epic_binary"
SLOTS_PER_NODE=$ranks_per_node bash "$nodes_script" up "$nodes_dir" "$num_nodes" "$subnet"

# The controller listens on the bridge's address; every slurmd in its namespace uses the same port.
read -r ctld_port slurmd_port < <(python3 -c '
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("", 0))
print(*[s.getsockname()[1] for s in sockets])')
mkdir -p "$slurm_dir/state" "$slurm_dir/tmp"
: > "$slurm_dir/plugstack.conf"
node_list=$(seq -f 'node%g' 1 "$num_nodes" | paste -sd ,)
{
  cat << CONF
# Written by tests/multinode/emulated_slurm_test.sh: emulated nodes, root, no authentication.
ClusterName=epic-nodes
SlurmctldHost=localhost($subnet.254)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$slurm_dir/state
SlurmdSpoolDir=$slurm_dir/spool-%n
TmpFS=$slurm_dir/tmp
SlurmctldPidFile=$slurm_dir/slurmctld.pid
SlurmdPidFile=$slurm_dir/slurmd-%n.pid
SlurmctldLogFile=$slurm_dir/slurmctld.log
SlurmdLogFile=$slurm_dir/slurmd-%n.log
$(local_slurm_common_conf "$slurm_dir")
SlurmdParameters=config_overrides
CONF
  for k in $(seq 1 "$num_nodes"); do
    echo "NodeName=node$k NodeAddr=$subnet.$k CPUs=$ranks_per_node State=UNKNOWN"
  done
  echo "PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP"
} > "$slurm_dir/slurm.conf"
export SLURM_CONF="$slurm_dir/slurm.conf"

slurmctld -D -c -f "$SLURM_CONF" < /dev/null > "$slurm_dir/slurmctld.stderr" 2>&1 &
ctld_pid=$!
disown "$ctld_pid"  # stopped by cleanup; no job-control notice when it is
deadline=$((SECONDS + 30))
until timeout 5 scontrol ping 2> /dev/null | grep -q "is UP"; do
  kill -0 "$ctld_pid" 2> /dev/null || { cat "$slurm_dir/slurmctld.stderr" >&2; fail "slurmctld exited during start-up"; }
  ((SECONDS < deadline)) || fail "slurmctld did not answer within 30 s"
  sleep 0.2
done
# Each slurmd: the node's network namespace (nsenter keeps this machine's mounts, cgroups included), its
# host name, and a /tmp of its own (PMIx makes per-step folders under TmpFS, the same path on every node).
for k in $(seq 1 "$num_nodes"); do
  ns=$(awk -v n="node$k" '$1 == n { print $2 }' "$nodes_dir/nodes")
  mkdir -p "$slurm_dir/tmp-node$k" "$slurm_dir/spool-node$k"
  nsenter --net="/run/netns/$ns" unshare --uts --mount /bin/sh -c \
    'hostname "$0"; mount --bind "$1" "$2" && exec slurmd -D -N "$0" -f "$3"' \
    "node$k" "$slurm_dir/tmp-node$k" "$slurm_dir/tmp" "$SLURM_CONF" < /dev/null > "$slurm_dir/slurmd-$k.stderr" 2>&1 &
  disown $!  # killed with its node's namespace at cleanup
done
until [[ "$(timeout 5 sinfo -h -o '%T %D' 2> /dev/null)" == "idle $num_nodes" ]]; do
  ((SECONDS < deadline + 30)) || { tail -5 "$slurm_dir"/slurmd-*.stderr >&2; fail "the nodes did not come up idle"; }
  sleep 0.2
done
log "slurmctld and $num_nodes slurmd up: $(sinfo -h -N -o '%N=%T' | paste -sd ' ')"

# The template, as a user would submit it: OpenMPI over TCP between the nodes (the test network only).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp
export OMPI_MCA_btl_tcp_if_include="$subnet.0/24" OMPI_MCA_oob_tcp_if_include="$subnet.0/24"
export OMPI_MCA_btl_vader_single_copy_mechanism=none
epic_args_line=""
for arg in "${epic_run_args[@]}" --report-out "$work_dir/report.json"; do epic_args_line+=" '$arg'"; done
submit_output="$(cd "$work_dir" && EPIC_BINARY="$epic_binary" MODEL_DIR="$model_dir" EPIC_ARGS="$epic_args_line" \
  timeout 30 sbatch --parsable --nodes="$num_nodes" --ntasks-per-node="$ranks_per_node" --cpus-per-task=1 \
  --output="$work_dir/job.out" --error="$work_dir/job.err" "$repo_root/launch/slurm/epic_run.sbatch" 2>&1)" ||
  fail "sbatch failed: $submit_output"
job_id="${submit_output%%;*}"
[[ "$job_id" =~ ^[0-9]+$ ]] || fail "sbatch printed no job id: $submit_output"
deadline=$((SECONDS + job_timeout_s))
while :; do
  job_info="$(timeout 10 scontrol show job -o "$job_id" 2>&1)" || job_info=""
  [[ "$job_info" =~ JobState=([A-Z_]+) ]] && job_state="${BASH_REMATCH[1]}" || job_state=""
  case "$job_state" in PENDING | CONFIGURING | RUNNING | COMPLETING | "") ;; *) break ;; esac
  ((SECONDS < deadline)) || { timeout 10 scancel "$job_id"; fail "job $job_id still '$job_state' after ${job_timeout_s} s"; }
  sleep 0.2
done
[[ "$job_info" =~ ExitCode=([0-9]+:[0-9]+) ]] && exit_code="${BASH_REMATCH[1]}" || exit_code="?"
if [[ "$job_state" != COMPLETED || "$exit_code" != "0:0" ]]; then
  cat "$work_dir/job.err" >&2 2> /dev/null
  fail "job $job_id did not succeed: JobState=$job_state ExitCode=$exit_code"
fi
expect_reference_output "$work_dir" "$work_dir/job.out" "$work_dir/job.err" "sbatch -N $num_nodes job"
hosts=$(python3 -c "import json,sys; print(' '.join(sorted({w['host'] for w in json.load(open(sys.argv[1]))['workers']})))" \
  "$work_dir/report.json")
[[ "$hosts" == "$(seq -f 'node%g' 1 "$num_nodes" | paste -sd ' ')" ]] || fail "the ranks ran on '$hosts'"
log "PASS: sbatch --nodes $num_nodes --ntasks-per-node $ranks_per_node (srun --mpi=pmix) on $hosts"
