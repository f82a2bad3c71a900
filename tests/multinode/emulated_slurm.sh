# shellcheck shell=bash
# Sourced by the multinode Slurm tests: a real Slurm over emulated nodes (tests/multinode/emulated_nodes.sh):
# slurmctld on this machine listening on the bridge, one slurmd per node in the node's network namespace
# under its host name, with a /tmp of its own for PMIx. Needs multinode_setup (multinode_common.sh) first.
#
#   emulated_slurm_start DIR NODES SUBNET CPUS_PER_NODE [FAKE_GPUS_PER_NODE]
#       makes the nodes (DIR/nodes) and the cluster (DIR/slurm), exports SLURM_CONF; fails the test when a
#       daemon does not come up in time. FAKE_GPUS_PER_NODE > 0 declares that many `gpu` gres per node
#       backed by plain files (DIR/slurm/fake-gpu/nvidia*): Slurm allocates and binds them (it sets
#       CUDA_VISIBLE_DEVICES per task) though no GPU exists, so what a batch script asks of Slurm can be
#       checked here; nothing can compute on them.
#   emulated_slurm_stop          stops the controller and removes the nodes (their slurmd, step daemons and
#                                tasks die with the namespaces); the caller's EXIT trap calls it
#   emulated_slurm_wait_job ID SECONDS
#       waits for job ID to reach a final state (cancels it and fails the test past SECONDS); sets job_state,
#       job_exit_code ("0:0") and job_info (scontrol's line)
# multinode_here, nodes_script, log and fail come from multinode_common.sh, sourced first.
# shellcheck disable=SC2154
# shellcheck source=tests/launch/local_slurm.sh
source "$multinode_here/../launch/local_slurm.sh"  # local_slurm_common_conf: the settings every test cluster shares

emulated_slurm_ctld_pid=""
emulated_slurm_nodes_dir=""

emulated_slurm_start() {
  local dir=$1 nodes=$2 subnet=$3 cpus=$4 fake_gpus=${5:-0}
  local tool
  for tool in slurmctld slurmd sbatch srun scontrol sinfo squeue nsenter; do
    command -v "$tool" > /dev/null || fail "$tool not found: run 'bash launch/setup_debian.sh' (slurm-wlm, util-linux)"
  done
  local name
  for name in $(compgen -e); do  # a test run inside a Slurm job must not inherit that job's settings
    [[ "$name" =~ ^(SLURM_|SBATCH_|SRUN_|SALLOC_) ]] && unset "$name"
  done
  emulated_slurm_nodes_dir="$dir/nodes"
  local slurm_dir="$dir/slurm"
  SLOTS_PER_NODE=$cpus bash "$nodes_script" up "$emulated_slurm_nodes_dir" "$nodes" "$subnet"

  # The controller listens on the bridge's address; every slurmd in its namespace uses the same port.
  local ctld_port slurmd_port
  read -r ctld_port slurmd_port < <(python3 -c '
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("", 0))
print(*[s.getsockname()[1] for s in sockets])')
  mkdir -p "$slurm_dir/state" "$slurm_dir/tmp"
  : > "$slurm_dir/plugstack.conf"
  local node_list gres_types="" node_gres="" k
  node_list=$(seq -f 'node%g' 1 "$nodes" | paste -sd ,)
  if ((fake_gpus > 0)); then
    # slurmd takes only character or block devices as gres files ("not a valid character or block device"):
    # copies of /dev/null's node (1:3), never opened without cgroups. One set serves every node, as each
    # node's own /dev/nvidia* would.
    mkdir -p "$slurm_dir/fake-gpu"
    for k in $(seq 0 $((fake_gpus - 1))); do
      mknod "$slurm_dir/fake-gpu/nvidia$k" c 1 3 || fail "mknod of a fake GPU device failed (a nodev file system?)"
    done
    gres_types="GresTypes=gpu"
    node_gres="Gres=gpu:$fake_gpus"
    # slurmd reads gres.conf next to slurm.conf; AutoDetect=off: no NVML here.
    printf '%s\n' "AutoDetect=off" \
      "NodeName=node[1-$nodes] Name=gpu File=$slurm_dir/fake-gpu/nvidia[0-$((fake_gpus - 1))]" > "$slurm_dir/gres.conf"
  fi
  {
    cat << CONF
# Written by tests/multinode/emulated_slurm.sh: emulated nodes, root, no authentication.
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
$gres_types
CONF
    for k in $(seq 1 "$nodes"); do
      echo "NodeName=node$k NodeAddr=$subnet.$k CPUs=$cpus $node_gres State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$node_list Default=YES MaxTime=INFINITE State=UP"
  } > "$slurm_dir/slurm.conf"
  export SLURM_CONF="$slurm_dir/slurm.conf"

  slurmctld -D -c -f "$SLURM_CONF" < /dev/null > "$slurm_dir/slurmctld.stderr" 2>&1 &
  emulated_slurm_ctld_pid=$!
  disown "$emulated_slurm_ctld_pid"  # stopped by emulated_slurm_stop; no job-control notice when it is
  local deadline=$((SECONDS + 30))
  until timeout 5 scontrol ping 2> /dev/null | grep -q "is UP"; do
    kill -0 "$emulated_slurm_ctld_pid" 2> /dev/null ||
      { cat "$slurm_dir/slurmctld.stderr" >&2; fail "slurmctld exited during start-up"; }
    ((SECONDS < deadline)) || fail "slurmctld did not answer within 30 s"
    sleep 0.2
  done
  # Each slurmd: the node's network namespace (nsenter keeps this machine's mounts, cgroups included), its
  # host name, and a /tmp of its own (PMIx makes per-step folders under TmpFS, the same path on every node).
  local ns
  for k in $(seq 1 "$nodes"); do
    ns=$(awk -v n="node$k" '$1 == n { print $2 }' "$emulated_slurm_nodes_dir/nodes")
    mkdir -p "$slurm_dir/tmp-node$k" "$slurm_dir/spool-node$k"
    # shellcheck disable=SC2016  # the inner shell expands $0..$3
    nsenter --net="/run/netns/$ns" unshare --uts --mount /bin/sh -c \
      'hostname "$0"; mount --bind "$1" "$2" && exec slurmd -D -N "$0" -f "$3"' \
      "node$k" "$slurm_dir/tmp-node$k" "$slurm_dir/tmp" "$SLURM_CONF" < /dev/null > "$slurm_dir/slurmd-$k.stderr" 2>&1 &
    disown $!  # killed with its node's namespace by emulated_slurm_stop
  done
  until [[ "$(timeout 5 sinfo -h -o '%T %D' 2> /dev/null)" == "idle $nodes" ]]; do
    ((SECONDS < deadline + 30)) || { tail -5 "$slurm_dir"/slurmd-*.stderr >&2; fail "the nodes did not come up idle"; }
    sleep 0.2
  done
  log "slurmctld and $nodes slurmd up: $(sinfo -h -N -o '%N=%T' | paste -sd ' ')"
}

