// The per-head step of qk_norm_rope, shared by the qk_norm_rope kernel and the fused decode attention
// (attention_decode_fused.cu), so that both store exactly the same rotated keys: RMS-norm of one head
// vector in fp32 by one warp, then the rotary rotation (rotate-half: pairs i, i + d/2) with the row's
// cos / sin table, each output rounded to the activation type.
#pragma once

#include <cstdint>

#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels::rope {

// Each lane holds pairs (i, i + head_dim / 2) for i = lane, lane + 32, ...
constexpr int kMaxPairsPerLane = static_cast<int>(kMaxHeadDim) / (2 * access::kWarpSize);

// cos_table[i], sin_table[i] for i < head_dim / 2: angle = position * theta^(-2i/d) in double, rounded to
// fp32 as the reference. Called by every thread of the block (strided); the caller synchronises after.
__device__ __forceinline__ void fill_tables(float* cos_table, float* sin_table, int32_t position,
                                            int64_t head_dim, double theta) {
  const int64_t half = head_dim / 2;
  for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
    const double inv_freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    double sin_value, cos_value;
    sincos(static_cast<double>(position) * inv_freq, &sin_value, &cos_value);
    cos_table[i] = static_cast<float>(cos_value);
    sin_table[i] = static_cast<float>(sin_value);
  }
}

// out[0, head_dim) = rope(rms_norm(in) * norm_weight), by the calling warp (every lane calls it); out may
// be in.
template <class T, class N>
__device__ __forceinline__ void norm_rope_head(const T* in, T* out, const N* norm_weight,
                                               const float* cos_table, const float* sin_table,
                                               int64_t head_dim, float eps, int lane) {
  const int64_t half = head_dim / 2;
  float first[kMaxPairsPerLane], second[kMaxPairsPerLane];
  float sum_squares = 0.0f;
#pragma unroll
  for (int c = 0; c < kMaxPairsPerLane; ++c) {
    const int64_t i = lane + c * access::kWarpSize;
    first[c] = i < half ? access::to_float(in[i]) : 0.0f;
    second[c] = i < half ? access::to_float(in[i + half]) : 0.0f;
    sum_squares += first[c] * first[c] + second[c] * second[c];
  }
  sum_squares = access::warp_sum(sum_squares);
  const float inv_rms =
      static_cast<float>(1.0 / sqrt(static_cast<double>(sum_squares) / static_cast<double>(head_dim) +
                                    static_cast<double>(eps)));
#pragma unroll
  for (int c = 0; c < kMaxPairsPerLane; ++c) {
    const int64_t i = lane + c * access::kWarpSize;
    if (i >= half) continue;
    const float a = (first[c] * inv_rms) * access::to_float(norm_weight[i]);
    const float b = (second[c] * inv_rms) * access::to_float(norm_weight[i + half]);
    // Rounded product by product (no FMA contraction), as the reference computes the rotation.
    out[i] = access::from_float<T>(__fsub_rn(__fmul_rn(a, cos_table[i]), __fmul_rn(b, sin_table[i])));
    out[i + half] = access::from_float<T>(__fadd_rn(__fmul_rn(b, cos_table[i]), __fmul_rn(a, sin_table[i])));
  }
}

}  // namespace epic::cuda_kernels::rope
