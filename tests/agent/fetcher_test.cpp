// Tests for the artifact store and the fetcher: verified downloads, resume with Range, digest
// mismatch, disk budget and rate cap, against an in-process HTTP server serving blob files.
#include "agent/fetch/fetcher.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include "test_support.h"

#include "common/digest.h"
#include "common/zstd_delta.h"
#include "http/http_server.h"

namespace outpost::agent {
namespace {

using namespace test_support;  // TempDir, read_text, write_text, exists, wait_until

using namespace std::chrono_literals;
using SteadyClock = std::chrono::steady_clock;
using ::testing::HasSubstr;
using ::testing::StartsWith;
using ::testing::UnorderedElementsAre;
using Phase = FetchProgress::Phase;

std::string random_bytes(size_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::string out(n, '\0');
  for (auto& c : out) c = static_cast<char>(rng() & 0xff);
  return out;
}

std::string digest_of(const std::string& bytes) { return "sha256:" + sha256_hex(bytes); }

// Serves HEAD and GET /api/v1/artifacts/{digest} from files, honouring "Range: bytes=N-[M]"
// with 206 + Content-Range (or ignoring it when told to). Records every request.
class FakeArtifactServer {
 public:
  struct Seen {
    std::string method;
    std::string digest;
    std::string range;
    std::string authorization;
  };

  explicit FakeArtifactServer(std::string blob_dir) : blob_dir_(std::move(blob_dir)) {
    router_.add("GET", "/api/v1/artifacts/{digest}",
                [this](http::Request&& req, http::Responder respond) { respond(handle(req)); });
    http::ServerOptions options;
    options.listen = "127.0.0.1:0";
    options.io_threads = 2;
    server_ = std::make_unique<http::HttpServer>(options, router_);
    auto started = server_->start();
    EXPECT_TRUE(started.has_value()) << started.error().message;
  }
  ~FakeArtifactServer() { server_->stop(); }

  std::string url() const { return "http://127.0.0.1:" + std::to_string(server_->port()); }

  // Serves `bytes` under `digest` (which need not be their hash).
  void put(const std::string& digest, const std::string& bytes) {
    std::lock_guard lock(mu_);
    std::string path = blob_dir_ + "/" + std::to_string(files_.size());
    write_text(path, bytes);
    files_[digest] = path;
  }
  void ignore_range(bool ignore) { ignore_range_ = ignore; }
  // Answers the next `times` requests for `digest` (HEAD or GET; -1: all of them) with
  // `status` and no blob, as a busy relay (503) or one that refuses a bad copy (502) does.
  void answer(const std::string& digest, int status, int times = -1) {
    std::lock_guard lock(mu_);
    faults_[digest] = {status, times};
  }
  std::vector<Seen> seen_for(const std::string& digest) const {
    std::vector<Seen> out;
    for (const auto& s : seen()) {
      if (s.digest == digest) out.push_back(s);
    }
    return out;
  }

  std::vector<Seen> seen() const {
    std::lock_guard lock(mu_);
    return seen_;
  }
  std::vector<Seen> seen(const std::string& method) const {
    std::vector<Seen> out;
    for (const auto& s : seen()) {
      if (s.method == method) out.push_back(s);
    }
    return out;
  }

 private:
  http::Response handle(const http::Request& req) {
    std::string path;
    {
      std::lock_guard lock(mu_);
      seen_.push_back(
          {req.method, req.params.at("digest"), req.header("range"), req.header("authorization")});
      if (auto fault = faults_.find(req.params.at("digest"));
          fault != faults_.end() && fault->second.times != 0) {
        if (fault->second.times > 0) --fault->second.times;
        return http::Response::json(fault->second.status,
                                    R"({"error":{"code":"unavailable","message":"injected"}})");
      }
      auto it = files_.find(req.params.at("digest"));
      if (it == files_.end()) {
        return http::Response::json(404, R"({"error":{"code":"not_found","message":"no"}})");
      }
      path = it->second;
    }
    const uint64_t total = std::filesystem::file_size(path);
    http::Response resp;
    resp.content_type = "application/octet-stream";
    resp.headers.emplace_back("Accept-Ranges", "bytes");
    http::FileRange file{path, 0, total};
    const std::string range = req.header("range");
    if (!range.empty() && !ignore_range_) {
      // "bytes=N-" or "bytes=N-M"
      uint64_t first = 0;
      uint64_t last = total - 1;
      auto dash = range.find('-');
      if (range.rfind("bytes=", 0) != 0 || dash == std::string::npos) {
        return http::Response::json(416, "{}");
      }
      first = std::stoull(range.substr(6, dash - 6));
      if (dash + 1 < range.size())
        last = std::min<uint64_t>(last, std::stoull(range.substr(dash + 1)));
      if (first >= total || first > last) return http::Response::json(416, "{}");
      resp.status = 206;
      file.offset = first;
      file.length = last - first + 1;
      resp.headers.emplace_back("Content-Range", "bytes " + std::to_string(first) + "-" +
                                                     std::to_string(last) + "/" +
                                                     std::to_string(total));
    }
    resp.file = file;
    return resp;
  }

