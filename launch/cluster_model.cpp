// A worker-job rank's model from flags and the coordinator's plan (cluster_model.h). Moved out of
// `epic run` so that `epic worker` builds its ranks the same way.
#include "launch/cluster_model.h"

#include <algorithm>
#include <chrono>
#include <string>

#include "kernels/error.h"
#include "launch/cpu_threads.h"
#include "launch/ep_transport.h"
#include "launch/expert_budget.h"
#include "launch/flag_checks.h"
#include "launch/placement_setup.h"
#include "launch/rank_agreement.h"
#include "worker/ep_mode.h"
#include "worker/routing_policy.h"
#ifdef EPIC_HAVE_NCCL_EP
#include "worker/device_expert_parallel_moe.h"
#endif

namespace epic::cli {

#ifdef EPIC_HAVE_NCCL_EP
struct ClusterModel::NcclParts {
  std::unique_ptr<NcclCommunicator> communicator;
  std::optional<DeviceExpertParallelMoeExecutor> executor;
};
#else
struct ClusterModel::NcclParts {};
#endif

ClusterModel::ClusterModel() = default;
ClusterModel::~ClusterModel() = default;  // NcclParts is complete here

bool ClusterModel::ends_job_on_rank_error(const Communicator& comm) const {
  return executor && moe_executor != &*executor && comm.size() > 1;
}

MoePhaseStats ClusterModel::phase_stats() const {
#ifdef EPIC_HAVE_NCCL_EP
  if (nccl && nccl->executor) return to_phase_stats(nccl->executor->stats());
#endif
  return executor ? executor->stats() : MoePhaseStats{};
}

nlohmann::json ClusterModel::store_report(const ExpertStoreFlags& flags) const {
  EPIC_CHECK(store.has_value(), ErrorCode::kInternal, "store_report without an expert store");
  OffloadStats stats = offloading ? offloading->stats() : exchange_store_stats(executor->store_demand(), *store);
#ifdef EPIC_HAVE_NCCL_EP
  if (nccl && nccl->executor) stats = exchange_store_stats(nccl->executor->store_demand(), *store);
#endif
  return expert_store_report(*store, stats, flags);
}

void check_cluster_flags(const RunArgs& args) {
  check_comm_timeout("--comm-timeout", args.comm_timeout_seconds);
  check_model_source_flags({args.model_dir, args.random_weights, args.layers, args.weights_seed});
  check_backend_flags({args.backend, args.device, args.precision});
  check_ep_transport_flag(args.ep_transport, args.backend);
  parse_residency_states(args.residency_state);  // a clear error before MPI starts
  check_expert_store_flags(args.expert_store);
  check_int_flag("--prefill-chunk", args.prefill_chunk_tokens, 0, int64_t{1} << 30);
  check_int_flag("--kv-cache-tokens", args.kv_cache_tokens, 0, int64_t{1} << 40);
}

void open_cluster_model(const RunArgs& args, Communicator& comm, ClusterModel& cluster) {
  // Every rank reads config.json and the checkpoint index (small; shard headers are read on first
  // use and kept), or the preset.
  run_on_all_ranks(comm, [&] {
    cluster.model = open_model({args.model_dir, args.random_weights, args.layers, args.weights_seed});
    cluster.chosen = choose_backend({args.backend, args.device, args.precision}, launcher_local_rank(),
                                    default_cpu_threads());
  });
  // The nodes of the job (host names, or --ranks-per-node): placement spreads replicas over them and
  // the host exchange prefers a replica on the sender's node; hierarchical dispatch needs them.
  run_on_all_ranks(comm, [&] {
    check_int_flag("--ranks-per-node", args.ranks_per_node, 0, kMaxWorkers);
    cluster.topology = node_topology_for_job(comm, args.ranks_per_node);
  });
}

PlacementPlan plan_job_placement(const RunArgs& args, const ClusterModel& cluster) {
  const ModelConfig& config = cluster.model.config;
  const ExpertInventory inventory = inspect_experts(config, *cluster.model.source, args.allow_missing_experts);
  // --budget-bytes counts experts as the workers will keep them (bf16 when the checkpoint stores
  // bf16 or the run computes in bf16, else f32).
  const ScalarType weight_type = required_weight_type(cluster.chosen.activation_type)
                                     .value_or(stored_weight_type(config, *cluster.model.source));
  PlacementFlags flags{cluster.topology.world_size(), args.slots, args.budget_bytes, args.load_profile, weight_type};
  flags.worker_node = cluster.topology.node_of_rank();  // make_placement ignores a single node
  flags.expert_budget = args.expert_store.budget;       // checked already; "" without a budget
  return make_placement(config, inventory, flags);
}

void load_cluster_model(const RunArgs& args, Communicator& comm, const wire::RunPlan& plan, int64_t max_context,
                        ClusterModel& cluster) {
  const ModelConfig& config = cluster.model.config;
  cluster.placement = PlacementPlan::from_cereal_bytes(plan.placement);
  if (cluster.topology.num_nodes() > 1) {  // not carried in the plan's bytes: every rank knows the topology
    cluster.placement.worker_node = cluster.topology.node_of_rank();
    cluster.placement.experts_per_token = config.num_experts_per_tok;
  }
  cluster.table = routing_table_from_plan(cluster.placement);
  const ExpertRoutingTable& table = *cluster.table;
  Backend& backend = *cluster.chosen.backend;
  const std::optional<ScalarType> weight_type = required_weight_type(cluster.chosen.activation_type);

  // Each worker reads the dense weights and only the experts the plan gives it.
  const auto load_start = std::chrono::steady_clock::now();
  run_on_all_ranks(comm, [&] {
    LoadOptions options;
    options.allow_missing_experts = plan.allow_missing_experts;
    options.allow_nonfinite_weights = args.allow_nonfinite_weights;  // every rank parses the same flags
    const int rank = comm.rank();
    options.hosts_expert = [&](int64_t layer, int64_t expert) { return table.hosts(rank, layer, expert); };
    // With --expert-budget the experts live in the store, a budget of them in backend memory.
    if (args.expert_store.enabled()) options.hosts_expert = [](int64_t, int64_t) { return false; };
    options.weight_type = weight_type;
    cluster.weights = load_model_weights(config, *cluster.model.source, backend, options);
    // In the same phase (no collective of its own: the job's collectives keep their numbers).
    if (!args.expert_store.enabled()) return;
    // Under mpirun each worker's store holds its shard of the experts; the budget counts those.
    ExpertInventory hosted = inspect_experts(config, *cluster.model.source, plan.allow_missing_experts);
    for (auto& [layer, experts] : hosted)
      for (int64_t e = 0; e < experts.num_experts; ++e)
        experts.present[e] = experts.present[e] && table.hosts(rank, layer, e) ? 1 : 0;
    cluster.store.emplace(
        config, *cluster.model.source, backend,
        expert_store_options(
            args.expert_store, hosted, weight_type, plan.allow_missing_experts, args.allow_nonfinite_weights,
            [&table, rank](int64_t layer, int64_t expert) { return table.hosts(rank, layer, expert); }));
  });
  cluster.load_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - load_start).count();

