// The streaming grouped expert FFN for decode sizes (up to ~16 rows per expert on average): each
// expert's weights are read from HBM once per chunk of its rows, straight into mma.sync operand
// registers, so the kernel runs at the card's read bandwidth rather than at a pipeline's pace.
//
// Why this shape (Qwen3-30B-A3B, 1 token: 8 experts, 75 MB of weights, ~19 us at 4 TB/s):
// - Bytes in flight. At ~1-1.5 us loaded HBM latency, 4 TB/s needs ~4-6 MB in flight, i.e. 32-48
//   KB per SM. Each lane issues kUnroll x 2 16-byte loads before it waits (128 B, 4 KB a warp);
//   with 8 warps a block and 2-3 blocks an SM that is 64-96 KB an SM, and no warp ever waits on
//   another (no cp.async stage barriers): compute is a handful of mma per 4 KB.
// - Blocks. At one token a block covers only 32 weight rows (two column warps of 16) and splits K
//   over 4 warps, so one token's gate_up is 8 experts x 48 column tiles = 384 blocks and its down
//   8 x 64 = 512: about one full wave of 132 SMs x 3 blocks, every SM streaming from the start.
//   With more rows there are blocks enough, and 4 or 8 column warps (64 or 128 weight rows, K over
//   2 or 1 warps) make each block's stretch of K longer and share its activation loads among more
//   weight rows: 12-15% faster at 8-16 rows an expert (BENCHMARKS.md). The K-partials are summed
//   through shared memory in a fixed order (deterministic, and within one row only).
// - Rows. A block takes one chunk of 8/16/32 rows of one expert (grid.y enumerates the chunks on
//   the device), so a large group becomes several blocks in parallel instead of one long serial
//   block; its repeated weight reads then mostly hit L2.
// - mma operands swapped: weights are the 16-row A operand, the (few) rows are the 8-wide B
//   operand, so one row wastes 7/8 of the N width rather than 15/16 of M. K is permuted inside
//   each 32-wide chunk (the sum does not care) so every lane loads 8 consecutive K values of a
//   weight row and of an activation row with one 16-byte load each; see load_fragments.
// - Phases. gate_up's warp takes gate row j and up row j as its two 8-row halves, so silu(gate) *
//   up is formed in registers. The down launch may start early (programmatic dependent launch):
//   its blocks find their chunk and put their first weight loads in flight, then wait for gate_up's
//   intermediate on the device, hiding the launch gap and the first HBM latency.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/expert_chunk_search.cuh"
#include "kernels/cuda/expert_ffn_variants.h"
#include "kernels/cuda/scalar_access.cuh"
#include "kernels/cuda/streaming_mma.cuh"

