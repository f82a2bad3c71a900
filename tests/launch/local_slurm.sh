#!/usr/bin/env bash
# A private one-node Slurm cluster (slurmctld + slurmd, root, auth/none) under a temp folder, on
# free loopback ports: source it and call local_slurm_start / local_slurm_stop, or run
# `tests/launch/local_slurm.sh COMMAND...` to run COMMAND against a cluster that is then stopped.
#
# After local_slurm_start: SLURM_CONF points at the cluster (sbatch, srun, squeue... use it),
# LOCAL_SLURM_DIR is its folder (logs: slurmctld.log, slurmd.log), the node is `localhost` in
# partition `debug`. LOCAL_SLURM_NUM_CPUS sets the CPUs the node offers (default: the real count;
# more lets a test run more tasks per node than there are cores). An EXIT trap stops the daemons;
# a caller that sets its own EXIT trap later must call local_slurm_stop from it. On a failure,
# local_slurm_diagnostics prints the daemons' log tails. EPIC_KEEP_SLURM_DIR=1 keeps the folder.

LOCAL_SLURM_DIR=""
LOCAL_SLURM_CTLD_PID=""
LOCAL_SLURM_SLURMD_PID=""
# Bounds on every wait, in seconds.
LOCAL_SLURM_START_TIMEOUT="${LOCAL_SLURM_START_TIMEOUT:-30}"
LOCAL_SLURM_STOP_TIMEOUT=10

local_slurm_log() { echo "local_slurm: $*" >&2; }

