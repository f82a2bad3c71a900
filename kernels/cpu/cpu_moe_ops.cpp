// The CPU reference's MoE ops: routing, the stable grouping of (token, slot) rows by expert, the
// grouped SwiGLU FFN and the fixed-order combine; the same expressions, in the same order, as the
// pre-tensor route_top_k, swiglu_ffn and combine_top_k, so results keep their bits.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels/cpu/cpu_ops.h"

namespace epic::cpu {

// fp32 throughout, sums in ascending expert id (the denominator) or selection order (the
// renormalisation), so a backend computing the same expressions gets the same bits.
void route_top_k(const Tensor& logits, const Tensor& present_mask, const Tensor& expert_ids,
                 const Tensor& weights, bool normalize, const Tensor& row_top_k) {
  const int64_t num_tokens = logits.dim(0), num_experts = logits.dim(1), top_k = expert_ids.dim(1);
  const uint8_t* present = present_mask.as<const uint8_t>();
  std::vector<int32_t> present_ids;
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    if (present[expert] != 0) present_ids.push_back(static_cast<int32_t>(expert));
  }
  if (top_k > static_cast<int64_t>(present_ids.size())) {
    fail_value("route_top_k", "top_k = " + std::to_string(top_k) + " exceeds the " +
                                  std::to_string(present_ids.size()) + " present experts (of " +
                                  std::to_string(num_experts) + "); load more experts or lower top_k");
  }
  std::vector<float> probabilities(static_cast<size_t>(num_experts));
  std::vector<int32_t> order;
  for (int64_t token = 0; token < num_tokens; ++token) {
    const float* row = logits.as<const float>() + token * num_experts;
    float max_logit = -std::numeric_limits<float>::infinity();
    for (int32_t expert : present_ids) max_logit = std::max(max_logit, row[expert]);
    float denominator = 0.0f;
    for (int32_t expert : present_ids) denominator += std::exp(row[expert] - max_logit);
    for (int32_t expert : present_ids)
      probabilities[expert] = std::exp(row[expert] - max_logit) / denominator;

    order = present_ids;
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t a, int32_t b) {
      return probabilities[a] > probabilities[b] || (probabilities[a] == probabilities[b] && a < b);
    });
    int32_t* ids_row = expert_ids.as<int32_t>() + token * top_k;
    float* weights_row = weights.as<float>() + token * top_k;
    // The token's own k: its first k choices, renormalised over them alone; the rest padding.
    const int64_t own_k = is_absent(row_top_k) ? top_k : row_top_k.as<const int32_t>()[token];
    if (own_k < 1 || own_k > top_k) {
      fail_value("route_top_k", "row_top_k[" + std::to_string(token) + "] = " + std::to_string(own_k) +
                                    " is outside [1, top_k = " + std::to_string(top_k) + "]");
    }
    float selected_sum = 0.0f;
    for (int64_t j = 0; j < own_k; ++j) {
      ids_row[j] = order[j];
      weights_row[j] = probabilities[order[j]];
      selected_sum += weights_row[j];
    }
    if (normalize) {
      for (int64_t j = 0; j < own_k; ++j) weights_row[j] /= selected_sum;
    }
    for (int64_t j = own_k; j < top_k; ++j) {
      ids_row[j] = order[0];
      weights_row[j] = 0.0f;
    }
  }
}

// A counting sort: stable, so rows of one expert stay in (token, slot) order.
void group_by_expert(const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                     const Tensor& expert_offsets, const Tensor& source_row, const Tensor& sorted_position) {
  const int64_t num_slots = expert_ids.numel();
  const int32_t* expert = expert_ids.as<const int32_t>();
  std::vector<int64_t> cursor(static_cast<size_t>(num_experts) + 1, 0);
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    if (expert[slot] < 0 || expert[slot] >= num_experts) {
      fail_value("group_by_expert", "expert_ids[" + std::to_string(slot) +
                                        "] = " + std::to_string(expert[slot]) +
                                        " is outside [0, num_experts = " + std::to_string(num_experts) + ")");
    }
    ++cursor[expert[slot] + 1];
  }
  int32_t* offsets = expert_offsets.as<int32_t>();
  for (int64_t e = 0; e < num_experts; ++e) cursor[e + 1] += cursor[e];
  for (int64_t e = 0; e <= num_experts; ++e) offsets[e] = static_cast<int32_t>(cursor[e]);
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    const int64_t position = cursor[expert[slot]]++;
    source_row.as<int32_t>()[position] = static_cast<int32_t>(slot / top_k);
    sorted_position.as<int32_t>()[slot] = static_cast<int32_t>(position);
  }
}

