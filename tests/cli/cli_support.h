// Shared by the CLI test files: run the real `epic` binary with captured output, one tiny model
// per suite, and the bad-input table fixture (each case asserts a non-zero exit and a message).
#pragma once

#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>

#include "../model/temp_dir.h"

namespace epic {

namespace fs = std::filesystem;

struct Outcome {
  int exit_code = -1;
  std::string out;  // stdout
  std::string err;  // stderr
};

// Runs `epic ARGS` with stdout and stderr captured to files in dir. With timeout_seconds > 0 it runs
// under `timeout`, so a test of something that must not block fails (exit 124) instead of hanging.
// launcher: what goes before the binary (e.g. "mpirun -np 2 ").
inline Outcome run_epic(const std::string& args, const fs::path& dir, int timeout_seconds = 0,
                        const std::string& launcher = "") {
  const fs::path out = dir / "stdout.txt", err = dir / "stderr.txt";
  const std::string limit = timeout_seconds > 0 ? "timeout " + std::to_string(timeout_seconds) + " " : "";
  const std::string command =
      limit + launcher + std::string(EPIC_BINARY) + " " + args + " >" + out.string() + " 2>" + err.string();
  const int status = std::system(command.c_str());
  Outcome outcome;
  outcome.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream o(out), e(err);
  outcome.out.assign(std::istreambuf_iterator<char>(o), {});
  outcome.err.assign(std::istreambuf_iterator<char>(e), {});
  return outcome;
}

inline std::string quote(const std::string& text) {
  std::string quoted = "'";
  for (char c : text) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return quoted + "'";
}

class Cli : public ::testing::Test {
 protected:
  // One tiny model for the suite (make-model with the real tokenizer when set-up installed it).
  static void SetUpTestSuite() {
    temp_ = new testing::TempDir();
    const Outcome made = run_epic(
        "make-model --preset tiny --seed 3 --out " + (temp_->path() / "tiny").string(), temp_->path());
    ASSERT_EQ(made.exit_code, 0) << made.err;
    made_output_ = new std::string(made.out);
  }
  static void TearDownTestSuite() {
    delete temp_;
    delete made_output_;
  }
  static fs::path tiny() { return temp_->path() / "tiny"; }
  static fs::path scratch() { return temp_->path(); }
  static bool has_tokenizer() { return fs::exists(tiny() / "tokenizer.json"); }
  static testing::TempDir* temp_;
  static std::string* made_output_;
};
inline testing::TempDir* Cli::temp_ = nullptr;
inline std::string* Cli::made_output_ = nullptr;

struct BadInput {
  std::string name;
  std::string args;     // {tiny} is replaced by the model directory
  std::string message;  // must appear on stderr
};

// Test names show the case name, not the struct's bytes.
inline void PrintTo(const BadInput& input, std::ostream* out) { *out << input.name; }

class CliBadInput : public Cli, public ::testing::WithParamInterface<BadInput> {};

// Expands {tiny} (the suite's model) and {golden} (the golden fixtures folder) in args.
inline std::string expand_placeholders(std::string args, const fs::path& tiny) {
  for (size_t at; (at = args.find("{tiny}")) != std::string::npos;) args.replace(at, 6, tiny.string());
  for (size_t at; (at = args.find("{golden}")) != std::string::npos;) args.replace(at, 8, EPIC_GOLDEN_DIR);
  return args;
}

}  // namespace epic
