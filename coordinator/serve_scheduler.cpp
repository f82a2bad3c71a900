// epic serve's scheduler (serve_scheduler.h).
#include "coordinator/serve_scheduler.h"

#include <algorithm>
#include <span>
#include <thread>
#include <unordered_set>
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
  out.single("epic_scheduling_seconds_total", "counter",
             "The scheduler's own time around the steps, on their critical path (admissions, cancels, hand-off).",
             c.scheduling_seconds);
  out.single("epic_output_seconds_total", "counter",
             "Time turning steps' tokens into answers (detokenizing, stop strings, chunks), beside the next step.",
             c.output_seconds);
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

// What the loop thread hands the output thread, in order: a request that joined the engine, a step's
// events, a request whose client left (cancelled in the engine), every request failed, the end.
struct ServeScheduler::OutputItem {
  enum Kind { kJoined, kEvents, kCancelled, kFailAll, kQuit } kind = kQuit;
  std::unique_ptr<Active> active;  // kJoined
  std::vector<EngineEvent> events;  // kEvents
  clock_type::time_point step_end;  // kEvents
  int64_t id = 0;                   // kCancelled
  std::string message;              // kFailAll
};

void ServeScheduler::hand_to_output(OutputItem item) {
  std::unique_lock<std::mutex> lock(output_mutex_);
  if (item.kind == OutputItem::kEvents) {
    // At most kOutputStepsAhead steps' tokens wait for the output thread: a slow client side slows the
    // engine instead of piling up tokens.
    output_room_.wait(lock, [&] { return output_steps_pending_ < kOutputStepsAhead; });
    ++output_steps_pending_;
  }
  output_queue_.push_back(std::move(item));
  output_wake_.notify_one();
}

void ServeScheduler::run_output() {
  while (true) {
    OutputItem item;
    {
      std::unique_lock<std::mutex> lock(output_mutex_);
      output_wake_.wait(lock, [&] { return !output_queue_.empty(); });
      item = std::move(output_queue_.front());
      output_queue_.pop_front();
    }
    switch (item.kind) {
      case OutputItem::kJoined: {
        const int64_t id = item.active->id;
        active_[id] = std::move(item.active);
        break;
      }
      case OutputItem::kCancelled:
        if (active_.erase(item.id) > 0) {
          std::lock_guard<std::mutex> lock(mutex_);
          ++counters_.requests_cancelled;
        }
        break;
      case OutputItem::kFailAll:
        for (auto& [id, active] : active_) fail(*active, item.message);
        active_.clear();
        break;
      case OutputItem::kEvents: {
        const auto start = clock_type::now();
        try {
          deliver(item.events, item.step_end);
        } catch (const std::exception& e) {
          // A token that cannot be turned into text (a bug or a bad model): its requests are told, none hangs.
          for (auto& [id, active] : active_) {
            fail(*active, std::string("the server could not answer: ") + e.what());
            std::lock_guard<std::mutex> lock(mutex_);
            stopped_.push_back(id);
          }
          active_.clear();
          wake_.notify_all();
        }
        const double seconds = std::chrono::duration<double>(clock_type::now() - start).count();
        {
          std::lock_guard<std::mutex> lock(output_mutex_);
          --output_steps_pending_;
          output_room_.notify_one();
        }
        std::lock_guard<std::mutex> lock(mutex_);
        counters_.output_seconds += seconds;
        break;
      }
      case OutputItem::kQuit: return;
    }
  }
}

