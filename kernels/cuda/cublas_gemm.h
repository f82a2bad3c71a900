// The one cuBLAS call shape of the CUDA backend: row-major y[rows, out] (row stride ldy) =
// x[rows, in] (row stride ldx) * w[out, in]^T (+ beta * y), fp32 accumulation. In cuBLAS's
// column-major terms that is y^T = op_T(w as [in, out]) * x^T, so w is the transposed operand.
// Callers check that every size fits cuBLAS's int arguments.
#pragma once

#include <cublas_v2.h>

#include <cstdint>

#include "kernels/cuda/cuda_check.h"

namespace epic::cuda_kernels {

inline void gemm_rows_nt(cublasHandle_t cublas, const void* x, cudaDataType x_type, int64_t ldx,
                         const void* w, cudaDataType w_type, int64_t out, int64_t in, void* y,
                         cudaDataType y_type, int64_t ldy, int64_t rows, float beta = 0.0f) {
  const float alpha = 1.0f;
  EPIC_CUBLAS_CHECK(cublasGemmEx(cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(out),
                                 static_cast<int>(rows), static_cast<int>(in), &alpha, w, w_type,
                                 static_cast<int>(in), x, x_type, static_cast<int>(ldx), &beta, y, y_type,
                                 static_cast<int>(ldy), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

}  // namespace epic::cuda_kernels
