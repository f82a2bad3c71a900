// The `epic` executable: subcommands make-model, run, tokenize, detokenize.
// Exit codes: 0 success, 2 bad flags or input, 1 any other failure.
#include <cstdio>

#include <CLI/CLI.hpp>

#include "kernels/error.h"
#include "launch/cli_commands.h"

int main(int argc, char** argv) {
  using namespace epic::cli;
  CLI::App app{"epic: Expert-Parallel Inference Cluster for Mixture-of-Experts models"};
  app.require_subcommand(1);

  MakeModelArgs make_args;
  CLI::App* make = app.add_subcommand("make-model", "Write a random checkpoint from a preset in configs/presets");
  make->add_option("--preset", make_args.preset, "Preset name (tiny, qwen3-30b-a3b, qwen3-omni-30b-a3b-thinker) or file")->required();
  make->add_option("--out", make_args.out_dir, "Output model directory (new or empty)")->required();
  make->add_option("--seed", make_args.seed, "Random seed; same seed, same weights")->capture_default_str();
  make->add_option("--tokenizer", make_args.tokenizer_json, "tokenizer.json to copy (default: the Qwen3 one set-up installed)");
  make->add_option("--layers", make_args.layers, "Keep only the first N layers (a slice of a large preset)");

  RunArgs run_args;
  CLI::App* run = app.add_subcommand("run", "Generate from a prompt (one-shot job)");
  run->add_option("--model", run_args.model_dir, "Hugging Face model directory")->required();
  auto* prompt = run->add_option("--prompt", run_args.prompt, "Prompt text (needs DIR/tokenizer.json)");
  auto* prompt_ids = run->add_option("--prompt-ids", run_args.prompt_ids, "Prompt token ids, e.g. 1,2,3");
  prompt->excludes(prompt_ids);
  run->add_option("--max-new-tokens", run_args.max_new_tokens, "Tokens to generate")->capture_default_str();
  run->add_option("--temperature", run_args.temperature, "0 = greedy")->capture_default_str();
  run->add_option("--top-p", run_args.top_p, "Nucleus sampling mass in (0, 1]")->capture_default_str();
  run->add_option("--seed", run_args.seed, "Sampling seed")->capture_default_str();
  run->add_option("--logits-out", run_args.logits_out, "Write prompt logits [prompt_len, vocab] as float32 .npy");
  run->add_flag("--allow-missing-experts", run_args.allow_missing_experts,
                "Mask experts absent from the checkpoint out of routing instead of failing");

  TokenizeArgs tokenize_args;
  CLI::App* tokenize = app.add_subcommand("tokenize", "Print the token ids of a text");
  tokenize->add_option("--model", tokenize_args.model_dir, "Directory holding tokenizer.json")->required();
  auto* text = tokenize->add_option("--text", tokenize_args.text, "Text to encode");
  auto* file = tokenize->add_option("--file", tokenize_args.file, "File whose contents to encode");
  text->excludes(file);

  DetokenizeArgs detokenize_args;
  CLI::App* detokenize = app.add_subcommand("detokenize", "Print the text of token ids");
  detokenize->add_option("--model", detokenize_args.model_dir, "Directory holding tokenizer.json")->required();
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
    if (*tokenize) return tokenize_command(tokenize_args);
    if (*detokenize) return detokenize_command(detokenize_args);
  } catch (const epic::Error& e) {
    std::fprintf(stderr, "epic: error [%s]: %s\n", epic::error_code_name(e.code()), e.what());
    const bool bad_input = e.code() != epic::ErrorCode::kInternal && e.code() != epic::ErrorCode::kIo;
    return bad_input ? 2 : 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "epic: error [internal]: %s\n", e.what());
    return 1;
  }
  return 2;
}
