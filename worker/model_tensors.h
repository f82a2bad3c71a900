// The tensors of a Qwen3-MoE checkpoint in the published per-expert Hugging Face layout: names,
// shapes and how make-model draws each. One list for make-model's writer and the in-memory
// random weight source, so both give the same tensors, in the same order, with the same values.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "worker/model_config.h"
#include "worker/random_values.h"

namespace epic {

struct ModelTensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  RandomInit init = RandomInit::kLinear;
};

// Every tensor of the model, in checkpoint order: the embedding, then each layer (norms,
// attention, then the router and experts of a MoE layer or the dense MLP), the final norm, and
// lm_head unless the embeddings are tied.
std::vector<ModelTensorSpec> model_tensor_specs(const ModelConfig& config);

}  // namespace epic