# Fails with the fix when the Slurm daemons or client commands are not installed.
local_slurm_require_installed() {
  local missing=() tool
  for tool in slurmctld slurmd slurmstepd sbatch srun sinfo squeue scontrol scancel; do
    command -v "$tool" >/dev/null || missing+=("$tool")
  done
  if ((${#missing[@]})); then
    local_slurm_log "missing ${missing[*]}: install Slurm with launch/setup_debian.sh" \
      "(Debian package slurm-wlm; CI installs it the same way)"
    return 1
  fi
}

# Prints the tails of the daemons' logs and the queue: call it before failing.
local_slurm_diagnostics() {
  local dir="$LOCAL_SLURM_DIR" file
  [[ -n "$dir" && -d "$dir" ]] || return 0
  echo "----- local_slurm: squeue -----" >&2
  timeout 5 squeue -a 2>&1 | tail -n 20 >&2 || true
  local daemon
  for daemon in slurmctld slurmd; do
    # Under -D a daemon writes its log to stderr too; the log file has the timestamps, stderr
    # alone has what came before the log file was opened.
    file="$dir/$daemon.log"
    [[ -s "$file" ]] || file="$dir/$daemon.stderr"
    [[ -s "$file" ]] || continue
    echo "----- local_slurm: last 40 lines of $file -----" >&2
    tail -n 40 "$file" >&2
  done
  echo "----- local_slurm: end -----" >&2
}

# Two distinct free TCP ports on the loopback (held together while chosen, so they differ).
local_slurm_free_ports() {
  python3 -c '
import socket
sockets = [socket.socket() for _ in range(2)]
for s in sockets:
    s.bind(("127.0.0.1", 0))
print(*[s.getsockname()[1] for s in sockets])'
}

# The settings every test cluster shares (root, no accounting, linuxproc, pmix...), on stdout; DIR holds
# plugstack.conf. Also used by tests/multinode/emulated_slurm_test.sh (many nodes).
local_slurm_common_conf() {
  cat <<SETTINGS
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig=$1/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmix
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
ReturnToService=2
# Finished jobs stay visible to scontrol for this long: the test reads their state and exit code.
MinJobAge=600
SETTINGS
}

local_slurm_write_conf() {
  local dir="$1" ctld_port="$2" slurmd_port="$3" num_cpus="$4" slurmd_parameters=""
  mkdir -p "$dir/state" "$dir/spool" "$dir/tmp"
  : >"$dir/plugstack.conf"
  # A node configured with more CPUs than it has is drained, unless slurm.conf is declared right.
  ((num_cpus <= $(nproc))) || slurmd_parameters="SlurmdParameters=config_overrides"
  cat >"$dir/slurm.conf" <<EOF
# Written by tests/launch/local_slurm.sh: one node, root, no authentication, loopback only.
ClusterName=epic-local
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
TmpFS=$dir/tmp
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
$(local_slurm_common_conf "$dir")
$slurmd_parameters
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$num_cpus State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
}

local_slurm_pid_alive() { [[ -n "$1" ]] && kill -0 "$1" 2>/dev/null; }

# TERM, then KILL after the bound; reaps the child.
local_slurm_stop_pid() {
  local pid="$1" name="$2" deadline=$((SECONDS + LOCAL_SLURM_STOP_TIMEOUT))
  local_slurm_pid_alive "$pid" || { wait "$pid" 2>/dev/null; return 0; }
  kill -TERM "$pid" 2>/dev/null
  while local_slurm_pid_alive "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
  if local_slurm_pid_alive "$pid"; then
    local_slurm_log "$name (pid $pid) ignored SIGTERM for ${LOCAL_SLURM_STOP_TIMEOUT}s; killing it"
    kill -KILL "$pid" 2>/dev/null
  fi
  wait "$pid" 2>/dev/null
  return 0
}

# The process ids below $1 (children, grandchildren...), one per line.
local_slurm_descendants() {
  local child
  for child in $(pgrep -P "$1"); do
    echo "$child"
    local_slurm_descendants "$child"
  done
}

local_slurm_stop() {
  local - # the caller's `set -e` must not cut the clean-up short
  set +e
  local dir="$LOCAL_SLURM_DIR"
  [[ -n "$dir" ]] || return 0
  # Jobs first, while the controller can still cancel them: a slurmstepd outlives slurmd.
  if local_slurm_pid_alive "$LOCAL_SLURM_CTLD_PID"; then
    local job_ids deadline=$((SECONDS + LOCAL_SLURM_STOP_TIMEOUT))
    job_ids="$(timeout 5 squeue -h -t all -o %i 2>/dev/null)"
    if [[ -n "$job_ids" ]]; then
      # shellcheck disable=SC2086  # one id per word
      timeout 5 scancel $job_ids 2>/dev/null
      while [[ -n "$(timeout 5 squeue -h -o %i 2>/dev/null)" ]] && ((SECONDS < deadline)); do
        sleep 0.2
      done
    fi
  fi
  local_slurm_stop_pid "$LOCAL_SLURM_SLURMD_PID" slurmd
  local_slurm_stop_pid "$LOCAL_SLURM_CTLD_PID" slurmctld
  # A step daemon that outlived the cancel (say, the controller had died): ours write to our
  # slurmd.log. Its tasks go first, then it.
  local pid fd_link
  for pid in $(pgrep -x slurmstepd); do
    for fd_link in /proc/"$pid"/fd/*; do
      [[ "$(readlink "$fd_link" 2>/dev/null)" == "$dir/slurmd.log" ]] || continue
      local tree_pids=()
      mapfile -t tree_pids < <(echo "$pid"; local_slurm_descendants "$pid")
      local_slurm_log "killing leftover slurmstepd (pid $pid) and its tasks (pids: ${tree_pids[*]})"
      kill -KILL "${tree_pids[@]}" 2>/dev/null
      break
    done
  done
  if [[ "${EPIC_KEEP_SLURM_DIR:-0}" == "1" ]]; then
    local_slurm_log "kept $dir (EPIC_KEEP_SLURM_DIR=1)"
  else
    rm -rf "$dir"
  fi
  LOCAL_SLURM_DIR=""
  LOCAL_SLURM_CTLD_PID=""
  LOCAL_SLURM_SLURMD_PID=""
  return 0
}

# Fails, saying why, unless the controller answers and the node is idle in time; the caller
# prints local_slurm_diagnostics and exits (the EXIT trap then stops what was started).
local_slurm_start() {
  local_slurm_require_installed || return 1
  [[ -z "$LOCAL_SLURM_DIR" ]] || { local_slurm_log "already started in $LOCAL_SLURM_DIR"; return 1; }
  # A cluster run from inside a Slurm job (CI on a cluster) must not inherit that job's settings.
  local name
  for name in $(compgen -e); do
    [[ "$name" =~ ^(SLURM_|SBATCH_|SRUN_|SALLOC_|SQUEUE_|SINFO_|SCONTROL_) ]] && unset "$name"
  done

  local start_seconds=$SECONDS
  LOCAL_SLURM_DIR="$(mktemp -d "${TMPDIR:-/tmp}/epic-slurm.XXXXXX")" || return 1
  chmod 755 "$LOCAL_SLURM_DIR"
  trap local_slurm_stop EXIT
  trap 'local_slurm_log "interrupted (SIGINT): stopping the cluster"; exit 130' INT
  trap 'local_slurm_log "terminated (SIGTERM): stopping the cluster"; exit 143' TERM

  local ports ctld_port slurmd_port num_cpus
  ports="$(local_slurm_free_ports)" || { local_slurm_log "could not pick free ports"; return 1; }
  read -r ctld_port slurmd_port <<<"$ports"
  num_cpus="${LOCAL_SLURM_NUM_CPUS:-$(nproc)}"
  if ! [[ "$num_cpus" =~ ^[1-9][0-9]*$ ]]; then
    local_slurm_log "LOCAL_SLURM_NUM_CPUS must be a positive integer, got '$num_cpus'"
    return 1
  fi
  local_slurm_write_conf "$LOCAL_SLURM_DIR" "$ctld_port" "$slurmd_port" "$num_cpus"
  export SLURM_CONF="$LOCAL_SLURM_DIR/slurm.conf"
  local_slurm_log "starting slurmctld (port $ctld_port) and slurmd (port $slurmd_port, $num_cpus CPUs)" \
    "in $LOCAL_SLURM_DIR"

  # -D keeps each daemon in the foreground, so $! is the daemon itself and we stop exactly it.
  slurmctld -D -c -f "$SLURM_CONF" \
    </dev/null >"$LOCAL_SLURM_DIR/slurmctld.stderr" 2>&1 &
  LOCAL_SLURM_CTLD_PID=$!
  local deadline=$((SECONDS + LOCAL_SLURM_START_TIMEOUT))
  until timeout 5 scontrol ping 2>/dev/null | grep -q "is UP"; do
    if ! local_slurm_pid_alive "$LOCAL_SLURM_CTLD_PID"; then
      local_slurm_log "slurmctld exited during start-up"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      local_slurm_log "slurmctld did not answer within ${LOCAL_SLURM_START_TIMEOUT}s"
      return 1
    fi
    sleep 0.2
  done

  # -N: the node is named localhost in slurm.conf, whatever this machine's host name is.
  slurmd -D -N localhost -f "$SLURM_CONF" \
    </dev/null >"$LOCAL_SLURM_DIR/slurmd.stderr" 2>&1 &
  LOCAL_SLURM_SLURMD_PID=$!
  local state=""
  while :; do
    state="$(timeout 5 sinfo -h -N -n localhost -o %T 2>/dev/null)"
    [[ "$state" == idle ]] && break
    if ! local_slurm_pid_alive "$LOCAL_SLURM_SLURMD_PID"; then
      local_slurm_log "slurmd exited during start-up"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      local_slurm_log "node localhost not idle within ${LOCAL_SLURM_START_TIMEOUT}s (state: '${state}')"
      return 1
    fi
    sleep 0.2
  done
  local_slurm_log "node localhost idle after $((SECONDS - start_seconds))s"
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -uo pipefail
  if [[ $# -eq 0 ]]; then
    echo "usage: tests/launch/local_slurm.sh COMMAND [ARGS...]   (e.g. bash, for a shell)" >&2
    exit 2
  fi
  local_slurm_start || { local_slurm_diagnostics; exit 1; }
  "$@"
  exit $?
fi
