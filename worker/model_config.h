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
  int64_t num_experts = 0;
  int64_t num_experts_per_tok = 0;
  int64_t decoder_sparse_step = 1;
  int64_t vocab_size = 0;
  bool norm_topk_prob = false;
  bool tie_word_embeddings = false;
  std::vector<int64_t> mlp_only_layers;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::vector<int64_t> eos_token_ids;  // generation stops at any of these

  // transformers' rule: MoE unless listed in mlp_only_layers or off the decoder_sparse_step.
  bool is_moe_layer(int64_t layer) const;
  std::string layer_prefix(int64_t layer) const;  // "model.layers.3."

  // Parses and validates; `source` names the file in error messages.
  // Throws Error(kInvalidConfig) naming the field, the value and the fix.
  static ModelConfig from_json_text(const std::string& text, const std::string& source);
  static ModelConfig load(const std::filesystem::path& model_dir);  // DIR/config.json

  // A config.json that from_json_text reads back to the same config, in the layout of
  // `architecture` (nested under thinker_config.text_config for the Omni thinker).
  std::string to_json_text() const;
};

}  // namespace epic
