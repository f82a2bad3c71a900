// Backend::decode_attention on CUDA for a few rows and short block tables: qk_norm_rope, store_kv and
// attention in one launch. At batch 1 those three ops were ~15 us of every layer, almost all of it
// dependent latency (the tensor-core decode kernel stages Q and K/V tiles through shared memory and
// merges warps and cluster peers, worth it for long contexts and many rows, not for ~100 keys). Here one
// block per (row, q head) rotates its own q and its kv head's k in registers, the first q head of each
// group stores k and v (the same bits store_kv stores: the rotation is qk_norm_rope.cuh's), and its 8
// warps take the keys 32 at a time, a key per lane, with an online softmax each; the warps merge at the
// end. The row's own key and value come from shared memory and qkv, never from the pools, so no block
// waits for another block's store (Backend::decode_attention's precondition: a row with a slot is its
// sequence's only row and newest position).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>

#include "kernels/backend.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/qk_norm_rope.cuh"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using access::kFullWarpMask;
using access::kWarpSize;

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarpSize;

__device__ __forceinline__ float warp_max(float value) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
    value = fmaxf(value, __shfl_xor_sync(kFullWarpMask, value, offset));
  return value;
}

// kDims consecutive elements widened to fp32, in 8- or 16-byte loads where the type allows.
template <int kDims, class T>
__device__ __forceinline__ void load_dims(const T* p, float (&values)[kDims]) {
  if constexpr (std::is_same_v<T, __nv_bfloat16> && kDims % 4 == 0) {
#pragma unroll
    for (int g = 0; g < kDims / 4; ++g) {
      const uint2 bits = reinterpret_cast<const uint2*>(p)[g];
      values[4 * g] = __uint_as_float(bits.x << 16);  // bf16 -> f32 is exact
      values[4 * g + 1] = __uint_as_float(bits.x & 0xffff0000u);
      values[4 * g + 2] = __uint_as_float(bits.y << 16);
      values[4 * g + 3] = __uint_as_float(bits.y & 0xffff0000u);
    }
  } else if constexpr (std::is_same_v<T, float> && kDims % 4 == 0) {
#pragma unroll
    for (int g = 0; g < kDims / 4; ++g) {
      const float4 v = reinterpret_cast<const float4*>(p)[g];
      values[4 * g] = v.x, values[4 * g + 1] = v.y, values[4 * g + 2] = v.z, values[4 * g + 3] = v.w;
    }
  } else {
#pragma unroll
    for (int i = 0; i < kDims; ++i) values[i] = access::to_float(p[i]);
  }
}

