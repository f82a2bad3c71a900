// `epic run`: a one-shot job. Alone it is a one-rank cluster; under mpirun/srun every rank is a
// worker and rank 0 also plays the coordinator: it reads the prompts, plans the expert placement,
// assigns sequences to workers, sends the run plan (cereal) to all, and prints the results.
// Output is the same for every number of workers and every placement.
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "comm/communicator.h"
#include "comm/node_topology.h"
#include "coordinator/placement.h"
#include "coordinator/placement_traffic.h"
#include "coordinator/sequence_assignment.h"
#include "coordinator/tokenizer.h"
#include "kernels/backend.h"
#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/backend_choice.h"
#include "launch/cluster_model.h"
#include "launch/cli_commands.h"
#include "launch/cpu_threads.h"
#include "launch/ep_transport.h"
#include "launch/flag_checks.h"
#include "launch/id_list.h"
#include "launch/model_source.h"
#include "launch/peak_memory.h"
#include "launch/placement_setup.h"
#include "launch/rank_agreement.h"
#include "launch/result_printer.h"
#include "launch/run_wire.h"
#include "worker/expert_parallel_moe.h"
#ifdef EPIC_HAVE_NCCL_EP
#include "worker/device_expert_parallel_moe.h"
#endif
#include "launch/expert_budget.h"
#include "worker/ep_mode.h"
#include "worker/generation_loop.h"
#include "worker/model_config.h"
#include "worker/model_runner.h"
#include "worker/model_weights.h"
#include "worker/offloading_moe_executor.h"
#include "worker/routing_policy.h"

