// make-model: deterministic per seed, loadable, sharded through an index, never overwrites
// files it did not write.
#include "worker/model_writer.h"

#include <gtest/gtest.h>

#include <fstream>

#include "kernels/error.h"
#include "temp_dir.h"
#include "worker/checkpoint.h"
#include "worker/model_runner.h"

namespace epic {
namespace {

namespace fs = std::filesystem;

std::string read_file(const fs::path& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

ModelPreset small_tiny() {
  ModelPreset preset = load_preset("tiny", EPIC_PRESETS_DIR);
  preset.config.vocab_size = 300;  // keep the test fast; the shapes are otherwise the preset's
  preset.shard_bytes = 60000;      // several shards, with one layer's experts across two
  return preset;
}

TEST(ModelWriter, SameSeedSameBytesOtherSeedOtherBytes) {
  testing::TempDir temp;
  const ModelPreset preset = small_tiny();
  MakeModelOptions options;
  options.seed = 5;
  const MakeModelResult a = make_model(preset, temp.path() / "a", options);
  make_model(preset, temp.path() / "b", options);
  options.seed = 6;
  make_model(preset, temp.path() / "c", options);
  ASSERT_GT(a.num_shards, 2);
  const std::string first = "model-00001-of-" + std::string(5 - std::to_string(a.num_shards).size(), '0') +
                            std::to_string(a.num_shards) + ".safetensors";
  EXPECT_EQ(read_file(temp.path() / "a" / first), read_file(temp.path() / "b" / first));
  EXPECT_NE(read_file(temp.path() / "a" / first), read_file(temp.path() / "c" / first));
}

TEST(ModelWriter, WrittenModelLoadsAndRuns) {
  testing::TempDir temp;
  const ModelPreset preset = small_tiny();
  make_model(preset, temp.path() / "m", MakeModelOptions{});
  const ModelConfig config = ModelConfig::load(temp.path() / "m");
  EXPECT_EQ(config.num_experts, preset.config.num_experts);
  EXPECT_EQ(config.mlp_only_layers, preset.config.mlp_only_layers);
  Checkpoint checkpoint = Checkpoint::open(temp.path() / "m");
  EXPECT_GT(checkpoint.num_shards(), 2u);
  const ModelWeights weights = load_model_weights(config, checkpoint, LoadOptions{});
  auto backend = make_cpu_backend();
  ModelRunner runner(config, weights, *backend);
  KvCache cache(config);
  const std::vector<int32_t> ids = {1, 2, 3};
  const std::vector<float> logits = runner.forward(ids, cache, true);
  ASSERT_EQ(logits.size(), 3u * config.vocab_size);
  for (float v : logits) ASSERT_TRUE(std::isfinite(v));
}

TEST(ModelWriter, RefusesToOverwriteForeignFiles) {
  testing::TempDir temp;
  fs::create_directories(temp.path() / "m");
  std::ofstream(temp.path() / "m" / "notes.txt") << "mine";
  try {
    make_model(small_tiny(), temp.path() / "m", MakeModelOptions{});
    FAIL() << "overwrote a directory with user files";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("notes.txt"), std::string::npos) << e.what();
  }
  EXPECT_EQ(read_file(temp.path() / "m" / "notes.txt"), "mine");
}

TEST(ModelWriter, PresetsHaveTheExactPublishedShapes) {
  const ModelPreset qwen3 = load_preset("qwen3-30b-a3b", EPIC_PRESETS_DIR);
  EXPECT_EQ(qwen3.config.num_hidden_layers, 48);
  EXPECT_EQ(qwen3.config.hidden_size, 2048);
  EXPECT_EQ(qwen3.config.num_experts, 128);
  EXPECT_EQ(qwen3.config.num_experts_per_tok, 8);
  EXPECT_EQ(qwen3.config.moe_intermediate_size, 768);
  EXPECT_EQ(qwen3.config.vocab_size, 151936);
  EXPECT_EQ(qwen3.storage, DType::kBF16);
  const ModelPreset omni = load_preset("qwen3-omni-30b-a3b-thinker", EPIC_PRESETS_DIR);
  EXPECT_EQ(omni.config.architecture, Architecture::kQwen3OmniThinker);
  EXPECT_EQ(omni.config.vocab_size, 152064);
  EXPECT_EQ(omni.config.num_attention_heads, 32);
  EXPECT_EQ(omni.config.num_key_value_heads, 4);
  EXPECT_EQ(omni.config.head_dim, 128);
  // One expert is 9 MiB in bf16 (3 x 768 x 2048 x 2 bytes).
  EXPECT_EQ(3 * omni.config.moe_intermediate_size * omni.config.hidden_size * 2, 9 * 1024 * 1024);
  try {
    load_preset("no-such-preset", EPIC_PRESETS_DIR);
    FAIL();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("tiny"), std::string::npos) << e.what();
  }
}

}  // namespace
}  // namespace epic