// Grid (num_heads, rows). See the file comment; kHeadDim is 64, 128 or 256.
template <class T, class N, int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    decode_attention_fused_kernel(const T* qkv, const N* q_norm, const N* k_norm, const int32_t* positions,
                                  const int32_t* slot_mapping, const int32_t* row_sequence,
                                  const int32_t* block_tables, int64_t max_blocks, T* key_pool, T* value_pool,
                                  int64_t num_heads, int64_t num_kv_heads, float eps, double theta,
                                  float scale, T* out) {
  constexpr int kDimsPerLane = kHeadDim / kWarpSize;
  constexpr int kChunks = kHeadDim / access::kVectorElements;
  __shared__ float cos_table[kHeadDim / 2];
  __shared__ float sin_table[kHeadDim / 2];
  __shared__ __align__(16) T q_rotated[kHeadDim];  // rounded as qk_norm_rope stores it
  __shared__ __align__(16) T k_rotated[kHeadDim];  // the row's own key, as stored
  __shared__ __align__(16) float q_values[kHeadDim];
  __shared__ float warp_max_scores[kWarps];
  __shared__ float warp_sums[kWarps];
  __shared__ float warp_outputs[kWarps][kHeadDim];

  dependent::wait_for_previous();  // dependent_launch.cuh: qkv is the previous kernel's output
  dependent::release_next();
  const int64_t head = blockIdx.x, row = blockIdx.y;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t group = num_heads / num_kv_heads;
  const int64_t kv_head = head / group;
  T* out_head = out + (row * num_heads + head) * kHeadDim;
  const int32_t position = positions[row];
  if (position < 0) {  // not a real position: no keys to attend; zeros, as the reference writes
    for (int i = threadIdx.x; i < kHeadDim; i += kThreads) out_head[i] = access::from_float<T>(0.0f);
    return;
  }
  const int32_t slot = slot_mapping[row];
  const T* qkv_row = qkv + row * (num_heads + 2 * num_kv_heads) * kHeadDim;
  const T* v_new = qkv_row + (num_heads + num_kv_heads + kv_head) * kHeadDim;

  rope::fill_tables(cos_table, sin_table, position, kHeadDim, theta);
  __syncthreads();
  if (warp == 0) {
    rope::norm_rope_head(qkv_row + head * kHeadDim, q_rotated, q_norm, cos_table, sin_table, kHeadDim, eps,
                         lane);
  } else if (warp == 1) {
    rope::norm_rope_head(qkv_row + (num_heads + kv_head) * kHeadDim, k_rotated, k_norm, cos_table, sin_table,
                         kHeadDim, eps, lane);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kHeadDim; i += kThreads) q_values[i] = access::to_float(q_rotated[i]);
  if (slot >= 0 && head % group == 0) {  // one block per (row, kv head) stores, as store_kv would
    const int64_t at = (static_cast<int64_t>(slot) * num_kv_heads + kv_head) * kHeadDim;
    for (int i = threadIdx.x; i < kHeadDim; i += kThreads) {
      key_pool[at + i] = k_rotated[i];
      value_pool[at + i] = v_new[i];
    }
  }
  __syncthreads();

  // Keys 0 .. position, key j to warp (j / 32) % kWarps, lane j % 32; an online softmax per warp with
  // each lane accumulating output dims [lane * kDimsPerLane, (lane + 1) * kDimsPerLane).
  const int32_t* block_table = block_tables + static_cast<int64_t>(row_sequence[row]) * max_blocks;
  const int64_t num_keys = static_cast<int64_t>(position) + 1;
  float running_max = -INFINITY, running_sum = 0.0f;
  float output[kDimsPerLane];
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) output[i] = 0.0f;
  for (int64_t base = static_cast<int64_t>(warp) * kWarpSize; base < num_keys; base += kThreads) {
    const int64_t key = base + lane;
    const bool valid = key < num_keys;
    const T* key_row = nullptr;
    const T* value_row = nullptr;
    if (valid) {
      if (key == position && slot >= 0) {
        key_row = k_rotated;
        value_row = v_new;
      } else {
        const int64_t key_slot =
            static_cast<int64_t>(block_table[key / kKvBlockSize]) * kKvBlockSize + key % kKvBlockSize;
        const int64_t at = (key_slot * num_kv_heads + kv_head) * kHeadDim;
        key_row = key_pool + at;
        value_row = value_pool + at;
      }
    }
    float score = -INFINITY;
    if (valid) {
      float dot = 0.0f;
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        float k_values[access::kVectorElements];
        access::load_vector<access::kVectorElements>(key_row + c * access::kVectorElements, k_values);
#pragma unroll
        for (int e = 0; e < access::kVectorElements; ++e)
          dot = fmaf(q_values[c * access::kVectorElements + e], k_values[e], dot);
      }
      score = dot * scale;
    }
    const float new_max = fmaxf(running_max, warp_max(score));  // finite: key `base` is valid
    const float correction = expf(running_max - new_max);       // 0 on the first round
    const float weight = valid ? expf(score - new_max) : 0.0f;
    running_sum = running_sum * correction + access::warp_sum(weight);
#pragma unroll
    for (int i = 0; i < kDimsPerLane; ++i) output[i] *= correction;
    const int keys_here = num_keys - base < kWarpSize ? static_cast<int>(num_keys - base) : kWarpSize;
    for (int j = 0; j < keys_here; ++j) {
      const float p = __shfl_sync(kFullWarpMask, weight, j);
      const T* v = reinterpret_cast<const T*>(
          __shfl_sync(kFullWarpMask, reinterpret_cast<unsigned long long>(value_row), j));
      float v_values[kDimsPerLane];
      load_dims<kDimsPerLane>(v + lane * kDimsPerLane, v_values);
#pragma unroll
      for (int i = 0; i < kDimsPerLane; ++i) output[i] = fmaf(p, v_values[i], output[i]);
    }
    running_max = new_max;
  }

  // Merge the warps (a warp without keys has max -inf and weighs 0).
  if (lane == 0) {
    warp_max_scores[warp] = running_max;
    warp_sums[warp] = running_sum;
  }
