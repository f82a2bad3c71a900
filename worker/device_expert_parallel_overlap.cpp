// DeviceExpertParallelMoeExecutor's two-batch overlap (device_expert_parallel_moe.h): the normal mode's
// exchange run for two micro-batches (the first and second half of the call's tokens), the NCCL calls on a
// communication stream of their own, so transfers of one micro-batch run while the other computes:
//
//   stream_ (compute)   route, layouts | pack 0, pack 1 |  expert 0  |  expert 1  | sum 0, sum 1
//   comm_stream_        counts (both)  |                | dispatch 1 |  combine 0 | combine 1
//                                       dispatch 0 ...
//
// Every rank splits its own tokens (an empty half is a zero-size exchange), so every rank issues the same
// NCCL calls in the same order: counts 0, counts 1, dispatch 0, dispatch 1, combine 0, combine 1.
#include <string>
#include <vector>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/ep_dispatch_kernels.h"
#include "kernels/error.h"
#include "worker/device_expert_parallel_moe.h"

namespace epic {
namespace {

// order_events_: each marks a point of one stream that the other waits for.
enum OrderEvent : int {
  kLaidOut,       // compute: both layouts written (the counts exchange reads them)
  kCountsCopied,  // comm: both exchanges' counts on the host
  kPacked0,
  kPacked1,
  kDispatched0,
  kDispatched1,
  kComputed0,
  kComputed1,
  kCombined0,
  kCombined1,
  kNumOrderEvents,
};
static_assert(kNumOrderEvents == kNumOverlapOrderEvents,
              "the executor creates kNumOverlapOrderEvents events");

}  // namespace

void DeviceExpertParallelMoeExecutor::forward_overlapped(int64_t layer, const Tensor& hidden,
                                                         const Tensor& router_input, const Tensor& out,
                                                         Workspace& workspace) {
  EPIC_CHECK(comm_stream_ != nullptr && order_events_.size() == static_cast<size_t>(kNumOrderEvents),
             ErrorCode::kInternal,
             "two-batch overlap without its communication stream (DeviceMoeOptions::overlap is set at "
             "construction)");
  const ScalarType act = hidden.type;
  const int64_t record_bytes =
      ep_kernels::dispatch_record_bytes(config_.hidden_size, act, routed_top_k(config_));
  const uint64_t sent_before = nccl_.bytes_sent(), received_before = nccl_.bytes_received();
  const auto signal = [&](OrderEvent event, cudaStream_t on) {
    EPIC_CUDA_CHECK(cudaEventRecord(order_events_[event], on));
  };
  const auto await = [&](cudaStream_t on, OrderEvent event) {
    EPIC_CUDA_CHECK(cudaStreamWaitEvent(on, order_events_[event], 0));
  };
  ++stats_.calls;
  ++stats_.overlapped_calls;
  mark(kMarkStart);
  RoutedTokens routed;
  const Tensor destination = route_and_place(layer, router_input, workspace, routed);
  mark(kMarkRouted);
  const int64_t num_tokens = hidden.dim(0), half = (num_tokens + 1) / 2;
  Exchange first = begin_exchange(0, 0, half, destination);
  Exchange second = begin_exchange(1, half, num_tokens - half, destination);
  signal(kLaidOut, stream_);

  // Both exchanges' counts in one host read; stream_ joins the comm stream so synchronize() covers it.
  await(comm_stream_, kLaidOut);
  send_counts(first, comm_stream_);
  send_counts(second, comm_stream_);
  signal(kCountsCopied, comm_stream_);
  await(stream_, kCountsCopied);
  mark(kMarkCountsRead);
  nccl_.synchronize();  // bounded: a stuck peer or an NCCL error throws here
  read_counts(first, record_bytes);
  read_counts(second, record_bytes);

  pack(first, hidden, routed, destination, record_bytes);
  signal(kPacked0, stream_);
  pack(second, hidden, routed, destination, record_bytes);
  signal(kPacked1, stream_);
  mark(kMarkPacked);
  await(comm_stream_, kPacked0);
  dispatch(first, comm_stream_);
  signal(kDispatched0, comm_stream_);
  await(comm_stream_, kPacked1);
  dispatch(second, comm_stream_);
  signal(kDispatched1, comm_stream_);

  await(stream_, kDispatched0);
  mark(kMarkDispatched);
  compute(first, layer, act, record_bytes, workspace);  // while micro-batch 1 travels
  signal(kComputed0, stream_);
  await(comm_stream_, kComputed0);
  send_back(first, comm_stream_);
  signal(kCombined0, comm_stream_);

  await(stream_, kDispatched1);
  compute(second, layer, act, record_bytes, workspace);  // while micro-batch 0's partial sums travel back
  signal(kComputed1, stream_);
  mark(kMarkComputed);
  await(comm_stream_, kComputed1);
  send_back(second, comm_stream_);
  signal(kCombined1, comm_stream_);

  await(stream_, kCombined0);
  combine(first, out);
  await(stream_, kCombined1);
  combine(second, out);
  mark(kMarkCombined);
  nccl_.synchronize();  // stream_ waited for every comm-stream step, so this covers them all, bounded
  record_layer(layer, {&first, &second}, sent_before, received_before);
}

}  // namespace epic
