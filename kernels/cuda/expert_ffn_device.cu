// expert_ffn_device_scheduled: the grouped SwiGLU expert FFN with the group sizes read on the
// device (no host sync, graph capturable), in two launches: gate_up + silu*up, then down.
// BF16 x BF16 runs on tensor cores: at decode sizes the streaming kernel (expert_ffn_streaming.cu),
// beyond them (or for unaligned shapes) the shared-memory tiled kernel below, which streams each
// active expert's weights once per tile of up to 16 or 64 of its rows. Other type pairs (the fp32
// verification mode) use a plain SIMT path.
#include <cuda_bf16.h>
#include <mma.h>

#include <string>

#include "kernels/cuda/ab_switch.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/expert_address.cuh"
#include "kernels/cuda/expert_chunk_search.cuh"
#include "kernels/cuda/expert_ffn_variants.h"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using bf16 = __nv_bfloat16;
using access::from_float;
using access::silu;
using access::to_float;
using access::warp_sum;

// ---- tensor-core path (BF16 activations and weights) -------------------------------------------

// A block computes [up to kRowFragments * 16 rows of one expert's group] x [kTileCols weight rows]
// over K in kTileK chunks, through a kStages-deep cp.async pipeline. Phase 1's weight tile is
// kTileCols / 2 gate rows then the same kTileCols / 2 up rows, so silu(gate) * up is formed in the
// epilogue without another pass. Each of the 4 warps owns one 16-column fragment of the tile.
constexpr int kFragment = 16;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kTileCols = kWarps * kFragment;  // 64
constexpr int kChunkElements = 8;              // one 16-byte cp.async
constexpr int kOutStride = kTileCols + 4;      // floats, for the epilogue tile

enum class Phase { kGateUp, kDown };

template <int kRowFragments>
struct Tiling {
  static constexpr int kTileRows = kRowFragments * kFragment;
  // Measured on an H200 (kernels/cuda/bench): one fragment streams best with long K chunks (more
  // bytes of a weight row per request); more fragments need the smaller stages for occupancy.
  static constexpr int kTileK = kRowFragments == 1 ? 128 : 64;
  static constexpr int kStages = kRowFragments == 1 ? 3 : 4;
  static constexpr int kSmemStride = kTileK + 8;  // bf16 elements; the padding spreads banks
  static constexpr int kChunksPerRow = kTileK / kChunkElements;
  static constexpr size_t kStageElements = static_cast<size_t>(kTileRows + kTileCols) * kSmemStride;
  static constexpr size_t kPipelineBytes = kStages * kStageElements * sizeof(bf16);
  static constexpr size_t kEpilogueBytes = static_cast<size_t>(kTileRows) * kOutStride * sizeof(float);
  static constexpr size_t kSmemBytes = kPipelineBytes > kEpilogueBytes ? kPipelineBytes : kEpilogueBytes;
};

__device__ __forceinline__ void cp_async_16(void* shared_dst, const void* global_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(shared_dst));
  const int src_bytes = valid ? 16 : 0;  // 0: nothing is read and the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global_src), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

struct TensorCoreArgs {
  const bf16* activations;  // [rows, k_dim]: x (phase 1) or intermediate (phase 2)
  const bf16* weights;      // [num_local, weight_rows_per_expert, k_dim]
  const int32_t* offsets;
  const int32_t* local_index;  // null with an address table
  bf16* out;  // [rows, out_cols]: intermediate (phase 1) or y (phase 2)
  int64_t num_experts;
  int64_t k_dim;
  int64_t out_cols;  // I (phase 1) or H (phase 2)
  const int64_t* addresses;  // expert_ffn_addressed's table, or null (expert_address.cuh)
};

// Weight row of tile column `col` (block column tile `tile`), or -1 past the matrix.
template <Phase kPhase>
__device__ __forceinline__ int64_t weight_row(int64_t tile, int col, int64_t out_cols) {
  if constexpr (kPhase == Phase::kGateUp) {
    constexpr int kHalf = kTileCols / 2;
    const int64_t j = tile * kHalf + (col % kHalf);
    if (j >= out_cols) return -1;
    return col < kHalf ? j : out_cols + j;  // gate row j, or up row I + j
  } else {
    const int64_t row = tile * kTileCols + col;
    return row < out_cols ? row : -1;
  }
}

