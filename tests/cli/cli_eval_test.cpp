// epic eval end to end on the tiny model: its perplexity is the one `epic run`'s own prompt logits give
// for the same windows (an independent path: the run's logits file, scored here in double); a top-k
// variant is exactly the model configured with that top-k; bad flags and files get clear errors.
#include <cmath>
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

// Text of ~150 tokens, so windows of 32 with stride 16 make several windows.
std::string eval_text() {
  std::string text;
  for (int i = 0; i < 6; ++i)
    text += "The quick brown fox " + std::to_string(i) +
            " jumps over the lazy dog, and the dog sleeps on in the afternoon sun.\n";
  return text;
}

std::vector<int32_t> parse_ids(const std::string& line) {
  std::vector<int32_t> ids;
  std::stringstream in(line);
  std::string item;
  while (std::getline(in, item, ',')) ids.push_back(std::stoi(item));
  return ids;
}

nlohmann::json read_json(const fs::path& path) {
  std::ifstream file(path);
  return nlohmann::json::parse(file);
}

class CliEval : public Cli {
 protected:
  void SetUp() override {
    if (!has_tokenizer())
      GTEST_SKIP() << "no tokenizer.json (launch/setup_debian.sh installs it): epic eval reads text";
    text_ = scratch() / "eval.txt";
    std::ofstream(text_) << eval_text();
  }
  fs::path text_;
};

TEST_F(CliEval, PerplexityIsTheOneRunLogitsGiveForTheSameWindows) {
  const fs::path json = scratch() / "eval_ppl.json";
  const Outcome eval =
      run_epic("eval --model " + tiny().string() + " --text-file " + text_.string() +
                   " --window 32 --stride 16 --windows-per-step 3 --precision fp32 --json " + json.string(),
               scratch());
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const nlohmann::json result = read_json(json);
  const nlohmann::json& reference = result["variants"][0];

  // The same windows as prompts of `epic run`, their logits scored here.
  const Outcome tokens =
      run_epic("tokenize --model " + tiny().string() + " --file " + text_.string(), scratch());
  ASSERT_EQ(tokens.exit_code, 0) << tokens.err;
  const std::vector<int32_t> ids = parse_ids(tokens.out);
  ASSERT_EQ(static_cast<int64_t>(ids.size()), result["tokens"].get<int64_t>());
  ASSERT_GT(ids.size(), 64u) << "the text should need several windows";
  struct Window {
    int64_t begin, end, first_target;
  };
  std::vector<Window> windows;
  for (int64_t begin = 0, scored_until = 1; scored_until < static_cast<int64_t>(ids.size()); begin += 16) {
    const int64_t end = std::min<int64_t>(begin + 32, ids.size());
    windows.push_back({begin, end, std::max(scored_until, begin + 1)});
    scored_until = end;
  }
  ASSERT_EQ(static_cast<int64_t>(windows.size()), result["windows"].get<int64_t>());
  const fs::path prompts = scratch() / "windows.txt", logits = scratch() / "windows.npy";
  {
    std::ofstream out(prompts);
    for (const Window& w : windows) {
      for (int64_t t = w.begin; t < w.end; ++t) out << (t > w.begin ? "," : "") << ids[t];
      out << "\n";
    }
  }
  const Outcome run = run_epic("run --model " + tiny().string() + " --prompt-ids-file " + prompts.string() +
                                   " --max-new-tokens 1 --precision fp32 --logits-out " + logits.string(),
                               scratch());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  const NpyArray rows = read_npy_f32(logits);
  const int64_t vocab = rows.shape[1];
  double nll = 0;
  int64_t scored = 0, row_base = 0;
  for (const Window& w : windows) {
    for (int64_t t = w.first_target; t < w.end; ++t) {
      const float* row = rows.values.data() + (row_base + t - 1 - w.begin) * vocab;
      double max = row[0], sum = 0;
      for (int64_t v = 1; v < vocab; ++v) max = std::max(max, double(row[v]));
      for (int64_t v = 0; v < vocab; ++v) sum += std::exp(double(row[v]) - max);
      nll += max + std::log(sum) - double(row[ids[t]]);
      ++scored;
    }
    row_base += w.end - w.begin;
  }
  EXPECT_EQ(scored, static_cast<int64_t>(ids.size()) - 1);
  EXPECT_EQ(reference["scored_tokens"].get<int64_t>(), scored);
  const double expected = std::exp(nll / double(scored));
  EXPECT_NEAR(reference["perplexity"].get<double>() / expected, 1.0, 1e-5)
      << "eval " << reference["perplexity"] << ", from run's logits " << expected;
  // Against itself the reference has no divergence and agrees everywhere.
  EXPECT_LT(reference["kl_vs_reference"].get<double>(), 1e-6);
  EXPECT_EQ(reference["top1_agreement"].get<double>(), 1.0);
  EXPECT_NE(eval.out.find("top-2 (trained, focus)"), std::string::npos) << eval.out;
}

