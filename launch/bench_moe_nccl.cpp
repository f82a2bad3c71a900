// bench-moe's NCCL executor and baselines (see bench_moe_nccl.h).
#include "launch/bench_moe_nccl.h"

#include <algorithm>
#include <memory>
#include <numeric>
#include <vector>

#include "comm/nccl/nccl_communicator.h"
#include "kernels/cuda/cuda_check.h"
#include "kernels/error.h"
#include "launch/bench_moe_figures.h"
#include "worker/device_expert_parallel_moe.h"

namespace epic::cli {
namespace {

// A pair of CUDA events around enqueued work on one stream.
class EventTimer {
 public:
  explicit EventTimer(cudaStream_t stream) : stream_(stream) {
    EPIC_CUDA_CHECK(cudaEventCreate(&start_));
    EPIC_CUDA_CHECK(cudaEventCreate(&stop_));
  }
  ~EventTimer() {
    cudaEventDestroy(start_);  // no throw from a destructor
    cudaEventDestroy(stop_);
  }
  EventTimer(const EventTimer&) = delete;
  EventTimer& operator=(const EventTimer&) = delete;
  void start() { EPIC_CUDA_CHECK(cudaEventRecord(start_, stream_)); }
  void stop() { EPIC_CUDA_CHECK(cudaEventRecord(stop_, stream_)); }
  // After the stream was synchronised (bounded, through the communicator): waits for nothing.
  double seconds() const {
    float milliseconds = 0;
    EPIC_CUDA_CHECK(cudaEventElapsedTime(&milliseconds, start_, stop_));
    return milliseconds * 1e-3;
  }

 private:
  cudaStream_t stream_;
  cudaEvent_t start_ = nullptr, stop_ = nullptr;
};

// Blocks packed in rank order from per-rank sizes.
std::vector<int64_t> packed_offsets(const std::vector<int64_t>& bytes) {
  std::vector<int64_t> offsets(bytes.size(), 0);
  int64_t at = 0;
  for (size_t r = 0; r < bytes.size(); ++r) {
    offsets[r] = at;
    at += bytes[r];
  }
  return offsets;
}

int64_t total(const std::vector<int64_t>& bytes) {
  return std::accumulate(bytes.begin(), bytes.end(), int64_t{0});
}

class NcclMoeBenchImpl final : public NcclMoeBench {
 public:
  NcclMoeBenchImpl(Communicator& host, const CommOptions& options, const ModelConfig& config,
                   const ModelWeights& weights, Backend& backend, const ExpertRoutingTable& table,
                   const DeviceMoeOptions& executor_options)
      : backend_(backend),
        nccl_(make_backend_nccl_communicator(host, options, backend)),
        executor_(config, weights, backend, *nccl_, table, executor_options) {}

  MoeExecutor& executor() override { return executor_; }
  void reset_stats() override { executor_.reset_stats(); }

  NcclRankFigures figures() const override {
    const DeviceMoeStats& s = executor_.stats();
    const double calls = s.calls > 0 ? static_cast<double>(s.calls) : 1.0;
    NcclRankFigures f;
    f.route_seconds = s.route_seconds / calls;
    f.dispatch_seconds = s.dispatch_seconds / calls;
    f.count_exchange_seconds = s.count_exchange_seconds / calls;
    f.rows_all_to_all_seconds = s.rows_all_to_all_seconds / calls;
    f.expert_seconds = s.expert_seconds / calls;
    f.combine_seconds = s.combine_seconds / calls;
    f.dispatch_bytes_off_rank = static_cast<double>(s.dispatch_bytes_sent) / calls;
    f.combine_bytes_off_rank = static_cast<double>(s.combine_bytes_sent) / calls;
    return f;
  }

  MoePhaseStats phase_stats() const override { return to_phase_stats(executor_.stats()); }

  void collect_graph_phase_times() override { executor_.collect_graph_phase_times(); }

