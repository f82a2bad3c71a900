// `epic bench-decode`: whole-model generation speed: a batch of sequences prefilled together, then
// decode steps timed (replayed from CUDA graphs unless --no-cuda-graphs), and optionally one long
// prefill timed on its own. Under mpirun, expert parallel (bench_decode_cluster.h): each rank its own
// batch and a shard of the experts, tokens/s of the whole job from the slowest rank's time. Random weights of
// a preset drawn in memory
// (--random-weights) or a checkpoint (--model). Prints one JSON object per measurement; the
// roofline of the same shapes comes from launch/bench/roofline.py.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>
#include <random>

#include "comm/communicator.h"
#include "coordinator/tokenizer.h"
#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/backend_choice.h"
#include "launch/bench_decode_cluster.h"
#include "launch/cli_commands.h"
#include "launch/cpu_threads.h"
#include "launch/expert_budget.h"
#include "launch/flag_checks.h"
#include "launch/model_source.h"
#include "launch/rank_agreement.h"
#include "worker/generation_loop.h"
#include "worker/model_runner.h"
#include "worker/model_weights.h"
#include "worker/offloading_moe_executor.h"

namespace epic::cli {
namespace {

using clock_type = std::chrono::steady_clock;
namespace fs = std::filesystem;

double seconds_since(clock_type::time_point start) {
  return std::chrono::duration<double>(clock_type::now() - start).count();
}

std::vector<int32_t> random_prompt(std::mt19937_64& generator, int64_t length, int64_t vocab) {
  std::uniform_int_distribution<int32_t> token(0, static_cast<int32_t>(vocab - 1));
  std::vector<int32_t> ids(length);
  for (int32_t& id : ids) id = token(generator);
  return ids;
}

// FLOPs of a prefill of `tokens` tokens of one sequence: every matrix product (projections,
// router, top-k experts, attention scores and values over the causal triangle, lm_head of the
// last token), 2 per multiply-add.
double prefill_flops(const ModelConfig& c, int64_t tokens) {
  const double t = static_cast<double>(tokens), h = c.hidden_size, d = c.head_dim;
  const double q = c.num_attention_heads * d, kv = c.num_key_value_heads * d;
  double per_token = 0;
  for (int64_t layer = 0; layer < c.num_hidden_layers; ++layer) {
    per_token += h * (q + 2 * kv) + q * h;
    per_token += c.is_moe_layer(layer)
                     ? h * c.num_experts + c.num_experts_per_tok * 3.0 * h * c.moe_intermediate_size
                     : 3.0 * h * c.intermediate_size;
  }
  const double attention = c.num_hidden_layers * 2.0 * c.num_attention_heads * d * t * (t + 1) / 2;
  return 2 * (t * per_token + attention + h * c.vocab_size);
}

}  // namespace

namespace {

int run_bench_decode(const BenchDecodeArgs& args, Communicator& comm);

}  // namespace

int bench_decode_command(const BenchDecodeArgs& args) {
  for (int64_t batch : args.batches) check_int_flag("--batch", batch, 1, kMaxActiveSequencesBound);
  check_int_flag("--prompt-tokens", args.prompt_tokens, 1, 1 << 20);
  check_int_flag("--new-tokens", args.new_tokens, 3, 1 << 20);
  check_int_flag("--prefill-tokens", args.prefill_tokens, 0, 1 << 20);
  if (!args.json_out.empty()) check_output_flag(args.json_out, "--json");
  check_model_source_flags({args.model_dir, args.random_weights, args.layers, args.weights_seed});
  for (const std::string& budget : args.expert_budgets)
    check_expert_store_flags({budget, args.expert_tier, args.eviction, args.on_miss, 0.9, args.prefetch,
                              args.admit_per_step, args.host_budget});
  if (args.expert_budgets.empty())
    check_expert_store_flags({"", args.expert_tier, args.eviction, args.on_miss, 0.9, args.prefetch,
                              args.admit_per_step, args.host_budget});
  std::unique_ptr<Communicator> comm = make_communicator(CommOptions{args.comm_timeout_seconds});
  if (comm->size() == 1) return run_bench_decode(args, *comm);
  try {
    return run_bench_decode(args, *comm);
  } catch (const Error& e) {
    // Raised on this rank alone (the flags were checked on every rank alike above): the peers may wait in
    // a collective for it, so the whole job ends now, reported once.
    end_job_naming_rank(*comm, e);
  }
}

namespace {

// The host-to-device link's rate as the expert store uses it: pinned staging memory copied into backend
// memory, 256 MiB at a time, one warm-up copy then the best of five (GB/s).
double measured_link_gb_per_s(Backend& backend) {
  constexpr size_t kBytes = size_t{256} << 20;
  const std::unique_ptr<Buffer> staging = backend.allocate_staging(kBytes);
  std::memset(staging->data(), 1, kBytes);
  const OwnedTensor device = backend.new_tensor(ScalarType::kU8, {static_cast<int64_t>(kBytes)});
  backend.copy_from_host(device.view(), 0, staging->data(), kBytes);
  backend.synchronize();
  double best = 0;
  for (int i = 0; i < 5; ++i) {
    const auto start = clock_type::now();
    backend.copy_from_host(device.view(), 0, staging->data(), kBytes);
    backend.synchronize();
    best = std::max(best, static_cast<double>(kBytes) / seconds_since(start) / 1e9);
  }
  return best;
}

int run_bench_decode(const BenchDecodeArgs& args, Communicator& comm) {
  const bool cluster_run = comm.size() > 1, root = comm.rank() == 0;
  EPIC_CHECK(!cluster_run || args.prefill_tokens == 0, ErrorCode::kInvalidArgument,
             "--prefill-tokens times one process; under mpirun (expert parallel) time decode only");
  EPIC_CHECK(cluster_run || !args.ep_overlap, ErrorCode::kInvalidArgument,
             "--ep-overlap overlaps the expert-parallel exchange: run under mpirun with several ranks");
  const ModelSourceFlags source_flags{args.model_dir, args.random_weights, args.layers, args.weights_seed};
  ChosenBackend chosen = choose_backend({args.backend, args.device, args.precision}, launcher_local_rank(),
                                        default_cpu_threads());
  OpenedModel model = open_model(source_flags);
  const ModelConfig& config = model.config;
  Backend& backend = *chosen.backend;
  std::optional<DecodeCluster> cluster;
  if (cluster_run) cluster.emplace(comm, config, *model.source, args.allow_missing_experts);
  nlohmann::json results = nlohmann::json::array();
  // Rank 0 prints; under mpirun its figures are the job's (the slowest rank's time).
  auto emit = [&](nlohmann::json line) {
    line["backend"] = chosen.description;
    line["model"] = model.description;
    line["ranks"] = comm.size();
    if (cluster) line["ep_transport"] = cluster->transport();
    if (!root) return;
    std::printf("%s\n", line.dump().c_str());
    std::fflush(stdout);
    results.push_back(std::move(line));
  };
  const auto slowest = [&](double seconds) {
    const std::vector<double> all = comm.all_gather_value(seconds);
    return *std::max_element(all.begin(), all.end());
  };

  LoadOptions load_options;
  load_options.weight_type = required_weight_type(chosen.activation_type);
  load_options.allow_missing_experts = args.allow_missing_experts;
  if (cluster)
    load_options.hosts_expert = [&](int64_t layer, int64_t expert) { return cluster->hosts(layer, expert); };
  const auto load_start = clock_type::now();
  const ModelWeights weights = load_model_weights(config, *model.source, backend, load_options);
  const double load_seconds = slowest(seconds_since(load_start));
  MoeExecutor* executor = nullptr;
  if (cluster)
    executor =
        &cluster->start_executor(config, weights, backend, {args.ep_overlap, args.comm_timeout_seconds});
  // Per rank: what each worker read and keeps (a worker reads only the experts it hosts).
  const std::vector<uint64_t> bytes_read = comm.all_gather_value<uint64_t>(weights.bytes_read);
  const std::vector<uint64_t> resident_bytes = comm.all_gather_value<uint64_t>(weights.resident_bytes);
  emit({{"name", "load"},
        {"seconds", load_seconds},
        {"bytes_read", weights.bytes_read},
        {"resident_bytes", weights.resident_bytes},
        {"bytes_read_per_rank", bytes_read},
        {"resident_bytes_per_rank", resident_bytes},
        {"gb_per_s", weights.bytes_read / load_seconds / 1e9}});

  // Prompts: random ids, or consecutive tokens of --prompts-from (a real text: a trained model then
  // routes as it does in use, which is what an expert budget's hit rate depends on).
  std::vector<int32_t> text_tokens;
  if (!args.prompts_from.empty()) {
    const fs::path tokenizer = fs::path(args.model_dir) / "tokenizer.json";
    EPIC_CHECK(!args.model_dir.empty() && fs::exists(tokenizer), ErrorCode::kInvalidArgument,
               "--prompts-from needs --model DIR with a tokenizer.json");
    text_tokens = Tokenizer::load(tokenizer).encode(files::read_file(args.prompts_from, "--prompts-from"));
    EPIC_CHECK(static_cast<int64_t>(text_tokens.size()) > args.prompt_tokens, ErrorCode::kInvalidArgument,
               "--prompts-from " + args.prompts_from + ": fewer tokens than --prompt-tokens");
  }
  // The expert budgets to compare with every expert resident: each its own store (under mpirun each rank's
  // holds its shard, behind the same exchange as the all-resident runs) and executor.
  struct Budget {
    std::string name;  // "" = every expert resident
    std::unique_ptr<ExpertStore> store;
    std::unique_ptr<MoeExecutor> executor;
    std::function<OffloadStats()> stats;
  };
  std::vector<Budget> budgets;
  budgets.push_back({"", nullptr, nullptr, {}});
  ExpertInventory hosted;
  if (!args.expert_budgets.empty()) {
    hosted = inspect_experts(config, *model.source, args.allow_missing_experts);
    if (cluster)
      for (auto& [layer, experts] : hosted)
        for (int64_t e = 0; e < experts.num_experts; ++e)
          experts.present[e] = experts.present[e] && cluster->hosts(layer, e) ? 1 : 0;
  }
  for (const std::string& name : args.expert_budgets) {
    std::function<bool(int64_t, int64_t)> hosts_expert;
    if (cluster) hosts_expert = [&](int64_t layer, int64_t expert) { return cluster->hosts(layer, expert); };
    ExpertStoreOptions store_options =
        expert_store_options({name, args.expert_tier, args.eviction, args.on_miss, 0.9, args.prefetch,
                              args.admit_per_step, args.host_budget},
                             hosted, weights.weight_type, args.allow_missing_experts,
                             /*allow_nonfinite_weights=*/false, hosts_expert);
    Budget budget{name,
                  std::make_unique<ExpertStore>(config, *model.source, backend, std::move(store_options)),
                  nullptr,
                  {}};
    if (cluster) {
      DecodeCluster::StoreExecutor made =
          cluster->store_executor(config, weights, backend, *budget.store, parse_on_miss(args.on_miss));
      budget.executor = std::move(made.executor);
      budget.stats = std::move(made.stats);
    } else {
      auto offloading =
          std::make_unique<OffloadingMoeExecutor>(config, weights, backend, *budget.store,
                                                  parse_on_miss(args.on_miss), parse_prefetch(args.prefetch));
      const OffloadingMoeExecutor* view = offloading.get();
      budget.stats = [view] { return view->stats(); };
      budget.executor = std::move(offloading);
    }
    budgets.push_back(std::move(budget));
  }
  // What the bus a budget's misses cross can carry, measured here (the budgets' bus figures are shares of
  // it).
  double link_gb_per_s = 0;
  if (budgets.size() > 1 && backend.memory_space() == MemorySpace::kDevice) {
    link_gb_per_s = measured_link_gb_per_s(backend);
    emit({{"name", "link"}, {"host_to_device_gb_per_s", link_gb_per_s}, {"bytes", 256 << 20}});
  }
  std::map<int64_t, double> all_resident_tokens_per_s;  // by batch
  for (Budget& budget : budgets)
    for (const int64_t batch : args.batches) {
      // Every rank its own prompts (sequences differ between ranks, as in a real job); the same for every
      // budget.
      std::mt19937_64 generator(args.weights_seed + 7 + 1000003ULL * static_cast<uint64_t>(comm.rank()) +
                                batch);
      const ExpertStoreStats before = budget.store ? budget.store->stats() : ExpertStoreStats{};
      // The executor's counts at the first timed decode step (the hit rate of decode alone: a prompt's rows
      // use most experts at once).
      OffloadStats offload_before;
      RunnerOptions options;
      options.activation_type = chosen.activation_type;
      options.max_sequences = batch;
      options.max_context = args.prompt_tokens + args.new_tokens + 1;
      options.use_graphs = args.cuda_graphs;
      options.max_graph_batch = std::max<int64_t>(512, batch);
      ModelRunner runner(config, weights, backend, options,
                         budget.executor ? budget.executor.get() : executor);
      std::vector<std::vector<int32_t>> prompts;
      std::vector<KvSequence> sequences;
      for (int64_t s = 0; s < batch; ++s) {
        if (text_tokens.empty()) {
          prompts.push_back(random_prompt(generator, args.prompt_tokens, config.vocab_size));
        } else {
          const int64_t span = static_cast<int64_t>(text_tokens.size()) - args.prompt_tokens;
          const int64_t at = (s * 7919 * args.prompt_tokens) % span;
          prompts.emplace_back(text_tokens.begin() + at, text_tokens.begin() + at + args.prompt_tokens);
        }
        sequences.push_back(runner.new_sequence());
      }
      std::vector<SequenceChunk> chunks;
      for (int64_t s = 0; s < batch; ++s) chunks.push_back({&sequences[s], prompts[s], false});
      // Under mpirun each step is agreed first (epic run's per-step all-gather, part of the step's time).
      const auto step = [&](int64_t rows, bool decode_only) {
        if (!cluster) return runner.forward_batch(chunks, false);
        const StepAgreement agreement = cluster->agree(runner, rows, decode_only);
        return runner.forward_batch(chunks, false, &agreement);
      };
      comm.barrier();
      const auto prefill_start = clock_type::now();
      StepOutput output = step(batch * args.prompt_tokens, false);
      const double batch_prefill_seconds = slowest(seconds_since(prefill_start));
      // Decode: the first two steps capture the graph (and warm up), the rest are timed.
      std::vector<int32_t> next = output.greedy_ids;
      double timed_seconds = 0;
      int64_t timed_steps = 0;
      for (int64_t i = 0; i < args.new_tokens - 1; ++i) {
        for (int64_t s = 0; s < batch; ++s) {
          EPIC_CHECK(next[s] >= 0, ErrorCode::kInternal, "decode produced non-finite logits");
          chunks[s].tokens = std::span<const int32_t>(&next[s], 1);
        }
        if (i == 2) {
          comm.barrier();  // the timed steps start together
          if (budget.stats) offload_before = budget.stats();
        }
        const auto step_start = clock_type::now();
        output = step(batch, true);
        if (i >= 2) {
          timed_seconds += seconds_since(step_start);
          ++timed_steps;
        }
        next = output.greedy_ids;
      }
      const double batch_seconds = seconds_since(prefill_start);  // prefill and every decode step
      timed_seconds = slowest(timed_seconds);
      const double tokens_per_s = comm.size() * batch * timed_steps / timed_seconds;
      nlohmann::json residency = nullptr;
      if (!budget.store) {
        all_resident_tokens_per_s[batch] = tokens_per_s;
      } else {
        // This batch's share of the store's work (prefill and decode; the timed steps are most of it).
        const ExpertStoreStats after = budget.store->stats();
        const int64_t asked = (after.hits - before.hits) + (after.misses - before.misses);
        const double moved = double(after.bytes_from_host - before.bytes_from_host) +
                             double(after.bytes_from_disk - before.bytes_from_disk);
        const double stalled = after.stall_seconds - before.stall_seconds;
        // The executor's own count over the timed decode steps: each routing pick against what was
        // resident when its step ran (with --on-miss read the store is asked only about misses, so its own
        // hit rate says nothing).
        const OffloadStats offload = budget.stats();
        const int64_t pick_hits = offload.demand_hits - offload_before.demand_hits;
        const int64_t pick_misses = offload.demand_misses - offload_before.demand_misses;
        const double read_in_place = double(offload.bytes_read_in_place - offload_before.bytes_read_in_place);
        residency = {
            {"expert_budget", budget.name},
            // Under mpirun the store figures are rank 0's (its shard); the speed is the job's.
            {"store_of_rank", comm.rank()},
            {"tier", args.expert_tier},
            {"eviction", args.eviction},
            {"on_miss", args.on_miss},
            {"prefetch", args.prefetch},
            {"resident_expert_bytes", after.resident_bytes},
            {"host_tier_bytes", after.host_tier_bytes},
            {"host_budget", args.host_budget},
            {"host_cache_hits", after.host_cache_hits - before.host_cache_hits},
            {"host_cache_misses", after.host_cache_misses - before.host_cache_misses},
            {"hit_rate", asked > 0 ? double(after.hits - before.hits) / double(asked) : 1.0},
            {"misses", after.misses - before.misses},
            {"bytes_moved", moved},
            {"stall_seconds", stalled},
            {"copy_gb_per_s_while_stalled", stalled > 0 ? moved / stalled / 1e9 : 0.0},
            {"pick_hit_rate",
             pick_hits + pick_misses > 0 ? double(pick_hits) / double(pick_hits + pick_misses) : 1.0},
            {"bytes_read_in_place_decode", read_in_place},
            // Bytes copied into slots over the batch's wall time (prefill and decode); the bytes
            // read in place (at least once per expert and step) come on top.
            {"bus_gb_per_s", moved / batch_seconds / 1e9},
            // The decode steps' reads in place as a rate (at least once per expert and step), and both
            // rates as shares of the link measured in this run (0 without a device).
            {"read_in_place_gb_per_s_decode", timed_seconds > 0 ? read_in_place / timed_seconds / 1e9 : 0.0},
            {"link_gb_per_s", link_gb_per_s},
            {"copy_share_of_link", link_gb_per_s > 0 ? moved / batch_seconds / 1e9 / link_gb_per_s : 0.0},
            {"read_share_of_link", link_gb_per_s > 0 && timed_seconds > 0
                                       ? read_in_place / timed_seconds / 1e9 / link_gb_per_s
                                       : 0.0},
            {"tokens_per_s_vs_all_resident", tokens_per_s / all_resident_tokens_per_s[batch]}};
      }
      emit({{"name", "decode"},
            {"expert_budget", budget.name.empty() ? "all" : budget.name},
            {"residency", residency},
            {"batch", batch},
            {"batch_per_rank", batch},
            {"prompt_tokens", args.prompt_tokens},
            {"new_tokens", args.new_tokens},
            {"layers", config.num_hidden_layers},
            {"graphs", args.cuda_graphs},
            {"graph_replays", runner.graph_replays()},
            {"timed_steps", timed_steps},
            {"ms_per_step", timed_seconds / timed_steps * 1e3},
            {"tokens_per_s", tokens_per_s},
            {"batch_prefill_ms", batch_prefill_seconds * 1e3},
            {"kv_cache_bytes", runner.kv_cache_bytes()},
            {"workspace_bytes", runner.workspace_bytes()}});
    }
  if (args.prefill_tokens > 0) {
    RunnerOptions options;
    options.activation_type = chosen.activation_type;
    options.max_sequences = 1;
    options.max_context = args.prefill_tokens;
    ModelRunner runner(config, weights, backend, options);
    std::mt19937_64 generator(args.weights_seed + 7);
    const std::vector<int32_t> prompt = random_prompt(generator, args.prefill_tokens, config.vocab_size);
    std::vector<double> times;
    for (int rep = 0; rep < 4; ++rep) {  // the first sizes the work buffers
      KvSequence sequence = runner.new_sequence();
      const SequenceChunk chunk{&sequence, prompt, false};
      const auto start = clock_type::now();
      runner.forward_batch(std::span<const SequenceChunk>(&chunk, 1), false);
      if (rep > 0) times.push_back(seconds_since(start));
    }
    std::sort(times.begin(), times.end());
    const double median = times[times.size() / 2];
    const double flops = prefill_flops(config, args.prefill_tokens);
    emit({{"name", "prefill"},
          {"tokens", args.prefill_tokens},
          {"layers", config.num_hidden_layers},
          {"ms", median * 1e3},
          {"tflops", flops / median / 1e12},
          {"flops", flops}});
  }
  if (root && !args.json_out.empty())
    files::write_file_atomically(args.json_out, results.dump(2) + "\n", "--json");
  return 0;
}

}  // namespace

}  // namespace epic::cli
