// expert_ffn_cublas: the grouped SwiGLU expert FFN for large row counts (prefill), with the group
// sizes known on the host: cuBLAS GEMMs (bf16 in and out, fp32 compute) over the experts with rows,
// one grouped call per GEMM pass where it can (else one call per expert), and one silu*up kernel of
// our own over all rows between the two GEMM passes.
#include <cuda_bf16.h>

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/cuda/cublas_gemm.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/gemm_lanes.h"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using bf16 = __nv_bfloat16;

constexpr int kSiluThreads = 256;

// out[r, c] = silu(gate[r, c]) * up[r, c] for c < cols, each operand with its own row stride; out
// may be gate itself (element by element, so in place is safe).
__global__ void strided_silu_mul_kernel(const bf16* gate, int64_t gate_stride, const bf16* __restrict__ up,
                                        int64_t up_stride, bf16* out, int64_t out_stride, int64_t rows,
                                        int64_t cols) {
  const int64_t total = rows * cols;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / cols;
    const int64_t col = i % cols;
    const float g = __bfloat162float(gate[row * gate_stride + col]);
    const float u = __bfloat162float(up[row * up_stride + col]);
    out[row * out_stride + col] = __float2bfloat16_rn(access::silu(g) * u);
  }
}

void launch_silu_mul(const bf16* gate, int64_t gate_stride, const bf16* up, int64_t up_stride, bf16* out,
                     int64_t out_stride, int64_t rows, int64_t cols, cudaStream_t stream) {
  const int64_t total = rows * cols;
  if (total == 0) return;
  int64_t blocks = (total + kSiluThreads - 1) / kSiluThreads;
  if (blocks > 65536) blocks = 65536;  // grid-stride beyond this
  strided_silu_mul_kernel<<<static_cast<unsigned>(blocks), kSiluThreads, 0, stream>>>(
      gate, gate_stride, up, up_stride, out, out_stride, rows, cols);
  EPIC_CUDA_CHECK_LAUNCH();
}

// gemm_rows_nt on bf16 operands: out[rows, n] (row stride ldc) = act[rows, k] * weight[n, k]^T.
void gemm_nt(cublasHandle_t cublas, const bf16* act, int64_t lda, const bf16* weight, int64_t n, int64_t k,
             bf16* out, int64_t ldc, int64_t rows) {
  gemm_rows_nt(cublas, act, CUDA_R_16BF, lda, weight, CUDA_R_16BF, n, k, out, CUDA_R_16BF, ldc, rows);
}

// One GEMM of a grouped pass, in gemm_nt's terms: row-major out[rows, n] (row stride out_stride) =
// act[rows, k] (row stride act_stride) * weight[n, k]^T.
struct NtGemm {
  const bf16* weight;
  const bf16* act;
  bf16* out;
  int64_t n, k, rows, act_stride, out_stride;
};

// One cublasGemmGroupedBatchedEx for a pass, a group per GEMM (the experts' row counts differ).
// device holds the pass's weight, act and out pointers at [0, count), [count, 2 count) and
// [2 count, 3 count). alpha and beta are host arrays: the API refuses device pointer mode.
cublasStatus_t grouped_gemm_nt(cublasHandle_t cublas, const std::vector<NtGemm>& pass, void* const* device) {
#if CUBLAS_VERSION >= 120500
  const int count = static_cast<int>(pass.size());
  const std::vector<cublasOperation_t> weight_op(count, CUBLAS_OP_T);
  const std::vector<cublasOperation_t> act_op(count, CUBLAS_OP_N);
  const std::vector<int> group_size(count, 1);
  const std::vector<float> alpha(count, 1.0f);
  const std::vector<float> beta(count, 0.0f);
  std::vector<int> m(count), n(count), k(count), lda(count), ldb(count), ldc(count);
  for (int i = 0; i < count; ++i) {
    m[i] = static_cast<int>(pass[i].n);
    n[i] = static_cast<int>(pass[i].rows);
    k[i] = static_cast<int>(pass[i].k);
    lda[i] = static_cast<int>(pass[i].k);
    ldb[i] = static_cast<int>(pass[i].act_stride);
    ldc[i] = static_cast<int>(pass[i].out_stride);
  }
  return cublasGemmGroupedBatchedEx(cublas, weight_op.data(), act_op.data(), m.data(), n.data(), k.data(),
                                    alpha.data(), device, CUDA_R_16BF, lda.data(), device + count,
                                    CUDA_R_16BF, ldb.data(), beta.data(), device + 2 * count, CUDA_R_16BF,
                                    ldc.data(), count, group_size.data(), CUBLAS_COMPUTE_32F);
#else
  (void)cublas;
  (void)pass;
  (void)device;
  return CUBLAS_STATUS_NOT_SUPPORTED;  // the grouped API came with cuBLAS 12.5
#endif
}

