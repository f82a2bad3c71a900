// SafetensorsFile / SafetensorsWriter: one test per header validation error (written as raw
// bytes), then round trips of random F32/F16/BF16 data and exact byte counting.
#include "worker/safetensors.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>

#include "tests/checkpoint/test_files.h"

namespace epic {
namespace {

using testing::expect_error;
using testing::safetensors_bytes;
using testing::TempDir;
using testing::write_bytes;

constexpr ErrorCode kBad = ErrorCode::kInvalidCheckpoint;

// Writes `bytes` as a file named `name` in dir and expects open() to fail with kInvalidCheckpoint and
// a message naming the file and containing every word.
void expect_open_fails(const TempDir& dir, const std::string& name, const std::string& bytes,
                       std::initializer_list<std::string> words) {
  write_bytes(dir / name, bytes);
  std::vector<std::string> all_words(words);
  all_words.push_back(name);
  try {
    SafetensorsFile::open(dir / name);
    ADD_FAILURE() << "open(" << name << ") succeeded but should have failed";
  } catch (const Error& error) {
    const std::string message = error.what();
    EXPECT_EQ(kBad, error.code()) << message;
    for (const std::string& word : all_words) {
      EXPECT_NE(std::string::npos, message.find(word)) << "message lacks '" << word << "': " << message;
    }
  }
}

// 2 F32 elements: the smallest valid tensor used by the corrupt-file cases.
const std::string kEightBytes(8, '\x01');

TEST(SafetensorsOpen, FileShorterThanEightBytesIsTruncated) {
  TempDir dir;
  expect_open_fails(dir, "short.safetensors", std::string("\x05\0\0", 3), {"truncated", "3 bytes", "8-byte"});
  expect_open_fails(dir, "empty.safetensors", "", {"truncated", "0 bytes"});
}

TEST(SafetensorsOpen, HeaderLengthPastEndOfFile) {
  TempDir dir;
  expect_open_fails(dir, "long_header.safetensors", testing::le_u64(1000) + "{}",
                    {"header length", "1000", "past the end of the file", "10 bytes"});
  // A length near 2^64 must neither overflow the bounds check nor be allocated.
  expect_open_fails(dir, "huge_header.safetensors", testing::le_u64(~0ull) + "{}",
                    {"past the end of the file"});
}

TEST(SafetensorsOpen, HeaderLengthOverLimitIsRejectedBeforeAllocating) {
  TempDir dir;
  // A sparse file big enough that the length is inside it, so only the size cap can reject it.
  const uint64_t header_length = 200ull * 1000 * 1000;
  const auto path = dir / "giant_header.safetensors";
  write_bytes(path, testing::le_u64(header_length));
  std::filesystem::resize_file(path, 8 + header_length);
  expect_error([&] { SafetensorsFile::open(path); }, kBad,
               {"giant_header.safetensors", "200000000", "limit"});
}

TEST(SafetensorsOpen, HeaderNotJson) {
  TempDir dir;
  expect_open_fails(dir, "not_json.safetensors", safetensors_bytes("{\"w\": {\"dtype\": ", ""),
                    {"not valid JSON"});
}

TEST(SafetensorsOpen, HeaderNotAnObject) {
  TempDir dir;
  expect_open_fails(dir, "array.safetensors", safetensors_bytes("[1, 2, 3]", ""),
                    {"array", "must be an object"});
}

TEST(SafetensorsOpen, HeaderNestedTooDeeply) {
  TempDir dir;
  const std::string deep = "{\"w\":" + std::string(100000, '[') + std::string(100000, ']') + "}";
  expect_open_fails(dir, "deep.safetensors", safetensors_bytes(deep, ""), {"nests deeper"});
}

TEST(SafetensorsOpen, EntryMissingDtype) {
  TempDir dir;
  expect_open_fails(dir, "no_dtype.safetensors",
                    safetensors_bytes(R"({"layer.w":{"shape":[2],"data_offsets":[0,8]}})", kEightBytes),
                    {"'layer.w'", "\"dtype\""});
}

TEST(SafetensorsOpen, EntryMissingShape) {
  TempDir dir;
  expect_open_fails(dir, "no_shape.safetensors",
                    safetensors_bytes(R"({"layer.w":{"dtype":"F32","data_offsets":[0,8]}})", kEightBytes),
                    {"'layer.w'", "\"shape\""});
}

TEST(SafetensorsOpen, EntryMissingDataOffsets) {
  TempDir dir;
  expect_open_fails(dir, "no_offsets.safetensors",
                    safetensors_bytes(R"({"layer.w":{"dtype":"F32","shape":[2]}})", kEightBytes),
                    {"'layer.w'", "\"data_offsets\""});
}

TEST(SafetensorsOpen, EntryNotAnObject) {
  TempDir dir;
  expect_open_fails(dir, "entry_number.safetensors", safetensors_bytes(R"({"layer.w": 7})", ""),
                    {"'layer.w'", "must be an object"});
}

TEST(SafetensorsOpen, UnknownDtype) {
  TempDir dir;
  expect_open_fails(
      dir, "f4.safetensors",
      safetensors_bytes(R"({"layer.w":{"dtype":"F4","shape":[2],"data_offsets":[0,8]}})", kEightBytes),
      {"'layer.w'", "unknown dtype", "'F4'"});
}

TEST(SafetensorsOpen, NegativeDimension) {
  TempDir dir;
  expect_open_fails(
      dir, "negative.safetensors",
      safetensors_bytes(R"({"layer.w":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,8]}})", kEightBytes),
      {"'layer.w'", "negative dimension", "-1"});
}

TEST(SafetensorsOpen, NonIntegerDimension) {
  TempDir dir;
  expect_open_fails(
      dir, "float_dim.safetensors",
      safetensors_bytes(R"({"layer.w":{"dtype":"F32","shape":[2.5],"data_offsets":[0,8]}})", kEightBytes),
      {"'layer.w'", "non-negative integers"});
}

TEST(SafetensorsOpen, DataOffsetsNotTwoNonDecreasingIntegers) {
  TempDir dir;
  const char* bad_offsets[] = {"[0]", "[0,8,16]", "[0,\"8\"]", "[8,0]", "[-1,8]", "[0.0,8]", "{\"a\":0}"};
  int case_number = 0;
  for (const char* offsets : bad_offsets) {
    SCOPED_TRACE(offsets);
    const std::string header =
        std::string(R"({"layer.w":{"dtype":"F32","shape":[2],"data_offsets":)") + offsets + "}}";
    expect_open_fails(dir, "offsets" + std::to_string(case_number++) + ".safetensors",
                      safetensors_bytes(header, kEightBytes), {"'layer.w'", "data_offsets", "begin <= end"});
  }
}

TEST(SafetensorsOpen, DataEndPastEndOfFileIsTruncated) {
  TempDir dir;
  // 4 F32 elements = 16 bytes promised, 8 present.
  expect_open_fails(
      dir, "cut.safetensors",
      safetensors_bytes(R"({"layer.w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}})", kEightBytes),
      {"'layer.w'", "[0, 16]", "past the data section", "8 bytes", "truncated"});
}

