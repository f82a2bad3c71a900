// The dispatch / expert compute / combine of one MoE layer over a Communicator.
#include "worker/expert_parallel_moe.h"

#include <chrono>
#include <cstring>

#include "kernels/error.h"
#include "worker/moe_block.h"

namespace epic {
namespace {

double seconds_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace

ExpertParallelMoeExecutor::ExpertParallelMoeExecutor(const ModelConfig& config, const ModelWeights& weights,
                                                     Backend& backend, Communicator& comm,
                                                     const ExpertRoutingTable& table)
    : config_(config), weights_(weights), backend_(backend), comm_(comm), table_(table) {
  EPIC_CHECK(table.num_workers == comm.size(), ErrorCode::kInternal,
             "placement plan is for " + std::to_string(table.num_workers) + " workers but the job has " +
                 std::to_string(comm.size()) + " ranks");
}

void ExpertParallelMoeExecutor::forward(int64_t layer, const float* hidden, int64_t num_tokens, float* out) {
  using clock = std::chrono::steady_clock;
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t hidden_size = config_.hidden_size, top_k = config_.num_experts_per_tok;
  const int num_workers = comm_.size(), rank = comm_.rank();
  const uint64_t sent_before = comm_.bytes_sent(), received_before = comm_.bytes_received();
  ++stats_.calls;

  // Route: every worker holds the router, so routing needs no communication.
  auto start = clock::now();
  const Routing routing =
      route_tokens(backend_, moe, hidden, num_tokens, hidden_size, top_k, config_.norm_topk_prob);
  const int64_t num_slots = num_tokens * top_k;
  // Destination of every slot. Occurrences of one expert rotate over its replicas, starting at an
  // offset given by this rank, so replicas share the rows evenly across the whole cluster.
  std::vector<int> destination(num_slots);
  std::vector<uint64_t> occurrences(moe.num_experts, 0);
  std::vector<int64_t> send_counts(num_workers, 0);
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    const int64_t expert = routing.expert_ids[slot];
    destination[slot] = table_.worker_for(layer, expert, occurrences[expert]++ + static_cast<uint64_t>(rank));
    ++send_counts[destination[slot]];
  }
  // Slots ordered by destination worker (stable: slot order within a worker).
  std::vector<int64_t> send_offsets(num_workers + 1, 0);
  for (int w = 0; w < num_workers; ++w) send_offsets[w + 1] = send_offsets[w] + send_counts[w];
  std::vector<int64_t> send_order(num_slots);
  {
    std::vector<int64_t> cursor(send_offsets.begin(), send_offsets.end() - 1);
    for (int64_t slot = 0; slot < num_slots; ++slot) send_order[cursor[destination[slot]]++] = slot;
  }
  std::vector<int32_t> send_experts(num_slots);
  std::vector<float> send_rows(num_slots * hidden_size);
  for (int64_t i = 0; i < num_slots; ++i) {
    const int64_t slot = send_order[i];
    send_experts[i] = routing.expert_ids[slot];
    std::memcpy(&send_rows[i * hidden_size], hidden + (slot / top_k) * hidden_size,
                hidden_size * sizeof(float));
  }
  stats_.route_seconds += seconds_since(start);
  stats_.rows_sent += num_slots;

  // Dispatch: counts, then the expert id of each row, then the rows.
  start = clock::now();
  std::vector<int64_t> recv_counts;
  std::vector<int64_t> send_floats(num_workers), recv_floats(num_workers);
  std::vector<float> recv_rows;
  std::vector<int32_t> recv_experts;
  {
    // Names the collectives in timeout and dead-peer messages.
    const Communicator::Activity activity(comm_, "MoE layer " + std::to_string(layer) + " dispatch");
    recv_experts = comm_.all_to_all_v<int32_t>(std::span<const int32_t>(send_experts), send_counts, &recv_counts);
    for (int w = 0; w < num_workers; ++w) {
      send_floats[w] = send_counts[w] * hidden_size;
      recv_floats[w] = recv_counts[w] * hidden_size;
    }
    recv_rows = comm_.all_to_all_v_known<float>(std::span<const float>(send_rows), send_floats, recv_floats);
  }
  stats_.dispatch_seconds += seconds_since(start);

  // Expert compute: received rows grouped by expert, each row's FFN computed alone.
  start = clock::now();
  const int64_t num_received = static_cast<int64_t>(recv_experts.size());
  Routing received;  // one "token" per received row, top-1, so the grouping code can be reused
  received.num_tokens = num_received;
  received.top_k = 1;
  received.expert_ids = recv_experts;
  received.weights.assign(num_received, 1.0f);
  for (int64_t i = 0; i < num_received; ++i) {
    const int32_t expert = recv_experts[i];
    if (expert < 0 || expert >= moe.num_experts || !table_.hosts(rank, layer, expert))
      throw Error(ErrorCode::kInternal, "rank " + std::to_string(rank) + ": received a row for layer " +
                                            std::to_string(layer) + " expert " + std::to_string(expert) +
                                            ", which this worker does not host");
  }
  const ExpertGroups groups = group_rows_by_expert(received);
  std::vector<float> computed(num_received * hidden_size);
  run_expert_ffn(backend_, moe, groups, recv_rows.data(), hidden_size, config_.moe_intermediate_size, 1,
                 computed.data());
  std::vector<int64_t>& rows_per_expert = expert_rows_[layer];
  rows_per_expert.resize(moe.num_experts, 0);
  for (int32_t expert : recv_experts) ++rows_per_expert[expert];
  stats_.rows_computed += num_received;
  stats_.expert_seconds += seconds_since(start);

  // Combine: outputs travel back in the order their rows came, then the weighted sum in slot order.
  start = clock::now();
  std::vector<float> returned;
  {
    const Communicator::Activity activity(comm_, "MoE layer " + std::to_string(layer) + " combine");
    returned = comm_.all_to_all_v_known<float>(std::span<const float>(computed), recv_floats, send_floats);
  }
  std::vector<float> slot_outputs(num_slots * hidden_size);
  for (int64_t i = 0; i < num_slots; ++i)
    std::memcpy(&slot_outputs[send_order[i] * hidden_size], &returned[i * hidden_size],
                hidden_size * sizeof(float));
  combine_top_k(routing, slot_outputs.data(), hidden_size, out);
  stats_.combine_seconds += seconds_since(start);
  stats_.bytes_sent += comm_.bytes_sent() - sent_before;
  stats_.bytes_received += comm_.bytes_received() - received_before;
}

}  // namespace epic
