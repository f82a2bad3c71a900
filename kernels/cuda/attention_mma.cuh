// Building blocks of the tensor-core (bf16 mma.sync) attention paths of attention_prefill_kernel.cu and
// attention_decode_kernel.cu: PTX wrappers, the copy of a KV tile through a block table, the per-warp
// online-softmax step over a chunk of keys, the split of a 64-row tile into runs of one sequence, and
// the host entry points the dispatcher in attention_kernel.cu calls.
//
// Fragment layouts are those of mma.m16n8k16 (PTX ISA, "Matrix fragments for mma.m16n8k16"): lane l
// holds rows l / 4 and l / 4 + 8, columns 2 * (l % 4) + {0, 1} (+ 8) of A and C; the S accumulators
// of two adjacent 8-key tiles are exactly the A fragment of P for the P V product.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "kernels/backend.h"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels::attention_mma {

using Bf16 = __nv_bfloat16;
using access::kFullWarpMask;
using access::kWarpSize;

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarpSize;
constexpr int kWarpRows = 16;                  // M of one mma: query rows (prefill) or heads (decode)
constexpr int kTileRows = kWarps * kWarpRows;  // query rows of a prefill tile
constexpr int kTileKeys = 64;                  // keys per shared-memory stage: four KV blocks
constexpr int kChunkElements = 8;              // bf16 per 16-byte cp.async
// A prefill tile whose valid rows fall into more runs (maximal row ranges of one sequence) than this
// is left to the decode kernel, row by row: each run costs the tile kernel one pass over its keys.
constexpr int kMaxRunsPerTile = 4;
// Below this many rows the host launches only the decode kernel (decode steps; tiny chunks).
constexpr int64_t kMinRowsForTiles = 16;
// Shared-memory rows are padded by 16 bytes so that the 8 row addresses of an ldmatrix fall into 8
// different 16-byte bank groups (a 128- or 256-byte stride would put all 8 in one).
template <int kHeadDim>
constexpr int shared_stride() {
  return kHeadDim + kChunkElements;
}
static_assert(kTileKeys % kKvBlockSize == 0, "a key tile is whole KV blocks");
static_assert(kTileRows == kTileKeys, "prefill Q and K/V tiles share one shared-memory shape");

// ---- PTX wrappers --------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// 16 bytes global -> shared without a register round trip; `valid` false writes 16 zero bytes and
// reads nothing (global must still be a mapped address: callers pass the tensor's base).
__device__ __forceinline__ void copy_async_16(void* shared, const void* global, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(shared)), "l"(global),
               "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void copy_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups are still in flight.
template <int kPending>
__device__ __forceinline__ void copy_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void load_matrices(uint32_t (&fragment)[4], const Bf16* shared_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(shared_address(shared_row))
               : "memory");
}
__device__ __forceinline__ void load_matrices_transposed(uint32_t (&fragment)[4], const Bf16* shared_row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(fragment[0]), "=r"(fragment[1]), "=r"(fragment[2]), "=r"(fragment[3])
               : "r"(shared_address(shared_row))
               : "memory");
}

// c[16x8] += a[16x16] b[16x8], bf16 inputs, fp32 accumulators.
__device__ __forceinline__ void mma_bf16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two floats rounded to bf16 (nearest even), the lower column in the low half.
__device__ __forceinline__ uint32_t pack_bf16(float low, float high) {
  const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
  return *reinterpret_cast<const uint32_t*>(&pair);
}

// ---- loads ---------------------------------------------------------------------------------------