void ServeScheduler::deliver(const std::vector<EngineEvent>& events, clock_type::time_point step_end) {
  // Latencies observed in this step, added to the histograms under one lock at its end.
  std::vector<double> first_token_seconds, inter_token_seconds;
  std::vector<int64_t> stopped;  // ended here before the engine knew (stop string, chat end of turn)
  int64_t step_tokens = 0;
  {
    HttpSendBatch sends;  // the step's chunks go to the I/O thread together
    for (const EngineEvent& event : events) {
      const auto found = active_.find(event.id);
      if (found == active_.end()) continue;  // cancelled or stopped since
      Active& active = *found->second;
      bool ended_by_token = false;
      if (event.token) {
        const int32_t token = *event.token;
        ++step_tokens;
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
      const bool stopped_by_text = active.text.stopped();
      if (ended_by_token || stopped_by_text || event.finished) {
        if (!event.finished) stopped.push_back(event.id);
        finish(active, ended_by_token || stopped_by_text ? "stop" : "length");
        active_.erase(found);
      }
    }
  }
  std::lock_guard<std::mutex> lock(mutex_);
  for (const double seconds : first_token_seconds) counters_.first_token.observe(seconds);
  for (const double seconds : inter_token_seconds) counters_.inter_token.observe(seconds);
  recent_tokens_.emplace_back(step_end, step_tokens);
  while (!recent_tokens_.empty() && step_end - recent_tokens_.front().first > kRateWindow) recent_tokens_.pop_front();
  if (!stopped.empty()) {
    stopped_.insert(stopped_.end(), stopped.begin(), stopped.end());
    wake_.notify_all();
  }
}

void ServeScheduler::run() {
  std::thread output([this] { run_output(); });
  std::unordered_set<int64_t> in_engine;  // admitted and not seen to finish or be cancelled
  const auto end_output = [&] {
    hand_to_output(OutputItem{});  // kQuit, behind everything handed over before
    output.join();
  };
  while (true) {
    std::vector<std::unique_ptr<Active>> joining;
    std::vector<int64_t> leaving, stopped;
    bool stopping = false, past_grace = false;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      const auto has_work = [&] {
        return !inbox_.empty() || !cancelled_.empty() || !stopped_.empty() || !engine_.idle() || stopping_;
      };
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
      stopped.swap(stopped_);
      stopping = stopping_;
      past_grace = stopping_ && clock_type::now() >= stop_deadline_;
    }
    const auto loop_start = clock_type::now();
    int64_t prompt_tokens = 0;
    for (auto& active : joining) {
      EngineSequence sequence;
      sequence.id = active->id;
      sequence.prompt = active->prompt;
      sequence.max_new_tokens = active->max_tokens;
      sequence.temperature = active->request.temperature;
      sequence.top_p = active->request.top_p;
      sequence.seed = active->request.seed.value_or(0);
      engine_.admit(std::move(sequence));
      in_engine.insert(active->id);
      prompt_tokens += static_cast<int64_t>(active->prompt.size());
      OutputItem joined;
      joined.kind = OutputItem::kJoined;
      joined.active = std::move(active);
      hand_to_output(std::move(joined));
    }
    for (int64_t id : leaving) {  // clients that left: their sequences go, and their requests are counted
      if (!engine_.cancel(id)) continue;  // finished already: the output thread ends it as usual
      in_engine.erase(id);
      OutputItem cancelled;
      cancelled.kind = OutputItem::kCancelled;
      cancelled.id = id;
      hand_to_output(std::move(cancelled));
    }
    for (int64_t id : stopped) {  // answered already (a stop string): the engine stops computing them
      engine_.cancel(id);
      in_engine.erase(id);
    }
    if (past_grace) {  // the grace is over: every request left is cancelled, its client told
      for (int64_t id : in_engine) engine_.cancel(id);
      in_engine.clear();
      OutputItem fail_all;
      fail_all.kind = OutputItem::kFailAll;
      fail_all.message = "the server shut down before this request finished";
      hand_to_output(std::move(fail_all));
    }
    if (stopping && engine_.idle()) return end_output();
    if (engine_.idle()) {
      std::lock_guard<std::mutex> lock(mutex_);
      counters_.prompt_tokens += prompt_tokens;
      continue;
    }

    OutputItem step;
    step.kind = OutputItem::kEvents;
    const auto step_start = clock_type::now();
    try {
      step.events = engine_.step();
    } catch (const std::exception& e) {
      // The engine cannot go on (e.g. non-finite logits, the worker job gone for good): every request is
      // told, none hangs.
      OutputItem fail_all;
      fail_all.kind = OutputItem::kFailAll;
      fail_all.message = std::string("the engine failed: ") + e.what();
      hand_to_output(std::move(fail_all));
      end_output();
      throw;
    }
    step.step_end = clock_type::now();
    for (const EngineEvent& event : step.events)
      if (event.finished) in_engine.erase(event.id);
    const auto step_end = step.step_end;
    // The tokens go out on the output thread while the next step runs: detokenizing, stop strings and
    // writing every stream are off the step's critical path.
    hand_to_output(std::move(step));
    const auto loop_end = clock_type::now();
    std::lock_guard<std::mutex> lock(mutex_);
    counters_.prompt_tokens += prompt_tokens;
    ++counters_.steps;
    counters_.step_seconds += std::chrono::duration<double>(step_end - step_start).count();
    counters_.scheduling_seconds +=
        std::chrono::duration<double>((step_start - loop_start) + (loop_end - step_end)).count();
    counters_.running = engine_.live_sequences();
    counters_.queued = engine_.waiting_sequences();
  }
}

}  // namespace epic
