// The paged KV cache on the GPU: store_kv writes each row's k and v into the pools, attention runs
// causal GQA over them for prefill and decode rows alike (the key count of each row is read from
// positions on the device, so the launches serve any mix and can be captured in a graph). BF16 calls
// with head_dim 64 or 128 go to the tensor-core paths (attention_prefill_kernel.cu for tiles of
// prompt rows, attention_decode_kernel.cu for the other rows); the kernel here takes the rest (f32,
// the verification mode; other head dims) with fp32 FMA.
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>
#include <string>

#include "kernels/backend.h"
#include "kernels/cuda/attention_mma.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using access::kFullWarpMask;
using access::kVectorElements;
using access::kWarpSize;

constexpr int kStoreThreads = 256;
constexpr double kLog2E = 1.4426950408889634;
constexpr int kAttentionWarps = 8;
constexpr int kAttentionThreads = kAttentionWarps * kWarpSize;
// A warp takes the keys a tile at a time: one key per lane for the scores, then the lanes split the
// head dimensions for the weighted sum of values. A tile spans two KV blocks.
constexpr int kKeysPerTile = kWarpSize;
static_assert(kKeysPerTile == 2 * kKvBlockSize, "a tile is two KV blocks (kept in two registers)");

// ---- store_kv ----------------------------------------------------------------------------------

// Copies, for every row with slot_mapping[row] >= 0, its k part (kv_units Units from k_offset) and
// its v part (from v_offset) to slot slot_mapping[row] of the pools. Units are uint4, uint32_t or
// uint16_t, whichever all offsets and pointers allow.
template <class Unit>
__global__ void store_kv_kernel(const Unit* qkv, const int32_t* slot_mapping, int64_t rows, Unit* key_pool,
                                Unit* value_pool, int64_t row_units, int64_t k_offset, int64_t v_offset,
                                int64_t kv_units) {
  dependent::wait_for_previous();  // dependent_launch.cuh: before any global access
  dependent::release_next();
  const int64_t total = rows * 2 * kv_units;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < total;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = u / (2 * kv_units);
    const int64_t within = u - row * 2 * kv_units;
    const int32_t slot = slot_mapping[row];
    if (slot < 0) continue;  // padding row
    const bool is_value = within >= kv_units;
    const int64_t column = is_value ? within - kv_units : within;
    const Unit source = qkv[row * row_units + (is_value ? v_offset : k_offset) + column];
    (is_value ? value_pool : key_pool)[static_cast<int64_t>(slot) * kv_units + column] = source;
  }
}

// ---- attention ---------------------------------------------------------------------------------

// One block per (row, head), head fastest so the heads of one kv head run side by side and share
// its keys and values in L2. Warp w takes tiles w, w + kAttentionWarps, ... of the row's visible
// keys with an online (max-rescaled) softmax; the warps' states are merged at the end.
// kDimsPerLane = ceil(head_dim / 32) rounded up to 2, 4 or 8; kVec = 8 when the key rows can be
// read 16 bytes at a time, else 1.
template <class T, int kDimsPerLane, int kVec>
__global__ void __launch_bounds__(kAttentionThreads)
    attention_kernel(const T* qkv, const T* key_pool, const T* value_pool, const int32_t* block_tables,
                     int64_t max_blocks, const int32_t* row_sequence, const int32_t* positions,
                     int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, T* out) {
  __shared__ __align__(16) float q_shared[kMaxHeadDim];
  __shared__ float warp_max_shared[kAttentionWarps];
  __shared__ float warp_denominator_shared[kAttentionWarps];
  __shared__ float warp_sum_shared[kAttentionWarps][kMaxHeadDim];

  const int64_t item = blockIdx.x;
  const int64_t row = item / num_heads;
  const int64_t head = item - row * num_heads;
  const int64_t kv_head = head / (num_heads / num_kv_heads);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  T* out_row = out + row * num_heads * head_dim + head * head_dim;

  const int32_t position = positions[row];
  if (position < 0) {  // not a real position: no keys to attend; write zeros rather than garbage
    for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) out_row[d] = access::from_float<T>(0.0f);
    return;  // uniform over the block, before any barrier
  }

  const T* q = qkv + row * (num_heads + 2 * num_kv_heads) * head_dim + head * head_dim;
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) q_shared[d] = access::to_float(q[d]);
  __syncthreads();

  const int32_t* block_table = block_tables + static_cast<int64_t>(row_sequence[row]) * max_blocks;
  const int64_t slot_stride = num_kv_heads * head_dim;  // elements per slot of a pool
  const T* keys = key_pool + kv_head * head_dim;
  const T* values = value_pool + kv_head * head_dim;
  const int64_t num_keys = static_cast<int64_t>(position) + 1;
  const int64_t num_tiles = (num_keys + kKeysPerTile - 1) / kKeysPerTile;

  float running_max = -INFINITY;
  float lane_denominator = 0.0f;  // this lane's keys' share; summed over the warp at the end
  float sum[kDimsPerLane];