// The FFN as grouped GEMM passes: gate/up (one pass, or one per column chunk with silu after each),
// then down, all matrix pointers staged in one copy. Returns false, having written nothing the
// per-expert loop depends on, where it does not apply: no or too small pointer scratch, a matrix
// not 16-byte aligned (the grouped API's bf16 rule), or cuBLAS without the grouped API or
// answering NOT_SUPPORTED. The caller has validated the offsets and that inter > 0.
bool expert_ffn_grouped(const ExpertFfnArgs& args, const int32_t* host_offsets,
                        const int32_t* host_local_index, cublasHandle_t cublas, cudaStream_t stream) {
  if (args.device_pointers == nullptr || args.host_pointers == nullptr) return false;
  const int64_t hidden = args.hidden;
  const int64_t inter = args.inter;
  const auto* x = static_cast<const bf16*>(args.x);
  const auto* gate_up = static_cast<const bf16*>(args.gate_up);
  const auto* down = static_cast<const bf16*>(args.down);
  auto* intermediate = static_cast<bf16*>(args.intermediate);
  auto* y = static_cast<bf16*>(args.y);

  std::vector<int64_t> active;  // experts with rows
  for (int64_t expert = 0; expert < args.num_experts; ++expert) {
    if (host_offsets[expert + 1] > host_offsets[expert]) active.push_back(expert);
  }
  const auto gate_up_of = [&](int64_t expert) {
    return gate_up + static_cast<int64_t>(host_local_index[expert]) * 2 * inter * hidden;
  };

  // The same scratch plan as the loop in expert_ffn_cublas: where 2I <= H one GEMM per expert
  // writes gate and up side by side into y; otherwise per column chunk gate goes to intermediate
  // and up to y, and silu runs after each chunk.
  std::vector<std::vector<NtGemm>> passes;
  std::vector<int64_t> chunk_columns;  // per gate/up pass: its first column of I
  const bool fused = 2 * inter <= hidden;
  const int64_t chunk = fused ? inter : (inter < hidden ? inter : hidden);
  for (int64_t column = 0; column < inter; column += chunk) {
    const int64_t columns = inter - column < chunk ? inter - column : chunk;
    std::vector<NtGemm> pass;
    for (const int64_t expert : active) {
      const int64_t begin = host_offsets[expert];
      const int64_t rows = host_offsets[expert + 1] - begin;
      if (fused) {
        pass.push_back({gate_up_of(expert), x + begin * hidden, y + begin * hidden, 2 * inter, hidden, rows,
                        hidden, hidden});
      } else {
        pass.push_back({gate_up_of(expert) + column * hidden, x + begin * hidden,
                        intermediate + begin * inter + column, columns, hidden, rows, hidden, inter});
        pass.push_back({gate_up_of(expert) + (inter + column) * hidden, x + begin * hidden,
                        y + begin * hidden, columns, hidden, rows, hidden, hidden});
      }
    }
    passes.push_back(std::move(pass));
    chunk_columns.push_back(column);
  }
  std::vector<NtGemm> down_pass;
  for (const int64_t expert : active) {
    const int64_t begin = host_offsets[expert];
    const int64_t rows = host_offsets[expert + 1] - begin;
    down_pass.push_back({down + static_cast<int64_t>(host_local_index[expert]) * hidden * inter,
                         intermediate + begin * inter, y + begin * hidden, hidden, inter, rows, inter,
                         hidden});
  }
  passes.push_back(std::move(down_pass));

  int64_t pointer_count = 0;
  for (const auto& pass : passes) {
    pointer_count += 3 * static_cast<int64_t>(pass.size());
    for (const NtGemm& gemm : pass) {
      if (!access::aligned16(gemm.weight) || !access::aligned16(gemm.act) || !access::aligned16(gemm.out))
        return false;
    }
  }
  if (pointer_count > args.pointer_capacity) return false;

  // cuBLAS only reads A and B; the pointer arrays' element type is void* either way.
  void** host = args.host_pointers;
  for (const auto& pass : passes) {
    const size_t count = pass.size();
    for (size_t i = 0; i < count; ++i) {
      host[i] = const_cast<bf16*>(pass[i].weight);
      host[count + i] = const_cast<bf16*>(pass[i].act);
      host[2 * count + i] = pass[i].out;
    }
    host += 3 * count;
  }
  EPIC_CUDA_CHECK(cudaMemcpyAsync(args.device_pointers, args.host_pointers,
                                  static_cast<size_t>(pointer_count) * sizeof(void*), cudaMemcpyHostToDevice,
                                  stream));

  void* const* device = args.device_pointers;
  for (size_t p = 0; p < passes.size(); ++p) {
    const cublasStatus_t status = grouped_gemm_nt(cublas, passes[p], device);
    // Nothing is computed yet: the per-expert loop takes over from scratch.
    if (p == 0 && status == CUBLAS_STATUS_NOT_SUPPORTED) return false;
    if (status != CUBLAS_STATUS_SUCCESS) {
      throw Error(ErrorCode::kInternal,
                  std::string("expert_ffn_cublas: cublasGemmGroupedBatchedEx failed: ") +
                      cublasGetStatusName(status) + " (" + cublasGetStatusString(status) + ")");
    }
    device += 3 * passes[p].size();
    if (p + 1 == passes.size()) break;  // the down pass
    if (fused) {
      launch_silu_mul(y, hidden, y + inter, hidden, intermediate, inter, args.rows, inter, stream);
    } else {
      const int64_t column = chunk_columns[p];
      const int64_t columns = inter - column < chunk ? inter - column : chunk;
      launch_silu_mul(intermediate + column, inter, y, hidden, intermediate + column, inter, args.rows,
                      columns, stream);
    }
  }
  return true;
}

