// epic eval's arithmetic (worker/quality_metrics.h): windows that score every token once, the per-token
// figures on hand-worked rows, and the CPU backend's scoring ops giving the same figures.
#include "worker/quality_metrics.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <random>
#include <span>
#include <vector>

#include "kernels/backend.h"
#include "kernels/error.h"
#include "worker/sampler.h"

namespace epic {
namespace {

TEST(SlidingWindows, ScoreEveryTokenOnceWithTheContextTheWindowGives) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  for (int trial = 0; trial < 500; ++trial) {
    const int64_t tokens = std::uniform_int_distribution<int64_t>(2, 3000)(rng);
    const int64_t window = std::uniform_int_distribution<int64_t>(2, 600)(rng);
    const int64_t stride = std::uniform_int_distribution<int64_t>(1, window)(rng);
    SCOPED_TRACE(std::to_string(tokens) + " tokens, window " + std::to_string(window) + ", stride " +
                 std::to_string(stride));
    const std::vector<EvalWindow> windows = sliding_windows(tokens, window, stride);
    std::vector<int> scored(tokens, 0);
    for (size_t w = 0; w < windows.size(); ++w) {
      const EvalWindow& x = windows[w];
      ASSERT_EQ(x.begin, static_cast<int64_t>(w) * stride);
      ASSERT_LE(x.end - x.begin, window);
      ASSERT_GT(x.first_target, x.begin);  // a target always has a token before it in its window
      ASSERT_LE(x.first_target, x.end);
      for (int64_t t = x.first_target; t < x.end; ++t) ++scored[t];
    }
    EXPECT_EQ(scored[0], 0);
    for (int64_t t = 1; t < tokens; ++t) {
      // With stride = window a window's first token has no context in it: the one token not scored.
      const bool window_start = stride == window && t % window == 0;
      ASSERT_EQ(scored[t], window_start ? 0 : 1) << "token " << t;
    }
    EXPECT_EQ(windows.back().end, tokens);
  }
}

TEST(SlidingWindows, HandWorked) {
  const std::vector<EvalWindow> windows = sliding_windows(10, 4, 2);
  // [0,4) scores 1..3; [2,6) scores 4,5 with context 2,3; [4,8) 6,7; [6,10) 8,9.
  ASSERT_EQ(windows.size(), 4u);
  EXPECT_EQ(windows[0].first_target, 1);
  EXPECT_EQ(windows[1].begin, 2);
  EXPECT_EQ(windows[1].first_target, 4);
  EXPECT_EQ(windows[1].end, 6);
  EXPECT_EQ(windows[3].begin, 6);
  EXPECT_EQ(windows[3].end, 10);
  // Stride = window: windows side by side, each one's first token unscored.
  const std::vector<EvalWindow> side_by_side = sliding_windows(10, 4, 4);
  ASSERT_EQ(side_by_side.size(), 3u);
  EXPECT_EQ(side_by_side[1].begin, 4);
  EXPECT_EQ(side_by_side[1].first_target, 5);
  EXPECT_EQ(side_by_side[2].first_target, 9);
  // A text shorter than the window: one window.
  EXPECT_EQ(sliding_windows(5, 256, 128).size(), 1u);
}

TEST(SlidingWindows, RefusesWhatCannotBeScored) {
  EXPECT_THROW(sliding_windows(10, 1, 1), Error);
  EXPECT_THROW(sliding_windows(10, 4, 0), Error);
  EXPECT_THROW(sliding_windows(10, 4, 5), Error);
  EXPECT_THROW(sliding_windows(1, 4, 2), Error);
}

TEST(TokenQuality, HandWorkedRow) {
  // Reference logits (0, 0): p = (1/2, 1/2). Variant logits (ln 3, 0): q = (3/4, 1/4).
  const std::vector<float> reference = log_softmax(std::vector<float>{0.0f, 0.0f});
  EXPECT_NEAR(reference[0], std::log(0.5), 1e-7);
  const std::vector<float> variant{static_cast<float>(std::log(3.0)), 0.0f};
  TokenQuality quality;
  add_token_quality(reference, 0, variant, 1, quality);
  // KL = 1/2 ln((1/2)/(3/4)) + 1/2 ln((1/2)/(1/4)) = 1/2 ln(4/3); NLL of token 1 = -ln(1/4).
  EXPECT_NEAR(quality.kl_sum, 0.5 * std::log(4.0 / 3.0), 1e-7);
  EXPECT_NEAR(quality.nll_sum, std::log(4.0), 1e-7);
  EXPECT_EQ(quality.agreements, 1);  // both argmax 0 (the reference's tie goes to the lower id)
  add_token_quality(reference, 1, variant, 0, quality);
  EXPECT_EQ(quality.agreements, 1);  // reference argmax 1 this time: no agreement
  EXPECT_EQ(quality.tokens, 2);
  EXPECT_NEAR(quality.perplexity(), std::exp((std::log(4.0) + std::log(4.0 / 3.0)) / 2), 1e-6);
  EXPECT_DOUBLE_EQ(quality.top1_agreement(), 0.5);
}

TEST(TokenQuality, ARowAgainstItselfHasNoDivergence) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.0f, 4.0f);
  std::vector<float> row(5000);
  for (float& v : row) v = normal(rng);
  TokenQuality quality;
  const std::vector<float> log_probs = log_softmax(row);
  double total = 0;
  for (float lp : log_probs) total += std::exp(double(lp));
  EXPECT_NEAR(total, 1.0, 1e-5);
  const int64_t best = std::max_element(row.begin(), row.end()) - row.begin();
  add_token_quality(log_probs, best, row, 17, quality);
  EXPECT_NEAR(quality.kl_sum, 0.0, 1e-6);
  EXPECT_EQ(quality.agreements, 1);
  EXPECT_NEAR(quality.nll_sum, -log_probs[17], 1e-5);
}

