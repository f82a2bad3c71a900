// Shared by the kernel tests: the per-run seed, random inputs that are never zero, NaN-filled
// outputs, the shape tables, double-precision reference ops and an element-wise comparison
// that reports the worst element and how many were never written.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/backend.h"

namespace epic::kernel_test {

// One seed per test process, from std::random_device unless EPIC_KERNEL_TEST_SEED is set (to
// replay a failure: every failure message prints the seed).
inline uint64_t run_seed() {
  static const uint64_t seed = []() -> uint64_t {
    if (const char* text = std::getenv("EPIC_KERNEL_TEST_SEED")) return std::strtoull(text, nullptr, 10);
    std::random_device device;
    return (static_cast<uint64_t>(device()) << 32) ^ device();
  }();
  return seed;
}

// With EPIC_KERNEL_TEST_REPORT=1 every comparison prints its worst |error| / scale next to its
// tolerance, to see how much headroom a tolerance has on a given machine.
inline bool report_errors() {
  static const bool report = std::getenv("EPIC_KERNEL_TEST_REPORT") != nullptr;
  return report;
}

inline std::string seed_text() {
  return "seed " + std::to_string(run_seed()) +
         " (replay with EPIC_KERNEL_TEST_SEED=" + std::to_string(run_seed()) + ")";
}

// A generator for one test case: the run seed mixed with the case's index, so cases differ but
// each replays from the run seed alone.
inline std::mt19937_64 case_generator(uint64_t case_index) {
  std::seed_seq sequence{static_cast<uint32_t>(run_seed()), static_cast<uint32_t>(run_seed() >> 32),
                         static_cast<uint32_t>(case_index)};
  return std::mt19937_64(sequence);
}

// Values with |v| in [0.05, 1] * amplitude and a random sign: never zero, so an element that is
// skipped or zeroed cannot pass by accident.
inline std::vector<float> random_values(std::mt19937_64& generator, int64_t n, float amplitude = 1.0f) {
  std::uniform_real_distribution<float> magnitude(0.05f, 1.0f);
  std::bernoulli_distribution negative(0.5);
  std::vector<float> values(static_cast<size_t>(n));
  for (float& value : values) value = amplitude * magnitude(generator) * (negative(generator) ? -1.0f : 1.0f);
  return values;
}

inline std::vector<float> nan_filled(int64_t n) {
  return std::vector<float>(static_cast<size_t>(n), std::numeric_limits<float>::quiet_NaN());
}

// Passes when every |actual[i] - expected[i]| <= tolerance * scale[i] (scale: the magnitude the
// error is measured against, e.g. sum |x_i w_i| for a dot product). A NaN fails, and the message
// counts them separately: a NaN left in a NaN-prefilled output is an element never written.
inline ::testing::AssertionResult all_close(const std::vector<float>& actual,
                                            const std::vector<double>& expected,
                                            const std::vector<double>& scale, double tolerance) {
  if (actual.size() != expected.size() || actual.size() != scale.size()) {
    return ::testing::AssertionFailure() << "size mismatch: actual " << actual.size() << ", expected "
                                         << expected.size() << ", scale " << scale.size();
  }
  int64_t num_nan = 0;
  int64_t first_nan = -1;
  int64_t num_bad = 0;
  int64_t worst = -1;  // the finite element with the largest |error| / scale
  double worst_ratio = -1.0;
  for (size_t i = 0; i < actual.size(); ++i) {
    if (std::isnan(actual[i])) {
      if (num_nan++ == 0) first_nan = static_cast<int64_t>(i);
      continue;
    }
    const double error = std::abs(static_cast<double>(actual[i]) - expected[i]);
    if (!(error <= tolerance * scale[i])) ++num_bad;
    const double ratio = scale[i] > 0.0 ? error / scale[i] : (error > 0.0 ? INFINITY : 0.0);
    if (ratio > worst_ratio) {
      worst_ratio = ratio;
      worst = static_cast<int64_t>(i);
    }
  }
  if (report_errors()) {
    std::printf("  worst |error| / scale = %.3g (tolerance %.3g) over %zu elements\n", worst_ratio, tolerance,
                actual.size());
  }
  if (num_nan == 0 && num_bad == 0) return ::testing::AssertionSuccess();
  std::ostringstream message;
  message.precision(9);
  message << num_nan << " of " << actual.size() << " elements are NaN";
  if (num_nan > 0) message << " (never written? first at " << first_nan << ")";
  message << ", " << num_bad << " exceed the tolerance " << tolerance << " x scale";
  if (worst >= 0) {
    message << "; worst element " << worst << ": actual " << actual[worst] << ", expected " << expected[worst]
            << ", scale " << scale[worst] << ", |error| / scale " << worst_ratio;
  }
  return ::testing::AssertionFailure() << message.str();
}

inline std::vector<double> to_double(const std::vector<float>& values) {
  return std::vector<double>(values.begin(), values.end());
}

// Scale |expected| for ops without cancellation (each output is a product of a few terms).
inline std::vector<double> absolute(const std::vector<double>& values) {
  std::vector<double> result(values.size());
  std::transform(values.begin(), values.end(), result.begin(), [](double v) { return std::abs(v); });
  return result;
}

// ---- shape tables (shared by the CPU and CUDA tests) ----

struct LinearShape {
  int64_t rows, in_dim, out_dim;
};
inline const std::vector<LinearShape> kLinearShapes = {
    {1, 1, 1},        {1, 3, 17},    {3, 17, 130}, {17, 130, 3},
    {2, 2048, 1},     {5, 128, 257}, {130, 17, 5}, {3, 0, 5},  // in_dim 0: an empty sum, every y must be 0
    {64, 2048, 2053},                                          // large enough for the multi-threaded path
};

struct RmsNormShape {
  int64_t rows, dim;
};
inline const std::vector<RmsNormShape> kRmsNormShapes = {{1, 1}, {3, 17}, {17, 130}, {5, 2048}, {130, 128}};
constexpr float kRmsNormEps = 1e-6f;

struct RopeShape {
  int64_t num_tokens, num_heads, head_dim;
  double theta;
  int32_t max_position;  // positions are random in [0, max_position], in no particular order
};
inline const std::vector<RopeShape> kRopeShapes = {
    {1, 1, 2, 1e4, 0},    {3, 4, 18, 1e4, 17},     {17, 32, 128, 1e6, 40000},
    {5, 4, 64, 1e4, 130}, {130, 1, 130, 1e6, 130}, {2, 4, 128, 1e6, 1000000},  // far beyond any context
};

struct AttentionShape {
  int64_t num_queries, first_position, num_heads, num_kv_heads, head_dim;
  float amplitude;        // of q and k: 50 gives scores of several hundred, which overflow exp() unless
                          // the max is subtracted
  double cpu_tolerance;   // vs the double reference, relative to sum_j p_j |v_j|
  double cuda_tolerance;  // vs the CPU backend, same scale
};
inline const std::vector<AttentionShape> kAttentionShapes = {
    {1, 0, 1, 1, 1, 1.0f, 1e-5, 2e-5},
    {3, 0, 4, 2, 17, 1.0f, 1e-5, 2e-5},
    {1, 129, 32, 4, 128, 1.0f, 1e-5, 2e-5},  // decode step at position 129 (130 keys)
    {17, 5, 32, 4, 128, 1.0f, 1e-5, 2e-5},   // a prefill chunk after 5 cached tokens
    {130, 0, 8, 8, 64, 1.0f, 1e-5, 2e-5},    // plain multi-head
    {5, 12, 6, 3, 130, 1.0f, 1e-5, 2e-5},
    // Scores of ~+-15: a sharp but not one-hot softmax. Loosened 2x: the fp32 error of a score
    // grows with |q| |k| (16x here), measured up to 2.4e-6 vs double.
    {9, 40, 16, 2, 128, 4.0f, 2e-5, 4e-5},
    // Scores of several hundred (exp overflows fp32 above 88 without the max subtracted).
    // Loosened: the fp32 error of such a score (~1e-7 of sum |q_d k_d| * scale, up to ~1e-4
    // absolute) becomes a relative error of the probabilities when two keys nearly tie.
    {4, 3, 4, 1, 128, 20.0f, 3e-4, 3e-4},
};

struct SiluMulShape {
  int64_t n;
  float gate_amplitude;  // 20: silu far into both tails (silu(-20) ~ -4e-8, still a normal float)
};
inline const std::vector<SiluMulShape> kSiluMulShapes = {
    {1, 1.0f}, {3, 1.0f}, {17, 5.0f}, {130, 20.0f}, {100003, 8.0f}};

enum class PresentPattern {
  kAll,
  kEveryThirdAbsent,      // experts 0, 3, 6, ... absent
  kEveryThirdAbsentHigh,  // same, and the absent experts get the highest logits (+100)
  kExactlyTopK,           // only top_k experts present (spread over the range)
  kRandomHalf,            // each expert present with probability 1/2 (at least top_k present)
};
enum class LogitPattern {
  kSeparated,    // a random permutation of distinct logits 0.05 apart: no near-ties anywhere
  kLargeOffset,  // kSeparated + 1000: exp() overflows unless the max is subtracted
  kAllEqual,     // exact ties: the lower expert ids must win
};
struct RouteShape {
  int64_t num_tokens, num_experts, top_k;
  bool normalize_top_k;
  PresentPattern present;
  LogitPattern logits;
};
inline const std::vector<RouteShape> kRouteShapes = {
    {1, 1, 1, true, PresentPattern::kAll, LogitPattern::kSeparated},
    {3, 17, 3, false, PresentPattern::kEveryThirdAbsent, LogitPattern::kSeparated},
    {17, 128, 8, true, PresentPattern::kAll, LogitPattern::kSeparated},
    {5, 128, 8, false, PresentPattern::kEveryThirdAbsentHigh, LogitPattern::kSeparated},
    {130, 128, 8, true, PresentPattern::kExactlyTopK, LogitPattern::kSeparated},
    {4, 60, 4, true, PresentPattern::kRandomHalf, LogitPattern::kLargeOffset},
    {3, 128, 8, true, PresentPattern::kAll, LogitPattern::kAllEqual},
    {2, 130, 1, false, PresentPattern::kEveryThirdAbsent, LogitPattern::kAllEqual},
    {1, 128, 128, true, PresentPattern::kAll, LogitPattern::kSeparated},
};

inline std::vector<uint8_t> make_present(std::mt19937_64& generator, const RouteShape& shape) {
  std::vector<uint8_t> present(static_cast<size_t>(shape.num_experts), 1);
  switch (shape.present) {
    case PresentPattern::kAll:
      break;
    case PresentPattern::kEveryThirdAbsent:
    case PresentPattern::kEveryThirdAbsentHigh:
      for (int64_t e = 0; e < shape.num_experts; e += 3) present[e] = 0;
      break;
    case PresentPattern::kExactlyTopK:
      std::fill(present.begin(), present.end(), 0);
      for (int64_t j = 0; j < shape.top_k; ++j) present[j * shape.num_experts / shape.top_k] = 1;
      break;
    case PresentPattern::kRandomHalf: {
      std::bernoulli_distribution coin(0.5);
      do {
        for (uint8_t& p : present) p = coin(generator) ? 1 : 0;
      } while (std::count(present.begin(), present.end(), 1) < shape.top_k);
      break;
    }
  }
  return present;
}

inline std::vector<float> make_router_logits(std::mt19937_64& generator, const RouteShape& shape,
                                             const std::vector<uint8_t>& present) {
  std::vector<float> logits(static_cast<size_t>(shape.num_tokens * shape.num_experts));
  std::vector<int> rank(static_cast<size_t>(shape.num_experts));
  std::uniform_real_distribution<float> offset(-2.0f, 2.0f);
  for (int64_t token = 0; token < shape.num_tokens; ++token) {
    std::iota(rank.begin(), rank.end(), 0);
    std::shuffle(rank.begin(), rank.end(), generator);
    const float base = offset(generator) + (shape.logits == LogitPattern::kLargeOffset ? 1000.0f : 0.0f);
    for (int64_t e = 0; e < shape.num_experts; ++e) {
      float& logit = logits[token * shape.num_experts + e];
      logit = shape.logits == LogitPattern::kAllEqual ? 0.5f : base + 0.05f * static_cast<float>(rank[e]);
      if (shape.present == PresentPattern::kEveryThirdAbsentHigh && present[e] == 0) logit = 100.0f;
    }
  }
  return logits;
}

// ---- double-precision references, written independently of the backends ----

// y = x w^T; magnitude[r, o] = sum_i |x[r, i] w[o, i]|, the scale of the fp32 summation error.
inline void reference_linear(const std::vector<float>& x, const std::vector<float>& w, int64_t rows,
                             int64_t in_dim, int64_t out_dim, std::vector<double>& y,
                             std::vector<double>& magnitude) {
  y.assign(static_cast<size_t>(rows * out_dim), 0.0);
  magnitude.assign(y.size(), 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out_dim; ++o) {
      double sum = 0.0, abs_sum = 0.0;
      for (int64_t i = 0; i < in_dim; ++i) {
        const double term = static_cast<double>(x[r * in_dim + i]) * w[o * in_dim + i];
        sum += term;
        abs_sum += std::abs(term);
      }
      y[r * out_dim + o] = sum;
      magnitude[r * out_dim + o] = abs_sum;
    }
  }
}

