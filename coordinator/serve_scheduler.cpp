// epic serve's scheduler (serve_scheduler.h).
#include "coordinator/serve_scheduler.h"

#include <algorithm>
#include <cstdio>
#include <ctime>
#include <utility>

#include "coordinator/prometheus_text.h"
#include "kernels/error.h"

namespace epic {

using clock_type = std::chrono::steady_clock;

struct ServeScheduler::Active {
  int64_t id = 0;
  std::string response_id;
  int64_t created = 0;
  CompletionRequest request;
  std::vector<int32_t> prompt;
  int64_t max_tokens = 0;
  std::shared_ptr<HttpExchange> exchange;
  CompletionText text;
  std::string whole;  // non-streamed: the text so far
  int64_t completion_tokens = 0;
  bool first_chunk = true;
  clock_type::time_point submitted, last_token;
  bool seen_token = false;
  std::optional<StreamChunkFormat> chunks;  // a stream's token chunks, pre-rendered

  explicit Active(std::vector<std::string> stops) : text(std::move(stops)) {}
};

void LatencyHistogram::observe(double seconds) {
  for (size_t b = 0; b < sizeof(kBounds) / sizeof(double); ++b)
    if (seconds <= kBounds[b]) ++counts[b];
  ++count;
  sum += seconds;
}

ServeScheduler::ServeScheduler(StepEngine& engine, const Tokenizer& tokenizer,
                               std::vector<int32_t> end_ids, int64_t max_queued)
    : engine_(engine), tokenizer_(tokenizer), end_ids_(std::move(end_ids)), max_queued_(max_queued) {}

ServeScheduler::~ServeScheduler() = default;

bool ServeScheduler::submit(CompletionRequest request, std::vector<int32_t> prompt, int64_t max_tokens,
                            std::shared_ptr<HttpExchange> exchange) {
  auto active = std::make_unique<Active>(request.stop);
  active->request = std::move(request);
  active->prompt = std::move(prompt);
  active->max_tokens = max_tokens;
  active->exchange = exchange;
  active->submitted = clock_type::now();
  active->created = static_cast<int64_t>(std::time(nullptr));
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (stopping_) {
      exchange->respond(
          503, "application/json",
          ApiError(503, "", "shutting_down", "the server is shutting down", "server_error").to_json().dump(),
          {{"Retry-After", "5"}});
      return false;
    }
    if (static_cast<int64_t>(inbox_.size()) + counters_.queued >= max_queued_) {
      exchange->respond(
          429, "application/json",
          ApiError(429, "", "queue_full",
                   "the request queue is full (" + std::to_string(max_queued_) + " waiting); retry shortly",
                   "rate_limit_error")
              .to_json()
              .dump(),
          {{"Retry-After", "1"}});
      return false;
    }
    active->id = next_id_++;
    active->response_id =
        std::string(active->request.chat ? "chatcmpl-" : "cmpl-") + std::to_string(active->id);
    const int64_t id = active->id;
    // A client that leaves: its sequence is cancelled at the next step boundary.
    exchange->on_close([this, id] {
      std::lock_guard<std::mutex> lock(mutex_);
      cancelled_.push_back(id);
      wake_.notify_all();
    });
    if (active->request.stream) {
      active->chunks.emplace(active->request, active->response_id, active->created);
      exchange->start_stream("text/event-stream");
    }
    inbox_.push_back(std::move(active));
  }
  wake_.notify_all();
  return true;
}

void ServeScheduler::stop(std::chrono::milliseconds grace) {
  std::lock_guard<std::mutex> lock(mutex_);
  stopping_ = true;
  stop_deadline_ = clock_type::now() + grace;
  wake_.notify_all();
}

ServeCounters ServeScheduler::counters() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return counters_;
}

