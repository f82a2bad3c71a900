// --expert-budget and the expert store's flags (expert_budget.h).
#include "launch/expert_budget.h"

#include "coordinator/placement_residency.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <utility>

#include "kernels/error.h"
#include "worker/offloading_moe_executor.h"

namespace epic::cli {
namespace {

const char* kBudgetHelp =
    "give N (experts per MoE layer), P% (percent of each layer's experts, above 0 and at most 100) or "
    "total:N (N experts over all layers, split by the layers' expert counts)";

// A whole number >= 1 or an Error naming the flag and the budget.
int64_t positive_count(const std::string& text, const std::string& budget, const std::string& flag) {
  char* end = nullptr;
  const long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || end == nullptr || *end != '\0' || value < 1)
    throw Error(ErrorCode::kInvalidArgument, flag + " '" + budget + "': " + kBudgetHelp);
  return value;
}

double percent_of(const std::string& budget, const std::string& flag) {
  const std::string number = budget.substr(0, budget.size() - 1);
  char* end = nullptr;
  const double value = std::strtod(number.c_str(), &end);
  if (number.empty() || end == nullptr || *end != '\0' || !(value > 0 && value <= 100))
    throw Error(ErrorCode::kInvalidArgument, flag + " '" + budget + "': " + kBudgetHelp);
  return value;
}

void check_budget_grammar(const std::string& budget, const std::string& flag) {
  if (budget.rfind("total:", 0) == 0) {
    positive_count(budget.substr(6), budget, flag);
  } else if (!budget.empty() && budget.back() == '%') {
    percent_of(budget, flag);
  } else {
    positive_count(budget, budget, flag);
  }
}

}  // namespace

void check_expert_store_flags(const ExpertStoreFlags& flags) {
  if (!flags.enabled()) {
    if (flags.tier != "host" || flags.eviction != "lru" || flags.on_miss != "wait" ||
        flags.prefetch != "next-layer" || flags.admit_per_step != 0 || !flags.host_budget.empty())
      throw Error(
          ErrorCode::kInvalidArgument,
          "--expert-tier, --host-budget, --eviction, --on-miss, --prefetch and --admit-per-step choose "
          "how a budget of resident experts is kept: add --expert-budget");
    return;
  }
  check_budget_grammar(flags.budget, "--expert-budget");
  const ExpertTier tier = parse_expert_tier(flags.tier);
  if (!flags.host_budget.empty()) {
    check_budget_grammar(flags.host_budget, "--host-budget");
    if (tier != ExpertTier::kDisk)
      throw Error(
          ErrorCode::kInvalidArgument,
          "--host-budget caps a pinned host cache in front of the checkpoint on disk, but --expert-tier " +
              flags.tier +
              " keeps every expert in host memory already: add --expert-tier disk (or drop --host-budget)");
  }
  parse_eviction_policy(flags.eviction);
  const OnMiss on_miss = parse_on_miss(flags.on_miss);
  parse_prefetch(flags.prefetch);
  if (flags.admit_per_step < 0)
    throw Error(ErrorCode::kInvalidArgument, "--admit-per-step " + std::to_string(flags.admit_per_step) +
                                                 ": give 0 (admit every miss) or a positive count");
  if (flags.admit_per_step > 0 && on_miss != OnMiss::kRead)
    throw Error(
        ErrorCode::kInvalidArgument,
        "--admit-per-step limits the experts --on-miss read copies in behind a step; with --on-miss " +
            flags.on_miss + " a miss is loaded when it is needed: drop --admit-per-step");
  if (on_miss == OnMiss::kRead && parse_expert_tier(flags.tier) != ExpertTier::kHost)
    throw Error(ErrorCode::kInvalidArgument,
                "--on-miss read computes a missing expert from host memory in place: use --expert-tier host "
                "(the disk tier has nothing the GPU can read), or --on-miss wait");
  if (!(flags.usefulness_decay > 0 && flags.usefulness_decay <= 1))
    throw Error(ErrorCode::kInvalidArgument, "--usefulness-decay must be above 0 and at most 1");
}