namespace {

// Offsets that tile [0, rows) in order, and rows only for hosted experts.
void check_expert_groups(const Tensor& expert_offsets, const Tensor& local_index, int64_t rows,
                         int64_t num_local) {
  const int64_t num_experts = local_index.dim(0);
  const int32_t* offsets = expert_offsets.as<const int32_t>();
  const int32_t* local = local_index.as<const int32_t>();
  if (offsets[0] != 0 || offsets[num_experts] != rows) {
    fail_value("expert_ffn", "expert_offsets must run from 0 to the row count " + std::to_string(rows) +
                                 ", not from " + std::to_string(offsets[0]) + " to " +
                                 std::to_string(offsets[num_experts]));
  }
  for (int64_t e = 0; e < num_experts; ++e) {
    if (offsets[e + 1] < offsets[e]) {
      fail_value("expert_ffn", "expert_offsets decrease at expert " + std::to_string(e) + " (" +
                                   std::to_string(offsets[e]) + " then " + std::to_string(offsets[e + 1]) +
                                   ")");
    }
    if (local[e] < -1 || local[e] >= num_local) {
      fail_value("expert_ffn", "local_index[" + std::to_string(e) + "] = " + std::to_string(local[e]) +
                                   " is neither -1 (not hosted) nor a slot of the " +
                                   std::to_string(num_local) + " hosted experts");
    }
    if (local[e] == -1 && offsets[e + 1] > offsets[e]) {
      fail_value("expert_ffn", "expert " + std::to_string(e) +
                                   " is not hosted here (local_index -1) but has " +
                                   std::to_string(offsets[e + 1] - offsets[e]) + " rows");
    }
  }
}

}  // namespace

// Per expert group, the old swiglu_ffn: linear gate and up (one fused linear over gate_up's 2I
// rows: each element is the same dot product), silu_mul, linear down.
// One expert's group of rows [begin, begin + num_rows): gate_up and down at their addresses.
static void expert_group_ffn(const Tensor& x, int64_t begin, int64_t num_rows, const void* gate_up_weights,
                             const void* down_weights, ScalarType weight_type, const Tensor& intermediate,
                             const Tensor& y, std::vector<float>& gate_up_out, int num_threads) {
  const int64_t hidden = x.dim(1), inter = intermediate.dim(1);
  gate_up_out.resize(static_cast<size_t>(num_rows * 2 * inter));
  float* inter_rows = intermediate.as<float>() + begin * inter;
  linear(x.as<const float>() + begin * hidden, gate_up_weights, weight_type, gate_up_out.data(), num_rows,
         hidden, 2 * inter, num_threads);
  silu_mul_rows(gate_up_out.data(), inter_rows, num_rows, inter);
  linear(inter_rows, down_weights, weight_type, y.as<float>() + begin * hidden, num_rows, inter, hidden,
         num_threads);
}

void count_routed_slots(const Tensor& expert_ids, const Tensor& real_tokens, const Tensor& expert_counts,
                        const Tensor& keys, const Tensor& key_counts) {
  const int64_t top_k = expert_ids.dim(1);
  int64_t tokens = expert_ids.dim(0);
  if (!is_absent(real_tokens)) tokens = std::clamp<int64_t>(real_tokens.as<const int32_t>()[0], 0, tokens);
  const int32_t* ids = expert_ids.as<const int32_t>();
  const int32_t* key = is_absent(keys) ? nullptr : keys.as<const int32_t>();
  auto* counts = expert_counts.as<int64_t>();
  auto* per_key = is_absent(key_counts) ? nullptr : key_counts.as<int64_t>();
  const int64_t num_experts = expert_counts.numel(), num_keys = per_key != nullptr ? key_counts.numel() : 0;
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < top_k; ++j) {
      const int64_t s = t * top_k + j;
      if (is_padding_slot(ids + t * top_k, j)) continue;
      if (ids[s] >= 0 && ids[s] < num_experts) ++counts[ids[s]];
      if (key != nullptr && key[s] >= 0 && key[s] < num_keys) ++per_key[key[s]];
    }
  }
}

void expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up, const Tensor& down,
                const Tensor& local_index, const Tensor& intermediate, const Tensor& y, int num_threads) {
  const int64_t rows = x.dim(0), hidden = x.dim(1), inter = down.dim(2), num_experts = local_index.dim(0);
  check_expert_groups(expert_offsets, local_index, rows, gate_up.dim(0));
  const int32_t* offsets = expert_offsets.as<const int32_t>();
  const int32_t* local = local_index.as<const int32_t>();
  const size_t weight_size = scalar_size(gate_up.type);
  std::vector<float> gate_up_out;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t begin = offsets[e], num_rows = offsets[e + 1] - offsets[e];
    if (num_rows == 0) continue;
    const char* gate_up_weights = static_cast<const char*>(gate_up.data) +
                                  static_cast<size_t>(local[e] * 2 * inter * hidden) * weight_size;
    const char* down_weights =
        static_cast<const char*>(down.data) + static_cast<size_t>(local[e] * hidden * inter) * weight_size;
    expert_group_ffn(x, begin, num_rows, gate_up_weights, down_weights, gate_up.type, intermediate, y,
                     gate_up_out, num_threads);
  }
}

void expert_ffn_addressed(const Tensor& x, const Tensor& expert_offsets, const Tensor& addresses,
                          ScalarType weight_type, const Tensor& intermediate, const Tensor& y,
                          int num_threads) {
  const int64_t rows = x.dim(0), num_experts = addresses.dim(0);
  const int32_t* offsets = expert_offsets.as<const int32_t>();
  const auto* table = addresses.as<const int64_t>();
  if (offsets[0] != 0 || offsets[num_experts] != rows)
    fail_value("expert_ffn_addressed",
               "expert_offsets must run from 0 to the " + std::to_string(rows) + " rows");
  std::vector<float> gate_up_out;
  for (int64_t e = 0; e < num_experts; ++e) {
    const int64_t begin = offsets[e], num_rows = offsets[e + 1] - offsets[e];
    if (num_rows < 0 || begin + num_rows > rows)
      fail_value("expert_ffn_addressed", "expert_offsets are not ascending at expert " + std::to_string(e));
    if (num_rows == 0) continue;
    if (table[2 * e] == 0 || table[2 * e + 1] == 0) {
      fail_value("expert_ffn_addressed", "expert " + std::to_string(e) + " has " + std::to_string(num_rows) +
                                             " rows but no address (not hosted here)");
    }
    expert_group_ffn(x, begin, num_rows, reinterpret_cast<const void*>(table[2 * e]),
                     reinterpret_cast<const void*>(table[2 * e + 1]), weight_type, intermediate, y,
                     gate_up_out, num_threads);
  }
}

void combine_top_k(const Tensor& expert_out, const Tensor& sorted_position, const Tensor& weights,
                   const Tensor& out) {
  const int64_t num_tokens = weights.dim(0), top_k = weights.dim(1), hidden = out.dim(1);
  const int32_t* position = sorted_position.as<const int32_t>();
  for (int64_t slot = 0; slot < num_tokens * top_k; ++slot) {
    if (position[slot] < 0 || position[slot] >= expert_out.dim(0)) {
      fail_value("combine_top_k",
                 "sorted_position[" + std::to_string(slot) + "] = " + std::to_string(position[slot]) +
                     " is outside expert_out's rows [0, " + std::to_string(expert_out.dim(0)) + ")");
    }
  }
  for (int64_t t = 0; t < num_tokens; ++t) {
    float* row = out.as<float>() + t * hidden;
    std::fill(row, row + hidden, 0.0f);
    for (int64_t j = 0; j < top_k; ++j) {
      const float weight = weights.as<const float>()[t * top_k + j];
      const float* x = expert_out.as<const float>() + position[t * top_k + j] * hidden;
      for (int64_t i = 0; i < hidden; ++i) row[i] += weight * x[i];
    }
  }
}

}  // namespace epic::cpu
