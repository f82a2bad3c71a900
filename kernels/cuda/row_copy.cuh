// Whole-row copies by one warp: each lane moves every 32nd 16-byte unit of the row, four loads in
// flight before the stores, so a 4 KiB row (hidden 2048 in bf16) is 8 loads per lane in two
// rounds. Used where rows move as units (gather_rows, expert_ffn_padded's unpadding), where one
// thread per unit spent most of its time re-reading the row's index.
#pragma once

#include <cstdint>

namespace epic::cuda_kernels::rows {

constexpr int kCopyWarpSize = 32;
constexpr int kCopyUnroll = 4;

__device__ __forceinline__ void copy_row_by_warp(const uint4* __restrict__ source,
                                                 uint4* __restrict__ destination, int64_t units, int lane) {
  int64_t unit = lane;
  for (; unit + (kCopyUnroll - 1) * kCopyWarpSize < units; unit += kCopyUnroll * kCopyWarpSize) {
    uint4 values[kCopyUnroll];
#pragma unroll
    for (int i = 0; i < kCopyUnroll; ++i) values[i] = source[unit + i * kCopyWarpSize];
#pragma unroll
    for (int i = 0; i < kCopyUnroll; ++i) destination[unit + i * kCopyWarpSize] = values[i];
  }
  for (; unit < units; unit += kCopyWarpSize) destination[unit] = source[unit];
}

}  // namespace epic::cuda_kernels::rows
