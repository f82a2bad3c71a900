// Launching, watching and ending the worker job (worker_job.h).
#include "coordinator/worker_job.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <thread>

#include "kernels/error.h"

namespace epic {

namespace wp = worker_protocol;

WorkerJob::WorkerJob(WorkerJobOptions options)
    : options_(std::move(options)), links_(options_.listen_host, options_.listen_port) {}

WorkerJob::~WorkerJob() {
  if (launcher_pid_ > 0) kill();
}

std::string WorkerJob::address() const {
  const std::string host = options_.connect_host.empty() ? options_.listen_host : options_.connect_host;
  return (host.find(':') != std::string::npos ? "[" + host + "]" : host) + ":" + std::to_string(port());
}

void WorkerJob::launch() {
  std::vector<std::string> argv = options_.launcher;
  argv.push_back(options_.executable);
  argv.push_back("worker");
  argv.push_back("--coordinator");
  argv.push_back(address());
  argv.insert(argv.end(), options_.worker_args.begin(), options_.worker_args.end());
  std::vector<char*> c_argv;
  for (std::string& arg : argv) c_argv.push_back(arg.data());
  c_argv.push_back(nullptr);
  std::string command;
  for (const std::string& arg : argv) command += (command.empty() ? "" : " ") + arg;
  std::fprintf(stderr, "epic serve: starting the worker job: %s\n", command.c_str());
  const pid_t pid = fork();
  if (pid < 0) throw Error(ErrorCode::kCommunication, std::string("fork failed: ") + std::strerror(errno));
  if (pid == 0) {
    // The child: its own process group (killed as one), stdin from /dev/null, its output on our stderr
    // (stdout is the server's own), the signals the server blocks unblocked again.
    setpgid(0, 0);
    const int null_fd = open("/dev/null", O_RDONLY);
    if (null_fd >= 0) dup2(null_fd, STDIN_FILENO);
    dup2(STDERR_FILENO, STDOUT_FILENO);
    sigset_t none;
    sigemptyset(&none);
    pthread_sigmask(SIG_SETMASK, &none, nullptr);
    execvp(c_argv[0], c_argv.data());
    std::fprintf(stderr, "epic serve: cannot run %s: %s\n", c_argv[0], std::strerror(errno));
    _exit(127);
  }
  setpgid(pid, pid);  // also from here, so it holds before either side goes on
  launcher_pid_ = pid;
}

void WorkerJob::reap(bool wait) {
  if (launcher_pid_ <= 0) return;
  int status = 0;
  const pid_t done = waitpid(launcher_pid_, &status, wait ? 0 : WNOHANG);
  if (done == launcher_pid_ || (done < 0 && errno == ECHILD)) {
    launcher_status_ = status;
    launcher_pid_ = -1;
  }
}

bool WorkerJob::launcher_running() {
  if (attached()) return true;
  reap(false);
  return launcher_pid_ > 0;
}

void WorkerJob::start() {
  hellos_.clear();
  if (!attached()) launch();
  else
    std::fprintf(stderr, "epic serve: waiting for a worker job to attach at %s\n", address().c_str());
  try {
    hellos_ = links_.accept_job(options_.ranks, clock_type::now() + options_.start_timeout,
                                [this] { return !launcher_running(); });
  } catch (const Error&) {
    kill();
    throw;
  }
  for (const wp::Hello& hello : hellos_) {
    std::string problem;
    if (options_.vocab_size > 0 && hello.vocab_size != options_.vocab_size)
      problem = "a vocabulary of " + std::to_string(hello.vocab_size) + " tokens, the coordinator's model has " +
                std::to_string(options_.vocab_size) + " (start the workers with the same --model)";
    else if (hello.max_context < options_.min_context)
      problem = "a context of " + std::to_string(hello.max_context) + " positions, below the coordinator's " +
                std::to_string(options_.min_context) + " (start the workers with the same --max-context)";
    if (!problem.empty()) {
      kill();
      throw Error(ErrorCode::kInvalidArgument,
                  "worker rank " + std::to_string(hello.rank) + " (" + hello.host + ") has " + problem);
    }
  }
  std::string ranks;
  for (const wp::Hello& hello : hellos_)
    ranks += (ranks.empty() ? "" : ", ") + std::to_string(hello.rank) + "@" + hello.host + " pid " +
             std::to_string(hello.pid);
  std::fprintf(stderr, "epic serve: worker job ready: %zu rank(s) (%s), %s\n", hellos_.size(), ranks.c_str(),
               hellos_.empty() ? "" : hellos_[0].backend.c_str());
}

void WorkerJob::stop(std::chrono::milliseconds grace) {
  wp::Message shutdown;
  shutdown.kind = wp::Kind::kShutdown;
  const auto deadline = clock_type::now() + grace;
  links_.send_all(shutdown, deadline);
  while (launcher_running() && !attached() && clock_type::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (launcher_running() && !attached()) kill();
  links_.drop_job();
  hellos_.clear();
}

void WorkerJob::kill() {
  links_.drop_job();
  hellos_.clear();
  if (launcher_pid_ <= 0) return;
  // A launcher whose rank died is usually ending the job itself already (mpirun aborts it, and crashes
  // if signalled while it does): it gets 3 s for that. Then SIGTERM (mpirun and srun end their ranks on
  // it), and one that lingers 5 s more is killed with everything in its process group.
  auto deadline = clock_type::now() + std::chrono::seconds(3);
  while (launcher_running() && clock_type::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (launcher_pid_ <= 0) return;
  ::kill(launcher_pid_, SIGTERM);
  deadline = clock_type::now() + std::chrono::seconds(5);
  while (launcher_running() && clock_type::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  if (launcher_pid_ > 0) {
    ::kill(-launcher_pid_, SIGKILL);
    reap(true);
  }
}

std::vector<wp::Message> WorkerJob::exchange(const std::vector<wp::Message>& out,
                                             std::chrono::milliseconds timeout, bool read_replies) {
  if (!launcher_running())
    throw Error(ErrorCode::kCommunication, "the worker job's launcher exited (status " +
                                               std::to_string(launcher_status_) + ")");
  return links_.exchange(out, clock_type::now() + timeout, read_replies);
}

}  // namespace epic
