// The streaming mma building blocks of the decode-size expert FFN kernels (expert_ffn_streaming.cu,
// and the fused few-token MoE in routed_moe_fused.cu): weight and activation loads with the cache
// hints that keep a one-pass weight stream out of L1, and the m16n8k16 bf16 mma over a K-permuted
// 32-wide chunk, with weights as the 16-row A operand and up to 8 activation rows as B.
#pragma once

#include <cuda_bf16.h>

#include <cstdint>

namespace epic::cuda_kernels::streaming_mma {

using bf16 = __nv_bfloat16;

constexpr int kMmaRows = 16;                  // M: weight rows of one warp
constexpr int kMmaTokens = 8;                 // N: activation rows of one mma
constexpr int kVectorElements = 8;            // one 16-byte load
constexpr int kChunkK = 4 * kVectorElements;  // the 4 lanes of an mma row group cover 32 K

// Weights are read exactly once per chunk: keep them out of L1 (the activations live there), and
// ask L2 for the whole 256-byte segment (a warp's next loads of the row are in it).
__device__ __forceinline__ uint4 load_weights(const bf16* address) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(address));
  return v;
}

// Activations written before this grid started (x for gate_up, shared by the column warps: through
// L1), or by the grid still running when this one started (down's intermediate, read after waiting
// for it): L2 only (.cg), so no L1 line from before the wait can be used.
template <bool kFromRunningGrid>
__device__ __forceinline__ uint4 load_activations(const bf16* address) {
  uint4 v;
  if constexpr (!kFromRunningGrid) {
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(address));
  } else {
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(address));
  }
  return v;
}

// D (16 x 8, f32) += A (16 x 16, bf16, row) * B (16 x 8, bf16, col).
__device__ __forceinline__ void mma_16x8x16(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                            uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One 32-wide K chunk: lane (group g, quad q) holds weight rows g (lo) and g + 8 (hi) and
// activation row g, each at physical K 8q .. 8q + 7 of the chunk. The mma fragments want, at
// step s, logical K {2q, 2q + 1, 2q + 8, 2q + 9}; mapping those to physical 8q + 4s + {0, 1, 2, 3}
// is a bijection of the chunk's 32 K onto (s, logical K), the same for A and B, so the products
// summed are exactly those of the plain order. 32-bit word w of a load holds physical 2w, 2w + 1.
__device__ __forceinline__ void mma_chunk(float (&d)[4], const uint4& lo, const uint4& hi, const uint4& act) {
  mma_16x8x16(d, lo.x, hi.x, lo.y, hi.y, act.x, act.y);  // s = 0: physical 8q + 0 .. 3
  mma_16x8x16(d, lo.z, hi.z, lo.w, hi.w, act.z, act.w);  // s = 1: physical 8q + 4 .. 7
}

}  // namespace epic::cuda_kernels::streaming_mma
