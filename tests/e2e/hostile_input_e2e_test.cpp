// End-to-end: hostile clients against the real server (issue 17). Hundreds of slow clients
// (slowloris: a request header sent a byte at a time, never finished) while others are served
// with p99 < 100 ms, and the slow ones cut at --slow-client-timeout; JSON nested a million
// deep, an oversized header and an oversized body each answered with a clear 4xx, the server
// still up and nothing stored.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "common/http_client.h"
#include "harness.h"

namespace outpost::e2e {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

int connect_to(uint16_t port) {
  int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(port);
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// Whether the server closed the connection (EOF or reset), waiting up to `ms`.
bool closed_by_server(int fd, int ms) {
  pollfd p{fd, POLLIN, 0};
  if (::poll(&p, 1, ms) <= 0) return false;
  char buf[256];
  ssize_t n = ::recv(fd, buf, sizeof buf, MSG_DONTWAIT);
  return n <= 0;
}

class HostileInputE2E : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = make_temp_dir("outpost-hostile-e2e");
    server_ = std::make_unique<ServerProcess>(root_ + "/data");
    server_->start({"--slow-client-timeout", "2s"});
    ASSERT_TRUE(server_->running());
  }
  void TearDown() override {
    server_.reset();
    fs::remove_all(root_);
  }
  std::string root_;
  std::unique_ptr<ServerProcess> server_;
};

TEST_F(HostileInputE2E, SlowClientsAreCutAndOthersAreStillServedQuickly) {
  constexpr int kSlow = 300;
  std::vector<int> slow;
  for (int i = 0; i < kSlow; ++i) {
    int fd = connect_to(server_->port());
    ASSERT_GE(fd, 0);
    ASSERT_GT(::send(fd, "GET /healthz HTTP/1.1\r\nHost: x\r\n", 32, MSG_NOSIGNAL), 0);
    slow.push_back(fd);
  }
  // They trickle a header byte every 200 ms while the others are measured.
  std::atomic<bool> done{false};
  std::thread trickle([&] {
    while (!done) {
      for (int fd : slow) ::send(fd, "X", 1, MSG_NOSIGNAL | MSG_DONTWAIT);
      std::this_thread::sleep_for(std::chrono::milliseconds(200));
    }
  });
  std::vector<double> ms;
  for (int i = 0; i < 200; ++i) {
    HttpClient client(server_->url(), "");  // a new connection each time
    const auto start = std::chrono::steady_clock::now();
    auto health = client.request("GET", "/healthz");
    ms.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
                     .count());
    ASSERT_TRUE(health.has_value()) << health.error().message;
    EXPECT_EQ(health->status, 200);
  }
  std::sort(ms.begin(), ms.end());
  const double p99 = ms[static_cast<size_t>(ms.size() * 0.99) - 1];
  std::printf("healthz with %d slow clients: p50 %.2f ms, p99 %.2f ms\n", kSlow, ms[ms.size() / 2],
              p99);
  EXPECT_LT(p99, 100.0);

  // Within the 2 s header timeout (plus slack) every slow client is cut, though it kept sending.
  std::this_thread::sleep_for(std::chrono::milliseconds(2500));
  int cut = 0;
  for (int fd : slow) cut += closed_by_server(fd, 500) ? 1 : 0;
  done = true;
  trickle.join();
  for (int fd : slow) ::close(fd);
  EXPECT_EQ(cut, kSlow);
}

TEST_F(HostileInputE2E, DeepJsonBigHeadersAndBigBodiesGetAClear4xx) {
  HttpClient client(server_->url(), "");
  // A million '[' to the unauthenticated enrollment endpoint (nlohmann would recurse).
  std::string deep = std::string(1'000'000, '[') + std::string(1'000'000, ']');
  auto answer = client.request("POST", "/api/v1/device/enroll", deep);
  ASSERT_TRUE(answer.has_value()) << answer.error().message;
  EXPECT_EQ(answer->status, 400);
  EXPECT_THAT(answer->body, HasSubstr("nested deeper than 64 levels"));
  // The same in an operator call, and a manifest in YAML flow style.
  HttpClient op(server_->url(), server_->admin_token());
  auto deep_apply = op.request("POST", "/api/v1/deployments", deep);
  ASSERT_TRUE(deep_apply.has_value());
  EXPECT_EQ(deep_apply->status, 400) << deep_apply->body;
  auto yaml = server_->cli({"apply", "-f", "-"}, "spec: " + std::string(100'000, '['));
  EXPECT_NE(yaml.exit_code, 0);
  EXPECT_THAT(yaml.err, HasSubstr("nested deeper"));

  // A 20 KiB header.
  HttpRequestOptions big_header;
  big_header.headers = {{"X-Filler", std::string(20 * 1024, 'a')}};
  auto header = client.request("GET", "/healthz", {}, "", big_header);
  ASSERT_TRUE(header.has_value()) << header.error().message;
  EXPECT_EQ(header->status, 431);
  EXPECT_THAT(header->body, HasSubstr("header is over the limit"));

  // A body over the route's limit (4 MiB for JSON calls).
  auto big = op.request("POST", "/api/v1/enrollment-tokens", std::string(5 << 20, ' '));
  ASSERT_TRUE(big.has_value());
  EXPECT_EQ(big->status, 413) << big->body;

  // Still serving, and none of it stored.
  auto health = client.request("GET", "/healthz");
  ASSERT_TRUE(health.has_value());
  EXPECT_EQ(health->status, 200);
  auto tokens = server_->cli({"token", "list", "-o", "json"});
  EXPECT_EQ(tokens.exit_code, 0) << tokens.err;
  EXPECT_TRUE(tokens.json().empty()) << tokens.out;
  auto devices = server_->cli({"device", "list", "-o", "json"});
  EXPECT_TRUE(devices.json().empty()) << devices.out;
}

}  // namespace
}  // namespace outpost::e2e