ResidencyBudget expert_budget_slots(const std::string& budget, const ExpertInventory& inventory,
                                    const std::string& flag) {
  std::map<int64_t, std::vector<uint8_t>> present;
  for (const auto& [layer, experts] : inventory) present[layer] = experts.present;
  if (budget.rfind("total:", 0) == 0)
    return split_residency_budget(positive_count(budget.substr(6), budget, flag), present);
  ResidencyBudget slots;
  const bool percent = !budget.empty() && budget.back() == '%';
  const double fraction = percent ? percent_of(budget, flag) / 100.0 : 0.0;
  const int64_t per_layer = percent ? 0 : positive_count(budget, budget, flag);
  for (const auto& [layer, experts] : inventory) {
    const int64_t count = experts.num_present();
    const int64_t wanted =
        percent ? std::max<int64_t>(1, std::llround(fraction * static_cast<double>(count))) : per_layer;
    slots.slots_by_layer[layer] = std::min(wanted, count);
  }
  return slots;
}

ExpertStoreOptions expert_store_options(const ExpertStoreFlags& flags, const ExpertInventory& hosted,
                                        std::optional<ScalarType> weight_type, bool allow_missing_experts,
                                        bool allow_nonfinite_weights,
                                        std::function<bool(int64_t layer, int64_t expert_id)> hosts_expert) {
  ExpertStoreOptions options;
  options.tier = parse_expert_tier(flags.tier);
  options.budget = expert_budget_slots(flags.budget, hosted);
  options.hosts_expert = std::move(hosts_expert);
  options.policy = parse_eviction_policy(flags.eviction);
  options.usefulness_decay = flags.usefulness_decay;
  options.weight_type = weight_type;
  options.allow_missing_experts = allow_missing_experts;
  options.allow_nonfinite_weights = allow_nonfinite_weights;
  options.admit_per_layer = flags.admit_per_step;
  if (!flags.host_budget.empty()) {
    options.host_budget = expert_budget_slots(flags.host_budget, hosted, "--host-budget");
    for (const auto& [layer, slots] : options.budget.slots_by_layer) {
      const int64_t cached = options.host_budget.slots_by_layer.at(layer);
      if (cached < slots)
        throw Error(
            ErrorCode::kInvalidArgument,
            "--host-budget " + flags.host_budget + " gives MoE layer " + std::to_string(layer) + " " +
                std::to_string(cached) + " cached experts, fewer than the " + std::to_string(slots) +
                " resident ones --expert-budget " + flags.budget +
                " gives it; every resident expert passes through the host cache, so give --host-budget "
                "at least --expert-budget");
    }
  }
  return options;
}

std::function<std::map<int64_t, int64_t>(const std::map<int64_t, int64_t>&)> budget_resident_slots(
    const std::string& budget) {
  return [budget](const std::map<int64_t, int64_t>& hosted_by_layer) {
    ExpertInventory hosted;  // the worker's experts as an inventory, for the budget's rules
    for (const auto& [layer, count] : hosted_by_layer) {
      LayerExpertInventory& experts = hosted[layer];
      experts.num_experts = std::max<int64_t>(count, 1);
      experts.present.assign(static_cast<size_t>(experts.num_experts), 0);
      std::fill(experts.present.begin(), experts.present.begin() + count, uint8_t{1});
    }
    return expert_budget_slots(budget, hosted).slots_by_layer;
  };
}

