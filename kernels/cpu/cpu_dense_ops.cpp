// The CPU reference's dense ops over f32 activations (weights f32 or bf16, widened exactly): the
// same expressions, in the same order, as the pre-tensor CPU backend, so results keep their bits.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/cpu_ops.h"
#include "kernels/error.h"

namespace epic::cpu {

void fail_value(const char* op, const std::string& what) {
  throw Error(ErrorCode::kInvalidArgument, std::string(op) + ": " + what);
}

std::vector<float> widened(const Tensor& t) {
  std::vector<float> values(static_cast<size_t>(t.numel()));
  if (t.type == ScalarType::kBF16) {
    const uint16_t* bits = t.as<const uint16_t>();
    for (size_t i = 0; i < values.size(); ++i) values[i] = bf16_to_float(bits[i]);
  } else if (!values.empty()) {
    std::memcpy(values.data(), t.data, values.size() * sizeof(float));
  }
  return values;
}

// The mean square is summed in double (cheap, and it removes the summation order from the
// error); the scaling follows HF: (x * rsqrt(mean + eps)) * weight in fp32.
void rms_norm_rows(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, int64_t x_stride,
                   int64_t y_stride, float eps) {
  if (dim == 0) return;
  for (int64_t row = 0; row < rows; ++row) {
    const float* x_row = x + row * x_stride;
    float* y_row = y + row * y_stride;
    double sum_squares = 0.0;
    for (int64_t i = 0; i < dim; ++i) sum_squares += static_cast<double>(x_row[i]) * x_row[i];
    const float inv_rms = static_cast<float>(
        1.0 / std::sqrt(sum_squares / static_cast<double>(dim) + static_cast<double>(eps)));
    for (int64_t i = 0; i < dim; ++i) y_row[i] = (x_row[i] * inv_rms) * weight[i];
  }
}

void silu_mul_rows(const float* gate_up, float* out, int64_t rows, int64_t inter) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* gate = gate_up + row * 2 * inter;
    const float* up = gate + inter;
    float* out_row = out + row * inter;
    for (int64_t i = 0; i < inter; ++i) out_row[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

void embed(const Tensor& ids, const Tensor& table, const Tensor& out) {
  const int64_t vocab = table.dim(0), hidden = table.dim(1);
  const int32_t* id = ids.as<const int32_t>();
  for (int64_t row = 0; row < ids.dim(0); ++row) {
    if (id[row] < 0 || id[row] >= vocab) {
      fail_value("embed", "ids[" + std::to_string(row) + "] = " + std::to_string(id[row]) +
                              " is outside the table's vocabulary [0, " + std::to_string(vocab) + ")");
    }
  }
  float* y = out.as<float>();
  for (int64_t row = 0; row < ids.dim(0); ++row) {
    const int64_t source = static_cast<int64_t>(id[row]) * hidden;
    if (table.type == ScalarType::kBF16) {
      const uint16_t* bits = table.as<const uint16_t>() + source;
      for (int64_t i = 0; i < hidden; ++i) y[row * hidden + i] = bf16_to_float(bits[i]);
    } else {
      std::memcpy(y + row * hidden, table.as<const float>() + source,
                  static_cast<size_t>(hidden) * sizeof(float));
    }
  }
}

void rms_norm(const Tensor& x, const Tensor& weight, const Tensor& y, float eps) {
  const std::vector<float> weight_f32 = widened(weight);
  const int64_t dim = x.dim(1);
  rms_norm_rows(x.as<const float>(), weight_f32.data(), y.as<float>(), x.dim(0), dim, dim, dim, eps);
}

// add then rms_norm, the very routines of the unfused ops, so the fused op is bitwise the pair (the
// reference stays the reference). normed is f32 here, so normed_f32 is a copy of its bits: what a
// second rms_norm of the same rows would write.
void add_rms_norm(const Tensor& delta, const Tensor& residual, const Tensor& weight, const Tensor& normed,
                  const Tensor& normed_f32, float eps) {
  add(delta, residual);
  rms_norm(residual, weight, normed, eps);
  if (!is_absent(normed_f32) && normed.bytes() > 0) std::memcpy(normed_f32.data, normed.data, normed.bytes());
}

namespace {

void check_positions(const char* op, const Tensor& positions) {
  const int32_t* position = positions.as<const int32_t>();
  for (int64_t row = 0; row < positions.dim(0); ++row) {
    if (position[row] < 0) {
      fail_value(
          op, "positions[" + std::to_string(row) + "] = " + std::to_string(position[row]) + " is negative");
    }
  }
}

// Rotary embedding of num_heads contiguous head vectors at one position. Angles, cos and sin in
// double (see backend.h for why), the rotation itself in fp32.
void rope_heads(float* x, int64_t num_heads, int64_t head_dim, const std::vector<float>& cos_values,
                const std::vector<float>& sin_values) {
  const int64_t half = head_dim / 2;
  for (int64_t head = 0; head < num_heads; ++head) {
    float* x_head = x + head * head_dim;
    for (int64_t i = 0; i < half; ++i) {
      const float first = x_head[i];
      const float second = x_head[i + half];
      x_head[i] = first * cos_values[i] - second * sin_values[i];
      x_head[i + half] = second * cos_values[i] + first * sin_values[i];
    }
  }
}

}  // namespace

void qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& positions,
                  const AttentionShape& shape, float eps, double theta) {
  check_positions("qk_norm_rope", positions);
  const std::vector<float> q_weight = widened(q_norm), k_weight = widened(k_norm);
  const int64_t head_dim = shape.head_dim, half = head_dim / 2;
  std::vector<double> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
  }
  std::vector<float> cos_values(static_cast<size_t>(half)), sin_values(static_cast<size_t>(half));
  const int32_t* position = positions.as<const int32_t>();
  for (int64_t row = 0; row < qkv.dim(0); ++row) {
    float* q = qkv.as<float>() + row * shape.qkv_dim();
    float* k = q + shape.q_dim();
    // q_norm / k_norm act on each head's vector, before the rotation.
    rms_norm_rows(q, q_weight.data(), q, shape.num_heads, head_dim, head_dim, head_dim, eps);
    rms_norm_rows(k, k_weight.data(), k, shape.num_kv_heads, head_dim, head_dim, head_dim, eps);
    for (int64_t i = 0; i < half; ++i) {
      const double angle = static_cast<double>(position[row]) * inv_freq[i];
      cos_values[i] = static_cast<float>(std::cos(angle));
      sin_values[i] = static_cast<float>(std::sin(angle));
    }
    rope_heads(q, shape.num_heads, head_dim, cos_values, sin_values);
    rope_heads(k, shape.num_kv_heads, head_dim, cos_values, sin_values);
  }
}

