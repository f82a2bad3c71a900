// The fp32 CPU reference backend: plain loops, every sum in a fixed order that does not depend on
// the thread count, so it is the yardstick the other backends are tested against.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "kernels/backend.h"
#include "kernels/backend_checks.h"
#include "kernels/error.h"

namespace epic {
namespace {

constexpr const char* kBackendName = "cpu";
constexpr int kMaxThreads = 16;
// Below this many multiply-adds per thread, starting a thread costs more than it saves.
constexpr int64_t kMinWorkPerThread = int64_t{1} << 20;
// Dot products keep this many partial sums: lane j adds the terms i with i % kDotLanes == j in
// increasing i, and the lanes are then added pairwise. The compiler can map the lanes onto SIMD
// registers without reassociating anything, so the result is the same on every machine.
constexpr int kDotLanes = 8;
// linear() hands out blocks of this many weight rows (128 KiB at in_dim 2048, so a block stays in
// L2 while every input row passes over it).
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

// y[:, out_begin:out_end] of linear(): every input row against a block of weight rows that stays
// in cache meanwhile.
EPIC_CPU_HOT_LOOP void linear_block(const float* x, const float* w, float* y, int64_t rows, int64_t in_dim,
                                    int64_t out_dim, int64_t out_begin, int64_t out_end) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* x_row = x + row * in_dim;
    float* y_row = y + row * out_dim;
    int64_t out = out_begin;
    for (; out + 4 <= out_end; out += 4) dot4(x_row, w + out * in_dim, in_dim, in_dim, y_row + out);
    for (; out < out_end; ++out) y_row[out] = dot(x_row, w + out * in_dim, in_dim);
  }
}

// Scores of one (query, head) of attention(): scores[key] = dot(q_row, k row) * scale.
EPIC_CPU_HOT_LOOP void attention_scores(const float* q_row, const float* k, int64_t num_visible,
                                        int64_t key_stride, int64_t head_dim, float scale, float* scores) {
  for (int64_t key = 0; key < num_visible; ++key)
    scores[key] = dot(q_row, k + key * key_stride, head_dim) * scale;
}

// Runs body(begin, end) over [0, num_items) in contiguous chunks on up to max_threads threads (the
// caller's thread takes the first chunk). body must compute each item independently of the
// others; then the split, and so the thread count, cannot change the result.
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

class CpuBackend final : public Backend {
 public:
  explicit CpuBackend(int num_threads) : num_threads_(num_threads) {}

  std::string name() const override { return "cpu(" + std::to_string(num_threads_) + " threads)"; }