// Copies keys and values of positions [first_key, first_key + kTileKeys) of one kv head, found
// through the sequence's block table, into k_tile / v_tile [kTileKeys][shared_stride]. Positions past
// last_key are zero-filled, never read: their table entries or slots may not exist or hold anything
// (NaN included), and zero values keep 0 * v finite. Asynchronous: the caller commits and waits.
template <int kHeadDim>
__device__ __forceinline__ void load_kv_tile(const Bf16* key_pool, const Bf16* value_pool,
                                             const int32_t* block_table, int64_t slot_stride,
                                             int64_t kv_head_offset, int first_key, int last_key,
                                             Bf16* k_tile, Bf16* v_tile) {
  constexpr int kChunksPerRow = kHeadDim / kChunkElements;
  constexpr int kChunks = kTileKeys * kChunksPerRow;
  static_assert(kChunks % kThreads == 0, "every thread copies the same number of chunks");
#pragma unroll
  for (int step = 0; step < kChunks / kThreads; ++step) {
    const int chunk = static_cast<int>(threadIdx.x) + step * kThreads;
    const int key = chunk / kChunksPerRow;
    const int part = chunk % kChunksPerRow;
    const int position = first_key + key;
    const bool valid = position <= last_key;
    int64_t offset = 0;
    if (valid) {
      const int64_t block = block_table[position / kKvBlockSize];
      offset = (block * kKvBlockSize + position % kKvBlockSize) * slot_stride + kv_head_offset +
               part * kChunkElements;
    }
    const int at = key * shared_stride<kHeadDim>() + part * kChunkElements;
    copy_async_16(k_tile + at, key_pool + offset, valid);
    copy_async_16(v_tile + at, value_pool + offset, valid);
  }
}

// This warp's A fragments of Q (16 rows from q_rows, all kHeadDim columns) into registers.
template <int kHeadDim>
__device__ __forceinline__ void load_query_fragments(uint32_t (&query)[kHeadDim / 16][4],
                                                     const Bf16* q_rows) {
  const int lane = threadIdx.x % kWarpSize;
  // Lanes 0-7 address matrix 0 (rows 0-7, columns 0-7), 8-15 matrix 1 (rows 8-15), 16-23 matrix 2
  // (rows 0-7, columns 8-15), 24-31 matrix 3: a0..a3 of the A fragment.
  const Bf16* lane_row =
      q_rows + ((lane & 7) + ((lane >> 3) & 1) * 8) * shared_stride<kHeadDim>() + (lane >> 4) * 8;
#pragma unroll
  for (int chunk = 0; chunk < kHeadDim / 16; ++chunk) load_matrices(query[chunk], lane_row + chunk * 16);
}

// ---- the online softmax of one warp ------------------------------------------------------------------

// A warp's running state for its 16 query rows: unnormalised output, running max of the raw dot
// products and this lane's share of the denominators (summed over the lane quad at the end).
template <int kHeadDim>
struct WarpSoftmaxState {
  float output[kHeadDim / 8][4];  // C layout: [..][0..1] row lane / 4, [..][2..3] row lane / 4 + 8
  float max[2];                   // rows lane / 4 and lane / 4 + 8; equal over the lane quad
  float sum[2];

  __device__ __forceinline__ void init() {
#pragma unroll
    for (int tile = 0; tile < kHeadDim / 8; ++tile)
#pragma unroll
      for (int e = 0; e < 4; ++e) output[tile][e] = 0.0f;
#pragma unroll
    for (int half = 0; half < 2; ++half) max[half] = -INFINITY, sum[half] = 0.0f;
  }

  // The denominators summed over the quad's lanes (every lane of the quad gets the total).
  __device__ __forceinline__ void finish() {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      sum[half] += __shfl_xor_sync(kFullWarpMask, sum[half], 1);
      sum[half] += __shfl_xor_sync(kFullWarpMask, sum[half], 2);
    }
  }
};