inline std::vector<double> reference_rms_norm(const std::vector<float>& x, const std::vector<float>& weight,
                                              int64_t rows, int64_t dim, double eps) {
  std::vector<double> y(x.size());
  for (int64_t r = 0; r < rows; ++r) {
    double mean_square = 0.0;
    for (int64_t i = 0; i < dim; ++i) mean_square += static_cast<double>(x[r * dim + i]) * x[r * dim + i];
    mean_square /= static_cast<double>(dim);
    for (int64_t i = 0; i < dim; ++i)
      y[r * dim + i] = x[r * dim + i] / std::sqrt(mean_square + eps) * weight[i];
  }
  return y;
}

// magnitude = |x_i cos| + |x_{i+half} sin| (the terms the rotation adds).
inline void reference_rope(const std::vector<float>& x, const std::vector<int32_t>& positions,
                           int64_t num_tokens, int64_t num_heads, int64_t head_dim, double theta,
                           std::vector<double>& y, std::vector<double>& magnitude) {
  y.assign(x.size(), 0.0);
  magnitude.assign(x.size(), 0.0);
  const int64_t half = head_dim / 2;
  for (int64_t t = 0; t < num_tokens; ++t) {
    for (int64_t h = 0; h < num_heads; ++h) {
      const int64_t base = (t * num_heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const double angle = positions[t] * std::pow(theta, -2.0 * static_cast<double>(i) / head_dim);
        const double c = std::cos(angle), s = std::sin(angle);
        const double first = x[base + i], second = x[base + i + half];
        y[base + i] = first * c - second * s;
        y[base + i + half] = second * c + first * s;
        magnitude[base + i] = std::abs(first * c) + std::abs(second * s);
        magnitude[base + i + half] = std::abs(second * c) + std::abs(first * s);
      }
    }
  }
}

