// copy_host_descriptors (host_copy_kernel.h): a block per copy (grid-stride over them), its threads over
// the copy's 16-byte words.
#include "kernels/cuda/host_copy_kernel.h"

#include <algorithm>

#include "kernels/cuda/cuda_check.h"

namespace epic::cuda_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 256;

__global__ void __launch_bounds__(kThreads) host_copy_kernel(const HostCopyDescriptor* descriptors, int64_t count) {
  for (int64_t c = blockIdx.x; c < count; c += gridDim.x) {
    const HostCopyDescriptor copy = descriptors[c];
    if (((copy.dst | copy.src | copy.bytes) & 15u) == 0) {
      auto* dst = reinterpret_cast<uint4*>(copy.dst);
      const auto* src = reinterpret_cast<const uint4*>(copy.src);
      for (uint64_t i = threadIdx.x; i < copy.bytes / 16; i += kThreads) dst[i] = src[i];
    } else {
      auto* dst = reinterpret_cast<uint8_t*>(copy.dst);
      const auto* src = reinterpret_cast<const uint8_t*>(copy.src);
      for (uint64_t i = threadIdx.x; i < copy.bytes; i += kThreads) dst[i] = src[i];
    }
  }
}

}  // namespace

void copy_host_descriptors(const HostCopyDescriptor* descriptors, int64_t count, cudaStream_t stream) {
  if (count <= 0) return;
  const auto blocks = static_cast<unsigned>(std::min(count, kMaxBlocks));
  host_copy_kernel<<<blocks, kThreads, 0, stream>>>(descriptors, count);
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::cuda_kernels
