// The simulator's asynchronous client against the project's own HTTP server on loopback:
// pooled keep-alive connections bounded by the pool size, source addresses, channels that
// hang up, timeouts, and a kept-alive connection the server closed meanwhile.
#include "sim/http_transport.h"

#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <mutex>
#include <set>
#include <thread>

#include <boost/asio/steady_timer.hpp>

#include "http/http_server.h"

namespace outpost::sim {
namespace {

namespace asio = boost::asio;

class TransportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    router_.add("GET", "/hello", [this](http::Request&& req, http::Responder respond) {
      {
        std::lock_guard lock(mu_);
        remotes_.insert(req.remote.substr(0, req.remote.rfind(':')));  // address, not port
        bearer_ = req.header("authorization");
      }
      respond(http::Response::json(200, R"({"hello":true})"));
    });
    // Holds each request 100 ms, counting how many are held at once.
    router_.add("POST", "/slow", [this](http::Request&& req, http::Responder respond) {
      const int now = ++in_flight_;
      int seen = max_in_flight_.load();
      while (now > seen && !max_in_flight_.compare_exchange_weak(seen, now)) {
      }
      auto timer = std::make_shared<asio::steady_timer>(server_->io_context());
      timer->expires_after(std::chrono::milliseconds(100));
      timer->async_wait([this, timer, body = req.body, respond](const boost::system::error_code&) {
        --in_flight_;
        respond(http::Response::json(200, body));
      });
    });
    // Never answers (until the test ends): for timeouts and hang-ups.
    http::RouteOptions watch;
    watch.watch_hangup = true;
    router_.add(
        "GET", "/hold",
        [this](http::Request&& req, http::Responder respond) {
          std::lock_guard lock(mu_);
          held_.push_back(std::move(respond));
          if (req.hangup) req.hangup->on_hangup([this] { ++hangups_; });
        },
        watch);
    http::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.idle_timeout_ms = 300;  // so a pooled connection goes stale between two tests steps
    server_ = std::make_unique<http::HttpServer>(options, router_);
    ASSERT_TRUE(server_->start().has_value());
  }
  void TearDown() override {
    {
      std::lock_guard lock(mu_);
      for (auto& r : held_) r(http::Response::json(200, "{}"));
      held_.clear();
    }
    server_->stop();
  }

  HttpTransport::Options options(size_t pool, int sources = 0) {
    HttpTransport::Options o;
    o.server = asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), server_->port());
    o.host_header = "127.0.0.1:" + std::to_string(server_->port());
    o.pool_size = pool;
    if (sources > 0) o.sources = loopback_sources(sources);
    return o;
  }

  static agent::ApiRequest get(const std::string& path, int64_t timeout_ms = 5'000) {
    agent::ApiRequest r;
    r.method = "GET";
    r.path = path;
    r.content_type.clear();
    r.timeout_ms = timeout_ms;
    return r;
  }

  http::Router router_;
  std::unique_ptr<http::HttpServer> server_;
  std::mutex mu_;
  std::set<std::string> remotes_;
  std::string bearer_;
  std::vector<http::Responder> held_;
  std::atomic<int> in_flight_{0}, max_in_flight_{0}, hangups_{0};
};

