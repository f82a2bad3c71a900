// The expert-parallel mode choice and the low-latency block sizes (ep_mode.h).
#include "worker/ep_mode.h"

#include <algorithm>

#include "kernels/error.h"

namespace epic {
namespace {

int64_t next_power_of_two(int64_t value) {
  int64_t power = 1;
  while (power < value) power *= 2;
  return power;
}

}  // namespace

EpMode parse_ep_mode(std::string_view text) {
  if (text == "auto") return EpMode::kAuto;
  if (text == "normal") return EpMode::kNormal;
  if (text == "low-latency") return EpMode::kLowLatency;
  throw Error(ErrorCode::kInvalidArgument,
              "--ep-mode: unknown mode '" + std::string(text) + "' (use auto, normal or low-latency)");
}

std::string_view ep_mode_name(EpMode mode) {
  switch (mode) {
    case EpMode::kNormal:
      return "normal";
    case EpMode::kLowLatency:
      return "low-latency";
    case EpMode::kAuto:
      break;
  }
  return "auto";
}

int64_t low_latency_capacity(int64_t max_tokens) {
  EPIC_CHECK(max_tokens >= 1 && max_tokens <= kMaxLowLatencyMaxTokens, ErrorCode::kInvalidArgument,
             "--ep-low-latency-max-tokens must be in [1, " + std::to_string(kMaxLowLatencyMaxTokens) +
                 "], got " + std::to_string(max_tokens));
  return next_power_of_two(max_tokens);
}

int64_t low_latency_step_tokens(EpMode mode, int64_t max_tokens, int64_t max_rows_on_any_rank) {
  EPIC_CHECK(max_rows_on_any_rank >= 0, ErrorCode::kInternal,
             "expert-parallel step with " + std::to_string(max_rows_on_any_rank) + " rows");
  if (mode == EpMode::kNormal) return 0;
  low_latency_capacity(max_tokens);  // validates the bound
  if (max_rows_on_any_rank > max_tokens) {
    EPIC_CHECK(mode != EpMode::kLowLatency, ErrorCode::kInvalidArgument,
               "--ep-mode low-latency: a step runs " + std::to_string(max_rows_on_any_rank) +
                   " token rows on one rank, beyond --ep-low-latency-max-tokens " +
                   std::to_string(max_tokens) +
                   " (raise it, or use --ep-mode auto to run such steps in the normal mode)");
    return 0;
  }
  return next_power_of_two(std::max<int64_t>(max_rows_on_any_rank, 1));
}

void check_ep_mode_flags(EpMode mode, int64_t max_tokens, bool nccl_transport) {
  low_latency_capacity(max_tokens);
  EPIC_CHECK(
      mode != EpMode::kLowLatency || nccl_transport, ErrorCode::kInvalidArgument,
      "--ep-mode low-latency needs the NCCL exchange (--backend cuda, several ranks, --ep-transport nccl "
      "or auto, NCCL built); the host exchange has only the normal mode");
}

void check_ep_overlap_flag(bool overlap, EpMode mode, bool nccl_transport) {
  if (!overlap) return;
  EPIC_CHECK(nccl_transport, ErrorCode::kInvalidArgument,
             "--ep-overlap overlaps the NCCL exchange (--backend cuda, several ranks, --ep-transport nccl or "
             "auto, NCCL built); drop it for the host exchange");
  EPIC_CHECK(
      mode != EpMode::kLowLatency, ErrorCode::kInvalidArgument,
      "--ep-overlap applies to the normal mode's steps, and --ep-mode low-latency has none: use "
      "--ep-mode auto (low-latency decode steps, overlapped larger ones) or normal, or drop --ep-overlap");
}

int64_t low_latency_block_bytes(int64_t tokens, int64_t record_bytes) {
  EPIC_CHECK(tokens >= 0 && record_bytes > 0 && record_bytes % 16 == 0, ErrorCode::kInternal,
             "low-latency block of " + std::to_string(tokens) + " records of " +
                 std::to_string(record_bytes) + " bytes");
  return kLowLatencyHeaderBytes + tokens * record_bytes;
}

}  // namespace epic
