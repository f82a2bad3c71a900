// `epic make-model`: writes a random Hugging Face checkpoint (config.json, sharded safetensors
// with model.safetensors.index.json, tokenizer.json when one fits) from a preset in configs/.
// Every tensor's values depend only on (seed, tensor name), so output is deterministic per seed
// and independent of how tensors fall into shards.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <optional>
#include <string>

#include "worker/model_config.h"
#include "worker/safetensors.h"

namespace epic {

struct ModelPreset {
  std::string name;
  std::string description;
  ModelConfig config;
  DType storage = DType::kBF16;
  uint64_t shard_bytes = 4000000000ull;
};

// Reads configs/presets/NAME.json (or a path to a preset file). Unknown name ->
// Error(kInvalidArgument) listing the presets found in presets_dir.
ModelPreset load_preset(const std::string& name_or_path, const std::filesystem::path& presets_dir);

struct MakeModelOptions {
  uint64_t seed = 0;
  std::optional<std::filesystem::path> tokenizer_json;  // copied when its vocabulary fits
  // Called after each tensor made and each shard written:
  // (shards written, total shards, bytes made so far, total bytes).
  std::function<void(int64_t, int64_t, uint64_t, uint64_t)> progress;
  // Replace an earlier finished make-model output in out_dir (other files there still refuse).
  bool force = false;
};

struct MakeModelResult {
  int64_t num_tensors = 0;
  int64_t num_shards = 0;
  uint64_t total_bytes = 0;
  bool wrote_tokenizer = false;
  std::string tokenizer_note;  // why no tokenizer was written, when none was
};

// out_dir must be new or empty; with options.force it may hold an earlier make-model output,
// which is replaced (an unfinished one, without config.json, is replaced without force). Anything else there
// (files make-model did not write), or an out_dir that is a file or FIFO -> Error(kInvalidArgument), so no
// user data is overwritten. Every file is written atomically (temporary file, checked writes, rename),
// config.json last.
MakeModelResult make_model(const ModelPreset& preset, const std::filesystem::path& out_dir,
                           const MakeModelOptions& options);

}  // namespace epic
