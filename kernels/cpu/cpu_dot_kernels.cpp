// The CPU reference's dot-product loops (linear, attention scores) and its thread split: every sum
// in a fixed order that does not depend on the thread count, the SIMD width or the rows around it.
#include <algorithm>
#include <cstring>
#include <functional>
#include <system_error>
#include <thread>
#include <vector>

#include "kernels/cpu/cpu_ops.h"

namespace epic::cpu {
namespace {

// Below this many multiply-adds per thread, starting a thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 20;
// Dot products keep this many partial sums: lane j adds the terms i with i % kDotLanes == j in
// increasing i, and the lanes are then added pairwise. The compiler can map the lanes onto SIMD
// registers without reassociating anything, so the result is the same on every machine.
constexpr int kDotLanes = 8;
// linear() hands out blocks of this many weight rows (128 KiB of f32 at in_dim 2048, so a block
// stays in L2 while every input row passes over it; a bf16 block is widened into such a block).
constexpr int64_t kLinearOutBlock = 16;

// kDotLanes floats as one value: GCC/Clang vector extensions keep the partial sums in registers
// (two SSE or one AVX register) with the same per-lane IEEE adds and multiplies as scalar code.
typedef float DotLanes __attribute__((vector_size(kDotLanes * sizeof(float))));

// The hot loops are also compiled for AVX2 and picked at run time (GCC ifunc). Only the register
// width changes: the same lane-wise multiplies and adds (no FMA: -ffp-contract=off), so the same
// bits as the baseline SSE2 build. The helpers below are internal, so the vector ABI note of
// -Wpsabi does not apply.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EPIC_CPU_HOT_LOOP __attribute__((target_clones("avx2", "default")))
#pragma GCC diagnostic ignored "-Wpsabi"
#else
#define EPIC_CPU_HOT_LOOP
#endif
#define EPIC_ALWAYS_INLINE inline __attribute__((always_inline))

EPIC_ALWAYS_INLINE DotLanes load_lanes(const float* source) {
  DotLanes lanes;
  std::memcpy(&lanes, source, sizeof(lanes));  // unaligned load
  return lanes;
}

// The ragged end of a row: lanes past n are zero, so they add +0 (which leaves every sum intact).
EPIC_ALWAYS_INLINE DotLanes load_tail(const float* source, int64_t count) {
  DotLanes lanes = {};
  for (int64_t j = 0; j < count; ++j) lanes[j] = source[j];
  return lanes;
}

EPIC_ALWAYS_INLINE float reduce_lanes(const DotLanes& lanes) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

EPIC_ALWAYS_INLINE float dot(const float* a, const float* b, int64_t n) {
  DotLanes sum = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) sum += load_lanes(a + i) * load_lanes(b + i);
  if (i < n) sum += load_tail(a + i, n - i) * load_tail(b + i, n - i);
  return reduce_lanes(sum);
}

// Four dot products of a with the rows b, b + stride, b + 2*stride, b + 3*stride: a is loaded
// once for four weight rows. Each output follows exactly the order of dot(), so whichever path
// computes an element, it gets the same bits.
EPIC_ALWAYS_INLINE void dot4(const float* a, const float* b, int64_t stride, int64_t n, float* out) {
  const float* b0 = b;
  const float* b1 = b + stride;
  const float* b2 = b + 2 * stride;
  const float* b3 = b + 3 * stride;
  DotLanes sum0 = {}, sum1 = {}, sum2 = {}, sum3 = {};
  int64_t i = 0;
  for (; i + kDotLanes <= n; i += kDotLanes) {
    const DotLanes a_lanes = load_lanes(a + i);
    sum0 += a_lanes * load_lanes(b0 + i);
    sum1 += a_lanes * load_lanes(b1 + i);
    sum2 += a_lanes * load_lanes(b2 + i);
    sum3 += a_lanes * load_lanes(b3 + i);
  }
  if (i < n) {
    const DotLanes a_lanes = load_tail(a + i, n - i);
    sum0 += a_lanes * load_tail(b0 + i, n - i);
    sum1 += a_lanes * load_tail(b1 + i, n - i);
    sum2 += a_lanes * load_tail(b2 + i, n - i);
    sum3 += a_lanes * load_tail(b3 + i, n - i);
  }
  out[0] = reduce_lanes(sum0);
  out[1] = reduce_lanes(sum1);
  out[2] = reduce_lanes(sum2);
  out[3] = reduce_lanes(sum3);
}

// y[:, out_begin:out_end] of linear(): every input row against a block of weight rows (w_block
// holds rows out_begin .. out_end - 1) that stays in cache meanwhile.
EPIC_CPU_HOT_LOOP void linear_block(const float* x, const float* w_block, float* y, int64_t rows,
                                    int64_t in_dim, int64_t out_dim, int64_t out_begin, int64_t out_end) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* x_row = x + row * in_dim;
    float* y_row = y + row * out_dim;
    int64_t out = out_begin;
    for (; out + 4 <= out_end; out += 4) {
      dot4(x_row, w_block + (out - out_begin) * in_dim, in_dim, in_dim, y_row + out);
    }
    for (; out < out_end; ++out) y_row[out] = dot(x_row, w_block + (out - out_begin) * in_dim, in_dim);
  }
}