TEST_F(TransportTest, PooledRequestsShareKeptAliveConnectionsUpToThePoolSize) {
  asio::io_context io;
  HttpTransport transport(io, options(3));
  int answered = 0;
  std::vector<std::string> bodies;
  for (int i = 0; i < 12; ++i) {
    agent::ApiRequest r;
    r.method = "POST";
    r.path = "/slow";
    r.body = std::to_string(i);
    transport.send(r, "cred-1", [&](Result<HttpResponse> resp, HttpTransport::Exchange info) {
      ASSERT_TRUE(resp.has_value()) << resp.error().message;
      EXPECT_EQ(resp->status, 200);
      EXPECT_GT(info.wire_bytes, 0);
      EXPECT_GE(info.duration_us, 100'000);  // the route holds each request 100 ms
      bodies.push_back(resp->body);
      ++answered;
    });
  }
  EXPECT_EQ(answered, 0);  // never answered from inside send()
  io.run();
  EXPECT_EQ(answered, 12);
  EXPECT_EQ(max_in_flight_.load(), 3);  // the pool bounds the requests at the server
  const auto stats = transport.stats();
  EXPECT_EQ(stats.opened, 3);  // and its connections were kept alive
  EXPECT_EQ(stats.requests, 12);
  EXPECT_GE(stats.queued_max, 9);
  std::set<std::string> distinct(bodies.begin(), bodies.end());
  EXPECT_EQ(distinct.size(), 12u);
}

TEST_F(TransportTest, ConnectionsComeFromEverySourceAddressAndCarryTheBearer) {
  asio::io_context io;
  HttpTransport transport(io, options(4, 2));
  int ok = 0;
  for (int i = 0; i < 4; ++i) {
    auto channel = transport.channel(static_cast<size_t>(i));
    channel->send(get("/hello"), "d-1.secret",
                  [&, keep = std::shared_ptr<HttpTransport::Channel>(std::move(channel))](
                      Result<HttpResponse> r, HttpTransport::Exchange) {
                    ok += r && r->status == 200 ? 1 : 0;
                  });
  }
  io.run();
  EXPECT_EQ(ok, 4);
  std::lock_guard lock(mu_);
  EXPECT_EQ(bearer_, "Bearer d-1.secret");
  ASSERT_EQ(remotes_.size(), 2u) << "connections should come from 127.0.0.1 and 127.0.0.2";
  EXPECT_TRUE(remotes_.contains("127.0.0.1"));
  EXPECT_TRUE(remotes_.contains("127.0.0.2"));
}

TEST_F(TransportTest, AConnectionTheServerClosedWhileIdleIsReplacedTransparently) {
  asio::io_context io;
  HttpTransport transport(io, options(1));
  int ok = 0;
  transport.send(get("/hello"), "", [&](Result<HttpResponse> r, HttpTransport::Exchange) {
    ok += r && r->status == 200;
    // The server drops idle connections after 300 ms: the next request finds ours stale.
    auto timer = std::make_shared<asio::steady_timer>(io, std::chrono::milliseconds(700));
    timer->async_wait([&, timer](const boost::system::error_code&) {
      transport.send(get("/hello"), "", [&](Result<HttpResponse> again, HttpTransport::Exchange) {
        ASSERT_TRUE(again.has_value()) << again.error().message;
        ok += again->status == 200;
      });
    });
  });
  io.run();
  EXPECT_EQ(ok, 2);
  EXPECT_EQ(transport.stats().opened, 2);
}

TEST_F(TransportTest, ATimeoutIsDeadlineExceededAndAChannelHangUpIsSeenByTheServer) {
  asio::io_context io;
  HttpTransport transport(io, options(2));
  std::optional<Error> timed_out, hung_up;
  transport.send(get("/hold", 200), "", [&](Result<HttpResponse> r, HttpTransport::Exchange) {
    ASSERT_FALSE(r.has_value());
    timed_out = r.error();
  });
  auto channel = transport.channel(0);
  channel->send(get("/hold", 10'000), "", [&](Result<HttpResponse> r, HttpTransport::Exchange) {
    ASSERT_FALSE(r.has_value());
    hung_up = r.error();
  });
  asio::steady_timer cut(io, std::chrono::milliseconds(300));
  cut.async_wait([&](const boost::system::error_code&) { channel->close(); });
  io.run();
  ASSERT_TRUE(timed_out.has_value());
  EXPECT_EQ(timed_out->code, Errc::kDeadlineExceeded) << timed_out->message;
  ASSERT_TRUE(hung_up.has_value());
  EXPECT_EQ(hung_up->code, Errc::kUnavailable);
  for (int i = 0; i < 100 && hangups_ < 2; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_EQ(hangups_.load(), 2);  // the timed-out one hung up too
}

TEST_F(TransportTest, AfterShutdownSendsFailAtOnceAndTheLoopEnds) {
  asio::io_context io;
  HttpTransport transport(io, options(2));
  transport.shutdown();
  bool failed = false;
  transport.send(get("/hello"), "", [&](Result<HttpResponse> r, HttpTransport::Exchange) {
    failed = !r.has_value() && r.error().message.find("shutting down") != std::string::npos;
  });
  io.run();
  EXPECT_TRUE(failed);
}

}  // namespace
}  // namespace outpost::sim
