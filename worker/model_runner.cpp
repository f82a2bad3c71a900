// embed -> N x [RMSNorm -> GQA attention -> residual -> RMSNorm -> MoE or dense MLP -> residual]
// -> RMSNorm -> lm_head, exactly as transformers' Qwen3MoeForCausalLM.
#include "worker/model_runner.h"

#include <algorithm>
#include <cstring>

#include "kernels/error.h"
#include "worker/moe_block.h"

namespace epic {

ModelRunner::ModelRunner(const ModelConfig& config, const ModelWeights& weights, Backend& backend)
    : config_(config), weights_(weights), backend_(backend) {}

void ModelRunner::attention_block(int64_t layer, const float* normed, int64_t num_tokens, KvCache& cache,
                                  float* out) {
  const LayerWeights& w = weights_.layers[layer];
  const int64_t hidden = config_.hidden_size, head_dim = config_.head_dim;
  const int64_t num_heads = config_.num_attention_heads, num_kv_heads = config_.num_key_value_heads;
  const int64_t q_dim = num_heads * head_dim, kv_dim = num_kv_heads * head_dim;
  const int64_t first_position = cache.length;

  std::vector<float> q(num_tokens * q_dim), k(num_tokens * kv_dim), v(num_tokens * kv_dim);
  backend_.linear(normed, w.q_proj.data(), q.data(), num_tokens, hidden, q_dim);
  backend_.linear(normed, w.k_proj.data(), k.data(), num_tokens, hidden, kv_dim);
  backend_.linear(normed, w.v_proj.data(), v.data(), num_tokens, hidden, kv_dim);
  // q_norm / k_norm act on each head's vector, before rotary embedding.
  backend_.rms_norm(q.data(), w.q_norm.data(), q.data(), num_tokens * num_heads, head_dim, config_.rms_norm_eps);
  backend_.rms_norm(k.data(), w.k_norm.data(), k.data(), num_tokens * num_kv_heads, head_dim, config_.rms_norm_eps);
  std::vector<int32_t> positions(num_tokens);
  for (int64_t t = 0; t < num_tokens; ++t) positions[t] = static_cast<int32_t>(first_position + t);
  backend_.rope(q.data(), positions.data(), num_tokens, num_heads, head_dim, config_.rope_theta);
  backend_.rope(k.data(), positions.data(), num_tokens, num_kv_heads, head_dim, config_.rope_theta);

  std::vector<float>& keys = cache.keys[layer];
  std::vector<float>& values = cache.values[layer];
  keys.insert(keys.end(), k.begin(), k.end());
  values.insert(values.end(), v.begin(), v.end());

  std::vector<float> attended(num_tokens * q_dim);
  backend_.attention(q.data(), keys.data(), values.data(), attended.data(), num_tokens, first_position + num_tokens,
                     first_position, num_heads, num_kv_heads, head_dim);
  backend_.linear(attended.data(), w.o_proj.data(), out, num_tokens, q_dim, hidden);
}

void ModelRunner::mlp_block(int64_t layer, const float* normed, int64_t num_tokens, float* out) {
  const LayerWeights& w = weights_.layers[layer];
  if (w.is_moe) {
    moe_block_forward(backend_, w.moe, normed, num_tokens, config_.hidden_size, config_.moe_intermediate_size,
                      config_.num_experts_per_tok, config_.norm_topk_prob, out);
  } else {
    swiglu_ffn(backend_, normed, w.dense.gate.data(), w.dense.up.data(), w.dense.down.data(), num_tokens,
               config_.hidden_size, config_.intermediate_size, out);
  }
}

std::vector<float> ModelRunner::forward(std::span<const int32_t> tokens, KvCache& cache, bool all_positions) {
  const int64_t num_tokens = static_cast<int64_t>(tokens.size());
  const int64_t hidden = config_.hidden_size;
  EPIC_CHECK(num_tokens > 0, ErrorCode::kInvalidArgument, "forward needs at least one token");
  for (int64_t t = 0; t < num_tokens; ++t) {
    if (tokens[t] < 0 || tokens[t] >= config_.vocab_size)
      throw Error(ErrorCode::kInvalidArgument, "token id " + std::to_string(tokens[t]) + " at position " +
                                                   std::to_string(t) + " is outside the vocabulary [0, " +
                                                   std::to_string(config_.vocab_size) + ")");
  }
  std::vector<float> x(num_tokens * hidden);
  for (int64_t t = 0; t < num_tokens; ++t)
    std::memcpy(&x[t * hidden], &weights_.embed[static_cast<int64_t>(tokens[t]) * hidden], hidden * sizeof(float));

  std::vector<float> normed(num_tokens * hidden), block_out(num_tokens * hidden);
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    const LayerWeights& w = weights_.layers[layer];
    backend_.rms_norm(x.data(), w.input_norm.data(), normed.data(), num_tokens, hidden, config_.rms_norm_eps);
    attention_block(layer, normed.data(), num_tokens, cache, block_out.data());
    backend_.add(block_out.data(), x.data(), num_tokens * hidden);
    backend_.rms_norm(x.data(), w.post_attention_norm.data(), normed.data(), num_tokens, hidden,
                      config_.rms_norm_eps);
    mlp_block(layer, normed.data(), num_tokens, block_out.data());
    backend_.add(block_out.data(), x.data(), num_tokens * hidden);
  }
  cache.length += num_tokens;

  const int64_t first_row = all_positions ? 0 : num_tokens - 1;
  const int64_t num_rows = num_tokens - first_row;
  backend_.rms_norm(x.data() + first_row * hidden, weights_.final_norm.data(), normed.data(), num_rows, hidden,
                    config_.rms_norm_eps);
  std::vector<float> logits(num_rows * config_.vocab_size);
  backend_.linear(normed.data(), weights_.output_projection().data(), logits.data(), num_rows, hidden,
                  config_.vocab_size);
  return logits;
}

GenerationResult generate(ModelRunner& runner, std::span<const int32_t> prompt, int64_t max_new_tokens,
                          Sampler& sampler, bool want_prompt_logits) {
  EPIC_CHECK(!prompt.empty(), ErrorCode::kInvalidArgument, "the prompt is empty; give at least one token");
  EPIC_CHECK(max_new_tokens >= 0, ErrorCode::kInvalidArgument, "max_new_tokens must be >= 0");
  const ModelConfig& config = runner.config();
  KvCache cache(config);
  GenerationResult result;
  std::vector<float> logits = runner.forward(prompt, cache, want_prompt_logits);
  const int64_t vocab = config.vocab_size;
  std::span<const float> last(logits.data() + logits.size() - vocab, vocab);
  if (want_prompt_logits) result.prompt_logits = logits;
  for (int64_t step = 0; step < max_new_tokens; ++step) {
    const int32_t next = sampler.sample(last);
    result.new_ids.push_back(next);
    if (std::find(config.eos_token_ids.begin(), config.eos_token_ids.end(), next) != config.eos_token_ids.end())
      break;
    if (step + 1 == max_new_tokens) break;
    const int32_t token[1] = {next};
    logits = runner.forward(token, cache, false);
    last = std::span<const float>(logits.data(), vocab);
  }
  return result;
}

}  // namespace epic
