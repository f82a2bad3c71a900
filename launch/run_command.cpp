// `epic run`: a one-shot job. Alone it is a one-rank cluster; under mpirun/srun every rank is a
// worker and rank 0 also plays the coordinator: it reads the prompts, plans the expert placement,
// assigns sequences to workers, sends the run plan (cereal) to all, and prints the results.
// Output is the same for every number of workers and every placement.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "comm/communicator.h"
#include "coordinator/placement.h"
#include "coordinator/sequence_assignment.h"
#include "coordinator/tokenizer.h"
#include "kernels/backend.h"
#include "kernels/error.h"
#include "launch/cli_commands.h"
#include "launch/cpu_threads.h"
#include "launch/id_list.h"
#include "launch/placement_setup.h"
#include "launch/rank_agreement.h"
#include "launch/run_wire.h"
#include "worker/checkpoint.h"
#include "worker/expert_parallel_moe.h"
#include "worker/generation_loop.h"
#include "worker/model_config.h"
#include "worker/model_runner.h"
#include "worker/npy_file.h"

namespace epic::cli {
namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

std::vector<std::string> read_lines(const std::string& path, const std::string& flag) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw Error(ErrorCode::kInvalidArgument, flag + " " + path + ": cannot open for reading");
  std::vector<std::string> lines;
  for (std::string line; std::getline(file, line);) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    lines.push_back(line);
  }
  while (!lines.empty() && lines.back().empty()) lines.pop_back();  // trailing blank lines
  if (lines.empty()) throw Error(ErrorCode::kInvalidArgument, flag + " " + path + " holds no prompts");
  for (size_t i = 0; i < lines.size(); ++i)
    if (lines[i].empty())
      throw Error(ErrorCode::kInvalidArgument, flag + " " + path + ": line " + std::to_string(i + 1) +
                                                   " is empty; every line must hold one prompt");
  return lines;
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
  return prompts;
}

void check_flags(const RunArgs& args) {
  if (args.max_new_tokens < 0)
    throw Error(ErrorCode::kInvalidArgument,
                "--max-new-tokens must be >= 0, got " + std::to_string(args.max_new_tokens));
  Sampler check({args.temperature, args.top_p, args.seed});  // validates the sampling flags
  if (!(args.comm_timeout_seconds > 0))
    throw Error(ErrorCode::kInvalidArgument, "--comm-timeout must be > 0 seconds");
  for (const std::string* out :
       {&args.logits_out, &args.load_profile_out, &args.placement_out, &args.report_out}) {
    if (out->empty()) continue;
    const fs::path parent = fs::absolute(*out).parent_path();
    if (!fs::is_directory(parent))
      throw Error(ErrorCode::kInvalidArgument, *out + ": folder " + parent.string() + " does not exist");
  }
}

struct CoordinatorOutput {
  wire::RunPlan plan;
  std::vector<std::vector<int32_t>> prompts;
};

// Rank 0: prompts -> ids, placement plan, sequence assignment.
CoordinatorOutput plan_run(const RunArgs& args, int num_workers, const ModelConfig& config,
                           const std::optional<Tokenizer>& tokenizer, Checkpoint& checkpoint) {
  const fs::path model_dir = args.model_dir;
  CoordinatorOutput output;
  output.prompts = read_prompts(args, config, tokenizer, model_dir);
  const ExpertInventory inventory = inspect_experts(config, checkpoint, args.allow_missing_experts);
  const PlacementPlan placement =
      make_placement(config, inventory, {num_workers, args.slots, args.budget_bytes, args.load_profile});
  if (!args.placement_out.empty()) {
    std::ofstream(args.placement_out) << placement.to_json_text();
  }
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
    output.plan.sequences.push_back(sequence);
  }
  return output;
}

