#!/usr/bin/env bash
# End to end through launch/epic_mpirun.sh: its stdout for `epic run` on NUM_RANKS ranks must equal,
# byte for byte, that of one plain process; its bad-argument handling must fail with usage (exit 2).
# Usage: tests/launch/mpirun_test.sh [EPIC_BINARY [NUM_RANKS]]   (or the env variables)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$here/../.." && pwd)"
launcher="$repo_root/launch/epic_mpirun.sh"
# shellcheck source=tests/launch/reference_run.sh
source "$here/reference_run.sh"

epic_binary="${1:-${EPIC_BINARY:-}}"
num_ranks="${2:-${EPIC_LAUNCH_TEST_NUM_TASKS:-1}}"
run_timeout_s="${EPIC_MPIRUN_TEST_TIMEOUT:-120}"

log() { echo "mpirun_test: $*" >&2; }
fail() {
  log "FAIL: $*"
  exit 1
}

[[ -n "$epic_binary" ]] || { log "usage: mpirun_test.sh EPIC_BINARY [NUM_RANKS]"; exit 2; }
[[ -x "$epic_binary" ]] || fail "epic binary '$epic_binary' is missing or not executable"
[[ "$num_ranks" =~ ^[1-9][0-9]*$ ]] || fail "NUM_RANKS must be a positive integer, got '$num_ranks'"
command -v mpirun >/dev/null || fail "mpirun not found: run 'bash launch/setup_debian.sh' (openmpi-bin)"

work_dir="$(mktemp -d "${TMPDIR:-/tmp}/epic-mpirun-test.XXXXXX")"
trap 'rm -rf "$work_dir"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Bad arguments: exit 2 and a usage line, before anything is launched.
check_usage_error() {
  local expected="$1"
  shift
  local rc=0
  EPIC_BINARY="$epic_binary" timeout 10 "$launcher" "$@" >"$work_dir/usage.out" 2>"$work_dir/usage.err" ||
    rc=$?
  if [[ $rc -ne 2 ]] || ! grep -q "usage: launch/epic_mpirun.sh" "$work_dir/usage.err" ||
    ! grep -qF "$expected" "$work_dir/usage.err"; then
    cat "$work_dir/usage.err" >&2
    fail "epic_mpirun.sh $* exited $rc; want 2 with usage and '$expected' on stderr (above)"
  fi
}
check_usage_error "missing -n NUM_RANKS"
check_usage_error "must be a positive integer" -n 0 run
check_usage_error "must be a positive integer" -n two run
check_usage_error "no epic arguments" -n 2
check_usage_error "the first argument must be -n" run --model x

# The OpenMPI settings of a root, 2-core, loopback-only host (ENVIRONMENT.md).
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OMPI_MCA_btl=self,vader OMPI_MCA_pml=ob1 OMPI_MCA_btl_vader_single_copy_mechanism=none
# Oversubscribe only when it is needed, through the launcher's own switch.
((num_ranks <= $(nproc))) || export EPIC_OVERSUBSCRIBE=1

make_reference_run "$work_dir" "$epic_binary"

rc=0
EPIC_BINARY="$epic_binary" timeout "$run_timeout_s" "$launcher" -n "$num_ranks" \
  run --model "$model_dir" "${epic_run_args[@]}" >"$work_dir/mpirun.out" 2>"$work_dir/mpirun.err" || rc=$?
if [[ $rc -ne 0 ]]; then
  cat "$work_dir/mpirun.err" >&2
  [[ $rc -eq 124 ]] && fail "epic_mpirun.sh -n $num_ranks did not finish within ${run_timeout_s}s"
  fail "epic_mpirun.sh -n $num_ranks exited $rc (stderr above)"
fi
expect_reference_output "$work_dir" "$work_dir/mpirun.out" "$work_dir/mpirun.err" "$num_ranks-rank epic_mpirun.sh"
