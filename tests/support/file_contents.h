// Small file helpers for tests: a whole file as text, and the temporaries AtomicFileWriter left.
#pragma once

#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>

namespace epic::testing {

inline std::string read_whole_file(const std::filesystem::path& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), {});
}

// Files in `folder` whose name holds ".epic-tmp." (kernels/file_io's AtomicFileWriter temporaries).
inline int count_atomic_writer_temporaries(const std::filesystem::path& folder) {
  int count = 0;
  for (const auto& entry : std::filesystem::directory_iterator(folder))
    count += entry.path().filename().string().find(".epic-tmp.") != std::string::npos;
  return count;
}

}  // namespace epic::testing
