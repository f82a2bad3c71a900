// liveness_probe.h: a process's listener answers a probe (alive), a port nobody listens on refuses
// (gone), an endpoint without a port is unknown, and probing many at once decides each within the timeout.
#include "comm/liveness_probe.h"

#include <arpa/inet.h>
#include <gtest/gtest.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <vector>

namespace epic {
namespace {

// A port that was just free: bound, read back, closed (nothing listens on it afterwards).
uint16_t closed_port() {
  const int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in any{};
  any.sin_family = AF_INET;
  any.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(bind(fd, reinterpret_cast<sockaddr*>(&any), sizeof(any)), 0);
  socklen_t length = sizeof(any);
  getsockname(fd, reinterpret_cast<sockaddr*>(&any), &length);
  close(fd);
  return ntohs(any.sin_port);
}

TEST(LivenessProbe, OwnListenerIsAliveAClosedPortIsGoneNoPortIsUnknown) {
  const int listener = liveness_listener();
  ASSERT_GE(listener, 0) << "no listening socket on this machine";
  EXPECT_EQ(liveness_listener(), listener) << "one listener per process";
  const ProbeEndpoint mine = liveness_endpoint(listener);
  ASSERT_NE(mine.port, 0);
  ASSERT_NE(mine.addresses[0][0], '\0') << "at least one address (loopback when nothing else is up)";

  ProbeEndpoint gone;
  gone.port = closed_port();
  std::strcpy(gone.addresses[0], "127.0.0.1");
  ProbeEndpoint unknown;  // no port: a rank without a listener

  const std::vector<ProbeEndpoint> endpoints = {mine, gone, unknown, mine};
  std::vector<Liveness> results(endpoints.size());
  std::vector<int> sockets(endpoints.size() * ProbeEndpoint::kMaxAddresses);
  const auto start = std::chrono::steady_clock::now();
  probe_liveness(endpoints.data(), static_cast<int>(endpoints.size()), 2000, results.data(), sockets.data());
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(results[0], Liveness::kAlive) << liveness_name(results[0]);
  EXPECT_EQ(results[1], Liveness::kGone) << liveness_name(results[1]);
  EXPECT_EQ(results[2], Liveness::kUnknown) << liveness_name(results[2]);
  EXPECT_EQ(results[3], Liveness::kAlive) << liveness_name(results[3]);
  EXPECT_LT(seconds, 1.5) << "every endpoint here answers at once: the probe must not wait for its timeout";
  drain_liveness_listener(listener);  // the accepted probes go; nothing blocks
}

TEST(LivenessProbe, AListenerThatNeverAnswersIsUnreachableWithinTheTimeout) {
  // A listener whose accept queue is full: the kernel drops further handshakes, so a probe gets no answer,
  // as from a host that is down or cut off.
  const int full = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in address{};
  address.sin_family = AF_INET;
  address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(full, reinterpret_cast<sockaddr*>(&address), sizeof(address)), 0);
  ASSERT_EQ(listen(full, 0), 0);
  socklen_t length = sizeof(address);
  getsockname(full, reinterpret_cast<sockaddr*>(&address), &length);
  std::vector<int> fillers;
  for (int i = 0; i < 4; ++i) {  // more than the queue holds; none is ever accepted
    const int filler = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    connect(filler, reinterpret_cast<sockaddr*>(&address), sizeof(address));
    fillers.push_back(filler);
  }
  usleep(100000);  // let the handshakes that fit complete
  ProbeEndpoint silent;
  silent.port = ntohs(address.sin_port);
  std::strcpy(silent.addresses[0], "127.0.0.1");
  Liveness result = Liveness::kUnknown;
  int sockets[ProbeEndpoint::kMaxAddresses];
  const auto start = std::chrono::steady_clock::now();
  probe_liveness(&silent, 1, 300, &result, sockets);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(result, Liveness::kUnreachable) << liveness_name(result);
  EXPECT_GE(seconds, 0.25) << "it waited for an answer";
  EXPECT_LT(seconds, 1.0) << "bounded by the 300 ms timeout";
  for (int filler : fillers) close(filler);
  close(full);
}

}  // namespace
}  // namespace epic
