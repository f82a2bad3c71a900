// The expert placement planner: slots per worker (given, default or from a memory budget),
// replicas for the experts with the most load per replica, then largest-first packing onto the
// least-loaded worker (DeepSeek EPLB style). Also the round-robin baseline and plan look-ups.
#include "coordinator/placement.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <sstream>

#include "coordinator/placement_residency.h"
#include "coordinator/placement_rules.h"
#include "kernels/error.h"

namespace epic {
namespace {

[[noreturn]] void fail_request(const std::string& what) {
  throw Error(ErrorCode::kInvalidArgument, "placement request: " + what);
}

int64_t count_present(const LayerExperts& layer) {
  return std::count_if(layer.present.begin(), layer.present.end(), [](uint8_t flag) { return flag != 0; });
}

int64_t ceil_div(int64_t numerator, int64_t denominator) {
  return (numerator + denominator - 1) / denominator;
}

std::string format_bytes(uint64_t bytes) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  constexpr uint64_t kGiB = uint64_t{1} << 30;
  std::ostringstream text;
  text << bytes << " bytes" << std::fixed;
  if (bytes >= kGiB) {
    text.precision(2);
    text << " (" << static_cast<double>(bytes) / kGiB << " GiB)";
  } else if (bytes >= kMiB) {
    text.precision(1);
    text << " (" << static_cast<double>(bytes) / kMiB << " MiB)";
  }
  return text.str();
}

// The request's MoE layers in ascending order, each checked for a consistent shape.
std::vector<LayerExperts> checked_layers(const PlacementRequest& request) {
  if (request.num_workers < 1) {
    fail_request("num_workers is " + std::to_string(request.num_workers) + "; at least 1 worker is needed");
  }
  if (!request.worker_node.empty()) {
    if (static_cast<int>(request.worker_node.size()) != request.num_workers)
      fail_request("worker_node has " + std::to_string(request.worker_node.size()) + " entries for " +
                   std::to_string(request.num_workers) + " workers; give each worker's node");
    for (int node : request.worker_node)
      if (node < 0 || node >= request.num_workers)
        fail_request("worker_node holds node " + std::to_string(node) + ", outside [0, " +
                     std::to_string(request.num_workers) + ")");
  }
  if (!(std::isfinite(request.miss_cost) && request.miss_cost >= 1.0))
    fail_request("miss_cost is " + std::to_string(request.miss_cost) +
                 "; a miss costs at least what a resident pick does (>= 1, finite)");
  std::vector<LayerExperts> layers = request.layers;
  std::stable_sort(layers.begin(), layers.end(),
                   [](const LayerExperts& a, const LayerExperts& b) { return a.layer < b.layer; });
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerExperts& layer = layers[i];
    const std::string where = "layer " + std::to_string(layer.layer);
    if (layer.layer < 0) fail_request(where + " has a negative index");
    if (i > 0 && layers[i - 1].layer == layer.layer) fail_request(where + " is listed twice");
    if (layer.num_experts < 1) {
      fail_request(where + " has " + std::to_string(layer.num_experts) +
                   " experts; a MoE layer has at least 1");
    }
    if (static_cast<int64_t>(layer.present.size()) != layer.num_experts) {
      fail_request(where + " has a present mask of " + std::to_string(layer.present.size()) +
                   " entries for " + std::to_string(layer.num_experts) +
                   " experts; give one entry per router row (1 = present, 0 = masked)");
    }
  }
  for (const auto& [profile_layer, counts] : request.profile.load) {
    // Captured by copy: clang before 16 cannot capture a structured binding (the fuzz build uses clang 14).
    const bool known =
        std::any_of(layers.begin(), layers.end(),
                    [&, wanted = profile_layer](const LayerExperts& layer) { return layer.layer == wanted; });
    if (!known) {
      fail_request("the load profile has layer " + std::to_string(profile_layer) +
                   ", which is not a MoE layer of this model; record the profile with the same model");
    }
  }
  return layers;
}