TEST_F(CliEval, TopKVariantIsTheModelConfiguredWithThatTopK) {
  // A copy of the tiny model whose config.json routes 1 expert per token.
  const fs::path top1 = scratch() / "tiny_top1";
  fs::create_directories(top1);
  for (const auto& entry : fs::directory_iterator(tiny()))
    if (entry.path().filename() != "config.json")
      fs::create_symlink(entry.path(), top1 / entry.path().filename());
  nlohmann::json config = read_json(tiny() / "config.json");
  config["num_experts_per_tok"] = 1;
  std::ofstream(top1 / "config.json") << config.dump(2);

  const fs::path variants = scratch() / "eval_variants.json", configured = scratch() / "eval_top1.json";
  const std::string common = " --text-file " + text_.string() + " --window 32 --stride 16 --json ";
  const Outcome a =
      run_epic("eval --model " + tiny().string() + " --top-k 1" + common + variants.string(), scratch());
  ASSERT_EQ(a.exit_code, 0) << a.err;
  const Outcome b = run_epic("eval --model " + top1.string() + common + configured.string(), scratch());
  ASSERT_EQ(b.exit_code, 0) << b.err;
  const nlohmann::json variant = read_json(variants)["variants"][1],
                       model = read_json(configured)["variants"][0];
  EXPECT_EQ(variant["experts_per_token"], 1);
  // The same logits, row for row: the same sums.
  EXPECT_EQ(variant["perplexity"].get<double>(), model["perplexity"].get<double>());
  EXPECT_EQ(variant["scored_tokens"], model["scored_tokens"]);
  // Fewer experts per token changes the model: not the reference's figures.
  const nlohmann::json reference = read_json(variants)["variants"][0];
  EXPECT_NE(variant["perplexity"].get<double>(), reference["perplexity"].get<double>());
  EXPECT_GT(variant["kl_vs_reference"].get<double>(), 1e-4);
  EXPECT_LT(variant["expert_rows_per_token"].get<double>(), reference["expert_rows_per_token"].get<double>());
}

TEST_F(CliEval, PruningRemovesTheLeastUsedExpertsOfTheCalibrationText) {
  const fs::path json = scratch() / "eval_pruned.json";
  const Outcome eval = run_epic("eval --model " + tiny().string() + " --text-file " + text_.string() +
                                    " --window 32 --prune 25,50 --prune-layers 2 --calibration-file " +
                                    text_.string() + " --json " + json.string(),
                                scratch());
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const nlohmann::json result = read_json(json);
  ASSERT_EQ(result["variants"].size(), 3u);
  // 25% and 50% of layer 2's 8 experts: 2 and 4, the 4 including the 2.
  const std::vector<int64_t> quarter = result["removed_experts"]["pruned 25% (layers 2)"]["2"];
  const std::vector<int64_t> half = result["removed_experts"]["pruned 50% (layers 2)"]["2"];
  ASSERT_EQ(quarter.size(), 2u);
  ASSERT_EQ(half.size(), 4u);
  for (int64_t expert : quarter) EXPECT_NE(std::find(half.begin(), half.end(), expert), half.end());
  const nlohmann::json& pruned = result["variants"][2];
  EXPECT_EQ(pruned["experts_removed"], 4);
  EXPECT_LT(pruned["expert_bytes_resident"].get<double>(),
            result["variants"][0]["expert_bytes_resident"].get<double>());
}

