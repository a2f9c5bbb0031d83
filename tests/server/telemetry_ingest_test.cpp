// Telemetry ingest through the control plane: the group-commit writer (TelemetryWriter)
// in front of a real SQLite store, and concurrent uploads over HTTP to an in-process
// control plane, each answered with its own outcome, the fleet totals counting each record
// once.
#include <sqlite3.h>
#include <stdlib.h>

#include <atomic>
#include <chrono>
#include <filesystem>
#include <fstream>
#include <future>
#include <latch>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <gtest/gtest.h>
#include <boost/asio/thread_pool.hpp>
#include <nlohmann/json.hpp>

#include "../e2e/harness.h"
#include "common/clock.h"
#include "common/http_client.h"
#include "common/telemetry_batch.h"
#include "server/api/api.h"
#include "server/control_plane.h"
#include "store/store.h"

namespace outpost::server {
namespace {

namespace fs = std::filesystem;

constexpr int64_t kT0 = 1'700'000'000'000 - 1'700'000'000'000 % 3'600'000;
constexpr int64_t kMinute = 60'000;

std::string temp_dir() {
  std::string pattern = testing::TempDir() + "/outpost-ingest-XXXXXX";
  if (mkdtemp(pattern.data()) == nullptr) return {};
  return pattern;
}

telemetry::Record inference(int64_t seq, int64_t time, uint64_t served) {
  telemetry::InferenceRecord r;
  r.deployment = "det";
  r.revision = 1;
  r.model = "net";
  r.version = "1.0.0";
  r.interval_ms = kMinute;
  r.requests = served;
  r.served = served;
  r.latency.count = served;
  r.latency.sum = 0.01 * static_cast<double>(served);
  r.latency.buckets = {{0.1, served}};
  return telemetry::Record{seq, time, r};
}

// Records seq from..to, served = seq.
telemetry::Batch batch(int64_t from, int64_t to) {
  telemetry::Batch b;
  b.first_seq = from;
  b.last_seq = to;
  for (int64_t seq = from; seq <= to; ++seq) {
    b.records.push_back(inference(seq, kT0 + seq * kMinute, static_cast<uint64_t>(seq)));
  }
  return b;
}

// A batch the store refuses half-way (two records with one seq collide on their points).
telemetry::Batch failing(int64_t seq) {
  telemetry::Batch b;
  b.first_seq = seq;
  b.last_seq = seq;
  b.records = {inference(seq, kT0 + seq * kMinute, 1000),
               inference(seq, kT0 + seq * kMinute, 1000)};
  return b;
}

// The committed watermark of a device, read through a connection of its own (so only what
// was committed shows); -1 when the device has no row.
int64_t committed_watermark(const std::string& db_path, const std::string& device) {
  sqlite3* db = nullptr;
  int64_t acked = -1;
  if (sqlite3_open_v2(db_path.c_str(), &db, SQLITE_OPEN_READONLY, nullptr) == SQLITE_OK) {
    sqlite3_busy_timeout(db, 5000);
    sqlite3_stmt* stmt = nullptr;
    if (sqlite3_prepare_v2(db, "SELECT acked_seq FROM telemetry_devices WHERE device_id = ?1", -1,
                           &stmt, nullptr) == SQLITE_OK) {
      sqlite3_bind_text(stmt, 1, device.c_str(), -1, SQLITE_TRANSIENT);
      if (sqlite3_step(stmt) == SQLITE_ROW) acked = sqlite3_column_int64(stmt, 0);
    }
    sqlite3_finalize(stmt);
  }
  sqlite3_close(db);
  return acked;
}

// Uploads queued while the writer waits for the database are stored together; every upload
// gets its own outcome (a batch the store refuses fails alone), and only after its
// transaction committed.
TEST(TelemetryWriterTest, GroupedUploadsGetTheirOwnOutcomesAfterCommit) {
  const std::string dir = temp_dir();
  ASSERT_FALSE(dir.empty());
  const std::string db_path = dir + "/outpost.db";
  auto opened = store::open_store("sqlite:" + db_path);
  ASSERT_TRUE(opened.has_value()) << opened.error().describe();
  store::Store& store = **opened;
  ManualClock clock(kT0 + 3'600'000);
  boost::asio::thread_pool workers(4);
  auto queue = api::make_telemetry_writer(store, clock);

  // Another connection holds the write lock: the writer's first group waits in BEGIN
  // IMMEDIATE while the other uploads queue up behind it.
  sqlite3* blocker = nullptr;
  ASSERT_EQ(sqlite3_open(db_path.c_str(), &blocker), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(blocker, "BEGIN IMMEDIATE", nullptr, nullptr, nullptr), SQLITE_OK);

  struct Answer {
    std::string device;
    std::string what;  // "good", "replay", "bad"
    Result<store::TelemetryIngestOutcome> outcome = make_error(Errc::kInternal, "not answered");
    int64_t committed = -2;  // the committed watermark when the answer came
  };
  std::mutex mu;
  std::vector<Answer> answers;
  std::atomic<int> answered{0};
  std::vector<telemetry::Batch> batches;  // kept alive: uploads own copies
  auto submit = [&](const std::string& device, const std::string& what, telemetry::Batch b) {
    api::TelemetryUpload upload{device, "plant-a", std::move(b)};
    auto done = [&, device, what](Result<store::TelemetryIngestOutcome> outcome) {
      Answer a{device, what, std::move(outcome), committed_watermark(db_path, device)};
      std::lock_guard lock(mu);
      answers.push_back(std::move(a));
      ++answered;
    };
    queue->submit(workers, std::move(upload), std::move(done));
  };

  submit("first", "good", batch(1, 3));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  constexpr int kDevices = 12;
  {
    std::latch start(kDevices);
    std::vector<std::thread> threads;
    for (int d = 0; d < kDevices; ++d) {
      threads.emplace_back([&, d] {
        const std::string device = "cam-" + std::to_string(d);
        start.arrive_and_wait();
        submit(device, "good", batch(1, 5));
        if (d % 3 == 0) submit(device, "replay", batch(1, 5));
        if (d % 4 == 1) submit(device, "bad", failing(6));  // above the watermark: would store
      });
    }
    for (auto& t : threads) t.join();
  }
  submit("cam-new", "bad", failing(1));
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_EQ(answered.load(), 0) << "answered before the transaction could commit";
  ASSERT_EQ(sqlite3_exec(blocker, "ROLLBACK", nullptr, nullptr, nullptr), SQLITE_OK);
  sqlite3_close(blocker);
  workers.join();

  const int expected = 1 + kDevices + (kDevices + 2) / 3 + 3 + 1;
  ASSERT_EQ(answered.load(), expected);
  // Per device: the good batch and its replay are one store and one duplicate, in either
  // order; bad batches fail and change nothing.
  std::map<std::string, std::vector<const Answer*>> by_device;
  for (const Answer& a : answers) by_device[a.device].push_back(&a);
  uint64_t served = 6;  // "first": 1+2+3
  for (const auto& [device, list] : by_device) {
    SCOPED_TRACE(device);
    int64_t stored = 0;
    int64_t duplicates = 0;
    for (const Answer* a : list) {
      if (a->what == "bad") {
        EXPECT_FALSE(a->outcome.has_value()) << a->what;
        continue;
      }
      ASSERT_TRUE(a->outcome.has_value()) << a->outcome.error().describe();
      EXPECT_EQ(a->outcome->acked, device == "first" ? 3 : 5);
      stored += a->outcome->stored;
      duplicates += a->outcome->duplicates;
      // Answered after the commit: another connection already sees the watermark.
      EXPECT_GE(a->committed, a->outcome->acked);
    }
    if (device == "cam-new") continue;
    EXPECT_EQ(stored, device == "first" ? 3 : 5);
    const int d = device == "first" ? -1 : std::stoi(device.substr(4));
    EXPECT_EQ(duplicates, d >= 0 && d % 3 == 0 ? 5 : 0);
    if (d >= 0) served += 15;
  }
  auto devices = store.list_telemetry_devices();
  ASSERT_TRUE(devices.has_value());
  EXPECT_EQ(devices->size(), static_cast<size_t>(kDevices + 1));  // not cam-new
  for (const auto& s : *devices) EXPECT_EQ(s.acked_seq, s.device_id == "first" ? 3 : 5);
  auto totals = store.list_telemetry_totals();
  ASSERT_TRUE(totals.has_value());
  ASSERT_EQ(totals->size(), 1u);
  EXPECT_EQ((*totals)[0].served, served);
  std::error_code ignored;
  fs::remove_all(dir, ignored);
}

// ---- Over HTTP ----

class TelemetryIngestHttpTest : public testing::Test {
 protected:
  void SetUp() override {
    dir_ = temp_dir();
    ASSERT_FALSE(dir_.empty());
    ControlPlaneOptions options;
    options.listen = "127.0.0.1:0";
    options.data_dir = dir_ + "/data";
    options.worker_threads = 4;
    options.telemetry_maintenance_ms = 3'600'000;
    plane_ = std::make_unique<ControlPlane>(options);
    auto started = plane_->start();
    ASSERT_TRUE(started.has_value()) << started.error().describe();
    // HTTPS, the default, with the development CA the plane made in its data directory.
    ASSERT_TRUE(plane_->tls().generated);
    ca_ = dir_ + "/data/tls/ca.pem";
    url_ = "https://127.0.0.1:" + std::to_string(plane_->port());
    std::ifstream in(plane_->admin_token_path());
    std::getline(in, admin_token_);
    while (!admin_token_.empty() && isspace(static_cast<unsigned char>(admin_token_.back()))) {
      admin_token_.pop_back();
    }
  }
  void TearDown() override {
    if (plane_) plane_->stop();
    plane_.reset();
    std::error_code ignored;
    if (!dir_.empty()) fs::remove_all(dir_, ignored);
  }

