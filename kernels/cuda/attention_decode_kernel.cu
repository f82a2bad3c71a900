// Decode attention on tensor cores: one block per (row, kv head) computes all num_heads / num_kv_heads
// q heads of the group at once (they are the 16 rows of the mma, padded with zero rows), so each key
// and value is read once per group instead of once per q head. The block's 4 warps split every
// 64-key tile (16 keys each), keep online softmaxes and merge at the end. When rows x kv heads is too
// few to fill the GPU (small batches, long contexts), a cluster of up to 8 blocks splits the keys and
// its first block merges the others' partial results through distributed shared memory: no scratch.
#include <cooperative_groups.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kernels/cuda/ab_switch.h"
#include "kernels/cuda/attention_mma.cuh"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/dependent_launch.cuh"

namespace epic::cuda_kernels::attention_mma {
namespace {

constexpr int kMaxSplits = 8;                  // the portable cluster size
constexpr int kWarpKeys = kTileKeys / kWarps;  // each warp's share of a key tile
static_assert(kWarpKeys == 16, "one 16-key mma step per warp and tile");
// Blocks per SM worth aiming for before splitting keys: enough loads in flight to keep HBM busy.
constexpr int kTargetBlocksPerMultiprocessor = 2;
// The launch's cap: more items than this many blocks per SM are looped over by the blocks.
constexpr int kMaxBlocksPerMultiprocessor = 4;

// Shared memory: the group's Q [16][stride] bf16, kStages x (K, V) [64][stride] bf16, then the block's
// merged partial result (max[16], sum[16], output[16][kHeadDim] f32) that cluster peers read. The
// warps' partials for the in-block merge reuse the K/V stages once the keys are done.
template <int kHeadDim, int kStages>
struct DecodeLayout {
  static constexpr int kStride = shared_stride<kHeadDim>();
  static constexpr size_t kQueryBytes = static_cast<size_t>(kWarpRows) * kStride * sizeof(Bf16);
  static constexpr size_t kTileBytes = static_cast<size_t>(kTileKeys) * kStride * sizeof(Bf16);
  static constexpr size_t kStagesBytes = 2 * kStages * kTileBytes;
  static constexpr size_t kWarpPartialBytes =
      static_cast<size_t>(kWarps) * kWarpRows * (kHeadDim + 2) * sizeof(float);
  static constexpr size_t kResultBytes = static_cast<size_t>(kWarpRows) * (kHeadDim + 2) * sizeof(float);
  static constexpr size_t kTotalBytes = kQueryBytes + kStagesBytes + kResultBytes;
  static_assert(kWarpPartialBytes <= kStagesBytes, "the warps' partials fit in the K/V stages");
  static_assert(kQueryBytes % 16 == 0 && kTileBytes % 16 == 0, "16-byte aligned regions");
};

__device__ __forceinline__ void cluster_barrier(int splits) {
  if (splits > 1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    cooperative_groups::this_cluster().sync();  // also orders the shared-memory writes before it
#else
    __trap();  // the host splits keys only on sm_90 devices; code built for older ones cannot merge
#endif
  } else {
    __syncthreads();
  }
}

// The block of cluster rank `rank`'s copy of `pointer` (a shared-memory address of this block).
__device__ __forceinline__ const float* cluster_peer(float* pointer, int rank, int splits) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (splits > 1) return cooperative_groups::this_cluster().map_shared_rank(pointer, rank);
#endif
  return pointer;
}

// Attention of one (row, kv head) item, or of this block's share of its keys when a cluster of
// `splits` blocks takes the item. Called by every thread of every block of the cluster.
template <int kHeadDim, int kStages>
__device__ __forceinline__ void attend_group(const Bf16* qkv, const Bf16* key_pool, const Bf16* value_pool,
                                             const int32_t* block_tables, int64_t max_blocks,
                                             const int32_t* row_sequence, const int32_t* positions,
                                             int64_t row, int64_t kv_head, int64_t num_heads,
                                             int64_t num_kv_heads, float scale_log2, int split, int splits,
                                             unsigned char* shared_bytes, Bf16* out) {
  using Layout = DecodeLayout<kHeadDim, kStages>;
  constexpr int kStride = Layout::kStride;
  constexpr int kMatrix = kTileKeys * kStride;
  constexpr int kChunksPerRow = kHeadDim / kChunkElements;
  Bf16* q_tile = reinterpret_cast<Bf16*>(shared_bytes);
  Bf16* kv_stages = reinterpret_cast<Bf16*>(shared_bytes + Layout::kQueryBytes);  // stage s: K, then V
  float* result = reinterpret_cast<float*>(shared_bytes + Layout::kQueryBytes + Layout::kStagesBytes);
  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;

  const int group = static_cast<int>(num_heads / num_kv_heads);
  Bf16* out_row =
      out + row * num_heads * kHeadDim + kv_head * group * kHeadDim;  // the group's heads are adjacent
  const int32_t position = positions[row];
  if (position < 0) {  // not a real position: no keys to attend; zeros, as the reference writes
    if (split == 0)
      for (int i = threadIdx.x; i < group * kHeadDim; i += kThreads) out_row[i] = __float2bfloat16_rn(0.0f);
    return;  // the same for every block of the cluster
  }

  // Q rows 0 .. group - 1 are the group's heads; the rest are zero (finite scores, never written).
  const Bf16* q_source = qkv + row * (num_heads + 2 * num_kv_heads) * kHeadDim + kv_head * group * kHeadDim;
#pragma unroll
  for (int step = 0; step < kWarpRows * kChunksPerRow / kThreads; ++step) {
    const int chunk = static_cast<int>(threadIdx.x) + step * kThreads;
    const int head = chunk / kChunksPerRow;
    const int part = chunk % kChunksPerRow;
    const bool valid = head < group;
    copy_async_16(q_tile + head * kStride + part * kChunkElements,
                  valid ? q_source + head * kHeadDim + part * kChunkElements : qkv, valid);
  }
  copy_async_commit();

  // This block's share of the row's key tiles.
  const int num_key_tiles = position / kTileKeys + 1;
  const int tile_begin = static_cast<int>(static_cast<int64_t>(num_key_tiles) * split / splits);
  const int tile_end = static_cast<int>(static_cast<int64_t>(num_key_tiles) * (split + 1) / splits);
  const int my_tiles = tile_end - tile_begin;
  const int32_t* block_table = block_tables + static_cast<int64_t>(row_sequence[row]) * max_blocks;
  const int64_t slot_stride = num_kv_heads * kHeadDim;
  const auto load_tile = [&](int tile_index) {  // tile_index within this block's share
    Bf16* k_stage = kv_stages + (tile_index % kStages) * 2 * kMatrix;
    load_kv_tile<kHeadDim>(key_pool, value_pool, block_table, slot_stride, kv_head * kHeadDim,
                           (tile_begin + tile_index) * kTileKeys, position, k_stage, k_stage + kMatrix);
  };
  // One commit group per tile, empty ones included, so the wait counts below hold for any my_tiles.
#pragma unroll
  for (int tile_index = 0; tile_index < kStages - 1; ++tile_index) {
    if (tile_index < my_tiles) load_tile(tile_index);
    copy_async_commit();
  }
  copy_async_wait<kStages - 1>();  // the Q group, committed first, is complete
  __syncthreads();
  uint32_t query[kHeadDim / 16][4];
  load_query_fragments<kHeadDim>(query, q_tile);

  WarpSoftmaxState<kHeadDim> state;
  state.init();
  for (int tile_index = 0; tile_index < my_tiles; ++tile_index) {
    copy_async_wait<kStages - 2>();  // tile tile_index has landed for this thread
    __syncthreads();                 // ... for every thread; every warp is done with tile_index - 1
    if (tile_index + kStages - 1 < my_tiles)
      load_tile(tile_index + kStages - 1);  // into tile_index - 1's stage
    copy_async_commit();
    const Bf16* k_stage = kv_stages + (tile_index % kStages) * 2 * kMatrix;
    const int first_key = (tile_begin + tile_index) * kTileKeys + warp * kWarpKeys;
    if (first_key <= position) {
      attend_keys<kHeadDim, kWarpKeys>(state, query, k_stage + warp * kWarpKeys * kStride,
                                       k_stage + kMatrix + warp * kWarpKeys * kStride, first_key, position,
                                       position, scale_log2);
    }
  }
  copy_async_wait<0>();
  __syncthreads();  // the stages are free: the warps' partials go there

  // Merge the 4 warps (each saw a quarter of every tile).
  state.finish();
  float* partial_output = reinterpret_cast<float*>(kv_stages);          // [kWarps][16][kHeadDim]
  float* partial_max = partial_output + kWarps * kWarpRows * kHeadDim;  // [kWarps][16]
  float* partial_sum = partial_max + kWarps * kWarpRows;                // [kWarps][16]
  const int quad_lane = lane % 4;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int head = lane / 4 + 8 * half;
    float* warp_row = partial_output + (warp * kWarpRows + head) * kHeadDim;
#pragma unroll
    for (int dim_tile = 0; dim_tile < kHeadDim / 8; ++dim_tile) {
      warp_row[dim_tile * 8 + 2 * quad_lane] = state.output[dim_tile][2 * half];
      warp_row[dim_tile * 8 + 2 * quad_lane + 1] = state.output[dim_tile][2 * half + 1];
    }
    if (quad_lane == 0) {
      partial_max[warp * kWarpRows + head] = state.max[half];
      partial_sum[warp * kWarpRows + head] = state.sum[half];
    }
  }
  __syncthreads();
  float* result_max = result;                     // [16] max of raw dot products, -inf: no key in this block
  float* result_sum = result + kWarpRows;         // [16]
  float* result_output = result + 2 * kWarpRows;  // [16][kHeadDim], unnormalised
  for (int i = threadIdx.x; i < group * kHeadDim; i += kThreads) {
    const int head = i / kHeadDim;
    const int dim = i % kHeadDim;
    float overall_max = -INFINITY;
    for (int w = 0; w < kWarps; ++w) overall_max = fmaxf(overall_max, partial_max[w * kWarpRows + head]);
    float total_sum = 0.0f, total = 0.0f;
    for (int w = 0; w < kWarps; ++w) {
      const float warp_max = partial_max[w * kWarpRows + head];
      // A warp that saw no key has max -inf and zero sums: weight 0, never exp2(-inf + inf).
      const float weight = warp_max == -INFINITY ? 0.0f : exp2f((warp_max - overall_max) * scale_log2);
      total_sum += partial_sum[w * kWarpRows + head] * weight;
      total += partial_output[(w * kWarpRows + head) * kHeadDim + dim] * weight;
    }
    result_output[head * kHeadDim + dim] = total;
    if (dim == 0) result_max[head] = overall_max, result_sum[head] = total_sum;
  }

