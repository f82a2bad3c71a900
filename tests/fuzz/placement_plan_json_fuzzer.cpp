// Fuzzes PlacementPlan::from_json_text (plan files written by `epic plan --out`, read back with
// --placement): a plan that breaks a rule is an epic::Error; an accepted plan round-trips.
#include <cstdint>

#include "tests/fuzz/placement_plan_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  epic::fuzz::expect_only_epic_errors([&] {
    epic::fuzz::require_plan_round_trips(
        epic::PlacementPlan::from_json_text(epic::fuzz::as_text(data, size), "fuzz/plan.json"));
  });
  return 0;
}