// Attends the warp's 16 query rows to kKeys keys: k_rows / v_rows point to the shared row of the first
// key, whose position is first_position. Row lane / 4 sees positions <= limit_low, row lane / 4 + 8
// positions <= limit_high (-1: none). Scores are raw dot products; scale_log2 = head_dim^-0.5 * log2(e)
// turns them into base-2 exponents. P is rounded to bf16 for the P V product, the denominators use
// the fp32 probabilities.
template <int kHeadDim, int kKeys>
__device__ __forceinline__ void attend_keys(WarpSoftmaxState<kHeadDim>& state,
                                            const uint32_t (&query)[kHeadDim / 16][4], const Bf16* k_rows,
                                            const Bf16* v_rows, int first_position, int limit_low,
                                            int limit_high, float scale_log2) {
  static_assert(kKeys % 16 == 0, "keys come in 16-key mma steps");
  constexpr int kStride = shared_stride<kHeadDim>();
  const int lane = threadIdx.x % kWarpSize;
  const int quad_lane = lane % 4;

  float score[kKeys / 8][4];
#pragma unroll
  for (int tile = 0; tile < kKeys / 8; ++tile)
#pragma unroll
    for (int e = 0; e < 4; ++e) score[tile][e] = 0.0f;

  // S = Q K^T. Matrix i of the ldmatrix: keys 8 * (i / 2) .. + 7, dims 8 * (i % 2) .. + 7 of the
  // 16 x 16 block: b0, b1 of key tile 2j, then b0, b1 of key tile 2j + 1.
  const Bf16* k_lane = k_rows + ((lane & 7) + (lane >> 4) * 8) * kStride + ((lane >> 3) & 1) * 8;
#pragma unroll
  for (int chunk = 0; chunk < kHeadDim / 16; ++chunk) {
#pragma unroll
    for (int j = 0; j < kKeys / 16; ++j) {
      uint32_t b[4];
      load_matrices(b, k_lane + j * 16 * kStride + chunk * 16);
      mma_bf16(score[2 * j], query[chunk], b[0], b[1]);
      mma_bf16(score[2 * j + 1], query[chunk], b[2], b[3]);
    }
  }

  // Causal / run mask and the online softmax, per row half (row lane / 4, then lane / 4 + 8).
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int limit = half == 0 ? limit_low : limit_high;
    float tile_max = -INFINITY;
#pragma unroll
    for (int tile = 0; tile < kKeys / 8; ++tile)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int position = first_position + tile * 8 + 2 * quad_lane + e;
        float& value = score[tile][2 * half + e];
        if (position > limit) value = -INFINITY;  // a select, never an add: masked NaN stays out
        tile_max = fmaxf(tile_max, value);
      }
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarpMask, tile_max, 1));
    tile_max = fmaxf(tile_max, __shfl_xor_sync(kFullWarpMask, tile_max, 2));
    const float new_max = fmaxf(state.max[half], tile_max);
    // A row that has seen no visible key keeps max -inf: subtract 0 instead, so exp2(-inf) = 0
    // rather than exp2(-inf + inf) = NaN.
    const float base = new_max == -INFINITY ? 0.0f : new_max * scale_log2;
    const float correction = exp2f(state.max[half] * scale_log2 - base);
    state.max[half] = new_max;
    state.sum[half] *= correction;
#pragma unroll
    for (int tile = 0; tile < kHeadDim / 8; ++tile) {
      state.output[tile][2 * half] *= correction;
      state.output[tile][2 * half + 1] *= correction;
    }
#pragma unroll
    for (int tile = 0; tile < kKeys / 8; ++tile)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float& value = score[tile][2 * half + e];
        value = exp2f(fmaf(value, scale_log2, -base));
        state.sum[half] += value;
      }
  }

  // O += P V. Matrix i of the transposed ldmatrix: keys 8 * (i % 2) .. + 7, dims 8 * (i / 2) .. + 7:
  // b0, b1 of dim tile 2j, then b0, b1 of dim tile 2j + 1.
  const Bf16* v_lane = v_rows + ((lane & 7) + ((lane >> 3) & 1) * 8) * kStride + (lane >> 4) * 8;
#pragma unroll
  for (int chunk = 0; chunk < kKeys / 16; ++chunk) {
    const uint32_t p[4] = {pack_bf16(score[2 * chunk][0], score[2 * chunk][1]),
                           pack_bf16(score[2 * chunk][2], score[2 * chunk][3]),
                           pack_bf16(score[2 * chunk + 1][0], score[2 * chunk + 1][1]),
                           pack_bf16(score[2 * chunk + 1][2], score[2 * chunk + 1][3])};
#pragma unroll
    for (int j = 0; j < kHeadDim / 16; ++j) {
      uint32_t b[4];
      load_matrices_transposed(b, v_lane + chunk * 16 * kStride + j * 16);
      mma_bf16(state.output[2 * j], p, b[0], b[1]);
      mma_bf16(state.output[2 * j + 1], p, b[2], b[3]);
    }
  }
}

// ---- runs of a prefill tile ----------------------------------------------------------------------

