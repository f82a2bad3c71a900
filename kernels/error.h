// The one error type of host C++ code in epic: a code a caller can branch on and a
// message that says what went wrong, where, and how to fix it.
#pragma once

#include <stdexcept>
#include <string>

namespace epic {

enum class ErrorCode {
  kInvalidArgument,    // a flag, request or API argument is wrong
  kInvalidConfig,      // config.json (or a preset) is wrong or unsupported
  kInvalidCheckpoint,  // safetensors files / index do not match the format or the config
  kMissingExperts,     // experts the router has are absent from the checkpoint
  kIo,                 // a file could not be opened, read or written
  kUnsupported,        // valid input that this build cannot handle
  kTimeout,            // a bounded wait across processes ran out (names the rank and operation)
  kCommunication,      // a collective or transport failed
  kInternal,           // a broken invariant inside epic (a bug)
};

const char* error_code_name(ErrorCode code);

class Error : public std::runtime_error {
 public:
  Error(ErrorCode code, const std::string& message) : std::runtime_error(message), code_(code) {}
  ErrorCode code() const { return code_; }

 private:
  ErrorCode code_;
};

// Throws Error(code, message) when condition is false; the message is only built on failure.
#define EPIC_CHECK(condition, code, message)                  \
  do {                                                        \
    if (!(condition)) throw ::epic::Error((code), (message)); \
  } while (0)

}  // namespace epic