std::vector<LayerResidencyEstimate> expected_resident_share(const PlacementPlan& plan,
                                                            const std::string& budget) {
  // Each worker's slots by the planner's own rule (budget_resident_slots over its hosted counts), and its
  // miss load and cost by the planner's own formulas (coordinator/placement_residency.h).
  const auto resident_slots = budget_resident_slots(budget);
  std::vector<std::map<int64_t, int64_t>> slots(static_cast<size_t>(plan.num_workers));
  for (int w = 0; w < plan.num_workers; ++w) {
    std::map<int64_t, int64_t> hosted_by_layer;
    for (const LayerPlacement& layer : plan.layers)
      hosted_by_layer[layer.layer] = static_cast<int64_t>(layer.worker_experts[w].size());
    slots[w] = resident_slots(hosted_by_layer);
  }
  const double miss_cost = PlacementRequest{}.miss_cost;
  std::vector<LayerResidencyEstimate> estimates;
  for (const LayerPlacement& layer : plan.layers) {
    // The load one replica of an expert serves.
    std::vector<double> weight(static_cast<size_t>(layer.num_experts), 0.0);
    for (int64_t e = 0; e < layer.num_experts; ++e)
      weight[e] = layer.expert_load[e] / static_cast<double>(std::max<size_t>(1, layer.expert_workers[e].size()));
    LayerResidencyEstimate estimate;
    estimate.layer = layer.layer;
    estimate.min_slots = INT64_MAX;
    double share_sum = 0, layer_load = 0, max_cost = 0;
    int workers_with_experts = 0;
    for (int w = 0; w < plan.num_workers; ++w) {
      const std::vector<int64_t>& experts = layer.worker_experts[w];
      if (experts.empty()) continue;
      const int64_t budget_slots = slots[w].at(layer.layer);
      double total = 0;
      for (int64_t e : experts) total += weight[e];
      const double miss = expected_miss_load(experts, weight, budget_slots);
      const double share = total > 0 ? (total - miss) / total : 1.0;
      layer_load += total;
      max_cost = std::max(max_cost, expected_budget_cost(experts, weight, budget_slots, miss_cost));
      estimate.min_resident_share = std::min(estimate.min_resident_share, share);
      share_sum += share;
      ++workers_with_experts;
      estimate.min_slots = std::min(estimate.min_slots, budget_slots);
      estimate.max_slots = std::max(estimate.max_slots, budget_slots);
    }
    if (workers_with_experts == 0) estimate.min_slots = 0;
    estimate.mean_resident_share = workers_with_experts > 0 ? share_sum / workers_with_experts : 1.0;
    const double mean_load = layer_load / static_cast<double>(plan.num_workers);
    estimate.max_cost_over_resident = mean_load > 0 ? max_cost / mean_load : 1.0;
    estimates.push_back(estimate);
  }
  return estimates;
}

std::string residency_estimate_table(const std::vector<LayerResidencyEstimate>& estimates,
                                     const std::string& budget,
                                     const std::vector<LayerResidencyEstimate>* load_only) {
  std::string out =
      "expert budget " + budget +
      ": per layer, resident slots per worker, the share of each worker's expected load its hottest experts "
      "serve (a static cache's hit rate; the load is the profile's, or uniform), and the costliest worker's "
      "expected time over all resident (a miss at " +
      std::to_string(static_cast<int>(PlacementRequest{}.miss_cost)) + "x a hit)" +
      (load_only ? "; beside them the plan made for load alone" : "") + "\n";
  char line[240];
  std::snprintf(line, sizeof(line), "%6s %12s %12s %12s %12s%s\n", "layer", "slots", "min share",
                "mean share", "max cost", load_only ? "   load-only: min share, max cost" : "");
  out += line;
  for (size_t i = 0; i < estimates.size(); ++i) {
    const LayerResidencyEstimate& e = estimates[i];
    const std::string slots = e.min_slots == e.max_slots
                                  ? std::to_string(e.min_slots)
                                  : std::to_string(e.min_slots) + "-" + std::to_string(e.max_slots);
    std::snprintf(line, sizeof(line), "%6lld %12s %12.3f %12.3f %12.2f", static_cast<long long>(e.layer),
                  slots.c_str(), e.min_resident_share, e.mean_resident_share, e.max_cost_over_resident);
    out += line;
    if (load_only && i < load_only->size()) {
      std::snprintf(line, sizeof(line), " %20.3f %12.2f", (*load_only)[i].min_resident_share,
                    (*load_only)[i].max_cost_over_resident);
      out += line;
    }
    out += "\n";
  }
  return out;
}

