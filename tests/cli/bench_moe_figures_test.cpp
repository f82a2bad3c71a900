// bench-moe's NCCL figures without a GPU: bandwidth and ratio arithmetic, the rank pairs of
// the link measurement, the per-rank columns' round trip, the report's max over ranks, the check's
// relative comparison, and the --ep-transport choice (nccl with the cpu backend is an error).
#include "launch/bench_moe_figures.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <set>

#include "kernels/error.h"
#include "launch/bench_moe_check.h"
#include "launch/bench_moe_report.h"
#include "launch/ep_transport.h"

namespace epic::cli {
namespace {

TEST(BenchMoeFigures, BandwidthRatioAndShare) {
  EXPECT_DOUBLE_EQ(gigabytes_per_second(3e9, 1.5), 2.0);
  EXPECT_DOUBLE_EQ(gigabytes_per_second(1e6, 0), 0.0);  // no time measured: no bandwidth claimed
  EXPECT_DOUBLE_EQ(gigabytes_per_second(0, 1), 0.0);
  EXPECT_DOUBLE_EQ(time_ratio(3e-3, 2e-3), 1.5);
  EXPECT_TRUE(std::isnan(time_ratio(1, 0)));
  // 120 GB in 1 s against a 150 GB/s link: 80 %.
  EXPECT_DOUBLE_EQ(link_share(120e9, 1, 150), 0.8);
  EXPECT_TRUE(std::isnan(link_share(1, 1, 0)));
}

// Every pair of ranks exactly once, each round made of disjoint pairs.
TEST(BenchMoeFigures, LinkPairRoundsCoverEveryPairOnce) {
  EXPECT_TRUE(link_pair_rounds(1).empty());
  for (int ranks : {2, 4, 8}) {
    std::set<std::pair<int, int>> seen;
    const auto rounds = link_pair_rounds(ranks);
    EXPECT_EQ(static_cast<int>(rounds.size()), ranks - 1);
    for (const auto& round : rounds) {
      std::set<int> busy;
      for (const auto& [a, b] : round) {
        EXPECT_LT(a, b);
        EXPECT_TRUE(busy.insert(a).second && busy.insert(b).second) << "rank twice in a round";
        EXPECT_TRUE(seen.insert({a, b}).second) << a << "," << b << " twice";
      }
    }
    EXPECT_EQ(static_cast<int>(seen.size()), ranks * (ranks - 1) / 2);
  }
  const auto three = link_pair_rounds(3);  // not a power of two: the pair (0, 1) alone
  ASSERT_EQ(three.size(), 1u);
  EXPECT_EQ(three[0], (std::vector<std::pair<int, int>>{{0, 1}}));
}

TEST(BenchMoeFigures, MaxOverRanksIsColumnWise) {
  EXPECT_EQ(max_over_ranks({{1, 5, -2}, {3, 4, -1}}), (std::vector<double>{3, 5, -1}));
  EXPECT_TRUE(max_over_ranks({}).empty());
  EXPECT_THROW(max_over_ranks({{1}, {1, 2}}), Error);
}

NcclRankFigures numbered_figures(double base) {
  NcclRankFigures f;
  std::vector<double> columns = f.to_columns();
  for (size_t c = 0; c < columns.size(); ++c) columns[c] = base + static_cast<double>(c);
  return NcclRankFigures::from_columns(columns);
}

TEST(BenchMoeReport, ColumnsRoundTripAndWrongCountIsAnError) {
  const NcclRankFigures f = numbered_figures(7);
  EXPECT_EQ(NcclRankFigures::from_columns(f.to_columns()).to_columns(), f.to_columns());
  EXPECT_DOUBLE_EQ(f.route_seconds, 7);
  EXPECT_DOUBLE_EQ(f.link_floor_seconds, 7 + 11);
  EXPECT_THROW(NcclRankFigures::from_columns({1, 2}), Error);
}

TEST(BenchMoeReport, JsonTakesTheSlowestRankAndTheSlowestLink) {
  NcclRankFigures fast, slow;
  fast.dispatch_seconds = 1e-3, slow.dispatch_seconds = 2e-3;
  fast.combine_seconds = 1e-3, slow.combine_seconds = 2e-3;
  fast.dispatch_bytes_off_rank = slow.dispatch_bytes_off_rank = 100e6;
  fast.combine_bytes_off_rank = slow.combine_bytes_off_rank = 200e6;
  fast.baseline_dispatch_seconds = slow.baseline_dispatch_seconds = 1e-3;
  fast.baseline_combine_seconds = 4e-3, slow.baseline_combine_seconds = 1e-3;
  fast.link_gigabytes_per_second = 300, slow.link_gigabytes_per_second = 150;
  const NcclReportShape shape{"cuda device 0: test card", 4096, 2048, 8, 128, 2, 5, 2, true, 256 << 20};
  const nlohmann::json json = nccl_report_json(shape, {fast, slow});
  EXPECT_EQ(json["per_rank"].size(), 2u);
  EXPECT_DOUBLE_EQ(json["max_over_ranks"]["dispatch_ms"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(json["max_over_ranks"]["link_gbps"].get<double>(), 150.0);  // the slowest link
  EXPECT_DOUBLE_EQ(json["dispatch_over_baseline"].get<double>(), 2.0);
  EXPECT_DOUBLE_EQ(json["combine_over_baseline"].get<double>(), 0.5);  // the max of each column
  // 300 MB in 4 ms = 75 GB/s of a 150 GB/s link.
  EXPECT_DOUBLE_EQ(json["exchange_link_share"].get<double>(), 0.5);
  EXPECT_DOUBLE_EQ(json["per_rank"][0]["dispatch_algbw_gbps"].get<double>(), 100.0);
  const std::string text = format_nccl_report(shape, {fast, slow});
  EXPECT_NE(text.find("test card"), std::string::npos) << text;
  EXPECT_NE(text.find("50.0% of the link"), std::string::npos) << text;
  // Without baselines the ratios are absent, not zero or NaN.
  NcclReportShape bare = shape;
  bare.baselines = false;
  const nlohmann::json bare_json = nccl_report_json(bare, {fast});
  EXPECT_FALSE(bare_json.contains("dispatch_over_baseline"));
  EXPECT_FALSE(bare_json["per_rank"][0].contains("link_gbps"));
}

TEST(BenchMoeCheck, RelativeMismatchesAgainstTheRowMaximum) {
  std::mt19937 random(std::random_device{}());
  std::normal_distribution<float> normal(0, 1);
  const int64_t hidden = 16, rows = 3;
  std::vector<float> expected(hidden * rows);
  for (float& value : expected) value = normal(random);
  std::vector<float> actual = expected;
  EXPECT_EQ(count_relative_mismatches(actual, expected, hidden, 1e-2, nullptr), 0);
  double row1_max = 0;
  for (int64_t i = hidden; i < 2 * hidden; ++i) row1_max = std::max(row1_max, std::fabs(double(expected[i])));
  actual[hidden + 5] = static_cast<float>(expected[hidden + 5] + 0.5e-2 * row1_max);  // inside
  EXPECT_EQ(count_relative_mismatches(actual, expected, hidden, 1e-2, nullptr), 0);
  actual[hidden + 5] = static_cast<float>(expected[hidden + 5] + 2e-2 * row1_max);  // outside
  actual[2 * hidden] = std::numeric_limits<float>::quiet_NaN();
  std::string first;
  EXPECT_EQ(count_relative_mismatches(actual, expected, hidden, 1e-2, &first), 2);
  EXPECT_NE(first.find("token 1 element 5"), std::string::npos) << first;
  EXPECT_THROW(count_relative_mismatches(actual, expected, 5, 1e-2, nullptr), Error);
}

TEST(EpTransport, ChoiceAndErrors) {
  EXPECT_EQ(choose_ep_transport("auto", true, 2, true), EpTransport::kNccl);
  EXPECT_EQ(choose_ep_transport("auto", true, 2, false), EpTransport::kHost);
  EXPECT_EQ(choose_ep_transport("auto", true, 1, true), EpTransport::kLocal);
  EXPECT_EQ(choose_ep_transport("auto", false, 4, true), EpTransport::kHost);
  EXPECT_EQ(choose_ep_transport("host", true, 1, true), EpTransport::kHost);
  EXPECT_EQ(choose_ep_transport("nccl", true, 1, true), EpTransport::kNccl);
  const auto code_of = [](auto call) {
    try {
      call();
    } catch (const Error& error) {
      return error.code();
    }
    return ErrorCode::kInternal;  // no throw: a value no error of these has
  };
  EXPECT_EQ(code_of([] { choose_ep_transport("nccl", false, 2, true); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { choose_ep_transport("nccl", true, 2, false); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { check_ep_transport_flag("nccl", "cpu"); }), ErrorCode::kInvalidArgument);
  EXPECT_EQ(code_of([] { check_ep_transport_flag("tcp", "cuda"); }), ErrorCode::kInvalidArgument);
  EXPECT_NO_THROW(check_ep_transport_flag("nccl", "auto"));  // decided once the backend is chosen
  EXPECT_STREQ(ep_transport_name(EpTransport::kNccl), "nccl");
}

}  // namespace
}  // namespace epic::cli
