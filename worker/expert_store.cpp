// The expert store (expert_store.h): slot tensors per MoE layer, a host or disk lower tier, and the
// residency set that decides what each slot holds.
#include "worker/expert_store.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <string>

#include "kernels/error.h"
#include "worker/forwarding_backend.h"
#include "worker/weight_loader.h"

namespace epic {
namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

std::string join(const std::vector<int64_t>& values) {
  std::string text;
  for (int64_t value : values) text += (text.empty() ? "" : ", ") + std::to_string(value);
  return text.empty() ? "none" : text;
}

}  // namespace

ExpertTier parse_expert_tier(std::string_view text) {
  if (text == "host") return ExpertTier::kHost;
  if (text == "disk") return ExpertTier::kDisk;
  throw Error(ErrorCode::kInvalidArgument,
              "expert tier '" + std::string(text) + "' is unknown (use host or disk)");
}

std::string_view expert_tier_name(ExpertTier tier) { return tier == ExpertTier::kDisk ? "disk" : "host"; }

std::vector<int64_t> most_wanted_first(const std::map<int64_t, double>& wanted) {
  std::vector<std::pair<double, int64_t>> order;
  for (const auto& [expert, amount] : wanted) order.push_back({-amount, expert});
  std::sort(order.begin(), order.end());
  std::vector<int64_t> experts;
  for (const auto& [amount, expert] : order) experts.push_back(expert);
  return experts;
}

struct ExpertStore::Layer {
  MoeLayerWeights weights;            // gate_up/down: the slots; local_index: published slots
  std::vector<int32_t> hosted_index;  // [num_experts]: position in weights.hosted, -1 when not hosted
  std::vector<int32_t> slot_of;       // [num_experts]: the slot the residency set gave it, -1 when none
  std::vector<int64_t> slot_expert;   // [slots]: the expert a slot holds, -1 when free
  // The local_index the FFN sees, staged for its upload (pinned on cuda, so the copy is asynchronous
  // and the bytes must stay until synchronize: every call synchronises before it returns). An expert
  // with a slot but -1 here is resident in the residency set but its bytes are not there (a copy that
  // failed): the next ensure_resident loads it again.
  std::unique_ptr<Buffer> local_index_host;
  // Host tier: [hosted, 2I, H] and [hosted, H, I], in `hosted` order.
  std::unique_ptr<Buffer> host_gate_up, host_down;
  // Host tier: the address table I64 [num_experts, 2] and its pinned mirror (address_table()). The
  // mirror is what the table's uploads read, asynchronously: an entry changes only after the uploads
  // that read it before have run (every change waits for the side copies, which follow them).
  OwnedTensor addresses;
  std::unique_ptr<Buffer> addresses_host;
  int64_t* mirror() const { return static_cast<int64_t*>(addresses_host->data()); }

  int32_t* published() const { return static_cast<int32_t*>(local_index_host->data()); }
  bool loaded(int64_t expert_id) const { return published()[expert_id] >= 0; }
};