// The expected load of each expert of a layer: the profile's counts, or 1 per present expert
// where the profile has no entry for the layer or only zeros for its present experts. Masked
// experts carry 0 (the router never picks them, whatever an older profile says).
std::vector<double> expert_loads(const LayerExperts& layer, const LoadProfile& profile) {
  std::vector<double> load(layer.num_experts, 0.0);
  auto entry = profile.load.find(layer.layer);
  if (entry != profile.load.end()) {
    const std::vector<double>& counts = entry->second;
    if (static_cast<int64_t>(counts.size()) != layer.num_experts) {
      fail_request("the load profile has " + std::to_string(counts.size()) + " counts for layer " +
                   std::to_string(layer.layer) + ", but the layer has " + std::to_string(layer.num_experts) +
                   " experts; record the profile with the same model");
    }
    for (int64_t expert = 0; expert < layer.num_experts; ++expert) {
      const double count = counts[expert];
      if (!std::isfinite(count) || count < 0) {
        fail_request("the load profile's count for layer " + std::to_string(layer.layer) + " expert " +
                     std::to_string(expert) + " is " + std::to_string(count) +
                     "; counts must be finite and non-negative");
      }
      if (layer.present[expert]) load[expert] = count;
    }
  }
  const double total = std::accumulate(load.begin(), load.end(), 0.0);
  if (total == 0.0) {
    for (int64_t expert = 0; expert < layer.num_experts; ++expert)
      load[expert] = layer.present[expert] ? 1.0 : 0.0;
  }
  return load;
}

// Slots per worker for each layer: the request's value, the default ceil(present / workers), or
// what the memory budget pays for. More slots than present experts would only hold duplicates,
// so every layer uses at most its present count (a uniform value fits layers of uneven size).
std::vector<int64_t> slots_for_layers(const PlacementRequest& request,
                                      const std::vector<LayerExperts>& layers) {
  const int64_t num_workers = request.num_workers;
  std::vector<int64_t> minimum(layers.size());
  int64_t largest_minimum = 0;
  size_t largest_layer = 0;
  for (size_t i = 0; i < layers.size(); ++i) {
    minimum[i] = ceil_div(count_present(layers[i]), num_workers);
    if (minimum[i] > largest_minimum) {
      largest_minimum = minimum[i];
      largest_layer = i;
    }
  }
  auto describe_need = [&](size_t i) {
    return "layer " + std::to_string(layers[i].layer) + " has " + std::to_string(count_present(layers[i])) +
           " present experts over " + std::to_string(num_workers) + " workers, which needs " +
           std::to_string(minimum[i]) + " slots per worker";
  };

  if (request.slots_per_worker && request.budget_bytes) {
    fail_request("both slots_per_worker and budget_bytes are set; give one of them");
  }
  int64_t uniform_slots = -1;
  if (request.slots_per_worker) {
    uniform_slots = *request.slots_per_worker;
    if (uniform_slots < 1) {
      fail_request("slots_per_worker is " + std::to_string(uniform_slots) + "; it must be at least 1");
    }
    if (uniform_slots < largest_minimum) {
      fail_request("slots_per_worker " + std::to_string(uniform_slots) + " is too few: " +
                   describe_need(largest_layer) + "; the minimum is " + std::to_string(largest_minimum));
    }
  } else if (request.budget_bytes) {
    if (request.expert_bytes == 0)
      fail_request("budget_bytes is set but expert_bytes is 0; give the bytes of one expert");
    if (!layers.empty()) {
      const uint64_t num_layers = layers.size();
      // floor(floor(a / b) / c) == floor(a / (b * c)) for positive integers, without overflow.
      const uint64_t affordable = *request.budget_bytes / request.expert_bytes / num_layers;
      uniform_slots =
          static_cast<int64_t>(std::min<uint64_t>(affordable, std::numeric_limits<int64_t>::max()));
      if (uniform_slots < largest_minimum || uniform_slots < 1) {
        const uint64_t needed_slots = std::max<int64_t>(largest_minimum, 1);
        uint64_t minimum_budget = 0;
        std::string minimum_text;
        if (__builtin_mul_overflow(needed_slots, request.expert_bytes, &minimum_budget) ||
            __builtin_mul_overflow(minimum_budget, num_layers, &minimum_budget)) {
          minimum_text = "more than 2^64 bytes";
        } else {
          minimum_text = format_bytes(minimum_budget);
        }
        fail_request("budget_bytes " + format_bytes(*request.budget_bytes) + " is too small: it pays for " +
                     std::to_string(affordable) + " slots per worker per layer (" +
                     std::to_string(request.expert_bytes) + " bytes per expert x " +
                     std::to_string(num_layers) + " MoE layers), but " + describe_need(largest_layer) +
                     "; the minimum budget is " + minimum_text + " per worker");
      }
    }
  }

  std::vector<int64_t> slots(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    slots[i] = uniform_slots < 0 ? minimum[i] : std::min(uniform_slots, count_present(layers[i]));
  }
  return slots;
}

