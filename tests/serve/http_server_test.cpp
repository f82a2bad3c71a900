// epic serve's HTTP front (coordinator/http_server.h) on 127.0.0.1 with a test handler, driven by a Beast
// client: whole answers on a kept-alive connection, a chunked stream written from another thread, a body over
// the limit (413 in OpenAI's error shape), malformed requests (400), a client that trickles its headers (cut
// off at the read deadline, the server still serving others), and a client that leaves mid-stream (the
// exchange's close callback fires).
#include "coordinator/http_server.h"

#include <gtest/gtest.h>

#include <boost/asio.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <condition_variable>
#include <future>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

namespace epic {
namespace {

namespace beast = boost::beast;
namespace http = beast::http;
namespace net = boost::asio;
using tcp = net::ip::tcp;

class HttpServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    HttpServerOptions options;
    options.port = 0;
    options.max_body_bytes = 1000;
    options.read_timeout = std::chrono::milliseconds(300);
    server_ = std::make_unique<HttpServer>(
        options, [this](const HttpRequest& request, std::shared_ptr<HttpExchange> exchange) {
          handle(request, std::move(exchange));
        });
    server_->start();
  }
  void TearDown() override {
    for (std::thread& thread : threads_) thread.join();
    server_->stop();
  }

  void handle(const HttpRequest& request, std::shared_ptr<HttpExchange> exchange) {
    if (request.target == "/echo") {
      exchange->respond(200, "text/plain", request.method + " " + request.body);
    } else if (request.target == "/stream") {
      exchange->start_stream("text/event-stream");
      threads_.emplace_back([exchange] {  // as the scheduler does: from its own thread
        for (int i = 0; i < 3; ++i) exchange->send("data: " + std::to_string(i) + "\n\n");
        exchange->end();
      });
    } else if (request.target == "/race") {
      // The whole stream sent and ended from another thread while this handler still runs (a fast engine):
      // the answer must still come in call order, start first (Asio runs what this I/O thread posts only
      // after the handler, while the other thread's posts go straight into the queue).
      exchange->start_stream("text/event-stream");
      std::thread fast([exchange] {
        for (int i = 0; i < 3; ++i) exchange->send("data: " + std::to_string(i) + "\n\n");
        exchange->end();
      });
      fast.join();
    } else if (request.target == "/hold") {  // a stream that waits: the client leaves before it ends
      exchange->start_stream("text/event-stream");
      exchange->send("data: first\n\n");
      exchange->on_close([this] {
        std::lock_guard<std::mutex> lock(mutex_);
        closed_ = true;
        changed_.notify_all();
      });
      held_ = exchange;
    } else {
      exchange->respond(404, "application/json", "{}");
    }
  }

  tcp::socket connect() {
    tcp::socket socket(io_);
    socket.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server_->port()));
    return socket;
  }
  http::response<http::string_body> ask(tcp::socket& socket, http::verb verb, const std::string& target,
                                        const std::string& body = "") {
    http::request<http::string_body> request(verb, target, 11);
    request.set(http::field::host, "127.0.0.1");
    request.body() = body;
    request.prepare_payload();
    http::write(socket, request);
    beast::flat_buffer buffer;
    http::response<http::string_body> response;
    http::read(socket, buffer, response);
    return response;
  }

  net::io_context io_;
  std::unique_ptr<HttpServer> server_;
  std::vector<std::thread> threads_;
  std::shared_ptr<HttpExchange> held_;
  std::mutex mutex_;
  std::condition_variable changed_;
  bool closed_ = false;
};

TEST_F(HttpServerTest, AnswersTwoRequestsOnOneKeptAliveConnection) {
  tcp::socket socket = connect();
  http::response<http::string_body> response = ask(socket, http::verb::post, "/echo", "hello");
  EXPECT_EQ(response.result_int(), 200);
  EXPECT_EQ(response.body(), "POST hello");
  EXPECT_TRUE(response.keep_alive());
  response = ask(socket, http::verb::get, "/echo");
  EXPECT_EQ(response.body(), "GET ");
  response = ask(socket, http::verb::get, "/nowhere");
  EXPECT_EQ(response.result_int(), 404);
}

