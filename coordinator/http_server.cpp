// The HTTP/1.1 front of epic serve (http_server.h): Beast's parser reads requests, answers are written as raw
// HTTP/1.1 bytes (a whole response, or chunked transfer encoding for streams) on the one I/O thread.
#include "coordinator/http_server.h"

#include <atomic>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <deque>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <thread>

#include "kernels/error.h"

namespace epic {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

constexpr std::chrono::seconds kWriteTimeout{60};  // a client that stops reading its answer is cut off

std::string error_body(const std::string& message) {
  // OpenAI's error shape, for the errors the transport itself answers (413, 431, 400 before any handler).
  std::string escaped;
  for (char c : message) escaped += (c == '"' || c == '\\') ? std::string("\\") + c : std::string(1, c);
  return "{\"error\":{\"message\":\"" + escaped +
         "\",\"type\":\"invalid_request_error\",\"param\":null,\"code\":null}}";
}

class Session;

// One call on an HttpExchange, queued in the order the calls were made.
struct AnswerOp {
  enum Kind { kRespond, kStartStream, kSend, kEnd } kind = kSend;
  int status = 0;
  std::string content_type;
  std::string body;  // a response's body, or a stream's chunk
  std::vector<std::pair<std::string, std::string>> headers;
};
using QueuedOps = std::vector<std::pair<std::shared_ptr<Session>, AnswerOp>>;

// The open connections, for stop(); shared so that a session ending late still finds it. Also the outbox:
// every exchange call from any thread, in call order, applied by one posted drain (a step that sends a
// token to every stream wakes the I/O thread once, not once per stream).
struct Registry {
  std::mutex mutex;
  std::set<Session*> sessions;
  std::mutex outbox_mutex;
  QueuedOps outbox;
  bool drain_posted = false;
};

void drain_outbox(const std::shared_ptr<Registry>& registry);

// The calls an HttpSendBatch on this thread holds back until it ends.
thread_local QueuedOps* batch_ops = nullptr;

class Session : public HttpExchange, public std::enable_shared_from_this<Session> {
 public:
  Session(tcp::socket socket, const HttpServerOptions& options, const HttpHandler& handler,
          std::shared_ptr<Registry> registry)
      : stream_(std::move(socket)), options_(options), handler_(handler), registry_(std::move(registry)) {
    std::lock_guard<std::mutex> lock(registry_->mutex);
    registry_->sessions.insert(this);
  }
  ~Session() override {
    std::lock_guard<std::mutex> lock(registry_->mutex);
    registry_->sessions.erase(this);
  }

  void read_request() {
    parser_.emplace();
    parser_->body_limit(options_.max_body_bytes);
    stream_.expires_after(options_.read_timeout);
    answered_ = false;
    http::async_read(stream_, buffer_, *parser_,
                     [self = shared_from_this()](beast::error_code error, size_t) { self->on_read(error); });
  }

  void close_now() {
    closed_ = true;
    beast::error_code ignored;
    stream_.socket().shutdown(tcp::socket::shutdown_both, ignored);
    stream_.socket().close(ignored);
  }

  // ---- HttpExchange (any thread) ----
  // Every call goes into the session's outbox, in call order, and the I/O thread applies the outbox in that
  // order. (Posting each call to the io_context instead loses the order across threads: Asio runs what the
  // I/O thread posts for itself, e.g. start_stream from the handler, only after the current handler, while a
  // post from the scheduler thread in between goes straight into the queue: an end() could overtake its
  // stream's start and be dropped, leaving the client waiting forever.)
  void respond(int status, const std::string& content_type, std::string body,
               std::vector<std::pair<std::string, std::string>> headers) override {
    enqueue({AnswerOp::kRespond, status, content_type, std::move(body), std::move(headers)});
  }
  void start_stream(const std::string& content_type) override {
    enqueue({AnswerOp::kStartStream, 200, content_type, {}, {}});
  }
  void send(std::string chunk) override {
    if (chunk.empty()) return;  // an empty chunk would end the stream
    enqueue({AnswerOp::kSend, 0, {}, std::move(chunk), {}});
  }
  void end() override { enqueue({AnswerOp::kEnd, 0, {}, {}, {}}); }

