// Prefill attention on tensor cores (flash-attention-2 style, bf16 mma.sync with fp32 accumulators):
// one block per (64-row tile, q head). Each warp owns 16 query rows; the block streams the keys of
// the tile's sequence through shared memory 64 at a time (double-buffered cp.async, found through the
// block table), and every warp keeps an online softmax of its rows in registers. O is written once.
// A tile may hold rows of up to kMaxRunsPerTile sequences (a batch of prompts): the keys are streamed
// once per run, each row seeing only its own run's pass; rows need not be in position order.
#include <cuda_bf16.h>

#include <cstdint>

#include "kernels/cuda/attention_mma.cuh"
#include "kernels/cuda/cuda_check.h"

namespace epic::cuda_kernels::attention_mma {
namespace {

constexpr int kPrefillStages = 2;

template <int kHeadDim>
constexpr size_t prefill_shared_bytes() {
  // Q, then kPrefillStages x (K, V), each [64][shared_stride] bf16.
  return static_cast<size_t>(1 + 2 * kPrefillStages) * kTileRows * shared_stride<kHeadDim>() * sizeof(Bf16);
}

template <int kHeadDim>
__global__ void __launch_bounds__(kThreads)
    attention_prefill_kernel(const Bf16* qkv, const Bf16* key_pool, const Bf16* value_pool,
                             const int32_t* block_tables, int64_t max_blocks, const int32_t* row_sequence,
                             const int32_t* positions, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                             float scale_log2, Bf16* out) {
  constexpr int kStride = shared_stride<kHeadDim>();
  constexpr int kMatrix = kTileRows * kStride;  // elements of one [64][stride] tile
  constexpr int kChunksPerRow = kHeadDim / kChunkElements;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  Bf16* q_tile = reinterpret_cast<Bf16*>(shared_bytes);
  Bf16* k_tiles = q_tile + kMatrix;  // stage s at k_tiles + s * kMatrix
  Bf16* v_tiles = k_tiles + kPrefillStages * kMatrix;
  __shared__ int32_t row_run[kTileRows];
  __shared__ int32_t row_position[kTileRows];
  __shared__ int32_t run_sequence[kMaxRunsPerTile];
  __shared__ int32_t run_last_position[kMaxRunsPerTile];
  __shared__ int num_runs_shared;

  const int64_t head = blockIdx.x;
  // The tiles with the most keys (the last rows of a causal prompt) start first.
  const int64_t tile = static_cast<int64_t>(gridDim.y) - 1 - blockIdx.y;
  const int64_t first_row = tile * kTileRows;
  const int tile_rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), rows - first_row));
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  if (warp == 0) {
    const TileRuns runs = find_tile_runs(row_sequence, positions, first_row, tile_rows);
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int row = lane + j * kWarpSize;
      row_run[row] = runs.run[j];
      row_position[row] = runs.position[j];
      if (runs.starts[j] && runs.run[j] < kMaxRunsPerTile) run_sequence[runs.run[j]] = runs.sequence[j];
    }
    for (int run = 0; run < min(runs.count, kMaxRunsPerTile); ++run) {
      const int last =
          max(runs.run[0] == run ? runs.position[0] : -1, runs.run[1] == run ? runs.position[1] : -1);
      const int run_last = __reduce_max_sync(kFullWarpMask, last);
      if (lane == 0) run_last_position[run] = run_last;
    }
    if (lane == 0) num_runs_shared = runs.count;
  }
  __syncthreads();
  const int num_runs = num_runs_shared;
  if (num_runs > kMaxRunsPerTile) return;  // the decode kernel takes this tile's rows one by one

  // Q of this head for the tile's rows; rows past the end are zero (their results are not written).
  const int64_t qkv_stride = (num_heads + 2 * num_kv_heads) * kHeadDim;