TEST(SafetensorsOpen, ByteLengthNotElementCountTimesDtypeSize) {
  TempDir dir;
  // [2, 3] of BF16 needs 12 bytes; the offsets span 8.
  expect_open_fails(dir, "mismatch.safetensors",
                    safetensors_bytes(R"({"layer.w":{"dtype":"BF16","shape":[2,3],"data_offsets":[0,8]}})",
                                      std::string(16, '\0')),
                    {"'layer.w'", "8 bytes", "[2, 3]", "BF16", "needs 12 bytes"});
}

TEST(SafetensorsOpen, ElementCountOverflowIsAMismatchNotACrash) {
  TempDir dir;
  expect_open_fails(
      dir, "overflow.safetensors",
      safetensors_bytes(
          R"({"layer.w":{"dtype":"F64","shape":[4294967296,4294967296,16],"data_offsets":[0,8]}})",
          kEightBytes),
      {"'layer.w'", "which no file holds"});
}

TEST(SafetensorsOpen, ElementCountOverInt64IsRejectedEvenWhenAZeroDimFollows) {
  TempDir dir;
  // 3 x 2^62 fits uint64 but not int64: TensorInfo::num_elements() would overflow before the 0.
  expect_open_fails(
      dir, "int64_overflow.safetensors",
      safetensors_bytes(
          R"({"layer.w":{"dtype":"F32","shape":[3,4611686018427387904,0],"data_offsets":[0,0]}})", ""),
      {"'layer.w'", "which no file holds"});
}

