// Hostile checkpoints at the command line: each is exit 2 with a message naming what is wrong, never a
// run that prints tokens. Copies of the golden f32 model, each broken one way (NaN weights, weights
// that overflow only at run time, bytes after a shard's last tensor, a config without an expert
// count, an index naming a shard outside the folder or a tensor twice, a directory or a FIFO where a
// file belongs). The FIFO cases run epic under `timeout`, so a blocking open fails the test.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmath>
#include <fstream>
#include <limits>
#include <nlohmann/json.hpp>

#include "tests/checkpoint/rewrite_tensor.h"
#include "tests/cli/cli_support.h"

namespace epic {
namespace {

const fs::path kGoldenModel = fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32";
// Known before main(), so the table below can name the broken models; made by HostileCheckpoints.
const fs::path kHostileRoot =
    fs::temp_directory_path() / ("epic-cli-bad-checkpoint-" + std::to_string(::getpid()));

std::string model(const std::string& name) { return (kHostileRoot / name).string(); }

nlohmann::json read_json(const fs::path& path) {
  std::ifstream in(path);
  return nlohmann::json::parse(in);
}

void copy_model(const std::string& name) {
  fs::copy(kGoldenModel, kHostileRoot / name, fs::copy_options::recursive);
}

// The shard of the golden model that holds tensor_name (a file name inside the model folder).
std::string shard_of(const std::string& tensor_name) {
  return read_json(kGoldenModel / "model.safetensors.index.json")["weight_map"][tensor_name]
      .get<std::string>();
}

// Builds every broken model once per test process (each is a few hundred KB).
class HostileCheckpoints : public ::testing::Environment {
 public:
  void SetUp() override {
    fs::create_directories(kHostileRoot);
    const std::string norm = "model.norm.weight";
    testing::copy_with_edited_tensor(kGoldenModel, kHostileRoot / "nan_weights", norm,
                                     [](std::vector<float>& values) { values[3] = std::nanf(""); });
    // 3e38 is finite (f32 max is 3.4e38), so the weights load; hidden values above 1.13 times it
    // overflow to Inf in the final norm, and the lm_head turns them into Inf and NaN logits.
    testing::copy_with_edited_tensor(
        kGoldenModel, kHostileRoot / "huge_weights", norm,
        [](std::vector<float>& values) { std::fill(values.begin(), values.end(), 3e38f); });

    copy_model("trailing_bytes");
    std::ofstream(kHostileRoot / "trailing_bytes" / shard_of(norm), std::ios::app | std::ios::binary)
        << "xyzzy";

    copy_model("no_expert_count");
    nlohmann::json config = read_json(kGoldenModel / "config.json");
    config.erase("num_experts");
    config.erase("num_local_experts");
    std::ofstream(kHostileRoot / "no_expert_count" / "config.json") << config.dump(2);

    const nlohmann::json index = read_json(kGoldenModel / "model.safetensors.index.json");
    for (const std::string outside :
         {"../model-00001-of-00005.safetensors", "/tmp/model-00001-of-00005.safetensors"}) {
      const std::string name = outside[0] == '/' ? "index_absolute_path" : "index_parent_path";
      copy_model(name);
      nlohmann::json edited = index;
      edited["weight_map"][norm] = outside;
      std::ofstream(kHostileRoot / name / "model.safetensors.index.json") << edited.dump(2);
    }

    copy_model("index_names_tensor_twice");
    std::string text = index.dump(2);
    const std::string entry = "\"" + norm + "\": \"" + shard_of(norm) + "\"";
    ASSERT_NE(text.find(entry), std::string::npos);
    text.replace(text.find(entry), entry.size(),
                 entry + ",\n    \"" + norm + "\": \"model-00001-of-00005.safetensors\"");
    std::ofstream(kHostileRoot / "index_names_tensor_twice" / "model.safetensors.index.json") << text;

    copy_model("shard_is_directory");
    fs::remove(kHostileRoot / "shard_is_directory" / shard_of(norm));
    fs::create_directory(kHostileRoot / "shard_is_directory" / shard_of(norm));

    // A FIFO where each file of a checkpoint belongs; nothing ever writes to them.
    for (const std::string file :
         {shard_of(norm), std::string("model.safetensors.index.json"), std::string("config.json")}) {
      const fs::path dir = kHostileRoot / ("fifo_" + file);
      copy_model("fifo_" + file);
      fs::remove(dir / file);
      ASSERT_EQ(::mkfifo((dir / file).c_str(), 0600), 0) << dir / file;
    }
  }
  void TearDown() override {
    std::error_code ignored;
    fs::remove_all(kHostileRoot, ignored);
  }
};
[[maybe_unused]] ::testing::Environment* const kHostileCheckpoints =
    ::testing::AddGlobalTestEnvironment(new HostileCheckpoints);

// `timeout 20 epic ARGS`: exit 124 means epic blocked (on a FIFO it should have refused).
Outcome run_epic_bounded(const std::string& args, const fs::path& dir) { return run_epic(args, dir, 20); }

INSTANTIATE_TEST_SUITE_P(
    Checkpoints, CliBadInput,
    ::testing::Values(
        BadInput{"NanWeight", "run --model " + model("nan_weights") + " --prompt-ids 1,2",
                 "'model.norm.weight'"},
        BadInput{"NanWeightNamesTheFix", "run --model " + model("nan_weights") + " --prompt-ids 1,2",
                 "element 3 (flat index, of 32) is NaN"},
        BadInput{"TrailingBytesInShard", "run --model " + model("trailing_bytes") + " --prompt-ids 1,2",
                 "5 trailing bytes belong to no tensor"},
        BadInput{"NoExpertCountButRouters", "run --model " + model("no_expert_count") + " --prompt-ids 1,2",
                 "config.json names no expert count (num_experts / num_local_experts) but the checkpoint has "
                 "routers, e.g. model.layers.0.mlp.gate.weight; add the expert count to config.json"},
        BadInput{"PlanNoExpertCountButRouters", "plan --model " + model("no_expert_count") + " --workers 2",
                 "names no expert count"},
        BadInput{"IndexParentPath", "run --model " + model("index_parent_path") + " --prompt-ids 1,2",
                 "not a plain file name"},
        BadInput{"IndexAbsolutePath", "run --model " + model("index_absolute_path") + " --prompt-ids 1,2",
                 "not a plain file name"},
        BadInput{"IndexNamesTensorTwice",
                 "run --model " + model("index_names_tensor_twice") + " --prompt-ids 1,2",
                 "names tensor 'model.norm.weight' twice"},
        BadInput{"ShardIsADirectory", "run --model " + model("shard_is_directory") + " --prompt-ids 1,2",
                 "is a directory, not a regular file"}),
    [](const auto& info) { return info.param.name; });

TEST_F(Cli, BadCheckpointsExitWith2) {
  for (const std::string name : {"nan_weights", "trailing_bytes", "no_expert_count", "index_parent_path",
                                 "index_names_tensor_twice", "shard_is_directory"}) {
    const Outcome outcome = run_epic_bounded("run --model " + model(name) + " --prompt-ids 1,2", scratch());
    EXPECT_EQ(outcome.exit_code, 2) << name << ": " << outcome.err;
    EXPECT_EQ(outcome.out, "") << name;
  }
}

// Where config.json, the index or a shard belongs, a FIFO is refused at once by its type.
TEST_F(Cli, FifoInTheModelFolderIsRefusedWithoutBlocking) {
  for (const std::string file : {std::string("config.json"), std::string("model.safetensors.index.json"),
                                 shard_of("model.norm.weight")}) {
    SCOPED_TRACE(file);
    const Outcome outcome =
        run_epic_bounded("run --model " + model("fifo_" + file) + " --prompt-ids 1,2", scratch());
    ASSERT_NE(outcome.exit_code, 124) << "epic blocked on the FIFO " << file << " (killed after 20 s)";
    EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
    EXPECT_NE(outcome.err.find(file), std::string::npos) << outcome.err;
    EXPECT_NE(outcome.err.find("FIFO"), std::string::npos) << outcome.err;
  }
}

// Finite weights that overflow only at run time: the logits are NaN/Inf, and that is an error naming
// the sequence and the step, never a silent argmax of 0.
TEST_F(Cli, WeightsThatOverflowAtRunTimeStopAtTheFirstStep) {
  const Outcome outcome = run_epic_bounded(
      "run --model " + model("huge_weights") + " --prompt-ids 1,2 --max-new-tokens 4", scratch());
  EXPECT_EQ(outcome.exit_code, 2) << outcome.err;
  EXPECT_NE(outcome.err.find("sequence 0, prefill (step 0): the logits hold"), std::string::npos)
      << outcome.err;
  EXPECT_NE(outcome.err.find("overflowed"), std::string::npos) << outcome.err;
  EXPECT_EQ(outcome.out, "");
}

TEST_F(Cli, NanWeightsLoadWithTheFlagButTheRunStopsAtTheFirstStep) {
  const std::string args = "run --model " + model("nan_weights") + " --prompt-ids 1,2 --max-new-tokens 4";
  const Outcome refused = run_epic_bounded(args, scratch());
  EXPECT_EQ(refused.exit_code, 2) << refused.err;
  EXPECT_NE(refused.err.find("--allow-nonfinite-weights"), std::string::npos) << refused.err;

  const Outcome allowed = run_epic_bounded(args + " --allow-nonfinite-weights", scratch());
  EXPECT_EQ(allowed.exit_code, 2) << allowed.err;
  EXPECT_NE(allowed.err.find("sequence 0, prefill (step 0): the logits hold NaN"), std::string::npos)
      << allowed.err;
  EXPECT_EQ(allowed.out, "");
}

TEST_F(Cli, TheGoldenModelStillRuns) {
  // The same prompt on the unbroken model: the failures above come from the breakage alone.
  const Outcome outcome = run_epic_bounded(
      "run --model " + kGoldenModel.string() + " --prompt-ids 1,2 --max-new-tokens 4", scratch());
  EXPECT_EQ(outcome.exit_code, 0) << outcome.err;
  EXPECT_NE(outcome.out, "");
}

}  // namespace
}  // namespace epic
