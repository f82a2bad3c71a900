// bench-moe's figure arithmetic (see bench_moe_figures.h).
#include "launch/bench_moe_figures.h"

#include <algorithm>
#include <limits>

#include "kernels/error.h"

namespace epic::cli {

double gigabytes_per_second(double bytes, double seconds) {
  if (!(seconds > 0) || !(bytes > 0)) return 0;
  return bytes / seconds / 1e9;
}

double time_ratio(double ours_seconds, double baseline_seconds) {
  if (!(baseline_seconds > 0)) return std::numeric_limits<double>::quiet_NaN();
  return ours_seconds / baseline_seconds;
}

double link_share(double bytes, double seconds, double link_gigabytes_per_second) {
  if (!(link_gigabytes_per_second > 0)) return std::numeric_limits<double>::quiet_NaN();
  return gigabytes_per_second(bytes, seconds) / link_gigabytes_per_second;
}

std::vector<std::vector<std::pair<int, int>>> link_pair_rounds(int num_ranks) {
  std::vector<std::vector<std::pair<int, int>>> rounds;
  if (num_ranks < 2) return rounds;
  const bool power_of_two = (num_ranks & (num_ranks - 1)) == 0;
  if (!power_of_two) return {{{0, 1}}};
  for (int distance = 1; distance < num_ranks; ++distance) {
    std::vector<std::pair<int, int>> round;
    for (int rank = 0; rank < num_ranks; ++rank) {
      const int partner = rank ^ distance;
      if (rank < partner) round.emplace_back(rank, partner);
    }
    rounds.push_back(std::move(round));
  }
  return rounds;
}

std::vector<double> max_over_ranks(const std::vector<std::vector<double>>& per_rank) {
  if (per_rank.empty()) return {};
  std::vector<double> result = per_rank.front();
  for (const std::vector<double>& row : per_rank) {
    EPIC_CHECK(row.size() == result.size(), ErrorCode::kInternal,
               "max_over_ranks: rows of different lengths");
    for (size_t c = 0; c < row.size(); ++c) result[c] = std::max(result[c], row[c]);
  }
  return result;
}

}  // namespace epic::cli
