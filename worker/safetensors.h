// Reading and writing the safetensors format: an 8-byte little-endian header length, a JSON
// header naming each tensor's dtype, shape and [begin, end) data offsets, then the data.
// Every header is validated before any tensor is used; every error names the file and tensor.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace epic {

// Storage dtypes epic computes with (others are recognised so errors can name them).
enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool, kF8E4M3, kF8E5M2 };

const char* dtype_name(DType dtype);       // safetensors spelling: "F32", "BF16", ...
size_t dtype_size(DType dtype);            // bytes per element
bool dtype_is_float_storage(DType dtype);  // F32, F16 or BF16: the dtypes weights may use

// Scalar conversions (round-to-nearest-even for float -> bf16 / f16).
float bf16_to_f32(uint16_t bits);
uint16_t f32_to_bf16(float value);
float f16_to_f32(uint16_t bits);
uint16_t f32_to_f16(float value);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t data_begin = 0;  // absolute byte offset in the file
  uint64_t data_end = 0;    // absolute, exclusive
  int64_t num_elements() const;
  uint64_t num_bytes() const { return data_end - data_begin; }
};

std::string shape_to_string(const std::vector<int64_t>& shape);  // "[8, 64]"

// What read_f32 does with a NaN or an infinity among the stored values. A weight that is not
// finite turns every logit it reaches into NaN, so it is refused unless the user says otherwise.
enum class NonFiniteWeights { kReject, kAllow };

// One .safetensors file. Opening reads and validates only the header; tensor data is read on
// demand, and every byte of tensor data read is counted (bytes_read()).
class SafetensorsFile {
 public:
  // Throws Error(kInvalidCheckpoint) for: a file shorter than 8 bytes, a header length past the
  // end of the file, a header that is not JSON / not an object, an entry without dtype, shape
  // or data_offsets, an unknown dtype, negative dims, an element count over 2^63, offsets
  // outside the data section or not matching dtype size x element count, and tensors that do
  // not tile the data section exactly (an overlap, a gap, or bytes after the last tensor: the
  // file length must be 8 + header length + the tensors' bytes, as the reference requires).
  // Throws Error(kInvalidArgument) when the path is a directory, FIFO or device (never opened
  // in a way that could block), Error(kIo) when the file cannot be opened.
  static SafetensorsFile open(const std::filesystem::path& path);

  const std::filesystem::path& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* find(std::string_view name) const;  // nullptr when absent
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // Reads the raw bytes of one tensor into dst (num_bytes() long).
  void read_raw(const TensorInfo& tensor, void* dst) const;
  // Reads one tensor of a float storage dtype (F32/F16/BF16) converted to f32. With kReject, a
  // NaN or +-Inf is Error(kInvalidCheckpoint) naming the tensor, the file, the first bad
  // element's index and kind; the check rides on the conversion (no second pass over memory).
  std::vector<float> read_f32(const TensorInfo& tensor,
                              NonFiniteWeights non_finite = NonFiniteWeights::kReject) const;

  uint64_t bytes_read() const { return *bytes_read_; }

 private:
  // Throws Error(kInvalidArgument) unless the tensor's byte range lies inside this file.
  void require_inside_file(const TensorInfo& tensor) const;
  std::filesystem::path path_;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_by_name_;
  std::map<std::string, std::string> metadata_;
  uint64_t file_size_ = 0;
  // Shared so copies count together; atomic so threads may read different tensors at once.
  std::shared_ptr<std::atomic<uint64_t>> bytes_read_ = std::make_shared<std::atomic<uint64_t>>(0);
};

// Writes one .safetensors file: add tensors, then write(). Data is written in the order added.
class SafetensorsWriter {
 public:
  void add(const std::string& name, DType dtype, std::vector<int64_t> shape, std::vector<uint8_t> bytes);
  // Converts f32 values to the storage dtype (F32, F16 or BF16).
  void add_f32(const std::string& name, DType storage, std::vector<int64_t> shape,
               const std::vector<float>& values);
  uint64_t data_bytes() const;
  size_t num_tensors() const { return entries_.size(); }
  std::vector<std::string> names() const;
  void set_metadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  void write(const std::filesystem::path& path) const;  // throws Error(kIo) on failure

 private:
  struct Entry {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> bytes;
  };
  std::vector<Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace epic
