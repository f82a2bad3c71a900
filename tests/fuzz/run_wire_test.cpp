// The run's wire messages (launch/run_wire.h) refuse corrupt bytes with Error(kCommunication)
// before allocating for them: counts past the end, bools that are not 0/1, trailing bytes, and
// encodings to_bytes never makes (a map key twice). Found by fuzz_run_wire.
#include "launch/run_wire.h"

#include <gtest/gtest.h>

#include <cstring>
#include <string>

namespace epic::wire {
namespace {

RunPlan sample_plan() {
  RunPlan plan;
  plan.placement = "placement bytes";
  Sequence sequence;
  sequence.sequence_id = 7;
  sequence.prompt = {9707, 1879};
  sequence.max_new_tokens = 3;
  plan.sequences.push_back(sequence);
  return plan;
}

template <typename T>
void expect_corrupt(const std::string& bytes, uint32_t version, const std::string& words) {
  try {
    (void)from_bytes<T>(bytes, version, "test");
    FAIL() << "accepted corrupt bytes; expected an error with '" << words << "'";
  } catch (const Error& error) {
    EXPECT_EQ(error.code(), ErrorCode::kCommunication);
    EXPECT_NE(std::string(error.what()).find(words), std::string::npos) << error.what();
  }
}

TEST(RunWire, RoundTripsAPlanAndAReport) {
  const RunPlan plan = sample_plan();
  const RunPlan decoded = from_bytes<RunPlan>(to_bytes(plan), kRunPlanVersion, "run plan");
  EXPECT_EQ(decoded.placement, plan.placement);
  ASSERT_EQ(decoded.sequences.size(), 1u);
  EXPECT_EQ(decoded.sequences[0].prompt, plan.sequences[0].prompt);
  WorkerReport report;
  report.rank = 2;
  report.expert_rows = {{1, {3, 4}}, {3, {5}}};
  EXPECT_EQ(from_bytes<WorkerReport>(to_bytes(report), kWorkerReportVersion, "report").expert_rows,
            report.expert_rows);
}

TEST(RunWire, RefusesACountLargerThanTheBytesLeftBeforeAllocating) {
  std::string bytes = to_bytes(sample_plan());
  // The placement string's length follows the 4-byte version: claim 2^62 bytes.
  const uint64_t huge = uint64_t{1} << 62;
  std::memcpy(bytes.data() + sizeof(uint32_t), &huge, sizeof(huge));
  expect_corrupt<RunPlan>(bytes, kRunPlanVersion, "exceeds the");
}

TEST(RunWire, RefusesABoolThatIsNeitherZeroNorOne) {
  RunPlan plan = sample_plan();
  plan.allow_missing_experts = true;
  std::string bytes = to_bytes(plan);
  ASSERT_EQ(bytes.back(), '\x01');  // allow_missing_experts is the last field
  bytes.back() = '\x02';
  expect_corrupt<RunPlan>(bytes, kRunPlanVersion, "not 0 or 1");
}

TEST(RunWire, RefusesTruncatedAndTrailingBytes) {
  const std::string bytes = to_bytes(sample_plan());
  expect_corrupt<RunPlan>(bytes.substr(0, bytes.size() - 1), kRunPlanVersion, "truncated");
  expect_corrupt<RunPlan>(bytes + "x", kRunPlanVersion, "unexpected bytes");
}

TEST(RunWire, RefusesAMapKeyTwiceInsteadOfDroppingOneEntry) {
  WorkerReport report;
  report.expert_rows = {{1, {3}}, {2, {4}}};
  std::string bytes = to_bytes(report);
  // Each entry is key (8 bytes), count (8), one row (8), and the empty expert_store string (its length, 8)
  // follows the map; turn the second key (2) into 1.
  const size_t second_key = bytes.size() - 8 - 24;
  ASSERT_EQ(bytes[second_key], '\x02');
  bytes[second_key] = '\x01';
  expect_corrupt<WorkerReport>(bytes, kWorkerReportVersion, "not the encoding");
}

}  // namespace
}  // namespace epic::wire
