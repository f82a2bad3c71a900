// The one checked-call macro family for CUDA runtime and cuBLAS calls: a failure throws
// epic::Error(kInternal) naming the statement, file:line, the current device and the error.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <string>

#include "kernels/error.h"

namespace epic::cuda_detail {

inline std::string current_device_text() {
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) {
    cudaGetLastError();  // the failed query must not be reported by the next check
    return "?";
  }
  return std::to_string(device);
}

inline std::string failure_prefix(const char* statement, const char* file, int line) {
  return std::string(statement) + " failed at " + file + ":" + std::to_string(line) + " on CUDA device " +
         current_device_text() + ": ";
}

[[noreturn]] inline void throw_cuda_error(const char* statement, const char* file, int line,
                                          cudaError_t status) {
  // Reset the non-sticky "last error" so a later EPIC_CUDA_CHECK_LAUNCH reports its own launch.
  cudaGetLastError();
  throw Error(ErrorCode::kInternal, failure_prefix(statement, file, line) + cudaGetErrorName(status) + " (" +
                                        cudaGetErrorString(status) + ")");
}

[[noreturn]] inline void throw_cublas_error(const char* statement, const char* file, int line,
                                            cublasStatus_t status) {
  throw Error(ErrorCode::kInternal, failure_prefix(statement, file, line) + cublasGetStatusName(status) +
                                        " (" + cublasGetStatusString(status) + ")");
}

}  // namespace epic::cuda_detail

#define EPIC_CUDA_CHECK(statement)                                                              \
  do {                                                                                          \
    const cudaError_t epic_cuda_status_ = (statement);                                          \
    if (epic_cuda_status_ != cudaSuccess) {                                                     \
      ::epic::cuda_detail::throw_cuda_error(#statement, __FILE__, __LINE__, epic_cuda_status_); \
    }                                                                                           \
  } while (0)

// After a kernel launch: a bad launch configuration is only reported through cudaGetLastError.
#define EPIC_CUDA_CHECK_LAUNCH() EPIC_CUDA_CHECK(cudaGetLastError())

#define EPIC_CUBLAS_CHECK(statement)                                                                \
  do {                                                                                              \
    const cublasStatus_t epic_cublas_status_ = (statement);                                         \
    if (epic_cublas_status_ != CUBLAS_STATUS_SUCCESS) {                                             \
      ::epic::cuda_detail::throw_cublas_error(#statement, __FILE__, __LINE__, epic_cublas_status_); \
    }                                                                                               \
  } while (0)
