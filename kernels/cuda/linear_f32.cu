// linear_f32: y = x * w^T with f32 activations and f32 or bf16 weights, plain fp32 FMA (the
// verification mode's GEMM; cuBLAS has no f32 x bf16 product). A shared-memory tiled SIMT GEMM.
#include <cuda_bf16.h>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/dependent_launch.cuh"

namespace epic::cuda_kernels {
namespace {

// A block computes a kTile x kTile tile of y; each of its 256 threads a 4 x 4 patch of it.
constexpr int kTile = 64;
// linear_f32_split_wins: from this many rows on the split beats the narrow kernel.
constexpr int64_t kSplitMinRowsForNarrow = 512;
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

// Narrow outputs (the router: 128 experts; any row count): one warp per output column, the rows
// of a block (kNarrowRows) sharing each weight load, the k range split over the lanes and summed
// by a fixed shuffle tree. With few outputs the tiled kernel above has only a couple of column
// tiles and each block walks all of k alone (~100 us per call at decode sizes); this one puts
// out_dim x rows/8 warps in flight. Chosen by out_dim alone, so a row's result never depends on
// how many rows share the call.
constexpr int kNarrowMaxOutputs = 1024;
constexpr int kNarrowRows = 8;
constexpr int kNarrowWarps = 16;  // outputs per block

__device__ __forceinline__ void widen8(const __nv_bfloat16* w, float (&out)[8]) {
  const uint4 bits = *reinterpret_cast<const uint4*>(w);
  const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&bits);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(pairs[i]);
    out[2 * i] = f.x;
    out[2 * i + 1] = f.y;
  }
}
__device__ __forceinline__ void widen8(const float* w, float (&out)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(w), b = *reinterpret_cast<const float4*>(w + 4);
  out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w, out[4] = b.x, out[5] = b.y, out[6] = b.z,
  out[7] = b.w;
}

// kVec 8: each lane takes 8 consecutive k per step (16-byte loads; in_dim % 8 == 0, aligned rows).
template <int kVec, typename Weight>
__global__ void __launch_bounds__(kNarrowWarps * 32)
    linear_f32_narrow_kernel(const float* __restrict__ x, const Weight* __restrict__ w, float* __restrict__ y,
                             int64_t rows, int64_t in_dim, int64_t out_dim) {
  dependent::wait_for_previous();  // dependent_launch.cuh: before any global access
  dependent::release_next();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t output = static_cast<int64_t>(blockIdx.x) * kNarrowWarps + warp;
  const int64_t row_begin = static_cast<int64_t>(blockIdx.y) * kNarrowRows;
  if (output >= out_dim) return;  // the whole warp leaves; no block-wide barrier follows
  const int count = rows - row_begin < kNarrowRows ? static_cast<int>(rows - row_begin) : kNarrowRows;
  const Weight* w_row = w + output * in_dim;
  const float* x_rows = x + row_begin * in_dim;
  float sum[kNarrowRows];
#pragma unroll
  for (int r = 0; r < kNarrowRows; ++r) sum[r] = 0.0f;
  for (int64_t k = static_cast<int64_t>(lane) * kVec; k < in_dim; k += 32 * kVec) {
    float weights[8];
    if constexpr (kVec == 8) {
      widen8(w_row + k, weights);
    } else {
      weights[0] = widen(w_row[k]);
    }
#pragma unroll
    for (int r = 0; r < kNarrowRows; ++r) {
      if (r >= count) break;
      const float* xr = x_rows + r * in_dim + k;
      if constexpr (kVec == 8) {
        const float4 a = *reinterpret_cast<const float4*>(xr), b = *reinterpret_cast<const float4*>(xr + 4);
        const float values[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) sum[r] = fmaf(weights[i], values[i], sum[r]);
      } else {
        sum[r] = fmaf(weights[0], xr[0], sum[r]);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kNarrowRows; ++r) {
    float total = sum[r];
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) total += __shfl_xor_sync(0xffffffffu, total, offset);
    if (lane == 0 && r < count) y[(row_begin + r) * out_dim + output] = total;
  }
}

template <typename Weight>
void launch_narrow(const float* x, const Weight* w, float* y, int64_t rows, int64_t in_dim, int64_t out_dim,
                   cudaStream_t stream) {
  const int64_t row_blocks = (rows + kNarrowRows - 1) / kNarrowRows;
  EPIC_CHECK(row_blocks <= 65535, ErrorCode::kUnsupported,
             "linear_f32: " + std::to_string(rows) + " rows exceed the launch grid; split the call");
  const dim3 grid(static_cast<unsigned>((out_dim + kNarrowWarps - 1) / kNarrowWarps),
                  static_cast<unsigned>(row_blocks));
  const bool vector =
      in_dim % 8 == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 && reinterpret_cast<uintptr_t>(w) % 16 == 0;
  if (vector) {
    dependent::launch(linear_f32_narrow_kernel<8, Weight>, grid, dim3(kNarrowWarps * 32), 0, stream, x, w, y,
                      rows, in_dim, out_dim);
  } else {
    dependent::launch(linear_f32_narrow_kernel<1, Weight>, grid, dim3(kNarrowWarps * 32), 0, stream, x, w, y,
                      rows, in_dim, out_dim);
  }
}

}  // namespace

bool linear_f32_split_wins(int64_t rows, int64_t out_dim) {
  // Measured on an H200 (epic_expert_ffn_bench, BENCHMARKS.md): the narrow kernel wins below a few
  // hundred rows (router at 256 rows: 0.026 ms vs 0.045), the split from there on (2048 rows: 0.16
  // vs 0.046); the tiled kernel loses to the split at every row count (1 row: 0.136 vs 0.043).
  return out_dim > kNarrowMaxOutputs || rows >= kSplitMinRowsForNarrow;
}

void linear_f32(const float* x, const void* w, ScalarType w_type, float* y, int64_t rows, int64_t in_dim,
                int64_t out_dim, cudaStream_t stream) {
  if (rows == 0 || out_dim == 0) return;
  if (out_dim <= kNarrowMaxOutputs) {
    if (w_type == ScalarType::kBF16) {
      launch_narrow(x, static_cast<const __nv_bfloat16*>(w), y, rows, in_dim, out_dim, stream);
    } else {
      EPIC_CHECK(w_type == ScalarType::kF32, ErrorCode::kInternal,
                 std::string("linear_f32: weights must be f32 or bf16, got ") + scalar_name(w_type));
      launch_narrow(x, static_cast<const float*>(w), y, rows, in_dim, out_dim, stream);
    }
    EPIC_CUDA_CHECK_LAUNCH();
    return;
  }
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
