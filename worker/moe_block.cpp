// route -> group -> expert FFN -> combine, each a separate function (see moe_block.h).
#include "worker/moe_block.h"

#include <algorithm>
#include <cstring>

#include "kernels/error.h"
#include "worker/moe_executor.h"

namespace epic {

Routing route_tokens(Backend& backend, const MoeLayerWeights& layer, const float* hidden, int64_t num_tokens,
                     int64_t hidden_size, int64_t top_k, bool normalize_top_k) {
  Routing routing;
  routing.num_tokens = num_tokens;
  routing.top_k = top_k;
  std::vector<float> logits(num_tokens * layer.num_experts);
  backend.linear(hidden, layer.router.data(), logits.data(), num_tokens, hidden_size, layer.num_experts);
  routing.expert_ids.resize(num_tokens * top_k);
  routing.weights.resize(num_tokens * top_k);
  backend.route_top_k(logits.data(), layer.present.data(), routing.expert_ids.data(), routing.weights.data(),
                      num_tokens, layer.num_experts, top_k, normalize_top_k);
  return routing;
}

ExpertGroups group_rows_by_expert(const Routing& routing) {
  const int64_t num_slots = routing.num_tokens * routing.top_k;
  std::vector<int64_t> order(num_slots);
  for (int64_t slot = 0; slot < num_slots; ++slot) order[slot] = slot;
  // Stable: rows of one expert stay in (token, slot) order.
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return routing.expert_ids[a] < routing.expert_ids[b]; });
  ExpertGroups groups;
  groups.slots = order;
  for (int64_t i = 0; i < num_slots; ++i) {
    const int64_t expert = routing.expert_ids[order[i]];
    if (groups.expert_ids.empty() || groups.expert_ids.back() != expert) {
      groups.expert_ids.push_back(expert);
      groups.offsets.push_back(i);
    }
  }
  groups.offsets.push_back(num_slots);
  return groups;
}

void swiglu_ffn(Backend& backend, const float* x, const float* gate, const float* up, const float* down,
                int64_t rows, int64_t hidden_size, int64_t intermediate_size, float* out) {
  std::vector<float> gate_out(rows * intermediate_size), up_out(rows * intermediate_size);
  backend.linear(x, gate, gate_out.data(), rows, hidden_size, intermediate_size);
  backend.linear(x, up, up_out.data(), rows, hidden_size, intermediate_size);
  backend.silu_mul(gate_out.data(), up_out.data(), gate_out.data(), rows * intermediate_size);
  backend.linear(gate_out.data(), down, out, rows, intermediate_size, hidden_size);
}

void run_expert_ffn(Backend& backend, const MoeLayerWeights& layer, const ExpertGroups& groups,
                    const float* hidden, int64_t hidden_size, int64_t intermediate_size, int64_t top_k,
                    float* slot_outputs) {
  std::vector<float> rows_in, rows_out;
  for (size_t g = 0; g < groups.expert_ids.size(); ++g) {
    const int64_t expert_id = groups.expert_ids[g];
    auto expert = layer.experts.find(expert_id);
    if (expert == layer.experts.end())
      throw Error(ErrorCode::kInternal,
                  "expert " + std::to_string(expert_id) + " received rows but is not loaded on this process");
    const int64_t begin = groups.offsets[g], num_rows = groups.offsets[g + 1] - begin;
    rows_in.resize(num_rows * hidden_size);
    rows_out.resize(num_rows * hidden_size);
    for (int64_t r = 0; r < num_rows; ++r) {
      const int64_t token = groups.slots[begin + r] / top_k;
      std::memcpy(&rows_in[r * hidden_size], hidden + token * hidden_size, hidden_size * sizeof(float));
    }
    swiglu_ffn(backend, rows_in.data(), expert->second.gate.data(), expert->second.up.data(),
               expert->second.down.data(), num_rows, hidden_size, intermediate_size, rows_out.data());
    for (int64_t r = 0; r < num_rows; ++r)
      std::memcpy(slot_outputs + groups.slots[begin + r] * hidden_size, &rows_out[r * hidden_size],
                  hidden_size * sizeof(float));
  }
}

void combine_top_k(const Routing& routing, const float* slot_outputs, int64_t hidden_size, float* out) {
  for (int64_t t = 0; t < routing.num_tokens; ++t) {
    float* row = out + t * hidden_size;
    std::fill(row, row + hidden_size, 0.0f);
    for (int64_t j = 0; j < routing.top_k; ++j) {
      const float weight = routing.weights[t * routing.top_k + j];
      const float* x = slot_outputs + (t * routing.top_k + j) * hidden_size;
      for (int64_t i = 0; i < hidden_size; ++i) row[i] += weight * x[i];
    }
  }
}

void moe_block_forward(Backend& backend, const MoeLayerWeights& layer, const float* hidden,
                       int64_t num_tokens, int64_t hidden_size, int64_t intermediate_size, int64_t top_k,
                       bool normalize_top_k, float* out) {
  const Routing routing =
      route_tokens(backend, layer, hidden, num_tokens, hidden_size, top_k, normalize_top_k);
  const ExpertGroups groups = group_rows_by_expert(routing);
  std::vector<float> slot_outputs(num_tokens * top_k * hidden_size);
  run_expert_ffn(backend, layer, groups, hidden, hidden_size, intermediate_size, top_k, slot_outputs.data());
  combine_top_k(routing, slot_outputs.data(), hidden_size, out);
}

void LocalMoeExecutor::forward(int64_t layer, const float* hidden, int64_t num_tokens, float* out) {
  moe_block_forward(backend_, weights_.layers[layer].moe, hidden, num_tokens, config_.hidden_size,
                    config_.moe_intermediate_size, config_.num_experts_per_tok, config_.norm_topk_prob, out);
}

}  // namespace epic
