// The placement planner's view of an expert budget (--expert-budget: each worker keeps only some of its
// experts resident, worker/expert_store.h). With a budget, a worker's speed is set less by the load it
// serves than by the load that falls outside its resident experts: every such pick is a copy (or a read
// over the bus) of an expert's weights. A static cache holds a worker's hottest experts, so that "miss load"
// is the load of its experts past the hottest R. Load-balanced packing spreads the hottest experts, but it
// can still leave one worker with many warm experts past its budget and another with a few hot ones; this
// pass moves experts between workers to even out their expected time, hits and misses each at its cost.
#pragma once

#include <cstdint>
#include <vector>

namespace epic {

// The expected load of `hosted` (expert ids) that falls outside its `resident` heaviest by weight[expert]
// (the load one replica of the expert serves): the sum of the rest.
double expected_miss_load(const std::vector<int64_t>& hosted, const std::vector<double>& weight,
                          int64_t resident);

// A worker's expected time under a budget, in units of one resident pick: load + (miss_cost - 1) * miss load,
// a miss costing miss_cost times a hit (its weights cross the host link instead of being read from device
// memory).
double expected_budget_cost(const std::vector<int64_t>& hosted, const std::vector<double>& weight,
                            int64_t resident, double miss_cost);

// Swaps experts between the costliest worker of a layer and another while one lowers the pair's larger
// cost below the costliest's (so the sorted costs fall at every swap and the pass ends), never putting an
// expert on a worker that holds it and, with worker_node, only within a node (so which nodes hold an expert
// does not change). The best swap each time; deterministic; at most `max_swaps`. hosted: worker -> expert
// ids (kept ascending); weight: per expert (load / replicas); resident: per worker. Returns the swaps made.
int64_t balance_budget_cost(std::vector<std::vector<int64_t>>& hosted, const std::vector<double>& weight,
                            const std::vector<int64_t>& resident, const std::vector<int>& worker_node,
                            double miss_cost, int64_t max_swaps);

}  // namespace epic
