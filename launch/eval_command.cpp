// epic eval: the quality of a model and of cheaper ways to run it, measured on a text. The text is
// scored in sliding windows (worker/quality_metrics.h); every window runs once as the reference (the
// model as trained: its top-k over its present experts) and once per variant (fewer experts per token,
// or experts pruned by least use on a calibration text), in the same step loop, so the variant's
// logits are compared with the reference's of the same window without storing a full run. Under mpirun
// the windows are spread over the ranks (attention is data parallel) and the experts over the workers
// (the host exchange, which counts the rows each expert computed: the calibration and the bytes read).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "coordinator/tokenizer.h"
#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/backend_choice.h"
#include "launch/bench_decode_cluster.h"
#include "launch/cli_commands.h"
#include "launch/cpu_threads.h"
#include "launch/eval_runner.h"
#include "launch/expert_budget.h"
#include "launch/flag_checks.h"
#include "launch/model_source.h"
#include "launch/placement_setup.h"
#include "launch/rank_agreement.h"
#include "worker/model_runner.h"
#include "worker/offloading_moe_executor.h"
#include "worker/quality_metrics.h"
#include "worker/routing_policy.h"

namespace epic::cli {
namespace {

namespace fs = std::filesystem;
using clock_type = std::chrono::steady_clock;

std::vector<int32_t> tokens_from_bytes(const std::string& bytes) {
  std::vector<int32_t> ids(bytes.size() / sizeof(int32_t));
  std::copy(bytes.begin(), bytes.end(), reinterpret_cast<char*>(ids.data()));
  return ids;
}

std::string tokens_to_bytes(const std::vector<int32_t>& ids) {
  return std::string(reinterpret_cast<const char*>(ids.data()), ids.size() * sizeof(int32_t));
}

// The text's tokens, cut to max_tokens (0: all), read and tokenized on the root and sent to every rank.
std::vector<int32_t> read_text_tokens(Communicator& comm, const std::optional<Tokenizer>& tokenizer,
                                      const std::string& path, const std::string& flag, int64_t max_tokens) {
  return tokens_from_bytes(broadcast_from_root(comm, 0, [&] {
    const std::string text = files::read_file(path, flag);
    if (!tokenizer)
      throw Error(ErrorCode::kInvalidArgument,
                  flag +
                      ": the model folder has no tokenizer.json to turn the text into tokens; copy the "
                      "model's tokenizer.json beside its config.json");
    std::vector<int32_t> ids = tokenizer->encode(text);
    if (ids.size() < 2)
      throw Error(ErrorCode::kInvalidArgument, flag + " " + path + ": " + std::to_string(ids.size()) +
                                                   " token(s); give a text of at least 2 tokens");
    if (max_tokens > 0 && static_cast<int64_t>(ids.size()) > max_tokens) ids.resize(max_tokens);
    return tokens_to_bytes(ids);
  }));
}

// The experts of each pruned layer used least on the calibration text, percent of its present ones
// (rounded to the nearest expert), ties to the higher id.
std::map<int64_t, std::vector<int64_t>> least_used_experts(const std::map<int64_t, std::vector<int64_t>>& use,
                                                           const ModelWeights& weights,
                                                           const std::set<int64_t>& layers, double percent) {
  std::map<int64_t, std::vector<int64_t>> removed;
  for (int64_t layer : layers) {
    const MoeLayerWeights& moe = weights.layers[layer].moe;
    std::vector<int64_t> present;
    for (int64_t e = 0; e < moe.num_experts; ++e)
      if (moe.present[e]) present.push_back(e);
    const auto count = [&](int64_t e) {
      const auto found = use.find(layer);
      return found != use.end() && e < static_cast<int64_t>(found->second.size()) ? found->second[e] : 0;
    };
    std::stable_sort(present.begin(), present.end(), [&](int64_t a, int64_t b) {
      return count(a) != count(b) ? count(a) < count(b) : a > b;
    });
    const auto n = static_cast<size_t>(std::llround(percent / 100.0 * static_cast<double>(present.size())));
    removed[layer].assign(present.begin(), present.begin() + std::min(n, present.size()));
  }
  return removed;
}

std::set<int64_t> pruned_layers(const std::string& spec, const ModelWeights& weights) {
  std::set<int64_t> layers;
  const auto is_moe = [&](int64_t l) {
    return l >= 0 && l < static_cast<int64_t>(weights.layers.size()) && weights.layers[l].is_moe;
  };
  if (spec == "all") {
    for (int64_t l = 0; l < static_cast<int64_t>(weights.layers.size()); ++l)
      if (is_moe(l)) layers.insert(l);
    return layers;
  }
  size_t start = 0;
  while (start <= spec.size()) {
    const size_t comma = std::min(spec.find(',', start), spec.size());
    const std::string item = spec.substr(start, comma - start);
    char* end = nullptr;
    const long long value = std::strtoll(item.c_str(), &end, 10);
    if (item.empty() || end == nullptr || *end != '\0' || !is_moe(value))
      throw Error(ErrorCode::kInvalidArgument,
                  "--prune-layers: '" + item +
                      "' is not a MoE layer of this model; give 'all' or MoE layer "
                      "indices separated by commas, e.g. 2,5");
    layers.insert(value);
    start = comma + 1;
  }
  return layers;
}

std::string variant_name(int64_t top_k, const ModelConfig& config) {
  std::string name = "top-" + std::to_string(top_k);
  if (top_k == config.num_experts_per_tok)
    name += " (trained, focus)";
  else if (top_k == kWakeExpertsPerToken)
    name += " (wake)";
  return name;
}

void check_eval_flags(const EvalArgs& args) {
  if (args.model_dir.empty())
    throw Error(ErrorCode::kInvalidArgument, "epic eval needs --model DIR (a Hugging Face model folder)");
  if (args.text_file.empty())
    throw Error(ErrorCode::kInvalidArgument, "epic eval needs --text-file F (the text to score)");
  check_int_flag("--window", args.window, 2, 1 << 20);
  if (args.stride) check_int_flag("--stride", *args.stride, 1, args.window);
  check_int_flag("--max-tokens", args.max_tokens, 0, int64_t{1} << 40);
  check_int_flag("--windows-per-step", args.windows_per_step, 1, 4096);
  for (int64_t k : args.top_k) check_int_flag("--top-k", k, 1, 1 << 20);
  for (double p : args.prune_percent)
    if (!(p > 0 && p < 100))
      throw Error(
          ErrorCode::kInvalidArgument,
          "--prune " + std::to_string(p) + ": give percentages of a layer's experts above 0 and below 100");
  if (!args.prune_percent.empty() && args.calibration_file.empty())
    throw Error(
        ErrorCode::kInvalidArgument,
        "--prune removes the experts used least on a calibration text: add --calibration-file F (text "
        "other than the evaluated file, e.g. from the training corpus)");
  if (args.prune_percent.empty() && !args.calibration_file.empty())
    throw Error(ErrorCode::kInvalidArgument, "--calibration-file is only used with --prune PERCENTS");
  if (args.on_miss.empty())
    throw Error(ErrorCode::kInvalidArgument, "--on-miss: give wait, substitute or both (wait,substitute)");
  for (const std::string& on_miss : args.on_miss) {
    if (args.expert_budgets.empty())
      check_expert_store_flags({"", args.expert_tier, args.eviction, on_miss, 0.9, args.prefetch,
                                on_miss == "read" ? args.admit_per_step : 0, args.host_budget});
    for (const std::string& budget : args.expert_budgets)
      check_expert_store_flags({budget, args.expert_tier, args.eviction, on_miss, 0.9, args.prefetch,
                                on_miss == "read" ? args.admit_per_step : 0, args.host_budget});
  }
  if (args.admit_per_step != 0 &&
      std::find(args.on_miss.begin(), args.on_miss.end(), "read") == args.on_miss.end())
    throw Error(
        ErrorCode::kInvalidArgument,
        "--admit-per-step limits what the read variants copy in behind a step: add read to --on-miss");
  if (!args.json_out.empty()) check_output_flag(args.json_out, "--json");
  check_comm_timeout("--comm-timeout", args.comm_timeout_seconds);
  check_backend_flags({args.backend, args.device, args.precision});
}

int run_eval(const EvalArgs& args, Communicator& comm);

}  // namespace

int eval_command(const EvalArgs& args) {
  return run_job([&] { check_eval_flags(args); }, args.comm_timeout_seconds,
                 [&](Communicator& comm) { return run_eval(args, comm); });
}

namespace {

int run_eval(const EvalArgs& args, Communicator& comm) {
  const bool root = comm.rank() == 0;
  OpenedModel model;
  ChosenBackend chosen;
  std::optional<Tokenizer> tokenizer;
  run_on_all_ranks(comm, [&] {
    model = open_model({args.model_dir, "", std::nullopt, 0});
    chosen = choose_backend({args.backend, args.device, args.precision}, launcher_local_rank(),
                            default_cpu_threads());
  });
  const ModelConfig& config = model.config;
  std::optional<DecodeCluster> cluster;
  run_on_all_ranks(comm, [&] { cluster.emplace(comm, config, *model.source, args.allow_missing_experts); });
  // Text first: a bad file fails before the weights are read.
  const fs::path tokenizer_path = fs::path(args.model_dir) / "tokenizer.json";
  if (root && fs::exists(tokenizer_path)) tokenizer = Tokenizer::load(tokenizer_path);
  const std::vector<int32_t> tokens =
      read_text_tokens(comm, tokenizer, args.text_file, "--text-file", args.max_tokens);
  std::vector<int32_t> calibration;
  if (!args.calibration_file.empty())
    calibration = read_text_tokens(comm, tokenizer, args.calibration_file, "--calibration-file", 0);
  const int64_t stride = args.stride.value_or(std::max<int64_t>(1, args.window / 2));
  std::vector<EvalWindow> windows;
  run_on_all_ranks(comm, [&] {
    check_token_ids(tokens, config.vocab_size, "--text-file: ");
    windows = sliding_windows(static_cast<int64_t>(tokens.size()), args.window, stride);
  });

  ModelWeights weights;
  run_on_all_ranks(comm, [&] {
    LoadOptions load;
    load.allow_missing_experts = args.allow_missing_experts;
    load.weight_type = required_weight_type(chosen.activation_type);
    load.hosts_expert = [&](int64_t layer, int64_t expert) { return cluster->hosts(layer, expert); };
    weights = load_model_weights(config, *model.source, *chosen.backend, load);
  });
  MoeExecutor* executor = nullptr;
  run_on_all_ranks(comm, [&] {
    executor = &cluster->start_executor(config, weights, *chosen.backend,
                                        {false, args.comm_timeout_seconds, /*host_exchange=*/true});
  });
  RunnerOptions options;
  options.activation_type = chosen.activation_type;
  options.max_sequences = args.windows_per_step;
  options.max_context = args.window;
  options.use_graphs = false;  // whole windows, no decode steps
  std::optional<ModelRunner> runner;
  run_on_all_ranks(comm, [&] { runner.emplace(config, weights, *chosen.backend, options, executor); });
  Evaluator evaluator(comm, *cluster, *runner, config, args.windows_per_step, args.decode);
  const uint64_t expert_bytes = resident_expert_bytes(config, weights.weight_type);

  // The variants: the reference, then each top-k, then each pruning of the chosen layers.
  std::vector<Variant> variants;
  variants.push_back({variant_name(config.num_experts_per_tok, config),
                      config.num_experts_per_tok,
                      0,
                      {},
                      RoutingPolicy::trained(config),
                      nullptr});
  run_on_all_ranks(comm, [&] {
    for (int64_t k : args.top_k) {
      if (k == config.num_experts_per_tok) continue;  // the reference already
      variants.push_back({variant_name(k, config),
                          k,
                          0,
                          {},
                          RoutingPolicy::make(config, weights, *chosen.backend, k, {}),
                          nullptr});
    }
  });
  std::map<int64_t, std::vector<int64_t>> use;  // calibration rows per (layer, expert), every rank's
  if (!args.prune_percent.empty()) {
    if (root) std::fprintf(stderr, "epic eval: calibration pass over %zu tokens\n", calibration.size());
    const auto before = rows_so_far(*cluster);
    const std::vector<EvalWindow> calibration_windows =
        sliding_windows(static_cast<int64_t>(calibration.size()), args.window, args.window);
    evaluator.run(calibration, calibration_windows, {&variants[0]}, false, expert_bytes);
    for (const auto& [layer, counts] : rows_so_far(*cluster)) {
      std::vector<int64_t> delta = counts;
      const auto earlier = before.find(layer);
      if (earlier != before.end())
        for (size_t e = 0; e < delta.size() && e < earlier->second.size(); ++e)
          delta[e] -= earlier->second[e];
      delta.resize(weights.layers[layer].moe.num_experts, 0);
      const std::vector<std::vector<int64_t>> all = comm.all_gather_v<int64_t>(delta);
      std::vector<int64_t>& total = use[layer];
      total.assign(delta.size(), 0);
      for (const std::vector<int64_t>& rank_counts : all)
        for (size_t e = 0; e < total.size(); ++e) total[e] += rank_counts[e];
    }
    run_on_all_ranks(comm, [&] {
      const std::set<int64_t> layers = pruned_layers(args.prune_layers, weights);
      for (double percent : args.prune_percent) {
        Variant variant;
        variant.top_k = config.num_experts_per_tok;
        variant.prune_percent = percent;
        variant.removed = least_used_experts(use, weights, layers, percent);
        char name[96];
        std::snprintf(
            name, sizeof(name), "pruned %g%% (%s)", percent,
            args.prune_layers == "all" ? "every MoE layer" : ("layers " + args.prune_layers).c_str());
        variant.name = name;
        variant.policy =
            RoutingPolicy::make(config, weights, *chosen.backend, variant.top_k, variant.removed);
        variants.push_back(std::move(variant));
      }
    });
  }

  // Budget variants: the model as trained, with only a budget of experts resident (worker/expert_store.h).
  // Under mpirun each worker's store holds its shard (the budget counts those) and the host exchange
  // computes the rows it receives through it, as epic run does.
  run_on_all_ranks(comm, [&] {
    if (args.expert_budgets.empty()) return;
    const bool cluster_run = comm.size() > 1;
    ExpertInventory hosted = inspect_experts(config, *model.source, args.allow_missing_experts);
    for (auto& [layer, experts] : hosted)
      for (int64_t e = 0; e < experts.num_experts; ++e)
        experts.present[e] = experts.present[e] && cluster->hosts(layer, e) ? 1 : 0;
    for (const std::string& budget : args.expert_budgets) {
      for (const std::string& on_miss : args.on_miss) {
        auto offload = std::make_shared<Variant::Offload>();
        offload->budget = budget;
        offload->on_miss = on_miss;
        offload->store = std::make_unique<ExpertStore>(
            config, *model.source, *chosen.backend,
            expert_store_options({budget, args.expert_tier, args.eviction, on_miss, 0.9, args.prefetch,
                                  on_miss == "read" ? args.admit_per_step : 0, args.host_budget},
                                 hosted, weights.weight_type, args.allow_missing_experts,
                                 /*allow_nonfinite_weights=*/false, [&](int64_t layer, int64_t expert) {
                                   return cluster->hosts(layer, expert);
                                 }));
        MoeExecutor* executor = nullptr;
        if (cluster_run) {
          offload->exchange = std::make_unique<ExpertParallelMoeExecutor>(config, weights, *chosen.backend,
                                                                          comm, cluster->table());
          offload->exchange->set_expert_store(offload->store.get(), parse_on_miss(on_miss));
          executor = offload->exchange.get();
        } else {
          offload->executor =
              std::make_unique<OffloadingMoeExecutor>(config, weights, *chosen.backend, *offload->store,
                                                      parse_on_miss(on_miss), parse_prefetch(args.prefetch));
          executor = offload->executor.get();
        }
        offload->runner = std::make_unique<ModelRunner>(config, weights, *chosen.backend, options, executor);
        Variant variant;
        variant.name = "budget " + budget + " (" + on_miss + ")";
        variant.top_k = config.num_experts_per_tok;
        variant.policy = RoutingPolicy::trained(config);
        variant.offload = std::move(offload);
        variants.push_back(std::move(variant));
      }
    }
  });

  if (root)
    std::fprintf(
        stderr,
        "epic eval: %s, backend %s, %zu tokens in %zu windows of %lld (stride %lld), %zu variant(s)\n",
        model.description.c_str(), chosen.description.c_str(), tokens.size(), windows.size(),
        static_cast<long long>(args.window), static_cast<long long>(stride), variants.size());
  std::vector<const Variant*> order;
  for (const Variant& variant : variants) order.push_back(&variant);
  comm.barrier();
  std::vector<VariantTotals> mine;
  run_on_all_ranks(comm, [&] { mine = evaluator.run(tokens, windows, order, true, expert_bytes); });

  // The job's figures: sums over ranks, the slowest rank's time.
  const std::vector<std::vector<VariantTotals>> all = comm.all_gather_v<VariantTotals>(mine);
  int64_t present_experts = 0;
  for (const LayerWeights& layer : weights.layers)
    if (layer.is_moe)
      present_experts += std::count(layer.moe.present.begin(), layer.moe.present.end(), uint8_t{1});
  nlohmann::json rows = nlohmann::json::array();
  for (size_t v = 0; v < variants.size(); ++v) {
    VariantTotals job;
    for (const std::vector<VariantTotals>& rank : all) {
      const VariantTotals& r = rank[v];
      job.nll_sum += r.nll_sum;
      job.kl_sum += r.kl_sum;
      job.agreements += r.agreements;
      job.scored += r.scored;
      job.tokens_run += r.tokens_run;
      job.seconds = std::max(job.seconds, r.seconds);
      job.expert_bytes_read += r.expert_bytes_read;
      job.expert_rows_computed += r.expert_rows_computed;
    }
    const Variant& variant = variants[v];
    const int64_t routable = present_experts - variant.policy->num_removed();
    double resident = static_cast<double>(routable) * static_cast<double>(expert_bytes);
    nlohmann::json store_report;
    if (variant.offload) {
      store_report = expert_store_report(
          *variant.offload->store, variant.offload->stats(),
          {variant.offload->budget, args.expert_tier, args.eviction, variant.offload->on_miss, 0.9,
           args.prefetch, variant.offload->on_miss == "read" ? args.admit_per_step : 0, args.host_budget});
      // Under mpirun every worker's store holds its shard: the job's figures are the sums of every rank's
      // report, which the JSON keeps too (rank order).
      const std::string text = store_report.dump();
      std::vector<nlohmann::json> reports;
      for (const std::vector<char>& rank_text : comm.all_gather_v<char>(std::span<const char>(text)))
        reports.push_back(nlohmann::json::parse(rank_text.begin(), rank_text.end()));
      const auto job_sum = [&](const char* key) {
        double sum = 0;
        for (const nlohmann::json& report : reports) sum += report[key].get<double>();
        return sum;
      };
      resident = job_sum("resident_bytes");
      // The experts this variant read are the ones copied into its slots (every pick a row), and with
      // --on-miss read those computed in place from host memory (each at least once per layer and step).
      job.expert_bytes_read =
          job_sum("bytes_from_host") + job_sum("bytes_from_disk") + job_sum("bytes_read_in_place");
      job.expert_rows_computed = 0;
      for (int64_t picks : comm.all_gather_value(variant.offload->stats().picks))
        job.expert_rows_computed += picks;
      if (reports.size() > 1) store_report["ranks"] = reports;
    }
    const TokenQuality quality{job.nll_sum, job.kl_sum, job.agreements, job.scored};
    rows.push_back({{"variant", variant.name},
                    {"experts_per_token", variant.top_k},
                    {"prune_percent", variant.prune_percent},
                    {"experts_removed", variant.policy->num_removed()},
                    {"perplexity", quality.perplexity()},
                    {"mean_nll", job.scored > 0 ? job.nll_sum / double(job.scored) : 0.0},
                    {"kl_vs_reference", quality.mean_kl()},
                    {"top1_agreement", quality.top1_agreement()},
                    {"scored_tokens", job.scored},
                    {"tokens_run", job.tokens_run},
                    {"seconds", job.seconds},
                    {"tokens_per_s", job.seconds > 0 ? double(job.tokens_run) / job.seconds : 0.0},
                    {"expert_bytes_resident", resident},
                    {"expert_bytes_read", job.expert_bytes_read},
                    {"expert_bytes_read_per_token",
                     job.tokens_run > 0 ? job.expert_bytes_read / double(job.tokens_run) : 0.0},
                    {"expert_rows_per_token",
                     job.tokens_run > 0 ? double(job.expert_rows_computed) / double(job.tokens_run) : 0.0}});
    if (variant.offload) rows.back()["expert_store"] = store_report;
  }
  if (!root) return 0;
  std::printf("%-34s %6s %11s %10s %8s %13s %11s %10s\n", "variant", "top-k", "perplexity", "KL (nats)",
              "top-1", "experts (MB)", "read B/tok", "tokens/s");
  for (const nlohmann::json& row : rows)
    std::printf("%-34s %6lld %11.4f %10.5f %8.4f %13.2f %11.0f %10.0f\n",
                row["variant"].get<std::string>().c_str(),
                static_cast<long long>(row["experts_per_token"].get<int64_t>()),
                row["perplexity"].get<double>(), row["kl_vs_reference"].get<double>(),
                row["top1_agreement"].get<double>(), row["expert_bytes_resident"].get<double>() / 1e6,
                row["expert_bytes_read_per_token"].get<double>(), row["tokens_per_s"].get<double>());
  // One line per worker's store (under mpirun each holds its shard).
  for (const nlohmann::json& row : rows) {
    if (!row.contains("expert_store")) continue;
    const nlohmann::json& store = row["expert_store"];
    if (!store.contains("ranks")) {
      std::printf("%s: %s", row["variant"].get<std::string>().c_str(), expert_store_summary(store).c_str());
      continue;
    }
    for (size_t r = 0; r < store["ranks"].size(); ++r)
      std::printf("%s, rank %zu: %s", row["variant"].get<std::string>().c_str(), r,
                  expert_store_summary(store["ranks"][r]).c_str());
  }
  std::printf("%lld tokens scored in %zu windows of %lld (stride %lld) on %d rank(s); %s; %s\n",
              static_cast<long long>(rows[0]["scored_tokens"].get<int64_t>()), windows.size(),
              static_cast<long long>(args.window), static_cast<long long>(stride), comm.size(),
              model.description.c_str(), chosen.description.c_str());
  if (!args.json_out.empty()) {
    nlohmann::json out{{"model", model.description},
                       {"backend", chosen.description},
                       {"ranks", comm.size()},
                       {"text_file", args.text_file},
                       {"tokens", tokens.size()},
                       {"window", args.window},
                       {"stride", stride},
                       {"windows", windows.size()},
                       {"expert_bytes", expert_bytes},
                       {"variants", rows}};
    if (!args.calibration_file.empty()) {
      out["calibration_file"] = args.calibration_file;
      out["calibration_tokens"] = calibration.size();
      out["prune_layers"] = args.prune_layers;
      nlohmann::json removed = nlohmann::json::object();
      for (const Variant& variant : variants)
        if (variant.prune_percent > 0) {
          nlohmann::json layers = nlohmann::json::object();
          for (const auto& [layer, experts] : variant.removed) layers[std::to_string(layer)] = experts;
          removed[variant.name] = layers;
        }
      out["removed_experts"] = removed;
    }
    files::write_file_atomically(args.json_out, out.dump(2) + "\n", "--json");
  }
  return 0;
}

}  // namespace
}  // namespace epic::cli
