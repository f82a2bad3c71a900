// TCP (Asio) under the worker protocol (worker_protocol.h). The coordinator's side listens, takes a
// worker job's ranks as they connect and say hello, and exchanges one message with every rank at a time
// under a deadline, so a dead or stuck rank is an error within a bounded time, never a hang. The worker's
// side is one blocking connection.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "coordinator/worker_protocol.h"

namespace epic {

class WorkerLinks {
 public:
  using clock_type = std::chrono::steady_clock;
  // Listens on host:port (port 0: a free one, see port()). Error(kCommunication) when it cannot.
  WorkerLinks(const std::string& host, uint16_t port);
  ~WorkerLinks();
  WorkerLinks(const WorkerLinks&) = delete;
  WorkerLinks& operator=(const WorkerLinks&) = delete;

  uint16_t port() const;
  // Takes the ranks of one worker job: connections that say hello, `expected` of them (0: the world size
  // the first hello names), each rank once, every hello of this protocol version and the same world size.
  // Error(kCommunication) when `deadline` passes first or `gone()` (polled) says the job will not come;
  // a connection that sends anything else is dropped with a message on stderr. Returns hellos by rank.
  std::vector<worker_protocol::Hello> accept_job(int expected, clock_type::time_point deadline,
                                                  const std::function<bool()>& gone);
  int ranks() const;
  // Sends out[r] to rank r, all at once (none when out is empty), and with read_replies reads one message
  // from every rank (the oldest unread: a pipelined step's answer arrives in order), else waits for the
  // writes alone and returns nothing. Error(kCommunication) naming the rank for a connection closed or
  // failed, a kError message (its text), or the deadline.
  std::vector<worker_protocol::Message> exchange(const std::vector<worker_protocol::Message>& out,
                                                 clock_type::time_point deadline, bool read_replies = true);
  // Best effort (shutdown): sends `message` to every rank, waiting at most until the deadline.
  void send_all(const worker_protocol::Message& message, clock_type::time_point deadline);
  // Closes every rank's connection (the listener stays).
  void drop_job();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// The worker's side: a connection to the coordinator, blocking.
class CoordinatorLink {
 public:
  // Connects to host:port, retrying for up to `patience` (the coordinator may still be binding).
  // Error(kCommunication) naming the address when it cannot.
  CoordinatorLink(const std::string& host, uint16_t port, std::chrono::milliseconds patience);
  ~CoordinatorLink();
  CoordinatorLink(const CoordinatorLink&) = delete;
  CoordinatorLink& operator=(const CoordinatorLink&) = delete;
  void send(const worker_protocol::Message& message);
  // Blocks for the next message. Error(kCommunication) when the coordinator closed the connection.
  worker_protocol::Message receive();

 private:
  struct State;
  std::unique_ptr<State> state_;
};

// "HOST:PORT" -> host and port. Error(kInvalidArgument) naming `flag` for anything else.
std::pair<std::string, uint16_t> parse_host_port(const std::string& text, const std::string& flag);

}  // namespace epic
