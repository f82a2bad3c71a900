// bench-moe's NCCL report (see bench_moe_report.h).
#include "launch/bench_moe_report.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "kernels/error.h"
#include "launch/bench_moe_figures.h"

namespace epic::cli {
namespace {

constexpr size_t kNumColumns = 12;

// The figure of the slowest rank (max time) and the largest traffic: the cluster is as fast as its slowest.
NcclRankFigures slowest(const std::vector<NcclRankFigures>& ranks) {
  std::vector<std::vector<double>> columns;
  for (const NcclRankFigures& rank : ranks) columns.push_back(rank.to_columns());
  NcclRankFigures result = NcclRankFigures::from_columns(max_over_ranks(columns));
  // The link: the slowest pair bounds every exchange, so the minimum, not the maximum.
  if (!ranks.empty()) {
    result.link_gigabytes_per_second = ranks.front().link_gigabytes_per_second;
    for (const NcclRankFigures& rank : ranks)
      result.link_gigabytes_per_second =
          std::min(result.link_gigabytes_per_second, rank.link_gigabytes_per_second);
  }
  return result;
}

std::string printf_string(const char* format, auto... values) {
  std::vector<char> buffer(512);
  int size = std::snprintf(buffer.data(), buffer.size(), format, values...);
  if (size >= static_cast<int>(buffer.size())) {  // longer than any line here; stays correct if one grows
    buffer.resize(static_cast<size_t>(size) + 1);
    size = std::snprintf(buffer.data(), buffer.size(), format, values...);
  }
  return std::string(buffer.data(), static_cast<size_t>(std::max(size, 0)));
}

std::string rank_line(const std::string& name, const NcclRankFigures& f, bool baselines) {
  std::string line =
      printf_string("%6s %9.3f %9.3f %9.3f %9.3f %9.3f %9.3f %10.3f %10.3f %9.1f %9.1f", name.c_str(),
                    f.route_seconds * 1e3, f.dispatch_seconds * 1e3, f.count_exchange_seconds * 1e3,
                    f.rows_all_to_all_seconds * 1e3, f.expert_seconds * 1e3, f.combine_seconds * 1e3,
                    f.dispatch_bytes_off_rank / 1e6, f.combine_bytes_off_rank / 1e6,
                    gigabytes_per_second(f.dispatch_bytes_off_rank, f.dispatch_seconds),
                    gigabytes_per_second(f.combine_bytes_off_rank, f.combine_seconds));
  if (baselines)
    line += printf_string(" %9.3f %9.3f %9.1f %9.1f", f.baseline_dispatch_seconds * 1e3,
                          f.baseline_combine_seconds * 1e3, f.link_gigabytes_per_second,
                          f.link_floor_seconds * 1e6);
  return line + "\n";
}

nlohmann::json figures_json(const NcclRankFigures& f, bool baselines) {
  nlohmann::json row = {
      {"route_ms", f.route_seconds * 1e3},
      {"dispatch_ms", f.dispatch_seconds * 1e3},
      {"count_exchange_ms", f.count_exchange_seconds * 1e3},
      {"rows_all_to_all_ms", f.rows_all_to_all_seconds * 1e3},
      {"expert_ms", f.expert_seconds * 1e3},
      {"combine_ms", f.combine_seconds * 1e3},
      {"dispatch_bytes_off_rank", f.dispatch_bytes_off_rank},
      {"combine_bytes_off_rank", f.combine_bytes_off_rank},
      {"dispatch_algbw_gbps", gigabytes_per_second(f.dispatch_bytes_off_rank, f.dispatch_seconds)},
      {"combine_algbw_gbps", gigabytes_per_second(f.combine_bytes_off_rank, f.combine_seconds)}};
  if (baselines) {
    row["baseline_dispatch_ms"] = f.baseline_dispatch_seconds * 1e3;
    row["baseline_combine_ms"] = f.baseline_combine_seconds * 1e3;
    row["link_gbps"] = f.link_gigabytes_per_second;
    row["link_floor_us"] = f.link_floor_seconds * 1e6;
  }
  return row;
}

// JSON has no NaN: a ratio without a baseline is null.
nlohmann::json number_or_null(double value) {
  return std::isfinite(value) ? nlohmann::json(value) : nlohmann::json();
}

}  // namespace

std::vector<double> NcclRankFigures::to_columns() const {
  return {route_seconds,
          dispatch_seconds,
          count_exchange_seconds,
          rows_all_to_all_seconds,
          expert_seconds,
          combine_seconds,
          dispatch_bytes_off_rank,
          combine_bytes_off_rank,
          baseline_dispatch_seconds,
          baseline_combine_seconds,
          link_gigabytes_per_second,
          link_floor_seconds};
}

NcclRankFigures NcclRankFigures::from_columns(const std::vector<double>& c) {
  EPIC_CHECK(c.size() == kNumColumns, ErrorCode::kInternal,
             "NCCL bench figures: " + std::to_string(c.size()) + " columns, expected " +
                 std::to_string(kNumColumns));
  return {c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11]};
}

