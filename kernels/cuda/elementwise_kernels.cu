// The row- and element-wise CUDA kernels of the dense ops: embed, rms_norm, add_rms_norm,
// qk_norm_rope, silu_mul, add, gather_rows and convert, over F32 or BF16 tensors with fp32
// math. Memory-bound ones take 16-byte vector loads when every pointer is aligned and rows are
// multiples of 8 elements, and scalar ones otherwise (the host picks the variant).
#include <cuda_bf16.h>

#include <cmath>
#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_kernels.h"
#include "kernels/cuda/dependent_launch.cuh"
#include "kernels/cuda/qk_norm_rope.cuh"
#include "kernels/cuda/row_copy.cuh"
#include "kernels/cuda/scalar_access.cuh"

namespace epic::cuda_kernels {
namespace {

using access::kFullWarpMask;
using access::kVectorElements;
using access::kWarpSize;

constexpr int kElementwiseThreads = 256;
constexpr int kRowThreads = 256;     // rms_norm, add_rms_norm: one block per row
constexpr int kQkNormRopeWarps = 4;  // a warp per head

// ---- row copies with conversion (embed, convert) -------------------------------------------

// out[r, :] = table[ids[r], :] for r < rows, converted; kVec elements per step.
template <int kVec, class In, class Out>
__global__ void embed_kernel(const int32_t* ids, const In* table, Out* out, int64_t rows, int64_t hidden) {
  const int64_t vectors_per_row = hidden / kVec;
  const int64_t total = rows * vectors_per_row;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = v / vectors_per_row;
    const int64_t column = (v - row * vectors_per_row) * kVec;
    float values[kVec];
    access::load_vector<kVec>(table + static_cast<int64_t>(ids[row]) * hidden + column, values);
    access::store_vector<kVec>(out + row * hidden + column, values);
  }
}

// y[i] = x[i] (converted) for i < n; the vector part covers n / kVec vectors, the first threads
// then take the n % kVec tail elements.
template <int kVec, class In, class Out>
__global__ void convert_kernel(const In* x, Out* y, int64_t n) {
  const int64_t num_vectors = n / kVec;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = first; v < num_vectors; v += stride) {
    float values[kVec];
    access::load_vector<kVec>(x + v * kVec, values);
    access::store_vector<kVec>(y + v * kVec, values);
  }
  for (int64_t i = num_vectors * kVec + first; i < n; i += stride)
    y[i] = access::from_float<Out>(access::to_float(x[i]));
}

// y[i] = y[i] + x[i] in fp32, rounded to y's type; same vector/tail split as convert_kernel.
template <int kVec, class In, class Out>
__global__ void add_kernel(const In* x, Out* y, int64_t n) {
  const int64_t num_vectors = n / kVec;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t v = first; v < num_vectors; v += stride) {
    float x_values[kVec], y_values[kVec];
    access::load_vector<kVec>(x + v * kVec, x_values);
    access::load_vector<kVec>(y + v * kVec, y_values);
#pragma unroll
    for (int i = 0; i < kVec; ++i) y_values[i] += x_values[i];
    access::store_vector<kVec>(y + v * kVec, y_values);
  }
  for (int64_t i = num_vectors * kVec + first; i < n; i += stride)
    y[i] = access::from_float<Out>(access::to_float(y[i]) + access::to_float(x[i]));
}

// ---- rms_norm, add_rms_norm ----------------------------------------------------------------------

// The block's fp32 sum of every thread's partial sum of squares (warps first, then the warp sums in
// order), then inv_rms = 1 / sqrt(mean + eps) in double (as the reference). One helper for rms_norm
// and add_rms_norm, so the fused op rounds as the unfused pair. Needs blockDim.x == kRowThreads.
__device__ __forceinline__ float block_inv_rms(float sum_squares, int64_t dim, float eps) {
  __shared__ float warp_sums[kRowThreads / kWarpSize];
  __shared__ float inv_rms_shared;
  sum_squares = access::warp_sum(sum_squares);
  if (threadIdx.x % kWarpSize == 0) warp_sums[threadIdx.x / kWarpSize] = sum_squares;
  __syncthreads();
  if (threadIdx.x == 0) {
    float total = 0.0f;
    for (int w = 0; w < kRowThreads / kWarpSize; ++w) total += warp_sums[w];
    inv_rms_shared = static_cast<float>(
        1.0 / sqrt(static_cast<double>(total) / static_cast<double>(dim) + static_cast<double>(eps)));
  }
  __syncthreads();
  return inv_rms_shared;
}

