// linear_skinny: y = x * w^T for bf16 x and w and a handful of rows (decode steps), y in f32 or
// bf16. At one to eight rows a GEMM is a matrix-vector product bound by reading w once: cuBLAS
// reaches ~0.8-0.9 TB/s there on an H200 (qkv and o_proj at batch 1, BENCHMARKS.md); this kernel
// streams w with 16-byte loads, many in flight per thread, and keeps x in shared memory.
#include <cuda_bf16.h>

#include <string>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / access::kWarpSize;
constexpr int kOutputsPerGroup =
    8;                            // outputs a block finishes per round: 8 weight loads in flight per thread
constexpr int kMaxBlocks = 2048;  // blocks stride over the output groups beyond this
constexpr int64_t kMaxSharedBytes = 96 * 1024;

__device__ __forceinline__ void widen8(const uint4& bits, float (&values)[8]) {
  const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    values[2 * i] = __uint_as_float(words[i] << 16);  // bf16 -> f32 is exact
    values[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// A block per group of kOutputsPerGroup outputs (striding over groups). Thread t owns the 8-element
// chunks t, t + 256, ... of the input dimension, so each weight row is read by the whole block in
// consecutive 16-byte pieces; partial sums are reduced by warp shuffles, then across warps.
// kPrefetch (a grid with one group per block): the block's first weight loads go out before it
// waits for the previous kernel (weights are no earlier kernel's output), so the weight latency
// overlaps that kernel's tail.
template <int R, class Y, bool kPrefetch>
__global__ void __launch_bounds__(kThreads)
    linear_skinny_kernel(const bf16* __restrict__ x, const bf16* __restrict__ w, Y* __restrict__ y, int rows,
                         int64_t in_dim, int64_t out_dim) {
  extern __shared__ uint4 x_shared[];  // [R][in_dim / 8]
  const int64_t chunks = in_dim / 8;
  uint4 first_bits[kOutputsPerGroup];
  if constexpr (kPrefetch) {
#pragma unroll
    for (int o = 0; o < kOutputsPerGroup; ++o) {
      const int64_t out = static_cast<int64_t>(blockIdx.x) * kOutputsPerGroup + o;
      first_bits[o] = out < out_dim && threadIdx.x < chunks
                          ? __ldcs(reinterpret_cast<const uint4*>(w + out * in_dim) + threadIdx.x)
                          : make_uint4(0, 0, 0, 0);
    }
  }
  dependent::wait_for_previous();  // dependent_launch.cuh: before reading x
  dependent::release_next();
  __shared__ float partial[kWarps][R * kOutputsPerGroup];
  for (int64_t i = threadIdx.x; i < R * chunks; i += kThreads) {
    const int64_t r = i / chunks;
    x_shared[i] =
        r < rows ? reinterpret_cast<const uint4*>(x)[r * chunks + i % chunks] : make_uint4(0, 0, 0, 0);
  }
  __syncthreads();

  const int warp = threadIdx.x / access::kWarpSize;
  const int lane = threadIdx.x % access::kWarpSize;
  const int64_t groups = (out_dim + kOutputsPerGroup - 1) / kOutputsPerGroup;
  for (int64_t group = blockIdx.x; group < groups; group += gridDim.x) {
    const int64_t out_begin = group * kOutputsPerGroup;
    float acc[R][kOutputsPerGroup];
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int o = 0; o < kOutputsPerGroup; ++o) acc[r][o] = 0.0f;
    }
    for (int64_t chunk = threadIdx.x; chunk < chunks; chunk += kThreads) {
      uint4 w_bits[kOutputsPerGroup];
      const bool prefetched = kPrefetch && chunk == threadIdx.x;  // kPrefetch: the block's only group
#pragma unroll
      for (int o = 0; o < kOutputsPerGroup; ++o) {
        const int64_t out = out_begin + o;
        // Read once: stream past L1 (evict-first).
        w_bits[o] = prefetched      ? first_bits[o]
                    : out < out_dim ? __ldcs(reinterpret_cast<const uint4*>(w + out * in_dim) + chunk)
                                    : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float x_values[8];
        widen8(x_shared[r * chunks + chunk], x_values);
#pragma unroll
        for (int o = 0; o < kOutputsPerGroup; ++o) {
          float w_values[8];
          widen8(w_bits[o], w_values);
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[r][o] = fmaf(x_values[k], w_values[k], acc[r][o]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
#pragma unroll
      for (int o = 0; o < kOutputsPerGroup; ++o) {
        const float sum = access::warp_sum(acc[r][o]);
        if (lane == 0) partial[warp][r * kOutputsPerGroup + o] = sum;
      }
    }
    __syncthreads();
    if (threadIdx.x < R * kOutputsPerGroup) {
      const int r = threadIdx.x / kOutputsPerGroup;
      const int64_t out = out_begin + threadIdx.x % kOutputsPerGroup;
      float sum = 0.0f;
#pragma unroll
      for (int i = 0; i < kWarps; ++i) sum += partial[i][threadIdx.x];
      if (r < rows && out < out_dim) y[r * out_dim + out] = access::from_float<Y>(sum);
    }
    __syncthreads();  // partial is reused by the next group
  }
}

template <int R, class Y>
void launch(const bf16* x, const bf16* w, Y* y, int64_t rows, int64_t in_dim, int64_t out_dim,
            cudaStream_t stream) {
  const size_t shared = static_cast<size_t>(R * in_dim) * sizeof(bf16);
  // Past 48 KiB of dynamic shared memory needs an opt-in, per kernel and device (set on every launch,
  // as the attention kernels do: cheap, and right whichever device is current).
  EPIC_CUDA_CHECK(cudaFuncSetAttribute(linear_skinny_kernel<R, Y, true>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kMaxSharedBytes)));
  EPIC_CUDA_CHECK(cudaFuncSetAttribute(linear_skinny_kernel<R, Y, false>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kMaxSharedBytes)));
  const int64_t groups = (out_dim + kOutputsPerGroup - 1) / kOutputsPerGroup;
  if (groups <= kMaxBlocks) {
    dependent::launch(linear_skinny_kernel<R, Y, true>, dim3(static_cast<unsigned>(groups)), dim3(kThreads),
                      shared, stream, x, w, y, static_cast<int>(rows), in_dim, out_dim);
  } else {
    dependent::launch(linear_skinny_kernel<R, Y, false>, dim3(kMaxBlocks), dim3(kThreads), shared, stream, x,
                      w, y, static_cast<int>(rows), in_dim, out_dim);
  }
  EPIC_CUDA_CHECK_LAUNCH();
}

template <class Y>
void launch_rows(const bf16* x, const bf16* w, Y* y, int64_t rows, int64_t in_dim, int64_t out_dim,
                 cudaStream_t stream) {
  static_assert(kSkinnyMaxRows == 2, "a template per row count up to kSkinnyMaxRows");
  if (rows == 1) {
    launch<1>(x, w, y, rows, in_dim, out_dim, stream);
  } else {
    launch<2>(x, w, y, rows, in_dim, out_dim, stream);
  }
}

}  // namespace

