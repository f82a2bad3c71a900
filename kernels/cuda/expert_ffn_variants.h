// The kernels behind expert_ffn_device_scheduled (cuda_kernels.h), selectable one by one so the
// micro-benchmark (kernels/cuda/bench) can time and check each of them on the same card; the
// backend only ever calls expert_ffn_device_scheduled, which picks by size (kAuto).
#pragma once

#include <cuda_runtime_api.h>

#include "kernels/cuda/cuda_kernels.h"

namespace epic::cuda_kernels {

enum class ExpertFfnKernel {
  kAuto,
  // Shared-memory tiled wmma kernels (expert_ffn_device.cu): a block per (column tile, expert),
  // looping over the expert's rows 16 or 64 at a time.
  kTiled16,
  kTiled64,
  // Streaming kernels (expert_ffn_streaming.cu): weights straight from HBM into mma registers, a
  // block per (column tile, chunk of 8, 16 or 32 rows of one expert). Need BF16 x BF16, H and I
  // multiples of 8 and 16-byte aligned pointers; otherwise the tiled kernel runs instead.
  kStream8,
  kStream16,
  kStream32,
  // The same with 4 or 8 column warps a block (64 or 128 weight rows, K split over 2 or 1 warps):
  // longer blocks, each activation load shared by more weight rows.
  kStream8Wide4,
  kStream16Wide4,
  kStream32Wide4,
  kStream32Wide8,
  // 4 column warps for gate_up, 8 for down (whose K, the intermediate size, is short).
  kStream16Wide4Down8,
  kStream32Wide4Down8,
};

const char* expert_ffn_kernel_name(ExpertFfnKernel kernel);

// overlap_phases: the down launch may start while gate_up drains (programmatic dependent launch,
// Hopper and newer; it waits on the device before reading the intermediate). Streaming only.
void expert_ffn_device_scheduled_with(const ExpertFfnArgs& args, ExpertFfnKernel kernel, bool overlap_phases,
                                      cudaStream_t stream);

// The streaming path's eligibility (BF16 x BF16, vector loads possible) and its launcher
// (expert_ffn_streaming.cu); rows_per_chunk is 8, 16 or 32; column warps (gate_up, down) 2 and 2,
// 4 and 4, 4 and 8, or 8 and 8.
bool streaming_expert_ffn_supported(const ExpertFfnArgs& args);
void launch_streaming_expert_ffn(const ExpertFfnArgs& args, int rows_per_chunk, int column_warps,
                                 int down_column_warps, bool overlap_phases, cudaStream_t stream);

}  // namespace epic::cuda_kernels
