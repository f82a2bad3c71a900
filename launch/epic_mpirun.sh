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

echo "epic_mpirun: mpirun ${mpirun_args[*]} $epic_binary $*" >&2
exec mpirun "${mpirun_args[@]}" "$epic_binary" "$@"