ExpertStore::ExpertStore(const ModelConfig& config, WeightSource& source, Backend& backend,
                         ExpertStoreOptions options)
    : config_(config),
      source_(source),
      backend_(backend),
      tier_(options.tier),
      allow_nonfinite_weights_(options.allow_nonfinite_weights),
      reader_threads_(options.reader_threads),
      staging_experts_(options.staging_experts),
      admit_per_layer_(options.admit_per_layer) {
  EPIC_CHECK(
      admit_per_layer_ >= 0, ErrorCode::kInvalidArgument,
      "expert store: admit_per_layer is " + std::to_string(admit_per_layer_) + "; give 0 (all) or more");
  EPIC_CHECK(staging_experts_ >= 1, ErrorCode::kInvalidArgument,
             "expert store: staging_experts is " + std::to_string(staging_experts_) +
                 "; the disk tier needs room to stage at least one expert");
  const ExpertInventory inventory = inspect_experts(config, source, options.allow_missing_experts);
  weight_type_ = options.weight_type.value_or(stored_weight_type(config, source));
  EPIC_CHECK(weight_type_ == ScalarType::kF32 || weight_type_ == ScalarType::kBF16,
             ErrorCode::kInvalidArgument,
             std::string("expert store: weights are kept as f32 or bf16, not ") + scalar_name(weight_type_));
  const int64_t hidden = config.hidden_size, inter = config.moe_intermediate_size;
  gate_up_bytes_ = static_cast<size_t>(2 * inter * hidden) * scalar_size(weight_type_);
  down_bytes_ = static_cast<size_t>(hidden * inter) * scalar_size(weight_type_);

  std::vector<int64_t> moe_layers;
  for (const auto& [layer, experts] : inventory) moe_layers.push_back(layer);
  for (const auto& [layer, slots] : options.budget.slots_by_layer) {
    EPIC_CHECK(inventory.count(layer) != 0, ErrorCode::kInvalidArgument,
               "expert store: the residency budget gives layer " + std::to_string(layer) +
                   " slots, but it is not a MoE layer (MoE layers: " + join(moe_layers) + ")");
    EPIC_CHECK(slots >= 0, ErrorCode::kInvalidArgument,
               "expert store: the residency budget gives layer " + std::to_string(layer) + " " +
                   std::to_string(slots) + " slots; a budget counts experts and cannot be negative");
  }

  ResidencyBudget capped;
  std::vector<TensorLoad> host_loads;
  for (const auto& [layer, experts] : inventory) {
    auto budget = options.budget.slots_by_layer.find(layer);
    EPIC_CHECK(
        budget != options.budget.slots_by_layer.end(), ErrorCode::kInvalidArgument,
        "expert store: the residency budget has no entry for MoE layer " + std::to_string(layer) +
            " (budgeted layers: " +
            [&] {
              std::vector<int64_t> budgeted;
              for (const auto& [id, slots] : options.budget.slots_by_layer) budgeted.push_back(id);
              return join(budgeted);
            }() +
            "); budget every MoE layer, e.g. with split_residency_budget");
    auto state = std::make_unique<Layer>();
    MoeLayerWeights& weights = state->weights;
    weights.num_experts = experts.num_experts;
    weights.present = experts.present;
    state->hosted_index.assign(weights.num_experts, -1);
    for (int64_t expert = 0; expert < weights.num_experts; ++expert) {
      if (!weights.present[expert]) continue;
      if (options.hosts_expert && !options.hosts_expert(layer, expert)) continue;
      state->hosted_index[expert] = static_cast<int32_t>(weights.hosted.size());
      weights.hosted.push_back(expert);
    }
    const int64_t num_hosted = static_cast<int64_t>(weights.hosted.size());
    // More slots than hosted experts would never fill: the budget is an upper bound.
    const int64_t slots = std::min(budget->second, num_hosted);
    capped.slots_by_layer[layer] = slots;
    weights.gate_up = backend.new_tensor(weight_type_, {slots, 2 * inter, hidden});
    weights.down = backend.new_tensor(weight_type_, {slots, hidden, inter});
    state->slot_of.assign(weights.num_experts, -1);
    state->slot_expert.assign(slots, -1);
    state->local_index_host = backend.allocate_staging(weights.num_experts * sizeof(int32_t));
    std::fill(state->published(), state->published() + weights.num_experts, -1);
    weights.local_index = backend.new_tensor(ScalarType::kI32, {weights.num_experts});
    backend.copy_from_host(weights.local_index, 0, state->published(), weights.num_experts * sizeof(int32_t));

    const std::string prefix = "layer " + std::to_string(layer) + " expert ";
    for (int64_t position = 0; position < num_hosted; ++position) {
      const int64_t expert = weights.hosted[position];
      const std::vector<std::string> names = expert_tensor_names(config, layer, expert);
      if (tier_ == ExpertTier::kHost) continue;
      // The disk tier reads on a miss, maybe hours from now: check what it will read up front.
      const std::vector<std::vector<int64_t>> shapes = {{inter, hidden}, {inter, hidden}, {hidden, inter}};
      for (size_t t = 0; t < names.size(); ++t) {
        const TensorInfo& info = source.info(names[t]);
        if (info.shape == shapes[t] && dtype_is_float_storage(info.dtype)) continue;
        throw Error(ErrorCode::kInvalidCheckpoint,
                    source.location_of(names[t]) + ": tensor '" + names[t] + "' has shape " +
                        shape_to_string(info.shape) + " and dtype " + dtype_name(info.dtype) +
                        ", but the model config expects shape " + shape_to_string(shapes[t]) +
                        " of F32, F16 or BF16; check config.json against the checkpoint");
      }
    }
    if (tier_ == ExpertTier::kHost && num_hosted > 0) {
      state->host_gate_up = backend.allocate_staging(static_cast<size_t>(num_hosted) * gate_up_bytes());
      state->host_down = backend.allocate_staging(static_cast<size_t>(num_hosted) * down_bytes());
      const Tensor gate_up_tier(state->host_gate_up->data(), weight_type_, MemorySpace::kHost,
                                {num_hosted, 2 * inter, hidden});
      const Tensor down_tier(state->host_down->data(), weight_type_, MemorySpace::kHost,
                             {num_hosted, hidden, inter});
      for (int64_t position = 0; position < num_hosted; ++position) {
        const std::vector<std::string> names = expert_tensor_names(config, layer, weights.hosted[position]);
        const size_t gate_up_offset = static_cast<size_t>(position) * gate_up_bytes();
        host_loads.push_back({names[0], {inter, hidden}, gate_up_tier, gate_up_offset});
        host_loads.push_back({names[1], {inter, hidden}, gate_up_tier, gate_up_offset + gate_up_bytes() / 2});
        host_loads.push_back(
            {names[2], {hidden, inter}, down_tier, static_cast<size_t>(position) * down_bytes()});
      }
    }
    if (tier_ == ExpertTier::kHost) {
      state->addresses_host = backend.allocate_staging(static_cast<size_t>(weights.num_experts) * 2 * 8);
      std::fill(state->mirror(), state->mirror() + 2 * weights.num_experts, int64_t{0});
      for (int64_t expert : weights.hosted) point_at_host_tier(*state, expert);
      state->addresses = backend.new_tensor(ScalarType::kI64, {weights.num_experts, 2});
      backend.copy_from_host(state->addresses, 0, state->mirror(),
                             static_cast<size_t>(weights.num_experts) * 2 * 8);
    }
    layers_[layer] = std::move(state);
  }
  residency_ = std::make_unique<ExpertResidencySet>(capped, options.policy, options.usefulness_decay);
  if (!options.host_budget.slots_by_layer.empty()) {
    EPIC_CHECK(tier_ == ExpertTier::kDisk, ErrorCode::kInvalidArgument,
               "expert store: a host budget caps a cache in front of the disk tier, but the host tier keeps "
               "every hosted expert in host memory already; use the disk tier or no host budget");
    std::map<int64_t, std::vector<int64_t>> hosted_by_layer;
    for (const auto& [layer, state] : layers_) {
      hosted_by_layer[layer] = state->weights.hosted;
      const auto host = options.host_budget.slots_by_layer.find(layer);
      EPIC_CHECK(host != options.host_budget.slots_by_layer.end(), ErrorCode::kInvalidArgument,
                 "expert store: the host budget has no entry for MoE layer " + std::to_string(layer) +
                     "; budget every MoE layer");
      const int64_t hosted = static_cast<int64_t>(state->weights.hosted.size());
      const int64_t slots = capped.slots_by_layer.at(layer);
      // Every expert a step copies into the slots passes through the cache, all of them at once.
      EPIC_CHECK(std::min(host->second, hosted) >= slots, ErrorCode::kInvalidArgument,
                 "expert store: the host budget gives layer " + std::to_string(layer) + " " +
                     std::to_string(host->second) + " experts, fewer than its " + std::to_string(slots) +
                     " backend slots; the host cache holds what the slots hold and more, so give it at "
                     "least the slots' budget");
    }
    HostExpertCacheOptions cache;
    cache.budget = options.host_budget;
    cache.policy = options.policy;
    cache.usefulness_decay = options.usefulness_decay;
    cache.weight_type = weight_type_;
    cache.allow_nonfinite_weights = allow_nonfinite_weights_;
    cache.reader_threads = reader_threads_;
    host_cache_ = std::make_unique<HostExpertCache>(config, source, backend, hosted_by_layer, cache);
  }
  if (!host_loads.empty()) {
    HostMemoryView host_tier(backend);
    WeightLoadOptions load_options;
    load_options.allow_nonfinite_weights = allow_nonfinite_weights_;
    load_options.num_threads = reader_threads_;
    load_tensors(source, host_tier, host_loads, load_options);
  }
  if (tier_ == ExpertTier::kDisk && !host_cache_)
    disk_staging_ = backend.allocate_staging(static_cast<size_t>(staging_experts_) * expert_bytes());
  backend.synchronize();  // the local_index and address uploads read their staging buffers
}

