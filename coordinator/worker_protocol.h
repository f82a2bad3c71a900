// The messages between `epic serve` (the coordinator) and the ranks of its worker job (`epic worker`),
// one TCP connection per rank, each message a frame: magic, payload length, cereal-binary payload.
// The coordinator is the clock: every step it sends every rank a kStep (the sequences that join that
// rank, the ids it cancels) and every rank answers kStepDone (the tokens of its live sequences, its load)
// after the ranks stepped together through their own collectives (MPI, NCCL). Between steps it pings.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <string_view>
#include <vector>

namespace epic::worker_protocol {

// 1: the first version. 2: StepDone::rows_per_rank. Both sides refuse a hello of another version (they
// must be the same build).
constexpr uint32_t kVersion = 2;
constexpr uint32_t kFrameMagic = 0x4B574550;  // "PEWK" in memory order
constexpr uint64_t kMaxFrameBytes = uint64_t{1} << 30;
constexpr size_t kFrameHeaderBytes = 12;  // magic (4) + payload length (8), little-endian

enum class Kind : uint8_t {
  kHello = 1,     // rank -> coordinator, once connected
  kStep = 2,      // coordinator -> every rank: run one step
  kStepDone = 3,  // rank -> coordinator
  kPing = 4,      // coordinator -> rank, between steps
  kPong = 5,      // rank -> coordinator
  kShutdown = 6,  // coordinator -> every rank: leave the loop and exit 0
  kError = 7,     // rank -> coordinator: this rank failed (its message), the job is ending
};

struct Hello {
  uint32_t version = kVersion;
  int32_t rank = 0, world = 1;
  int64_t pid = 0;
  std::string host;
  int64_t max_active_sequences = 0, max_context = 0, vocab_size = 0;
  std::string backend;             // ChosenBackend::description
  int64_t kv_capacity_tokens = 0;  // positions its KV cache holds for all live sequences together
};

struct Sequence {
  int64_t id = 0;
  std::vector<int32_t> prompt, resumed;
  int64_t max_new_tokens = 0;
  double temperature = 0, top_p = 1;
  uint64_t seed = 0;
};

struct StepCommand {
  std::vector<Sequence> admit;
  std::vector<int64_t> cancel;
};

struct Token {
  int64_t id = 0;
  int32_t token = -1;  // -1: none this step
  bool finished = false;
};

struct StepDone {
  std::vector<Token> tokens;
  int64_t live = 0, waiting = 0;
  int64_t kv_tokens = 0;  // positions held in this rank's KV caches after the step
  double step_seconds = 0;
  // The per-expert load since the job started (worker/expert_load_counter.h), sent at most about once a
  // second, empty otherwise. expert_rows: rows per (MoE layer, expert), summed over the ranks the rows each
  // expert computed: with the host exchange what this rank's experts computed, else what this rank's
  // tokens routed. rows_per_rank: the rows this rank's tokens sent to each rank's experts (all layers), or
  // empty where expert_rows is what this rank computed.
  std::map<int64_t, std::vector<int64_t>> expert_rows;
  std::vector<int64_t> rows_per_rank;
};

struct Message {
  Kind kind = Kind::kPing;
  Hello hello;          // kHello
  StepCommand command;  // kStep
  StepDone done;        // kStepDone
  std::string error;    // kError
};

// The whole frame of a message (header and payload).
std::string encode(const Message& message);
// The payload length from a frame's first kFrameHeaderBytes: Error(kCommunication) for a bad magic (the
// peer is not an epic worker of this protocol) or a length over kMaxFrameBytes.
uint64_t payload_length(std::string_view header, const std::string& peer);
// The message from a payload: Error(kCommunication) naming the peer when it does not parse.
Message decode(std::string_view payload, const std::string& peer);

const char* kind_name(Kind kind);

}  // namespace epic::worker_protocol