nlohmann::json expert_store_report(const ExpertStore& store, const OffloadStats& offload,
                                   const ExpertStoreFlags& flags) {
  const ExpertStoreStats stats = store.stats();
  const int64_t asked = stats.hits + stats.misses;
  return {{"budget", flags.budget},
          {"tier", flags.tier},
          {"host_budget", flags.host_budget},
          {"eviction", flags.eviction},
          {"on_miss", flags.on_miss},
          {"expert_bytes", store.expert_bytes()},
          {"resident_bytes", stats.resident_bytes},
          {"host_tier_bytes", stats.host_tier_bytes},
          {"hits", stats.hits},
          {"misses", stats.misses},
          {"hit_rate", asked > 0 ? double(stats.hits) / double(asked) : 1.0},
          {"evictions", stats.evictions},
          {"prefetch_loads", stats.prefetch_loads},
          {"bytes_from_host", stats.bytes_from_host},
          {"bytes_from_disk", stats.bytes_from_disk},
          {"checkpoint_bytes_read", stats.source_bytes_read},
          // --host-budget: of the misses, those the host cache held and those read into it from disk.
          {"host_cache_hits", stats.host_cache_hits},
          {"host_cache_misses", stats.host_cache_misses},
          {"host_cache_evictions", stats.host_cache_evictions},
          {"stall_seconds", stats.stall_seconds},
          {"prefetch_seconds", stats.prefetch_seconds},
          // --on-miss read admits each step's misses behind it (asynchronous copies) instead.
          {"prefetch", flags.on_miss != "read" ? flags.prefetch
                       : flags.admit_per_step > 0
                           ? "behind the step, at most " + std::to_string(flags.admit_per_step) + " per layer"
                           : std::string("behind the step")},
          {"demand_hits", offload.demand_hits},
          {"demand_misses", offload.demand_misses},
          {"demand_hit_rate",
           offload.demand_hits + offload.demand_misses > 0
               ? double(offload.demand_hits) / double(offload.demand_hits + offload.demand_misses)
               : 1.0},
          {"prefetched", offload.prefetched},
          {"picks", offload.picks},
          {"substituted_picks", offload.substituted},
          {"read_in_place", offload.read_in_place},
          {"bytes_read_in_place", offload.bytes_read_in_place},
          {"expert_groups", offload.expert_groups},
          {"moe_calls", offload.calls}};
}

std::string expert_store_summary(const nlohmann::json& r) {
  char line[768];
  std::snprintf(
      line, sizeof(line),
      "experts: budget %s (%s tier, %s eviction, on miss %s, prefetch %s): %.2f MB resident; %lld hits, %lld "
      "misses, %lld evictions; the expert FFN found %.3f of its experts resident (%lld loaded ahead of "
      "need); "
      "%.2f MB moved from host, %.2f MB from disk, %.2f MB read in place; %.3f s stalled on misses, %.3f s "
      "prefetching; %lld of %lld picks substituted\n",
      r["budget"].get<std::string>().c_str(), r["tier"].get<std::string>().c_str(),
      r["eviction"].get<std::string>().c_str(), r["on_miss"].get<std::string>().c_str(),
      r["prefetch"].get<std::string>().c_str(), r["resident_bytes"].get<double>() / 1e6,
      static_cast<long long>(r["hits"].get<int64_t>()), static_cast<long long>(r["misses"].get<int64_t>()),
      static_cast<long long>(r["evictions"].get<int64_t>()), r["demand_hit_rate"].get<double>(),
      static_cast<long long>(r["prefetched"].get<int64_t>()), r["bytes_from_host"].get<double>() / 1e6,
      r["bytes_from_disk"].get<double>() / 1e6, r["bytes_read_in_place"].get<double>() / 1e6,
      r["stall_seconds"].get<double>(), r["prefetch_seconds"].get<double>(),
      static_cast<long long>(r["substituted_picks"].get<int64_t>()),
      static_cast<long long>(r["picks"].get<int64_t>()));
  std::string text = line;
  if (r.contains("host_budget") && !r["host_budget"].get<std::string>().empty()) {
    std::snprintf(
        line, sizeof(line),
        "experts: host cache %s (%.2f MB pinned): %lld misses found there, %lld read from disk into "
        "it, %lld evictions\n",
        r["host_budget"].get<std::string>().c_str(), r["host_tier_bytes"].get<double>() / 1e6,
        static_cast<long long>(r["host_cache_hits"].get<int64_t>()),
        static_cast<long long>(r["host_cache_misses"].get<int64_t>()),
        static_cast<long long>(r["host_cache_evictions"].get<int64_t>()));
    text += line;
  }
  return text;
}

OffloadStats exchange_store_stats(const StoreDemandCounts& demand, const ExpertStore& store) {
  OffloadStats stats;
  stats.demand_hits = demand.hits;
  stats.demand_misses = demand.misses;
  stats.picks = demand.hits + demand.misses;
  stats.read_in_place = demand.read_in_place;
  stats.bytes_read_in_place = static_cast<uint64_t>(demand.read_in_place) * store.expert_bytes();
  stats.substituted = demand.substituted;
  return stats;
}

}  // namespace epic::cli
