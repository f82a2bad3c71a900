// One step's demand on an expert store, as every executor that computes through a store records it (the
// one-process OffloadingMoeExecutor in read mode, the host exchange's ExpertParallelMoeExecutor, the NCCL
// exchange's DeviceExpertParallelMoeExecutor): each pick recorded with the store (its policy's history),
// counted a hit or a miss against what is resident at that moment, and the misses gathered per layer with
// their routing weight, to be admitted behind the step, the heaviest first.
#pragma once

#include <cstdint>
#include <map>

#include "worker/expert_store.h"

namespace epic {

// What a run's demand came to (each executor reports these; launch/expert_budget.h turns them into figures).
struct StoreDemandCounts {
  int64_t hits = 0, misses = 0;  // picks whose expert was resident / was not
  int64_t read_in_place = 0;     // (layer, expert) pairs of a step computed while not resident
  int64_t substituted = 0;       // picks moved to a resident expert (--on-miss substitute)
};

class StepDemand {
 public:
  // `uses` picks of one expert in `step`, their routing weights summed: recorded with the store
  // (ExpertStore::record_uses) and counted; a miss joins the step's misses. Returns whether it was resident.
  bool note(ExpertStore& store, int64_t layer, int64_t expert, int64_t uses, double weight_sum, int64_t step);
  // Counted from outside (substitution happens before the picks reach the store).
  void add_substituted(int64_t picks) { counts_.substituted += picks; }

  // The step's misses, per layer the heaviest first (most_wanted_first), admitted behind the step
  // (ExpertStore::admit_in_background; each counted as read in place); then none are left. Returns the
  // experts the store copied in.
  int64_t admit_misses(ExpertStore& store, int64_t step);
  // The step's misses forgotten (a mode that loads its misses when they are needed).
  void clear_misses() { missed_.clear(); }
  bool has_misses() const { return !missed_.empty(); }

  const StoreDemandCounts& counts() const { return counts_; }

 private:
  std::map<int64_t, std::map<int64_t, double>> missed_;  // layer -> expert -> routing weight of its misses
  StoreDemandCounts counts_;
};

}  // namespace epic
