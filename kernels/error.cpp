// Names for error codes, used in the CLI's "error[...]" lines.
#include "kernels/error.h"

namespace epic {

const char* error_code_name(ErrorCode code) {
  switch (code) {
    case ErrorCode::kInvalidArgument:
      return "invalid-argument";
    case ErrorCode::kInvalidConfig:
      return "invalid-config";
    case ErrorCode::kInvalidCheckpoint:
      return "invalid-checkpoint";
    case ErrorCode::kMissingExperts:
      return "missing-experts";
    case ErrorCode::kIo:
      return "io";
    case ErrorCode::kUnsupported:
      return "unsupported";
    case ErrorCode::kTimeout:
      return "timeout";
    case ErrorCode::kCommunication:
      return "communication";
    case ErrorCode::kInternal:
      return "internal";
  }
  return "unknown";
}

}  // namespace epic
