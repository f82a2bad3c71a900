#!/usr/bin/env bash
# Sourced by the launch tests: the single-process `epic run` that a launched run must reproduce
# byte for byte, and the comparison. Both functions report through the caller's log and fail.

# make_reference_run WORK_DIR EPIC_BINARY: makes the tiny model (WORK_DIR/model), a prompt-ids
# file, and WORK_DIR/reference.out; sets model_dir and epic_run_args for the launched run.
make_reference_run() {
  local work_dir="$1" epic_binary="$2"
  model_dir="$work_dir/model"
  # Prompts of different lengths, greedy: the output is a pure function of model and prompts, and
  # with several ranks the sequences spread over workers whose outputs must come back in order.
  printf '%s\n' 1,2,3 150,40 7,7,7,7,7,7,7,7,7 33 12,99,5,61 >"$work_dir/prompt_ids.txt"
  epic_run_args=(--prompt-ids-file "$work_dir/prompt_ids.txt" --max-new-tokens 8)
  "$epic_binary" make-model --preset tiny --seed 1 --out "$model_dir" >"$work_dir/make_model.log" 2>&1 ||
    { cat "$work_dir/make_model.log" >&2; fail "epic make-model failed (log above)"; }
  "$epic_binary" run --model "$model_dir" "${epic_run_args[@]}" \
    >"$work_dir/reference.out" 2>"$work_dir/reference.err" ||
    { cat "$work_dir/reference.err" >&2; fail "the single-process reference run failed (stderr above)"; }
  [[ -s "$work_dir/reference.out" ]] || fail "the reference run printed nothing: nothing to compare"
}

# expect_reference_output WORK_DIR STDOUT_FILE STDERR_FILE WHAT: STDOUT_FILE must equal
# WORK_DIR/reference.out; on a mismatch, the diff and the launched run's stderr, then fail.
expect_reference_output() {
  local work_dir="$1" out="$2" err="$3" what="$4"
  if ! cmp -s "$work_dir/reference.out" "$out"; then
    log "$what stdout differs from the single-process run (--- reference, +++ $what):"
    diff -u "$work_dir/reference.out" "$out" >&2 || true
    log "$what stderr:"
    cat "$err" >&2
    fail "$what output != single-process output"
  fi
  log "PASS: $what printed exactly the single-process output ($(wc -c <"$work_dir/reference.out") bytes)"
}
