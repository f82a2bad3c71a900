// For the weight source and loader tests: a small random checkpoint made by make-model (the tiny
// preset with a short vocabulary, several shards, one layer's experts across two), and the seed
// of each test (fresh every run, printed so a failure can be replayed with EPIC_TEST_SEED).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>

#include "worker/model_writer.h"

namespace epic::testing {

inline uint64_t fresh_seed() {
  if (const char* fixed = std::getenv("EPIC_TEST_SEED")) return std::strtoull(fixed, nullptr, 10);
  std::random_device device;
  return (uint64_t{device()} << 32) | device();
}

inline ModelPreset small_preset(DType storage) {
  ModelPreset preset = load_preset("tiny", EPIC_PRESETS_DIR);
  preset.config.vocab_size = 300;  // keeps the files small; the other shapes are the preset's
  preset.storage = storage;
  preset.shard_bytes = 60000 * dtype_size(storage) / 2;  // several shards
  return preset;
}

// Makes the model in dir and returns its seed.
inline uint64_t make_small_model(const ModelPreset& preset, const std::filesystem::path& dir) {
  MakeModelOptions options;
  options.seed = fresh_seed();
  make_model(preset, dir, options);
  return options.seed;
}

}  // namespace epic::testing