TEST(TokenQuality, RefusesMismatchedRows) {
  TokenQuality quality;
  EXPECT_THROW(add_token_quality(std::vector<float>{0.0f, 0.0f}, 0, std::vector<float>{0.0f}, 0, quality),
               Error);
  EXPECT_THROW(add_token_quality(std::vector<float>{0.0f}, 0, std::vector<float>{0.0f}, 1, quality), Error);
}

// The CPU backend's scoring ops (what epic eval runs on every backend) against add_token_quality row by
// row, on rows that are never zero, with ties for the maximum: the same arithmetic, so the same
// figures (the KL rounded once to the op's fp32 column). Also log_softmax against the host function and
// the argmax against the sampler's.
TEST(TokenQuality, CpuBackendScoringOpsGiveAddTokenQualitysFigures) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> magnitude(0.3f, 6.0f);
  std::bernoulli_distribution negative(0.5);
  const auto random_row = [&](int64_t vocab) {
    std::vector<float> row(static_cast<size_t>(vocab));
    for (float& v : row) v = magnitude(rng) * (negative(rng) ? -1.0f : 1.0f);
    return row;
  };
  const std::unique_ptr<Backend> backend = make_cpu_backend(3);
  struct Shape {
    int64_t rows, vocab;
  };
  for (const Shape s : {Shape{1, 1000}, Shape{7, 151936}, Shape{30, 1001}}) {
    SCOPED_TRACE(std::to_string(s.rows) + " rows of " + std::to_string(s.vocab));
    std::uniform_int_distribution<int32_t> id(0, static_cast<int32_t>(s.vocab - 1));
    const OwnedTensor reference_logits = backend->new_tensor(ScalarType::kF32, {s.rows, s.vocab});
    const OwnedTensor logits = backend->new_tensor(ScalarType::kF32, {s.rows, s.vocab});
    const OwnedTensor targets = backend->new_tensor(ScalarType::kI32, {s.rows});
    const OwnedTensor reference_log_probs = backend->new_tensor(ScalarType::kF32, {s.rows, s.vocab});
    const OwnedTensor scores = backend->new_tensor(ScalarType::kF32, {s.rows, kNumRowScores});
    const OwnedTensor ids = backend->new_tensor(ScalarType::kI32, {s.rows});
    std::vector<int32_t> lowest_tie(static_cast<size_t>(s.rows));
    const auto row_of = [&](const OwnedTensor& t, int64_t r) {
      return std::span<float>(t.view().as<float>() + r * s.vocab, static_cast<size_t>(s.vocab));
    };
    for (int64_t r = 0; r < s.rows; ++r) {
      std::vector<float> reference_row = random_row(s.vocab), row = random_row(s.vocab);
      // Ties for the maximum (the lowest id must win): both rows in even rows, the variant in odd ones.
      const int32_t first = id(rng), second = (first + 1 + id(rng) % static_cast<int32_t>(s.vocab - 1)) %
                                              static_cast<int32_t>(s.vocab);
      row[first] = row[second] = 8.0f;
      lowest_tie[r] = std::min(first, second);
      if (r % 2 == 0) reference_row[first] = reference_row[second] = 8.0f;
      std::copy(reference_row.begin(), reference_row.end(), row_of(reference_logits, r).begin());
      std::copy(row.begin(), row.end(), row_of(logits, r).begin());
      targets.view().as<int32_t>()[r] = r == 0 ? static_cast<int32_t>(s.vocab - 1) : id(rng);
    }
    std::fill_n(scores.view().as<float>(), s.rows * kNumRowScores, std::nanf(""));
    backend->log_softmax(reference_logits, reference_log_probs);
    backend->score_rows(logits, targets, reference_log_probs, scores, ids);
    for (int64_t r = 0; r < s.rows; ++r) {
      SCOPED_TRACE("row " + std::to_string(r));
      const std::span<const float> reference_row = row_of(reference_logits, r), row = row_of(logits, r);
      EXPECT_TRUE(std::ranges::equal(log_softmax(reference_row), row_of(reference_log_probs, r)));
      const int32_t reference_argmax = argmax(reference_row);
      const int32_t target = targets.view().as<const int32_t>()[r];
      TokenQuality expected;
      add_token_quality(row_of(reference_log_probs, r), reference_argmax, row, target, expected);
      const float* figures = scores.view().as<const float>() + r * kNumRowScores;
      EXPECT_EQ(double(figures[kRowLogSumExp]) - double(figures[kRowTargetLogit]), expected.nll_sum);
      EXPECT_EQ(figures[kRowTargetLogit], row[static_cast<size_t>(target)]);
      EXPECT_EQ(figures[kRowKlDivergence], static_cast<float>(expected.kl_sum));
      EXPECT_GT(expected.kl_sum, 0.0);
      const int32_t op_argmax = ids.view().as<const int32_t>()[r];
      EXPECT_EQ(op_argmax, argmax(row));
      EXPECT_EQ(op_argmax, lowest_tie[r]) << "a tie must go to the lowest id";
      EXPECT_EQ(op_argmax == reference_argmax ? 1 : 0, expected.agreements);
    }
  }
}

}  // namespace
}  // namespace epic
