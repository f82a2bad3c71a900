// Fuzzes the run's cereal messages (launch/run_wire.h): the first byte picks the run plan (even)
// or a worker report (odd); the rest is the message. Corrupt bytes are an epic::Error, never a huge
// allocation, a crash or an invalid bool; an accepted message re-encodes to the same bytes.
#include <cstdint>

#include "coordinator/placement.h"
#include "launch/run_wire.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size == 0) return 0;
  const std::string bytes = epic::fuzz::as_text(data + 1, size - 1);
  epic::fuzz::expect_only_epic_errors([&] {
    if ((data[0] & 1) == 0) {
      const auto plan =
          epic::wire::from_bytes<epic::wire::RunPlan>(bytes, epic::wire::kRunPlanVersion, "run plan");
      EPIC_FUZZ_REQUIRE(epic::wire::to_bytes(plan) == bytes, "a run plan does not re-encode to its bytes");
      (void)epic::PlacementPlan::from_cereal_bytes(plan.placement);  // as every worker does next
    } else {
      const auto report = epic::wire::from_bytes<epic::wire::WorkerReport>(
          bytes, epic::wire::kWorkerReportVersion, "worker report");
      EPIC_FUZZ_REQUIRE(epic::wire::to_bytes(report) == bytes,
                        "a worker report does not re-encode to its bytes");
    }
  });
  return 0;
}