  std::string blob_dir_;
  mutable std::mutex mu_;
  std::map<std::string, std::string> files_;
  std::vector<Seen> seen_;
  struct Fault {
    int status = 0;
    int times = 0;
  };
  std::map<std::string, Fault> faults_;
  std::atomic<bool> ignore_range_{false};
  http::Router router_;
  std::unique_ptr<http::HttpServer> server_;
};

// ---------------------------------------------------------------------------------------
// ArtifactStore

TEST(ArtifactStoreTest, InitHasPathListRemoveUsedBytes) {
  TempDir dir;
  ArtifactStore store(dir.path());
  ASSERT_TRUE(store.init().has_value());
  EXPECT_TRUE(std::filesystem::is_directory(dir.path() + "/artifacts/sha256"));
  EXPECT_TRUE(std::filesystem::is_directory(dir.path() + "/artifacts/partial"));
  EXPECT_TRUE(store.list().empty());
  EXPECT_EQ(store.used_bytes(), 0);

  const std::string a = random_bytes(1000, 1);
  const std::string b = random_bytes(300, 2);
  const std::string da = digest_of(a);
  const std::string db = digest_of(b);
  EXPECT_FALSE(store.has(da));
  EXPECT_EQ(store.path(da), dir.path() + "/artifacts/sha256/" + sha256_hex(a));
  EXPECT_EQ(store.partial_path(da), dir.path() + "/artifacts/partial/" + sha256_hex(a));

  write_text(store.path(da), a);
  write_text(store.partial_path(db), b.substr(0, 100));  // a download in progress
  EXPECT_TRUE(store.has(da));
  EXPECT_FALSE(store.has(db));  // partials are not verified blobs
  EXPECT_THAT(store.list(), UnorderedElementsAre(da));
  EXPECT_EQ(store.used_bytes(), 1100);

  write_text(store.path(db), b);
  EXPECT_THAT(store.list(), UnorderedElementsAre(da, db));
  EXPECT_EQ(store.used_bytes(), 1400);

  store.remove(db);  // both forms go
  EXPECT_FALSE(store.has(db));
  EXPECT_FALSE(exists(store.partial_path(db)));
  EXPECT_THAT(store.list(), UnorderedElementsAre(da));
  EXPECT_EQ(store.used_bytes(), 1000);
  store.remove(da);
  EXPECT_TRUE(store.list().empty());
  EXPECT_EQ(store.used_bytes(), 0);
}

TEST(ArtifactStoreTest, InitRemovesStrayTempFilesAndKeepsBlobs) {
  TempDir dir;
  ArtifactStore store(dir.path());
  ASSERT_TRUE(store.init().has_value());
  const std::string a = random_bytes(10, 3);
  write_text(store.path(digest_of(a)), a);
  write_text(dir.path() + "/artifacts/sha256/" + sha256_hex(a) + ".tmp", "half");
  write_text(store.partial_path(digest_of("x")), "partial");
  ASSERT_TRUE(store.init().has_value());  // a restart
  EXPECT_FALSE(exists(dir.path() + "/artifacts/sha256/" + sha256_hex(a) + ".tmp"));
  EXPECT_TRUE(store.has(digest_of(a)));
  EXPECT_TRUE(exists(store.partial_path(digest_of("x"))));  // kept for resume
  EXPECT_THAT(store.list(), UnorderedElementsAre(digest_of(a)));
}

// ---------------------------------------------------------------------------------------
// Fetcher

class FetcherTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ASSERT_TRUE(std::filesystem::create_directories(dir_.path() + "/data"));
    ASSERT_TRUE(std::filesystem::create_directories(dir_.path() + "/blobs"));
    server_ = std::make_unique<FakeArtifactServer>(dir_.path() + "/blobs");
    store_ = std::make_unique<ArtifactStore>(dir_.path() + "/data");
    ASSERT_TRUE(store_->init().has_value());
    identity_.server = server_->url();
    identity_.device_id = "d-1";
    identity_.credential = "d-1.s3cret";
    options_.retry_initial_ms = 60'000;  // a failure stays visible for the test to look at
    options_.retry_max_ms = 60'000;
    options_.free_disk_reserve_bytes = 0;
  }