// Loads K chunk `k_begin` of the weight tile and of the activation rows [row_begin, row_end) into
// one pipeline stage; rows and K past the data are zero-filled. kVector: 16-byte cp.async (k_dim a
// multiple of 8, so every row start is 16-byte aligned); else element loads.
template <Phase kPhase, int kRowFragments, bool kVector>
__device__ __forceinline__ void load_stage(const TensorCoreArgs& args, const bf16* expert_weights,
                                           int64_t tile, int64_t row_begin, int64_t row_end, int64_t k_begin,
                                           bf16* stage) {
  using T = Tiling<kRowFragments>;
  constexpr int kTileRows = T::kTileRows, kTileK = T::kTileK, kSmemStride = T::kSmemStride;
  constexpr int kChunksPerRow = T::kChunksPerRow;
  bf16* activation_tile = stage;
  bf16* weight_tile = stage + kTileRows * kSmemStride;
  if constexpr (kVector) {
    for (int chunk = threadIdx.x; chunk < kTileCols * kChunksPerRow; chunk += kThreads) {
      const int col = chunk / kChunksPerRow;
      const int k_offset = (chunk % kChunksPerRow) * kChunkElements;
      const int64_t row = weight_row<kPhase>(tile, col, args.out_cols);
      const bool valid = row >= 0 && k_begin + k_offset < args.k_dim;
      const bf16* src = valid ? expert_weights + row * args.k_dim + k_begin + k_offset : expert_weights;
      cp_async_16(weight_tile + col * kSmemStride + k_offset, src, valid);
    }
    for (int chunk = threadIdx.x; chunk < kTileRows * kChunksPerRow; chunk += kThreads) {
      const int tile_row = chunk / kChunksPerRow;
      const int k_offset = (chunk % kChunksPerRow) * kChunkElements;
      const int64_t row = row_begin + tile_row;
      const bool valid = row < row_end && k_begin + k_offset < args.k_dim;
      const bf16* src = valid ? args.activations + row * args.k_dim + k_begin + k_offset : args.activations;
      cp_async_16(activation_tile + tile_row * kSmemStride + k_offset, src, valid);
    }
  } else {
    const bf16 zero = __float2bfloat16_rn(0.0f);
    for (int i = threadIdx.x; i < kTileCols * kTileK; i += kThreads) {
      const int col = i / kTileK;
      const int k = i % kTileK;
      const int64_t row = weight_row<kPhase>(tile, col, args.out_cols);
      const bool valid = row >= 0 && k_begin + k < args.k_dim;
      weight_tile[col * kSmemStride + k] = valid ? expert_weights[row * args.k_dim + k_begin + k] : zero;
    }
    for (int i = threadIdx.x; i < kTileRows * kTileK; i += kThreads) {
      const int tile_row = i / kTileK;
      const int k = i % kTileK;
      const int64_t row = row_begin + tile_row;
      const bool valid = row < row_end && k_begin + k < args.k_dim;
      activation_tile[tile_row * kSmemStride + k] =
          valid ? args.activations[row * args.k_dim + k_begin + k] : zero;
    }
  }
}

