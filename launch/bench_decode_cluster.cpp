// DecodeCluster (bench_decode_cluster.h): placement, the executor of the chosen exchange, step agreement.
#include "launch/bench_decode_cluster.h"

#include <algorithm>
#include <optional>
#include <vector>

#include "launch/expert_budget.h"
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
  DeviceMoeOptions device_options;
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
    parts_->device_options.overlap = options.overlap;
    parts_->device_executor.emplace(config, weights, backend, *parts_->nccl, table_, parts_->device_options);
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

DecodeCluster::StoreExecutor DecodeCluster::store_executor(const ModelConfig& config,
                                                           const ModelWeights& weights, Backend& backend,
                                                           ExpertStore& store, OnMiss on_miss) {
  StoreExecutor made;
#ifdef EPIC_HAVE_NCCL_EP
  if (parts_->device_executor) {
    EPIC_CHECK(
        on_miss == OnMiss::kRead, ErrorCode::kInvalidArgument,
        "--expert-budget with the NCCL exchange needs --on-miss read (a missing expert is read in place "
        "from host memory inside the step)");
    auto device = std::make_unique<DeviceExpertParallelMoeExecutor>(config, weights, backend, *parts_->nccl,
                                                                    table_, parts_->device_options);
    device->set_expert_store(&store);
    const DeviceExpertParallelMoeExecutor* view = device.get();
    made.stats = [view, &store] { return exchange_store_stats(view->store_demand(), store); };
    made.executor = std::move(device);
    return made;
  }
#endif
  auto host = std::make_unique<ExpertParallelMoeExecutor>(config, weights, backend, comm_, table_);
  host->set_expert_store(&store, on_miss);
  const ExpertParallelMoeExecutor* view = host.get();
  made.stats = [view, &store] { return exchange_store_stats(view->store_demand(), store); };
  made.executor = std::move(host);
  return made;
}

StepAgreement DecodeCluster::agree(ModelRunner& runner, int64_t rows, bool decode_only) {
  const std::vector<StepShare> all =
      comm_.all_gather_value(StepShare{rows, decode_only ? 1 : 0, runner.current_graph_buckets()});
  StepAgreement agreement{0, true, ~uint64_t{0}, {}};
  for (const StepShare& share : all) {
    agreement.max_rows = std::max(agreement.max_rows, share.rows);
    agreement.every_rank_decode = agreement.every_rank_decode && share.decode_only != 0;
    agreement.common_graph_buckets &= share.graph_buckets;
  }
  return agreement;
}

}  // namespace epic::cli