namespace epic::cuda_kernels {
namespace {

using bf16 = __nv_bfloat16;
using namespace streaming_mma;

constexpr int kWarps = 8;              // per block: kColumnWarps x (kWarps / kColumnWarps) along K
constexpr int kThreads = kWarps * 32;  // 256
constexpr int kUnroll = 4;             // K chunks loaded before the first is used

enum class Phase { kGateUp, kDown };

struct StreamArgs {
  const bf16* activations;  // [rows, k_dim]: x (gate_up) or intermediate (down)
  const bf16* weights;      // [num_local, weight rows per expert, k_dim]
  const int32_t* offsets;
  const int32_t* local_index;  // null with an address table
  bf16* out;  // [rows, out_cols]: intermediate (gate_up) or y (down)
  int64_t num_experts;
  int64_t k_dim;
  int64_t out_cols;  // I (gate_up) or H (down)
  const int64_t* addresses;  // expert_ffn_addressed's table, or null (expert_address.cuh)
};

// grid (column tiles of 32 weight rows, chunk slots). kMinBlocks caps the registers so that many
// warps (and so many bytes) are in flight on every SM.
// kColumnWarps 16-row weight groups per block, each split along K over kWarps / kColumnWarps warps:
// more column warps give each warp a longer stretch of K (fewer, longer blocks) and share each
// activation load (through L1) among more weight rows.
template <Phase kPhase, int kTokenTiles, int kColumnWarps>
__global__ void __launch_bounds__(kThreads, kTokenTiles == 1 ? 3 : 2)
    streaming_expert_kernel(const StreamArgs args) {
  constexpr int kChunkRows = kTokenTiles * kMmaTokens;
  constexpr int kSplitK = kWarps / kColumnWarps;
  static_assert(kSplitK * kColumnWarps == kWarps, "the warps tile the block");
  __shared__ float partials[kColumnWarps][kSplitK > 1 ? kSplitK - 1 : 1][kTokenTiles][4][32];

  // gate_up is itself a dependent launch (dependent_launch.cuh): it waits for the kernel before it,
  // then lets down's blocks take the SM slots it frees (they wait for its results on the device
  // before reading them). Waiting first keeps the chain ordered: once down runs, everything before
  // gate_up has completed, so the offsets and local indices (written before gate_up) may be read
  // before down's own wait.
  if constexpr (kPhase == Phase::kGateUp) {
    dependent::wait_for_previous();
    dependent::release_next();
  }

  const GroupChunk chunk = find_group_chunk<kChunkRows>(args.offsets, args.local_index, args.addresses, args.num_experts,
                                                        static_cast<int>(blockIdx.y));
  if (chunk.local < 0) {
    if constexpr (kPhase == Phase::kDown) dependent::wait_for_previous();
    return;  // a slot past the last chunk (or rows of a non-hosted expert, which break the contract)
  }

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int column_warp = warp % kColumnWarps;
  const int split = warp / kColumnWarps;
  const int group = lane / 4;  // the mma row group: weight rows group and group + 8, token group
  const int quad = lane % 4;   // the lane within the group: K 8 * quad .. + 7 of each chunk

  // This lane's two weight rows (lo: mma row `group`, hi: `group` + 8) and output columns.
  int64_t row_lo, row_hi;
  bool lo_valid, hi_valid;
  const int64_t weight_rows_per_expert = kPhase == Phase::kGateUp ? 2 * args.out_cols : args.out_cols;
  if constexpr (kPhase == Phase::kGateUp) {
    // Gate row j and up row I + j: the accumulator's halves are gate and up of the same j.
    const int64_t j =
        (static_cast<int64_t>(blockIdx.x) * kColumnWarps + column_warp) * (kMmaRows / 2) + group;
    lo_valid = hi_valid = j < args.out_cols;
    row_lo = j;
    row_hi = args.out_cols + j;
  } else {
    row_lo = (static_cast<int64_t>(blockIdx.x) * kColumnWarps + column_warp) * kMmaRows + group;
    row_hi = row_lo + kMmaRows / 2;
    lo_valid = row_lo < args.out_cols;
    hi_valid = row_hi < args.out_cols;
  }
  const bf16* expert_weights =
      expert_weights_of(args.weights, args.addresses, kPhase == Phase::kGateUp ? kGateUpAddress : kDownAddress,
                        chunk.local, weight_rows_per_expert * args.k_dim);
  const bf16* weights_lo = expert_weights + (lo_valid ? row_lo : 0) * args.k_dim + quad * kVectorElements;
  const bf16* weights_hi = expert_weights + (hi_valid ? row_hi : 0) * args.k_dim + quad * kVectorElements;

  // This warp's contiguous share of the K chunks (the last chunk may be partial: k_dim % 8 == 0,
  // so a lane's 8 values are all inside or all outside).
  const int64_t k_chunks = (args.k_dim + kChunkK - 1) / kChunkK;
  const int64_t chunks_per_split = (k_chunks + kSplitK - 1) / kSplitK;
  const int64_t chunk_begin = split * chunks_per_split;
  const int64_t chunk_end = min(k_chunks, chunk_begin + chunks_per_split);

  const int chunk_rows = chunk.row_end - chunk.row_begin;
  const int active_tiles = (chunk_rows + kMmaTokens - 1) / kMmaTokens;
  const uint4 zero = make_uint4(0u, 0u, 0u, 0u);
  float acc[kTokenTiles][4];
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.0f;

  bool waited = kPhase == Phase::kGateUp;
  for (int64_t c0 = chunk_begin; c0 < chunk_end; c0 += kUnroll) {
    uint4 lo[kUnroll], hi[kUnroll];
    bool k_valid[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = (c0 + u) * kChunkK + quad * kVectorElements;
      k_valid[u] = c0 + u < chunk_end && k < args.k_dim;
      const int64_t offset = (c0 + u) * kChunkK;
      lo[u] = k_valid[u] && lo_valid ? load_weights(weights_lo + offset) : zero;
      hi[u] = k_valid[u] && hi_valid ? load_weights(weights_hi + offset) : zero;
    }
    if (!waited) {
      // down: the first weights are in flight; now wait for gate_up's intermediate.
      dependent::wait_for_previous();
      waited = true;
    }
#pragma unroll
    for (int t = 0; t < kTokenTiles; ++t) {
      if (t < active_tiles) {  // uniform over the block
        const int tile_row = t * kMmaTokens + group;
        const bool row_valid = tile_row < chunk_rows;
        const bf16* activation_row =
            args.activations +
            static_cast<int64_t>(chunk.row_begin + (row_valid ? tile_row : 0)) * args.k_dim +
            quad * kVectorElements;
        uint4 act[kUnroll];
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) {
          act[u] = k_valid[u] && row_valid
                       ? load_activations<kPhase == Phase::kDown>(activation_row + (c0 + u) * kChunkK)
                       : zero;
        }
#pragma unroll
        for (int u = 0; u < kUnroll; ++u) mma_chunk(acc[t], lo[u], hi[u], act[u]);
      }
    }
  }
  if (!waited) dependent::wait_for_previous();  // a warp without K chunks (tiny K) still orders its writes