TEST(SafetensorsOpen, OverlappingTensors) {
  TempDir dir;
  expect_open_fails(dir, "overlap.safetensors",
                    safetensors_bytes(R"({"first":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("second":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                                      std::string(16, '\0')),
                    {"'first'", "'second'", "overlap", "[0, 8]", "[4, 12]"});
}

TEST(SafetensorsOpen, OverlapOfEqualRangesAndOfAnEmptyTensorInsideAnother) {
  TempDir dir;
  expect_open_fails(dir, "same_range.safetensors",
                    safetensors_bytes(R"({"first":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("second":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})",
                                      std::string(8, '\0')),
                    {"'first'", "'second'", "overlap"});
  expect_open_fails(dir, "empty_inside.safetensors",
                    safetensors_bytes(R"({"full":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("empty":{"dtype":"F32","shape":[0],"data_offsets":[4,4]}})",
                                      std::string(8, '\0')),
                    {"'full'", "'empty'", "overlap"});
}

// The tensors must tile the data section: 8 + header length + the tensors' bytes is the file length.
TEST(SafetensorsOpen, GapBetweenTensors) {
  TempDir dir;
  expect_open_fails(dir, "gap.safetensors",
                    safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                                      std::string(20, '\0')),
                    {"4 bytes after tensor 'a'", "[0, 8]", "belong to no tensor", "'b'", "[12, 20]"});
}

TEST(SafetensorsOpen, GapBeforeTheFirstTensor) {
  TempDir dir;
  expect_open_fails(
      dir, "leading_gap.safetensors",
      safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})", std::string(12, '\0')),
      {"4 bytes at the start of the data section", "belong to no tensor", "'a'"});
}

TEST(SafetensorsOpen, TrailingBytesAfterTheLastTensor) {
  TempDir dir;
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  expect_open_fails(
      dir, "trailing.safetensors", safetensors_bytes(header, std::string(11, '\0')),
      {"3 trailing bytes", "'a'", "header length field (" + std::to_string(header.size()) + ")"});
  // No tensors at all, yet data after the header.
  expect_open_fails(dir, "only_trailing.safetensors", safetensors_bytes("{}", "xyz"), {"3 trailing bytes"});
}

TEST(SafetensorsOpen, HeaderLengthOneByteShortIsCaught) {
  TempDir dir;
  // The header ends in padding, so one byte less still parses as JSON: every tensor would then
  // start one byte early (garbage weights, NaN logits). The byte left over at the end shows it.
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}} )";
  const std::string data = std::string(8, '\x01');
  write_bytes(dir / "exact.safetensors", safetensors_bytes(header, data));
  EXPECT_NO_THROW(SafetensorsFile::open(dir / "exact.safetensors"));
  expect_open_fails(dir, "short_length.safetensors", testing::le_u64(header.size() - 1) + header + data,
                    {"1 trailing bytes", "header length field (" + std::to_string(header.size() - 1) + ")"});
}

