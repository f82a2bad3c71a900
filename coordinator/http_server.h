// The HTTP/1.1 front of `epic serve` (issue 11), on Boost.Beast over Boost.Asio: one I/O thread accepts
// connections, reads each request with a deadline (a client that trickles its headers or body is cut off:
// no slow-loris) and a body limit (413 past it), and hands it to the handler with an HttpExchange through
// which the answer goes back: whole, or as a stream of chunks (server-sent events) written as the scheduler
// produces them, from any thread. A client that goes away mid-stream is noticed at once (a read on the
// socket ends) and reported to the exchange's close callback, so its sequence can be cancelled.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

namespace epic {

struct HttpRequest {
  std::string method;  // "GET", "POST", ...
  std::string target;  // path and query, e.g. "/v1/completions"
  std::string content_type;
  std::string body;
};

// One request's answer. Thread-safe: every call is queued onto the connection's I/O strand. Exactly one of
// respond() or start_stream() ... end() is expected; later calls are ignored.
class HttpExchange {
 public:
  virtual ~HttpExchange() = default;
  virtual void respond(int status, const std::string& content_type, std::string body,
                       std::vector<std::pair<std::string, std::string>> headers = {}) = 0;
  // 200 with chunked transfer encoding; the connection closes after end().
  virtual void start_stream(const std::string& content_type) = 0;
  virtual void send(std::string chunk) = 0;
  virtual void end() = 0;
  // Whether the client has gone (a stream's writes then go nowhere).
  virtual bool closed() const = 0;
  // Called once, on the I/O thread, when the client disconnects before the answer ended.
  virtual void on_close(std::function<void()> callback) = 0;
};

using HttpHandler = std::function<void(const HttpRequest& request, std::shared_ptr<HttpExchange> exchange)>;

// While one is alive on a thread, the HttpExchange calls that thread makes are held back and handed to the
// I/O thread together when it ends (one lock, one wake-up), still in call order: the scheduler opens one
// around each step's tokens. Nested batches hand over with the outermost.
class HttpSendBatch {
 public:
  HttpSendBatch();
  ~HttpSendBatch();
  HttpSendBatch(const HttpSendBatch&) = delete;
  HttpSendBatch& operator=(const HttpSendBatch&) = delete;

 private:
  void* ops_ = nullptr;  // the calls held back (owned by the outermost batch)
};

struct HttpServerOptions {
  std::string host = "127.0.0.1";
  uint16_t port = 8000;  // 0: any free port (port() says which)
  uint64_t max_body_bytes = uint64_t{1} << 20;
  std::chrono::milliseconds read_timeout{10000};  // a whole request (headers and body) must arrive in this
};

class HttpServer {
 public:
  // Binds and listens; Error(kIo) naming the address when it cannot (in use, not an address of this host).
  HttpServer(HttpServerOptions options, HttpHandler handler);
  // stop(). Every HttpExchange handed out must be released before (its socket lives in the server's I/O).
  ~HttpServer();
  HttpServer(const HttpServer&) = delete;
  HttpServer& operator=(const HttpServer&) = delete;

  void start();  // the I/O thread
  // Stops accepting and closes every connection; waits for the I/O thread. Idempotent.
  void stop();
  uint16_t port() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The reason phrase clients show for a status we send.
const char* http_status_text(int status);

}  // namespace epic