#pragma unroll
  for (int c = 0; c < kDimsPerLane; ++c) sum[c] = 0.0f;

  for (int64_t tile = warp; tile < num_tiles; tile += kAttentionWarps) {
    const int64_t tile_start = tile * kKeysPerTile;
    const int64_t keys_in_tile = min(static_cast<int64_t>(kKeysPerTile), num_keys - tile_start);
    // The tile's two KV blocks; the second is only read when the tile reaches into it.
    const int64_t first_block = block_table[2 * tile];
    const int64_t second_block = keys_in_tile > kKvBlockSize ? block_table[2 * tile + 1] : first_block;
    const auto slot_of = [&](int key_in_tile) {
      return (key_in_tile < kKvBlockSize ? first_block : second_block) * kKvBlockSize +
             key_in_tile % kKvBlockSize;
    };

    // Scores: lane i takes key tile_start + i.
    float score = -INFINITY;
    if (lane < keys_in_tile) {
      const T* key = keys + slot_of(lane) * slot_stride;
      float dot = 0.0f;
      for (int64_t d = 0; d < head_dim; d += kVec) {
        float key_values[kVec];
        access::load_vector<kVec>(key + d, key_values);
#pragma unroll
        for (int j = 0; j < kVec; ++j) dot += q_shared[d + j] * key_values[j];
      }
      score = dot * scale;  // scaled after the dot product, as the reference (and HF) do
    }
    // The tile's first key is visible, so the new max is finite and exp(-inf - max) = 0 below.
    const float new_max = fmaxf(running_max, access::warp_max(score));
    const float correction = expf(running_max - new_max);
    const float probability = lane < keys_in_tile ? expf(score - new_max) : 0.0f;
    lane_denominator = lane_denominator * correction + probability;
#pragma unroll
    for (int c = 0; c < kDimsPerLane; ++c) sum[c] *= correction;

    // Values: every lane takes dims lane, lane + 32, ... of each key, in key order.
    for (int j = 0; j < keys_in_tile; ++j) {
      const float key_probability = __shfl_sync(kFullWarpMask, probability, j);
      const T* value = values + slot_of(j) * slot_stride;
#pragma unroll
      for (int c = 0; c < kDimsPerLane; ++c) {
        const int64_t d = lane + c * kWarpSize;
        if (d < head_dim) sum[c] += key_probability * access::to_float(value[d]);
      }
    }
    running_max = new_max;
  }

  const float denominator = access::warp_sum(lane_denominator);
  if (lane == 0) {
    warp_max_shared[warp] = running_max;
    warp_denominator_shared[warp] = denominator;
  }
