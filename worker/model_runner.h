// The Qwen3-MoE forward pass over one sequence with a KV cache, and greedy/sampled generation.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "kernels/backend.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/sampler.h"

namespace epic {

// Keys and values of every position seen so far, per layer: [length, num_kv_heads * head_dim].
struct KvCache {
  std::vector<std::vector<float>> keys, values;
  int64_t length = 0;
  explicit KvCache(const ModelConfig& config) : keys(config.num_hidden_layers), values(config.num_hidden_layers) {}
};

class ModelRunner {
 public:
  ModelRunner(const ModelConfig& config, const ModelWeights& weights, Backend& backend);

  // Runs tokens at positions cache.length, cache.length + 1, ... and appends them to the cache.
  // Returns logits [tokens.size(), vocab] when all_positions, else [1, vocab] for the last token.
  // Ids outside [0, vocab_size) -> Error(kInvalidArgument) naming the id and its position.
  std::vector<float> forward(std::span<const int32_t> tokens, KvCache& cache, bool all_positions);

  const ModelConfig& config() const { return config_; }

 private:
  void attention_block(int64_t layer, const float* normed, int64_t num_tokens, KvCache& cache, float* out);
  void mlp_block(int64_t layer, const float* normed, int64_t num_tokens, float* out);

  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
};

struct GenerationResult {
  std::vector<float> prompt_logits;  // [prompt_len, vocab] when asked for, else empty
  std::vector<int32_t> new_ids;      // generated ids (stops after an eos id, which is included)
};

// Prefill the prompt, then generate up to max_new_tokens with the sampler.
GenerationResult generate(ModelRunner& runner, std::span<const int32_t> prompt, int64_t max_new_tokens,
                          Sampler& sampler, bool want_prompt_logits);

}  // namespace epic
