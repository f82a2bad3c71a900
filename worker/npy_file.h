// NumPy .npy files of float32 (little-endian, C order): --logits-out writes them, tests read them.
// Written atomically through epic::files (temporary file, every write checked, rename over a
// regular file or nothing, never over a device, FIFO or directory).
#pragma once

#include <cstdint>
#include <filesystem>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace epic {

namespace files {
class AtomicFileWriter;
}

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

// The whole array at once; Error(kIo) when a write fails (a full disk included), and
// Error(kInvalidArgument) when the path is a directory, FIFO or device or its folder is missing.
void write_npy_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape,
                   const std::vector<float>& values, const std::string& what = "--logits-out");

// An array whose shape is known up front, filled as results arrive (in any order): the header is
// written at once, values go to their place by flat index, and commit() renames the finished file
// into place after checking every value was written. Dropped without commit(), nothing appears.
class NpyF32Writer {
 public:
  NpyF32Writer(const std::filesystem::path& path, std::vector<int64_t> shape,
               const std::string& what = "--logits-out");
  ~NpyF32Writer();
  NpyF32Writer(const NpyF32Writer&) = delete;
  NpyF32Writer& operator=(const NpyF32Writer&) = delete;

  // values[first_index, first_index + values.size()) of the flattened array.
  void write(uint64_t first_index, std::span<const float> values);
  void commit();
  uint64_t num_values() const { return num_values_; }

 private:
  std::unique_ptr<files::AtomicFileWriter> file_;
  std::vector<int64_t> shape_;
  uint64_t num_values_ = 0;
  uint64_t values_written_ = 0;
  uint64_t data_offset_ = 0;
};

// Reads '<f4' C-order arrays; anything else -> Error(kInvalidArgument) saying what was found.
NpyArray read_npy_f32(const std::filesystem::path& path);

}  // namespace epic