void store_kv(const Tensor& qkv, const Tensor& slot_mapping, const Tensor& key_pool, const Tensor& value_pool,
              const AttentionShape& shape) {
  const int64_t num_slots = key_pool.dim(0) * kKvBlockSize, kv_dim = shape.kv_dim();
  const int32_t* slot = slot_mapping.as<const int32_t>();
  for (int64_t row = 0; row < qkv.dim(0); ++row) {
    if (slot[row] >= num_slots) {
      fail_value("store_kv", "slot_mapping[" + std::to_string(row) + "] = " + std::to_string(slot[row]) +
                                 " is past the pool's " + std::to_string(num_slots) + " slots (" +
                                 key_pool.describe() + ")");
    }
  }
  const size_t row_bytes = static_cast<size_t>(kv_dim) * sizeof(float);
  for (int64_t row = 0; row < qkv.dim(0); ++row) {
    if (slot[row] < 0) continue;  // padding
    const float* k = qkv.as<const float>() + row * shape.qkv_dim() + shape.q_dim();
    std::memcpy(key_pool.as<float>() + slot[row] * kv_dim, k, row_bytes);
    std::memcpy(value_pool.as<float>() + slot[row] * kv_dim, k + kv_dim, row_bytes);
  }
}

namespace {

// Every row's sequence, position and the blocks it reads must exist.
void check_attention_values(const Tensor& key_pool, const Tensor& block_tables, const Tensor& row_sequence,
                            const Tensor& positions) {
  const int64_t num_sequences = block_tables.dim(0), max_blocks = block_tables.dim(1);
  const int64_t num_blocks = key_pool.dim(0);
  const int32_t* sequence = row_sequence.as<const int32_t>();
  const int32_t* position = positions.as<const int32_t>();
  const int32_t* tables = block_tables.as<const int32_t>();
  check_positions("attention", positions);
  for (int64_t row = 0; row < row_sequence.dim(0); ++row) {
    const std::string where = "row " + std::to_string(row) + ": ";
    if (sequence[row] < 0 || sequence[row] >= num_sequences) {
      fail_value("attention", where + "row_sequence = " + std::to_string(sequence[row]) +
                                  " is outside the block tables' " + std::to_string(num_sequences) +
                                  " sequences");
    }
    const int64_t blocks_needed = position[row] / kKvBlockSize + 1;
    if (blocks_needed > max_blocks) {
      fail_value("attention", where + "position " + std::to_string(position[row]) + " needs " +
                                  std::to_string(blocks_needed) + " blocks but a block table holds " +
                                  std::to_string(max_blocks));
    }
    const int32_t* table = tables + sequence[row] * max_blocks;
    for (int64_t b = 0; b < blocks_needed; ++b) {
      if (table[b] < 0 || table[b] >= num_blocks) {
        fail_value("attention", where + "block_tables[" + std::to_string(sequence[row]) + ", " +
                                    std::to_string(b) + "] = " + std::to_string(table[b]) +
                                    " is outside the pool's " + std::to_string(num_blocks) + " blocks");
      }
    }
  }
}

}  // namespace