TEST_F(HttpServerTest, StreamsChunksWrittenFromAnotherThread) {
  tcp::socket socket = connect();
  const http::response<http::string_body> response = ask(socket, http::verb::get, "/stream");
  EXPECT_EQ(response.result_int(), 200);
  EXPECT_EQ(response[http::field::content_type], "text/event-stream");
  EXPECT_TRUE(response.chunked());
  EXPECT_EQ(response.body(), "data: 0\n\ndata: 1\n\ndata: 2\n\n");
  EXPECT_FALSE(response.keep_alive());
}

TEST_F(HttpServerTest, AStreamEndedFromAnotherThreadBeforeTheHandlerReturnsStillArrivesWhole) {
  for (int round = 0; round < 20; ++round) {
    beast::tcp_stream stream(io_);
    stream.connect(tcp::endpoint(net::ip::make_address("127.0.0.1"), server_->port()));
    http::request<http::string_body> request(http::verb::get, "/race", 11);
    request.set(http::field::host, "127.0.0.1");
    http::write(stream, request);
    beast::flat_buffer buffer;
    http::response<http::string_body> response;
    stream.expires_after(std::chrono::seconds(5));  // a lost end() would leave the client waiting
    std::promise<beast::error_code> done;
    http::async_read(stream, buffer, response, [&](beast::error_code error, size_t) { done.set_value(error); });
    io_.restart();
    io_.run();
    const beast::error_code error = done.get_future().get();
    ASSERT_FALSE(error) << "round " << round << ": " << error.message();
    EXPECT_EQ(response.body(), "data: 0\n\ndata: 1\n\ndata: 2\n\n");
  }
}

TEST_F(HttpServerTest, RefusesABodyOverTheLimitAndMalformedRequests) {
  tcp::socket socket = connect();
  const http::response<http::string_body> response =
      ask(socket, http::verb::post, "/echo", std::string(5000, 'x'));
  EXPECT_EQ(response.result_int(), 413);
  const nlohmann::json error = nlohmann::json::parse(response.body());
  EXPECT_NE(error["error"]["message"].get<std::string>().find("1000 bytes"), std::string::npos);
  EXPECT_EQ(error["error"]["type"], "invalid_request_error");

  tcp::socket bad = connect();
  net::write(bad, net::buffer(std::string("NOT A REQUEST\r\n\r\n")));
  beast::flat_buffer buffer;
  http::response<http::string_body> refused;
  http::read(bad, buffer, refused);
  EXPECT_EQ(refused.result_int(), 400);
}

TEST_F(HttpServerTest, ATricklingClientIsCutOffAndOthersAreStillServed) {
  tcp::socket slow = connect();
  net::write(slow, net::buffer(std::string("GET /echo HTTP/1.1\r\nHost: x\r\n")));  // never finishes
  const auto start = std::chrono::steady_clock::now();
  char byte = 0;
  boost::system::error_code error;
  slow.read_some(net::buffer(&byte, 1), error);  // returns when the server closes the connection
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_TRUE(error == net::error::eof || error == net::error::connection_reset) << error.message();
  EXPECT_LT(waited, 5.0) << "the read deadline (0.3 s) did not cut the connection";
  tcp::socket other = connect();
  EXPECT_EQ(ask(other, http::verb::get, "/echo").result_int(), 200);
}

TEST_F(HttpServerTest, AClientLeavingMidStreamIsReported) {
  {
    tcp::socket socket = connect();
    http::request<http::string_body> request(http::verb::get, "/hold", 11);
    request.set(http::field::host, "127.0.0.1");
    http::write(socket, request);
    beast::flat_buffer buffer;
    http::response_parser<http::string_body> parser;
    http::read_header(socket, buffer, parser);
    EXPECT_EQ(parser.get().result_int(), 200);
  }  // the socket closes here, the stream unfinished
  std::unique_lock<std::mutex> lock(mutex_);
  EXPECT_TRUE(changed_.wait_for(lock, std::chrono::seconds(5), [this] { return closed_; }))
      << "the close callback did not fire";
  EXPECT_TRUE(held_->closed());
  held_->send("data: late\n\n");  // goes nowhere, harmlessly
  held_->end();
  lock.unlock();
  held_.reset();
}

}  // namespace
}  // namespace epic
