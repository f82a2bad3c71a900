// Which exchange the NCCL expert-parallel executor runs for a step, and the sizes of the low-latency
// mode's fixed blocks. Pure host logic (no CUDA), so it is tested anywhere; every rank computes the same
// answer from the same agreed inputs, which is what keeps their collectives matched.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

namespace epic {

// --ep-mode. kNormal: the count exchange and one host read per layer (any step size, not capturable).
// kLowLatency: fixed-size blocks for every step (a step beyond the bound is an error). kAuto: fixed-size
// blocks for steps within the bound (decode), the normal mode beyond it (prefill).
enum class EpMode { kAuto, kNormal, kLowLatency };

// "auto", "normal", "low-latency"; anything else throws Error(kInvalidArgument) naming the flag.
EpMode parse_ep_mode(std::string_view text);
std::string_view ep_mode_name(EpMode mode);

// The default --ep-low-latency-max-tokens: decode batches up to this many rows per rank.
constexpr int64_t kDefaultLowLatencyMaxTokens = 256;
// The largest bound accepted: the blocks are sized for it on every layer call, whatever the step.
constexpr int64_t kMaxLowLatencyMaxTokens = int64_t{1} << 16;
// Each low-latency block starts with this header (the block's token count as int64, padded so the
// records after it stay 16-byte aligned).
constexpr int64_t kLowLatencyHeaderBytes = 16;

// The tokens a low-latency block holds at most for `max_tokens` (validated: [1, kMaxLowLatencyMaxTokens],
// else Error(kInvalidArgument)): the next power of two, because the model runner pads captured decode
// steps up to a power-of-two bucket, and a padded step must still fit.
int64_t low_latency_capacity(int64_t max_tokens);

// The per-rank token bound of a step's low-latency exchange, or 0 for the normal mode. max_rows is the
// most token rows any rank runs in the step (the same value on every rank); the bound is its next power
// of two (at least 1), so the blocks of a small step are small and a padded bucket fits. kLowLatency with
// a step beyond max_tokens throws Error(kInvalidArgument) naming --ep-low-latency-max-tokens.
int64_t low_latency_step_tokens(EpMode mode, int64_t max_tokens, int64_t max_rows_on_any_rank);

// epic run's --ep-mode / --ep-low-latency-max-tokens against the chosen transport (nccl_transport: the
// NCCL executor runs the MoE blocks): Error(kInvalidArgument) naming the flag for a bound out of range or
// low-latency without the NCCL executor (the host exchange has no such mode).
void check_ep_mode_flags(EpMode mode, int64_t max_tokens, bool nccl_transport);
// overlap (--ep-overlap) needs the NCCL exchange and a mode with normal steps (not low-latency).
void check_ep_overlap_flag(bool overlap, EpMode mode, bool nccl_transport);

// Bytes of one rank-to-rank block: the header, then `tokens` records.
int64_t low_latency_block_bytes(int64_t tokens, int64_t record_bytes);

}  // namespace epic
