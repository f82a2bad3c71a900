// Device-side access to F32 / BF16 tensors for the CUDA kernels (elementwise, attention, routing,
// expert FFN): widening loads and rounding stores, 8-element vector forms (16-byte loads), warp
// reductions, SiLU, and the host-side dispatch from a runtime ScalarType to a template parameter.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "kernels/error.h"
#include "kernels/tensor.h"

namespace epic::cuda_kernels::access {

constexpr int kWarpSize = 32;
constexpr unsigned kFullWarpMask = 0xffffffffu;
// Elements per vector step: 16 bytes of bf16, two 16-byte loads of f32. A vector path needs every
// pointer 16-byte aligned and every row length a multiple of kVectorElements.
constexpr int kVectorElements = 8;

__device__ __forceinline__ float to_float(float value) { return value; }
__device__ __forceinline__ float to_float(__nv_bfloat16 value) { return __bfloat162float(value); }

template <class T>
__device__ __forceinline__ T from_float(float value);
template <>
__device__ __forceinline__ float from_float<float>(float value) {
  return value;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float value) {
  return __float2bfloat16_rn(value);  // the one rounding of a bf16 result
}

// values[0..N) = p[0..N) widened to fp32. N == 8 needs p 16-byte aligned; N == 1 any pointer.
template <int N, class T>
__device__ __forceinline__ void load_vector(const T* p, float (&values)[N]) {
  static_assert(N == 1 || N == kVectorElements, "scalar or 8-element vector");
  if constexpr (N == 1) {
    values[0] = to_float(p[0]);
  } else if constexpr (sizeof(T) == 4) {
    const float4 low = reinterpret_cast<const float4*>(p)[0];
    const float4 high = reinterpret_cast<const float4*>(p)[1];
    values[0] = low.x, values[1] = low.y, values[2] = low.z, values[3] = low.w;
    values[4] = high.x, values[5] = high.y, values[6] = high.z, values[7] = high.w;
  } else {
    const uint4 bits = *reinterpret_cast<const uint4*>(p);
    const uint32_t words[4] = {bits.x, bits.y, bits.z, bits.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      // bf16 -> f32 is exact: the bf16 bits are the high half of the f32 bits.
      values[2 * i] = __uint_as_float(words[i] << 16);
      values[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
  }
}

// p[0..N) = values rounded to T (nearest even for bf16).
template <int N, class T>
__device__ __forceinline__ void store_vector(T* p, const float (&values)[N]) {
  static_assert(N == 1 || N == kVectorElements, "scalar or 8-element vector");
  if constexpr (N == 1) {
    p[0] = from_float<T>(values[0]);
  } else if constexpr (sizeof(T) == 4) {
    reinterpret_cast<float4*>(p)[0] = make_float4(values[0], values[1], values[2], values[3]);
    reinterpret_cast<float4*>(p)[1] = make_float4(values[4], values[5], values[6], values[7]);
  } else {
    uint32_t words[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const __nv_bfloat162 pair = __floats2bfloat162_rn(values[2 * i], values[2 * i + 1]);
      words[i] = *reinterpret_cast<const uint32_t*>(&pair);
    }
    *reinterpret_cast<uint4*>(p) = make_uint4(words[0], words[1], words[2], words[3]);
  }
}

// One expression for every SiLU on the device, so the dense MLP and the expert FFN round alike.
__device__ __forceinline__ float silu(float value) { return value / (1.0f + expf(-value)); }

// The warp's sum in every lane (float, or double where the sum must not lose the terms' bits).
template <class T>
__device__ __forceinline__ T warp_sum(T value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value += __shfl_xor_sync(kFullWarpMask, value, offset);
  return value;
}

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(kFullWarpMask, value, offset));
  return value;
}

// ---- host side ----

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <class T>
struct TypeTag {
  using type = T;
};

// Calls f(TypeTag<float>{}) or f(TypeTag<__nv_bfloat16>{}) for an activation or weight type.
template <class F>
void dispatch_float_type(ScalarType type, const char* op, F&& f) {
  switch (type) {
    case ScalarType::kF32:
      f(TypeTag<float>{});
      return;
    case ScalarType::kBF16:
      f(TypeTag<__nv_bfloat16>{});
      return;
    default:
      throw Error(ErrorCode::kUnsupported,
                  std::string(op) + ": the CUDA kernel takes f32 or bf16, not " + scalar_name(type));
  }
}

// The launch grid for `count` independent work items of `threads` each, capped: kernels that use
// it loop (grid-stride) over whatever the capped grid does not cover.
inline unsigned capped_blocks(int64_t count, int threads) {
  constexpr int64_t kMaxBlocks = 1 << 20;
  const int64_t blocks = (count + threads - 1) / threads;
  return static_cast<unsigned>(blocks < 1 ? 1 : (blocks > kMaxBlocks ? kMaxBlocks : blocks));
}

}  // namespace epic::cuda_kernels::access
