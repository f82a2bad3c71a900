// Fuzzes the coordinator <-> worker protocol (coordinator/worker_protocol.h), what the coordinator reads from
// its worker port (and a worker from the coordinator): a frame header, then its payload. Bad bytes are an
// epic::Error, never a crash or a huge allocation; a message that decodes encodes into a frame that decodes
// to a message of the same kind.
#include <cstdint>

#include "coordinator/worker_protocol.h"
#include "tests/fuzz/fuzz_support.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  namespace wp = epic::worker_protocol;
  const std::string bytes = epic::fuzz::as_text(data, size);
  epic::fuzz::expect_only_epic_errors([&] {
    if (bytes.size() < wp::kFrameHeaderBytes) return;
    const uint64_t length = wp::payload_length(std::string_view(bytes).substr(0, wp::kFrameHeaderBytes), "fuzz");
    EPIC_FUZZ_REQUIRE(length >= 1 && length <= wp::kMaxFrameBytes, "a frame length out of bounds was accepted");
    const std::string_view payload = std::string_view(bytes).substr(wp::kFrameHeaderBytes);
    if (payload.size() != length) return;  // a cut or padded frame: the reader waits for or ignores the rest
    const wp::Message message = wp::decode(payload, "fuzz");
    const std::string again = wp::encode(message);
    const wp::Message back = wp::decode(std::string_view(again).substr(wp::kFrameHeaderBytes), "fuzz");
    EPIC_FUZZ_REQUIRE(back.kind == message.kind, "a decoded message does not survive its own encoding");
  });
  return 0;
}
