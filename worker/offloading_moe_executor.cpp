// The MoE block over an ExpertStore (offloading_moe_executor.h).
#include "worker/offloading_moe_executor.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <utility>

#include "kernels/error.h"
#include "worker/missing_expert_substitution.h"
#include "worker/moe_block.h"
#include "worker/routing_policy.h"

namespace epic {

OnMiss parse_on_miss(const std::string& name) {
  if (name == "wait") return OnMiss::kWait;
  if (name == "substitute") return OnMiss::kSubstitute;
  if (name == "read") return OnMiss::kRead;
  throw Error(ErrorCode::kInvalidArgument,
              "--on-miss '" + name +
                  "': use wait (copy a missing expert in before computing), substitute (route to the most "
                  "probable resident expert instead) or read (compute it from host memory in place, over the "
                  "bus, and copy it in behind the step)");
}

const char* on_miss_name(OnMiss on_miss) {
  switch (on_miss) {
    case OnMiss::kWait:
      return "wait";
    case OnMiss::kSubstitute:
      return "substitute";
    case OnMiss::kRead:
      return "read";
  }
  return "?";
}

Prefetch parse_prefetch(const std::string& name) {
  if (name == "none") return Prefetch::kNone;
  if (name == "next-layer") return Prefetch::kNextLayer;
  throw Error(
      ErrorCode::kInvalidArgument,
      "--prefetch '" + name +
          "': use next-layer (the next MoE layer's likely experts, right after each routing) or none");
}

OffloadStats OffloadingMoeExecutor::stats() const {
  OffloadStats stats = stats_;
  if (on_miss_ == OnMiss::kRead) return stats;  // finish_step counts each pick against the residency
  stats.demand_hits = resident_ffn_.demand().hits;
  stats.demand_misses = resident_ffn_.demand().misses;
  return stats;
}

void OffloadingMoeExecutor::prefetch_next_layer(int64_t layer, const Tensor& router_input) {
  int64_t next = layer + 1;
  while (next < config_.num_hidden_layers && !store_.is_moe_layer(next)) ++next;
  if (next >= config_.num_hidden_layers) return;
  const MoeLayerWeights& moe = weights_.layers[next].moe;
  const int64_t rows = router_input.dim(0), experts = moe.num_experts;
  if (prefetch_logits_.empty() || prefetch_logits_.view().numel() < rows * experts)
    prefetch_logits_ = backend_.new_tensor(ScalarType::kF32, {rows * experts});
  const Tensor logits = prefetch_logits_.view().rows_view(0, rows * experts).reshaped({rows, experts});
  backend_.linear(router_input, moe.router, logits);
  std::vector<float> host(static_cast<size_t>(rows * experts));
  backend_.copy_to_host(logits, 0, host.data(), host.size() * sizeof(float));
  const std::vector<uint8_t> routable = routable_host_mask(moe, routing(), next);
  const int64_t top_k = routed_top_k(config_);
  std::vector<double> mass(static_cast<size_t>(experts), 0.0);
  std::vector<int64_t> order(static_cast<size_t>(experts));
  for (int64_t t = 0; t < rows; ++t) {
    const float* row = host.data() + t * experts;
    const RoutableSoftmaxSum softmax = routable_softmax_sum(row, routable);
    for (int64_t e = 0; e < experts; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(), [&](int64_t a, int64_t b) {
      const float la = routable[a] ? row[a] : -INFINITY, lb = routable[b] ? row[b] : -INFINITY;
      return la != lb ? la > lb : a < b;
    });
    for (int64_t j = 0; j < top_k; ++j)
      if (routable[order[j]]) mass[order[j]] += std::exp(double(row[order[j]] - softmax.max)) / softmax.total;
  }
  std::vector<int64_t> wanted;
  for (int64_t e = 0; e < experts; ++e)
    if (mass[e] > 0 && store_.layer_weights(next).hosts(e)) wanted.push_back(e);
  std::stable_sort(wanted.begin(), wanted.end(), [&](int64_t a, int64_t b) { return mass[a] > mass[b]; });
  if (wanted.empty()) return;
  stats_.prefetched += store_.prefetch(next, wanted, resident_ffn_.step()).misses;
}

OffloadingMoeExecutor::OffloadingMoeExecutor(const ModelConfig& config, const ModelWeights& weights,
                                             Backend& backend, ExpertStore& store, OnMiss on_miss,
                                             Prefetch prefetch)
    : config_(config),
      weights_(weights),
      backend_(backend),
      store_(store),
      on_miss_(on_miss),
      prefetch_(prefetch),
      resident_ffn_(config, backend, store) {
  if (on_miss_ != OnMiss::kRead) return;
  EPIC_CHECK(
      store_.reads_in_place(), ErrorCode::kInvalidArgument,
      "--on-miss read computes a missing expert from host memory in place: it needs --expert-tier host");
  for (int64_t layer = 0; layer < config_.num_hidden_layers; ++layer) {
    if (!store_.is_moe_layer(layer)) continue;
    const int64_t index = static_cast<int64_t>(moe_index_.size());
    moe_index_[layer] = index;
  }
  log_slots_ = kLoggedRows * config_.num_experts_per_tok;
  const int64_t entries = 2 * static_cast<int64_t>(moe_index_.size()) * log_slots_;
  if (entries > 0) routing_log_ = backend_.new_tensor(ScalarType::kI32, {entries});
}

bool OffloadingMoeExecutor::capturable() const {
  return on_miss_ == OnMiss::kRead && step_rows_ >= 0 && step_rows_ <= kLoggedRows;
}

void OffloadingMoeExecutor::begin_step(int64_t max_rows_on_any_rank) {
  if (on_miss_ != OnMiss::kRead) return;
  ++read_step_;
  step_rows_ = max_rows_on_any_rank;
}

void OffloadingMoeExecutor::note_pick(int64_t layer, int32_t expert, float weight) {
  ++stats_.picks;
  ++(read_demand_.note(store_, layer, expert, 1, weight, read_step_) ? stats_.demand_hits
                                                                     : stats_.demand_misses);
}

void OffloadingMoeExecutor::finish_step() {
  if (on_miss_ != OnMiss::kRead || step_rows_ < 0) return;
  const int64_t rows = step_rows_;
  step_rows_ = -1;
  // Every MoE layer ran once this step (each has a row of the routing log), through forward or not.
  stats_.calls += static_cast<int64_t>(moe_index_.size());
  const int64_t top_k = routed_top_k(config_);
  if (rows > 0 && rows <= kLoggedRows && !routing_log_.empty()) {
    // Every MoE layer wrote its picks into the log (replayed from a graph or not): one copy back.
    std::vector<int32_t> log(static_cast<size_t>(routing_log_.view().numel()));
    backend_.copy_to_host(routing_log_.view(), 0, log.data(), log.size() * sizeof(int32_t));
    const int64_t layers = static_cast<int64_t>(moe_index_.size());
    for (const auto& [layer, index] : moe_index_) {
      const int32_t* ids = log.data() + index * log_slots_;
      const auto* weights = reinterpret_cast<const float*>(log.data() + (layers + index) * log_slots_);
      const int64_t num_experts = weights_.layers[layer].moe.num_experts;
      for (int64_t s = 0; s < rows * top_k; ++s)
        if (ids[s] >= 0 && ids[s] < num_experts && !is_padding_slot(ids + s / top_k * top_k, s % top_k))
          note_pick(layer, ids[s], weights[s]);
    }
  }
  for (const auto& [layer, expert, weight] : unlogged_picks_) note_pick(layer, expert, weight);
  unlogged_picks_.clear();
  const int64_t read_before = read_demand_.counts().read_in_place;
  stats_.prefetched += read_demand_.admit_misses(store_, read_step_);
  const int64_t read = read_demand_.counts().read_in_place - read_before;
  stats_.read_in_place += read;
  stats_.bytes_read_in_place += static_cast<uint64_t>(read) * store_.expert_bytes();
}

void OffloadingMoeExecutor::forward_in_place(int64_t layer, const Tensor& hidden, const Tensor& router_input,
                                             const Tensor& out, Workspace& workspace) {
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t rows = hidden.dim(0), top_k = routed_top_k(config_), slots = rows * top_k;
  if (rows == 0) return;
  // The routing goes into the log where it fits (read back once, in finish_step), else into the
  // workspace and back to the host now (a large step, never captured).
  RoutedMoeScratch scratch =
      routed_moe_scratch(config_, moe.num_experts, rows, top_k, hidden.type, workspace);
  const bool logged = slots <= log_slots_;
  if (logged) {
    const int64_t index = moe_index_.at(layer), layers = static_cast<int64_t>(moe_index_.size());
    auto* base = static_cast<int32_t*>(routing_log_.view().data);
    scratch.expert_ids =
        Tensor(base + index * log_slots_, ScalarType::kI32, backend_.memory_space(), {rows, top_k});
    scratch.weights = Tensor(base + (layers + index) * log_slots_, ScalarType::kF32, backend_.memory_space(),
                             {rows, top_k});
  }
  const Tensor& expert_ids = scratch.expert_ids;
  const Tensor& route_weights = scratch.weights;
  // Every expert at the address the store's table gives it: its slot, or its host-tier bytes.
  const RoutedMoeWeights weights{moe.router,
                                 routable_mask(layer, moe),
                                 Tensor{},
                                 Tensor{},
                                 Tensor{},
                                 config_.norm_topk_prob,
                                 store_.address_table(layer),
                                 store_.weight_type(),
                                 step_row_top_k()};
  backend_.routed_moe(router_input, hidden, weights, scratch, out);
  count_routed(layer, expert_ids);
  if (logged || step_rows_ < 0) return;  // outside begin/finish_step nothing reads the picks
  std::vector<int32_t> ids(static_cast<size_t>(slots));
  std::vector<float> picked(static_cast<size_t>(slots));
  backend_.copy_to_host(expert_ids, 0, ids.data(), ids.size() * sizeof(int32_t));
  backend_.copy_to_host(route_weights, 0, picked.data(), picked.size() * sizeof(float));
  for (int64_t s = 0; s < slots; ++s)
    if (ids[s] >= 0 && ids[s] < moe.num_experts &&
        !is_padding_slot(ids.data() + s / top_k * top_k, s % top_k))
      unlogged_picks_.emplace_back(layer, ids[s], picked[s]);
}

std::vector<int64_t> OffloadingMoeExecutor::substitute_misses(int64_t layer, const MoeLayerWeights& moe,
                                                              int64_t rows, int64_t top_k,
                                                              const Tensor& logits, std::vector<int32_t>& ids,
                                                              std::vector<float>& weights) {
  const int64_t num_experts = moe.num_experts;
  const std::vector<uint8_t> routable = routable_host_mask(moe, routing(), layer);
  std::vector<float> logit_rows(static_cast<size_t>(rows * num_experts));
  backend_.copy_to_host(logits, 0, logit_rows.data(), logit_rows.size() * sizeof(float));
  std::map<int64_t, double> missed_weight;  // expert -> routing weight it lost, for the fetch order
  std::vector<float> probs(static_cast<size_t>(num_experts));
  const std::function<bool(int64_t)> resident = [&](int64_t expert) {
    return store_.resident(layer, expert);
  };
  const auto note = [&](int64_t expert, float weight) { missed_weight[expert] += weight; };
  for (int64_t t = 0; t < rows; ++t) {
    if (!own_pick_missing(ids.data() + t * top_k, top_k, resident)) continue;
    // The router's fp32 probabilities over the routable experts (as route_top_k computes them).
    routable_softmax(logit_rows.data() + t * num_experts, routable, probs);
    stats_.substituted += substitute_missing_picks(ids.data() + t * top_k, weights.data() + t * top_k, top_k,
                                                   probs, routable, resident, config_.norm_topk_prob, note);
  }
  return most_wanted_first(missed_weight);
}

void OffloadingMoeExecutor::forward(int64_t layer, const Tensor& hidden, const Tensor& router_input,
                                    const Tensor& out, Workspace& workspace) {
  EPIC_CHECK(store_.is_moe_layer(layer), ErrorCode::kInternal,
             "offloading executor: layer " + std::to_string(layer) + " has no experts in the store");
  if (on_miss_ == OnMiss::kRead) {
    if (step_rows_ < 0) ++stats_.calls;  // within a step finish_step counts the calls
    forward_in_place(layer, hidden, router_input, out, workspace);
    return;
  }
  const int64_t step = resident_ffn_.begin_layer(layer);
  ++stats_.calls;
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t rows = hidden.dim(0), top_k = routed_top_k(config_), slots = rows * top_k;
  const int64_t hidden_size = config_.hidden_size, num_experts = moe.num_experts;
  const RoutedTokens routed = route_tokens(backend_, config_, moe, routable_mask(layer, moe), top_k,
                                           router_input, workspace, step_row_top_k());
  if (rows == 0) return;
  std::vector<int32_t> ids(static_cast<size_t>(slots));
  std::vector<float> route_weights(static_cast<size_t>(slots));
  backend_.copy_to_host(routed.expert_ids, 0, ids.data(), ids.size() * sizeof(int32_t));
  backend_.copy_to_host(routed.weights, 0, route_weights.data(), route_weights.size() * sizeof(float));
  for (int64_t s = 0; s < slots; ++s) {
    if (is_padding_slot(ids.data() + s / top_k * top_k, s % top_k)) continue;  // another row's k
    ++stats_.picks;
    store_.record_use(layer, ids[s], route_weights[s], step);
  }
  if (prefetch_ == Prefetch::kNextLayer) prefetch_next_layer(layer, router_input);

  std::vector<int64_t> fetch_after;
  if (on_miss_ == OnMiss::kSubstitute) {
    const Tensor logits = workspace.get(kSlotRouterLogits, ScalarType::kF32, {rows, num_experts});
    fetch_after = substitute_misses(layer, moe, rows, top_k, logits, ids, route_weights);
    backend_.copy_from_host(routed.expert_ids, 0, ids.data(), ids.size() * sizeof(int32_t));
    backend_.copy_from_host(routed.weights, 0, route_weights.data(), route_weights.size() * sizeof(float));
  }

  count_routed(layer, routed.expert_ids);  // what is computed (after any substitution)
  // Rows grouped by expert; the expert FFN in groups of experts that fit the layer's slots.
  const GroupedRows grouped = group_rows(backend_, routed.expert_ids, num_experts, top_k, workspace);
  const Tensor sorted = workspace.get(kSlotSortedRows, hidden.type, {slots, hidden_size});
  backend_.gather_rows(hidden, grouped.source_row, sorted);
  const Tensor expert_out = workspace.get(kSlotExpertOut, hidden.type, {slots, hidden_size});
  const Tensor intermediate =
      workspace.get(kSlotExpertIntermediate, hidden.type, {slots, config_.moe_intermediate_size});
  std::vector<int32_t> offsets(static_cast<size_t>(num_experts + 1));
  backend_.copy_to_host(grouped.expert_offsets, 0, offsets.data(), offsets.size() * sizeof(int32_t));
  stats_.expert_groups += resident_ffn_.run(layer, step, sorted, offsets, intermediate, expert_out);
  backend_.combine_top_k(expert_out, grouped.sorted_position, routed.weights, out);
  // Substitution served this layer from what was resident; fetch what it missed for the tokens to come.
  if (!fetch_after.empty()) store_.prefetch(layer, fetch_after, step);
}

}  // namespace epic