#pragma unroll
  for (int step = 0; step < kTileRows * kChunksPerRow / kThreads; ++step) {
    const int chunk = static_cast<int>(threadIdx.x) + step * kThreads;
    const int row = chunk / kChunksPerRow;
    const int part = chunk % kChunksPerRow;
    const bool valid = row < tile_rows;
    const Bf16* source =
        valid ? qkv + (first_row + row) * qkv_stride + head * kHeadDim + part * kChunkElements : qkv;
    copy_async_16(q_tile + row * kStride + part * kChunkElements, source, valid);
  }
  copy_async_commit();
  copy_async_wait<0>();
  __syncthreads();
  uint32_t query[kHeadDim / 16][4];
  load_query_fragments<kHeadDim>(query, q_tile + warp * kWarpRows * kStride);

  WarpSoftmaxState<kHeadDim> state;
  state.init();
  const int64_t kv_head = head / (num_heads / num_kv_heads);
  const int64_t slot_stride = num_kv_heads * kHeadDim;
  const int low_row = warp * kWarpRows + lane / 4;
  const int high_row = low_row + 8;

  for (int run = 0; run < num_runs; ++run) {
    // Rows of other runs (and invalid rows) see no key in this pass: limit -1.
    const int limit_low = row_run[low_row] == run ? row_position[low_row] : -1;
    const int limit_high = row_run[high_row] == run ? row_position[high_row] : -1;
    const int warp_last = __reduce_max_sync(kFullWarpMask, max(limit_low, limit_high));
    const int last_position = run_last_position[run];
    const int32_t* block_table = block_tables + static_cast<int64_t>(run_sequence[run]) * max_blocks;
    const int num_key_tiles = last_position / kTileKeys + 1;

    load_kv_tile<kHeadDim>(key_pool, value_pool, block_table, slot_stride, kv_head * kHeadDim, 0,
                           last_position, k_tiles, v_tiles);
    copy_async_commit();
    for (int key_tile = 0; key_tile < num_key_tiles; ++key_tile) {
      const int stage = key_tile % kPrefillStages;
      if (key_tile + 1 < num_key_tiles) {
        const int next_stage = (key_tile + 1) % kPrefillStages;
        load_kv_tile<kHeadDim>(key_pool, value_pool, block_table, slot_stride, kv_head * kHeadDim,
                               (key_tile + 1) * kTileKeys, last_position, k_tiles + next_stage * kMatrix,
                               v_tiles + next_stage * kMatrix);
        copy_async_commit();
        copy_async_wait<1>();
      } else {
        copy_async_wait<0>();
      }
      __syncthreads();  // this tile has landed for every thread
      // Warps whose rows all end before this tile skip it (the tail of the causal triangle).
      if (key_tile * kTileKeys <= warp_last) {
        attend_keys<kHeadDim, kTileKeys>(state, query, k_tiles + stage * kMatrix, v_tiles + stage * kMatrix,
                                         key_tile * kTileKeys, limit_low, limit_high, scale_log2);
      }
      __syncthreads();  // every warp is done with this stage before the next load overwrites it
    }
  }

  state.finish();
  const int quad_lane = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int row = half == 0 ? low_row : high_row;
    if (row >= tile_rows) continue;
    // A row with no visible key (position < 0) gets zeros, as the reference writes.
    const float inverse = state.sum[half] > 0.0f ? 1.0f / state.sum[half] : 0.0f;
    Bf16* out_row = out + (first_row + row) * num_heads * kHeadDim + head * kHeadDim;
#pragma unroll
    for (int dim_tile = 0; dim_tile < kHeadDim / 8; ++dim_tile) {
      *reinterpret_cast<__nv_bfloat162*>(out_row + dim_tile * 8 + 2 * quad_lane) = __floats2bfloat162_rn(
          state.output[dim_tile][2 * half] * inverse, state.output[dim_tile][2 * half + 1] * inverse);
    }
  }
}

template <int kHeadDim>
void launch(const AttentionArgs& args, int64_t num_tiles, cudaStream_t stream) {
  constexpr size_t kShared = prefill_shared_bytes<kHeadDim>();
  EPIC_CUDA_CHECK(cudaFuncSetAttribute(attention_prefill_kernel<kHeadDim>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kShared)));
  const dim3 grid(static_cast<unsigned>(args.num_heads), static_cast<unsigned>(num_tiles));
  attention_prefill_kernel<kHeadDim><<<grid, kThreads, kShared, stream>>>(
      args.qkv, args.key_pool, args.value_pool, args.block_tables, args.max_blocks, args.row_sequence,
      args.positions, args.rows, args.num_heads, args.num_kv_heads, args.scale_log2, args.out);
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool launch_prefill_tiles(const AttentionArgs& args, cudaStream_t stream) {
  constexpr int64_t kMaxGridY = 65535;
  const int64_t num_tiles = (args.rows + kTileRows - 1) / kTileRows;
  if (args.rows < kMinRowsForTiles || num_tiles > kMaxGridY || args.num_heads > kMaxGridY) return false;
  if (args.head_dim == 64) {
    launch<64>(args, num_tiles, stream);
  } else {
    launch<128>(args, num_tiles, stream);
  }
  return true;
}

}  // namespace epic::cuda_kernels::attention_mma
