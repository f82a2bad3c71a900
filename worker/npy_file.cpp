// The .npy format, version 1.0: magic, a Python-dict header padded to 64 bytes, then the data.
#include "worker/npy_file.h"

#include <cstring>
#include <limits>
#include <regex>
#include <sstream>

#include "kernels/error.h"
#include "kernels/file_io.h"

namespace epic {
namespace {

// Elements of the shape; Error(kInternal) on a negative dimension or more than 2^62 values.
uint64_t count_values(const std::vector<int64_t>& shape) {
  uint64_t count = 1;
  for (int64_t dim : shape) {
    EPIC_CHECK(dim >= 0, ErrorCode::kInternal, "npy: negative dimension " + std::to_string(dim));
    EPIC_CHECK(dim == 0 || count <= (uint64_t{1} << 62) / static_cast<uint64_t>(dim), ErrorCode::kInternal,
               "npy: the shape holds more than 2^62 values");
    count *= static_cast<uint64_t>(dim);
  }
  return count;
}

// Magic, version 1.0, header length and the header dict padded so the data is 64-byte aligned.
std::string npy_header(const std::vector<int64_t>& shape) {
  std::ostringstream dims;
  for (size_t i = 0; i < shape.size(); ++i) {
    dims << shape[i] << (shape.size() == 1 || i + 1 < shape.size() ? "," : "");
    if (i + 1 < shape.size()) dims << " ";
  }
  std::string header = "{'descr': '<f4', 'fortran_order': False, 'shape': (" + dims.str() + "), }";
  const size_t unpadded = 10 + header.size() + 1;
  header.append((64 - unpadded % 64) % 64, ' ');
  header.push_back('\n');
  const uint16_t header_len = static_cast<uint16_t>(header.size());
  std::string bytes = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  bytes.push_back(static_cast<char>(header_len & 0xff));
  bytes.push_back(static_cast<char>(header_len >> 8));
  return bytes + header;
}

}  // namespace

void write_npy_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape,
                   const std::vector<float>& values, const std::string& what) {
  EPIC_CHECK(count_values(shape) == values.size(), ErrorCode::kInternal,
             "write_npy_f32: shape does not match the value count");
  NpyF32Writer writer(path, shape, what);
  writer.write(0, values);
  writer.commit();
}

NpyF32Writer::NpyF32Writer(const std::filesystem::path& path, std::vector<int64_t> shape,
                           const std::string& what)
    : shape_(std::move(shape)) {
  num_values_ = count_values(shape_);
  const std::string header = npy_header(shape_);
  file_ = std::make_unique<files::AtomicFileWriter>(path, what);
  file_->write(header);
  data_offset_ = header.size();
}

NpyF32Writer::~NpyF32Writer() = default;

void NpyF32Writer::write(uint64_t first_index, std::span<const float> values) {
  EPIC_CHECK(first_index <= num_values_ && values.size() <= num_values_ - first_index, ErrorCode::kInternal,
             "NpyF32Writer: values [" + std::to_string(first_index) + ", +" + std::to_string(values.size()) +
                 ") past the " + std::to_string(num_values_) + " of " + file_->path().string());
  file_->write_at(data_offset_ + first_index * sizeof(float), values.data(), values.size() * sizeof(float));
  values_written_ += values.size();
}

void NpyF32Writer::commit() {
  // Counting (not tracking each index) is enough for the callers' disjoint row ranges; a gap
  // would read back as zeros, so a short count is a bug, not a file to keep.
  EPIC_CHECK(values_written_ == num_values_, ErrorCode::kInternal,
             "NpyF32Writer: " + std::to_string(values_written_) + " of " + std::to_string(num_values_) +
                 " values written to " + file_->path().string());
  file_->commit();
}

NpyArray read_npy_f32(const std::filesystem::path& path) {
  const std::string bytes = files::read_file(path, ".npy file");
  auto fail = [&](const std::string& what) {
    throw Error(ErrorCode::kInvalidArgument, path.string() + ": " + what);
  };
  if (bytes.size() < 10 || std::memcmp(bytes.data(), "\x93NUMPY", 6) != 0) fail("not a .npy file");
  const uint8_t major = static_cast<uint8_t>(bytes[6]);
  size_t header_start = 10;
  uint64_t header_len = static_cast<uint8_t>(bytes[8]) | (static_cast<uint8_t>(bytes[9]) << 8);
  if (major != 1) {
    if (bytes.size() < 12) fail("truncated header");
    header_start = 12;
    header_len |=
        (uint64_t{static_cast<uint8_t>(bytes[10])} << 16) | (uint64_t{static_cast<uint8_t>(bytes[11])} << 24);
  }
  if (header_len > bytes.size() - header_start) fail("truncated header");
  const std::string header = bytes.substr(header_start, header_len);
  if (header.find("'descr': '<f4'") == std::string::npos ||
      header.find("'fortran_order': False") == std::string::npos)
    fail("expected a C-order float32 array, header is " + header);
  std::smatch match;
  if (!std::regex_search(header, match, std::regex(R"('shape': \(([0-9, ]*)\))")))
    fail("no shape in header " + header);
  NpyArray array;
  std::stringstream dims(match[1].str());
  std::string dim;
  uint64_t count = 1;
  const uint64_t data_bytes = bytes.size() - header_start - header_len;
  for (; std::getline(dims, dim, ',');) {
    if (dim.find_first_not_of(' ') == std::string::npos) continue;
    const size_t digits = dim.find_first_not_of(' ');
    if (dim.size() - digits > 18) fail("dimension " + dim + " is too large");
    array.shape.push_back(std::stoll(dim));
    const uint64_t extent = static_cast<uint64_t>(array.shape.back());
    if (extent != 0 && count > data_bytes / extent) fail("truncated data");
    count *= extent;
  }
  if (count * sizeof(float) > data_bytes) fail("truncated data");
  array.values.resize(count);
  std::memcpy(array.values.data(), bytes.data() + header_start + header_len, count * sizeof(float));
  return array;
}

}  // namespace epic
