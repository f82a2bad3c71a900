// Evening out the miss load of a budget across workers (placement_residency.h).
#include "coordinator/placement_residency.h"

#include <algorithm>
#include <cmath>
#include <numeric>

namespace epic {
namespace {

// One worker's experts by weight, heaviest first (ties: lower id), and what a swap needs of them.
struct WorkerView {
  std::vector<double> sorted;     // weights, descending
  std::vector<int64_t> position;  // expert -> index in sorted (only for hosted experts)
  double load = 0, top = 0;       // the sum of all, and of the first `resident`
  int64_t resident = 0;

  double miss() const { return load - top; }
  double cost(double miss_cost) const { return load + (miss_cost - 1.0) * miss(); }

  // The cost after `removed` (hosted here, weight x) leaves and an expert of weight y arrives.
  double cost_after_swap(int64_t removed, double x, double y, double miss_cost) const {
    const int64_t n = static_cast<int64_t>(sorted.size());
    const int64_t r = std::min(resident, n);
    const int64_t p = position[removed];
    // Top r of the list without x, and the smallest of them (the one y must beat), r <= n - 1 or not.
    double top_without = top;
    double smallest = 0;
    bool full = false;  // the list without x still has r experts inside the top
    if (p < r) {
      top_without -= x;
      if (r < n) {
        top_without += sorted[r];
        smallest = sorted[r];
        full = true;
      }
    } else {
      smallest = r > 0 ? sorted[r - 1] : 0;
      full = r > 0 || resident == 0;
    }
    double top_new = top_without;
    if (resident > 0) {
      if (!full) {
        top_new += y;  // fewer than `resident` experts remain: y is resident too
      } else if (y > smallest) {
        top_new += y - smallest;
      }
    }
    const double load_new = load - x + y;
    return load_new + (miss_cost - 1.0) * (load_new - top_new);
  }
};

WorkerView view_of(const std::vector<int64_t>& hosted, const std::vector<double>& weight, int64_t resident) {
  WorkerView view;
  view.resident = resident;
  std::vector<int64_t> order = hosted;
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return weight[a] != weight[b] ? weight[a] > weight[b] : a < b;
  });
  view.position.assign(weight.size(), -1);
  for (size_t i = 0; i < order.size(); ++i) {
    view.sorted.push_back(weight[order[i]]);
    view.position[order[i]] = static_cast<int64_t>(i);
    view.load += weight[order[i]];
    if (static_cast<int64_t>(i) < resident) view.top += weight[order[i]];
  }
  return view;
}

}  // namespace

double expected_miss_load(const std::vector<int64_t>& hosted, const std::vector<double>& weight,
                          int64_t resident) {
  return view_of(hosted, weight, resident).miss();
}

double expected_budget_cost(const std::vector<int64_t>& hosted, const std::vector<double>& weight,
                            int64_t resident, double miss_cost) {
  return view_of(hosted, weight, resident).cost(miss_cost);
}

int64_t balance_budget_cost(std::vector<std::vector<int64_t>>& hosted, const std::vector<double>& weight,
                            const std::vector<int64_t>& resident, const std::vector<int>& worker_node,
                            double miss_cost, int64_t max_swaps) {
  const int64_t workers = static_cast<int64_t>(hosted.size());
  const auto node_of = [&](int64_t worker) { return worker_node.empty() ? 0 : worker_node[worker]; };
  double total = 0;
  for (const std::vector<int64_t>& experts : hosted)
    for (int64_t expert : experts) total += weight[expert];
  // Gains below this are rounding, not a better plan.
  const double tolerance = 1e-9 * std::max(1.0, total * miss_cost);
  int64_t swaps = 0;
  while (swaps < max_swaps) {
    std::vector<WorkerView> views;
    for (int64_t w = 0; w < workers; ++w) views.push_back(view_of(hosted[w], weight, resident[w]));
    int64_t high = 0;
    for (int64_t w = 1; w < workers; ++w)
      if (views[w].cost(miss_cost) > views[high].cost(miss_cost)) high = w;
    const double current = views[high].cost(miss_cost);
    // The swap that leaves the pair's larger cost smallest (ties: the first found).
    double best = current - tolerance;
    int64_t best_worker = -1, best_out = -1, best_in = -1;
    for (int64_t other = 0; other < workers; ++other) {
      if (other == high || node_of(other) != node_of(high)) continue;
      for (int64_t out : hosted[high]) {
        if (std::binary_search(hosted[other].begin(), hosted[other].end(), out)) continue;
        for (int64_t in : hosted[other]) {
          if (weight[in] == weight[out]) continue;
          if (std::binary_search(hosted[high].begin(), hosted[high].end(), in)) continue;
          const double pair = std::max(views[high].cost_after_swap(out, weight[out], weight[in], miss_cost),
                                       views[other].cost_after_swap(in, weight[in], weight[out], miss_cost));
          if (pair < best) {
            best = pair;
            best_worker = other;
            best_out = out;
            best_in = in;
          }
        }
      }
    }
    if (best_worker < 0) break;
    const auto replace = [](std::vector<int64_t>& experts, int64_t from, int64_t to) {
      *std::find(experts.begin(), experts.end(), from) = to;
      std::sort(experts.begin(), experts.end());
    };
    replace(hosted[high], best_out, best_in);
    replace(hosted[best_worker], best_in, best_out);
    ++swaps;
  }
  return swaps;
}

}  // namespace epic
