// DeviceExpertParallelMoeExecutor's low-latency mode (device_expert_parallel_moe.h): per step, the mode
// from the agreed step size, and a forward pass whose two exchanges move fixed-size blocks (sizes from the
// host's step bound alone, counts in the block headers read on the device). Nothing here reads device
// memory on the host or waits on the stream, so the pass can be captured in a CUDA graph.
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ep_dispatch_kernels.h"
#include "kernels/cuda/ep_low_latency_kernels.h"
#include "kernels/error.h"
#include "worker/device_expert_parallel_moe.h"
#include "worker/moe_block.h"

namespace epic {
namespace {

// low_latency_buffers_'s slots. Each is requested at the capacity's size every call, so it is allocated
// once and never moves; a step of bound b uses the front of it.
enum LowLatencySlot : int {
  kLlOccurrenceOffsets,
  kLlOccurrenceSource,
  kLlOccurrencePosition,
  kLlDestination,
  kLlSendPosition,
  kLlCounts,  // int64 [2R] (as I32 [4R]): tokens, pairs to each rank
  kLlSendBlocks,
  kLlRecvBlocks,
  kLlRecvExpertIds,
  kLlRecvWeights,
  kLlGroupOffsets,
  kLlGroupSource,
  kLlGroupPosition,
  kLlSortedRows,
  kLlExpertOut,
  kLlPartial,
  kLlReturned,
};

// Every peer the same block size at a fixed stride: the layout of a fixed-size all-to-all.
AllToAllLayout fixed_blocks(const void* send, void* recv, int num_ranks, int64_t block_bytes,
                            int64_t buffer_bytes) {
  AllToAllLayout layout;
  layout.send = send;
  layout.recv = recv;
  layout.send_buffer_bytes = layout.recv_buffer_bytes = buffer_bytes;
  for (int r = 0; r < num_ranks; ++r) {
    layout.send_bytes.push_back(block_bytes);
    layout.send_offsets.push_back(r * block_bytes);
  }
  layout.recv_bytes = layout.send_bytes;
  layout.recv_offsets = layout.send_offsets;
  return layout;
}

}  // namespace

void DeviceExpertParallelMoeExecutor::begin_step(int64_t max_rows_on_any_rank) {
  step_tokens_ =
      low_latency_step_tokens(options_.mode, options_.low_latency_max_tokens, max_rows_on_any_rank);
  in_step_ = true;
}

void DeviceExpertParallelMoeExecutor::finish_step() {
  const int64_t block_tokens = step_tokens();
  in_step_ = false;
  step_tokens_ = 0;
  if (block_tokens == 0) {
    admit_step_misses();
    return;
  }
  nccl_.synchronize();
  // Counted per step, not per forward() call: a step replayed from a graph calls forward() not at all, and
  // the step that captures it calls it twice.
  for (const LayerWeights& layer : weights_.layers)
    if (layer.is_moe) count_low_latency_call(block_tokens);
  admit_step_misses();
}

void DeviceExpertParallelMoeExecutor::count_low_latency_call(int64_t block_tokens) {
  const uint64_t peers = static_cast<uint64_t>(nccl_.size() - 1);
  const auto dispatch =
      static_cast<uint64_t>(low_latency_block_bytes(block_tokens, low_latency_record_bytes_));
  const auto combine = static_cast<uint64_t>(block_tokens * config_.hidden_size) * sizeof(float);
  ++stats_.calls;
  ++stats_.low_latency_calls;
  stats_.dispatch_bytes_sent += peers * dispatch;
  stats_.combine_bytes_sent += peers * combine;
  stats_.bytes_sent += peers * (dispatch + combine);  // fixed-size blocks: every peer sends as much back
  stats_.bytes_received += peers * (dispatch + combine);
}

void DeviceExpertParallelMoeExecutor::forward_low_latency(int64_t layer, const Tensor& hidden,
                                                          const Tensor& router_input, const Tensor& out,
                                                          Workspace& workspace, int64_t block_tokens) {
  const MoeLayerWeights& moe = weights_.layers[layer].moe;
  const int64_t hidden_size = config_.hidden_size, top_k = routed_top_k(config_);
  const int64_t num_tokens = hidden.dim(0), num_slots = num_tokens * top_k, num_experts = moe.num_experts;
  const int num_ranks = nccl_.size(), rank = nccl_.rank();
  const ScalarType act = hidden.type;
  EPIC_CHECK(num_tokens <= block_tokens && block_tokens <= low_latency_capacity_, ErrorCode::kInternal,
             "rank " + std::to_string(rank) + ": low-latency MoE step with " + std::to_string(num_tokens) +
                 " rows in blocks of " + std::to_string(block_tokens) + " (capacity " +
                 std::to_string(low_latency_capacity_) + "): the ranks did not agree on the step size");
  const int64_t capacity = low_latency_capacity_;
  const int64_t row_bytes = hidden_size * static_cast<int64_t>(scalar_size(act));
  const int64_t record_bytes = ep_kernels::dispatch_record_bytes(hidden_size, act, top_k);
  const int64_t block_bytes = low_latency_block_bytes(block_tokens, record_bytes);
  const int64_t buffer_bytes = num_ranks * low_latency_block_bytes(capacity, record_bytes);
  // The upper bounds of a step: places for every peer's full block, every slot of each.
  const int64_t places = num_ranks * block_tokens, place_slots = places * top_k;
  const int64_t capacity_slots = num_ranks * capacity * top_k;
  const DeviceReplicas& replicas = replicas_for(layer, num_experts);  // cached after the first (eager) call
  low_latency_record_bytes_ = record_bytes;
  if (!in_step_) count_low_latency_call(block_tokens);  // within a step, finish_step counts
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  EPIC_CUDA_CHECK(cudaStreamIsCapturing(stream_, &capturing));
  const bool timed = options_.time_low_latency_phases && !in_step_;
  const bool captured = capturing != cudaStreamCaptureStatusNone;
  // Inside a capture the marks are the layer's own events (graph nodes, read after a replay).
  const std::vector<cudaEvent_t>* marks = &phase_events_;
  if (timed && captured) {
    CapturedMarks& layer_marks = captured_marks_[layer];
    if (layer_marks.events.empty()) {
      layer_marks.events.assign(kNumPhaseMarks, nullptr);
      for (cudaEvent_t& event : layer_marks.events) EPIC_CUDA_CHECK(cudaEventCreate(&event));
    }
    layer_marks.block_tokens = block_tokens;
    marks = &layer_marks.events;
  }
  const auto timed_mark = [&](PhaseMark at) {
    if (timed) mark(at, *marks);
  };
  timed_mark(kMarkStart);
  Workspace& buffers = low_latency_buffers_;

  // Layout, as the normal mode.
  const Tensor destination = buffers.get(kLlDestination, ScalarType::kI32, {capacity * top_k});
  RoutedTokens routed;
  if (num_tokens > 0) {
    routed = route_tokens(backend_, config_, moe, routable_mask(layer, moe), routed_top_k(config_),
                          router_input, workspace, step_row_top_k());
    const Tensor offsets = buffers.get(kLlOccurrenceOffsets, ScalarType::kI32, {num_experts + 1});
    const Tensor source =
        buffers.get(kLlOccurrenceSource, ScalarType::kI32, {capacity * top_k}).rows_view(0, num_slots);
    const Tensor position =
        buffers.get(kLlOccurrencePosition, ScalarType::kI32, {capacity * top_k}).rows_view(0, num_slots);
    backend_.group_by_expert(routed.expert_ids.reshaped({num_slots}), num_experts, top_k, offsets, source,
                             position);
    ep_kernels::slot_destinations(routed.expert_ids.as<int32_t>(), position.as<int32_t>(),
                                  offsets.as<int32_t>(), replicas.offsets.view().as<int32_t>(),
                                  replicas.workers.view().as<int32_t>(), num_slots, rank,
                                  destination.as<int32_t>(), stream_);
    count_routed(layer, routed.expert_ids, destination.rows_view(0, num_slots).reshaped({num_tokens, top_k}));
  }
  const Tensor send_position = buffers.get(kLlSendPosition, ScalarType::kI32, {num_ranks * capacity});
  const Tensor counts = buffers.get(kLlCounts, ScalarType::kI32, {4 * static_cast<int64_t>(num_ranks)});
  int64_t* send_counts = static_cast<int64_t*>(counts.data);
  int64_t* send_pairs = send_counts + num_ranks;
  ep_kernels::rank_layout(destination.as<int32_t>(), num_tokens, top_k, num_ranks,
                          send_position.as<int32_t>(), send_counts, send_pairs, stream_);
  timed_mark(kMarkRouted);

  // Dispatch: block r of the send buffer goes to rank r whatever its count.
  const Tensor send_blocks = buffers.get(kLlSendBlocks, ScalarType::kU8, {buffer_bytes});
  const Tensor recv_blocks = buffers.get(kLlRecvBlocks, ScalarType::kU8, {buffer_bytes});
  ep_kernels::pack_low_latency(hidden.data, act, num_tokens > 0 ? routed.expert_ids.as<int32_t>() : nullptr,
                               num_tokens > 0 ? routed.weights.as<float>() : nullptr,
                               destination.as<int32_t>(), send_position.as<int32_t>(), send_counts,
                               num_tokens, top_k, hidden_size, num_ranks, record_bytes, block_bytes,
                               send_blocks.data, stream_);
  timed_mark(kMarkPacked);
  nccl_.all_to_all_v(fixed_blocks(send_blocks.data, recv_blocks.data, num_ranks, block_bytes, buffer_bytes));
  timed_mark(kMarkDispatched);

  // Expert compute over every place of every received block: places past a header's count and slots served
  // elsewhere get the id num_experts, so the stable sort puts them after the real groups, whose end
  // (offsets[E], on the device) bounds the rows gathered and computed; the rest is never read.
  const int32_t unused_expert = static_cast<int32_t>(num_experts);
  const Tensor recv_ids =
      buffers.get(kLlRecvExpertIds, ScalarType::kI32, {capacity_slots}).rows_view(0, place_slots);
  const Tensor recv_weights =
      buffers.get(kLlRecvWeights, ScalarType::kF32, {capacity_slots}).rows_view(0, place_slots);
  ep_kernels::unpack_low_latency_metadata(recv_blocks.data, num_ranks, block_tokens, block_bytes, top_k,
                                          row_bytes, record_bytes, unused_expert, recv_ids.as<int32_t>(),
                                          recv_weights.as<float>(), stream_);
  const Tensor group_offsets = buffers.get(kLlGroupOffsets, ScalarType::kI32, {num_experts + 2});
  const Tensor group_source =
      buffers.get(kLlGroupSource, ScalarType::kI32, {capacity_slots}).rows_view(0, place_slots);
  const Tensor group_position =
      buffers.get(kLlGroupPosition, ScalarType::kI32, {capacity_slots}).rows_view(0, place_slots);
  backend_.group_by_expert(recv_ids, num_experts + 1, top_k, group_offsets, group_source, group_position);
  const Tensor sorted_rows =
      buffers.get(kLlSortedRows, act, {capacity_slots, hidden_size}).rows_view(0, place_slots);
  const Tensor expert_out =
      buffers.get(kLlExpertOut, act, {capacity_slots, hidden_size}).rows_view(0, place_slots);
  const int32_t* real_rows = group_offsets.as<int32_t>() + num_experts;  // offsets[E]
  ep_kernels::gather_low_latency_rows(recv_blocks.data, block_tokens, block_bytes, record_bytes, row_bytes,
                                      group_source.as<int32_t>(), real_rows, place_slots, sorted_rows.data,
                                      stream_);
  // offsets[0 .. E] of the E + 1 groups: rows past offsets[E] belong to no computed expert, so expert_ffn's
  // device-scheduled kernels leave them alone (Backend::expert_ffn computes [offsets[e], offsets[e + 1])).
  run_received_experts(layer, sorted_rows, group_offsets.rows_view(0, num_experts + 1), expert_out,
                       {recv_ids, recv_weights, group_position}, workspace);
  const Tensor partial = buffers.get(kLlPartial, ScalarType::kF32, {num_ranks * capacity, hidden_size});
  ep_kernels::partial_sums(expert_out.data, act, recv_ids.as<int32_t>(), unused_expert,
                           group_position.as<int32_t>(), recv_weights.as<float>(), places, top_k, hidden_size,
                           partial.as<float>(), stream_);
  timed_mark(kMarkComputed);

  // Combine: each rank's block of partial rows back, fixed-size, then the rank-ordered sum into out.
  const int64_t partial_block_bytes = block_tokens * hidden_size * static_cast<int64_t>(sizeof(float));
  // What a baseline all-to-all must move to compare: the fixed-size blocks, to every rank.
  exchange_sizes_[layer] = {std::vector<int64_t>(num_ranks, block_bytes),
                            std::vector<int64_t>(num_ranks, block_bytes),
                            std::vector<int64_t>(num_ranks, partial_block_bytes),
                            std::vector<int64_t>(num_ranks, partial_block_bytes)};
  const Tensor returned = buffers.get(kLlReturned, ScalarType::kF32, {num_ranks * capacity, hidden_size});
  nccl_.all_to_all_v(fixed_blocks(partial.data, returned.data, num_ranks, partial_block_bytes,
                                  static_cast<int64_t>(returned.bytes())));
  ep_kernels::combine_low_latency(returned.as<float>(), send_position.as<int32_t>(), block_tokens, num_tokens,
                                  num_ranks, hidden_size, out.data, out.type, stream_);
  if (!timed) return;
  timed_mark(kMarkCombined);
  if (captured) return;  // collect_graph_phase_times reads them after a replay
  nccl_.synchronize();   // bounded; the marks are complete after it
  // The layout is the routing's tail here (no count exchange): route = routing + layout.
  add_phase_seconds(/*counts_read=*/false);
}

}  // namespace epic