  cluster.exchange = HostExchangeOptions{parse_ep_dispatch(args.ep_dispatch), cluster.topology};
  cluster.executor.emplace(config, cluster.weights, backend, comm, table, cluster.exchange);
  cluster.moe_executor = &*cluster.executor;
  const bool on_device = backend.memory_space() == MemorySpace::kDevice;
  if (args.ep_transport == "nccl" && !on_device)
    throw Error(ErrorCode::kInvalidArgument, "--ep-transport nccl needs --backend cuda (device buffers)");
#ifdef EPIC_HAVE_NCCL_EP
  // The NCCL communicator takes the backend's device and stream (make_backend_nccl_communicator), so it
  // is on the GPU the backend chose (node-local rank, or --device) by construction.
  // auto: not with a budget whose misses wait or substitute (the NCCL exchange reads them in place only).
  const bool budget_without_read =
      args.expert_store.enabled() && parse_on_miss(args.expert_store.on_miss) != OnMiss::kRead;
  const bool use_nccl =
      on_device && (args.ep_transport == "nccl" || (args.ep_transport == "auto" && comm.size() > 1 &&
                                                    args.load_profile_out.empty() && !budget_without_read));
  check_ep_mode_flags(parse_ep_mode(args.ep_mode), args.ep_low_latency_max_tokens, use_nccl);
  check_ep_overlap_flag(args.ep_overlap, parse_ep_mode(args.ep_mode), use_nccl);
  if (use_nccl && cluster.exchange.dispatch != EpDispatch::kFlat)
    throw Error(
        ErrorCode::kInvalidArgument,
        "--ep-dispatch hierarchical is a scheme of the host exchange; add --ep-transport host (the NCCL "
        "exchange sends each token once per destination rank)");
  if (use_nccl)
    run_on_all_ranks(comm, [&] {
      cluster.nccl = std::make_unique<ClusterModel::NcclParts>();
      cluster.nccl->communicator =
          make_backend_nccl_communicator(comm, CommOptions{args.comm_timeout_seconds}, backend);
      cluster.nccl->executor.emplace(
          config, cluster.weights, backend, *cluster.nccl->communicator, table,
          DeviceMoeOptions{parse_ep_mode(args.ep_mode), args.ep_low_latency_max_tokens, args.ep_overlap});
      cluster.moe_executor = &*cluster.nccl->executor;
    });
#else
  check_ep_mode_flags(parse_ep_mode(args.ep_mode), args.ep_low_latency_max_tokens, false);
  check_ep_overlap_flag(args.ep_overlap, parse_ep_mode(args.ep_mode), false);
  if (args.ep_transport == "nccl")
    throw Error(
        ErrorCode::kInvalidArgument,
        "--ep-transport nccl: this build has no NCCL communicator (configure with the CUDA backend and "
        "NCCL found, EPIC_ENABLE_NCCL=ON), use --ep-transport host");
#endif
  const std::vector<ResidencyState> residency = parse_residency_states(args.residency_state);
  RunnerOptions runner_options;
  runner_options.activation_type = cluster.chosen.activation_type;
  runner_options.max_sequences = args.max_active_sequences;
  runner_options.max_context = std::max<int64_t>(max_context, 1);
  runner_options.use_graphs = args.cuda_graphs;
  runner_options.kv_cache_tokens = args.kv_cache_tokens;
  // One GPU worker computes its MoE blocks locally: device ops only, so decode steps can be captured
  // as graphs. Otherwise (several workers, the cpu reference, or a load profile to record, which
  // needs the per-expert row counts) the expert-parallel executor runs them.
  const bool local_moe =
      comm.size() == 1 && backend.memory_space() == MemorySpace::kDevice && args.load_profile_out.empty();
  ExpertStore* store = cluster.store ? &*cluster.store : nullptr;
  if (store && comm.size() == 1) {
    cluster.offloading.emplace(config, cluster.weights, backend, *store, parse_on_miss(args.expert_store.on_miss),
                               parse_prefetch(args.expert_store.prefetch));
    cluster.moe_executor = &*cluster.offloading;
  } else if (store) {
#ifdef EPIC_HAVE_NCCL_EP
    // The NCCL exchange reads a missing expert in place (set_expert_store refuses other miss paths alike on
    // every rank).
    if (cluster.nccl && cluster.nccl->executor)
      run_on_all_ranks(comm, [&] {
        if (parse_on_miss(args.expert_store.on_miss) != OnMiss::kRead)
          throw Error(
              ErrorCode::kInvalidArgument,
              "--expert-budget with the NCCL exchange needs --on-miss read (a missing expert is read in "
              "place from host memory inside the step); for --on-miss " +
                  args.expert_store.on_miss + " use --ep-transport host");
        cluster.nccl->executor->set_expert_store(store);
      });
#endif
    if (cluster.moe_executor == &*cluster.executor)  // refusals (substitute with hierarchical) alike everywhere
      run_on_all_ranks(
          comm, [&] { cluster.executor->set_expert_store(store, parse_on_miss(args.expert_store.on_miss)); });
  }
  run_on_all_ranks(comm, [&] {
    cluster.runner.emplace(config, cluster.weights, backend, runner_options,
                           local_moe && !store ? nullptr : cluster.moe_executor);
    // WAKE routes fewer experts per token (worker/routing_policy.h); FOCUS is the model as trained.
    // A list gives each sequence its own state instead (the plan's Sequence::top_k).
    if (residency.size() == 1 && residency[0] == ResidencyState::kWake)
      cluster.runner->set_routing(RoutingPolicy::make(config, cluster.weights, backend,
                                                      experts_per_token(residency[0], config), {}));
  });
}

}  // namespace epic::cli
