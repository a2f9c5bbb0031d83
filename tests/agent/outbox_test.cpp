// Tests for the status outbox: numbering and persistence across restarts, and the sender's
// strict ordering, retries, bound and refusals against an in-process HTTP server.
#include "agent/status/outbox.h"

#include <stdlib.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "test_support.h"

#include "http/http_server.h"

namespace outpost::agent {
namespace {

using namespace test_support;  // TempDir, read_text, write_text, exists, wait_until

using namespace std::chrono_literals;
using json = nlohmann::json;
using SteadyClock = std::chrono::steady_clock;
using ::testing::ElementsAre;

// The report files in DIR/outbox, as their parsed contents, in file name order.
std::vector<json> queued_reports(const std::string& data_dir) {
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(data_dir + "/outbox")) {
    std::string name = e.path().filename().string();
    if (name.size() > 5 && name.substr(name.size() - 5) == ".json") names.push_back(name);
  }
  std::sort(names.begin(), names.end());
  std::vector<json> out;
  for (const auto& name : names) {
    out.push_back(json::parse(read_text(data_dir + "/outbox/" + name), nullptr, false));
  }
  return out;
}

std::vector<int64_t> seqs_of(const std::vector<json>& reports) {
  std::vector<int64_t> out;
  for (const auto& r : reports) out.push_back(r.value("seq", int64_t{-1}));
  return out;
}

// POST /api/v1/device/status; answers with the status `decide` picks for each report.
class FakeStatusServer {
 public:
  struct Post {
    json report;
    std::string authorization;
    int answered = 0;
  };

  FakeStatusServer() {
    router_.add(
        "POST", "/api/v1/device/status", [this](http::Request&& req, http::Responder respond) {
          json report = json::parse(req.body, nullptr, false);
          int status = 200;
          {
            std::lock_guard lock(mu_);
            status = decide_ ? decide_(report) : 200;
            posts_.push_back({report, req.header("authorization"), status});
          }
          respond(status == 200
                      ? http::Response::json(200, R"({"ok":true})")
                      : http::Response::json(status, R"({"error":{"code":"x","message":"no"}})"));
        });
    http::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.io_threads = 1;
    server_ = std::make_unique<http::HttpServer>(options, router_);
    auto started = server_->start();
    EXPECT_TRUE(started.has_value()) << started.error().message;
  }
  ~FakeStatusServer() { server_->stop(); }

  std::string url() const { return "http://127.0.0.1:" + std::to_string(server_->port()); }
  void decide(std::function<int(const json&)> decide) {
    std::lock_guard lock(mu_);
    decide_ = std::move(decide);
  }
  std::vector<Post> posts() const {
    std::lock_guard lock(mu_);
    return posts_;
  }
  // Seqs of the reports answered 200, in arrival order.
  std::vector<int64_t> delivered() const {
    std::lock_guard lock(mu_);
    std::vector<int64_t> out;
    for (const auto& p : posts_) {
      if (p.answered == 200) out.push_back(p.report.value("seq", int64_t{-1}));
    }
    return out;
  }

 private:
  mutable std::mutex mu_;
  std::function<int(const json&)> decide_;
  std::vector<Post> posts_;
  http::Router router_;
  std::unique_ptr<http::HttpServer> server_;
};

class OutboxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    identity_.device_id = "d-1";
    identity_.credential = "d-1.s3cret";
    options_.retry_initial_ms = 50;
    options_.retry_max_ms = 200;
  }

  std::unique_ptr<StatusOutbox> make_outbox(const std::string& server_url = "") {
    Identity identity = identity_;
    identity.server = server_url;
    auto outbox = std::make_unique<StatusOutbox>(dir_.path(), identity, options_);
    auto inited = outbox->init();
    EXPECT_TRUE(inited.has_value()) << inited.error().message;
    return outbox;
  }

  void enqueue(StatusOutbox& outbox, int64_t expected_seq, const std::string& phase) {
    auto seq = outbox.enqueue({{"phase", phase}});
    ASSERT_TRUE(seq.has_value()) << seq.error().message;
    EXPECT_EQ(*seq, expected_seq);
  }

  TempDir dir_;
  Identity identity_;
  StatusOutbox::Options options_;
};

