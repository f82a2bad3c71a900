// Programmatic dependent launch (Hopper and newer): a kernel launched this way may be scheduled
// while the kernel before it on the stream is still finishing, and waits on the device
// (wait_for_previous) before it touches memory. At decode sizes a layer is ~15 small kernels and
// the gaps between them are a large share of a step; this hides most of each gap. A kernel
// launched with launch() must call wait_for_previous() and then release_next() before any other
// global memory access (reads of what no kernel writes, such as weights, may go before). wait_for_previous
// returns when the previous kernel has completed and its writes are visible; release_next then lets the next
// kernel be scheduled once every block of this one has got there. In that order a running kernel knows that
// everything before its predecessor has completed (a kernel may rely on that to read older data before its
// own wait), and the next grid is never scheduled before this one's last wave has started, so it cannot
// starve it. Both are no-ops on a plain launch and below sm_90. EPIC_CUDA_PDL=0 in the environment launches
// plainly (A/B timing).
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "kernels/cuda/cuda_check.h"

namespace epic::cuda_kernels::dependent {

__device__ __forceinline__ void release_next() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wait_for_previous() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

// Whether the current device takes programmatic launches (compute capability 9.0+) and
// EPIC_CUDA_PDL is not 0; asked once per device (dependent_launch.cu).
bool enabled();

// Whether the norms, qk_norm_rope, gather_rows and decode attention launch programmatically too
// (enabled() and EPIC_CUDA_PDL_ALL not 0): each lets the kernel after it be scheduled early, so the
// next GEMM's first weight loads overlap it (qkv after the norm, o_proj after attention).
bool enabled_for_all();

// kernel<<<grid, block, shared, stream>>>(args...), as a programmatic dependent launch where
// `programmatic` (and the kernel waits then releases as launch() requires; a no-op otherwise).
template <class... Params, class... Args>
void launch_if(bool programmatic, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared,
               cudaStream_t stream, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = shared;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  if (programmatic) {
    config.attrs = attribute;
    config.numAttrs = 1;
  }
  EPIC_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

// kernel<<<grid, block, shared, stream>>>(args...), as a programmatic dependent launch where enabled().
template <class... Params, class... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared, cudaStream_t stream,
            Args&&... args) {
  launch_if(enabled(), kernel, grid, block, shared, stream, std::forward<Args>(args)...);
}

}  // namespace epic::cuda_kernels::dependent
