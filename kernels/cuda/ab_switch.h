// The environment switches that turn one optimisation off for A/B timing (EPIC_CUDA_PDL,
// EPIC_CUDA_PDL_ALL, EPIC_CUDA_WIDE_STREAMING, EPIC_CUDA_ATTENTION_SPLIT_CAP: tests/gpu/run_gpu_tests.sh ab;
// EPIC_CUDA_BATCHED_FFN, EPIC_CUDA_FFN_WINDOWS: run_gpu_tests.sh moe-ab; EPIC_CUDA_FUSED_MOE: both).
#pragma once

#include <cstdlib>
#include <cstring>

namespace epic::cuda_kernels {

// On unless the environment sets `name` to "0". Callers keep the answer in a function-local static,
// so the environment is read once per switch.
inline bool ab_switch_on(const char* name) {
  const char* value = std::getenv(name);
  return value == nullptr || std::strcmp(value, "0") != 0;
}

}  // namespace epic::cuda_kernels