std::string ServeScheduler::metrics_text() const {
  const ServeCounters c = counters();
  PrometheusText out;
  out.family("epic_requests_total", "counter", "Completion requests by how they ended.");
  out.sample("epic_requests_total", prometheus_label("status", "ok"), double(c.requests_ok));
  out.sample("epic_requests_total", prometheus_label("status", "cancelled"), double(c.requests_cancelled));
  out.sample("epic_requests_total", prometheus_label("status", "failed"), double(c.requests_failed));
  out.single("epic_prompt_tokens_total", "counter", "Prompt tokens admitted.", double(c.prompt_tokens));
  out.single("epic_generation_tokens_total", "counter", "Tokens generated.", double(c.completion_tokens));
  out.single("epic_running_sequences", "gauge", "Sequences in the running batch.", double(c.running));
  out.single("epic_queued_sequences", "gauge", "Sequences waiting to join the batch.", double(c.queued));
  out.single("epic_engine_steps_total", "counter", "Engine steps run.", double(c.steps));
  out.single("epic_generation_tokens_per_second", "gauge",
             "Tokens generated per second over the last " + std::to_string(kRateWindow.count()) + " s.",
             tokens_per_second());
  out.single("epic_engine_step_seconds_total", "counter", "Wall time inside engine steps.", c.step_seconds);
  out.single("epic_scheduling_seconds_total", "counter", "The scheduler's own time around the steps.",
             c.scheduling_seconds);
  const auto histogram = [&](const std::string& name, const std::string& help, const LatencyHistogram& h) {
    out.family(name, "histogram", help);
    for (size_t b = 0; b < sizeof(LatencyHistogram::kBounds) / sizeof(double); ++b) {
      char bound[32];
      std::snprintf(bound, sizeof(bound), "%g", LatencyHistogram::kBounds[b]);
      out.sample(name + "_bucket", prometheus_label("le", bound), double(h.counts[b]));
    }
    out.sample(name + "_bucket", prometheus_label("le", "+Inf"), double(h.count));
    out.sample(name + "_sum", "", h.sum);
    out.sample(name + "_count", "", double(h.count));
  };
  histogram("epic_time_to_first_token_seconds", "From a request's arrival to its first token.", c.first_token);
  histogram("epic_inter_token_latency_seconds", "Between a request's successive tokens.", c.inter_token);
  return out.take() + engine_.metrics_text();
}

double ServeScheduler::tokens_per_second() const {
  std::lock_guard<std::mutex> lock(mutex_);
  const auto now = clock_type::now();
  int64_t tokens = 0;
  for (const auto& [at, count] : recent_tokens_)
    if (now - at <= kRateWindow) tokens += count;
  return static_cast<double>(tokens) / std::chrono::duration<double>(kRateWindow).count();
}

void ServeScheduler::finish(Active& active, const std::string& reason) {
  const std::string rest = active.text.finish();
  const Usage usage{static_cast<int64_t>(active.prompt.size()), active.completion_tokens};
  if (active.request.stream) {
    if (!rest.empty())
      active.exchange->send(sse_event(completion_chunk(active.request, active.response_id, active.created,
                                                       rest, std::nullopt, active.first_chunk)));
    active.exchange->send(sse_event(completion_chunk(active.request, active.response_id, active.created, "",
                                                     reason, active.first_chunk && rest.empty())));
    if (active.request.include_usage)
      active.exchange->send(
          sse_event(usage_chunk(active.request, active.response_id, active.created, usage)));
    active.exchange->send(sse_done());
    active.exchange->end();
  } else {
    active.exchange->respond(200, "application/json",
                             completion_response(active.request, active.response_id, active.created,
                                                 active.whole + rest, reason, usage)
                                 .dump());
  }
  std::lock_guard<std::mutex> lock(mutex_);
  ++counters_.requests_ok;
  counters_.completion_tokens += active.completion_tokens;
}

void ServeScheduler::fail(Active& active, const std::string& message) {
  const ApiError error(500, "", "engine_error", message, "server_error");
  if (active.request.stream) {
    active.exchange->send(sse_event(error.to_json()));
    active.exchange->end();
  } else {
    active.exchange->respond(500, "application/json", error.to_json().dump());
  }
  std::lock_guard<std::mutex> lock(mutex_);
  ++counters_.requests_failed;
}