TEST(SafetensorsOpen, HeaderLengthOneByteLongIsCaught) {
  TempDir dir;
  const std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  // The first data byte is a space, so the longer header still parses: the data section is then
  // one byte short of the tensor.
  const std::string data = " " + std::string(7, '\x01');
  expect_open_fails(dir, "long_length.safetensors", testing::le_u64(header.size() + 1) + header + data,
                    {"'a'", "past the data section", "7 bytes", "truncated"});
  // Otherwise the header is not JSON.
  expect_open_fails(dir, "long_length_garbage.safetensors",
                    testing::le_u64(header.size() + 1) + header + std::string(8, '\x01'), {"not valid JSON"});
}

TEST(SafetensorsOpen, FileTruncatedInsideTheData) {
  TempDir dir;
  expect_open_fails(dir, "cut_second.safetensors",
                    safetensors_bytes(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("b":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                      std::string(13, '\0')),
                    {"'b'", "[8, 16]", "past the data section", "13 bytes", "truncated"});
}

TEST(SafetensorsOpen, DuplicateTensorName) {
  TempDir dir;
  expect_open_fails(dir, "duplicate.safetensors",
                    safetensors_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                      R"("w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}})",
                                      std::string(16, '\0')),
                    {"'w'", "twice"});
}

TEST(SafetensorsOpen, MetadataMustMapStringsToStrings) {
  TempDir dir;
  expect_open_fails(dir, "meta_number.safetensors", safetensors_bytes(R"({"__metadata__":{"format":1}})", ""),
                    {"__metadata__", "'format'", "strings"});
  expect_open_fails(dir, "meta_array.safetensors", safetensors_bytes(R"({"__metadata__":["pt"]})", ""),
                    {"__metadata__", "object of string values"});
}

TEST(SafetensorsOpen, MetadataAndAbsoluteOffsets) {
  TempDir dir;
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"dtype":"U8","shape":[3],"data_offsets":[8,11]},)"
      R"("a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"empty":{"dtype":"F16","shape":[0,4],"data_offsets":[8,8]}})";
  write_bytes(dir / "ok.safetensors", safetensors_bytes(header, std::string(11, '\x02')));
  SafetensorsFile file = SafetensorsFile::open(dir / "ok.safetensors");
  EXPECT_EQ((std::map<std::string, std::string>{{"format", "pt"}}), file.metadata());
  ASSERT_EQ(3u, file.tensors().size());
  EXPECT_EQ(nullptr, file.find("__metadata__"));
  EXPECT_EQ(nullptr, file.find("missing"));
  const TensorInfo* a = file.find("a");
  const TensorInfo* b = file.find("b");
  const TensorInfo* empty = file.find("empty");
  ASSERT_TRUE(a && b && empty);
  const uint64_t data_start = 8 + header.size();
  EXPECT_EQ(data_start, a->data_begin);
  EXPECT_EQ(data_start + 8, a->data_end);
  EXPECT_EQ(data_start + 8, b->data_begin);
  EXPECT_EQ(data_start + 11, b->data_end);
  EXPECT_EQ(DType::kU8, b->dtype);
  EXPECT_EQ((std::vector<int64_t>{0, 4}), empty->shape);
  EXPECT_EQ(0, empty->num_elements());
  EXPECT_TRUE(file.read_f32(*empty).empty());
  EXPECT_EQ(0u, file.bytes_read());
}

TEST(SafetensorsOpen, MissingFileIsIo) {
  TempDir dir;
  expect_error([&] { SafetensorsFile::open(dir / "absent.safetensors"); }, ErrorCode::kIo,
               {"absent.safetensors", "cannot open"});
}

TEST(SafetensorsOpen, DirectoryIsRefusedByType) {
  TempDir dir;
  expect_error([&] { SafetensorsFile::open(dir.path()); }, ErrorCode::kInvalidArgument,
               {dir.path().string(), "is a directory", "not a regular file"});
}

TEST(SafetensorsOpen, FifoIsRefusedAtOnceNotRead) {
  TempDir dir;
  const auto fifo = dir / "model.safetensors";
  testing::make_fifo(fifo);
  testing::expect_refused_without_blocking(fifo, [fifo] { SafetensorsFile::open(fifo); },
                                           ErrorCode::kInvalidArgument,
                                           {fifo.string(), "FIFO", "not a regular file"});
}

