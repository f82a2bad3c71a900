// Cluster faults under `mpirun -np 3 epic run` on the tiny preset: a rank that gets stuck mid-generation
// (SIGSTOP, an endless loop) ends the job within one --comm-timeout with one message naming it; a rank
// killed mid-run is named, in one line, before mpirun's own text; a failure on one rank alone ends the job
// at once, whether it comes before a collective, in a generation step (prefill or decode) or inside the MoE
// exchange, on one rank or on every rank together; and runs with tiny timeouts never hang (each either
// prints the right tokens or fails with one message). Faults come from EPIC_TEST_COMM_FAULT (before a
// collective: rank 2 at collective 30 is in the first decode step) and EPIC_TEST_STEP_FAULT (at a
// generation step) of comm/fault_injection.h.
// Every run has a deadline; the test kills what it started (every process of the run's session, by pid).
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "../model/temp_dir.h"
#include "tests/support/mpi_test_environment.h"

namespace epic {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

[[maybe_unused]] const bool kMpiEnvironmentSet = testing::set_mpi_test_environment();

constexpr double kRunDeadlineSeconds = 60.0;  // a run still going after this has hung

// A test fault: which variable of comm/fault_injection.h, and its value.
struct Fault {
  const char* variable = "EPIC_TEST_COMM_FAULT";
  std::string value;
};
Fault comm_fault(const std::string& value) { return {"EPIC_TEST_COMM_FAULT", value}; }
Fault step_fault(const std::string& value) { return {"EPIC_TEST_STEP_FAULT", value}; }

struct JobRun {
  int exit_code = -1;  // -1: killed at the deadline
  bool hung = false;
  double seconds = 0;
  std::string out, err;
};

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

// The pids of every process in session `session` (mpirun and the ranks it started; the ranks get process
// groups of their own, so killing mpirun's group would miss them).
std::vector<pid_t> session_members(pid_t session) {
  std::vector<pid_t> members;
  DIR* proc = opendir("/proc");
  if (proc == nullptr) return members;
  while (dirent* entry = readdir(proc)) {
    const pid_t pid = static_cast<pid_t>(std::atoi(entry->d_name));
    if (pid <= 0) continue;
    const std::string stat = read_file(fs::path("/proc") / entry->d_name / "stat");
    const size_t close = stat.rfind(')');
    if (close == std::string::npos) continue;
    char state = 0;
    int parent = 0, group = 0, member_session = 0;
    if (std::sscanf(stat.c_str() + close + 1, " %c %d %d %d", &state, &parent, &group, &member_session) ==
            4 &&
        member_session == session && state != 'Z')
      members.push_back(pid);
  }
  closedir(proc);
  return members;
}

void kill_session(pid_t session) {
  for (pid_t pid : session_members(session)) kill(pid, SIGKILL);
}

// Runs `command` through sh in a session of its own, stdout and stderr to files in `dir`, with `fault`'s
// variable set (both fault variables unset when its value is empty). Past the deadline every process of
// the session is killed and the run counts as hung. Processes left behind by mpirun are killed too, and
// reported.
JobRun run_job(const std::string& command, const Fault& fault, const fs::path& dir,
               std::string* leftovers = nullptr) {
  const fs::path out_path = dir / "out.txt", err_path = dir / "err.txt";
  const auto start = Clock::now();
  const pid_t child = fork();
  if (child == 0) {
    setsid();
    unsetenv("EPIC_TEST_COMM_FAULT");
    unsetenv("EPIC_TEST_STEP_FAULT");
    if (!fault.value.empty()) setenv(fault.variable, fault.value.c_str(), 1);
    const int out = open(out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int err = open(err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(out, STDOUT_FILENO);
    dup2(err, STDERR_FILENO);
    execl("/bin/sh", "sh", "-c", command.c_str(), static_cast<char*>(nullptr));
    _exit(127);
  }
  JobRun run;
  int status = 0;
  while (true) {
    const pid_t done = waitpid(child, &status, WNOHANG);
    if (done == child) break;
    if (std::chrono::duration<double>(Clock::now() - start).count() > kRunDeadlineSeconds) {
      run.hung = true;
      kill_session(child);
      waitpid(child, &status, 0);
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  run.seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!run.hung) run.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  // mpirun is gone: anything of its session still alive after a moment was left behind.
  std::vector<pid_t> left = session_members(child);
  for (int i = 0; i < 100 && !left.empty(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    left = session_members(child);
  }
  if (!left.empty()) {
    kill_session(child);
    if (leftovers != nullptr) *leftovers += std::to_string(left.size()) + " process(es) outlived mpirun; ";
  }
  run.out = read_file(out_path);
  run.err = read_file(err_path);
  return run;
}

size_t count_lines_starting(const std::string& text, const std::string& prefix) {
  size_t count = 0;
  for (size_t at = 0; at < text.size();) {
    if (text.compare(at, prefix.size(), prefix) == 0) ++count;
    const size_t newline = text.find('\n', at);
    if (newline == std::string::npos) break;
    at = newline + 1;
  }
  return count;
}

size_t count_occurrences(const std::string& text, const std::string& needle) {
  size_t count = 0;
  for (size_t at = text.find(needle); at != std::string::npos; at = text.find(needle, at + needle.size()))
    ++count;
  return count;
}

class ClusterFault : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    temp_ = new testing::TempDir;
    model_ = temp_->path() / "tiny";
    const JobRun made = run_job(
        std::string(EPIC_BINARY) + " make-model --preset tiny --out " + model_.string(), {}, temp_->path());
    ASSERT_EQ(made.exit_code, 0) << made.err;
    const JobRun reference = run_job(std::string(EPIC_BINARY) + " " + run_args(300), {}, temp_->path());
    ASSERT_EQ(reference.exit_code, 0) << reference.err;
    reference_out_ = new std::string(reference.out);
    // A clean 3-rank run: mpirun's start-up and shut-down, which a fault run spends on top of the wait.
    clean_seconds_ = 0;
    std::string leftovers;
    const JobRun clean = run_job(mpirun(3) + run_args(300), {}, temp_->path(), &leftovers);
    ASSERT_EQ(clean.exit_code, 0) << clean.err;
    ASSERT_EQ(clean.out, *reference_out_);
    ASSERT_EQ(leftovers, "");
    clean_seconds_ = clean.seconds;
    // One prompt per rank (sequences are spread over the workers), so every rank computes logits.
    prompts_file_ = temp_->path() / "three_prompts.txt";
    std::ofstream(prompts_file_) << "1,2,3\n4,5,6,7\n8,9\n";
  }
  static void TearDownTestSuite() {
    delete temp_;
    delete reference_out_;
  }

  static std::string run_args(double comm_timeout) {
    std::ostringstream timeout;
    timeout << comm_timeout;
    return "run --model " + model_.string() + " --prompt-ids 1,2,3 --max-new-tokens 8 --comm-timeout " +
           timeout.str();
  }
  static std::string three_prompt_args(double comm_timeout) {
    std::ostringstream timeout;
    timeout << comm_timeout;
    return "run --model " + model_.string() + " --prompt-ids-file " + prompts_file_.string() +
           " --max-new-tokens 8 --comm-timeout " + timeout.str();
  }
  static std::string mpirun(int ranks) {
    return std::string(EPIC_MPIEXEC) + " -np " + std::to_string(ranks) + " " + EPIC_BINARY + " ";
  }

  // A fault run: bounded, nothing left behind, failed, one epic error line (and returns the run).
  JobRun run_fault(const Fault& fault, double comm_timeout, const fs::path& dir) {
    return run_fault_with(fault, mpirun(3) + run_args(comm_timeout), dir);
  }
  JobRun run_fault_with(const Fault& fault, const std::string& command, const fs::path& dir) {
    std::string leftovers;
    JobRun run = run_job(command, fault, dir, &leftovers);
    EXPECT_FALSE(run.hung) << "the job hung: " << run.err;
    EXPECT_EQ(leftovers, "") << run.err;
    EXPECT_NE(run.exit_code, 0) << run.err;
    EXPECT_EQ(count_lines_starting(run.err, "epic: error ["), 1u) << "want exactly one report:\n" << run.err;
    return run;
  }

  static testing::TempDir* temp_;
  static fs::path model_;
  static fs::path prompts_file_;
  static std::string* reference_out_;
  static double clean_seconds_;
};
testing::TempDir* ClusterFault::temp_ = nullptr;
fs::path ClusterFault::model_;
fs::path ClusterFault::prompts_file_;
std::string* ClusterFault::reference_out_ = nullptr;
double ClusterFault::clean_seconds_ = 0;

// The old ending took two timeouts (the destructor waited for the stuck operation once more); one
// timeout plus a clean run's start-up and shut-down, with a margin well under a second timeout, is the bar.
constexpr double kStuckTimeoutSeconds = 8.0;
constexpr double kMarginSeconds = 4.0;

TEST_F(ClusterFault, StoppedRankIsNamedWithinOneTimeout) {
  testing::TempDir dir;
  const JobRun run = run_fault(comm_fault("2:30:stop"), kStuckTimeoutSeconds, dir.path());
  EXPECT_LT(run.seconds, clean_seconds_ + kStuckTimeoutSeconds + kMarginSeconds) << run.err;
  EXPECT_NE(run.err.find("rank 2 is stuck or dead"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("stopped by a signal, after "), std::string::npos) << run.err;
  EXPECT_EQ(run.err.find("rank 0 is stuck"), std::string::npos) << run.err;
  EXPECT_EQ(run.err.find("rank 1 is stuck"), std::string::npos) << run.err;
}

TEST_F(ClusterFault, SpinningRankIsNamedWithinOneTimeout) {
  testing::TempDir dir;
  const JobRun run = run_fault(comm_fault("1:30:spin"), kStuckTimeoutSeconds, dir.path());
  EXPECT_LT(run.seconds, clean_seconds_ + kStuckTimeoutSeconds + kMarginSeconds) << run.err;
  EXPECT_NE(run.err.find("rank 1 is stuck or dead"), std::string::npos) << run.err;
  EXPECT_NE(run.err.find("busy computing after "), std::string::npos) << run.err;
  // Ranks 0 and 2 are waiting (in this collective or an earlier one that needs rank 1): never blamed.
  EXPECT_EQ(run.err.find("rank 0 is stuck"), std::string::npos) << run.err;
  EXPECT_EQ(run.err.find("rank 2 is stuck"), std::string::npos) << run.err;
}

TEST_F(ClusterFault, KilledRankIsNamedBeforeMpirunsText) {
  testing::TempDir dir;
  // A long timeout: the survivors must not wait for it to learn that rank 2 is gone.
  const JobRun run = run_fault(comm_fault("2:30:kill"), 120, dir.path());
  EXPECT_LT(run.seconds, clean_seconds_ + 2 * kMarginSeconds) << run.err;
  const size_t report = run.err.find("epic: error [communication]: rank 2 (pid ");
  ASSERT_NE(report, std::string::npos) << run.err;
  EXPECT_NE(run.err.find(") died ", report), std::string::npos) << run.err;
  // Before mpirun's account of the death. (mpirun prints "Primary job terminated" the moment it reaps
  // the rank, before it forwards anything the survivors write, so that block may come first.)
  const size_t mpirun_account = run.err.find("mpirun noticed that process rank 2");
  EXPECT_TRUE(mpirun_account == std::string::npos || report < mpirun_account) << run.err;
  EXPECT_EQ(run.err.find("MPI_ABORT was invoked"), std::string::npos)
      << "the launcher ends the job after a death; the survivors need not abort it on top:\n"
      << run.err;
}

TEST_F(ClusterFault, FailureOnOneRankEndsTheJobAtOnce) {
  testing::TempDir dir;
  const JobRun run = run_fault(comm_fault("1:30:throw"), 120, dir.path());
  EXPECT_LT(run.seconds, clean_seconds_ + 2 * kMarginSeconds) << run.err;
  EXPECT_NE(run.err.find("epic: error [internal]: rank 1: injected test fault"), std::string::npos)
      << run.err;
}

// An error during generation on one rank ends every rank promptly, however long --comm-timeout is: the
// failing rank reports once, naming itself and the error, and MPI_Abort ends the peers waiting for it in a
// collective. The bound is a clean run's start-up and shut-down plus a margin, far under the timeout.
// The default timeout: a run that waited for it would be killed at the 60 s deadline.
constexpr double kLongTimeoutSeconds = 300.0;
constexpr double kPromptEndSeconds = 30.0;

void expect_prompt_end(const JobRun& run, double clean_seconds, int exit_code, const std::string& report) {
  EXPECT_LT(run.seconds, clean_seconds + 2 * kMarginSeconds) << run.err;
  EXPECT_LT(run.seconds, kPromptEndSeconds) << run.err;
  EXPECT_EQ(run.exit_code, exit_code) << run.err;
  EXPECT_EQ(count_occurrences(run.err, report), 1u) << "want the report once: " << report << "\n" << run.err;
}

TEST_F(ClusterFault, ErrorInPrefillEndsEveryRankAtOnce) {
  testing::TempDir dir;
  const JobRun run = run_fault(step_fault("1:1:throw"), kLongTimeoutSeconds, dir.path());
  expect_prompt_end(
      run, clean_seconds_, 1,
      "epic: error [internal]: rank 1: injected test fault (EPIC_TEST_STEP_FAULT) at generation "
      "step 1\n");
}

TEST_F(ClusterFault, ErrorInDecodeStepEndsEveryRankAtOnce) {
  testing::TempDir dir;
  const JobRun run = run_fault(step_fault("2:4:throw"), kLongTimeoutSeconds, dir.path());
  expect_prompt_end(
      run, clean_seconds_, 1,
      "epic: error [internal]: rank 2: injected test fault (EPIC_TEST_STEP_FAULT) at generation "
      "step 4\n");
}

// A bad value found by the loop's own check (the NaN logits message names no rank of its own): the report
// gets the failing rank's prefix, and the job its exit code (2: the checkpoint's fault).
TEST_F(ClusterFault, NonFiniteLogitsOnOneRankEndEveryRankAtOnce) {
  testing::TempDir dir;
  const JobRun run =
      run_fault_with(step_fault("2:3:nan"), mpirun(3) + three_prompt_args(kLongTimeoutSeconds), dir.path());
  expect_prompt_end(run, clean_seconds_, 2, "epic: error [invalid-checkpoint]: rank 2: sequence ");
  EXPECT_NE(run.err.find(", decode step 2: the logits hold NaN at token id 0"), std::string::npos) << run.err;
}

// Collective 36 is the combine of MoE layer 2 in the first decode step (14 start-up collectives, the node
// topology's among them, then per step 1 + 4 in each of the 3 MoE layers): rank 1 has sent and received its
// rows, the peers wait for it in the combine. The message says where, so the test checks its own premise.
TEST_F(ClusterFault, ErrorInsideMoeExchangeEndsEveryRankAtOnce) {
  testing::TempDir dir;
  const JobRun run = run_fault(comm_fault("1:36:throw"), kLongTimeoutSeconds, dir.path());
  expect_prompt_end(run, clean_seconds_, 1,
                    "epic: error [internal]: rank 1: injected test fault (EPIC_TEST_COMM_FAULT) before "
                    "collective #36 (MoE layer 2 combine)\n");
}

// Every rank fails in the same step (as NaN weights in the replicated dense layers would make them): still
// one report for the job, naming the one rank that got to report.
TEST_F(ClusterFault, ErrorOnEveryRankAtOnceIsReportedOnce) {
  testing::TempDir dir;
  const JobRun run =
      run_fault_with(step_fault("*:3:nan"), mpirun(3) + three_prompt_args(kLongTimeoutSeconds), dir.path());
  EXPECT_LT(run.seconds, clean_seconds_ + 2 * kMarginSeconds) << run.err;
  EXPECT_EQ(run.exit_code, 2) << run.err;
  size_t reports = 0;
  for (const std::string rank : {"0", "1", "2"})
    reports += count_occurrences(run.err, "epic: error [invalid-checkpoint]: rank " + rank + ": sequence ");
  EXPECT_EQ(reports, 1u) << run.err;
}

// A malformed test-fault value is refused on every rank at the first step, reported once for the job.
TEST_F(ClusterFault, MalformedStepFaultIsReportedOnce) {
  testing::TempDir dir;
  const JobRun run = run_fault(step_fault("1:x:throw"), kLongTimeoutSeconds, dir.path());
  EXPECT_LT(run.seconds, clean_seconds_ + 2 * kMarginSeconds) << run.err;
  EXPECT_EQ(run.exit_code, 2) << run.err;
  EXPECT_NE(run.err.find("EPIC_TEST_STEP_FAULT=\"1:x:throw\" is not RANK:STEP:ACTION"), std::string::npos)
      << run.err;
}

// Every rank checks the flags before MPI starts; the job must report a bad flag once, not once per rank.
TEST_F(ClusterFault, BadFlagIsReportedOnceForTheWholeJob) {
  testing::TempDir dir;
  for (const std::string& bad :
       {std::string("--comm-timeout nan"), std::string("--max-active-sequences 0")}) {
    std::string leftovers;
    const JobRun run = run_job(mpirun(3) + "run --model " + model_.string() + " --prompt-ids 1,2 " + bad, {},
                               dir.path(), &leftovers);
    EXPECT_FALSE(run.hung) << run.err;
    EXPECT_EQ(leftovers, "") << run.err;
    EXPECT_EQ(run.exit_code, 2) << run.err;
    EXPECT_EQ(count_lines_starting(run.err, "epic: error ["), 1u) << "want exactly one report:\n" << run.err;
  }
}

// 2 in ~315 such runs hung before (ranks 0 and 1 reported timeouts, rank 2 never ended).
// EPIC_FAULT_LOOP_RUNS raises the count for a longer soak.
TEST_F(ClusterFault, TinyTimeoutsNeverHang) {
  const char* runs_variable = std::getenv("EPIC_FAULT_LOOP_RUNS");
  const int runs_per_timeout = runs_variable != nullptr ? std::atoi(runs_variable) : 20;
  testing::TempDir dir;
  int succeeded = 0, failed = 0;
  for (double comm_timeout : {0.001, 0.01}) {
    for (int i = 0; i < runs_per_timeout; ++i) {
      std::string leftovers;
      const JobRun run = run_job(mpirun(3) + run_args(comm_timeout), {}, dir.path(), &leftovers);
      ASSERT_FALSE(run.hung) << "run " << i << " with --comm-timeout " << comm_timeout << " hung:\n"
                             << run.err;
      EXPECT_EQ(leftovers, "") << run.err;
      if (run.exit_code == 0) {
        ++succeeded;
        EXPECT_EQ(run.out, *reference_out_) << run.err;
      } else {
        ++failed;
        EXPECT_EQ(count_lines_starting(run.err, "epic: error ["), 1u)
            << "run " << i << " with --comm-timeout " << comm_timeout << ": want exactly one report:\n"
            << run.err;
      }
    }
  }
  std::printf("[ LOOP     ] %d runs succeeded, %d failed with one report, 0 hung\n", succeeded, failed);
}

}  // namespace
}  // namespace epic
