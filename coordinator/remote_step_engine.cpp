// Steps over the worker job, placement by load, and recovery from a dead job (remote_step_engine.h).
#include "coordinator/remote_step_engine.h"

#include <algorithm>
#include <cstdio>

#include "coordinator/prometheus_text.h"
#include "kernels/error.h"

namespace epic {

namespace wp = worker_protocol;

RemoteStepEngine::RemoteStepEngine(WorkerJob& job, RemoteEngineOptions options)
    : job_(job), options_(options) {
  EPIC_CHECK(job_.ranks() > 0, ErrorCode::kInternal, "RemoteStepEngine needs a started worker job");
  pending_admit_.resize(job_.ranks());
  pending_cancel_.resize(job_.ranks());
  reset_rank_views();
}

void RemoteStepEngine::reset_rank_views() {
  std::lock_guard<std::mutex> lock(load_mutex_);
  load_.assign(job_.ranks(), {});
  // A new job counts expert rows from zero: its first report's window starts now.
  expert_load_.reset(job_.ranks());
  kv_capacity_.clear();
  for (const wp::Hello& hello : job_.hellos()) kv_capacity_.push_back(hello.kv_capacity_tokens);
}

int RemoteStepEngine::least_loaded_rank() const {
  // Sequences first (each holds a KV cache and a row of every step), then positions held.
  std::vector<RankLoad> load(pending_admit_.size());
  for (const auto& [id, tracked] : tracked_) {
    ++load[tracked.rank].sequences;
    load[tracked.rank].kv_tokens +=
        static_cast<int64_t>(tracked.sequence.prompt.size() + tracked.sequence.resumed.size());
  }
  int best = 0;
  for (int r = 1; r < static_cast<int>(load.size()); ++r)
    if (std::make_pair(load[r].sequences, load[r].kv_tokens) <
        std::make_pair(load[best].sequences, load[best].kv_tokens))
      best = r;
  return best;
}

void RemoteStepEngine::admit(EngineSequence sequence) {
  EPIC_CHECK(!sequence.prompt.empty(), ErrorCode::kInvalidArgument,
             "sequence " + std::to_string(sequence.id) + " has an empty prompt");
  EPIC_CHECK(!tracked_.count(sequence.id), ErrorCode::kInvalidArgument,
             "sequence " + std::to_string(sequence.id) + " is already admitted");
  const int rank = least_loaded_rank();
  pending_admit_[rank].push_back(sequence);
  tracked_[sequence.id] = Tracked{std::move(sequence), rank};
}

bool RemoteStepEngine::cancel(int64_t id) {
  const auto found = tracked_.find(id);
  if (found == tracked_.end()) return false;
  const int rank = found->second.rank;
  std::vector<EngineSequence>& queued = pending_admit_[rank];
  const auto unsent =
      std::find_if(queued.begin(), queued.end(), [&](const EngineSequence& s) { return s.id == id; });
  if (unsent != queued.end())
    queued.erase(unsent);  // never reached the job
  else
    pending_cancel_[rank].push_back(id);
  tracked_.erase(found);
  return true;
}

bool RemoteStepEngine::idle() const {
  if (!tracked_.empty() || steps_in_flight_ > 0) return false;
  for (const auto& cancels : pending_cancel_)
    if (!cancels.empty()) return false;
  return true;
}

int64_t RemoteStepEngine::live_sequences() const {
  std::lock_guard<std::mutex> lock(load_mutex_);
  int64_t live = 0;
  for (const RankLoad& rank : load_) live += rank.live;
  return live;
}

int64_t RemoteStepEngine::waiting_sequences() const {
  std::lock_guard<std::mutex> lock(load_mutex_);
  int64_t waiting = 0;
  for (const RankLoad& rank : load_) waiting += rank.waiting;
  return waiting;
}

std::vector<wp::Message> RemoteStepEngine::take_step_commands() {
  const int ranks = static_cast<int>(pending_admit_.size());
  std::vector<wp::Message> out(ranks);
  for (int r = 0; r < ranks; ++r) {
    out[r].kind = wp::Kind::kStep;
    for (const EngineSequence& s : pending_admit_[r])
      out[r].command.admit.push_back({s.id, s.prompt, s.resumed, s.max_new_tokens, s.temperature, s.top_p, s.seed});
    out[r].command.cancel = std::move(pending_cancel_[r]);
    pending_admit_[r].clear();
    pending_cancel_[r].clear();
  }
  return out;
}

std::vector<EngineEvent> RemoteStepEngine::step() {
  const int ranks = static_cast<int>(pending_admit_.size());
  // Pipelined: the next step's command goes out before the answer of the step in flight is read, so a rank
  // finds it waiting when it finishes a step instead of idling through a round trip to this process.
  // Admissions and cancels do not depend on the answers: a cancel lands one step later (the extra token is
  // dropped below, as a finished sequence's would be), and a failure re-admits every tracked sequence from
  // what it reported, so a command lost in flight loses nothing.
  std::vector<wp::Message> replies;
  try {
    if (steps_in_flight_ == 0) {
      job_.exchange(take_step_commands(), options_.step_timeout, /*read_replies=*/false);
      steps_in_flight_ = 1;
    }
    const bool another = !tracked_.empty();  // sequences left: the next step will have work
    replies =
        job_.exchange(another ? take_step_commands() : std::vector<wp::Message>{}, options_.step_timeout);
    steps_in_flight_ = another ? 1 : 0;
  } catch (const Error& e) {
    recover(e.what());
    return {};
  }
  failures_in_a_row_ = 0;
  std::vector<EngineEvent> events;
  std::vector<RankLoad> load(ranks);
  for (int r = 0; r < ranks; ++r) {
    const wp::StepDone& done = replies[r].done;
    if (replies[r].kind != wp::Kind::kStepDone) {
      recover("worker rank " + std::to_string(r) + " answered a step with " + wp::kind_name(replies[r].kind));
      return events;
    }
    load[r] = {done.live, done.waiting, done.kv_tokens, done.live + done.waiting};
    if (!done.expert_rows.empty() || !done.rows_per_rank.empty())
      expert_load_.note(r, done.expert_rows, done.rows_per_rank);
    for (const wp::Token& token : done.tokens) {
      const auto found = tracked_.find(token.id);
      if (found == tracked_.end()) continue;  // cancelled since
      EngineEvent event;
      event.id = token.id;
      if (token.token >= 0) {
        event.token = token.token;
        found->second.sequence.resumed.push_back(token.token);
      }
      event.finished = token.finished;
      if (token.finished) tracked_.erase(found);
      events.push_back(event);
    }
  }
  std::lock_guard<std::mutex> lock(load_mutex_);
  load_ = std::move(load);
  return events;
}

void RemoteStepEngine::heartbeat() {
  if (!tracked_.empty() || steps_in_flight_ > 0) return;  // steps show the job's health while it works
  std::vector<wp::Message> pings(job_.ranks());
  for (wp::Message& ping : pings) ping.kind = wp::Kind::kPing;
  try {
    for (const wp::Message& pong : job_.exchange(pings, options_.ping_timeout))
      if (pong.kind != wp::Kind::kPong)
        throw Error(ErrorCode::kCommunication, std::string("a rank answered a ping with ") + wp::kind_name(pong.kind));
    failures_in_a_row_ = 0;
  } catch (const Error& e) {
    recover(e.what());
  }
}

void RemoteStepEngine::recover(const std::string& why) {
  ready_ = false;
  steps_in_flight_ = 0;  // lost with the job
  std::fprintf(stderr, "epic serve: the worker job failed: %s; restarting it (%zu request(s) in flight resume)\n",
               why.c_str(), tracked_.size());
  job_.kill();
  while (true) {
    ++failures_in_a_row_;
    if (failures_in_a_row_ > options_.max_restarts)
      throw Error(ErrorCode::kCommunication,
                  "the worker job failed " + std::to_string(failures_in_a_row_) +
                      " times in a row without completing a step (last: " + why +
                      "); giving up (see --max-worker-restarts)");
    ++restarts_;
    try {
      job_.start();
      break;
    } catch (const Error& e) {
      std::fprintf(stderr, "epic serve: restarting the worker job failed: %s\n", e.what());
    }
  }
  // Every tracked sequence goes to a rank again, with what it reported so far as resumed tokens.
  const int ranks = job_.ranks();
  pending_admit_.assign(ranks, {});
  pending_cancel_.assign(ranks, {});
  std::map<int64_t, Tracked> previous;
  previous.swap(tracked_);
  for (auto& [id, tracked] : previous) {
    sequences_resumed_ += tracked.sequence.resumed.empty() ? 0 : 1;
    admit(std::move(tracked.sequence));
  }
  reset_rank_views();
  ready_ = true;
}

std::string RemoteStepEngine::metrics_text() const {
  PrometheusText out;
  out.single("epic_worker_restarts_total", "counter", "Worker jobs started again after one failed.",
             double(restarts_.load()));
  out.single("epic_workers_ready", "gauge", "1 while the worker job is up, 0 while it starts again.",
             ready_ ? 1.0 : 0.0);
  out.single("epic_sequences_resumed_total", "counter",
             "Sequences admitted again with their reported tokens after a restart.",
             double(sequences_resumed_.load()));
  std::lock_guard<std::mutex> lock(load_mutex_);
  const auto rank = [](size_t r) { return prometheus_label("rank", std::to_string(r)); };
  out.family("epic_worker_sequences", "gauge", "Sequences on each worker rank after the last step (live and waiting).");
  for (size_t r = 0; r < load_.size(); ++r) out.sample("epic_worker_sequences", rank(r), double(load_[r].sequences));
  std::vector<int64_t> kv_tokens;
  for (const RankLoad& load : load_) kv_tokens.push_back(load.kv_tokens);
  append_kv_cache_metrics(out, kv_tokens, kv_capacity_);
  expert_load_.append_metrics(out);  // per-expert and per-worker load of the last window
  return out.take();
}

}  // namespace epic
