// `epic run` as an N-worker cluster under mpirun against the single-process run: identical text
// and ids, bitwise-identical prompt logits, for 2, 3 and 5 workers, uneven per-layer expert
// counts (pruned router, masked missing experts), replicas, and workers that receive no tokens.
// Also: each worker reads only the experts the plan gives it (bytes counted from shard headers).
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <csignal>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <thread>

#include "../model/temp_dir.h"
#include "tests/support/mpi_test_environment.h"
#include "worker/checkpoint.h"

namespace epic {
namespace {

namespace fs = std::filesystem;
using nlohmann::json;

struct Outcome {
  int exit_code = -1;
  std::string out, err;
};

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

[[maybe_unused]] const bool kMpiEnvironmentSet = testing::set_mpi_test_environment();

// Runs epic with `workers` ranks (1: directly, no mpirun) in dir; outputs land in dir. `environment`
// ("NAME=value ") goes before the launcher, so every rank sees it.
Outcome run_epic(int workers, const std::string& args, const fs::path& dir,
                 const std::string& environment = "") {
  const std::string launcher =
      workers == 1 ? std::string() : std::string(EPIC_MPIEXEC) + " -np " + std::to_string(workers) + " ";
  const std::string command = environment + launcher + EPIC_BINARY + " " + args + " >" +
                              (dir / "out.txt").string() + " 2>" + (dir / "err.txt").string();
  const int status = std::system(command.c_str());
  return {WIFEXITED(status) ? WEXITSTATUS(status) : -1, read_file(dir / "out.txt"),
          read_file(dir / "err.txt")};
}

struct ClusterCase {
  std::string name;
  std::string model;         // fixture name
  std::string args;          // prompt and run flags
  std::string cluster_args;  // extra flags for the multi-worker runs only (placement)
};

// Test names show the case name, not the struct's bytes.
void PrintTo(const ClusterCase& c, std::ostream* out) { *out << c.name; }

class ClusterMatchesOneProcess : public ::testing::TestWithParam<std::tuple<ClusterCase, int>> {};

TEST_P(ClusterMatchesOneProcess, SameTokensAndBitwiseLogits) {
  const auto& [c, workers] = GetParam();
  testing::TempDir temp;
  const fs::path model = fs::path(EPIC_GOLDEN_DIR) / c.model;
  fs::create_directories(temp.path() / "one");
  fs::create_directories(temp.path() / "many");
  const std::string common = "run --model " + model.string() + " " + c.args;
  const Outcome one =
      run_epic(1, common + " --logits-out " + (temp.path() / "one/logits.npy").string(), temp.path() / "one");
  ASSERT_EQ(one.exit_code, 0) << one.err;
  const Outcome many =
      run_epic(workers,
               common + " " + c.cluster_args + " --logits-out " + (temp.path() / "many/logits.npy").string() +
                   " --report-out " + (temp.path() / "many/report.json").string(),
               temp.path() / "many");
  ASSERT_EQ(many.exit_code, 0) << many.err;
  EXPECT_EQ(many.out, one.out);
  EXPECT_EQ(read_file(temp.path() / "many/logits.npy"), read_file(temp.path() / "one/logits.npy"))
      << "prompt logits differ from the single-process run";
  // The planner's view of a budget comes with the run (the share of each worker's load its hottest resident
  // experts would serve).
  if (c.cluster_args.find("--expert-budget") != std::string::npos)
    EXPECT_NE(many.err.find("placement with --expert-budget"), std::string::npos) << many.err;
  // A budget's store reports on every worker, with the miss path asked for.
  if (c.cluster_args.find("--on-miss read") != std::string::npos) {
    EXPECT_NE(many.err.find("on miss read"), std::string::npos) << many.err;
    EXPECT_EQ(many.err.find(" 0.00 MB read in place"), std::string::npos)
        << "no expert was read in place: " << many.err;
  }
  std::ifstream report_file(temp.path() / "many/report.json");
  const json report = json::parse(report_file);
  ASSERT_EQ(report["workers"].size(), static_cast<size_t>(workers));
  int64_t rows = 0;
  for (const json& worker : report["workers"]) rows += worker["rows_computed"].get<int64_t>();
  EXPECT_GT(rows, 0);
}

const std::vector<ClusterCase> kCases = {
    {"OnePrompt", "qwen3_moe_f32", "--prompt-ids 1,5,7,9,20,33 --max-new-tokens 6", ""},
    {"SeveralPromptsFromFile", "qwen3_moe_bf16",
     "--prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 4", ""},
    {"OmniLayout", "qwen3_omni_thinker_f16", "--prompt-ids 3,1,4,1,5,9,2,6 --max-new-tokens 4", ""},
    {"PrunedRouter", "pruned_router", "--prompt-ids 11,22,33,44 --max-new-tokens 5", ""},
    {"MaskedMissingExperts", "missing_experts",
     "--prompt-ids 8,6,7,5,3,0,9 --max-new-tokens 5 --allow-missing-experts", ""},
    {"Replicas", "qwen3_moe_f32",
     "--prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 3", "--slots 6"},
    {"Sampling", "qwen3_moe_f32",
     "--prompt-ids-file " EPIC_GOLDEN_DIR
     "/../prompts_ids.txt --max-new-tokens 6 --temperature 0.9 --top-p 0.8 --seed 17",
     ""},
    // One token, top-2: in every MoE layer at most two workers receive rows, the rest none.
    {"WorkersWithoutTokens", "qwen3_moe_f32", "--prompt-ids 42 --max-new-tokens 1", ""},
    // Few live sequences per worker: prompts wait, are admitted as others finish, prefill beside
    // other sequences' decode steps, and results stream to rank 0 out of prompt order.
    {"OneLiveSequencePerWorker", "qwen3_moe_bf16",
     "--prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 4",
     "--max-active-sequences 1"},
    {"TwoLiveSequencesSampling", "qwen3_moe_f32",
     "--prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 7 --temperature 0.9 --seed 3",
     "--max-active-sequences 2"},
    // Each worker's expert store holds its shard with only a budget of it resident (worker/expert_store.h):
    // one expert per layer, so every step computes its rows in several groups, and the disk tier.
    {"ExpertBudgetOnePerLayer", "qwen3_moe_f32",
     "--prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 4", "--expert-budget 1"},
    {"ExpertBudgetDiskTierMaskedExperts", "missing_experts",
     "--prompt-ids 8,6,7,5,3,0,9 --max-new-tokens 5 --allow-missing-experts",
     "--expert-budget 50% --expert-tier disk --eviction usefulness"},
    // ... and the disk tier behind a pinned host cache of two experts a layer on each worker.
    {"ExpertBudgetHostCache", "qwen3_moe_f32",
     "--prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 4",
     "--expert-budget 1 --expert-tier disk --host-budget 2 --eviction lfu"},
    // --on-miss read: each worker computes its received rows through its store's address table (a missing
    // expert read from host memory in place) and admits the misses after the step.
    {"ExpertBudgetReadInPlace", "qwen3_moe_f32",
     "--prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 5",
     "--expert-budget 1 --on-miss read --eviction usefulness"},
    // A residency state per prompt on the trained top-8 model (WAKE: 4 experts per token): the ranks agree
    // on 8 slots per row, a WAKE row's last 4 are padding the exchange does not send; with a budget too.
    {"ResidencyStatePerPrompt", "../../../configs/models/qwen3-moe-python-small",
     "--prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 4 --allow-missing-experts "
     "--residency-state wake,focus,wake,wake,focus",
     ""},
    {"ResidencyStatePerPromptBudgetRead", "../../../configs/models/qwen3-moe-python-small",
     "--prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 4 --allow-missing-experts "
     "--residency-state focus,wake,wake,focus,wake",
     "--expert-budget 25% --on-miss read --max-active-sequences 2"},
};

INSTANTIATE_TEST_SUITE_P(Golden, ClusterMatchesOneProcess,
                         ::testing::Combine(::testing::ValuesIn(kCases), ::testing::Values(2, 3, 5)),
                         [](const auto& info) {
                           return std::get<0>(info.param).name + "_" +
                                  std::to_string(std::get<1>(info.param)) + "workers";
                         });

// Every payload through MPI (plan broadcast, dispatch and combine rows, finished results with their
// prompt logits, reports) cut into 997-byte messages, as payloads past MPI's int counts are cut into
// 1 GiB ones: the output and the logits file stay bitwise those of one process.
TEST(Cluster, PayloadsInSmallPiecesGiveTheSameOutput) {
  testing::TempDir temp;
  fs::create_directories(temp.path() / "one");
  fs::create_directories(temp.path() / "many");
  const std::string common = "run --model " + (fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_bf16").string() +
                             " --prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 4";
  const Outcome one =
      run_epic(1, common + " --logits-out " + (temp.path() / "one/logits.npy").string(), temp.path() / "one");
  ASSERT_EQ(one.exit_code, 0) << one.err;
  const Outcome many = run_epic(
      3, common + " --max-active-sequences 1 --logits-out " + (temp.path() / "many/logits.npy").string(),
      temp.path() / "many", "EPIC_TEST_MPI_MESSAGE_BYTES=997 ");
  ASSERT_EQ(many.exit_code, 0) << many.err;
  EXPECT_EQ(many.out, one.out);
  const std::string logits = read_file(temp.path() / "one/logits.npy");
  EXPECT_GT(logits.size(), 5u * 997u) << "the logits must span several pieces";
  EXPECT_EQ(read_file(temp.path() / "many/logits.npy"), logits) << "prompt logits differ from one process";

  // The variable is read (a bad value is refused, naming it), so the run above did cut its payloads.
  const Outcome refused = run_epic(2, common, temp.path(), "EPIC_TEST_MPI_MESSAGE_BYTES=0 ");
  EXPECT_NE(refused.exit_code, 0);
  EXPECT_NE(refused.err.find("EPIC_TEST_MPI_MESSAGE_BYTES=\"0\""), std::string::npos) << refused.err;
}

// --on-miss substitute under mpirun: every step starts by gathering each worker's resident experts, and the
// sender routes a pick whose expert is not resident everywhere it is hosted to the most probable one that is.
// The same job twice gives the same output and substitutions (the residency evolves deterministically), some
// picks are substituted, and the hierarchical dispatch refuses it naming the flat one.
TEST(Cluster, SubstituteUnderMpirunIsDeterministicAndSubstitutes) {
  testing::TempDir temp;
  const std::string common =
      "run --model " +
      (fs::path(EPIC_GOLDEN_DIR) / "../../../configs/models/qwen3-moe-python-small").string() +
      " --allow-missing-experts --prompt-ids-file " EPIC_GOLDEN_DIR
      "/../prompts_ids.txt --max-new-tokens 6 --expert-budget 25% --on-miss substitute";
  std::vector<std::string> outputs;
  for (int run = 0; run < 2; ++run) {
    const fs::path dir = temp.path() / ("run" + std::to_string(run));
    fs::create_directories(dir);
    const Outcome outcome = run_epic(3, common, dir);
    ASSERT_EQ(outcome.exit_code, 0) << outcome.err;
    outputs.push_back(outcome.out);
    // "rank R experts: ... N of M picks substituted" per rank: some rank substituted.
    int64_t substituted = 0;
    for (size_t at = outcome.err.find(" picks substituted"); at != std::string::npos;
         at = outcome.err.find(" picks substituted", at + 1)) {
      const size_t of = outcome.err.rfind(" of ", at);
      const size_t start = outcome.err.rfind(' ', of - 1) + 1;
      substituted += std::stoll(outcome.err.substr(start, of - start));
    }
    EXPECT_GT(substituted, 0) << outcome.err;
  }
  EXPECT_EQ(outputs[0], outputs[1]);
  const Outcome refused = run_epic(2, common + " --ep-dispatch hierarchical --ranks-per-node 1", temp.path());
  EXPECT_EQ(refused.exit_code, 2) << refused.err;
  EXPECT_NE(refused.err.find("routes on the sender with the flat dispatch"), std::string::npos)
      << refused.err;
}

TEST(Cluster, EachWorkerReadsOnlyItsExperts) {
  testing::TempDir temp;
  const fs::path model = fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32";
  const Outcome run =
      run_epic(3,
               "run --model " + model.string() + " --prompt-ids 1,2,3 --max-new-tokens 2 --slots 4" +
                   " --placement-out " + (temp.path() / "plan.json").string() + " --report-out " +
                   (temp.path() / "report.json").string(),
               temp.path());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  std::ifstream plan_file(temp.path() / "plan.json"), report_file(temp.path() / "report.json");
  const json plan = json::parse(plan_file), report = json::parse(report_file);
  Checkpoint checkpoint = Checkpoint::open(model);
  uint64_t dense_bytes = 0;
  std::map<std::pair<int64_t, int64_t>, uint64_t> expert_bytes;
  for (const std::string& name : checkpoint.tensor_names()) {
    const uint64_t bytes = checkpoint.info(name).num_bytes();
    const size_t at = name.find(".mlp.experts.");
    if (at == std::string::npos) {
      dense_bytes += bytes;
      continue;
    }
    const int64_t layer = std::stoll(name.substr(name.find("layers.") + 7));
    const int64_t expert = std::stoll(name.substr(at + 13));
    expert_bytes[{layer, expert}] += bytes;
  }
  for (int worker = 0; worker < 3; ++worker) {
    uint64_t expected = dense_bytes;
    for (const json& layer : plan["layers"])
      for (const json& expert : layer["workers"][worker])
        expected += expert_bytes.at({layer["layer"], expert});
    EXPECT_EQ(report["workers"][worker]["bytes_read"].get<uint64_t>(), expected) << "worker " << worker;
  }
}

TEST(Cluster, LoadProfileFeedsTheNextPlanWithoutChangingResults) {
  testing::TempDir temp;
  const fs::path model = fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32";
  const std::string prompts = " --prompt-ids-file " EPIC_GOLDEN_DIR "/../prompts_ids.txt --max-new-tokens 4";
  const Outcome first = run_epic(2,
                                 "run --model " + model.string() + prompts + " --load-profile-out " +
                                     (temp.path() / "profile.json").string(),
                                 temp.path());
  ASSERT_EQ(first.exit_code, 0) << first.err;
  std::ifstream profile_file(temp.path() / "profile.json");
  const json profile = json::parse(profile_file);
  double total = 0;
  for (const auto& [layer, counts] : profile["layers"].items())
    for (const json& count : counts) total += count.get<double>();
  EXPECT_GT(total, 0);
  const Outcome second = run_epic(3,
                                  "run --model " + model.string() + prompts + " --slots 4 --load-profile " +
                                      (temp.path() / "profile.json").string(),
                                  temp.path());
  ASSERT_EQ(second.exit_code, 0) << second.err;
  EXPECT_EQ(second.out, first.out);
}

// Processes whose command line contains `needle` and whose environment names them MPI rank `rank`.
std::vector<pid_t> find_rank_processes(const std::string& needle, int rank) {
  std::vector<pid_t> found;
  const std::string rank_entry = "OMPI_COMM_WORLD_RANK=" + std::to_string(rank);
  for (const auto& entry : fs::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string cmdline = read_file(entry.path() / "cmdline");
    if (cmdline.find(needle) == std::string::npos || cmdline.find(EPIC_BINARY) == std::string::npos) continue;
    std::string environ = read_file(entry.path() / "environ");
    std::replace(environ.begin(), environ.end(), '\0', '\n');
    if (("\n" + environ).find("\n" + rank_entry + "\n") != std::string::npos)
      found.push_back(std::stoi(name));
  }
  return found;
}

// Waits up to `seconds` for done() to hold.
bool wait_for(double seconds, const std::function<bool()>& done) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

// No lost output: rank 1 is killed after rank 0 has printed some results. What was printed stays
// printed (whole lines, a prefix of the full run's output) and --logits-out never appears half
// written at its path.
TEST(Cluster, AKilledRankKeepsPrintedResultsAndLeavesNoLogitsFile) {
  testing::TempDir temp;
  const fs::path model = fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32";
  {
    std::ofstream prompts(temp.path() / "prompts.txt");
    for (int p = 0; p < 1500; ++p)
      prompts << (p % 150) + 1 << "," << (p * 7) % 160 << "," << (p * 13) % 160 << "\n";
  }
  // One live sequence per worker: ~12,000 lockstep steps, seconds of run after the first line.
  const std::string args = "run --model " + model.string() + " --prompt-ids-file " +
                           (temp.path() / "prompts.txt").string() + " --max-new-tokens 16";
  fs::create_directories(temp.path() / "full");
  const Outcome full = run_epic(1, args, temp.path() / "full");
  ASSERT_EQ(full.exit_code, 0) << full.err;

  const fs::path logits = temp.path() / "logits.npy";
  const fs::path out = temp.path() / "out.txt", err = temp.path() / "err.txt", rc = temp.path() / "rc.txt";
  const std::string command = "(" + std::string(EPIC_MPIEXEC) + " -np 2 " + EPIC_BINARY + " " + args +
                              " --max-active-sequences 1 --comm-timeout 10 --logits-out " + logits.string() +
                              " >" + out.string() + " 2>" + err.string() + "; echo $? >" + rc.string() +
                              ") &";
  ASSERT_EQ(std::system(command.c_str()), 0);
  auto lines_printed = [&] {
    const std::string text = read_file(out);
    return std::count(text.begin(), text.end(), '\n');
  };
  std::vector<pid_t> rank1;  // found first, so the kill follows the third line at once
  ASSERT_TRUE(wait_for(60, [&] { return !(rank1 = find_rank_processes(logits.string(), 1)).empty(); }))
      << read_file(err);
  ASSERT_TRUE(wait_for(120, [&] { return lines_printed() >= 3 || fs::exists(rc); })) << read_file(err);
  for (pid_t pid : rank1) kill(pid, SIGKILL);
  ASSERT_FALSE(fs::exists(rc)) << "the run ended before a rank could be killed: " << read_file(err);
  ASSERT_TRUE(wait_for(120, [&] { return fs::exists(rc) && !read_file(rc).empty(); }))
      << "the job did not end";

  EXPECT_NE(std::stoi(read_file(rc)), 0) << "a run that lost a rank must fail";
  const std::string printed = read_file(out);
  EXPECT_GE(std::count(printed.begin(), printed.end(), '\n'), 3);
  EXPECT_LT(printed.size(), full.out.size()) << "the run was not cut short";
  EXPECT_EQ(printed, full.out.substr(0, printed.size())) << "printed results differ from the full run's";
  EXPECT_TRUE(printed.empty() || printed.back() == '\n') << "a result line was printed in part";
  EXPECT_FALSE(fs::exists(logits)) << "--logits-out appeared although the run failed";
}

TEST(Cluster, ErrorOnTheCoordinatorStopsEveryRankWithOneMessage) {
  testing::TempDir temp;
  const Outcome outcome = run_epic(
      3, "run --model " + (fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32").string() + " --prompt-ids 1,99999",
      temp.path());
  EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
  // Reported once (by rank 0), not once per rank.
  const std::string needle = "outside the model's vocabulary";
  const size_t first = outcome.err.find(needle);
  ASSERT_NE(first, std::string::npos) << outcome.err;
  EXPECT_EQ(outcome.err.find(needle, first + 1), std::string::npos) << outcome.err;
}

TEST(Cluster, MissingExpertsFailOnEveryRankWithoutTheFlag) {
  testing::TempDir temp;
  const Outcome outcome = run_epic(
      2, "run --model " + (fs::path(EPIC_GOLDEN_DIR) / "missing_experts").string() + " --prompt-ids 1,2",
      temp.path());
  EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
  EXPECT_NE(outcome.err.find("--allow-missing-experts"), std::string::npos) << outcome.err;
}

TEST(Plan, PrintsAPlanCoveringEveryPresentExpertWithinTheSlots) {
  testing::TempDir temp;
  const fs::path model = fs::path(EPIC_GOLDEN_DIR) / "pruned_router";
  const Outcome outcome = run_epic(1,
                                   "plan --model " + model.string() + " --workers 3 --slots 4 --out " +
                                       (temp.path() / "plan.json").string(),
                                   temp.path());
  ASSERT_EQ(outcome.exit_code, 0) << outcome.err;
  const json plan = json::parse(outcome.out);
  EXPECT_EQ(plan, json::parse(read_file(temp.path() / "plan.json")));
  EXPECT_NE(outcome.err.find("max/mean load"), std::string::npos) << outcome.err;
  ASSERT_EQ(plan["layers"].size(), 4u);
  for (const json& layer : plan["layers"]) {
    // Layer 1's router was pruned to 5 experts; the others have 8.
    const int64_t num_experts = layer["layer"] == 1 ? 5 : 8;
    EXPECT_EQ(layer["num_experts"], num_experts);
    std::set<int64_t> placed;
    for (const json& worker : layer["workers"]) {
      EXPECT_LE(worker.size(), 4u);
      std::set<int64_t> on_worker;
      for (const json& expert : worker) {
        EXPECT_TRUE(on_worker.insert(expert.get<int64_t>()).second) << "two replicas on one worker";
        placed.insert(expert.get<int64_t>());
      }
    }
    EXPECT_EQ(placed.size(), static_cast<size_t>(num_experts)) << "layer " << layer["layer"];
  }
}

TEST(Plan, TooFewSlotsIsAClearError) {
  testing::TempDir temp;
  const Outcome outcome = run_epic(
      1, "plan --model " + (fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32").string() + " --workers 2 --slots 3",
      temp.path());
  EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
  EXPECT_NE(outcome.err.find("slots"), std::string::npos) << outcome.err;
}

// bench-decode under mpirun: expert parallel over the MPI exchange on the CPU (the NCCL one is the same
// loop on GPUs: tests/gpu/run_gpu_tests.sh ep-decode). One report, from rank 0, for the whole job.
TEST(BenchDecode, ExpertParallelUnderMpirunReportsTheWholeJob) {
  testing::TempDir temp;
  const Outcome outcome =
      run_epic(2,
               "bench-decode --random-weights tiny --backend cpu --batch 1,2 --prompt-tokens 4 "
               "--new-tokens 5 --json " +
                   (temp.path() / "decode.json").string(),
               temp.path());
  ASSERT_EQ(outcome.exit_code, 0) << outcome.err;
  const json results = json::parse(read_file(temp.path() / "decode.json"));
  std::vector<int64_t> batches;
  for (const json& line : results) {
    EXPECT_EQ(line["ranks"], 2) << line.dump();
    EXPECT_EQ(line["ep_transport"], "mpi") << line.dump();
    if (line["name"] == "load") {
      ASSERT_EQ(line["resident_bytes_per_rank"].size(), 2u);
      // Each worker keeps the dense weights and half of the experts: less than the whole model.
      EXPECT_LT(line["resident_bytes_per_rank"][1].get<double>(), line["bytes_read"].get<double>() * 2);
    }
    if (line["name"] != "decode") continue;
    batches.push_back(line["batch"].get<int64_t>());
    EXPECT_EQ(line["timed_steps"].get<int64_t>(), 2);
    EXPECT_GT(line["tokens_per_s"].get<double>(), 0.0);
  }
  EXPECT_EQ(batches, (std::vector<int64_t>{1, 2}));
  // Printed once (rank 0), not once per rank.
  size_t decode_lines = 0;
  for (size_t at = outcome.out.find("\"name\":\"decode\""); at != std::string::npos;
       at = outcome.out.find("\"name\":\"decode\"", at + 1))
    ++decode_lines;
  EXPECT_EQ(decode_lines, 2u) << outcome.out;
}

TEST(BenchDecode, LongPrefillUnderMpirunIsRefusedOnce) {
  testing::TempDir temp;
  const Outcome outcome = run_epic(
      2, "bench-decode --random-weights tiny --backend cpu --batch 1 --new-tokens 4 --prefill-tokens 16",
      temp.path());
  EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
  const std::string expected = "--prefill-tokens times one process";
  const size_t first = outcome.err.find(expected);
  ASSERT_NE(first, std::string::npos) << outcome.err;
  EXPECT_EQ(outcome.err.find(expected, first + 1), std::string::npos)
      << "reported more than once: " << outcome.err;
}

TEST(BenchMoe, ReportsEveryPhasePerWorkerAsJsonAndCsv) {
  testing::TempDir temp;
  const Outcome outcome =
      run_epic(2,
               "bench-moe --preset tiny --tokens-per-worker 16 --layers 2 --iterations 2 --json " +
                   (temp.path() / "bench.json").string() + " --csv " + (temp.path() / "bench.csv").string(),
               temp.path());
  ASSERT_EQ(outcome.exit_code, 0) << outcome.err;
  EXPECT_NE(outcome.out.find("per MoE layer call"), std::string::npos) << outcome.out;
  const json bench = json::parse(read_file(temp.path() / "bench.json"));
  EXPECT_EQ(bench["workers"], 2);
  ASSERT_EQ(bench["per_worker"].size(), 2u);
  double rows = 0;
  for (const json& worker : bench["per_worker"]) {
    for (const char* field : {"route_ms", "dispatch_ms", "expert_ms", "combine_ms", "total_ms", "bytes_sent"})
      EXPECT_TRUE(worker.contains(field)) << field;
    EXPECT_GT(worker["bytes_sent"].get<double>(), 0) << "two workers must exchange rows";
    rows += worker["rows_computed"].get<double>();
  }
  // 16 tokens x top-2 per worker, over 2 workers: every (token, slot) row is computed once.
  EXPECT_DOUBLE_EQ(rows, 2 * 16 * 2);
  const std::string csv = read_file(temp.path() / "bench.csv");
  EXPECT_EQ(std::count(csv.begin(), csv.end(), '\n'), 3) << csv;  // header + one line per worker
  // The self-check runs by default and passes: a wrong count of 0 per worker.
  EXPECT_TRUE(bench["checked"].get<bool>());
  for (const json& worker : bench["per_worker"]) EXPECT_EQ(worker["wrong"], 0) << worker.dump();
  EXPECT_NE(outcome.out.find("check: passed on every worker"), std::string::npos) << outcome.out;
}

// The check with replicas (4 slots each for 8 experts on 3 workers: 4 replicas) and more than
// one layer: every worker's wrong count is 0 and it checked expert rows.
TEST(BenchMoe, CheckPassesWithReplicasOnThreeWorkers) {
  testing::TempDir temp;
  const Outcome outcome = run_epic(3,
                                   "bench-moe --preset tiny --tokens-per-worker 12 --layers 2 --iterations 1 "
                                   "--warmup 0 --slots 4 --json " +
                                       (temp.path() / "bench.json").string(),
                                   temp.path());
  ASSERT_EQ(outcome.exit_code, 0) << outcome.err;
  const json bench = json::parse(read_file(temp.path() / "bench.json"));
  ASSERT_EQ(bench["per_worker"].size(), 3u);
  for (const json& worker : bench["per_worker"]) EXPECT_EQ(worker["wrong"], 0) << worker.dump();
  EXPECT_NE(outcome.out.find(" wrong\n"), std::string::npos)
      << "the table has a wrong column: " << outcome.out;
  EXPECT_NE(outcome.out.find("check: passed on every worker"), std::string::npos) << outcome.out;
}

// The check can fail: the hidden test-only flag corrupts one combined row on rank 1; the job exits 1,
// the table counts the wrong element on worker 1 only, and the message names worker 1, the data plane,
// the layer and the element. --no-check skips the check (the same fault then goes unseen).
TEST(BenchMoe, CheckFailsNamingTheWorkerWithAWrongRow) {
  testing::TempDir temp;
  const std::string bench = "bench-moe --preset tiny --tokens-per-worker 8 --iterations 1 --warmup 0 ";
  const Outcome outcome = run_epic(
      2, bench + "--inject-wrong-row 1 --json " + (temp.path() / "bench.json").string(), temp.path());
  EXPECT_EQ(outcome.exit_code, 1) << outcome.err;
  EXPECT_NE(outcome.err.find("bench-moe worker 1: 1 wrong element(s); first: data plane"), std::string::npos)
      << outcome.err;
  EXPECT_NE(outcome.err.find("layer 0: token 0 element 0"), std::string::npos) << outcome.err;
  EXPECT_EQ(outcome.err.find("bench-moe worker 0"), std::string::npos) << outcome.err;
  EXPECT_NE(outcome.out.find("check: FAILED"), std::string::npos) << outcome.out;
  const json result = json::parse(read_file(temp.path() / "bench.json"));
  EXPECT_EQ(result["per_worker"][0]["wrong"], 0);
  EXPECT_EQ(result["per_worker"][1]["wrong"], 1);

  const Outcome unchecked = run_epic(2, bench + "--inject-wrong-row 1 --no-check", temp.path());
  EXPECT_EQ(unchecked.exit_code, 0) << unchecked.err;
  EXPECT_NE(unchecked.out.find("N/A"), std::string::npos) << unchecked.out;
  EXPECT_EQ(unchecked.out.find("check:"), std::string::npos) << unchecked.out;

  const Outcome bad_rank = run_epic(1, bench + "--inject-wrong-row 1", temp.path());
  EXPECT_EQ(bad_rank.exit_code, 2) << bad_rank.err;
  EXPECT_NE(bad_rank.err.find("--inject-wrong-row"), std::string::npos) << bad_rank.err;
}

}  // namespace
}  // namespace epic
