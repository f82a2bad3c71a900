// Host entry points of the CUDA kernels behind CudaBackend (kernels/backend.h states each op's
// math). Device pointers plus a stream; the backend has already validated types, shapes and
// memory spaces (kernels/backend_checks.h), so these only launch. Each launches asynchronously,
// checks the launch (EPIC_CUDA_CHECK_LAUNCH), never synchronises, never allocates and never
// copies to the host: every one of them may be recorded into a CUDA graph.
// `type` arguments are ScalarType::kF32 or kBF16 (bf16 stored as __nv_bfloat16 / uint16_t bits).
// Accumulation is fp32 everywhere; a bf16 result is rounded to nearest even once, at the end.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <functional>

#include "kernels/tensor.h"

namespace epic::cuda_kernels {

// attention and qk_norm_rope support head_dim up to this (per-lane accumulators in registers).
constexpr int64_t kMaxHeadDim = 256;

// ---- elementwise_kernels.cu / dense ops (helper A) -------------------------------------------
void embed(const int32_t* ids, int64_t rows, const void* table, ScalarType table_type, int64_t hidden,
           void* out, ScalarType out_type, cudaStream_t stream);
void rms_norm(const void* x, ScalarType x_type, const void* weight, ScalarType weight_type, void* y,
              ScalarType y_type, int64_t rows, int64_t dim, float eps, cudaStream_t stream);
// residual (f32) += delta; normed (and normed_f32 unless it is nullptr) = rms_norm(residual) * weight.
void add_rms_norm(const void* delta, ScalarType delta_type, float* residual, const void* weight,
                  ScalarType weight_type, void* normed, ScalarType normed_type, float* normed_f32,
                  int64_t rows, int64_t dim, float eps, cudaStream_t stream);
// qkv [rows, (num_heads + 2 * num_kv_heads) * head_dim] of `type`, in place on the q and k heads.
void qk_norm_rope(void* qkv, ScalarType type, const void* q_norm, const void* k_norm, ScalarType norm_type,
                  const int32_t* positions, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                  int64_t head_dim, float eps, double theta, cudaStream_t stream);
void silu_mul(const void* gate_up, void* out, ScalarType type, int64_t rows, int64_t inter,
              cudaStream_t stream);
void add(const void* x, ScalarType x_type, void* y, ScalarType y_type, int64_t n, cudaStream_t stream);
void gather_rows(const void* x, const int32_t* index, void* out, int64_t rows, size_t row_bytes,
                 cudaStream_t stream);
// Element conversion (f32 <-> bf16, or a plain copy when the types match).
void convert(const void* x, ScalarType x_type, void* y, ScalarType y_type, int64_t n, cudaStream_t stream);

// ---- attention_decode_fused.cu ----------------------------------------------------------------------
// Backend::decode_attention in one launch (qk_norm_rope + store_kv + attention) for decode steps of a few
// rows whose block tables hold at most kDecodeAttentionFusedMaxKeys keys; qkv, the pools and out of
// `type`, the norms of norm_type (BF16 or F32); head_dim 64, 128 or 256.
// Past 16 rows the tensor-core decode kernel (one block per kv head, keys read once per group) wins:
// 8-layer steps at batch 64 took 3.06 ms with it and 3.33 with this one (H200).
constexpr int64_t kDecodeAttentionFusedMaxRows = 16;
constexpr int64_t kDecodeAttentionFusedMaxKeys = 4096;
struct DecodeAttentionFusedArgs {
  const void* qkv = nullptr;
  const void* q_norm = nullptr;
  const void* k_norm = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* slot_mapping = nullptr;
  const int32_t* row_sequence = nullptr;
  const int32_t* block_tables = nullptr;
  void* key_pool = nullptr;
  void* value_pool = nullptr;
  void* out = nullptr;
  ScalarType type = ScalarType::kBF16;
  ScalarType norm_type = ScalarType::kBF16;
  int64_t rows = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0, max_blocks = 0;
  float eps = 0.0f;
  double theta = 0.0;
};
bool decode_attention_fused_supported(const DecodeAttentionFusedArgs& args);
void decode_attention_fused(const DecodeAttentionFusedArgs& args, cudaStream_t stream);

// ---- argmax_kernels.cu -----------------------------------------------------------------------------
// Slices of every row scanned by blocks of their own, then reduced per row; scratch holds
// argmax_scratch_bytes(rows, vocab) bytes of device memory, free again when the launches are done.
int64_t argmax_scratch_bytes(int64_t rows, int64_t vocab);
void argmax(const void* logits, ScalarType type, int32_t* ids, int64_t rows, int64_t vocab, void* scratch,
            cudaStream_t stream);

// ---- scoring_kernels.cu ---------------------------------------------------------------------------
// One block per row, kernels/next_token_scores.h's arithmetic. logits, out and reference_log_probs
// [rows, vocab] (F32); targets and ids [rows]; scores [rows, kNumRowScores].
void log_softmax(const float* logits, float* out, int64_t rows, int64_t vocab, cudaStream_t stream);
void score_rows(const float* logits, const int32_t* targets, const float* reference_log_probs, float* scores,
                int32_t* ids, int64_t rows, int64_t vocab, cudaStream_t stream);

// ---- attention_kernel.cu (helper A) ------------------------------------------------------------
// key_pool / value_pool [num_blocks, kKvBlockSize, num_kv_heads, head_dim] of `type`.
void store_kv(const void* qkv, ScalarType type, const int32_t* slot_mapping, int64_t rows, void* key_pool,
              void* value_pool, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
              cudaStream_t stream);
// block_tables [num_sequences, max_blocks]; out [rows, num_heads * head_dim] of `type`.
void attention(const void* qkv, ScalarType type, const void* key_pool, const void* value_pool,
               const int32_t* block_tables, int64_t max_blocks, const int32_t* row_sequence,
               const int32_t* positions, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
               int64_t head_dim, void* out, cudaStream_t stream);

// ---- moe_routing_kernels.cu (helper A) ---------------------------------------------------------
void route_top_k(const void* logits, ScalarType type, const uint8_t* present, int32_t* expert_ids,
                 float* weights, int64_t tokens, int64_t num_experts, int64_t top_k, bool normalize,
                 const int32_t* row_top_k, cudaStream_t stream);  // row_top_k: null, or [tokens]
// Stable counting sort of slots by expert; uses only its outputs as scratch.
// From kManyBlockGroupMinSlots slots (and up to 1024 experts) the sort runs over many blocks if
// given scratch of group_by_expert_scratch_bytes (0: the one-block kernel, no scratch needed);
// the result is the same (the stable order is unique).
constexpr int64_t kManyBlockGroupMinSlots = 16384;
int64_t group_by_expert_scratch_bytes(int64_t slots, int64_t num_experts);
void group_by_expert(const int32_t* expert_ids, int64_t slots, int64_t num_experts, int64_t top_k,
                     int32_t* expert_offsets, int32_t* source_row, int32_t* sorted_position, int32_t* scratch,
                     cudaStream_t stream);
// Backend::count_routed_slots: real_tokens may be null (every token), keys and key_counts null together.
void count_routed_slots(const int32_t* expert_ids, int64_t tokens, int64_t top_k, const int32_t* real_tokens,
                        int64_t* expert_counts, int64_t num_experts, const int32_t* keys, int64_t* key_counts,
                        int64_t num_keys, cudaStream_t stream);
void combine_top_k(const void* expert_out, ScalarType type, const int32_t* sorted_position,
                   const float* weights, int64_t tokens, int64_t top_k, int64_t hidden, void* out,
                   ScalarType out_type, cudaStream_t stream);

// ---- gemm kernels (helper B): linear_f32.cu, expert_ffn_*.cu -----------------------------------
// y[rows, out] = x[rows, in] * w[out, in]^T with f32 x and y and f32 or bf16 w, fp32 FMA: the
// verification mode's GEMM when the weights are bf16 (cuBLAS has no f32 x bf16 GEMM).
void linear_f32(const float* x, const void* w, ScalarType w_type, float* y, int64_t rows, int64_t in_dim,
                int64_t out_dim, cudaStream_t stream);
// The same product for bf16 w on tensor cores (linear_split.cu): x split exactly into three bf16
// parts, three cuBLAS GEMMs (on the handle's stream, which must be `stream`) summing in fp32. Equal
// to linear_f32 up to the order of fp32 sums. scratch: 3 * rows * in_dim bf16 values.
void linear_f32_split(const float* x, const void* w, float* y, int64_t rows, int64_t in_dim, int64_t out_dim,
                      void* scratch, cublasHandle_t cublas, cudaStream_t stream);
// y[rows, out] = x[rows, in] * w[out, in]^T for bf16 x and w at decode sizes (linear_skinny.cu):
// streams w once at close to the read bandwidth, y f32 or bf16. Only where
// linear_skinny_supported: 1..kSkinnyMaxRows rows, in a multiple of 8, 16-byte aligned x and w.
// Up to 2 rows: measured on an H200 against cuBLAS (BENCHMARKS.md), 1.3-1.6x faster at 1 row and
// 1.1-1.5x at 2 on qkv/o_proj shapes; from 4 rows the FMA count (not the weight reads) limits it
// and cuBLAS's tensor cores win.
constexpr int64_t kSkinnyMaxRows = 2;
bool linear_skinny_supported(const void* x, const void* w, int64_t rows, int64_t in_dim, int64_t out_dim);
void linear_skinny(const void* x, const void* w, void* y, ScalarType y_type, int64_t rows, int64_t in_dim,
                   int64_t out_dim, cudaStream_t stream);
// Whether linear_f32_split is the faster of the two at this size (a rule on the shape only, so a
// row's result does not depend on the batch it came in beyond the shape).
bool linear_f32_split_wins(int64_t rows, int64_t out_dim);

class GemmLanePool;  // gemm_lanes.h

// One call of the grouped expert FFN (Backend::expert_ffn). Offsets and local_index are device
// arrays; `rows` is the host's count of x's rows (offsets[num_experts] == rows).
struct ExpertFfnArgs {
  const void* x = nullptr;                  // [rows, hidden] of act_type
  const int32_t* expert_offsets = nullptr;  // [num_experts + 1], device
  const void* gate_up = nullptr;            // [num_local, 2 * inter, hidden] of weight_type
  const void* down = nullptr;               // [num_local, hidden, inter] of weight_type
  const int32_t* local_index = nullptr;     // [num_experts], device; -1 = not hosted
  // Device-scheduled only: an address table I64 [num_experts, 2] (Backend::expert_ffn_addressed) in place
  // of gate_up, down and local_index (null), whose addresses must be 16-byte aligned for bf16.
  const int64_t* addresses = nullptr;
  void* intermediate = nullptr;  // [rows, inter] of act_type, scratch
  void* y = nullptr;             // [rows, hidden] of act_type
  int64_t rows = 0, num_experts = 0, num_local = 0, hidden = 0, inter = 0;
  ScalarType act_type = ScalarType::kBF16;
  ScalarType weight_type = ScalarType::kBF16;
  // expert_ffn_cublas only, optional: room for pointer_capacity matrix pointers in device memory
  // and as many in pinned host memory, which let it make one grouped cuBLAS call per GEMM pass
  // (kExpertFfnPointersPerExpert per expert with rows); without them it calls cuBLAS per expert.
  void** device_pointers = nullptr;
  void** host_pointers = nullptr;
  int64_t pointer_capacity = 0;
  // expert_ffn_cublas only, optional: skip the grouped calls for the per-expert loop, and a pool of
  // side lanes (gemm_lanes.h), over the first side_lane_count of which that loop spreads the experts.
  // Where both are given the loop is what runs (the faster one at the largest sizes: BENCHMARKS.md).
  bool per_expert = false;
  GemmLanePool* lane_pool = nullptr;
  int side_lane_count = 0;  // at most lane_pool->side_count()
  // expert_ffn_cublas only, optional: device scratch of at least the asked bytes, valid until the
  // next call (the caller's stream orders its reuse); given, the batched paths may run.
  std::function<void*(size_t)> batched_scratch;
};

// Pointers expert_ffn_cublas's grouped path stages per expert with rows where 2 * inter <= hidden
// (A, B and C of its gate_up and down GEMMs); wider FFNs need 3 * (2 * ceil(inter / hidden) + 1).
constexpr int64_t kExpertFfnPointersPerExpert = 6;

// Device-scheduled: the group sizes are read on the device, so this never synchronises and can be
// captured in a graph. Each expert's weights are read once per tile of its rows (memory bound at
// decode sizes). Any act/weight type combination of F32 and BF16 (BF16 x BF16 on tensor cores).
void expert_ffn_device_scheduled(const ExpertFfnArgs& args, cudaStream_t stream);

// For large row counts: the group sizes are known on the host (host_offsets [num_experts + 1] and
// host_local_index [num_experts], copied back by the caller), and each expert's GEMMs go to cuBLAS
// (bf16 in, fp32 accumulation) on the handle's stream. BF16 activations and weights only.
// With args.batched_scratch, first the batched paths (expert_ffn_batched below); else with
// args.device_pointers (and enough capacity, 16-byte aligned matrices, cuBLAS 12.5 or newer)
// one cublasGemmGroupedBatchedEx per GEMM pass; else, or where cuBLAS answers NOT_SUPPORTED, one
// cublasGemmEx per expert; returns whether a batched or grouped path ran. The grouped path writes
// args.host_pointers and copies them asynchronously: the caller must not call again before that
// copy is done (the backend synchronises its stream for the offsets read-back before each call).
bool expert_ffn_cublas(const ExpertFfnArgs& args, const int32_t* host_offsets,
                       const int32_t* host_local_index, cublasHandle_t cublas, cudaStream_t stream);

// The batched paths of expert_ffn_cublas (expert_ffn_batched.cu): batched cuBLAS GEMMs over the
// experts with rows, either in place over overlapping row windows (near-uniform group sizes) or
// over a few buckets of equal padded row counts, whose real rows are then copied to y. Needs
// args.batched_scratch and the pointer staging; returns false, having enqueued nothing, where
// neither applies (unaligned, too many buckets, too little staging).
bool expert_ffn_batched(const ExpertFfnArgs& args, const int32_t* host_offsets,
                        const int32_t* host_local_index, cublasHandle_t cublas, cudaStream_t stream);

}  // namespace epic::cuda_kernels
