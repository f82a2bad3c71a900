// linear_f32: y = x * w^T with f32 activations and f32 or bf16 weights, plain fp32 FMA (the
// verification mode's GEMM; cuBLAS has no f32 x bf16 product). A shared-memory tiled SIMT GEMM.
#include <cuda_bf16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"

namespace epic::cuda_kernels {
namespace {

// A block computes a kTile x kTile tile of y; each of its 256 threads a 4 x 4 patch of it.
constexpr int kTile = 64;
constexpr int kTileK = 16;
constexpr int kPatch = 4;
constexpr int kThreads = (kTile / kPatch) * (kTile / kPatch);

__device__ __forceinline__ float widen(float value) { return value; }
__device__ __forceinline__ float widen(__nv_bfloat16 value) { return __bfloat162float(value); }

// Tiles are stored k-major ([kTileK][kTile]) so the inner loop reads 4 consecutive floats of a row
// tile and of a column tile; the +4 padding keeps the transposing stores from all hitting one bank.
template <typename Weight>
__global__ void __launch_bounds__(kThreads)
    linear_f32_kernel(const float* __restrict__ x, const Weight* __restrict__ w, float* __restrict__ y,
                      int64_t rows, int64_t in_dim, int64_t out_dim) {
  __shared__ float x_tile[kTileK][kTile + 4];
  __shared__ float w_tile[kTileK][kTile + 4];

  const int64_t out_begin = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * kTile;
  const int thread = threadIdx.x;
  const int patch_col = (thread % (kTile / kPatch)) * kPatch;
  const int patch_row = (thread / (kTile / kPatch)) * kPatch;

  float acc[kPatch][kPatch] = {};
  for (int64_t k_begin = 0; k_begin < in_dim; k_begin += kTileK) {
    // 64 x 16 elements per tile, 4 per thread; consecutive threads read consecutive k of a row.
    for (int i = thread; i < kTile * kTileK; i += kThreads) {
      const int tile_row = i / kTileK;
      const int tile_k = i % kTileK;
      const int64_t k = k_begin + tile_k;
      const int64_t row = row_begin + tile_row;
      const int64_t out = out_begin + tile_row;
      x_tile[tile_k][tile_row] = (row < rows && k < in_dim) ? x[row * in_dim + k] : 0.0f;
      w_tile[tile_k][tile_row] = (out < out_dim && k < in_dim) ? widen(w[out * in_dim + k]) : 0.0f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float x_values[kPatch];
      float w_values[kPatch];
#pragma unroll
      for (int i = 0; i < kPatch; ++i) {
        x_values[i] = x_tile[k][patch_row + i];
        w_values[i] = w_tile[k][patch_col + i];
      }
#pragma unroll
      for (int i = 0; i < kPatch; ++i) {
#pragma unroll
        for (int j = 0; j < kPatch; ++j) acc[i][j] = fmaf(x_values[i], w_values[j], acc[i][j]);
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < kPatch; ++i) {
    const int64_t row = row_begin + patch_row + i;
    if (row >= rows) break;
#pragma unroll
    for (int j = 0; j < kPatch; ++j) {
      const int64_t out = out_begin + patch_col + j;
      if (out < out_dim) y[row * out_dim + out] = acc[i][j];
    }
  }
}

}  // namespace

void linear_f32(const float* x, const void* w, ScalarType w_type, float* y, int64_t rows, int64_t in_dim,
                int64_t out_dim, cudaStream_t stream) {
  if (rows == 0 || out_dim == 0) return;
  const int64_t row_tiles = (rows + kTile - 1) / kTile;
  const int64_t out_tiles = (out_dim + kTile - 1) / kTile;
  EPIC_CHECK(row_tiles <= 65535 && out_tiles <= 0x7fffffff, ErrorCode::kUnsupported,
             "linear_f32: " + std::to_string(rows) + " rows x " + std::to_string(out_dim) +
                 " outputs exceed the launch grid; split the call");
  const dim3 grid(static_cast<unsigned>(out_tiles), static_cast<unsigned>(row_tiles));
  if (w_type == ScalarType::kBF16) {
    linear_f32_kernel<<<grid, kThreads, 0, stream>>>(x, static_cast<const __nv_bfloat16*>(w), y, rows, in_dim,
                                                     out_dim);
  } else {
    EPIC_CHECK(w_type == ScalarType::kF32, ErrorCode::kInternal,
               std::string("linear_f32: weights must be f32 or bf16, got ") + scalar_name(w_type));
    linear_f32_kernel<<<grid, kThreads, 0, stream>>>(x, static_cast<const float*>(w), y, rows, in_dim,
                                                     out_dim);
  }
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::cuda_kernels
