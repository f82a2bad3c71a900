// bench-moe's NCCL side: the NCCL expert-parallel executor (worker/device_expert_parallel_moe.h) with its
// per-phase device times, and the baselines measured in the same run on the same communicator:
//  (a) NCCL's own all-to-all-v (grouped ncclSend/ncclRecv, NcclCommunicator::all_to_all_v) of exactly the
//      per-peer byte counts of each layer's dispatch and of its combine, the executor's last call's;
//  (b) the link: one-to-one NCCL send/recv between rank pairs at a large size (GB/s per direction) and
//      at 8 bytes (the floor of one send/recv).
// Everything timed with CUDA events on the communicator's stream, read after a bounded synchronize.
// The implementation needs NCCL (EPIC_HAVE_NCCL_EP); this header does not, so callers compile without it.
#pragma once

#include <cstdint>
#include <memory>

#include "comm/communicator.h"
#include "kernels/backend.h"
#include "launch/bench_moe_report.h"
#include "worker/expert_parallel_moe.h"
#include "worker/expert_routing_table.h"
#include "worker/model_config.h"
#include "worker/model_weights.h"
#include "worker/moe_executor.h"

namespace epic::cli {

class NcclMoeBench {
 public:
  virtual ~NcclMoeBench() = default;
  virtual MoeExecutor& executor() = 0;
  virtual void reset_stats() = 0;  // after the warm-up
  // This rank's executor figures per layer call since reset_stats (baseline fields left 0).
  virtual NcclRankFigures figures() const = 0;
  // The same since reset_stats in the shape of the MPI executor's stats (sums; device time per phase;
  // rows_sent: token records sent, once per (token, destination rank); rows_computed: (token, slot) rows).
  virtual MoePhaseStats phase_stats() const = 0;
  // Fills the baseline fields of `figures` (a collective: every rank calls it, after the timed run, so
  // the executor's exchange sizes are the timed run's). iterations >= 1; link_bytes > 0.
  // in_graphs: each timed loop of calls is captured in a CUDA graph and replayed (no host launch cost per
  // call, as for the executor's graph-replayed low-latency mode).
  virtual void measure_baselines(int64_t iterations, int64_t link_bytes, NcclRankFigures& figures,
                                 bool in_graphs) = 0;
  // After a replay of a graph captured with the executor's low-latency calls: their phase times into the
  // stats (DeviceExpertParallelMoeExecutor::collect_graph_phase_times).
  virtual void collect_graph_phase_times() = 0;
};

// How the executor runs (bench-moe's --ep-mode and --ep-overlap).
struct NcclMoeBenchOptions {
  bool low_latency = false;        // every call in the low-latency mode, blocks of low_latency_tokens rows
  int64_t low_latency_tokens = 1;  // (phases timed with a host wait per call, or inside a replayed graph)
  bool overlap = false;            // two-batch overlap (normal mode)
};

// A collective over `host`: the NCCL communicator on the backend's device and stream, and the executor.
// Error(kInvalidArgument) when `backend` is not the CUDA backend.
std::unique_ptr<NcclMoeBench> make_nccl_moe_bench(Communicator& host, const CommOptions& options,
                                                  const ModelConfig& config, const ModelWeights& weights,
                                                  Backend& backend, const ExpertRoutingTable& table,
                                                  const NcclMoeBenchOptions& bench_options);

}  // namespace epic::cli