void ExpertStore::point_at_host_tier(Layer& state, int64_t expert_id) const {
  const auto position = static_cast<size_t>(state.hosted_index[expert_id]);
  state.mirror()[2 * expert_id] = reinterpret_cast<int64_t>(
      static_cast<uint8_t*>(state.host_gate_up->data()) + position * gate_up_bytes());
  state.mirror()[2 * expert_id + 1] =
      reinterpret_cast<int64_t>(static_cast<uint8_t*>(state.host_down->data()) + position * down_bytes());
}

void ExpertStore::point_at_slot(Layer& state, int64_t expert_id, int64_t slot) const {
  state.mirror()[2 * expert_id] = reinterpret_cast<int64_t>(
      static_cast<uint8_t*>(state.weights.gate_up.view().data) + static_cast<size_t>(slot) * gate_up_bytes());
  state.mirror()[2 * expert_id + 1] = reinterpret_cast<int64_t>(
      static_cast<uint8_t*>(state.weights.down.view().data) + static_cast<size_t>(slot) * down_bytes());
}

const Tensor& ExpertStore::address_table(int64_t layer) const {
  const Layer& state = layer_state(layer, "address_table");
  EPIC_CHECK(tier_ == ExpertTier::kHost, ErrorCode::kUnsupported,
             "expert store: experts are read in place only from the host tier (--expert-tier host); the "
             "disk tier has nothing the backend can read");
  return state.addresses.view();
}