TEST(SafetensorsOpen, CharacterDeviceIsRefused) {
  expect_error([] { SafetensorsFile::open("/dev/zero"); }, ErrorCode::kInvalidArgument,
               {"/dev/zero", "character device"});
}

TEST(SafetensorsRead, NonFloatDtypeIsRejectedByName) {
  TempDir dir;
  write_bytes(dir / "ints.safetensors",
              safetensors_bytes(R"({"ids":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}})", kEightBytes));
  SafetensorsFile file = SafetensorsFile::open(dir / "ints.safetensors");
  expect_error([&] { file.read_f32(*file.find("ids")); }, kBad, {"ints.safetensors", "'ids'", "I32"});
  EXPECT_EQ(0u, file.bytes_read());
}

TEST(SafetensorsRead, FileTruncatedAfterOpenIsIo) {
  TempDir dir;
  const auto path = dir / "shrinks.safetensors";
  write_bytes(path,
              safetensors_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", kEightBytes));
  SafetensorsFile file = SafetensorsFile::open(path);
  std::filesystem::resize_file(path, std::filesystem::file_size(path) - 4);
  expect_error([&] { file.read_f32(*file.find("w")); }, ErrorCode::kIo,
               {"shrinks.safetensors", "end of file"});
}

TEST(SafetensorsRead, TensorInfoOfAnotherFileIsNotReadOutOfBounds) {
  TempDir dir;
  write_bytes(dir / "small.safetensors",
              safetensors_bytes(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", kEightBytes));
  SafetensorsFile file = SafetensorsFile::open(dir / "small.safetensors");
  TensorInfo foreign = *file.find("w");
  foreign.data_end += 1 << 20;
  std::vector<uint8_t> buffer(foreign.num_bytes());
  expect_error([&] { file.read_raw(foreign, buffer.data()); }, ErrorCode::kInvalidArgument,
               {"small.safetensors", "'w'"});
}

// Values spread over many binades so f16 sees subnormals, overflow to Inf and plain rounding.
std::vector<float> random_values(std::mt19937& rng, size_t count) {
  std::normal_distribution<float> mantissa(0.0f, 1.0f);
  std::uniform_int_distribution<int> exponent(-30, 20);
  std::vector<float> values(count);
  for (float& value : values) value = std::ldexp(mantissa(rng), exponent(rng));
  return values;
}

std::vector<float> stored_as(DType dtype, const std::vector<float>& values) {
  std::vector<float> result(values);
  for (float& value : result) {
    if (dtype == DType::kBF16) value = bf16_to_f32(f32_to_bf16(value));
    if (dtype == DType::kF16) value = f16_to_f32(f32_to_f16(value));
  }
  return result;
}

// Bitwise equality, so -0.0 vs 0.0 and any rounding difference fail.
void expect_bitwise_equal(const std::vector<float>& expected, const std::vector<float>& actual) {
  ASSERT_EQ(expected.size(), actual.size());
  size_t num_wrong = 0;
  for (size_t i = 0; i < expected.size(); ++i) {
    if (std::bit_cast<uint32_t>(expected[i]) != std::bit_cast<uint32_t>(actual[i]) && num_wrong++ < 5) {
      ADD_FAILURE() << "element " << i << ": expected " << expected[i] << " got " << actual[i];
    }
  }
  EXPECT_EQ(0u, num_wrong);
}

TEST(SafetensorsRoundTrip, RandomF32F16Bf16ReadBackExactly) {
  const unsigned seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  std::mt19937 rng(seed);
  TempDir dir;
  SafetensorsWriter writer;
  struct Case {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<float> values;
  };
  std::vector<Case> cases = {
      {"model.embed.weight", DType::kF32, {7, 13}, {}}, {"layers.0.w_gate", DType::kBF16, {16, 33}, {}},
      {"layers.0.w_up", DType::kF16, {5, 3, 11}, {}},   {"layers.0.norm", DType::kF32, {1}, {}},
      {"layers.1.w_gate", DType::kBF16, {129}, {}},     {"layers.1.w_down", DType::kF16, {64, 64}, {}},
  };
  for (Case& c : cases) {
    int64_t count = 1;
    for (int64_t dim : c.shape) count *= dim;
    c.values = random_values(rng, static_cast<size_t>(count));
    writer.add_f32(c.name, c.dtype, c.shape, c.values);
  }
  writer.add("token_ids", DType::kI64, {2}, std::vector<uint8_t>(16, 0x7));
  writer.set_metadata("format", "pt");
  EXPECT_EQ(cases.size() + 1, writer.num_tensors());
  const auto path = dir / "round_trip.safetensors";
  writer.write(path);

  SafetensorsFile file = SafetensorsFile::open(path);
  EXPECT_EQ("pt", file.metadata().at("format"));
  ASSERT_EQ(cases.size() + 1, file.tensors().size());
  uint64_t expected_bytes_read = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(c.name);
    const TensorInfo* info = file.find(c.name);
    ASSERT_NE(nullptr, info);
    EXPECT_EQ(c.dtype, info->dtype);
    EXPECT_EQ(c.shape, info->shape);
    EXPECT_EQ(c.values.size() * dtype_size(c.dtype), info->num_bytes());
    // f16 overflows to Inf for the largest values: allowed here, this test is about exact bits.
    expect_bitwise_equal(stored_as(c.dtype, c.values), file.read_f32(*info, NonFiniteWeights::kAllow));
    expected_bytes_read += info->num_bytes();
    EXPECT_EQ(expected_bytes_read, file.bytes_read());
  }
  std::vector<uint8_t> raw(16);
  file.read_raw(*file.find("token_ids"), raw.data());
  EXPECT_EQ(std::vector<uint8_t>(16, 0x7), raw);
}

TEST(SafetensorsRoundTrip, DataInOrderAddedAndHeaderPaddedWithSpaces) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add("zeta", DType::kU8, {3}, {1, 2, 3});
  writer.add("alpha", DType::kU8, {2}, {4, 5});
  writer.add("scalar", DType::kF32, {}, {0, 0, 0x80, 0x3F});  // 1.0f
  EXPECT_EQ(9u, writer.data_bytes());
  EXPECT_EQ((std::vector<std::string>{"zeta", "alpha", "scalar"}), writer.names());
  const auto path = dir / "ordered.safetensors";
  writer.write(path);

  std::ifstream stream(path, std::ios::binary);
  const std::string bytes((std::istreambuf_iterator<char>(stream)), std::istreambuf_iterator<char>());
  ASSERT_GE(bytes.size(), 8u);
  uint64_t header_length = 0;
  for (int i = 7; i >= 0; --i) header_length = (header_length << 8) | static_cast<uint8_t>(bytes[i]);
  EXPECT_EQ(0u, header_length % 8);
  ASSERT_EQ(8 + header_length + 9, bytes.size());
  const std::string header = bytes.substr(8, header_length);
  const size_t last_brace = header.rfind('}');
  EXPECT_EQ(std::string(header_length - last_brace - 1, ' '), header.substr(last_brace + 1));
  const auto json = nlohmann::json::parse(header);
  EXPECT_FALSE(json.contains("__metadata__"));
  EXPECT_EQ((std::vector<uint64_t>{0, 3}), json["zeta"]["data_offsets"].get<std::vector<uint64_t>>());
  EXPECT_EQ((std::vector<uint64_t>{3, 5}), json["alpha"]["data_offsets"].get<std::vector<uint64_t>>());
  EXPECT_EQ(std::string("\x01\x02\x03\x04\x05", 5), bytes.substr(8 + header_length, 5));

  SafetensorsFile file = SafetensorsFile::open(path);
  EXPECT_TRUE(file.find("scalar")->shape.empty());
  EXPECT_EQ(1, file.find("scalar")->num_elements());
  EXPECT_EQ(std::vector<float>{1.0f}, file.read_f32(*file.find("scalar")));
  // No temp file is left beside the result.
  EXPECT_EQ(1, std::distance(std::filesystem::directory_iterator(dir.path()),
                             std::filesystem::directory_iterator()));
}

TEST(SafetensorsRoundTrip, ReadingOneTensorCountsOnlyItsBytesAndCopiesShareTheCount) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add_f32("expert.0", DType::kBF16, {4, 8}, std::vector<float>(32, 1.0f));
  writer.add_f32("expert.1", DType::kF32, {1000}, std::vector<float>(1000, 2.0f));
  writer.add_f32("expert.2", DType::kF16, {3}, {1.0f, 2.0f, 3.0f});
  writer.write(dir / "experts.safetensors");
  SafetensorsFile file = SafetensorsFile::open(dir / "experts.safetensors");
  EXPECT_EQ(0u, file.bytes_read());  // opening reads the header only, which is not tensor data
  EXPECT_EQ(std::vector<float>({1.0f, 2.0f, 3.0f}), file.read_f32(*file.find("expert.2")));
  EXPECT_EQ(6u, file.bytes_read());
  SafetensorsFile copy = file;
  copy.read_f32(*copy.find("expert.0"));
  EXPECT_EQ(6u + 64u, file.bytes_read());
  EXPECT_EQ(file.bytes_read(), copy.bytes_read());
}