// grid (column tiles, min(num_experts, rows)): blockIdx.y picks the blockIdx.y-th expert with rows.
template <Phase kPhase, int kRowFragments, bool kVector>
__global__ void __launch_bounds__(kThreads) tensor_core_expert_kernel(const TensorCoreArgs args) {
  using namespace nvcuda;
  using T = Tiling<kRowFragments>;
  constexpr int kTileRows = T::kTileRows, kTileK = T::kTileK, kSmemStride = T::kSmemStride,
                kStages = T::kStages;
  extern __shared__ __align__(128) unsigned char shared_bytes[];
  bf16* stages = reinterpret_cast<bf16*>(shared_bytes);
  float* out_tile = reinterpret_cast<float*>(shared_bytes);  // reused after the pipeline drains

  // Blocks are laid out over the experts with rows, so an expert without rows costs no block.
  const GroupChunk group = find_group_chunk<kWholeGroup>(args.offsets, args.local_index, args.addresses, args.num_experts,
                                                         static_cast<int>(blockIdx.y));
  // A slot past the last group; or rows for an expert not hosted here, which break the contract:
  // leave them be.
  if (group.local < 0) return;
  const int32_t local = group.local;
  const int64_t group_begin = group.row_begin;
  const int64_t group_end = group.row_end;
  const int64_t tile = blockIdx.x;
  const int64_t weight_rows_per_expert = kPhase == Phase::kGateUp ? 2 * args.out_cols : args.out_cols;
  const bf16* expert_weights =
      expert_weights_of(args.weights, args.addresses, kPhase == Phase::kGateUp ? kGateUpAddress : kDownAddress,
                        local, weight_rows_per_expert * args.k_dim);
  const int warp = threadIdx.x / 32;
  const int num_k_tiles = static_cast<int>((args.k_dim + kTileK - 1) / kTileK);

  for (int64_t row_begin = group_begin; row_begin < group_end; row_begin += kTileRows) {
    const int64_t row_end = min(group_end, row_begin + kTileRows);
    const int active_fragments = static_cast<int>((row_end - row_begin + kFragment - 1) / kFragment);

    wmma::fragment<wmma::accumulator, kFragment, kFragment, kFragment, float> accumulators[kRowFragments];
#pragma unroll
    for (int f = 0; f < kRowFragments; ++f) wmma::fill_fragment(accumulators[f], 0.0f);

      // Every iteration commits one group (empty past the end), so wait_group<kStages - 2> always
      // means "the stage about to be used has landed".
#pragma unroll
    for (int s = 0; s < kStages - 1; ++s) {
      if (s < num_k_tiles) {
        load_stage<kPhase, kRowFragments, kVector>(args, expert_weights, tile, row_begin, row_end,
                                                   static_cast<int64_t>(s) * kTileK,
                                                   stages + s * T::kStageElements);
      }
      cp_async_commit();
    }
    for (int k_tile = 0; k_tile < num_k_tiles; ++k_tile) {
      cp_async_wait<kStages - 2>();
      __syncthreads();  // the stage is visible to all warps, and the one refilled below is consumed
      const int prefetch = k_tile + kStages - 1;
      if (prefetch < num_k_tiles) {
        load_stage<kPhase, kRowFragments, kVector>(args, expert_weights, tile, row_begin, row_end,
                                                   static_cast<int64_t>(prefetch) * kTileK,
                                                   stages + (prefetch % kStages) * T::kStageElements);
      }
      cp_async_commit();

      const bf16* stage = stages + (k_tile % kStages) * T::kStageElements;
      const bf16* activation_tile = stage;
      const bf16* weight_tile = stage + kTileRows * kSmemStride + warp * kFragment * kSmemStride;
#pragma unroll
      for (int k = 0; k < kTileK; k += kFragment) {
        wmma::fragment<wmma::matrix_b, kFragment, kFragment, kFragment, bf16, wmma::col_major>
            weight_fragment;
        wmma::load_matrix_sync(weight_fragment, weight_tile + k, kSmemStride);
#pragma unroll
        for (int f = 0; f < kRowFragments; ++f) {
          if (f < active_fragments) {
            wmma::fragment<wmma::matrix_a, kFragment, kFragment, kFragment, bf16, wmma::row_major>
                activation_fragment;
            wmma::load_matrix_sync(activation_fragment, activation_tile + f * kFragment * kSmemStride + k,
                                   kSmemStride);
            wmma::mma_sync(accumulators[f], activation_fragment, weight_fragment, accumulators[f]);
          }
        }
      }
    }
    cp_async_wait<0>();
    __syncthreads();  // all warps are done with the stages before the epilogue tile overwrites them

#pragma unroll
    for (int f = 0; f < kRowFragments; ++f) {
      if (f < active_fragments) {
        wmma::store_matrix_sync(out_tile + f * kFragment * kOutStride + warp * kFragment, accumulators[f],
                                kOutStride, wmma::mem_row_major);
      }
    }
    __syncthreads();

    const int tile_rows = static_cast<int>(row_end - row_begin);
    if constexpr (kPhase == Phase::kGateUp) {
      constexpr int kHalf = kTileCols / 2;
      for (int i = threadIdx.x; i < tile_rows * kHalf; i += kThreads) {
        const int tile_row = i / kHalf;
        const int col = i % kHalf;
        const int64_t j = tile * kHalf + col;
        if (j >= args.out_cols) continue;
        const float gate = out_tile[tile_row * kOutStride + col];
        const float up = out_tile[tile_row * kOutStride + kHalf + col];
        args.out[(row_begin + tile_row) * args.out_cols + j] = __float2bfloat16_rn(silu(gate) * up);
      }
    } else {
      for (int i = threadIdx.x; i < tile_rows * kTileCols; i += kThreads) {
        const int tile_row = i / kTileCols;
        const int col = i % kTileCols;
        const int64_t out_col = tile * kTileCols + col;
        if (out_col >= args.out_cols) continue;
        args.out[(row_begin + tile_row) * args.out_cols + out_col] =
            __float2bfloat16_rn(out_tile[tile_row * kOutStride + col]);
      }
    }
    __syncthreads();  // the epilogue tile is read before the next row tile's loads overwrite it
  }
}

