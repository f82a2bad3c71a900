// Weight sources: the random source gives exactly the bytes make-model writes (any sub-range,
// every storage dtype); the checkpoint source reads exact byte ranges from many threads at once,
// counts them, and refuses reads outside a tensor, before info(), and of absent tensors.
#include "worker/weight_source.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <random>
#include <thread>

#include "tests/checkpoint/small_model.h"
#include "tests/checkpoint/test_files.h"
#include "worker/model_tensors.h"
#include "worker/random_values.h"

namespace epic {
namespace {

using testing::expect_error;

// The stored bytes of every tensor of a checkpoint, read whole by the safetensors reader.
std::vector<uint8_t> stored_bytes(Checkpoint& checkpoint, const std::string& name) {
  const TensorInfo& info = checkpoint.info(name);
  std::vector<uint8_t> bytes(info.num_bytes());
  SafetensorsFile::open(checkpoint.directory() / *checkpoint.shard_of(name)).read_raw(info, bytes.data());
  return bytes;
}

class RandomSourceTest : public ::testing::TestWithParam<DType> {};

TEST_P(RandomSourceTest, GivesMakeModelBytesForAnyRange) {
  testing::TempDir temp;
  const ModelPreset preset = testing::small_preset(GetParam());
  const uint64_t seed = testing::make_small_model(preset, temp / "m");
  SCOPED_TRACE("seed " + std::to_string(seed));
  Checkpoint checkpoint = Checkpoint::open(temp / "m");
  auto source = make_random_source(preset.config, preset.storage, seed, "random weights of preset tiny");

  std::vector<std::string> names;
  for (const ModelTensorSpec& spec : model_tensor_specs(preset.config)) names.push_back(spec.name);
  std::sort(names.begin(), names.end());
  ASSERT_EQ(names, checkpoint.tensor_names());

  std::mt19937_64 random(seed);
  uint64_t expected_bytes_read = 0;
  for (const std::string& name : names) {
    ASSERT_TRUE(source->contains(name)) << name;
    const TensorInfo& info = source->info(name);
    const TensorInfo& stored_info = checkpoint.info(name);
    EXPECT_EQ(info.dtype, stored_info.dtype) << name;
    EXPECT_EQ(info.shape, stored_info.shape) << name;
    EXPECT_EQ(info.num_bytes(), stored_info.num_bytes()) << name;
    const std::vector<uint8_t> stored = stored_bytes(checkpoint, name);

    std::vector<uint8_t> whole(stored.size());
    source->read(name, 0, whole.size(), whole.data());
    ASSERT_EQ(whole, stored) << name << ": the whole tensor differs";
    expected_bytes_read += whole.size();
    // Sub-ranges starting and ending at any byte, inside elements too.
    for (int trial = 0; trial < 4; ++trial) {
      const uint64_t offset = random() % stored.size();
      const uint64_t size = 1 + random() % (stored.size() - offset);
      std::vector<uint8_t> part(size + 2, 0x5A);  // guard bytes after the range
      source->read(name, offset, size, part.data());
      ASSERT_TRUE(std::equal(part.begin(), part.begin() + size, stored.begin() + offset))
          << name << ": bytes [" << offset << ", " << offset + size << ") differ";
      EXPECT_EQ(part[size], 0x5A) << name << ": wrote past the range";
      expected_bytes_read += size;
    }
  }
  EXPECT_EQ(source->bytes_read(), expected_bytes_read);
}

INSTANTIATE_TEST_SUITE_P(Storage, RandomSourceTest, ::testing::Values(DType::kBF16, DType::kF32, DType::kF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

TEST(RandomSource, RefusesAbsentTensorsAndReadsOutside) {
  const ModelPreset preset = testing::small_preset(DType::kBF16);
  auto source = make_random_source(preset.config, DType::kBF16, 7, "random weights of preset tiny");
  EXPECT_FALSE(source->contains("model.layers.99.mlp.gate.weight"));
  expect_error([&] { source->info("model.layers.99.mlp.gate.weight"); }, ErrorCode::kInvalidCheckpoint,
               {"model.layers.99.mlp.gate.weight", "random weights of preset tiny"});
  const std::string name = "model.norm.weight";
  const uint64_t bytes = source->info(name).num_bytes();
  EXPECT_EQ(bytes, uint64_t(preset.config.hidden_size) * 2);
  EXPECT_EQ(source->location_of(name), "random weights of preset tiny");
  uint8_t sink[256];
  expect_error([&] { source->read(name, bytes - 1, 2, sink); }, ErrorCode::kInvalidArgument, {name});
  expect_error([&] { source->read(name, ~uint64_t{0}, 2, sink); }, ErrorCode::kInvalidArgument, {name});
}

TEST(RandomValues, RangeEqualsSliceOfWholeTensor) {
  const uint64_t seed = testing::fresh_seed();
  SCOPED_TRACE("seed " + std::to_string(seed));
  const std::vector<int64_t> shape = {3, 1000, 700};  // over 2^20 elements: the whole draw is threaded
  const std::vector<float> whole = random_tensor_values("w", shape, RandomInit::kLinear, seed);
  std::mt19937_64 random(seed);
  for (int trial = 0; trial < 20; ++trial) {
    const uint64_t first = random() % whole.size();
    const size_t count = 1 + random() % std::min<uint64_t>(whole.size() - first, 100000);
    std::vector<float> part(count);
    random_tensor_values_range("w", shape, RandomInit::kLinear, seed, first, count, part.data());
    ASSERT_TRUE(std::equal(part.begin(), part.end(), whole.begin() + first)) << "range at " << first;
  }
}

TEST(CheckpointSource, ReadsExactRangesFromManyThreads) {
  testing::TempDir temp;
  const uint64_t seed = testing::make_small_model(testing::small_preset(DType::kBF16), temp / "m");
  SCOPED_TRACE("seed " + std::to_string(seed));
  Checkpoint checkpoint = Checkpoint::open(temp / "m");
  auto source = open_checkpoint_source(temp / "m");
  const std::vector<std::string> names = checkpoint.tensor_names();
  std::vector<std::vector<uint8_t>> stored;
  for (const std::string& name : names) {
    EXPECT_EQ(source->info(name).shape, checkpoint.info(name).shape);
    stored.push_back(stored_bytes(checkpoint, name));
  }
  EXPECT_EQ(source->bytes_read(), 0u);
  EXPECT_EQ(source->location_of(names[0]),
            "shard " + *checkpoint.shard_of(names[0]) + " in " + (temp / "m").string());

  constexpr int kThreads = 4, kReadsPerThread = 300;
  std::vector<uint64_t> bytes_by_thread(kThreads, 0);
  std::vector<std::string> failures(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      std::mt19937_64 random(seed + t);
      for (int i = 0; i < kReadsPerThread && failures[t].empty(); ++i) {
        const size_t index = random() % names.size();
        const std::vector<uint8_t>& expected = stored[index];
        const uint64_t offset = random() % expected.size();
        const uint64_t size = 1 + random() % (expected.size() - offset);
        std::vector<uint8_t> got(size);
        source->read(names[index], offset, size, got.data());
        if (!std::equal(got.begin(), got.end(), expected.begin() + offset))
          failures[t] =
              names[index] + " bytes [" + std::to_string(offset) + ", +" + std::to_string(size) + ")";
        bytes_by_thread[t] += size;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  uint64_t total = 0;
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(failures[t], "") << "thread " << t << " read wrong bytes";
    total += bytes_by_thread[t];
  }
  EXPECT_EQ(source->bytes_read(), total);
}

TEST(CheckpointSource, RefusesAbsentTensorsReadsBeforeInfoAndOutside) {
  testing::TempDir temp;
  testing::make_small_model(testing::small_preset(DType::kBF16), temp / "m");
  auto source = open_checkpoint_source(temp / "m");
  const std::string name = "model.layers.0.self_attn.q_proj.weight";
  EXPECT_TRUE(source->contains(name));
  EXPECT_FALSE(source->contains("model.layers.9.self_attn.q_proj.weight"));
  expect_error([&] { source->info("model.layers.9.self_attn.q_proj.weight"); }, ErrorCode::kInvalidCheckpoint,
               {"model.layers.9.self_attn.q_proj.weight", (temp / "m").string()});
  uint8_t sink[16];
  expect_error([&] { source->read(name, 0, 2, sink); }, ErrorCode::kInvalidArgument, {name, "info()"});
  const uint64_t bytes = source->info(name).num_bytes();
  expect_error([&] { source->read(name, bytes, 1, sink); }, ErrorCode::kInvalidArgument, {name});
  expect_error([&] { source->read(name, 1, ~uint64_t{0}, sink); }, ErrorCode::kInvalidArgument, {name});
  EXPECT_EQ(source->bytes_read(), 0u);
}

}  // namespace
}  // namespace epic
