// Greedy picks the argmax; sampling is reproducible per seed and follows the distribution.
#include "worker/sampler.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "kernels/error.h"
#include "temp_dir.h"
#include "tests/support/expect_error.h"
#include "worker/npy_file.h"

namespace epic {
namespace {

TEST(Sampler, GreedyIsArgmaxWithLowestIdOnTies) {
  Sampler greedy(SamplingOptions{});
  const std::vector<float> logits = {0.1f, 3.0f, -2.0f, 3.0f};
  EXPECT_EQ(greedy.sample(logits), 1);
}

TEST(Sampler, SameSeedSameTokensAndFrequenciesFollowSoftmax) {
  const std::vector<float> logits = {0.0f, std::log(2.0f), std::log(5.0f), -30.0f};
  Sampler a({1.0, 1.0, 42}), b({1.0, 1.0, 42});
  std::vector<int> counts(4, 0);
  const int draws = 40000;
  for (int i = 0; i < draws; ++i) {
    const int32_t token = a.sample(logits);
    ASSERT_EQ(token, b.sample(logits));
    counts[token]++;
  }
  // Probabilities 1/8, 2/8, 5/8, ~0; 40000 draws: 5 sigma is under 0.013.
  EXPECT_NEAR(counts[0] / double(draws), 0.125, 0.013);
  EXPECT_NEAR(counts[1] / double(draws), 0.25, 0.013);
  EXPECT_NEAR(counts[2] / double(draws), 0.625, 0.013);
}

TEST(Sampler, TopPKeepsOnlyTheNucleus) {
  const std::vector<float> logits = {0.0f, std::log(2.0f), std::log(5.0f)};
  Sampler sampler({1.0, 0.6, 7});  // 5/8 >= 0.6: only token 2 is kept
  for (int i = 0; i < 200; ++i) EXPECT_EQ(sampler.sample(logits), 2);
}

TEST(Sampler, RejectsBadOptions) {
  EXPECT_THROW(Sampler({-1.0, 1.0, 0}), Error);
  EXPECT_THROW(Sampler({NAN, 1.0, 0}), Error);
  EXPECT_THROW(Sampler({1.0, 0.0, 0}), Error);
  EXPECT_THROW(Sampler({1.0, 1.5, 0}), Error);
}

// An argmax over NaN would give token 0 (no comparison with NaN is true): that must be an error.
TEST(Sampler, NonFiniteLogitsAreAnErrorNeverToken0) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (double temperature : {0.0, 1.0}) {
    Sampler sampler({temperature, 0.9, 1});
    for (const std::vector<float>& logits :
         {std::vector<float>{nan, nan, nan}, std::vector<float>{nan, 5.0f, 1.0f},
          std::vector<float>{1.0f, inf, 2.0f}, std::vector<float>{-inf, 0.0f}}) {
      testing::expect_error([&] { sampler.sample(logits); }, ErrorCode::kInvalidCheckpoint,
                            {"logits", "not finite", "overflowed"});
    }
  }
}

TEST(CheckLogitsFinite, NamesSequenceStepFirstBadTokenAndKind) {
  std::vector<float> logits(100, 0.5f);
  EXPECT_NO_THROW(check_logits_finite(logits, 3, 7));
  logits[41] = std::numeric_limits<float>::quiet_NaN();
  logits[60] = std::numeric_limits<float>::infinity();
  testing::expect_error([&] { check_logits_finite(logits, 3, 7); }, ErrorCode::kInvalidCheckpoint,
                        {"sequence 3, decode step 7", "NaN at token id 41", "2 of 100", "overflowed"});
  logits[41] = 0.0f;
  testing::expect_error([&] { check_logits_finite(logits, 0, 0); }, ErrorCode::kInvalidCheckpoint,
                        {"sequence 0, prefill (step 0)", "+Inf at token id 60", "1 of 100"});
  logits[60] = -std::numeric_limits<float>::infinity();
  testing::expect_error([&] { check_logits_finite(logits, 2, 1); }, ErrorCode::kInvalidCheckpoint,
                        {"sequence 2, decode step 1", "-Inf at token id 60"});
}

TEST(NpyFile, RoundTripsShapeAndValues) {
  testing::TempDir temp;
  const std::vector<float> values = {1.5f, -2.0f, 3.25f, 0.0f, 7.0f, -0.5f};
  write_npy_f32(temp.path() / "a.npy", {2, 3}, values);
  const NpyArray array = read_npy_f32(temp.path() / "a.npy");
  EXPECT_EQ(array.shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(array.values, values);
  // The header is padded so the data starts on a 64-byte boundary, as NumPy writes it.
  EXPECT_EQ(std::filesystem::file_size(temp.path() / "a.npy") % 64, (values.size() * 4) % 64);
}

}  // namespace
}  // namespace epic