// Per (row, head): fp32 scores (dot() then * head_dim^-0.5, as HF scales after the matmul), fp32
// exp(score - max), and the softmax denominator and the weighted sum of values in double, keys in
// position order: the old contiguous-cache attention's expressions, reading the keys through the
// block table instead of a contiguous copy.
void attention(const Tensor& qkv, const Tensor& key_pool, const Tensor& value_pool,
               const Tensor& block_tables, const Tensor& row_sequence, const Tensor& positions,
               const AttentionShape& shape, const Tensor& out, int num_threads) {
  check_attention_values(key_pool, block_tables, row_sequence, positions);
  const int64_t rows = qkv.dim(0), num_heads = shape.num_heads, num_kv_heads = shape.num_kv_heads;
  const int64_t head_dim = shape.head_dim, max_blocks = block_tables.dim(1);
  const int64_t heads_per_kv_head = num_heads / num_kv_heads;
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const int32_t* sequence = row_sequence.as<const int32_t>();
  const int32_t* position = positions.as<const int32_t>();
  int64_t most_keys = 0;
  for (int64_t row = 0; row < rows; ++row) most_keys = std::max<int64_t>(most_keys, position[row] + 1);
  const float* key_values = key_pool.as<const float>();
  const float* value_values = value_pool.as<const float>();
  parallel_for(rows * num_heads, 2 * most_keys * head_dim, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<double> sum(static_cast<size_t>(head_dim));
    for (int64_t item = begin; item < end; ++item) {
      const int64_t row = item / num_heads;
      const int64_t head = item % num_heads;
      const int64_t kv_head = head / heads_per_kv_head;
      const int64_t num_visible = position[row] + 1;
      const int32_t* block_table = block_tables.as<const int32_t>() + sequence[row] * max_blocks;
      const float* q_row = qkv.as<const float>() + row * shape.qkv_dim() + head * head_dim;
      scores.resize(static_cast<size_t>(num_visible));
      paged_attention_scores(q_row, key_values, block_table, num_visible, kv_head, num_kv_heads, head_dim,
                             scale, scores.data());
      const float max_score = *std::max_element(scores.begin(), scores.end());
      double denominator = 0.0;
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int64_t key = 0; key < num_visible; ++key) {
        const float probability = std::exp(scores[key] - max_score);
        denominator += probability;
        const int64_t slot =
            static_cast<int64_t>(block_table[key / kKvBlockSize]) * kKvBlockSize + key % kKvBlockSize;
        const float* v_row = value_values + (slot * num_kv_heads + kv_head) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) sum[d] += static_cast<double>(probability) * v_row[d];
      }
      float* out_row = out.as<float>() + row * shape.q_dim() + head * head_dim;
      for (int64_t d = 0; d < head_dim; ++d) out_row[d] = static_cast<float>(sum[d] / denominator);
    }
  });
}

void silu_mul(const Tensor& gate_up, const Tensor& out) {
  silu_mul_rows(gate_up.as<const float>(), out.as<float>(), out.dim(0), out.dim(1));
}

void add(const Tensor& x, const Tensor& y) {
  const float* source = x.as<const float>();
  float* target = y.as<float>();
  for (int64_t i = 0; i < x.numel(); ++i) target[i] += source[i];
}

void gather_rows(const Tensor& x, const Tensor& index, const Tensor& out) {
  const int32_t* source_row = index.as<const int32_t>();
  for (int64_t i = 0; i < index.dim(0); ++i) {
    if (source_row[i] < 0 || source_row[i] >= x.rows()) {
      fail_value("gather_rows", "index[" + std::to_string(i) + "] = " + std::to_string(source_row[i]) +
                                    " is outside x's rows [0, " + std::to_string(x.rows()) + ") (" +
                                    x.describe() + ")");
    }
  }
  const size_t row_bytes = x.row_bytes();
  for (int64_t i = 0; i < index.dim(0); ++i) {
    std::memcpy(static_cast<char*>(out.data) + static_cast<size_t>(i) * row_bytes,
                static_cast<const char*>(x.data) + static_cast<size_t>(source_row[i]) * row_bytes, row_bytes);
  }
}

// Strictly greater wins, scanning up: the lowest id among equal maxima.
void argmax(const Tensor& logits, const Tensor& ids) {
  const int64_t vocab = logits.dim(1);
  for (int64_t row = 0; row < logits.dim(0); ++row) {
    const float* values = logits.as<const float>() + row * vocab;
    int64_t best = 0;
    bool non_finite = !std::isfinite(values[0]);
    for (int64_t v = 1; v < vocab; ++v) {
      non_finite = non_finite || !std::isfinite(values[v]);
      if (values[v] > values[best]) best = v;
    }
    // A NaN or Inf anywhere: no choice is meaningful, the caller reports it (backend.h).
    ids.as<int32_t>()[row] = non_finite ? -1 : static_cast<int32_t>(best);
  }
}

}  // namespace epic::cpu