  void measure_baselines(int64_t iterations, int64_t link_bytes, NcclRankFigures& figures,
                         bool in_graphs) override {
    in_graphs_ = in_graphs;
    EPIC_CHECK(iterations >= 1 && link_bytes > 0, ErrorCode::kInternal, "measure_baselines: bad arguments");
    const std::map<int64_t, DeviceExchangeSizes>& sizes = executor_.exchange_sizes();
    int64_t largest = link_bytes;
    for (const auto& [layer, layer_sizes] : sizes)
      largest = std::max({largest, total(layer_sizes.dispatch_send), total(layer_sizes.dispatch_recv),
                          total(layer_sizes.combine_send), total(layer_sizes.combine_recv)});
    const OwnedTensor send = backend_.new_tensor(ScalarType::kU8, {largest});
    const OwnedTensor recv = backend_.new_tensor(ScalarType::kU8, {largest});
    // (a) Each layer's two exchanges as NCCL's own all-to-all-v, averaged over layers like the executor.
    double dispatch_seconds = 0, combine_seconds = 0;
    for (const auto& [layer, layer_sizes] : sizes) {
      dispatch_seconds +=
          time_all_to_all(layer_sizes.dispatch_send, layer_sizes.dispatch_recv, send, recv, iterations);
      combine_seconds +=
          time_all_to_all(layer_sizes.combine_send, layer_sizes.combine_recv, send, recv, iterations);
    }
    const double layers = sizes.empty() ? 1.0 : static_cast<double>(sizes.size());
    figures.baseline_dispatch_seconds = dispatch_seconds / layers;
    figures.baseline_combine_seconds = combine_seconds / layers;
    // (b) The link: every pair of ranks, a round of disjoint pairs at a time (the others send nothing).
    double link_rate_sum = 0, floor_sum = 0;
    int pairs_joined = 0;
    const int num_ranks = nccl_->size(), rank = nccl_->rank();
    for (const std::vector<std::pair<int, int>>& round : link_pair_rounds(num_ranks)) {
      int partner = -1;
      for (const auto& [first, second] : round) {
        if (first == rank) partner = second;
        if (second == rank) partner = first;
      }
      std::vector<int64_t> large(num_ranks, 0), tiny(num_ranks, 0);
      if (partner >= 0) {
        large[partner] = link_bytes;
        tiny[partner] = 8;
      }
      const double large_seconds = time_all_to_all(large, large, send, recv, iterations);
      const double tiny_seconds = time_all_to_all(tiny, tiny, send, recv, std::max<int64_t>(iterations, 20));
      if (partner < 0) continue;
      link_rate_sum += gigabytes_per_second(static_cast<double>(link_bytes), large_seconds);
      floor_sum += tiny_seconds;
      ++pairs_joined;
    }
    figures.link_gigabytes_per_second = pairs_joined > 0 ? link_rate_sum / pairs_joined : 0;
    figures.link_floor_seconds = pairs_joined > 0 ? floor_sum / pairs_joined : 0;
  }

 private:
  // Seconds per call of all_to_all_v with these per-peer sizes, blocks packed in rank order, after one
  // untimed call (NCCL sets up its channels for a peer on first use).
  double time_all_to_all(const std::vector<int64_t>& send_bytes, const std::vector<int64_t>& recv_bytes,
                         const OwnedTensor& send, const OwnedTensor& recv, int64_t iterations) {
    AllToAllLayout layout;
    layout.send = send.view().data;
    layout.send_buffer_bytes = static_cast<int64_t>(send.view().bytes());
    layout.recv = recv.view().data;
    layout.recv_buffer_bytes = static_cast<int64_t>(recv.view().bytes());
    layout.send_bytes = send_bytes;
    layout.send_offsets = packed_offsets(send_bytes);
    layout.recv_bytes = recv_bytes;
    layout.recv_offsets = packed_offsets(recv_bytes);
    nccl_->all_to_all_v(layout);
    EventTimer timer(nccl_->stream());
    if (in_graphs_) {
      // The same calls captured once and replayed: what they cost without the host's launch per call.
      std::unique_ptr<Graph> graph = backend_.capture([&] {
        for (int64_t i = 0; i < iterations; ++i) nccl_->all_to_all_v(layout);
      });
      EPIC_CHECK(graph != nullptr, ErrorCode::kInternal,
                 "bench-moe baselines: the backend cannot capture graphs");
      graph->replay();  // uploads the graph: untimed
      timer.start();
      graph->replay();
      timer.stop();
    } else {
      timer.start();
      for (int64_t i = 0; i < iterations; ++i) nccl_->all_to_all_v(layout);
      timer.stop();
    }
    nccl_->synchronize();  // bounded
    return timer.seconds() / static_cast<double>(iterations);
  }

  bool in_graphs_ = false;

  Backend& backend_;
  std::unique_ptr<NcclCommunicator> nccl_;
  DeviceExpertParallelMoeExecutor executor_;
};

}  // namespace

std::unique_ptr<NcclMoeBench> make_nccl_moe_bench(Communicator& host, const CommOptions& options,
                                                  const ModelConfig& config, const ModelWeights& weights,
                                                  Backend& backend, const ExpertRoutingTable& table,
                                                  const NcclMoeBenchOptions& bench_options) {
  DeviceMoeOptions executor_options;
  executor_options.mode = bench_options.low_latency ? EpMode::kLowLatency : EpMode::kNormal;
  if (bench_options.low_latency) executor_options.low_latency_max_tokens = bench_options.low_latency_tokens;
  executor_options.overlap = bench_options.overlap;
  executor_options.time_low_latency_phases = true;
  return std::make_unique<NcclMoeBenchImpl>(host, options, config, weights, backend, table, executor_options);
}

}  // namespace epic::cli