// Builds the full masked score matrix per head, softmaxes each row, multiplies by V.
// magnitude[q, h, d] = sum_j p_j |v_j[d]|.
inline void reference_attention(const std::vector<float>& q, const std::vector<float>& k,
                                const std::vector<float>& v, const AttentionShape& shape,
                                std::vector<double>& out, std::vector<double>& magnitude) {
  const int64_t num_keys = shape.first_position + shape.num_queries;
  const int64_t group = shape.num_heads / shape.num_kv_heads;
  const int64_t head_dim = shape.head_dim;
  out.assign(static_cast<size_t>(shape.num_queries * shape.num_heads * head_dim), 0.0);
  magnitude.assign(out.size(), 0.0);
  std::vector<double> scores(static_cast<size_t>(shape.num_queries * num_keys));
  for (int64_t h = 0; h < shape.num_heads; ++h) {
    const int64_t kv = h / group;
    for (int64_t i = 0; i < shape.num_queries; ++i) {
      for (int64_t j = 0; j < num_keys; ++j) {
        double dot = 0.0;
        for (int64_t d = 0; d < head_dim; ++d) {
          dot += static_cast<double>(q[(i * shape.num_heads + h) * head_dim + d]) *
                 k[(j * shape.num_kv_heads + kv) * head_dim + d];
        }
        const bool visible = j <= shape.first_position + i;
        scores[i * num_keys + j] = visible ? dot / std::sqrt(static_cast<double>(head_dim)) : -INFINITY;
      }
    }
    for (int64_t i = 0; i < shape.num_queries; ++i) {
      double* row = &scores[i * num_keys];
      const double max_score = *std::max_element(row, row + num_keys);
      double total = 0.0;
      for (int64_t j = 0; j < num_keys; ++j) total += (row[j] = std::exp(row[j] - max_score));
      for (int64_t j = 0; j < num_keys; ++j) row[j] /= total;
      for (int64_t d = 0; d < head_dim; ++d) {
        double sum = 0.0, abs_sum = 0.0;
        for (int64_t j = 0; j < num_keys; ++j) {
          const double value = v[(j * shape.num_kv_heads + kv) * head_dim + d];
          sum += row[j] * value;
          abs_sum += row[j] * std::abs(value);
        }
        out[(i * shape.num_heads + h) * head_dim + d] = sum;
        magnitude[(i * shape.num_heads + h) * head_dim + d] = abs_sum;
      }
    }
  }
}

