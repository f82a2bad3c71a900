// Checkpoint: the Hugging Face index (or a lone model.safetensors), each index error, lazy shard
// opening, shape checks against the config, and exact bytes_read across two shards.
#include "worker/checkpoint.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

#include "tests/checkpoint/test_files.h"

namespace epic {
namespace {

using nlohmann::json;
using testing::expect_error;
using testing::TempDir;
using testing::write_bytes;

constexpr ErrorCode kBad = ErrorCode::kInvalidCheckpoint;
const std::string kShard1 = "model-00001-of-00002.safetensors";
const std::string kShard2 = "model-00002-of-00002.safetensors";

void write_index(const TempDir& dir, const json& weight_map) {
  json index = {{"metadata", {{"total_size", 1234}}}, {"weight_map", weight_map}};
  write_bytes(dir / "model.safetensors.index.json", index.dump(2));
}

// Values that identify their tensor and position: tensor_id * 1000 + index (exact in F32, and in F16
// below 2048).
std::vector<float> identifying_values(int tensor_id, size_t count) {
  std::vector<float> values(count);
  for (size_t i = 0; i < count; ++i) values[i] = static_cast<float>(tensor_id * 1000 + static_cast<int>(i));
  return values;
}

TEST(CheckpointOpen, EmptyDirectoryNamesBothFilesItLookedFor) {
  TempDir dir;
  expect_error([&] { Checkpoint::open(dir.path()); }, kBad,
               {dir.path().string(), "model.safetensors.index.json", "model.safetensors", "neither",
                "Hugging Face model directory"});
}

TEST(CheckpointOpen, MissingDirectory) {
  TempDir dir;
  expect_error([&] { Checkpoint::open(dir / "nope"); }, kBad, {"nope", "does not exist", "Hugging Face"});
}

TEST(CheckpointOpen, IndexNotJson) {
  TempDir dir;
  write_bytes(dir / "model.safetensors.index.json", "{\"weight_map\": {");
  expect_error([&] { Checkpoint::open(dir.path()); }, kBad,
               {"model.safetensors.index.json", "not valid JSON"});
}

TEST(CheckpointOpen, IndexNotAnObject) {
  TempDir dir;
  write_bytes(dir / "model.safetensors.index.json", "[]");
  expect_error([&] { Checkpoint::open(dir.path()); }, kBad,
               {"model.safetensors.index.json", "array", "object"});
}

TEST(CheckpointOpen, IndexWithoutWeightMap) {
  TempDir dir;
  write_bytes(dir / "model.safetensors.index.json", R"({"metadata": {"total_size": 8}})");
  expect_error([&] { Checkpoint::open(dir.path()); }, kBad,
               {"model.safetensors.index.json", "no \"weight_map\""});
}

TEST(CheckpointOpen, WeightMapNotAnObject) {
  TempDir dir;
  write_bytes(dir / "model.safetensors.index.json", R"({"weight_map": ["a.safetensors"]})");
  expect_error([&] { Checkpoint::open(dir.path()); }, kBad,
               {"model.safetensors.index.json", "\"weight_map\"", "array"});
}

TEST(CheckpointOpen, WeightMapNonStringFileName) {
  TempDir dir;
  write_index(dir, {{"model.norm.weight", 3}});
  expect_error([&] { Checkpoint::open(dir.path()); }, kBad,
               {"model.safetensors.index.json", "'model.norm.weight'", "must be strings"});
}

TEST(CheckpointOpen, ShardNamesOutsideTheDirectoryAreRejected) {
  for (const std::string shard : {"../other/model.safetensors", "sub/model.safetensors", "..",
                                  "/abs.safetensors", "sub\\model.safetensors", ""}) {
    SCOPED_TRACE(shard);
    TempDir dir;
    write_index(dir, {{"model.norm.weight", shard}});
    expect_error(
        [&] { Checkpoint::open(dir.path()); }, kBad,
        {"model.safetensors.index.json", "'model.norm.weight'", "'" + shard + "'", "not a plain file name"});
  }
}

TEST(CheckpointOpen, IndexNamingATensorTwiceIsRejected) {
  TempDir dir;
  // nlohmann would keep the last of two equal keys: the first shard named would silently lose.
  write_bytes(dir / "model.safetensors.index.json",
              R"({"weight_map": {"w": ")" + kShard1 + R"(", "w": ")" + kShard2 + R"("}})");
  expect_error([&] { Checkpoint::open(dir.path()); }, kBad, {"model.safetensors.index.json", "'w'", "twice"});
}

TEST(CheckpointOpen, DeeplyNestedIndexIsRejected) {
  TempDir dir;
  write_bytes(dir / "model.safetensors.index.json",
              R"({"metadata": )" + std::string(10000, '[') + std::string(10000, ']') + "}");
  expect_error([&] { Checkpoint::open(dir.path()); }, kBad, {"model.safetensors.index.json", "nests deeper"});
}

// Where the index, model.safetensors or a shard should be, a FIFO or a directory is refused at once
// by its type, never opened as a file (a FIFO would block forever).
TEST(CheckpointOpen, IndexThatIsAFifoOrADirectoryIsRefusedByType) {
  {
    TempDir dir;
    const auto index = dir / "model.safetensors.index.json";
    testing::make_fifo(index);
    testing::expect_refused_without_blocking(index, [&] { Checkpoint::open(dir.path()); },
                                             ErrorCode::kInvalidArgument,
                                             {index.string(), "FIFO", "not a regular file"});
  }
  {
    TempDir dir;
    std::filesystem::create_directory(dir / "model.safetensors.index.json");
    expect_error([&] { Checkpoint::open(dir.path()); }, ErrorCode::kInvalidArgument,
                 {"model.safetensors.index.json", "a directory"});
  }
}

TEST(CheckpointOpen, SingleFileThatIsAFifoOrADirectoryIsRefusedByType) {
  {
    TempDir dir;
    const auto single = dir / "model.safetensors";
    testing::make_fifo(single);
    testing::expect_refused_without_blocking(single, [&] { Checkpoint::open(dir.path()); },
                                             ErrorCode::kInvalidArgument,
                                             {single.string(), "FIFO", "not a regular file"});
  }
  {
    TempDir dir;
    std::filesystem::create_directory(dir / "model.safetensors");
    expect_error([&] { Checkpoint::open(dir.path()); }, ErrorCode::kInvalidArgument,
                 {"model.safetensors", "a directory"});
  }
}

TEST(CheckpointInfo, ShardThatIsAFifoOrADirectoryIsRefusedByType) {
  TempDir dir;
  write_index(dir, {{"layers.0.w", kShard1}, {"layers.1.w", kShard2}});
  testing::make_fifo(dir / kShard1);
  std::filesystem::create_directory(dir / kShard2);
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  testing::expect_refused_without_blocking(dir / kShard1, [&] { checkpoint.info("layers.0.w"); },
                                           ErrorCode::kInvalidArgument,
                                           {kShard1, "FIFO", "not a regular file", "'layers.0.w'"});
  expect_error([&] { checkpoint.info("layers.1.w"); }, ErrorCode::kInvalidArgument,
               {kShard2, "a directory", "'layers.1.w'"});
}

TEST(CheckpointInfo, TensorStoredInTwoShardsIsRejected) {
  TempDir dir;
  SafetensorsWriter first, second;
  first.add_f32("layers.0.w", DType::kF32, {1}, {1.0f});
  first.add_f32("layers.0.stale", DType::kF32, {1}, {2.0f});
  first.write(dir / kShard1);
  second.add_f32("layers.0.stale", DType::kF32, {1}, {3.0f});
  second.write(dir / kShard2);
  write_index(dir, {{"layers.0.w", kShard1}, {"layers.0.stale", kShard2}});
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  // Reading any tensor of the shard with the second copy fails: that shard came from another export.
  expect_error([&] { checkpoint.info("layers.0.w"); }, kBad,
               {"'layers.0.stale'", "two shards", kShard1, kShard2, "Re-download"});
}

TEST(CheckpointRead, NonFiniteWeightNamesTensorShardAndElementUnlessAllowed) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add_f32("layers.0.w", DType::kBF16, {2, 2},
                 {1.0f, 2.0f, -std::numeric_limits<float>::infinity(), 4.0f});
  writer.write(dir / kShard1);
  write_index(dir, {{"layers.0.w", kShard1}});
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  expect_error(
      [&] {
        checkpoint.read_f32("layers.0.w", {2, 2});
      },
      kBad, {"'layers.0.w'", kShard1, "element 2 ", "-Inf", "--allow-nonfinite-weights"});
  const std::vector<float> allowed = checkpoint.read_f32("layers.0.w", {2, 2}, NonFiniteWeights::kAllow);
  EXPECT_EQ(-std::numeric_limits<float>::infinity(), allowed[2]);
}

TEST(CheckpointInfo, MissingShardNamesShardAndTensor) {
  TempDir dir;
  write_index(dir, {{"layers.0.w", kShard1}});
  Checkpoint checkpoint = Checkpoint::open(dir.path());  // shards are not opened yet
  EXPECT_TRUE(checkpoint.contains("layers.0.w"));
  expect_error([&] { checkpoint.info("layers.0.w"); }, kBad,
               {kShard1, "'layers.0.w'", "missing", "re-download"});
}

TEST(CheckpointInfo, ShardLackingTheTensor) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add_f32("layers.0.other", DType::kF32, {1}, {1.0f});
  writer.write(dir / kShard1);
  write_index(dir, {{"layers.0.w", kShard1}, {"layers.0.other", kShard1}});
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  expect_error([&] { checkpoint.info("layers.0.w"); }, kBad,
               {"tensor 'layers.0.w' is named by model.safetensors.index.json in shard " + kShard1 + " but " +
                kShard1 + " does not contain it"});
  EXPECT_EQ(std::vector<int64_t>{1}, checkpoint.info("layers.0.other").shape);
}