// epic run --residency-state wake is the trained model (top-8) routing 4 experts per token: the logits of
// every prompt position and the generated ids equal, bitwise, those of the model configured with top-k 4.
TEST_F(Cli, ResidencyStateWakeIsTheModelWithFourExpertsPerToken) {
  const fs::path trained = fs::path(EPIC_GOLDEN_DIR).parent_path().parent_path().parent_path() / "configs" /
                           "models" / "qwen3-moe-python-small";
  const fs::path top4 = scratch() / "trained_top4";
  fs::create_directories(top4);
  for (const auto& entry : fs::directory_iterator(trained))
    if (entry.path().filename() != "config.json")
      fs::create_symlink(entry.path(), top4 / entry.path().filename());
  nlohmann::json config = read_json(trained / "config.json");
  ASSERT_EQ(config["num_experts_per_tok"], 8);
  config["num_experts_per_tok"] = 4;
  std::ofstream(top4 / "config.json") << config.dump(2);
  const std::string prompt =
      " --prompt-ids 785,6171,1483,553,279 --max-new-tokens 6 --precision fp32 "
      "--allow-missing-experts --logits-out ";
  const fs::path wake_logits = scratch() / "wake.npy", top4_logits = scratch() / "top4.npy",
                 focus_logits = scratch() / "focus.npy";
  const Outcome wake =
      run_epic("run --model " + trained.string() + " --residency-state wake" + prompt + wake_logits.string(),
               scratch());
  ASSERT_EQ(wake.exit_code, 0) << wake.err;
  const Outcome configured =
      run_epic("run --model " + top4.string() + prompt + top4_logits.string(), scratch());
  ASSERT_EQ(configured.exit_code, 0) << configured.err;
  const Outcome focus =
      run_epic("run --model " + trained.string() + prompt + focus_logits.string(), scratch());
  ASSERT_EQ(focus.exit_code, 0) << focus.err;
  EXPECT_EQ(wake.out, configured.out);
  const NpyArray a = read_npy_f32(wake_logits), b = read_npy_f32(top4_logits), c = read_npy_f32(focus_logits);
  ASSERT_EQ(a.shape, b.shape);
  EXPECT_EQ(a.values, b.values);
  EXPECT_NE(a.values, c.values) << "wake should route differently from focus";
  const Outcome unknown = run_epic("run --model " + trained.string() + " --residency-state sleep" + prompt +
                                       (scratch() / "sleep.npy").string(),
                                   scratch());
  EXPECT_EQ(unknown.exit_code, 2);
  EXPECT_NE(unknown.err.find("residency state 'sleep': use focus"), std::string::npos) << unknown.err;
}

// A budget of resident experts: waiting for a miss is the model as trained (same perplexity, no
// divergence); substituting changes the routing, and the store's figures come with the row.
TEST_F(CliEval, BudgetVariantsWaitIsTheReferenceSubstituteIsMeasured) {
  const fs::path json = scratch() / "eval_budget.json";
  const Outcome eval = run_epic(
      "eval --model " + tiny().string() + " --text-file " + text_.string() +
          " --window 32 --stride 16 --expert-budget 25% --on-miss wait,substitute --json " + json.string(),
      scratch());
  ASSERT_EQ(eval.exit_code, 0) << eval.err;
  const nlohmann::json variants = read_json(json)["variants"];
  ASSERT_EQ(variants.size(), 3u);
  const nlohmann::json &reference = variants[0], &wait = variants[1], &substitute = variants[2];
  EXPECT_EQ(wait["variant"], "budget 25% (wait)");
  EXPECT_EQ(wait["perplexity"].get<double>(), reference["perplexity"].get<double>());
  EXPECT_EQ(wait["top1_agreement"].get<double>(), 1.0);
  EXPECT_LT(wait["kl_vs_reference"].get<double>(), 1e-6);
  EXPECT_GT(wait["expert_store"]["misses"].get<int64_t>(), 0);
  EXPECT_EQ(wait["expert_store"]["substituted_picks"].get<int64_t>(), 0);
  // 2 of 8 experts in each of the 3 MoE layers.
  EXPECT_EQ(wait["expert_store"]["resident_bytes"].get<double>(),
            6 * wait["expert_store"]["expert_bytes"].get<double>());
  EXPECT_GT(substitute["expert_store"]["substituted_picks"].get<int64_t>(), 0);
  EXPECT_GT(substitute["kl_vs_reference"].get<double>(), 0.0);
  EXPECT_NE(eval.out.find("picks substituted"), std::string::npos) << eval.out;
}

