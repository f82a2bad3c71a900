// The weight loader: every tensor of a make-model checkpoint, stacked at offsets in one
// destination, loads to exactly the bytes of Checkpoint::read_f32 (rounded to bf16 for bf16
// destinations), for every storage dtype, with several threads and chunks that split tensors
// anywhere, on host memory and on a fake device whose copies run only at synchronize(). Bytes
// between the tensors stay untouched. Non-finite weights, wrong shapes, absent tensors and
// destinations too small are refused with messages that name them.
#include "worker/weight_loader.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <thread>

#include "tests/checkpoint/host_memory_backend.h"
#include "tests/checkpoint/rewrite_tensor.h"
#include "tests/checkpoint/small_model.h"
#include "tests/checkpoint/test_files.h"

namespace epic {
namespace {

using testing::expect_error;
using testing::HostMemoryBackend;

constexpr uint8_t kUntouched = 0xA5;  // fills the destination first; gaps must keep it
constexpr size_t kGapElements = 3;    // between stacked tensors

// Every tensor of a checkpoint as loads into one destination tensor, in name order, kGapElements apart.
struct StackedLoads {
  OwnedTensor destination;
  std::vector<TensorLoad> loads;
  std::vector<std::vector<uint8_t>> expected;  // each load's destination bytes
};

std::vector<uint8_t> expected_bytes(const std::vector<float>& values, ScalarType type) {
  std::vector<uint8_t> bytes(values.size() * scalar_size(type));
  if (type == ScalarType::kF32) {
    std::memcpy(bytes.data(), values.data(), bytes.size());
  } else {
    for (size_t i = 0; i < values.size(); ++i) {
      const uint16_t half = f32_to_bf16(values[i]);
      std::memcpy(bytes.data() + 2 * i, &half, 2);
    }
  }
  return bytes;
}

StackedLoads stack_all_tensors(const std::filesystem::path& model_dir, Backend& backend, ScalarType type) {
  Checkpoint checkpoint = Checkpoint::open(model_dir);
  StackedLoads stacked;
  const size_t gap_bytes = kGapElements * scalar_size(type);
  size_t offset = gap_bytes;
  std::vector<size_t> offsets;
  for (const std::string& name : checkpoint.tensor_names()) {
    const std::vector<int64_t> shape = checkpoint.info(name).shape;
    stacked.expected.push_back(
        expected_bytes(checkpoint.read_f32(name, shape, NonFiniteWeights::kAllow), type));
    stacked.loads.push_back(TensorLoad{name, shape, Tensor(), 0});
    offsets.push_back(offset);
    offset += stacked.expected.back().size() + gap_bytes;
  }
  stacked.destination = backend.new_tensor(ScalarType::kU8, {static_cast<int64_t>(offset)});
  std::memset(stacked.destination.view().data, kUntouched, offset);
  // The loads see the bytes as a flat tensor of the destination type.
  const Tensor typed(stacked.destination.view().data, type, backend.memory_space(),
                     {static_cast<int64_t>(offset / scalar_size(type))});
  for (size_t i = 0; i < stacked.loads.size(); ++i) {
    stacked.loads[i].dst = typed;
    stacked.loads[i].dst_offset = offsets[i];
  }
  return stacked;
}

// Checks every byte: each tensor's range holds the expected bytes, every gap kUntouched.
void expect_loaded(const StackedLoads& stacked) {
  const auto* bytes = static_cast<const uint8_t*>(stacked.destination.view().data);
  size_t end_of_previous = 0;
  for (size_t i = 0; i < stacked.loads.size(); ++i) {
    const size_t begin = stacked.loads[i].dst_offset;
    for (size_t b = end_of_previous; b < begin; ++b)
      ASSERT_EQ(bytes[b], kUntouched)
          << "gap byte " << b << " before " << stacked.loads[i].name << " was written";
    const std::vector<uint8_t>& expected = stacked.expected[i];
    for (size_t b = 0; b < expected.size(); ++b)
      ASSERT_EQ(bytes[begin + b], expected[b])
          << stacked.loads[i].name << " byte " << b << " of " << expected.size();
    end_of_previous = begin + expected.size();
  }
  for (size_t b = end_of_previous; b < stacked.destination.bytes(); ++b)
    ASSERT_EQ(bytes[b], kUntouched) << "trailing byte " << b << " was written";
}

struct LoadCase {
  DType storage;
  ScalarType destination;
  MemorySpace space;
  int num_threads;
  size_t chunk_bytes;
};

std::string case_name(const LoadCase& c) {
  return std::string(dtype_name(c.storage)) + "_to_" + scalar_name(c.destination) + "_" +
         (c.space == MemorySpace::kHost ? "host" : "fakedevice") + "_" + std::to_string(c.num_threads) +
         "threads_chunk" + std::to_string(c.chunk_bytes);
}

class WeightLoaderTest : public ::testing::TestWithParam<LoadCase> {};

TEST_P(WeightLoaderTest, LoadsExactBytesOfEveryTensor) {
  const LoadCase& c = GetParam();
  testing::TempDir temp;
  const uint64_t seed = testing::make_small_model(testing::small_preset(c.storage), temp / "m");
  SCOPED_TRACE("seed " + std::to_string(seed));
  HostMemoryBackend backend(c.space);
  StackedLoads stacked = stack_all_tensors(temp / "m", backend, c.destination);
  auto source = open_checkpoint_source(temp / "m");
  WeightLoadOptions options;
  options.num_threads = c.num_threads;
  options.chunk_bytes = c.chunk_bytes;
  const WeightLoadStats stats = load_tensors(*source, backend, stacked.loads, options);
  expect_loaded(stacked);

  uint64_t source_bytes = 0, destination_bytes = 0;
  for (size_t i = 0; i < stacked.loads.size(); ++i) {
    source_bytes += source->info(stacked.loads[i].name).num_bytes();
    destination_bytes += stacked.expected[i].size();
  }
  EXPECT_EQ(stats.bytes_read, source_bytes);
  EXPECT_EQ(source->bytes_read(), source_bytes);
  EXPECT_EQ(stats.bytes_written, destination_bytes);
  EXPECT_GT(stats.seconds, 0.0);
  if (c.space == MemorySpace::kDevice) {
    EXPECT_EQ(backend.num_pending_copies(), 0u) << "load_tensors returned before its copies ran";
    EXPECT_EQ(backend.callers(), std::set<std::thread::id>{std::this_thread::get_id()})
        << "only the calling thread may use the backend";
    EXPECT_GT(backend.num_staging_buffers(), 0);
  } else {
    EXPECT_TRUE(backend.callers().empty()) << "host memory is written directly, without staging";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, WeightLoaderTest,
    ::testing::Values(LoadCase{DType::kBF16, ScalarType::kBF16, MemorySpace::kHost, 3, 100},
                      LoadCase{DType::kBF16, ScalarType::kF32, MemorySpace::kHost, 3, 98},
                      LoadCase{DType::kF32, ScalarType::kF32, MemorySpace::kHost, 4, 4 << 10},
                      LoadCase{DType::kF32, ScalarType::kBF16, MemorySpace::kHost, 2, 36},
                      LoadCase{DType::kF16, ScalarType::kF32, MemorySpace::kHost, 3, 1000},
                      LoadCase{DType::kF16, ScalarType::kBF16, MemorySpace::kHost, 3, 1000},
                      LoadCase{DType::kBF16, ScalarType::kBF16, MemorySpace::kHost, 0, size_t{16} << 20},
                      LoadCase{DType::kBF16, ScalarType::kBF16, MemorySpace::kDevice, 3, 100},
                      LoadCase{DType::kBF16, ScalarType::kF32, MemorySpace::kDevice, 3, 2 << 10},
                      LoadCase{DType::kF32, ScalarType::kBF16, MemorySpace::kDevice, 4, 36},
                      LoadCase{DType::kF32, ScalarType::kF32, MemorySpace::kDevice, 1, 1000},
                      LoadCase{DType::kF16, ScalarType::kBF16, MemorySpace::kDevice, 2, 1 << 20}),
    [](const auto& info) { return case_name(info.param); });

// The random source loads exactly as the checkpoint make-model writes from it.
TEST(WeightLoader, RandomSourceLoadsAsItsCheckpoint) {
  testing::TempDir temp;
  const ModelPreset preset = testing::small_preset(DType::kBF16);
  const uint64_t seed = testing::make_small_model(preset, temp / "m");
  SCOPED_TRACE("seed " + std::to_string(seed));
  HostMemoryBackend backend(MemorySpace::kDevice);
  StackedLoads stacked = stack_all_tensors(temp / "m", backend, ScalarType::kF32);
  auto source = make_random_source(preset.config, preset.storage, seed, "random weights of preset tiny");
  WeightLoadOptions options;
  options.num_threads = 3;
  options.chunk_bytes = 300;
  load_tensors(*source, backend, stacked.loads, options);
  expect_loaded(stacked);
}

class NonFiniteTest : public ::testing::TestWithParam<MemorySpace> {};

TEST_P(NonFiniteTest, NamesTensorLocationAndElement) {
  testing::TempDir temp;
  const uint64_t seed = testing::make_small_model(testing::small_preset(DType::kBF16), temp / "m");
  SCOPED_TRACE("seed " + std::to_string(seed));
  const std::string bad_tensor = "model.layers.2.mlp.experts.5.up_proj.weight";
  const size_t bad_element = 1000 + seed % 1000;
  testing::copy_with_edited_tensor(temp / "m", temp / "nan", bad_tensor, [&](std::vector<float>& values) {
    values[bad_element] = std::numeric_limits<float>::quiet_NaN();
  });
  const std::string shard = *Checkpoint::open(temp / "nan").shard_of(bad_tensor);
  HostMemoryBackend backend(GetParam());
  for (ScalarType type : {ScalarType::kBF16, ScalarType::kF32}) {
    StackedLoads stacked = stack_all_tensors(temp / "nan", backend, type);
    auto source = open_checkpoint_source(temp / "nan");
    WeightLoadOptions options;
    options.num_threads = 3;
    options.chunk_bytes = 256;  // the NaN is found by a worker thread, mid-tensor
    expect_error([&] { load_tensors(*source, backend, stacked.loads, options); },
                 ErrorCode::kInvalidCheckpoint,
                 {"'" + bad_tensor + "'", shard, "element " + std::to_string(bad_element) + " ", "NaN",
                  "--allow-nonfinite-weights"});
    EXPECT_EQ(backend.num_pending_copies(), 0u) << "copies left pending on the error path";

    options.allow_nonfinite_weights = true;
    source = open_checkpoint_source(temp / "nan");
    load_tensors(*source, backend, stacked.loads, options);
    expect_loaded(stacked);  // the NaN is among the expected bytes (read_f32 with kAllow)
  }
}

INSTANTIATE_TEST_SUITE_P(Spaces, NonFiniteTest, ::testing::Values(MemorySpace::kHost, MemorySpace::kDevice),
                         [](const auto& info) {
                           return info.param == MemorySpace::kHost ? "host" : "fakedevice";
                         });

TEST(WeightLoader, F32BeyondBf16RangeIsRefusedAsInf) {
  testing::TempDir temp;
  testing::make_small_model(testing::small_preset(DType::kF32), temp / "m");
  const std::string name = "model.norm.weight";
  testing::copy_with_edited_tensor(temp / "m", temp / "big", name, [](std::vector<float>& values) {
    values[3] = -3.4e38f;  // finite in f32, past the largest bf16 (about 3.39e38)
  });
  HostMemoryBackend backend;
  const ModelPreset preset = testing::small_preset(DType::kF32);
  OwnedTensor norm = backend.new_tensor(ScalarType::kBF16, {preset.config.hidden_size});
  auto source = open_checkpoint_source(temp / "big");
  expect_error(
      [&] {
        load_tensors(*source, backend, {{name, {preset.config.hidden_size}, norm, 0}}, {});
      },
      ErrorCode::kInvalidCheckpoint, {name, "element 3 ", "rounds to Inf in bf16"});
  OwnedTensor norm_f32 = backend.new_tensor(ScalarType::kF32, {preset.config.hidden_size});
  load_tensors(*source, backend, {{name, {preset.config.hidden_size}, norm_f32, 0}}, {});
  EXPECT_EQ(norm_f32.view().as<float>()[3], -3.4e38f);
}

TEST(WeightLoader, RefusesWrongShapeAbsentTensorAndSmallDestination) {
  testing::TempDir temp;
  const ModelPreset preset = testing::small_preset(DType::kBF16);
  testing::make_small_model(preset, temp / "m");
  const std::string shard = *Checkpoint::open(temp / "m").shard_of("model.layers.0.self_attn.k_proj.weight");
  HostMemoryBackend backend;
  auto source = open_checkpoint_source(temp / "m");
  const int64_t h = preset.config.hidden_size,
                kv = preset.config.num_key_value_heads * preset.config.head_dim;
  OwnedTensor k_proj = backend.new_tensor(ScalarType::kBF16, {kv, h});
  const std::string name = "model.layers.0.self_attn.k_proj.weight";

  expect_error(
      [&] {
        load_tensors(*source, backend, {{name, {h, kv}, k_proj, 0}}, {});
      },
      ErrorCode::kInvalidCheckpoint,
      {name, shard, shape_to_string({kv, h}), shape_to_string({h, kv}), "BF16"});
  expect_error(
      [&] {
        load_tensors(*source, backend, {{"model.layers.0.self_attn.x_proj.weight", {kv, h}, k_proj, 0}}, {});
      },
      ErrorCode::kInvalidCheckpoint, {"model.layers.0.self_attn.x_proj.weight", (temp / "m").string()});
  // One element too far, an offset inside an element, and a destination of the wrong type.
  expect_error(
      [&] {
        load_tensors(*source, backend, {{name, {kv, h}, k_proj, 2}}, {});
      },
      ErrorCode::kInvalidArgument, {name, "offset 2"});
  OwnedTensor wide = backend.new_tensor(ScalarType::kBF16, {kv + 1, h});
  expect_error(
      [&] {
        load_tensors(*source, backend, {{name, {kv, h}, wide, 1}}, {});
      },
      ErrorCode::kInvalidArgument, {name, "offset 1", "multiple of 2"});
  OwnedTensor ids = backend.new_tensor(ScalarType::kI32, {kv, h});
  expect_error(
      [&] {
        load_tensors(*source, backend, {{name, {kv, h}, ids, 0}}, {});
      },
      ErrorCode::kInvalidArgument, {name, "i32"});
  // Validation comes before any read: nothing was read by the refused loads.
  EXPECT_EQ(source->bytes_read(), 0u);
  // A valid load after all that still works, into the exact-size tensor.
  load_tensors(*source, backend, {{name, {kv, h}, k_proj, 0}}, {});
  EXPECT_EQ(source->bytes_read(), k_proj.bytes());
}

}  // namespace
}  // namespace epic