inline std::vector<double> reference_silu_mul(const std::vector<float>& gate, const std::vector<float>& up) {
  std::vector<double> out(gate.size());
  for (size_t i = 0; i < gate.size(); ++i) {
    const double g = gate[i];
    out[i] = g / (1.0 + std::exp(-g)) * up[i];
  }
  return out;
}

// Full sort of the present experts by (probability descending, id ascending).
inline void reference_route_top_k(const std::vector<float>& logits, const std::vector<uint8_t>& present,
                                  const RouteShape& shape, std::vector<int32_t>& ids,
                                  std::vector<double>& weights) {
  ids.assign(static_cast<size_t>(shape.num_tokens * shape.top_k), -1);
  weights.assign(ids.size(), 0.0);
  for (int64_t t = 0; t < shape.num_tokens; ++t) {
    std::vector<std::pair<double, int32_t>> candidates;
    double max_logit = -INFINITY;
    for (int64_t e = 0; e < shape.num_experts; ++e) {
      if (present[e]) max_logit = std::max<double>(max_logit, logits[t * shape.num_experts + e]);
    }
    double total = 0.0;
    for (int64_t e = 0; e < shape.num_experts; ++e) {
      if (!present[e]) continue;
      const double p = std::exp(logits[t * shape.num_experts + e] - max_logit);
      total += p;
      candidates.emplace_back(p, static_cast<int32_t>(e));
    }
    for (auto& candidate : candidates) candidate.first /= total;
    std::sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    double selected = 0.0;
    for (int64_t j = 0; j < shape.top_k; ++j) selected += candidates[j].first;
    for (int64_t j = 0; j < shape.top_k; ++j) {
      ids[t * shape.top_k + j] = candidates[j].second;
      weights[t * shape.top_k + j] = candidates[j].first / (shape.normalize_top_k ? selected : 1.0);
    }
  }
}

