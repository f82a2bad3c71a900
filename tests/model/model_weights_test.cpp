// Selective weight loading into backend memory: a process reads only the experts it hosts (bytes
// counted exactly), stacks them in `hosted` order, and a checkpoint that disagrees with config.json
// fails with a message naming the tensor.
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

// A whole backend tensor (F32) on the host.
std::vector<float> download(Backend& backend, const Tensor& tensor) {
  EXPECT_EQ(tensor.type, ScalarType::kF32) << tensor.describe();
  std::vector<float> values(static_cast<size_t>(tensor.numel()));
  backend.copy_to_host(tensor, 0, values.data(), values.size() * sizeof(float));
  return values;
}

ModelWeights load(const fs::path& dir, Backend& backend, const LoadOptions& options) {
  const ModelConfig config = ModelConfig::load(dir);
  const std::unique_ptr<WeightSource> source = open_checkpoint_source(dir);
  return load_model_weights(config, *source, backend, options);
}

TEST(ModelWeights, ReadsOnlyHostedExpertsStacksThemAndCountsBytesExactly) {
  const ModelConfig config = ModelConfig::load(kCase);
  const std::unique_ptr<WeightSource> source = open_checkpoint_source(kCase);
  const auto backend = make_cpu_backend();
  LoadOptions options;
  // Host the odd experts of even layers only.
  options.hosts_expert = [](int64_t layer, int64_t expert) { return layer % 2 == 0 && expert % 2 == 1; };
  const ModelWeights weights = load_model_weights(config, *source, *backend, options);

  Checkpoint checkpoint = Checkpoint::open(kCase);  // the reference: every tensor, read on its own
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
  EXPECT_EQ(source->bytes_read(), expected_bytes);

  const int64_t hidden = config.hidden_size, inter = config.moe_intermediate_size;
  int64_t moe_layers = 0;
  for (int64_t layer = 0; layer < config.num_hidden_layers; ++layer) {
    SCOPED_TRACE("layer " + std::to_string(layer));
    const LayerWeights& w = weights.layers[layer];
    ASSERT_EQ(w.is_moe, config.is_moe_layer(layer));
    if (!w.is_moe) continue;
    ++moe_layers;
    const MoeLayerWeights& moe = w.moe;
    const std::vector<int64_t> expected_hosted =
        layer % 2 == 0 ? std::vector<int64_t>{1, 3, 5, 7} : std::vector<int64_t>{};
    EXPECT_EQ(moe.hosted, expected_hosted);
    for (int64_t expert = 0; expert < moe.num_experts; ++expert)
      EXPECT_EQ(moe.hosts(expert), options.hosts_expert(layer, expert)) << "expert " << expert;
    const int64_t num_hosted = static_cast<int64_t>(expected_hosted.size());
    ASSERT_EQ(moe.gate_up.view().rank, 3);
    EXPECT_EQ(moe.gate_up.view().dim(0), num_hosted);
    EXPECT_EQ(moe.gate_up.view().dim(1), 2 * inter);
    EXPECT_EQ(moe.gate_up.view().dim(2), hidden);
    ASSERT_EQ(moe.down.view().rank, 3);
    EXPECT_EQ(moe.down.view().dim(0), num_hosted);
    EXPECT_EQ(moe.down.view().dim(1), hidden);
    EXPECT_EQ(moe.down.view().dim(2), inter);

    // Slot s holds expert hosted[s]: its gate rows, then its up rows; local_index points back.
    std::vector<int32_t> local_index(static_cast<size_t>(moe.num_experts));
    backend->copy_to_host(moe.local_index, 0, local_index.data(), local_index.size() * sizeof(int32_t));
    const std::vector<float> gate_up = download(*backend, moe.gate_up);
    const std::vector<float> down = download(*backend, moe.down);
    for (int64_t expert = 0; expert < moe.num_experts; ++expert) {
      const auto slot =
          std::find(expected_hosted.begin(), expected_hosted.end(), expert) - expected_hosted.begin();
      EXPECT_EQ(local_index[expert], slot < num_hosted ? slot : -1) << "expert " << expert;
    }
    for (int64_t slot = 0; slot < num_hosted; ++slot) {
      const std::vector<std::string> names = expert_tensor_names(config, layer, expected_hosted[slot]);
      std::vector<float> expected = checkpoint.read_f32(names[0], {inter, hidden});
      const std::vector<float> up = checkpoint.read_f32(names[1], {inter, hidden});
      expected.insert(expected.end(), up.begin(), up.end());
      const std::vector<float> expected_down = checkpoint.read_f32(names[2], {hidden, inter});
      const size_t gate_up_size = static_cast<size_t>(2 * inter * hidden), down_size = expected_down.size();
      EXPECT_TRUE(std::equal(expected.begin(), expected.end(), gate_up.begin() + slot * gate_up_size))
          << "gate_up slot " << slot;
      EXPECT_TRUE(std::equal(expected_down.begin(), expected_down.end(), down.begin() + slot * down_size))
          << "down slot " << slot;
    }
  }
  EXPECT_EQ(moe_layers, 3);  // layer 1 is dense in this fixture
  EXPECT_EQ(weights.experts_hosted(), 8);
}

