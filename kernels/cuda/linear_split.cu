// linear_f32_split: y = x * w^T for f32 x and bf16 w on tensor cores, with no loss in x. Each
// fp32 value is the exact sum of three bf16 values (bf16 keeps 8 of fp32's 24 significand bits:
// hi = bf16(x), mid = bf16(x - hi), lo = x - hi - mid, each difference exact in fp32), and a
// product of two bf16 values is exact in fp32, so three cuBLAS bf16 GEMMs accumulating in fp32
// compute the fp32 product up to the order of the sums. The SIMT kernels of linear_f32.cu read
// x once per output column tile; this reads the weights once per row tile at tensor-core speed.
#include <cuda_bf16.h>

#include <string>

#include "kernels/cuda/cublas_gemm.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"

namespace epic::cuda_kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kSplitThreads = 256;

__global__ void split_three_kernel(const float* __restrict__ x, bf16* __restrict__ parts, int64_t n) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float value = x[i];
    const bf16 hi = __float2bfloat16_rn(value);
    const float rest = value - __bfloat162float(hi);
    const bf16 mid = __float2bfloat16_rn(rest);
    parts[i] = hi;
    parts[n + i] = mid;
    parts[2 * n + i] = __float2bfloat16_rn(rest - __bfloat162float(mid));
  }
}

}  // namespace

void linear_f32_split(const float* x, const void* w, float* y, int64_t rows, int64_t in_dim, int64_t out_dim,
                      void* scratch, cublasHandle_t cublas, cudaStream_t stream) {
  if (rows == 0 || out_dim == 0) return;
  constexpr int64_t kIntMax = 0x7fffffff;
  EPIC_CHECK(rows <= kIntMax && in_dim <= kIntMax && out_dim <= kIntMax, ErrorCode::kUnsupported,
             "linear_f32_split: dimensions past 2^31 - 1 do not fit cuBLAS's int arguments");
  const int64_t n = rows * in_dim;
  auto* parts = static_cast<bf16*>(scratch);
  int64_t blocks = (n + kSplitThreads - 1) / kSplitThreads;
  if (blocks > 65536) blocks = 65536;  // grid-stride beyond this
  split_three_kernel<<<static_cast<unsigned>(blocks), kSplitThreads, 0, stream>>>(x, parts, n);
  EPIC_CUDA_CHECK_LAUNCH();
  for (int part = 0; part < 3; ++part) {
    gemm_rows_nt(cublas, parts + part * n, CUDA_R_16BF, in_dim, w, CUDA_R_16BF, out_dim, in_dim, y,
                 CUDA_R_32F, out_dim, rows, part == 0 ? 0.0f : 1.0f);
  }
}

}  // namespace epic::cuda_kernels