TEST_F(OutboxTest, EnqueueNumbersAndPersists) {
  auto outbox = make_outbox();
  EXPECT_EQ(outbox->pending(), 0);
  enqueue(*outbox, 1, "a");
  enqueue(*outbox, 2, "b");
  enqueue(*outbox, 3, "c");
  EXPECT_EQ(outbox->pending(), 3);
  EXPECT_EQ(outbox->sent(), 0);

  auto reports = queued_reports(dir_.path());
  ASSERT_EQ(reports.size(), 3u);
  EXPECT_THAT(seqs_of(reports), ElementsAre(1, 2, 3));
  EXPECT_EQ(reports[0]["phase"], "a");
  EXPECT_EQ(reports[2]["phase"], "c");
  EXPECT_EQ(read_text(dir_.path() + "/outbox/last_seq"), "3");
}

TEST_F(OutboxTest, NumberingAndQueueSurviveRestart) {
  {
    auto outbox = make_outbox();
    enqueue(*outbox, 1, "a");
    enqueue(*outbox, 2, "b");
    enqueue(*outbox, 3, "c");
  }
  auto outbox = make_outbox();
  EXPECT_EQ(outbox->pending(), 3);
  enqueue(*outbox, 4, "d");
  EXPECT_EQ(outbox->pending(), 4);
  EXPECT_THAT(seqs_of(queued_reports(dir_.path())), ElementsAre(1, 2, 3, 4));
}

TEST_F(OutboxTest, NumberingSurvivesRestartWithEmptyQueue) {
  FakeStatusServer server;
  {
    auto outbox = make_outbox(server.url());
    enqueue(*outbox, 1, "a");
    enqueue(*outbox, 2, "b");
    outbox->start();
    ASSERT_TRUE(wait_until([&] { return outbox->pending() == 0; }, 5s));
  }
  // Every report was sent and deleted; seq must still not start over.
  auto outbox = make_outbox();
  EXPECT_EQ(outbox->pending(), 0);
  enqueue(*outbox, 3, "c");
}

TEST_F(OutboxTest, RestartAfterCrashBeforeLastSeqWasWritten) {
  {
    auto outbox = make_outbox();
    enqueue(*outbox, 1, "a");
    enqueue(*outbox, 2, "b");
  }
  // A crash between writing report 2 and last_seq: last_seq still says 1.
  std::ofstream(dir_.path() + "/outbox/last_seq", std::ios::trunc) << "1";
  auto outbox = make_outbox();
  EXPECT_EQ(outbox->pending(), 2);
  enqueue(*outbox, 3, "c");
}

TEST_F(OutboxTest, SenderDeliversInOrderAndDeletesFiles) {
  FakeStatusServer server;
  auto outbox = make_outbox(server.url());
  for (int64_t i = 1; i <= 5; ++i) enqueue(*outbox, i, "p" + std::to_string(i));
  outbox->start();
  ASSERT_TRUE(wait_until([&] { return outbox->sent() == 5; }, 5s)) << outbox->sent();
  // More while it runs.
  enqueue(*outbox, 6, "p6");
  ASSERT_TRUE(wait_until([&] { return outbox->sent() == 6; }, 5s));
  EXPECT_EQ(outbox->pending(), 0);
  EXPECT_THAT(server.delivered(), ElementsAre(1, 2, 3, 4, 5, 6));
  EXPECT_TRUE(queued_reports(dir_.path()).empty());
  auto posts = server.posts();
  ASSERT_EQ(posts.size(), 6u);
  EXPECT_EQ(posts[0].report["phase"], "p1");
  for (const auto& p : posts) {
    EXPECT_EQ(p.authorization, "Bearer d-1.s3cret");
    EXPECT_FALSE(p.report.contains("dropped_before"));
  }
}

TEST_F(OutboxTest, ServerUnavailableLosesNothingAndKeepsOrder) {
  FakeStatusServer server;
  std::atomic<bool> down{true};
  server.decide([&](const json&) { return down ? 503 : 200; });
  auto outbox = make_outbox(server.url());
  enqueue(*outbox, 1, "a");
  enqueue(*outbox, 2, "b");
  outbox->start();
  // Retried (with backoff), always the oldest first.
  ASSERT_TRUE(wait_until([&] { return server.posts().size() >= 3; }, 5s));
  enqueue(*outbox, 3, "c");
  ASSERT_TRUE(wait_until([&] { return server.posts().size() >= 5; }, 5s));
  for (const auto& p : server.posts()) EXPECT_EQ(p.report["seq"], 1);
  EXPECT_EQ(outbox->pending(), 3);
  EXPECT_EQ(outbox->sent(), 0);
  EXPECT_THAT(seqs_of(queued_reports(dir_.path())), ElementsAre(1, 2, 3));

  down = false;
  ASSERT_TRUE(wait_until([&] { return outbox->sent() == 3; }, 5s));
  EXPECT_THAT(server.delivered(), ElementsAre(1, 2, 3));
  EXPECT_EQ(outbox->pending(), 0);
  EXPECT_TRUE(queued_reports(dir_.path()).empty());
}

