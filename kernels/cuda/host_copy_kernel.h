// Many small host-to-device copies as one kernel launch (Backend::copy_from_host_scattered and
// enqueue_side_copies): an expert store moves a step's experts with a few copies per expert (two weight
// tensors, two table entries), and one cudaMemcpyAsync each costs microseconds of host time that the
// next step waits for. Large copies stay with the copy engines (cudaMemcpyAsync).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace epic::cuda_kernels {

// One copy: dst (device memory) <- src (pinned host memory the device can read at its host address, or
// device memory), bytes.
struct HostCopyDescriptor {
  uint64_t dst;
  uint64_t src;
  uint64_t bytes;
};

// Copies at or above this size go to the copy engines instead.
constexpr uint64_t kKernelCopyMaxBytes = 256 * 1024;

// Runs `count` copies (which must not overlap one another) on `stream`, reading the descriptors from
// `descriptors` (pinned host memory: it must stay unchanged until the kernel has run). Each copy moves
// 16-byte words where dst, src and bytes allow, else bytes.
void copy_host_descriptors(const HostCopyDescriptor* descriptors, int64_t count, cudaStream_t stream);

}  // namespace epic::cuda_kernels
