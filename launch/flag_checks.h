// Checks of command-line flags before any work. Numbers: documented bounds, checked in one place;
// a value out of range is an error naming the flag, the value and the bound, never a clamp or a
// wrap (same rule on one process and under mpirun, since every rank checks the same flags).
// Output paths: what files::check_output_path checks, plus a real try at creating a file there.
#pragma once

#include <cstdint>
#include <string>

namespace epic::cli {

// Largest --workers `epic plan` plans for (and world size `epic run` accepts): above any
// expert-parallel group this engine targets. The planner's packing grows with workers x total
// slots: measured here, one Qwen3 MoE layer plans in 0.13 s at 1024 workers with default slots and
// in 1.1 s with every expert on every worker (12 s at 4096), and at 65536 workers even the 3-layer
// tiny model took 84 s.
inline constexpr int64_t kMaxWorkers = 1024;
// --comm-timeout: seconds in (0, 7 days]; inf/NaN/0/negative are errors.
inline constexpr double kMaxCommTimeoutSeconds = 7 * 24 * 3600.0;
// bench-moe: token rows per worker (at Qwen3's shapes, top-8 of hidden 2048, 16384 rows are about
// 1 GiB of dispatched rows per rank), timed and warm-up iterations, CPU threads.
inline constexpr int64_t kMaxBenchTokensPerWorker = 16384;
inline constexpr int64_t kMaxBenchIterations = 1000000;
inline constexpr int64_t kMaxThreads = 1024;

// Each throws Error(kInvalidArgument) "FLAG must be ... got VALUE" when the value is outside.
void check_int_flag(const std::string& flag, int64_t value, int64_t min, int64_t max);
void check_comm_timeout(const std::string& flag, double seconds);

// files::check_output_path, then a temporary file is created beside the target and removed
// again: that catches what access() cannot tell (/proc, which refuses new files even to root, a
// quota, an ACL). Any failure is Error(kInvalidArgument) naming the flag and the path.
void check_output_flag(const std::string& path, const std::string& flag);

}  // namespace epic::cli