// One expert's FFN on one lane: its rows of x are [begin, begin + rows). gate x and up x need
// [rows, 2I] of scratch; y ([rows, H]) serves until the down GEMM writes it. Where 2I <= H
// (Qwen3-MoE: 1536 <= 2048) one GEMM fills both halves of y; otherwise the I columns go in chunks
// of at most H: gate into intermediate, up into y. Only this expert's rows are touched, so
// experts on different lanes never share memory.
void one_expert_ffn(const ExpertFfnArgs& args, int64_t begin, int64_t rows, int64_t local,
                    const GemmLane& lane) {
  const int64_t hidden = args.hidden;
  const int64_t inter = args.inter;
  const auto* x = static_cast<const bf16*>(args.x) + begin * hidden;
  const auto* gate_up = static_cast<const bf16*>(args.gate_up) + local * 2 * inter * hidden;
  const auto* down = static_cast<const bf16*>(args.down) + local * hidden * inter;
  auto* intermediate = static_cast<bf16*>(args.intermediate) + begin * inter;
  auto* y = static_cast<bf16*>(args.y) + begin * hidden;
  if (2 * inter <= hidden) {
    gemm_nt(lane.cublas, x, hidden, gate_up, 2 * inter, hidden, y, hidden, rows);
    launch_silu_mul(y, hidden, y + inter, hidden, intermediate, inter, rows, inter, lane.stream);
  } else {
    const int64_t chunk = inter < hidden ? inter : hidden;
    for (int64_t column = 0; column < inter; column += chunk) {
      const int64_t columns = inter - column < chunk ? inter - column : chunk;
      gemm_nt(lane.cublas, x, hidden, gate_up + column * hidden, columns, hidden, intermediate + column,
              inter, rows);
      gemm_nt(lane.cublas, x, hidden, gate_up + (inter + column) * hidden, columns, hidden, y, hidden, rows);
      launch_silu_mul(intermediate + column, inter, y, hidden, intermediate + column, inter, rows, columns,
                      lane.stream);
    }
  }
  gemm_nt(lane.cublas, intermediate, inter, down, hidden, inter, y, hidden, rows);
}

