// epic serve (issue 11, first form): the model loaded in this process, an OpenAI-compatible HTTP server in
// front of it (coordinator/http_server.h, coordinator/openai_api.h) and the scheduler driving the engine
// (launch/serve_scheduler.h). SIGINT/SIGTERM: new requests get 503, running ones may finish within
// --shutdown-grace, then the server exits 0.
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
#include <thread>

#include "coordinator/http_server.h"
#include "coordinator/openai_api.h"
#include "coordinator/tokenizer.h"
#include "kernels/error.h"
#include "launch/backend_choice.h"
#include "launch/cli_commands.h"
#include "launch/cpu_threads.h"
#include "launch/flag_checks.h"
#include "launch/model_source.h"
#include "launch/serve_scheduler.h"
#include "worker/generation_engine.h"
#include "worker/model_runner.h"
#include "worker/model_weights.h"

namespace epic::cli {
namespace {

void check_serve_flags(const ServeArgs& args) {
  if (args.workers != 1)
    throw Error(
        ErrorCode::kUnsupported,
        "--workers " + std::to_string(args.workers) +
            ": epic serve runs the model in its own process for now (one worker); the worker job over "
            "mpirun is not wired to the server yet. Leave out --workers");
  if (args.attach)
    throw Error(
        ErrorCode::kUnsupported,
        "--attach: a separately started worker job is not wired to the server yet; leave out --attach");
  check_int_flag("--port", args.port, 0, 65535);
  check_int_flag("--max-active-sequences", args.max_active_sequences, 1, kMaxActiveSequencesBound);
  check_int_flag("--max-context", args.max_context, 2, int64_t{1} << 20);
  check_int_flag("--max-queued", args.max_queued, 1, int64_t{1} << 20);
  check_int_flag("--default-max-tokens", args.default_max_tokens, 1, int64_t{1} << 20);
  check_int_flag("--max-body-bytes", args.max_body_bytes, 1024, int64_t{1} << 30);
  if (!(args.shutdown_grace_seconds >= 0 && args.shutdown_grace_seconds <= 3600))
    throw Error(ErrorCode::kInvalidArgument, "--shutdown-grace must be between 0 and 3600 seconds");
  check_backend_flags({args.backend, args.device, args.precision});
}

std::string json_error(const ApiError& error) { return error.to_json().dump(); }

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
  std::atomic<bool> ready{false};
  std::atomic<ServeScheduler*> scheduler{nullptr};  // set once ready (read by the I/O thread)
  HttpServerOptions server_options;
  server_options.host = args.host;
  server_options.port = static_cast<uint16_t>(args.port);
  server_options.max_body_bytes = static_cast<uint64_t>(args.max_body_bytes);
  const auto created = static_cast<int64_t>(std::time(nullptr));
  HttpServer server(server_options, [&](const HttpRequest& request, std::shared_ptr<HttpExchange> exchange) {
    const std::string path = request.target.substr(0, request.target.find('?'));
    const bool completions = path == "/v1/completions", chat = path == "/v1/chat/completions";
    if (path == "/health") {
      if (ready)
        exchange->respond(200, "application/json", R"({"status":"ready"})");
      else
        exchange->respond(503, "application/json", R"({"status":"loading"})", {{"Retry-After", "5"}});
      return;
    }
    if (path == "/v1/models" && request.method == "GET") {
      exchange->respond(200, "application/json", models_response(limits.model_name, created).dump());
      return;
    }
    if (path == "/metrics" && request.method == "GET") {
      ServeScheduler* current = scheduler;
      exchange->respond(200, "text/plain; version=0.0.4", current != nullptr ? current->metrics_text() : "");
      return;
    }
    if (!completions && !chat) {
      exchange->respond(
          404, "application/json",
          json_error(ApiError(404, "", "not_found",
                              "no route " + request.method + " " + path +
                                  "; epic serves /v1/completions, /v1/chat/completions, /v1/models, "
                                  "/health and /metrics")));
      return;
    }
    if (request.method != "POST") {
      exchange->respond(405, "application/json",
                        json_error(ApiError(405, "", "method_not_allowed", path + " takes POST")));
      return;
    }
    ServeScheduler* current = scheduler;
    if (!ready || current == nullptr) {
      exchange->respond(503, "application/json",
                        json_error(ApiError(503, "", "loading", "the model is still loading; retry shortly",
                                            "server_error")),
                        {{"Retry-After", "5"}});
      return;
    }
    try {
      CompletionRequest parsed = parse_completion_request(request.body, chat, limits);
      std::vector<int32_t> prompt = parsed.prompt_ids ? *parsed.prompt_ids : tokenizer.encode(parsed.prompt);
      const int64_t max_tokens = fit_to_context(parsed, static_cast<int64_t>(prompt.size()), limits);
      current->submit(std::move(parsed), std::move(prompt), max_tokens, exchange);
    } catch (const ApiError& error) {
      exchange->respond(error.status(), "application/json", json_error(error));
    }
  });
  server.start();
  std::fprintf(stderr, "epic serve: listening on http://%s:%u (model '%s'; loading)\n", args.host.c_str(),
               static_cast<unsigned>(server.port()), limits.model_name.c_str());

  ChosenBackend chosen =
      choose_backend({args.backend, args.device, args.precision}, 0, default_cpu_threads());
  LoadOptions load_options;
  load_options.allow_missing_experts = args.allow_missing_experts;
  load_options.weight_type = required_weight_type(chosen.activation_type);
  const ModelWeights weights = load_model_weights(model.config, *model.source, *chosen.backend, load_options);
  RunnerOptions runner_options;
  runner_options.activation_type = chosen.activation_type;
  runner_options.max_sequences = args.max_active_sequences;
  runner_options.max_context = args.max_context;
  ModelRunner runner(model.config, weights, *chosen.backend, runner_options);
  GenerationEngine engine(runner, args.max_active_sequences);
  // A completion ends at the model's end-of-sequence ids and at the chat format's end of turn.
  std::vector<int32_t> end_ids(model.config.eos_token_ids.begin(), model.config.eos_token_ids.end());
  for (const char* special : {"<|im_end|>", "<|endoftext|>"})
    if (const std::optional<int32_t> id = tokenizer.token_to_id(special)) end_ids.push_back(*id);
  ServeScheduler scheduler_instance(engine, tokenizer, end_ids, args.max_queued);
  scheduler = &scheduler_instance;
  std::exception_ptr engine_error;
  std::thread loop([&] {
    try {
      scheduler_instance.run();
    } catch (...) {
      engine_error = std::current_exception();
      kill(getpid(), SIGTERM);  // wake the main thread: the server cannot go on
    }
  });
  ready = true;
  std::fprintf(stderr, "epic serve: ready (%s; %lld live sequences at most, context %lld)\n",
               chosen.description.c_str(), static_cast<long long>(args.max_active_sequences),
               static_cast<long long>(args.max_context));

  int signal_number = 0;
  sigwait(&signals, &signal_number);
  std::fprintf(stderr, "epic serve: %s, finishing running requests (grace %.0f s)\n",
               signal_number == SIGINT ? "SIGINT" : "SIGTERM", args.shutdown_grace_seconds);
  ready = false;
  scheduler_instance.stop(
      std::chrono::milliseconds(static_cast<int64_t>(args.shutdown_grace_seconds * 1000)));
  loop.join();
  server.stop();
  if (engine_error) std::rethrow_exception(engine_error);
  std::fprintf(stderr, "epic serve: stopped\n");
  return 0;
}

}  // namespace epic::cli