ExpertStore::~ExpertStore() = default;

ExpertStore::Layer& ExpertStore::layer_state(int64_t layer, const char* operation) {
  return const_cast<Layer&>(static_cast<const ExpertStore&>(*this).layer_state(layer, operation));
}

const ExpertStore::Layer& ExpertStore::layer_state(int64_t layer, const char* operation) const {
  auto it = layers_.find(layer);
  if (it != layers_.end()) return *it->second;
  std::vector<int64_t> moe_layers;
  for (const auto& [id, state] : layers_) moe_layers.push_back(id);
  throw Error(ErrorCode::kInvalidArgument,
              std::string("expert store ") + operation + ": layer " + std::to_string(layer) +
                  " is not a MoE layer of this model (MoE layers: " + join(moe_layers) +
                  "); dense layers have no experts");
}

std::vector<int64_t> ExpertStore::distinct_hosted(const Layer& state, int64_t layer,
                                                  const std::vector<int64_t>& experts,
                                                  const char* operation) const {
  std::vector<int64_t> distinct;
  for (int64_t expert : experts) {
    EPIC_CHECK(expert >= 0 && expert < state.weights.num_experts, ErrorCode::kInvalidArgument,
               std::string("expert store ") + operation + ": layer " + std::to_string(layer) +
                   " has experts 0.." + std::to_string(state.weights.num_experts - 1) + ", not expert " +
                   std::to_string(expert));
    EPIC_CHECK(state.hosted_index[expert] >= 0, ErrorCode::kInvalidArgument,
               std::string("expert store ") + operation + ": layer " + std::to_string(layer) + " expert " +
                   std::to_string(expert) +
                   " is not hosted by this worker (hosted: " + join(state.weights.hosted) +
                   "); its rows go to the worker the placement gives it, not to this store");
    if (std::find(distinct.begin(), distinct.end(), expert) == distinct.end()) distinct.push_back(expert);
  }
  return distinct;
}

void ExpertStore::check_step(int64_t step, const char* operation) const {
  EPIC_CHECK(step >= latest_step_, ErrorCode::kInvalidArgument,
             std::string("expert store ") + operation + ": step " + std::to_string(step) +
                 " is before step " + std::to_string(latest_step_) +
                 ", already seen; steps must not decrease");
}

void ExpertStore::apply_pins(int64_t extra_layer, const std::vector<int64_t>& extra) {
  residency_->unpin_all();
  for (const auto& [layer, experts] : pinned_by_layer_)
    for (int64_t expert : experts) residency_->pin(layer, expert);
  for (int64_t expert : extra) residency_->pin(extra_layer, expert);
}

bool ExpertStore::admit(Layer& state, int64_t layer, int64_t expert_id, int64_t step,
                        ExpertLoadReport& report, std::vector<CopyJob>& jobs) {
  const Admission admission = residency_->admit(layer, expert_id, step);
  if (!admission.resident) return false;
  int64_t slot = -1;
  if (admission.evicted_expert) {
    const int64_t victim = *admission.evicted_expert;
    slot = state.slot_of[victim];
    EPIC_CHECK(slot >= 0, ErrorCode::kInternal,
               "expert store: layer " + std::to_string(layer) + " evicted expert " + std::to_string(victim) +
                   ", which has no slot");
    state.slot_of[victim] = -1;
    state.published()[victim] = -1;
    if (state.addresses_host) point_at_host_tier(state, victim);
    report.evictions += 1;
    report.evicted.push_back(victim);
  } else {
    const auto free_slot = std::find(state.slot_expert.begin(), state.slot_expert.end(), -1);
    EPIC_CHECK(free_slot != state.slot_expert.end(), ErrorCode::kInternal,
               "expert store: layer " + std::to_string(layer) + " admitted expert " +
                   std::to_string(expert_id) + " without eviction but has no free slot");
    slot = free_slot - state.slot_expert.begin();
  }
  state.slot_expert[slot] = expert_id;
  state.slot_of[expert_id] = static_cast<int32_t>(slot);
  jobs.push_back({expert_id, slot});
  return true;
}