// Each expert goes to the lane with the fewest rows so far; lane 0 is the caller's stream, the side
// lanes wait for everything enqueued on it before and it waits for all of them after, so to the
// caller this is one step on its stream. At prefill sizes the loop is bound by the host's cuBLAS
// calls (~8 us each, BENCHMARKS.md), so each side lane's share is enqueued by the pool's worker
// thread for that lane while the calling thread enqueues lane 0's.
void per_expert_loop(const ExpertFfnArgs& args, const int32_t* host_offsets, const int32_t* host_local_index,
                     const GemmLane& caller) {
  GemmLanePool* pool = args.lane_pool;
  const int side = pool != nullptr ? args.side_lane_count : 0;
  EPIC_CHECK(side >= 0 && (pool == nullptr || side <= pool->side_count()), ErrorCode::kInternal,
             "expert_ffn_cublas: " + std::to_string(args.side_lane_count) +
                 " side lanes asked for, the pool has " +
                 std::to_string(pool == nullptr ? 0 : pool->side_count()));
  std::vector<GemmLane> lanes{caller};
  for (int i = 0; i < side; ++i) lanes.push_back(pool->side_lanes()[i]);
  std::vector<std::vector<int64_t>> lane_experts(lanes.size());
  std::vector<int64_t> lane_rows(lanes.size(), 0);
  for (int64_t expert = 0; expert < args.num_experts; ++expert) {
    const int64_t rows = host_offsets[expert + 1] - host_offsets[expert];
    if (rows == 0) continue;
    size_t lane = 0;
    for (size_t i = 1; i < lanes.size(); ++i) {
      if (lane_rows[i] < lane_rows[lane]) lane = i;
    }
    lane_rows[lane] += rows;
    lane_experts[lane].push_back(expert);
  }
  const auto enqueue = [&](size_t lane) {
    for (const int64_t expert : lane_experts[lane]) {
      one_expert_ffn(args, host_offsets[expert], host_offsets[expert + 1] - host_offsets[expert],
                     host_local_index[expert], lanes[lane]);
    }
  };
  if (side == 0) {
    enqueue(0);
    return;
  }
  EPIC_CUDA_CHECK(cudaEventRecord(pool->fork(), caller.stream));
  for (int i = 1; i <= side; ++i) EPIC_CUDA_CHECK(cudaStreamWaitEvent(lanes[i].stream, pool->fork(), 0));
  int device = 0;
  EPIC_CUDA_CHECK(cudaGetDevice(&device));
  // Lane 0 on this thread, lane i on worker i - 1; a lane's exception comes back here (the first in
  // lane order) once every lane has finished.
  pool->workers().run(side, [&](int lane) {
    if (lane != 0) EPIC_CUDA_CHECK(cudaSetDevice(device));  // the current device is per thread
    enqueue(static_cast<size_t>(lane));
    if (lane != 0) EPIC_CUDA_CHECK(cudaEventRecord(lanes[lane].done, lanes[lane].stream));
  });
  for (int i = 1; i <= side; ++i) EPIC_CUDA_CHECK(cudaStreamWaitEvent(caller.stream, lanes[i].done, 0));
}

}  // namespace

