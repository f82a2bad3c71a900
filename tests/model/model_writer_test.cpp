// make-model: deterministic per seed, loadable, sharded through an index, never overwrites
// files it did not write, replaces an earlier output only when forced.
#include "worker/model_writer.h"

#include <gtest/gtest.h>
#include <sys/stat.h>

#include <fstream>
#include <functional>

#include "kernels/error.h"
#include "temp_dir.h"
#include "worker/checkpoint.h"
#include "worker/model_runner.h"
#include "worker/npy_file.h"
#include "worker/weight_source.h"

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
  EXPECT_GT(Checkpoint::open(temp.path() / "m").num_shards(), 2u);
  const std::unique_ptr<WeightSource> source = open_checkpoint_source(temp.path() / "m");
  const auto backend = make_cpu_backend();
  const ModelWeights weights = load_model_weights(config, *source, *backend, LoadOptions{});
  RunnerOptions options;
  options.max_sequences = 1;
  options.max_context = 16;
  ModelRunner runner(config, weights, *backend, options);
  KvSequence sequence = runner.new_sequence();
  const std::vector<int32_t> ids = {1, 2, 3};
  const std::vector<float> logits = runner.forward(ids, sequence, true);
  EXPECT_EQ(sequence.length, 3);
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

std::string error_text(const std::function<void()>& action) {
  try {
    action();
  } catch (const Error& e) {
    EXPECT_EQ(e.code(), ErrorCode::kInvalidArgument) << e.what();
    return e.what();
  }
  ADD_FAILURE() << "no error";
  return "";
}

TEST(ModelWriter, RefusesAnEarlierOutputUnlessForcedAndThenLeavesNoStaleShard) {
  testing::TempDir temp;
  ModelPreset preset = small_tiny();
  const MakeModelResult first = make_model(preset, temp.path() / "m", MakeModelOptions{});
  const std::string index = read_file(temp.path() / "m" / "model.safetensors.index.json");
  const std::string message = error_text([&] { make_model(preset, temp.path() / "m", MakeModelOptions{}); });
  EXPECT_NE(message.find("is not empty"), std::string::npos) << message;
  EXPECT_NE(message.find("--force"), std::string::npos) << message;
  EXPECT_EQ(read_file(temp.path() / "m" / "model.safetensors.index.json"), index) << "refused, yet touched";

  // Forced, with fewer and larger shards: the earlier shards' files are gone, not left beside.
  preset.shard_bytes = 1u << 30;
  MakeModelOptions force;
  force.force = true;
  const MakeModelResult second = make_model(preset, temp.path() / "m", force);
  ASSERT_GT(first.num_shards, second.num_shards);
  int64_t shard_files = 0;
  for (const auto& entry : fs::directory_iterator(temp.path() / "m")) {
    shard_files += entry.path().extension() == ".safetensors";
    EXPECT_EQ(entry.path().filename().string().find(".tmp"), std::string::npos) << entry.path();
  }
  EXPECT_EQ(shard_files, second.num_shards);
  Checkpoint::open(temp.path() / "m");  // the index and the shards agree
}

// A make-model killed midway leaves shards (and temporaries) but no config.json, written last:
// that is no model, and the next make-model replaces it without --force.
TEST(ModelWriter, AnUnfinishedEarlierOutputIsReplacedWithoutForce) {
  testing::TempDir temp;
  fs::create_directories(temp.path() / "m");
  std::ofstream(temp.path() / "m" / "model-00001-of-00099.safetensors") << "cut short";
  std::ofstream(temp.path() / "m" / "model-00002-of-00099.safetensors.tmp.123.4") << "cut short";
  std::ofstream(temp.path() / "m" / "model.safetensors.index.json.epic-tmp.123.5") << "cut short";
  const MakeModelResult result = make_model(small_tiny(), temp.path() / "m", MakeModelOptions{});
  int64_t files = 0;
  for (const auto& entry : fs::directory_iterator(temp.path() / "m")) {
    ++files;
    EXPECT_EQ(entry.path().filename().string().find("of-00099"), std::string::npos) << entry.path();
  }
  EXPECT_EQ(files, result.num_shards + 2);  // shards, index, config.json (no tokenizer given)
}

TEST(ModelWriter, ForceNeverRemovesFilesMakeModelDidNotWrite) {
  testing::TempDir temp;
  make_model(small_tiny(), temp.path() / "m", MakeModelOptions{});
  std::ofstream(temp.path() / "m" / "notes.txt") << "mine";
  MakeModelOptions force;
  force.force = true;
  const std::string message = error_text([&] { make_model(small_tiny(), temp.path() / "m", force); });
  EXPECT_NE(message.find("notes.txt"), std::string::npos) << message;
  EXPECT_EQ(read_file(temp.path() / "m" / "notes.txt"), "mine");
  EXPECT_TRUE(fs::exists(temp.path() / "m" / "config.json")) << "removed before refusing";
}

TEST(ModelWriter, OutThatIsAFileOrFifoIsRefused) {
  testing::TempDir temp;
  std::ofstream(temp.path() / "file") << "data";
  ASSERT_EQ(::mkfifo((temp.path() / "fifo").c_str(), 0600), 0);
  MakeModelOptions force;
  force.force = true;
  EXPECT_NE(error_text([&] {
              make_model(small_tiny(), temp.path() / "file", force);
            }).find("a regular file, not a folder"),
            std::string::npos);
  EXPECT_NE(error_text([&] { make_model(small_tiny(), temp.path() / "fifo", force); }).find("a FIFO"),
            std::string::npos);
  EXPECT_EQ(read_file(temp.path() / "file"), "data");
  EXPECT_TRUE(fs::is_fifo(temp.path() / "fifo"));
}

// --logits-out's writer: rows may arrive in any order, the file appears only when complete, and a
// device is never written to or replaced (the issue's `--logits-out /dev/full`).
TEST(NpyFile, RowsInAnyOrderAppearOnlyOnCommit) {
  testing::TempDir temp;
  const fs::path path = temp.path() / "logits.npy";
  {
    NpyF32Writer writer(path, {3, 2});
    writer.write(4, std::vector<float>{5, 6});
    writer.write(0, std::vector<float>{1, 2, 3, 4});
    EXPECT_FALSE(fs::exists(path));
    writer.commit();
  }
  const NpyArray array = read_npy_f32(path);
  EXPECT_EQ(array.shape, (std::vector<int64_t>{3, 2}));
  EXPECT_EQ(array.values, (std::vector<float>{1, 2, 3, 4, 5, 6}));
  {
    NpyF32Writer dropped(temp.path() / "dropped.npy", {2});
    dropped.write(0, std::vector<float>{1, 2});
  }
  EXPECT_FALSE(fs::exists(temp.path() / "dropped.npy"));
  {
    NpyF32Writer short_of_values(temp.path() / "short.npy", {2});
    short_of_values.write(0, std::vector<float>{1});
    EXPECT_THROW(short_of_values.commit(), Error);
    EXPECT_THROW(short_of_values.write(1, std::vector<float>{1, 2}), Error);  // past the end
  }
  EXPECT_EQ(std::distance(fs::directory_iterator(temp.path()), fs::directory_iterator()), 1)
      << "only logits.npy: no temporary left behind";
}

TEST(NpyFile, DeviceTargetIsRefusedAndLeftAlone) {
  const std::string message = error_text([&] { write_npy_f32("/dev/full", {1}, {1.0f}); });
  EXPECT_NE(message.find("--logits-out /dev/full is a character device"), std::string::npos) << message;
  EXPECT_TRUE(fs::is_character_file("/dev/full"));
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