TEST(CheckpointInfo, CorruptShardNamesShardAndTensor) {
  TempDir dir;
  write_bytes(dir / kShard1, "abc");
  write_index(dir, {{"layers.0.w", kShard1}});
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  expect_error([&] { checkpoint.info("layers.0.w"); }, kBad, {kShard1, "'layers.0.w'", "truncated"});
}

TEST(CheckpointInfo, TensorNotInCheckpoint) {
  TempDir dir;
  write_index(dir, {{"layers.0.w", kShard1}});
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  EXPECT_FALSE(checkpoint.contains("layers.9.w"));
  EXPECT_EQ(std::nullopt, checkpoint.shard_of("layers.9.w"));
  expect_error([&] { checkpoint.info("layers.9.w"); }, kBad, {"'layers.9.w'", "not in the checkpoint"});
}

TEST(CheckpointRead, WrongShapeNamesFileTensorFoundAndExpected) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add_f32("layers.0.w_gate", DType::kBF16, {4, 8}, std::vector<float>(32, 0.5f));
  writer.write(dir / "model.safetensors");
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  expect_error(
      [&] {
        checkpoint.read_f32("layers.0.w_gate", {8, 4});
      },
      kBad,
      {"model.safetensors", "'layers.0.w_gate'", "[4, 8]", "BF16", "expects shape [8, 4]", "config.json"});
  EXPECT_EQ(0u, checkpoint.bytes_read());  // nothing is read when the shape is wrong
}

