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
// exchanges would be clobbered): the call's shared slots, then each Exchange's own (at slot_base).
enum SharedSlot : int {
  kEpOccurrenceOffsets,
  kEpOccurrenceSource,
  kEpOccurrencePosition,
  kEpDestination,
  kNumSharedSlots,
};
enum ExchangeSlot : int {
  kExSendPosition,
  kExCounts,  // int64 [4R] (as I32 [8R]): send tokens, send pairs, recv tokens, recv pairs
  kExSendRecords,
  kExRecvRecords,
  kExRecvExpertIds,
  kExRecvWeights,
  kExGroupOffsets,
  kExGroupSource,
  kExGroupPosition,
  kExSortedRows,
  kExExpertOut,
  kExPartial,
  kExReturned,
  kNumExchangeSlots,
};
// Exchanges a layer may run at once (the overlap's two micro-batches).
constexpr int kMaxExchanges = 2;

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

// Bytes to ranks other than `rank`.
uint64_t off_rank_bytes(const std::vector<int64_t>& bytes, int rank) {
  uint64_t total = 0;
  for (size_t r = 0; r < bytes.size(); ++r)
    if (static_cast<int>(r) != rank) total += static_cast<uint64_t>(bytes[r]);
  return total;
}

}  // namespace

MoePhaseStats to_phase_stats(const DeviceMoeStats& stats) {
  MoePhaseStats phases;
  phases.route_seconds = stats.route_seconds;
  phases.dispatch_seconds = stats.dispatch_seconds;
  phases.expert_seconds = stats.expert_seconds;
  phases.combine_seconds = stats.combine_seconds;
  phases.bytes_sent = stats.bytes_sent;
  phases.bytes_received = stats.bytes_received;
  phases.rows_sent = stats.tokens_sent;
  phases.rows_computed = stats.pairs_computed;
  phases.calls = stats.calls;
  return phases;
}

std::unique_ptr<NcclCommunicator> make_backend_nccl_communicator(Communicator& host,
                                                                 const CommOptions& options,
                                                                 Backend& backend) {
  NcclOptions nccl_options;
  nccl_options.device = cuda_backend_device(backend);
  nccl_options.stream = cuda_backend_stream(backend);
  return std::make_unique<NcclCommunicator>(host, options, nccl_options);
}

DeviceExpertParallelMoeExecutor::DeviceExpertParallelMoeExecutor(const ModelConfig& config,
                                                                 const ModelWeights& weights,
                                                                 Backend& backend, NcclCommunicator& nccl,
                                                                 const ExpertRoutingTable& table,
                                                                 const DeviceMoeOptions& options)
    : config_(config),
      weights_(weights),
      backend_(backend),
      nccl_(nccl),
      table_(table),
      stream_(cuda_backend_stream(backend)),
      buffers_(backend, kNumSharedSlots + kMaxExchanges * kNumExchangeSlots),
      options_(options),
      low_latency_buffers_(backend) {
  EPIC_CHECK(table.num_workers == nccl.size(), ErrorCode::kInternal,
             "placement plan is for " + std::to_string(table.num_workers) + " workers but the NCCL job has " +
                 std::to_string(nccl.size()) + " ranks");
  EPIC_CHECK(nccl.stream() == stream_ && nccl.device() == cuda_backend_device(backend), ErrorCode::kInternal,
             "the NCCL communicator must run on the CUDA backend's device and stream "
             "(make_backend_nccl_communicator)");
  host_counts_ =
      backend.allocate_staging(sizeof(int64_t) * 4 * kMaxExchanges * static_cast<size_t>(nccl.size()));
  phase_events_.assign(kNumPhaseMarks, nullptr);
  for (cudaEvent_t& event : phase_events_) EPIC_CUDA_CHECK(cudaEventCreate(&event));
  if (options.overlap) {
    // On the backend's device (current for its ops, not necessarily here). Non-blocking, like NCCL's own.
    EPIC_CUDA_CHECK(cudaSetDevice(nccl.device()));
    EPIC_CUDA_CHECK(cudaStreamCreateWithFlags(&comm_stream_, cudaStreamNonBlocking));
    order_events_.assign(kNumOverlapOrderEvents, nullptr);
    for (cudaEvent_t& event : order_events_)
      EPIC_CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming));
  }
  if (options.mode != EpMode::kNormal)
    low_latency_capacity_ = low_latency_capacity(options.low_latency_max_tokens);
  if (options.mode == EpMode::kLowLatency) unagreed_step_tokens_ = low_latency_capacity_;
}