  std::string enrollment_token() {
    HttpClient op(url_, admin_token_, ca_);
    auto resp = op.request("POST", "/api/v1/enrollment-tokens", R"({"site":"plant-1"})");
    EXPECT_TRUE(resp.has_value());
    if (!resp) return {};
    EXPECT_EQ(resp->status, 201) << resp->body;
    return nlohmann::json::parse(resp->body, nullptr, false).value("token", "");
  }

  std::string dir_;
  std::unique_ptr<ControlPlane> plane_;
  std::string url_;
  std::string ca_;
  std::string admin_token_;
};

// Many devices upload at once (so uploads share transactions), with replays, overlaps and a
// malformed batch: every answer carries its own batch's numbers, and /metrics counts each
// record once.
TEST_F(TelemetryIngestHttpTest, ConcurrentUploadsAreAnsweredEachWithItsOwnOutcome) {
  const std::string token = enrollment_token();
  ASSERT_FALSE(token.empty());
  constexpr int kDevices = 16;
  constexpr int64_t kWindows = 8;  // of 5 records: seq 1..40 per device
  std::vector<e2e::FakeDevice> devices;
  for (int d = 0; d < kDevices; ++d) {
    devices.push_back(
        e2e::FakeDevice::enroll(url_, token, {{"arch", "x86_64"}, {"memory_mb", 4096}}, {}, ca_));
    ASSERT_FALSE(devices.back().id.empty());
  }
  const int64_t now = std::chrono::duration_cast<std::chrono::milliseconds>(
                          std::chrono::system_clock::now().time_since_epoch())
                          .count();
  auto body_of = [&](int64_t first, int64_t last) {
    std::vector<std::string> records;
    for (int64_t seq = first; seq <= last; ++seq) {
      telemetry::Record r = inference(seq, now - 600'000 + seq * 1000, static_cast<uint64_t>(seq));
      records.push_back(telemetry::record_to_json(r).dump());
    }
    auto body = telemetry::compress(telemetry::batch_json(first, last, {}, records));
    EXPECT_TRUE(body.has_value());
    return body ? *body : std::string();
  };

  std::atomic<int64_t> ok_answers{0};
  std::atomic<int64_t> stored_total{0};
  std::atomic<int64_t> duplicates_total{0};
  std::atomic<int> failures{0};
  std::latch start(kDevices);
  std::vector<std::thread> threads;
  for (int d = 0; d < kDevices; ++d) {
    threads.emplace_back([&, d] {
      HttpClient client(url_, devices[d].credential, ca_);
      client.set_signer(devices[d].signer);
      HttpRequestOptions zstd;
      zstd.headers.emplace_back("Content-Encoding", "zstd");
      auto post = [&](const std::string& body) {
        auto resp =
            client.request("POST", "/api/v1/device/telemetry", body, "application/json", zstd);
        if (!resp) {
          ADD_FAILURE() << resp.error().describe();
          ++failures;
          return std::pair<long, nlohmann::json>{0, nlohmann::json()};
        }
        return std::pair<long, nlohmann::json>{resp->status,
                                               nlohmann::json::parse(resp->body, nullptr, false)};
      };
      auto expect = [&](int64_t first, int64_t last, int64_t acked, int64_t stored,
                        int64_t duplicates) {
        auto [status, doc] = post(body_of(first, last));
        SCOPED_TRACE("device " + std::to_string(d) + " batch " + std::to_string(first) + ".." +
                     std::to_string(last));
        if (status != 200) {
          ADD_FAILURE() << "status " << status << ": " << doc.dump();
          ++failures;
          return;
        }
        ++ok_answers;
        stored_total += doc.value("stored", -1);
        duplicates_total += doc.value("duplicates", -1);
        EXPECT_EQ(doc.value("acked", -1), acked) << doc.dump();
        EXPECT_EQ(doc.value("stored", -1), stored) << doc.dump();
        EXPECT_EQ(doc.value("duplicates", -1), duplicates) << doc.dump();
      };
      start.arrive_and_wait();
      for (int64_t w = 0; w < kWindows; ++w) {
        const int64_t first = w * 5 + 1;
        const int64_t last = w * 5 + 5;
        if (w % 3 == 2) {
          expect(first - 2, last, last, 5, 2);  // overlaps the previous window by two
        } else {
          expect(first, last, last, 5, 0);
        }
        if (w % 3 == 1) expect(first, last, last, 0, 5);  // a replay
        if (d == 7 && w == 3) {
          // Malformed: records out of order. Refused whole; the stream goes on.
          std::vector<std::string> records = {
              telemetry::record_to_json(inference(last + 2, now, 1)).dump(),
              telemetry::record_to_json(inference(last + 1, now, 1)).dump()};
          auto body = telemetry::compress(telemetry::batch_json(last + 1, last + 2, {}, records));
          ASSERT_TRUE(body.has_value());
          auto [status, doc] = post(*body);
          EXPECT_EQ(status, 400) << doc.dump();
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  EXPECT_EQ(failures.load(), 0);

  // Windows: 8 sends + 3 replays (w = 1, 4, 7) per device.
  EXPECT_EQ(ok_answers.load(), kDevices * (kWindows + 3));
  EXPECT_EQ(stored_total.load(), kDevices * kWindows * 5);
  EXPECT_EQ(duplicates_total.load(), kDevices * (3 * 5 + 2 * 2));  // overlaps at w = 2, 5

  auto metrics = HttpClient(url_, "", ca_).request("GET", "/metrics");
  ASSERT_TRUE(metrics.has_value());
  const std::string& text = metrics->body;
  const int64_t served = kDevices * (40 * 41 / 2);
  auto has = [&](const std::string& line) {
    EXPECT_NE(text.find(line + "\n"), std::string::npos) << "missing: " << line << "\n" << text;
  };
  has("outpost_inference_requests_total{deployment=\"det\",model=\"net\",version=\"1.0.0\","
      "role=\"primary\"} " +
      std::to_string(served));
  has("outpost_telemetry_batches_total " + std::to_string(kDevices * (kWindows + 3)));
  has("outpost_telemetry_records_total " + std::to_string(kDevices * kWindows * 5));
  has("outpost_telemetry_duplicate_records_total " + std::to_string(kDevices * (3 * 5 + 2 * 2)));
  has("outpost_telemetry_refused_batches_total{reason=\"invalid\"} 1");
  has("outpost_telemetry_refused_batches_total{reason=\"store\"} 0");
  has("outpost_inference_latency_seconds_count{deployment=\"det\",model=\"net\",version=\"1.0.0\","
      "role=\"primary\"} " +
      std::to_string(served));

  HttpClient op(url_, admin_token_, ca_);
  auto q = op.request("GET", "/api/v1/telemetry/query?metric=inference_requests&since=1h");
  ASSERT_TRUE(q.has_value());
  ASSERT_EQ(q->status, 200) << q->body;
  auto doc = nlohmann::json::parse(q->body);
  EXPECT_EQ(doc["aggregate"]["sum"], static_cast<double>(served)) << q->body;
  EXPECT_EQ(doc["devices"], kDevices);
}

}  // namespace
}  // namespace outpost::server
