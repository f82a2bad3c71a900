// What code beside the CUDA backend needs of it to enqueue its own kernels or collectives in order with
// the backend's ops: its device and its stream. Throws Error(kInvalidArgument) for another backend.
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/backend.h"

namespace epic {

int cuda_backend_device(Backend& backend);
cudaStream_t cuda_backend_stream(Backend& backend);

}  // namespace epic