// Under mpirun each worker's store holds its shard of the experts and the host exchange computes the rows it
// receives through it: a budget that waits or reads in place is still the reference exactly, at 2 and 3
// ranks as on one, and the job's store figures are the sums of every rank's (each rank's report kept); one
// that substitutes is measured (its KL against the reference is above 0).
TEST_F(CliEval, BudgetVariantsUnderMpirunAreTheReferenceExactly) {
  [[maybe_unused]] static const bool mpi_environment = testing::set_mpi_test_environment();
  const std::string common =
      "eval --model " + tiny().string() + " --text-file " + text_.string() +
      " --window 32 --stride 16 --precision fp32 --expert-budget 1 --on-miss wait,read";
  const fs::path one_json = scratch() / "eval_budget_one.json";
  const Outcome one = run_epic(common + " --json " + one_json.string(), scratch());
  ASSERT_EQ(one.exit_code, 0) << one.err;
  const nlohmann::json alone = read_json(one_json)["variants"];
  ASSERT_EQ(alone.size(), 3u);
  for (const int ranks : {2, 3}) {
    SCOPED_TRACE(std::to_string(ranks) + " ranks");
    const fs::path json = scratch() / ("eval_budget_np" + std::to_string(ranks) + ".json");
    const Outcome many = run_epic(common + " --json " + json.string(), scratch(), 300,
                                  std::string(EPIC_MPIEXEC) + " -np " + std::to_string(ranks) + " ");
    ASSERT_EQ(many.exit_code, 0) << many.err;
    const nlohmann::json variants = read_json(json)["variants"];
    ASSERT_EQ(variants.size(), 3u);
    for (int v = 0; v < 3; ++v) {
      EXPECT_EQ(variants[v]["variant"], alone[v]["variant"]);
      EXPECT_EQ(variants[v]["perplexity"].get<double>(), alone[0]["perplexity"].get<double>()) << v;
      EXPECT_EQ(variants[v]["top1_agreement"].get<double>(), 1.0) << v;
    }
    for (int v = 1; v < 3; ++v) {
      const nlohmann::json& store = variants[v]["expert_store"];
      ASSERT_EQ(store["ranks"].size(), static_cast<size_t>(ranks)) << v;
      double resident = 0;
      int64_t misses = 0;
      for (const nlohmann::json& rank : store["ranks"]) {
        resident += rank["resident_bytes"].get<double>();
        misses += rank["misses"].get<int64_t>();
      }
      EXPECT_EQ(variants[v]["expert_bytes_resident"].get<double>(), resident) << v;
      EXPECT_GT(misses, 0) << v;
    }
    EXPECT_GT(variants[2]["expert_store"]["ranks"][0]["bytes_read_in_place"].get<double>() +
                  variants[2]["expert_store"]["ranks"][1]["bytes_read_in_place"].get<double>(),
              0.0);
  }
  // Substituting under mpirun changes the routing (some picks go to a resident expert): measured, not equal.
  // One window a step: a step substitutes from the residency the steps before it left.
  const fs::path json = scratch() / "eval_substitute_np2.json";
  const Outcome substitute =
      run_epic("eval --model " + tiny().string() + " --text-file " + text_.string() +
                   " --window 32 --stride 16 --windows-per-step 1 --precision fp32 --expert-budget 1 "
                   "--on-miss substitute --json " +
                   json.string(),
               scratch(), 300, std::string(EPIC_MPIEXEC) + " -np 2 ");
  ASSERT_EQ(substitute.exit_code, 0) << substitute.err;
  const nlohmann::json variant = read_json(json)["variants"][1];
  int64_t substituted = 0;
  for (const nlohmann::json& rank : variant["expert_store"]["ranks"])
    substituted += rank["substituted_picks"].get<int64_t>();
  EXPECT_GT(substituted, 0);
  EXPECT_GT(variant["kl_vs_reference"].get<double>(), 0.0);
}

// --decode scores token by token through the KV cache: the same perplexity as whole windows (to float
// rounding of the two attention paths), and a budget that waits is still the reference exactly.
TEST_F(CliEval, DecodeModeScoresAsWholeWindowsDo) {
  const std::string common = "eval --model " + tiny().string() + " --text-file " + text_.string() +
                             " --window 32 --stride 16 --precision fp32 --json ";
  const fs::path windows = scratch() / "eval_windows.json", decode = scratch() / "eval_decode.json";
  const Outcome a = run_epic(common + windows.string(), scratch());
  ASSERT_EQ(a.exit_code, 0) << a.err;
  const Outcome b = run_epic(common + decode.string() + " --decode --expert-budget 2", scratch());
  ASSERT_EQ(b.exit_code, 0) << b.err;
  const nlohmann::json whole = read_json(windows)["variants"][0], stepped = read_json(decode)["variants"];
  EXPECT_EQ(stepped[0]["scored_tokens"], whole["scored_tokens"]);
  EXPECT_NEAR(stepped[0]["perplexity"].get<double>() / whole["perplexity"].get<double>(), 1.0, 1e-5);
  EXPECT_EQ(stepped[1]["perplexity"].get<double>(), stepped[0]["perplexity"].get<double>());
  EXPECT_GT(stepped[1]["expert_store"]["hits"].get<int64_t>(), 0);
}

