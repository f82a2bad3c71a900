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
  ExpertLoad fresh;
  fresh.at = std::chrono::steady_clock::now();
  expert_load_.assign(job_.ranks(), fresh);
  kv_capacity_.clear();
  for (const wp::Hello& hello : job_.hellos()) kv_capacity_.push_back(hello.kv_capacity_tokens);
}

void RemoteStepEngine::note_expert_rows(int rank, const std::map<int64_t, std::vector<int64_t>>& cumulative) {
  const auto now = std::chrono::steady_clock::now();
  std::lock_guard<std::mutex> lock(load_mutex_);
  ExpertLoad& load = expert_load_[rank];
  {
    load.window.clear();
    for (const auto& [layer, rows] : cumulative) {
      std::vector<int64_t>& window = load.window[layer];
      window.assign(rows.size(), 0);
      const auto before = load.cumulative.find(layer);
      for (size_t e = 0; e < rows.size(); ++e) {
        const int64_t earlier =
            before != load.cumulative.end() && e < before->second.size() ? before->second[e] : 0;
        window[e] = std::max<int64_t>(rows[e] - earlier, 0);
      }
    }
    load.window_seconds = std::chrono::duration<double>(now - load.at).count();
  }
  load.at = now;
  load.cumulative = cumulative;
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
  if (!tracked_.empty()) return false;
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

std::vector<EngineEvent> RemoteStepEngine::step() {
  const int ranks = static_cast<int>(pending_admit_.size());
  std::vector<wp::Message> out(ranks);
  for (int r = 0; r < ranks; ++r) {
    out[r].kind = wp::Kind::kStep;
    for (const EngineSequence& s : pending_admit_[r])
      out[r].command.admit.push_back({s.id, s.prompt, s.resumed, s.max_new_tokens, s.temperature, s.top_p, s.seed});
    out[r].command.cancel = pending_cancel_[r];
  }
  std::vector<wp::Message> replies;
  try {
    replies = job_.exchange(out, options_.step_timeout);
  } catch (const Error& e) {
    recover(e.what());
    return {};
  }
  for (auto& queued : pending_admit_) queued.clear();
  for (auto& queued : pending_cancel_) queued.clear();
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
    if (!done.expert_rows.empty()) note_expert_rows(r, done.expert_rows);
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
  if (!tracked_.empty()) return;  // steps show the job's health while it works
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
  // Per-expert and per-worker load of the last window (about a second; where the exchange counts rows).
  std::map<int64_t, std::vector<int64_t>> by_expert;
  std::vector<std::pair<size_t, int64_t>> by_rank;
  double window_seconds = 0;
  for (size_t r = 0; r < expert_load_.size(); ++r) {
    if (expert_load_[r].window.empty()) continue;
    int64_t rank_rows = 0;
    for (const auto& [layer, rows] : expert_load_[r].window) {
      std::vector<int64_t>& total = by_expert[layer];
      total.resize(std::max(total.size(), rows.size()), 0);
      for (size_t e = 0; e < rows.size(); ++e) total[e] += rows[e], rank_rows += rows[e];
    }
    window_seconds = std::max(window_seconds, expert_load_[r].window_seconds);
    by_rank.emplace_back(r, rank_rows);
  }
  if (by_expert.empty()) return out.take();
  out.single("epic_load_window_seconds", "gauge", "The window the per-expert and per-worker rows below cover.",
             window_seconds);
  out.family("epic_worker_expert_rows_window", "gauge", "Token rows each worker rank's experts computed in the window.");
  for (const auto& [r, rows] : by_rank) out.sample("epic_worker_expert_rows_window", rank(r), double(rows));
  out.family("epic_expert_rows_window", "gauge", "Token rows each (MoE layer, expert) computed in the window, all ranks.");
  for (const auto& [layer, rows] : by_expert)
    for (size_t e = 0; e < rows.size(); ++e)
      out.sample("epic_expert_rows_window",
                 "{layer=\"" + std::to_string(layer) + "\",expert=\"" + std::to_string(e) + "\"}", double(rows[e]));
  return out.take();
}

}  // namespace epic