// The second pass of rms_norm and add_rms_norm over this thread's elements of the row that starts
// at element row_start of x, y and y_f32: y = (x * inv_rms) * weight in fp32, stored to y and,
// unless y_f32 is null, to y_f32 as well. One helper for both, so the fused op rounds as the unfused
// pair. Each element is read and written by the thread that read it in the first pass (what lets x
// and y alias).
template <int kVec, class X, class W, class Y>
__device__ __forceinline__ void normalize_row(const X* x, const W* weight, float inv_rms, int64_t row_start,
                                              int64_t dim, Y* y, float* y_f32) {
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < dim;
       i += static_cast<int64_t>(blockDim.x) * kVec) {
    float values[kVec], weights[kVec];
    access::load_vector<kVec>(x + row_start + i, values);
    access::load_vector<kVec>(weight + i, weights);
#pragma unroll
    for (int j = 0; j < kVec; ++j) values[j] = (values[j] * inv_rms) * weights[j];
    access::store_vector<kVec>(y + row_start + i, values);
    if (y_f32 != nullptr) access::store_vector<kVec>(y_f32 + row_start + i, values);
  }
}

// One block per row: the block sums x^2 in fp32, then y = (x * inv_rms) * weight in fp32. x and y
// may alias (same type then): every element is read by the thread that later writes it, and all
// reads of the sum pass end at the barrier before any write.
template <int kVec, class X, class W, class Y>
__global__ void rms_norm_kernel(const X* x, const W* weight, Y* y, int64_t dim, float eps) {
  dependent::wait_for_previous();  // dependent_launch.cuh: before any global access
  dependent::release_next();
  const int64_t row_start = static_cast<int64_t>(blockIdx.x) * dim;
  const X* x_row = x + row_start;
  float sum_squares = 0.0f;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < dim;
       i += static_cast<int64_t>(blockDim.x) * kVec) {
    float values[kVec];
    access::load_vector<kVec>(x_row + i, values);
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum_squares += values[j] * values[j];
  }
  const float inv_rms = block_inv_rms(sum_squares, dim, eps);
  normalize_row<kVec>(x, weight, inv_rms, row_start, dim, y, nullptr);
}

// One block per row, rms_norm_kernel with the residual add in its first pass: each thread adds
// delta into its residual elements (fp32, as add_kernel), writes them back and sums their squares
// in the order rms_norm_kernel would read them; the second pass rereads the residual elements the
// same thread wrote and writes normed (and normed_f32 unless it is null) from the same fp32 values.
template <int kVec, class D, class W, class N>
__global__ void add_rms_norm_kernel(const D* delta, float* residual, const W* weight, N* normed,
                                    float* normed_f32, int64_t dim, float eps) {
  dependent::wait_for_previous();
  dependent::release_next();
  const int64_t row_start = static_cast<int64_t>(blockIdx.x) * dim;
  float* residual_row = residual + row_start;
  float sum_squares = 0.0f;
  for (int64_t i = static_cast<int64_t>(threadIdx.x) * kVec; i < dim;
       i += static_cast<int64_t>(blockDim.x) * kVec) {
    float sums[kVec], deltas[kVec];
    access::load_vector<kVec>(residual_row + i, sums);
    access::load_vector<kVec>(delta + row_start + i, deltas);
#pragma unroll
    for (int j = 0; j < kVec; ++j) sums[j] += deltas[j];
    access::store_vector<kVec>(residual_row + i, sums);
#pragma unroll
    for (int j = 0; j < kVec; ++j) sum_squares += sums[j] * sums[j];
  }
  const float inv_rms = block_inv_rms(sum_squares, dim, eps);
  normalize_row<kVec>(residual, weight, inv_rms, row_start, dim, normed, normed_f32);
}

// ---- qk_norm_rope ------------------------------------------------------------------------------

// A block per row, or per (row, group of heads) (gridDim.y). The row's cos / sin table (angle = position *
// theta^(-2i/d) in double, rounded to fp32 as the reference) is built once in shared memory; then one warp
// per q or k head RMS-norms the head in fp32 and rotates it (rotate-half: pairs i, i + d/2).
template <class T, class N>
__global__ void qk_norm_rope_kernel(T* qkv, const N* q_norm, const N* k_norm, const int32_t* positions,
                                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float eps,
                                    double theta) {
  __shared__ float cos_table[kMaxHeadDim / 2];
  __shared__ float sin_table[kMaxHeadDim / 2];
  dependent::wait_for_previous();
  dependent::release_next();
  const int64_t row = blockIdx.x;
  rope::fill_tables(cos_table, sin_table, positions[row], head_dim, theta);
  __syncthreads();

  const int warp = threadIdx.x / kWarpSize;
  const int lane = threadIdx.x % kWarpSize;
  T* row_data = qkv + row * (num_heads + 2 * num_kv_heads) * head_dim;
  const int64_t warps = blockDim.x / kWarpSize;
  for (int64_t head = blockIdx.y * warps + warp; head < num_heads + num_kv_heads; head += gridDim.y * warps) {
    T* x = row_data + head * head_dim;  // k heads follow the q heads directly
    rope::norm_rope_head(x, x, head < num_heads ? q_norm : k_norm, cos_table, sin_table, head_dim, eps, lane);
  }
}

