// --model DIR or --random-weights PRESET (see model_source.h).
#include "launch/model_source.h"

#include <algorithm>

#include "kernels/error.h"
#include "launch/default_paths.h"

namespace epic::cli {

void keep_first_layers(ModelPreset& preset, int64_t layers) {
  if (layers <= 0 || layers > preset.config.num_hidden_layers)
    throw Error(ErrorCode::kInvalidArgument, "--layers must be in [1, " +
                                                 std::to_string(preset.config.num_hidden_layers) + "] for preset " +
                                                 preset.name + ", got " + std::to_string(layers));
  preset.config.num_hidden_layers = layers;
  std::erase_if(preset.config.mlp_only_layers, [&](int64_t layer) { return layer >= layers; });
}

void check_model_source_flags(const ModelSourceFlags& flags) {
  if (flags.model_dir.empty() == flags.random_weights.empty())
    throw Error(ErrorCode::kInvalidArgument,
                "give exactly one of --model DIR (a Hugging Face model folder) or --random-weights PRESET "
                "(random weights of a preset in configs/presets, drawn in memory)");
  if (flags.layers && flags.random_weights.empty())
    throw Error(ErrorCode::kInvalidArgument, "--layers applies to --random-weights only (a --model folder's "
                                             "config.json sets its layers)");
}

OpenedModel open_model(const ModelSourceFlags& flags) {
  check_model_source_flags(flags);
  OpenedModel opened;
  if (!flags.model_dir.empty()) {
    opened.model_dir = flags.model_dir;
    opened.config = ModelConfig::load(flags.model_dir);
    opened.source = open_checkpoint_source(flags.model_dir);
    opened.description = flags.model_dir;
    return opened;
  }
  ModelPreset preset = load_preset(flags.random_weights, presets_dir());
  if (flags.layers) keep_first_layers(preset, *flags.layers);
  opened.config = preset.config;
  opened.description = "random weights of preset " + preset.name + " (" +
                       std::to_string(preset.config.num_hidden_layers) + " layers, seed " +
                       std::to_string(flags.weights_seed) + ")";
  opened.source = make_random_source(opened.config, preset.storage, flags.weights_seed, opened.description);
  return opened;
}

}  // namespace epic::cli