void ExpertStore::copy_from_disk(Layer& state, int64_t layer, const std::vector<CopyJob>& jobs,
                                 ExpertLoadReport& report) {
  const int64_t hidden = config_.hidden_size, inter = config_.moe_intermediate_size;
  const Tensor staging(disk_staging_->data(), weight_type_, MemorySpace::kHost,
                       {staging_experts_, static_cast<int64_t>(expert_bytes() / scalar_size(weight_type_))});
  HostMemoryView host_tier(backend_);
  WeightLoadOptions load_options;
  load_options.allow_nonfinite_weights = allow_nonfinite_weights_;
  load_options.num_threads = reader_threads_;
  for (size_t first = 0; first < jobs.size(); first += static_cast<size_t>(staging_experts_)) {
    const size_t count = std::min(jobs.size() - first, static_cast<size_t>(staging_experts_));
    std::vector<TensorLoad> loads;
    for (size_t k = 0; k < count; ++k) {
      const std::vector<std::string> names = expert_tensor_names(config_, layer, jobs[first + k].expert_id);
      const size_t base = k * expert_bytes();
      loads.push_back({names[0], {inter, hidden}, staging, base});
      loads.push_back({names[1], {inter, hidden}, staging, base + gate_up_bytes() / 2});
      loads.push_back({names[2], {hidden, inter}, staging, base + gate_up_bytes()});
    }
    report.source_bytes_read += load_tensors(source_, host_tier, loads, load_options).bytes_read;
    const auto* bytes = static_cast<const uint8_t*>(disk_staging_->data());
    for (size_t k = 0; k < count; ++k) {
      const size_t slot = static_cast<size_t>(jobs[first + k].slot);
      backend_.copy_from_host(state.weights.gate_up, slot * gate_up_bytes(), bytes + k * expert_bytes(),
                              gate_up_bytes());
      backend_.copy_from_host(state.weights.down, slot * down_bytes(),
                              bytes + k * expert_bytes() + gate_up_bytes(), down_bytes());
      report.bytes_from_disk += expert_bytes();
    }
    backend_.synchronize();  // the next batch refills the staging buffer
  }
}

void ExpertStore::copy_through_host_cache(Layer& state, int64_t layer, const std::vector<CopyJob>& jobs,
                                          ExpertLoadReport& report) {
  std::vector<int64_t> experts;
  for (const CopyJob& job : jobs) experts.push_back(job.expert_id);
  const HostCacheFetch fetched = host_cache_->fetch(layer, experts, latest_step_);
  report.host_cache_hits += fetched.hits;
  report.host_cache_misses += fetched.misses;
  report.host_cache_evictions += fetched.evictions;
  report.source_bytes_read += fetched.source_bytes_read;
  for (size_t k = 0; k < jobs.size(); ++k) {
    const size_t slot = static_cast<size_t>(jobs[k].slot);
    backend_.copy_from_host(state.weights.gate_up, slot * gate_up_bytes(), fetched.bytes[k], gate_up_bytes());
    backend_.copy_from_host(state.weights.down, slot * down_bytes(), fetched.bytes[k] + gate_up_bytes(),
                            down_bytes());
    (fetched.was_cached[k] ? report.bytes_from_host : report.bytes_from_disk) += expert_bytes();
  }
  backend_.synchronize();  // the cache's slots may be refilled by the next fetch
}