  // On the I/O thread: one queued call.
  void apply(AnswerOp& op) {
    switch (op.kind) {
      case AnswerOp::kRespond: apply_respond(op); break;
      case AnswerOp::kStartStream: apply_start_stream(op.content_type); break;
      case AnswerOp::kSend: apply_send(op.body); break;
      case AnswerOp::kEnd: apply_end(); break;
    }
  }

  bool closed() const override { return closed_; }
  void on_close(std::function<void()> callback) override {
    net::post(stream_.get_executor(), [self = shared_from_this(), callback = std::move(callback)]() mutable {
      if (self->closed_ && !self->ended_) {
        callback();
        return;
      }
      self->on_close_ = std::move(callback);
    });
  }

 private:
  void enqueue(AnswerOp op) {
    if (batch_ops != nullptr) {  // an HttpSendBatch is open on this thread: handed over when it ends
      batch_ops->emplace_back(shared_from_this(), std::move(op));
      return;
    }
    QueuedOps one;
    one.emplace_back(shared_from_this(), std::move(op));
    hand_over(registry_, one);
  }

 public:
  // Appends `ops` to the outbox (one lock) and posts the drain unless one is pending.
  static void hand_over(const std::shared_ptr<Registry>& registry, QueuedOps& ops) {
    if (ops.empty()) return;
    net::any_io_executor executor = ops.front().first->stream_.get_executor();
    bool post = false;
    {
      std::lock_guard<std::mutex> lock(registry->outbox_mutex);
      for (auto& op : ops) registry->outbox.push_back(std::move(op));
      post = !registry->drain_posted;
      registry->drain_posted = true;
    }
    ops.clear();
    if (post) net::post(executor, [registry] { drain_outbox(registry); });
  }
  const std::shared_ptr<Registry>& registry() const { return registry_; }

 private:
  void apply_respond(AnswerOp& op) {
    if (answered_ || closed_) return;
    answered_ = true;
    stop_watching();  // the answer's writes, then the next request's reads, take the socket
    write(head(op.status, op.content_type, op.headers, op.body.size(), keep_alive_) + op.body, /*last=*/true);
  }
  void apply_start_stream(const std::string& content_type) {
    if (answered_ || closed_) return;
    answered_ = true;
    streaming_ = true;
    keep_alive_ = false;  // a stream ends its connection
    write(head(200, content_type, {{"Cache-Control", "no-cache"}}, std::nullopt, false), false);
    if (!watching_) watch_for_disconnect();
  }
  // One chunk of the stream, in HTTP chunked encoding.
  void apply_send(const std::string& chunk) {
    if (!streaming_ || ended_ || closed_) return;
    char size[24];
    const int length = std::snprintf(size, sizeof(size), "%zx\r\n", chunk.size());
    std::string bytes;
    bytes.reserve(static_cast<size_t>(length) + chunk.size() + 2);
    bytes.append(size, static_cast<size_t>(length));
    bytes += chunk;
    bytes += "\r\n";
    write(std::move(bytes), false);
  }
  void apply_end() {
    if (!streaming_ || ended_ || closed_) return;
    ended_ = true;
    write("0\r\n\r\n", true);
  }

  void on_read(beast::error_code error) {
    if (error == http::error::end_of_stream || error == net::error::eof || closed_) return close_now();
    if (error == http::error::body_limit)
      return fail(413, "the request body is over this server's limit of " +
                           std::to_string(options_.max_body_bytes) + " bytes");
    if (error == http::error::header_limit) return fail(431, "the request headers are too large");
    if (error == beast::error::timeout) return close_now();  // too slow: no answer, no thread held
    if (error) return fail(400, std::string("malformed HTTP request: ") + error.message());
    stream_.expires_never();  // generation may take a while; writes set their own deadline
    const http::request<http::string_body>& message = parser_->get();
    keep_alive_ = message.keep_alive();
    HttpRequest request;
    request.method = std::string(message.method_string());
    request.target = std::string(message.target());
    request.content_type = std::string(message[http::field::content_type]);
    request.body = message.body();
    try {
      handler_(request, shared_from_this());
    } catch (const std::exception& e) {
      respond(500, "application/json", error_body(std::string("internal error: ") + e.what()), {});
    }
    // Until the answer starts (its respond() or start_stream() is posted behind this), a client that goes
    // away is noticed too: a whole (non-streamed) completion is cancelled instead of computed for nobody.
    if (!answered_ && !closed_) watch_for_disconnect();
  }