DeviceExpertParallelMoeExecutor::~DeviceExpertParallelMoeExecutor() {
  // No throw from a destructor, nothing to do on failure; none of these waits for the device.
  for (cudaEvent_t event : phase_events_)
    if (event != nullptr) cudaEventDestroy(event);
  for (const auto& [layer, marks] : captured_marks_)
    for (cudaEvent_t event : marks.events)
      if (event != nullptr) cudaEventDestroy(event);
  for (cudaEvent_t event : order_events_)
    if (event != nullptr) cudaEventDestroy(event);
  if (comm_stream_ != nullptr) cudaStreamDestroy(comm_stream_);
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

void DeviceExpertParallelMoeExecutor::mark(PhaseMark at, const std::vector<cudaEvent_t>& events) {
  // Under capture a plain record only orders the capture; External makes it a record node of the graph.
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  EPIC_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capturing));
  EPIC_CUDA_CHECK(cudaEventRecordWithFlags(
      events[at], stream_,
      capturing == cudaStreamCaptureStatusNone ? cudaEventRecordDefault : cudaEventRecordExternal));
}

void DeviceExpertParallelMoeExecutor::collect_graph_phase_times() {
  nccl_.synchronize();  // bounded; every captured mark of the replay is complete after it
  for (const auto& [layer, marks] : captured_marks_) {
    add_phase_seconds(/*counts_read=*/false, marks.events);
    count_low_latency_call(marks.block_tokens);
  }
}

Tensor DeviceExpertParallelMoeExecutor::route_and_place(int64_t layer, const Tensor& router_input,
                                                        Workspace& workspace, RoutedTokens& routed) {
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t top_k = routed_top_k(config_), num_tokens = router_input.dim(0);
  const int64_t num_slots = num_tokens * top_k, num_experts = moe.num_experts;
  const DeviceReplicas& replicas = replicas_for(layer, num_experts);
  // The occurrence of each slot among the slots of its expert (the replica choice's key) comes from the
  // stable grouping: sorted_position - expert_offsets.
  const Tensor destination = buffers_.get(kEpDestination, ScalarType::kI32, {at_least_one(num_slots)});
  if (num_tokens > 0) {
    routed = route_tokens(backend_, config_, moe, routable_mask(layer, moe), routed_top_k(config_),
                          router_input, workspace, step_row_top_k());
    const Tensor offsets = buffers_.get(kEpOccurrenceOffsets, ScalarType::kI32, {num_experts + 1});
    const Tensor source = buffers_.get(kEpOccurrenceSource, ScalarType::kI32, {num_slots});
    const Tensor position = buffers_.get(kEpOccurrencePosition, ScalarType::kI32, {num_slots});
    backend_.group_by_expert(routed.expert_ids.reshaped({num_slots}), num_experts, top_k, offsets, source,
                             position);
    ep_kernels::slot_destinations(routed.expert_ids.as<int32_t>(), position.as<int32_t>(),
                                  offsets.as<int32_t>(), replicas.offsets.view().as<int32_t>(),
                                  replicas.workers.view().as<int32_t>(), num_slots, nccl_.rank(),
                                  destination.as<int32_t>(), stream_);
    count_routed(layer, routed.expert_ids, destination.rows_view(0, num_slots).reshaped({num_tokens, top_k}));
  }
  return destination;
}

DeviceExpertParallelMoeExecutor::Exchange DeviceExpertParallelMoeExecutor::begin_exchange(
    int index, int64_t first_token, int64_t num_tokens, const Tensor& destination) {
  const int num_ranks = nccl_.size();
  const int64_t top_k = routed_top_k(config_);
  Exchange exchange;
  exchange.first_token = first_token;
  exchange.num_tokens = num_tokens;
  exchange.slot_base = kNumSharedSlots + index * kNumExchangeSlots;
  exchange.host_index = index;
  exchange.send_position = buffers_.get(exchange.slot_base + kExSendPosition, ScalarType::kI32,
                                        {at_least_one(num_ranks * num_tokens)});
  const Tensor counts =
      buffers_.get(exchange.slot_base + kExCounts, ScalarType::kI32, {8 * static_cast<int64_t>(num_ranks)});
  exchange.device_counts = static_cast<int64_t*>(counts.data);
  // The layout of this exchange's tokens: where each goes, and how many tokens and slots to each rank.
  ep_kernels::rank_layout(destination.as<int32_t>() + first_token * top_k, num_tokens, top_k, num_ranks,
                          exchange.send_position.as<int32_t>(), exchange.device_counts,
                          exchange.device_counts + num_ranks, stream_);
  return exchange;
}