namespace epic::cli {
namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

// The lines of a prompts file; a FIFO, directory or device is refused at once (never read or
// waited on), and a file over 1 GiB is refused rather than read into memory.
std::vector<std::string> read_lines(const std::string& path, const std::string& flag) {
  const std::string text = files::read_file(path, flag, uint64_t{1} << 30);
  std::vector<std::string> lines;
  for (size_t start = 0; start < text.size();) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string line = text.substr(start, end - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(std::move(line));
    start = end + 1;
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();  // trailing blank lines
  if (lines.empty()) throw Error(ErrorCode::kInvalidArgument, flag + " " + path + " holds no prompts");
  for (size_t i = 0; i < lines.size(); ++i)
    if (lines[i].empty())
      throw Error(ErrorCode::kInvalidArgument, flag + " " + path + ": line " + std::to_string(i + 1) +
                                                   " is empty; every line must hold one prompt");
  return lines;
}

// Every prompt plus --max-new-tokens must fit the model's context (max_position_embeddings, the
// longest sequence the model is made for). Checked before any weight is read, naming the longest
// prompt, without overflow for any --max-new-tokens.
void check_context_length(const std::vector<std::vector<int32_t>>& prompts, int64_t max_new_tokens,
                          int64_t max_position_embeddings) {
  size_t longest = 0;
  for (size_t p = 1; p < prompts.size(); ++p)
    if (prompts[p].size() > prompts[longest].size()) longest = p;
  const int64_t prompt_tokens = static_cast<int64_t>(prompts[longest].size());
  if (prompt_tokens <= max_position_embeddings && max_new_tokens <= max_position_embeddings - prompt_tokens)
    return;
  const std::string prompt_name = prompts.size() > 1 ? "prompt " + std::to_string(longest + 1) : "the prompt";
  throw Error(ErrorCode::kInvalidArgument,
              prompt_name + " (" + std::to_string(prompt_tokens) + " tokens) plus --max-new-tokens " +
                  std::to_string(max_new_tokens) + " exceeds the model's context of " +
                  std::to_string(max_position_embeddings) +
                  " positions (max_position_embeddings in config.json); lower --max-new-tokens to at most " +
                  std::to_string(std::max<int64_t>(0, max_position_embeddings - prompt_tokens)) +
                  " or shorten the prompt");
}

// The prompts of the run as token ids (coordinator side).
std::vector<std::vector<int32_t>> read_prompts(const RunArgs& args, const ModelConfig& config,
                                               const std::optional<Tokenizer>& tokenizer,
                                               const fs::path& model_dir) {
  const int given = args.prompt.has_value() + args.prompt_ids.has_value() + args.prompts_file.has_value() +
                    args.prompt_ids_file.has_value();
  if (given != 1)
    throw Error(ErrorCode::kInvalidArgument,
                "give exactly one of --prompt TEXT, --prompt-ids 1,2,3, --prompts-file FILE or "
                "--prompt-ids-file FILE");
  auto encode = [&](const std::string& text, const std::string& where) {
    if (text.empty()) throw Error(ErrorCode::kInvalidArgument, where + " is empty; give some text");
    if (!tokenizer)
      throw Error(ErrorCode::kInvalidArgument,
                  model_dir.string() + " has no tokenizer.json, so " + where +
                      " cannot be encoded; use --prompt-ids or --prompt-ids-file");
    std::vector<int32_t> ids = tokenizer->encode(text);
    if (ids.empty()) throw Error(ErrorCode::kInvalidArgument, where + " encodes to no tokens");
    return ids;
  };
  std::vector<std::vector<int32_t>> prompts;
  if (args.prompt) prompts.push_back(encode(*args.prompt, "--prompt"));
  if (args.prompt_ids) prompts.push_back(parse_id_list(*args.prompt_ids, "--prompt-ids"));
  if (args.prompts_file) {
    const std::vector<std::string> lines = read_lines(*args.prompts_file, "--prompts-file");
    for (size_t i = 0; i < lines.size(); ++i)
      prompts.push_back(encode(lines[i], "--prompts-file line " + std::to_string(i + 1)));
  }
  if (args.prompt_ids_file) {
    const std::vector<std::string> lines = read_lines(*args.prompt_ids_file, "--prompt-ids-file");
    for (size_t i = 0; i < lines.size(); ++i)
      prompts.push_back(parse_id_list(lines[i], "--prompt-ids-file line " + std::to_string(i + 1)));
  }
  // Checked here, before any weight is read, with the prompt named.
  for (size_t p = 0; p < prompts.size(); ++p)
    check_token_ids(prompts[p], config.vocab_size,
                    prompts.size() > 1 ? "prompt " + std::to_string(p + 1) + ": " : std::string());
  check_context_length(prompts, args.max_new_tokens, config.max_position_embeddings);
  return prompts;
}

// The flags every rank can check alike before anything starts (no file is touched here: output
// and input paths are the coordinator's, checked first thing in plan_run, so a path that exists
// only on rank 0's node is no error and the message is printed once).
void check_flags(const RunArgs& args) {
  if (args.max_new_tokens < 0)
    throw Error(ErrorCode::kInvalidArgument,
                "--max-new-tokens must be >= 0, got " + std::to_string(args.max_new_tokens));
  Sampler check({args.temperature, args.top_p, args.seed});  // validates the sampling flags
  check_cluster_flags(args);
}

// Rank 0, before any weight is read: every output path can be written atomically (absent or a
// regular file in a writable folder, never a device, FIFO or directory), no two outputs share a
// path, and the input files are regular files.
void check_coordinator_files(const RunArgs& args) {
  const std::pair<const char*, const std::string*> outputs[] = {
      {"--logits-out", &args.logits_out},
      {"--load-profile-out", &args.load_profile_out},
      {"--placement-out", &args.placement_out},
      {"--report-out", &args.report_out}};
  std::map<fs::path, std::string> flag_of_path;
  for (const auto& [flag, path] : outputs) {
    if (path->empty()) continue;
    check_output_flag(*path, flag);
    const auto [at, fresh] = flag_of_path.emplace(fs::absolute(*path).lexically_normal(), flag);
    if (!fresh)
      throw Error(ErrorCode::kInvalidArgument, std::string(flag) + " and " + at->second + " both name " +
                                                   *path + "; give each output its own file");
  }
  if (args.prompts_file) files::require_regular_file(*args.prompts_file, "--prompts-file");
  if (args.prompt_ids_file) files::require_regular_file(*args.prompt_ids_file, "--prompt-ids-file");
  if (!args.load_profile.empty()) files::require_regular_file(args.load_profile, "--load-profile");
}

struct CoordinatorOutput {
  wire::RunPlan plan;
  std::vector<std::vector<int32_t>> prompts;
};

// Rank 0: prompts -> ids, placement plan, sequence assignment.
CoordinatorOutput plan_run(const RunArgs& args, const ClusterModel& cluster, const std::optional<Tokenizer>& tokenizer) {
  const ModelConfig& config = cluster.model.config;
  const int num_workers = cluster.topology.world_size();
  const fs::path model_dir =
      args.model_dir.empty() ? fs::path("--random-weights " + args.random_weights) : fs::path(args.model_dir);
  CoordinatorOutput output;
  check_coordinator_files(args);
  output.prompts = read_prompts(args, config, tokenizer, model_dir);
  const std::vector<ResidencyState> states = parse_residency_states(args.residency_state);
  if (states.size() > 1 && states.size() != output.prompts.size())
    throw Error(ErrorCode::kInvalidArgument,
                "--residency-state lists " + std::to_string(states.size()) + " states for " +
                    std::to_string(output.prompts.size()) +
                    " prompts: give one state for every prompt, or a single state for the whole run");
  const PlacementPlan placement = plan_job_placement(args, cluster);
  if (!args.placement_out.empty())
    files::write_file_atomically(args.placement_out, placement.to_json_text(), "--placement-out");
  std::vector<int64_t> costs;
  for (const auto& prompt : output.prompts)
    costs.push_back(static_cast<int64_t>(prompt.size()) + args.max_new_tokens);
  const std::vector<int> worker_of = assign_sequences(costs, num_workers);
  output.plan.placement = placement.to_cereal_bytes();
  output.plan.allow_missing_experts = args.allow_missing_experts;
  for (size_t i = 0; i < output.prompts.size(); ++i) {
    wire::Sequence sequence;
    sequence.sequence_id = static_cast<int64_t>(i);
    sequence.worker = worker_of[i];
    sequence.prompt = output.prompts[i];
    sequence.max_new_tokens = args.max_new_tokens;
    sequence.want_prompt_logits = !args.logits_out.empty();
    sequence.temperature = args.temperature;
    sequence.top_p = args.top_p;
    sequence.seed = args.seed;
    // A list of states: each sequence routes its own experts per token (ModelRunner's SequenceChunk);
    // one state is the whole run's routing policy.
    if (states.size() > 1) sequence.top_k = experts_per_token(states[i], config);
    output.plan.sequences.push_back(sequence);
  }
  return output;
}

// Rank 0, after every worker finished: load profile, per-worker report, the summary on stderr (the
// results themselves were printed as they arrived, by the ResultPrinter).
void print_results(const RunArgs& args, const ResultPrinter& printer, size_t num_prompts,
                   const std::vector<wire::WorkerReport>& reports, double run_seconds) {
  if (!args.load_profile_out.empty()) {
    LoadProfile profile;
    for (const wire::WorkerReport& report : reports)
      for (const auto& [layer, rows] : report.expert_rows) {
        std::vector<double>& load = profile.load[layer];
        load.resize(std::max(load.size(), rows.size()), 0.0);
        for (size_t e = 0; e < rows.size(); ++e) load[e] += static_cast<double>(rows[e]);
      }
    profile.save_file(args.load_profile_out);
  }
  if (!args.report_out.empty()) {
    nlohmann::json workers = nlohmann::json::array();
    for (const wire::WorkerReport& r : reports) {
      workers.push_back(
          {{"rank", r.rank},
           {"host", r.host},
           {"sequences", r.sequences},
           {"tokens_processed", r.tokens_processed},
           {"steps", r.steps},
           {"most_active_sequences", r.most_active_sequences},
           {"experts_hosted", r.experts_hosted},
           {"bytes_read", r.bytes_read},
           {"resident_bytes", r.resident_bytes},
           {"peak_resident_bytes", r.peak_resident_bytes},
           {"load_seconds", r.load_seconds},
           {"run_seconds", r.run_seconds},
           {"route_seconds", r.route_seconds},
           {"dispatch_seconds", r.dispatch_seconds},
           {"expert_seconds", r.expert_seconds},
           {"combine_seconds", r.combine_seconds},
           {"bytes_sent", r.bytes_sent},
           {"bytes_received", r.bytes_received},
           {"rows_computed", r.rows_computed},
           // --expert-budget: hits, misses, bytes per tier, stalls (null without a budget)
           {"expert_store", r.expert_store.empty() ? nlohmann::json(nullptr)
                                                   : nlohmann::json::parse(r.expert_store, nullptr, false)}});
    }
    nlohmann::json report = {{"format", "epic-run-report-v1"},
                             {"workers", workers},
                             {"run_seconds", run_seconds},
                             {"max_active_sequences", args.max_active_sequences},
                             {"results_held_at_once", printer.most_waiting()},
                             {"sequences", num_prompts}};
    files::write_file_atomically(args.report_out, report.dump(2) + "\n", "--report-out");
  }
  std::fprintf(stderr,
               "epic run: %lld prompt tokens, %lld generated in %.3f s; %zu sequence(s) on %zu worker(s)\n",
               static_cast<long long>(printer.prompt_tokens()),
               static_cast<long long>(printer.generated_tokens()), run_seconds, num_prompts, reports.size());
  std::fprintf(stderr, "%6s %5s %7s %6s %8s %11s %12s %11s %9s %9s %9s %9s %9s\n", "worker", "seqs", "tokens",
               "steps", "experts", "MB read", "MB resident", "rows done", "MB sent", "route s", "dispatch s",
               "expert s", "combine s");
  for (const wire::WorkerReport& r : reports) {
    std::fprintf(stderr, "%6d %5lld %7lld %6lld %8lld %11.3f %12.3f %11lld %9.3f %9.4f %9.4f %9.4f %9.4f\n",
                 r.rank, static_cast<long long>(r.sequences), static_cast<long long>(r.tokens_processed),
                 static_cast<long long>(r.steps), static_cast<long long>(r.experts_hosted),
                 r.bytes_read / 1e6, r.resident_bytes / 1e6, static_cast<long long>(r.rows_computed),
                 r.bytes_sent / 1e6, r.route_seconds, r.dispatch_seconds, r.expert_seconds,
                 r.combine_seconds);
  }
}

int run_on_cluster(const RunArgs& args, Communicator& communicator);

}  // namespace

int run_command(const RunArgs& args) {
  return run_job(
      [&] {
        check_flags(args);
        check_int_flag("--max-active-sequences", args.max_active_sequences, 1, kMaxActiveSequencesBound);
      },
      args.comm_timeout_seconds, [&](Communicator& comm) { return run_on_cluster(args, comm); });
}

namespace {

int run_on_cluster(const RunArgs& args, Communicator& communicator) {
  Communicator* comm = &communicator;
  const bool coordinator = comm->rank() == 0;

  // Every rank opens the model and its backend and learns the job's nodes; only the coordinator reads
  // prompts and the tokenizer, and plans.
  ClusterModel cluster;
  open_cluster_model(args, *comm, cluster);
  const OpenedModel& model = cluster.model;
  const ChosenBackend& chosen = cluster.chosen;
  const NodeTopology& topology = cluster.topology;
  std::optional<Tokenizer> tokenizer;
  CoordinatorOutput coordinator_output;
  const std::string plan_bytes = broadcast_from_root(*comm, 0, [&] {
    if (model.model_dir && fs::exists(*model.model_dir / "tokenizer.json"))
      tokenizer = Tokenizer::load(*model.model_dir / "tokenizer.json");
    coordinator_output = plan_run(args, cluster, tokenizer);
    return wire::to_bytes(coordinator_output.plan);
  });
  const wire::RunPlan plan = wire::from_bytes<wire::RunPlan>(plan_bytes, wire::kRunPlanVersion, "run plan");

  std::vector<SequenceRequest> mine;
  int64_t max_context = 1;
  for (const wire::Sequence& s : plan.sequences) {
    if (s.worker != comm->rank()) continue;
    mine.push_back({s.sequence_id,
                    s.prompt,
                    s.max_new_tokens,
                    s.want_prompt_logits,
                    {s.temperature, s.top_p, s.seed},
                    s.top_k});
    max_context = std::max<int64_t>(max_context, static_cast<int64_t>(s.prompt.size()) + s.max_new_tokens);
  }
  // Each worker reads the dense weights and only the experts the plan gives it.
  load_cluster_model(args, *comm, plan, max_context, cluster);
  const PlacementPlan& placement = cluster.placement;
  const ModelWeights& weights = cluster.weights;
  const std::optional<ExpertStore>& store = cluster.store;
  ModelRunner* runner = &*cluster.runner;
  const double load_seconds = cluster.load_seconds;

  // Rank 0 prints each result as soon as every earlier prompt's is printed and writes its logits
  // rows at once; it holds only results waiting for an earlier prompt (ids, never logits).
  std::optional<ResultPrinter> printer;
  run_on_all_ranks(*comm, [&] {
    if (!coordinator) return;
    std::vector<int64_t> prompt_lengths;
    for (const std::vector<int32_t>& prompt : coordinator_output.prompts)
      prompt_lengths.push_back(static_cast<int64_t>(prompt.size()));
    const bool one_line_per_prompt =
        coordinator_output.prompts.size() > 1 || args.prompts_file || args.prompt_ids_file;
    printer.emplace(prompt_lengths, one_line_per_prompt, tokenizer ? &*tokenizer : nullptr, args.logits_out,
                    model.config.vocab_size);
  });
  if (coordinator)
    std::fprintf(stderr, "epic run: %s, backend %s\n", model.description.c_str(), chosen.description.c_str());
  comm->barrier();  // time the generation alone, from a common start
  const auto run_start = clock_type::now();
  GenerationOptions generation;
  generation.max_active_sequences = args.max_active_sequences;
  generation.result_root = 0;
  generation.prefill_chunk_tokens = args.prefill_chunk_tokens;
  // The sink runs on rank 0 only, the one rank with a printer.
  const auto generate = [&] {
    return run_generation(*runner, mine, *comm, generation,
                          [&](SequenceResult&& result) { printer->add(std::move(result)); });
  };
  GenerationStats stats;
  if (cluster.ends_job_on_rank_error(*comm)) {
    // The NCCL executor: an error raised on this rank alone ends the job here, before unwinding. The
    // destructors on the way out (device buffers, the NCCL communicator, the backend's stream) wait on the
    // device, where NCCL kernels may still wait for a peer that is gone or stuck: on 2 x H200 a rank that
    // threw mid-generation hung the job that way (tests/gpu/ep_fault_check.sh). Agreed errors go up as
    // always, to be reported once.
    try {
      stats = generate();
    } catch (const AgreedError&) {
      throw;
    } catch (const Error& e) {
      end_job_naming_rank(*comm, e);
    } catch (const std::exception& e) {
      end_job_naming_rank(*comm, Error(ErrorCode::kInternal, e.what()));
    }
  } else {
    stats = generate();
  }
  const double run_seconds = seconds_since(run_start);
  nlohmann::json store_report;
  if (store) {
    store_report = cluster.store_report(args.expert_store);
    std::fprintf(stderr, "rank %d %s", comm->rank(), expert_store_summary(store_report).c_str());
  }

  wire::WorkerReport report;
  report.rank = comm->rank();
  report.host = this_host_name();
  report.bytes_read = weights.bytes_read;
  report.resident_bytes = weights.resident_bytes + runner->kv_cache_bytes() + runner->workspace_bytes();
  report.peak_resident_bytes = peak_resident_bytes();
  report.experts_hosted = weights.experts_hosted();
  if (store) {  // the experts are the store's: its slots, its host tier, what it read from the checkpoint
    const ExpertStoreStats stats = store->stats();
    report.bytes_read = model.source->bytes_read();
    report.resident_bytes += stats.resident_bytes + stats.host_tier_bytes;
    report.experts_hosted = 0;
    for (const auto& [layer, experts] :
         inspect_experts(model.config, *model.source, plan.allow_missing_experts))
      report.experts_hosted += experts.num_present();
  }
  report.sequences = static_cast<int64_t>(mine.size());
  if (store) report.expert_store = store_report.dump();
  report.steps = stats.steps;
  report.tokens_processed = stats.tokens_processed;
  report.most_active_sequences = stats.most_active_sequences;
  report.load_seconds = load_seconds;
  report.run_seconds = run_seconds;
  const MoePhaseStats phases = cluster.phase_stats();
  report.route_seconds = phases.route_seconds;
  report.dispatch_seconds = phases.dispatch_seconds;
  report.expert_seconds = phases.expert_seconds;
  report.combine_seconds = phases.combine_seconds;
  report.bytes_sent = phases.bytes_sent;
  report.bytes_received = phases.bytes_received;
  report.rows_computed = phases.rows_computed;
  report.expert_rows = cluster.executor->expert_rows();
  const double inter_node_sent = static_cast<double>(phases.inter_node_bytes_sent);
  const std::vector<std::vector<double>> inter_node_bytes =
      comm->all_gather_v<double>(std::span<const double>(&inter_node_sent, 1));
  const std::string report_bytes = wire::to_bytes(report);
  const std::vector<std::vector<char>> gathered =
      comm->all_gather_v<char>(std::span<const char>(report_bytes.data(), report_bytes.size()));

  if (coordinator) {
    std::vector<wire::WorkerReport> reports;
    for (const std::vector<char>& bytes : gathered)
      reports.push_back(wire::from_bytes<wire::WorkerReport>(std::string(bytes.begin(), bytes.end()),
                                                             wire::kWorkerReportVersion, "worker report"));
    printer->finish();  // every rank succeeded: the logits file goes into place, complete
    print_results(args, *printer, coordinator_output.prompts.size(), reports, run_seconds);
    double worst_balance = 1.0;
    int64_t max_slots = 0;
    for (const LayerPlacement& layer : placement.layers) {
      worst_balance = std::max(worst_balance, layer.max_over_mean_load());
      max_slots = std::max(max_slots, layer.slots_per_worker);
    }
    std::fprintf(stderr,
                 "placement: %zu MoE layers on %d worker(s), up to %lld expert slots per worker per layer, "
                 "expected max/mean load %.3f in the worst layer (epic plan prints every layer)\n",
                 placement.layers.size(), placement.num_workers, static_cast<long long>(max_slots),
                 worst_balance);
    if (args.expert_store.enabled()) {
      // The planner's view of the budget beside the stores' measured figures above: the share of a worker's
      // expected load its hottest resident experts would serve (a static cache's hit rate).
      double lowest = 1.0, mean = 0;
      const std::vector<LayerResidencyEstimate> estimates =
          expected_resident_share(placement, args.expert_store.budget);
      for (const LayerResidencyEstimate& e : estimates) {
        lowest = std::min(lowest, e.min_resident_share);
        mean += e.mean_resident_share / static_cast<double>(estimates.size());
      }
      std::fprintf(stderr,
                   "placement with --expert-budget %s: a worker's hottest resident experts serve %.3f of its "
                   "expected load on average (%.3f in the worst worker and layer; epic plan --expert-budget "
                   "prints every layer)\n",
                   args.expert_store.budget.c_str(), mean, lowest);
    }
    if (topology.num_nodes() > 1) {
      // Measured over the whole run against the plan's expectation for the rows alone.
      double crossed = 0, tokens = 0;
      for (const std::vector<double>& rank_bytes : inter_node_bytes) crossed += rank_bytes[0];
      for (const wire::WorkerReport& worker : reports) tokens += static_cast<double>(worker.tokens_processed);
      const InterNodeBytes expected_bytes = expected_inter_node_bytes(
          placement, static_cast<uint64_t>(model.config.hidden_size) * scalar_size(chosen.activation_type));
      const double expected =
          cluster.exchange.dispatch == EpDispatch::kHierarchical ? expected_bytes.hierarchical : expected_bytes.flat;
      std::fprintf(
          stderr,
          "nodes: %s; %s dispatch; %.0f bytes crossed between nodes per token through all MoE layers, "
          "rows and their metadata (the plan expects %.0f for the rows alone)\n",
          topology.describe().c_str(), ep_dispatch_name(cluster.exchange.dispatch),
          tokens > 0 ? crossed / tokens : 0.0, expected);
    }
  }
  return 0;
}

}  // namespace
}  // namespace epic::cli
