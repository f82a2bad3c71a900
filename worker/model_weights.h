// The model's weights in one backend's memory, loaded selectively: a worker reads the dense
// weights and only the experts it hosts. Weights keep the checkpoint's dtype (BF16 stays BF16:
// no fp32 copy of the model anywhere), or are converted once at load when the activations need
// it (cuda bf16 mode on an fp32 checkpoint). Layouts are chosen for the ops: q/k/v projections
// fused into one matrix, a dense MLP's gate and up fused, a MoE layer's hosted experts stacked
// into one gate_up and one down tensor so the expert FFN is a single grouped call.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "worker/model_config.h"
#include "worker/weight_source.h"

namespace epic {

struct MoeLayerWeights {
  int64_t num_experts = 0;            // the router's rows: this layer's expert count
  std::vector<uint8_t> present;       // [num_experts] on the host: 1 when the checkpoint has the expert
  std::vector<int64_t> hosted;        // the hosted (and present) experts, ascending: slots of gate_up/down
  OwnedTensor router;                 // [num_experts, hidden]
  OwnedTensor present_mask;           // U8 [num_experts], uploaded once
  OwnedTensor gate_up;                // [hosted, 2 * moe_intermediate, hidden] (gate rows first)
  OwnedTensor down;                   // [hosted, hidden, moe_intermediate]
  OwnedTensor local_index;            // I32 [num_experts]: slot in gate_up/down, -1 when not hosted
  bool hosts(int64_t expert) const;
};

struct LayerWeights {
  OwnedTensor input_norm, post_attention_norm;  // [hidden]
  OwnedTensor qkv_proj;                         // [(heads + 2 kv_heads) * head_dim, hidden]
  OwnedTensor o_proj;                           // [hidden, heads * head_dim]
  OwnedTensor q_norm, k_norm;                   // [head_dim]
  bool is_moe = false;
  MoeLayerWeights moe;
  OwnedTensor dense_gate_up;  // [2 * intermediate, hidden]
  OwnedTensor dense_down;     // [hidden, intermediate]
};

struct ModelWeights {
  ScalarType weight_type = ScalarType::kF32;  // of every matrix and norm
  OwnedTensor embed;       // [vocab, hidden]
  OwnedTensor final_norm;  // [hidden]
  OwnedTensor lm_head;     // [vocab, hidden]; empty when tied to embed
  std::vector<LayerWeights> layers;
  uint64_t bytes_read = 0;      // source bytes read to build these weights
  uint64_t resident_bytes = 0;  // backend bytes they occupy
  double load_seconds = 0;      // reading + converting + copying
  const Tensor& output_projection() const { return lm_head.empty() ? embed.view() : lm_head.view(); }
  int64_t experts_hosted() const;
};

struct LoadOptions {
  // Mask experts the checkpoint lacks out of routing instead of failing.
  bool allow_missing_experts = false;
  // Load weights holding NaN or Inf instead of failing (`epic run --allow-nonfinite-weights`); the
  // run then stops at the first step whose logits are not finite.
  bool allow_nonfinite_weights = false;
  // Which experts this process hosts (reads); every expert when empty.
  std::function<bool(int64_t layer, int64_t expert_id)> hosts_expert;
  // The type weights are kept in: unset keeps the source's (BF16 when every tensor is BF16, else
  // F32); BF16 converts at load (the cuda bf16 mode).
  std::optional<ScalarType> weight_type;
  int reader_threads = 0;  // <= 0: the loader's default
};

// The experts of every MoE layer as the source has them, from headers alone (no tensor data is
// read): the router's row count and which experts are present.
struct LayerExpertInventory {
  int64_t num_experts = 0;       // router rows
  std::vector<uint8_t> present;  // [num_experts]
  int64_t num_present() const;
};
using ExpertInventory = std::map<int64_t, LayerExpertInventory>;  // MoE layer -> its experts

// Throws Error(kMissingExperts) listing every missing (layer, expert) and where the index points
// unless allow_missing_experts; Error(kInvalidCheckpoint) for a router of the wrong shape;
// Error(kMissingExperts) when a layer keeps fewer present experts than top-k; Error(kInvalidConfig)
// when config.json names no expert count but the checkpoint has routers.
ExpertInventory inspect_experts(const ModelConfig& config, WeightSource& source, bool allow_missing_experts);

// Throws what inspect_experts throws, and Error(kInvalidCheckpoint) for absent dense tensors,
// wrong shapes/dtypes (naming file, tensor, found and expected shape) and, unless
// allow_nonfinite_weights, a NaN or Inf weight (naming tensor, shard and element); backend memory
// errors (kUnsupported) when the weights do not fit.
ModelWeights load_model_weights(const ModelConfig& config, WeightSource& source, Backend& backend,
                                const LoadOptions& options);

// The type load_model_weights keeps weights in without a LoadOptions::weight_type: BF16 when the
// source stores the model's tensors as BF16, else F32.
ScalarType stored_weight_type(const ModelConfig& config, WeightSource& source);

// The weight type a run's activations require, for LoadOptions::weight_type: bf16 activations need
// bf16 weights on the device; fp32 ones take whatever is stored (nullopt, so the loader keeps
// stored_weight_type: a bf16 checkpoint stays bf16 and is widened per block).
std::optional<ScalarType> required_weight_type(ScalarType activation_type);

// Only the MoE layers' routers and hosted experts (for benchmarks of the MoE block): the other
// tensors of `weights` stay empty.
ModelWeights load_moe_layers(const ModelConfig& config, WeightSource& source, Backend& backend,
                             const LoadOptions& options);

// The tensor names of one expert: gate_proj, up_proj, down_proj.
std::vector<std::string> expert_tensor_names(const ModelConfig& config, int64_t layer, int64_t expert_id);

}  // namespace epic