bool linear_skinny_supported(const void* x, const void* w, int64_t rows, int64_t in_dim, int64_t out_dim) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  return rows >= 1 && rows <= kSkinnyMaxRows && in_dim > 0 && in_dim % 8 == 0 && out_dim > 0 && aligned(x) &&
         aligned(w) && kSkinnyMaxRows * in_dim * static_cast<int64_t>(sizeof(bf16)) <= kMaxSharedBytes;
}

void linear_skinny(const void* x, const void* w, void* y, ScalarType y_type, int64_t rows, int64_t in_dim,
                   int64_t out_dim, cudaStream_t stream) {
  EPIC_CHECK(linear_skinny_supported(x, w, rows, in_dim, out_dim), ErrorCode::kInternal,
             "linear_skinny: unsupported shape (rows " + std::to_string(rows) + ", in " +
                 std::to_string(in_dim) + ") or unaligned pointers; check linear_skinny_supported first");
  const auto* x_bf16 = static_cast<const bf16*>(x);
  const auto* w_bf16 = static_cast<const bf16*>(w);
  if (y_type == ScalarType::kF32) {
    launch_rows(x_bf16, w_bf16, static_cast<float*>(y), rows, in_dim, out_dim, stream);
  } else {
    EPIC_CHECK(y_type == ScalarType::kBF16, ErrorCode::kInternal,
               std::string("linear_skinny: y must be f32 or bf16, got ") + scalar_name(y_type));
    launch_rows(x_bf16, w_bf16, static_cast<bf16*>(y), rows, in_dim, out_dim, stream);
  }
}

}  // namespace epic::cuda_kernels
