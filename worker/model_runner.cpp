// embed -> N x [RMSNorm -> GQA attention -> residual -> RMSNorm -> MoE or dense MLP -> residual]
// -> RMSNorm -> lm_head, exactly as transformers' Qwen3MoeForCausalLM.
#include "worker/model_runner.h"

#include <algorithm>
#include <cstring>

#include "kernels/error.h"
#include "worker/moe_block.h"

namespace epic {

void check_token_ids(std::span<const int32_t> tokens, int64_t vocab_size, const std::string& context) {
  for (size_t t = 0; t < tokens.size(); ++t) {
    if (tokens[t] < 0 || tokens[t] >= vocab_size)
      throw Error(ErrorCode::kInvalidArgument,
                  context + "token id " + std::to_string(tokens[t]) + " at position " + std::to_string(t) +
                      " is outside the model's vocabulary [0, " + std::to_string(vocab_size) + ")");
  }
}

int64_t kv_cache_bytes_per_token(const ModelConfig& config) {
  return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim *
         static_cast<int64_t>(sizeof(float));
}

ModelRunner::ModelRunner(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
                         MoeExecutor* executor)
    : config_(config), weights_(weights), backend_(backend) {
  if (executor == nullptr) local_executor_ = std::make_unique<LocalMoeExecutor>(config, weights, backend);
  executor_ = executor != nullptr ? executor : local_executor_.get();
}

void ModelRunner::attention_block(int64_t layer, const float* normed, const SequenceChunk& chunk,
                                  float* out) {
  const LayerWeights& w = weights_.layers[layer];
  const int64_t num_tokens = static_cast<int64_t>(chunk.tokens.size());
  const int64_t hidden = config_.hidden_size, head_dim = config_.head_dim;
  const int64_t num_heads = config_.num_attention_heads, num_kv_heads = config_.num_key_value_heads;
  const int64_t q_dim = num_heads * head_dim, kv_dim = num_kv_heads * head_dim;
  KvCache& cache = *chunk.cache;
  const int64_t first_position = cache.length;

  std::vector<float> q(num_tokens * q_dim), k(num_tokens * kv_dim), v(num_tokens * kv_dim);
  backend_.linear(normed, w.q_proj.data(), q.data(), num_tokens, hidden, q_dim);
  backend_.linear(normed, w.k_proj.data(), k.data(), num_tokens, hidden, kv_dim);
  backend_.linear(normed, w.v_proj.data(), v.data(), num_tokens, hidden, kv_dim);
  // q_norm / k_norm act on each head's vector, before rotary embedding.
  backend_.rms_norm(q.data(), w.q_norm.data(), q.data(), num_tokens * num_heads, head_dim,
                    config_.rms_norm_eps);
  backend_.rms_norm(k.data(), w.k_norm.data(), k.data(), num_tokens * num_kv_heads, head_dim,
                    config_.rms_norm_eps);
  std::vector<int32_t> positions(num_tokens);
  for (int64_t t = 0; t < num_tokens; ++t) positions[t] = static_cast<int32_t>(first_position + t);
  backend_.rope(q.data(), positions.data(), num_tokens, num_heads, head_dim, config_.rope_theta);
  backend_.rope(k.data(), positions.data(), num_tokens, num_kv_heads, head_dim, config_.rope_theta);

  std::vector<float>& keys = cache.keys[layer];
  std::vector<float>& values = cache.values[layer];
  keys.insert(keys.end(), k.begin(), k.end());
  values.insert(values.end(), v.begin(), v.end());

  std::vector<float> attended(num_tokens * q_dim);
  backend_.attention(q.data(), keys.data(), values.data(), attended.data(), num_tokens,
                     first_position + num_tokens, first_position, num_heads, num_kv_heads, head_dim);
  backend_.linear(attended.data(), w.o_proj.data(), out, num_tokens, q_dim, hidden);
}

BatchLogits ModelRunner::forward_batch(std::span<const SequenceChunk> chunks) {
  const int64_t hidden = config_.hidden_size;
  std::vector<int64_t> first_row(chunks.size() + 1, 0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    EPIC_CHECK(!chunks[c].tokens.empty() && chunks[c].cache != nullptr, ErrorCode::kInvalidArgument,
               "every sequence in a batch needs at least one token and a KV cache");
    check_token_ids(chunks[c].tokens, config_.vocab_size);
    first_row[c + 1] = first_row[c] + static_cast<int64_t>(chunks[c].tokens.size());
  }
  const int64_t num_rows = first_row.back();
  std::vector<float> x(num_rows * hidden);
  for (size_t c = 0; c < chunks.size(); ++c)
    for (size_t t = 0; t < chunks[c].tokens.size(); ++t)
      std::memcpy(&x[(first_row[c] + t) * hidden],
                  &weights_.embed[static_cast<int64_t>(chunks[c].tokens[t]) * hidden],
                  hidden * sizeof(float));

  std::vector<float> normed(num_rows * hidden), block_out(num_rows * hidden);
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    const LayerWeights& w = weights_.layers[layer];
    backend_.rms_norm(x.data(), w.input_norm.data(), normed.data(), num_rows, hidden, config_.rms_norm_eps);
    for (size_t c = 0; c < chunks.size(); ++c)
      attention_block(layer, &normed[first_row[c] * hidden], chunks[c], &block_out[first_row[c] * hidden]);
    backend_.add(block_out.data(), x.data(), num_rows * hidden);
    backend_.rms_norm(x.data(), w.post_attention_norm.data(), normed.data(), num_rows, hidden,
                      config_.rms_norm_eps);
    if (w.is_moe) {
      executor_->forward(layer, normed.data(), num_rows, block_out.data());
    } else {
      swiglu_ffn(backend_, normed.data(), w.dense.gate.data(), w.dense.up.data(), w.dense.down.data(),
                 num_rows, hidden, config_.intermediate_size, block_out.data());
    }
    backend_.add(block_out.data(), x.data(), num_rows * hidden);
  }

