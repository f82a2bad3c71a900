// The worker protocol over TCP with Asio (worker_link.h). The coordinator's side runs its own
// io_context on the calling thread in short slices until what it waits for is done or the deadline passes,
// then cancels what is left and drains the handlers before returning: nothing outlives a call.
#include "coordinator/worker_link.h"

#include <utility>  // before Asio: its awaitable.hpp uses std::exchange without it

#include <boost/asio.hpp>
#include <cstdio>
#include <map>
#include <thread>

#include "kernels/error.h"

namespace epic {

namespace asio = boost::asio;
using tcp = asio::ip::tcp;
namespace wp = worker_protocol;

namespace {

// One message being read: the header, then the payload it announces.
struct Incoming {
  std::string header = std::string(wp::kFrameHeaderBytes, '\0');
  std::string payload;
  bool done = false;
  std::string error;  // the connection failed or sent garbage
  wp::Message message;
};

void read_message(tcp::socket& socket, std::shared_ptr<Incoming> in, std::string peer) {
  asio::async_read(socket, asio::buffer(in->header),
                   [&socket, in, peer](const boost::system::error_code& ec, size_t) {
                     if (ec) {
                       in->error = ec == asio::error::eof ? "closed the connection" : ec.message();
                       in->done = true;
                       return;
                     }
                     try {
                       in->payload.resize(wp::payload_length(in->header, peer));
                     } catch (const Error& e) {
                       in->error = e.what();
                       in->done = true;
                       return;
                     }
                     asio::async_read(socket, asio::buffer(in->payload),
                                      [in, peer](const boost::system::error_code& ec2, size_t) {
                                        if (ec2) {
                                          in->error = ec2 == asio::error::eof ? "closed the connection"
                                                                              : ec2.message();
                                        } else {
                                          try {
                                            in->message = wp::decode(in->payload, peer);
                                          } catch (const Error& e) {
                                            in->error = e.what();
                                          }
                                        }
                                        in->done = true;
                                      });
                   });
}

tcp::endpoint endpoint_of(asio::io_context& io, const std::string& host, uint16_t port) {
  boost::system::error_code ec;
  const asio::ip::address address = asio::ip::make_address(host, ec);
  if (!ec) return tcp::endpoint(address, port);
  tcp::resolver resolver(io);
  const auto results = resolver.resolve(host, std::to_string(port), ec);
  if (ec || results.empty())
    throw Error(ErrorCode::kInvalidArgument, "cannot resolve host '" + host + "': " + ec.message());
  return *results.begin();
}

}  // namespace

struct WorkerLinks::State {
  asio::io_context io;
  tcp::acceptor acceptor{io};
  std::vector<std::unique_ptr<tcp::socket>> sockets;  // by rank

