// Helpers for the checkpoint tests: a self-deleting temp directory, raw safetensors bytes for
// corrupt files, and an assertion that an epic::Error has the right code and message words.
#pragma once

#include <gtest/gtest.h>
#include <unistd.h>

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <initializer_list>
#include <random>
#include <string>

#include "kernels/error.h"
#include "tests/support/expect_error.h"

namespace epic::testing {

// A fresh directory under the system temp dir, named after the running test, removed on exit.
class TempDir {
 public:
  TempDir() {
    const auto* test = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string name =
        "epic_checkpoint_test_" + std::to_string(::getpid()) + "_" + std::to_string(std::random_device{}());
    if (test) name += std::string("_") + test->name();
    path_ = std::filesystem::temp_directory_path() / name;
    std::filesystem::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ignored;
    std::filesystem::remove_all(path_, ignored);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  const std::filesystem::path& path() const { return path_; }
  std::filesystem::path operator/(const std::string& name) const { return path_ / name; }

 private:
  std::filesystem::path path_;
};

inline void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream stream(path, std::ios::binary | std::ios::trunc);
  stream.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(stream.good()) << "could not write test file " << path;
}

inline std::string le_u64(uint64_t value) {
  std::string bytes(8, '\0');
  for (int i = 0; i < 8; ++i) bytes[i] = static_cast<char>(value >> (8 * i));
  return bytes;
}

// A safetensors file from its parts: the 8-byte length of header_json, the header, then data.
inline std::string safetensors_bytes(const std::string& header_json, const std::string& data) {
  return le_u64(header_json.size()) + header_json + data;
}

}  // namespace epic::testing