  // Final norm and lm_head on the rows whose logits are wanted, gathered into one batch.
  std::vector<int64_t> wanted_rows;
  for (size_t c = 0; c < chunks.size(); ++c) {
    chunks[c].cache->length += static_cast<int64_t>(chunks[c].tokens.size());
    const int64_t begin = chunks[c].all_positions ? first_row[c] : first_row[c + 1] - 1;
    for (int64_t row = begin; row < first_row[c + 1]; ++row) wanted_rows.push_back(row);
  }
  const int64_t num_wanted = static_cast<int64_t>(wanted_rows.size());
  std::vector<float> selected(num_wanted * hidden);
  for (int64_t i = 0; i < num_wanted; ++i)
    std::memcpy(&selected[i * hidden], &x[wanted_rows[i] * hidden], hidden * sizeof(float));
  backend_.rms_norm(selected.data(), weights_.final_norm.data(), selected.data(), num_wanted, hidden,
                    config_.rms_norm_eps);
  BatchLogits logits;
  logits.vocab = config_.vocab_size;
  logits.values.resize(num_wanted * logits.vocab);
  backend_.linear(selected.data(), weights_.output_projection().data(), logits.values.data(), num_wanted,
                  hidden, logits.vocab);
  logits.first_row.assign(chunks.size() + 1, 0);
  for (size_t c = 0; c < chunks.size(); ++c)
    logits.first_row[c + 1] =
        logits.first_row[c] + (chunks[c].all_positions ? static_cast<int64_t>(chunks[c].tokens.size()) : 1);
  return logits;
}

std::vector<float> ModelRunner::forward(std::span<const int32_t> tokens, KvCache& cache, bool all_positions) {
  EPIC_CHECK(!tokens.empty(), ErrorCode::kInvalidArgument, "forward needs at least one token");
  const SequenceChunk chunk{&cache, tokens, all_positions};
  return std::move(forward_batch(std::span<const SequenceChunk>(&chunk, 1)).values);
}

}  // namespace epic
