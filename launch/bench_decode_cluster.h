// bench-decode under mpirun: the expert-parallel side of a whole-model decode benchmark. Every rank holds
// the dense weights and the experts a balanced placement gives it, runs its own batch of sequences
// (attention is data parallel), and the MoE blocks run through the expert-parallel executor: NCCL on
// device buffers with --backend cuda (DeviceExpertParallelMoeExecutor, low-latency decode steps captured
// in graphs), else MPI through host memory (ExpertParallelMoeExecutor). Steps are agreed as epic run
// agrees them (StepAgreement), so every rank runs the same collectives.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>

#include "comm/communicator.h"
#include "kernels/backend.h"
#include "worker/expert_parallel_moe.h"
#include "worker/expert_routing_table.h"
#include "worker/model_config.h"
#include "worker/model_runner.h"
#include "worker/model_weights.h"
#include "worker/moe_executor.h"
#include "worker/offloading_moe_executor.h"

namespace epic::cli {

struct DecodeClusterOptions {
  bool overlap = false;               // NCCL: two-batch overlap of the normal-mode (prefill) steps
  double comm_timeout_seconds = 300;  // the NCCL communicator's bound (the host one's is the same)
  bool host_exchange = false;         // MPI through host memory even on cuda (it counts rows per expert)
};

class DecodeCluster {
 public:
  // Placement over comm.size() workers from the experts `source` holds (every rank the same plan);
  // allow_missing_experts as epic run's flag (absent experts are masked out of routing).
  DecodeCluster(Communicator& comm, const ModelConfig& config, WeightSource& source,
                bool allow_missing_experts = false);
  ~DecodeCluster();
  DecodeCluster(const DecodeCluster&) = delete;
  DecodeCluster& operator=(const DecodeCluster&) = delete;

  // For LoadOptions::hosts_expert: the experts this rank reads.
  bool hosts(int64_t layer, int64_t expert) const;
  // The placement's routing table (for another executor over the same workers, e.g. epic eval's budget
  // variants).
  const ExpertRoutingTable& table() const { return table_; }
  // After loading: the executor for the runner (a collective: the NCCL communicator starts here).
  MoeExecutor& start_executor(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
                              const DecodeClusterOptions& options);
  // The host exchange's executor when start_executor chose it (its per-expert row counts), else null.
  const ExpertParallelMoeExecutor* host_executor() const;
  // After start_executor: another executor of the chosen exchange whose experts are this rank's shard in
  // `store` (a budget of them resident; store outlives it): over NCCL a miss is read in place (on_miss must
  // be kRead), over the host exchange it waits or is read in place; substitute is refused (the router's
  // choice is made on the sending worker, the residency on the hosting one). stats: its store figures.
  struct StoreExecutor {
    std::unique_ptr<MoeExecutor> executor;
    std::function<OffloadStats()> stats;
  };
  StoreExecutor store_executor(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
                               ExpertStore& store, OnMiss on_miss);
  // "nccl" or "mpi": which exchange start_executor chose.
  const char* transport() const { return transport_; }
  // The agreement of the coming step (a collective): this rank's rows and whether it is decode-only.
  StepAgreement agree(ModelRunner& runner, int64_t rows, bool decode_only);

 private:
  struct Parts;
  Communicator& comm_;
  ExpertRoutingTable table_;
  std::unique_ptr<Parts> parts_;
  const char* transport_ = "none";
};

}  // namespace epic::cli