void DeviceExpertParallelMoeExecutor::send_counts(Exchange& exchange, cudaStream_t stream) {
  const int num_ranks = nccl_.size();
  int64_t* counts = exchange.device_counts;
  nccl_.exchange_counts(counts, counts + 2 * num_ranks, stream);              // tokens
  nccl_.exchange_counts(counts + num_ranks, counts + 3 * num_ranks, stream);  // (token, slot) pairs
  auto* host = static_cast<int64_t*>(host_counts_->data()) + exchange.host_index * 4 * num_ranks;
  EPIC_CUDA_CHECK(
      cudaMemcpyAsync(host, counts, sizeof(int64_t) * 4 * num_ranks, cudaMemcpyDeviceToHost, stream));
  exchange.host = host;
}

void DeviceExpertParallelMoeExecutor::read_counts(Exchange& exchange, int64_t record_bytes) {
  const int num_ranks = nccl_.size();
  const int64_t hidden_size = config_.hidden_size;
  const int64_t* host = exchange.host;
  exchange.total_sent = sum(host, num_ranks);
  exchange.total_received = sum(host + 2 * num_ranks, num_ranks);
  exchange.total_pairs = sum(host + 3 * num_ranks, num_ranks);
  stats_.tokens_sent += exchange.total_sent;
  stats_.pairs_computed += exchange.total_pairs;
  const int base = exchange.slot_base;
  exchange.send_records = buffers_.get(base + kExSendRecords, ScalarType::kU8,
                                       {at_least_one(exchange.total_sent * record_bytes)});
  exchange.recv_records = buffers_.get(base + kExRecvRecords, ScalarType::kU8,
                                       {at_least_one(exchange.total_received * record_bytes)});
  exchange.partial =
      buffers_.get(base + kExPartial, ScalarType::kF32, {at_least_one(exchange.total_received), hidden_size});
  exchange.returned =
      buffers_.get(base + kExReturned, ScalarType::kF32, {at_least_one(exchange.total_sent), hidden_size});
  // Rows out as records (one per token and destination rank), fp32 partial rows back.
  AllToAllLayout& dispatch = exchange.dispatch;
  dispatch.send = exchange.send_records.data;
  dispatch.send_buffer_bytes = static_cast<int64_t>(exchange.send_records.bytes());
  dispatch.recv = exchange.recv_records.data;
  dispatch.recv_buffer_bytes = static_cast<int64_t>(exchange.recv_records.bytes());
  fill_blocks(host, num_ranks, record_bytes, dispatch.send_bytes, dispatch.send_offsets);
  fill_blocks(host + 2 * num_ranks, num_ranks, record_bytes, dispatch.recv_bytes, dispatch.recv_offsets);
  const int64_t partial_row_bytes = hidden_size * static_cast<int64_t>(sizeof(float));
  AllToAllLayout& combine = exchange.combine;
  combine.send = exchange.partial.data;
  combine.send_buffer_bytes = static_cast<int64_t>(exchange.partial.bytes());
  combine.recv = exchange.returned.data;
  combine.recv_buffer_bytes = static_cast<int64_t>(exchange.returned.bytes());
  fill_blocks(host + 2 * num_ranks, num_ranks, partial_row_bytes, combine.send_bytes, combine.send_offsets);
  fill_blocks(host, num_ranks, partial_row_bytes, combine.recv_bytes, combine.recv_offsets);
}