struct EvalBadInput {
  std::string name;
  std::string args;  // after "eval --model {tiny}"; {text}, {empty} and {scratch} are replaced
  std::string message;
};
void PrintTo(const EvalBadInput& input, std::ostream* out) { *out << input.name; }

class CliEvalBadInput : public CliEval, public ::testing::WithParamInterface<EvalBadInput> {};

TEST_P(CliEvalBadInput, ClearErrorAndNonZeroExit) {
  std::ofstream(scratch() / "empty.txt") << "";
  std::string args = "eval --model " + tiny().string() + " " + GetParam().args;
  const std::pair<std::string, std::string> places[] = {{"{text}", text_.string()},
                                                        {"{empty}", (scratch() / "empty.txt").string()},
                                                        {"{scratch}", scratch().string()}};
  for (const auto& [from, to] : places)
    for (size_t at; (at = args.find(from)) != std::string::npos;) args.replace(at, from.size(), to);
  const Outcome outcome = run_epic(args, scratch(), 120);
  EXPECT_NE(outcome.exit_code, 0) << outcome.out;
  EXPECT_NE(outcome.exit_code, 124) << "timed out";
  EXPECT_NE(outcome.err.find(GetParam().message), std::string::npos) << outcome.err;
}

INSTANTIATE_TEST_SUITE_P(
    Eval, CliEvalBadInput,
    ::testing::Values(
        EvalBadInput{"MissingTextFile", "--text-file {scratch}/none.txt", "--text-file"},
        EvalBadInput{"EmptyText", "--text-file {empty}", "give a text of at least 2 tokens"},
        EvalBadInput{"TextIsADirectory", "--text-file {scratch}", "is a directory"},
        EvalBadInput{"WindowOfOne", "--text-file {text} --window 1", "--window"},
        EvalBadInput{"StrideZero", "--text-file {text} --stride 0", "--stride"},
        EvalBadInput{"StrideBeyondWindow", "--text-file {text} --window 8 --stride 9", "--stride"},
        EvalBadInput{"TopKZero", "--text-file {text} --top-k 0", "--top-k"},
        EvalBadInput{"TopKAboveTrained", "--text-file {text} --top-k 3", "trained with top-k 2"},
        EvalBadInput{"PruneEverything", "--text-file {text} --prune 100 --calibration-file {text}",
                     "above 0 and below 100"},
        EvalBadInput{"PruneWithoutCalibration", "--text-file {text} --prune 25", "add --calibration-file"},
        EvalBadInput{"CalibrationWithoutPrune", "--text-file {text} --calibration-file {text}",
                     "only used with --prune"},
        EvalBadInput{"PruneADenseLayer",
                     "--text-file {text} --prune 25 --prune-layers 1 --calibration-file {text}",
                     "not a MoE layer"},
        EvalBadInput{"PruneBelowTopK", "--text-file {text} --prune 90 --calibration-file {text}",
                     "fewer than the 2 experts per token"},
        EvalBadInput{"EmptyCalibration", "--text-file {text} --prune 25 --calibration-file {empty}",
                     "--calibration-file"},
        EvalBadInput{"BudgetOfNothing", "--text-file {text} --expert-budget 0%", "--expert-budget '0%'"},
        EvalBadInput{"OnMissUnknown", "--text-file {text} --expert-budget 2 --on-miss skip",
                     "--on-miss 'skip'"},
        EvalBadInput{"OnMissWithoutBudget", "--text-file {text} --on-miss substitute", "add --expert-budget"},
        EvalBadInput{"JsonInMissingFolder", "--text-file {text} --json {scratch}/no/such.json",
                     "does not exist"}),
    [](const ::testing::TestParamInfo<EvalBadInput>& info) { return info.param.name; });

}  // namespace
}  // namespace epic
