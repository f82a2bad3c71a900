// The `epic` command line end to end: make-model -> run -> tokenize/detokenize, --logits-out
// against the golden reference, and clear errors with non-zero exits for bad flags and inputs.
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <nlohmann/json.hpp>

#include "../model/temp_dir.h"
#include "worker/npy_file.h"

namespace epic {
namespace {

namespace fs = std::filesystem;

struct Outcome {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs `epic ARGS` with stdout and stderr captured to files in dir.
Outcome run_epic(const std::string& args, const fs::path& dir) {
  const fs::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string command =
      std::string(EPIC_BINARY) + " " + args + " >" + out.string() + " 2>" + err.string();
  const int status = std::system(command.c_str());
  Outcome outcome;
  outcome.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream o(out), e(err);
  outcome.out.assign(std::istreambuf_iterator<char>(o), {});
  outcome.err.assign(std::istreambuf_iterator<char>(e), {});
  return outcome;
}

std::string quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

class Cli : public ::testing::Test {
 protected:
  // One tiny model for the suite (make-model with the real tokenizer when set-up installed it).
  static void SetUpTestSuite() {
    temp_ = new testing::TempDir();
    const Outcome made = run_epic(
        "make-model --preset tiny --seed 3 --out " + (temp_->path() / "tiny").string(), temp_->path());
    ASSERT_EQ(made.exit_code, 0) << made.err;
    made_output_ = new std::string(made.out);
  }
  static void TearDownTestSuite() {
    delete temp_;
    delete made_output_;
  }
  static fs::path tiny() { return temp_->path() / "tiny"; }
  static fs::path scratch() { return temp_->path(); }
  static bool has_tokenizer() { return fs::exists(tiny() / "tokenizer.json"); }
  static testing::TempDir* temp_;
  static std::string* made_output_;
};
testing::TempDir* Cli::temp_ = nullptr;
std::string* Cli::made_output_ = nullptr;

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
  const Outcome run = run_epic("run --model " + golden.string() + " --prompt-ids " + ids +
                                   " --max-new-tokens 5 --logits-out " + out.string(),
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

struct BadInput {
  std::string name;
  std::string args;     // {tiny} is replaced by the model directory
  std::string message;  // must appear on stderr
};

// Test names show the case name, not the struct's bytes.
void PrintTo(const BadInput& input, std::ostream* out) { *out << input.name; }

class CliBadInput : public Cli, public ::testing::WithParamInterface<BadInput> {};

TEST_P(CliBadInput, ClearErrorAndNonZeroExit) {
  std::string args = GetParam().args;
  for (size_t at; (at = args.find("{tiny}")) != std::string::npos;) args.replace(at, 6, tiny().string());
  for (size_t at; (at = args.find("{golden}")) != std::string::npos;) args.replace(at, 8, EPIC_GOLDEN_DIR);
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
