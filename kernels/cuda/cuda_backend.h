// The CUDA backend: the Backend ops on device pointers (fp32) for one GPU; linear through cuBLAS
// (fp32, no TF32), the rest as plain kernels. Ops are asynchronous on the backend's own stream,
// which synchronises with the legacy default stream, so a plain cudaMemcpy sees their results.
#pragma once

#include <memory>

#include "kernels/backend.h"

namespace epic {

// The number of visible CUDA devices; 0 when there is no driver or no GPU. Never throws.
int cuda_device_count();

// Throws Error(kUnsupported) when there is no CUDA device, Error(kInvalidArgument) when device is
// out of range, Error(kInternal) when a CUDA or cuBLAS call fails.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

}  // namespace epic