TEST(CheckpointRead, NonFloatDtypeNamesTheDtype) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("positions", DType::kI64, {2}, std::vector<uint8_t>(16));
  writer.write(dir / "model.safetensors");
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  expect_error([&] { checkpoint.read_f32("positions", {2}); }, kBad,
               {"model.safetensors", "'positions'", "I64", "F32, F16 or BF16", "config.json"});
}

TEST(CheckpointSingleFile, AllTensorsOfModelSafetensors) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add_f32("b.weight", DType::kF32, {2, 2}, identifying_values(1, 4));
  writer.add_f32("a.weight", DType::kF16, {3}, identifying_values(2, 3));
  writer.write(dir / "model.safetensors");
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  EXPECT_EQ(dir.path(), checkpoint.directory());
  EXPECT_EQ((std::vector<std::string>{"a.weight", "b.weight"}), checkpoint.tensor_names());
  EXPECT_EQ(1u, checkpoint.num_shards());
  EXPECT_EQ("model.safetensors", checkpoint.shard_of("a.weight"));
  EXPECT_EQ(identifying_values(1, 4), checkpoint.read_f32("b.weight", {2, 2}));
  EXPECT_EQ(16u, checkpoint.bytes_read());
  EXPECT_EQ(identifying_values(2, 3), checkpoint.read_f32("a.weight", {3}));
  EXPECT_EQ(16u + 6u, checkpoint.bytes_read());
}

