// The shipper against an in-process control plane: zstd batches the wire format accepts,
// deletion of exactly what was acknowledged, a refused batch dropped and counted (the rest goes
// on), retries while the server is down or failing, and pacing to the byte rate.
#include "agent/telemetry/shipper.h"

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "test_support.h"

#include "http/http_server.h"

namespace outpost::agent::telemetry {
namespace {

using namespace test_support;  // TempDir, wait_until
using namespace std::chrono_literals;
using json = nlohmann::json;
namespace wire = outpost::telemetry;

// POST /api/v1/device/telemetry: decodes each batch, keeps the records it has not seen (by
// seq, like the real server) and acknowledges the highest stored, unless `decide` says other.
class FakeTelemetryServer {
 public:
  FakeTelemetryServer() {
    router_.add("POST", "/api/v1/device/telemetry",
                [this](http::Request&& req, http::Responder respond) {
                  std::lock_guard lock(mu_);
                  const int status = decide_ ? decide_(posts_) : 200;
                  ++posts_;
                  body_bytes_.push_back(req.body.size());
                  encodings_.push_back(req.header("content-encoding"));
                  auth_ = req.header("authorization");
                  if (status != 200) {
                    respond(http::Response::json(
                        status, R"({"error":{"code":"invalid_argument","message":"bad batch"}})"));
                    return;
                  }
                  auto batch = wire::decode_batch(req.body);
                  if (!batch) {
                    ++undecodable_;
                    respond(http::Response::json(400, R"({"error":{"code":"x","message":"no"}})"));
                    return;
                  }
                  dropped_ = batch->dropped;
                  for (const auto& r : batch->records) {
                    if (r.seq > highest_) {
                      stored_.push_back(r.seq);
                      highest_ = r.seq;
                    } else {
                      ++duplicates_;
                    }
                  }
                  respond(http::Response::json(200, json{{"acked", highest_}}.dump()));
                });
    http::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.io_threads = 1;
    server_ = std::make_unique<http::HttpServer>(options, router_);
    auto started = server_->start();
    EXPECT_TRUE(started.has_value()) << started.error().message;
  }
  ~FakeTelemetryServer() { server_->stop(); }

  std::string url() const { return "http://127.0.0.1:" + std::to_string(server_->port()); }
  // Status to answer for the n-th POST (0-based); 200 = store and acknowledge.
  void decide(std::function<int(int)> decide) {
    std::lock_guard lock(mu_);
    decide_ = std::move(decide);
  }
  std::vector<int64_t> stored() const {
    std::lock_guard lock(mu_);
    return stored_;
  }
  int posts() const {
    std::lock_guard lock(mu_);
    return posts_;
  }
  std::vector<size_t> body_bytes() const {
    std::lock_guard lock(mu_);
    return body_bytes_;
  }
  std::vector<std::string> encodings() const {
    std::lock_guard lock(mu_);
    return encodings_;
  }
  int undecodable() const {
    std::lock_guard lock(mu_);
    return undecodable_;
  }
  wire::DropCounts dropped() const {
    std::lock_guard lock(mu_);
    return dropped_;
  }
  std::string authorization() const {
    std::lock_guard lock(mu_);
    return auth_;
  }

 private:
  mutable std::mutex mu_;
  std::function<int(int)> decide_;
  int posts_ = 0;
  int undecodable_ = 0;
  int duplicates_ = 0;
  int64_t highest_ = 0;
  std::vector<int64_t> stored_;
  std::vector<size_t> body_bytes_;
  std::vector<std::string> encodings_;
  wire::DropCounts dropped_;
  std::string auth_;
  http::Router router_;
  std::unique_ptr<http::HttpServer> server_;
};

Record shipped_event(const std::string& message) {
  wire::EventRecord e;
  e.deployment = "cam";
  e.revision = 1;
  e.event = "restart";
  e.message = message;
  return Record{0, 1'700'000'000'000, e};
}

std::vector<Record> shipped_events(int n, size_t message_size = 20, uint32_t seed = 1) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> printable('a', 'z');
  std::vector<Record> out;
  for (int i = 0; i < n; ++i) {
    std::string message(message_size, ' ');
    for (char& c : message) c = static_cast<char>(printable(rng));
    out.push_back(shipped_event(message));
  }
  return out;
}

class TelemetryShipperTest : public ::testing::Test {
 protected:
  void SetUp() override {
    buffer_ = std::make_unique<Buffer>(dir_.file("telemetry.db"), 4 << 20);
    ASSERT_TRUE(buffer_->open());
    identity_.device_id = "d-1";
    identity_.credential = "d-1.secret";
    identity_.server = server_.url();
  }
  Shipper::Options fast() const {
    Shipper::Options o;
    o.interval_ms = 100;
    o.retry_initial_ms = 20;
    o.retry_max_ms = 100;
    o.rate_bytes_per_s = 10 << 20;
    o.timeout_ms = 2'000;
    return o;
  }

