// `epic bench-scheduler`: the serve scheduler's own cost per step, without a model (issue 11's speed
// target: under 100 us a step at 256 streams). A real HTTP server and the real scheduler and API handler
// serve S streaming completions over loopback TCP to a client that reads and discards them; the engine is
// an instant fake (every live sequence gets its next token at once), so what is timed is everything around
// a step: detokenizing, stop-string checks, rendering every token's SSE chunk and handing it to the I/O
// thread, finishing streams. Every step carries all S streams (the engine starts once all are in). Prints,
// per stream count: steps, the scheduler's microseconds a step (its counters, the engine's step excluded),
// nanoseconds a token, and tokens/s end to end (the client reading every byte included).
#include <chrono>
#include <cstdio>
#include <map>
#include <nlohmann/json.hpp>
#include <thread>

#include "coordinator/http_server.h"
#include "coordinator/serve_api.h"
#include "coordinator/serve_scheduler.h"
#include "coordinator/step_engine.h"
#include "coordinator/tokenizer.h"
#include "kernels/error.h"
#include "kernels/file_io.h"
#include "launch/cli_commands.h"
#include "launch/flag_checks.h"
#include "launch/id_list.h"
#include "launch/serve_load_client.h"

namespace epic::cli {
namespace {

using clock_type = std::chrono::steady_clock;

// Every live sequence's next token at once, from a cycle of ordinary tokens; never an end token. It holds
// its first step until all `streams` sequences are in, so every step measured carries all of them.
class InstantEngine final : public StepEngine {
 public:
  InstantEngine(std::vector<int32_t> cycle, int64_t streams, std::chrono::microseconds step_time)
      : cycle_(std::move(cycle)), streams_(streams), step_time_(step_time) {}
  void admit(EngineSequence sequence) override {
    live_[sequence.id] = {0, sequence.max_new_tokens};
    ++admitted_;
  }
  bool cancel(int64_t id) override { return live_.erase(id) > 0; }
  bool idle() const override { return live_.empty() || admitted_ < streams_; }
  std::vector<EngineEvent> step() override {
    if (step_time_.count() > 0) std::this_thread::sleep_for(step_time_);  // as long as a real step takes
    std::vector<EngineEvent> events;
    events.reserve(live_.size());
    for (auto it = live_.begin(); it != live_.end();) {
      auto& [produced, most] = it->second;
      EngineEvent event;
      event.id = it->first;
      event.token = cycle_[static_cast<size_t>(it->first + produced) % cycle_.size()];
      event.finished = ++produced >= most;
      events.push_back(event);
      it = event.finished ? live_.erase(it) : std::next(it);
    }
    return events;
  }
  int64_t live_sequences() const override { return static_cast<int64_t>(live_.size()); }
  int64_t waiting_sequences() const override { return 0; }

 private:
  std::vector<int32_t> cycle_;
  int64_t streams_, admitted_ = 0;
  std::chrono::microseconds step_time_;
  std::map<int64_t, std::pair<int64_t, int64_t>> live_;
};

}  // namespace

int bench_scheduler_command(const BenchSchedulerArgs& args) {
  check_int_flag("--tokens", args.tokens, 1, 100000);
  check_int_flag("--step-us", args.step_us, 0, 1000000);
  const std::vector<int32_t> stream_counts = parse_id_list(args.streams, "--streams");
  for (int32_t s : stream_counts) check_int_flag("--streams", s, 1, 4096);
  const Tokenizer tokenizer = Tokenizer::load(args.tokenizer_json);
  // Ordinary text tokens, as a model would produce them.
  std::vector<int32_t> cycle = tokenizer.encode(
      "The coordinator routes tokens to the experts of every worker and gathers the outputs back, "
      "one step at a time, while clients read their streams.");
  ServeApi api;
  api.tokenizer = &tokenizer;
  api.limits.model_name = "bench";
  api.limits.max_context = args.tokens + 16;
  api.limits.max_tokens_limit = args.tokens;
  api.limits.vocab_size = tokenizer.vocab_size();
  HttpServer server(HttpServerOptions{"127.0.0.1", 0, uint64_t{1} << 20, std::chrono::milliseconds(10000)},
                    serve_api_handler(api));
  server.start();
  nlohmann::json results = nlohmann::json::array();
  std::printf("engine steps of %lld us (an instant fake); the loop's time is on each step's critical path, the "
              "output thread's beside the next step\n",
              static_cast<long long>(args.step_us));
  std::printf("%8s %8s %8s %14s %16s %14s %12s %8s\n", "streams", "tokens", "steps", "loop us/step",
              "output us/step", "output ns/tok", "tokens/s", "wall s");
  for (const int32_t streams : stream_counts) {
    InstantEngine engine(cycle, streams, std::chrono::microseconds(args.step_us));
    ServeScheduler scheduler(engine, tokenizer, {}, streams + 1);
    api.scheduler = &scheduler;
    api.engine = &engine;
    api.ready = true;
    std::thread loop([&] { scheduler.run(); });
    ServeLoadOptions load;
    load.port = server.port();
    load.model = "bench";
    load.clients = streams;
    load.requests_per_client = 1;
    load.max_tokens = args.tokens;
    load.prompts_json = {"[1,2,3]"};
    load.timeout = std::chrono::seconds(120);
    const ServeLoadResult clients = run_serve_load(load);
    const double wall = clients.wall_seconds;
    scheduler.stop(std::chrono::milliseconds(0));
    loop.join();
    api.ready = false;
    api.scheduler = nullptr;
    const ServeCounters c = scheduler.counters();
    const double per_step_us = c.steps > 0 ? c.scheduling_seconds / static_cast<double>(c.steps) * 1e6 : 0;
    const double output_us = c.steps > 0 ? c.output_seconds / static_cast<double>(c.steps) * 1e6 : 0;
    const double per_token_ns =
        c.completion_tokens > 0 ? c.output_seconds / static_cast<double>(c.completion_tokens) * 1e9 : 0;
    const double tokens_per_second = static_cast<double>(c.completion_tokens) / wall;
    std::printf("%8d %8lld %8lld %14.1f %16.1f %14.0f %12.0f %8.3f\n", streams, static_cast<long long>(args.tokens),
                static_cast<long long>(c.steps), per_step_us, output_us, per_token_ns, tokens_per_second, wall);
    EPIC_CHECK(clients.errors == 0 && c.completion_tokens == static_cast<int64_t>(streams) * args.tokens &&
                   c.requests_ok == streams,
               ErrorCode::kInternal,
               "bench-scheduler: " + std::to_string(clients.errors) + " client errors (" +
                   (clients.error_samples.empty() ? std::string("none") : clients.error_samples[0]) + "), " +
                   std::to_string(c.completion_tokens) + " tokens and " +
                   std::to_string(c.requests_ok) + " completed streams, expected " +
                   std::to_string(int64_t{streams} * args.tokens) + " and " + std::to_string(streams));
    results.push_back({{"streams", streams},
                       {"tokens_per_stream", args.tokens},
                       {"steps", c.steps},
                       {"loop_us_per_step", per_step_us},
                       {"output_us_per_step", output_us},
                       {"output_ns_per_token", per_token_ns},
                       {"engine_step_us", args.step_us},
                       {"tokens_per_second", tokens_per_second},
                       {"client_errors", clients.errors},
                       {"wall_seconds", wall}});
  }
  server.stop();
  if (!args.json_out.empty()) files::write_file_atomically(args.json_out, results.dump(2) + "\n", "--json");
  return 0;
}

}  // namespace epic::cli