// ---- silu_mul ----------------------------------------------------------------------------------

// out[r, i] = silu(gate_up[r, i]) * gate_up[r, inter + i]; kVec elements per step.
template <int kVec, class T>
__global__ void silu_mul_kernel(const T* gate_up, T* out, int64_t rows, int64_t inter) {
  const int64_t vectors_per_row = inter / kVec;
  const int64_t total = rows * vectors_per_row;
  for (int64_t v = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; v < total;
       v += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = v / vectors_per_row;
    const int64_t column = (v - row * vectors_per_row) * kVec;
    const T* gate_row = gate_up + row * 2 * inter;
    float gate[kVec], up[kVec];
    access::load_vector<kVec>(gate_row + column, gate);
    access::load_vector<kVec>(gate_row + inter + column, up);
#pragma unroll
    for (int j = 0; j < kVec; ++j) gate[j] = access::silu(gate[j]) * up[j];
    access::store_vector<kVec>(out + row * inter + column, gate);
  }
}

// ---- gather_rows -------------------------------------------------------------------------------

// out row i = x row index[i], copied in Unit-sized pieces (uint4, uint32_t or uint8_t).
template <class Unit>
__global__ void gather_rows_kernel(const Unit* x, const int32_t* index, Unit* out, int64_t rows,
                                   int64_t units_per_row) {
  dependent::wait_for_previous();
  dependent::release_next();
  const int64_t total = rows * units_per_row;
  for (int64_t u = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; u < total;
       u += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = u / units_per_row;
    const int64_t column = u - row * units_per_row;
    out[u] = x[static_cast<int64_t>(index[row]) * units_per_row + column];
  }
}

// 16-byte rows of at least a warp's width: a warp per row reads the row's index once and keeps
// several loads in flight (row_copy.cuh): the permutation copy of a 16384-token MoE layer.
__global__ void gather_rows_by_warp_kernel(const uint4* x, const int32_t* index, uint4* out, int64_t rows,
                                           int64_t units_per_row) {
  dependent::wait_for_previous();
  dependent::release_next();
  const int lane = threadIdx.x % kWarpSize;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
  for (int64_t row = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize; row < rows;
       row += warps) {
    rows::copy_row_by_warp(x + static_cast<int64_t>(index[row]) * units_per_row, out + row * units_per_row,
                           units_per_row, lane);
  }
}

}  // namespace

// ---- host entry points ---------------------------------------------------------------------------
// Each picks the template variant (types; vector or scalar by alignment) and launches.