// ---- calls every backend must reject with kInvalidArgument before touching memory ----

struct InvalidCall {
  std::string name;
  std::string expected_text;  // must appear in the error message
  // present3of8 points to 8 bytes {1, 1, 1, 0, 0, 0, 0, 0} in the backend's memory; the other
  // pointers are null, so a call that reads or writes before validating crashes the test.
  std::function<void(Backend&, const uint8_t* present3of8)> call;
};

inline std::vector<InvalidCall> invalid_calls() {
  return {
      {"linear negative rows", "rows = -1 is negative",
       [](Backend& b, const uint8_t*) { b.linear(nullptr, nullptr, nullptr, -1, 4, 4); }},
      {"rms_norm negative dim", "dim = -2 is negative",
       [](Backend& b, const uint8_t*) { b.rms_norm(nullptr, nullptr, nullptr, 1, -2, 1e-6f); }},
      {"rope odd head_dim", "head_dim = 3 is odd",
       [](Backend& b, const uint8_t*) { b.rope(nullptr, nullptr, 1, 1, 3, 1e4); }},
      {"rope theta 0", "theta = 0",
       [](Backend& b, const uint8_t*) { b.rope(nullptr, nullptr, 1, 1, 4, 0.0); }},
      {"attention heads not a multiple of kv heads", "num_heads = 6 is not a multiple of num_kv_heads = 4",
       [](Backend& b, const uint8_t*) { b.attention(nullptr, nullptr, nullptr, nullptr, 1, 1, 0, 6, 4, 8); }},
      {"attention zero kv heads", "num_kv_heads = 0 must be >= 1",
       [](Backend& b, const uint8_t*) { b.attention(nullptr, nullptr, nullptr, nullptr, 1, 1, 0, 4, 0, 8); }},
      {"attention too few keys", "num_keys = 5 must equal first_position + num_queries = 3 + 4",
       [](Backend& b, const uint8_t*) { b.attention(nullptr, nullptr, nullptr, nullptr, 4, 5, 3, 4, 2, 8); }},
      {"attention negative first_position", "first_position = -1 is negative",
       [](Backend& b, const uint8_t*) {
         b.attention(nullptr, nullptr, nullptr, nullptr, 2, 1, -1, 4, 2, 8);
       }},
      {"silu_mul negative n", "n = -1 is negative",
       [](Backend& b, const uint8_t*) { b.silu_mul(nullptr, nullptr, nullptr, -1); }},
      {"route_top_k top_k above present experts", "top_k = 4 exceeds the 3 present experts (of 8)",
       [](Backend& b, const uint8_t* present) {
         b.route_top_k(nullptr, present, nullptr, nullptr, 2, 8, 4, true);
       }},
      {"route_top_k top_k 0", "top_k = 0 must be >= 1",
       [](Backend& b, const uint8_t* present) {
         b.route_top_k(nullptr, present, nullptr, nullptr, 2, 8, 0, true);
       }},
      {"scaled_add_rows negative rows", "rows = -3 is negative",
       [](Backend& b, const uint8_t*) { b.scaled_add_rows(nullptr, nullptr, nullptr, -3, 4); }},
      {"add negative n", "n = -5 is negative",
       [](Backend& b, const uint8_t*) { b.add(nullptr, nullptr, -5); }},
  };
}

