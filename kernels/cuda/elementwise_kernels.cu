// The row- and element-wise CUDA kernels: rms_norm, rope, silu_mul, scaled_add_rows, add.
#include <algorithm>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"

namespace epic::cuda_kernels {
namespace {

constexpr int kWarpSize = 32;
constexpr int kElementwiseThreads = 256;
constexpr int kRmsNormThreads = 256;
// Grid-stride loops cover any n; more blocks than this only add scheduling overhead.
constexpr int64_t kMaxElementwiseBlocks = 65536;

int elementwise_blocks(int64_t n, int threads) {
  return static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, kMaxElementwiseBlocks));
}

__device__ float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// One block per row: the block sums x^2 in fp32, then every thread scales its strided elements.
// x and y may alias: each element is read before it is written by the same thread.
__global__ void rms_norm_kernel(const float* x, const float* weight, float* y, int64_t dim, float eps) {
  __shared__ float warp_sums[kRmsNormThreads / kWarpSize];
  __shared__ float inv_rms_shared;
  const float* x_row = x + static_cast<int64_t>(blockIdx.x) * dim;
  float* y_row = y + static_cast<int64_t>(blockIdx.x) * dim;
  float sum_squares = 0.0f;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) sum_squares += x_row[i] * x_row[i];
  sum_squares = warp_sum(sum_squares);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = sum_squares;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kRmsNormThreads / kWarpSize; ++w) total += warp_sums[w];
    inv_rms_shared = 1.0f / sqrtf(total / static_cast<float>(dim) + eps);
  }
  __syncthreads();
  const float inv_rms = inv_rms_shared;
  for (int64_t i = threadIdx.x; i < dim; i += blockDim.x) y_row[i] = (x_row[i] * inv_rms) * weight[i];
}

// One thread per (token, i < head_dim/2), looping over the heads: the angle, cos and sin are
// computed once in double (as the CPU reference does) and rounded to fp32.
__global__ void rope_kernel(float* x, const int32_t* positions, int64_t num_tokens, int64_t num_heads,
                            int64_t head_dim, double theta) {
  const int64_t half = head_dim / 2;
  const int64_t total = num_tokens * half;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t token = index / half;
    const int64_t i = index % half;
    const double inv_freq = pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    const double angle = static_cast<double>(positions[token]) * inv_freq;
    double sin_double, cos_double;
    sincos(angle, &sin_double, &cos_double);
    const float cos_value = static_cast<float>(cos_double);
    const float sin_value = static_cast<float>(sin_double);
    for (int64_t head = 0; head < num_heads; ++head) {
      float* x_head = x + (token * num_heads + head) * head_dim;
      const float first = x_head[i];
      const float second = x_head[i + half];
      x_head[i] = first * cos_value - second * sin_value;
      x_head[i + half] = second * cos_value + first * sin_value;
    }
  }
}

__global__ void silu_mul_kernel(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = gate[i];
    out[i] = g / (1.0f + expf(-g)) * up[i];
  }
}

__global__ void scaled_add_rows_kernel(const float* x, const float* scale, float* y, int64_t rows,
                                       int64_t dim) {
  const int64_t n = rows * dim;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += scale[i / dim] * x[i];
  }
}

__global__ void add_kernel(const float* x, float* y, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += x[i];
  }
}

}  // namespace

void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim, float eps,
              cudaStream_t stream) {
  // rows is the grid size; gridDim.x allows 2^31 - 1, far above any batch of tokens.
  rms_norm_kernel<<<static_cast<unsigned>(rows), kRmsNormThreads, 0, stream>>>(x, weight, y, dim, eps);
  EPIC_CUDA_CHECK_LAUNCH();
}

void rope(float* x, const int32_t* positions, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
          double theta, cudaStream_t stream) {
  const int64_t total = num_tokens * (head_dim / 2);
  rope_kernel<<<elementwise_blocks(total, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
      x, positions, num_tokens, num_heads, head_dim, theta);
  EPIC_CUDA_CHECK_LAUNCH();
}

void silu_mul(const float* gate, const float* up, float* out, int64_t n, cudaStream_t stream) {
  silu_mul_kernel<<<elementwise_blocks(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(gate, up,
                                                                                                  out, n);
  EPIC_CUDA_CHECK_LAUNCH();
}

void scaled_add_rows(const float* x, const float* scale, float* y, int64_t rows, int64_t dim,
                     cudaStream_t stream) {
  scaled_add_rows_kernel<<<elementwise_blocks(rows * dim, kElementwiseThreads), kElementwiseThreads, 0,
                           stream>>>(x, scale, y, rows, dim);
  EPIC_CUDA_CHECK_LAUNCH();
}

void add(const float* x, float* y, int64_t n, cudaStream_t stream) {
  add_kernel<<<elementwise_blocks(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(x, y, n);
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::cuda_kernels
