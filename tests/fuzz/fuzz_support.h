// What every fuzz target shares: the rule that a finding is anything but an epic::Error (a crash, a
// sanitizer report, another exception, a broken property checked with EPIC_FUZZ_REQUIRE), and a
// scratch folder for the parsers that only read files.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>

#include "kernels/error.h"

// A property the code under test must keep; a broken one aborts, so libFuzzer (and the replay
// test) report the input as a finding.
#define EPIC_FUZZ_REQUIRE(condition, message)                                                            \
  do {                                                                                                   \
    if (!(condition)) {                                                                                  \
      std::fprintf(stderr, "fuzz finding at %s:%d: %s (%s)\n", __FILE__, __LINE__, #condition, message); \
      std::abort();                                                                                      \
    }                                                                                                    \
  } while (0)

namespace epic::fuzz {

inline std::string as_text(const uint8_t* data, size_t size) {
  return std::string(reinterpret_cast<const char*>(data), size);
}

// Runs one parse; epic::Error is the documented way to refuse bad input, everything else escapes
// (an uncaught exception aborts the run and shows its type and message).
template <typename Parse>
void expect_only_epic_errors(Parse&& parse) {
  try {
    parse();
  } catch (const epic::Error&) {
  }
}

// One folder per process ($EPIC_FUZZ_SCRATCH, else /dev/shm so rewriting a file per input stays in
// memory), removed at a normal exit. The parsers that take a path read the fuzz input from here.
inline const std::filesystem::path& scratch_directory() {
  // Never destroyed: the exit handler below still needs it after static destructors have run.
  static const std::filesystem::path* const directory = [] {
    const char* chosen = std::getenv("EPIC_FUZZ_SCRATCH");  // tests/fuzz/run_fuzzers.sh sets it
    std::filesystem::path base = chosen != nullptr ? chosen : "/dev/shm";
    if (chosen == nullptr && ::access(base.c_str(), W_OK) != 0) base = std::filesystem::temp_directory_path();
    auto* made = new std::filesystem::path(base / ("epic_fuzz_" + std::to_string(::getpid())));
    std::filesystem::create_directories(*made);
    std::atexit([] {
      std::error_code ignored;
      std::filesystem::remove_all(scratch_directory(), ignored);
    });
    return made;
  }();
  return *directory;
}

// Writes bytes to scratch_directory()/name (replacing it) and returns the path.
inline std::filesystem::path write_scratch_file(const std::string& name, std::string_view bytes) {
  const std::filesystem::path path = scratch_directory() / name;
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  out.close();
  EPIC_FUZZ_REQUIRE(out.good(), "cannot write the scratch file (is /dev/shm or TMPDIR full?)");
  return path;
}

}  // namespace epic::fuzz