// Tensors larger than the read chunk (2^18 elements) are read in pieces: every piece lands in place.
TEST(SafetensorsRoundTrip, TensorsSpanningSeveralReadChunksReadBackExactly) {
  TempDir dir;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> values(3 * (1 << 18) + 7);
  for (float& value : values) value = normal(rng);
  SafetensorsWriter writer;
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16})
    writer.add_f32(dtype_name(dtype), dtype, {static_cast<int64_t>(values.size())}, values);
  writer.write(dir / "big.safetensors");
  SafetensorsFile file = SafetensorsFile::open(dir / "big.safetensors");
  for (DType dtype : {DType::kF32, DType::kBF16, DType::kF16}) {
    SCOPED_TRACE(dtype_name(dtype));
    expect_bitwise_equal(stored_as(dtype, values), file.read_f32(*file.find(dtype_name(dtype))));
  }
  EXPECT_EQ(values.size() * 8, file.bytes_read());
}

// One non-finite value in each storage dtype, placed past the first read chunk so the reported
// index is the tensor's, not the chunk's.
TEST(SafetensorsRead, NonFiniteWeightIsRefusedNamingTensorFileIndexAndKind) {
  TempDir dir;
  const size_t count = (1 << 18) + 100, bad_index = (1 << 18) + 42;
  struct Case {
    DType dtype;
    float bad_value;
    const char* kind;
  };
  const Case cases[] = {{DType::kF32, std::numeric_limits<float>::quiet_NaN(), "is NaN"},
                        {DType::kBF16, std::numeric_limits<float>::infinity(), "is +Inf"},
                        {DType::kF16, -std::numeric_limits<float>::infinity(), "is -Inf"},
                        {DType::kF16, 1e6f, "is +Inf"}};  // finite in f32, Inf once stored as f16
  SafetensorsWriter writer;
  std::vector<std::vector<float>> all_values;
  for (size_t i = 0; i < std::size(cases); ++i) {
    std::vector<float> values(count, 0.25f);
    values[bad_index] = cases[i].bad_value;
    values[bad_index + 1] = std::numeric_limits<float>::quiet_NaN();  // only the first is named
    writer.add_f32("layers.0.w" + std::to_string(i), cases[i].dtype, {static_cast<int64_t>(count)}, values);
    all_values.push_back(values);
  }
  writer.write(dir / "nonfinite.safetensors");
  SafetensorsFile file = SafetensorsFile::open(dir / "nonfinite.safetensors");
  for (size_t i = 0; i < std::size(cases); ++i) {
    SCOPED_TRACE(dtype_name(cases[i].dtype));
    const TensorInfo& tensor = *file.find("layers.0.w" + std::to_string(i));
    expect_error([&] { file.read_f32(tensor); }, kBad,
                 {"'layers.0.w" + std::to_string(i) + "'", "nonfinite.safetensors",
                  "element " + std::to_string(bad_index) + " ", cases[i].kind, "re-export the checkpoint",
                  "--allow-nonfinite-weights"});
    // Allowed: the values come back as stored, NaN and Inf included.
    expect_bitwise_equal(stored_as(cases[i].dtype, all_values[i]),
                         file.read_f32(tensor, NonFiniteWeights::kAllow));
  }
}