TEST(ModelWeights, AllExpertsReadWhenNoFilterIsGiven) {
  const ModelConfig config = ModelConfig::load(kCase);
  const std::unique_ptr<WeightSource> source = open_checkpoint_source(kCase);
  const auto backend = make_cpu_backend();
  const ModelWeights weights = load_model_weights(config, *source, *backend, LoadOptions{});
  Checkpoint checkpoint = Checkpoint::open(kCase);
  uint64_t all_bytes = 0;
  for (const std::string& name : checkpoint.tensor_names()) all_bytes += checkpoint.info(name).num_bytes();
  EXPECT_EQ(weights.bytes_read, all_bytes);
  EXPECT_EQ(weights.weight_type, ScalarType::kF32);
  // f32 storage: the resident weights are the bytes read, plus each MoE layer's two small tables
  // (local_index I32 [E] and present_mask U8 [E]).
  uint64_t tables = 0;
  for (const LayerWeights& layer : weights.layers)
    if (layer.is_moe) tables += static_cast<uint64_t>(layer.moe.num_experts) * (sizeof(int32_t) + 1);
  EXPECT_GT(tables, 0u);
  EXPECT_EQ(weights.resident_bytes, all_bytes + tables);
  EXPECT_EQ(weights.experts_hosted(), 3 * 8);
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
  const auto backend = make_cpu_backend();
  try {
    load(dir, *backend, LoadOptions{});
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
  const auto backend = make_cpu_backend();
  LoadOptions options;
  options.allow_missing_experts = true;
  try {
    load(temp.path() / "m", *backend, options);
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
  const std::unique_ptr<WeightSource> source = open_checkpoint_source(temp.path() / "m");
  const auto backend = make_cpu_backend();
  for (auto body : std::vector<std::function<void()>>{
           [&] { inspect_experts(config, *source, false); },
           [&] { load_model_weights(config, *source, *backend, LoadOptions{}); }}) {
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
  const fs::path dir = temp.path() / "m";
  testing::copy_with_edited_tensor(kCase, dir, tensor, [](std::vector<float>& values) {
    values[17] = std::numeric_limits<float>::quiet_NaN();
  });
  const auto backend = make_cpu_backend();
  try {
    load(dir, *backend, LoadOptions{});
    FAIL() << "a NaN weight was loaded without --allow-nonfinite-weights";
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidCheckpoint) << e.what();
    for (const std::string& word :
         std::vector<std::string>{"'" + tensor + "'", Checkpoint::open(dir).shard_of(tensor).value(),
                                  "element 17 ", "NaN", "--allow-nonfinite-weights"})
      EXPECT_NE(std::string(e.what()).find(word), std::string::npos) << e.what();
  }
  {
    // A worker that does not host the expert never reads it, so it loads without the flag.
    LoadOptions options;
    options.hosts_expert = [](int64_t layer, int64_t expert) { return !(layer == 2 && expert == 5); };
    EXPECT_NO_THROW(load(dir, *backend, options));
  }
  LoadOptions options;
  options.allow_nonfinite_weights = true;
  const ModelWeights weights = load(dir, *backend, options);
  // Expert 5's slot in the stacked down tensor holds the NaN at element 17, and nowhere else.
  const MoeLayerWeights& moe = weights.layers[2].moe;
  const auto slot = std::find(moe.hosted.begin(), moe.hosted.end(), 5) - moe.hosted.begin();
  ASSERT_LT(slot, static_cast<std::ptrdiff_t>(moe.hosted.size())) << "expert 5 not hosted";
  const std::vector<float> down = download(*backend, moe.down);
  const int64_t per_expert = moe.down.view().row_elements();
  for (size_t i = 0; i < down.size(); ++i)
    EXPECT_EQ(std::isnan(down[i]), static_cast<int64_t>(i) == slot * per_expert + 17) << "element " << i;
}

}  // namespace
}  // namespace epic