#pragma unroll
  for (int c = 0; c < kDimsPerLane; ++c) {
    const int64_t d = lane + c * kWarpSize;
    if (d < head_dim) warp_sum_shared[warp][d] = sum[c];
  }
  __syncthreads();

  // Warp 0 saw key 0, so the overall max is finite; a warp that saw no key has max -inf, sums 0
  // and weight exp(-inf) = 0.
  float overall_max = -INFINITY;
  for (int w = 0; w < kAttentionWarps; ++w) overall_max = fmaxf(overall_max, warp_max_shared[w]);
  float total_denominator = 0.0f;
  for (int w = 0; w < kAttentionWarps; ++w)
    total_denominator += warp_denominator_shared[w] * expf(warp_max_shared[w] - overall_max);
  for (int64_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    float total = 0.0f;
    for (int w = 0; w < kAttentionWarps; ++w)
      total += warp_sum_shared[w][d] * expf(warp_max_shared[w] - overall_max);
    out_row[d] = access::from_float<T>(total / total_denominator);
  }
}

template <class T, int kDimsPerLane>
void launch_attention(const void* qkv, const void* key_pool, const void* value_pool,
                      const int32_t* block_tables, int64_t max_blocks, const int32_t* row_sequence,
                      const int32_t* positions, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                      int64_t head_dim, void* out, cudaStream_t stream) {
  const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
  const auto blocks = static_cast<unsigned>(rows * num_heads);
  const bool vector =
      head_dim % kVectorElements == 0 && access::aligned16(key_pool);  // slots are whole vectors then
  if (vector) {
    attention_kernel<T, kDimsPerLane, kVectorElements><<<blocks, kAttentionThreads, 0, stream>>>(
        static_cast<const T*>(qkv), static_cast<const T*>(key_pool), static_cast<const T*>(value_pool),
        block_tables, max_blocks, row_sequence, positions, num_heads, num_kv_heads, head_dim, scale,
        static_cast<T*>(out));
  } else {
    attention_kernel<T, kDimsPerLane, 1><<<blocks, kAttentionThreads, 0, stream>>>(
        static_cast<const T*>(qkv), static_cast<const T*>(key_pool), static_cast<const T*>(value_pool),
        block_tables, max_blocks, row_sequence, positions, num_heads, num_kv_heads, head_dim, scale,
        static_cast<T*>(out));
  }
}

}  // namespace

void store_kv(const void* qkv, ScalarType type, const int32_t* slot_mapping, int64_t rows, void* key_pool,
              void* value_pool, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
              cudaStream_t stream) {
  if (rows == 0 || num_kv_heads == 0 || head_dim == 0) return;
  const size_t element = scalar_size(type);
  const size_t row_bytes = static_cast<size_t>((num_heads + 2 * num_kv_heads) * head_dim) * element;
  const size_t k_offset_bytes = static_cast<size_t>(num_heads * head_dim) * element;
  const size_t kv_bytes = static_cast<size_t>(num_kv_heads * head_dim) * element;
  const uintptr_t alignment_bits = reinterpret_cast<uintptr_t>(qkv) | reinterpret_cast<uintptr_t>(key_pool) |
                                   reinterpret_cast<uintptr_t>(value_pool) | row_bytes | k_offset_bytes |
                                   kv_bytes;
  // The v part starts kv_bytes after the k part, so these cover its alignment too.
  const auto launch = [&](auto unit_tag) {
    using Unit = typename decltype(unit_tag)::type;
    const auto units = [](size_t bytes) { return static_cast<int64_t>(bytes / sizeof(Unit)); };
    dependent::launch(store_kv_kernel<Unit>,
                      dim3(access::capped_blocks(rows * 2 * units(kv_bytes), kStoreThreads)),
                      dim3(kStoreThreads), 0, stream, static_cast<const Unit*>(qkv), slot_mapping, rows,
                      static_cast<Unit*>(key_pool), static_cast<Unit*>(value_pool), units(row_bytes),
                      units(k_offset_bytes), units(k_offset_bytes + kv_bytes), units(kv_bytes));
  };
  if (alignment_bits % sizeof(uint4) == 0) {
    launch(access::TypeTag<uint4>{});
  } else if (alignment_bits % sizeof(uint32_t) == 0) {
    launch(access::TypeTag<uint32_t>{});
  } else {
    launch(access::TypeTag<uint16_t>{});  // f32 and bf16 elements are whole uint16_t units
  }
  EPIC_CUDA_CHECK_LAUNCH();
}

