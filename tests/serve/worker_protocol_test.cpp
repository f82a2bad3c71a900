// The coordinator <-> worker protocol's frames (coordinator/worker_protocol.h): every kind of message comes
// back as it went, on random contents; a frame that is not ours (bad magic, a length out of bounds, a
// payload cut short, bytes after the message, an unknown kind) is an Error(kCommunication) naming the peer.
#include "coordinator/worker_protocol.h"

#include <gtest/gtest.h>

#include <random>

#include "kernels/error.h"

namespace epic {
namespace {

namespace wp = worker_protocol;

wp::Message decode_frame(const std::string& frame) {
  const uint64_t length = wp::payload_length(std::string_view(frame).substr(0, wp::kFrameHeaderBytes), "peer");
  EXPECT_EQ(length + wp::kFrameHeaderBytes, frame.size());
  return wp::decode(std::string_view(frame).substr(wp::kFrameHeaderBytes), "peer");
}

std::vector<int32_t> random_ids(std::mt19937_64& rng, int most) {
  std::vector<int32_t> ids(rng() % (most + 1));
  for (int32_t& id : ids) id = static_cast<int32_t>(rng() % 152000);
  return ids;
}

TEST(WorkerProtocol, EveryKindComesBackAsItWent) {
  std::mt19937_64 rng(std::random_device{}());
  for (int round = 0; round < 20; ++round) {
    wp::Message hello;
    hello.kind = wp::Kind::kHello;
    hello.hello = {wp::kVersion, static_cast<int32_t>(rng() % 8), 8, static_cast<int64_t>(rng() % 100000),
                   "node-" + std::to_string(rng() % 100), static_cast<int64_t>(rng() % 64 + 1),
                   static_cast<int64_t>(rng() % 4096 + 2), 151936, "cpu, fp32"};
    const wp::Message hello_back = decode_frame(wp::encode(hello));
    EXPECT_EQ(hello_back.kind, wp::Kind::kHello);
    EXPECT_EQ(hello_back.hello.rank, hello.hello.rank);
    EXPECT_EQ(hello_back.hello.pid, hello.hello.pid);
    EXPECT_EQ(hello_back.hello.host, hello.hello.host);
    EXPECT_EQ(hello_back.hello.max_context, hello.hello.max_context);
    EXPECT_EQ(hello_back.hello.backend, hello.hello.backend);

    wp::Message step;
    step.kind = wp::Kind::kStep;
    for (int s = 0; s < static_cast<int>(rng() % 4); ++s)
      step.command.admit.push_back({static_cast<int64_t>(rng() % 1000), random_ids(rng, 50), random_ids(rng, 20),
                                    static_cast<int64_t>(rng() % 300), 0.5, 0.9, rng()});
    for (int c = 0; c < static_cast<int>(rng() % 4); ++c) step.command.cancel.push_back(static_cast<int64_t>(rng()));
    const wp::Message step_back = decode_frame(wp::encode(step));
    ASSERT_EQ(step_back.command.admit.size(), step.command.admit.size());
    for (size_t s = 0; s < step.command.admit.size(); ++s) {
      EXPECT_EQ(step_back.command.admit[s].id, step.command.admit[s].id);
      EXPECT_EQ(step_back.command.admit[s].prompt, step.command.admit[s].prompt);
      EXPECT_EQ(step_back.command.admit[s].resumed, step.command.admit[s].resumed);
      EXPECT_EQ(step_back.command.admit[s].seed, step.command.admit[s].seed);
    }
    EXPECT_EQ(step_back.command.cancel, step.command.cancel);

    wp::Message done;
    done.kind = wp::Kind::kStepDone;
    for (int t = 0; t < static_cast<int>(rng() % 6); ++t)
      done.done.tokens.push_back({static_cast<int64_t>(rng() % 1000), static_cast<int32_t>(rng() % 1000) - 1,
                                  rng() % 2 == 0});
    done.done.live = 3;
    done.done.kv_tokens = static_cast<int64_t>(rng() % 100000);
    for (int layer = 0; layer < static_cast<int>(rng() % 3); ++layer)
      for (int e = 0; e < 4; ++e)
        done.done.expert_rows[layer * 2 + 1].push_back(static_cast<int64_t>(rng() % 5000));
    for (int r = 0; r < static_cast<int>(rng() % 4); ++r)
      done.done.rows_per_rank.push_back(static_cast<int64_t>(rng() % 90000));
    const wp::Message done_back = decode_frame(wp::encode(done));
    ASSERT_EQ(done_back.done.tokens.size(), done.done.tokens.size());
    for (size_t t = 0; t < done.done.tokens.size(); ++t) {
      EXPECT_EQ(done_back.done.tokens[t].token, done.done.tokens[t].token);
      EXPECT_EQ(done_back.done.tokens[t].finished, done.done.tokens[t].finished);
    }
    EXPECT_EQ(done_back.done.kv_tokens, done.done.kv_tokens);
    EXPECT_EQ(done_back.done.expert_rows, done.done.expert_rows);
    EXPECT_EQ(done_back.done.rows_per_rank, done.done.rows_per_rank);
  }
  wp::Message error;
  error.kind = wp::Kind::kError;
  error.error = "rank 1: out of memory";
  EXPECT_EQ(decode_frame(wp::encode(error)).error, error.error);
  for (wp::Kind kind : {wp::Kind::kPing, wp::Kind::kPong, wp::Kind::kShutdown}) {
    wp::Message bare;
    bare.kind = kind;
    EXPECT_EQ(decode_frame(wp::encode(bare)).kind, kind);
  }
}

TEST(WorkerProtocol, FramesThatAreNotOursAreCommunicationErrors) {
  wp::Message step;
  step.kind = wp::Kind::kStep;
  step.command.admit.push_back({1, {1, 2, 3}, {}, 8, 0, 1, 0});
  const std::string frame = wp::encode(step);
  const auto code_of = [](const auto& call) {
    try {
      call();
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("peer"), std::string::npos) << e.what();
      return e.code();
    }
    return ErrorCode::kInternal;  // no error: never expected here
  };
  std::string bad_magic = frame;
  bad_magic[0] = 'G';  // e.g. an HTTP client on the worker port
  EXPECT_EQ(code_of([&] { wp::payload_length(bad_magic.substr(0, wp::kFrameHeaderBytes), "peer"); }),
            ErrorCode::kCommunication);
  std::string huge = frame.substr(0, wp::kFrameHeaderBytes);
  for (int i = 4; i < 12; ++i) huge[i] = '\xff';
  EXPECT_EQ(code_of([&] { wp::payload_length(huge, "peer"); }), ErrorCode::kCommunication);
  std::string empty = frame.substr(0, wp::kFrameHeaderBytes);
  for (int i = 4; i < 12; ++i) empty[i] = '\0';
  EXPECT_EQ(code_of([&] { wp::payload_length(empty, "peer"); }), ErrorCode::kCommunication);
  const std::string payload = frame.substr(wp::kFrameHeaderBytes);
  EXPECT_EQ(code_of([&] { wp::decode(payload.substr(0, payload.size() - 3), "peer"); }), ErrorCode::kCommunication);
  EXPECT_EQ(code_of([&] { wp::decode(payload + "x", "peer"); }), ErrorCode::kCommunication);
  std::string unknown = payload;
  unknown[0] = 99;
  EXPECT_EQ(code_of([&] { wp::decode(unknown, "peer"); }), ErrorCode::kCommunication);
}

}  // namespace
}  // namespace epic