// Rows lane and lane + 32 of the tile [first_row, first_row + tile_rows): a valid row (in range, position
// >= 0) belongs to run `run` (0-based; -1 for invalid rows), the maximal range of rows whose valid rows
// share one sequence. Rows need not be in position order. Both kernels compute this the same way, so
// they agree on which tiles the prefill kernel takes. Called by all 32 lanes of a warp.
struct TileRuns {
  int run[2];
  int sequence[2];
  int position[2];
  bool starts[2];  // first valid row of its run
  int count;
};

__device__ __forceinline__ TileRuns find_tile_runs(const int32_t* row_sequence, const int32_t* positions,
                                                   int64_t first_row, int tile_rows) {
  const int lane = threadIdx.x % kWarpSize;
  TileRuns runs;
  bool valid[2];
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int row = lane + j * kWarpSize;
    runs.position[j] = row < tile_rows ? positions[first_row + row] : -1;
    valid[j] = runs.position[j] >= 0;
    runs.sequence[j] = valid[j] ? row_sequence[first_row + row] : -1;
  }
  const uint64_t valid_mask = static_cast<uint64_t>(__ballot_sync(kFullWarpMask, valid[0])) |
                              (static_cast<uint64_t>(__ballot_sync(kFullWarpMask, valid[1])) << 32);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int row = lane + j * kWarpSize;
    const uint64_t earlier = valid_mask & ((uint64_t{1} << row) - 1);
    const int previous = earlier != 0 ? 63 - __clzll(static_cast<long long>(earlier)) : -1;
    // Every lane takes part in both shuffles; the source row's half picks the result.
    const int previous_low = __shfl_sync(kFullWarpMask, runs.sequence[0], previous & 31);
    const int previous_high = __shfl_sync(kFullWarpMask, runs.sequence[1], previous & 31);
    const int previous_sequence = previous < kWarpSize ? previous_low : previous_high;
    runs.starts[j] = valid[j] && (previous < 0 || previous_sequence != runs.sequence[j]);
  }
  const uint64_t start_mask = static_cast<uint64_t>(__ballot_sync(kFullWarpMask, runs.starts[0])) |
                              (static_cast<uint64_t>(__ballot_sync(kFullWarpMask, runs.starts[1])) << 32);
  runs.count = __popcll(start_mask);
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int row = lane + j * kWarpSize;
    // Starts at or before this row (2 << 63 wraps to 0 in uint64_t: the mask of all 64 rows).
    const uint64_t up_to_row = start_mask & ((uint64_t{2} << row) - 1);
    runs.run[j] = valid[j] ? __popcll(up_to_row) - 1 : -1;
  }
  return runs;
}

// ---- host side -----------------------------------------------------------------------------------

// The geometry and pointers of one attention call (cuda_kernels::attention's arguments, bf16).
struct AttentionArgs {
  const Bf16* qkv = nullptr;
  const Bf16* key_pool = nullptr;
  const Bf16* value_pool = nullptr;
  const int32_t* block_tables = nullptr;
  int64_t max_blocks = 0;
  const int32_t* row_sequence = nullptr;
  const int32_t* positions = nullptr;
  int64_t rows = 0, num_heads = 0, num_kv_heads = 0, head_dim = 0;
  Bf16* out = nullptr;
  float scale_log2 = 0.0f;  // head_dim^-0.5 * log2(e)
};

// Whether the tensor-core paths take a call: bf16, head_dim 64 or 128, at most 16 q heads per kv
// head, 16-byte aligned qkv and pools, 4-byte aligned out.
bool fast_paths_support(ScalarType type, int64_t head_dim, int64_t num_heads, int64_t num_kv_heads,
                        const void* qkv, const void* key_pool, const void* value_pool, const void* out);

// attention_prefill_kernel.cu: one block per (64-row tile, q head); returns false (launching
// nothing) when the call has fewer than kMinRowsForTiles rows or too many tiles for the grid.
bool launch_prefill_tiles(const AttentionArgs& args, cudaStream_t stream);

// attention_decode_kernel.cu: one block (or a cluster of blocks splitting the keys) per (row, kv
// head) for every row the prefill kernel did not take (all rows when tiles_launched is false).
void launch_decode_groups(const AttentionArgs& args, bool tiles_launched, cudaStream_t stream);

}  // namespace epic::cuda_kernels::attention_mma