// Rank 0: results in prompt order, logits, load profile, per-worker report.
void print_results(const RunArgs& args, const ModelConfig& config, const std::optional<Tokenizer>& tokenizer,
                   const std::vector<std::vector<int32_t>>& prompts,
                   const std::vector<wire::WorkerReport>& reports, double run_seconds) {
  std::vector<const wire::Result*> by_sequence(prompts.size(), nullptr);
  for (const wire::WorkerReport& report : reports)
    for (const wire::Result& result : report.results) by_sequence.at(result.sequence_id) = &result;
  const bool several = prompts.size() > 1 || args.prompts_file || args.prompt_ids_file;
  int64_t prompt_tokens = 0, generated = 0;
  std::vector<float> logits;
  for (size_t i = 0; i < prompts.size(); ++i) {
    const wire::Result& result = *by_sequence.at(i);
    prompt_tokens += static_cast<int64_t>(prompts[i].size());
    generated += static_cast<int64_t>(result.new_ids.size());
    if (!args.logits_out.empty())
      logits.insert(logits.end(), result.prompt_logits.begin(), result.prompt_logits.end());
    if (several) {
      // One JSON object per line: safe for text with newlines, easy to collect in scaling studies.
      nlohmann::json line = {{"sequence", i}, {"ids", result.new_ids}};
      if (tokenizer) line["text"] = tokenizer->decode(result.new_ids);
      std::printf("%s\n", line.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace).c_str());
    } else if (tokenizer) {
      std::printf("%s\n", tokenizer->decode(result.new_ids).c_str());
    } else {
      std::printf("%s\n", join_ids(result.new_ids).c_str());
    }
  }
  std::fflush(stdout);
  if (!args.logits_out.empty()) write_npy_f32(args.logits_out, {prompt_tokens, config.vocab_size}, logits);
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
      workers.push_back({{"rank", r.rank},
                         {"sequences", r.sequences},
                         {"tokens_processed", r.tokens_processed},
                         {"steps", r.steps},
                         {"experts_hosted", r.experts_hosted},
                         {"bytes_read", r.bytes_read},
                         {"resident_bytes", r.resident_bytes},
                         {"load_seconds", r.load_seconds},
                         {"run_seconds", r.run_seconds},
                         {"route_seconds", r.route_seconds},
                         {"dispatch_seconds", r.dispatch_seconds},
                         {"expert_seconds", r.expert_seconds},
                         {"combine_seconds", r.combine_seconds},
                         {"bytes_sent", r.bytes_sent},
                         {"bytes_received", r.bytes_received},
                         {"rows_computed", r.rows_computed}});
    }
    nlohmann::json report = {{"format", "epic-run-report-v1"},
                             {"workers", workers},
                             {"run_seconds", run_seconds},
                             {"sequences", prompts.size()}};
    std::ofstream file(args.report_out);
    file << report.dump(2) << "\n";
    if (!file) throw Error(ErrorCode::kIo, args.report_out + ": cannot write the report");
  }
  std::fprintf(stderr,
               "epic run: %lld prompt tokens, %lld generated in %.3f s; %zu sequence(s) on %zu worker(s)\n",
               static_cast<long long>(prompt_tokens), static_cast<long long>(generated), run_seconds,
               prompts.size(), reports.size());
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
  check_flags(args);
  std::unique_ptr<Communicator> comm = make_communicator(CommOptions{args.comm_timeout_seconds});
  try {
    return run_on_cluster(args, *comm);
  } catch (const AgreedError& e) {
    // Rank 0 reports the error every rank raised. Then all ranks meet once more before exiting,
    // because mpirun aborts the job at the first non-zero exit and would cut rank 0's report off.
    if (comm->rank() == 0) print_error(e);
    try {
      comm->barrier();
    } catch (const Error&) {
      // A rank already gone: nothing left to coordinate; exit with the agreed code anyway.
    }
    throw SilentFailure{exit_code_for(e.code())};
  }
}

