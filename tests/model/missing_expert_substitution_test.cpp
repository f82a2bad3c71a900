// --on-miss substitute's choice for one token (worker/missing_expert_substitution.h), by hand: the most
// probable routable, resident, untaken expert replaces each missing pick (ties to the lower id), the weights
// are the router's probabilities of the final choice (renormalised or not), a pick without a substitute
// stays, padding slots follow the first choice with weight 0, and nothing changes when nothing is missing.
#include "worker/missing_expert_substitution.h"

#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <set>
#include <utility>
#include <vector>

#include "kernels/error.h"
#include "tests/support/expect_error.h"

namespace epic {
namespace {

using testing::expect_error;

// Eight experts; 5 is not routable (pruned); 1, 4, 6 and 7 are resident.
const std::vector<float> kProbs = {0.30f, 0.05f, 0.20f, 0.10f, 0.10f, 0.12f, 0.10f, 0.03f};
const std::vector<uint8_t> kRoutable = {1, 1, 1, 1, 1, 0, 1, 1};
const std::set<int64_t> kResident = {1, 4, 6, 7};
const std::function<bool(int64_t)> kIsResident = [](int64_t e) { return kResident.count(e) != 0; };

TEST(MissingExpertSubstitution, MostProbableResidentUntakenWithTheRoutersWeights) {
  // Picks 0 (missing), 4 (resident), 2 (missing): 0 goes to 6 (0.10 ties 4's, but 4 is taken; 5 is not
  // routable though more probable), then 2 goes to 1 (0.05 beats 7's 0.03).
  std::vector<int32_t> ids = {0, 4, 2};
  std::vector<float> weights = {0.5f, 0.3f, 0.2f};
  std::vector<std::pair<int64_t, float>> replaced;
  const int64_t substituted =
      substitute_missing_picks(ids.data(), weights.data(), 3, kProbs, kRoutable, kIsResident,
                               /*norm_topk_prob=*/true, [&](int64_t expert, float weight) {
                                 replaced.push_back({expert, weight});
                               });
  EXPECT_EQ(substituted, 2);
  EXPECT_EQ(ids, (std::vector<int32_t>{6, 4, 1}));
  const float mass = kProbs[6] + kProbs[4] + kProbs[1];
  EXPECT_EQ(weights, (std::vector<float>{kProbs[6] / mass, kProbs[4] / mass, kProbs[1] / mass}));
  EXPECT_EQ(replaced, (std::vector<std::pair<int64_t, float>>{{0, 0.5f}, {2, 0.2f}}));

  // Without renormalisation the weights are the probabilities themselves.
  ids = {0, 4, 2};
  weights = {0.5f, 0.3f, 0.2f};
  substitute_missing_picks(ids.data(), weights.data(), 3, kProbs, kRoutable, kIsResident, false);
  EXPECT_EQ(weights, (std::vector<float>{kProbs[6], kProbs[4], kProbs[1]}));
}

TEST(MissingExpertSubstitution, APickWithoutASubstituteStaysAndPaddingFollowsTheFirstChoice) {
  // Only 4 is resident: pick 0 takes it, pick 2 has nothing left and stays. Slots 2 and 3 are padding
  // (the first choice again, weight 0): they follow the new first choice and stay weightless.
  const std::function<bool(int64_t)> only_four = [](int64_t e) { return e == 4; };
  std::vector<int32_t> ids = {0, 2, 0, 0};
  std::vector<float> weights = {0.6f, 0.4f, 0.0f, 0.0f};
  EXPECT_EQ(substitute_missing_picks(ids.data(), weights.data(), 4, kProbs, kRoutable, only_four, true), 1);
  EXPECT_EQ(ids, (std::vector<int32_t>{4, 2, 4, 4}));
  const float mass = kProbs[4] + kProbs[2];
  EXPECT_EQ(weights, (std::vector<float>{kProbs[4] / mass, kProbs[2] / mass, 0.0f, 0.0f}));
}

TEST(MissingExpertSubstitution, NothingMissingChangesNothing) {
  std::vector<int32_t> ids = {4, 6, 4};  // own k 2: slot 2 is padding
  std::vector<float> weights = {0.7f, 0.3f, 0.0f};
  EXPECT_FALSE(own_pick_missing(ids.data(), 3, kIsResident));
  EXPECT_EQ(substitute_missing_picks(ids.data(), weights.data(), 3, kProbs, kRoutable, kIsResident, true), 0);
  EXPECT_EQ(ids, (std::vector<int32_t>{4, 6, 4}));
  EXPECT_EQ(weights, (std::vector<float>{0.7f, 0.3f, 0.0f}));
  const std::vector<int32_t> missing = {4, 2};
  EXPECT_TRUE(own_pick_missing(missing.data(), 2, kIsResident));
}

TEST(MissingExpertSubstitution, ANonFiniteCandidateProbabilityIsAnError) {
  std::vector<float> probs = kProbs;
  probs[6] = std::numeric_limits<float>::quiet_NaN();
  std::vector<int32_t> ids = {0, 4};
  std::vector<float> weights = {0.5f, 0.5f};
  expect_error(
      [&] { substitute_missing_picks(ids.data(), weights.data(), 2, probs, kRoutable, kIsResident, true); },
      ErrorCode::kInvalidArgument, {"expert 6", "non-finite"});
}

}  // namespace
}  // namespace epic
