// One step's demand on an expert store (step_demand.h).
#include "worker/step_demand.h"

#include <vector>

namespace epic {

bool StepDemand::note(ExpertStore& store, int64_t layer, int64_t expert, int64_t uses, double weight_sum,
                      int64_t step) {
  // Resident is judged before the use is recorded, as the pick saw it.
  const bool resident = store.resident(layer, expert);
  store.record_uses(layer, expert, uses, weight_sum, step);
  (resident ? counts_.hits : counts_.misses) += uses;
  if (!resident) missed_[layer][expert] += weight_sum;
  return resident;
}

int64_t StepDemand::admit_misses(ExpertStore& store, int64_t step) {
  if (missed_.empty()) return 0;
  std::map<int64_t, std::vector<int64_t>> wanted;
  for (const auto& [layer, experts] : missed_) {
    counts_.read_in_place += static_cast<int64_t>(experts.size());
    wanted[layer] = most_wanted_first(experts);
  }
  missed_.clear();
  return store.admit_in_background(wanted, step).misses;
}

}  // namespace epic