std::string format_nccl_report(const NcclReportShape& shape, const std::vector<NcclRankFigures>& ranks) {
  std::string text = printf_string(
      "nccl expert parallel on %s: %d rank(s), %lld tokens/rank, hidden %lld, top-%lld of %lld experts, %lld "
      "layer(s) x %lld iteration(s)\n",
      shape.card.c_str(), shape.ranks, static_cast<long long>(shape.tokens_per_rank),
      static_cast<long long>(shape.hidden), static_cast<long long>(shape.top_k),
      static_cast<long long>(shape.experts), static_cast<long long>(shape.layers),
      static_cast<long long>(shape.iterations));
  text += "per MoE layer call, device time (CUDA events), ms; MB and GB/s off-rank (sent to other ranks):\n";
  text +=
      printf_string("%6s %9s %9s %9s %9s %9s %9s %10s %10s %9s %9s", "rank", "route", "dispatch", "(counts)",
                    "(rows)", "expert", "combine", "MB disp", "MB comb", "GB/s disp", "GB/s comb");
  if (shape.baselines)
    text += printf_string(" %9s %9s %9s %9s", "a2a disp", "a2a comb", "link GB/s", "floor us");
  text += "\n";
  for (size_t r = 0; r < ranks.size(); ++r) text += rank_line(std::to_string(r), ranks[r], shape.baselines);
  const NcclRankFigures worst = slowest(ranks);
  text += rank_line("max", worst, shape.baselines);
  const double exchange_bytes = worst.dispatch_bytes_off_rank + worst.combine_bytes_off_rank;
  const double exchange_seconds = worst.dispatch_seconds + worst.combine_seconds;
  text += printf_string("dispatch + combine (slowest rank): %.3f ms, %.1f GB/s off-rank\n",
                        exchange_seconds * 1e3, gigabytes_per_second(exchange_bytes, exchange_seconds));
  if (shape.baselines) {
    text += printf_string(
        "vs NCCL all_to_all_v of the same per-peer bytes (slowest rank): dispatch %.3f / %.3f ms = %.2fx "
        "(rows all-to-all alone %.2fx), combine %.3f / %.3f ms = %.2fx (ours / baseline; > 1: ours slower)\n",
        worst.dispatch_seconds * 1e3, worst.baseline_dispatch_seconds * 1e3,
        time_ratio(worst.dispatch_seconds, worst.baseline_dispatch_seconds),
        time_ratio(worst.rows_all_to_all_seconds, worst.baseline_dispatch_seconds),
        worst.combine_seconds * 1e3, worst.baseline_combine_seconds * 1e3,
        time_ratio(worst.combine_seconds, worst.baseline_combine_seconds));
    text += printf_string(
        "link: NCCL send/recv of %.0f MB between rank pairs %.1f GB/s per direction (slowest rank), one "
        "8-byte "
        "send/recv %.1f us; dispatch + combine at %.1f%% of the link\n",
        shape.link_bytes / 1e6, worst.link_gigabytes_per_second, worst.link_floor_seconds * 1e6,
        100 * link_share(exchange_bytes, exchange_seconds, worst.link_gigabytes_per_second));
  }
  return text;
}

nlohmann::json nccl_report_json(const NcclReportShape& shape, const std::vector<NcclRankFigures>& ranks) {
  nlohmann::json per_rank = nlohmann::json::array();
  for (const NcclRankFigures& rank : ranks) per_rank.push_back(figures_json(rank, shape.baselines));
  const NcclRankFigures worst = slowest(ranks);
  nlohmann::json result = {{"card", shape.card},
                           {"ranks", shape.ranks},
                           {"tokens_per_rank", shape.tokens_per_rank},
                           {"hidden", shape.hidden},
                           {"top_k", shape.top_k},
                           {"experts", shape.experts},
                           {"layers", shape.layers},
                           {"iterations", shape.iterations},
                           {"per_rank", per_rank},
                           {"max_over_ranks", figures_json(worst, shape.baselines)}};
  if (shape.baselines) {
    const double exchange_bytes = worst.dispatch_bytes_off_rank + worst.combine_bytes_off_rank;
    const double exchange_seconds = worst.dispatch_seconds + worst.combine_seconds;
    result["link_bytes"] = shape.link_bytes;
    result["dispatch_over_baseline"] =
        number_or_null(time_ratio(worst.dispatch_seconds, worst.baseline_dispatch_seconds));
    result["combine_over_baseline"] =
        number_or_null(time_ratio(worst.combine_seconds, worst.baseline_combine_seconds));
    result["exchange_link_share"] =
        number_or_null(link_share(exchange_bytes, exchange_seconds, worst.link_gigabytes_per_second));
  }
  return result;
}

}  // namespace epic::cli