// Replica counts: one per present expert, then each spare slot to the expert with the largest
// load per replica (ties: lower id) that is not yet on every worker.
std::vector<int64_t> replica_counts(const LayerExperts& layer, const std::vector<double>& load,
                                    int64_t num_workers, int64_t slots) {
  std::vector<int64_t> replicas(layer.num_experts, 0);
  for (int64_t expert = 0; expert < layer.num_experts; ++expert)
    replicas[expert] = layer.present[expert] ? 1 : 0;
  int64_t spare = num_workers * slots - count_present(layer);
  while (spare > 0) {
    int64_t best = -1;
    for (int64_t expert = 0; expert < layer.num_experts; ++expert) {
      if (replicas[expert] == 0 || replicas[expert] >= num_workers) continue;
      if (best < 0 || load[expert] / replicas[expert] > load[best] / replicas[best]) best = expert;
    }
    if (best < 0) break;  // every present expert is on every worker
    ++replicas[best];
    --spare;
  }
  return replicas;
}

struct Replica {
  int64_t expert;
  double weight;  // load / replicas
};

// Largest-first packing: each replica (heaviest first, ties lower expert id) goes to the
// least-loaded worker (ties lower index) with a free slot that does not hold the expert yet.
// With worker_node, a worker on a node that already holds the expert is chosen only when no worker
// elsewhere has a free slot (a replica there would only serve that node's tokens twice).
std::vector<std::vector<int64_t>> pack_replicas(const std::vector<double>& load,
                                                const std::vector<int64_t>& replicas, int64_t num_workers,
                                                int64_t slots, const std::vector<int>& worker_node) {
  const int64_t num_experts = static_cast<int64_t>(load.size());
  std::vector<Replica> items;
  for (int64_t expert = 0; expert < num_experts; ++expert) {
    for (int64_t copy = 0; copy < replicas[expert]; ++copy)
      items.push_back({expert, load[expert] / replicas[expert]});
  }
  std::stable_sort(items.begin(), items.end(), [](const Replica& a, const Replica& b) {
    return a.weight != b.weight ? a.weight > b.weight : a.expert < b.expert;
  });

  std::vector<std::vector<int64_t>> hosted(num_workers);
  std::vector<std::vector<uint8_t>> holds(num_workers, std::vector<uint8_t>(num_experts, 0));
  std::vector<double> worker_load(num_workers, 0.0);
  const int num_nodes =
      worker_node.empty() ? 1 : *std::max_element(worker_node.begin(), worker_node.end()) + 1;
  auto node_of = [&](int64_t worker) { return worker_node.empty() ? 0 : worker_node[worker]; };
  std::vector<std::vector<int>> node_holds(num_nodes, std::vector<int>(num_experts, 0));  // replicas per node
  auto weight_of = [&](int64_t expert) { return load[expert] / replicas[expert]; };
  auto add = [&](int64_t worker, int64_t expert) {
    hosted[worker].push_back(expert);
    holds[worker][expert] = 1;
    ++node_holds[node_of(worker)][expert];
    worker_load[worker] += weight_of(expert);
  };
  auto remove = [&](int64_t worker, int64_t expert) {
    hosted[worker].erase(std::find(hosted[worker].begin(), hosted[worker].end(), expert));
    holds[worker][expert] = 0;
    --node_holds[node_of(worker)][expert];
    worker_load[worker] -= weight_of(expert);
  };

  for (const Replica& item : items) {
    int64_t chosen = -1;
    for (int64_t worker = 0; worker < num_workers; ++worker) {
      if (static_cast<int64_t>(hosted[worker].size()) >= slots || holds[worker][item.expert]) continue;
      const bool covered = node_holds[node_of(worker)][item.expert] > 0;
      const bool chosen_covered = chosen >= 0 && node_holds[node_of(chosen)][item.expert] > 0;
      if (chosen < 0 || (!covered && chosen_covered) ||
          (covered == chosen_covered && worker_load[worker] < worker_load[chosen]))
        chosen = worker;
    }
    if (chosen >= 0) {
      add(chosen, item.expert);
      continue;
    }
    // Every worker with a free slot already holds this expert. Some worker `full` lacks it (the
    // expert has fewer replicas placed than workers) and is full; it holds more experts than
    // `open`, so one of them, `moved`, is not on `open`: move it there and take its slot.
    int64_t open = -1;
    int64_t full = -1;
    for (int64_t worker = 0; worker < num_workers; ++worker) {
      if (open < 0 && static_cast<int64_t>(hosted[worker].size()) < slots) open = worker;
      if (!holds[worker][item.expert] && (full < 0 || worker_load[worker] < worker_load[full])) full = worker;
    }
    if (open < 0 || full < 0) {
      throw Error(ErrorCode::kInternal, "placement: no worker can take a replica of expert " +
                                            std::to_string(item.expert) +
                                            " (replica counts exceed the slots)");
    }
    int64_t moved = -1;
    for (int64_t expert : hosted[full]) {
      if (holds[open][expert]) continue;
      if (moved < 0 || weight_of(expert) < weight_of(moved) ||
          (weight_of(expert) == weight_of(moved) && expert < moved)) {
        moved = expert;
      }
    }
    if (moved < 0) throw Error(ErrorCode::kInternal, "placement: packing repair found no expert to move");
    remove(full, moved);
    add(open, moved);
    add(full, item.expert);
  }
  return hosted;
}

