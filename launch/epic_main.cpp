// The `epic` executable: subcommands make-model, run, plan, bench-moe, bench-load, tokenize, detokenize.
// Exit codes: 0 success, 2 bad flags or input, 1 any other failure.
#include <CLI/CLI.hpp>
#include <charconv>
#include <cstdio>
#include <limits>

#include "kernels/error.h"
#include "launch/cli_commands.h"
#include "launch/flag_checks.h"
#include "launch/rank_agreement.h"

namespace epic::cli {

int exit_code_for(ErrorCode code) {
  switch (code) {
    case ErrorCode::kIo:
    case ErrorCode::kInternal:
    case ErrorCode::kTimeout:
    case ErrorCode::kCommunication:
      return 1;
    default:
      return 2;
  }
}

void print_error(const Error& error) {
  std::fprintf(stderr, "epic: error [%s]: %s\n", error_code_name(error.code()), error.what());
  std::fflush(stderr);
}

namespace {

// CLI11 2.1 converts integers with strtoll/strtoull, base 0: "010" is 8, "0x10" is 16, "-1" given
// to an unsigned flag wraps to 2^64-1 and an overflowing value clamps silently. Every integer flag
// goes through this first: plain decimal digits (a leading '-' only where T is signed) inside T's
// range, rewritten without leading zeros; anything else is an error naming the flag's type range.
template <typename T>
CLI::Validator strict_integer() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        T value{};
        const char* end = text.data() + text.size();
        const auto [ptr, error] = std::from_chars(text.data(), end, value);
        if (!text.empty() && error == std::errc() && ptr == end) {
          text = std::to_string(value);
          return "";
        }
        return "\"" + text + "\" is not a decimal integer in [" +
               std::to_string(std::numeric_limits<T>::min()) + ", " +
               std::to_string(std::numeric_limits<T>::max()) + "]";
      },
      "");
}

// The host exchange's dispatch scheme and the node topology (epic run and bench-moe).
// The expert store's flags (launch/expert_budget.h), on epic run and epic eval.
void add_expert_store_flags(CLI::App& command, ExpertStoreFlags& flags) {
  command
      .add_option("--expert-budget", flags.budget,
                  "Experts kept in backend memory: N per MoE layer, P% of each layer's, or total:N over all "
                  "layers; the rest wait in --expert-tier (one process)")
      ->capture_default_str();
  command
      .add_option("--expert-tier", flags.tier,
                  "Where the other experts wait: host (memory) or disk (the checkpoint)")
      ->capture_default_str();
  command
      .add_option("--host-budget", flags.host_budget,
                  "With --expert-tier disk: a pinned host cache of N experts per MoE layer, P% or total:N "
                  "(at least --expert-budget) between the resident experts and the checkpoint")
      ->capture_default_str();
  command.add_option("--eviction", flags.eviction, "lru, lfu or usefulness (decayed routing weights)")
      ->capture_default_str();
  command
      .add_option("--on-miss", flags.on_miss,
                  "wait (copy the expert in), substitute (route to the most probable resident expert) or "
                  "read (compute it from host memory in place, over the bus; copy it in behind the step: "
                  "no stall, no routing read-back, decode graphs kept)")
      ->capture_default_str();
  command
      .add_option("--prefetch", flags.prefetch,
                  "next-layer: after each routing, load the next MoE layer's likely experts; none")
      ->capture_default_str();
  command.add_option("--usefulness-decay", flags.usefulness_decay, "Per step, of the usefulness score")
      ->capture_default_str();
  command
      .add_option("--admit-per-step", flags.admit_per_step,
                  "With --on-miss read: copy at most N of a layer's missed experts into its slots after each "
                  "step, the most wanted (0: every miss); fewer copies when the bus is the limit")
      ->capture_default_str();
}

void add_topology_flags(CLI::App& command, std::string& ep_dispatch, int& ranks_per_node) {
  command
      .add_option(
          "--ep-dispatch", ep_dispatch,
          "Host MoE exchange across nodes: flat (each token-expert row straight to its worker; output "
          "bitwise the same for any placement) or hierarchical (a token crosses between nodes once per "
          "destination node, then fans out inside it; the combine sums inside the node first)")
      ->check(CLI::IsMember({"flat", "hierarchical"}))
      ->capture_default_str();
  command
      .add_option("--ranks-per-node", ranks_per_node,
                  "Treat every N consecutive ranks as one node (default: ranks with the same host name)")
      ->transform(strict_integer<int>());
}

