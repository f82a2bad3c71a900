// Host entry points of the CUDA kernels behind CudaBackend: device pointers plus a stream, sizes
// already validated by backend_checks. Each launches asynchronously and checks the launch.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace epic::cuda_kernels {

// attention supports head_dim up to this (the per-lane accumulators live in registers).
constexpr int64_t kMaxAttentionHeadDim = 256;

void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps,
              cudaStream_t stream);
void rope(float* x, const int32_t* positions, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
          double theta, cudaStream_t stream);
void attention(const float* q, const float* k, const float* v, float* out, int64_t num_queries,
               int64_t first_position, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               cudaStream_t stream);
void silu_mul(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream);
void route_top_k(const float* logits, const uint8_t* present, int32_t* expert_ids, float* weights,
                 int64_t num_tokens, int64_t num_experts, int64_t top_k, bool normalize_top_k,
                 cudaStream_t stream);
void scaled_add_rows(const float* x, const float* scale, float* y, int64_t rows, int64_t dim,
                     cudaStream_t stream);
void add(const float* x, float* y, int64_t n, cudaStream_t stream);

}  // namespace epic::cuda_kernels
