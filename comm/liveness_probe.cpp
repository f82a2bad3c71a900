// liveness_probe.h: a listening socket per process and non-blocking connects to many at once.
#include "comm/liveness_probe.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <ifaddrs.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

namespace epic {

namespace {

std::atomic<int> g_listener{-2};  // -2: not opened yet

int64_t now_ms() {
  timespec now{};
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<int64_t>(now.tv_sec) * 1000 + now.tv_nsec / 1000000;
}

}  // namespace

int liveness_listener() {
  int current = g_listener.load(std::memory_order_acquire);
  if (current != -2) return current;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
  if (fd >= 0) {
    sockaddr_in any{};
    any.sin_family = AF_INET;
    any.sin_addr.s_addr = htonl(INADDR_ANY);
    any.sin_port = 0;
    if (bind(fd, reinterpret_cast<sockaddr*>(&any), sizeof(any)) != 0 || listen(fd, 128) != 0) {
      close(fd);
      fd = -1;
    }
  }
  int expected = -2;
  if (!g_listener.compare_exchange_strong(expected, fd)) {  // another thread opened one first
    if (fd >= 0) close(fd);
    return expected;
  }
  return fd;
}

ProbeEndpoint liveness_endpoint(int listener) {
  ProbeEndpoint endpoint;
  if (listener < 0) return endpoint;
  sockaddr_in bound{};
  socklen_t length = sizeof(bound);
  if (getsockname(listener, reinterpret_cast<sockaddr*>(&bound), &length) != 0) return endpoint;
  endpoint.port = ntohs(bound.sin_port);
  ifaddrs* interfaces = nullptr;
  int count = 0;
  if (getifaddrs(&interfaces) == 0) {
    for (int pass = 0; pass < 2; ++pass) {  // non-loopback first; loopback only when nothing else is up
      if (pass == 1 && count > 0) break;
      for (ifaddrs* entry = interfaces; entry != nullptr && count < ProbeEndpoint::kMaxAddresses;
           entry = entry->ifa_next) {
        if (entry->ifa_addr == nullptr || entry->ifa_addr->sa_family != AF_INET) continue;
        if ((entry->ifa_flags & IFF_UP) == 0) continue;
        const bool loopback = (entry->ifa_flags & IFF_LOOPBACK) != 0;
        if (loopback != (pass == 1)) continue;
        const auto* address = reinterpret_cast<const sockaddr_in*>(entry->ifa_addr);
        if (inet_ntop(AF_INET, &address->sin_addr, endpoint.addresses[count],
                      sizeof(endpoint.addresses[count])))
          ++count;
      }
    }
    freeifaddrs(interfaces);
  }
  if (count == 0) std::strcpy(endpoint.addresses[0], "127.0.0.1");
  return endpoint;
}

void drain_liveness_listener(int listener) {
  if (listener < 0) return;
  while (true) {
    const int connection = accept4(listener, nullptr, nullptr, SOCK_CLOEXEC);
    if (connection < 0) return;  // EAGAIN: nothing pending (or an error: nothing to do either)
    close(connection);
  }
}

void probe_liveness(const ProbeEndpoint* endpoints, int count, int timeout_ms, Liveness* results,
                    int* sockets) {
  constexpr int kSlots = ProbeEndpoint::kMaxAddresses;
  // Per endpoint: how many of its connects are still pending, and whether any refused / failed otherwise.
  for (int e = 0; e < count; ++e) {
    results[e] = endpoints[e].port == 0 ? Liveness::kUnknown : Liveness::kUnreachable;
    int refused = 0, started = 0;
    for (int a = 0; a < kSlots; ++a) {
      int& fd = sockets[e * kSlots + a];
      fd = -1;
      if (endpoints[e].port == 0 || endpoints[e].addresses[a][0] == '\0') continue;
      sockaddr_in target{};
      target.sin_family = AF_INET;
      target.sin_port = htons(endpoints[e].port);
      if (inet_pton(AF_INET, endpoints[e].addresses[a], &target.sin_addr) != 1) continue;
      fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
      if (fd < 0) continue;
      ++started;
      if (connect(fd, reinterpret_cast<sockaddr*>(&target), sizeof(target)) == 0) {
        results[e] = Liveness::kAlive;
      } else if (errno != EINPROGRESS) {
        if (errno == ECONNREFUSED) ++refused;
        close(fd);
        fd = -1;
      }
    }
    if (results[e] != Liveness::kAlive && started > 0 && refused == started) results[e] = Liveness::kGone;
  }
  // Wait for the pending connects: poll them all until each endpoint is decided or the deadline.
  const int64_t deadline = now_ms() + timeout_ms;
  while (true) {
    pollfd waiting[256];
    int owner[256];
    int n = 0;
    for (int e = 0; e < count && n < 256; ++e) {
      if (results[e] != Liveness::kUnreachable) continue;  // decided (or unknown)
      for (int a = 0; a < kSlots && n < 256; ++a) {
        const int fd = sockets[e * kSlots + a];
        if (fd < 0) continue;
        waiting[n] = {fd, POLLOUT, 0};
        owner[n] = e * kSlots + a;
        ++n;
      }
    }
    const int64_t left = deadline - now_ms();
    if (n == 0 || left <= 0) break;
    if (poll(waiting, static_cast<nfds_t>(n), static_cast<int>(left)) < 0 && errno != EINTR) break;
    for (int i = 0; i < n; ++i) {
      if (waiting[i].revents == 0) continue;
      const int e = owner[i] / kSlots;
      int& fd = sockets[owner[i]];
      int error = 0;
      socklen_t length = sizeof(error);
      getsockopt(fd, SOL_SOCKET, SO_ERROR, &error, &length);
      close(fd);
      fd = -1;
      if (error == 0) {
        results[e] = Liveness::kAlive;
        continue;
      }
      // Refused by every address that answered, and none left pending: gone.
      bool pending = false;
      for (int a = 0; a < kSlots; ++a) pending = pending || sockets[e * kSlots + a] >= 0;
      if (error == ECONNREFUSED && !pending) results[e] = Liveness::kGone;
    }
  }
  for (int i = 0; i < count * kSlots; ++i)
    if (sockets[i] >= 0) close(sockets[i]);
}

const char* liveness_name(Liveness liveness) {
  switch (liveness) {
    case Liveness::kAlive:
      return "alive";
    case Liveness::kGone:
      return "gone";
    case Liveness::kUnreachable:
      return "unreachable";
    case Liveness::kUnknown:
      break;
  }
  return "unknown";
}

}  // namespace epic
