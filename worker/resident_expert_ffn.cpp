// The expert FFN over an ExpertStore's slots, in groups that fit (resident_expert_ffn.h).
#include "worker/resident_expert_ffn.h"

#include <algorithm>

#include "worker/moe_block.h"

namespace epic {

ResidentExpertFfn::ResidentExpertFfn(const ModelConfig& config, Backend& backend, ExpertStore& store)
    : config_(config), backend_(backend), store_(store) {
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer)
    if (store.is_moe_layer(layer))
      max_experts_ = std::max(max_experts_, store.layer_weights(layer).num_experts);
}

int64_t ResidentExpertFfn::begin_layer(int64_t layer) {
  if (layer <= last_layer_) ++step_;  // a new forward pass
  last_layer_ = layer;
  return step_;
}

int64_t ResidentExpertFfn::run(int64_t layer, int64_t step, const Tensor& sorted,
                               const std::vector<int32_t>& offsets, const Tensor& intermediate,
                               const Tensor& expert_out) {
  const int64_t num_experts = static_cast<int64_t>(offsets.size()) - 1;
  std::vector<int64_t> needed;
  for (int64_t e = 0; e < num_experts; ++e)
    if (offsets[e + 1] > offsets[e]) needed.push_back(e);
  const size_t capacity = static_cast<size_t>(std::max<int64_t>(1, store_.capacity(layer)));
  std::vector<std::vector<int32_t>> group_hosts;  // host sources of the uploads, valid until synchronize
  int64_t groups = 0;
  for (size_t first = 0; first < needed.size(); first += capacity, ++groups) {
    const size_t last = std::min(needed.size(), first + capacity);  // exclusive
    // Evicts only after the earlier groups' FFNs are done: ensure_resident waits for the backend first.
    const ExpertLoadReport report = store_.ensure_resident(
        layer, std::vector<int64_t>(needed.begin() + first, needed.begin() + last), step);
    demand_.hits += report.hits;
    demand_.misses += report.misses;
    demand_.stall_seconds += report.seconds;
    const int32_t lo = offsets[needed[first]], hi = offsets[needed[last - 1] + 1];
    std::vector<int32_t>& local = group_hosts.emplace_back(offsets.size());
    for (size_t e = 0; e < offsets.size(); ++e) local[e] = std::clamp(offsets[e], lo, hi) - lo;
    if (group_offsets_.size() <= static_cast<size_t>(groups))
      group_offsets_.push_back(backend_.new_tensor(ScalarType::kI32, {max_experts_ + 1}));
    const Tensor group_offsets = group_offsets_[groups].view().rows_view(0, num_experts + 1);
    backend_.copy_from_host(group_offsets, 0, local.data(), local.size() * sizeof(int32_t));
    const MoeLayerWeights& resident = store_.layer_weights(layer);
    backend_.expert_ffn(sorted.rows_view(lo, hi - lo), group_offsets, resident.gate_up, resident.down,
                        resident.local_index, intermediate.rows_view(0, hi - lo),
                        expert_out.rows_view(lo, hi - lo));
  }
  backend_.synchronize();  // the uploads' host sources end here
  store_.unpin_all();
  return groups;
}

template <typename GroupFfn>
void ResidentExpertFfn::in_row_order(int64_t layer, const Tensor& rows, const Tensor& experts,
                                     const Tensor& sorted, const Tensor& computed, const Tensor& y,
                                     Workspace& workspace, const GroupFfn& group_ffn) {
  const int64_t num_rows = rows.dim(0), num_experts = store_.layer_weights(layer).num_experts;
  if (num_rows == 0) return;
  const GroupedRows grouped = group_rows(backend_, experts, num_experts, 1, workspace);
  backend_.gather_rows(rows, grouped.source_row, sorted);
  group_ffn(grouped);
  backend_.gather_rows(computed, grouped.sorted_position, y);
}

int64_t ResidentExpertFfn::run_in_row_order(int64_t layer, int64_t step, const Tensor& rows,
                                            const Tensor& experts, const Tensor& sorted,
                                            const Tensor& computed, const Tensor& y, Workspace& workspace) {
  int64_t groups = 0;
  in_row_order(layer, rows, experts, sorted, computed, y, workspace, [&](const GroupedRows& grouped) {
    // run makes the experts resident group by group: it needs the offsets on the host.
    std::vector<int32_t> offsets(static_cast<size_t>(grouped.expert_offsets.numel()));
    backend_.copy_to_host(grouped.expert_offsets, 0, offsets.data(), offsets.size() * sizeof(int32_t));
    const Tensor intermediate =
        workspace.get(kSlotExpertIntermediate, rows.type, {rows.dim(0), config_.moe_intermediate_size});
    groups = run(layer, step, sorted, offsets, intermediate, computed);
  });
  return groups;
}

void ResidentExpertFfn::run_in_place(int64_t layer, const Tensor& rows, const Tensor& experts,
                                     const Tensor& sorted, const Tensor& computed, const Tensor& y,
                                     Workspace& workspace) {
  in_row_order(layer, rows, experts, sorted, computed, y, workspace, [&](const GroupedRows& grouped) {
    const Tensor intermediate =
        workspace.get(kSlotExpertIntermediate, rows.type, {rows.dim(0), config_.moe_intermediate_size});
    backend_.expert_ffn_addressed(sorted, grouped.expert_offsets, store_.address_table(layer),
                                  store_.weight_type(), intermediate, computed);
  });
}

}  // namespace epic
