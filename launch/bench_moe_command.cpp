// `epic bench-moe`: MoE layers of a preset's shapes on every rank of the job, with random weights
// made in memory (no checkpoint) and random token rows, timed per phase (route, dispatch, expert
// compute, combine) with bytes moved and per-worker load. A scaling-study tool: run it under
// mpirun with 1, 2, 4, ... ranks and collect the CSV/JSON lines. It checks its own output by default
// (bench_moe_check.h): a "wrong" column per worker, and exit 1 naming the worker on a mismatch.
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <sstream>

#include "comm/communicator.h"
#include "comm/node_topology.h"
#include "coordinator/placement_traffic.h"
#include "kernels/backend.h"
#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/backend_choice.h"
#include "launch/bench_moe_check.h"
#include "launch/bench_moe_nccl.h"
#include "launch/bench_moe_report.h"
#include "launch/cli_commands.h"
#include "launch/cpu_threads.h"
#include "launch/default_paths.h"
#include "launch/ep_transport.h"
#include "launch/flag_checks.h"
#include "launch/placement_setup.h"
#include "launch/rank_agreement.h"
#include "worker/expert_ffn_checker.h"
#include "worker/expert_parallel_moe.h"
#include "worker/model_weights.h"
#include "worker/model_writer.h"
#include "worker/moe_block.h"
#include "worker/random_values.h"
#include "worker/weight_source.h"

