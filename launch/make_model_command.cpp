// `epic make-model`: a random checkpoint from a preset, with progress on stderr.
#include <chrono>
#include <cstdio>

#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/cli_commands.h"
#include "launch/default_paths.h"
#include "worker/model_writer.h"

namespace epic::cli {

int make_model_command(const MakeModelArgs& args) {
  ModelPreset preset = load_preset(args.preset, presets_dir());
  if (args.layers) {
    if (*args.layers <= 0 || *args.layers > preset.config.num_hidden_layers)
      throw Error(ErrorCode::kInvalidArgument,
                  "--layers must be in [1, " + std::to_string(preset.config.num_hidden_layers) +
                      "] for preset " + preset.name + ", got " + std::to_string(*args.layers));
    preset.config.num_hidden_layers = *args.layers;
    std::erase_if(preset.config.mlp_only_layers, [&](int64_t layer) { return layer >= *args.layers; });
  }
  MakeModelOptions options;
  options.seed = args.seed;
  options.force = args.force;
  options.tokenizer_json =
      args.tokenizer_json.empty() ? default_tokenizer_json() : std::filesystem::path(args.tokenizer_json);
  if (!args.tokenizer_json.empty()) files::require_regular_file(args.tokenizer_json, "--tokenizer");
  const auto start = std::chrono::steady_clock::now();
  auto last_print = start - std::chrono::hours(1);
  int64_t last_shard = -1;
  // A line per shard written, and at most one every 5 s while a large shard is being made.
  options.progress = [&](int64_t shards_done, int64_t num_shards, uint64_t made, uint64_t total) {
    const auto now = std::chrono::steady_clock::now();
    if (shards_done == last_shard && now - last_print < std::chrono::seconds(5)) return;
    last_shard = shards_done;
    last_print = now;
    const double seconds = std::chrono::duration<double>(now - start).count();
    std::fprintf(stderr, "make-model: %lld/%lld shards written, %.2f of %.2f GB made (%.0f%%), %.1f s\n",
                 static_cast<long long>(shards_done), static_cast<long long>(num_shards), made / 1e9,
                 total / 1e9, 100.0 * made / std::max<uint64_t>(total, 1), seconds);
  };
  const MakeModelResult result = make_model(preset, args.out_dir, options);
  std::printf("wrote %s: preset %s, %lld tensors in %lld shard(s), %.3f GB, storage %s, seed %llu\n",
              args.out_dir.c_str(), preset.name.c_str(), static_cast<long long>(result.num_tensors),
              static_cast<long long>(result.num_shards), result.total_bytes / 1e9, dtype_name(preset.storage),
              static_cast<unsigned long long>(args.seed));
  if (result.wrote_tokenizer)
    std::printf("tokenizer.json copied from %s\n", options.tokenizer_json->c_str());
  else
    std::printf("note: %s\n", result.tokenizer_note.c_str());
  return 0;
}

}  // namespace epic::cli