  // Runs handlers until done() or the deadline (false then); `poll` is asked between slices.
  bool run_until(const std::function<bool()>& done, clock_type::time_point deadline,
                 const std::function<bool()>& give_up = {}) {
    while (!done()) {
      const auto now = clock_type::now();
      if (now >= deadline || (give_up && give_up())) return false;
      io.restart();
      io.run_for(std::min<clock_type::duration>(deadline - now, std::chrono::milliseconds(100)));
    }
    return true;
  }
  // Every pending operation cancelled and its handler run.
  void drain() {
    boost::system::error_code ignored;
    for (auto& socket : sockets)
      if (socket) socket->cancel(ignored);
    io.restart();
    io.run();
  }
};

WorkerLinks::WorkerLinks(const std::string& host, uint16_t port) : state_(std::make_unique<State>()) {
  try {
    const tcp::endpoint endpoint = endpoint_of(state_->io, host, port);
    state_->acceptor.open(endpoint.protocol());
    state_->acceptor.set_option(tcp::acceptor::reuse_address(true));
    state_->acceptor.bind(endpoint);
    state_->acceptor.listen();
  } catch (const boost::system::system_error& e) {
    throw Error(ErrorCode::kCommunication, "cannot listen for workers on " + host + ":" + std::to_string(port) +
                                               ": " + e.what() + " (pick another --worker-port)");
  }
}

WorkerLinks::~WorkerLinks() {
  drop_job();
  boost::system::error_code ignored;
  state_->acceptor.close(ignored);
}

uint16_t WorkerLinks::port() const { return state_->acceptor.local_endpoint().port(); }

int WorkerLinks::ranks() const { return static_cast<int>(state_->sockets.size()); }

std::vector<wp::Hello> WorkerLinks::accept_job(int expected, clock_type::time_point deadline,
                                               const std::function<bool()>& gone) {
  drop_job();
  State& s = *state_;
  struct Candidate {
    std::unique_ptr<tcp::socket> socket;
    std::shared_ptr<Incoming> hello;
    std::string peer;
  };
  std::vector<std::unique_ptr<Candidate>> candidates;
  std::map<int, wp::Hello> hellos;
  std::map<int, std::unique_ptr<tcp::socket>> by_rank;
  int world = expected;
  std::function<void()> accept_next = [&] {
    auto socket = std::make_unique<tcp::socket>(s.io);
    tcp::socket& target = *socket;
    s.acceptor.async_accept(target, [&, owned = std::move(socket)](const boost::system::error_code& ec) mutable {
      if (ec) return;  // cancelled at the end, or a failed accept: nothing to keep
      boost::system::error_code ignored;
      owned->set_option(tcp::no_delay(true), ignored);
      auto candidate = std::make_unique<Candidate>();
      candidate->peer = "worker connection from " + owned->remote_endpoint(ignored).address().to_string();
      candidate->hello = std::make_shared<Incoming>();
      candidate->socket = std::move(owned);
      read_message(*candidate->socket, candidate->hello, candidate->peer);
      candidates.push_back(std::move(candidate));
      accept_next();
    });
  };
  accept_next();
  // A hello that arrived is checked; a bad connection is dropped (it may be a stray client), not fatal.
  const auto settle = [&] {
    for (auto& candidate : candidates) {
      if (!candidate || !candidate->hello->done) continue;
      const Incoming& in = *candidate->hello;
      std::string problem = in.error;
      if (problem.empty() && in.message.kind != wp::Kind::kHello)
        problem = std::string("sent ") + wp::kind_name(in.message.kind) + " before hello";
      const wp::Hello& hello = in.message.hello;
      if (problem.empty() && hello.version != wp::kVersion)
        problem = "speaks worker protocol version " + std::to_string(hello.version) + ", this coordinator " +
                  std::to_string(wp::kVersion) + " (run the same epic build on both sides)";
      if (problem.empty() && world == 0) world = hello.world;
      if (problem.empty() && hello.world != world)
        problem = "belongs to a job of " + std::to_string(hello.world) + " ranks, expected " + std::to_string(world);
      if (problem.empty() && (hello.rank < 0 || hello.rank >= world))
        problem = "names rank " + std::to_string(hello.rank) + " outside 0.." + std::to_string(world - 1);
      if (problem.empty() && hellos.count(hello.rank)) problem = "names rank " + std::to_string(hello.rank) + " twice";
      if (!problem.empty()) {
        std::fprintf(stderr, "epic serve: dropped a %s: %s\n", candidate->peer.c_str(), problem.c_str());
      } else {
        hellos[hello.rank] = hello;
        by_rank[hello.rank] = std::move(candidate->socket);
      }
      candidate.reset();
    }
    return world > 0 && static_cast<int>(hellos.size()) == world;
  };
  const bool complete = s.run_until(settle, deadline, gone);
  // Stop accepting and reading; run every handler out before the locals they use go away.
  boost::system::error_code ignored;
  s.acceptor.cancel(ignored);
  for (auto& candidate : candidates)
    if (candidate && candidate->socket) candidate->socket->close(ignored);
  s.io.restart();
  s.io.run();
  if (!complete) {
    for (auto& [rank, socket] : by_rank) socket->close(ignored);
    throw Error(ErrorCode::kCommunication,
                gone && gone() ? "the worker job ended before all its ranks connected (its output above says why)"
                               : "the worker job's ranks did not all connect in time (" +
                                     std::to_string(hellos.size()) + " of " +
                                     (world > 0 ? std::to_string(world) : std::string("?")) + " said hello)");
  }
  std::vector<wp::Hello> ordered;
  for (auto& [rank, socket] : by_rank) s.sockets.push_back(std::move(socket));
  for (auto& [rank, hello] : hellos) ordered.push_back(hello);
  return ordered;
}

std::vector<wp::Message> WorkerLinks::exchange(const std::vector<wp::Message>& out,
                                               clock_type::time_point deadline, bool read_replies) {
  State& s = *state_;
  const int n = ranks();
  const bool writing = !out.empty();
  EPIC_CHECK(!writing || static_cast<int>(out.size()) == n, ErrorCode::kInternal, "one message per rank");
  std::vector<std::string> frames(n);
  std::vector<std::string> write_errors(n);
  std::vector<char> written(n, writing ? 0 : 1);
  std::vector<std::shared_ptr<Incoming>> replies(n);
  for (int r = 0; r < n; ++r) {
    if (writing) {
      frames[r] = wp::encode(out[r]);
      asio::async_write(*s.sockets[r], asio::buffer(frames[r]),
                        [&write_errors, &written, r](const boost::system::error_code& ec, size_t) {
                          if (ec) write_errors[r] = ec.message();
                          written[r] = 1;
                        });
    }
    replies[r] = std::make_shared<Incoming>();
    if (read_replies) read_message(*s.sockets[r], replies[r], "worker rank " + std::to_string(r));
  }
  int failed = -1;
  std::string why;
  const auto settled = [&] {
    bool all = true;
    for (int r = 0; r < n; ++r) {
      if (!write_errors[r].empty() && failed < 0) failed = r, why = "cannot be written to: " + write_errors[r];
      if (replies[r]->done && !replies[r]->error.empty() && failed < 0) failed = r, why = replies[r]->error;
      if (replies[r]->done && replies[r]->error.empty() && replies[r]->message.kind == wp::Kind::kError &&
          failed < 0)
        failed = r, why = "failed: " + replies[r]->message.error;
      all = all && (read_replies ? replies[r]->done : written[r] != 0);
    }
    return all || failed >= 0;
  };
  const bool in_time = s.run_until(settled, deadline);
  if (failed < 0 && !in_time) {
    for (int r = 0; r < n; ++r)
      if (read_replies ? !replies[r]->done : !written[r]) {
        failed = r;
        why = read_replies ? "did not answer in time" : "could not be written to in time";
        break;
      }
  }
  s.drain();  // pending writes and reads are cancelled (their handlers run) before `frames` and `replies` go
  if (failed >= 0)
    throw Error(ErrorCode::kCommunication, "worker rank " + std::to_string(failed) + " " + why);
  std::vector<wp::Message> messages;
  if (read_replies)
    for (auto& reply : replies) messages.push_back(std::move(reply->message));
  return messages;
}

void WorkerLinks::send_all(const wp::Message& message, clock_type::time_point deadline) {
  State& s = *state_;
  const std::string frame = wp::encode(message);
  int pending = 0;
  for (auto& socket : s.sockets) {
    ++pending;
    asio::async_write(*socket, asio::buffer(frame), [&pending](const boost::system::error_code&, size_t) { --pending; });
  }
  s.run_until([&] { return pending == 0; }, deadline);
  s.drain();
}

void WorkerLinks::drop_job() {
  boost::system::error_code ignored;
  for (auto& socket : state_->sockets)
    if (socket) socket->close(ignored);
  state_->sockets.clear();
}

struct CoordinatorLink::State {
  asio::io_context io;
  tcp::socket socket{io};
};

CoordinatorLink::CoordinatorLink(const std::string& host, uint16_t port, std::chrono::milliseconds patience)
    : state_(std::make_unique<State>()) {
  const auto deadline = std::chrono::steady_clock::now() + patience;
  const tcp::endpoint endpoint = endpoint_of(state_->io, host, port);
  while (true) {
    boost::system::error_code ec;
    state_->socket.connect(endpoint, ec);
    if (!ec) break;
    state_->socket.close();
    if (std::chrono::steady_clock::now() >= deadline)
      throw Error(ErrorCode::kCommunication, "cannot connect to the coordinator at " + host + ":" +
                                                 std::to_string(port) + ": " + ec.message() +
                                                 " (is `epic serve` listening there for workers?)");
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  boost::system::error_code ignored;
  state_->socket.set_option(tcp::no_delay(true), ignored);
  state_->socket.set_option(asio::socket_base::keep_alive(true), ignored);
}

CoordinatorLink::~CoordinatorLink() = default;

void CoordinatorLink::send(const wp::Message& message) {
  boost::system::error_code ec;
  asio::write(state_->socket, asio::buffer(wp::encode(message)), ec);
  if (ec) throw Error(ErrorCode::kCommunication, "cannot write to the coordinator: " + ec.message());
}

wp::Message CoordinatorLink::receive() {
  std::string header(wp::kFrameHeaderBytes, '\0');
  boost::system::error_code ec;
  asio::read(state_->socket, asio::buffer(header), ec);
  if (ec)
    throw Error(ErrorCode::kCommunication, ec == asio::error::eof ? std::string("the coordinator closed the connection")
                                                                   : "reading from the coordinator: " + ec.message());
  std::string payload(wp::payload_length(header, "the coordinator"), '\0');
  asio::read(state_->socket, asio::buffer(payload), ec);
  if (ec) throw Error(ErrorCode::kCommunication, "reading from the coordinator: " + ec.message());
  return wp::decode(payload, "the coordinator");
}

std::pair<std::string, uint16_t> parse_host_port(const std::string& text, const std::string& flag) {
  const size_t colon = text.rfind(':');
  const auto bad = [&] {
    return Error(ErrorCode::kInvalidArgument,
                 flag + " '" + text + "' is not HOST:PORT (e.g. 127.0.0.1:8100, a port in 1..65535)");
  };
  if (colon == std::string::npos || colon == 0 || colon + 1 == text.size()) throw bad();
  const std::string port_text = text.substr(colon + 1);
  if (port_text.size() > 5 || port_text.find_first_not_of("0123456789") != std::string::npos) throw bad();
  const int port = std::stoi(port_text);
  if (port < 1 || port > 65535) throw bad();
  std::string host = text.substr(0, colon);
  if (host.size() > 2 && host.front() == '[' && host.back() == ']') host = host.substr(1, host.size() - 2);
  return {host, static_cast<uint16_t>(port)};
}

}  // namespace epic
