// Selective weight loading: a process reads only the experts it hosts (bytes counted exactly),
// and a checkpoint that disagrees with config.json fails with a message naming the tensor.
#include "worker/model_weights.h"

#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>

#include "kernels/error.h"
#include "temp_dir.h"
#include "tests/checkpoint/rewrite_tensor.h"
#include "worker/checkpoint.h"

namespace epic {
namespace {

namespace fs = std::filesystem;
const fs::path kCase = fs::path(EPIC_GOLDEN_DIR) / "qwen3_moe_f32";

TEST(ModelWeights, ReadsOnlyHostedExpertsAndCountsBytesExactly) {
  const ModelConfig config = ModelConfig::load(kCase);
  Checkpoint checkpoint = Checkpoint::open(kCase);
  LoadOptions options;
  // Host the odd experts of even layers only.
  options.hosts_expert = [](int64_t layer, int64_t expert) { return layer % 2 == 0 && expert % 2 == 1; };
  const ModelWeights weights = load_model_weights(config, checkpoint, options);

  uint64_t expected_bytes = 0;
  for (const std::string& name : checkpoint.tensor_names()) {
    const bool is_expert = name.find(".mlp.experts.") != std::string::npos;
    if (is_expert) {
      const int64_t layer = std::stoll(name.substr(name.find("layers.") + 7));
      const int64_t expert = std::stoll(name.substr(name.find("experts.") + 8));
      if (!options.hosts_expert(layer, expert)) continue;
    }
    expected_bytes += checkpoint.info(name).num_bytes();
  }
  EXPECT_EQ(weights.bytes_read, expected_bytes);
  EXPECT_EQ(checkpoint.bytes_read(), expected_bytes);
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    if (!config.is_moe_layer(layer)) continue;
    for (const auto& [expert, w] : weights.layers[layer].moe.experts) {
      EXPECT_TRUE(options.hosts_expert(layer, expert)) << "layer " << layer << " expert " << expert;
      EXPECT_EQ(w.gate.size(), static_cast<size_t>(config.moe_intermediate_size * config.hidden_size));
    }
    EXPECT_EQ(weights.layers[layer].moe.experts.size(), layer % 2 == 0 ? 4u : 0u);
  }
}

TEST(ModelWeights, AllExpertsReadWhenNoFilterIsGiven) {
  const ModelConfig config = ModelConfig::load(kCase);
  Checkpoint checkpoint = Checkpoint::open(kCase);
  const ModelWeights weights = load_model_weights(config, checkpoint, LoadOptions{});
  uint64_t all_bytes = 0;
  for (const std::string& name : checkpoint.tensor_names()) all_bytes += checkpoint.info(name).num_bytes();
  EXPECT_EQ(weights.bytes_read, all_bytes);
  EXPECT_EQ(weights.resident_bytes(), all_bytes);  // f32 storage: resident fp32 equals bytes read
}

// Copies the fixture with an edited config.json so a config/checkpoint mismatch can be provoked.
void copy_with_config(const fs::path& to, const std::function<void(nlohmann::json&)>& edit) {
  fs::copy(kCase, to, fs::copy_options::recursive | fs::copy_options::overwrite_existing);
  std::ifstream in(kCase / "config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  edit(config);
  std::ofstream(to / "config.json") << config.dump();
}

void expect_load_error(const fs::path& dir, ErrorCode code, const std::vector<std::string>& words) {
  const ModelConfig config = ModelConfig::load(dir);
  Checkpoint checkpoint = Checkpoint::open(dir);
  try {
    load_model_weights(config, checkpoint, LoadOptions{});
    FAIL() << "loaded a checkpoint that does not match its config";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), code) << e.what();
    for (const std::string& word : words)
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
  }
}

TEST(ModelWeights, WrongShapeForTheConfigNamesTensorAndShapes) {
  testing::TempDir temp;
  copy_with_config(temp.path() / "m", [](nlohmann::json& c) { c["moe_intermediate_size"] = 32; });
  expect_load_error(temp.path() / "m", ErrorCode::kInvalidCheckpoint,
                    {"experts.0.gate_proj.weight", "[24, 32]", "[32, 32]", "config.json"});
}

TEST(ModelWeights, RouterWithMoreRowsThanNumExpertsIsRejected) {
  testing::TempDir temp;
  copy_with_config(temp.path() / "m", [](nlohmann::json& c) {
    c.erase("num_local_experts");  // the fixture's transformers 5 spelling; one spelling at a time
    c["num_experts"] = 6;
    c["num_experts_per_tok"] = 2;
  });
  expect_load_error(temp.path() / "m", ErrorCode::kInvalidCheckpoint,
                    {"mlp.gate.weight", "[8, 32]", "num_experts"});
}

