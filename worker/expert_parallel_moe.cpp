// The dispatch / expert compute / combine of one MoE layer over a Communicator. Routing and the
// expert FFN are backend ops; the rows travel through host buffers around each all-to-all.
#include "worker/expert_parallel_moe.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <utility>

#include "kernels/error.h"
#include "worker/host_exchange_util.h"
#include "worker/moe_block.h"

namespace epic {
using host_exchange::download;
using host_exchange::seconds_since;

EpDispatch parse_ep_dispatch(const std::string& text) {
  if (text == "flat") return EpDispatch::kFlat;
  if (text == "hierarchical") return EpDispatch::kHierarchical;
  throw Error(ErrorCode::kInvalidArgument,
              "--ep-dispatch '" + text +
                  "': use flat (each (token, expert) row straight to its worker) or "
                  "hierarchical (each token once per destination node, then inside it)");
}

const char* ep_dispatch_name(EpDispatch dispatch) {
  return dispatch == EpDispatch::kHierarchical ? "hierarchical" : "flat";
}

ExpertParallelMoeExecutor::ExpertParallelMoeExecutor(const ModelConfig& config, const ModelWeights& weights,
                                                     Backend& backend, Communicator& comm,
                                                     const ExpertRoutingTable& table,
                                                     HostExchangeOptions options)
    : config_(config),
      weights_(weights),
      backend_(backend),
      comm_(comm),
      table_(table),
      options_(std::move(options)),
      scratch_(backend, /*num_slots=*/16) {
  EPIC_CHECK(table.num_workers == comm.size(), ErrorCode::kInternal,
             "placement plan is for " + std::to_string(table.num_workers) + " workers but the job has " +
                 std::to_string(comm.size()) + " ranks");
  EPIC_CHECK(options_.dispatch == EpDispatch::kFlat || options_.topology.world_size() == comm.size(),
             ErrorCode::kInternal,
             "hierarchical dispatch: the node topology has " +
                 std::to_string(options_.topology.world_size()) + " ranks but the job has " +
                 std::to_string(comm.size()));
  EPIC_CHECK(table.node_of_worker.empty() || static_cast<int>(table.node_of_worker.size()) == comm.size(),
             ErrorCode::kInternal, "the routing table's node list does not match the job's ranks");
}

void ExpertParallelMoeExecutor::set_expert_store(ExpertStore* store, OnMiss on_miss) {
  resident_ffn_ = store != nullptr ? std::make_unique<ResidentExpertFfn>(config_, backend_, *store) : nullptr;
  EPIC_CHECK(
      on_miss != OnMiss::kRead || store == nullptr || store->reads_in_place(), ErrorCode::kInvalidArgument,
      "--on-miss read computes a missing expert from host memory in place: it needs --expert-tier host");
  EPIC_CHECK(on_miss != OnMiss::kSubstitute || options_.dispatch == EpDispatch::kFlat,
             ErrorCode::kInvalidArgument,
             "--on-miss substitute under mpirun routes on the sender with the flat dispatch: drop "
             "--ep-dispatch hierarchical, or use --on-miss wait");
  read_in_place_ = on_miss == OnMiss::kRead && store != nullptr;
  substitute_ = on_miss == OnMiss::kSubstitute && store != nullptr;
}

void ExpertParallelMoeExecutor::finish_step() {
  if (!resident_ffn_) return;
  if (read_in_place_) {
    demand_.admit_misses(resident_ffn_->store(), resident_ffn_->step());
  } else {
    demand_.clear_misses();  // waited for when they were needed
  }
}

bool ExpertParallelMoeExecutor::hosts(int64_t layer, int64_t expert) const {
  return resident_ffn_ ? resident_ffn_->store().layer_weights(layer).hosts(expert)
                       : weights_.layers[layer].moe.hosts(expert);
}

void ExpertParallelMoeExecutor::compute_rows(int64_t layer, const std::vector<int32_t>& experts_host,
                                             const std::vector<float>& weights_host, const Tensor& rows,
                                             const Tensor& experts, const Tensor& sorted,
                                             const Tensor& computed, const Tensor& y, Workspace& workspace) {
  if (!resident_ffn_) {
    run_experts_in_row_order(backend_, config_, weights_.layers[layer].moe, rows, experts, sorted, computed,
                             y, workspace);
    return;
  }
  const int64_t step = resident_ffn_->step();
  ExpertStore& store = resident_ffn_->store();
  EPIC_CHECK(weights_host.size() == experts_host.size(), ErrorCode::kInternal,
             "compute_rows: " + std::to_string(weights_host.size()) + " routing weights for " +
                 std::to_string(experts_host.size()) + " rows");
  for (size_t i = 0; i < experts_host.size(); ++i) {
    const int32_t expert = experts_host[i];
    demand_.note(store, layer, expert, 1, weights_host[i], step);
  }
  if (read_in_place_) {
    resident_ffn_->run_in_place(layer, rows, experts, sorted, computed, y, workspace);
  } else {
    resident_ffn_->run_in_row_order(layer, step, rows, experts, sorted, computed, y, workspace);
  }
}

void ExpertParallelMoeExecutor::forward(int64_t layer, const Tensor& hidden, const Tensor& router_input,
                                        const Tensor& out, Workspace& workspace) {
  if (resident_ffn_) resident_ffn_->begin_layer(layer);  // the store's step
  if (options_.dispatch == EpDispatch::kHierarchical) {
    forward_hierarchical(layer, hidden, router_input, out, workspace);
  } else {
    forward_flat(layer, hidden, router_input, out, workspace);
  }
}

void ExpertParallelMoeExecutor::count_expert_rows(int64_t layer, const std::vector<int32_t>& experts) {
  std::vector<int64_t>& rows_per_expert = expert_rows_[layer];
  rows_per_expert.resize(weights_.layers[layer].moe.num_experts, 0);
  for (int32_t expert : experts) ++rows_per_expert[expert];
  stats_.rows_computed += static_cast<int64_t>(experts.size());
}

void ExpertParallelMoeExecutor::forward_flat(int64_t layer, const Tensor& hidden, const Tensor& router_input,
                                             const Tensor& out, Workspace& workspace) {
  using clock = std::chrono::steady_clock;
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t hidden_size = config_.hidden_size, top_k = routed_top_k(config_);
  const int64_t num_tokens = hidden.dim(0), num_slots = num_tokens * top_k;
  const ScalarType act = hidden.type;
  const size_t row_bytes = static_cast<size_t>(hidden_size) * scalar_size(act);
  const int num_workers = comm_.size(), rank = comm_.rank();
  const uint64_t sent_before = comm_.bytes_sent(), received_before = comm_.bytes_received();
  ++stats_.calls;

  // Route: every worker holds the router, so routing needs no communication.
  auto start = clock::now();
  const RoutedTokens routed = route_tokens(backend_, config_, moe, routable_mask(layer, moe),
                                           routed_top_k(config_), router_input, workspace, step_row_top_k());
  std::vector<int32_t> expert_ids = download<int32_t>(backend_, routed.expert_ids);
  if (substitute_) substitute_misses(layer, routed, expert_ids, workspace);
  // With a store the hosting worker's policies want each row's routing weight: it travels with the row.
  std::vector<float> route_weights;
  if (resident_ffn_) route_weights = download<float>(backend_, routed.weights);
  // Destination of every slot. Occurrences of one expert rotate over its replicas, starting at an
  // offset given by this rank, so replicas share the rows evenly across the whole cluster. A padding
  // slot (a row in a state of fewer experts per token: Backend::route_top_k) is not sent: it combines
  // its row's first output again, with weight zero, as computing it again would.
  std::vector<int> destination(num_slots, -1);
  std::vector<uint64_t> occurrences(moe.num_experts, 0);
  std::vector<int64_t> send_counts(num_workers, 0);
  int64_t num_sent = 0;
  for (int64_t slot = 0; slot < num_slots; ++slot) {
    if (is_padding_slot(expert_ids.data() + slot / top_k * top_k, slot % top_k)) continue;
    ++num_sent;
    const int64_t expert = expert_ids[slot];
    destination[slot] =
        table_.worker_for_sender(layer, expert, occurrences[expert]++ + static_cast<uint64_t>(rank), rank);
    ++send_counts[destination[slot]];
  }
  // Slots ordered by destination worker (stable: slot order within a worker); returned_position is
  // the inverse (where each slot's output comes back).
  std::vector<int64_t> send_offsets(num_workers + 1, 0);
  for (int w = 0; w < num_workers; ++w) send_offsets[w + 1] = send_offsets[w] + send_counts[w];
  std::vector<int32_t> send_source_row(num_sent), returned_position(num_slots), send_experts(num_sent);
  std::vector<float> send_weights(resident_ffn_ ? num_sent : 0);
  {
    std::vector<int64_t> cursor(send_offsets.begin(), send_offsets.end() - 1);
    for (int64_t slot = 0; slot < num_slots; ++slot) {
      if (destination[slot] < 0) {  // padding: its row's first slot, placed already
        returned_position[slot] = returned_position[slot / top_k * top_k];
        continue;
      }
      const int64_t i = cursor[destination[slot]]++;
      send_source_row[i] = static_cast<int32_t>(slot / top_k);
      send_experts[i] = expert_ids[slot];
      if (resident_ffn_) send_weights[i] = route_weights[slot];
      returned_position[slot] = static_cast<int32_t>(i);
    }
  }
  // The rows to send, gathered on the backend in send order and brought to the host.
  const Tensor send_index = workspace.get(kSlotSourceRow, ScalarType::kI32, {num_sent});
  backend_.copy_from_host(send_index, 0, send_source_row.data(), send_index.bytes());
  const Tensor send_rows_device = workspace.get(kSlotSortedRows, act, {num_sent, hidden_size});
  backend_.gather_rows(hidden, send_index, send_rows_device);
  std::vector<char> send_rows(send_rows_device.bytes());
  backend_.copy_to_host(send_rows_device, 0, send_rows.data(), send_rows.size());
  stats_.route_seconds += seconds_since(start);
  stats_.rows_sent += num_sent;

  // Dispatch: counts, then the expert id of each row, then the rows.
  start = clock::now();
  std::vector<int64_t> recv_counts;
  std::vector<int64_t> send_bytes(num_workers), recv_bytes(num_workers), send_at(num_workers),
      recv_at(num_workers);
  std::vector<char> recv_rows;
  std::vector<int32_t> recv_experts;
  std::vector<float> recv_weights;
  {
    // Names the collectives in timeout and dead-peer messages.
    const Communicator::Activity activity(comm_, "MoE layer " + std::to_string(layer) + " dispatch");
    recv_experts =
        comm_.all_to_all_v<int32_t>(std::span<const int32_t>(send_experts), send_counts, &recv_counts);
    if (resident_ffn_)  // every rank has a store or none: the same collectives everywhere
      recv_weights =
          comm_.all_to_all_v_known<float>(std::span<const float>(send_weights), send_counts, recv_counts);
    int64_t sent = 0, received = 0;
    for (int w = 0; w < num_workers; ++w) {
      send_bytes[w] = send_counts[w] * static_cast<int64_t>(row_bytes);
      recv_bytes[w] = recv_counts[w] * static_cast<int64_t>(row_bytes);
      send_at[w] = sent;
      recv_at[w] = received;
      sent += send_bytes[w];
      received += recv_bytes[w];
    }
    recv_rows.resize(static_cast<size_t>(received));
    comm_.all_to_all_v(send_rows.data(), send_bytes, send_at, recv_rows.data(), recv_bytes, recv_at);
  }
  stats_.dispatch_seconds += seconds_since(start);

  // Expert compute: received rows grouped by expert, each row's FFN computed alone.
  start = clock::now();
  const int64_t num_received = static_cast<int64_t>(recv_experts.size());
  for (int64_t i = 0; i < num_received; ++i) {
    const int32_t expert = recv_experts[i];
    if (expert < 0 || expert >= moe.num_experts || !table_.hosts(rank, layer, expert) ||
        !hosts(layer, expert))
      throw Error(ErrorCode::kInternal, "rank " + std::to_string(rank) + ": received a row for layer " +
                                            std::to_string(layer) + " expert " + std::to_string(expert) +
                                            ", which this worker does not host");
  }
  const Tensor received_experts = workspace.get(kSlotReceivedExperts, ScalarType::kI32, {num_received});
  backend_.copy_from_host(received_experts, 0, recv_experts.data(), received_experts.bytes());
  const Tensor received_rows = workspace.get(kSlotReceivedRows, act, {num_received, hidden_size});
  backend_.copy_from_host(received_rows, 0, recv_rows.data(), received_rows.bytes());
  // Each row's expert output, in the order the rows came in (back into received_rows).
  compute_rows(layer, recv_experts, recv_weights, received_rows, received_experts,
               workspace.get(kSlotSortedRows, act, {num_received, hidden_size}),
               workspace.get(kSlotExpertOut, act, {num_received, hidden_size}), received_rows, workspace);
  std::vector<char> computed(received_rows.bytes());
  backend_.copy_to_host(received_rows, 0, computed.data(), computed.size());
  count_expert_rows(layer, recv_experts);
  stats_.expert_seconds += seconds_since(start);

  // Combine: outputs travel back in the order their rows came, then the weighted sum in slot order.
  start = clock::now();
  std::vector<char> returned(send_rows.size());
  {
    const Communicator::Activity activity(comm_, "MoE layer " + std::to_string(layer) + " combine");
    comm_.all_to_all_v(computed.data(), recv_bytes, recv_at, returned.data(), send_bytes, send_at);
  }
  // combine_top_k takes a row per slot; the padding slots point at sent ones, so rows past num_sent
  // are never read.
  const Tensor returned_rows = workspace.get(kSlotSortedRows, act, {num_slots, hidden_size});
  backend_.copy_from_host(returned_rows, 0, returned.data(), returned.size());
  const Tensor positions = workspace.get(kSlotSortedPosition, ScalarType::kI32, {num_slots});
  backend_.copy_from_host(positions, 0, returned_position.data(), positions.bytes());
  backend_.combine_top_k(returned_rows, positions, routed.weights, out);
  backend_.synchronize();  // the host buffers above are the sources of asynchronous copies
  stats_.combine_seconds += seconds_since(start);
  for (int w = 0; w < num_workers; ++w) {
    if (table_.same_node(w, rank)) continue;  // expert ids, rows out, outputs back
    stats_.inter_node_bytes_sent += static_cast<uint64_t>(send_counts[w] * 4 + send_bytes[w] + recv_bytes[w]);
  }
  stats_.bytes_sent += comm_.bytes_sent() - sent_before;
  stats_.bytes_received += comm_.bytes_received() - received_before;
}

}  // namespace epic
