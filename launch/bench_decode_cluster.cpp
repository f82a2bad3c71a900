// DecodeCluster (bench_decode_cluster.h): placement, the executor of the chosen exchange, step agreement.
#include "launch/bench_decode_cluster.h"

#include <algorithm>
#include <optional>
#include <vector>

#include "launch/placement_setup.h"
#include "worker/expert_parallel_moe.h"
#ifdef EPIC_HAVE_NCCL_EP
#include "comm/nccl/nccl_communicator.h"
#include "worker/device_expert_parallel_moe.h"
#endif

namespace epic::cli {

struct DecodeCluster::Parts {
  std::optional<ExpertParallelMoeExecutor> host_executor;
#ifdef EPIC_HAVE_NCCL_EP
  std::unique_ptr<NcclCommunicator> nccl;
  std::optional<DeviceExpertParallelMoeExecutor> device_executor;
#endif
};

namespace {

// A rank's part of the step agreement (trivially copyable: it travels as bytes).
struct StepShare {
  int64_t rows = 0;
  int64_t decode_only = 0;
  uint64_t graph_buckets = 0;
};

}  // namespace

DecodeCluster::DecodeCluster(Communicator& comm, const ModelConfig& config, WeightSource& source,
                             bool allow_missing_experts)
    : comm_(comm), parts_(std::make_unique<Parts>()) {
  const ExpertInventory inventory = inspect_experts(config, source, allow_missing_experts);
  table_ = routing_table_from_plan(
      make_placement(config, inventory, {comm.size(), std::nullopt, std::nullopt, ""}));
}

DecodeCluster::~DecodeCluster() = default;

bool DecodeCluster::hosts(int64_t layer, int64_t expert) const {
  return table_.hosts(comm_.rank(), layer, expert);
}

MoeExecutor& DecodeCluster::start_executor(const ModelConfig& config, const ModelWeights& weights,
                                           Backend& backend, const DecodeClusterOptions& options) {
#ifdef EPIC_HAVE_NCCL_EP
  if (backend.memory_space() == MemorySpace::kDevice && !options.host_exchange) {
    parts_->nccl = make_backend_nccl_communicator(comm_, CommOptions{options.comm_timeout_seconds}, backend);
    DeviceMoeOptions device_options;
    device_options.overlap = options.overlap;
    parts_->device_executor.emplace(config, weights, backend, *parts_->nccl, table_, device_options);
    transport_ = "nccl";
    return *parts_->device_executor;
  }
#endif
  EPIC_CHECK(!options.overlap, ErrorCode::kInvalidArgument,
             "--ep-overlap overlaps the NCCL exchange (--backend cuda, NCCL built); drop it here");
  parts_->host_executor.emplace(config, weights, backend, comm_, table_);
  transport_ = "mpi";
  return *parts_->host_executor;
}

const ExpertParallelMoeExecutor* DecodeCluster::host_executor() const {
  return parts_->host_executor ? &*parts_->host_executor : nullptr;
}

StepAgreement DecodeCluster::agree(ModelRunner& runner, int64_t rows, bool decode_only) {
  const std::vector<StepShare> all =
      comm_.all_gather_value(StepShare{rows, decode_only ? 1 : 0, runner.current_graph_buckets()});
  StepAgreement agreement{0, true, ~uint64_t{0}};
  for (const StepShare& share : all) {
    agreement.max_rows = std::max(agreement.max_rows, share.rows);
    agreement.every_rank_decode = agreement.every_rank_decode && share.decode_only != 0;
    agreement.common_graph_buckets &= share.graph_buckets;
  }
  return agreement;
}

}  // namespace epic::cli