void ServeScheduler::run() {
  while (true) {
    std::vector<std::unique_ptr<Active>> joining;
    std::vector<int64_t> leaving;
    bool stopping = false, past_grace = false;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      const auto has_work = [&] { return !inbox_.empty() || !cancelled_.empty() || !engine_.idle() || stopping_; };
      const std::chrono::milliseconds heartbeat = engine_.heartbeat_interval();
      if (heartbeat.count() == 0) {
        wake_.wait(lock, has_work);
      } else if (!wake_.wait_for(lock, heartbeat, has_work)) {
        lock.unlock();
        engine_.heartbeat();  // idle for a heartbeat: the engine checks its workers (may restart them)
        continue;
      }
      for (auto& active : inbox_) joining.push_back(std::move(active));
      inbox_.clear();
      leaving.swap(cancelled_);
      stopping = stopping_;
      past_grace = stopping_ && clock_type::now() >= stop_deadline_;
    }
    const auto loop_start = clock_type::now();
    for (auto& active : joining) {
      EngineSequence sequence;
      sequence.id = active->id;
      sequence.prompt = active->prompt;
      sequence.max_new_tokens = active->max_tokens;
      sequence.temperature = active->request.temperature;
      sequence.top_p = active->request.top_p;
      sequence.seed = active->request.seed.value_or(0);
      engine_.admit(std::move(sequence));
      std::lock_guard<std::mutex> lock(mutex_);
      counters_.prompt_tokens += static_cast<int64_t>(active->prompt.size());
      active_[active->id] = std::move(active);
    }
    for (int64_t id : leaving) {
      if (!engine_.cancel(id)) continue;
      active_.erase(id);
      std::lock_guard<std::mutex> lock(mutex_);
      ++counters_.requests_cancelled;
    }
    if (past_grace) {  // the grace is over: every request left is cancelled, its client told
      for (auto& [id, active] : active_) {
        engine_.cancel(id);
        fail(*active, "the server shut down before this request finished");
      }
      active_.clear();
    }
    if (stopping && engine_.idle()) return;
    if (engine_.idle()) continue;

    std::vector<EngineEvent> events;
    const auto step_start = clock_type::now();
    try {
      events = engine_.step();
    } catch (const std::exception& e) {
      // The engine cannot go on (e.g. non-finite logits): every request is told, none hangs.
      for (auto& [id, active] : active_) fail(*active, std::string("the engine failed: ") + e.what());
      active_.clear();
      throw;
    }
    const auto step_end = clock_type::now();
    // Latencies observed in this step, added to the histograms under one lock at its end.
    std::vector<double> first_token_seconds, inter_token_seconds;
    std::optional<HttpSendBatch> sends(std::in_place);  // the step's chunks go to the I/O thread together
    for (const EngineEvent& event : events) {
      const auto found = active_.find(event.id);
      if (found == active_.end()) continue;
      Active& active = *found->second;
      bool ended_by_token = false;
      if (event.token) {
        const int32_t token = *event.token;
        ++active.completion_tokens;
        if (active.seen_token)
          inter_token_seconds.push_back(std::chrono::duration<double>(step_end - active.last_token).count());
        else
          first_token_seconds.push_back(std::chrono::duration<double>(step_end - active.submitted).count());
        active.seen_token = true;
        active.last_token = step_end;
        ended_by_token = std::find(end_ids_.begin(), end_ids_.end(), token) != end_ids_.end();
        if (!ended_by_token) {
          const std::string piece = active.text.push(tokenizer_.decode_bytes(std::span<const int32_t>(&token, 1)));
          if (!piece.empty()) {
            if (active.request.stream) {
              active.exchange->send(active.chunks->event(piece, active.first_chunk));
              active.first_chunk = false;
            } else {
              active.whole += piece;
            }
          }
        }
      }
      const bool stopped = active.text.stopped();
      if (ended_by_token || stopped || event.finished) {
        if (!event.finished) engine_.cancel(event.id);  // a stop string or <|im_end|> before the eos
        finish(active, ended_by_token || stopped ? "stop" : "length");
        active_.erase(found);
      }
    }
    sends.reset();
    const auto loop_end = clock_type::now();
    std::lock_guard<std::mutex> lock(mutex_);
    for (const double seconds : first_token_seconds) counters_.first_token.observe(seconds);
    for (const double seconds : inter_token_seconds) counters_.inter_token.observe(seconds);
    int64_t step_tokens = 0;
    for (const EngineEvent& event : events) step_tokens += event.token ? 1 : 0;
    recent_tokens_.emplace_back(step_end, step_tokens);
    while (!recent_tokens_.empty() && step_end - recent_tokens_.front().first > kRateWindow)
      recent_tokens_.pop_front();
    ++counters_.steps;
    counters_.step_seconds += std::chrono::duration<double>(step_end - step_start).count();
    counters_.scheduling_seconds +=
        std::chrono::duration<double>((step_start - loop_start) + (loop_end - step_end)).count();
    counters_.running = engine_.live_sequences();
    counters_.queued = engine_.waiting_sequences();
  }
}

}  // namespace epic
