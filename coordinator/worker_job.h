// The worker job as the coordinator sees it (issue 11): the launcher process it starts (`mpirun -np N
// epic worker ...`, or `srun` inside a Slurm allocation) or, with attach, a job started apart that
// connects to it; the ranks' connections (worker_link.h); and the end of a job, orderly or not. A job that
// dies is noticed through its connections (a closed socket, a missed deadline) and the launcher's exit;
// the remote engine (remote_step_engine.h) then kills what is left and starts a new one.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "coordinator/worker_link.h"

namespace epic {

struct WorkerJobOptions {
  // The launcher's argv before the worker's own (e.g. {"mpirun", "-np", "2", "--bind-to", "none"}); empty
  // with attach (nothing is launched: a job started apart connects).
  std::vector<std::string> launcher;
  std::string executable;                // the epic binary the launcher runs
  std::vector<std::string> worker_args;  // after `worker --coordinator HOST:PORT`
  int ranks = 0;                         // expected ranks (0 with attach: what the first hello says)
  std::string listen_host = "127.0.0.1";
  uint16_t listen_port = 0;        // 0: any free port (launched jobs are told which)
  std::string connect_host;        // what the ranks connect to ("": the listen host)
  std::chrono::seconds start_timeout{600};  // launch to every rank's hello (loading the weights included)
  // What every rank's hello must say (0: not checked): the coordinator's model's vocabulary, and at least
  // the coordinator's context per sequence.
  int64_t vocab_size = 0, min_context = 0;
};

class WorkerJob {
 public:
  using clock_type = std::chrono::steady_clock;
  explicit WorkerJob(WorkerJobOptions options);
  ~WorkerJob();  // kills a launched job that is still running
  WorkerJob(const WorkerJob&) = delete;
  WorkerJob& operator=(const WorkerJob&) = delete;

  // Launches the job (or waits for one to attach) and takes every rank's hello. Error(kCommunication) when
  // the job ends or does not connect in time (a launched one is killed then).
  void start();
  // Ends the job: a shutdown message to every rank, the launcher waited for up to `grace`, then killed.
  void stop(std::chrono::milliseconds grace);
  // Ends a failed job at once: the launcher is told to end its ranks (SIGTERM), then killed with its
  // process group if it lingers; the connections are dropped (attached ranks exit when theirs closes).
  void kill();
  // False once a launched job's launcher exited (always true with attach).
  bool launcher_running();

  const std::vector<worker_protocol::Hello>& hellos() const { return hellos_; }
  int ranks() const { return static_cast<int>(hellos_.size()); }
  uint16_t port() const { return links_.port(); }
  std::string address() const;  // HOST:PORT the ranks connect to
  bool attached() const { return options_.launcher.empty(); }

  // One message to (none when out is empty) and, with read_replies, from every rank under a deadline
  // (WorkerLinks::exchange); also an error when the launcher has exited.
  std::vector<worker_protocol::Message> exchange(const std::vector<worker_protocol::Message>& out,
                                                 std::chrono::milliseconds timeout, bool read_replies = true);

 private:
  void launch();
  void reap(bool wait);

  WorkerJobOptions options_;
  WorkerLinks links_;
  pid_t launcher_pid_ = -1;
  int launcher_status_ = 0;
  std::vector<worker_protocol::Hello> hellos_;
};

}  // namespace epic
