// NumPy .npy files of float32 (little-endian, C order): --logits-out writes them, tests read them.
#pragma once

#include <cstdint>
#include <filesystem>
#include <vector>

namespace epic {

struct NpyArray {
  std::vector<int64_t> shape;
  std::vector<float> values;
};

void write_npy_f32(const std::filesystem::path& path, const std::vector<int64_t>& shape,
                   const std::vector<float>& values);  // Error(kIo) on failure
// Reads '<f4' C-order arrays; anything else -> Error(kInvalidArgument) saying what was found.
NpyArray read_npy_f32(const std::filesystem::path& path);

}  // namespace epic