#pragma unroll
  for (int i = 0; i < kDimsPerLane; ++i) warp_outputs[warp][lane * kDimsPerLane + i] = output[i];
  __syncthreads();
  float block_max = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) block_max = fmaxf(block_max, warp_max_scores[w]);
  for (int d = threadIdx.x; d < kHeadDim; d += kThreads) {
    float sum = 0.0f, value = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float factor = expf(warp_max_scores[w] - block_max);
      sum = fmaf(warp_sums[w], factor, sum);
      value = fmaf(warp_outputs[w][d], factor, value);
    }
    out_head[d] = access::from_float<T>(value / sum);
  }
}

template <class T, class N>
void launch_typed(const DecodeAttentionFusedArgs& a, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>(a.num_heads), static_cast<unsigned>(a.rows));
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(a.head_dim)));
  const auto run = [&](auto kernel) {
    dependent::launch(kernel, grid, dim3(kThreads), 0, stream, static_cast<const T*>(a.qkv),
                      static_cast<const N*>(a.q_norm), static_cast<const N*>(a.k_norm), a.positions,
                      a.slot_mapping, a.row_sequence, a.block_tables, a.max_blocks,
                      static_cast<T*>(a.key_pool), static_cast<T*>(a.value_pool), a.num_heads, a.num_kv_heads,
                      a.eps, a.theta, scale, static_cast<T*>(a.out));
  };
  if (a.head_dim == 64) {
    run(decode_attention_fused_kernel<T, N, 64>);
  } else if (a.head_dim == 128) {
    run(decode_attention_fused_kernel<T, N, 128>);
  } else {
    run(decode_attention_fused_kernel<T, N, 256>);
  }
  EPIC_CUDA_CHECK_LAUNCH();
}

bool float_type(ScalarType type) { return type == ScalarType::kBF16 || type == ScalarType::kF32; }

}  // namespace

bool decode_attention_fused_supported(const DecodeAttentionFusedArgs& a) {
  const auto aligned = [](const void* p) { return access::aligned16(p); };
  return a.rows >= 1 && a.rows <= kDecodeAttentionFusedMaxRows && a.rows <= 65535 &&
         a.max_blocks * kKvBlockSize <= kDecodeAttentionFusedMaxKeys &&
         (a.head_dim == 64 || a.head_dim == 128 || a.head_dim == 256) && a.num_kv_heads >= 1 &&
         a.num_heads % a.num_kv_heads == 0 && float_type(a.type) && float_type(a.norm_type) &&
         aligned(a.qkv) && aligned(a.key_pool) && aligned(a.value_pool);
}

void decode_attention_fused(const DecodeAttentionFusedArgs& a, cudaStream_t stream) {
  EPIC_CHECK(decode_attention_fused_supported(a), ErrorCode::kInternal,
             "decode_attention_fused: unsupported shape (rows " + std::to_string(a.rows) + ", head_dim " +
                 std::to_string(a.head_dim) + ", " + std::to_string(a.max_blocks * kKvBlockSize) +
                 " keys a row) or types; check decode_attention_fused_supported first");
  const bool bf16 = a.type == ScalarType::kBF16, bf16_norm = a.norm_type == ScalarType::kBF16;
  if (bf16 && bf16_norm) {
    launch_typed<__nv_bfloat16, __nv_bfloat16>(a, stream);
  } else if (bf16) {
    launch_typed<__nv_bfloat16, float>(a, stream);
  } else if (bf16_norm) {
    launch_typed<float, __nv_bfloat16>(a, stream);
  } else {
    launch_typed<float, float>(a, stream);
  }
}

}  // namespace epic::cuda_kernels
