#!/usr/bin/env bash
# Starts epic on N MPI ranks of this host (or a hostfile's hosts): mpirun -np N build/epic ARGS.
# Usage: launch/epic_mpirun.sh -n NUM_RANKS [--] EPIC_ARGS...   (see usage() for the knobs)
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

usage() {
  cat >&2 <<EOF
usage: launch/epic_mpirun.sh -n NUM_RANKS [--] EPIC_ARGS...
  Runs: mpirun -np NUM_RANKS \$EPIC_BINARY EPIC_ARGS...
  e.g.  launch/epic_mpirun.sh -n 2 run --model build/models/tiny --prompt-ids 1,2,3

environment:
  EPIC_BINARY=PATH       the epic executable (default: $repo_root/build/epic)
  EPIC_OVERSUBSCRIBE=1   allow more ranks than cores (mpirun --oversubscribe); off by default
                         because an oversubscribed rank is slow, not wrong, and hides mistakes
  EPIC_MPIRUN_ARGS=...   extra mpirun options, split at whitespace (e.g. "--hostfile hosts")
  EPIC_MPIRUN_END_GRACE=S  end mpirun S seconds (default 30) after epic reported the job's error, if
                         it still runs then (it can wait without bound for a node it cannot reach)
Always set: --bind-to none, -x NCCL_NVLS_ENABLE=0, and --allow-run-as-root when run as root.
EOF
}

die_usage() {
  echo "epic_mpirun: $1" >&2
  usage
  exit 2
}

[[ $# -ge 1 ]] || die_usage "missing -n NUM_RANKS"
case "$1" in
  -h | --help) usage; exit 0 ;;
  -n | -np | --np) ;;
  *) die_usage "the first argument must be -n NUM_RANKS, got '$1'" ;;
esac
[[ $# -ge 2 ]] || die_usage "-n needs a value (the number of ranks)"
num_ranks="$2"
[[ "$num_ranks" =~ ^[1-9][0-9]*$ ]] || die_usage "NUM_RANKS must be a positive integer, got '$num_ranks'"
shift 2
[[ "${1:-}" == "--" ]] && shift
[[ $# -ge 1 ]] || die_usage "no epic arguments given (e.g. run --model DIR --prompt-ids 1,2)"

epic_binary="${EPIC_BINARY:-$repo_root/build/epic}"
if [[ ! -x "$epic_binary" ]]; then
  echo "epic_mpirun: epic binary '$epic_binary' is missing or not executable;" \
    "build it with launch/build.sh or point EPIC_BINARY at it" >&2
  exit 2
fi
if ! command -v mpirun >/dev/null; then
  echo "epic_mpirun: mpirun not found; install OpenMPI with launch/setup_debian.sh" >&2
  exit 2
fi

mpirun_args=(-np "$num_ranks"
  # Each rank runs its own thread pool (CPU backend) or host threads (CUDA); OpenMPI's default
  # binds np <= 2 ranks to one core each, which would serialise those threads.
  --bind-to none
  # NVLink SHARP (multicast) must stay off on the lent GPU machines; harmless elsewhere.
  -x NCCL_NVLS_ENABLE=0)
if [[ $(id -u) -eq 0 ]]; then mpirun_args+=(--allow-run-as-root); fi
if [[ "${EPIC_OVERSUBSCRIBE:-0}" == "1" ]]; then mpirun_args+=(--oversubscribe); fi
if [[ -n "${EPIC_MPIRUN_ARGS:-}" ]]; then
  read -r -a extra_args <<<"$EPIC_MPIRUN_ARGS"
  mpirun_args+=("${extra_args[@]}")
fi

grace="${EPIC_MPIRUN_END_GRACE:-30}"
[[ "$grace" =~ ^[1-9][0-9]*$ ]] ||
  die_usage "EPIC_MPIRUN_END_GRACE must be a positive number of seconds, got '$grace'"

echo "epic_mpirun: mpirun ${mpirun_args[*]} $epic_binary $*" >&2
# mpirun has no bound on waiting for a node it cannot reach any more (a cut link): after epic has reported
# the job's error and called MPI_Abort, mpirun may wait minutes for that node's daemon. So mpirun runs as a
# child whose stderr passes through here: EPIC_MPIRUN_END_GRACE seconds after the first "epic: error" line
# (or mpirun's own "MPI_ABORT was invoked", should epic's line not arrive), an mpirun still running is ended
# (SIGTERM, then SIGKILL) with a note, and this script exits 1. Ctrl-C / SIGTERM go to mpirun.
fifo_dir="$(mktemp -d "${TMPDIR:-/tmp}/epic-mpirun.XXXXXX")"
mkfifo "$fifo_dir/stderr"
mpirun "${mpirun_args[@]}" "$epic_binary" "$@" 2>"$fifo_dir/stderr" &
mpirun_pid=$!

# Passes mpirun's stderr through, line by line; the first error line arms the watchdog.
relay_stderr() {
  local line armed=0
  while IFS= read -r line || [[ -n "$line" ]]; do
    printf '%s\n' "$line" >&2
    if ((armed == 0)) && [[ "$line" == *"epic: error"* || "$line" == *"MPI_ABORT was invoked"* ]]; then
      armed=1
      (
        sleep "$grace"
        kill -0 "$mpirun_pid" 2>/dev/null || exit 0
        echo "epic_mpirun: mpirun still runs ${grace} s after the job's error above (it waits for a node" \
          "it cannot reach); ending it (EPIC_MPIRUN_END_GRACE sets the wait)" >&2
        : >"$fifo_dir/ended"
        kill -TERM "$mpirun_pid" 2>/dev/null
        sleep 5
        kill -KILL "$mpirun_pid" 2>/dev/null
      ) &
    fi
  done
}
relay_stderr <"$fifo_dir/stderr" &
relay_pid=$!

# Ctrl-C / SIGTERM go to mpirun; `wait` returns early for a trapped signal, so wait again until it is gone.
trap 'kill -TERM "$mpirun_pid" 2>/dev/null || true' INT TERM
status=0
while :; do
  status=0
  wait "$mpirun_pid" 2>/dev/null || status=$?  # (quiet: mpirun may crash on the way out when ended)
  kill -0 "$mpirun_pid" 2>/dev/null || break
done
# mpirun is gone. Processes it left on a node it could not reach may hold the pipe open for ever: give the
# relay a moment to pass on what is written, then stop it and its watchdog.
for _ in $(seq 1 20); do
  kill -0 "$relay_pid" 2>/dev/null || break
  sleep 0.1
done
pkill -P "$relay_pid" 2>/dev/null || true
kill "$relay_pid" 2>/dev/null || true
# Ended here: the job failed as reported above, whatever mpirun's own status on the way out.
[[ -e "$fifo_dir/ended" ]] && status=1
rm -rf "$fifo_dir"
exit "$status"