void ExpertStore::copy_in(Layer& state, int64_t layer, const std::vector<CopyJob>& jobs,
                          ExpertLoadReport& report) {
  if (jobs.empty()) return;  // an eviction always comes with the copy of its replacement
  const auto upload_table = [&] {
    if (!state.addresses_host) return;
    backend_.copy_from_host(state.addresses, 0, state.mirror(),
                            static_cast<size_t>(state.weights.num_experts) * 2 * 8);
  };
  try {
    if (tier_ == ExpertTier::kHost) {
      const auto* host_gate_up = static_cast<const uint8_t*>(state.host_gate_up->data());
      const auto* host_down = static_cast<const uint8_t*>(state.host_down->data());
      for (const CopyJob& job : jobs) {
        const size_t position = static_cast<size_t>(state.hosted_index[job.expert_id]);
        const size_t slot = static_cast<size_t>(job.slot);
        backend_.copy_from_host(state.weights.gate_up, slot * gate_up_bytes(),
                                host_gate_up + position * gate_up_bytes(), gate_up_bytes());
        backend_.copy_from_host(state.weights.down, slot * down_bytes(), host_down + position * down_bytes(),
                                down_bytes());
        report.bytes_from_host += expert_bytes();
      }
    } else if (host_cache_) {
      copy_through_host_cache(state, layer, jobs, report);
    } else {
      copy_from_disk(state, layer, jobs, report);
    }
    for (const CopyJob& job : jobs) state.published()[job.expert_id] = static_cast<int32_t>(job.slot);
  } catch (...) {
    // The residency set counts these experts resident, but their slots hold unknown bytes: publish
    // them as absent (an FFN given their rows fails instead of computing with garbage), and the next
    // ensure_resident loads them again. The evicted experts are already unpublished.
    try {
      backend_.synchronize();
      backend_.copy_from_host(state.weights.local_index, 0, state.published(),
                              state.weights.num_experts * sizeof(int32_t));
      upload_table();  // the failed experts' entries still point at the host tier
      backend_.synchronize();
    } catch (...) {
      // the first error is the one to report
    }
    throw;
  }
  backend_.copy_from_host(state.weights.local_index, 0, state.published(),
                          state.weights.num_experts * sizeof(int32_t));
  if (state.addresses_host)
    for (const CopyJob& job : jobs) point_at_slot(state, job.expert_id, job.slot);
  upload_table();
  backend_.synchronize();
}

ExpertLoadReport ExpertStore::ensure_resident(int64_t layer, const std::vector<int64_t>& experts_needed,
                                              int64_t step) {
  const auto start = std::chrono::steady_clock::now();
  Layer& state = layer_state(layer, "ensure_resident");
  // Admission changes host entries that admit_in_background's copies may still read, and the whole
  // table is uploaded: none may be in flight.
  backend_.wait_side_copies();
  const std::vector<int64_t> experts = distinct_hosted(state, layer, experts_needed, "ensure_resident");
  const int64_t slots = static_cast<int64_t>(state.slot_expert.size());
  EPIC_CHECK(
      static_cast<int64_t>(experts.size()) <= slots, ErrorCode::kInvalidArgument,
      "expert store ensure_resident: layer " + std::to_string(layer) + " needs " +
          std::to_string(experts.size()) + " distinct experts in one step but its residency budget is " +
          std::to_string(slots) +
          " slots; split the step's rows into groups of at most that many experts, substitute resident "
          "experts (--on-miss substitute), or raise the budget");
  check_step(step, "ensure_resident");
  latest_step_ = step;

  pinned_by_layer_[layer] = experts;
  apply_pins(layer, {});
  ExpertLoadReport report;
  std::vector<CopyJob> jobs;
  for (int64_t expert : experts) {
    if (state.slot_of[expert] >= 0) {
      if (state.loaded(expert)) {
        report.hits += 1;
      } else {  // its last copy failed: load it again into the slot it has
        jobs.push_back({expert, state.slot_of[expert]});
      }
      continue;
    }
    // Cannot be refused: at most `slots` experts are pinned, and this one is not resident yet, so a
    // full layer has an unpinned resident.
    EPIC_CHECK(admit(state, layer, expert, step, report, jobs), ErrorCode::kInternal,
               "expert store: layer " + std::to_string(layer) + " refused expert " + std::to_string(expert) +
                   " with " + std::to_string(experts.size()) + " pinned of " + std::to_string(slots) +
                   " slots");
  }
  for (const CopyJob& job : jobs) report.loaded.push_back(job.expert_id);
  report.misses = static_cast<int64_t>(jobs.size());
  copy_in(state, layer, jobs, report);
  report.seconds = seconds_since(start);

  add_to_stats(report, /*prefetch=*/false);
  return report;
}

