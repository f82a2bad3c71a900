// Frames and cereal payloads of the coordinator <-> worker protocol (worker_protocol.h).
#include "coordinator/worker_protocol.h"

#include <cereal/archives/binary.hpp>
#include <cereal/types/map.hpp>
#include <cereal/types/string.hpp>
#include <cereal/types/vector.hpp>
#include <cstring>
#include <sstream>

#include "coordinator/checked_binary_archive.h"
#include "kernels/error.h"

namespace epic::worker_protocol {

template <class Archive>
void serialize(Archive& ar, Hello& m) {
  ar(m.version, m.rank, m.world, m.pid, m.host, m.max_active_sequences, m.max_context, m.vocab_size, m.backend,
     m.kv_capacity_tokens);
}
template <class Archive>
void serialize(Archive& ar, Sequence& m) {
  ar(m.id, m.prompt, m.resumed, m.max_new_tokens, m.temperature, m.top_p, m.seed);
}
template <class Archive>
void serialize(Archive& ar, StepCommand& m) {
  ar(m.admit, m.cancel);
}
template <class Archive>
void serialize(Archive& ar, Token& m) {
  ar(m.id, m.token, m.finished);
}
template <class Archive>
void serialize(Archive& ar, StepDone& m) {
  ar(m.tokens, m.live, m.waiting, m.kv_tokens, m.step_seconds, m.expert_rows, m.rows_per_rank);
}

namespace {

void put_le(std::string& out, uint64_t value, int bytes) {
  for (int i = 0; i < bytes; ++i) out.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
}
uint64_t get_le(std::string_view in, size_t at, int bytes) {
  uint64_t value = 0;
  for (int i = 0; i < bytes; ++i) value |= uint64_t{static_cast<unsigned char>(in[at + i])} << (8 * i);
  return value;
}

}  // namespace

std::string encode(const Message& message) {
  std::ostringstream payload;
  {
    cereal::BinaryOutputArchive archive(payload);
    archive(static_cast<uint8_t>(message.kind));
    switch (message.kind) {
      case Kind::kHello: archive(const_cast<Hello&>(message.hello)); break;
      case Kind::kStep: archive(const_cast<StepCommand&>(message.command)); break;
      case Kind::kStepDone: archive(const_cast<StepDone&>(message.done)); break;
      case Kind::kError: archive(message.error); break;
      case Kind::kPing:
      case Kind::kPong:
      case Kind::kShutdown: break;
    }
  }
  const std::string body = payload.str();
  std::string frame;
  frame.reserve(kFrameHeaderBytes + body.size());
  put_le(frame, kFrameMagic, 4);
  put_le(frame, body.size(), 8);
  frame += body;
  return frame;
}

uint64_t payload_length(std::string_view header, const std::string& peer) {
  EPIC_CHECK(header.size() == kFrameHeaderBytes, ErrorCode::kInternal, "a frame header is 12 bytes");
  if (get_le(header, 0, 4) != kFrameMagic)
    throw Error(ErrorCode::kCommunication,
                peer + " sent bytes that are not an epic worker frame; only `epic worker` of the same build "
                       "connects to the coordinator's worker port");
  const uint64_t length = get_le(header, 4, 8);
  if (length == 0 || length > kMaxFrameBytes)
    throw Error(ErrorCode::kCommunication, peer + " announced a frame of " + std::to_string(length) +
                                               " bytes (1 to " + std::to_string(kMaxFrameBytes) + " allowed)");
  return length;
}

Message decode(std::string_view payload, const std::string& peer) {
  Message message;
  try {
    // Counts are checked against the bytes left (a corrupt or hostile frame cannot make the coordinator
    // allocate what it claims), bools must be 0 or 1.
    wire::CheckedBinaryInputArchive archive(payload);
    uint8_t kind = 0;
    archive(kind);
    if (kind < static_cast<uint8_t>(Kind::kHello) || kind > static_cast<uint8_t>(Kind::kError))
      throw Error(ErrorCode::kCommunication, "unknown message kind " + std::to_string(kind));
    message.kind = static_cast<Kind>(kind);
    switch (message.kind) {
      case Kind::kHello: archive(message.hello); break;
      case Kind::kStep: archive(message.command); break;
      case Kind::kStepDone: archive(message.done); break;
      case Kind::kError: archive(message.error); break;
      case Kind::kPing:
      case Kind::kPong:
      case Kind::kShutdown: break;
    }
    if (archive.bytes_left() != 0) throw Error(ErrorCode::kCommunication, "bytes left after the message");
  } catch (const Error& e) {
    throw Error(ErrorCode::kCommunication, peer + " sent a malformed message (" + e.what() +
                                               "); coordinator and workers must be the same epic build");
  } catch (const std::exception& e) {
    throw Error(ErrorCode::kCommunication, peer + " sent a malformed message (" + e.what() +
                                               "); coordinator and workers must be the same epic build");
  }
  return message;
}

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::kHello: return "hello";
    case Kind::kStep: return "step";
    case Kind::kStepDone: return "step-done";
    case Kind::kPing: return "ping";
    case Kind::kPong: return "pong";
    case Kind::kShutdown: return "shutdown";
    case Kind::kError: return "error";
  }
  return "?";
}

}  // namespace epic::worker_protocol