TEST(ModelWeights, MissingDenseTensorIsAnError) {
  testing::TempDir temp;
  // Layer 1 is dense in this fixture; claiming it is MoE asks for a router that does not exist.
  copy_with_config(temp.path() / "m",
                   [](nlohmann::json& c) { c["mlp_only_layers"] = nlohmann::json::array(); });
  expect_load_error(temp.path() / "m", ErrorCode::kInvalidCheckpoint, {"model.layers.1.mlp.gate.weight"});
}

TEST(ModelWeights, TooFewPresentExpertsForTopKIsAnError) {
  const fs::path dir = fs::path(EPIC_GOLDEN_DIR) / "missing_experts";
  testing::TempDir temp;
  fs::copy(dir, temp.path() / "m", fs::copy_options::recursive);
  std::ifstream in(dir / "config.json");
  nlohmann::json config = nlohmann::json::parse(in);
  config["num_experts_per_tok"] = 7;  // layer 2 keeps only 6 experts
  std::ofstream(temp.path() / "m" / "config.json") << config.dump();
  const ModelConfig parsed = ModelConfig::load(temp.path() / "m");
  Checkpoint checkpoint = Checkpoint::open(temp.path() / "m");
  LoadOptions options;
  options.allow_missing_experts = true;
  try {
    load_model_weights(parsed, checkpoint, options);
    FAIL() << "top-k larger than the present experts must fail";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kMissingExperts);
    EXPECT_NE(std::string(e.what()).find("layer 2 has 6 present experts"), std::string::npos) << e.what();
  }
}

// Without an expert count every layer reads as dense; the routers in the checkpoint show the
// config is what is wrong, and the message must say so (not "mlp.gate_proj.weight is missing").
TEST(ModelWeights, ConfigWithoutExpertCountButRoutersInTheCheckpointIsAConfigError) {
  testing::TempDir temp;
  copy_with_config(temp.path() / "m", [](nlohmann::json& c) {
    c.erase("num_experts");
    c.erase("num_local_experts");
  });
  const ModelConfig config = ModelConfig::load(temp.path() / "m");
  ASSERT_EQ(config.num_experts, 0);
  Checkpoint checkpoint = Checkpoint::open(temp.path() / "m");
  for (auto body :
       std::vector<std::function<void()>>{[&] { inspect_experts(config, checkpoint, false); },
                                          [&] { load_model_weights(config, checkpoint, LoadOptions{}); }}) {
    try {
      body();
      FAIL() << "a config without an expert count was accepted for a checkpoint with routers";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidConfig) << e.what();
      for (const std::string word : {"config.json names no expert count (num_experts / num_local_experts)",
                                     "model.layers.0.mlp.gate.weight", "add the expert count to config.json"})
        EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  }
}

TEST(ModelWeights, NonFiniteWeightIsRefusedUnlessAllowed) {
  testing::TempDir temp;
  const std::string tensor = "model.layers.2.mlp.experts.5.down_proj.weight";
  testing::copy_with_edited_tensor(kCase, temp.path() / "m", tensor, [](std::vector<float>& values) {
    values[17] = std::numeric_limits<float>::quiet_NaN();
  });
  const ModelConfig config = ModelConfig::load(temp.path() / "m");
  {
    Checkpoint checkpoint = Checkpoint::open(temp.path() / "m");
    try {
      load_model_weights(config, checkpoint, LoadOptions{});
      FAIL() << "a NaN weight was loaded without --allow-nonfinite-weights";
    } catch (const Error& e) {
      EXPECT_EQ(e.code(), ErrorCode::kInvalidCheckpoint) << e.what();
      for (const std::string& word :
           std::vector<std::string>{"'" + tensor + "'", checkpoint.shard_of(tensor).value(), "element 17 ",
                                    "NaN", "--allow-nonfinite-weights"})
        EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
    }
  }
  {
    // A worker that does not host the expert never reads it, so it loads without the flag.
    Checkpoint checkpoint = Checkpoint::open(temp.path() / "m");
    LoadOptions options;
    options.hosts_expert = [](int64_t layer, int64_t expert) { return !(layer == 2 && expert == 5); };
    EXPECT_NO_THROW(load_model_weights(config, checkpoint, options));
  }
  Checkpoint checkpoint = Checkpoint::open(temp.path() / "m");
  LoadOptions options;
  options.allow_nonfinite_weights = true;
  const ModelWeights weights = load_model_weights(config, checkpoint, options);
  EXPECT_TRUE(std::isnan(weights.layers[2].moe.experts.at(5).down[17]));
}

}  // namespace
}  // namespace epic