  std::unique_ptr<Fetcher> start_fetcher() {
    auto fetcher = std::make_unique<Fetcher>(*store_, identity_, options_, [this] { ++changes_; });
    fetcher->start();
    return fetcher;
  }

  // Waits for the job to reach `phase`; returns its progress.
  FetchProgress wait_for(const Fetcher& fetcher, const std::string& digest, Phase phase,
                         std::chrono::milliseconds timeout = 10s) {
    bool reached = wait_until(
        [&] {
          auto p = fetcher.progress(digest);
          return p && p->phase == phase;
        },
        timeout);
    auto p = fetcher.progress(digest);
    EXPECT_TRUE(reached) << "phase " << (p ? static_cast<int>(p->phase) : -1) << ", last error "
                         << (p ? p->last_error : "(no job)");
    return p.value_or(FetchProgress{});
  }

  void expect_bearer_everywhere() const {
    for (const auto& s : server_->seen()) EXPECT_EQ(s.authorization, "Bearer d-1.s3cret");
  }

  TempDir dir_;
  std::unique_ptr<FakeArtifactServer> server_;
  std::unique_ptr<ArtifactStore> store_;
  Identity identity_;
  FetchOptions options_;
  std::atomic<int> changes_{0};
};

TEST_F(FetcherTest, DownloadsAndVerifies) {
  const std::string blob = random_bytes(300'000, 10);
  const std::string digest = digest_of(blob);
  server_->put(digest, blob);
  auto fetcher = start_fetcher();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kDone);
  EXPECT_EQ(p.total_bytes, 300'000);
  EXPECT_EQ(p.have_bytes, 300'000);
  EXPECT_EQ(p.fetched_bytes, 300'000);
  EXPECT_EQ(p.attempts, 1);
  EXPECT_EQ(p.last_error, "");
  ASSERT_TRUE(store_->has(digest));
  EXPECT_EQ(read_text(store_->path(digest)), blob);
  EXPECT_FALSE(exists(store_->partial_path(digest)));
  EXPECT_GE(changes_.load(), 1);

  EXPECT_EQ(server_->seen("HEAD").size(), 1u);
  auto gets = server_->seen("GET");
  ASSERT_EQ(gets.size(), 1u);
  EXPECT_EQ(gets[0].digest, digest);
  EXPECT_EQ(gets[0].range, "");  // nothing on disk: no Range
  expect_bearer_everywhere();

  // Already verified: asking again fetches nothing.
  fetcher->forget(digest);
  fetcher->want(digest);
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(server_->seen().size(), 2u);
}

TEST_F(FetcherTest, ResumesFromPartialFile) {
  const std::string blob = random_bytes(200'000, 11);
  const std::string digest = digest_of(blob);
  const int64_t have = 123'457;
  server_->put(digest, blob);
  write_text(store_->partial_path(digest), blob.substr(0, have));
  auto fetcher = start_fetcher();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kDone);
  EXPECT_EQ(p.fetched_bytes, 200'000 - have);
  EXPECT_EQ(p.total_bytes, 200'000);
  EXPECT_EQ(p.have_bytes, 200'000);
  ASSERT_TRUE(store_->has(digest));
  EXPECT_EQ(read_text(store_->path(digest)), blob);
  auto gets = server_->seen("GET");
  ASSERT_EQ(gets.size(), 1u);
  EXPECT_EQ(gets[0].range, "bytes=" + std::to_string(have) + "-");
  expect_bearer_everywhere();
}

TEST_F(FetcherTest, ServerIgnoringRangeMakesItStartOver) {
  const std::string blob = random_bytes(100'000, 12);
  const std::string digest = digest_of(blob);
  server_->put(digest, blob);
  server_->ignore_range(true);
  write_text(store_->partial_path(digest), blob.substr(0, 40'000));
  options_.retry_initial_ms = 20;
  options_.retry_max_ms = 20;
  auto fetcher = start_fetcher();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kDone);
  EXPECT_EQ(p.attempts, 2);
  ASSERT_TRUE(store_->has(digest));
  EXPECT_EQ(read_text(store_->path(digest)), blob);  // not the old 40 000 bytes + the whole
  auto gets = server_->seen("GET");
  ASSERT_EQ(gets.size(), 2u);
  EXPECT_EQ(gets[0].range, "bytes=40000-");
  EXPECT_EQ(gets[1].range, "");
}

TEST_F(FetcherTest, DigestMismatchIsDeletedAndRetried) {
  const std::string blob = random_bytes(50'000, 13);
  const std::string digest = digest_of(blob);
  std::string corrupt = blob;
  corrupt[25'000] = static_cast<char>(corrupt[25'000] ^ 0x40);
  server_->put(digest, corrupt);
  auto fetcher = start_fetcher();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kWaitingRetry);
  EXPECT_THAT(p.last_error, HasSubstr("sha256 mismatch"));
  EXPECT_EQ(p.attempts, 1);
  EXPECT_GT(p.retry_at_ms, 0);
  EXPECT_FALSE(store_->has(digest));
  EXPECT_FALSE(exists(store_->partial_path(digest)));
  EXPECT_TRUE(store_->list().empty());
  EXPECT_EQ(store_->used_bytes(), 0);
  EXPECT_THAT(fetcher->wanted(), UnorderedElementsAre(digest));
  // forget() lets go of a job waiting to retry.
  fetcher->forget(digest);
  EXPECT_FALSE(fetcher->progress(digest).has_value());
  EXPECT_TRUE(fetcher->wanted().empty());
}

TEST_F(FetcherTest, DiskBudgetIsCheckedBeforeAnyByteIsFetched) {
  const std::string blob = random_bytes(100'000, 14);
  const std::string digest = digest_of(blob);
  server_->put(digest, blob);
  options_.disk_budget_bytes = 60'000;
  auto fetcher = start_fetcher();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kWaitingRetry);
  EXPECT_THAT(p.last_error, StartsWith("disk budget"));
  EXPECT_EQ(p.fetched_bytes, 0);
  EXPECT_EQ(p.total_bytes, 100'000);
  EXPECT_EQ(server_->seen("HEAD").size(), 1u);
  EXPECT_TRUE(server_->seen("GET").empty());
  EXPECT_FALSE(store_->has(digest));
  EXPECT_FALSE(exists(store_->partial_path(digest)));
}

TEST_F(FetcherTest, DiskBudgetCountsWhatIsStoredAlready) {
  // 70 000 stored + 50 000 wanted > 100 000, though the new blob alone would fit.
  const std::string old_blob = random_bytes(70'000, 15);
  write_text(store_->path(digest_of(old_blob)), old_blob);
  const std::string blob = random_bytes(50'000, 16);
  const std::string digest = digest_of(blob);
  server_->put(digest, blob);
  options_.disk_budget_bytes = 100'000;
  auto fetcher = start_fetcher();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kWaitingRetry);
  EXPECT_THAT(p.last_error, StartsWith("disk budget"));
  EXPECT_TRUE(server_->seen("GET").empty());
}

TEST_F(FetcherTest, DiskBudgetCountsOnlyTheMissingPartOfAResume) {
  // The partial is counted as used; only the rest is needed: 60 000 + 40 000 fits 100 000.
  const std::string blob = random_bytes(100'000, 17);
  const std::string digest = digest_of(blob);
  server_->put(digest, blob);
  write_text(store_->partial_path(digest), blob.substr(0, 60'000));
  options_.disk_budget_bytes = 100'000;
  auto fetcher = start_fetcher();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kDone);
  EXPECT_EQ(p.fetched_bytes, 40'000);
  EXPECT_TRUE(store_->has(digest));
}

TEST_F(FetcherTest, MissingArtifactWaitsToRetry) {
  const std::string digest = digest_of("never uploaded");
  auto fetcher = start_fetcher();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kWaitingRetry);
  EXPECT_THAT(p.last_error, HasSubstr("404"));
  EXPECT_FALSE(store_->has(digest));
}

TEST_F(FetcherTest, RateCapSlowsTheTransfer) {
  const std::string blob = random_bytes(400 * 1024, 18);
  const std::string digest = digest_of(blob);
  server_->put(digest, blob);
  options_.max_rate_bytes_per_s = 200 * 1024;
  auto fetcher = start_fetcher();
  auto before = SteadyClock::now();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kDone, 15s);
  auto took = std::chrono::duration_cast<std::chrono::milliseconds>(SteadyClock::now() - before);
  EXPECT_EQ(p.fetched_bytes, 400 * 1024);
  EXPECT_GE(took.count(), 1'500);
  EXPECT_LE(took.count(), 6'000);
  EXPECT_EQ(read_text(store_->path(digest)), blob);
}

// A bare HTTP/1.1 server for one blob that sends the first `stall_at` bytes of a GET and then
// goes quiet until it is destroyed: a transfer that is in flight for as long as a test needs.
class StallingServer {
 public:
  StallingServer(std::string blob, size_t stall_at) : blob_(std::move(blob)), stall_at_(stall_at) {
    fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    EXPECT_GE(fd_, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = 0;
    EXPECT_EQ(::bind(fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    EXPECT_EQ(::listen(fd_, 8), 0);
    socklen_t len = sizeof(addr);
    EXPECT_EQ(::getsockname(fd_, reinterpret_cast<sockaddr*>(&addr), &len), 0);
    port_ = ntohs(addr.sin_port);
    thread_ = std::thread([this] { serve(); });
  }
  ~StallingServer() {
    stopping_ = true;
    thread_.join();
    ::close(fd_);
  }
  StallingServer(const StallingServer&) = delete;
  StallingServer& operator=(const StallingServer&) = delete;

  std::string url() const { return "http://127.0.0.1:" + std::to_string(port_); }

 private:
  void serve() {
    while (!stopping_) {
      pollfd p{fd_, POLLIN, 0};
      if (::poll(&p, 1, 20) <= 0) continue;
      int conn = ::accept4(fd_, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) continue;
      std::string request = test_support::read_request_head(conn);
      std::string head =
          "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n"
          "Connection: close\r\nContent-Length: " +
          std::to_string(blob_.size()) + "\r\n\r\n";
      send_all(conn, head);
      if (request.rfind("GET ", 0) == 0) {
        send_all(conn, std::string_view(blob_).substr(0, stall_at_));
        while (!stopping_) std::this_thread::sleep_for(10ms);
      }
      ::close(conn);
    }
  }
  static void send_all(int conn, std::string_view data) {
    while (!data.empty()) {
      ssize_t n = ::send(conn, data.data(), data.size(), MSG_NOSIGNAL);
      if (n <= 0) return;
      data.remove_prefix(static_cast<size_t>(n));
    }
  }

  std::string blob_;
  size_t stall_at_;
  int fd_ = -1;
  uint16_t port_ = 0;
  std::atomic<bool> stopping_{false};
  std::thread thread_;
};

TEST_F(FetcherTest, StopAbandonsTransferAndKeepsPartialForResume) {
  const std::string blob = random_bytes(300'000, 19);
  const std::string digest = digest_of(blob);
  const size_t stall_at = 100'000;
  server_->put(digest, blob);
  {
    StallingServer stalling(blob, stall_at);
    identity_.server = stalling.url();
    auto fetcher = start_fetcher();
    fetcher->want(digest);
    ASSERT_TRUE(wait_until(
        [&] {
          auto p = fetcher->progress(digest);
          return p && p->fetched_bytes == static_cast<int64_t>(stall_at);
        },
        5s));
    auto before = SteadyClock::now();
    fetcher->stop();
    EXPECT_LT(SteadyClock::now() - before, 2s);
    EXPECT_FALSE(store_->has(digest));
    ASSERT_TRUE(exists(store_->partial_path(digest)));
    EXPECT_EQ(read_text(store_->partial_path(digest)), blob.substr(0, stall_at));
  }
  // The next run (here against the real server) fetches only the rest.
  identity_.server = server_->url();
  auto fetcher = start_fetcher();
  fetcher->want(digest);
  FetchProgress p = wait_for(*fetcher, digest, Phase::kDone);
  EXPECT_EQ(p.fetched_bytes, static_cast<int64_t>(blob.size() - stall_at));
  EXPECT_EQ(read_text(store_->path(digest)), blob);
  auto gets = server_->seen("GET");
  ASSERT_EQ(gets.size(), 1u);
  EXPECT_EQ(gets[0].range, "bytes=" + std::to_string(stall_at) + "-");
}

TEST_F(FetcherTest, ForgetDuringTransferDropsTheJobWhenItEnds) {
  const std::string blob = random_bytes(300'000, 20);
  const std::string digest = digest_of(blob);
  const size_t stall_at = 100'000;
  auto fetcher = std::unique_ptr<Fetcher>();
  {
    StallingServer stalling(blob, stall_at);
    identity_.server = stalling.url();
    fetcher = start_fetcher();
    fetcher->want(digest);
    ASSERT_TRUE(wait_until(
        [&] {
          auto p = fetcher->progress(digest);
          return p && p->fetched_bytes == static_cast<int64_t>(stall_at);
        },
        5s));
    fetcher->forget(digest);  // no longer needed while its transfer is in flight
  }                           // the server goes away: the transfer fails
  ASSERT_TRUE(wait_until(
      [&] {
        auto p = fetcher->progress(digest);
        return !p || p->phase != Phase::kDownloading;
      },
      5s));
  // Nobody wants it: no retry is scheduled and GC need not keep anything for it.
  EXPECT_FALSE(fetcher->progress(digest).has_value());
  EXPECT_TRUE(fetcher->wanted().empty());
  EXPECT_TRUE(exists(store_->partial_path(digest)));  // forget keeps the partial
}

// ---------------------------------------------------------------------------------------
// Fetcher: delta updates. The device holds the base; the server serves the target and the
// delta that turns the base into it.

class DeltaFetchTest : public FetcherTest {
 protected:
  void SetUp() override {
    FetcherTest::SetUp();
    options_.retry_initial_ms = 20;  // retries are part of what these tests look at
    options_.retry_max_ms = 20;
    base_ = random_bytes(256 << 10, 30);
    target_ = base_;
    for (size_t i = 0; i < target_.size(); i += 10 * 1024) {  // 10 % changed, in runs
      for (size_t j = i; j < i + 1024 && j < target_.size(); ++j) target_[j] ^= 0x5a;
    }
    base_digest_ = digest_of(base_);
    target_digest_ = digest_of(target_);
    write_text(store_->path(base_digest_), base_);  // held, verified
    delta_ = make_delta(base_, target_);
    ASSERT_LT(delta_.size(), target_.size() / 4);
    delta_digest_ = digest_of(delta_);
    server_->put(target_digest_, target_);
    server_->put(delta_digest_, delta_);
  }

  // The patch-from delta from `base` to `target`, as the registry makes it.
  std::string make_delta(const std::string& base, const std::string& target) {
    const std::string b = dir_.file("delta-base"), t = dir_.file("delta-target");
    const std::string out = dir_.file("delta-out");
    write_text(b, base);
    write_text(t, target);
    auto made = delta::make_delta(b, t, out, {.level = 3});
    EXPECT_TRUE(made.has_value()) << made.error().message;
    return read_text(out);
  }

  DeltaPlan plan() const { return DeltaPlan{delta_digest_, base_digest_, -1}; }

  // Nothing of either download is left in partial/ once the target is stored.
  void expect_partials_clean() const {
    EXPECT_TRUE(std::filesystem::is_empty(dir_.path() + "/data/artifacts/partial"));
  }

  std::string base_, target_, delta_;
  std::string base_digest_, target_digest_, delta_digest_;
};

TEST_F(DeltaFetchTest, ADeltaRebuildsTheBlobAndOnlyItsBytesAreFetched) {
  auto fetcher = start_fetcher();
  fetcher->want(target_digest_, -1, plan());
  FetchProgress p = wait_for(*fetcher, target_digest_, Phase::kDone);
  ASSERT_TRUE(store_->has(target_digest_));
  EXPECT_EQ(read_text(store_->path(target_digest_)), target_);
  EXPECT_EQ(p.fetched_bytes, static_cast<int64_t>(delta_.size()));
  EXPECT_EQ(p.attempts, 1);
  EXPECT_EQ(p.via_delta, delta_digest_);
  EXPECT_EQ(p.delta_error, "");
  EXPECT_TRUE(server_->seen_for(target_digest_).empty());  // the whole blob was never asked for
  EXPECT_EQ(server_->seen_for(delta_digest_).size(), 2u);  // HEAD + GET
  EXPECT_FALSE(store_->has(delta_digest_));                // the delta is used once, not kept
  EXPECT_TRUE(store_->has(base_digest_));
  expect_partials_clean();
  expect_bearer_everywhere();
}

TEST_F(DeltaFetchTest, ACorruptedDeltaFallsBackToTheWholeBlob) {
  std::string corrupt = delta_;
  corrupt[corrupt.size() / 2] ^= 0x01;
  server_->put(delta_digest_, corrupt);  // served under the good delta's digest
  auto fetcher = start_fetcher();
  fetcher->want(target_digest_, -1, plan());
  FetchProgress p = wait_for(*fetcher, target_digest_, Phase::kDone);
  EXPECT_EQ(read_text(store_->path(target_digest_)), target_);
  EXPECT_EQ(p.attempts, 1);  // given up in the same attempt: no backoff for it
  EXPECT_THAT(p.delta_error, HasSubstr("sha256 mismatch"));
  EXPECT_EQ(p.via_delta, "");
  EXPECT_EQ(p.fetched_bytes, static_cast<int64_t>(corrupt.size() + target_.size()));
  EXPECT_EQ(server_->seen("GET").size(), 2u);
  EXPECT_EQ(server_->seen_for(target_digest_).size(), 2u);
  expect_partials_clean();

  // A delta given up is not tried again for that blob.
  store_->remove(target_digest_);
  fetcher->forget(target_digest_);
  fetcher->want(target_digest_, -1, plan());
  p = wait_for(*fetcher, target_digest_, Phase::kDone);
  EXPECT_EQ(p.via_delta, "");
  EXPECT_EQ(server_->seen_for(delta_digest_).size(), 2u);  // still only the first HEAD + GET
  EXPECT_EQ(read_text(store_->path(target_digest_)), target_);
}

TEST_F(DeltaFetchTest, ADeltaThatDoesNotRebuildTheBlobFallsBack) {
  // A well-formed delta (its own digest checks) made from another version, nearly the target:
  // it copies most of the target out of its base, so applied to the base the device holds
  // (10 % different) it cannot give the target's digest. (A delta from something unrelated
  // would carry the whole target and rebuild it from any base.)
  std::string other = target_;
  for (size_t i = 5 * 1024; i < other.size(); i += 20 * 1024) other[i] ^= 0x33;
  const std::string wrong = make_delta(other, target_);
  const std::string wrong_digest = digest_of(wrong);
  server_->put(wrong_digest, wrong);
  auto fetcher = start_fetcher();
  fetcher->want(target_digest_, -1, DeltaPlan{wrong_digest, base_digest_, -1});
  FetchProgress p = wait_for(*fetcher, target_digest_, Phase::kDone);
  EXPECT_EQ(read_text(store_->path(target_digest_)), target_);
  EXPECT_EQ(p.attempts, 1);
  EXPECT_NE(p.delta_error, "");
  EXPECT_EQ(server_->seen_for(target_digest_).size(), 2u);
  EXPECT_TRUE(store_->has(base_digest_));  // the base is not blamed and removed
  expect_partials_clean();
}

TEST_F(DeltaFetchTest, ABaseNoLongerHeldFallsBack) {
  store_->remove(base_digest_);
  auto fetcher = start_fetcher();
  fetcher->want(target_digest_, -1, plan());
  FetchProgress p = wait_for(*fetcher, target_digest_, Phase::kDone);
  EXPECT_EQ(read_text(store_->path(target_digest_)), target_);
  EXPECT_THAT(p.delta_error, HasSubstr("no longer on this device"));
  EXPECT_EQ(p.attempts, 1);
  expect_partials_clean();
}

TEST_F(DeltaFetchTest, AnAnswerThatIsNotBusyGivesTheDeltaUpAtOnce) {
  // 502: a relay whose upstream served it a bad copy; 404, 401/403, 500: no good copy either.
  for (int status : {502, 404, 403, 401, 500}) {
    SCOPED_TRACE(status);
    server_->answer(delta_digest_, status);
    const size_t seen_before = server_->seen_for(delta_digest_).size();
    auto fetcher = start_fetcher();
    fetcher->want(target_digest_, -1, plan());
    FetchProgress p = wait_for(*fetcher, target_digest_, Phase::kDone);
    EXPECT_EQ(read_text(store_->path(target_digest_)), target_);
    EXPECT_EQ(p.attempts, 1);
    EXPECT_THAT(p.delta_error, HasSubstr("HTTP " + std::to_string(status)));
    EXPECT_EQ(server_->seen_for(delta_digest_).size(), seen_before + 1);  // one HEAD, no retry
    EXPECT_EQ(p.fetched_bytes, static_cast<int64_t>(target_.size()));
    fetcher.reset();
    store_->remove(target_digest_);
  }
}

TEST_F(DeltaFetchTest, ABusyAnswerIsRetriedOnTheDelta) {
  for (int status : {503, 504, 429}) {
    SCOPED_TRACE(status);
    server_->answer(delta_digest_, status, /*times=*/2);
    const size_t seen_before = server_->seen_for(delta_digest_).size();
    auto fetcher = start_fetcher();
    fetcher->want(target_digest_, -1, plan());
    FetchProgress p = wait_for(*fetcher, target_digest_, Phase::kDone);
    EXPECT_EQ(read_text(store_->path(target_digest_)), target_);
    EXPECT_EQ(p.attempts, 3);  // two busy answers, then the delta came through
    EXPECT_EQ(p.via_delta, delta_digest_);
    EXPECT_EQ(p.delta_error, "");
    EXPECT_EQ(p.fetched_bytes, static_cast<int64_t>(delta_.size()));
    EXPECT_EQ(server_->seen_for(delta_digest_).size(), seen_before + 4);  // 2 HEAD, HEAD + GET
    EXPECT_TRUE(server_->seen_for(target_digest_).empty());
    fetcher.reset();
    store_->remove(target_digest_);
  }
}

TEST_F(DeltaFetchTest, ThreeBusyTriesGiveTheDeltaUpForTheWholeBlob) {
  server_->answer(delta_digest_, 503);
  auto fetcher = start_fetcher();
  fetcher->want(target_digest_, -1, plan());
  FetchProgress p = wait_for(*fetcher, target_digest_, Phase::kDone);
  EXPECT_EQ(read_text(store_->path(target_digest_)), target_);
  EXPECT_EQ(p.attempts, 3);  // the third busy answer gives it up in that same attempt
  EXPECT_THAT(p.delta_error, HasSubstr("HTTP 503"));
  EXPECT_EQ(p.via_delta, "");
  EXPECT_EQ(server_->seen_for(delta_digest_).size(), 3u);
  EXPECT_EQ(server_->seen_for(target_digest_).size(), 2u);
  expect_partials_clean();
}

TEST_F(DeltaFetchTest, ABusyServerWhileWaitingShowsTheDeltaStillPlanned) {
  // Between busy tries the job waits with the delta still its plan, and the error is kept.
  options_.retry_initial_ms = 60'000;
  options_.retry_max_ms = 60'000;
  server_->answer(delta_digest_, 503);
  auto fetcher = start_fetcher();
  fetcher->want(target_digest_, -1, plan());
  FetchProgress p = wait_for(*fetcher, target_digest_, Phase::kWaitingRetry);
  EXPECT_EQ(p.via_delta, delta_digest_);
  EXPECT_EQ(p.delta_error, "");
  EXPECT_EQ(p.last_code, Errc::kUnavailable);
  EXPECT_THAT(p.last_error, HasSubstr("HTTP 503"));
  EXPECT_TRUE(server_->seen_for(target_digest_).empty());
}

}  // namespace
}  // namespace outpost::agent