  // Each y element is dot() of an x row and a w row (fp32, kDotLanes partial sums). Threads split
  // the out dimension in blocks of kLinearOutBlock rows of w.
  void linear(const float* x, const float* w, float* y, int64_t rows, int64_t in_dim,
              int64_t out_dim) override {
    backend_checks::check_linear(kBackendName, rows, in_dim, out_dim);
    if (rows == 0 || out_dim == 0) return;
    const int64_t num_blocks = (out_dim + kLinearOutBlock - 1) / kLinearOutBlock;
    parallel_for(num_blocks, rows * in_dim * kLinearOutBlock, num_threads_, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t out_begin = block * kLinearOutBlock;
        linear_block(x, w, y, rows, in_dim, out_dim, out_begin,
                     std::min(out_dim, out_begin + kLinearOutBlock));
      }
    });
  }

  // The mean square is summed in double (cheap, and it removes the summation order from the
  // error); the scaling follows HF: (x * rsqrt(mean + eps)) * weight in fp32.
  void rms_norm(const float* x, const float* weight, float* y, int64_t rows, int64_t dim,
                float eps) override {
    backend_checks::check_rms_norm(kBackendName, rows, dim);
    if (dim == 0) return;
    for (int64_t row = 0; row < rows; ++row) {
      const float* x_row = x + row * dim;
      float* y_row = y + row * dim;
      double sum_squares = 0.0;
      for (int64_t i = 0; i < dim; ++i) sum_squares += static_cast<double>(x_row[i]) * x_row[i];
      const float inv_rms = static_cast<float>(
          1.0 / std::sqrt(sum_squares / static_cast<double>(dim) + static_cast<double>(eps)));
      for (int64_t i = 0; i < dim; ++i) y_row[i] = (x_row[i] * inv_rms) * weight[i];
    }
  }

  // Angles, cos and sin in double (see backend.h for why), the rotation itself in fp32.
  void rope(float* x, const int32_t* positions, int64_t num_tokens, int64_t num_heads, int64_t head_dim,
            double theta) override {
    backend_checks::check_rope(kBackendName, num_tokens, num_heads, head_dim, theta);
    const int64_t half = head_dim / 2;
    std::vector<double> inv_freq(static_cast<size_t>(half));
    for (int64_t i = 0; i < half; ++i) {
      inv_freq[i] = std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    }
    std::vector<float> cos_values(static_cast<size_t>(half)), sin_values(static_cast<size_t>(half));
    for (int64_t token = 0; token < num_tokens; ++token) {
      for (int64_t i = 0; i < half; ++i) {
        const double angle = static_cast<double>(positions[token]) * inv_freq[i];
        cos_values[i] = static_cast<float>(std::cos(angle));
        sin_values[i] = static_cast<float>(std::sin(angle));
      }
      for (int64_t head = 0; head < num_heads; ++head) {
        float* x_head = x + (token * num_heads + head) * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float first = x_head[i];
          const float second = x_head[i + half];
          x_head[i] = first * cos_values[i] - second * sin_values[i];
          x_head[i + half] = second * cos_values[i] + first * sin_values[i];
        }
      }
    }
  }

  // Per (query, head): fp32 scores (dot() then * head_dim^-0.5, as HF scales after the matmul),
  // fp32 exp(score - max), and the softmax denominator and the weighted sum of values in double.
  void attention(const float* q, const float* k, const float* v, float* out, int64_t num_queries,
                 int64_t num_keys, int64_t first_position, int64_t num_heads, int64_t num_kv_heads,
                 int64_t head_dim) override {
    backend_checks::check_attention(kBackendName, num_queries, num_keys, first_position, num_heads,
                                    num_kv_heads, head_dim);
    const int64_t heads_per_kv_head = num_heads / num_kv_heads;
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(head_dim)));
    const int64_t work_per_item = 2 * num_keys * head_dim;
    parallel_for(num_queries * num_heads, work_per_item, num_threads_, [&](int64_t begin, int64_t end) {
      std::vector<float> scores;
      std::vector<double> sum(static_cast<size_t>(head_dim));
      for (int64_t item = begin; item < end; ++item) {
        const int64_t query = item / num_heads;
        const int64_t head = item % num_heads;
        const int64_t kv_head = head / heads_per_kv_head;
        const int64_t num_visible = first_position + query + 1;
        const float* q_row = q + item * head_dim;
        scores.resize(static_cast<size_t>(num_visible));
        attention_scores(q_row, k + kv_head * head_dim, num_visible, num_kv_heads * head_dim, head_dim, scale,
                         scores.data());
        const float max_score = *std::max_element(scores.begin(), scores.end());
        double denominator = 0.0;
        std::fill(sum.begin(), sum.end(), 0.0);
        for (int64_t key = 0; key < num_visible; ++key) {
          const float probability = std::exp(scores[key] - max_score);
          denominator += probability;
          const float* v_row = v + (key * num_kv_heads + kv_head) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) sum[d] += static_cast<double>(probability) * v_row[d];
        }
        float* out_row = out + item * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) out_row[d] = static_cast<float>(sum[d] / denominator);
      }
    });
  }

  void silu_mul(const float* gate, const float* up, float* out, int64_t n) override {
    backend_checks::check_silu_mul(kBackendName, n);
    for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }

  // fp32 throughout, sums in ascending expert id (the denominator) or selection order (the
  // renormalisation), so a backend computing the same expressions gets the same bits.
  void route_top_k(const float* logits, const uint8_t* present, int32_t* expert_ids, float* weights,
                   int64_t num_tokens, int64_t num_experts, int64_t top_k, bool normalize_top_k) override {
    std::vector<int32_t> present_ids;
    for (int64_t expert = 0; expert < std::max<int64_t>(num_experts, 0); ++expert) {
      if (present[expert] != 0) present_ids.push_back(static_cast<int32_t>(expert));
    }
    backend_checks::check_route_top_k(kBackendName, num_tokens, num_experts, top_k,
                                      static_cast<int64_t>(present_ids.size()));
    std::vector<float> probabilities(static_cast<size_t>(num_experts));
    std::vector<int32_t> order;
    for (int64_t token = 0; token < num_tokens; ++token) {
      const float* row = logits + token * num_experts;
      float max_logit = -std::numeric_limits<float>::infinity();
      for (int32_t expert : present_ids) max_logit = std::max(max_logit, row[expert]);
      float denominator = 0.0f;
      for (int32_t expert : present_ids) denominator += std::exp(row[expert] - max_logit);
      for (int32_t expert : present_ids)
        probabilities[expert] = std::exp(row[expert] - max_logit) / denominator;

      order = present_ids;
      std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int32_t a, int32_t b) {
        return probabilities[a] > probabilities[b] || (probabilities[a] == probabilities[b] && a < b);
      });
      int32_t* ids_row = expert_ids + token * top_k;
      float* weights_row = weights + token * top_k;
      float selected_sum = 0.0f;
      for (int64_t j = 0; j < top_k; ++j) {
        ids_row[j] = order[j];
        weights_row[j] = probabilities[order[j]];
        selected_sum += weights_row[j];
      }
      if (normalize_top_k) {
        for (int64_t j = 0; j < top_k; ++j) weights_row[j] /= selected_sum;
      }
    }
  }

  void scaled_add_rows(const float* x, const float* scale, float* y, int64_t rows, int64_t dim) override {
    backend_checks::check_scaled_add_rows(kBackendName, rows, dim);
    for (int64_t row = 0; row < rows; ++row) {
      for (int64_t i = 0; i < dim; ++i) y[row * dim + i] += scale[row] * x[row * dim + i];
    }
  }

  void add(const float* x, float* y, int64_t n) override {
    backend_checks::check_add(kBackendName, n);
    for (int64_t i = 0; i < n; ++i) y[i] += x[i];
  }

 private:
  int num_threads_;
};

}  // namespace

std::unique_ptr<Backend> make_cpu_backend(int num_threads) {
  if (num_threads <= 0) {
    const unsigned hardware_threads = std::thread::hardware_concurrency();
    num_threads = std::clamp(static_cast<int>(hardware_threads), 1, kMaxThreads);
  }
  return std::make_unique<CpuBackend>(num_threads);
}

}  // namespace epic