template <Phase kPhase, int kRowFragments, bool kVector>
void launch_tensor_core_phase(const TensorCoreArgs& args, int64_t column_tiles, int64_t expert_slots,
                              cudaStream_t stream) {
  constexpr size_t kSmemBytes = Tiling<kRowFragments>::kSmemBytes;
  auto* kernel = tensor_core_expert_kernel<kPhase, kRowFragments, kVector>;
  // Above 48 KiB a kernel must opt in; the attribute is per kernel and cheap to set again.
  EPIC_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(kSmemBytes)));
  const dim3 grid(static_cast<unsigned>(column_tiles), static_cast<unsigned>(expert_slots));
  kernel<<<grid, kThreads, kSmemBytes, stream>>>(args);
  EPIC_CUDA_CHECK_LAUNCH();
}

template <int kRowFragments>
void launch_tensor_core(const ExpertFfnArgs& args, cudaStream_t stream) {
  // Experts with rows can be no more than the rows themselves.
  const int64_t expert_slots = args.num_experts < args.rows ? args.num_experts : args.rows;
  EPIC_CHECK(expert_slots <= 65535, ErrorCode::kUnsupported,
             "expert_ffn: " + std::to_string(args.num_experts) + " experts exceed the launch grid (65535)");
  const auto* x = static_cast<const bf16*>(args.x);
  auto* intermediate = static_cast<bf16*>(args.intermediate);
  TensorCoreArgs gate_up{x,
                         static_cast<const bf16*>(args.gate_up),
                         args.expert_offsets,
                         args.local_index,
                         intermediate,
                         args.num_experts,
                         args.hidden,
                         args.inter,
                         args.addresses};
  TensorCoreArgs down{intermediate,
                      static_cast<const bf16*>(args.down),
                      args.expert_offsets,
                      args.local_index,
                      static_cast<bf16*>(args.y),
                      args.num_experts,
                      args.inter,
                      args.hidden,
                      args.addresses};
  const int64_t gate_up_tiles = (args.inter + kTileCols / 2 - 1) / (kTileCols / 2);
  const int64_t down_tiles = (args.hidden + kTileCols - 1) / kTileCols;
  if (args.hidden % kChunkElements == 0) {
    launch_tensor_core_phase<Phase::kGateUp, kRowFragments, true>(gate_up, gate_up_tiles, expert_slots,
                                                                  stream);
  } else {
    launch_tensor_core_phase<Phase::kGateUp, kRowFragments, false>(gate_up, gate_up_tiles, expert_slots,
                                                                   stream);
  }
  if (args.inter % kChunkElements == 0) {
    launch_tensor_core_phase<Phase::kDown, kRowFragments, true>(down, down_tiles, expert_slots, stream);
  } else {
    launch_tensor_core_phase<Phase::kDown, kRowFragments, false>(down, down_tiles, expert_slots, stream);
  }
}

