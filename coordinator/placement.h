// Expert placement: which worker hosts which experts of every MoE layer. Each layer has its own
// expert count (a pruned router has fewer rows; masked missing experts are not placed). A plan
// gives every worker a fixed number of slots per layer (or derives them from a memory budget),
// places every present expert once, fills spare slots with replicas of the hottest experts
// (never two replicas of one expert on one worker), and balances the expected load with greedy
// largest-first packing (as DeepSeek's EPLB). Plans print as JSON, save/load as JSON, and travel
// to workers serialised with cereal.
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <map>
#include <optional>
#include <string>
#include <vector>

namespace epic {

// The experts of one MoE layer as the checkpoint has them.
struct LayerExperts {
  int64_t layer = 0;             // decoder layer index
  int64_t num_experts = 0;       // router rows
  std::vector<uint8_t> present;  // [num_experts]; 0 = masked missing expert (never routed, not placed)
};

// Tokens per (layer, expert), recorded by `epic run --load-profile-out`, read by `epic plan`.
struct LoadProfile {
  std::map<int64_t, std::vector<double>> load;  // layer -> [num_experts]
  // JSON: {"format": "epic-load-profile-v1", "layers": {"0": [12, 0, 7, ...], ...}}
  std::string to_json_text() const;
  // Error(kInvalidArgument) naming the file and the problem (bad format tag, negative or
  // non-finite counts, a layer whose count list does not match the model's expert count).
  static LoadProfile from_json_text(const std::string& text, const std::string& source);
  static LoadProfile load_file(const std::filesystem::path& path);
  void save_file(const std::filesystem::path& path) const;
};

struct PlacementRequest {
  std::vector<LayerExperts> layers;
  int num_workers = 1;
  // Per layer; default ceil(present / workers). A layer uses at most its present count (more slots
  // would only hold duplicates), so one value fits layers of uneven size.
  std::optional<int64_t> slots_per_worker;
  // Per worker over all MoE layers, instead of slots: floor(budget / (expert_bytes * MoE layers))
  // slots per layer, each layer capped at its present count.
  std::optional<uint64_t> budget_bytes;
  uint64_t expert_bytes = 0;  // bytes of one expert (for budget_bytes)
  LoadProfile profile;        // uniform load where a layer has no entry or only zeros
  // The node of each worker (comm/node_topology.h) when the workers span several nodes; empty: one
  // node. Replicas of an expert then prefer nodes that do not hold it yet, so each node can serve its
  // hot experts itself, and the plan reports the expected bytes that cross between nodes.
  std::vector<int> worker_node;
  int64_t experts_per_token = 0;  // the model's top-k, for the traffic figures (0: not reported)
  // With an expert budget (--expert-budget): given one worker's hosted experts per MoE layer, how many of
  // each layer it keeps resident. The planner then also evens out, per layer, each worker's expected time
  // with the load past its resident experts (its hottest: the misses of a static cache) costing miss_cost
  // times a resident pick, by swapping experts between workers (coordinator/placement_residency.h). Empty:
  // no budget, and load alone decides.
  std::function<std::map<int64_t, int64_t>(const std::map<int64_t, int64_t>& hosted_by_layer)> resident_slots;
  // A miss against a hit: a decode step reads a resident expert from device memory (3.3-4.8 TB/s on an
  // H100/H200) and a missing one over the host link (55 GB/s measured on the H100), so far more than 16x
  // where bandwidth rules; 16 leaves room for the compute and the copies that overlap it.
  double miss_cost = 16.0;
};

struct LayerPlacement {
  int64_t layer = 0;
  int64_t num_experts = 0;
  int64_t slots_per_worker = 0;
  std::vector<std::vector<int64_t>> worker_experts;  // worker -> hosted expert ids (ascending)
  std::vector<std::vector<int>>
      expert_workers;                 // expert -> workers holding a replica (ascending); empty if masked
  std::vector<double> expert_load;    // expected load used for planning
  std::vector<double> worker_load;    // expected load per worker (replica share = load / replicas)
  double max_over_mean_load() const;  // 1.0 = perfect balance
};

struct PlacementPlan {
  int num_workers = 1;
  std::vector<LayerPlacement> layers;  // MoE layers only, ascending layer index
  std::vector<int> worker_node;        // as PlacementRequest::worker_node (JSON only; empty: one node)
  int64_t experts_per_token = 0;       // as PlacementRequest::experts_per_token (JSON only)

  const LayerPlacement& layer(int64_t layer_index) const;                // Error(kInternal) if absent
  bool hosts(int worker, int64_t layer_index, int64_t expert_id) const;  // Error(kInternal): bad worker
  // Worker that serves the given occurrence of an expert: the replicas split the occurrences
  // evenly and deterministically: replica (occurrence_key mod replicas), replicas ascending.
  int worker_for(int64_t layer_index, int64_t expert_id, uint64_t occurrence_key) const;

  // Human-readable: per layer its masked_experts, workers, expert_load, and the balance figures
  // (worker_load, max_over_mean_load), which from_json_text recomputes rather than trusts. With
  // worker_node, also "worker_nodes" and per layer the expected inter-node rows per token
  // (placement_traffic.h), likewise recomputed.
  std::string to_json_text() const;
  // Error(kInvalidArgument) naming source, layer and problem for any rule a plan breaks.
  static PlacementPlan from_json_text(const std::string& text, const std::string& source);
  std::string to_cereal_bytes() const;  // binary, versioned
  // Error(kCommunication) for a wrong version, truncated or trailing bytes; kInvalidArgument for a
  // decoded plan that breaks a rule.
  static PlacementPlan from_cereal_bytes(const std::string& bytes);
};

// Throws Error(kInvalidArgument) when the slots cannot hold every present expert
// (num_workers * slots < present experts), the budget is too small for the slots that needs,
// num_workers < 1, or the profile does not fit the layers (count list length, a layer that is not
// a MoE layer, a negative count); the message says the minimum that works.
PlacementPlan plan_placement(const PlacementRequest& request);
// The baseline: expert e on worker e mod num_workers, no replicas (for comparisons).
PlacementPlan round_robin_placement(const PlacementRequest& request);

}  // namespace epic