TEST(CheckpointSingleFile, IndexWinsWhenBothArePresent) {
  TempDir dir;
  SafetensorsWriter single;
  single.add_f32("from_single", DType::kF32, {1}, {1.0f});
  single.write(dir / "model.safetensors");
  SafetensorsWriter shard;
  shard.add_f32("from_index", DType::kF32, {1}, {2.0f});
  shard.write(dir / kShard1);
  write_index(dir, {{"from_index", kShard1}});
  Checkpoint checkpoint = Checkpoint::open(dir.path());
  EXPECT_EQ(std::vector<std::string>{"from_index"}, checkpoint.tensor_names());
  EXPECT_EQ(std::vector<float>{2.0f}, checkpoint.read_f32("from_index", {1}));
}

// Two shards; layer 1's tensors straddle them (w_gate and w_up in shard 1, w_down in shard 2), as
// HF sharding does when a shard fills up mid-layer.
class TwoShardCheckpoint : public ::testing::Test {
 protected:
  struct Tensor {
    std::string name;
    std::string shard;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<float> values;
  };

  void SetUp() override {
    seed_ = std::random_device{}();
    std::mt19937 rng(seed_);
    std::normal_distribution<float> normal;
    tensors_ = {
        {"model.embed_tokens.weight", kShard1, DType::kBF16, {16, 8}, {}},
        {"model.layers.0.mlp.w_gate", kShard1, DType::kBF16, {8, 12}, {}},
        {"model.layers.1.mlp.w_gate", kShard1, DType::kF16, {8, 12}, {}},
        {"model.layers.1.mlp.w_up", kShard1, DType::kF32, {8, 12}, {}},
        {"model.layers.1.mlp.w_down", kShard2, DType::kBF16, {12, 8}, {}},
        {"model.norm.weight", kShard2, DType::kF32, {8}, {}},
    };
    SafetensorsWriter writers[2];
    json weight_map = json::object();
    for (Tensor& tensor : tensors_) {
      int64_t count = 1;
      for (int64_t dim : tensor.shape) count *= dim;
      tensor.values.resize(static_cast<size_t>(count));
      for (float& value : tensor.values) value = normal(rng);
      writers[tensor.shard == kShard1 ? 0 : 1].add_f32(tensor.name, tensor.dtype, tensor.shape,
                                                       tensor.values);
      weight_map[tensor.name] = tensor.shard;
    }
    writers[0].write(dir_ / kShard1);
    writers[1].write(dir_ / kShard2);
    write_index(dir_, weight_map);
  }