  void fail(int status, const std::string& message) {
    answered_ = true;
    keep_alive_ = false;
    const std::string body = error_body(message);
    write(head(status, "application/json", {}, body.size(), false) + body, true);
  }

  std::string head(int status, const std::string& content_type,
                   const std::vector<std::pair<std::string, std::string>>& headers,
                   std::optional<size_t> content_length, bool keep_alive) const {
    std::string text = "HTTP/1.1 " + std::to_string(status) + " " + http_status_text(status) + "\r\n";
    text += "Server: epic\r\nContent-Type: " + content_type + "\r\n";
    text += content_length ? "Content-Length: " + std::to_string(*content_length) + "\r\n"
                           : std::string("Transfer-Encoding: chunked\r\n");
    text += keep_alive ? "Connection: keep-alive\r\n" : "Connection: close\r\n";
    for (const auto& [name, value] : headers) text += name + ": " + value + "\r\n";
    return text + "\r\n";
  }

  // Queues bytes; `last`: the answer is complete after them (then read the next request or close). Bytes
  // behind the write in flight join one buffer, so a slow client gets one write for what piled up.
  void write(std::string bytes, bool last) {
    if (queue_.size() > 1 && !queue_.back().second) {
      queue_.back().first += bytes;
      queue_.back().second = last;
    } else {
      queue_.push_back({std::move(bytes), last});
    }
    if (!writing_) write_next();
  }
  void write_next() {
    if (queue_.empty() || closed_) {
      writing_ = false;
      return;
    }
    writing_ = true;
    stream_.expires_after(kWriteTimeout);
    net::async_write(stream_, net::buffer(queue_.front().first),
                     [self = shared_from_this()](beast::error_code error, size_t) {
                       const bool last = self->queue_.front().second;
                       self->queue_.pop_front();
                       if (error) return self->gone();
                       if (last) {
                         self->writing_ = false;
                         if (self->keep_alive_ && !self->streaming_) return self->read_request();
                         return self->close_now();
                       }
                       self->stream_.expires_never();
                       self->write_next();
                     });
  }

  // While a request waits for its answer or a stream for tokens, a read on the socket ends as soon as the
  // client goes away. A byte that does arrive (a pipelined next request) is kept for the next read, and the
  // watch ends there.
  void watch_for_disconnect() {
    watching_ = true;
    stream_.socket().async_read_some(
        net::buffer(watch_byte_), [self = shared_from_this()](beast::error_code error, size_t bytes) {
          self->watching_ = false;
          if (error == net::error::operation_aborted && !self->closed_) return;  // stop_watching()
          if (error) return self->gone();
          if (bytes > 0 && !self->streaming_) {
            self->buffer_.commit(net::buffer_copy(self->buffer_.prepare(bytes), net::buffer(self->watch_byte_, bytes)));
            return;
          }
          if (!self->ended_ && !self->closed_) self->watch_for_disconnect();
        });
  }
  void stop_watching() {
    if (!watching_) return;
    beast::error_code ignored;
    stream_.socket().cancel(ignored);
  }
  void gone() {
    if (closed_) return;
    const bool unfinished = !ended_;
    close_now();
    if (unfinished && on_close_) {
      auto callback = std::move(on_close_);
      on_close_ = nullptr;
      callback();
    }
  }

  beast::tcp_stream stream_;
  beast::flat_buffer buffer_;
  std::optional<http::request_parser<http::string_body>> parser_;
  const HttpServerOptions& options_;
  const HttpHandler& handler_;
  std::shared_ptr<Registry> registry_;
  bool answered_ = false, streaming_ = false, ended_ = false, writing_ = false, keep_alive_ = false;
  std::atomic<bool> closed_{false};
  std::deque<std::pair<std::string, bool>> queue_;
  std::function<void()> on_close_;
  char watch_byte_[1] = {0};
  bool watching_ = false;  // a watch_for_disconnect read is pending

};

void drain_outbox(const std::shared_ptr<Registry>& registry) {
  QueuedOps ops;
  {
    std::lock_guard<std::mutex> lock(registry->outbox_mutex);
    ops.swap(registry->outbox);
    registry->drain_posted = false;
  }
  for (auto& [session, op] : ops) session->apply(op);
}

}  // namespace

