// `epic run`: one-shot generation on one process (the CPU reference backend).
#include <chrono>
#include <cstdio>
#include <filesystem>

#include "coordinator/tokenizer.h"
#include "kernels/backend.h"
#include "kernels/error.h"
#include "launch/cli_commands.h"
#include "launch/id_list.h"
#include "worker/checkpoint.h"
#include "worker/model_config.h"
#include "worker/model_runner.h"
#include "worker/model_weights.h"
#include "worker/npy_file.h"
#include "worker/sampler.h"

namespace epic::cli {

int run_command(const RunArgs& args) {
  namespace fs = std::filesystem;
  using clock = std::chrono::steady_clock;
  if (args.prompt.has_value() == args.prompt_ids.has_value())
    throw Error(ErrorCode::kInvalidArgument, "give exactly one of --prompt TEXT or --prompt-ids 1,2,3");
  if (args.max_new_tokens < 0)
    throw Error(ErrorCode::kInvalidArgument, "--max-new-tokens must be >= 0, got " + std::to_string(args.max_new_tokens));
  Sampler sampler({args.temperature, args.top_p, args.seed});  // validates the sampling flags early
  if (!args.logits_out.empty()) {
    const fs::path parent = fs::absolute(args.logits_out).parent_path();
    if (!fs::is_directory(parent))
      throw Error(ErrorCode::kInvalidArgument, "--logits-out " + args.logits_out + ": folder " + parent.string() + " does not exist");
  }

  const fs::path model_dir = args.model_dir;
  const ModelConfig config = ModelConfig::load(model_dir);
  std::optional<Tokenizer> tokenizer;
  if (fs::exists(model_dir / "tokenizer.json")) tokenizer = Tokenizer::load(model_dir / "tokenizer.json");

  std::vector<int32_t> prompt;
  if (args.prompt) {
    if (args.prompt->empty()) throw Error(ErrorCode::kInvalidArgument, "--prompt is empty; give some text");
    if (!tokenizer)
      throw Error(ErrorCode::kInvalidArgument, model_dir.string() +
                                                   " has no tokenizer.json, so --prompt cannot be encoded; use --prompt-ids 1,2,3");
    prompt = tokenizer->encode(*args.prompt);
    if (prompt.empty()) throw Error(ErrorCode::kInvalidArgument, "--prompt encodes to no tokens");
  } else {
    prompt = parse_id_list(*args.prompt_ids, "--prompt-ids");
  }
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] >= config.vocab_size)
      throw Error(ErrorCode::kInvalidArgument, "prompt token " + std::to_string(prompt[i]) + " (position " + std::to_string(i) +
                                                   ") is outside the model's vocabulary [0, " + std::to_string(config.vocab_size) + ")");

  const auto load_start = clock::now();
  Checkpoint checkpoint = Checkpoint::open(model_dir);
  LoadOptions load_options;
  load_options.allow_missing_experts = args.allow_missing_experts;
  const ModelWeights weights = load_model_weights(config, checkpoint, load_options);
  const double load_seconds = std::chrono::duration<double>(clock::now() - load_start).count();

  auto backend = make_cpu_backend();
  ModelRunner runner(config, weights, *backend);
  const auto run_start = clock::now();
  const GenerationResult result = generate(runner, prompt, args.max_new_tokens, sampler, !args.logits_out.empty());
  const double run_seconds = std::chrono::duration<double>(clock::now() - run_start).count();

  if (!args.logits_out.empty())
    write_npy_f32(args.logits_out, {static_cast<int64_t>(prompt.size()), config.vocab_size}, result.prompt_logits);
  if (tokenizer)
    std::printf("%s\n", tokenizer->decode(result.new_ids).c_str());
  else
    std::printf("%s\n", join_ids(result.new_ids).c_str());
  std::fflush(stdout);
  std::fprintf(stderr,
               "epic run: %zu prompt tokens, %zu generated in %.3f s; weights: %.3f MB read from %zu shard(s) in "
               "%.2f s, %.3f MB resident; backend %s, 1 worker\n",
               prompt.size(), result.new_ids.size(), run_seconds, weights.bytes_read / 1e6, checkpoint.num_shards(),
               load_seconds, weights.resident_bytes() / 1e6, backend->name().c_str());
  return 0;
}

}  // namespace epic::cli
