#include <atomic>

#include "kernels/cuda/ab_switch.h"
#include "kernels/cuda/dependent_launch.cuh"

namespace epic::cuda_kernels::dependent {

bool enabled() {
  static const bool allowed = ab_switch_on("EPIC_CUDA_PDL");
  if (!allowed) return false;
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0 unknown, 1 no, 2 yes
  int device = 0;
  EPIC_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 0 || device >= kMaxDevices) return false;
  int state = known[device].load(std::memory_order_relaxed);
  if (state == 0) {
    int major = 0;
    EPIC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    state = major >= 9 ? 2 : 1;
    known[device].store(state, std::memory_order_relaxed);
  }
  return state == 2;
}

bool enabled_for_all() {
  static const bool allowed = ab_switch_on("EPIC_CUDA_PDL_ALL");
  return allowed && enabled();
}

}  // namespace epic::cuda_kernels::dependent