// Each worker's resident experts per layer from the request's budget (over what the packing gave it), then
// per layer the cost pass of placement_residency.h.
void balance_for_budget(const PlacementRequest& request, PlacementPlan& plan) {
  std::vector<std::map<int64_t, int64_t>> resident(static_cast<size_t>(request.num_workers));
  for (int worker = 0; worker < request.num_workers; ++worker) {
    std::map<int64_t, int64_t> hosted;
    for (const LayerPlacement& layer : plan.layers)
      hosted[layer.layer] = static_cast<int64_t>(layer.worker_experts[worker].size());
    resident[worker] = request.resident_slots(hosted);
  }
  for (LayerPlacement& layer : plan.layers) {
    std::vector<int64_t> replicas(static_cast<size_t>(layer.num_experts), 0);
    for (const std::vector<int64_t>& experts : layer.worker_experts)
      for (int64_t expert : experts) ++replicas[expert];
    std::vector<double> weight(static_cast<size_t>(layer.num_experts), 0.0);
    for (int64_t expert = 0; expert < layer.num_experts; ++expert)
      if (replicas[expert] > 0)
        weight[expert] = layer.expert_load[expert] / static_cast<double>(replicas[expert]);
    std::vector<int64_t> layer_resident(static_cast<size_t>(request.num_workers), 0);
    for (int worker = 0; worker < request.num_workers; ++worker) {
      const auto found = resident[worker].find(layer.layer);
      layer_resident[worker] = found == resident[worker].end() ? 0 : found->second;
    }
    // Each swap strictly lowers the sorted costs, so the pass ends; the cap bounds its time.
    const int64_t max_swaps = 4 * layer.slots_per_worker * request.num_workers;
    balance_budget_cost(layer.worker_experts, weight, layer_resident, request.worker_node, request.miss_cost,
                        max_swaps);
  }
}

// A planner bug must not reach the workers: check the finished layer with the reader's rules.
void self_check(const LayerPlacement& layer, const LayerExperts& experts, int num_workers) {
  try {
    placement_rules::check_layer(layer, experts.present, num_workers, "planner output");
  } catch (const Error& error) {
    throw Error(ErrorCode::kInternal, std::string("placement planner broke a rule: ") + error.what());
  }
}

}  // namespace

double LayerPlacement::max_over_mean_load() const {
  if (worker_load.empty()) return 1.0;
  const double total = std::accumulate(worker_load.begin(), worker_load.end(), 0.0);
  if (total <= 0.0) return 1.0;
  const double mean = total / static_cast<double>(worker_load.size());
  return *std::max_element(worker_load.begin(), worker_load.end()) / mean;
}

const LayerPlacement& PlacementPlan::layer(int64_t layer_index) const {
  auto found =
      std::lower_bound(layers.begin(), layers.end(), layer_index,
                       [](const LayerPlacement& layer, int64_t index) { return layer.layer < index; });
  if (found == layers.end() || found->layer != layer_index) {
    throw Error(ErrorCode::kInternal, "placement plan has no MoE layer " + std::to_string(layer_index) +
                                          " (it has " + std::to_string(layers.size()) + " MoE layers)");
  }
  return *found;
}

