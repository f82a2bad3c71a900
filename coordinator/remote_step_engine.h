// The serve scheduler's engine when the model runs in a worker job (issue 11): sequences are placed on
// the job's ranks by load (attention is data parallel: each rank holds its sequences' KV caches), every
// step is one message to and from every rank (the ranks step together through their own MPI/NCCL
// collectives; the next step's message goes out before the last one's answer is read, so the ranks never wait
// for a round trip), and a job that dies is replaced without losing a request: the coordinator keeps every
// in-flight sequence's prompt and the tokens it already reported, starts a new job, and admits each
// sequence again with those tokens as resumed ones (the worker prefills them and its sampler skips their
// draws), so the tokens that follow are the ones an uninterrupted run gives and none is reported twice.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "coordinator/expert_load_window.h"
#include "coordinator/step_engine.h"
#include "coordinator/worker_job.h"

namespace epic {

struct RemoteEngineOptions {
  std::chrono::milliseconds step_timeout{std::chrono::seconds(300)};  // a step longer than this: dead job
  std::chrono::milliseconds ping_timeout{std::chrono::seconds(10)};
  std::chrono::milliseconds heartbeat_interval{std::chrono::seconds(1)};
  // Restarts in a row without a step that went through; one more is an error that ends the server.
  int max_restarts = 5;
};

class RemoteStepEngine final : public StepEngine {
 public:
  // The job must be started already (WorkerJob::start); it is restarted through `job` on failure.
  RemoteStepEngine(WorkerJob& job, RemoteEngineOptions options);

  void admit(EngineSequence sequence) override;
  bool cancel(int64_t id) override;
  // Cancels not yet sent, and a step whose answer is not read yet, keep it busy.
  bool idle() const override;
  std::vector<EngineEvent> step() override;
  int64_t live_sequences() const override;
  int64_t waiting_sequences() const override;
  bool ready() const override { return ready_; }
  std::chrono::milliseconds heartbeat_interval() const override { return options_.heartbeat_interval; }
  void heartbeat() override;
  std::string metrics_text() const override;

  int64_t restarts() const { return restarts_; }

 private:
  struct Tracked {
    EngineSequence sequence;  // resumed grows with every token reported
    int rank = 0;
  };
  struct RankLoad {
    int64_t live = 0, waiting = 0, kv_tokens = 0, sequences = 0;
  };
  void reset_rank_views();  // after a (re)start: as many ranks as the job has, nothing known yet
  // Every rank's kStep with its pending admissions and cancels (taken: they are on their way).
  std::vector<worker_protocol::Message> take_step_commands();
  int least_loaded_rank() const;
  // The job failed (`why`): ends it, starts a new one, and queues every tracked sequence again with its
  // reported tokens as resumed ones. Error when max_restarts restarts in a row did not bring a step through.
  void recover(const std::string& why);

  WorkerJob& job_;
  RemoteEngineOptions options_;
  std::map<int64_t, Tracked> tracked_;                       // admitted, not finished or cancelled
  std::vector<std::vector<EngineSequence>> pending_admit_;   // per rank, sent with the next step
  std::vector<std::vector<int64_t>> pending_cancel_;         // per rank
  std::atomic<bool> ready_{true};
  std::atomic<int64_t> restarts_{0};
  int failures_in_a_row_ = 0;
  int steps_in_flight_ = 0;  // 0 or 1: a step sent whose answer is not read yet (step() keeps one ahead)
  mutable std::mutex load_mutex_;  // the metrics' view, read from the HTTP thread
  std::vector<RankLoad> load_;
  std::vector<int64_t> kv_capacity_;       // per rank, from its hello
  ExpertLoadWindow expert_load_;
  std::atomic<int64_t> sequences_resumed_{0};
};

}  // namespace epic
