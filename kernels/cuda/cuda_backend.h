// The CUDA backend: tensors in one GPU's memory, every op a kernel (or cuBLAS call) enqueued on the
// backend's own stream, graphs captured from that stream. Nothing inside an op synchronises or
// touches host memory, except the prefill-sized expert FFN, which reads the group sizes back once
// per MoE layer to hand cuBLAS exact GEMM shapes (never while capturing a graph).
#pragma once

#include <memory>
#include <string>

#include "kernels/backend.h"

namespace epic {

// The number of visible CUDA devices; 0 when there is no driver or no GPU. Never throws.
int cuda_device_count();

// "NVIDIA H200 (139.8 GiB, sm_90)"; throws like make_cuda_backend for a bad device.
std::string cuda_device_description(int device);

// Throws Error(kUnsupported) when there is no CUDA device, Error(kInvalidArgument) when device is
// out of range, Error(kInternal) when a CUDA or cuBLAS call fails.
std::unique_ptr<Backend> make_cuda_backend(int device = 0);

// From this many expert rows on (and when not capturing a graph), expert_ffn with BF16 tensors
// reads the group sizes back once and runs two grouped cuBLAS calls (all experts' gate_up GEMMs,
// then all down GEMMs); below it, device-scheduled kernels that never synchronise. The crossover
// is measured by kernels/cuda/bench/expert_ffn_bench.cu (BENCHMARKS.md).
constexpr int64_t kCublasExpertFfnMinRows = 8192;
// From this many rows on, one cuBLAS GEMM pair per expert instead of the grouped calls, spread over
// kExpertFfnSideLanes extra streams so several experts' GEMMs run at once (gemm_lanes.h).
constexpr int64_t kPerExpertFfnMinRows = 65536;
constexpr int kExpertFfnSideLanes = 3;

}  // namespace epic