namespace {

int run_on_cluster(const RunArgs& args, Communicator& communicator) {
  Communicator* comm = &communicator;
  const bool coordinator = comm->rank() == 0;
  const fs::path model_dir = args.model_dir;

  // Every rank reads config.json and the checkpoint index (small; shard headers are read on first
  // use and kept); only the coordinator reads prompts and the tokenizer.
  std::optional<ModelConfig> config;
  std::optional<Checkpoint> checkpoint;
  std::optional<Tokenizer> tokenizer;
  run_on_all_ranks(*comm, [&] {
    config = ModelConfig::load(model_dir);
    checkpoint.emplace(Checkpoint::open(model_dir));
  });
  CoordinatorOutput coordinator_output;
  const std::string plan_bytes = broadcast_from_root(*comm, 0, [&] {
    if (fs::exists(model_dir / "tokenizer.json")) tokenizer = Tokenizer::load(model_dir / "tokenizer.json");
    coordinator_output = plan_run(args, comm->size(), *config, tokenizer, *checkpoint);
    return wire::to_bytes(coordinator_output.plan);
  });
  const wire::RunPlan plan = wire::from_bytes<wire::RunPlan>(plan_bytes, wire::kRunPlanVersion, "run plan");
  const PlacementPlan placement = PlacementPlan::from_cereal_bytes(plan.placement);
  const ExpertRoutingTable table = routing_table_from_plan(placement);

  // Each worker reads the dense weights and only the experts the plan gives it.
  const auto load_start = clock_type::now();
  ModelWeights weights;
  run_on_all_ranks(*comm, [&] {
    LoadOptions options;
    options.allow_missing_experts = plan.allow_missing_experts;
    const int rank = comm->rank();
    options.hosts_expert = [&](int64_t layer, int64_t expert) { return table.hosts(rank, layer, expert); };
    weights = load_model_weights(*config, *checkpoint, options);
  });
  const double load_seconds = seconds_since(load_start);

  std::vector<SequenceRequest> mine;
  for (const wire::Sequence& s : plan.sequences) {
    if (s.worker != comm->rank()) continue;
    mine.push_back(
        {s.sequence_id, s.prompt, s.max_new_tokens, s.want_prompt_logits, {s.temperature, s.top_p, s.seed}});
  }
  auto backend = make_cpu_backend(default_cpu_threads());
  ExpertParallelMoeExecutor executor(*config, weights, *backend, *comm, table);
  ModelRunner runner(*config, weights, *backend, &executor);
  comm->barrier();  // time the generation alone, from a common start
  const auto run_start = clock_type::now();
  GenerationStats stats;
  const std::vector<SequenceResult> results = run_generation(runner, mine, *comm, &stats);
  const double run_seconds = seconds_since(run_start);

  wire::WorkerReport report;
  report.rank = comm->rank();
  report.bytes_read = weights.bytes_read;
  report.resident_bytes = weights.resident_bytes();
  for (const LayerWeights& layer : weights.layers)
    report.experts_hosted += static_cast<int64_t>(layer.moe.experts.size());
  report.sequences = static_cast<int64_t>(mine.size());
  report.steps = stats.steps;
  report.tokens_processed = stats.tokens_processed;
  report.load_seconds = load_seconds;
  report.run_seconds = run_seconds;
  const MoePhaseStats& phases = executor.stats();
  report.route_seconds = phases.route_seconds;
  report.dispatch_seconds = phases.dispatch_seconds;
  report.expert_seconds = phases.expert_seconds;
  report.combine_seconds = phases.combine_seconds;
  report.bytes_sent = phases.bytes_sent;
  report.bytes_received = phases.bytes_received;
  report.rows_computed = phases.rows_computed;
  report.expert_rows = executor.expert_rows();
  for (const SequenceResult& result : results)
    report.results.push_back({result.sequence_id, result.new_ids, result.prompt_logits});
  const std::string report_bytes = wire::to_bytes(report);
  const std::vector<std::vector<char>> gathered =
      comm->all_gather_v<char>(std::span<const char>(report_bytes.data(), report_bytes.size()));

  if (coordinator) {
    std::vector<wire::WorkerReport> reports;
    for (const std::vector<char>& bytes : gathered)
      reports.push_back(wire::from_bytes<wire::WorkerReport>(std::string(bytes.begin(), bytes.end()),
                                                             wire::kWorkerReportVersion, "worker report"));
    print_results(args, *config, tokenizer, coordinator_output.prompts, reports, run_seconds);
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
  }
  return 0;
}

}  // namespace
}  // namespace epic::cli