void attention(const void* qkv, ScalarType type, const void* key_pool, const void* value_pool,
               const int32_t* block_tables, int64_t max_blocks, const int32_t* row_sequence,
               const int32_t* positions, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
               int64_t head_dim, void* out, cudaStream_t stream) {
  if (rows == 0 || num_heads == 0 || head_dim == 0) return;
  EPIC_CHECK(head_dim <= kMaxHeadDim, ErrorCode::kUnsupported,
             "attention: the CUDA kernel takes head_dim up to " + std::to_string(kMaxHeadDim) + ", not " +
                 std::to_string(head_dim));
  EPIC_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, ErrorCode::kInvalidArgument,
             "attention: num_heads " + std::to_string(num_heads) + " is not a multiple of num_kv_heads " +
                 std::to_string(num_kv_heads));
  if (attention_mma::fast_paths_support(type, head_dim, num_heads, num_kv_heads, qkv, key_pool, value_pool,
                                        out)) {
    attention_mma::AttentionArgs args;
    args.qkv = static_cast<const __nv_bfloat16*>(qkv);
    args.key_pool = static_cast<const __nv_bfloat16*>(key_pool);
    args.value_pool = static_cast<const __nv_bfloat16*>(value_pool);
    args.block_tables = block_tables;
    args.max_blocks = max_blocks;
    args.row_sequence = row_sequence;
    args.positions = positions;
    args.rows = rows;
    args.num_heads = num_heads;
    args.num_kv_heads = num_kv_heads;
    args.head_dim = head_dim;
    args.out = static_cast<__nv_bfloat16*>(out);
    args.scale_log2 = static_cast<float>(kLog2E / std::sqrt(static_cast<double>(head_dim)));
    // The tile kernel writes the rows of the tiles it takes; the decode kernel, launched after it on
    // the same stream, skips exactly those (both decide per tile from positions and row_sequence).
    const bool tiles_launched = attention_mma::launch_prefill_tiles(args, stream);
    attention_mma::launch_decode_groups(args, tiles_launched, stream);
    return;
  }
  access::dispatch_float_type(type, "attention", [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    if (head_dim <= 2 * kWarpSize) {
      launch_attention<T, 2>(qkv, key_pool, value_pool, block_tables, max_blocks, row_sequence, positions,
                             rows, num_heads, num_kv_heads, head_dim, out, stream);
    } else if (head_dim <= 4 * kWarpSize) {
      launch_attention<T, 4>(qkv, key_pool, value_pool, block_tables, max_blocks, row_sequence, positions,
                             rows, num_heads, num_kv_heads, head_dim, out, stream);
    } else {
      launch_attention<T, 8>(qkv, key_pool, value_pool, block_tables, max_blocks, row_sequence, positions,
                             rows, num_heads, num_kv_heads, head_dim, out, stream);
    }
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

namespace attention_mma {

bool fast_paths_support(ScalarType type, int64_t head_dim, int64_t num_heads, int64_t num_kv_heads,
                        const void* qkv, const void* key_pool, const void* value_pool, const void* out) {
  return type == ScalarType::kBF16 && (head_dim == 64 || head_dim == 128) &&
         num_heads / num_kv_heads <= kWarpRows && access::aligned16(qkv) && access::aligned16(key_pool) &&
         access::aligned16(value_pool) && reinterpret_cast<uintptr_t>(out) % 4 == 0;
}

}  // namespace attention_mma

}  // namespace epic::cuda_kernels