TEST_F(OutboxTest, UnreachableServerKeepsTheQueue) {
  // A port nothing listens on (a server started and stopped).
  std::string url;
  {
    FakeStatusServer gone;
    url = gone.url();
  }
  auto outbox = make_outbox(url);
  enqueue(*outbox, 1, "a");
  outbox->start();
  std::this_thread::sleep_for(300ms);
  outbox->stop();
  EXPECT_EQ(outbox->pending(), 1);
  EXPECT_EQ(outbox->sent(), 0);
  EXPECT_THAT(seqs_of(queued_reports(dir_.path())), ElementsAre(1));
}

TEST_F(OutboxTest, BoundDropsOldestAndNextReportCountsThem) {
  options_.max_queued = 3;
  FakeStatusServer server;
  auto outbox = make_outbox(server.url());
  for (int64_t i = 1; i <= 5; ++i) enqueue(*outbox, i, "p" + std::to_string(i));
  EXPECT_EQ(outbox->pending(), 3);
  EXPECT_THAT(seqs_of(queued_reports(dir_.path())), ElementsAre(3, 4, 5));

  outbox->start();
  ASSERT_TRUE(wait_until([&] { return outbox->sent() == 3; }, 5s));
  EXPECT_THAT(server.delivered(), ElementsAre(3, 4, 5));
  auto posts = server.posts();
  ASSERT_EQ(posts.size(), 3u);
  EXPECT_EQ(posts[0].report.value("dropped_before", int64_t{0}), 2);
  EXPECT_FALSE(posts[1].report.contains("dropped_before"));
  EXPECT_FALSE(posts[2].report.contains("dropped_before"));
}

TEST_F(OutboxTest, RefusedReportIsDroppedWithoutBlockingLaterOnes) {
  FakeStatusServer server;
  server.decide([](const json& report) { return report["seq"] == 2 ? 400 : 200; });
  auto outbox = make_outbox(server.url());
  enqueue(*outbox, 1, "a");
  enqueue(*outbox, 2, "malformed");
  enqueue(*outbox, 3, "c");
  outbox->start();
  ASSERT_TRUE(wait_until([&] { return outbox->pending() == 0; }, 5s));
  // Give a wrongly kept report time to be retried before looking.
  std::this_thread::sleep_for(150ms);
  EXPECT_EQ(outbox->sent(), 2);
  EXPECT_THAT(server.delivered(), ElementsAre(1, 3));
  auto posts = server.posts();
  ASSERT_EQ(posts.size(), 3u);  // report 2 was tried once, not retried
  EXPECT_EQ(posts[1].report["seq"], 2);
  EXPECT_EQ(posts[1].answered, 400);
  EXPECT_TRUE(queued_reports(dir_.path()).empty());
}

TEST_F(OutboxTest, ThrottledOrUnauthenticatedReportIsKept) {
  // 401 and 429 are not verdicts on the report: it is retried, not dropped.
  FakeStatusServer server;
  std::atomic<int> answers{0};
  server.decide([&](const json&) {
    int n = ++answers;
    return n == 1 ? 429 : n == 2 ? 401 : 200;
  });
  auto outbox = make_outbox(server.url());
  enqueue(*outbox, 1, "a");
  enqueue(*outbox, 2, "b");
  outbox->start();
  ASSERT_TRUE(wait_until([&] { return outbox->sent() == 2; }, 5s));
  EXPECT_THAT(server.delivered(), ElementsAre(1, 2));
  auto posts = server.posts();
  ASSERT_EQ(posts.size(), 4u);
  EXPECT_EQ(posts[0].report["seq"], 1);
  EXPECT_EQ(posts[1].report["seq"], 1);
}

TEST_F(OutboxTest, StopReturnsPromptlyWhileRetrying) {
  FakeStatusServer server;
  server.decide([](const json&) { return 503; });
  options_.retry_initial_ms = 10'000;
  options_.retry_max_ms = 10'000;
  auto outbox = make_outbox(server.url());
  enqueue(*outbox, 1, "a");
  outbox->start();
  ASSERT_TRUE(wait_until([&] { return server.posts().size() == 1; }, 5s));
  auto before = SteadyClock::now();
  outbox->stop();
  EXPECT_LT(SteadyClock::now() - before, 1s);
  EXPECT_EQ(outbox->pending(), 1);
}

}  // namespace
}  // namespace outpost::agent
