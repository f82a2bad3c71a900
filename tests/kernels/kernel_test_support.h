// Shared by the kernel tests: the per-run seed, random inputs that are never zero, NaN-filled
// outputs, bf16 rounding, double-precision reference ops and an element-wise comparison that
// reports the worst element and how many were never written.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "kernels/backend.h"
#include "tests/kernels/reference_linear.h"

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

// bf16 (round to nearest even) and back: inputs of a bf16 run are rounded once on the host, so the
// reference and every backend compute from the same values.
inline uint16_t to_bf16_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if (std::isnan(value)) return static_cast<uint16_t>((bits >> 16) | 0x40);  // stays a quiet NaN
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}
inline float from_bf16_bits(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}
inline void round_to_bf16(std::vector<float>& values) {
  for (float& value : values) value = from_bf16_bits(to_bf16_bits(value));
}

// ---- double-precision references, written independently of the backends ----

// reference_linear: tests/kernels/reference_linear.h (shared with the CUDA micro-benchmarks).

// One row: x / sqrt(mean(x^2) + eps) * weight.
inline void reference_rms_norm_row(const float* x, const float* weight, int64_t dim, double eps, double* y) {
  double mean_square = 0.0;
  for (int64_t i = 0; i < dim; ++i) mean_square += static_cast<double>(x[i]) * x[i];
  mean_square /= static_cast<double>(dim);
  for (int64_t i = 0; i < dim; ++i) y[i] = x[i] / std::sqrt(mean_square + eps) * weight[i];
}

// Rotate-half rotary embedding of one head vector x (double) at a position; magnitude = |x_i cos| +
// |x_{i+half} sin| (the terms the rotation adds).
inline void reference_rope_head(const double* x, int64_t head_dim, int32_t position, double theta, double* y,
                                double* magnitude) {
  const int64_t half = head_dim / 2;
  for (int64_t i = 0; i < half; ++i) {
    const double angle =
        position * std::pow(theta, -2.0 * static_cast<double>(i) / static_cast<double>(head_dim));
    const double c = std::cos(angle), s = std::sin(angle);
    const double first = x[i], second = x[i + half];
    y[i] = first * c - second * s;
    y[i + half] = second * c + first * s;
    magnitude[i] = std::abs(first * c) + std::abs(second * s);
    magnitude[i + half] = std::abs(second * c) + std::abs(first * s);
  }
}

// Softmax attention of one query head vector q over keys given by row pointers (num_keys of
// them), each key's head vector of head_dim; out and magnitude (= sum_j p_j |v_j[d]|) of head_dim.
inline void reference_attention_head(const float* q, const std::vector<const float*>& keys,
                                     const std::vector<const float*>& values, int64_t head_dim, double* out,
                                     double* magnitude) {
  std::vector<double> scores(keys.size());
  for (size_t j = 0; j < keys.size(); ++j) {
    double dot = 0.0;
    for (int64_t d = 0; d < head_dim; ++d) dot += static_cast<double>(q[d]) * keys[j][d];
    scores[j] = dot / std::sqrt(static_cast<double>(head_dim));
  }
  const double max_score = *std::max_element(scores.begin(), scores.end());
  double total = 0.0;
  for (double& score : scores) total += (score = std::exp(score - max_score));
  for (int64_t d = 0; d < head_dim; ++d) {
    double sum = 0.0, abs_sum = 0.0;
    for (size_t j = 0; j < keys.size(); ++j) {
      sum += scores[j] / total * values[j][d];
      abs_sum += scores[j] / total * std::abs(values[j][d]);
    }
    out[d] = sum;
    magnitude[d] = abs_sum;
  }
}

inline double reference_silu(double g) { return g / (1.0 + std::exp(-g)); }

// Full sort of the present experts by (probability descending, id ascending).
inline void reference_route_top_k(const float* logits, const uint8_t* present, int64_t num_tokens,
                                  int64_t num_experts, int64_t top_k, bool normalize, int32_t* ids,
                                  double* weights) {
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::vector<std::pair<double, int32_t>> candidates;
    double max_logit = -INFINITY;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (present[e]) max_logit = std::max<double>(max_logit, logits[t * num_experts + e]);
    }
    double total = 0.0;
    for (int64_t e = 0; e < num_experts; ++e) {
      if (!present[e]) continue;
      const double p = std::exp(logits[t * num_experts + e] - max_logit);
      total += p;
      candidates.emplace_back(p, static_cast<int32_t>(e));
    }
    for (auto& candidate : candidates) candidate.first /= total;
    std::sort(candidates.begin(), candidates.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    double selected = 0.0;
    for (int64_t j = 0; j < top_k; ++j) selected += candidates[j].first;
    for (int64_t j = 0; j < top_k; ++j) {
      ids[t * top_k + j] = candidates[j].second;
      weights[t * top_k + j] = candidates[j].first / (normalize ? selected : 1.0);
    }
  }
}

// Hash of the running test's full name: a stable per-case index for case_generator().
inline uint64_t current_case_index() {
  const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
  return std::hash<std::string>{}(std::string(info->test_suite_name()) + "." + info->name());
}

}  // namespace epic::kernel_test