# A test's scratch folder in $work_dir (world-readable: the job steps run from it) and the traps that stop the
# cluster and remove the folder on every exit path (EPIC_KEEP_SLURM_DIR=1 keeps the folder to look at).
# Usage: emulated_slurm_scratch NAME_PREFIX
emulated_slurm_scratch() {
  work_dir="$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")"
  chmod 755 "$work_dir"
  trap emulated_slurm_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}
emulated_slurm_cleanup() {
  emulated_slurm_stop
  if [[ "${EPIC_KEEP_SLURM_DIR:-0}" == 1 ]]; then log "kept $work_dir"; else rm -rf "$work_dir"; fi
}

# OpenMPI over TCP between the emulated nodes, on the test network only (srun passes the environment to the
# tasks). Usage: emulated_slurm_mpi_env SUBNET
emulated_slurm_mpi_env() {
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader,tcp
  export OMPI_MCA_btl_tcp_if_include="$1.0/24" OMPI_MCA_oob_tcp_if_include="$1.0/24"
  export OMPI_MCA_btl_vader_single_copy_mechanism=none
}

emulated_slurm_stop() {
  local - # the caller's `set -e` must not cut the clean-up short
  set +e
  if [[ -n "$emulated_slurm_ctld_pid" ]] && kill "$emulated_slurm_ctld_pid" 2> /dev/null; then
    local _
    for _ in $(seq 1 25); do
      kill -0 "$emulated_slurm_ctld_pid" 2> /dev/null || break
      sleep 0.2
    done
    kill -9 "$emulated_slurm_ctld_pid" 2> /dev/null
  fi
  emulated_slurm_ctld_pid=""
  # Kills what runs in the nodes (slurmd, step daemons, tasks) and removes them by name.
  [[ -z "$emulated_slurm_nodes_dir" ]] || bash "$nodes_script" down "$emulated_slurm_nodes_dir"
  emulated_slurm_nodes_dir=""
}

emulated_slurm_wait_job() {
  local job_id=$1 timeout_s=$2 deadline=$((SECONDS + $2))
  while :; do
    job_info="$(timeout 10 scontrol show job -o "$job_id" 2>&1)" || job_info=""
    [[ "$job_info" =~ JobState=([A-Z_]+) ]] && job_state="${BASH_REMATCH[1]}" || job_state=""
    case "$job_state" in PENDING | CONFIGURING | RUNNING | COMPLETING | REQUEUED | SUSPENDED | "") ;; *) break ;; esac
    if ((SECONDS >= deadline)); then
      timeout 10 scancel "$job_id"
      fail "job $job_id still '$job_state' after $timeout_s s (cancelled)"
    fi
    sleep 0.2
  done
  # shellcheck disable=SC2034  # job_exit_code, like job_state and job_info, is for the caller
  [[ "$job_info" =~ ExitCode=([0-9]+:[0-9]+) ]] && job_exit_code="${BASH_REMATCH[1]}" || job_exit_code="?"
}