// ---- SIMT path (any other type pair: the fp32 verification mode) --------------------------------

// A warp per output column and row, lanes striding over K, reduced by a fixed shuffle tree: the
// result of a row never depends on the other rows of its group. Correctness, not speed.
constexpr int kSimtWarps = 8;

template <typename Act, typename Weight>
__global__ void __launch_bounds__(kSimtWarps * 32)
    simt_gate_up_kernel(const Act* __restrict__ x, const int32_t* __restrict__ offsets,
                        const int32_t* __restrict__ local_index, const int64_t* __restrict__ addresses,
                        const Weight* __restrict__ gate_up, Act* __restrict__ intermediate, int64_t hidden,
                        int64_t inter) {
  const int expert = blockIdx.y;
  const int64_t begin = offsets[expert];
  const int64_t end = offsets[expert + 1];
  const int32_t local = expert_slot(local_index, addresses, expert);
  const int64_t j = static_cast<int64_t>(blockIdx.x) * kSimtWarps + threadIdx.x / 32;
  if (begin >= end || local < 0 || j >= inter) return;
  const int lane = threadIdx.x % 32;
  const Weight* gate_row =
      expert_weights_of(gate_up, addresses, kGateUpAddress, local, 2 * inter * hidden) + j * hidden;
  const Weight* up_row = gate_row + inter * hidden;
  for (int64_t row = begin; row < end; ++row) {
    const Act* x_row = x + row * hidden;
    float gate = 0.0f;
    float up = 0.0f;
    for (int64_t k = lane; k < hidden; k += 32) {
      const float value = to_float(x_row[k]);
      gate = fmaf(value, to_float(gate_row[k]), gate);
      up = fmaf(value, to_float(up_row[k]), up);
    }
    gate = warp_sum(gate);
    up = warp_sum(up);
    if (lane == 0) intermediate[row * inter + j] = from_float<Act>(silu(gate) * up);
  }
}

template <typename Act, typename Weight>
__global__ void __launch_bounds__(kSimtWarps * 32)
    simt_down_kernel(const Act* __restrict__ intermediate, const int32_t* __restrict__ offsets,
                     const int32_t* __restrict__ local_index, const int64_t* __restrict__ addresses,
                     const Weight* __restrict__ down, Act* __restrict__ y, int64_t hidden, int64_t inter) {
  const int expert = blockIdx.y;
  const int64_t begin = offsets[expert];
  const int64_t end = offsets[expert + 1];
  const int32_t local = expert_slot(local_index, addresses, expert);
  const int64_t h = static_cast<int64_t>(blockIdx.x) * kSimtWarps + threadIdx.x / 32;
  if (begin >= end || local < 0 || h >= hidden) return;
  const int lane = threadIdx.x % 32;
  const Weight* down_row = expert_weights_of(down, addresses, kDownAddress, local, hidden * inter) + h * inter;
  for (int64_t row = begin; row < end; ++row) {
    const Act* in_row = intermediate + row * inter;
    float sum = 0.0f;
    for (int64_t k = lane; k < inter; k += 32) sum = fmaf(to_float(in_row[k]), to_float(down_row[k]), sum);
    sum = warp_sum(sum);
    if (lane == 0) y[row * hidden + h] = from_float<Act>(sum);
  }
}

