// One MoE layer across GPUs over NCCL, on device buffers ("normal mode", DeepEP style): route on the
// device -> layout (each token once per rank serving any of its slots, with those slots' expert ids and
// weights) -> count exchange on the device, one host read of the counts per layer -> all-to-all-v of
// token records (row + metadata) -> group the received (token, slot) pairs by expert -> grouped expert
// FFN -> per received token the weighted sum of its slots served here -> all-to-all-v of those fp32
// partial rows back -> the origin adds the partials in rank order.
// Summation order: out[t] = sum over ranks r ascending of (sum over t's slots j served on r, ascending,
// of w_j * y_j), in fp32 with each product and sum rounded alone. LocalMoeExecutor sums all k slots in
// slot order instead, so the two agree bitwise only where all of a token's slots sit on one rank (and
// the expert FFN took the same kernel path); otherwise up to fp32 sum order (a few ulp of the row).
// Low-latency mode (EpMode, worker/ep_mode.h; device_expert_parallel_low_latency.cpp): for a step within
// the bound every exchange moves fixed-size blocks whose sizes the host knows from the agreed step size,
// counts travel in the blocks' headers and are read on the device: no host read or synchronisation inside
// forward(), so the step is capturable (capturable() is true between begin_step and finish_step of such a
// step). Same summation order as the normal mode.
// Two-batch overlap (DeviceMoeOptions::overlap, normal mode): the call's tokens split into two
// micro-batches whose exchanges run on a communication stream of their own, so micro-batch 1's dispatch
// travels while micro-batch 0's experts compute, and micro-batch 0's combine while micro-batch 1's
// compute (device_expert_parallel_overlap.cpp). Each token's sum is the same as without overlap (its
// slots and ranks are the same), so the results are bitwise equal; only the expert FFN's grouping differs
// where its kernel is not row-independent.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <vector>

#include "comm/communicator.h"
#include "comm/nccl/nccl_communicator.h"
#include "kernels/backend.h"
#include "worker/ep_mode.h"
#include "worker/expert_parallel_moe.h"
#include "worker/expert_routing_table.h"
#include "worker/expert_store.h"
#include "worker/moe_block.h"
#include "worker/moe_executor.h"
#include "worker/step_demand.h"
#include "worker/workspace.h"

namespace epic {

struct DeviceMoeStats {
  int64_t calls = 0;
  // Of calls: in the low-latency mode. Its token and pair counts stay on the device (not counted below);
  // its bytes are the fixed-size blocks' (the padding included) and it has no phase times.
  int64_t low_latency_calls = 0;
  int64_t tokens_sent = 0;     // token records sent (self included): once per (token, destination rank)
  int64_t pairs_computed = 0;  // (token, slot) rows this rank's experts computed
  uint64_t bytes_sent = 0;     // to other ranks, both directions of the exchange
  uint64_t bytes_received = 0;
  // Device time per phase (CUDA events on the executor's stream, read after each layer's final
  // synchronize), summed over calls. dispatch = layout + count exchange + host read of the counts + rows
  // all-to-all; count_exchange_seconds and rows_all_to_all_seconds are parts of it. combine = all-to-all
  // back + the rank-ordered sum. With overlap on, the phases as the compute stream sees them: dispatch
  // until micro-batch 0 has arrived (the exposed part), expert = both micro-batches' compute with the
  // transfers hidden under it, combine = the exposed tail after the last compute.
  int64_t overlapped_calls = 0;  // of calls: with two-batch overlap
  double route_seconds = 0;
  double dispatch_seconds = 0;
  double count_exchange_seconds = 0;  // rank layout + count exchange + the counts' copy to the host
  double rows_all_to_all_seconds = 0;
  double expert_seconds = 0;  // unpack, grouping, grouped expert FFN, partial sums
  double combine_seconds = 0;
  uint64_t dispatch_bytes_sent = 0;  // token records to other ranks (the rows all-to-all alone)
  uint64_t combine_bytes_sent = 0;   // partial rows back to other ranks
};

// The host executor's figures (MoePhaseStats) from the device executor's, so reports and benchmarks fill
// one table from either. rows_sent counts token records (once per token and destination rank).
MoePhaseStats to_phase_stats(const DeviceMoeStats& stats);

// The per-peer block sizes (bytes, indexed by rank, own rank included) of one layer's two exchanges:
// what a baseline all-to-all must move to be comparable.
struct DeviceExchangeSizes {
  std::vector<int64_t> dispatch_send, dispatch_recv, combine_send, combine_recv;
};

// The NCCL communicator for `backend` (the CUDA backend): on the backend's device and stream, so
// collectives are ordered with its ops. A collective over `host`.
std::unique_ptr<NcclCommunicator> make_backend_nccl_communicator(Communicator& host,
                                                                 const CommOptions& options,
                                                                 Backend& backend);

// The overlap's ordering events per layer (device_expert_parallel_overlap.cpp).
inline constexpr int kNumOverlapOrderEvents = 10;

struct DeviceMoeOptions {
  EpMode mode = EpMode::kAuto;
  int64_t low_latency_max_tokens = kDefaultLowLatencyMaxTokens;  // rows per rank a low-latency step holds
  bool overlap = false;  // two-batch overlap in the normal mode (every rank must pass the same value)
  // Low-latency calls outside a step (benchmarks) record their phase times: eagerly, at the cost of a
  // bounded host wait at the end of each call; inside a capture, as event nodes of the graph (one set per
  // layer), read after a replay by collect_graph_phase_times (steady state: no host wait between layers).
  bool time_low_latency_phases = false;
};

class DeviceExpertParallelMoeExecutor final : public MoeExecutor {
 public:
  // `nccl` must run on the backend's stream (make_backend_nccl_communicator); the table is for nccl.size()
  // workers. Throws Error(kInternal) otherwise.
  DeviceExpertParallelMoeExecutor(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
                                  NcclCommunicator& nccl, const ExpertRoutingTable& table,
                                  const DeviceMoeOptions& options = {});
  ~DeviceExpertParallelMoeExecutor() override;
  DeviceExpertParallelMoeExecutor(const DeviceExpertParallelMoeExecutor&) = delete;
  DeviceExpertParallelMoeExecutor& operator=(const DeviceExpertParallelMoeExecutor&) = delete;
  void forward(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
               Workspace& workspace) override;
  // Without begin_step (callers that do not agree on step sizes): kLowLatency runs every call in the
  // low-latency mode at the full bound, kAuto and kNormal in the normal mode.
  bool capturable() const override { return step_tokens() > 0; }
  void begin_step(int64_t max_rows_on_any_rank) override;
  // Waits (bounded, NcclCommunicator::synchronize) for the step's exchanges after a low-latency step, so a
  // stuck peer is an error here rather than an unbounded wait in the caller's read of results.
  void finish_step() override;

