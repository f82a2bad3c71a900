// The epic serve load client (serve_load_client.h).
#include "launch/serve_load_client.h"

#include <utility>  // before Asio: its awaitable.hpp uses std::exchange without it

#include <algorithm>
#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>

namespace epic::cli {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;
using clock_type = std::chrono::steady_clock;

// One client: requests back to back, each on a new connection (a stream ends its connection).
class LoadClient : public std::enable_shared_from_this<LoadClient> {
 public:
  LoadClient(net::io_context& io, const ServeLoadOptions& options, int64_t first_request, ServeLoadResult& result)
      : io_(io), options_(options), next_request_(first_request), result_(result) {
    on_body_ = [this](uint64_t, beast::string_view data, beast::error_code&) {
      consume(data);
      return data.size();
    };
  }

  void start() { next(); }

 private:
  void next() {
    if (done_requests_ == options_.requests_per_client) return;
    ++done_requests_;
    const std::string& prompt =
        options_.prompts_json[static_cast<size_t>(next_request_++) % options_.prompts_json.size()];
    const nlohmann::json body = {{"model", options_.model},
                                 {"prompt", nlohmann::json::parse(prompt)},
                                 {"max_tokens", options_.max_tokens},
                                 {"temperature", options_.temperature},
                                 {"stream", true},
                                 {"stream_options", {{"include_usage", true}}}};
    request_ = {http::verb::post, "/v1/completions", 11};
    request_.set(http::field::host, options_.host);
    request_.set(http::field::content_type, "application/json");
    request_.body() = body.dump();
    request_.prepare_payload();
    stream_.emplace(io_);
    parser_.emplace();
    parser_->body_limit(std::numeric_limits<uint64_t>::max());
    buffer_.clear();
    pending_.clear();
    first_ = last_ = std::nullopt;
    tokens_ = 0;
    saw_done_ = false;
    start_ = clock_type::now();
    parser_->on_chunk_body(on_body_);  // Beast keeps a reference: the callback is a member
    stream_->async_connect(tcp::endpoint(net::ip::make_address(options_.host), options_.port),
                           [self = shared_from_this()](beast::error_code error) {
                             if (error) return self->fail("connect: " + error.message());
                             http::async_write(*self->stream_, self->request_,
                                               [self](beast::error_code write_error, size_t) {
                                                 if (write_error) return self->fail("write: " + write_error.message());
                                                 self->read();
                                               });
                           });
  }
  void read() {
    http::async_read(*stream_, buffer_, *parser_, [self = shared_from_this()](beast::error_code error, size_t) {
      if (error && error != http::error::end_of_stream) return self->fail("read: " + error.message());
      const int status = self->parser_->get().result_int();
      if (status != 200) return self->fail("status " + std::to_string(status));
      if (!self->saw_done_) return self->fail("the stream ended without data: [DONE]");
      self->result_.completion_tokens += self->tokens_;
      ++self->result_.requests;
      self->next();
    });
  }
  // Server-sent events as they arrive: token chunks time the stream, the usage chunk counts its tokens.
  void consume(beast::string_view data) {
    pending_.append(data.data(), data.size());
    size_t end;
    while ((end = pending_.find("\n\n")) != std::string::npos) {
      const std::string event = pending_.substr(0, end);
      pending_.erase(0, end + 2);
      if (event.rfind("data: ", 0) != 0) continue;
      const std::string_view payload = std::string_view(event).substr(6);
      if (payload == "[DONE]") {
        saw_done_ = true;
        continue;
      }
      if (payload.find("\"usage\"") != std::string_view::npos) {
        const nlohmann::json chunk = nlohmann::json::parse(payload, nullptr, false);
        if (chunk.is_object() && chunk.contains("usage") && chunk["usage"].is_object())
          tokens_ = chunk["usage"].value("completion_tokens", int64_t{0});
        continue;
      }
      if (payload.find("\"text\":\"\"") != std::string_view::npos) continue;  // the final, empty chunk
      const auto now = clock_type::now();
      if (!first_) {
        first_ = now;
        result_.first_token_seconds.push_back(std::chrono::duration<double>(now - start_).count());
      } else {
        result_.inter_token_seconds.push_back(std::chrono::duration<double>(now - *last_).count());
      }
      last_ = now;
    }
  }
  void fail(const std::string& why) {
    ++result_.errors;
    ++result_.requests;
    if (result_.error_samples.size() < 5) result_.error_samples.push_back(why);
    next();
  }

  net::io_context& io_;
  const ServeLoadOptions& options_;
  int64_t next_request_;
  int64_t done_requests_ = 0;
  ServeLoadResult& result_;
  std::optional<beast::tcp_stream> stream_;
  std::optional<http::response_parser<http::empty_body>> parser_;
  http::request<http::string_body> request_;
  beast::flat_buffer buffer_;
  std::string pending_;
  clock_type::time_point start_;
  std::optional<clock_type::time_point> first_, last_;
  int64_t tokens_ = 0;
  bool saw_done_ = false;
  std::function<size_t(uint64_t, beast::string_view, beast::error_code&)> on_body_;
};

}  // namespace

ServeLoadResult run_serve_load(const ServeLoadOptions& options) {
  ServeLoadResult result;
  if (options.prompts_json.empty() || options.clients <= 0) return result;
  net::io_context io;
  const auto start = clock_type::now();
  for (int c = 0; c < options.clients; ++c)
    std::make_shared<LoadClient>(io, options, c * options.requests_per_client, result)->start();
  io.run_for(options.timeout);
  result.wall_seconds = std::chrono::duration<double>(clock_type::now() - start).count();
  const int64_t expected = options.clients * options.requests_per_client;
  if (result.requests < expected) {
    result.errors += expected - result.requests;
    result.error_samples.push_back(std::to_string(expected - result.requests) + " requests still open at the timeout");
    result.requests = expected;
  }
  return result;
}

double quantile(std::vector<double> values, double q) {
  if (values.empty()) return std::nan("");
  std::sort(values.begin(), values.end());
  const size_t at = std::min(values.size() - 1, static_cast<size_t>(q * static_cast<double>(values.size())));
  return values[at];
}

}  // namespace epic::cli