// The model, backend, exchange, placement and store flags of a worker job's rank: epic run's, and
// epic worker's (the same meaning in both).
void add_cluster_flags(CLI::App& command, RunArgs& args) {
  const std::string comm_timeout_help = "Seconds any wait between ranks may take, in (0, " +
                                        std::to_string(static_cast<int64_t>(kMaxCommTimeoutSeconds)) + "]";
  command.add_option("--model", args.model_dir, "Hugging Face model directory (or --random-weights)");
  command.add_option("--random-weights", args.random_weights,
                  "Random weights of a preset (configs/presets), drawn in memory as make-model writes them");
  command.add_option("--layers", args.layers, "With --random-weights: keep the preset's first N layers")
      ->transform(strict_integer<int64_t>());
  command.add_option("--weights-seed", args.weights_seed, "With --random-weights: make-model's --seed")
      ->capture_default_str()
      ->transform(strict_integer<uint64_t>());
  command.add_option("--backend", args.backend, "cpu or cuda (default: cuda where a GPU is visible)")
      ->capture_default_str();
  command.add_option("--device", args.device, "CUDA device (default: the local rank's)")
      ->transform(strict_integer<int>());
  command.add_option("--precision", args.precision,
                  "fp32 (verification; the cpu backend's only mode) or bf16 (serving; default on cuda)")
      ->capture_default_str();
  command.add_flag("--cuda-graphs,!--no-cuda-graphs", args.cuda_graphs,
                "Replay decode steps from captured CUDA graphs (default on)");
  command.add_option(
         "--ep-transport", args.ep_transport,
         "MoE exchange between GPU workers: nccl (device buffers), host (MPI through host memory) or "
         "auto (nccl with --backend cuda, several ranks and NCCL built; host for an --expert-budget that "
         "waits or substitutes on a miss)")
      ->check(CLI::IsMember({"auto", "nccl", "host"}))
      ->capture_default_str();
  command.add_option(
         "--ep-mode", args.ep_mode,
         "NCCL MoE exchange: low-latency (fixed-size blocks, no host read, decode steps captured in "
         "CUDA graphs; every step), normal (counts read on the host each layer), or auto (low-latency "
         "for steps within --ep-low-latency-max-tokens rows per rank, normal beyond)")
      ->check(CLI::IsMember({"auto", "normal", "low-latency"}))
      ->capture_default_str();
  command.add_option("--ep-low-latency-max-tokens", args.ep_low_latency_max_tokens,
                  "The most token rows per rank a low-latency step holds (its buffers are sized for the next "
                  "power of two)")
      ->transform(strict_integer<int64_t>())
      ->capture_default_str();
  command.add_flag(
      "--ep-overlap,!--no-ep-overlap", args.ep_overlap,
      "NCCL normal mode: split each MoE layer's tokens into two micro-batches so one's exchange runs "
      "while the other's experts compute (two-batch overlap; default off)");
  add_topology_flags(command, args.ep_dispatch, args.ranks_per_node);
  add_expert_store_flags(command, args.expert_store);
  command.add_option(
         "--residency-state", args.residency_state,
         "focus: the trained experts per token; wake: 4 per token (fewer expert reads, lower quality: "
         "epic eval --top-k 4 measures it); or one state per prompt, comma-separated (wake,focus,...): each "
         "sequence then routes its own experts per token within the same batch")
      ->capture_default_str();
  command.add_flag("--allow-missing-experts", args.allow_missing_experts,
                "Mask experts absent from the checkpoint out of routing instead of failing");
  command.add_flag("--allow-nonfinite-weights", args.allow_nonfinite_weights,
                "Load weights holding NaN or Inf instead of failing (the run stops at non-finite logits)");
  command.add_option("--slots", args.slots,
                  "Expert slots per worker per MoE layer (spare slots hold replicas)")
      ->transform(strict_integer<int64_t>());
  command.add_option("--budget-bytes", args.budget_bytes, "Expert memory per worker, instead of --slots")
      ->transform(strict_integer<uint64_t>());
  command.add_option("--load-profile", args.load_profile,
                  "Plan the placement from this load profile (JSON)");
  command.add_option("--comm-timeout", args.comm_timeout_seconds, comm_timeout_help)->capture_default_str();
  command.add_option("--max-active-sequences", args.max_active_sequences,
                  "Sequences each worker prefills/decodes at once; the rest wait (bounds KV cache memory)")
      ->transform(strict_integer<int64_t>())
      ->capture_default_str();


  command.add_option("--prefill-chunk", args.prefill_chunk_tokens,
                     "Prompt tokens a step feeds at most over all prefilling sequences, so long prompts do not "
                     "stall running decodes (0: each prompt in one step)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  command.add_option("--kv-cache-tokens", args.kv_cache_tokens,
                     "Positions each worker's KV cache holds for all live sequences together; a sequence joins "
                     "only when its longest possible cache fits (0: max-active-sequences x the context)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
}

}  // namespace
}  // namespace epic::cli

