// epic serve (issue 11): an OpenAI-compatible HTTP server (coordinator/http_server.h,
// coordinator/openai_api.h) and the scheduler (coordinator/serve_scheduler.h) driving the model, either
// loaded in this process or in a worker job over TCP (--workers N: launched here and restarted if it dies;
// --attach: started apart; coordinator/remote_step_engine.h). SIGINT/SIGTERM: new requests get 503,
// running ones may finish within --shutdown-grace, then the worker job is stopped and the server exits 0.
#include <pthread.h>
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <filesystem>
#include <optional>
#include <sstream>
#include <thread>

#include "coordinator/http_server.h"
#include "coordinator/openai_api.h"
#include "coordinator/remote_step_engine.h"
#include "coordinator/serve_api.h"
#include "coordinator/serve_scheduler.h"
#include "coordinator/worker_job.h"
#include "coordinator/tokenizer.h"
#include "kernels/error.h"
#include "launch/backend_choice.h"
#include "launch/cli_commands.h"
#include "launch/cpu_threads.h"
#include "launch/flag_checks.h"
#include "launch/model_source.h"
#include "launch/local_step_engine.h"
#include "worker/generation_engine.h"
#include "worker/model_runner.h"
#include "worker/model_weights.h"

namespace epic::cli {
namespace {

bool uses_worker_job(const ServeArgs& args) { return args.workers > 0 || args.attach; }

void check_serve_flags(const ServeArgs& args) {
  check_int_flag("--workers", args.workers, 0, kMaxWorkers);
  check_int_flag("--port", args.port, 0, 65535);
  check_int_flag("--worker-port", args.worker_port, 0, 65535);
  if (args.attach && args.worker_port == 0)
    throw Error(ErrorCode::kInvalidArgument,
                "--attach needs --worker-port PORT: the worker job started apart connects there "
                "(epic worker --coordinator HOST:PORT)");
  if (args.attach && !args.worker_flags.empty())
    throw Error(ErrorCode::kInvalidArgument,
                "flags after -- are passed to the worker job epic serve starts; with --attach the job is "
                "started apart: give them to its `epic worker` command instead");
  if (!uses_worker_job(args) && !args.worker_flags.empty())
    throw Error(ErrorCode::kInvalidArgument,
                "flags after -- go to the worker job; add --workers N (or leave them out to run the model in "
                "this process)");
  for (const auto& [flag, seconds] : {std::pair<const char*, double>{"--worker-start-timeout", args.worker_start_timeout_seconds},
                                      {"--worker-step-timeout", args.worker_step_timeout_seconds},
                                      {"--heartbeat", args.heartbeat_seconds}})
    if (!(seconds > 0 && seconds <= 7 * 24 * 3600))
      throw Error(ErrorCode::kInvalidArgument, std::string(flag) + " must be in (0, 604800] seconds");
  check_int_flag("--max-worker-restarts", args.max_worker_restarts, 0, 1000000);
  check_int_flag("--prefill-chunk", args.prefill_chunk_tokens, 0, int64_t{1} << 30);
  if (args.kv_cache_tokens != 0 && args.kv_cache_tokens < args.max_context)
    throw Error(ErrorCode::kInvalidArgument,
                "--kv-cache-tokens " + std::to_string(args.kv_cache_tokens) + " is below --max-context " +
                    std::to_string(args.max_context) +
                    ": a request of the full context could never run; give at least --max-context (or 0)");
  check_int_flag("--max-active-sequences", args.max_active_sequences, 1, kMaxActiveSequencesBound);
  check_int_flag("--max-context", args.max_context, 2, int64_t{1} << 20);
  check_int_flag("--max-queued", args.max_queued, 1, int64_t{1} << 20);
  check_int_flag("--default-max-tokens", args.default_max_tokens, 1, int64_t{1} << 20);
  check_int_flag("--max-body-bytes", args.max_body_bytes, 1024, int64_t{1} << 30);
  if (!(args.shutdown_grace_seconds >= 0 && args.shutdown_grace_seconds <= 3600))
    throw Error(ErrorCode::kInvalidArgument, "--shutdown-grace must be between 0 and 3600 seconds");
  check_backend_flags({args.backend, args.device, args.precision});
}

std::vector<std::string> split_words(const char* text) {
  std::vector<std::string> words;
  std::istringstream in(text != nullptr ? text : "");
  for (std::string word; in >> word;) words.push_back(word);
  return words;
}

// mpirun or srun, with the job's size and what every launch of epic needs (see launch/epic_mpirun.sh).
std::vector<std::string> launcher_argv(const ServeArgs& args) {
  std::string kind = args.worker_launcher;
  if (kind == "auto") kind = std::getenv("SLURM_JOB_ID") != nullptr ? "srun" : "mpirun";
  const std::string ranks = std::to_string(args.workers);
  std::vector<std::string> argv;
  if (kind == "srun") {
    // pmix: Debian's and most distributions' OpenMPI speak PMIx only (launch/slurm/epic_run.sbatch).
    argv = {"srun", "--mpi=pmix", "--ntasks=" + ranks, "--kill-on-bad-exit=1", "--export=ALL,NCCL_NVLS_ENABLE=0"};
    for (std::string& word : split_words(std::getenv("EPIC_SRUN_ARGS"))) argv.push_back(word);
  } else {
    argv = {"mpirun", "-np", ranks, "--bind-to", "none", "-x", "NCCL_NVLS_ENABLE=0"};
    if (geteuid() == 0) argv.push_back("--allow-run-as-root");
    for (std::string& word : split_words(std::getenv("EPIC_MPIRUN_ARGS"))) argv.push_back(word);
  }
  return argv;
}

std::string this_executable() {
  std::error_code error;
  const std::filesystem::path self = std::filesystem::read_symlink("/proc/self/exe", error);
  EPIC_CHECK(!error, ErrorCode::kInternal, "cannot find this executable (/proc/self/exe): " + error.message());
  return self.string();
}

WorkerJobOptions worker_job_options(const ServeArgs& args, const ModelConfig& config) {
  WorkerJobOptions options;
  if (!args.attach) {
    options.launcher = launcher_argv(args);
    options.executable = this_executable();
    options.worker_args = {"--model", args.model_dir, "--backend", args.backend, "--precision", args.precision,
                           "--max-active-sequences", std::to_string(args.max_active_sequences),
                           "--max-context", std::to_string(args.max_context), "--prefill-chunk",
                           std::to_string(args.prefill_chunk_tokens), "--kv-cache-tokens",
                           std::to_string(args.kv_cache_tokens)};
    if (args.device) options.worker_args.insert(options.worker_args.end(), {"--device", std::to_string(*args.device)});
    if (args.allow_missing_experts) options.worker_args.push_back("--allow-missing-experts");
    options.worker_args.insert(options.worker_args.end(), args.worker_flags.begin(), args.worker_flags.end());
  }
  options.ranks = args.workers;
  options.listen_host = args.worker_host;
  options.listen_port = static_cast<uint16_t>(args.worker_port);
  options.start_timeout = std::chrono::seconds(static_cast<int64_t>(args.worker_start_timeout_seconds));
  options.vocab_size = config.vocab_size;
  options.min_context = args.max_context;
  return options;
}

}  // namespace

int serve_command(const ServeArgs& args) {
  check_serve_flags(args);
  // Signals go to the thread that waits for them (sigwait), never to the server's or scheduler's.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGINT);
  sigaddset(&signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  const OpenedModel model = open_model({args.model_dir, "", std::nullopt, 0});
  const std::filesystem::path tokenizer_json = *model.model_dir / "tokenizer.json";
  EPIC_CHECK(std::filesystem::is_regular_file(tokenizer_json), ErrorCode::kInvalidArgument,
             args.model_dir +
                 " has no tokenizer.json; epic serve turns request text into tokens with it: copy the "
                 "model's tokenizer.json beside its config.json");
  const Tokenizer tokenizer = Tokenizer::load(tokenizer_json);
  const std::string served_name =
      args.served_model_name.empty()
          ? std::filesystem::path(args.model_dir).lexically_normal().filename().string()
          : args.served_model_name;
  ApiLimits limits;
  limits.model_name = served_name.empty() ? std::string("model") : served_name;
  limits.max_context = args.max_context;
  limits.max_tokens_limit = args.max_context - 1;
  limits.default_max_tokens = std::min(args.default_max_tokens, limits.max_tokens_limit);
  limits.vocab_size = model.config.vocab_size;

  // The HTTP server comes up first: /health says 503 until the weights are loaded.
  ServeApi api;
  api.limits = limits;
  api.tokenizer = &tokenizer;
  api.created = static_cast<int64_t>(std::time(nullptr));
  HttpServerOptions server_options;
  server_options.host = args.host;
  server_options.port = static_cast<uint16_t>(args.port);
  server_options.max_body_bytes = static_cast<uint64_t>(args.max_body_bytes);
  HttpServer server(server_options, serve_api_handler(api));
  server.start();
  std::fprintf(stderr, "epic serve: listening on http://%s:%u (model '%s'; loading)\n", args.host.c_str(),
               static_cast<unsigned>(server.port()), limits.model_name.c_str());

  // The model: in this process, or in a worker job (its ranks load it; this process keeps only the
  // tokenizer and the config).
  ChosenBackend chosen;
  ModelWeights weights;
  std::optional<ModelRunner> runner;
  std::optional<GenerationEngine> generation;
  std::optional<LocalStepEngine> local;
  std::optional<WorkerJob> job;
  std::optional<RemoteStepEngine> remote;
  std::string description;
  if (!uses_worker_job(args)) {
    chosen = choose_backend({args.backend, args.device, args.precision}, 0, default_cpu_threads());
    LoadOptions load_options;
    load_options.allow_missing_experts = args.allow_missing_experts;
    load_options.weight_type = required_weight_type(chosen.activation_type);
    weights = load_model_weights(model.config, *model.source, *chosen.backend, load_options);
    RunnerOptions runner_options;
    runner_options.activation_type = chosen.activation_type;
    runner_options.max_sequences = args.max_active_sequences;
    runner_options.max_context = args.max_context;
    runner_options.kv_cache_tokens = args.kv_cache_tokens;
    runner.emplace(model.config, weights, *chosen.backend, runner_options);
    generation.emplace(*runner, args.max_active_sequences, args.prefill_chunk_tokens);
    runner->moe_executor().count_expert_load(*chosen.backend, weights);  // /metrics' per-expert load
    local.emplace(*generation, runner->kv_cache_blocks() * kKvBlockSize, &runner->moe_executor());
    api.engine = &*local;
    description = chosen.description;
  } else {
    job.emplace(worker_job_options(args, model.config));
    if (args.attach)
      std::fprintf(stderr,
                   "epic serve: start the worker job with: epic worker --coordinator %s --model %s "
                   "--max-context %lld [flags]\n",
                   job->address().c_str(), args.model_dir.c_str(), static_cast<long long>(args.max_context));
    job->start();
    RemoteEngineOptions remote_options;
    const auto millis = [](double seconds) { return std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000)); };
    remote_options.step_timeout = millis(args.worker_step_timeout_seconds);
    remote_options.ping_timeout = millis(args.worker_step_timeout_seconds);
    remote_options.heartbeat_interval = millis(args.heartbeat_seconds);
    remote_options.max_restarts = args.max_worker_restarts;
    remote.emplace(*job, remote_options);
    api.engine = &*remote;
    description = "worker job of " + std::to_string(job->ranks()) + " rank(s)";
  }
  // A completion ends at the model's end-of-sequence ids and at the chat format's end of turn.
  std::vector<int32_t> end_ids(model.config.eos_token_ids.begin(), model.config.eos_token_ids.end());
  for (const char* special : {"<|im_end|>", "<|endoftext|>"})
    if (const std::optional<int32_t> id = tokenizer.token_to_id(special)) end_ids.push_back(*id);
  ServeScheduler scheduler_instance(*api.engine, tokenizer, end_ids, args.max_queued);
  api.scheduler = &scheduler_instance;
  std::exception_ptr engine_error;
  std::thread loop([&] {
    try {
      scheduler_instance.run();
    } catch (...) {
      engine_error = std::current_exception();
      kill(getpid(), SIGTERM);  // wake the main thread: the server cannot go on
    }
  });
  api.ready = true;
  std::fprintf(stderr, "epic serve: ready (%s; %lld live sequences at most, context %lld)\n",
               description.c_str(), static_cast<long long>(args.max_active_sequences),
               static_cast<long long>(args.max_context));

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::fprintf(stderr, "epic serve: %s, finishing running requests (grace %.0f s)\n",
               signal_number == SIGINT ? "SIGINT" : "SIGTERM", args.shutdown_grace_seconds);
  api.ready = false;
  scheduler_instance.stop(
      std::chrono::milliseconds(static_cast<int64_t>(args.shutdown_grace_seconds * 1000)));
  loop.join();
  if (job) job->stop(std::chrono::seconds(10));  // the ranks leave their loop and exit
  server.stop();
  if (engine_error) std::rethrow_exception(engine_error);
  std::fprintf(stderr, "epic serve: stopped\n");
  return 0;
}

}  // namespace epic::cli
