// The Qwen3-MoE forward pass over a batch of sequences, each with its own KV cache (generation
// over it: generation_loop.h). Attention runs per sequence; every other op runs over the batch's
// rows at once, and the MoE blocks go through a MoeExecutor (local or expert-parallel).
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/moe_executor.h"

namespace epic {

// Keys and values of every position seen so far, per layer: [length, num_kv_heads * head_dim].
struct KvCache {
  std::vector<std::vector<float>> keys, values;
  int64_t length = 0;
  explicit KvCache(const ModelConfig& config)
      : keys(config.num_hidden_layers), values(config.num_hidden_layers) {}
};

// Keys and values of every layer, per token of a sequence: 2 x layers x kv_heads x head_dim floats.
int64_t kv_cache_bytes_per_token(const ModelConfig& config);

// The next tokens of one sequence in a batched forward pass.
struct SequenceChunk {
  KvCache* cache = nullptr;
  std::span<const int32_t> tokens;
  bool all_positions = false;  // logits of every token, else of the last only
};

// The logits of a batch in one buffer (no copy per chunk: with many prompt rows the logits are
// the largest thing a step holds), chunk after chunk.
struct BatchLogits {
  std::vector<float> values;       // [rows, vocab]
  std::vector<int64_t> first_row;  // chunk c's rows are [first_row[c], first_row[c + 1])
  int64_t vocab = 0;
  std::span<const float> of_chunk(size_t c) const {
    return {values.data() + first_row[c] * vocab,
            static_cast<size_t>((first_row[c + 1] - first_row[c]) * vocab)};
  }
  std::span<const float> last_row(size_t c) const {
    return {values.data() + (first_row[c + 1] - 1) * vocab, static_cast<size_t>(vocab)};
  }
};

class ModelRunner {
 public:
  // With no executor the MoE blocks run locally.
  ModelRunner(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
              MoeExecutor* executor = nullptr);

  // Runs tokens at positions cache.length, cache.length + 1, ... and appends them to the cache.
  // Returns logits [tokens.size(), vocab] when all_positions, else [1, vocab] for the last token.
  // Ids outside [0, vocab_size) -> Error(kInvalidArgument) naming the id and its position.
  std::vector<float> forward(std::span<const int32_t> tokens, KvCache& cache, bool all_positions);

  // One step over several sequences; an empty batch still runs every MoE layer (with no rows) so
  // that an expert-parallel executor's collectives see this worker. Returns each chunk's logits.
  BatchLogits forward_batch(std::span<const SequenceChunk> chunks);

  const ModelConfig& config() const { return config_; }

 private:
  void attention_block(int64_t layer, const float* normed, const SequenceChunk& chunk, float* out);

  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
  std::unique_ptr<MoeExecutor> local_executor_;
  MoeExecutor* executor_;
};

// Validates ids against the vocabulary: Error(kInvalidArgument) naming the id and its position,
// after `context` (e.g. "prompt 3: ") when given.
void check_token_ids(std::span<const int32_t> tokens, int64_t vocab_size, const std::string& context = "");

}  // namespace epic
