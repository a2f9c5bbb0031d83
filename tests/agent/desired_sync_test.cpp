// Tests for the agent's side of sync: signature and content checks on desired states, the
// on-disk copy, the retry backoff, and the long-poll loop against an in-process HTTP server.
#include "agent/sync/desired_sync.h"

#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "test_support.h"

#include "common/crypto.h"
#include "http/http_server.h"

namespace outpost::agent {
namespace {

using namespace test_support;  // TempDir, read_text, write_text, exists, wait_until

using namespace std::chrono_literals;
using json = nlohmann::json;
using SteadyClock = std::chrono::steady_clock;
using ::testing::HasSubstr;

std::string desired_body(int64_t generation, const std::string& device) {
  json deployments = json::array();
  deployments.push_back({{"name", "cam"}, {"revision", 1}});
  return json{{"generation", generation}, {"device", device}, {"deployments", deployments}}.dump();
}

class DesiredTest : public ::testing::Test {
 protected:
  void SetUp() override {
    crypto::init();
    server_key_ = crypto::ed25519_generate();
    identity_.device_id = "d-1";
    identity_.credential = "d-1.s3cret";
    identity_.server_public_key = crypto::base64_encode(server_key_.public_key);
  }

  std::string sign(const std::string& body) const {
    return crypto::base64_encode(crypto::ed25519_sign(body, server_key_.secret_key));
  }

