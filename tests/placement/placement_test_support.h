// Helpers for the placement tests: a fresh seed (or $EPIC_TEST_SEED to replay one), random models
// with uneven and masked expert counts, uniform and Zipf load profiles, the request's expected slot
// count computed independently of the planner, and an assertion on epic::Error code and words.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <initializer_list>
#include <numeric>
#include <random>
#include <sstream>
#include <string>

#include "coordinator/placement.h"
#include "kernels/error.h"
#include "tests/support/expect_error.h"

namespace epic::testing {

// A new seed per run so that every run explores new cases; set EPIC_TEST_SEED to replay a failure.
inline uint64_t fresh_seed() {
  if (const char* text = std::getenv("EPIC_TEST_SEED")) return std::strtoull(text, nullptr, 10);
  std::random_device device;
  return (uint64_t{device()} << 32) ^ device();
}

inline std::string seed_trace(uint64_t seed) {
  return "seed " + std::to_string(seed) + " (replay with EPIC_TEST_SEED=" + std::to_string(seed) + ")";
}

inline LayerExperts all_present(int64_t layer, int64_t num_experts) {
  return LayerExperts{layer, num_experts, std::vector<uint8_t>(num_experts, 1)};
}

// Zipf(s) token counts over a random permutation of the experts: the rank-k expert gets
// scale / k^s, so the hottest experts sit at random ids (not all on worker 0 under round robin).
inline std::vector<double> zipf_counts(int64_t num_experts, double exponent, std::mt19937_64& rng,
                                       double scale = 100000.0) {
  std::vector<int64_t> order(num_experts);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<double> counts(num_experts);
  for (int64_t rank = 0; rank < num_experts; ++rank) {
    counts[order[rank]] = std::round(scale / std::pow(static_cast<double>(rank + 1), exponent));
  }
  return counts;
}

inline int64_t present_count(const LayerExperts& layer) {
  return std::count(layer.present.begin(), layer.present.end(), uint8_t{1});
}

// The slots a layer must get, derived from the request's rules (not from the planner's code).
inline int64_t expected_slots(const PlacementRequest& request, const LayerExperts& layer) {
  const int64_t present = present_count(layer);
  if (request.slots_per_worker) return std::min(*request.slots_per_worker, present);
  if (request.budget_bytes) {
    const uint64_t per_layer = *request.budget_bytes / (request.expert_bytes * request.layers.size());
    return std::min<int64_t>(static_cast<int64_t>(per_layer), present);
  }
  return (present + request.num_workers - 1) / request.num_workers;
}

// A random model and request: 1..9 workers, 1..3 MoE layers (shuffled, with gaps in the layer
// indices) of 3..128 experts with random masks, slots from the minimum to the minimum + 4 (given,
// default, or paid for by a budget), and per layer a uniform, Zipf, all-zero or absent profile.
inline PlacementRequest random_request(std::mt19937_64& rng, std::string& description) {
  auto uniform_int = [&](int64_t low, int64_t high) {
    return std::uniform_int_distribution<int64_t>(low, high)(rng);
  };
  auto chance = [&](double p) { return std::bernoulli_distribution(p)(rng); };
  std::ostringstream text;
  PlacementRequest request;
  request.num_workers = static_cast<int>(uniform_int(1, 9));
  text << request.num_workers << " workers;";
  const int64_t num_layers = uniform_int(1, 3);
  int64_t layer_index = uniform_int(0, 3);
  int64_t minimum_slots = 0;
  for (int64_t i = 0; i < num_layers; ++i) {
    LayerExperts layer = all_present(layer_index, uniform_int(3, 128));
    if (chance(0.6)) {
      const double masked_fraction = std::uniform_real_distribution<double>(0.02, 0.6)(rng);
      for (uint8_t& flag : layer.present) flag = chance(masked_fraction) ? 0 : 1;
      if (present_count(layer) == 0) layer.present[uniform_int(0, layer.num_experts - 1)] = 1;
    }
    const int64_t present = present_count(layer);
    minimum_slots = std::max(minimum_slots, (present + request.num_workers - 1) / request.num_workers);
    text << " layer " << layer.layer << ": " << layer.num_experts << " experts, " << present << " present,";
    const int profile_kind = static_cast<int>(uniform_int(0, 3));
    if (profile_kind == 0) {
      text << " no profile;";
    } else if (profile_kind == 1) {
      const double exponent = std::uniform_real_distribution<double>(1.0, 1.5)(rng);
      request.profile.load[layer.layer] = zipf_counts(layer.num_experts, exponent, rng);
      text << " Zipf(" << exponent << ");";
    } else if (profile_kind == 2) {
      request.profile.load[layer.layer] = std::vector<double>(layer.num_experts, 0.0);
      text << " all-zero profile;";
    } else {
      std::vector<double> counts(layer.num_experts, 1000.0);  // uniform but for some cold experts
      for (double& count : counts) {
        if (chance(0.3)) count = 0.0;
      }
      request.profile.load[layer.layer] = counts;
      text << " flat profile with zeros;";
    }
    request.layers.push_back(std::move(layer));
    layer_index += uniform_int(1, 3);
  }
  std::shuffle(request.layers.begin(), request.layers.end(), rng);
  const int64_t extra = uniform_int(0, 4);
  const int mode = static_cast<int>(uniform_int(0, 5));
  if (mode == 0) {
    text << " default slots";
  } else if (mode == 1) {
    request.expert_bytes = static_cast<uint64_t>(uniform_int(1, 10'000'000));
    const uint64_t per_slot = request.expert_bytes * request.layers.size();
    request.budget_bytes =
        (minimum_slots + extra) * per_slot + static_cast<uint64_t>(uniform_int(0, per_slot - 1));
    text << " budget " << *request.budget_bytes << " bytes, expert " << request.expert_bytes << " bytes";
  } else {
    request.slots_per_worker = minimum_slots + extra;
    text << " slots " << *request.slots_per_worker;
  }
  description = text.str();
  return request;
}

// Two plans are the same when every field is equal, loads bit for bit.
inline void expect_same_plan(const PlacementPlan& expected, const PlacementPlan& actual) {
  ASSERT_EQ(expected.num_workers, actual.num_workers);
  ASSERT_EQ(expected.layers.size(), actual.layers.size());
  for (size_t i = 0; i < expected.layers.size(); ++i) {
    const LayerPlacement& a = expected.layers[i];
    const LayerPlacement& b = actual.layers[i];
    SCOPED_TRACE("layer " + std::to_string(a.layer));
    EXPECT_EQ(a.layer, b.layer);
    EXPECT_EQ(a.num_experts, b.num_experts);
    EXPECT_EQ(a.slots_per_worker, b.slots_per_worker);
    EXPECT_EQ(a.worker_experts, b.worker_experts);
    EXPECT_EQ(a.expert_workers, b.expert_workers);
    EXPECT_EQ(a.expert_load, b.expert_load);
    EXPECT_EQ(a.worker_load, b.worker_load);
  }
}

}  // namespace epic::testing
