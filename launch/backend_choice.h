// `--backend cpu|cuda`, `--device N` and `--precision fp32|bf16`: which backend a process computes
// on and in which activation type. cuda is the default where a GPU is visible (and this build has
// the CUDA backend); a process of a multi-rank job takes the GPU of its local rank unless --device
// names one. fp32 is the verification mode (the CPU reference, or cuda without TF32); bf16 the
// serving mode (bf16 weights and activations, fp32 accumulation), cuda only.
#pragma once

#include <memory>
#include <optional>
#include <string>

#include "kernels/backend.h"

namespace epic::cli {

struct BackendFlags {
  std::string backend = "auto";    // auto | cpu | cuda
  std::optional<int> device;       // cuda device; default: the local rank modulo the visible GPUs
  std::string precision = "auto";  // auto | fp32 | bf16 (auto: bf16 on cuda, fp32 on cpu)
};

struct ChosenBackend {
  std::unique_ptr<Backend> backend;
  ScalarType activation_type = ScalarType::kF32;
  std::string description;  // "cuda device 0: NVIDIA H200 (139.8 GiB, sm_90), bf16"
};

// Names only (no device is touched): Error(kInvalidArgument) for an unknown backend or precision,
// a negative device, --device or bf16 with --backend cpu.
void check_backend_flags(const BackendFlags& flags);

// Error(kInvalidArgument) (exit 2) when cuda is asked for and this build has no CUDA backend or no
// GPU is visible, or --device is out of range.
ChosenBackend choose_backend(const BackendFlags& flags, int local_rank, int cpu_threads);

// Whether this build has the CUDA backend and a GPU is visible.
bool cuda_available();

// This process's rank among the job's processes on its node, from the launcher (0 when alone).
int launcher_local_rank();

}  // namespace epic::cli