  // Merge the cluster's blocks (or just this one) into the output. The block holding key 0 (visible
  // to every row) makes the total denominator positive.
  cluster_barrier(splits);
  if (split == 0) {
    for (int i = threadIdx.x; i < group * kHeadDim; i += kThreads) {
      const int head = i / kHeadDim;
      float overall_max = -INFINITY;
      for (int rank = 0; rank < splits; ++rank)
        overall_max = fmaxf(overall_max, cluster_peer(result_max, rank, splits)[head]);
      float total_sum = 0.0f, total = 0.0f;
      for (int rank = 0; rank < splits; ++rank) {
        const float block_max = cluster_peer(result_max, rank, splits)[head];
        const float weight = block_max == -INFINITY ? 0.0f : exp2f((block_max - overall_max) * scale_log2);
        total_sum += cluster_peer(result_sum, rank, splits)[head] * weight;
        total += cluster_peer(result_output, rank, splits)[i] * weight;
      }
      out_row[i] = __float2bfloat16_rn(total_sum > 0.0f ? total / total_sum : 0.0f);
    }
  }
  // Peers keep their shared memory until rank 0 has read it; the next item reuses it.
  cluster_barrier(splits);
}

// Blocks (clusters of `splits` blocks) loop over contiguous ranges of the rows x kv_heads items, so
// the launch stays small when the prefill kernel took most rows: a block checks each tile of rows
// once and skips the items of tiles the prefill kernel took.
template <int kHeadDim, int kStages>
__global__ void __launch_bounds__(kThreads)
    attention_decode_kernel(const Bf16* qkv, const Bf16* key_pool, const Bf16* value_pool,
                            const int32_t* block_tables, int64_t max_blocks, const int32_t* row_sequence,
                            const int32_t* positions, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                            float scale_log2, bool tiles_launched, int splits, Bf16* out) {
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  dependent::wait_for_previous();  // dependent_launch.cuh: before any global access
  dependent::release_next();       // o_proj's blocks may then start loading their weights
  const int split = static_cast<int>(blockIdx.x % splits);  // == the block's rank in its cluster
  const int64_t cluster_index = blockIdx.x / splits;
  const int64_t num_clusters = gridDim.x / splits;
  const int64_t items = rows * num_kv_heads;
  const int64_t first_item = items * cluster_index / num_clusters;
  const int64_t end_item = items * (cluster_index + 1) / num_clusters;
  int64_t checked_tile = -1;
  bool tile_taken = false;
  for (int64_t item = first_item; item < end_item; ++item) {
    const int64_t row = item / num_kv_heads;
    if (tiles_launched) {  // the same answer in every block of the cluster
      const int64_t tile = row / kTileRows;
      if (tile != checked_tile) {
        checked_tile = tile;
        const int64_t first_row = tile * kTileRows;
        const int tile_rows = static_cast<int>(min(static_cast<int64_t>(kTileRows), rows - first_row));
        tile_taken = find_tile_runs(row_sequence, positions, first_row, tile_rows).count <= kMaxRunsPerTile;
      }
      if (tile_taken) continue;  // the prefill kernel wrote this row
    }
    attend_group<kHeadDim, kStages>(qkv, key_pool, value_pool, block_tables, max_blocks, row_sequence,
                                    positions, row, item - row * num_kv_heads, num_heads, num_kv_heads,
                                    scale_log2, split, splits, shared_bytes, out);
  }
}

