// The published Qwen3-MoE tensor layout (per-expert gate/up/down projections).
#include "worker/model_tensors.h"

namespace epic {

std::vector<ModelTensorSpec> model_tensor_specs(const ModelConfig& c) {
  using Init = RandomInit;
  const int64_t h = c.hidden_size, q = c.num_attention_heads * c.head_dim,
                kv = c.num_key_value_heads * c.head_dim;
  std::vector<ModelTensorSpec> specs;
  specs.push_back({c.tensor_prefix + "embed_tokens.weight", {c.vocab_size, h}, Init::kEmbedding});
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    const std::string p = c.layer_prefix(layer);
    specs.push_back({p + "input_layernorm.weight", {h}, Init::kNorm});
    specs.push_back({p + "self_attn.q_proj.weight", {q, h}, Init::kLinear});
    specs.push_back({p + "self_attn.k_proj.weight", {kv, h}, Init::kLinear});
    specs.push_back({p + "self_attn.v_proj.weight", {kv, h}, Init::kLinear});
    specs.push_back({p + "self_attn.o_proj.weight", {h, q}, Init::kLinear});
    specs.push_back({p + "self_attn.q_norm.weight", {c.head_dim}, Init::kNorm});
    specs.push_back({p + "self_attn.k_norm.weight", {c.head_dim}, Init::kNorm});
    specs.push_back({p + "post_attention_layernorm.weight", {h}, Init::kNorm});
    if (c.is_moe_layer(layer)) {
      const int64_t i = c.moe_intermediate_size;
      specs.push_back({p + "mlp.gate.weight", {c.num_experts, h}, Init::kLinear});
      for (int64_t e = 0; e < c.num_experts; ++e) {
        const std::string ep = p + "mlp.experts." + std::to_string(e) + ".";
        specs.push_back({ep + "gate_proj.weight", {i, h}, Init::kLinear});
        specs.push_back({ep + "up_proj.weight", {i, h}, Init::kLinear});
        specs.push_back({ep + "down_proj.weight", {h, i}, Init::kLinear});
      }
    } else {
      const int64_t i = c.intermediate_size;
      specs.push_back({p + "mlp.gate_proj.weight", {i, h}, Init::kLinear});
      specs.push_back({p + "mlp.up_proj.weight", {i, h}, Init::kLinear});
      specs.push_back({p + "mlp.down_proj.weight", {h, i}, Init::kLinear});
    }
  }
  specs.push_back({c.tensor_prefix + "norm.weight", {h}, Init::kNorm});
  if (!c.tie_word_embeddings) specs.push_back({c.lm_head_name, {c.vocab_size, h}, Init::kLinear});
  return specs;
}

}  // namespace epic
