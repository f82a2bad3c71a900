#!/usr/bin/env bash
# Every test on a fresh Debian 12 machine: install dependencies, build (CUDA compiled where nvcc
# exists), run the whole CTest suite; then the same suite built with ASan+UBSan (gcc), then every
# libFuzzer target for a bounded time (clang, ASan+UBSan). CUDA tests skip visibly without a GPU.
# .ci/run calls this; CI runs every stage. Exit status: non-zero when any stage fails.
# Local knobs (CI sets none): EPIC_SKIP_SANITIZERS=1 skips the ASan+UBSan test stage,
# EPIC_SKIP_FUZZ=1 the fuzz stage, EPIC_FUZZ_SECONDS (default 60) is the time per fuzz target.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
jobs="${EPIC_TEST_JOBS:-2}"

bash "$repo_root/launch/setup_debian.sh"

results=()
failures=0
# run_stage NAME COMMAND...: prints the stage, its time and result; a failure is recorded, and the
# later stages still run so one CI log shows every problem.
run_stage() {
  local name="$1" start status
  shift
  echo
  echo "=== stage: $name"
  start=$(date +%s)
  set +e
  ( set -e; "$@" )
  status=$?
  set -e
  local line
  if [ $status -eq 0 ]; then line="PASSED"; else line="FAILED (exit $status)"; failures=$((failures + 1)); fi
  line="stage $name: $line in $(( $(date +%s) - start )) s"
  echo "=== $line"
  results+=("$line")
}

plain_tests() {
  bash "$repo_root/launch/build.sh"
  cd "$repo_root/build"
  ctest --output-on-failure -j "$jobs" --timeout 600
}

# The whole suite again with AddressSanitizer + UndefinedBehaviorSanitizer (gcc, no CUDA).
sanitizer_tests() {
  EPIC_BUILD_DIR="$repo_root/build-asan" bash "$repo_root/launch/build.sh" \
    -DEPIC_ENABLE_CUDA=OFF -DEPIC_SANITIZE=address,undefined
  cd "$repo_root/build-asan"
  # Leak checking is off: every MPI process reports OpenMPI's exit-time leaks from MCA components
  # it dlopen()ed and unloaded again, whose frames show as "<unknown module>", which no suppression
  # can match (measured: 133 such reports, none in epic's code). Every memory error (ASan) and every
  # undefined behaviour (UBSan) still fails the test. tests/sanitizers/lsan.supp holds the
  # suppressions for a local run with detect_leaks=1 of the tests without MPI.
  # The environment reaches every rank: mpirun and srun pass it on to the processes they start.
  ASAN_OPTIONS="detect_leaks=0:halt_on_error=1" \
  LSAN_OPTIONS="suppressions=$repo_root/tests/sanitizers/lsan.supp:print_suppressions=0" \
  UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    ctest --output-on-failure -j "$jobs" --timeout 1200
}

# Every fuzz target for EPIC_FUZZ_SECONDS, after replaying the corpus and the saved findings.
fuzz_targets() {
  command -v clang++ >/dev/null || { echo "clang++ not found: launch/setup_debian.sh installs clang"; exit 1; }
  local build_dir="$repo_root/build-fuzz"
  mkdir -p "$build_dir"
  cmake -S "$repo_root" -B "$build_dir" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DEPIC_ENABLE_CUDA=OFF \
    -DEPIC_BUILD_FUZZERS=ON >"$build_dir/configure.log" 2>&1 || { cat "$build_dir/configure.log"; exit 1; }
  cmake --build "$build_dir" -j "${EPIC_BUILD_JOBS:-$(nproc)}" --target epic_fuzzers
  bash "$repo_root/tests/fuzz/run_fuzzers.sh" "$build_dir"
}

run_stage "build and test" plain_tests
if [ "${EPIC_SKIP_SANITIZERS:-0}" = 1 ]; then
  results+=("stage sanitizer tests: SKIPPED (EPIC_SKIP_SANITIZERS=1)")
else
  run_stage "sanitizer tests (ASan+UBSan)" sanitizer_tests
fi
if [ "${EPIC_SKIP_FUZZ:-0}" = 1 ]; then
  results+=("stage fuzz: SKIPPED (EPIC_SKIP_FUZZ=1)")
else
  run_stage "fuzz (${EPIC_FUZZ_SECONDS:-60} s per target, ASan+UBSan)" fuzz_targets
fi

echo
echo "=== summary"
printf '%s\n' "${results[@]}"
[ "$failures" -eq 0 ]