HttpSendBatch::HttpSendBatch() {
  if (batch_ops == nullptr) {
    ops_ = new QueuedOps;
    batch_ops = static_cast<QueuedOps*>(ops_);
  }
}

HttpSendBatch::~HttpSendBatch() {
  if (ops_ == nullptr) return;  // an inner batch: the outer one hands over
  auto* ops = static_cast<QueuedOps*>(ops_);
  batch_ops = nullptr;
  // Calls on several servers' exchanges: each server's own outbox, in order within each.
  while (!ops->empty()) {
    const std::shared_ptr<Registry> registry = ops->front().first->registry();
    QueuedOps mine, others;
    for (auto& op : *ops) (op.first->registry() == registry ? mine : others).push_back(std::move(op));
    Session::hand_over(registry, mine);
    ops->swap(others);
  }
  delete ops;
}

struct HttpServer::Impl {
  HttpServerOptions options;
  HttpHandler handler;
  std::shared_ptr<Registry> registry = std::make_shared<Registry>();
  net::io_context io{1};
  tcp::acceptor acceptor{io};
  std::thread thread;
  bool stopped = false;

  void accept() {
    acceptor.async_accept([this](beast::error_code error, tcp::socket socket) {
      if (error) {
        if (acceptor.is_open()) accept();
        return;
      }
      std::make_shared<Session>(std::move(socket), options, handler, registry)->read_request();
      accept();
    });
  }
};

HttpServer::HttpServer(HttpServerOptions options, HttpHandler handler) : impl_(std::make_unique<Impl>()) {
  impl_->options = std::move(options);
  impl_->handler = std::move(handler);
  beast::error_code error;
  const net::ip::address address = net::ip::make_address(impl_->options.host, error);
  EPIC_CHECK(!error, ErrorCode::kInvalidArgument,
             "--host '" + impl_->options.host + "' is not an IP address (e.g. 127.0.0.1 or 0.0.0.0)");
  const tcp::endpoint endpoint(address, impl_->options.port);
  const std::string where = impl_->options.host + ":" + std::to_string(impl_->options.port);
  impl_->acceptor.open(endpoint.protocol(), error);
  if (!error) impl_->acceptor.set_option(net::socket_base::reuse_address(true), error);
  if (!error) impl_->acceptor.bind(endpoint, error);
  if (!error) impl_->acceptor.listen(net::socket_base::max_listen_connections, error);
  EPIC_CHECK(
      !error, ErrorCode::kIo,
      "cannot listen on " + where + ": " + error.message() + " (another server on that port? pick --port)");
}

HttpServer::~HttpServer() { stop(); }

void HttpServer::start() {
  impl_->accept();
  impl_->thread = std::thread([this] { impl_->io.run(); });
}

void HttpServer::stop() {
  if (impl_->stopped) return;
  impl_->stopped = true;
  if (!impl_->thread.joinable()) return;
  net::post(impl_->io, [this] {
    beast::error_code ignored;
    impl_->acceptor.close(ignored);
    {
      std::lock_guard<std::mutex> lock(impl_->registry->mutex);
      for (Session* session : impl_->registry->sessions) session->close_now();
    }
    impl_->io.stop();
  });
  impl_->thread.join();
}

uint16_t HttpServer::port() const { return impl_->acceptor.local_endpoint().port(); }

const char* http_status_text(int status) {
  switch (status) {
    case 200:
      return "OK";
    case 400:
      return "Bad Request";
    case 404:
      return "Not Found";
    case 405:
      return "Method Not Allowed";
    case 413:
      return "Payload Too Large";
    case 415:
      return "Unsupported Media Type";
    case 429:
      return "Too Many Requests";
    case 431:
      return "Request Header Fields Too Large";
    case 500:
      return "Internal Server Error";
    case 503:
      return "Service Unavailable";
    default:
      return "Status";
  }
}

}  // namespace epic