  crypto::Ed25519KeyPair server_key_;
  Identity identity_;
  TempDir dir_;
};

// ---------------------------------------------------------------------------------------
// verify_desired

TEST_F(DesiredTest, VerifyAcceptsBodySignedByServerKey) {
  const std::string body = desired_body(7, "d-1");
  auto state = verify_desired(body, sign(body), 7, identity_);
  ASSERT_TRUE(state.has_value()) << state.error().message;
  EXPECT_EQ(state->generation, 7);
  EXPECT_EQ(state->body, body);
  EXPECT_EQ(state->signature, sign(body));
  EXPECT_EQ(state->doc["device"], "d-1");
  EXPECT_EQ(state->doc["deployments"].size(), 1u);
}

TEST_F(DesiredTest, VerifyRefusesFlippedByteInBody) {
  const std::string body = desired_body(7, "d-1");
  const std::string signature = sign(body);
  // Every position matters: a flip anywhere breaks the signature.
  for (size_t i : {size_t{0}, body.size() / 2, body.size() - 1}) {
    std::string tampered = body;
    tampered[i] = static_cast<char>(tampered[i] ^ 0x01);
    auto state = verify_desired(tampered, signature, 7, identity_);
    ASSERT_FALSE(state.has_value()) << "flip at " << i;
    EXPECT_EQ(state.error().code, Errc::kPermissionDenied);
    EXPECT_THAT(state.error().message, HasSubstr("signature"));
  }
}

TEST_F(DesiredTest, VerifyRefusesSignatureFromAnotherKey) {
  const std::string body = desired_body(7, "d-1");
  auto other = crypto::ed25519_generate();
  auto signature = crypto::base64_encode(crypto::ed25519_sign(body, other.secret_key));
  auto state = verify_desired(body, signature, 7, identity_);
  ASSERT_FALSE(state.has_value());
  EXPECT_EQ(state.error().code, Errc::kPermissionDenied);
  EXPECT_THAT(state.error().message, HasSubstr("signature"));
}

TEST_F(DesiredTest, VerifyRefusesMissingOrGarbledSignature) {
  const std::string body = desired_body(7, "d-1");
  EXPECT_FALSE(verify_desired(body, "", 7, identity_).has_value());
  EXPECT_FALSE(verify_desired(body, "not base64 at all!", 7, identity_).has_value());
  EXPECT_FALSE(verify_desired(body, crypto::base64_encode("short"), 7, identity_).has_value());
}

TEST_F(DesiredTest, VerifyRefusesBodyForAnotherDevice) {
  const std::string body = desired_body(7, "d-2");
  auto state = verify_desired(body, sign(body), 7, identity_);
  ASSERT_FALSE(state.has_value());
  EXPECT_EQ(state.error().code, Errc::kPermissionDenied);
  EXPECT_THAT(state.error().message, HasSubstr("d-2"));
}

TEST_F(DesiredTest, VerifyRefusesBodyWithoutDevice) {
  const std::string body =
      json{{"generation", 7}, {"deployments", json::array()}}.dump();  // no "device"
  EXPECT_FALSE(verify_desired(body, sign(body), 7, identity_).has_value());
}

TEST_F(DesiredTest, VerifyRefusesGenerationOtherThanAnnounced) {
  const std::string body = desired_body(7, "d-1");
  auto state = verify_desired(body, sign(body), 8, identity_);
  ASSERT_FALSE(state.has_value());
  EXPECT_EQ(state.error().code, Errc::kInvalidArgument);
  EXPECT_THAT(state.error().message, HasSubstr("8"));
}

TEST_F(DesiredTest, VerifyRefusesSignedNonJson) {
  for (std::string body : {std::string("not json {"), std::string("[1,2,3]"),
                           std::string(R"({"generation":7,"device":"d-1"})")}) {
    auto state = verify_desired(body, sign(body), 7, identity_);
    ASSERT_FALSE(state.has_value()) << body;
    EXPECT_EQ(state.error().code, Errc::kInvalidArgument) << body;
  }
}

TEST_F(DesiredTest, VerifyRefusesSignedDocumentWithWrongTypes) {
  // Signed, so from the server, but malformed (a server bug or version skew): an error, never
  // an exception (one would end the sync thread, and the agent, on every restart).
  for (json doc : {json{{"generation", 7}, {"device", 5}, {"deployments", json::array()}},
                   json{{"generation", 7}, {"device", nullptr}, {"deployments", json::array()}},
                   json{{"generation", "7"}, {"device", "d-1"}, {"deployments", json::array()}},
                   json{{"generation", 7}, {"device", "d-1"}, {"deployments", "none"}}}) {
    const std::string body = doc.dump();
    Result<DesiredState> state = make_error(Errc::kInternal, "not run");
    EXPECT_NO_THROW(state = verify_desired(body, sign(body), 7, identity_)) << body;
    EXPECT_FALSE(state.has_value()) << body;
  }
}

// ---------------------------------------------------------------------------------------
// persist_desired / load_desired

TEST_F(DesiredTest, PersistThenLoadRoundTrips) {
  const std::string body = desired_body(3, "d-1");
  auto state = verify_desired(body, sign(body), 3, identity_);
  ASSERT_TRUE(state.has_value());
  ASSERT_TRUE(persist_desired(dir_.path(), *state).has_value());
  EXPECT_TRUE(std::filesystem::exists(dir_.path() + "/desired.json"));

  auto loaded = load_desired(dir_.path(), identity_);
  ASSERT_TRUE(loaded.has_value()) << loaded.error().message;
  ASSERT_TRUE(loaded->has_value());
  EXPECT_EQ((*loaded)->generation, 3);
  EXPECT_EQ((*loaded)->body, body);
  EXPECT_EQ((*loaded)->signature, state->signature);
  EXPECT_EQ((*loaded)->doc, state->doc);
}

TEST_F(DesiredTest, PersistReplacesTheOlderState) {
  for (int64_t g : {1, 2}) {
    const std::string body = desired_body(g, "d-1");
    auto state = verify_desired(body, sign(body), g, identity_);
    ASSERT_TRUE(state.has_value());
    ASSERT_TRUE(persist_desired(dir_.path(), *state).has_value());
  }
  auto loaded = load_desired(dir_.path(), identity_);
  ASSERT_TRUE(loaded.has_value() && loaded->has_value());
  EXPECT_EQ((*loaded)->generation, 2);
  // Only desired.json is left behind: no temp files.
  std::vector<std::string> names;
  for (const auto& e : std::filesystem::directory_iterator(dir_.path())) {
    names.push_back(e.path().filename().string());
  }
  EXPECT_EQ(names, std::vector<std::string>{"desired.json"});
}

TEST_F(DesiredTest, LoadWithoutFileIsNullopt) {
  auto loaded = load_desired(dir_.path(), identity_);
  ASSERT_TRUE(loaded.has_value()) << loaded.error().message;
  EXPECT_FALSE(loaded->has_value());
}

TEST_F(DesiredTest, LoadRefusesTamperedFile) {
  const std::string body = desired_body(3, "d-1");
  auto state = verify_desired(body, sign(body), 3, identity_);
  ASSERT_TRUE(state.has_value());
  ASSERT_TRUE(persist_desired(dir_.path(), *state).has_value());
  const std::string path = dir_.path() + "/desired.json";

  // The body edited (a deployment added) while the signature stays.
  json saved = json::parse(read_text(path));
  json doc = json::parse(saved["body"].get<std::string>());
  doc["deployments"].push_back({{"name", "evil"}, {"revision", 1}});
  saved["body"] = doc.dump();
  write_text(path, saved.dump());
  auto loaded = load_desired(dir_.path(), identity_);
  ASSERT_FALSE(loaded.has_value());
  EXPECT_THAT(loaded.error().message, HasSubstr("desired.json"));

  // The generation edited (claiming a newer one).
  saved = json::parse(read_text(path));
  saved["body"] = body;
  saved["generation"] = 4;
  write_text(path, saved.dump());
  EXPECT_FALSE(load_desired(dir_.path(), identity_).has_value());

  // Truncated.
  write_text(path,
             json{{"generation", 3}, {"signature", state->signature}, {"body", body}}.dump().substr(
                 0, 20));
  EXPECT_FALSE(load_desired(dir_.path(), identity_).has_value());
}

TEST_F(DesiredTest, LoadRefusesStateSavedForAnotherServerKey) {
  const std::string body = desired_body(3, "d-1");
  auto state = verify_desired(body, sign(body), 3, identity_);
  ASSERT_TRUE(state.has_value());
  ASSERT_TRUE(persist_desired(dir_.path(), *state).has_value());
  Identity other = identity_;
  other.server_public_key = crypto::base64_encode(crypto::ed25519_generate().public_key);
  EXPECT_FALSE(load_desired(dir_.path(), other).has_value());
}

// ---------------------------------------------------------------------------------------
// Backoff

TEST(BackoffTest, DoublesWithinJitterAndCaps) {
  // Many rounds, so the jitter is exercised; every delay stays within +-20% of its step.
  std::set<int64_t> first_delays;
  for (int round = 0; round < 50; ++round) {
    Backoff backoff(100, 1'000);
    const int64_t steps[] = {100, 200, 400, 800, 1'000, 1'000, 1'000, 1'000};
    for (int i = 0; i < 8; ++i) {
      EXPECT_EQ(backoff.attempts(), i);
      int64_t delay = backoff.next_ms();
      EXPECT_GE(delay, steps[i] * 8 / 10) << "attempt " << i;
      EXPECT_LE(delay, steps[i] * 12 / 10) << "attempt " << i;
      if (i == 0) first_delays.insert(delay);
    }
    EXPECT_EQ(backoff.attempts(), 8);
  }
  // Jitter: a fleet does not retry in lockstep.
  EXPECT_GT(first_delays.size(), 5u);
}

TEST(BackoffTest, ManyAttemptsStayAtTheCap) {
  Backoff backoff(1'000, 60'000);
  int64_t delay = 0;
  for (int i = 0; i < 200; ++i) delay = backoff.next_ms();
  EXPECT_GE(delay, 48'000);
  EXPECT_LE(delay, 72'000);
}

TEST(BackoffTest, ResetStartsOver) {
  Backoff backoff(100, 10'000);
  for (int i = 0; i < 6; ++i) (void)backoff.next_ms();
  EXPECT_EQ(backoff.attempts(), 6);
  backoff.reset();
  EXPECT_EQ(backoff.attempts(), 0);
  int64_t delay = backoff.next_ms();
  EXPECT_GE(delay, 80);
  EXPECT_LE(delay, 120);
}

// ---------------------------------------------------------------------------------------
// DesiredSync against an in-process control plane

// Serves GET /api/v1/device/desired from a test-supplied function; what it saw is recorded.
// Requests the function parks (by keeping the responder) are answered 304 at teardown.
class FakeDesiredServer {
 public:
  struct Seen {
    std::string generation;  // query parameter
    std::string authorization;
  };
  // Return a response to answer now, or nullopt to hold the request.
  using Answer = std::function<std::optional<http::Response>(int request_number)>;

  explicit FakeDesiredServer(Answer answer) : answer_(std::move(answer)) {
    router_.add("GET", "/api/v1/device/desired",
                [this](http::Request&& req, http::Responder respond) {
                  std::optional<http::Response> resp;
                  {
                    std::lock_guard lock(mu_);
                    seen_.push_back(
                        {req.query_param("generation").value_or("?"), req.header("authorization")});
                    resp = answer_(static_cast<int>(seen_.size()));
                    if (!resp) held_.push_back(respond);
                  }
                  if (resp) respond(std::move(*resp));
                });
    http::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.io_threads = 2;
    server_ = std::make_unique<http::HttpServer>(options, router_);
    auto started = server_->start();
    EXPECT_TRUE(started.has_value()) << started.error().message;
  }
  ~FakeDesiredServer() {
    std::vector<http::Responder> held;
    {
      std::lock_guard lock(mu_);
      held.swap(held_);
    }
    for (auto& respond : held) respond(not_modified());
    server_->stop();
  }

  std::string url() const { return "http://127.0.0.1:" + std::to_string(server_->port()); }
  std::vector<Seen> seen() const {
    std::lock_guard lock(mu_);
    return seen_;
  }
  size_t held() const {
    std::lock_guard lock(mu_);
    return held_.size();
  }

  static http::Response not_modified() {
    http::Response resp;
    resp.status = 304;
    return resp;
  }
  static http::Response desired(const std::string& body, int64_t generation,
                                const std::string& signature) {
    http::Response resp = http::Response::json(200, body);
    resp.headers.emplace_back("X-Outpost-Generation", std::to_string(generation));
    resp.headers.emplace_back("X-Outpost-Signature", signature);
    return resp;
  }

 private:
  Answer answer_;
  mutable std::mutex mu_;
  std::vector<Seen> seen_;
  std::vector<http::Responder> held_;
  http::Router router_;
  std::unique_ptr<http::HttpServer> server_;
};

// What DesiredSync reported through its callbacks.
struct SyncEvents {
  std::mutex mu;
  std::vector<DesiredState> desired;
  std::vector<std::pair<bool, std::string>> links;

  std::function<void(const DesiredState&)> on_desired() {
    return [this](const DesiredState& s) {
      std::lock_guard lock(mu);
      desired.push_back(s);
    };
  }
  std::function<void(bool, const std::string&)> on_link() {
    return [this](bool online, const std::string& error) {
      std::lock_guard lock(mu);
      links.emplace_back(online, error);
    };
  }
  size_t desired_count() {
    std::lock_guard lock(mu);
    return desired.size();
  }
  bool any_link(bool online, const std::string& containing) {
    std::lock_guard lock(mu);
    for (const auto& [o, e] : links) {
      if (o == online && e.find(containing) != std::string::npos) return true;
    }
    return false;
  }
};

DesiredSync::Options fast_sync_options() {
  DesiredSync::Options options;
  options.wait_s = 30;
  options.backoff_initial_ms = 50;
  options.backoff_max_ms = 200;
  return options;
}

TEST_F(DesiredTest, SyncDeliversNewGenerationOnceAndStopsWhilePollIsHeld) {
  const std::string body = desired_body(1, "d-1");
  const std::string signature = sign(body);
  // 1: generation 1; 2, 3: nothing new (304 at once); 4 on: held like a real long-poll.
  FakeDesiredServer server([&](int n) -> std::optional<http::Response> {
    if (n == 1) return FakeDesiredServer::desired(body, 1, signature);
    if (n <= 3) return FakeDesiredServer::not_modified();
    return std::nullopt;
  });
  identity_.server = server.url();
  SyncEvents events;
  auto sync = std::make_unique<DesiredSync>(dir_.path(), identity_, 0, fast_sync_options(),
                                            events.on_desired(), events.on_link());
  sync->start();
  ASSERT_TRUE(wait_until([&] { return server.held() == 1; }, 5s)) << server.seen().size();

  {
    std::lock_guard lock(events.mu);
    ASSERT_EQ(events.desired.size(), 1u);
    EXPECT_EQ(events.desired[0].generation, 1);
    EXPECT_EQ(events.desired[0].body, body);
    for (const auto& [online, error] : events.links) {
      EXPECT_TRUE(online) << error;
    }
    EXPECT_GE(events.links.size(), 3u);  // after the 200 and each 304
  }
  // Persisted before it was handed over.
  auto loaded = load_desired(dir_.path(), identity_);
  ASSERT_TRUE(loaded.has_value() && loaded->has_value());
  EXPECT_EQ((*loaded)->generation, 1);

  auto seen = server.seen();
  ASSERT_EQ(seen.size(), 4u);
  EXPECT_EQ(seen[0].generation, "0");
  for (size_t i = 1; i < seen.size(); ++i) EXPECT_EQ(seen[i].generation, "1") << i;
  for (const auto& s : seen) EXPECT_EQ(s.authorization, "Bearer d-1.s3cret");

  // The fourth poll is parked on the server: stop() must not wait for it.
  auto before = SteadyClock::now();
  sync->stop();
  auto took = SteadyClock::now() - before;
  EXPECT_LT(took, 2s) << std::chrono::duration_cast<std::chrono::milliseconds>(took).count()
                      << " ms";
  sync.reset();
  EXPECT_EQ(events.desired_count(), 1u);
}

TEST_F(DesiredTest, SyncIgnoresBadlySignedAnswer) {
  const std::string body = desired_body(1, "d-1");
  auto other = crypto::ed25519_generate();
  const std::string forged = crypto::base64_encode(crypto::ed25519_sign(body, other.secret_key));
  FakeDesiredServer server([&](int) -> std::optional<http::Response> {
    return FakeDesiredServer::desired(body, 1, forged);
  });
  identity_.server = server.url();
  SyncEvents events;
  DesiredSync sync(dir_.path(), identity_, 0, fast_sync_options(), events.on_desired(),
                   events.on_link());
  sync.start();
  ASSERT_TRUE(wait_until([&] { return events.any_link(false, "signature"); }, 5s));
  // It keeps asking (with backoff), never for anything but what it already knew.
  ASSERT_TRUE(wait_until([&] { return server.seen().size() >= 2; }, 5s));
  sync.stop();
  EXPECT_EQ(events.desired_count(), 0u);
  EXPECT_FALSE(events.any_link(true, ""));
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/desired.json"));
  for (const auto& s : server.seen()) EXPECT_EQ(s.generation, "0");
}

TEST_F(DesiredTest, SyncNeverGoesBackToAnOlderGeneration) {
  const std::string body = desired_body(3, "d-1");
  const std::string signature = sign(body);
  FakeDesiredServer server([&](int) -> std::optional<http::Response> {
    return FakeDesiredServer::desired(body, 3, signature);
  });
  identity_.server = server.url();
  SyncEvents events;
  DesiredSync sync(dir_.path(), identity_, 5, fast_sync_options(), events.on_desired(),
                   events.on_link());
  sync.start();
  ASSERT_TRUE(wait_until([&] { return events.any_link(false, "not newer"); }, 5s));
  sync.stop();
  EXPECT_EQ(events.desired_count(), 0u);
  EXPECT_FALSE(std::filesystem::exists(dir_.path() + "/desired.json"));
  EXPECT_EQ(server.seen().at(0).generation, "5");
}

TEST_F(DesiredTest, SyncReportsServerDownAndRecovers) {
  const std::string body = desired_body(1, "d-1");
  const std::string signature = sign(body);
  // Two failures (503), then generation 1, then held.
  FakeDesiredServer server([&](int n) -> std::optional<http::Response> {
    if (n <= 2)
      return http::Response::json(503, R"({"error":{"code":"unavailable","message":"x"}})");
    if (n == 3) return FakeDesiredServer::desired(body, 1, signature);
    return std::nullopt;
  });
  identity_.server = server.url();
  SyncEvents events;
  DesiredSync sync(dir_.path(), identity_, 0, fast_sync_options(), events.on_desired(),
                   events.on_link());
  sync.start();
  ASSERT_TRUE(wait_until([&] { return events.desired_count() == 1; }, 5s));
  sync.stop();
  std::lock_guard lock(events.mu);
  ASSERT_GE(events.links.size(), 3u);
  EXPECT_FALSE(events.links[0].first);
  EXPECT_FALSE(events.links[1].first);
  EXPECT_TRUE(events.links[2].first);
  EXPECT_EQ(events.desired[0].generation, 1);
}

}  // namespace
}  // namespace outpost::agent