ExpertLoadReport ExpertStore::prefetch(int64_t layer, const std::vector<int64_t>& experts_wanted,
                                       int64_t step) {
  const auto start = std::chrono::steady_clock::now();
  Layer& state = layer_state(layer, "prefetch");
  // Admission changes host entries that admit_in_background's copies may still read, and the whole
  // table is uploaded: none may be in flight.
  backend_.wait_side_copies();
  const std::vector<int64_t> experts = distinct_hosted(state, layer, experts_wanted, "prefetch");
  check_step(step, "prefetch");
  latest_step_ = step;

  ExpertLoadReport report;
  const std::vector<CopyJob> jobs = admit_list(state, layer, experts, step, report);
  copy_in(state, layer, jobs, report);
  report.seconds = seconds_since(start);
  add_to_stats(report, /*prefetch=*/true);
  return report;
}

std::vector<ExpertStore::CopyJob> ExpertStore::admit_list(Layer& state, int64_t layer,
                                                          const std::vector<int64_t>& experts, int64_t step,
                                                          ExpertLoadReport& report) {
  std::vector<CopyJob> jobs;
  // The list is pinned while it is admitted, so its later experts never evict its earlier ones.
  std::vector<int64_t> admitted;
  try {
    for (int64_t expert : experts) {
      if (state.slot_of[expert] >= 0) {
        if (state.loaded(expert)) {
          report.hits += 1;
        } else {
          jobs.push_back({expert, state.slot_of[expert]});
        }
        admitted.push_back(expert);
        continue;
      }
      admitted.push_back(expert);
      apply_pins(layer, admitted);
      if (!admit(state, layer, expert, step, report, jobs)) {
        admitted.pop_back();
        report.skipped += 1;
      }
    }
  } catch (...) {
    apply_pins(layer, {});
    throw;
  }
  apply_pins(layer, {});
  for (const CopyJob& job : jobs) report.loaded.push_back(job.expert_id);
  report.misses += static_cast<int64_t>(jobs.size());
  return jobs;
}

ExpertLoadReport ExpertStore::admit_in_background(
    const std::map<int64_t, std::vector<int64_t>>& experts_by_layer, int64_t step) {
  const auto start = std::chrono::steady_clock::now();
  EPIC_CHECK(tier_ == ExpertTier::kHost, ErrorCode::kUnsupported,
             "expert store admit_in_background: copies behind the step need the host tier (--expert-tier "
             "host); the disk tier reads and converts on the host first");
  check_step(step, "admit_in_background");
  latest_step_ = step;
  backend_.wait_side_copies();  // the mirror entries below may be read by the previous batch's uploads
  constexpr size_t kEntryBytes = 2 * sizeof(int64_t);
  ExpertLoadReport report;
  // Three batches, each one call: the evicted experts' entries back to the host tier on the stream (before
  // any later op), then on the side queue the admitted experts' bytes, then their entries (after the bytes).
  std::vector<HostCopy> evictions, bytes, entries;
  for (const auto& [layer, wanted] : experts_by_layer) {
    Layer& state = layer_state(layer, "admit_in_background");
    std::vector<int64_t> experts = distinct_hosted(state, layer, wanted, "admit_in_background");
    if (admit_per_layer_ > 0 && static_cast<int64_t>(experts.size()) > admit_per_layer_)
      experts.resize(static_cast<size_t>(admit_per_layer_));  // the most wanted: they come first
    const size_t evicted_before = report.evicted.size();
    const std::vector<CopyJob> jobs = admit_list(state, layer, experts, step, report);
    for (size_t v = evicted_before; v < report.evicted.size(); ++v) {
      const int64_t victim = report.evicted[v];
      evictions.push_back({state.addresses, static_cast<size_t>(victim) * kEntryBytes,
                           state.mirror() + 2 * victim, kEntryBytes});
      evictions.push_back({state.weights.local_index, static_cast<size_t>(victim) * sizeof(int32_t),
                           state.published() + victim, sizeof(int32_t)});
    }
    const auto* host_gate_up = static_cast<const uint8_t*>(state.host_gate_up->data());
    const auto* host_down = static_cast<const uint8_t*>(state.host_down->data());
    for (const CopyJob& job : jobs) {
      const auto position = static_cast<size_t>(state.hosted_index[job.expert_id]);
      const auto slot = static_cast<size_t>(job.slot);
      bytes.push_back({state.weights.gate_up, slot * gate_up_bytes(),
                       host_gate_up + position * gate_up_bytes(), gate_up_bytes()});
      bytes.push_back(
          {state.weights.down, slot * down_bytes(), host_down + position * down_bytes(), down_bytes()});
      // A kernel reading an entry while it changes sees either address, and both hold the expert's bytes.
      point_at_slot(state, job.expert_id, job.slot);
      state.published()[job.expert_id] = static_cast<int32_t>(job.slot);  // resident() from now on
      entries.push_back({state.addresses, static_cast<size_t>(job.expert_id) * kEntryBytes,
                         state.mirror() + 2 * job.expert_id, kEntryBytes});
      entries.push_back({state.weights.local_index, static_cast<size_t>(job.expert_id) * sizeof(int32_t),
                         state.published() + job.expert_id, sizeof(int32_t)});
      report.bytes_from_host += expert_bytes();
    }
  }
  backend_.copy_from_host_scattered(evictions);
  backend_.enqueue_side_copies(bytes);
  backend_.enqueue_side_copies(entries);
  report.seconds = seconds_since(start);
  add_to_stats(report, /*prefetch=*/true);
  return report;
}

