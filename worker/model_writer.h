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
};

struct MakeModelResult {
  int64_t num_tensors = 0;
  int64_t num_shards = 0;
  uint64_t total_bytes = 0;
  bool wrote_tokenizer = false;
  std::string tokenizer_note;  // why no tokenizer was written, when none was
};

// Refuses (Error(kInvalidArgument)) to write into a non-empty directory holding files other
// than a previous make-model output, so no user data is overwritten.
MakeModelResult make_model(const ModelPreset& preset, const std::filesystem::path& out_dir,
                           const MakeModelOptions& options);

}  // namespace epic