template <typename Act, typename Weight>
void launch_simt(const ExpertFfnArgs& args, cudaStream_t stream) {
  EPIC_CHECK(args.num_experts <= 65535, ErrorCode::kUnsupported,
             "expert_ffn: " + std::to_string(args.num_experts) + " experts exceed the launch grid (65535)");
  const auto experts = static_cast<unsigned>(args.num_experts);
  const dim3 gate_up_grid(static_cast<unsigned>((args.inter + kSimtWarps - 1) / kSimtWarps), experts);
  simt_gate_up_kernel<Act, Weight><<<gate_up_grid, kSimtWarps * 32, 0, stream>>>(
      static_cast<const Act*>(args.x), args.expert_offsets, args.local_index, args.addresses,
      static_cast<const Weight*>(args.gate_up), static_cast<Act*>(args.intermediate), args.hidden,
      args.inter);
  EPIC_CUDA_CHECK_LAUNCH();
  const dim3 down_grid(static_cast<unsigned>((args.hidden + kSimtWarps - 1) / kSimtWarps), experts);
  simt_down_kernel<Act, Weight><<<down_grid, kSimtWarps * 32, 0, stream>>>(
      static_cast<const Act*>(args.intermediate), args.expert_offsets, args.local_index, args.addresses,
      static_cast<const Weight*>(args.down), static_cast<Act*>(args.y), args.hidden, args.inter);
  EPIC_CUDA_CHECK_LAUNCH();
}

bool is_float_type(ScalarType type) { return type == ScalarType::kF32 || type == ScalarType::kBF16; }

// Every selectable kernel: its name (the micro-benchmark's column) and, for the streaming ones, the
// rows a chunk and the column warps a block of gate_up and of down (0 for the others).
struct KernelInfo {
  ExpertFfnKernel kernel;
  const char* name;
  int rows_per_chunk;
  int column_warps;
  int down_column_warps;
};
constexpr KernelInfo kKernelInfo[] = {
    {ExpertFfnKernel::kAuto, "auto", 0, 0, 0},
    {ExpertFfnKernel::kTiled16, "tiled16", 0, 0, 0},
    {ExpertFfnKernel::kTiled64, "tiled64", 0, 0, 0},
    {ExpertFfnKernel::kStream8, "stream8", 8, 2, 2},
    {ExpertFfnKernel::kStream16, "stream16", 16, 2, 2},
    {ExpertFfnKernel::kStream32, "stream32", 32, 2, 2},
    {ExpertFfnKernel::kStream8Wide4, "stream8w4", 8, 4, 4},
    {ExpertFfnKernel::kStream16Wide4, "stream16w4", 16, 4, 4},
    {ExpertFfnKernel::kStream32Wide4, "stream32w4", 32, 4, 4},
    {ExpertFfnKernel::kStream32Wide8, "stream32w8", 32, 8, 8},
    {ExpertFfnKernel::kStream16Wide4Down8, "stream16w4d8", 16, 4, 8},
    {ExpertFfnKernel::kStream32Wide4Down8, "stream32w4d8", 32, 4, 8},
};

const KernelInfo& kernel_info(ExpertFfnKernel kernel) {
  for (const KernelInfo& info : kKernelInfo)
    if (info.kernel == kernel) return info;
  throw Error(ErrorCode::kInternal, "expert_ffn: a kernel missing from kKernelInfo");
}

// The BF16 x BF16 kernel for this call's size. Group sizes live on the device, so the rule uses
// the average rows per expert; with top-k routing the largest group is about average + 3 sqrt
// (average), so the chunk is picked to hold nearly every group in one pass (a longer group is
// several chunks, i.e. blocks, in parallel; their repeated weight reads mostly hit L2).
// Measured on an H200 (epic_expert_ffn_bench, Qwen3-30B-A3B: 128 experts, top-8; BENCHMARKS.md):
// up to 16 tokens 8-row chunks over 32 weight rows a block; from 2 rows an expert, blocks of 64
// weight rows (4 column warps) for gate_up, whose longer K stretches and shared activation loads gave
// 12-15% at 128-256 tokens (0.43 -> 0.367 ms at 256), and 128 (8) for down, whose K is short (another
// 1-1.5%: 0.361 ms); 16-row chunks up to 6 rows an expert, 32-row up to 32. Beyond, the x rows
// each streaming block re-reads approach its weight bytes, and the tiled kernel's 64-row tiles
// (weights reused from shared memory) take over.
// EPIC_CUDA_WIDE_STREAMING=0 keeps the 2-column-warp blocks at every size (the rule before them), for
// A/B timing inside whole decode steps.
bool wide_streaming_enabled() {
  static const bool enabled = ab_switch_on("EPIC_CUDA_WIDE_STREAMING");
  return enabled;
}

