// The arithmetic of bench-moe's NCCL figures, kept apart so it is tested on the CPU: bandwidth, ratios
// to baselines, the rank pairs of the link measurement, max over ranks.
#pragma once

#include <cstdint>
#include <utility>
#include <vector>

namespace epic::cli {

// Algorithm bandwidth (nccl-tests' algbw): bytes / seconds in GB/s (1e9 bytes). 0 when seconds <= 0
// or bytes == 0 (nothing moved: no bandwidth to claim).
double gigabytes_per_second(double bytes, double seconds);

// ours / baseline (a time ratio: above 1 means ours is slower). NaN when the baseline is not > 0.
double time_ratio(double ours_seconds, double baseline_seconds);

// Share of the link a transfer reached: (bytes / seconds) / link GB/s. NaN without a link figure.
double link_share(double bytes, double seconds, double link_gigabytes_per_second);

// Rounds of disjoint rank pairs that together cover every pair once (round d pairs r with r XOR d) when
// num_ranks is a power of two; otherwise one round with the pair (0, 1). Empty below two ranks.
// Each pair appears once per round as (lower, higher).
std::vector<std::vector<std::pair<int, int>>> link_pair_rounds(int num_ranks);

// Column-wise maximum over ranks (rows of equal length); empty in, empty out.
std::vector<double> max_over_ranks(const std::vector<std::vector<double>>& per_rank);

}  // namespace epic::cli