// EPIC_CUDA_ATTENTION_SPLIT_CAP=0 splits keys as if every sequence could be long (A/B timing).
bool split_cap_enabled() {
  static const bool enabled = ab_switch_on("EPIC_CUDA_ATTENTION_SPLIT_CAP");
  return enabled;
}

struct DeviceFacts {
  int multiprocessors = 0;
  bool clusters = false;  // thread block clusters: compute capability 9.0 or newer
};

// Asked once per device.
DeviceFacts device_facts() {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> known[kMaxDevices];  // 0: not asked yet; else 2 x multiprocessors + clusters + 2
  int device = 0;
  EPIC_CUDA_CHECK(cudaGetDevice(&device));
  int state = device >= 0 && device < kMaxDevices ? known[device].load(std::memory_order_relaxed) : 0;
  if (state == 0) {
    int count = 0;
    int major = 0;
    EPIC_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    EPIC_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    state = 2 * count + (major >= 9 ? 1 : 0) + 2;
    if (device >= 0 && device < kMaxDevices) known[device].store(state, std::memory_order_relaxed);
  }
  return DeviceFacts{(state - 2) / 2, (state - 2) % 2 == 1};
}

template <int kHeadDim, int kStages>
void launch(const AttentionArgs& args, bool tiles_launched, int64_t blocks, int splits, cudaStream_t stream) {
  const auto kernel = attention_decode_kernel<kHeadDim, kStages>;
  constexpr size_t kShared = DecodeLayout<kHeadDim, kStages>::kTotalBytes;
  EPIC_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kShared)));
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kShared;
  config.stream = stream;
  cudaLaunchAttribute attributes[2];
  unsigned count = 0;
  if (splits > 1) {  // a plain launch when the keys are not split
    attributes[count].id = cudaLaunchAttributeClusterDimension;
    attributes[count].val.clusterDim.x = static_cast<unsigned>(splits);
    attributes[count].val.clusterDim.y = 1;
    attributes[count].val.clusterDim.z = 1;
    ++count;
  }
  if (dependent::enabled_for_all()) {
    attributes[count].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[count].val.programmaticStreamSerializationAllowed = 1;
    ++count;
  }
  config.attrs = attributes;
  config.numAttrs = count;
  EPIC_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, args.qkv, args.key_pool, args.value_pool,
                                     args.block_tables, args.max_blocks, args.row_sequence, args.positions,
                                     args.rows, args.num_heads, args.num_kv_heads, args.scale_log2,
                                     tiles_launched, splits, args.out));
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace

