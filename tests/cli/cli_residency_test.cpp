// epic run with a budget of resident experts (--expert-budget, launch/expert_budget.h) on the trained
// model: waiting for a missing expert, or reading it in place (--on-miss read), gives, bitwise, the tokens
// and logits of the run with every expert loaded, whatever the budget, tier and eviction policy; substituting
// reports what it substituted; bad flags get clear errors.
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "cli_support.h"
#include "tests/support/mpi_test_environment.h"
#include "worker/npy_file.h"

namespace epic {
namespace {

fs::path trained_model() {
  return fs::path(EPIC_GOLDEN_DIR).parent_path().parent_path().parent_path() / "configs" / "models" /
         "qwen3-moe-python-small";
}

const std::string kPrompt =
    " --prompt-ids 785,6171,1483,553,279,2747,4688 --max-new-tokens 10 --precision fp32 "
    "--allow-missing-experts";

TEST_F(Cli, ExpertBudgetWithWaitGivesTheFullModelsTokensAndLogits) {
  const std::string model = " --model " + trained_model().string();
  const fs::path full_logits = scratch() / "full.npy";
  const Outcome full = run_epic("run" + model + kPrompt + " --logits-out " + full_logits.string(), scratch());
  ASSERT_EQ(full.exit_code, 0) << full.err;
  const NpyArray expected = read_npy_f32(full_logits);
  int index = 0;
  for (const std::string budget :
       {"--expert-budget 1", "--expert-budget 25% --eviction usefulness",
        "--expert-budget total:40 --expert-tier disk --eviction lfu", "--expert-budget 100%",
        "--expert-budget 25% --on-miss read", "--expert-budget 1 --on-miss read --eviction usefulness",
        "--expert-budget 50% --on-miss read --admit-per-step 1",
        "--expert-budget 1 --expert-tier disk --host-budget 3 --eviction lfu",
        "--expert-budget 25% --expert-tier disk --host-budget 50%"}) {
    SCOPED_TRACE(budget);
    const fs::path logits = scratch() / ("budget" + std::to_string(index++) + ".npy");
    const Outcome run =
        run_epic("run" + model + kPrompt + " " + budget + " --logits-out " + logits.string(), scratch());
    ASSERT_EQ(run.exit_code, 0) << run.err;
    EXPECT_EQ(run.out, full.out);
    const NpyArray actual = read_npy_f32(logits);
    EXPECT_EQ(actual.shape, expected.shape);
    EXPECT_TRUE(actual.values == expected.values) << "logits differ from the run with every expert loaded";
    EXPECT_NE(run.err.find("experts: budget"), std::string::npos) << run.err;
    EXPECT_NE(run.err.find("misses"), std::string::npos) << run.err;
  }
}

TEST_F(Cli, ExpertBudgetWithSubstituteReportsTheSubstitutions) {
  const Outcome run = run_epic(
      "run --model " + trained_model().string() + kPrompt + " --expert-budget 25% --on-miss substitute",
      scratch());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  const size_t at = run.err.find(" picks substituted");
  ASSERT_NE(at, std::string::npos) << run.err;
  // "... N of M picks substituted": some picks were served by a resident expert instead.
  const size_t of = run.err.rfind(" of ", at);
  const size_t start = run.err.rfind(' ', of - 1) + 1;
  EXPECT_GT(std::stoll(run.err.substr(start, of - start)), 0) << run.err;
}

// --host-budget: a pinned host cache between the resident experts and the checkpoint. The report counts the
// misses it served and those read from disk into it, the bytes from each tier add up to the misses, and its
// pinned bytes are the budget's (measured from its buffers), between nothing (the disk tier) and every
// expert.
TEST_F(Cli, HostBudgetServesMissesFromAPinnedCacheOfThatSize) {
  const auto report_of = [&](const std::string& flags, const std::string& name) {
    const fs::path report = scratch() / (name + ".json");
    const Outcome run = run_epic(
        "run --model " + trained_model().string() + kPrompt + flags + " --report-out " + report.string(),
        scratch());
    EXPECT_EQ(run.exit_code, 0) << run.err;
    std::ifstream in(report);
    const nlohmann::json parsed = nlohmann::json::parse(in);
    return std::make_pair(parsed["workers"][0]["expert_store"], run.err);
  };
  const auto [cached, cached_err] =
      report_of(" --expert-budget 2 --expert-tier disk --host-budget 4", "cached");
  const auto [disk, disk_err] = report_of(" --expert-budget 2 --expert-tier disk", "disk");
  const auto [host, host_err] = report_of(" --expert-budget 2", "host");
  ASSERT_TRUE(cached.is_object()) << cached_err;
  EXPECT_NE(cached_err.find("experts: host cache 4"), std::string::npos) << cached_err;
  const int64_t misses = cached["misses"].get<int64_t>();
  const int64_t cache_hits = cached["host_cache_hits"].get<int64_t>();
  const int64_t cache_misses = cached["host_cache_misses"].get<int64_t>();
  const double expert_bytes = cached["expert_bytes"].get<double>();
  EXPECT_EQ(cache_hits + cache_misses, misses);
  EXPECT_GT(cache_hits, 0) << "a cache twice the slots never served a miss";
  EXPECT_GT(cached["host_cache_evictions"].get<int64_t>(), 0) << "4 of ~30 experts a layer never evicted";
  EXPECT_EQ(cached["bytes_from_host"].get<double>(), double(cache_hits) * expert_bytes);
  EXPECT_EQ(cached["bytes_from_disk"].get<double>(), double(cache_misses) * expert_bytes);
  // The same device-side decisions as without the cache: only where the bytes come from differs.
  EXPECT_EQ(misses, disk["misses"].get<int64_t>());
  EXPECT_LT(cached["checkpoint_bytes_read"].get<double>(), disk["checkpoint_bytes_read"].get<double>());
  // 8 MoE layers x 4 cached experts, against none (disk) and every expert (host).
  EXPECT_EQ(cached["host_tier_bytes"].get<double>(), 8 * 4 * expert_bytes);
  EXPECT_EQ(disk["host_tier_bytes"].get<double>(), 0.0);
  EXPECT_GT(host["host_tier_bytes"].get<double>(), cached["host_tier_bytes"].get<double>());
}

// epic plan --expert-budget plans for the budget: on a profile recorded from the trained model, each layer's
// costliest worker (misses at the planner's miss cost) is no costlier than in the plan made for load alone,
// printed beside it, and the plan is a valid plan (epic plan checks what it writes).
TEST_F(Cli, PlanForABudgetLowersTheCostliestWorker) {
  const fs::path profile = scratch() / "profile.json";
  const Outcome run = run_epic(
      "run --model " + trained_model().string() + kPrompt + " --load-profile-out " + profile.string(),
      scratch());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  const Outcome plan = run_epic("plan --model " + trained_model().string() +
                                    " --allow-missing-experts --workers 4 --expert-budget 2 --load-profile " +
                                    profile.string(),
                                scratch());
  ASSERT_EQ(plan.exit_code, 0) << plan.err;
  const size_t header = plan.err.find("load-only: min share, max cost");
  ASSERT_NE(header, std::string::npos) << plan.err;
  std::stringstream rows(plan.err.substr(plan.err.find('\n', header) + 1));
  int layers = 0;
  bool lower_somewhere = false;
  for (std::string line; std::getline(rows, line) && !line.empty();) {
    std::stringstream fields(line);
    double layer, slots, min_share, mean_share, cost, load_only_share, load_only_cost;
    ASSERT_TRUE(fields >> layer >> slots >> min_share >> mean_share >> cost >> load_only_share >>
                load_only_cost)
        << line;
    EXPECT_LE(cost, load_only_cost + 1e-2) << line;  // printed to 2 decimals
    lower_somewhere |= cost < load_only_cost;
    ++layers;
  }
  EXPECT_EQ(layers, 8);
  EXPECT_TRUE(lower_somewhere) << "the budget changed no layer's costliest worker:\n" << plan.err;
}

// bench-decode --expert-budget: every budget's decode line next to the all-resident one of the same run.
TEST_F(Cli, BenchDecodeComparesEachBudgetWithEveryExpertResident) {
  const Outcome bench =
      run_epic("bench-decode --model " + trained_model().string() +
                   " --allow-missing-experts --backend cpu --batch 1 --prompt-tokens 8 --new-tokens 6 "
                   "--expert-budget 50%,total:20",
               scratch());
  ASSERT_EQ(bench.exit_code, 0) << bench.err;
  std::vector<nlohmann::json> decode;
  std::stringstream lines(bench.out);
  for (std::string line; std::getline(lines, line);) {
    const nlohmann::json item = nlohmann::json::parse(line);
    if (item["name"] == "decode") decode.push_back(item);
  }
  ASSERT_EQ(decode.size(), 3u) << bench.out;
  EXPECT_EQ(decode[0]["expert_budget"], "all");
  EXPECT_TRUE(decode[0]["residency"].is_null());
  for (size_t i = 1; i < 3; ++i) {
    const nlohmann::json& residency = decode[i]["residency"];
    EXPECT_GT(residency["tokens_per_s_vs_all_resident"].get<double>(), 0.0);
    EXPECT_GE(residency["hit_rate"].get<double>(), 0.0);
    EXPECT_LE(residency["hit_rate"].get<double>(), 1.0);
    EXPECT_GT(residency["resident_expert_bytes"].get<double>(), 0.0);
  }
  EXPECT_EQ(decode[1]["expert_budget"], "50%");
  // total:20 over 8 layers is less than half of 245 experts.
  EXPECT_LT(decode[2]["residency"]["resident_expert_bytes"].get<double>(),
            decode[1]["residency"]["resident_expert_bytes"].get<double>());
}

// A residency state per prompt (--residency-state wake,focus,...): the prompts share every step, yet each
// gets, bitwise, the tokens and prompt logits of a run where every prompt is in its state; with a budget
// read in place as well. A list of the wrong length or with an unknown state is refused.
TEST_F(Cli, ResidencyStatePerPromptGivesEachPromptTheResultOfItsState) {
  const fs::path prompts = scratch() / "prompts.txt";
  std::ofstream(prompts) << "785,6171,1483,553,279\n2747,4688,13,198\n1483,553,279,2747,4688,13,785\n";
  const std::string run = "run --model " + trained_model().string() + " --prompt-ids-file " +
                          prompts.string() + " --max-new-tokens 6 --precision fp32 --allow-missing-experts";
  const auto outcome_of = [&](const std::string& flags, const std::string& name) {
    const fs::path logits = scratch() / (name + ".npy");
    const Outcome outcome = run_epic(run + flags + " --logits-out " + logits.string(), scratch());
    EXPECT_EQ(outcome.exit_code, 0) << flags << ": " << outcome.err;
    std::vector<std::string> lines;
    std::stringstream text(outcome.out);
    for (std::string line; std::getline(text, line);) lines.push_back(line);
    return std::make_pair(lines, outcome.exit_code == 0 ? read_npy_f32(logits) : NpyArray{});
  };
  const auto wake = outcome_of(" --residency-state wake", "wake");
  const auto focus = outcome_of(" --residency-state focus", "focus");
  ASSERT_EQ(wake.first.size(), 3u);
  ASSERT_EQ(focus.first.size(), 3u);
  ASSERT_NE(wake.second.values, focus.second.values) << "wake must route differently from focus";
  const int64_t vocab = wake.second.shape.at(1);
  const int64_t first_row[] = {0, 5, 9, 16};  // the prompts' rows in the logits file
  for (const std::string budget : {"", " --expert-budget 25% --on-miss read"}) {
    for (const std::vector<std::string> states : {std::vector<std::string>{"wake", "focus", "wake"},
                                                  std::vector<std::string>{"focus", "focus", "wake"}}) {
      const std::string list = states[0] + "," + states[1] + "," + states[2];
      SCOPED_TRACE(list + budget);
      const auto mixed = outcome_of(" --residency-state " + list + budget, "mixed");
      ASSERT_EQ(mixed.first.size(), 3u);
      ASSERT_EQ(mixed.second.shape, wake.second.shape);
      for (int p = 0; p < 3; ++p) {
        const auto& alike = states[p] == "wake" ? wake : focus;
        EXPECT_EQ(mixed.first[p], alike.first[p]) << "prompt " << p;
        const auto rows = [&](const NpyArray& a) {
          return std::vector<float>(a.values.begin() + first_row[p] * vocab,
                                    a.values.begin() + first_row[p + 1] * vocab);
        };
        EXPECT_TRUE(rows(mixed.second) == rows(alike.second)) << "prompt " << p << " logits";
        ASSERT_FALSE(rows(wake.second) == rows(focus.second)) << "prompt " << p << ": the states must differ";
      }
    }
  }
  const std::pair<std::string, std::string> refused[] = {
      {" --residency-state wake,focus", "--residency-state lists 2 states for 3 prompts"},
      {" --residency-state wake,,focus", "entry 2 is empty"},
      {" --residency-state wake,sleep,focus", "residency state 'sleep'"},
  };
  for (const auto& [flags, message] : refused) {
    const Outcome outcome = run_epic(run + flags, scratch(), 120);
    EXPECT_EQ(outcome.exit_code, 2) << flags;
    EXPECT_NE(outcome.err.find(message), std::string::npos) << flags << ": " << outcome.err;
  }
}

// bench-decode --expert-budget under mpirun: each rank's store holds its shard behind the same exchange as
// the all-resident lines (the host exchange on the cpu backend), waiting, reading a miss in place or
// substituting a resident expert for it.
TEST_F(Cli, BenchDecodeWithABudgetUnderMpirun) {
  [[maybe_unused]] static const bool mpi_environment = testing::set_mpi_test_environment();
  const std::string bench =
      "bench-decode --model " + trained_model().string() +
      " --allow-missing-experts --backend cpu --batch 1 --prompt-tokens 8 --new-tokens 6 "
      "--expert-budget 50%,total:20";
  const std::string mpirun = std::string(EPIC_MPIEXEC) + " -np 2 ";
  for (const std::string on_miss : {"wait", "read", "substitute"}) {
    SCOPED_TRACE(on_miss);
    const Outcome outcome = run_epic(bench + " --on-miss " + on_miss, scratch(), 300, mpirun);
    ASSERT_EQ(outcome.exit_code, 0) << outcome.err;
    std::vector<nlohmann::json> decode;
    std::stringstream lines(outcome.out);
    for (std::string line; std::getline(lines, line);) {
      const nlohmann::json item = nlohmann::json::parse(line);
      if (item["name"] == "decode") decode.push_back(item);
    }
    ASSERT_EQ(decode.size(), 3u) << outcome.out;
    EXPECT_EQ(decode[0]["expert_budget"], "all");
    for (int b = 1; b < 3; ++b) {
      EXPECT_EQ(decode[b]["ranks"], 2);
      EXPECT_EQ(decode[b]["ep_transport"], "mpi");
      const nlohmann::json& residency = decode[b]["residency"];
      EXPECT_EQ(residency["on_miss"], on_miss);
      EXPECT_GT(residency["pick_hit_rate"].get<double>(), 0.0);
      // Substituted picks arrive at a resident expert, so only wait and read see misses.
      if (on_miss != "substitute")
        EXPECT_LT(residency["pick_hit_rate"].get<double>(), 1.0)
            << "half or fewer of the experts are resident";
      EXPECT_GT(decode[b]["tokens_per_s"].get<double>(), 0.0);
    }
  }
}

TEST_F(Cli, ExpertStoreFlagsAreChecked) {
  const std::string run = "run --model " + trained_model().string() + kPrompt;
  const std::pair<std::string, std::string> cases[] = {
      {" --expert-budget 0", "--expert-budget '0'"},
      {" --expert-budget 0%", "--expert-budget '0%'"},
      {" --expert-budget 150%", "at most 100"},
      {" --expert-budget total:0", "--expert-budget 'total:0'"},
      {" --expert-budget lots", "give N (experts per MoE layer)"},
      {" --expert-budget 4 --expert-tier ssd", "ssd"},
      {" --expert-budget 4 --eviction fifo", "fifo"},
      {" --expert-budget 4 --on-miss skip", "--on-miss 'skip'"},
      {" --on-miss substitute", "add --expert-budget"},
      {" --expert-budget 4 --on-miss read --expert-tier disk", "--on-miss read computes a missing expert"},
      {" --expert-budget 4 --usefulness-decay 0", "--usefulness-decay"},
      {" --expert-budget 4 --prefetch always", "--prefetch 'always'"},
      {" --prefetch none", "add --expert-budget"},
      {" --admit-per-step 2", "add --expert-budget"},
      {" --expert-budget 4 --admit-per-step 2", "with --on-miss wait a miss is loaded when it is needed"},
      {" --expert-budget 4 --on-miss read --admit-per-step -1", "--admit-per-step -1"},
      {" --host-budget 8", "add --expert-budget"},
      {" --expert-budget 4 --host-budget 8", "add --expert-tier disk"},
      {" --expert-budget 4 --expert-tier disk --host-budget 0", "--host-budget '0'"},
      {" --expert-budget 4 --expert-tier disk --host-budget 2",
       "give --host-budget at least --expert-budget"},
  };
  for (const auto& [flags, message] : cases) {
    SCOPED_TRACE(flags);
    const Outcome outcome = run_epic(run + flags, scratch(), 120);
    EXPECT_EQ(outcome.exit_code, 2) << outcome.out;
    EXPECT_NE(outcome.err.find(message), std::string::npos) << outcome.err;
  }
}

}  // namespace
}  // namespace epic