  const Tensor& tensor(const std::string& name) const {
    for (const Tensor& t : tensors_) {
      if (t.name == name) return t;
    }
    throw std::logic_error("no test tensor " + name);
  }

  // The exact f32 values a reader must return: the input rounded once to the storage dtype.
  static std::vector<float> expected_values(const Tensor& t) {
    std::vector<float> values = t.values;
    for (float& value : values) {
      if (t.dtype == DType::kBF16) value = bf16_to_f32(f32_to_bf16(value));
      if (t.dtype == DType::kF16) value = f16_to_f32(f32_to_f16(value));
    }
    return values;
  }

  static uint64_t num_bytes(const Tensor& t) { return t.values.size() * dtype_size(t.dtype); }

  unsigned seed_ = 0;
  TempDir dir_;
  std::vector<Tensor> tensors_;
};

TEST_F(TwoShardCheckpoint, ReadsEveryTensorExactlyThroughTheIndex) {
  SCOPED_TRACE("seed " + std::to_string(seed_));
  Checkpoint checkpoint = Checkpoint::open(dir_.path());
  EXPECT_EQ(2u, checkpoint.num_shards());
  const std::vector<std::string> names = checkpoint.tensor_names();
  EXPECT_EQ(tensors_.size(), names.size());
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  uint64_t expected_bytes_read = 0;
  for (const Tensor& t : tensors_) {
    SCOPED_TRACE(t.name);
    EXPECT_EQ(t.shard, checkpoint.shard_of(t.name));
    const TensorInfo& info = checkpoint.info(t.name);
    EXPECT_EQ(t.dtype, info.dtype);
    EXPECT_EQ(t.shape, info.shape);
    const std::vector<float> values = checkpoint.read_f32(t.name, t.shape);
    const std::vector<float> expected = expected_values(t);
    ASSERT_EQ(expected.size(), values.size());
    for (size_t i = 0; i < values.size(); ++i) {
      ASSERT_EQ(std::bit_cast<uint32_t>(expected[i]), std::bit_cast<uint32_t>(values[i]))
          << "element " << i << ": expected " << expected[i] << " got " << values[i];
    }
    expected_bytes_read += num_bytes(t);
    EXPECT_EQ(expected_bytes_read, checkpoint.bytes_read());
  }
}

TEST_F(TwoShardCheckpoint, ReadingOneTensorCountsOnlyItsBytes) {
  Checkpoint checkpoint = Checkpoint::open(dir_.path());
  EXPECT_EQ(0u, checkpoint.bytes_read());
  const Tensor& w_down = tensor("model.layers.1.mlp.w_down");
  checkpoint.read_f32(w_down.name, w_down.shape);
  EXPECT_EQ(num_bytes(w_down), checkpoint.bytes_read());
  checkpoint.info("model.layers.1.mlp.w_up");  // opening a shard reads its header, not tensor data
  EXPECT_EQ(num_bytes(w_down), checkpoint.bytes_read());
  const Tensor& w_up = tensor("model.layers.1.mlp.w_up");
  checkpoint.read_f32(w_up.name, w_up.shape);
  EXPECT_EQ(num_bytes(w_down) + num_bytes(w_up), checkpoint.bytes_read());
}

TEST_F(TwoShardCheckpoint, ShardsOpenLazilySoAMissingShardOnlyFailsItsTensors) {
  std::filesystem::remove(dir_ / kShard1);
  Checkpoint checkpoint = Checkpoint::open(dir_.path());
  const Tensor& norm = tensor("model.norm.weight");
  EXPECT_EQ(expected_values(norm), checkpoint.read_f32(norm.name, norm.shape));
  expect_error(
      [&] {
        checkpoint.read_f32("model.layers.1.mlp.w_up", {8, 12});
      },
      kBad, {kShard1, "'model.layers.1.mlp.w_up'", "missing"});
  EXPECT_EQ(num_bytes(norm), checkpoint.bytes_read());
}

}  // namespace
}  // namespace epic