  // After a replay of a graph that captured low-latency calls with time_low_latency_phases: waits (bounded)
  // for the stream, then adds each captured layer's phase times, call and bytes to the stats (the marks
  // hold the latest replay's times).
  void collect_graph_phase_times();

  const DeviceMoeStats& stats() const { return stats_; }
  void reset_stats() { stats_ = {}; }  // e.g. after a benchmark's warm-up

  // With an expert store (--expert-budget with --on-miss read under mpirun;
  // device_expert_parallel_store.cpp): this worker's shard of the experts lives in `store`, a budget of them
  // resident, the rest in pinned host memory. Each layer's received groups are computed through the store's
  // address table (Backend::expert_ffn_addressed: a missing expert is read over PCIe in place, no host wait,
  // so steps stay capturable); each layer writes its received picks per expert and their routing weights'
  // sum into a log on the device (ep_kernels::expert_use_sums), and finish_step reads the log once, records
  // every expert's uses with their weights (the usefulness score the host exchange gives too) and admits
  // the step's misses, the heaviest first, behind the next step (ExpertStore::admit_in_background). The store
  // must read in place (a host tier: Error(kInvalidArgument) otherwise) and outlive the executor. Before the
  // first step.
  void set_expert_store(ExpertStore* store);
  // Received picks whose expert was resident / read from host memory; (layer, expert) pairs of a step read
  // from host memory.
  const StoreDemandCounts& store_demand() const { return demand_.counts(); }
  // The last call's exchange sizes of each layer called so far.
  const std::map<int64_t, DeviceExchangeSizes>& exchange_sizes() const { return exchange_sizes_; }

 private:
  int load_destination_ranks() const override { return nccl_.size(); }
  // The received slots as unpacked: expert ids (E for a slot served elsewhere), routing weights, and where
  // group_by_expert put each slot; [slots] each.
  struct ReceivedSlots {
    const Tensor& expert_ids;
    const Tensor& weights;
    const Tensor& sorted_position;
  };
  // The received rows grouped by `offsets` (I32 [E + 1]) through the layer's expert FFN: the weights, or the
  // store's address table; with a store, the slots' uses and weights per expert go to the layer's log row.
  void run_received_experts(int64_t layer, const Tensor& rows, const Tensor& offsets, const Tensor& out,
                            const ReceivedSlots& slots, Workspace& workspace);
  // With a store: the layer received nothing this step (its log row is zeroed).
  void log_no_rows(int64_t layer);
  // With a store, after the step: the log's uses and misses into the store (finish_step).
  void admit_step_misses();

  struct DeviceReplicas {
    OwnedTensor offsets;  // I32 [E + 1]
    OwnedTensor workers;  // I32 [max(1, replicas)]
  };
  const DeviceReplicas& replicas_for(int64_t layer, int64_t num_experts);

  // Where a normal-mode layer's phases begin and end on stream_ (DeviceMoeStats).
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
  void mark(PhaseMark at, const std::vector<cudaEvent_t>& events);
  void mark(PhaseMark at) { mark(at, phase_events_); }
  // Marks already complete (after a synchronize) into the stats (counts_read: the normal mode's count phase).
  void add_phase_seconds(bool counts_read, const std::vector<cudaEvent_t>& events);
  void add_phase_seconds(bool counts_read) { add_phase_seconds(counts_read, phase_events_); }
  // Routing, the stable grouping and each slot's destination rank (I32 [slots], in buffers_).
  Tensor route_and_place(int64_t layer, const Tensor& router_input, Workspace& workspace,
                         RoutedTokens& routed);

