// Causal GQA attention: one block per (query, head); each warp runs an online softmax over a
// strided subset of the keys, and the warps' partial results are merged at the end.
#include <cmath>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"

namespace epic::cuda_kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kAttentionWarps = 4;
constexpr int kAttentionThreads = kAttentionWarps * kWarpSize;
constexpr int kValuesPerLane = static_cast<int>(kMaxAttentionHeadDim) / kWarpSize;

__global__ void attention_kernel(const float* q, const float* k, const float* v, float* out,
                                 int64_t first_position, int64_t num_heads, int64_t num_kv_heads,
                                 int64_t head_dim, float scale) {
  __shared__ float q_shared[kMaxAttentionHeadDim];
  __shared__ float warp_max[kAttentionWarps];
  __shared__ float warp_denominator[kAttentionWarps];
  __shared__ float warp_sum[kAttentionWarps][kMaxAttentionHeadDim];

  const int64_t item = blockIdx.x;  // = query * num_heads + head, the row of q and out
  const int64_t query = item / num_heads;
  const int64_t head = item % num_heads;
  const int64_t kv_head = head / (num_heads / num_kv_heads);
  const int64_t num_visible = first_position + query + 1;
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) q_shared[d] = q[item * head_dim + d];
  __syncthreads();

  // Online softmax state of this warp; lane holds output dims lane, lane + 32, ...
  float running_max = -INFINITY;
  float denominator = 0.0f;
  float sum[kValuesPerLane];
#pragma unroll
  for (int c = 0; c < kValuesPerLane; ++c) sum[c] = 0.0f;

  for (int64_t key = warp; key < num_visible; key += kAttentionWarps) {
    const float* k_row = k + (key * num_kv_heads + kv_head) * head_dim;
    const float* v_row = v + (key * num_kv_heads + kv_head) * head_dim;
    float partial = 0.0f;
    for (int64_t d = lane; d < head_dim; d += kWarpSize) partial += q_shared[d] * k_row[d];
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
      partial += __shfl_xor_sync(0xffffffffu, partial, offset);
    const float score = partial * scale;
    const float new_max = fmaxf(running_max, score);
    const float correction = expf(running_max - new_max);  // 0 for the first key (exp(-inf))
    const float probability = expf(score - new_max);
    denominator = denominator * correction + probability;
#pragma unroll
    for (int c = 0; c < kValuesPerLane; ++c) {
      const int64_t d = lane + c * kWarpSize;
      if (d < head_dim) sum[c] = sum[c] * correction + probability * v_row[d];
    }
    running_max = new_max;
  }

  if (lane == 0) {
    warp_max[warp] = running_max;
    warp_denominator[warp] = denominator;
  }
#pragma unroll
  for (int c = 0; c < kValuesPerLane; ++c) {
    const int64_t d = lane + c * kWarpSize;
    if (d < head_dim) warp_sum[warp][d] = sum[c];
  }
  __syncthreads();

  // Key 0 is always visible, so the overall max is finite; a warp that saw no key has max -inf
  // and weight exp(-inf) = 0.
  float overall_max = -INFINITY;
  for (int w = 0; w < kAttentionWarps; ++w) overall_max = fmaxf(overall_max, warp_max[w]);
  float total_denominator = 0.0f;
  for (int w = 0; w < kAttentionWarps; ++w)
    total_denominator += warp_denominator[w] * expf(warp_max[w] - overall_max);
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float total = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w) total += warp_sum[w][d] * expf(warp_max[w] - overall_max);
    out[item * head_dim + d] = total / total_denominator;
  }
}

}  // namespace

void attention(const float* q, const float* k, const float* v, float* out, int64_t num_queries,
               int64_t first_position, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               cudaStream_t stream) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const auto num_blocks = static_cast<unsigned>(num_queries * num_heads);
  attention_kernel<<<num_blocks, kAttentionThreads, 0, stream>>>(q, k, v, out, first_position, num_heads,
                                                                 num_kv_heads, head_dim, scale);
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::cuda_kernels
