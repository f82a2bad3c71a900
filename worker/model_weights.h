// The model's weights in fp32 host memory, loaded selectively: a worker reads the dense
// weights and only the experts it hosts. Missing experts are an error unless masked.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "worker/checkpoint.h"
#include "worker/model_config.h"

namespace epic {

struct ExpertWeights {
  std::vector<float> gate;  // [moe_intermediate, hidden]
  std::vector<float> up;    // [moe_intermediate, hidden]
  std::vector<float> down;  // [hidden, moe_intermediate]
};

struct MoeLayerWeights {
  int64_t num_experts = 0;                   // the router's rows: this layer's expert count
  std::vector<float> router;                 // [num_experts, hidden]
  std::vector<uint8_t> present;              // [num_experts]: 1 when the checkpoint has the expert
  std::map<int64_t, ExpertWeights> experts;  // the hosted (and present) experts only
};

struct DenseMlpWeights {
  std::vector<float> gate, up;  // [intermediate, hidden]
  std::vector<float> down;      // [hidden, intermediate]
};

struct LayerWeights {
  std::vector<float> input_norm, post_attention_norm;  // [hidden]
  std::vector<float> q_proj, k_proj, v_proj;           // [heads * head_dim, hidden]
  std::vector<float> o_proj;                           // [hidden, heads * head_dim]
  std::vector<float> q_norm, k_norm;                   // [head_dim]
  bool is_moe = false;
  MoeLayerWeights moe;
  DenseMlpWeights dense;
};

struct ModelWeights {
  std::vector<float> embed;       // [vocab, hidden]
  std::vector<float> final_norm;  // [hidden]
  std::vector<float> lm_head;     // [vocab, hidden]; empty when tied to embed
  std::vector<LayerWeights> layers;
  uint64_t bytes_read = 0;  // checkpoint bytes read to build these weights
  uint64_t resident_bytes() const;
  const std::vector<float>& output_projection() const { return lm_head.empty() ? embed : lm_head; }
};

struct LoadOptions {
  // Mask experts the checkpoint lacks out of routing instead of failing.
  bool allow_missing_experts = false;
  // Load weights holding NaN or Inf instead of failing (`epic run --allow-nonfinite-weights`); the
  // run then stops at the first step whose logits are not finite.
  bool allow_nonfinite_weights = false;
  // Which experts this process hosts (reads); every expert when empty.
  std::function<bool(int64_t layer, int64_t expert_id)> hosts_expert;
};

// The experts of every MoE layer as the checkpoint has them, from the index and shard headers
// alone (no tensor data is read): the router's row count and which experts are present.
struct LayerExpertInventory {
  int64_t num_experts = 0;       // router rows
  std::vector<uint8_t> present;  // [num_experts]
  int64_t num_present() const;
};
using ExpertInventory = std::map<int64_t, LayerExpertInventory>;  // MoE layer -> its experts

// Throws Error(kMissingExperts) listing every missing (layer, expert) and the shard the index
// points at unless allow_missing_experts; Error(kInvalidCheckpoint) for a router of the wrong
// shape; Error(kMissingExperts) when a layer keeps fewer present experts than top-k;
// Error(kInvalidConfig) when config.json names no expert count but the checkpoint has routers.
ExpertInventory inspect_experts(const ModelConfig& config, Checkpoint& checkpoint,
                                bool allow_missing_experts);

// Throws what inspect_experts throws, and Error(kInvalidCheckpoint) for absent dense tensors,
// wrong shapes/dtypes (naming file, tensor, found and expected shape) and, unless
// allow_nonfinite_weights, a NaN or Inf weight (naming tensor, shard and element).
ModelWeights load_model_weights(const ModelConfig& config, Checkpoint& checkpoint,
                                const LoadOptions& options);

// The tensor names of one expert: gate_proj, up_proj, down_proj.
std::vector<std::string> expert_tensor_names(const ModelConfig& config, int64_t layer, int64_t expert_id);

}  // namespace epic
