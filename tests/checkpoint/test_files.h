// Helpers for the checkpoint tests: a self-deleting temp directory, raw safetensors bytes for
// corrupt files, an assertion that an epic::Error has the right code and message words, and a
// bounded wait for code that must refuse a FIFO at once.
#pragma once

#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <functional>
#include <future>
#include <initializer_list>
#include <memory>
#include <random>
#include <string>
#include <thread>

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

// Makes a FIFO (named pipe) at path; nothing ever writes to it, so a plain open() or read() of it
// would wait forever.
inline void make_fifo(const std::filesystem::path& path) {
  ASSERT_EQ(0, ::mkfifo(path.c_str(), 0644)) << "mkfifo " << path << " failed";
}

// Runs body on its own thread and expects it to throw epic::Error(code) naming every word within
// a few seconds. Should body block on the FIFO, the test fails (it does not hang): a writer opens
// and closes the FIFO, which releases a reader waiting in open() or read() with end-of-file.
inline void expect_refused_without_blocking(const std::filesystem::path& fifo, std::function<void()> body,
                                            ErrorCode code, std::initializer_list<std::string> words) {
  auto task = std::make_shared<std::packaged_task<void()>>(std::move(body));
  std::future<void> done = task->get_future();
  std::thread([task] { (*task)(); }).detach();
  if (done.wait_for(std::chrono::seconds(10)) != std::future_status::ready) {
    ADD_FAILURE() << "still waiting on FIFO " << fifo << " after 10 s: it was opened or read as a file";
    const int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK);
    if (fd >= 0) ::close(fd);
    if (done.wait_for(std::chrono::seconds(10)) != std::future_status::ready) std::abort();
    return;
  }
  expect_error([&] { done.get(); }, code, words);
}

}  // namespace epic::testing
