// The expert-parallel mode choice and the low-latency block sizes (worker/ep_mode.h), on the host: the
// values every rank computes alike from the agreed step size, and the flag errors epic run reports.
#include "worker/ep_mode.h"

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "kernels/error.h"

namespace epic {
namespace {

void expect_invalid(const std::function<void()>& call, const std::string& fragment) {
  try {
    call();
    ADD_FAILURE() << "no error; expected one containing '" << fragment << "'";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

TEST(EpMode, ParsesTheThreeModesAndNamesThemBack) {
  for (EpMode mode : {EpMode::kAuto, EpMode::kNormal, EpMode::kLowLatency})
    EXPECT_EQ(parse_ep_mode(ep_mode_name(mode)), mode);
  EXPECT_EQ(parse_ep_mode("low-latency"), EpMode::kLowLatency);
  expect_invalid([] { parse_ep_mode("lowlatency"); }, "--ep-mode");
  expect_invalid([] { parse_ep_mode(""); }, "use auto, normal or low-latency");
}

TEST(EpMode, CapacityIsTheNextPowerOfTwoOfTheBound) {
  EXPECT_EQ(low_latency_capacity(1), 1);
  EXPECT_EQ(low_latency_capacity(2), 2);
  EXPECT_EQ(low_latency_capacity(3), 4);
  EXPECT_EQ(low_latency_capacity(256), 256);
  EXPECT_EQ(low_latency_capacity(257), 512);
  EXPECT_EQ(low_latency_capacity(kMaxLowLatencyMaxTokens), kMaxLowLatencyMaxTokens);
  expect_invalid([] { low_latency_capacity(0); }, "--ep-low-latency-max-tokens");
  expect_invalid([] { low_latency_capacity(-5); }, "--ep-low-latency-max-tokens");
  expect_invalid([] { low_latency_capacity(kMaxLowLatencyMaxTokens + 1); }, "--ep-low-latency-max-tokens");
}

TEST(EpMode, StepBoundFollowsTheAgreedRowsWithinTheBound) {
  // Every row count up to past the bound, for a bound that is a power of two and one that is not.
  for (int64_t bound : {int64_t{256}, int64_t{300}}) {
    for (int64_t rows = 0; rows <= 700; ++rows) {
      SCOPED_TRACE("bound " + std::to_string(bound) + ", rows " + std::to_string(rows));
      EXPECT_EQ(low_latency_step_tokens(EpMode::kNormal, bound, rows), 0);
      const int64_t automatic = low_latency_step_tokens(EpMode::kAuto, bound, rows);
      if (rows > bound) {
        EXPECT_EQ(automatic, 0);  // prefill-sized: the normal mode
        expect_invalid([&] { low_latency_step_tokens(EpMode::kLowLatency, bound, rows); },
                       "--ep-low-latency-max-tokens " + std::to_string(bound));
        continue;
      }
      // The next power of two of max(rows, 1): a padded decode bucket fits, and it fits the capacity.
      int64_t expected = 1;
      while (expected < rows) expected *= 2;
      EXPECT_EQ(automatic, expected);
      EXPECT_EQ(low_latency_step_tokens(EpMode::kLowLatency, bound, rows), expected);
      EXPECT_LE(automatic, low_latency_capacity(bound));
    }
  }
  EXPECT_THROW(low_latency_step_tokens(EpMode::kAuto, 256, -1), Error);
  expect_invalid([] { low_latency_step_tokens(EpMode::kAuto, 0, 1); }, "--ep-low-latency-max-tokens");
}

TEST(EpMode, BlockBytesAreTheHeaderThenTheRecords) {
  EXPECT_EQ(low_latency_block_bytes(0, 16), kLowLatencyHeaderBytes);
  EXPECT_EQ(low_latency_block_bytes(1, 4160), kLowLatencyHeaderBytes + 4160);
  EXPECT_EQ(low_latency_block_bytes(256, 4160), kLowLatencyHeaderBytes + 256 * 4160);
  EXPECT_EQ(kLowLatencyHeaderBytes % 16, 0);            // records stay 16-byte aligned after the header
  EXPECT_THROW(low_latency_block_bytes(4, 20), Error);  // records are padded to 16 bytes
  EXPECT_THROW(low_latency_block_bytes(-1, 16), Error);
}

TEST(EpMode, FlagChecksNameTheFlag) {
  EXPECT_NO_THROW(check_ep_mode_flags(EpMode::kAuto, 256, false));
  EXPECT_NO_THROW(check_ep_mode_flags(EpMode::kNormal, 1, false));
  EXPECT_NO_THROW(check_ep_mode_flags(EpMode::kLowLatency, 4096, true));
  expect_invalid([] { check_ep_mode_flags(EpMode::kLowLatency, 256, false); }, "--ep-mode low-latency");
  expect_invalid([] { check_ep_mode_flags(EpMode::kAuto, 0, true); }, "--ep-low-latency-max-tokens");
  EXPECT_NO_THROW(check_ep_overlap_flag(false, EpMode::kLowLatency, false));
  EXPECT_NO_THROW(check_ep_overlap_flag(true, EpMode::kAuto, true));
  EXPECT_NO_THROW(check_ep_overlap_flag(true, EpMode::kNormal, true));
  expect_invalid([] { check_ep_overlap_flag(true, EpMode::kNormal, false); },
                 "--ep-overlap overlaps the NCCL");
  expect_invalid([] { check_ep_overlap_flag(true, EpMode::kLowLatency, true); },
                 "--ep-mode low-latency has none");
}

}  // namespace
}  // namespace epic
