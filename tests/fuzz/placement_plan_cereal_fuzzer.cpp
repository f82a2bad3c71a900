// Fuzzes PlacementPlan::from_cereal_bytes, the coordinator -> worker wire format: corrupt bytes are
// an epic::Error (never a huge allocation or a crash); an accepted plan round-trips.
#include <cstdint>

#include "tests/fuzz/placement_plan_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  epic::fuzz::expect_only_epic_errors([&] {
    epic::fuzz::require_plan_round_trips(
        epic::PlacementPlan::from_cereal_bytes(epic::fuzz::as_text(data, size)));
  });
  return 0;
}
