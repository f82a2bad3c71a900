// Internal to the CPU backend: the op bodies behind CpuBackend (kernels/cpu/cpu_backend.cpp), called
// after the shared checks (shapes, types, memory space) and the CPU's own (f32 activations). They
// check the values they index with (ids, positions, slots, offsets), since a CPU read out of bounds
// would corrupt memory silently, and throw Error(kInvalidArgument) naming the op and the entry.
#pragma once

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "kernels/tensor.h"

namespace epic::cpu {

// ---- cpu_dot_kernels.cpp: the summation-order-critical loops --------------------------------

// Runs body(begin, end) over [0, num_items) in contiguous chunks on up to max_threads threads. body
// must compute each item independently of the others; then the split, and so the thread count,
// cannot change the result.
void parallel_for(int64_t num_items, int64_t work_per_item, int max_threads,
                  const std::function<void(int64_t, int64_t)>& body);

// y[rows, out_dim] = x[rows, in_dim] * w^T, w [out_dim, in_dim] of w_type (F32 or BF16, widened
// exactly block by block). Each y element is one fixed-order dot product (kDotLanes partial sums),
// whatever the thread count or the rows around it.
void linear(const float* x, const void* w, ScalarType w_type, float* y, int64_t rows, int64_t in_dim,
            int64_t out_dim, int num_threads);

// scores[key] = dot(q_row, key row of `key`) * scale for keys 0 .. num_visible - 1 of one sequence,
// the key rows found through its block table in key_pool [blocks, kKvBlockSize, num_kv_heads,
// head_dim] (kv head kv_head).
void paged_attention_scores(const float* q_row, const float* key_pool, const int32_t* block_table,
                            int64_t num_visible, int64_t kv_head, int64_t num_kv_heads, int64_t head_dim,
                            float scale, float* scores);

// ---- helpers -----------------------------------------------------------------------------------

inline float bf16_to_float(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  __builtin_memcpy(&value, &widened, sizeof(value));
  return value;
}

// Throws Error(kInvalidArgument, "<op>: <what>") for a value (id, position, slot) out of range.
[[noreturn]] void fail_value(const char* op, const std::string& what);

// An F32 or BF16 vector (a norm weight) as floats, exactly.
std::vector<float> widened(const Tensor& t);

// x[rows, dim] -> y: x / sqrt(mean(x^2) + eps) * weight, mean square in double (the old rms_norm).
void rms_norm_rows(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, int64_t x_stride,
                   int64_t y_stride, float eps);

// out[r, i] = silu(gate[r, i]) * up[r, i] in fp32 (the old silu_mul).
void silu_mul_rows(const float* gate_up, float* out, int64_t rows, int64_t inter);

// ---- cpu_dense_ops.cpp --------------------------------------------------------------------------
void embed(const Tensor& ids, const Tensor& table, const Tensor& out);
void rms_norm(const Tensor& x, const Tensor& weight, const Tensor& y, float eps);
void add_rms_norm(const Tensor& delta, const Tensor& residual, const Tensor& weight, const Tensor& normed,
                  const Tensor& normed_f32, float eps);
void qk_norm_rope(const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm, const Tensor& positions,
                  const AttentionShape& shape, float eps, double theta);
void store_kv(const Tensor& qkv, const Tensor& slot_mapping, const Tensor& key_pool, const Tensor& value_pool,
              const AttentionShape& shape);
void attention(const Tensor& qkv, const Tensor& key_pool, const Tensor& value_pool,
               const Tensor& block_tables, const Tensor& row_sequence, const Tensor& positions,
               const AttentionShape& shape, const Tensor& out, int num_threads);
void silu_mul(const Tensor& gate_up, const Tensor& out);
void add(const Tensor& x, const Tensor& y);
void gather_rows(const Tensor& x, const Tensor& index, const Tensor& out);
void argmax(const Tensor& logits, const Tensor& ids);

// ---- cpu_scoring_ops.cpp ------------------------------------------------------------------------
void log_softmax(const Tensor& logits, const Tensor& out, int num_threads);
void score_rows(const Tensor& logits, const Tensor& targets, const Tensor& reference_log_probs,
                const Tensor& scores, const Tensor& ids, int num_threads);

// ---- cpu_moe_ops.cpp ----------------------------------------------------------------------------
void route_top_k(const Tensor& logits, const Tensor& present, const Tensor& expert_ids, const Tensor& weights,
                 bool normalize, const Tensor& row_top_k);
void group_by_expert(const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                     const Tensor& expert_offsets, const Tensor& source_row, const Tensor& sorted_position);
void count_routed_slots(const Tensor& expert_ids, const Tensor& real_tokens, const Tensor& expert_counts,
                        const Tensor& keys, const Tensor& key_counts);
void expert_ffn(const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up, const Tensor& down,
                const Tensor& local_index, const Tensor& intermediate, const Tensor& y, int num_threads);
// As expert_ffn with each expert's gate_up and down at the host addresses of addresses I64 [E, 2].
void expert_ffn_addressed(const Tensor& x, const Tensor& expert_offsets, const Tensor& addresses,
                          ScalarType weight_type, const Tensor& intermediate, const Tensor& y,
                          int num_threads);
void combine_top_k(const Tensor& expert_out, const Tensor& sorted_position, const Tensor& weights,
                   const Tensor& out);

}  // namespace epic::cpu
