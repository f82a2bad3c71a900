// Longest-processing-time-first assignment of sequences to workers.
#include "coordinator/sequence_assignment.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "kernels/error.h"

namespace epic {

std::vector<int> assign_sequences(const std::vector<int64_t>& sequence_costs, int num_workers) {
  EPIC_CHECK(num_workers >= 1, ErrorCode::kInvalidArgument,
             "need at least one worker to assign sequences to, got " + std::to_string(num_workers));
  std::vector<size_t> order(sequence_costs.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return sequence_costs[a] > sequence_costs[b]; });
  std::vector<int64_t> worker_load(num_workers, 0);
  std::vector<int> worker_of(sequence_costs.size(), 0);
  for (size_t sequence : order) {
    const int worker =
        static_cast<int>(std::min_element(worker_load.begin(), worker_load.end()) - worker_load.begin());
    worker_of[sequence] = worker;
    worker_load[worker] += sequence_costs[sequence];
  }
  return worker_of;
}

}  // namespace epic
