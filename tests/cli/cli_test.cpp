// The `epic` command line end to end: make-model -> run -> tokenize/detokenize, --logits-out
// against the golden reference, and clear errors with non-zero exits for bad flags and inputs.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "tests/cli/cli_support.h"
#include "worker/npy_file.h"

namespace epic {
namespace {

TEST_F(Cli, MakeModelReportsWhatItWrote) {
  EXPECT_NE(made_output_->find("preset tiny"), std::string::npos) << *made_output_;
  EXPECT_TRUE(fs::exists(tiny() / "config.json"));
  EXPECT_TRUE(fs::exists(tiny() / "model.safetensors.index.json"));
}

TEST_F(Cli, RunWithPromptIdsIsDeterministicAndPrintsIdsOrText) {
  const Outcome a =
      run_epic("run --model " + tiny().string() + " --prompt-ids 1,2,3 --max-new-tokens 6", scratch());
  const Outcome b =
      run_epic("run --model " + tiny().string() + " --prompt-ids 1,2,3 --max-new-tokens 6", scratch());
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
  EXPECT_NE(a.err.find("3 prompt tokens, 6 generated"), std::string::npos) << a.err;
  EXPECT_NE(a.err.find("MB read"), std::string::npos) << a.err;
}

TEST_F(Cli, SamplingIsReproducibleFromTheSeed) {
  const std::string base =
      "run --model " + tiny().string() + " --prompt-ids 5,6 --max-new-tokens 8 --temperature 1.5 --top-p 0.9";
  const Outcome a = run_epic(base + " --seed 11", scratch());
  const Outcome b = run_epic(base + " --seed 11", scratch());
  ASSERT_EQ(a.exit_code, 0) << a.err;
  EXPECT_EQ(a.out, b.out);
}

TEST_F(Cli, TextPromptTokenizeAndDetokenize) {
  if (!has_tokenizer()) GTEST_SKIP() << "no Qwen3 tokenizer.json: run launch/setup_debian.sh";
  const Outcome run = run_epic(
      "run --model " + tiny().string() + " --prompt " + quote("Hello, MoE world!") + " --max-new-tokens 4",
      scratch());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  const Outcome ids = run_epic(
      "tokenize --model " + tiny().string() + " --text " + quote("Hello world<|im_end|>"), scratch());
  ASSERT_EQ(ids.exit_code, 0) << ids.err;
  // "Hello", " world", then the special token's own id.
  EXPECT_EQ(ids.out, "9707,1879,151645\n");
  const Outcome text =
      run_epic("detokenize --model " + tiny().string() + " --ids 9707,1879,151645", scratch());
  ASSERT_EQ(text.exit_code, 0) << text.err;
  EXPECT_EQ(text.out, "Hello world<|im_end|>\n");
  std::ofstream(scratch() / "text.txt") << "Hello world";
  const Outcome from_file = run_epic(
      "tokenize --model " + tiny().string() + " --file " + (scratch() / "text.txt").string(), scratch());
  EXPECT_EQ(from_file.out, "9707,1879\n");
}

TEST_F(Cli, LogitsOutMatchesTheGoldenReference) {
  const fs::path golden = fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32";
  std::ifstream file(golden / "golden.json");
  const nlohmann::json prompt = nlohmann::json::parse(file)["prompts"][2];
  std::string ids;
  for (const auto& id : prompt["ids"]) ids += (ids.empty() ? "" : ",") + std::to_string(id.get<int>());
  const fs::path out = scratch() / "logits.npy";
  // fp32: the verification mode on whichever backend is the default here (cpu, or cuda on a GPU machine).
  const Outcome run = run_epic("run --model " + golden.string() + " --prompt-ids " + ids +
                                   " --precision fp32 --max-new-tokens 5 --logits-out " + out.string(),
                               scratch());
  ASSERT_EQ(run.exit_code, 0) << run.err;
  const NpyArray actual = read_npy_f32(out),
                 expected = read_npy_f32(golden / prompt["logits"].get<std::string>());
  ASSERT_EQ(actual.shape, expected.shape);
  double diff = 0, norm = 0;
  for (size_t i = 0; i < actual.values.size(); ++i) {
    diff += std::pow(double(actual.values[i]) - expected.values[i], 2);
    norm += std::pow(double(expected.values[i]), 2);
  }
  EXPECT_LE(std::sqrt(diff / norm), 1e-4);
  std::string greedy;
  for (const auto& id : prompt["greedy"])
    greedy += (greedy.empty() ? "" : ",") + std::to_string(id.get<int>());
  EXPECT_EQ(run.out, greedy + "\n");  // no tokenizer in the fixture: ids are printed
}

// One test body for every bad-input table (each test file instantiates it with its own cases).
TEST_P(CliBadInput, ClearErrorAndNonZeroExit) {
  const std::string args = expand_placeholders(GetParam().args, tiny());
  const Outcome outcome = run_epic(args, scratch());
  EXPECT_NE(outcome.exit_code, 0) << outcome.out;
  EXPECT_NE(outcome.err.find(GetParam().message), std::string::npos) << outcome.err;
}

INSTANTIATE_TEST_SUITE_P(
    Flags, CliBadInput,
    ::testing::Values(
        BadInput{"NoSubcommand", "", "subcommand"},
        BadInput{"UnknownFlag", "run --model {tiny} --prompt-ids 1 --bogus", "bogus"},
        BadInput{"BothPrompts", "run --model {tiny} --prompt hi --prompt-ids 1", "excludes"},
        BadInput{"NoPrompt", "run --model {tiny}", "exactly one of --prompt"},
        BadInput{"EmptyPrompt", "run --model {tiny} --prompt ''", "--prompt is empty"},
        BadInput{"EmptyIds", "run --model {tiny} --prompt-ids ''", "--prompt-ids is empty"},
        BadInput{"NonNumericId", "run --model {tiny} --prompt-ids 1,x,3", "\"x\" (element 2)"},
        BadInput{"NegativeId", "run --model {tiny} --prompt-ids 1,-4", "\"-4\""},
        BadInput{"IdOutsideVocab", "run --model {tiny} --prompt-ids 1,999999",
                 "outside the model's vocabulary"},
        BadInput{"NegativeTemperature", "run --model {tiny} --prompt-ids 1 --temperature -1",
                 "--temperature"},
        BadInput{"TopPTooLarge", "run --model {tiny} --prompt-ids 1 --top-p 2", "--top-p"},
        BadInput{"NotANumber", "run --model {tiny} --prompt-ids 1 --max-new-tokens many", "max-new-tokens"},
        BadInput{"MissingModelDir", "run --model /nonexistent/model --prompt-ids 1", "config.json"},
        BadInput{"TextPromptWithoutTokenizer", "run --model {golden}/qwen3_moe_f32 --prompt hi",
                 "--prompt-ids"},
        BadInput{"MissingExperts", "run --model {golden}/missing_experts --prompt-ids 1",
                 "--allow-missing-experts"},
        BadInput{"LogitsOutFolderMissing",
                 "run --model {tiny} --prompt-ids 1 --logits-out /nonexistent/x.npy", "does not exist"},
        BadInput{"UnknownPreset", "make-model --preset huge --out /tmp/epic-never", "unknown preset"},
        BadInput{"TokenizeWithoutTokenizer", "tokenize --model {golden}/qwen3_moe_f32 --text hi",
                 "tokenizer.json"},
        BadInput{"DetokenizeBadIdList", "detokenize --model {tiny} --ids 1,,2", "(element 2)"}),
    [](const auto& info) { return info.param.name; });

TEST_F(Cli, DetokenizeRejectsIdsOutsideTheVocabulary) {
  if (!has_tokenizer()) GTEST_SKIP() << "no Qwen3 tokenizer.json: run launch/setup_debian.sh";
  const Outcome outcome = run_epic("detokenize --model " + tiny().string() + " --ids 99999999", scratch());
  EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
  EXPECT_NE(outcome.err.find("99999999"), std::string::npos) << outcome.err;
}

TEST_F(Cli, MissingExpertsRunWithTheFlag) {
  const Outcome outcome = run_epic("run --model " + (fs::path(EPIC_GOLDEN_DIR) / "missing_experts").string() +
                                       " --prompt-ids 1,2 --allow-missing-experts",
                                   scratch());
  EXPECT_EQ(outcome.exit_code, 0) << outcome.err;
}

}  // namespace
}  // namespace epic