void DeviceExpertParallelMoeExecutor::pack(const Exchange& exchange, const Tensor& hidden,
                                           const RoutedTokens& routed, const Tensor& destination,
                                           int64_t record_bytes) {
  if (exchange.num_tokens == 0) return;
  const int64_t top_k = routed_top_k(config_), first = exchange.first_token;
  const Tensor rows = hidden.rows_view(first, exchange.num_tokens);
  ep_kernels::pack_dispatch(rows.data, hidden.type, routed.expert_ids.as<int32_t>() + first * top_k,
                            routed.weights.as<float>() + first * top_k,
                            destination.as<int32_t>() + first * top_k, exchange.send_position.as<int32_t>(),
                            exchange.device_counts, exchange.num_tokens, top_k, config_.hidden_size,
                            nccl_.size(), record_bytes, exchange.send_records.data, stream_);
}

void DeviceExpertParallelMoeExecutor::dispatch(const Exchange& exchange, cudaStream_t stream) {
  nccl_.all_to_all_v(exchange.dispatch, stream);
}

void DeviceExpertParallelMoeExecutor::compute(Exchange& exchange, int64_t layer, ScalarType act,
                                              int64_t record_bytes, Workspace& workspace) {
  if (exchange.total_received == 0) {
    log_no_rows(layer);
    return;
  }
  // The received (token, slot) pairs grouped by expert; slots served elsewhere get the id num_experts, so
  // the stable sort puts them after every real group (the first total_pairs rows).
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t hidden_size = config_.hidden_size, top_k = routed_top_k(config_);
  const int64_t num_experts = moe.num_experts,
                row_bytes = hidden_size * static_cast<int64_t>(scalar_size(act));
  const int64_t received = exchange.total_received, slots = received * top_k, pairs = exchange.total_pairs;
  const int32_t unused_expert = static_cast<int32_t>(num_experts);
  const int base = exchange.slot_base;
  const Tensor recv_ids = buffers_.get(base + kExRecvExpertIds, ScalarType::kI32, {slots});
  const Tensor recv_weights = buffers_.get(base + kExRecvWeights, ScalarType::kF32, {slots});
  ep_kernels::unpack_metadata(exchange.recv_records.data, received, top_k, row_bytes, record_bytes,
                              unused_expert, recv_ids.as<int32_t>(), recv_weights.as<float>(), stream_);
  const Tensor group_offsets = buffers_.get(base + kExGroupOffsets, ScalarType::kI32, {num_experts + 2});
  const Tensor group_source = buffers_.get(base + kExGroupSource, ScalarType::kI32, {slots});
  const Tensor group_position = buffers_.get(base + kExGroupPosition, ScalarType::kI32, {slots});
  backend_.group_by_expert(recv_ids, num_experts + 1, top_k, group_offsets, group_source, group_position);
  const Tensor sorted_rows = buffers_.get(base + kExSortedRows, act, {at_least_one(pairs), hidden_size});
  const Tensor expert_out = buffers_.get(base + kExExpertOut, act, {at_least_one(pairs), hidden_size});
  if (pairs > 0) {
    ep_kernels::gather_record_rows(exchange.recv_records.data, record_bytes, row_bytes,
                                   group_source.as<int32_t>(), pairs, sorted_rows.data, stream_);
    // offsets[0 .. E] of the E + 1 groups: offsets[E] == total_pairs, the rows expert_ffn sees.
    run_received_experts(layer, sorted_rows.rows_view(0, pairs), group_offsets.rows_view(0, num_experts + 1),
                         expert_out.rows_view(0, pairs), {recv_ids, recv_weights, group_position}, workspace);
  } else {
    log_no_rows(layer);
  }
  ep_kernels::partial_sums(expert_out.data, act, recv_ids.as<int32_t>(), unused_expert,
                           group_position.as<int32_t>(), recv_weights.as<float>(), received, top_k,
                           hidden_size, exchange.partial.as<float>(), stream_);
}

void DeviceExpertParallelMoeExecutor::send_back(const Exchange& exchange, cudaStream_t stream) {
  nccl_.all_to_all_v(exchange.combine, stream);
}

void DeviceExpertParallelMoeExecutor::combine(const Exchange& exchange, const Tensor& out) {
  // The rank-ordered sum of each token's partial rows into its row of out.
  ep_kernels::combine_partials(exchange.returned.as<float>(), exchange.send_position.as<int32_t>(),
                               exchange.device_counts, exchange.num_tokens, nccl_.size(), config_.hidden_size,
                               out.rows_view(exchange.first_token, exchange.num_tokens).data, out.type,
                               stream_);
}

