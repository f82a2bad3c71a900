// The model hyper-parameters epic honours, read from a Hugging Face config.json
// (Qwen3MoeForCausalLM, or the Qwen3-Omni thinker's text config) and validated up front.
#pragma once

#include <cstdint>
#include <filesystem>
#include <nlohmann/json_fwd.hpp>
#include <optional>
#include <string>
#include <vector>

namespace epic {

enum class Architecture { kQwen3Moe, kQwen3OmniThinker };

// Upper bounds on config.json sizes. Each lies far beyond any published model (the largest
// published values are in the comments), so a real config never meets one; they exist so that
// an absurd value (a typo, a fuzzer, 2^62) fails at once with a message instead of overflowing
// an int64 product or starting a loop of 10^12 steps. Products of sizes (tensor elements and
// bytes) are checked separately with overflow-checked arithmetic.
namespace config_limits {
inline constexpr int64_t kMaxLayers = 4096;                          // published: 126 (Llama-3.1-405B)
inline constexpr int64_t kMaxHiddenSize = 1 << 18;                   // published: 18432 (Grok-1 / Nemotron-4)
inline constexpr int64_t kMaxAttentionHeads = 4096;                  // published: 128
inline constexpr int64_t kMaxHeadDim = 1 << 14;                      // published: 512 (Gemma 3 global layers)
inline constexpr int64_t kMaxIntermediateSize = 1 << 20;             // published: 73728 (Grok-1 class)
inline constexpr int64_t kMaxExperts = 1 << 16;                      // published: 512 (Qwen3-Next)
inline constexpr int64_t kMaxVocabSize = 1 << 24;                    // published: 262144 (Gemma 3)
inline constexpr int64_t kMaxPositionEmbeddings = int64_t{1} << 30;  // published: 10485760 (Llama 4 Scout)
// decoder_sparse_step beyond kMaxLayers makes every layer dense, as would kMaxLayers itself.
inline constexpr int64_t kMaxDecoderSparseStep = kMaxLayers;
// config.json is a few KB; this keeps a wrong path (a checkpoint shard) from being read whole.
inline constexpr uint64_t kMaxConfigFileBytes = uint64_t{16} << 20;
// Real configs nest 3 levels (thinker_config.text_config.rope_parameters); the bound keeps the
// JSON parser and the destructor of the parsed tree away from deep recursion.
inline constexpr int kMaxNestingDepth = 64;
}  // namespace config_limits

struct ModelConfig {
  Architecture architecture = Architecture::kQwen3Moe;
  std::string architecture_name;  // as config.json spells it
  std::string tensor_prefix;      // "model." or "thinker.model."
  std::string lm_head_name;       // "lm_head.weight" or "thinker.lm_head.weight"

  int64_t hidden_size = 0;
  int64_t num_hidden_layers = 0;
  int64_t num_attention_heads = 0;
  int64_t num_key_value_heads = 0;
  int64_t head_dim = 0;
  int64_t moe_intermediate_size = 0;
  int64_t intermediate_size = 0;  // dense MLP layers; 0 when the model has none
  // The expert count config.json names (transformers 4 and the Omni text config spell it
  // num_experts, transformers 5's Qwen3MoeConfig num_local_experts). 0 when config.json names
  // none: then expert_count_field is empty and every layer is read as dense, so a checkpoint that
  // has routers must be refused by the weight loader (transformers itself would assume its class
  // default of 128 experts, which epic does not guess).
  int64_t num_experts = 0;
  std::string expert_count_field;  // "num_experts", "num_local_experts" or "" (none named)
  int64_t num_experts_per_tok = 0;
  int64_t decoder_sparse_step = 1;
  int64_t vocab_size = 0;
  // The longest sequence (prompt + generated tokens) the model is made for. When config.json
  // omits it, transformers' class default for the architecture (32768 for Qwen3MoeConfig and
  // Qwen3OmniMoeTextConfig alike).
  int64_t max_position_embeddings = 0;
  bool norm_topk_prob = false;
  bool tie_word_embeddings = false;
  std::vector<int64_t> mlp_only_layers;  // sorted, without duplicates
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::vector<int64_t> eos_token_ids;  // generation stops at any of these

  // transformers' rule: MoE unless listed in mlp_only_layers or off the decoder_sparse_step.
  bool is_moe_layer(int64_t layer) const;
  std::string layer_prefix(int64_t layer) const;  // "model.layers.3."

  // Parses and validates; `source` names the file in error messages.
  // Throws Error(kInvalidConfig) naming the field, the value and the fix, or Error(kUnsupported)
  // for a valid value epic does not implement (another activation, rope scaling, sliding window).
  static ModelConfig from_json_text(const std::string& text, const std::string& source);
  // DIR/config.json; a FIFO, directory or device in its place is refused at once.
  static ModelConfig load(const std::filesystem::path& model_dir);

  // A config.json that from_json_text reads back to the same config, in the layout of
  // `architecture` (nested under thinker_config.text_config for the Omni thinker).
  std::string to_json_text() const;
};

}  // namespace epic