bool PlacementPlan::hosts(int worker, int64_t layer_index, int64_t expert_id) const {
  const LayerPlacement& placement = layer(layer_index);
  if (worker < 0 || worker >= num_workers) {
    throw Error(ErrorCode::kInternal, "placement plan: worker " + std::to_string(worker) +
                                          " is out of range [0, " + std::to_string(num_workers) + ")");
  }
  if (expert_id < 0 || expert_id >= placement.num_experts) return false;
  const std::vector<int64_t>& experts = placement.worker_experts[worker];
  return std::binary_search(experts.begin(), experts.end(), expert_id);
}

int PlacementPlan::worker_for(int64_t layer_index, int64_t expert_id, uint64_t occurrence_key) const {
  const LayerPlacement& placement = layer(layer_index);
  if (expert_id < 0 || expert_id >= placement.num_experts || placement.expert_workers[expert_id].empty()) {
    throw Error(ErrorCode::kInternal,
                "placement plan: layer " + std::to_string(layer_index) + " expert " +
                    std::to_string(expert_id) +
                    (expert_id < 0 || expert_id >= placement.num_experts
                         ? " is out of range [0, " + std::to_string(placement.num_experts) + ")"
                         : " is masked (placed on no worker)") +
                    "; the router must never select it");
  }
  const std::vector<int>& workers = placement.expert_workers[expert_id];
  return workers[occurrence_key % workers.size()];
}

PlacementPlan plan_placement(const PlacementRequest& request) {
  const std::vector<LayerExperts> layers = checked_layers(request);
  const std::vector<int64_t> slots = slots_for_layers(request, layers);
  PlacementPlan plan;
  plan.num_workers = request.num_workers;
  plan.worker_node = request.worker_node;
  plan.experts_per_token = request.experts_per_token;
  for (size_t i = 0; i < layers.size(); ++i) {
    const LayerExperts& experts = layers[i];
    LayerPlacement placement;
    placement.layer = experts.layer;
    placement.num_experts = experts.num_experts;
    placement.slots_per_worker = slots[i];
    placement.expert_load = expert_loads(experts, request.profile);
    const std::vector<int64_t> replicas =
        replica_counts(experts, placement.expert_load, request.num_workers, slots[i]);
    placement.worker_experts =
        pack_replicas(placement.expert_load, replicas, request.num_workers, slots[i], request.worker_node);
    plan.layers.push_back(std::move(placement));
  }
  if (request.resident_slots) balance_for_budget(request, plan);
  for (size_t i = 0; i < layers.size(); ++i) {
    self_check(plan.layers[i], layers[i], request.num_workers);
    placement_rules::derive_layer_figures(plan.layers[i], request.num_workers);
  }
  return plan;
}

PlacementPlan round_robin_placement(const PlacementRequest& request) {
  const std::vector<LayerExperts> layers = checked_layers(request);
  PlacementPlan plan;
  plan.num_workers = request.num_workers;
  plan.worker_node = request.worker_node;
  plan.experts_per_token = request.experts_per_token;
  for (const LayerExperts& experts : layers) {
    LayerPlacement placement;
    placement.layer = experts.layer;
    placement.num_experts = experts.num_experts;
    placement.expert_load = expert_loads(experts, request.profile);
    placement.worker_experts.resize(request.num_workers);
    for (int64_t expert = 0; expert < experts.num_experts; ++expert) {
      if (experts.present[expert]) placement.worker_experts[expert % request.num_workers].push_back(expert);
    }
    for (const auto& hosted : placement.worker_experts) {
      placement.slots_per_worker = std::max<int64_t>(placement.slots_per_worker, hosted.size());
    }
    self_check(placement, experts, request.num_workers);
    placement_rules::derive_layer_figures(placement, request.num_workers);
    plan.layers.push_back(std::move(placement));
  }
  return plan;
}

