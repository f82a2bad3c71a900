// One MoE layer across workers: route locally -> map each (token, slot) to the worker holding
// its expert (replicas split deterministically) -> exchange counts -> all-to-all-v of token rows
// -> grouped expert FFN on the received rows -> all-to-all-v back -> combine in fixed top-k order.
// The result for a token does not depend on the number of workers or the placement: each row's
// FFN is computed alone and combined in slot order.
// Two dispatch schemes (EpDispatch): flat sends every (token, slot) row straight to its expert's worker;
// hierarchical (expert_parallel_hierarchical.cpp) sends a token across once per destination node, to a
// gateway rank there that fans it out inside the node, and the combine sums inside the node first.
// The exchange goes through host memory (MPI): with a device backend the routing and the rows are
// copied to the host and back around each all-to-all (NCCL on device memory is issue 8), so this
// executor is not capturable in a graph.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/node_topology.h"
#include "kernels/backend.h"
#include "worker/expert_routing_table.h"
#include "worker/moe_block.h"
#include "worker/moe_executor.h"
#include "worker/offloading_moe_executor.h"
#include "worker/resident_expert_ffn.h"
#include "worker/step_demand.h"
#include "worker/workspace.h"

namespace epic {

// Per-phase wall time (seconds) and traffic of this worker, summed over calls.
struct MoePhaseStats {
  double route_seconds = 0;
  double dispatch_seconds = 0;         // count exchange + all-to-all-v of rows
  double expert_seconds = 0;           // grouped expert FFN
  double combine_seconds = 0;          // all-to-all-v back + weighted sum
  uint64_t bytes_sent = 0;             // to other workers
  uint64_t inter_node_bytes_sent = 0;  // the part of bytes_sent (rows and their metadata) to other nodes
  uint64_t bytes_received = 0;         // from other workers
  int64_t rows_sent = 0;               // (token, slot) rows sent to experts (self included)
  int64_t rows_computed = 0;           // rows this worker's experts computed
  int64_t calls = 0;
};

enum class EpDispatch {
  kFlat,          // each (token, slot) row to its expert's worker; output independent of the placement
  kHierarchical,  // each token once per destination node, fanned out there; node-first combine
};
// "flat" / "hierarchical"; Error(kInvalidArgument) naming the flag for anything else.
EpDispatch parse_ep_dispatch(const std::string& text);
const char* ep_dispatch_name(EpDispatch dispatch);

struct HostExchangeOptions {
  EpDispatch dispatch = EpDispatch::kFlat;
  // The job's nodes (hierarchical dispatch needs them; flat uses the routing table's node_of_worker
  // only to count inter-node bytes). Default: one node.
  NodeTopology topology;
};

class ExpertParallelMoeExecutor final : public MoeExecutor {
 public:
  ExpertParallelMoeExecutor(const ModelConfig& config, const ModelWeights& weights, Backend& backend,
                            Communicator& comm, const ExpertRoutingTable& table,
                            HostExchangeOptions options = {});
  void forward(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
               Workspace& workspace) override;
  bool capturable() const override { return false; }

  const MoePhaseStats& stats() const { return stats_; }
  // Rows each hosted (layer, expert) of this worker computed: its load, for the next plan.
  const std::map<int64_t, std::vector<int64_t>>& expert_rows() const { return expert_rows_; }
  ExpertLoad read_expert_load() override { return ExpertLoad{expert_rows_, {}}; }
  // Compute the received rows with this worker's experts from a store (a budget of them resident, the
  // rest in a lower tier; worker/expert_store.h) instead of the weights' own experts, which are then
  // absent. Each received row counts as a use of its expert with its routing weight (sent with the row).
  // Before the first step; the store outlives the executor. The miss path (every rank the same):
  //   kWait: the missing experts are copied in before the rows are computed;
  //   kRead (a host-tier store): the received rows are computed through the store's address table
  //     (Backend::expert_ffn_addressed: a missing expert read from host memory in place, no wait), and
  //     finish_step admits the step's misses behind it;
  //   kSubstitute (flat dispatch; expert_parallel_substitute.cpp): begin_step gathers every worker's
  //     resident experts, and the sender routes a token's pick of an expert that is not resident on every
  //     worker hosting it to the most probable routable expert that is, as the one-process executor does
  //     with its own store; a miss with nothing to take its place waits.
  void set_expert_store(ExpertStore* store, OnMiss on_miss = OnMiss::kWait);
  // kSubstitute: every rank's resident experts, gathered (a collective: every rank calls it each step).
  void begin_step(int64_t max_rows_on_any_rank) override;
  // kRead: after the step, its misses admitted with copies beside the next step.
  void finish_step() override;
  // With a store: received rows whose expert was resident (hits) or not (misses); with read_in_place the
  // (layer, expert) pairs of a step computed from host memory; with kSubstitute this worker's tokens' picks
  // routed to a resident expert instead.
  const StoreDemandCounts& store_demand() const { return demand_.counts(); }

 private:
  void forward_flat(int64_t layer, const Tensor& hidden, const Tensor& router_input, const Tensor& out,
                    Workspace& workspace);
  // expert_parallel_hierarchical.cpp
  void forward_hierarchical(int64_t layer, const Tensor& hidden, const Tensor& router_input,
                            const Tensor& out, Workspace& workspace);
  void count_expert_rows(int64_t layer, const std::vector<int32_t>& experts);
  // kSubstitute: rewrites the misses among the routing's own picks (host ids and weights, then the routed
  // tensors), from the router logits in the workspace.
  void substitute_misses(int64_t layer, const RoutedTokens& routed, std::vector<int32_t>& expert_ids,
                         Workspace& workspace);

  const ModelConfig& config_;
  const ModelWeights& weights_;
  Backend& backend_;
  Communicator& comm_;
  const ExpertRoutingTable& table_;
  HostExchangeOptions options_;
  Workspace scratch_;  // the hierarchical scheme's own buffers (its slot numbers)
  MoePhaseStats stats_;
  std::map<int64_t, std::vector<int64_t>> expert_rows_;
  std::unique_ptr<ResidentExpertFfn> resident_ffn_;  // with an expert store (it counts the store's steps)
  bool read_in_place_ = false;
  StepDemand demand_;
  bool substitute_ = false;
  // kSubstitute, per MoE layer and expert: resident on every worker hosting it at the step's start.
  std::map<int64_t, std::vector<uint8_t>> resident_everywhere_;
  // y[i] = the FFN of experts[i] over rows[i] (moe_block.h), from the store when there is one; with a
  // store, weights_host[i] is row i's routing weight (the sender's), its use in the store's policies.
  void compute_rows(int64_t layer, const std::vector<int32_t>& experts_host,
                    const std::vector<float>& weights_host, const Tensor& rows, const Tensor& experts,
                    const Tensor& sorted, const Tensor& computed, const Tensor& y, Workspace& workspace);
  bool hosts(int64_t layer, int64_t expert) const;  // by the weights, or by the store
};

}  // namespace epic