  // One normal-mode exchange: the tokens [first_token, first_token + num_tokens) of the call, with their
  // own buffers (slots from slot_base in buffers_) and counts (host_counts_ from host_index * 4R). The
  // normal mode runs one over the whole call; the overlap runs two. Filled phase by phase below.
  struct Exchange {
    int64_t first_token = 0;
    int64_t num_tokens = 0;
    int slot_base = 0;
    int host_index = 0;
    Tensor send_position;              // I32 [R * num_tokens]
    int64_t* device_counts = nullptr;  // send tokens, send pairs, recv tokens, recv pairs [4R]
    const int64_t* host = nullptr;     // the same, on the host after read_counts
    int64_t total_sent = 0, total_received = 0, total_pairs = 0;
    Tensor send_records, recv_records, partial, returned;
    AllToAllLayout dispatch, combine;
  };
  // Phases of an exchange: work enqueued on `stream` (the backend's, or the overlap's communication
  // stream for the NCCL calls); read_counts reads the host copy (after a synchronize), nothing else does.
  Exchange begin_exchange(int index, int64_t first_token, int64_t num_tokens, const Tensor& destination);
  void send_counts(Exchange& exchange, cudaStream_t stream);
  void read_counts(Exchange& exchange, int64_t record_bytes);
  void pack(const Exchange& exchange, const Tensor& hidden, const RoutedTokens& routed,
            const Tensor& destination, int64_t record_bytes);
  void dispatch(const Exchange& exchange, cudaStream_t stream);
  void compute(Exchange& exchange, int64_t layer, ScalarType act, int64_t record_bytes, Workspace& workspace);
  void send_back(const Exchange& exchange, cudaStream_t stream);
  void combine(const Exchange& exchange, const Tensor& out);
  // The normal mode's two-batch overlap (device_expert_parallel_overlap.cpp).
  void forward_overlapped(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
                          Workspace& workspace);
  // After a layer's final synchronize: its phase times, bytes and exchange sizes into the stats.
  void record_layer(int64_t layer, const std::vector<const Exchange*>& exchanges, uint64_t sent_before,
                    uint64_t received_before);
  // The block bound of this call's low-latency exchange, 0 for the normal mode.
  int64_t step_tokens() const { return in_step_ ? step_tokens_ : unagreed_step_tokens_; }
  void forward_low_latency(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
                           Workspace& workspace, int64_t block_tokens);
  // One low-latency layer at block bound block_tokens into the stats (calls and bytes).
  void count_low_latency_call(int64_t block_tokens);

  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
  NcclCommunicator& nccl_;
  const ExpertRoutingTable& table_;
  cudaStream_t stream_;
  Workspace buffers_;                    // persistent, grown on demand (slots below)
  std::unique_ptr<Buffer> host_counts_;  // pinned: send tokens, send pairs, recv tokens, recv pairs [4R]
  std::map<int64_t, DeviceReplicas> replicas_;
  DeviceMoeStats stats_;
  // Phase marks of one layer (PhaseMark in the .cpp), recorded on stream_.
  std::vector<cudaEvent_t> phase_events_;
  // Low-latency layers captured with their marks: per layer its events (graph nodes) and block bound.
  struct CapturedMarks {
    std::vector<cudaEvent_t> events;
    int64_t block_tokens = 0;
  };
  std::map<int64_t, CapturedMarks> captured_marks_;
  std::map<int64_t, DeviceExchangeSizes> exchange_sizes_;
  DeviceMoeOptions options_;
  int64_t low_latency_capacity_ = 0;      // the blocks' allocated bound (low_latency_capacity)
  int64_t low_latency_record_bytes_ = 0;  // the record size of the last low-latency call (its activations')
  int64_t unagreed_step_tokens_ = 0;      // step_tokens() outside begin_step / finish_step
  bool in_step_ = false;
  int64_t step_tokens_ = 0;
  // Allocated once at low_latency_capacity_ (never moved: captured graphs hold their addresses).
  Workspace low_latency_buffers_;
  // The overlap's communication stream and the events that order it with stream_ (created with it; their
  // meaning: OrderEvent in device_expert_parallel_overlap.cpp).
  cudaStream_t comm_stream_ = nullptr;
  std::vector<cudaEvent_t> order_events_;
  // set_expert_store: the store, each MoE layer's row of the logs ([MoE layers, stride]: the layer's picks
  // per expert, I32, and their weights' sums, F32), the step count the store's policies see, and the counts
  // reported.
  ExpertStore* store_ = nullptr;
  std::map<int64_t, int64_t> store_log_row_;
  int64_t store_log_stride_ = 0;
  OwnedTensor store_uses_log_, store_weight_log_;
  int64_t store_step_ = 0;
  StepDemand demand_;
};

}  // namespace epic
