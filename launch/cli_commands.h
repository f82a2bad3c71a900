// The subcommands of the `epic` executable; each returns the process exit code.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

namespace epic::cli {

struct MakeModelArgs {
  std::string preset;
  std::string out_dir;
  uint64_t seed = 0;
  std::string tokenizer_json;      // empty: the default location, if present
  std::optional<int64_t> layers;   // override num_hidden_layers (a slice of a big preset)
};

struct RunArgs {
  std::string model_dir;
  std::optional<std::string> prompt;
  std::optional<std::string> prompt_ids;
  int64_t max_new_tokens = 16;
  double temperature = 0.0;
  double top_p = 1.0;
  uint64_t seed = 0;
  std::string logits_out;
  bool allow_missing_experts = false;
};

struct TokenizeArgs {
  std::string model_dir;
  std::optional<std::string> text;
  std::optional<std::string> file;
};

struct DetokenizeArgs {
  std::string model_dir;
  std::string ids;
};

int make_model_command(const MakeModelArgs& args);
int run_command(const RunArgs& args);
int tokenize_command(const TokenizeArgs& args);
int detokenize_command(const DetokenizeArgs& args);

}  // namespace epic::cli