void launch_decode_groups(const AttentionArgs& args, bool tiles_launched, cudaStream_t stream) {
  const int64_t items = args.rows * args.num_kv_heads;
  const DeviceFacts facts = device_facts();
  const int64_t target_blocks = kTargetBlocksPerMultiprocessor * int64_t{facts.multiprocessors};
  // Split the keys only where the items leave multiprocessors idle (the host does not know the key
  // counts: a block whose share is empty contributes nothing and costs little).
  // No more splits than key tiles in the longest sequence the block tables can hold: a split without
  // keys only adds to the cluster's barriers and merge (short contexts at small batches).
  const int64_t max_key_tiles =
      split_cap_enabled() ? std::max<int64_t>(1, (args.max_blocks * kKvBlockSize + kTileKeys - 1) / kTileKeys)
                          : kMaxSplits;
  const int splits =
      facts.clusters && items < target_blocks
          ? static_cast<int>(std::min<int64_t>({kMaxSplits, target_blocks / items, max_key_tiles}))
          : 1;
  // Enough clusters to fill the GPU a few times over, each looping over its share of the items.
  const int64_t clusters = std::min(
      items, std::max<int64_t>(1, kMaxBlocksPerMultiprocessor * int64_t{facts.multiprocessors} / splits));
  const int64_t blocks = clusters * splits;
  // With one block per multiprocessor at most, a third stage keeps more loads in flight.
  const bool sparse = blocks <= facts.multiprocessors;
  if (args.head_dim == 64) {
    sparse ? launch<64, 3>(args, tiles_launched, blocks, splits, stream)
           : launch<64, 2>(args, tiles_launched, blocks, splits, stream);
  } else {
    sparse ? launch<128, 3>(args, tiles_launched, blocks, splits, stream)
           : launch<128, 2>(args, tiles_launched, blocks, splits, stream);
  }
}

}  // namespace epic::cuda_kernels::attention_mma