int main(int argc, char** argv) {
  using namespace epic::cli;
  const std::string comm_timeout_help = "Seconds any wait between ranks may take, in (0, " +
                                        std::to_string(static_cast<int64_t>(kMaxCommTimeoutSeconds)) + "]";
  CLI::App app{"epic: Expert-Parallel Inference Cluster for Mixture-of-Experts models"};
  app.require_subcommand(1);

  MakeModelArgs make_args;
  CLI::App* make =
      app.add_subcommand("make-model", "Write a random checkpoint from a preset in configs/presets");
  make->add_option("--preset", make_args.preset,
                   "Preset name (tiny, qwen3-30b-a3b, qwen3-omni-30b-a3b-thinker) or file")
      ->required();
  make->add_option("--out", make_args.out_dir, "Output model directory (new or empty)")->required();
  make->add_option("--seed", make_args.seed, "Random seed; same seed, same weights")
      ->transform(strict_integer<uint64_t>())
      ->capture_default_str();
  make->add_option("--tokenizer", make_args.tokenizer_json,
                   "tokenizer.json to copy (default: the Qwen3 one set-up installed)");
  make->add_option("--layers", make_args.layers, "Keep only the first N layers (a slice of a large preset)")
      ->transform(strict_integer<int64_t>());
  make->add_flag("--force", make_args.force,
                 "Replace an earlier make-model output in --out (other files there are still refused)");

  RunArgs run_args;
  CLI::App* run = app.add_subcommand("run", "Generate from a prompt (one-shot job)");
  add_cluster_flags(*run, run_args);
  auto* prompt = run->add_option("--prompt", run_args.prompt, "Prompt text (needs DIR/tokenizer.json)");
  auto* prompt_ids = run->add_option("--prompt-ids", run_args.prompt_ids, "Prompt token ids, e.g. 1,2,3");
  auto* prompts_file =
      run->add_option("--prompts-file", run_args.prompts_file, "File with one text prompt per line");
  auto* prompt_ids_file = run->add_option("--prompt-ids-file", run_args.prompt_ids_file,
                                          "File with one id list (1,2,3) per line");
  prompt->excludes(prompt_ids)->excludes(prompts_file)->excludes(prompt_ids_file);
  prompt_ids->excludes(prompts_file)->excludes(prompt_ids_file);
  prompts_file->excludes(prompt_ids_file);
  run->add_option("--max-new-tokens", run_args.max_new_tokens,
                  "Tokens to generate; prompt + these must fit max_position_embeddings")
      ->transform(strict_integer<int64_t>())
      ->capture_default_str();
  run->add_option("--temperature", run_args.temperature, "0 = greedy")->capture_default_str();
  run->add_option("--top-p", run_args.top_p, "Nucleus sampling mass in (0, 1]")->capture_default_str();
  run->add_option("--seed", run_args.seed, "Sampling seed")
      ->transform(strict_integer<uint64_t>())
      ->capture_default_str();
  run->add_option("--logits-out", run_args.logits_out,
                  "Write prompt logits [prompt_len, vocab] as float32 .npy");
  run->add_option("--load-profile-out", run_args.load_profile_out,
                  "Write tokens per (layer, expert) as JSON");
  run->add_option("--placement-out", run_args.placement_out, "Write the placement plan used, as JSON");
  run->add_option("--report-out", run_args.report_out,
                  "Write the per-worker report (bytes, phase times) as JSON");  WorkerArgs worker_args;
  CLI::App* worker = app.add_subcommand(
      "worker", "One rank of the worker job epic serve drives (started by epic serve, or apart for --attach)");
  add_cluster_flags(*worker, worker_args.run);
  worker_args.run.prefill_chunk_tokens = 512;  // a server's default (epic serve passes its own)
  worker->add_option("--coordinator", worker_args.coordinator, "HOST:PORT where epic serve listens for workers")
      ->required();
  worker->add_option("--max-context", worker_args.max_context, "Positions per sequence (epic serve's --max-context)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  worker->add_option("--connect-timeout", worker_args.connect_timeout_seconds,
                     "Seconds to keep trying to reach the coordinator")
      ->capture_default_str();

  PlanArgs plan_args;
  CLI::App* plan =
      app.add_subcommand("plan", "Plan the expert placement over N workers and print it as JSON");
  plan->add_option("--model", plan_args.model_dir, "Hugging Face model directory")->required();
  plan->add_option("--workers", plan_args.workers, "Number of workers, 1 to " + std::to_string(kMaxWorkers))
      ->transform(strict_integer<int>())
      ->required();
  auto* plan_slots = plan->add_option("--slots", plan_args.slots, "Expert slots per worker per MoE layer")
                         ->transform(strict_integer<int64_t>());
  auto* plan_budget = plan->add_option("--budget-bytes", plan_args.budget_bytes, "Expert memory per worker")
                          ->transform(strict_integer<uint64_t>());
  plan_slots->excludes(plan_budget);
  plan->add_option("--load-profile", plan_args.load_profile,
                   "Load profile JSON from `epic run --load-profile-out`");
  plan->add_option("--expert-budget", plan_args.expert_budget,
                   "Also print, per layer, what each worker's hottest experts would serve with this budget "
                   "resident (N, P% or total:N)");
  plan->add_flag("--allow-missing-experts", plan_args.allow_missing_experts,
                 "Leave missing experts unplaced");
  plan->add_option("--out", plan_args.out, "Also save the plan JSON to this file");
  plan->add_option("--ranks-per-node", plan_args.ranks_per_node,
                   "Workers per node: replicas spread over nodes, and the expected bytes crossing between "
                   "nodes per token (flat and hierarchical dispatch) are reported")
      ->transform(strict_integer<int>());

  BenchMoeArgs bench_args;
  CLI::App* bench = app.add_subcommand("bench-moe", "Time MoE layers across the ranks of the job, per phase");
  bench->add_option("--preset", bench_args.preset, "Shapes from this preset")->capture_default_str();
  bench
      ->add_option("--tokens-per-worker", bench_args.tokens_per_worker,
                   "Token rows each worker routes, 0 to " + std::to_string(kMaxBenchTokensPerWorker))
      ->transform(strict_integer<int64_t>())
      ->capture_default_str();
  bench->add_option("--layers", bench_args.layers, "MoE layers per iteration, 1 to the preset's layer count")
      ->transform(strict_integer<int64_t>())
      ->capture_default_str();
  bench
      ->add_option("--iterations", bench_args.iterations,
                   "Timed iterations, 1 to " + std::to_string(kMaxBenchIterations))
      ->transform(strict_integer<int64_t>())
      ->capture_default_str();
  bench
      ->add_option("--warmup", bench_args.warmup,
                   "Untimed iterations first, 0 to " + std::to_string(kMaxBenchIterations))
      ->transform(strict_integer<int64_t>())
      ->capture_default_str();
  bench->add_flag(
      "--cuda-graphs", bench_args.cuda_graphs,
      "One worker on a GPU: replay each timed iteration from a CUDA graph, as decode steps run "
      "(no launch cost; from 8192 expert rows the FFN then stays on the device-scheduled kernels)");
  bench->add_option("--slots", bench_args.slots, "Expert slots per worker per layer (spare slots: replicas)")
      ->transform(strict_integer<int64_t>());
  bench->add_option("--seed", bench_args.seed, "Seed of the random weights and tokens")
      ->transform(strict_integer<uint64_t>())
      ->capture_default_str();
  bench
      ->add_option(
          "--threads", bench_args.threads,
          "CPU threads per rank, 0 to " + std::to_string(kMaxThreads) + " (0: cores / ranks on the node)")
      ->transform(strict_integer<int>());
  bench->add_option("--backend", bench_args.backend, "cpu, cuda or auto")->capture_default_str();
  bench->add_option("--device", bench_args.device, "CUDA device (default: the local rank's)")
      ->transform(strict_integer<int>());
  bench->add_option("--precision", bench_args.precision, "fp32 or bf16 (cuda; default bf16 there)")
      ->capture_default_str();
  bench->add_flag("--check,!--no-check", bench_args.check,
                  "Check the layers' output after timing (default): the data plane exactly with identity "
                  "experts, and a sample of each worker's expert rows against a host FFN; a worker with "
                  "wrong elements fails the run (exit 1)");
  bench
      ->add_option(
          "--ep-transport", bench_args.ep_transport,
          "MoE exchange between GPU workers: nccl (device buffers), host (MPI through host memory) or "
          "auto (nccl with --backend cuda, several ranks and NCCL built; one GPU: no exchange)")
      ->check(CLI::IsMember({"auto", "nccl", "host"}))
      ->capture_default_str();
  bench
      ->add_option("--ep-mode", bench_args.ep_mode,
                   "With nccl: normal (counts read on the host per layer) or low-latency (fixed-size blocks "
                   "sized for --tokens-per-worker, at most 4096; a host wait per call to time its phases)")
      ->check(CLI::IsMember({"normal", "low-latency"}))
      ->capture_default_str();
  add_topology_flags(*bench, bench_args.ep_dispatch, bench_args.ranks_per_node);
  bench->add_flag("--ep-overlap,!--no-ep-overlap", bench_args.ep_overlap,
                  "With nccl, normal mode: two-batch overlap of the exchanges with the expert compute");
  bench->add_flag(
      "--baseline,!--no-baseline", bench_args.baseline,
      "With nccl (default on): also time NCCL's own all_to_all_v of each layer's dispatch and "
      "combine bytes, and NCCL send/recv between rank pairs (the link), and print ours against them");
  // Test-only fault injection, hidden from --help (group ""): see BenchMoeArgs::inject_wrong_row_rank.
  bench->add_option("--inject-wrong-row", bench_args.inject_wrong_row_rank)
      ->transform(strict_integer<int>())
      ->group("");
  bench->add_option("--csv", bench_args.csv_out, "Append one CSV line per worker to this file");
  bench->add_option("--json", bench_args.json_out, "Write the results as JSON");
  bench->add_option("--comm-timeout", bench_args.comm_timeout_seconds, comm_timeout_help)
      ->capture_default_str();

  BenchLoadArgs load_args;
  CLI::App* bench_load =
      app.add_subcommand("bench-load", "Time loading a checkpoint onto the CPU against reading its files");
  bench_load->add_option("--model", load_args.model_dir, "Hugging Face model directory")->required();
  bench_load
      ->add_option("--threads", load_args.threads,
                   "Reader threads, 0 to " + std::to_string(kMaxThreads) + " (0: min(8, cores))")
      ->transform(strict_integer<int>());
  bench_load->add_option("--backend", load_args.backend, "Load onto cpu or cuda")->capture_default_str();
  bench_load->add_option("--device", load_args.device, "CUDA device")->transform(strict_integer<int>());
  bench_load->add_flag("--allow-nonfinite-weights", load_args.allow_nonfinite_weights,
                       "Load NaN/Inf weights instead of failing");

  BenchDecodeArgs decode_args;
  CLI::App* bench_decode =
      app.add_subcommand("bench-decode",
                         "Time whole-model decode steps of a batch (and a long prefill) on one process, or "
                         "expert parallel under "
                         "mpirun (each rank its own batch, one GPU per rank, the MoE exchange over NCCL)");
  bench_decode->add_option("--model", decode_args.model_dir,
                           "Hugging Face model directory (or --random-weights)");
  bench_decode->add_option("--random-weights", decode_args.random_weights,
                           "Random weights of a preset, in memory");
  bench_decode
      ->add_option("--layers", decode_args.layers, "With --random-weights: the preset's first N layers")
      ->transform(strict_integer<int64_t>());
  bench_decode->add_option("--weights-seed", decode_args.weights_seed, "make-model's --seed")
      ->capture_default_str()
      ->transform(strict_integer<uint64_t>());
  bench_decode->add_option("--backend", decode_args.backend, "cpu, cuda or auto")->capture_default_str();
  bench_decode->add_option("--device", decode_args.device, "CUDA device")->transform(strict_integer<int>());
  bench_decode->add_option("--precision", decode_args.precision, "fp32 or bf16")->capture_default_str();
  bench_decode->add_option("--batch", decode_args.batches, "Sequences decoded together, e.g. 1,16,64,256")
      ->delimiter(',');
  bench_decode->add_option("--prompt-tokens", decode_args.prompt_tokens, "Prompt length of each sequence")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  bench_decode->add_option("--new-tokens", decode_args.new_tokens, "Tokens generated per sequence")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  bench_decode->add_option("--prefill-tokens", decode_args.prefill_tokens, "Also time one prefill this long")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  bench_decode->add_flag("--cuda-graphs,!--no-cuda-graphs", decode_args.cuda_graphs, "Replay decode graphs");
  bench_decode->add_option("--json", decode_args.json_out, "Also write the results as a JSON array");
  bench_decode->add_option("--comm-timeout", decode_args.comm_timeout_seconds, comm_timeout_help)
      ->capture_default_str();
  bench_decode
      ->add_option(
          "--expert-budget", decode_args.expert_budgets,
          "Also decode with only this budget of experts resident (N, P% or total:N; a list, e.g. 50%,25%), "
          "each against every expert resident")
      ->delimiter(',');
  bench_decode->add_option("--expert-tier", decode_args.expert_tier, "host or disk")->capture_default_str();
  bench_decode
      ->add_option(
          "--host-budget", decode_args.host_budget,
          "With --expert-tier disk: a pinned host cache of N, P% or total:N experts (at least the budget)")
      ->capture_default_str();
  bench_decode->add_option("--eviction", decode_args.eviction, "lru, lfu or usefulness")
      ->capture_default_str();
  bench_decode->add_option("--on-miss", decode_args.on_miss, "wait, substitute or read")
      ->capture_default_str();
  bench_decode->add_option("--prefetch", decode_args.prefetch, "next-layer or none")->capture_default_str();
  bench_decode
      ->add_option("--admit-per-step", decode_args.admit_per_step,
                   "With --on-miss read: at most N of a layer's missed experts copied in per step (0: all)")
      ->capture_default_str();
  bench_decode->add_flag("--allow-missing-experts", decode_args.allow_missing_experts,
                         "Mask experts the checkpoint lacks out of routing instead of failing");
  bench_decode->add_option(
      "--prompts-from", decode_args.prompts_from,
      "Prompts are consecutive tokens of this text (--model's tokenizer) instead of random ids");
  bench_decode->add_flag(
      "--ep-overlap,!--no-ep-overlap", decode_args.ep_overlap,
      "Under mpirun with NCCL: two-batch overlap of the normal-mode MoE exchanges (prefill)");

  EvalArgs eval_args;
  CLI::App* eval = app.add_subcommand(
      "eval",
      "Score a text with the model (perplexity over sliding windows) and compare cheaper ways to run it "
      "with the model as trained: fewer experts per token (--top-k) or experts pruned by least use "
      "(--prune): KL divergence, top-1 agreement, tokens/s, expert bytes; also under mpirun");
  eval->add_option("--model", eval_args.model_dir, "Hugging Face model directory (with tokenizer.json)")
      ->required();
  eval->add_option("--text-file", eval_args.text_file, "The text to score (UTF-8)")->required();
  eval->add_option("--window", eval_args.window, "Tokens each window reads")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  eval->add_option("--stride", eval_args.stride, "Tokens a window advances (default: half the window)")
      ->transform(strict_integer<int64_t>());
  eval->add_option("--max-tokens", eval_args.max_tokens, "Score only the text's first N tokens (0: all)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  eval->add_option("--windows-per-step", eval_args.windows_per_step, "Windows each rank runs in one step")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  eval->add_flag("--decode", eval_args.decode,
                 "Score token by token as generation runs (one decode step per token after the window's "
                 "context), so an expert budget's residency behaves as in generation; slower");
  eval->add_option("--top-k", eval_args.top_k,
                   "Experts per token to compare with the trained top-k, e.g. 6,4,2,1 (wake = 4)")
      ->delimiter(',');
  eval->add_option("--prune", eval_args.prune_percent,
                   "Percents of each pruned layer's experts to remove by least use, e.g. 10,25,50")
      ->delimiter(',');
  eval->add_option("--prune-layers", eval_args.prune_layers, "all, or MoE layer indices, e.g. 2,5")
      ->capture_default_str();
  eval->add_option("--calibration-file", eval_args.calibration_file,
                   "With --prune: the text whose routing counts decide which experts are used least");
  eval->add_option(
          "--expert-budget", eval_args.expert_budgets,
          "Variants with only this budget of experts resident: N per layer, P% or total:N, e.g. 25%,50%")
      ->delimiter(',');
  eval->add_option("--on-miss", eval_args.on_miss, "For the budget variants: wait, substitute and/or read")
      ->delimiter(',')
      ->capture_default_str();
  eval->add_option("--expert-tier", eval_args.expert_tier, "For the budget variants: host or disk")
      ->capture_default_str();
  eval->add_option("--prefetch", eval_args.prefetch, "For the budget variants: next-layer or none")
      ->capture_default_str();
  eval->add_option(
          "--admit-per-step", eval_args.admit_per_step,
          "For the read budget variants: at most N of a layer's missed experts copied in per step (0: all)")
      ->capture_default_str();
  eval->add_option(
          "--host-budget", eval_args.host_budget,
          "For the budget variants with --expert-tier disk: a pinned host cache of N, P% or total:N experts")
      ->capture_default_str();
  eval->add_option("--eviction", eval_args.eviction, "For the budget variants: lru, lfu or usefulness")
      ->capture_default_str();
  eval->add_flag("--allow-missing-experts", eval_args.allow_missing_experts,
                 "Mask experts the checkpoint lacks out of routing instead of failing");
  eval->add_option("--backend", eval_args.backend, "cpu, cuda or auto")->capture_default_str();
  eval->add_option("--device", eval_args.device, "CUDA device")->transform(strict_integer<int>());
  eval->add_option("--precision", eval_args.precision, "fp32 or bf16 (auto: bf16 on cuda)")
      ->capture_default_str();
  eval->add_option("--json", eval_args.json_out, "Also write the table as JSON");
  eval->add_option("--comm-timeout", eval_args.comm_timeout_seconds, comm_timeout_help)
      ->capture_default_str();

  ServeArgs serve_args;
  CLI::App* serve = app.add_subcommand("serve", "Serve the model over an OpenAI-compatible HTTP API");
  serve->add_option("--model", serve_args.model_dir, "Hugging Face model directory (with tokenizer.json)")
      ->required();
  serve->add_option("--served-model-name", serve_args.served_model_name,
                    "The name requests give as \"model\" (default: the folder's name)");
  serve->add_option("--host", serve_args.host, "Address to listen on")->capture_default_str();
  serve->add_option("--port", serve_args.port, "Port (0: any free one)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  serve
      ->add_option("--workers", serve_args.workers,
                   "Run the model in a worker job of N ranks (mpirun, or srun in a Slurm allocation) that is "
                   "restarted if it dies; 0: in this process")
      ->capture_default_str()
      ->transform(strict_integer<int>());
  serve->add_flag("--attach", serve_args.attach,
                  "Wait for a worker job started apart (`epic worker --coordinator HOST:PORT ...` under srun or "
                  "mpirun) to connect to --worker-host:--worker-port");
  serve->add_option("--worker-launcher", serve_args.worker_launcher,
                    "How --workers starts the job: mpirun, srun, or auto (srun inside a Slurm allocation); "
                    "extra options from EPIC_MPIRUN_ARGS / EPIC_SRUN_ARGS")
      ->check(CLI::IsMember({"auto", "mpirun", "srun"}))
      ->capture_default_str();
  serve->add_option("--worker-host", serve_args.worker_host, "Address the coordinator listens on for its workers")
      ->capture_default_str();
  serve->add_option("--worker-port", serve_args.worker_port, "Port for the workers (0: any free one; --attach needs one)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  serve->add_option("--worker-start-timeout", serve_args.worker_start_timeout_seconds,
                    "Seconds from starting the worker job to every rank connected (loading included)")
      ->capture_default_str();
  serve->add_option("--worker-step-timeout", serve_args.worker_step_timeout_seconds,
                    "Seconds a step or a heartbeat may take before the worker job counts as dead")
      ->capture_default_str();
  serve->add_option("--heartbeat", serve_args.heartbeat_seconds, "Seconds between pings of an idle worker job")
      ->capture_default_str();
  serve->add_option("--max-worker-restarts", serve_args.max_worker_restarts,
                    "Restarts in a row without a completed step before the server gives up")
      ->capture_default_str()
      ->transform(strict_integer<int>());
  serve->add_option("--prefill-chunk", serve_args.prefill_chunk_tokens,
                    "Prompt tokens a step feeds at most, so long prompts do not stall running streams (0: whole)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  serve->add_option("--kv-cache-tokens", serve_args.kv_cache_tokens,
                    "Positions each worker's KV cache holds for all live sequences; requests wait for room "
                    "(0: max-active-sequences x max-context)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  serve->add_option("worker_flags", serve_args.worker_flags,
                    "After --: flags for every `epic worker` (epic run's model, exchange and placement flags)");
  serve
      ->add_option("--max-active-sequences", serve_args.max_active_sequences,
                   "Sequences in the running batch at once; more wait")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  serve->add_option("--max-context", serve_args.max_context, "Positions per sequence (prompt + completion)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  serve->add_option("--max-queued", serve_args.max_queued, "Requests waiting beyond those; more get 429")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  serve
      ->add_option("--default-max-tokens", serve_args.default_max_tokens,
                   "max_tokens of a request that gives none (capped to the context left)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  serve->add_option("--max-body-bytes", serve_args.max_body_bytes, "Largest request body (413 past it)")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  serve
      ->add_option("--shutdown-grace", serve_args.shutdown_grace_seconds,
                   "On SIGTERM/SIGINT, seconds running requests may take to finish")
      ->capture_default_str();
  serve->add_flag("--allow-missing-experts", serve_args.allow_missing_experts,
                  "Mask experts absent from the checkpoint out of routing instead of failing");
  serve->add_option("--backend", serve_args.backend, "auto, cpu or cuda")->capture_default_str();
  serve->add_option("--device", serve_args.device, "CUDA device")->transform(strict_integer<int>());
  serve->add_option("--precision", serve_args.precision, "fp32 or bf16 (auto: bf16 on cuda)")
      ->capture_default_str();

  BenchSchedulerArgs scheduler_args;
  CLI::App* bench_scheduler = app.add_subcommand(
      "bench-scheduler", "Time epic serve's scheduler a step over real HTTP streams, the engine an instant fake");
  bench_scheduler->add_option("--tokenizer", scheduler_args.tokenizer_json, "A tokenizer.json")->required();
  bench_scheduler->add_option("--streams", scheduler_args.streams, "Concurrent streams, e.g. 64,256")
      ->capture_default_str();
  bench_scheduler->add_option("--tokens", scheduler_args.tokens, "Tokens per stream")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  bench_scheduler->add_option("--step-us", scheduler_args.step_us, "How long each fake engine step takes")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  bench_scheduler->add_option("--json", scheduler_args.json_out, "Also write the figures as JSON");

  BenchServeArgs bench_serve_args;
  CLI::App* bench_serve =
      app.add_subcommand("bench-serve", "Load a running epic serve with concurrent streaming clients");
  bench_serve->add_option("--url", bench_serve_args.url, "The server")->capture_default_str();
  bench_serve->add_option("--model-name", bench_serve_args.model_name, "The served model's name")
      ->capture_default_str();
  bench_serve->add_option("--prompts-file", bench_serve_args.prompts_file, "One text prompt a line");
  bench_serve->add_option("--prompt-ids-file", bench_serve_args.prompt_ids_file, "One id list (1,2,3) a line");
  bench_serve->add_option("--clients", bench_serve_args.clients, "Concurrent streaming clients")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  bench_serve->add_option("--requests", bench_serve_args.requests_per_client, "Requests each client sends")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  bench_serve->add_option("--max-tokens", bench_serve_args.max_tokens, "max_tokens of every request")
      ->capture_default_str()
      ->transform(strict_integer<int64_t>());
  bench_serve->add_option("--temperature", bench_serve_args.temperature, "0 = greedy")->capture_default_str();
  bench_serve->add_option("--json", bench_serve_args.json_out, "Also write the figures as JSON");

  TokenizeArgs tokenize_args;
  CLI::App* tokenize = app.add_subcommand("tokenize", "Print the token ids of a text");
  tokenize->add_option("--model", tokenize_args.model_dir, "Directory holding tokenizer.json")->required();
  auto* text = tokenize->add_option("--text", tokenize_args.text, "Text to encode");
  auto* file = tokenize->add_option("--file", tokenize_args.file, "File whose contents to encode");
  text->excludes(file);

  DetokenizeArgs detokenize_args;
  CLI::App* detokenize = app.add_subcommand("detokenize", "Print the text of token ids");
  detokenize->add_option("--model", detokenize_args.model_dir, "Directory holding tokenizer.json")
      ->required();
  detokenize->add_option("--ids", detokenize_args.ids, "Token ids, e.g. 1,2,3")->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    const int code = app.exit(e);
    return code == 0 ? 0 : 2;
  }
  try {
    if (*make) return make_model_command(make_args);
    if (*run) return run_command(run_args);
    if (*plan) return plan_command(plan_args);
    if (*bench) return bench_moe_command(bench_args);
    if (*bench_load) return bench_load_command(load_args);
    if (*bench_decode) return bench_decode_command(decode_args);
    if (*eval) return eval_command(eval_args);
    if (*tokenize) return tokenize_command(tokenize_args);
    if (*serve) return serve_command(serve_args);
    if (*worker) return worker_command(worker_args);
    if (*bench_scheduler) return bench_scheduler_command(scheduler_args);
    if (*bench_serve) return bench_serve_command(bench_serve_args);
    if (*detokenize) return detokenize_command(detokenize_args);
  } catch (const SilentFailure& failure) {
    return failure.exit_code;  // rank 0 reports an error that every rank raised
  } catch (const epic::Error& e) {
    print_error(e);
    return exit_code_for(e.code());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "epic: error [internal]: %s\n", e.what());
    return 1;
  }
  return 2;
}
