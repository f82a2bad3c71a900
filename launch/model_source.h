// Where `epic run` and the benchmarks take a model from: a Hugging Face folder (--model DIR) or
// random weights of a preset drawn in memory (--random-weights PRESET [--layers N]
// [--weights-seed S]), the same values `epic make-model --preset PRESET --seed S` writes, so a
// 57 GB Qwen3-30B-A3B runs without being written to disk first.
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>

#include "worker/model_config.h"
#include "worker/model_writer.h"
#include "worker/weight_source.h"

namespace epic::cli {

struct ModelSourceFlags {
  std::string model_dir;
  std::string random_weights;  // a preset name or file
  std::optional<int64_t> layers;
  uint64_t weights_seed = 0;
};

struct OpenedModel {
  ModelConfig config;
  std::unique_ptr<WeightSource> source;
  std::optional<std::filesystem::path> model_dir;  // set for --model
  std::string description;
};

// Error(kInvalidArgument) unless exactly one of --model / --random-weights is given, or for --layers
// outside [1, the preset's layers] or given with --model.
void check_model_source_flags(const ModelSourceFlags& flags);

// Reads config.json and the checkpoint index, or the preset; no tensor data is read.
OpenedModel open_model(const ModelSourceFlags& flags);

// A preset cut to its first `layers` layers (make-model --layers does the same).
void keep_first_layers(ModelPreset& preset, int64_t layers);

}  // namespace epic::cli