  // Split-K partials summed in a fixed order: ((split 0 + split 1) + split 2) + split 3.
  if (kSplitK > 1 && split > 0) {
#pragma unroll
    for (int t = 0; t < kTokenTiles; ++t) {
#pragma unroll
      for (int r = 0; r < 4; ++r) partials[column_warp][split - 1][t][r][lane] = acc[t][r];
    }
  }
  if constexpr (kSplitK > 1) __syncthreads();
  if (split != 0) return;
#pragma unroll
  for (int s = 0; s < kSplitK - 1; ++s) {
#pragma unroll
    for (int t = 0; t < kTokenTiles; ++t) {
#pragma unroll
      for (int r = 0; r < 4; ++r) acc[t][r] += partials[column_warp][s][t][r][lane];
    }
  }

  // Accumulator element r of tile t: weight row group (r < 2) or group + 8, token 2 * quad + r % 2.
#pragma unroll
  for (int t = 0; t < kTokenTiles; ++t) {
    if (t >= active_tiles) continue;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int tile_row = t * kMmaTokens + 2 * quad + half;
      if (tile_row >= chunk_rows) continue;
      bf16* out_row = args.out + static_cast<int64_t>(chunk.row_begin + tile_row) * args.out_cols;
      if constexpr (kPhase == Phase::kGateUp) {
        if (lo_valid) out_row[row_lo] = __float2bfloat16_rn(access::silu(acc[t][half]) * acc[t][2 + half]);
      } else {
        if (lo_valid) out_row[row_lo] = __float2bfloat16_rn(acc[t][half]);
        if (hi_valid) out_row[row_hi] = __float2bfloat16_rn(acc[t][2 + half]);
      }
    }
  }
}

