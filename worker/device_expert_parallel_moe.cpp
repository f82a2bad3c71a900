// DeviceExpertParallelMoeExecutor: the layout kernels (kernels/cuda/ep_dispatch_kernels.h) and backend ops
// around two NCCL all-to-all-v calls, everything on the backend's stream.
#include "worker/device_expert_parallel_moe.h"

#include <string>
#include <vector>

#include "kernels/cuda/cuda_backend_access.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ep_dispatch_kernels.h"
#include "kernels/error.h"
#include "worker/expert_dispatch_plan.h"
#include "worker/moe_block.h"

namespace epic {
namespace {

// This executor's own buffers (its Workspace, not the caller's: a caller slot reused between the two
// exchanges would be clobbered).
enum DeviceMoeSlot : int {
  kEpOccurrenceOffsets,
  kEpOccurrenceSource,
  kEpOccurrencePosition,
  kEpDestination,
  kEpSendPosition,
  kEpCounts,  // int64 [4R] (as I32 [8R]): send tokens, send pairs, recv tokens, recv pairs
  kEpSendRecords,
  kEpRecvRecords,
  kEpRecvExpertIds,
  kEpRecvWeights,
  kEpGroupOffsets,
  kEpGroupSource,
  kEpGroupPosition,
  kEpSortedRows,
  kEpExpertOut,
  kEpPartial,
  kEpReturned,
};

int64_t sum(const int64_t* values, int count) {
  int64_t total = 0;
  for (int i = 0; i < count; ++i) total += values[i];
  return total;
}

// Blocks of per-rank element counts times a byte size, packed in rank order.
void fill_blocks(const int64_t* counts, int num_ranks, int64_t unit_bytes, std::vector<int64_t>& bytes,
                 std::vector<int64_t>& offsets) {
  bytes.assign(num_ranks, 0);
  offsets.assign(num_ranks, 0);
  int64_t at = 0;
  for (int r = 0; r < num_ranks; ++r) {
    bytes[r] = counts[r] * unit_bytes;
    offsets[r] = at;
    at += bytes[r];
  }
}

// A zero-row Workspace view would be a rank-0-sized tensor; one element keeps shapes valid.
int64_t at_least_one(int64_t n) { return n > 0 ? n : 1; }

// Where a layer's phases begin and end on the stream (DeviceMoeStats).
enum PhaseMark : int {
  kMarkStart,
  kMarkRouted,
  kMarkCountsRead,
  kMarkPacked,
  kMarkDispatched,
  kMarkComputed,
  kMarkCombined,
  kNumPhaseMarks
};

// Bytes to ranks other than `rank`.
uint64_t off_rank_bytes(const std::vector<int64_t>& bytes, int rank) {
  uint64_t total = 0;
  for (size_t r = 0; r < bytes.size(); ++r)
    if (static_cast<int>(r) != rank) total += static_cast<uint64_t>(bytes[r]);
  return total;
}

}  // namespace

std::unique_ptr<NcclCommunicator> make_backend_nccl_communicator(Communicator& host, const CommOptions& options,
                                                                 Backend& backend) {
  NcclOptions nccl_options;
  nccl_options.device = cuda_backend_device(backend);
  nccl_options.stream = cuda_backend_stream(backend);
  return std::make_unique<NcclCommunicator>(host, options, nccl_options);
}

DeviceExpertParallelMoeExecutor::DeviceExpertParallelMoeExecutor(const ModelConfig& config,
                                                                 const ModelWeights& weights, Backend& backend,
                                                                 NcclCommunicator& nccl,
                                                                 const ExpertRoutingTable& table,
                                                                 const DeviceMoeOptions& options)
    : config_(config),
      weights_(weights),
      backend_(backend),
      nccl_(nccl),
      table_(table),
      stream_(cuda_backend_stream(backend)),
      buffers_(backend),
      options_(options),
      low_latency_buffers_(backend) {
  EPIC_CHECK(table.num_workers == nccl.size(), ErrorCode::kInternal,
             "placement plan is for " + std::to_string(table.num_workers) + " workers but the NCCL job has " +
                 std::to_string(nccl.size()) + " ranks");
  EPIC_CHECK(nccl.stream() == stream_ && nccl.device() == cuda_backend_device(backend), ErrorCode::kInternal,
             "the NCCL communicator must run on the CUDA backend's device and stream "
             "(make_backend_nccl_communicator)");
  host_counts_ = backend.allocate_staging(sizeof(int64_t) * 4 * static_cast<size_t>(nccl.size()));
  phase_events_.assign(kNumPhaseMarks, nullptr);
  for (cudaEvent_t& event : phase_events_) EPIC_CUDA_CHECK(cudaEventCreate(&event));
  if (options.mode != EpMode::kNormal) low_latency_capacity_ = low_latency_capacity(options.low_latency_max_tokens);
  if (options.mode == EpMode::kLowLatency) unagreed_step_tokens_ = low_latency_capacity_;
}

DeviceExpertParallelMoeExecutor::~DeviceExpertParallelMoeExecutor() {
  for (cudaEvent_t event : phase_events_)
    if (event != nullptr) cudaEventDestroy(event);  // no throw from a destructor; nothing to do on failure
}

const DeviceExpertParallelMoeExecutor::DeviceReplicas& DeviceExpertParallelMoeExecutor::replicas_for(
    int64_t layer, int64_t num_experts) {
  auto it = replicas_.find(layer);
  if (it != replicas_.end()) return it->second;
  ReplicaTable flat = flatten_replicas(table_, layer, num_experts);
  if (flat.workers.empty()) flat.workers.push_back(-1);
  DeviceReplicas device{backend_.new_tensor(ScalarType::kI32, {num_experts + 1}),
                        backend_.new_tensor(ScalarType::kI32, {static_cast<int64_t>(flat.workers.size())})};
  backend_.copy_from_host(device.offsets, 0, flat.offsets.data(), device.offsets.view().bytes());
  backend_.copy_from_host(device.workers, 0, flat.workers.data(), device.workers.view().bytes());
  backend_.synchronize();  // the host vectors are the copies' sources; once per layer
  return replicas_.emplace(layer, std::move(device)).first->second;
}

void DeviceExpertParallelMoeExecutor::forward(int64_t layer, const Tensor& hidden, const Tensor& router_input,
                                              const Tensor& out, Workspace& workspace) {
  if (const int64_t block_tokens = step_tokens(); block_tokens > 0)
    return forward_low_latency(layer, hidden, router_input, out, workspace, block_tokens);
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t hidden_size = config_.hidden_size, top_k = config_.num_experts_per_tok;
  const int64_t num_tokens = hidden.dim(0), num_slots = num_tokens * top_k, num_experts = moe.num_experts;
  const int num_ranks = nccl_.size(), rank = nccl_.rank();
  const ScalarType act = hidden.type;
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(scalar_size(act));
  const int64_t record_bytes = ep_kernels::dispatch_record_bytes(hidden_size, act, top_k);
  const uint64_t sent_before = nccl_.bytes_sent(), received_before = nccl_.bytes_received();
  const DeviceReplicas& replicas = replicas_for(layer, num_experts);
  ++stats_.calls;
  const auto mark = [&](PhaseMark at) { EPIC_CUDA_CHECK(cudaEventRecord(phase_events_[at], stream_)); };
  mark(kMarkStart);

  // Layout. The occurrence of each slot among the slots of its expert (the replica choice's key) comes
  // from the stable grouping: sorted_position - expert_offsets.
  RoutedTokens routed;
  const Tensor destination = buffers_.get(kEpDestination, ScalarType::kI32, {at_least_one(num_slots)});
  if (num_tokens > 0) {
    routed = route_tokens(backend_, config_, moe, router_input, workspace);
    const Tensor offsets = buffers_.get(kEpOccurrenceOffsets, ScalarType::kI32, {num_experts + 1});
    const Tensor source = buffers_.get(kEpOccurrenceSource, ScalarType::kI32, {num_slots});
    const Tensor position = buffers_.get(kEpOccurrencePosition, ScalarType::kI32, {num_slots});
    backend_.group_by_expert(routed.expert_ids.reshaped({num_slots}), num_experts, top_k, offsets, source,
                             position);
    ep_kernels::slot_destinations(routed.expert_ids.as<int32_t>(), position.as<int32_t>(), offsets.as<int32_t>(),
                                  replicas.offsets.view().as<int32_t>(), replicas.workers.view().as<int32_t>(), num_slots, rank,
                                  destination.as<int32_t>(), stream_);
  }
  mark(kMarkRouted);
  const Tensor send_position =
      buffers_.get(kEpSendPosition, ScalarType::kI32, {at_least_one(num_ranks * num_tokens)});
  const Tensor counts = buffers_.get(kEpCounts, ScalarType::kI32, {8 * static_cast<int64_t>(num_ranks)});
  int64_t* device_counts = static_cast<int64_t*>(counts.data);
  int64_t* send_counts = device_counts;  // tokens to each rank
  int64_t* send_pairs = device_counts + num_ranks;
  int64_t* recv_counts = device_counts + 2 * num_ranks;
  int64_t* recv_pairs = device_counts + 3 * num_ranks;
  ep_kernels::rank_layout(destination.as<int32_t>(), num_tokens, top_k, num_ranks, send_position.as<int32_t>(),
                          send_counts, send_pairs, stream_);
  nccl_.exchange_counts(send_counts, recv_counts);
  nccl_.exchange_counts(send_pairs, recv_pairs);
  // The one host read of the layer: buffer sizes and NCCL block sizes come from the counts.
  auto* host = static_cast<int64_t*>(host_counts_->data());
  EPIC_CUDA_CHECK(cudaMemcpyAsync(host, device_counts, sizeof(int64_t) * 4 * num_ranks, cudaMemcpyDeviceToHost,
                                  stream_));
  mark(kMarkCountsRead);
  nccl_.synchronize();  // bounded: a stuck peer or an NCCL error throws here
  const int64_t total_sent = sum(host, num_ranks);
  const int64_t total_received = sum(host + 2 * num_ranks, num_ranks);
  const int64_t total_pairs = sum(host + 3 * num_ranks, num_ranks);
  stats_.tokens_sent += total_sent;
  stats_.pairs_computed += total_pairs;

  // Dispatch: one record per (token, destination rank).
  const Tensor send_records = buffers_.get(kEpSendRecords, ScalarType::kU8, {at_least_one(total_sent * record_bytes)});
  const Tensor recv_records =
      buffers_.get(kEpRecvRecords, ScalarType::kU8, {at_least_one(total_received * record_bytes)});
  if (num_tokens > 0)
    ep_kernels::pack_dispatch(hidden.data, act, routed.expert_ids.as<int32_t>(), routed.weights.as<float>(),
                              destination.as<int32_t>(), send_position.as<int32_t>(), send_counts, num_tokens,
                              top_k, hidden_size, num_ranks, record_bytes, send_records.data, stream_);
  AllToAllLayout dispatch;
  dispatch.send = send_records.data;
  dispatch.send_buffer_bytes = static_cast<int64_t>(send_records.bytes());
  dispatch.recv = recv_records.data;
  dispatch.recv_buffer_bytes = static_cast<int64_t>(recv_records.bytes());
  fill_blocks(host, num_ranks, record_bytes, dispatch.send_bytes, dispatch.send_offsets);
  fill_blocks(host + 2 * num_ranks, num_ranks, record_bytes, dispatch.recv_bytes, dispatch.recv_offsets);
  mark(kMarkPacked);
  nccl_.all_to_all_v(dispatch);
  mark(kMarkDispatched);

  // Expert compute: the received (token, slot) pairs grouped by expert; slots served elsewhere get the
  // id num_experts, so the stable sort puts them after every real group (the first total_pairs rows).
  const int64_t num_received_slots = total_received * top_k;
  const int32_t unused_expert = static_cast<int32_t>(num_experts);
  const Tensor partial = buffers_.get(kEpPartial, ScalarType::kF32, {at_least_one(total_received), hidden_size});
  if (total_received > 0) {
    const Tensor recv_ids = buffers_.get(kEpRecvExpertIds, ScalarType::kI32, {num_received_slots});
    const Tensor recv_weights = buffers_.get(kEpRecvWeights, ScalarType::kF32, {num_received_slots});
    ep_kernels::unpack_metadata(recv_records.data, total_received, top_k, row_bytes, record_bytes, unused_expert,
                                recv_ids.as<int32_t>(), recv_weights.as<float>(), stream_);
    const Tensor group_offsets = buffers_.get(kEpGroupOffsets, ScalarType::kI32, {num_experts + 2});
    const Tensor group_source = buffers_.get(kEpGroupSource, ScalarType::kI32, {num_received_slots});
    const Tensor group_position = buffers_.get(kEpGroupPosition, ScalarType::kI32, {num_received_slots});
    backend_.group_by_expert(recv_ids, num_experts + 1, top_k, group_offsets, group_source, group_position);
    const Tensor sorted_rows = buffers_.get(kEpSortedRows, act, {at_least_one(total_pairs), hidden_size});
    const Tensor expert_out = buffers_.get(kEpExpertOut, act, {at_least_one(total_pairs), hidden_size});
    if (total_pairs > 0) {
      ep_kernels::gather_record_rows(recv_records.data, record_bytes, row_bytes, group_source.as<int32_t>(),
                                     total_pairs, sorted_rows.data, stream_);
      // offsets[0 .. E] of the E + 1 groups: offsets[E] == total_pairs, the rows expert_ffn sees.
      const Tensor expert_offsets = group_offsets.rows_view(0, num_experts + 1);
      run_experts(backend_, config_, moe, sorted_rows.rows_view(0, total_pairs), expert_offsets,
                  expert_out.rows_view(0, total_pairs), workspace);
    }
    ep_kernels::partial_sums(expert_out.data, act, recv_ids.as<int32_t>(), unused_expert,
                             group_position.as<int32_t>(), recv_weights.as<float>(), total_received, top_k,
                             hidden_size, partial.as<float>(), stream_);
  }

  mark(kMarkComputed);

  // Combine: each partial row back to its origin once, then the rank-ordered sum into out.
  const int64_t partial_row_bytes = hidden_size * static_cast<int64_t>(sizeof(float));
  const Tensor returned = buffers_.get(kEpReturned, ScalarType::kF32, {at_least_one(total_sent), hidden_size});
  AllToAllLayout combine;
  combine.send = partial.data;
  combine.send_buffer_bytes = static_cast<int64_t>(partial.bytes());
  combine.recv = returned.data;
  combine.recv_buffer_bytes = static_cast<int64_t>(returned.bytes());
  fill_blocks(host + 2 * num_ranks, num_ranks, partial_row_bytes, combine.send_bytes, combine.send_offsets);
  fill_blocks(host, num_ranks, partial_row_bytes, combine.recv_bytes, combine.recv_offsets);
  nccl_.all_to_all_v(combine);
  ep_kernels::combine_partials(returned.as<float>(), send_position.as<int32_t>(), send_counts, num_tokens,
                               num_ranks, hidden_size, out.data, out.type, stream_);
  mark(kMarkCombined);
  nccl_.synchronize();  // bounded, so no later unbounded stream wait can sit behind a stuck exchange
  stats_.bytes_sent += nccl_.bytes_sent() - sent_before;
  stats_.bytes_received += nccl_.bytes_received() - received_before;
  // The stream is done, so every mark is complete: reading them waits for nothing.
  const auto seconds = [&](PhaseMark from, PhaseMark to) {
    float milliseconds = 0;
    EPIC_CUDA_CHECK(cudaEventElapsedTime(&milliseconds, phase_events_[from], phase_events_[to]));
    return milliseconds * 1e-3;
  };
  stats_.route_seconds += seconds(kMarkStart, kMarkRouted);
  stats_.dispatch_seconds += seconds(kMarkRouted, kMarkDispatched);
  stats_.count_exchange_seconds += seconds(kMarkRouted, kMarkCountsRead);
  stats_.rows_all_to_all_seconds += seconds(kMarkPacked, kMarkDispatched);
  stats_.expert_seconds += seconds(kMarkDispatched, kMarkComputed);
  stats_.combine_seconds += seconds(kMarkComputed, kMarkCombined);
  stats_.dispatch_bytes_sent += off_rank_bytes(dispatch.send_bytes, rank);
  stats_.combine_bytes_sent += off_rank_bytes(combine.send_bytes, rank);
  exchange_sizes_[layer] = {dispatch.send_bytes, dispatch.recv_bytes, combine.send_bytes, combine.recv_bytes};
}

}  // namespace epic