// The grouped calls where they apply and are wanted; else the per-expert loop over the lanes.
bool expert_ffn_cublas(const ExpertFfnArgs& args, const int32_t* host_offsets,
                       const int32_t* host_local_index, cublasHandle_t cublas, cudaStream_t stream) {
  EPIC_CHECK(args.act_type == ScalarType::kBF16 && args.weight_type == ScalarType::kBF16,
             ErrorCode::kInternal,
             std::string("expert_ffn_cublas: bf16 activations and weights only, got ") +
                 scalar_name(args.act_type) + " and " + scalar_name(args.weight_type));
  constexpr int64_t kIntMax = 0x7fffffff;
  EPIC_CHECK(args.rows <= kIntMax && args.hidden <= kIntMax && 2 * args.inter <= kIntMax,
             ErrorCode::kUnsupported,
             "expert_ffn_cublas: dimensions past 2^31 - 1 do not fit cuBLAS's int arguments");
  if (args.rows == 0 || args.hidden == 0) return false;
  cublasPointerMode_t pointer_mode = CUBLAS_POINTER_MODE_HOST;
  EPIC_CUBLAS_CHECK(cublasGetPointerMode(cublas, &pointer_mode));
  EPIC_CHECK(
      pointer_mode == CUBLAS_POINTER_MODE_HOST, ErrorCode::kInternal,
      "expert_ffn_cublas: the cuBLAS handle must be in host pointer mode (alpha and beta are host values)");
  // The silu kernel runs between the GEMM passes: it relies on one stream ordering both.
  cudaStream_t cublas_stream = nullptr;
  EPIC_CUBLAS_CHECK(cublasGetStream(cublas, &cublas_stream));
  EPIC_CHECK(cublas_stream == stream, ErrorCode::kInternal,
             "expert_ffn_cublas: the cuBLAS handle must be set to the kernels' stream (cublasSetStream)");
  if (args.inter == 0) {
    EPIC_CUDA_CHECK(
        cudaMemsetAsync(args.y, 0, static_cast<size_t>(args.rows * args.hidden) * sizeof(bf16), stream));
    return false;
  }

  EPIC_CHECK(host_offsets[0] == 0 && host_offsets[args.num_experts] == args.rows, ErrorCode::kInternal,
             "expert_ffn_cublas: expert offsets must run from 0 to rows (" + std::to_string(args.rows) + ")");
  for (int64_t expert = 0; expert < args.num_experts; ++expert) {
    const int64_t expert_rows = host_offsets[expert + 1] - host_offsets[expert];
    EPIC_CHECK(expert_rows >= 0, ErrorCode::kInternal,
               "expert_ffn_cublas: expert offsets decrease at expert " + std::to_string(expert));
    const int32_t local = host_local_index[expert];
    EPIC_CHECK(expert_rows == 0 || (local >= 0 && local < args.num_local), ErrorCode::kInternal,
               "expert_ffn_cublas: expert " + std::to_string(expert) + " has " + std::to_string(expert_rows) +
                   " rows but is not hosted here (local index " + std::to_string(local) + ")");
  }
  if (expert_ffn_batched(args, host_offsets, host_local_index, cublas, stream)) return true;
  if (!args.per_expert && expert_ffn_grouped(args, host_offsets, host_local_index, cublas, stream))
    return true;
  per_expert_loop(args, host_offsets, host_local_index, GemmLane{cublas, stream, nullptr});
  return false;
}

}  // namespace epic::cuda_kernels