void ExpertStore::add_to_stats(const ExpertLoadReport& report, bool prefetch) {
  stats_.hits += report.hits;
  stats_.misses += report.misses;
  stats_.evictions += report.evictions;
  stats_.bytes_from_host += report.bytes_from_host;
  stats_.bytes_from_disk += report.bytes_from_disk;
  stats_.source_bytes_read += report.source_bytes_read;
  stats_.host_cache_hits += report.host_cache_hits;
  stats_.host_cache_misses += report.host_cache_misses;
  stats_.host_cache_evictions += report.host_cache_evictions;
  if (prefetch) {
    stats_.prefetch_loads += report.misses;
    stats_.prefetch_seconds += report.seconds;
  } else {
    stats_.stall_seconds += report.seconds;
  }
}

void ExpertStore::record_use(int64_t layer, int64_t expert_id, float routing_weight, int64_t step) {
  record_uses(layer, expert_id, 1, routing_weight, step);
}

void ExpertStore::record_uses(int64_t layer, int64_t expert_id, int64_t uses, double weight_sum,
                              int64_t step) {
  const Layer& state = layer_state(layer, "record_use");
  distinct_hosted(state, layer, {expert_id}, "record_use");
  check_step(step, "record_use");
  residency_->record_uses(layer, expert_id, uses, weight_sum, step);
  if (host_cache_) host_cache_->record_uses(layer, expert_id, uses, weight_sum, step);
  latest_step_ = step;
}

void ExpertStore::unpin_all() {
  pinned_by_layer_.clear();
  residency_->unpin_all();
}

const MoeLayerWeights& ExpertStore::layer_weights(int64_t layer) const {
  return layer_state(layer, "layer_weights").weights;
}

bool ExpertStore::is_moe_layer(int64_t layer) const { return layers_.count(layer) != 0; }

double ExpertStore::usefulness(int64_t layer, int64_t expert_id) const {
  return residency_->usefulness(layer, expert_id, latest_step_);
}

bool ExpertStore::host_cached(int64_t layer, int64_t expert_id) const {
  layer_state(layer, "host_cached");
  return host_cache_ && host_cache_->cached(layer, expert_id);
}

int64_t ExpertStore::host_cache_capacity(int64_t layer) const {
  layer_state(layer, "host_cache_capacity");
  return host_cache_ ? host_cache_->capacity(layer) : 0;
}

bool ExpertStore::resident(int64_t layer, int64_t expert_id) const {
  const Layer& state = layer_state(layer, "resident");
  return expert_id >= 0 && expert_id < state.weights.num_experts && state.loaded(expert_id);
}

std::vector<int64_t> ExpertStore::resident_experts(int64_t layer) const {
  const Layer& state = layer_state(layer, "resident_experts");
  std::vector<int64_t> experts;
  for (int64_t expert = 0; expert < state.weights.num_experts; ++expert)
    if (state.loaded(expert)) experts.push_back(expert);
  return experts;
}

int64_t ExpertStore::capacity(int64_t layer) const {
  return static_cast<int64_t>(layer_state(layer, "capacity").slot_expert.size());
}

ExpertStoreStats ExpertStore::stats() const {
  ExpertStoreStats stats = stats_;
  stats.resident_bytes = 0;
  stats.host_tier_bytes = 0;
  for (const auto& [layer, state] : layers_) {
    stats.resident_bytes += state->weights.gate_up.bytes() + state->weights.down.bytes();
    for (const std::unique_ptr<Buffer>* tier : {&state->host_gate_up, &state->host_down})
      if (*tier) stats.host_tier_bytes += (*tier)->size();
  }
  if (host_cache_) stats.host_tier_bytes += host_cache_->bytes();
  return stats;
}

}  // namespace epic