namespace epic::cli {
namespace {

#ifdef EPIC_HAVE_NCCL_EP
constexpr bool kNcclBuilt = true;
#else
constexpr bool kNcclBuilt = false;
#endif
// The link measurement's message: large enough that NCCL reaches its peak bandwidth (past ~100 MB on
// NVLink), small enough to sit beside 16384 tokens' buffers.
constexpr int64_t kLinkBytes = int64_t{256} << 20;
// --ep-mode low-latency: the most tokens per worker (fixed-size blocks are meant for decode steps).
constexpr int64_t kMaxLowLatencyBenchTokens = 4096;

struct PhaseTotals {
  double route = 0, dispatch = 0, expert = 0, combine = 0, total = 0;
  uint64_t bytes_sent = 0, bytes_received = 0;
  int64_t rows_computed = 0, rows_sent = 0, experts_hosted = 0;
};

// --csv appends (one file collects a scaling study), so it cannot be written atomically; it is
// still only ever a regular file (checked again on the open descriptor: a FIFO swapped in is never
// waited on), and every write and the close are checked, so a full disk is an error.
void append_to_regular_file(const std::string& path, const std::string& text, const std::string& what) {
  files::check_output_path(path, what);
  const int fd = ::open(path.c_str(), O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC | O_NONBLOCK, 0666);
  auto fail = [&](const std::string& operation, int error_number) {
    throw Error(ErrorCode::kIo, what + " " + path + ": cannot " + operation + " (" +
                                    std::strerror(error_number) +
                                    "); check the folder is writable and has space");
  };
  if (fd < 0) fail("open for appending", errno);
  struct stat info {};
  if (::fstat(fd, &info) != 0 || !S_ISREG(info.st_mode)) {
    ::close(fd);
    throw Error(ErrorCode::kInvalidArgument, what + " " + path + " is " + files::describe_file_type(path) +
                                                 ", not a regular file; give a file path");
  }
  for (size_t done = 0; done < text.size();) {
    const ssize_t written = ::write(fd, text.data() + done, text.size() - done);
    if (written < 0 && errno == EINTR) continue;
    if (written <= 0) {
      const int saved = written < 0 ? errno : EIO;
      ::close(fd);
      fail("append", saved);
    }
    done += static_cast<size_t>(written);
  }
  if (::fsync(fd) != 0 && errno != EINVAL) {
    const int saved = errno;
    ::close(fd);
    fail("sync", saved);
  }
  if (::close(fd) != 0) fail("close", errno);
}

// Rank 0's output files, checked before any work; every rank learns the outcome, so a bad path
// ends the job at once with one message instead of leaving the other ranks waiting.
void check_outputs_on_root(const BenchMoeArgs& args, Communicator& comm) {
  try {
    broadcast_from_root(comm, 0, [&] {
      if (!args.csv_out.empty()) check_output_flag(args.csv_out, "--csv");
      if (!args.json_out.empty()) check_output_flag(args.json_out, "--json");
      return std::string();
    });
  } catch (const AgreedError& error) {
    if (comm.rank() == 0) print_error(error);
    try {
      comm.barrier();  // mpirun ends the job at the first non-zero exit: let rank 0's line out first
    } catch (const Error&) {
    }
    throw SilentFailure{exit_code_for(error.code())};
  }
}

}  // namespace

int bench_moe_command(const BenchMoeArgs& args) {
  using clock_type = std::chrono::steady_clock;
  // Every bound before any work, the same on every rank (see flag_checks.h).
  check_comm_timeout("--comm-timeout", args.comm_timeout_seconds);
  check_int_flag("--tokens-per-worker", args.tokens_per_worker, 0, kMaxBenchTokensPerWorker);
  check_int_flag("--iterations", args.iterations, 1, kMaxBenchIterations);
  check_int_flag("--warmup", args.warmup, 0, kMaxBenchIterations);
  check_int_flag("--threads", args.threads, 0, kMaxThreads);
  check_ep_transport_flag(args.ep_transport, args.backend);
  EPIC_CHECK(args.ep_mode == "normal" || args.ep_mode == "low-latency", ErrorCode::kInvalidArgument,
             "--ep-mode must be normal or low-latency, got '" + args.ep_mode + "'");
  EPIC_CHECK(args.ep_mode == "normal" || args.tokens_per_worker <= kMaxLowLatencyBenchTokens,
             ErrorCode::kInvalidArgument,
             "--ep-mode low-latency holds at most " + std::to_string(kMaxLowLatencyBenchTokens) +
                 " tokens per worker (its fixed-size blocks are for decode steps), got --tokens-per-worker " +
                 std::to_string(args.tokens_per_worker) + "; use --ep-mode normal");
  EPIC_CHECK(!args.ep_overlap || args.ep_mode == "normal", ErrorCode::kInvalidArgument,
             "--ep-overlap overlaps the normal mode's exchanges; drop it with --ep-mode low-latency");
  ModelPreset preset = load_preset(args.preset, presets_dir());
  // More layers than the preset has would only repeat its shapes, each costing all its experts.
  check_int_flag("--layers (of preset " + preset.name + ")", args.layers, 1, preset.config.num_hidden_layers);
  std::unique_ptr<Communicator> comm = make_communicator(CommOptions{args.comm_timeout_seconds});
  const int rank = comm->rank(), num_workers = comm->size();
  if (args.inject_wrong_row_rank != -1)
    check_int_flag("--inject-wrong-row (a rank of the job)", args.inject_wrong_row_rank, 0, num_workers - 1);
  check_outputs_on_root(args, *comm);
  ModelConfig config = preset.config;
  // A model of `layers` MoE layers with the preset's shapes.
  config.num_hidden_layers = args.layers;
  config.mlp_only_layers.clear();
  config.decoder_sparse_step = 1;
  const int64_t hidden = config.hidden_size, inter = config.moe_intermediate_size;

  ExpertInventory inventory;
  for (int64_t layer = 0; layer < args.layers; ++layer)
    inventory[layer] = {config.num_experts, std::vector<uint8_t>(config.num_experts, 1)};
  // The nodes (host names, or --ranks-per-node): the plan spreads replicas over them, and the host
  // exchange routes to a replica on the sender's node where there is one.
  check_int_flag("--ranks-per-node", args.ranks_per_node, 0, kMaxWorkers);
  const NodeTopology topology = node_topology_for_job(*comm, args.ranks_per_node);
  const HostExchangeOptions exchange{parse_ep_dispatch(args.ep_dispatch), topology};
  PlacementFlags placement_flags{num_workers, args.slots, std::nullopt, ""};
  placement_flags.worker_node = topology.node_of_rank();  // make_placement ignores a single node
  const PlacementPlan plan = make_placement(config, inventory, placement_flags);
  const ExpertRoutingTable table = routing_table_from_plan(plan);

  // Every rank draws the same router and only the experts it hosts, with the values make-model
  // would write for this preset and seed, straight into its backend's memory.
  PhaseTotals totals;
  const BackendFlags backend_flags{args.backend, args.device, args.precision};
  const int threads = args.threads > 0 ? args.threads : default_cpu_threads();
  ChosenBackend chosen = choose_backend(backend_flags, launcher_local_rank(), threads);
  Backend& backend = *chosen.backend;
  const ScalarType act = chosen.activation_type;
  // One GPU worker times the device path (local executor: no host round trips); several the NCCL
  // executor (device time per phase) or the MPI executor (host clocks per phase).
  const EpTransport transport = choose_ep_transport(
      args.ep_transport, backend.memory_space() == MemorySpace::kDevice, num_workers, kNcclBuilt);
  const bool local = transport == EpTransport::kLocal;
  const bool use_nccl = transport == EpTransport::kNccl;
  EPIC_CHECK(!use_nccl || exchange.dispatch == EpDispatch::kFlat, ErrorCode::kInvalidArgument,
             "--ep-dispatch hierarchical is a scheme of the host exchange; add --ep-transport host (the NCCL "
             "exchange sends each token once per destination rank)");
  EPIC_CHECK(use_nccl || (args.ep_mode == "normal" && !args.ep_overlap), ErrorCode::kInvalidArgument,
             "--ep-mode low-latency and --ep-overlap are modes of the NCCL exchange (several GPU workers, "
             "--ep-transport nccl or auto); this run uses the " +
                 std::string(ep_transport_name(transport)) + " one");
  // Graphs: one GPU worker, or the NCCL low-latency mode (capturable, as in decode steps), whose phases are
  // then timed inside the replayed graph: steady state, no host wait or launch between layers.
  const bool graph_low_latency = args.cuda_graphs && use_nccl && args.ep_mode == "low-latency";
  if (args.cuda_graphs && !local && !graph_low_latency) {
    throw Error(ErrorCode::kInvalidArgument,
                "--cuda-graphs times one worker on a GPU (--backend cuda without mpirun) or the NCCL "
                "low-latency mode "
                "(--ep-mode low-latency); drop --cuda-graphs for this run");
  }
  std::unique_ptr<WeightSource> source =
      make_random_source(config, preset.storage, args.seed, "bench-moe weights of preset " + preset.name);
  LoadOptions load_options;
  load_options.hosts_expert = [&](int64_t layer, int64_t expert) { return table.hosts(rank, layer, expert); };
  load_options.weight_type = required_weight_type(act);
  const ModelWeights weights = load_moe_layers(config, *source, backend, load_options);
  totals.experts_hosted = weights.experts_hosted();
  // Unit-variance token rows, different on every rank, in the activation type.
  const std::vector<float> token_values =
      random_tensor_values("bench-moe.tokens.rank" + std::to_string(rank), {args.tokens_per_worker, hidden},
                           RandomInit::kEmbedding, args.seed);
  const OwnedTensor tokens = backend.new_tensor(act, {args.tokens_per_worker, hidden});
  // The router reads fp32 rows (MoeExecutor::forward): the same values before rounding.
  const OwnedTensor router_tokens = backend.new_tensor(ScalarType::kF32, {args.tokens_per_worker, hidden});
  backend.copy_from_host(router_tokens, 0, token_values.data(), token_values.size() * sizeof(float));
  if (act == ScalarType::kBF16) {
    std::vector<uint16_t> bits(token_values.size());
    for (size_t i = 0; i < bits.size(); ++i) bits[i] = f32_to_bf16(token_values[i]);
    backend.copy_from_host(tokens, 0, bits.data(), bits.size() * sizeof(uint16_t));
  } else {
    backend.copy_from_host(tokens, 0, token_values.data(), token_values.size() * sizeof(float));
  }
  backend.synchronize();
  const OwnedTensor out = backend.new_tensor(act, {args.tokens_per_worker, hidden});
  Workspace workspace(backend);
  LocalMoeExecutor local_executor(config, weights, backend);
  std::unique_ptr<NcclMoeBench> nccl_bench;
#ifdef EPIC_HAVE_NCCL_EP
  if (use_nccl)
    nccl_bench = make_nccl_moe_bench(
        *comm, CommOptions{args.comm_timeout_seconds}, config, weights, backend, table,
        NcclMoeBenchOptions{args.ep_mode == "low-latency", std::max<int64_t>(args.tokens_per_worker, 1),
                            args.ep_overlap});
#endif
  for (int64_t i = 0; i < args.warmup; ++i) {
    ExpertParallelMoeExecutor warm(config, weights, backend, *comm, table, exchange);
    MoeExecutor& executor = local      ? static_cast<MoeExecutor&>(local_executor)
                            : use_nccl ? nccl_bench->executor()
                                       : static_cast<MoeExecutor&>(warm);
    for (int64_t layer = 0; layer < args.layers; ++layer)
      executor.forward(layer, tokens, router_tokens, out, workspace);
  }
  backend.synchronize();
  if (use_nccl) nccl_bench->reset_stats();  // its buffers stay grown: the timed run allocates nothing
  ExpertParallelMoeExecutor executor(config, weights, backend, *comm, table, exchange);
  MoeExecutor& timed = local      ? static_cast<MoeExecutor&>(local_executor)
                       : use_nccl ? nccl_bench->executor()
                                  : static_cast<MoeExecutor&>(executor);
  const auto one_iteration = [&] {
    for (int64_t layer = 0; layer < args.layers; ++layer)
      timed.forward(layer, tokens, router_tokens, out, workspace);
  };
  std::unique_ptr<Graph> graph;
  if (args.cuda_graphs) {
    graph = backend.capture(one_iteration);
    if (graph == nullptr)
      throw Error(ErrorCode::kUnsupported,
                  "--cuda-graphs: backend " + backend.name() + " cannot capture graphs");
    graph->replay();  // the first replay uploads the graph: untimed
    backend.synchronize();
  }
  comm->barrier();
  const auto start = clock_type::now();
  for (int64_t i = 0; i < args.iterations; ++i) {
    if (graph != nullptr) {
      graph->replay();
    } else {
      one_iteration();
    }
  }
  backend.synchronize();
  totals.total = std::chrono::duration<double>(clock_type::now() - start).count();
  MoePhaseStats stats = executor.stats();
  if (local) {  // one worker on the device: the whole block is "expert" time, no traffic
    stats.calls = args.iterations * args.layers;
    stats.expert_seconds = totals.total;
    stats.rows_computed = stats.rows_sent = stats.calls * args.tokens_per_worker * config.num_experts_per_tok;
  }
  NcclRankFigures nccl_figures;
  if (use_nccl) {  // the table's columns from the NCCL executor (device time per phase)
    if (graph_low_latency) {
      // The phase marks are graph nodes: sample them from replays that follow another replay with no host
      // wait between, so every layer (the first included) runs as in a stream of decode steps.
      nccl_bench->reset_stats();
      for (int64_t i = 0; i < args.iterations; ++i) {
        graph->replay();
        graph->replay();
        nccl_bench->collect_graph_phase_times();
      }
    }
    nccl_figures = nccl_bench->figures();
    stats = nccl_bench->phase_stats();
  }
  // After timing, so the check costs the figures nothing; every rank joins (the executors' collectives).
  MoeCheckResult check;
  if (args.check) {
    check = check_moe_layers(MoeCheckInputs{config, weights, backend, *comm, table, local, tokens,
                                            router_tokens, workspace, args.layers, args.inject_wrong_row_rank,
                                            use_nccl ? &nccl_bench->executor() : nullptr, exchange});
  }
  // The baselines after the check too: its forwards left each layer's exchange sizes the timed run's
  // (same tokens, same routing).
  if (use_nccl && args.baseline)
    nccl_bench->measure_baselines(args.iterations, kLinkBytes, nccl_figures, /*in_graphs=*/graph_low_latency);
  std::vector<NcclRankFigures> nccl_ranks;
  if (use_nccl) {
    const std::vector<double> columns = nccl_figures.to_columns();
    for (const std::vector<double>& rank_columns :
         comm->all_gather_v<double>(std::span<const double>(columns)))
      nccl_ranks.push_back(NcclRankFigures::from_columns(rank_columns));
  }
  const double calls = static_cast<double>(stats.calls);
  const std::vector<double> mine = {stats.route_seconds / calls * 1e3,
                                    stats.dispatch_seconds / calls * 1e3,
                                    stats.expert_seconds / calls * 1e3,
                                    stats.combine_seconds / calls * 1e3,
                                    totals.total / calls * 1e3,
                                    stats.bytes_sent / calls,
                                    stats.bytes_received / calls,
                                    stats.rows_computed / calls,
                                    stats.rows_sent / calls,
                                    static_cast<double>(totals.experts_hosted),
                                    stats.inter_node_bytes_sent / calls,
                                    static_cast<double>(check.wrong())};
  const std::vector<std::vector<double>> all = comm->all_gather_v<double>(std::span<const double>(mine));
  constexpr size_t kInterNodeColumn = 10, kWrongColumn = 11;
  const std::vector<std::vector<char>> mismatches = comm->all_gather_v<char>(
      std::span<const char>(check.first_mismatch.data(), check.first_mismatch.size()));
  bool any_wrong = false;
  for (const std::vector<double>& worker : all) any_wrong = any_wrong || worker[kWrongColumn] > 0;
  if (rank != 0) {
    if (!any_wrong) return 0;
    comm->barrier();  // mpirun ends the job at the first non-zero exit: let rank 0's report out first
    return 1;
  }

  const std::string shape = preset.name + " hidden " + std::to_string(hidden) + ", " +
                            std::to_string(config.num_experts) + " experts top-" +
                            std::to_string(config.num_experts_per_tok) + ", moe_intermediate " +
                            std::to_string(inter);
  std::printf(
      "bench-moe: %s; %d worker(s), %lld tokens/worker, %lld layer(s) x %lld iteration(s)%s, backend %s, "
      "ep transport %s%s\n",
      shape.c_str(), num_workers, static_cast<long long>(args.tokens_per_worker),
      static_cast<long long>(args.layers), static_cast<long long>(args.iterations),
      args.cuda_graphs ? " replayed from a CUDA graph" : "", chosen.description.c_str(),
      ep_transport_name(transport),
      !use_nccl                       ? ""
      : args.ep_mode == "low-latency" ? " (low-latency mode)"
      : args.ep_overlap               ? " (normal mode, two-batch overlap)"
                                      : " (normal mode)");
  std::printf("per MoE layer call (ms):\n%6s %9s %9s %9s %9s %9s %10s %10s %10s %8s %8s\n", "worker", "route",
              "dispatch", "expert", "combine", "total", "MB sent", "MB recv", "rows done", "experts",
              "wrong");
  double max_total = 0, max_rows = 0, sum_rows = 0;
  for (int w = 0; w < num_workers; ++w) {
    const std::vector<double>& r = all[w];
    const std::string wrong = args.check ? std::to_string(static_cast<int64_t>(r[kWrongColumn])) : "N/A";
    std::printf("%6d %9.3f %9.3f %9.3f %9.3f %9.3f %10.3f %10.3f %10.0f %8.0f %8s\n", w, r[0], r[1], r[2],
                r[3], r[4], r[5] / 1e6, r[6] / 1e6, r[7], r[9], wrong.c_str());
    max_total = std::max(max_total, r[4]);
    max_rows = std::max(max_rows, r[7]);
    sum_rows += r[7];
  }
  const double tokens_per_second = num_workers * args.tokens_per_worker / (max_total / 1e3);
  std::printf(
      "slowest worker %.3f ms per layer; %.0f tokens/s per layer over the cluster; expert load max/mean "
      "%.3f\n",
      max_total, tokens_per_second, sum_rows > 0 ? max_rows / (sum_rows / num_workers) : 1.0);
  // Bytes that crossed between nodes per token and layer (rows and their metadata, dispatch and
  // combine), against the plan's expectation for the rows alone (coordinator/placement_traffic.h).
  double inter_node_bytes_per_token = 0, expected_bytes_per_token = 0;
  if (topology.num_nodes() > 1) {
    for (const std::vector<double>& worker : all) inter_node_bytes_per_token += worker[kInterNodeColumn];
    inter_node_bytes_per_token /= std::max<double>(1.0, double(num_workers) * double(args.tokens_per_worker));
    const InterNodeBytes expected =
        expected_inter_node_bytes(plan, static_cast<uint64_t>(hidden) * scalar_size(act));
    expected_bytes_per_token =
        (exchange.dispatch == EpDispatch::kHierarchical ? expected.hierarchical : expected.flat) /
        double(std::max<size_t>(1, plan.layers.size()));
    std::printf(
        "%s; %s dispatch: %.0f bytes crossed between nodes per token per layer (plan expects %.0f for "
        "the rows alone)\n",
        topology.describe().c_str(), ep_dispatch_name(exchange.dispatch), inter_node_bytes_per_token,
        expected_bytes_per_token);
  }
  const NcclReportShape nccl_shape{
      chosen.description, args.tokens_per_worker, hidden,      config.num_experts_per_tok, config.num_experts,
      args.layers,        args.iterations,        num_workers, use_nccl && args.baseline,  kLinkBytes};
  if (use_nccl) std::printf("%s", format_nccl_report(nccl_shape, nccl_ranks).c_str());
  if (args.check) {
    std::printf("check: %s (data plane %s with identity experts; expert rows within %.0e of a host FFN%s)\n",
                any_wrong ? "FAILED" : "passed on every worker",
                exchange.dispatch == EpDispatch::kHierarchical ? "within the hierarchical sum-order tolerance"
                                                               : "exact",
                expert_ffn_check_tolerance(act),
                use_nccl ? "; NCCL executor within the row-relative tolerance of the MPI executor" : "");
  }

  const char* columns[] = {"route_ms",
                           "dispatch_ms",
                           "expert_ms",
                           "combine_ms",
                           "total_ms",
                           "bytes_sent",
                           "bytes_received",
                           "rows_computed",
                           "rows_sent",
                           "experts_hosted",
                           "inter_node_bytes_sent"};
  if (!args.csv_out.empty()) {
    std::ostringstream csv;
    std::error_code ignored;
    if (!std::filesystem::exists(args.csv_out) || std::filesystem::file_size(args.csv_out, ignored) == 0) {
      csv << "preset,workers,tokens_per_worker,layers,iterations,threads,rank";
      for (const char* column : columns) csv << "," << column;
      csv << ",wrong\n";  // empty with --no-check
    }
    for (int w = 0; w < num_workers; ++w) {
      csv << preset.name << "," << num_workers << "," << args.tokens_per_worker << "," << args.layers << ","
          << args.iterations << "," << threads << "," << w;
      for (size_t c = 0; c < std::size(columns); ++c) csv << "," << all[w][c];
      csv << ",";
      if (args.check) csv << all[w][kWrongColumn];
      csv << "\n";
    }
    append_to_regular_file(args.csv_out, csv.str(), "--csv");
  }
  if (!args.json_out.empty()) {
    nlohmann::json workers = nlohmann::json::array();
    for (int w = 0; w < num_workers; ++w) {
      nlohmann::json row = {{"rank", w}};
      for (size_t c = 0; c < std::size(columns); ++c) row[columns[c]] = all[w][c];
      row["wrong"] =
          args.check ? nlohmann::json(static_cast<int64_t>(all[w][kWrongColumn])) : nlohmann::json();
      workers.push_back(row);
    }
    nlohmann::json result = {{"format", "epic-bench-moe-v1"},
                             {"preset", preset.name},
                             {"shape", shape},
                             {"workers", num_workers},
                             {"tokens_per_worker", args.tokens_per_worker},
                             {"layers", args.layers},
                             {"iterations", args.iterations},
                             {"cuda_graphs", args.cuda_graphs},
                             {"checked", args.check},
                             {"threads_per_rank", threads},
                             {"backend", chosen.description},
                             {"per_worker", workers},
                             {"tokens_per_second", tokens_per_second},
                             {"ep_transport", ep_transport_name(transport)},
                             {"ep_mode", use_nccl ? args.ep_mode : "none"},
                             {"ep_overlap", use_nccl && args.ep_overlap},
                             {"ep_dispatch", use_nccl ? "none" : ep_dispatch_name(exchange.dispatch)},
                             {"nodes", topology.num_nodes()},
                             {"node_of_rank", topology.node_of_rank()},
                             {"inter_node_bytes_per_token_per_layer", inter_node_bytes_per_token},
                             {"expected_inter_node_row_bytes_per_token_per_layer", expected_bytes_per_token}};
    if (use_nccl) result["nccl"] = nccl_report_json(nccl_shape, nccl_ranks);
    files::write_file_atomically(args.json_out, result.dump(2) + "\n", "--json");
  }
  if (any_wrong) {
    for (int w = 0; w < num_workers; ++w) {
      if (all[w][kWrongColumn] <= 0) continue;
      std::fprintf(stderr,
                   "epic: error [check failed]: bench-moe worker %d: %lld wrong element(s); first: %s\n", w,
                   static_cast<long long>(all[w][kWrongColumn]),
                   std::string(mismatches[w].begin(), mismatches[w].end()).c_str());
    }
    std::fflush(stdout);
    std::fflush(stderr);
    comm->barrier();
    return 1;
  }
  return 0;
}

}  // namespace epic::cli
