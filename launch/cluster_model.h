// One rank's side of a worker job, from flags to a model ready to step: the model source and backend, the
// job's nodes, then (once the coordinator's plan is known) the dense weights and this rank's experts, the
// MoE executor that carries tokens between the ranks (host exchange, NCCL, or an expert store's), and the
// runner. `epic run` (one-shot) and `epic worker` (driven by `epic serve` over TCP) build their ranks with it.
#pragma once

#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

#include "comm/communicator.h"
#include "comm/node_topology.h"
#include "coordinator/placement.h"
#include "launch/backend_choice.h"
#include "launch/cli_commands.h"
#include "launch/model_source.h"
#include "launch/run_wire.h"
#include "worker/expert_parallel_moe.h"
#include "worker/expert_routing_table.h"
#include "worker/expert_store.h"
#include "worker/model_runner.h"
#include "worker/model_weights.h"
#include "worker/offloading_moe_executor.h"

namespace epic::cli {

// Members in construction order (they are destroyed in reverse: the runner before the executors before
// the weights). Neither copied nor moved: the executors and the runner hold references into it.
struct ClusterModel {
  struct NcclParts;  // the NCCL communicator and executor, in builds that have them (cluster_model.cpp)

  OpenedModel model;
  ChosenBackend chosen;
  NodeTopology topology;
  PlacementPlan placement;
  std::optional<ExpertRoutingTable> table;
  ModelWeights weights;
  std::optional<ExpertStore> store;  // with --expert-budget: the experts, a budget of them resident
  HostExchangeOptions exchange;
  std::optional<ExpertParallelMoeExecutor> executor;
  std::unique_ptr<NcclParts> nccl;
  std::optional<OffloadingMoeExecutor> offloading;
  MoeExecutor* moe_executor = nullptr;  // the one the runner uses (none: the runner's local MoE)
  std::optional<ModelRunner> runner;
  double load_seconds = 0;

  ClusterModel();
  ~ClusterModel();
  ClusterModel(const ClusterModel&) = delete;
  ClusterModel& operator=(const ClusterModel&) = delete;

  // An error raised on one rank alone must end the job before unwinding (end_job_naming_rank): with the
  // NCCL executor on several ranks, the destructors wait on the device where NCCL kernels may wait for a
  // peer that is gone (tests/gpu/ep_fault_check.sh).
  bool ends_job_on_rank_error(const Communicator& comm) const;
  // The MoE exchange's figures (the NCCL executor's device time per phase where it ran the layers).
  MoePhaseStats phase_stats() const;
  // With a store: its report (launch/expert_budget.h), from whichever executor fed it.
  nlohmann::json store_report(const ExpertStoreFlags& flags) const;
};

// The model, backend, exchange and store flags every rank can check alike before MPI starts (no file
// touched): Error(kInvalidArgument) naming the flag.
void check_cluster_flags(const RunArgs& args);

// Every rank, agreed (run_on_all_ranks): the model source and backend, then the job's nodes.
void open_cluster_model(const RunArgs& args, Communicator& comm, ClusterModel& cluster);

// The coordinator (rank 0): the expert placement over the job's ranks from the placement flags (--slots,
// --budget-bytes, --load-profile, --expert-budget) and the nodes.
PlacementPlan plan_job_placement(const RunArgs& args, const ClusterModel& cluster);

// Every rank, agreed, after the plan reached every rank: reads the dense weights and only this rank's
// experts (or opens its expert store), builds the MoE executor and a runner for up to
// args.max_active_sequences live sequences of at most max_context positions each.
void load_cluster_model(const RunArgs& args, Communicator& comm, const wire::RunPlan& plan, int64_t max_context,
                        ClusterModel& cluster);

}  // namespace epic::cli