void embed(const int32_t* ids, int64_t rows, const void* table, ScalarType table_type, int64_t hidden,
           void* out, ScalarType out_type, cudaStream_t stream) {
  if (rows == 0 || hidden == 0) return;
  const bool vector = hidden % kVectorElements == 0 && access::aligned16(table) && access::aligned16(out);
  access::dispatch_float_type(table_type, "embed", [&](auto in_tag) {
    access::dispatch_float_type(out_type, "embed", [&](auto out_tag) {
      using In = typename decltype(in_tag)::type;
      using Out = typename decltype(out_tag)::type;
      const auto* in_data = static_cast<const In*>(table);
      auto* out_data = static_cast<Out*>(out);
      if (vector) {
        embed_kernel<kVectorElements>
            <<<access::capped_blocks(rows * hidden / kVectorElements, kElementwiseThreads),
               kElementwiseThreads, 0, stream>>>(ids, in_data, out_data, rows, hidden);
      } else {
        embed_kernel<1>
            <<<access::capped_blocks(rows * hidden, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
                ids, in_data, out_data, rows, hidden);
      }
    });
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

void rms_norm(const void* x, ScalarType x_type, const void* weight, ScalarType weight_type, void* y,
              ScalarType y_type, int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  if (rows == 0 || dim == 0) return;
  const bool vector =
      dim % kVectorElements == 0 && access::aligned16(x) && access::aligned16(weight) && access::aligned16(y);
  access::dispatch_float_type(x_type, "rms_norm", [&](auto x_tag) {
    access::dispatch_float_type(weight_type, "rms_norm", [&](auto weight_tag) {
      access::dispatch_float_type(y_type, "rms_norm", [&](auto y_tag) {
        using X = typename decltype(x_tag)::type;
        using W = typename decltype(weight_tag)::type;
        using Y = typename decltype(y_tag)::type;
        // rows is the grid size; gridDim.x allows 2^31 - 1, far above any batch of tokens.
        const auto blocks = static_cast<unsigned>(rows);
        if (vector) {
          dependent::launch_if(dependent::enabled_for_all(), rms_norm_kernel<kVectorElements, X, W, Y>,
                               dim3(blocks), dim3(kRowThreads), 0, stream, static_cast<const X*>(x),
                               static_cast<const W*>(weight), static_cast<Y*>(y), dim, eps);
        } else {
          dependent::launch_if(dependent::enabled_for_all(), rms_norm_kernel<1, X, W, Y>, dim3(blocks),
                               dim3(kRowThreads), 0, stream, static_cast<const X*>(x),
                               static_cast<const W*>(weight), static_cast<Y*>(y), dim, eps);
        }
      });
    });
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

void add_rms_norm(const void* delta, ScalarType delta_type, float* residual, const void* weight,
                  ScalarType weight_type, void* normed, ScalarType normed_type, float* normed_f32,
                  int64_t rows, int64_t dim, float eps, cudaStream_t stream) {
  if (rows == 0 || dim == 0) return;
  const bool vector = dim % kVectorElements == 0 && access::aligned16(delta) && access::aligned16(residual) &&
                      access::aligned16(weight) && access::aligned16(normed) &&
                      (normed_f32 == nullptr || access::aligned16(normed_f32));
  access::dispatch_float_type(delta_type, "add_rms_norm", [&](auto delta_tag) {
    access::dispatch_float_type(weight_type, "add_rms_norm", [&](auto weight_tag) {
      access::dispatch_float_type(normed_type, "add_rms_norm", [&](auto normed_tag) {
        using D = typename decltype(delta_tag)::type;
        using W = typename decltype(weight_tag)::type;
        using N = typename decltype(normed_tag)::type;
        const auto blocks = static_cast<unsigned>(rows);  // as rms_norm
        const auto* delta_data = static_cast<const D*>(delta);
        const auto* weight_data = static_cast<const W*>(weight);
        auto* normed_data = static_cast<N*>(normed);
        if (vector) {
          dependent::launch_if(dependent::enabled_for_all(), add_rms_norm_kernel<kVectorElements, D, W, N>,
                               dim3(blocks), dim3(kRowThreads), 0, stream, delta_data, residual, weight_data,
                               normed_data, normed_f32, dim, eps);
        } else {
          dependent::launch_if(dependent::enabled_for_all(), add_rms_norm_kernel<1, D, W, N>, dim3(blocks),
                               dim3(kRowThreads), 0, stream, delta_data, residual, weight_data, normed_data,
                               normed_f32, dim, eps);
        }
      });
    });
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

void qk_norm_rope(void* qkv, ScalarType type, const void* q_norm, const void* k_norm, ScalarType norm_type,
                  const int32_t* positions, int64_t rows, int64_t num_heads, int64_t num_kv_heads,
                  int64_t head_dim, float eps, double theta, cudaStream_t stream) {
  if (rows == 0 || head_dim == 0 || num_heads + num_kv_heads == 0) return;
  EPIC_CHECK(head_dim <= kMaxHeadDim && head_dim % 2 == 0, ErrorCode::kUnsupported,
             "qk_norm_rope: the CUDA kernel takes an even head_dim up to " + std::to_string(kMaxHeadDim) +
                 ", not " + std::to_string(head_dim));
  // Few rows (decode): the heads of a row spread over several blocks, so a step is not one block's
  // latency; many rows fill the card with one block per row.
  const int64_t heads = num_heads + num_kv_heads;
  const int64_t head_blocks = rows >= 256 ? 1 : (heads + kQkNormRopeWarps - 1) / kQkNormRopeWarps;
  const dim3 grid(static_cast<unsigned>(rows), static_cast<unsigned>(head_blocks));
  access::dispatch_float_type(type, "qk_norm_rope", [&](auto type_tag) {
    access::dispatch_float_type(norm_type, "qk_norm_rope", [&](auto norm_tag) {
      using T = typename decltype(type_tag)::type;
      using N = typename decltype(norm_tag)::type;
      dependent::launch_if(dependent::enabled_for_all(), qk_norm_rope_kernel<T, N>, grid,
                           dim3(kQkNormRopeWarps * kWarpSize), 0, stream, static_cast<T*>(qkv),
                           static_cast<const N*>(q_norm), static_cast<const N*>(k_norm), positions, num_heads,
                           num_kv_heads, head_dim, eps, theta);
    });
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

void silu_mul(const void* gate_up, void* out, ScalarType type, int64_t rows, int64_t inter,
              cudaStream_t stream) {
  if (rows == 0 || inter == 0) return;
  const bool vector = inter % kVectorElements == 0 && access::aligned16(gate_up) && access::aligned16(out);
  access::dispatch_float_type(type, "silu_mul", [&](auto type_tag) {
    using T = typename decltype(type_tag)::type;
    if (vector) {
      silu_mul_kernel<kVectorElements>
          <<<access::capped_blocks(rows * inter / kVectorElements, kElementwiseThreads), kElementwiseThreads,
             0, stream>>>(static_cast<const T*>(gate_up), static_cast<T*>(out), rows, inter);
    } else {
      silu_mul_kernel<1>
          <<<access::capped_blocks(rows * inter, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
              static_cast<const T*>(gate_up), static_cast<T*>(out), rows, inter);
    }
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

void add(const void* x, ScalarType x_type, void* y, ScalarType y_type, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  const bool vector = access::aligned16(x) && access::aligned16(y);
  access::dispatch_float_type(x_type, "add", [&](auto x_tag) {
    access::dispatch_float_type(y_type, "add", [&](auto y_tag) {
      using X = typename decltype(x_tag)::type;
      using Y = typename decltype(y_tag)::type;
      if (vector) {
        add_kernel<kVectorElements>
            <<<access::capped_blocks((n + kVectorElements - 1) / kVectorElements, kElementwiseThreads),
               kElementwiseThreads, 0, stream>>>(static_cast<const X*>(x), static_cast<Y*>(y), n);
      } else {
        add_kernel<1><<<access::capped_blocks(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
            static_cast<const X*>(x), static_cast<Y*>(y), n);
      }
    });
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

void convert(const void* x, ScalarType x_type, void* y, ScalarType y_type, int64_t n, cudaStream_t stream) {
  if (n == 0) return;
  const bool vector = access::aligned16(x) && access::aligned16(y);
  access::dispatch_float_type(x_type, "convert", [&](auto x_tag) {
    access::dispatch_float_type(y_type, "convert", [&](auto y_tag) {
      using X = typename decltype(x_tag)::type;
      using Y = typename decltype(y_tag)::type;
      if (vector) {
        convert_kernel<kVectorElements>
            <<<access::capped_blocks((n + kVectorElements - 1) / kVectorElements, kElementwiseThreads),
               kElementwiseThreads, 0, stream>>>(static_cast<const X*>(x), static_cast<Y*>(y), n);
      } else {
        convert_kernel<1><<<access::capped_blocks(n, kElementwiseThreads), kElementwiseThreads, 0, stream>>>(
            static_cast<const X*>(x), static_cast<Y*>(y), n);
      }
    });
  });
  EPIC_CUDA_CHECK_LAUNCH();
}

void gather_rows(const void* x, const int32_t* index, void* out, int64_t rows, size_t row_bytes,
                 cudaStream_t stream) {
  if (rows == 0 || row_bytes == 0) return;
  const bool programmatic = dependent::enabled_for_all();
  const uintptr_t alignment_bits =
      reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(out) | row_bytes;
  const auto by_unit = [&](auto unit_tag) {
    using Unit = decltype(unit_tag);
    const auto units = static_cast<int64_t>(row_bytes / sizeof(Unit));
    dependent::launch_if(programmatic, gather_rows_kernel<Unit>,
                         dim3(access::capped_blocks(rows * units, kElementwiseThreads)),
                         dim3(kElementwiseThreads), 0, stream, static_cast<const Unit*>(x), index,
                         static_cast<Unit*>(out), rows, units);
  };
  if (alignment_bits % sizeof(uint4) == 0) {
    const auto units = static_cast<int64_t>(row_bytes / sizeof(uint4));
    if (units >= kWarpSize) {
      dependent::launch_if(programmatic, gather_rows_by_warp_kernel,
                           dim3(access::capped_blocks(rows * kWarpSize, kElementwiseThreads)),
                           dim3(kElementwiseThreads), 0, stream, static_cast<const uint4*>(x), index,
                           static_cast<uint4*>(out), rows, units);
    } else {
      by_unit(uint4{});
    }
  } else if (alignment_bits % sizeof(uint32_t) == 0) {
    by_unit(uint32_t{});
  } else {
    by_unit(uint8_t{});
  }
  EPIC_CUDA_CHECK_LAUNCH();
}

}  // namespace epic::cuda_kernels
