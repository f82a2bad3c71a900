// Flag checks before any work (see flag_checks.h).
#include "launch/flag_checks.h"

#include <cmath>
#include <cstdio>

#include "kernels/error.h"
#include "kernels/file_io.h"

namespace epic::cli {
namespace {

std::string format_seconds(double seconds) {
  char text[64];
  std::snprintf(text, sizeof text, "%g", seconds);
  return text;
}

}  // namespace

void check_int_flag(const std::string& flag, int64_t value, int64_t min, int64_t max) {
  if (value >= min && value <= max) return;
  throw Error(ErrorCode::kInvalidArgument, flag + " must be in [" + std::to_string(min) + ", " +
                                               std::to_string(max) + "], got " + std::to_string(value));
}

void check_comm_timeout(const std::string& flag, double seconds) {
  if (std::isfinite(seconds) && seconds > 0 && seconds <= kMaxCommTimeoutSeconds) return;
  throw Error(ErrorCode::kInvalidArgument, flag + " must be a finite number of seconds in (0, " +
                                               format_seconds(kMaxCommTimeoutSeconds) + "] (7 days), got " +
                                               format_seconds(seconds));
}

void check_output_flag(const std::string& path, const std::string& flag) {
  try {
    files::AtomicFileWriter probe(path, flag);  // creates its temporary file; dropped, removes it
  } catch (const Error& error) {
    // Not writable is a bad flag (exit 2), found before the run rather than after it.
    if (error.code() == ErrorCode::kIo) throw Error(ErrorCode::kInvalidArgument, error.what());
    throw;
  }
}

}  // namespace epic::cli