namespace placement_rules {

void check_layer(const LayerPlacement& layer, const std::vector<uint8_t>& present, int num_workers,
                 const std::string& source) {
  const std::string where = source + ": layer " + std::to_string(layer.layer) + ": ";
  auto fail = [&](const std::string& what) { throw Error(ErrorCode::kInvalidArgument, where + what); };
  // Both readers (JSON and cereal bytes) apply every rule here, so neither accepts a plan the other
  // would refuse (a fuzz finding: the bytes reader took a negative layer index the JSON reader refused).
  if (layer.layer < 0) fail("the layer index is negative; layers are numbered from 0");
  if (layer.num_experts < 1)
    fail("num_experts is " + std::to_string(layer.num_experts) + "; it must be at least 1");
  if (static_cast<int64_t>(present.size()) != layer.num_experts) {
    fail("the present mask has " + std::to_string(present.size()) + " entries for " +
         std::to_string(layer.num_experts) + " experts");
  }
  if (layer.slots_per_worker < 0 || layer.slots_per_worker > layer.num_experts) {
    fail("slots_per_worker is " + std::to_string(layer.slots_per_worker) + ", outside [0, " +
         std::to_string(layer.num_experts) + "] (a worker holds each expert at most once)");
  }
  if (static_cast<int64_t>(layer.worker_experts.size()) != num_workers) {
    fail("has " + std::to_string(layer.worker_experts.size()) + " worker lists for " +
         std::to_string(num_workers) + " workers");
  }
  if (static_cast<int64_t>(layer.expert_load.size()) != layer.num_experts) {
    fail("expert_load has " + std::to_string(layer.expert_load.size()) + " entries for " +
         std::to_string(layer.num_experts) + " experts");
  }
  for (int64_t expert = 0; expert < layer.num_experts; ++expert) {
    const double load = layer.expert_load[expert];
    if (!std::isfinite(load) || load < 0) {
      fail("expert_load of expert " + std::to_string(expert) + " is " + std::to_string(load) +
           "; loads must be finite and non-negative");
    }
  }
  std::vector<uint8_t> placed(layer.num_experts, 0);
  for (int worker = 0; worker < num_workers; ++worker) {
    const std::vector<int64_t>& hosted = layer.worker_experts[worker];
    const std::string on_worker = " on worker " + std::to_string(worker);
    if (static_cast<int64_t>(hosted.size()) > layer.slots_per_worker) {
      fail("worker " + std::to_string(worker) + " hosts " + std::to_string(hosted.size()) +
           " experts, more than its " + std::to_string(layer.slots_per_worker) + " slots (slot overflow)");
    }
    std::set<int64_t> seen;
    for (int64_t expert : hosted) {
      if (expert < 0 || expert >= layer.num_experts) {
        fail("expert " + std::to_string(expert) + on_worker + " is out of range [0, " +
             std::to_string(layer.num_experts) + ")");
      }
      if (!present[expert])
        fail("expert " + std::to_string(expert) + on_worker + " is masked and must not be placed");
      if (!seen.insert(expert).second) {
        fail("expert " + std::to_string(expert) + " is listed twice" + on_worker + " (duplicate replica)");
      }
      placed[expert] = 1;
    }
  }
  std::vector<int64_t> missing;
  for (int64_t expert = 0; expert < layer.num_experts; ++expert) {
    if (present[expert] && !placed[expert]) missing.push_back(expert);
  }
  if (!missing.empty()) {
    std::string list;
    for (size_t i = 0; i < missing.size() && i < 16; ++i)
      list += (i ? ", " : "") + std::to_string(missing[i]);
    if (missing.size() > 16) list += ", ... (" + std::to_string(missing.size()) + " in all)";
    fail("present experts placed on no worker (missing): " + list +
         "; place every present expert, or mask it in masked_experts");
  }
}

void derive_layer_figures(LayerPlacement& layer, int num_workers) {
  layer.expert_workers.assign(layer.num_experts, {});
  for (int worker = 0; worker < num_workers; ++worker) {
    std::sort(layer.worker_experts[worker].begin(), layer.worker_experts[worker].end());
    for (int64_t expert : layer.worker_experts[worker]) layer.expert_workers[expert].push_back(worker);
  }
  layer.worker_load.assign(num_workers, 0.0);
  for (int worker = 0; worker < num_workers; ++worker) {
    for (int64_t expert : layer.worker_experts[worker]) {
      layer.worker_load[worker] +=
          layer.expert_load[expert] / static_cast<double>(layer.expert_workers[expert].size());
    }
  }
}

std::vector<uint8_t> present_mask(const LayerPlacement& layer) {
  std::vector<uint8_t> present(layer.num_experts, 0);
  for (int64_t expert = 0; expert < layer.num_experts; ++expert) {
    present[expert] =
        expert < static_cast<int64_t>(layer.expert_workers.size()) && !layer.expert_workers[expert].empty();
  }
  return present;
}

}  // namespace placement_rules
}  // namespace epic