TEST(SafetensorsRead, LargestFiniteValuesAreNotMistakenForInf) {
  TempDir dir;
  SafetensorsWriter writer;
  const float f32_max = std::numeric_limits<float>::max();
  writer.add_f32("f32", DType::kF32, {2}, {f32_max, -f32_max});
  writer.add_f32("bf16", DType::kBF16, {2}, {bf16_to_f32(0x7F7F), bf16_to_f32(0xFF7F)});
  writer.add_f32("f16", DType::kF16, {2}, {65504.0f, -65504.0f});
  writer.write(dir / "edges.safetensors");
  SafetensorsFile file = SafetensorsFile::open(dir / "edges.safetensors");
  EXPECT_EQ(std::vector<float>({f32_max, -f32_max}), file.read_f32(*file.find("f32")));
  EXPECT_EQ(std::vector<float>({bf16_to_f32(0x7F7F), bf16_to_f32(0xFF7F)}),
            file.read_f32(*file.find("bf16")));
  EXPECT_EQ(std::vector<float>({65504.0f, -65504.0f}), file.read_f32(*file.find("f16")));
}

TEST(SafetensorsWriter, WriteIntoMissingDirectoryIsIoAndLeavesNoFile) {
  TempDir dir;
  SafetensorsWriter writer;
  writer.add_f32("w", DType::kF32, {1}, {1.0f});
  const auto path = dir / "no_such_dir" / "out.safetensors";
  expect_error([&] { writer.write(path); }, ErrorCode::kIo, {path.string(), "writable"});
  EXPECT_FALSE(std::filesystem::exists(path));
}

