// Argument checks shared by every Backend: each checks an op's tensors (memory space, scalar type,
// rank and shape, and how the shapes relate) before the op touches memory, and throws
// Error(kInvalidArgument) naming the op and the offending tensor, e.g.
//   "linear: w is bf16[64, 32] on host but x is f32[4, 48] on host: in_dim differs".
// `space` is where the calling backend's memory lives; every tensor must be there. Only shapes
// and types are checked here (values such as ids or offsets may sit on a device); a backend that
// can read values cheaply (the CPU) checks them itself.
#pragma once

#include <cstddef>
#include <cstdint>

#include "kernels/backend.h"
#include "kernels/tensor.h"

namespace epic::backend_checks {

// Bytes [offset, offset + bytes) of t, t in space. op names the copy in the message.
void check_copy_range(const char* op, MemorySpace space, const Tensor& t, size_t offset, size_t bytes);
// src and dst in space with the same byte count.
void check_copy(const char* op, MemorySpace space, const Tensor& src, const Tensor& dst);

// ---- dense ops (Backend's contract in kernels/backend.h) ----
void check_embed(MemorySpace space, const Tensor& ids, const Tensor& table, const Tensor& out);
void check_linear(MemorySpace space, const Tensor& x, const Tensor& w, const Tensor& y);
void check_rms_norm(MemorySpace space, const Tensor& x, const Tensor& weight, const Tensor& y);
// normed_f32 may be absent (is_absent); delta, residual, normed and normed_f32 must not overlap.
void check_add_rms_norm(MemorySpace space, const Tensor& delta, const Tensor& residual, const Tensor& weight,
                        const Tensor& normed, const Tensor& normed_f32);
void check_qk_norm_rope(MemorySpace space, const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm,
                        const Tensor& positions, const AttentionShape& shape, double theta);
void check_store_kv(MemorySpace space, const Tensor& qkv, const Tensor& slot_mapping, const Tensor& key_pool,
                    const Tensor& value_pool, const AttentionShape& shape);
void check_attention(MemorySpace space, const Tensor& qkv, const Tensor& key_pool, const Tensor& value_pool,
                     const Tensor& block_tables, const Tensor& row_sequence, const Tensor& positions,
                     const AttentionShape& shape, const Tensor& out);
// Every step of Backend::decode_attention (each step's own check, its message prefixed
// "decode_attention: the <step> step: ").
void check_decode_attention(MemorySpace space, const Tensor& qkv, const Tensor& q_norm, const Tensor& k_norm,
                            const Tensor& key_pool, const Tensor& value_pool, const AttentionTables& tables,
                            const AttentionShape& shape, double theta, const Tensor& out);
void check_silu_mul(MemorySpace space, const Tensor& gate_up, const Tensor& out);
void check_add(MemorySpace space, const Tensor& x, const Tensor& y);
void check_gather_rows(MemorySpace space, const Tensor& x, const Tensor& index, const Tensor& out);
void check_argmax(MemorySpace space, const Tensor& logits, const Tensor& ids);

// ---- scoring ----
void check_log_softmax(MemorySpace space, const Tensor& logits, const Tensor& out);
void check_score_rows(MemorySpace space, const Tensor& logits, const Tensor& targets,
                      const Tensor& reference_log_probs, const Tensor& scores, const Tensor& ids);

// ---- MoE ops ----
void check_route_top_k(MemorySpace space, const Tensor& logits, const Tensor& present,
                       const Tensor& expert_ids, const Tensor& weights, const Tensor& row_top_k = Tensor{});
void check_group_by_expert(MemorySpace space, const Tensor& expert_ids, int64_t num_experts, int64_t top_k,
                           const Tensor& expert_offsets, const Tensor& source_row,
                           const Tensor& sorted_position);
void check_expert_ffn(MemorySpace space, const Tensor& x, const Tensor& expert_offsets, const Tensor& gate_up,
                      const Tensor& down, const Tensor& local_index, const Tensor& intermediate,
                      const Tensor& y);
void check_count_routed_slots(MemorySpace space, const Tensor& expert_ids, const Tensor& real_tokens,
                              const Tensor& expert_counts, const Tensor& keys, const Tensor& key_counts);
void check_combine_top_k(MemorySpace space, const Tensor& expert_out, const Tensor& sorted_position,
                         const Tensor& weights, const Tensor& out);
// Backend::expert_ffn_addressed's shapes and types (the addresses themselves are the caller's).
void check_expert_ffn_addressed(MemorySpace space, const Tensor& x, const Tensor& expert_offsets,
                                const Tensor& addresses, ScalarType weight_type, const Tensor& intermediate,
                                const Tensor& y);

// Every step of Backend::routed_moe on its tensors (each step's own check, its message prefixed
// "routed_moe: the <step> step: "), top_k = expert_ids.dim(1) >= 1, and one token count.
void check_routed_moe(MemorySpace space, const Tensor& router_input, const Tensor& x,
                      const RoutedMoeWeights& weights, const RoutedMoeScratch& scratch, const Tensor& out);

}  // namespace epic::backend_checks