// gate_up with kColumnWarps column warps a block, down with kDownColumnWarps (down's K, the
// intermediate size, is short: more column warps give each warp a longer stretch of it).
template <int kTokenTiles, int kColumnWarps, int kDownColumnWarps>
void launch_streaming(const ExpertFfnArgs& args, bool overlap_phases, cudaStream_t stream) {
  constexpr int kChunkRows = kTokenTiles * kMmaTokens;
  constexpr int kBlockWeightRows = kColumnWarps * kMmaRows;
  constexpr int kDownBlockWeightRows = kDownColumnWarps * kMmaRows;
  // Every non-empty group of n rows has ceil(n / c) <= n / c + 1 chunks, so the chunks number at
  // most rows / c plus the experts with rows (<= min(experts, rows)). Slots past them exit at once.
  const int64_t slots =
      (args.num_experts < args.rows ? args.num_experts : args.rows) + args.rows / kChunkRows;
  EPIC_CHECK(slots <= 65535, ErrorCode::kUnsupported,
             "expert_ffn: " + std::to_string(slots) + " row chunks exceed the launch grid (65535)");
  const auto* x = static_cast<const bf16*>(args.x);
  auto* intermediate = static_cast<bf16*>(args.intermediate);
  const StreamArgs gate_up{x,
                           static_cast<const bf16*>(args.gate_up),
                           args.expert_offsets,
                           args.local_index,
                           intermediate,
                           args.num_experts,
                           args.hidden,
                           args.inter,
                           args.addresses};
  const StreamArgs down{intermediate,
                        static_cast<const bf16*>(args.down),
                        args.expert_offsets,
                        args.local_index,
                        static_cast<bf16*>(args.y),
                        args.num_experts,
                        args.inter,
                        args.hidden,
                        args.addresses};
  const dim3 gate_up_grid(
      static_cast<unsigned>((args.inter + kBlockWeightRows / 2 - 1) / (kBlockWeightRows / 2)),
      static_cast<unsigned>(slots));
  const dim3 down_grid(static_cast<unsigned>((args.hidden + kDownBlockWeightRows - 1) / kDownBlockWeightRows),
                       static_cast<unsigned>(slots));

  dependent::launch(streaming_expert_kernel<Phase::kGateUp, kTokenTiles, kColumnWarps>, gate_up_grid,
                    dim3(kThreads), 0, stream, gate_up);
  EPIC_CUDA_CHECK_LAUNCH();
  if (overlap_phases) {
    dependent::launch(streaming_expert_kernel<Phase::kDown, kTokenTiles, kDownColumnWarps>, down_grid,
                      dim3(kThreads), 0, stream, down);
  } else {
    streaming_expert_kernel<Phase::kDown, kTokenTiles, kDownColumnWarps>
        <<<down_grid, kThreads, 0, stream>>>(down);
  }
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace

bool streaming_expert_ffn_supported(const ExpertFfnArgs& args) {
  return args.act_type == ScalarType::kBF16 && args.weight_type == ScalarType::kBF16 &&
         args.hidden % kVectorElements == 0 && args.inter % kVectorElements == 0 &&
         access::aligned16(args.x) && access::aligned16(args.gate_up) && access::aligned16(args.down) &&
         access::aligned16(args.intermediate);
}

void launch_streaming_expert_ffn(const ExpertFfnArgs& args, int rows_per_chunk, int column_warps,
                                 int down_column_warps, bool overlap_phases, cudaStream_t stream) {
  EPIC_CHECK(streaming_expert_ffn_supported(args), ErrorCode::kInternal,
             "expert_ffn: the streaming kernel needs bf16, H and I multiples of 8 and 16-byte aligned data");
  const auto launch = [&](auto token_tiles) {
    constexpr int kTokenTiles = decltype(token_tiles)::value;
    const int warps = column_warps * 16 + down_column_warps;
    if (warps == 2 * 16 + 2) {
      launch_streaming<kTokenTiles, 2, 2>(args, overlap_phases, stream);
    } else if (warps == 4 * 16 + 4) {
      launch_streaming<kTokenTiles, 4, 4>(args, overlap_phases, stream);
    } else if (warps == 4 * 16 + 8) {
      launch_streaming<kTokenTiles, 4, 8>(args, overlap_phases, stream);
    } else if (warps == 8 * 16 + 8) {
      launch_streaming<kTokenTiles, 8, 8>(args, overlap_phases, stream);
    } else {
      throw Error(ErrorCode::kInternal, "expert_ffn: no streaming kernel with " +
                                            std::to_string(column_warps) + " and " +
                                            std::to_string(down_column_warps) + " column warps");
    }
  };
  switch (rows_per_chunk) {
    case 8:
      launch(std::integral_constant<int, 1>{});
      break;
    case 16:
      launch(std::integral_constant<int, 2>{});
      break;
    case 32:
      launch(std::integral_constant<int, 4>{});
      break;
    default:
      throw Error(ErrorCode::kInternal, "expert_ffn: no streaming kernel for " +
                                            std::to_string(rows_per_chunk) + " rows per chunk");
  }
}

}  // namespace epic::cuda_kernels