TEST(SafetensorsWriter, RenameOntoADirectoryFailsAndRemovesTheTempFile) {
  TempDir dir;
  std::filesystem::create_directories(dir / "taken" / "child");
  SafetensorsWriter writer;
  writer.add_f32("w", DType::kF32, {1}, {1.0f});
  expect_error([&] { writer.write(dir / "taken"); }, ErrorCode::kIo, {"taken", "no file was written"});
  EXPECT_EQ(1, std::distance(std::filesystem::directory_iterator(dir.path()),
                             std::filesystem::directory_iterator()));
}

TEST(SafetensorsWriter, RejectsBadTensors) {
  SafetensorsWriter writer;
  expect_error(
      [&] {
        writer.add("w", DType::kF32, {2, 2}, std::vector<uint8_t>(15));
      },
      ErrorCode::kInvalidArgument, {"'w'", "[2, 2]", "15 bytes"});
  expect_error([&] { writer.add_f32("w", DType::kI32, {1}, {1.0f}); }, ErrorCode::kInvalidArgument, {"I32"});
  expect_error([&] { writer.add_f32("w", DType::kF32, {3}, {1.0f}); }, ErrorCode::kInvalidArgument,
               {"'w'", "[3]", "1 values"});
  expect_error([&] { writer.add("__metadata__", DType::kU8, {0}, {}); }, ErrorCode::kInvalidArgument,
               {"__metadata__"});
  writer.add("w", DType::kU8, {1}, {0});
  expect_error([&] { writer.add("w", DType::kU8, {1}, {0}); }, ErrorCode::kInvalidArgument, {"'w'", "twice"});
  EXPECT_EQ(1u, writer.num_tensors());
}

}  // namespace
}  // namespace epic