void DeviceExpertParallelMoeExecutor::forward(int64_t layer, const Tensor& hidden, const Tensor& router_input,
                                              const Tensor& out, Workspace& workspace) {
  if (const int64_t block_tokens = step_tokens(); block_tokens > 0)
    return forward_low_latency(layer, hidden, router_input, out, workspace, block_tokens);
  if (options_.overlap) return forward_overlapped(layer, hidden, router_input, out, workspace);
  const ScalarType act = hidden.type;
  const int64_t record_bytes =
      ep_kernels::dispatch_record_bytes(config_.hidden_size, act, routed_top_k(config_));
  const uint64_t sent_before = nccl_.bytes_sent(), received_before = nccl_.bytes_received();
  ++stats_.calls;
  mark(kMarkStart);
  RoutedTokens routed;
  const Tensor destination = route_and_place(layer, router_input, workspace, routed);
  mark(kMarkRouted);
  Exchange exchange = begin_exchange(0, 0, hidden.dim(0), destination);
  send_counts(exchange, stream_);
  mark(kMarkCountsRead);
  nccl_.synchronize();  // the one host read of the layer, bounded: a stuck peer or an NCCL error throws here
  read_counts(exchange, record_bytes);
  pack(exchange, hidden, routed, destination, record_bytes);
  mark(kMarkPacked);
  dispatch(exchange, stream_);
  mark(kMarkDispatched);
  compute(exchange, layer, act, record_bytes, workspace);
  mark(kMarkComputed);
  send_back(exchange, stream_);
  combine(exchange, out);
  mark(kMarkCombined);
  nccl_.synchronize();  // bounded, so no later unbounded stream wait can sit behind a stuck exchange
  record_layer(layer, {&exchange}, sent_before, received_before);
}

void DeviceExpertParallelMoeExecutor::add_phase_seconds(bool counts_read,
                                                        const std::vector<cudaEvent_t>& events) {
  // Called after a synchronize: every mark is complete, so reading them waits for nothing.
  const auto seconds = [&](PhaseMark from, PhaseMark to) {
    float milliseconds = 0;
    EPIC_CUDA_CHECK(cudaEventElapsedTime(&milliseconds, events[from], events[to]));
    return milliseconds * 1e-3;
  };
  stats_.route_seconds += seconds(kMarkStart, kMarkRouted);
  stats_.dispatch_seconds += seconds(kMarkRouted, kMarkDispatched);
  if (counts_read) stats_.count_exchange_seconds += seconds(kMarkRouted, kMarkCountsRead);
  stats_.rows_all_to_all_seconds += seconds(kMarkPacked, kMarkDispatched);
  stats_.expert_seconds += seconds(kMarkDispatched, kMarkComputed);
  stats_.combine_seconds += seconds(kMarkComputed, kMarkCombined);
}

void DeviceExpertParallelMoeExecutor::record_layer(int64_t layer,
                                                   const std::vector<const Exchange*>& exchanges,
                                                   uint64_t sent_before, uint64_t received_before) {
  const int num_ranks = nccl_.size(), rank = nccl_.rank();
  stats_.bytes_sent += nccl_.bytes_sent() - sent_before;
  stats_.bytes_received += nccl_.bytes_received() - received_before;
  add_phase_seconds(/*counts_read=*/true);
  // Per peer, summed over the layer's exchanges: what a baseline all-to-all must move to compare.
  DeviceExchangeSizes sizes{std::vector<int64_t>(num_ranks), std::vector<int64_t>(num_ranks),
                            std::vector<int64_t>(num_ranks), std::vector<int64_t>(num_ranks)};
  for (const Exchange* exchange : exchanges) {
    stats_.dispatch_bytes_sent += off_rank_bytes(exchange->dispatch.send_bytes, rank);
    stats_.combine_bytes_sent += off_rank_bytes(exchange->combine.send_bytes, rank);
    for (int r = 0; r < num_ranks; ++r) {
      sizes.dispatch_send[r] += exchange->dispatch.send_bytes[r];
      sizes.dispatch_recv[r] += exchange->dispatch.recv_bytes[r];
      sizes.combine_send[r] += exchange->combine.send_bytes[r];
      sizes.combine_recv[r] += exchange->combine.recv_bytes[r];
    }
  }
  exchange_sizes_[layer] = std::move(sizes);
}

}  // namespace epic