// Hash of the running test's full name: a stable per-case index for case_generator().
inline uint64_t current_case_index() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return std::hash<std::string>{}(std::string(info->test_suite_name()) + "." + info->name());
}

// ---- parameter names for the shape tables ----

inline std::string name_of(const LinearShape& s) {
  return "rows" + std::to_string(s.rows) + "_in" + std::to_string(s.in_dim) + "_out" +
         std::to_string(s.out_dim);
}
inline std::string name_of(const RmsNormShape& s) {
  return "rows" + std::to_string(s.rows) + "_dim" + std::to_string(s.dim);
}
inline std::string name_of(const RopeShape& s) {
  return "tokens" + std::to_string(s.num_tokens) + "_heads" + std::to_string(s.num_heads) + "_dim" +
         std::to_string(s.head_dim) + "_theta" + std::to_string(static_cast<int64_t>(s.theta)) + "_maxpos" +
         std::to_string(s.max_position);
}
inline std::string name_of(const AttentionShape& s) {
  return "q" + std::to_string(s.num_queries) + "_from" + std::to_string(s.first_position) + "_heads" +
         std::to_string(s.num_heads) + "_kv" + std::to_string(s.num_kv_heads) + "_dim" +
         std::to_string(s.head_dim) + "_amp" + std::to_string(static_cast<int>(s.amplitude));
}
inline std::string name_of(const SiluMulShape& s) {
  return "n" + std::to_string(s.n) + "_amp" + std::to_string(static_cast<int>(s.gate_amplitude));
}
inline std::string name_of(const RouteShape& s) {
  static const char* kPresentNames[] = {"all", "third_absent", "third_absent_high", "exactly_k",
                                        "random_half"};
  static const char* kLogitNames[] = {"separated", "offset1000", "ties"};
  return "tokens" + std::to_string(s.num_tokens) + "_experts" + std::to_string(s.num_experts) + "_k" +
         std::to_string(s.top_k) + (s.normalize_top_k ? "_norm_" : "_raw_") +
         kPresentNames[static_cast<int>(s.present)] + "_" + kLogitNames[static_cast<int>(s.logits)];
}
// gtest prints parameters with these (found by ADL) instead of as raw bytes.
inline void PrintTo(const LinearShape& s, std::ostream* os) { *os << name_of(s); }
inline void PrintTo(const RmsNormShape& s, std::ostream* os) { *os << name_of(s); }
inline void PrintTo(const RopeShape& s, std::ostream* os) { *os << name_of(s); }
inline void PrintTo(const AttentionShape& s, std::ostream* os) { *os << name_of(s); }
inline void PrintTo(const SiluMulShape& s, std::ostream* os) { *os << name_of(s); }
inline void PrintTo(const RouteShape& s, std::ostream* os) { *os << name_of(s); }

struct ParamName {
  template <typename T>
  std::string operator()(const ::testing::TestParamInfo<T>& info) const {
    return name_of(info.param);
  }
};

// Rows x dim for scaled_add_rows, and n for add (as rows 1).
struct RowsShape {
  int64_t rows, dim;
};
inline const std::vector<RowsShape> kRowsShapes = {{1, 1}, {3, 17}, {17, 130}, {130, 3}, {1, 100003}};
inline std::string name_of(const RowsShape& s) {
  return "rows" + std::to_string(s.rows) + "_dim" + std::to_string(s.dim);
}
inline void PrintTo(const RowsShape& s, std::ostream* os) { *os << name_of(s); }

}  // namespace epic::kernel_test
