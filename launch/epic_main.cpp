// The `epic` executable: subcommands make-model, run, plan, bench-moe, tokenize, detokenize.
// Exit codes: 0 success, 2 bad flags or input, 1 any other failure.
#include <CLI/CLI.hpp>
#include <cstdio>

#include "kernels/error.h"
#include "launch/cli_commands.h"
#include "launch/rank_agreement.h"

namespace epic::cli {

int exit_code_for(ErrorCode code) {
  switch (code) {
    case ErrorCode::kIo:
    case ErrorCode::kInternal:
    case ErrorCode::kTimeout:
    case ErrorCode::kCommunication:
      return 1;
    default:
      return 2;
  }
}

void print_error(const Error& error) {
  std::fprintf(stderr, "epic: error [%s]: %s\n", error_code_name(error.code()), error.what());
  std::fflush(stderr);
}

}  // namespace epic::cli

int main(int argc, char** argv) {
  using namespace epic::cli;
  CLI::App app{"epic: Expert-Parallel Inference Cluster for Mixture-of-Experts models"};
  app.require_subcommand(1);

  MakeModelArgs make_args;
  CLI::App* make =
      app.add_subcommand("make-model", "Write a random checkpoint from a preset in configs/presets");
  make->add_option("--preset", make_args.preset,
                   "Preset name (tiny, qwen3-30b-a3b, qwen3-omni-30b-a3b-thinker) or file")
      ->required();
  make->add_option("--out", make_args.out_dir, "Output model directory (new or empty)")->required();
  make->add_option("--seed", make_args.seed, "Random seed; same seed, same weights")->capture_default_str();
  make->add_option("--tokenizer", make_args.tokenizer_json,
                   "tokenizer.json to copy (default: the Qwen3 one set-up installed)");
  make->add_option("--layers", make_args.layers, "Keep only the first N layers (a slice of a large preset)");

  RunArgs run_args;
  CLI::App* run = app.add_subcommand("run", "Generate from a prompt (one-shot job)");
  run->add_option("--model", run_args.model_dir, "Hugging Face model directory")->required();
  auto* prompt = run->add_option("--prompt", run_args.prompt, "Prompt text (needs DIR/tokenizer.json)");
  auto* prompt_ids = run->add_option("--prompt-ids", run_args.prompt_ids, "Prompt token ids, e.g. 1,2,3");
  auto* prompts_file =
      run->add_option("--prompts-file", run_args.prompts_file, "File with one text prompt per line");
  auto* prompt_ids_file = run->add_option("--prompt-ids-file", run_args.prompt_ids_file,
                                          "File with one id list (1,2,3) per line");
  prompt->excludes(prompt_ids)->excludes(prompts_file)->excludes(prompt_ids_file);
  prompt_ids->excludes(prompts_file)->excludes(prompt_ids_file);
  prompts_file->excludes(prompt_ids_file);
  run->add_option("--max-new-tokens", run_args.max_new_tokens, "Tokens to generate")->capture_default_str();
  run->add_option("--temperature", run_args.temperature, "0 = greedy")->capture_default_str();
  run->add_option("--top-p", run_args.top_p, "Nucleus sampling mass in (0, 1]")->capture_default_str();
  run->add_option("--seed", run_args.seed, "Sampling seed")->capture_default_str();
  run->add_option("--logits-out", run_args.logits_out,
                  "Write prompt logits [prompt_len, vocab] as float32 .npy");
  run->add_flag("--allow-missing-experts", run_args.allow_missing_experts,
                "Mask experts absent from the checkpoint out of routing instead of failing");
  run->add_option("--slots", run_args.slots,
                  "Expert slots per worker per MoE layer (spare slots hold replicas)");
  run->add_option("--budget-bytes", run_args.budget_bytes, "Expert memory per worker, instead of --slots");
  run->add_option("--load-profile", run_args.load_profile,
                  "Plan the placement from this load profile (JSON)");
  run->add_option("--load-profile-out", run_args.load_profile_out,
                  "Write tokens per (layer, expert) as JSON");
  run->add_option("--placement-out", run_args.placement_out, "Write the placement plan used, as JSON");
  run->add_option("--report-out", run_args.report_out,
                  "Write the per-worker report (bytes, phase times) as JSON");
  run->add_option("--comm-timeout", run_args.comm_timeout_seconds, "Seconds any wait between ranks may take")
      ->capture_default_str();

  PlanArgs plan_args;
  CLI::App* plan =
      app.add_subcommand("plan", "Plan the expert placement over N workers and print it as JSON");
  plan->add_option("--model", plan_args.model_dir, "Hugging Face model directory")->required();
  plan->add_option("--workers", plan_args.workers, "Number of workers")->required();
  auto* plan_slots = plan->add_option("--slots", plan_args.slots, "Expert slots per worker per MoE layer");
  auto* plan_budget = plan->add_option("--budget-bytes", plan_args.budget_bytes, "Expert memory per worker");
  plan_slots->excludes(plan_budget);
  plan->add_option("--load-profile", plan_args.load_profile,
                   "Load profile JSON from `epic run --load-profile-out`");
  plan->add_flag("--allow-missing-experts", plan_args.allow_missing_experts,
                 "Leave missing experts unplaced");
  plan->add_option("--out", plan_args.out, "Also save the plan JSON to this file");

  BenchMoeArgs bench_args;
  CLI::App* bench = app.add_subcommand("bench-moe", "Time MoE layers across the ranks of the job, per phase");
  bench->add_option("--preset", bench_args.preset, "Shapes from this preset")->capture_default_str();
  bench->add_option("--tokens-per-worker", bench_args.tokens_per_worker, "Token rows each worker routes")
      ->capture_default_str();
  bench->add_option("--layers", bench_args.layers, "MoE layers per iteration")->capture_default_str();
  bench->add_option("--iterations", bench_args.iterations, "Timed iterations")->capture_default_str();
  bench->add_option("--warmup", bench_args.warmup, "Untimed iterations first")->capture_default_str();
  bench->add_option("--slots", bench_args.slots, "Expert slots per worker per layer (spare slots: replicas)");
  bench->add_option("--seed", bench_args.seed, "Seed of the random weights and tokens")
      ->capture_default_str();
  bench->add_option("--threads", bench_args.threads, "CPU threads per rank (0: cores / ranks on the node)");
  bench->add_option("--csv", bench_args.csv_out, "Append one CSV line per worker to this file");
  bench->add_option("--json", bench_args.json_out, "Write the results as JSON");
  bench->add_option("--comm-timeout", bench_args.comm_timeout_seconds,
                    "Seconds any wait between ranks may take");

  TokenizeArgs tokenize_args;
  CLI::App* tokenize = app.add_subcommand("tokenize", "Print the token ids of a text");
  tokenize->add_option("--model", tokenize_args.model_dir, "Directory holding tokenizer.json")->required();
  auto* text = tokenize->add_option("--text", tokenize_args.text, "Text to encode");
  auto* file = tokenize->add_option("--file", tokenize_args.file, "File whose contents to encode");
  text->excludes(file);

  DetokenizeArgs detokenize_args;
  CLI::App* detokenize = app.add_subcommand("detokenize", "Print the text of token ids");
  detokenize->add_option("--model", detokenize_args.model_dir, "Directory holding tokenizer.json")
      ->required();
  detokenize->add_option("--ids", detokenize_args.ids, "Token ids, e.g. 1,2,3")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  try {
    if (*make) return make_model_command(make_args);
    if (*run) return run_command(run_args);
    if (*plan) return plan_command(plan_args);
    if (*bench) return bench_moe_command(bench_args);
    if (*tokenize) return tokenize_command(tokenize_args);
    if (*detokenize) return detokenize_command(detokenize_args);
  } catch (const SilentFailure& failure) {
    return failure.exit_code;  // rank 0 reports an error that every rank raised
  } catch (const epic::Error& e) {
    print_error(e);
    return exit_code_for(e.code());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "epic: error [internal]: %s\n", e.what());
    return 1;
  }
  return 2;
}