ExpertFfnKernel pick_bf16_kernel(const ExpertFfnArgs& args) {
  const int64_t average_group = (args.rows + args.num_experts - 1) / args.num_experts;
  if (streaming_expert_ffn_supported(args) && !wide_streaming_enabled()) {
    if (average_group <= 2) return ExpertFfnKernel::kStream8;
    if (average_group <= 6) return ExpertFfnKernel::kStream16;
    if (average_group <= 16) return ExpertFfnKernel::kStream32;
    return ExpertFfnKernel::kTiled64;
  }
  if (streaming_expert_ffn_supported(args)) {
    if (average_group <= 1) return ExpertFfnKernel::kStream8;
    if (average_group <= 6) return ExpertFfnKernel::kStream16Wide4Down8;
    if (average_group <= 32) return ExpertFfnKernel::kStream32Wide4Down8;
    return ExpertFfnKernel::kTiled64;
  }
  return average_group <= kFragment ? ExpertFfnKernel::kTiled16 : ExpertFfnKernel::kTiled64;
}

}  // namespace

const char* expert_ffn_kernel_name(ExpertFfnKernel kernel) { return kernel_info(kernel).name; }

void expert_ffn_device_scheduled_with(const ExpertFfnArgs& args, ExpertFfnKernel kernel, bool overlap_phases,
                                      cudaStream_t stream) {
  EPIC_CHECK(is_float_type(args.act_type) && is_float_type(args.weight_type), ErrorCode::kInternal,
             std::string("expert_ffn: activations and weights must be f32 or bf16, got ") +
                 scalar_name(args.act_type) + " and " + scalar_name(args.weight_type));
  if (args.rows == 0 || args.num_experts == 0 || args.hidden == 0) return;
  if (args.inter == 0) {
    // No intermediate columns: y is a sum over nothing. Zero it so no row keeps stale data.
    EPIC_CUDA_CHECK(cudaMemsetAsync(
        args.y, 0, static_cast<size_t>(args.rows * args.hidden) * scalar_size(args.act_type), stream));
    return;
  }
  const bool act_bf16 = args.act_type == ScalarType::kBF16;
  const bool weight_bf16 = args.weight_type == ScalarType::kBF16;
  if (act_bf16 && weight_bf16) {
    if (kernel == ExpertFfnKernel::kAuto) kernel = pick_bf16_kernel(args);
    const KernelInfo& shape = kernel_info(kernel);
    if (shape.rows_per_chunk > 0) {
      if (streaming_expert_ffn_supported(args)) {
        launch_streaming_expert_ffn(args, shape.rows_per_chunk, shape.column_warps, shape.down_column_warps,
                                    overlap_phases, stream);
        return;
      }
      kernel = ExpertFfnKernel::kTiled16;
    }
    switch (kernel) {
      case ExpertFfnKernel::kTiled64:
        launch_tensor_core<4>(args, stream);
        break;
      default:
        launch_tensor_core<1>(args, stream);
        break;
    }
  } else if (act_bf16) {
    launch_simt<bf16, float>(args, stream);
  } else if (weight_bf16) {
    launch_simt<float, bf16>(args, stream);
  } else {
    launch_simt<float, float>(args, stream);
  }
}

void expert_ffn_device_scheduled(const ExpertFfnArgs& args, cudaStream_t stream) {
  expert_ffn_device_scheduled_with(args, ExpertFfnKernel::kAuto, /*overlap_phases=*/true, stream);
}

}  // namespace epic::cuda_kernels