  TempDir dir_;
  FakeTelemetryServer server_;
  std::unique_ptr<Buffer> buffer_;
  Identity identity_;
};

TEST_F(TelemetryShipperTest, ShipsZstdBatchesAndDeletesWhatWasAcknowledged) {
  ASSERT_TRUE(buffer_->append(shipped_events(50)));
  Shipper::Options options = fast();
  options.max_records = 20;  // three batches
  Shipper shipper(*buffer_, identity_, options);
  shipper.start();
  // The counters follow the buffer's ack: wait for both.
  ASSERT_TRUE(wait_until(
      [&] { return buffer_->stats().total_records() == 0 && shipper.stats().records_sent == 50; },
      5s));
  std::vector<int64_t> expected;
  for (int64_t i = 1; i <= 50; ++i) expected.push_back(i);
  EXPECT_EQ(server_.stored(), expected);
  EXPECT_EQ(server_.undecodable(), 0);
  EXPECT_EQ(buffer_->stats().acked, 50);
  for (const auto& e : server_.encodings()) EXPECT_EQ(e, "zstd");
  EXPECT_EQ(server_.authorization(), "Bearer d-1.secret");
  const auto stats = shipper.stats();
  EXPECT_EQ(stats.batches_sent, 3);
  EXPECT_EQ(stats.records_sent, 50);
  int64_t bodies = 0;
  for (size_t b : server_.body_bytes()) bodies += static_cast<int64_t>(b);
  EXPECT_EQ(stats.bytes_sent, bodies);
  EXPECT_GT(stats.json_bytes, stats.bytes_sent);  // compressed

  // New records later go in the next interval.
  ASSERT_TRUE(buffer_->append(shipped_events(5)));
  ASSERT_TRUE(wait_until([&] { return server_.stored().size() == 55; }, 5s));
  shipper.stop();
}

TEST_F(TelemetryShipperTest, ARefusedBatchIsDroppedAndCountedAndTheRestGoesOn) {
  ASSERT_TRUE(buffer_->append(shipped_events(10)));
  server_.decide([](int n) { return n == 0 ? 400 : 200; });
  Shipper shipper(*buffer_, identity_, fast());
  shipper.start();
  ASSERT_TRUE(wait_until([&] { return shipper.stats().batches_refused == 1; }, 5s));
  ASSERT_TRUE(buffer_->append(shipped_events(3)));
  ASSERT_TRUE(wait_until([&] { return buffer_->stats().total_records() == 0; }, 5s));
  shipper.stop();
  EXPECT_EQ(server_.stored(), (std::vector<int64_t>{11, 12, 13}));
  EXPECT_EQ(buffer_->dropped().events, 10);
  EXPECT_EQ(server_.dropped().events, 10);  // and the server hears of it
  EXPECT_EQ(buffer_->stats().total_records(), 0);
  EXPECT_EQ(shipper.stats().records_refused, 10);
}

TEST_F(TelemetryShipperTest, RetriesWhileTheServerFailsThenDeliversOnce) {
  ASSERT_TRUE(buffer_->append(shipped_events(10)));
  server_.decide([](int n) { return n < 3 ? (n == 1 ? 429 : 503) : 200; });
  Shipper shipper(*buffer_, identity_, fast());
  shipper.start();
  ASSERT_TRUE(wait_until([&] { return buffer_->stats().total_records() == 0; }, 5s));
  shipper.stop();
  EXPECT_EQ(server_.posts(), 4);
  EXPECT_EQ(server_.stored().size(), 10u);
  EXPECT_EQ(shipper.stats().failures, 3);
  EXPECT_EQ(buffer_->dropped(), wire::DropCounts{});  // nothing given up
}

TEST_F(TelemetryShipperTest, KeepsEverythingWhileNoServerAnswers) {
  ASSERT_TRUE(buffer_->append(shipped_events(10)));
  identity_.server = "http://127.0.0.1:1";  // nothing listens there
  Shipper shipper(*buffer_, identity_, fast());
  shipper.start();
  ASSERT_TRUE(wait_until([&] { return shipper.stats().failures >= 3; }, 5s));
  shipper.stop();
  EXPECT_EQ(buffer_->stats().total_records(), 10);
  EXPECT_FALSE(shipper.stats().last_error.empty());
  EXPECT_EQ(buffer_->dropped(), wire::DropCounts{});
}

TEST_F(TelemetryShipperTest, PacesABacklogToTheByteRate) {
  // Random letters compress to about 60%: ~100 KB of bodies in batches of ~16 KB of JSON.
  ASSERT_TRUE(buffer_->append(shipped_events(170, 1'000, 9)));
  Shipper::Options options = fast();
  options.max_batch_json = 16 << 10;
  options.rate_bytes_per_s = 100 << 10;
  Shipper shipper(*buffer_, identity_, options);
  const auto started = std::chrono::steady_clock::now();
  shipper.start();
  ASSERT_TRUE(wait_until([&] { return buffer_->stats().total_records() == 0; }, 10s));
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  shipper.stop();
  const auto sizes = server_.body_bytes();
  ASSERT_GE(sizes.size(), 5u);
  int64_t paced = 0;  // every body but the last had to wait its turn before the next went
  for (size_t i = 0; i + 1 < sizes.size(); ++i) paced += static_cast<int64_t>(sizes[i]);
  const double floor_s = static_cast<double>(paced) / static_cast<double>(100 << 10);
  EXPECT_GE(elapsed, 0.9 * floor_s) << "sent " << paced << " bytes in " << elapsed << " s";
  EXPECT_GT(floor_s, 0.4);  // the test measures something
}

}  // namespace
}  // namespace outpost::agent::telemetry
