// The property both placement plan readers keep: an accepted plan survives the other format.
#pragma once

#include <cstdio>
#include <string>

#include "coordinator/placement.h"
#include "tests/fuzz/fuzz_support.h"

namespace epic::fuzz {

// JSON -> plan -> bytes -> plan -> JSON gives the same JSON text, and neither reader refuses what
// the writers produced from an accepted plan.
inline void require_plan_round_trips(const PlacementPlan& plan) {
  const std::string json_text = plan.to_json_text();
  std::string json_again, bytes_json;
  try {
    json_again = PlacementPlan::from_json_text(json_text, "fuzz/printed-plan.json").to_json_text();
    bytes_json = PlacementPlan::from_cereal_bytes(plan.to_cereal_bytes()).to_json_text();
  } catch (const Error& error) {
    std::fprintf(stderr, "an accepted plan printed as\n%s\nis refused: %s\n", json_text.c_str(),
                 error.what());
    EPIC_FUZZ_REQUIRE(false, "a reader refuses what the writers made of an accepted plan");
  }
  EPIC_FUZZ_REQUIRE(json_again == json_text, "a plan's JSON does not read back to itself");
  EPIC_FUZZ_REQUIRE(bytes_json == json_text, "a plan's cereal bytes do not read back to itself");
  for (const LayerPlacement& layer : plan.layers) {
    for (int64_t expert = 0; expert < layer.num_experts; ++expert) {
      if (layer.expert_workers[expert].empty()) continue;  // masked
      const int worker =
          plan.worker_for(layer.layer, expert, /*occurrence_key=*/static_cast<uint64_t>(expert));
      EPIC_FUZZ_REQUIRE(plan.hosts(worker, layer.layer, expert),
                        "worker_for names a worker that lacks the expert");
    }
  }
}

}  // namespace epic::fuzz