EPIC_CPU_HOT_LOOP void widen_bf16(const uint16_t* source, float* destination, int64_t n) {
  for (int64_t i = 0; i < n; ++i) destination[i] = bf16_to_float(source[i]);
}

}  // namespace

void parallel_for(int64_t num_items, int64_t work_per_item, int max_threads,
                  const std::function<void(int64_t, int64_t)>& body) {
  if (num_items <= 0) return;
  const int64_t total_work = num_items * std::max<int64_t>(work_per_item, 1);
  const int64_t useful_threads = std::max<int64_t>(1, total_work / kMinWorkPerThread);
  const int64_t num_threads = std::min<int64_t>({max_threads, useful_threads, num_items});
  if (num_threads <= 1) {
    body(0, num_items);
    return;
  }
  const auto chunk_begin = [&](int64_t chunk) { return num_items * chunk / num_threads; };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(num_threads - 1));
  for (int64_t chunk = 1; chunk < num_threads; ++chunk) {
    try {
      threads.emplace_back(body, chunk_begin(chunk), chunk_begin(chunk + 1));
    } catch (const std::system_error&) {  // no thread to be had: do the chunk here, same result
      body(chunk_begin(chunk), chunk_begin(chunk + 1));
    }
  }
  body(0, chunk_begin(1));
  for (std::thread& thread : threads) thread.join();
}

// Threads split the out dimension in blocks of kLinearOutBlock rows of w; a bf16 block is widened
// into the thread's own f32 copy first (exactly), so bf16 weights give the bits of an f32 copy.
void linear(const float* x, const void* w, ScalarType w_type, float* y, int64_t rows, int64_t in_dim,
            int64_t out_dim, int num_threads) {
  if (rows == 0 || out_dim == 0) return;
  const int64_t num_blocks = (out_dim + kLinearOutBlock - 1) / kLinearOutBlock;
  parallel_for(num_blocks, rows * in_dim * kLinearOutBlock, num_threads, [&](int64_t begin, int64_t end) {
    std::vector<float> widened_block;
    if (w_type == ScalarType::kBF16) widened_block.resize(static_cast<size_t>(kLinearOutBlock * in_dim));
    for (int64_t block = begin; block < end; ++block) {
      const int64_t out_begin = block * kLinearOutBlock;
      const int64_t out_end = std::min(out_dim, out_begin + kLinearOutBlock);
      const float* w_block;
      if (w_type == ScalarType::kBF16) {
        widen_bf16(static_cast<const uint16_t*>(w) + out_begin * in_dim, widened_block.data(),
                   (out_end - out_begin) * in_dim);
        w_block = widened_block.data();
      } else {
        w_block = static_cast<const float*>(w) + out_begin * in_dim;
      }
      linear_block(x, w_block, y, rows, in_dim, out_dim, out_begin, out_end);
    }
  });
}

EPIC_CPU_HOT_LOOP void paged_attention_scores(const float* q_row, const float* key_pool,
                                              const int32_t* block_table, int64_t num_visible,
                                              int64_t kv_head, int64_t num_kv_heads, int64_t head_dim,
                                              float scale, float* scores) {
  const int64_t key_stride = num_kv_heads * head_dim;
  for (int64_t key = 0; key < num_visible; ++key) {
    const int64_t slot =
        static_cast<int64_t>(block_table[key / kKvBlockSize]) * kKvBlockSize + key % kKvBlockSize;
    scores[key] = dot(q_row, key_pool + slot * key_stride + kv_head * head_dim, head_dim) * scale;
  }
}

}  // namespace epic::cpu
